"""Dense decoder-only transformer: RMSNorm pre-norm, RoPE, GQA, SwiGLU.

Input embeddings `[batch, seq, embed]` (text embeddings with image embeddings
already spliced in) -> logits `[batch, seq, vocab]`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mmjax.models.attention import Attention, causal_segment_mask
from mmjax.models.layers import Dense, Embed, RMSNorm
from mmjax.models.partitioning import constrain


class SwiGLU(nnx.Module):
    """x `[..., embed]` -> down(silu(gate(x)) * up(x)) `[..., embed]`."""

    def __init__(self, embed: int, mlp: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.gate = Dense(embed, mlp, ("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.up = Dense(embed, mlp, ("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.down = Dense(mlp, embed, ("mlp", "embed"), rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class DecoderLayer(nnx.Module):
    """x + attn(norm(x)); x + mlp(norm(x))."""

    def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.attn_norm = RMSNorm(cfg.embed, rngs=rngs, eps=cfg.norm_eps)
        self.attn = Attention(cfg.embed, cfg.heads, cfg.kv_heads, cfg.head_dim, rngs=rngs,
                              rope_theta=cfg.rope_theta, dtype=dtype)
        self.mlp_norm = RMSNorm(cfg.embed, rngs=rngs, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg.embed, cfg.mlp, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, mask: jax.Array, positions: jax.Array) -> jax.Array:
        x = x + self.attn(self.attn_norm(x), mask, positions)
        return x + self.mlp(self.mlp_norm(x))


class Decoder(nnx.Module):
    """Config fields: vocab_size, embed, layers, heads, kv_heads, head_dim, mlp,
    rope_theta, norm_eps, tie_embeddings."""

    def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.embedder = Embed(cfg.vocab_size, cfg.embed, rngs=rngs, dtype=dtype)
        self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs, dtype=dtype) for _ in range(cfg.layers)])
        self.final_norm = RMSNorm(cfg.embed, rngs=rngs, eps=cfg.norm_eps)
        self.lm_head = (None if cfg.tie_embeddings else
                        Dense(cfg.embed, cfg.vocab_size, ("embed", "vocab"), rngs=rngs, dtype=dtype))

    def embed(self, tokens: jax.Array) -> jax.Array:
        """tokens `[b, s]` -> `[b, s, embed]`."""
        return self.embedder(tokens)

    def __call__(self, x: jax.Array, segment_ids: jax.Array, positions: jax.Array) -> jax.Array:
        """x `[b, s, embed]`, segment_ids/positions `[b, s]` -> logits `[b, s, vocab]` (float32)."""
        mask = causal_segment_mask(segment_ids)
        for layer in self.layers:
            x = constrain(layer(x, mask, positions), ("batch", "seq", "act_embed"))
        x = self.final_norm(x)
        logits = self.embedder.attend(x) if self.lm_head is None else self.lm_head(x)
        return constrain(logits.astype(jnp.float32), ("batch", "seq", "act_vocab"))
