"""Beam search (mmjax/generate/beam.py): one beam is greedy decoding (dense,
MoE and `mm1` with an image), more beams find sequences at least as likely
as greedy's with the score the full forward pass gives them, and with
num_beams = vocab on a tiny model it finds the best of every possible
continuation."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import small_config
from mmjax.generate.beam import jitted_beam_search
from mmjax.generate.decode import Sampling, jitted_generate, without_capacity_drops
from mmjax.models.registry import build_model
from test_generate import mm1_model_and_prompts

LENGTHS = np.array([6, 3, 5], np.int32)
NEW = 5


def _text_model(seed: int, vocab: int = 64, **decoder):
    c = small_config()
    c.model.name = "text_lm"
    c.model.decoder.vocab_size = vocab
    c.model.decoder.layers = 2
    for key, value in decoder.items():
        if key == "moe":
            c.model.decoder.moe.update(value)
        else:
            c.model.decoder[key] = value
    return build_model(c.model, nnx.Rngs(seed))


def _prompts(vocab: int, lengths: np.ndarray = LENGTHS, seed: int = 0) -> dict:
    tokens = np.random.default_rng(seed).integers(4, vocab, (len(lengths), lengths.max())).astype(np.int32)
    tokens[np.arange(lengths.max())[None, :] >= lengths[:, None]] = 0
    return {"tokens": jnp.asarray(tokens), "lengths": jnp.asarray(lengths)}


def _mm1_model_and_prompts():
    return mm1_model_and_prompts((3, 1))


def _continuation_logprobs(model, batch: dict, new: np.ndarray) -> np.ndarray:
    """Log-probability of each new token `[n, t]` after its prompt, from one
    uncached forward pass of a text model over prompt + continuation; row i
    of `new` continues prompt row i (`batch` has n rows)."""
    prompt, lengths = np.asarray(batch["tokens"]), np.asarray(batch["lengths"])
    n, t = new.shape
    p = prompt.shape[1]
    seq = np.zeros((n, p + t), np.int32)
    seq[:, :p] = prompt
    rows = np.arange(n)[:, None]
    places = lengths[:, None] + np.arange(t)[None, :]
    seq[rows, places] = new
    positions = np.broadcast_to(np.arange(p + t, dtype=np.int32), (n, p + t))
    segment_ids = (positions < (lengths + t)[:, None]).astype(np.int32)
    logits, _ = nnx.jit(lambda m, s, g, q: m.decoder.forward(m.decoder.embed(s), g, q))(
        model, jnp.asarray(seq), jnp.asarray(segment_ids), jnp.asarray(positions))
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1), np.float64)
    return logp[rows, places - 1, new]


def _summed_logprob(model, batch: dict, tokens: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Summed log-probability `[b]` of each row's first counts[i] new tokens."""
    logp = _continuation_logprobs(model, batch, tokens)
    return np.where(np.arange(tokens.shape[1])[None, :] < counts[:, None], logp, 0.0).sum(axis=1)


MODELS = {
    "dense": lambda: (_text_model(1, heads=4, kv_heads=2), _prompts(64)),
    "moe": lambda: (_text_model(4, moe=dict(num_experts=4, top_k=2, moe_every=2, capacity_factor=1.0,
                                            expert_mlp=64)), _prompts(64)),
    "mm1_image": _mm1_model_and_prompts,
}


@pytest.mark.parametrize("case", sorted(MODELS))
def test_one_beam_is_greedy(case):
    model, batch = MODELS[case]()
    greedy, greedy_counts = jitted_generate(model, Sampling(max_new_tokens=NEW, stop_ids=()))(batch)
    tokens, counts, scores = jitted_beam_search(model, num_beams=1, max_new_tokens=NEW, stop_ids=())(batch)
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(greedy))
    np.testing.assert_array_equal(np.asarray(counts), np.asarray(greedy_counts))
    assert np.isfinite(np.asarray(scores)).all() and (np.asarray(scores) < 0).all()


