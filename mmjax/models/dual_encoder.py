"""Dual encoder (CLIP / SigLIP image-encoder pre-training): an image tower
and a text tower, each pooled and projected to a shared embedding space and
L2-normalised, with a learned temperature (and SigLIP's learned bias).

Batch fields (one image-text pair per row, see `mmjax.models.registry`):
  image        `[b, T, T, 3]` uint8 pixels (normalised here with the ViT
                              flavour's mean/std) or float32 normalised pixels
  tokens       `[b, L]` int32 the text, from position 0
  segment_ids  `[b, L]` int32 1 on the text, 0 on padding

  entity_ids   `[b, K]` int32 (MOFI, with the entity head) the image's
                              entity labels, -1 padding; passed through to
                              the outputs for the loss

Outputs (`forward_batch`), what the "contrastive" objective
(`mmjax.train.contrastive`, `mmjax.train.entity_loss`) reads:
  image `[b, embed]`, text `[b, embed]` float32, unit norm;
  logit_scale `[]` the log of the similarities' multiplier;
  logit_bias `[]` (SigLIP only) added to the scaled similarities;
  entity_logits `[b, num_labels]` float32 and entity_ids `[b, K]` (MOFI's
  entity head, `mofi.num_labels > 0`; labels from `mofi.num_entities` on
  pad the head and are masked in the loss).
Without a text tower (`mofi.contrastive_weight == 0`: classification alone)
there is no text, logit_scale or logit_bias.

MOFI's entity head: a linear classifier (kernel `[embed, num_labels]`, bias
`[num_labels]`) on the image embedding in the joint space, read before its
L2 normalisation: the embedding both objectives shape (retrieval uses its
direction), while the pre-normalisation vector leaves the logits' scale to
the head (a unit-norm input would need a temperature). Its label axis is the
logical `entities` axis, which the layouts split over the mesh
(`mmjax.parallel.rules`: model and fsdp), so a vocabulary of millions of
entities is held in pieces. As the text embeddings in
`mmjax.train.contrastive.pair_logits`, the small image features `[b, embed]`
are gathered over the mesh axes that split the labels (rows stay split over
`act_entity_rows`, the other batch axes), so each device multiplies them by
the kernel piece it holds and the kernel never moves; the logits' label axis
(`act_entities`) is split exactly like the kernel's, and the softmax over it
is the compiler's cross-device reduction. The bias starts at 0 for the
softmax loss and at the log-odds of a 1/num_entities prior for the sigmoid
loss (each label's binary loss starts near its prior).

Config fields: vit (image tower; pooled by `contrastive.image_pool`: "token"
is CLIP's class token or SigLIP's MAP head, "mean" the mean patch token),
decoder (text tower, `mmjax.models.text_encoder`), dtype,
contrastive: loss ("clip" | "siglip"), embed (shared dimension),
image_pool, text_pool ("last" | "mean"), text_causal, and
mofi: num_labels (0: no entity head), num_entities (0: num_labels),
loss ("softmax" | "sigmoid"), contrastive_weight (0: no text tower),
classification_weight.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from mmjax.config_base import MOFI_DEFAULTS
from mmjax.errors import ConfigError
from mmjax.models.layers import Dense, fan_in_init, make_param
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
ENTITY_LOSSES = ("softmax", "sigmoid")


def mofi_settings(cfg) -> dict:
    """`config.model.mofi` with its defaults (an older config may lack it)."""
    return {**MOFI_DEFAULTS, **dict(cfg.get("mofi") or {})}


def num_entities(mofi: dict) -> int:
    """How many of the head's `num_labels` outputs are entities (the rest pad it)."""
    return int(mofi["num_entities"] or mofi["num_labels"])


