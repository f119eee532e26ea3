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
from mmjax.models.stack import LayerStack


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
                              rope_theta=cfg.rope_theta, qk_norm=cfg.qk_norm, norm_eps=cfg.norm_eps,
                              dtype=dtype)
        self.mlp_norm = RMSNorm(cfg.embed, rngs=rngs, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg.embed, cfg.mlp, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, mask: jax.Array, positions: jax.Array) -> jax.Array:
        x = x + self.attn(self.attn_norm(x), mask, positions)
        x = x + self.mlp(self.mlp_norm(x))
        return constrain(x, ("batch", "seq", "act_embed"))


class Decoder(nnx.Module):
    """Config fields: vocab_size, embed, layers, heads, kv_heads, head_dim, mlp,
    rope_theta, norm_eps, qk_norm, tie_embeddings, scan, remat."""

    def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.embedder = Embed(cfg.vocab_size, cfg.embed, rngs=rngs, dtype=dtype)
        self.layers = LayerStack(lambda r: DecoderLayer(cfg, rngs=r, dtype=dtype), cfg.layers, rngs=rngs,
                                 scan=cfg.scan, remat=cfg.remat)
        self.final_norm = RMSNorm(cfg.embed, rngs=rngs, eps=cfg.norm_eps)
        self.lm_head = (None if cfg.tie_embeddings else
                        Dense(cfg.embed, cfg.vocab_size, ("embed", "vocab"), rngs=rngs, dtype=dtype))

    def embed(self, tokens: jax.Array) -> jax.Array:
        """tokens `[b, s]` -> `[b, s, embed]`."""
        return self.embedder(tokens)

    def __call__(self, x: jax.Array, segment_ids: jax.Array, positions: jax.Array,
                 image_ids: jax.Array | None = None) -> jax.Array:
        """x `[b, s, embed]`, segment_ids/positions `[b, s]` -> logits `[b, s, vocab]` (float32).

        image_ids `[b, s]` (optional; -1 for text): tokens of the same image
        also attend to each other bidirectionally."""
        mask = causal_segment_mask(segment_ids)
        if image_ids is not None:
            same_image = (image_ids[:, :, None] == image_ids[:, None, :]) & (image_ids[:, :, None] >= 0)
            mask = mask | same_image
        x = self.layers(x, mask, positions)
        x = self.final_norm(x)
        logits = self.embedder.attend(x) if self.lm_head is None else self.lm_head(x)
        return constrain(logits.astype(jnp.float32), ("batch", "seq", "act_vocab"))


class LanguageModel(nnx.Module):
    """A text-only decoder: token ids `[b, s]` -> logits `[b, s, vocab]`
    (one document per row, positions 0..s-1). Used for imported LLMs."""

    def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.decoder = Decoder(cfg, rngs=rngs, dtype=dtype)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        b, s = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        return self.decoder(self.decoder.embed(tokens), jnp.ones((b, s), jnp.int32), positions)
