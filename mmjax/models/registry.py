"""Models by name: `config.model.name` picks a builder from `MODELS`.

A registered model is built as `build(model_cfg, rngs)` and must provide
`forward_batch(batch) -> (outputs, aux)`, where `batch` is a dict holding (at
least) the fields the entry lists in `inputs` and `aux` holds MoE losses and
routing statistics stacked over MoE layers (empty for a dense model). What
`outputs` is depends on the entry's `objective`, the loss it trains with
(`mmjax.train.objectives`): "next_token" (the default) takes logits
`[b, s, vocab]` float32, "contrastive" the dual encoder's embeddings
(`mmjax.models.dual_encoder`). The train step, the evaluators and the
benchmarks only go through this entry: none of them branches on a model's
name.

    @register_model("my_model", inputs=("tokens", "segment_ids", "positions"))
    def build(cfg, rngs): return MyModel(cfg, rngs=rngs)

`optional_inputs(model_cfg)` names fields a model reads only when its config
asks for them (e.g. region inputs); the train step receives
`spec.inputs_for(model_cfg)`, and other callers may leave them out.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from flax import nnx
from mmjax.errors import ConfigError

# Per-row shapes of the batch fields a model may read (see mmjax.data.packing):
# sequence fields are `[seq_len]`, images `[max_images, size, size, 3]`,
# region_slots `[seq_len]`, region_images `[max_regions]`,
# region_masks `[max_regions, region_grid, region_grid]`; those are the fields
# of packed batches. Image-text pair batches (one pair per row) hold `image`
# `[size, size, 3]` with the text in `tokens` and `segment_ids` (1 on the
# text, 0 on padding), and the image's labels: `entity_ids` `[max_entities]`,
# `class_id` and `superclass_id` `[]` (mmjax.data.pairs); the packed pipeline
# does not produce those.
SEQUENCE_FIELDS = ("tokens", "image_slots", "segment_ids", "positions")
IMAGE_FIELDS = ("images", "image")
REGION_FIELDS = ("region_slots", "region_images", "region_masks")
LABEL_FIELDS = ("entity_ids", "class_id", "superclass_id")
KNOWN_FIELDS = SEQUENCE_FIELDS + IMAGE_FIELDS + REGION_FIELDS + LABEL_FIELDS
PACKED_FIELDS = SEQUENCE_FIELDS + ("images",) + REGION_FIELDS


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[..., nnx.Module]  # (model_cfg, rngs) -> module with forward_batch
    inputs: tuple[str, ...]           # batch fields forward_batch reads
    optional_inputs: Callable[..., tuple[str, ...]] | None = None  # model_cfg -> further fields it reads
    objective: str = "next_token"    # the loss it trains with (mmjax.train.objectives)
    vision_moe: bool = False          # trains a mixture-of-experts ViT (its objective weighs `vit.moe`'s aux)

    @property
    def uses_images(self) -> bool:
        return any(field in IMAGE_FIELDS for field in self.inputs)

    def inputs_for(self, model_cfg) -> tuple[str, ...]:
        """The batch fields the model built from `model_cfg` reads."""
        extra = self.optional_inputs(model_cfg) if self.optional_inputs is not None else ()
        return self.inputs + tuple(f for f in extra if f not in self.inputs)


MODELS: dict[str, ModelSpec] = {}


def register_model(name: str, inputs: tuple[str, ...],
                   optional_inputs: Callable[..., tuple[str, ...]] | None = None,
                   objective: str = "next_token", vision_moe: bool = False):
    """Decorator registering `build(model_cfg, rngs)` as model `name`;
    `vision_moe`: the model trains a ViT with `config.model.vit.moe` experts
    (other models refuse them at config time)."""
    unknown = [f for f in inputs if f not in KNOWN_FIELDS]
    if unknown:
        raise ValueError(f"model {name!r} reads unknown batch fields {unknown}; known: {KNOWN_FIELDS}.")

    def register(build):
        MODELS[name] = ModelSpec(name, build, tuple(inputs), optional_inputs, objective, vision_moe)
        return build

    return register


def model_spec(model_cfg) -> ModelSpec:
    """The registry entry `config.model.name` names (default "mm1")."""
    name = model_cfg.get("name", "mm1")
    if name not in MODELS:
        raise ConfigError(f"config.model.name={name!r} is not a registered model; choose one of {sorted(MODELS)}.")
    return MODELS[name]


def build_model(model_cfg, rngs: nnx.Rngs) -> nnx.Module:
    """Builds the model `config.model.name` names."""
    return model_spec(model_cfg).build(model_cfg, rngs)