def test_four_beams_score_at_least_greedy_and_report_the_true_score():
    model = _text_model(1, heads=4, kv_heads=2)
    batch = _prompts(64)
    free, _ = jitted_generate(model, Sampling(max_new_tokens=NEW, stop_ids=()))(batch)
    stop = int(np.asarray(free)[0, 2])  # greedy stops early on row 0: finished beams take part
    greedy, greedy_counts = jitted_generate(model, Sampling(max_new_tokens=NEW, stop_ids=(stop,)))(batch)
    tokens, counts, scores = jitted_beam_search(model, num_beams=4, max_new_tokens=NEW, stop_ids=(stop,))(batch)
    tokens, counts, scores = np.asarray(tokens), np.asarray(counts), np.asarray(scores)
    reference = without_capacity_drops(model)
    got = _summed_logprob(reference, batch, tokens, counts)
    base = _summed_logprob(reference, batch, np.asarray(greedy), np.asarray(greedy_counts))
    np.testing.assert_allclose(scores, got, atol=1e-4, rtol=0)
    assert (got >= base - 1e-5).all(), (got, base)
    assert (got > base + 1e-3).any(), "no row beats greedy: a weak case"
    for row, count in zip(tokens, counts):  # a stop ends the sequence; pads after it
        assert (row[count:] == 0).all() and (count == NEW or row[count - 1] == stop)


def test_length_penalty_ranks_by_mean_log_probability():
    model = _text_model(1, heads=4, kv_heads=2)
    batch = _prompts(64)
    free, _ = jitted_generate(model, Sampling(max_new_tokens=NEW, stop_ids=()))(batch)
    stops = tuple(int(t) for t in np.asarray(free)[:, 1])
    raw = jitted_beam_search(model, num_beams=4, max_new_tokens=NEW, stop_ids=stops)(batch)
    mean = jitted_beam_search(model, num_beams=4, max_new_tokens=NEW, stop_ids=stops, length_penalty=1.0)(batch)
    raw_scores, raw_counts = np.asarray(raw[2]), np.asarray(raw[1])
    mean_scores, mean_counts = np.asarray(mean[2]), np.asarray(mean[1])
    assert (raw_counts != mean_counts).any(), "the penalty changes no choice: a weak case"
    assert (raw_scores >= mean_scores - 1e-5).all()  # the raw winner has the highest sum
    assert (mean_scores / mean_counts >= raw_scores / raw_counts - 1e-5).all()  # and this one the highest mean


def test_beams_as_many_as_the_vocabulary_find_the_best_three_token_continuation():
    vocab, new = 16, 3
    model = _text_model(7, vocab=vocab, layers=1, embed=32, heads=2, kv_heads=1, head_dim=16, mlp=64)
    batch = _prompts(vocab, np.array([4, 2, 3, 5, 1, 3, 4, 2], np.int32), seed=3)
    tokens, counts, scores = jitted_beam_search(model, num_beams=vocab, max_new_tokens=new, stop_ids=())(batch)
    greedy, _ = jitted_generate(model, Sampling(max_new_tokens=new, stop_ids=()))(batch)
    every = np.array(list(itertools.product(range(vocab), repeat=new)), np.int32)  # [vocab ** 3, 3]
    n = len(batch["lengths"])
    rows = {k: np.repeat(np.asarray(v), len(every), axis=0) for k, v in batch.items()}
    logp = _continuation_logprobs(model, rows, np.tile(every, (n, 1))).reshape(n, len(every), new)
    total = logp.sum(-1)
    best = total.argmax(1)
    ordered = np.sort(total, axis=1)
    assert (ordered[:, -1] - ordered[:, -2] > 1e-3).all(), "the best continuation is not clearly the best"
    assert (np.asarray(greedy) != every[best]).any(axis=1).sum() >= 3, "greedy finds the best: a weak case"
    np.testing.assert_array_equal(np.asarray(tokens), every[best])
    np.testing.assert_allclose(np.asarray(scores), total.max(1), atol=1e-4, rtol=0)
    assert np.asarray(counts).tolist() == [new] * n
