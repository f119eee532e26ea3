"""Text tower of a dual encoder: the decoder's layers (RMSNorm pre-norm,
RoPE, GQA, SwiGLU) over one text per row, causal or bidirectional, pooled
to one vector per row.

tokens `[b, L]` int32, mask `[b, L]` bool (True on the text, which starts
at position 0; False on padding) -> `[b, embed]` float32.

Pools: "last" takes the last text token (with causal attention it has seen
the whole text, as CLIP's EOS token); "mean" averages the text tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mmjax.errors import ConfigError
from mmjax.models.attention import SegmentMask
from mmjax.models.decoder import DecoderLayer
from mmjax.models.layers import Embed, RMSNorm
from mmjax.models.partitioning import constrain
from mmjax.models.stack import LayerStack

TEXT_POOLS = ("last", "mean")


def pool_text(x: jax.Array, mask: jax.Array, pool: str) -> jax.Array:
    """x `[b, L, e]`, mask `[b, L]` -> `[b, e]` float32 by `pool` (module doc).
    A row without text gives position 0 ("last") or zeros ("mean")."""
    x = x.astype(jnp.float32)
    if pool == "last":
        last = jnp.max(jnp.where(mask, jnp.arange(mask.shape[1]), 0), axis=1)
        return jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
    if pool == "mean":
        weights = mask.astype(jnp.float32)[..., None]
        return (x * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1.0)
    raise ValueError(f"text pool {pool!r} is unknown; choose one of {TEXT_POOLS}.")


class TextEncoder(nnx.Module):
    """Config fields (`config.model.decoder`): vocab_size, embed, layers,
    heads, kv_heads, head_dim, mlp, rope_theta, norm_eps, qk_norm, scan,
    remat, attention; dense layers only (no `moe.num_experts`)."""

    def __init__(self, cfg, *, causal: bool, pool: str, rngs: nnx.Rngs, dtype=jnp.float32):
        moe = cfg.get("moe")
        if moe and moe.num_experts:
            raise ConfigError(f"config.model.decoder.moe.num_experts={moe.num_experts}: the text tower of a dual "
                              "encoder is dense; set it to 0.")
        if pool not in TEXT_POOLS:
            raise ConfigError(f"config.model.contrastive.text_pool={pool!r} is unknown; choose one of {TEXT_POOLS}.")
        self.causal, self.pool = causal, pool
        self.embedder = Embed(cfg.vocab_size, cfg.embed, rngs=rngs, dtype=dtype)
        self.layers = LayerStack(lambda r: DecoderLayer(cfg, rngs=r, dtype=dtype), cfg.layers, rngs=rngs,
                                 scan=cfg.scan, remat=cfg.remat)
        self.final_norm = RMSNorm(cfg.embed, rngs=rngs, eps=cfg.norm_eps)

    def __call__(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        """tokens `[b, L]`, mask `[b, L]` -> pooled `[b, embed]` float32."""
        b, length = tokens.shape
        mask = mask.astype(jnp.bool_)
        x = constrain(self.embedder(tokens), ("batch", "seq", "act_embed"))
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
        segments = mask.astype(jnp.int32)  # text = segment 1, padding = 0
        if self.causal:
            attention = SegmentMask(segments)
        else:  # text sees all text, padding only padding
            attention = segments[:, :, None] == segments[:, None, :]
        x, _ = self.layers(x, attention, positions)
        return pool_text(self.final_norm(x), mask, self.pool)
