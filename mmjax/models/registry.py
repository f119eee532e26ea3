"""Models by name: `config.model.name` picks a builder from `MODELS`.

A registered model is built as `build(model_cfg, rngs)` and must provide
`forward_batch(batch) -> (logits [b, s, vocab] float32, aux)`, where `batch`
is a dict holding (at least) the fields the entry lists in `inputs` and `aux`
holds MoE losses and routing statistics stacked over MoE layers (empty for a
dense model). The train step, the evaluators and the benchmarks only go
through this entry: none of them branches on a model's name.

    @register_model("my_model", inputs=("tokens", "segment_ids", "positions"))
    def build(cfg, rngs): return MyModel(cfg, rngs=rngs)
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from flax import nnx
from mmjax.errors import ConfigError

# Per-row shapes of the batch fields a model may read (see mmjax.data.examples):
# sequence fields are `[seq_len]`, images `[max_images, size, size, 3]`.
SEQUENCE_FIELDS = ("tokens", "image_slots", "segment_ids", "positions")
IMAGE_FIELDS = ("images",)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[..., nnx.Module]  # (model_cfg, rngs) -> module with forward_batch
    inputs: tuple[str, ...]           # batch fields forward_batch reads

    @property
    def uses_images(self) -> bool:
        return any(field in IMAGE_FIELDS for field in self.inputs)


MODELS: dict[str, ModelSpec] = {}


def register_model(name: str, inputs: tuple[str, ...]):
    """Decorator registering `build(model_cfg, rngs)` as model `name`."""
    unknown = [f for f in inputs if f not in SEQUENCE_FIELDS + IMAGE_FIELDS]
    if unknown:
        raise ValueError(f"model {name!r} reads unknown batch fields {unknown}; known: "
                         f"{SEQUENCE_FIELDS + IMAGE_FIELDS}.")

    def register(build):
        MODELS[name] = ModelSpec(name, build, tuple(inputs))
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
