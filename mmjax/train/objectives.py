"""Training objectives by name: a registered model names the one it trains
with (`ModelSpec.objective`, `mmjax.models.registry`); the train step and
its batch fields follow it, never the model's name.

- "next_token": the train step's next-token cross-entropy and z-loss on the
  logits `forward_batch` returns (`mmjax.train.loss`), token-weighted over
  micro-batches; reads `targets` and `loss_mask`.
- "contrastive": CLIP's or SigLIP's loss (`config.model.contrastive.loss`)
  over the global batch on a dual encoder's embeddings
  (`mmjax.train.contrastive`); a loss of the whole batch, so it takes no
  gradient accumulation; reads no further batch field, but `entity_ids`
  with MOFI's entity head (`config.model.mofi`, `mmjax.train.entity_loss`:
  the weighted sum of the contrastive and the entity classification loss).
- "classification": an image classifier's softmax cross-entropy on
  `class_id` (-1 rows left out) plus its vision MoE's aux losses weighted by
  `config.model.vit.moe` (`mmjax.train.classification`); a whole-batch loss;
  reads `class_id`; pairs.

An objective also names the batches it trains on (`data`): "packed"
sequences (`mmjax.data.pipeline`) or image-text "pairs"
(`mmjax.data.pairs`); `mmjax.train.loop.make_train_dataset` follows it.
Its `optional_inputs(model_cfg)` names batch fields its loss reads only
under some configs; `model_objective` adds them to `inputs`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

from mmjax.models import model_spec
from mmjax.train.classification import classification_loss
from mmjax.train.entity_loss import dual_encoder_loss, entity_inputs


@dataclasses.dataclass(frozen=True)
class Objective:
    inputs: tuple[str, ...]  # batch fields the loss reads besides the model's inputs
    # model_cfg -> `outputs -> (loss, metrics)`, a loss of the whole batch; None: the step's next-token loss
    batch_loss: Callable | None = None
    data: str = "packed"  # the batches it trains on: "packed" sequences or image-text "pairs"
    optional_inputs: Callable | None = None  # model_cfg -> further batch fields the loss reads


OBJECTIVES = {
    "next_token": Objective(inputs=("targets", "loss_mask")),
    "contrastive": Objective(inputs=(), batch_loss=dual_encoder_loss, data="pairs", optional_inputs=entity_inputs),
    "classification": Objective(inputs=("class_id",), batch_loss=lambda m: functools.partial(
        classification_loss, moe_cfg=m.vit.get("moe")), data="pairs"),
}


def model_objective(model_cfg) -> Objective:
    """The objective of the model `config.model.name` names, its `inputs`
    those `model_cfg` makes its loss read."""
    name = model_spec(model_cfg).objective
    if name not in OBJECTIVES:
        raise ValueError(f"model {model_spec(model_cfg).name!r} trains with objective {name!r}, which is not one "
                         f"of {sorted(OBJECTIVES)}.")
    objective = OBJECTIVES[name]
    if objective.optional_inputs is None:
        return objective
    extra = tuple(f for f in objective.optional_inputs(model_cfg) if f not in objective.inputs)
    return dataclasses.replace(objective, inputs=objective.inputs + extra)


def batch_loss(model_cfg) -> Callable | None:
    """The model's whole-batch loss `outputs -> (loss, metrics)`, or None
    for the next-token loss (see `make_train_step`)."""
    objective = model_objective(model_cfg)
    return None if objective.batch_loss is None else objective.batch_loss(model_cfg)
