"""Multi-head / grouped-query attention with optional rotary embeddings.

Shapes: queries `[batch, q_len, heads, head_dim]`, keys and values
`[batch, kv_len, kv_heads, head_dim]`; `heads` must be a multiple of `kv_heads`.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mmjax.models.layers import Dense, RMSNorm


def rotary_embedding(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Applies RoPE (half-split rotation, as in Llama) to x `[b, s, h, d]`.

    positions: `[b, s]` integer positions of each token.
    """
    head_dim = x.shape[-1]
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, half, dtype=jnp.float32) * 2.0 / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, s, half]
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def einsum_f32_accumulate(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """`einsum(spec, a, b)` accumulated and returned in float32, whose
    backward pass casts the cotangent to the operands' dtype, so both
    transposed matmuls also take low-precision operands (as attention
    kernels do). Without it the float32 cotangent turns the two backward
    matmuls of a bfloat16 forward into float32 x float32 matmuls."""
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _einsum_f32_fwd(spec, a, b):
    return einsum_f32_accumulate(spec, a, b), (a, b)


def _einsum_f32_bwd(spec, residuals, cotangent):
    a, b = residuals
    ct = cotangent.astype(jnp.result_type(a, b))
    (da,) = jax.linear_transpose(lambda x: jnp.einsum(spec, x, b), a)(ct)
    (db,) = jax.linear_transpose(lambda y: jnp.einsum(spec, a, y), b)(ct)
    return da.astype(a.dtype), db.astype(b.dtype)


einsum_f32_accumulate.defvjp(_einsum_f32_fwd, _einsum_f32_bwd)


class SegmentMask(NamedTuple):
    """The decoder's training mask, kept as ids rather than `[b, s, s]`:
    causal within each packed document (`segment_ids` `[b, s]`, 0 =
    padding), and with `image_ids` `[b, s]` (-1 for text) the tokens of one
    image also see each other. `image_span` (a Python int, 0 if unknown) is
    the most tokens one image block holds: the splash kernel skips the key
    blocks further than that past the diagonal. Kernels read the ids; the
    XLA paths call `dense_mask`."""
    segment_ids: jax.Array
    image_ids: jax.Array | None = None
    image_span: int = 0


def dense_mask(mask) -> jax.Array | None:
    """None, a `[b, t, s]` bool mask or a `SegmentMask` -> None or `[b, t, s]` bool."""
    if not isinstance(mask, SegmentMask):
        return mask
    dense = causal_segment_mask(mask.segment_ids)
    if mask.image_ids is not None:
        ids = mask.image_ids
        dense = dense | ((ids[:, :, None] == ids[:, None, :]) & (ids[:, :, None] >= 0))
    return dense


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask) -> jax.Array:
    """Softmax attention in the inputs' dtype, statistics in float32.

    q `[b, t, h, d]`, k/v `[b, s, kv, d]`, mask `[b, t, s]` bool (True = attend)
    or None (or a `SegmentMask`). Returns `[b, t, h, d]` in q's dtype. Both matmuls take their
    operands in the compute dtype (bfloat16 in a mixed-precision run) and
    accumulate in float32 (`einsum_f32_accumulate`, as attention kernels
    do; so do their backward matmuls); the scores, the mask and the softmax are float32; the
    probabilities are cast to v's dtype for the second matmul. Rows with
    nothing to attend give a uniform average instead of NaN.
    """
    mask = dense_mask(mask)
    b, t, h, d = q.shape
    kv = k.shape[2]
    q = (q * jnp.asarray(1.0 / math.sqrt(d), q.dtype)).reshape(b, t, kv, h // kv, d)
    scores = einsum_f32_accumulate("btkgd,bskd->bkgts", q, k)
    if mask is not None:
        scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = einsum_f32_accumulate("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, d).astype(q.dtype)


def nn_dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask) -> jax.Array:
    """The same attention through `jax.nn.dot_product_attention` (XLA here;
    on GPUs JAX may pick cuDNN's fused kernel). Same shapes and mask as
    `dot_product_attention`; rows with nothing to attend average every value,
    as there."""
    mask = dense_mask(mask)
    if mask is not None:
        empty = ~mask.any(axis=-1, keepdims=True)  # [b, t, 1]
        mask = mask | empty
        mask = mask[:, None]  # [b, 1, t, s]: every head
    return jax.nn.dot_product_attention(q, k, v, mask=mask).astype(q.dtype)


def _splash(q, k, v, mask):
    from mmjax.models.splash import splash_attention  # Pallas import only when asked for
    return splash_attention(q, k, v, mask)


# Attention implementations by name (`config.model.{vit,decoder}.attention`):
# fn(q `[b, t, h, d]`, k/v `[b, s, kv, d]`, mask) -> `[b, t, h, d]`.
ATTENTION = {
    "xla": dot_product_attention,
    "dot_product_attention": nn_dot_product_attention,
    "splash": _splash,
}
# Implementations that take only no mask or a SegmentMask (training
# sequences); cached generation's dense masks go through XLA instead.
SEGMENT_ONLY = {"splash"}


def causal_segment_mask(segment_ids: jax.Array) -> jax.Array:
    """`[b, s]` segment ids (0 = padding) -> `[b, s, s]` causal mask that never
    crosses segments."""
    s = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((s, s), dtype=jnp.bool_))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return causal[None] & same


