"""Prefill a batch of prompts into a key/value cache, then decode token by token.

Prompts are right-padded `tokens [b, P]` with their `lengths [b]` (and, for
`mm1`, `image_slots [b, P]` and `images [b, n, h, w, 3]`, embedded and
spliced exactly as in training). The cache holds, per decoder layer, the
keys and values after QK-norm and RoPE, `[b, S, kv_heads, head_dim]` with
S = P + max_new_tokens; row b's prompt fills slots 0..len_b-1 and its t-th
new token goes to slot len_b + t at position len_b + t, so rows of
different lengths decode together. Listed and scanned layer stacks are run
layer by layer; MoE layers route each token as in training, with the
capacity raised so that no token is dropped (`without_capacity_drops`).

`generate` is a pure function of the model: call it under `nnx.jit`
(`jitted_generate`) with static settings. On a mesh, `jitted_generate(...,
resolver=...)` (`mmjax.parallel.activation_resolver`) lays activations out
as in training and keeps every cache `[b, S, kv_heads, head_dim]` sharded by
batch and kv-heads (`CACHE_AXES`); the parameters stay where training put them.
"""

from __future__ import annotations

import copy
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mmjax.models.decoder import attention_mask
from mmjax.models.moe import MoEFeedForward
from mmjax.models.partitioning import activation_sharding, constrain
from mmjax.models.registry import REGION_FIELDS

# Logical axes of a cache array `[batch, slots, kv_heads, head_dim]`.
CACHE_AXES = ("batch", None, "kv_heads", None)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen and when a row stops.

    temperature 0: greedy (argmax); else softmax(logits / temperature)
    restricted to the `top_k` most likely tokens (0: all) and to the smallest
    set whose probability reaches `top_p` (1.0: all). A row stops after
    `max_new_tokens` or after emitting one of `stop_ids` (e.g. `<eos>`, a
    newline token); later places hold `pad_id`."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop_ids: tuple[int, ...] = (2,)
    pad_id: int = 0


def without_capacity_drops(model: nnx.Module) -> nnx.Module:
    """A copy of `model` whose capacity-dispatch MoE layers take every token
    (capacity factor raised to num_experts / top_k: one expert may receive
    the whole group), so decoding never drops a token."""
    model = nnx.clone(model)
    for _, module in model.iter_modules():
        if isinstance(module, MoEFeedForward) and module.cfg.dispatch == "capacity":
            cfg = copy.deepcopy(module.cfg)
            cfg.capacity_factor = max(float(cfg.capacity_factor), cfg.num_experts / cfg.top_k)
            module.cfg = cfg
    return model


def empty_cache(decoder, batch: int, length: int, dtype) -> tuple:
    """Per layer (k, v) zeros `[batch, length, kv_heads, head_dim]`."""
    attn = decoder.layers.layer(0).attn
    kv_heads, head_dim = attn.key.out_features
    shape = (batch, length, kv_heads, head_dim)
    return tuple((constrain(jnp.zeros(shape, dtype), CACHE_AXES), constrain(jnp.zeros(shape, dtype), CACHE_AXES))
                 for _ in range(decoder.layers.depth))


def run_cached_layers(decoder, x, positions, cache, write, mask):
    """Every decoder layer on new tokens x `[b, t, embed]` with the cache
    (see `DecoderLayer.cached`); returns (hidden `[b, t, embed]`, cache)."""
    new = []
    for index in range(decoder.layers.depth):
        x, (k, v) = decoder.layers.layer(index).cached(x, positions, cache[index], write, mask)
        new.append((constrain(k, CACHE_AXES), constrain(v, CACHE_AXES)))
    return x, tuple(new)


