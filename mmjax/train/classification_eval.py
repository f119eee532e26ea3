"""Held-out top-1 accuracy of an image classifier: evaluator `top1_accuracy`
(switch `config.eval.top1_accuracy`; settings `config.evaluators.top1_accuracy`:
`source`, a source spec whose records carry class labels, default
"procedural:classes"; `num_examples`, default 256).

The images of the source's "eval" split go through the pair pipeline
(`mmjax.data.pairs`, the run's image size) once, in fixed batches of
`data.global_batch`; records without a class label are left out. Reports:
  top1_accuracy              argmax of the logits == class_id
  eval_images                labelled images scored
  superclass/<name>          top-1 accuracy over the images of each
                             super-class of the label set (`data.labels`)
A Mobile V-MoE ViT is evaluated at `config.model.vit.moe.eval_capacity_factor`
(0: num_experts / top_k, no image dropped).
It needs a model trained with the "classification" objective.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from mmjax.data.labels import label_set
from mmjax.data.pairs import make_pair_dataset
from mmjax.data.pipeline import to_global_arrays
from mmjax.models import model_spec
from mmjax.train.config_schema import integer, text
from mmjax.train.evaluators import register_evaluator
from mmjax.models.vision_moe import eval_model_config
from mmjax.train.state import TrainSetup, abstract_model
from mmjax.train.step import model_forward

DEFAULT_SOURCE = "procedural:classes"
LABELS = ("class_id", "superclass_id")


def eval_batches(config, tokenizer, setup: TrainSetup, source: str, num_examples: int) -> list[dict]:
    """Fixed held-out pair batches of `source` (split "eval") as global
    arrays: the model's inputs and the labels."""
    data = config.data.copy_and_resolve_references()
    data.sources.caption = source
    pc, pi = jax.process_count(), jax.process_index()
    iterator = iter(make_pair_dataset(data, tokenizer, batch_size=data.global_batch // pc, split="eval",
                                      process_index=pi, process_count=pc))
    shardings = {k: v for k, v in setup.batch_shardings.items() if k not in LABELS}
    rows = NamedSharding(setup.mesh, PartitionSpec(setup.batch_shardings["image"].spec[0]))
    shardings.update({k: rows for k in LABELS})
    batches = []
    for _ in range(max(1, -(-num_examples // data.global_batch))):
        local = next(iterator)
        batches.append(to_global_arrays({k: local[k] for k in shardings}, shardings))
    return batches


def make_predict(config, setup: TrainSetup) -> Callable:
    """`predict(params, batch) -> (argmax class [B], class_id [B],
    superclass_id [B])`, replicated so every process reads all of them. A
    Mobile V-MoE ViT runs at its evaluation capacity
    (`vision_moe.eval_model_config`: by default no image is dropped, so an
    image's prediction does not depend on the other images of its batch)."""
    graphdef = abstract_model(eval_model_config(config.model), config.train.seed)[0]

    def predict(params, batch):
        outputs, _ = model_forward(graphdef, params, batch, setup.resolver)
        return jnp.argmax(outputs["logits"], axis=-1), batch["class_id"], batch["superclass_id"]

    return jax.jit(predict, out_shardings=NamedSharding(setup.mesh, PartitionSpec()))


def top1_metrics(predicted: np.ndarray, class_id: np.ndarray, superclass_id: np.ndarray,
                 superclasses: tuple[str, ...]) -> dict:
    """The metrics of the module doc from host arrays `[N]` (-1: unlabelled)."""
    labelled = class_id >= 0
    correct = (predicted == class_id) & labelled
    out = {"top1_accuracy": float(correct.sum() / max(labelled.sum(), 1)), "eval_images": int(labelled.sum())}
    for s, name in enumerate(superclasses):
        rows = labelled & (superclass_id == s)
        if rows.any():
            out[f"superclass/{name}"] = float(correct[rows].sum() / rows.sum())
    return out


@register_evaluator("top1_accuracy", fields={"source": text, "num_examples": integer(1)})
def make_top1_accuracy(config, setup: TrainSetup, tokenizer, name: str = "top1_accuracy"):
    """The registered evaluator (module doc)."""
    if model_spec(config.model).objective != "classification":
        return (f"model {config.model.get('name', 'mm1')!r} is not a classifier (top-1 accuracy scores the logits "
                "of a model trained with the 'classification' objective)")
    settings = config.get("evaluators", {}).get(name, {})
    source = settings.get("source", DEFAULT_SOURCE)
    batches = eval_batches(config, tokenizer, setup, source, settings.get("num_examples", 256))
    predict = make_predict(config, setup)
    superclasses = label_set(config.data).superclasses

    def evaluate(params) -> dict:
        got = [jax.device_get(predict(params, batch)) for batch in batches]
        predicted, class_id, superclass_id = (np.concatenate([g[i] for g in got]) for i in range(3))
        return top1_metrics(predicted, class_id, superclass_id, superclasses)

    return evaluate
