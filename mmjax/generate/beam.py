"""Beam search over the key/value cache of `mmjax.generate.decode`.

Prompts are given as `generate` takes them: right-padded `tokens [b, P]` with
`lengths [b]` (and, for `mm1`, `image_slots [b, P]` and `images`). Each
prompt is prefilled once; its cache is then repeated per beam, giving
`[b * num_beams, S, kv_heads, head_dim]` per layer with S = P +
max_new_tokens (row i * num_beams + k is beam k of prompt i), and every beam
of prompt i writes its t-th new token to slot len_i + t, as `generate` does.

Each step scores every one-token continuation of every beam by its summed
log-probability, keeps the `num_beams` best of the `num_beams x vocab`
candidates of each prompt and gathers the caches of their parent beams. A
beam that has emitted one of `stop_ids` is finished: it stays among the
candidates with its score frozen and `pad_id` appended. At the end each
prompt's beam with the highest score / length ** length_penalty wins
(length: its new tokens, the stop token included; 0.0 ranks by the summed
log-probability, > 0 favours longer sequences).

`beam_search` is a pure function of the model: call it under jit
(`jitted_beam_search`) with static settings.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mmjax.generate.decode import decode_step, prefill, without_capacity_drops
from mmjax.models.partitioning import activation_sharding


def repeat_beams(tree, num_beams: int):
    """Every leaf `[b, ...]` -> `[b * num_beams, ...]`, each row repeated
    num_beams times in a row."""
    return jax.tree.map(lambda x: jnp.repeat(x, num_beams, axis=0), tree)


def reorder_beams(tree, rows: jax.Array):
    """Every leaf `[b * num_beams, ...]` with its rows taken from `rows`
    `[b * num_beams]` (the flat index of each new beam's parent)."""
    return jax.tree.map(lambda x: jnp.take(x, rows, axis=0), tree)


def candidate_scores(logits: jax.Array, scores: jax.Array, done: jax.Array, pad_id: int) -> jax.Array:
    """Summed log-probability of every one-token continuation `[b, K, vocab]`
    from next-token logits `[b * K, vocab]`, beam scores `[b, K]` and finished
    flags `[b, K]`: a finished beam's only candidate is `pad_id` at its frozen
    score."""
    b, k = scores.shape
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(b, k, -1)
    live = scores[:, :, None] + logp
    frozen = jnp.where(jnp.arange(logp.shape[-1]) == pad_id, scores[:, :, None], -jnp.inf)
    return jnp.where(done[:, :, None], frozen, live)


def select_beams(candidates: jax.Array, num_beams: int):
    """The `num_beams` best of candidates `[b, K, vocab]` per prompt:
    (scores `[b, num_beams]`, flat parent row `[b * num_beams]`, token
    `[b * num_beams]`)."""
    b, k, vocab = candidates.shape
    scores, index = jax.lax.top_k(candidates.reshape(b, k * vocab), num_beams)
    parent = jnp.arange(b)[:, None] * k + index // vocab
    return scores, parent.reshape(-1), (index % vocab).astype(jnp.int32).reshape(-1)


def initial_scores(b: int, num_beams: int) -> jax.Array:
    """`[b, num_beams]`: 0 for beam 0, -inf for the others, so the first step
    expands beam 0 only (all beams start from the same prompt)."""
    first = jnp.arange(num_beams) == 0
    return jnp.broadcast_to(jnp.where(first, 0.0, -jnp.inf), (b, num_beams)).astype(jnp.float32)


def best_beams(scores: jax.Array, counts: jax.Array, length_penalty: float) -> jax.Array:
    """Index of each prompt's winner `[b]` by score / length ** length_penalty;
    scores and counts `[b, K]`."""
    if length_penalty == 0.0:
        return jnp.argmax(scores, axis=1)
    length = jnp.maximum(counts, 1).astype(jnp.float32)
    return jnp.argmax(scores / length ** length_penalty, axis=1)


def beam_search(model, batch: dict, num_beams: int, max_new_tokens: int, stop_ids: tuple[int, ...] = (2,),
                pad_id: int = 0, length_penalty: float = 0.0):
    """(new tokens `[b, max_new_tokens]` (pad after a stop), number generated
    `[b]` (the stop token counted), summed log-probability of those tokens
    `[b]`) of each prompt's best beam."""
    lengths = batch["lengths"].astype(jnp.int32)
    b, p = batch["tokens"].shape
    logits, cache = prefill(model, batch, p + max_new_tokens)
    if not 1 <= num_beams <= logits.shape[-1]:
        raise ValueError(f"num_beams={num_beams} must be between 1 and the vocabulary size {logits.shape[-1]}.")
    logits, cache, positions = repeat_beams((logits, cache, lengths), num_beams)
    stops = jnp.asarray(stop_ids or (-1,), jnp.int32)

    def body(t, carry):
        logits, cache, out, scores, done, count = carry
        candidates = candidate_scores(logits, scores, done.reshape(b, num_beams), pad_id)
        scores, parent, token = select_beams(candidates, num_beams)
        cache, out, done, count = reorder_beams((cache, out, done, count), parent)
        out = out.at[:, t].set(token)
        count = count + (~done).astype(jnp.int32)
        done = done | jnp.isin(token, stops)
        logits, cache = decode_step(model, token, positions + t, cache)
        return logits, cache, out, scores, done, count

    rows = b * num_beams
    init = (logits, cache, jnp.full((rows, max_new_tokens), pad_id, jnp.int32), initial_scores(b, num_beams),
            jnp.zeros((rows,), bool), jnp.zeros((rows,), jnp.int32))
    _, _, out, scores, _, count = jax.lax.fori_loop(0, max_new_tokens, body, init)
    count = count.reshape(b, num_beams)
    best = best_beams(scores, count, length_penalty)
    winner = jnp.arange(b) * num_beams + best
    return out[winner], count.reshape(-1)[winner], jnp.take_along_axis(scores, best[:, None], axis=1)[:, 0]


def jitted_beam_search(model, num_beams: int, max_new_tokens: int, stop_ids: tuple[int, ...] = (2,),
                       pad_id: int = 0, length_penalty: float = 0.0, resolver=None):
    """`fn(batch) -> (tokens, counts, scores)` of `beam_search`, compiled once
    per batch shape; MoE layers take every token (`without_capacity_drops`).
    With `resolver` (`mmjax.parallel.activation_resolver`) activations are laid
    out as in training."""
    graphdef, state = nnx.split(without_capacity_drops(model))
    settings = dict(num_beams=num_beams, max_new_tokens=max_new_tokens, stop_ids=tuple(stop_ids),
                    pad_id=pad_id, length_penalty=float(length_penalty))

    @jax.jit
    def run(state, batch):
        with activation_sharding(resolver):
            return beam_search(nnx.merge(graphdef, state), batch, **settings)

    return lambda batch: run(state, batch)