def prompt_embeddings(model, batch: dict):
    """(x `[b, P, embed]`, image_ids `[b, P]` or None) as the model embeds its
    training inputs: `mm1` splices the encoded images into their slots (and
    region embeddings into region slots when the batch has region fields)."""
    if "images" in batch and hasattr(model, "input_embeddings"):
        regions = {k: batch[k] for k in REGION_FIELDS if k in batch}
        x = model.input_embeddings(batch["tokens"], batch["image_slots"], batch["images"], **regions)
        image_ids = None
        if model.bidirectional_image_attention:
            image_ids = jnp.where(batch["image_slots"] >= 0, batch["image_slots"] // model.tokens_per_image, -1)
        return x, image_ids
    return model.decoder.embed(batch["tokens"]), None


def prefill(model, batch: dict, cache_length: int):
    """Prompts into a fresh cache of `cache_length` slots: (logits of each
    row's last prompt token `[b, vocab]`, cache)."""
    decoder = model.decoder
    tokens, lengths = batch["tokens"], batch["lengths"]
    b, p = tokens.shape
    x, image_ids = prompt_embeddings(model, batch)
    slots = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    segment_ids = (slots < lengths[:, None]).astype(jnp.int32)
    mask = attention_mask(segment_ids, image_ids)
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, cache_length - p)))
    cache = empty_cache(decoder, b, cache_length, x.dtype)
    hidden, cache = run_cached_layers(decoder, x, slots, cache, slots, mask)
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)
    return decoder.logits(last)[:, 0], cache


def decode_step(model, tokens, positions, cache):
    """tokens `[b]` at positions `[b]` (their cache slots) -> (logits `[b, vocab]`, cache)."""
    decoder = model.decoder
    length = cache[0][0].shape[1]
    x = decoder.embed(tokens[:, None])
    mask = jnp.arange(length)[None, None, :] <= positions[:, None, None]
    hidden, cache = run_cached_layers(decoder, x, positions[:, None], cache, positions[:, None], mask)
    return decoder.logits(hidden)[:, 0], cache


def choose(logits: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
    """The next token per row `[b]` from logits `[b, vocab]`."""
    if sampling.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability of the more likely tokens
        kept = jnp.where(before < sampling.top_p, ordered, jnp.inf)
        threshold = jnp.min(kept, axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def generate(model, batch: dict, sampling: Sampling, rng: jax.Array | None = None):
    """(new tokens `[b, max_new_tokens]` (pad after a stop), number generated
    per row `[b]`, counting the stop token)."""
    lengths = batch["lengths"].astype(jnp.int32)
    b, p = batch["tokens"].shape
    steps = sampling.max_new_tokens
    rng = jax.random.key(0) if rng is None else rng
    logits, cache = prefill(model, batch, p + steps)
    stops = jnp.asarray(sampling.stop_ids or (-1,), jnp.int32)

    def body(t, carry):
        logits, cache, out, done, count = carry
        token = choose(logits, jax.random.fold_in(rng, t), sampling)
        token = jnp.where(done, sampling.pad_id, token)
        out = out.at[:, t].set(token)
        count = count + (~done).astype(jnp.int32)
        done = done | jnp.isin(token, stops)
        logits, cache = decode_step(model, token, lengths + t, cache)
        return logits, cache, out, done, count

    out = jnp.full((b, steps), sampling.pad_id, jnp.int32)
    init = (logits, cache, out, jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32))
    _, _, out, _, count = jax.lax.fori_loop(0, steps, body, init)
    return out, count


def generate_fn(model, sampling: Sampling, resolver=None, out_sharding=None):
    """`jax.jit`-ed `fn(params, batch, rng) -> (tokens, counts)` for `model`'s
    structure (it may be abstract, e.g. `nnx.merge(graphdef, abstract_params)`)
    and variables `params` (its `nnx.State`: parameters and any MoE router
    biases, e.g. the training state's `params`); MoE layers take every token (`without_capacity_drops`). With
    `resolver` activations and caches are sharded as the module doc says;
    `out_sharding` places the results (e.g. replicated, so every process can
    read them)."""
    graphdef = nnx.split(without_capacity_drops(model))[0]

    def run(params, batch, rng):
        with activation_sharding(resolver):
            return generate(nnx.merge(graphdef, params), batch, sampling, rng)

    return jax.jit(run, out_shardings=out_sharding)


def jitted_generate(model, sampling: Sampling, resolver=None):
    """`fn(batch, rng) -> (tokens, counts)` for `model` as it is (its own
    parameters), compiled once per batch shape: `generate_fn` bound to
    them."""
    fn, params = generate_fn(model, sampling, resolver), nnx.state(model)
    return lambda batch, rng=None: fn(params, batch, jax.random.key(0) if rng is None else rng)