class Attention(nnx.Module):
    """Projections + attention. x `[b, s, embed]` -> `[b, s, embed]`."""

    def __init__(self, embed: int, heads: int, kv_heads: int, head_dim: int, *,
                 rngs: nnx.Rngs, embed_axis: str = "embed", use_bias: bool = False,
                 rope_theta: float | None = None, qk_norm: bool = False, norm_eps: float = 1e-6,
                 dtype=jnp.float32, param_dtype=jnp.float32, implementation: str = "xla"):
        if heads % kv_heads:
            raise ValueError(f"heads={heads} must be a multiple of kv_heads={kv_heads}")
        if implementation not in ATTENTION:
            raise ValueError(f"attention implementation {implementation!r} is unknown; choose one of "
                             f"{sorted(ATTENTION)}.")
        self.implementation = implementation
        self.rope_theta = rope_theta
        kw = dict(rngs=rngs, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype)
        self.query = Dense(embed, (heads, head_dim), (embed_axis, "heads", "head_dim"), **kw)
        self.key = Dense(embed, (kv_heads, head_dim), (embed_axis, "kv_heads", "head_dim"), **kw)
        self.value = Dense(embed, (kv_heads, head_dim), (embed_axis, "kv_heads", "head_dim"), **kw)
        self.out = Dense((heads, head_dim), embed, ("heads", "head_dim", embed_axis), **kw)
        # QK-norm: RMSNorm over head_dim of queries and keys (before RoPE).
        self.q_norm = RMSNorm(head_dim, rngs=rngs, eps=norm_eps, logical_axes=("head_dim",)) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, rngs=rngs, eps=norm_eps, logical_axes=("head_dim",)) if qk_norm else None

    def __call__(self, x: jax.Array, mask: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        q, k, v = self.qkv(x, positions)
        return self.attend(q, k, v, mask)

    def qkv(self, x: jax.Array, positions: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x `[b, s, embed]` -> q `[b, s, heads, d]`, k/v `[b, s, kv_heads, d]`
        (QK-norm and RoPE applied): what a key/value cache stores."""
        q, k, v = (checkpoint_name(self.query(x), "query_proj"), checkpoint_name(self.key(x), "key_proj"),
                   checkpoint_name(self.value(x), "value_proj"))  # names for the remat policies
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope_theta is not None:
            q = rotary_embedding(q, positions, self.rope_theta)
            k = rotary_embedding(k, positions, self.rope_theta)
        return q, k, v

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
        """q `[b, t, heads, d]` over k/v `[b, s, kv_heads, d]` (mask None,
        `[b, t, s]` or a `SegmentMask`) -> `[b, t, embed]`."""
        name = self.implementation
        if name in SEGMENT_ONLY and not (mask is None or isinstance(mask, SegmentMask)):
            name = "xla"  # generation with a key/value cache
        return self.out(checkpoint_name(ATTENTION[name](q, k, v, mask), "attention_context"))

    def cross(self, queries: jax.Array, context: jax.Array) -> jax.Array:
        """Unmasked cross-attention: queries `[b, t, embed]` attend to
        context `[b, s, embed]` -> `[b, t, embed]` (no RoPE)."""
        q, k, v = self.query(queries), self.key(context), self.value(context)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        name = "xla" if self.implementation in SEGMENT_ONLY else self.implementation  # few queries
        return self.out(ATTENTION[name](q, k, v, None))
