"""Dense decoder-only transformer: RMSNorm pre-norm, RoPE, GQA, SwiGLU.

Input embeddings `[batch, seq, embed]` (text embeddings with image embeddings
already spliced in) -> logits `[batch, seq, vocab]`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mmjax.models.attention import Attention, SegmentMask, dense_mask
from mmjax.models.layers import Dense, Embed, RMSNorm, SwiGLU
from mmjax.models.partitioning import constrain
from mmjax.models.moe import MoEFeedForward, token_kinds
from mmjax.models.precision import compute_dtype
from mmjax.models.registry import register_model
from mmjax.models.stack import LayerStack
from mmjax.errors import ConfigError


def is_moe_layer(cfg, index: int) -> bool:
    """MoE replaces the MLP of every `moe.moe_every`-th layer (1-based: with
    moe_every=2 the 2nd, 4th, ... layers), when `moe.num_experts > 0`."""
    moe = cfg.get("moe")
    return bool(moe and moe.num_experts > 0 and (index + 1) % moe.moe_every == 0)


class DecoderLayer(nnx.Module):
    """x + attn(norm(x)); x + mlp(norm(x)). Returns (x, aux): aux holds the
    MoE losses and routing statistics (empty for a dense layer)."""

    def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32, moe: bool = False):
        self.attn_norm = RMSNorm(cfg.embed, rngs=rngs, eps=cfg.norm_eps)
        self.attn = Attention(cfg.embed, cfg.heads, cfg.kv_heads, cfg.head_dim, rngs=rngs,
                              rope_theta=cfg.rope_theta, qk_norm=cfg.qk_norm, norm_eps=cfg.norm_eps,
                              dtype=dtype, implementation=cfg.get("attention", "xla"))
        self.mlp_norm = RMSNorm(cfg.embed, rngs=rngs, eps=cfg.norm_eps)
        if moe:
            self.mlp = MoEFeedForward(cfg.embed, cfg.moe, rngs=rngs, dtype=dtype)
        else:
            self.mlp = SwiGLU(cfg.embed, cfg.mlp, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, mask: SegmentMask, positions: jax.Array,
                 token_kind: jax.Array | None = None):
        """token_kind `[b, s]` (see `mmjax.models.moe.TOKEN_KINDS`): for the MoE routing statistics."""
        x = x + self.attn(self.attn_norm(x), mask, positions)
        return self._feed_forward(x, token_kind)

    def _feed_forward(self, x: jax.Array, token_kind: jax.Array | None = None):
        h = self.mlp_norm(x)
        out = self.mlp(h, token_kind) if isinstance(self.mlp, MoEFeedForward) else self.mlp(h)
        y, aux = out if isinstance(out, tuple) else (out, {})
        return constrain(x + y, ("batch", "seq", "act_embed")), aux

    def cached(self, x: jax.Array, positions: jax.Array, cache: tuple[jax.Array, jax.Array],
               write: jax.Array, mask: jax.Array):
        """One layer over new tokens with a key/value cache (generation).

        x `[b, t, embed]` at `positions` `[b, t]`; cache (k, v) `[b, S, kv_heads, d]`;
        `write` `[b, t]` the cache slot of each new token; `mask` `[b, t, S]`
        which slots each new token attends to (after the write). Returns
        (x `[b, t, embed]`, the updated cache)."""
        q, k, v = self.attn.qkv(self.attn_norm(x), positions)
        rows = jnp.arange(x.shape[0])[:, None]
        cache_k = cache[0].at[rows, write].set(k.astype(cache[0].dtype))
        cache_v = cache[1].at[rows, write].set(v.astype(cache[1].dtype))
        x = x + self.attn.attend(q, cache_k.astype(k.dtype), cache_v.astype(v.dtype), mask)
        return self._feed_forward(x)[0], (cache_k, cache_v)


def attention_mask(segment_ids: jax.Array, image_ids: jax.Array | None = None) -> jax.Array:
    """`[b, s, s]`: causal within each segment; with image_ids `[b, s]` (-1 for
    text) the tokens of one image also see each other."""
    return dense_mask(SegmentMask(segment_ids, image_ids))


class Decoder(nnx.Module):
    """Config fields: vocab_size, embed, layers, heads, kv_heads, head_dim, mlp,
    rope_theta, norm_eps, qk_norm, tie_embeddings, scan, remat."""

    def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.embedder = Embed(cfg.vocab_size, cfg.embed, rngs=rngs, dtype=dtype)
        kinds = {is_moe_layer(cfg, i) for i in range(cfg.layers)}
        if len(kinds) > 1 and cfg.scan:
            raise ConfigError("config.model.decoder.scan=True needs identical layers; with MoE on every "
                             f"{cfg.moe.moe_every}-th layer set scan=False (or moe_every=1).")
        self.layers = LayerStack(lambda r, i=0: DecoderLayer(cfg, rngs=r, dtype=dtype, moe=is_moe_layer(cfg, i)),
                                 cfg.layers, rngs=rngs, scan=cfg.scan, remat=cfg.remat,
                                 indexed=len(kinds) > 1)
        self.final_norm = RMSNorm(cfg.embed, rngs=rngs, eps=cfg.norm_eps)
        self.lm_head = (None if cfg.tie_embeddings else
                        Dense(cfg.embed, cfg.vocab_size, ("embed", "vocab"), rngs=rngs, dtype=dtype))

    def embed(self, tokens: jax.Array) -> jax.Array:
        """tokens `[b, s]` -> `[b, s, embed]`."""
        return self.embedder(tokens)

    def __call__(self, x: jax.Array, segment_ids: jax.Array, positions: jax.Array,
                 image_ids: jax.Array | None = None, image_span: int = 0) -> jax.Array:
        """x `[b, s, embed]`, segment_ids/positions `[b, s]` -> logits `[b, s, vocab]` (float32).

        image_ids `[b, s]` (optional; -1 for text): tokens of the same image
        also attend to each other bidirectionally; image_span: the most tokens
        one image holds (0 if unknown; lets attention kernels skip work)."""
        return self.forward(x, segment_ids, positions, image_ids, image_span)[0]

    def forward(self, x: jax.Array, segment_ids: jax.Array, positions: jax.Array,
                image_ids: jax.Array | None = None, image_span: int = 0,
                token_kind: jax.Array | None = None) -> tuple[jax.Array, dict]:
        """(logits, aux): aux values are stacked over the MoE layers `[n_moe, ...]`.

        token_kind `[b, s]` (`mmjax.models.moe.token_kinds`) splits the MoE
        routing statistics by modality; None: text, padding where segment_ids is 0."""
        if token_kind is None:
            token_kind = token_kinds(segment_ids)
        x, aux = self.layers(x, SegmentMask(segment_ids, image_ids, image_span), positions, token_kind)
        return self.logits(x), aux

    def logits(self, x: jax.Array) -> jax.Array:
        """Final norm and LM head: x `[b, s, embed]` -> logits `[b, s, vocab]` float32."""
        x = self.final_norm(x)
        logits = self.embedder.attend(x) if self.lm_head is None else self.lm_head(x)
        return constrain(logits.astype(jnp.float32), ("batch", "seq", "act_vocab"))


class LanguageModel(nnx.Module):
    """A text-only decoder (the MM1 decoder without the vision tower).

    Called on token ids `[b, s]` -> logits `[b, s, vocab]` (one document per
    row, positions 0..s-1): imported LLMs. Registered as model `text_lm`,
    which trains on packed text batches through `forward_batch`."""

    def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.decoder = Decoder(cfg, rngs=rngs, dtype=dtype)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        b, s = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        return self.decoder(self.decoder.embed(tokens), jnp.ones((b, s), jnp.int32), positions)

    def forward_batch(self, batch) -> tuple[jax.Array, dict]:
        """tokens, segment_ids, positions `[b, s]` -> (logits `[b, s, vocab]`, MoE aux)."""
        x = constrain(self.decoder.embed(batch["tokens"]), ("batch", "seq", "act_embed"))
        return self.decoder.forward(x, batch["segment_ids"], batch["positions"])


@register_model("text_lm", inputs=("tokens", "segment_ids", "positions"))
def build_text_lm(cfg, rngs: nnx.Rngs) -> LanguageModel:
    """Model config fields: decoder, dtype (vit and connector are not used)."""
    return LanguageModel(cfg.decoder, rngs=rngs, dtype=compute_dtype(cfg.dtype))
