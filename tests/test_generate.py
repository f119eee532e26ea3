"""Cached generation (mmjax/generate/decode.py) gives exactly the tokens of
recomputing the whole sequence each step: dense and MoE (both dispatch
paths), GQA, QK-norm, listed and scanned layers, prompts of different
lengths, and `mm1` prompts with images."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import small_config
from mmjax.generate.decode import Sampling, jitted_generate, without_capacity_drops
from mmjax.models.registry import build_model

LENGTHS = np.array([7, 4, 2], np.int32)
NEW = 6


def _text_config(**decoder):
    c = small_config()
    c.model.name = "text_lm"
    c.model.decoder.vocab_size = 64
    c.model.decoder.layers = 2
    for key, value in decoder.items():
        if key == "moe":
            c.model.decoder.moe.update(value)
        else:
            c.model.decoder[key] = value
    return c


def _prompts(vocab: int) -> dict:
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, vocab, (len(LENGTHS), LENGTHS.max())).astype(np.int32)
    tokens[np.arange(LENGTHS.max())[None, :] >= LENGTHS[:, None]] = 0
    return {"tokens": jnp.asarray(tokens), "lengths": jnp.asarray(LENGTHS)}


def _uncached_greedy(model, batch: dict, steps: int) -> np.ndarray:
    lengths = np.asarray(batch["lengths"])
    """Argmax decoding that runs the whole sequence through the model per token."""
    tokens = np.asarray(batch["tokens"])
    b, p = tokens.shape
    seq = np.zeros((b, p + steps), np.int32)
    seq[:, :p] = tokens
    extra = {k: v for k, v in batch.items() if k in ("images",)}
    slots = None
    if "image_slots" in batch:
        slots = np.full((b, p + steps), -1, np.int32)
        slots[:, :p] = np.asarray(batch["image_slots"])

    @nnx.jit
    def logits_of(model, seq, segment_ids, positions, slots):
        if slots is None:
            return model.decoder.forward(model.decoder.embed(seq), segment_ids, positions)[0]
        return model.forward(seq, slots, extra["images"], segment_ids, positions)[0]

    out = np.zeros((b, steps), np.int32)
    positions = np.broadcast_to(np.arange(p + steps, dtype=np.int32), (b, p + steps))
    for t in range(steps):
        length = lengths + t
        segment_ids = (positions < length[:, None]).astype(np.int32)
        logits = np.asarray(logits_of(model, jnp.asarray(seq), jnp.asarray(segment_ids), jnp.asarray(positions),
                                      None if slots is None else jnp.asarray(slots)))
        out[:, t] = logits[np.arange(b), length - 1].argmax(-1)
        seq[np.arange(b), length] = out[:, t]
    return out


CASES = {
    "dense_gqa_listed": dict(heads=4, kv_heads=2),
    "dense_qk_norm_scanned": dict(heads=4, kv_heads=1, qk_norm=True, scan=True),
    "moe_capacity_listed": dict(moe=dict(num_experts=4, top_k=2, moe_every=2, capacity_factor=1.0, expert_mlp=64)),
    "moe_dropless_scanned": dict(scan=True, moe=dict(num_experts=4, top_k=2, moe_every=1, dispatch="dropless",
                                                     expert_mlp=64)),
    # router biases (aux-loss-free balancing) are model state that decoding must carry
    "moe_bias_listed": dict(moe=dict(num_experts=4, top_k=2, moe_every=2, expert_mlp=64, balance="bias")),
}


@pytest.mark.parametrize("case", [pytest.param(name, marks=[pytest.mark.slow] if "scanned" in name else [])
                                  for name in sorted(CASES)])
def test_cached_greedy_equals_uncached_argmax(case):
    c = _text_config(**CASES[case])
    model = build_model(c.model, nnx.Rngs(1))
    for _, module in model.iter_modules():
        if getattr(module, "router_bias", None) is not None:
            module.router_bias[...] = jax.random.normal(jax.random.key(2), module.router_bias.shape)
    batch = _prompts(c.model.decoder.vocab_size)
    tokens, counts = jitted_generate(model, Sampling(max_new_tokens=NEW, stop_ids=()))(batch)
    want = _uncached_greedy(without_capacity_drops(model), batch, NEW)
    np.testing.assert_array_equal(np.asarray(tokens), want)
    assert np.asarray(counts).tolist() == [NEW] * len(LENGTHS)


def mm1_model_and_prompts(text_lengths: tuple[int, ...]):
    """A small `mm1` model (bidirectional image attention) and one prompt per
    entry: `<bos>`, one image's k tokens, then that many text tokens."""
    c = small_config()
    c.model.bidirectional_image_attention = True
    model = build_model(c.model, nnx.Rngs(2))
    k, b = c.data.tokens_per_image, len(text_lengths)
    p = 1 + k + max(text_lengths)
    tokens = np.random.default_rng(1).integers(4, 500, (b, p)).astype(np.int32)
    slots = np.full((b, p), -1, np.int32)
    slots[:, 1:1 + k] = np.arange(k)
    tokens[:, 1:1 + k] = 3
    lengths = 1 + k + np.array(text_lengths, np.int32)
    images = np.random.default_rng(2).integers(0, 255, (b, 1, c.data.image_size, c.data.image_size, 3), np.uint8)
    batch = {"tokens": jnp.asarray(tokens), "lengths": jnp.asarray(lengths), "image_slots": jnp.asarray(slots),
             "images": jnp.asarray(images)}
    return model, batch


@pytest.mark.slow
def test_mm1_prompts_with_images_decode_like_the_full_forward():
    model, batch = mm1_model_and_prompts((4, 2, 1))
    got, _ = jitted_generate(model, Sampling(max_new_tokens=4, stop_ids=()))(batch)
    np.testing.assert_array_equal(np.asarray(got), _uncached_greedy(model, batch, 4))


@pytest.mark.slow
def test_sampling_limits_and_stops():
    c = _text_config(heads=4, kv_heads=2)
    model = build_model(c.model, nnx.Rngs(3))
    batch = _prompts(c.model.decoder.vocab_size)
    greedy, _ = jitted_generate(model, Sampling(max_new_tokens=NEW, stop_ids=()))(batch)
    greedy = np.asarray(greedy)
    for sampling in (Sampling(max_new_tokens=NEW, stop_ids=(), temperature=0.7, top_k=1),
                     Sampling(max_new_tokens=NEW, stop_ids=(), temperature=0.7, top_p=1e-6)):
        got, _ = jitted_generate(model, sampling)(batch, jax.random.key(7))
        np.testing.assert_array_equal(np.asarray(got), greedy)  # one candidate left: the argmax
    free, _ = jitted_generate(model, Sampling(max_new_tokens=NEW, stop_ids=(), temperature=5.0))(
        batch, jax.random.key(7))
    assert (np.asarray(free) != greedy).any()  # a hot temperature samples something else
    stop = int(greedy[0, 1])
    got, counts = jitted_generate(model, Sampling(max_new_tokens=NEW, stop_ids=(stop,)))(batch)
    got, counts = np.asarray(got), np.asarray(counts)
    first = int(np.argmax(greedy[0] == stop))
    assert counts[0] == first + 1 and (got[0, first + 1:] == 0).all()
    np.testing.assert_array_equal(got[0, :first + 1], greedy[0, :first + 1])
