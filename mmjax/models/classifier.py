"""Image classifier: a ViT (dense or Mobile V-MoE, `config.model.vit.moe`)
pooled to one vector per image and a linear head over the classes.

Batch fields (pair batches, one image per row, `mmjax.data.pairs`):
  image          `[b, T, T, 3]` uint8 pixels (normalised here with the ViT
                                flavour's mean/std) or float32 normalised pixels
  superclass_id  `[b]` int32 (optional: read when the super-class routing loss
                                is on) super-class of the image, -1 none
  class_id       `[b]` int32 the label (read by the "classification"
                                objective's loss from the batch)

Outputs (`forward_batch`), what the "classification" objective
(`mmjax.train.objectives`) reads:
  logits    `[b, num_classes]` float32
  moe_aux   the ViT's MoE aux stacked over its MoE blocks `[n_moe, ...]`
            ({} for a dense ViT; `mmjax.models.vision_moe`). It travels in the
            outputs rather than as the model's aux so that the objective
            weights it by `config.model.vit.moe` (the train loop weights a
            model's aux by the decoder's MoE settings).

Config fields: vit, dtype, classifier.num_classes, classifier.pool
("token" | "mean", `ViT.pool`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mmjax.errors import ConfigError
from mmjax.models.dual_encoder import IMAGE_POOLS
from mmjax.models.layers import Dense
from mmjax.models.partitioning import constrain
from mmjax.models.precision import compute_dtype
from mmjax.models.registry import register_model
from mmjax.models.vit import ViT, normalize_pixels


class ViTClassifier(nnx.Module):
    """See the module doc for the config fields, inputs and outputs."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        c = cfg.classifier
        if c.pool not in IMAGE_POOLS:
            raise ConfigError(f"config.model.classifier.pool={c.pool!r} is unknown; choose one of {IMAGE_POOLS}.")
        if c.pool == "token" and cfg.vit.flavour == "siglip" and not cfg.vit.map_head:
            raise ConfigError("config.model.classifier.pool='token' pools a SigLIP ViT with its MAP head; set "
                              "config.model.vit.map_head=True or pool='mean'.")
        if not isinstance(c.num_classes, int) or c.num_classes < 1:
            raise ConfigError(f"config.model.classifier.num_classes={c.num_classes!r} must be a positive integer.")
        dtype = compute_dtype(cfg.dtype)
        self.pool, self.flavour = c.pool, cfg.vit.flavour
        self.vit = ViT(cfg.vit, rngs=rngs, dtype=dtype)
        # The class dimension shards like a vocabulary (a large label set, e.g. MOFI's entities).
        self.head = Dense(cfg.vit.embed, c.num_classes, ("vit_embed", "vocab"), rngs=rngs, use_bias=True,
                          dtype=dtype)

    def __call__(self, images: jax.Array, superclass_id: jax.Array | None = None) -> tuple[jax.Array, dict]:
        """images `[b, T, T, 3]` -> (logits `[b, num_classes]` float32, MoE aux)."""
        x, aux = self.vit.forward(normalize_pixels(images, self.flavour), superclass_id)
        pooled = constrain(self.vit.pool(x, self.pool), ("batch", "act_vit_embed"))
        logits = self.head(pooled).astype(jnp.float32)
        return constrain(logits, ("batch", "act_vocab")), aux

    def forward_batch(self, batch) -> tuple[dict, dict]:
        """(outputs of the module doc, {}) for a pair batch."""
        logits, aux = self(batch["image"], batch.get("superclass_id"))
        return {"logits": logits, "moe_aux": aux}, {}


def _optional_inputs(cfg) -> tuple[str, ...]:
    """superclass_id when the super-class routing loss is on."""
    moe = cfg.vit.get("moe")
    return ("superclass_id",) if moe and moe.num_experts and moe.superclass_weight > 0 else ()


@register_model("vit_classifier", inputs=("image",), optional_inputs=_optional_inputs, objective="classification",
                vision_moe=True)
def build_vit_classifier(cfg, rngs: nnx.Rngs) -> ViTClassifier:
    return ViTClassifier(cfg, rngs=rngs)
