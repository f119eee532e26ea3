"""Dual encoder (CLIP / SigLIP image-encoder pre-training): an image tower
and a text tower, each pooled and projected to a shared embedding space and
L2-normalised, with a learned temperature (and SigLIP's learned bias).

Batch fields (one image-text pair per row, see `mmjax.models.registry`):
  image        `[b, T, T, 3]` uint8 pixels (normalised here with the ViT
                              flavour's mean/std) or float32 normalised pixels
  tokens       `[b, L]` int32 the text, from position 0
  segment_ids  `[b, L]` int32 1 on the text, 0 on padding

Outputs (`forward_batch`), what the "contrastive" objective
(`mmjax.train.contrastive`) reads:
  image `[b, embed]`, text `[b, embed]` float32, unit norm;
  logit_scale `[]` the log of the similarities' multiplier;
  logit_bias `[]` (SigLIP only) added to the scaled similarities.

Config fields: vit (image tower; pooled by `contrastive.image_pool`: "token"
is CLIP's class token or SigLIP's MAP head, "mean" the mean patch token),
decoder (text tower, `mmjax.models.text_encoder`), dtype, and
contrastive: loss ("clip" | "siglip"), embed (shared dimension),
image_pool, text_pool ("last" | "mean"), text_causal.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from mmjax.errors import ConfigError
from mmjax.models.layers import Dense, make_param
from mmjax.models.partitioning import constrain
from mmjax.models.precision import compute_dtype
from mmjax.models.registry import register_model
from mmjax.models.text_encoder import TextEncoder
from mmjax.models.vit import ViT, normalize_pixels

# loss -> (initial log temperature, initial bias or None)
CONTRASTIVE_LOSSES = {
    "clip": (math.log(1 / 0.07), None),
    "siglip": (math.log(10.0), -10.0),
}
IMAGE_POOLS = ("token", "mean")


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """`[..., d]` -> unit norm over the last dimension (float32)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


def _constant(value: float):
    return lambda key, shape, dtype: jnp.full(shape, value, dtype)


class DualEncoder(nnx.Module):
    """See the module doc for the config fields, inputs and outputs."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        c = cfg.contrastive
        if c.loss not in CONTRASTIVE_LOSSES:
            raise ConfigError(f"config.model.contrastive.loss={c.loss!r} is unknown; choose one of "
                              f"{sorted(CONTRASTIVE_LOSSES)}.")
        if c.image_pool not in IMAGE_POOLS:
            raise ConfigError(f"config.model.contrastive.image_pool={c.image_pool!r} is unknown; choose one of "
                              f"{IMAGE_POOLS}.")
        if c.image_pool == "token" and cfg.vit.flavour == "siglip" and not cfg.vit.map_head:
            raise ConfigError("config.model.contrastive.image_pool='token' pools a SigLIP ViT with its MAP head; "
                              "set config.model.vit.map_head=True or image_pool='mean'.")
        dtype = compute_dtype(cfg.dtype)
        self.image_pool, self.flavour = c.image_pool, cfg.vit.flavour
        self.vit = ViT(cfg.vit, rngs=rngs, dtype=dtype)
        self.text = TextEncoder(cfg.decoder, causal=c.text_causal, pool=c.text_pool, rngs=rngs, dtype=dtype)
        self.image_projection = Dense(cfg.vit.embed, c.embed, ("vit_embed", "joint_embed"), rngs=rngs, dtype=dtype)
        self.text_projection = Dense(cfg.decoder.embed, c.embed, ("embed", "joint_embed"), rngs=rngs, dtype=dtype)
        scale, bias = CONTRASTIVE_LOSSES[c.loss]
        self.logit_scale = make_param(rngs, _constant(scale), (), ())
        self.logit_bias = make_param(rngs, _constant(bias), (), ()) if bias is not None else None

    def embed_images(self, images: jax.Array) -> jax.Array:
        """images `[b, T, T, 3]` -> unit-norm embeddings `[b, embed]` float32."""
        images = normalize_pixels(images, self.flavour)
        pooled = self.vit.pooled(images) if self.image_pool == "token" else self.vit.mean_pooled(images)
        return self._normalized(self.image_projection(constrain(pooled, ("batch", "act_vit_embed"))))

    def embed_texts(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        """tokens `[b, L]`, mask `[b, L]` (True on text) -> unit-norm embeddings `[b, embed]` float32."""
        pooled = constrain(self.text(tokens, mask), ("batch", "act_embed"))
        return self._normalized(self.text_projection(pooled))

    @staticmethod
    def _normalized(x: jax.Array) -> jax.Array:
        """Projected `[b, embed]` -> unit norm float32, rows sharded like the batch."""
        return constrain(l2_normalize(x), ("batch", "act_joint_embed"))

    def __call__(self, images: jax.Array, tokens: jax.Array, mask: jax.Array) -> dict:
        """The outputs of the module doc for images `[b, T, T, 3]`, tokens and mask `[b, L]`."""
        out = {"image": self.embed_images(images), "text": self.embed_texts(tokens, mask),
               "logit_scale": self.logit_scale[...]}
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias[...]
        return out

    def forward_batch(self, batch) -> tuple[dict, dict]:
        """(outputs, {}) for a pair batch (`image`, `tokens`, `segment_ids`)."""
        return self(batch["image"], batch["tokens"], batch["segment_ids"] > 0), {}


@register_model("dual_encoder", inputs=("image", "tokens", "segment_ids"), objective="contrastive")
def build_dual_encoder(cfg, rngs: nnx.Rngs) -> DualEncoder:
    return DualEncoder(cfg, rngs=rngs)