def has_text_tower(cfg) -> bool:
    """Whether the dual encoder of model config `cfg` builds its text tower
    (every config but MOFI's classification alone)."""
    return mofi_settings(cfg)["contrastive_weight"] > 0


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """`[..., d]` -> unit norm over the last dimension (float32)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


def _constant(value: float):
    return lambda key, shape, dtype: jnp.full(shape, value, dtype)


class EntityHead(nnx.Module):
    """MOFI's entity classifier: x `[b, embed]` -> logits `[b, num_labels]`
    float32 (kernel `[embed, num_labels]` on the logical axes
    (`joint_embed`, `entities`), bias `[num_labels]`); `entities` of the
    labels are real, the rest padding (module doc)."""

    cast_at_use = ("kernel",)

    def __init__(self, embed: int, num_labels: int, loss: str, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 entities: int | None = None):
        self.dtype = dtype
        prior = entities or num_labels
        bias = -math.log(max(prior - 1, 1)) if loss == "sigmoid" else 0.0
        self.kernel = make_param(rngs, fan_in_init(embed), (embed, num_labels), ("joint_embed", "entities"))
        self.bias = make_param(rngs, _constant(bias), (num_labels,), ("entities",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = constrain(x.astype(self.dtype), ("act_entity_rows", None))  # gathered over the label split's axes
        logits = jnp.dot(x, self.kernel[...].astype(self.dtype), preferred_element_type=jnp.float32)
        return constrain(logits + self.bias[...], ("act_entity_rows", "act_entities"))


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
        mofi = mofi_settings(cfg)
        if mofi["loss"] not in ENTITY_LOSSES:
            raise ConfigError(f"config.model.mofi.loss={mofi['loss']!r} is unknown; choose one of {ENTITY_LOSSES}.")
        dtype = compute_dtype(cfg.dtype)
        self.image_pool, self.flavour = c.image_pool, cfg.vit.flavour
        self.vit = ViT(cfg.vit, rngs=rngs, dtype=dtype)
        text = has_text_tower(cfg)  # classification alone builds (and runs) no text tower
        if not text and mofi["num_labels"] <= 0:
            raise ConfigError(f"config.model.mofi.contrastive_weight={mofi['contrastive_weight']!r} drops the text "
                              "tower, which leaves a dual encoder without an entity head (mofi.num_labels=0) nothing "
                              "to train; give the contrastive loss a positive weight.")
        scale, bias = CONTRASTIVE_LOSSES[c.loss]
        self.text = (TextEncoder(cfg.decoder, causal=c.text_causal, pool=c.text_pool, rngs=rngs, dtype=dtype)
                     if text else None)
        self.image_projection = Dense(cfg.vit.embed, c.embed, ("vit_embed", "joint_embed"), rngs=rngs, dtype=dtype)
        self.text_projection = (Dense(cfg.decoder.embed, c.embed, ("embed", "joint_embed"), rngs=rngs, dtype=dtype)
                                if text else None)
        self.logit_scale = make_param(rngs, _constant(scale), (), ()) if text else None
        self.logit_bias = make_param(rngs, _constant(bias), (), ()) if text and bias is not None else None
        self.entity_head = (EntityHead(c.embed, mofi["num_labels"], mofi["loss"], rngs=rngs, dtype=dtype,
                                       entities=num_entities(mofi))
                            if mofi["num_labels"] > 0 else None)

    def image_features(self, images: jax.Array) -> jax.Array:
        """images `[b, T, T, 3]` -> projected image embeddings `[b, embed]`
        before normalisation (what the entity head reads)."""
        images = normalize_pixels(images, self.flavour)
        pooled = self.vit.pooled(images) if self.image_pool == "token" else self.vit.mean_pooled(images)
        return self.image_projection(constrain(pooled, ("batch", "act_vit_embed")))

    def embed_images(self, images: jax.Array) -> jax.Array:
        """images `[b, T, T, 3]` -> unit-norm embeddings `[b, embed]` float32."""
        return self._normalized(self.image_features(images))

    def embed_texts(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        """tokens `[b, L]`, mask `[b, L]` (True on text) -> unit-norm embeddings `[b, embed]` float32."""
        if self.text is None:
            raise ConfigError("config.model.mofi.contrastive_weight=0 trains the entity head alone, so this dual "
                              "encoder has no text tower to embed texts with.")
        pooled = constrain(self.text(tokens, mask), ("batch", "act_embed"))
        return self._normalized(self.text_projection(pooled))

    @staticmethod
    def _normalized(x: jax.Array) -> jax.Array:
        """Projected `[b, embed]` -> unit norm float32, rows sharded like the batch."""
        return constrain(l2_normalize(x), ("batch", "act_joint_embed"))

    def __call__(self, images: jax.Array, tokens: jax.Array | None = None, mask: jax.Array | None = None) -> dict:
        """The outputs of the module doc for images `[b, T, T, 3]`, tokens and
        mask `[b, L]` (None without a text tower)."""
        features = self.image_features(images)
        out = {"image": self._normalized(features)}
        if self.entity_head is not None:
            out["entity_logits"] = self.entity_head(features)
        if self.text is not None:
            out["text"] = self.embed_texts(tokens, mask)
            out["logit_scale"] = self.logit_scale[...]
            if self.logit_bias is not None:
                out["logit_bias"] = self.logit_bias[...]
        return out

    def forward_batch(self, batch) -> tuple[dict, dict]:
        """(outputs, {}) for a pair batch (`image`, and `tokens`,
        `segment_ids` with a text tower). With the entity head the batch's
        `entity_ids` join the outputs unchanged: the train step hands a
        whole-batch loss the outputs alone."""
        if self.text is None:
            out = self(batch["image"])
        else:
            out = self(batch["image"], batch["tokens"], batch["segment_ids"] > 0)
        if self.entity_head is not None and "entity_ids" in batch:
            out["entity_ids"] = batch["entity_ids"]
        return out, {}


def _text_inputs(cfg) -> tuple[str, ...]:
    """The text fields the dual encoder reads: none for classification alone."""
    return ("tokens", "segment_ids") if has_text_tower(cfg) else ()


@register_model("dual_encoder", inputs=("image",), optional_inputs=_text_inputs, objective="contrastive")
def build_dual_encoder(cfg, rngs: nnx.Rngs) -> DualEncoder:
    return DualEncoder(cfg, rngs=rngs)
