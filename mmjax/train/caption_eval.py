"""Held-out caption accuracy, teacher-forced: evaluator `caption_accuracy`
(switch `config.eval.caption_accuracy`, settings
`config.evaluators.caption_accuracy.num_examples`).

On captions of unseen generated images (split "eval"), the model sees the
image and the true caption prefix and must predict every colour and kind
word. Evaluated with the real images and with the images blanked (the
text-only prior: what the captions' wording alone predicts). Reports:
  caption_exact_match   fraction of captions whose colour+kind tokens are all
                        predicted correctly (argmax)
  attribute_accuracy    fraction of colour/kind tokens predicted correctly
  eval_captions         captions evaluated
and the first two again with the images blanked (`blank_images/...`).
It needs a model that reads images and the procedural caption stream.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from mmjax.data.pipeline import make_dataset, to_global_arrays
from mmjax.train.config_schema import integer
from mmjax.train.evaluators import register_evaluator
from mmjax.train.state import TrainSetup
from mmjax.train.step import model_logits


def eval_batches(config, tokenizer, setup: TrainSetup) -> list[dict]:
    """The fixed held-out caption batches (global arrays), built once."""
    pc, pi = jax.process_count(), jax.process_index()
    per_process = config.data.global_batch // pc
    num_batches = max(1, config.evaluators.caption_accuracy.num_examples // config.data.global_batch)
    ds = make_dataset(config.data, tokenizer, batch_size=per_process, split="eval",
                      process_index=pi, process_count=pc, streams=("caption",),
                      with_attributes=True, pack=False)
    iterator = iter(ds)
    shardings = dict(setup.batch_shardings, attribute_mask=setup.batch_shardings["loss_mask"])
    batches = []
    for _ in range(num_batches):
        local = next(iterator)
        batches.append(to_global_arrays({k: local[k] for k in shardings}, shardings))
    return batches


def make_caption_eval(setup: TrainSetup) -> Callable:
    """Returns `evaluate(params, batches) -> dict` (counts reduced on device)."""

    def counts(params, batch, blank_images):
        if blank_images:  # same captions, no visual information: the text-only prior
            batch = dict(batch, images=jnp.full_like(batch["images"], 128))  # mid-grey
        logits = model_logits(setup.graphdef, params, batch, setup.resolver)
        correct = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.float32)
        attr = batch["attribute_mask"]
        wrong_per_caption = ((1.0 - correct) * attr).sum(axis=-1)
        has_attr = attr.sum(axis=-1) > 0
        return jnp.stack([(correct * attr).sum(), attr.sum(),
                          ((wrong_per_caption == 0) & has_attr).sum(), has_attr.sum()])

    counts_jit = jax.jit(counts, static_argnums=2,
                         out_shardings=NamedSharding(setup.mesh, PartitionSpec()))

    def evaluate(params, batches, blank_images: bool = False) -> dict:
        total = np.zeros(4)
        for batch in batches:
            total += np.asarray(jax.device_get(counts_jit(params, batch, blank_images)))
        return {"caption_exact_match": float(total[2] / max(total[3], 1)),
                "attribute_accuracy": float(total[0] / max(total[1], 1)),
                "eval_captions": int(total[3])}

    return evaluate


@register_evaluator("caption_accuracy", fields={"num_examples": integer(1)})
def make_caption_accuracy(config, setup: TrainSetup, tokenizer, name: str = "caption_accuracy"):
    """The registered evaluator: real and blanked images on the same captions."""
    if "images" not in setup.batch_shardings:
        return f"model {config.model.get('name', 'mm1')!r} reads no images"
    if config.data.sources.caption != "procedural":
        return ("caption accuracy is measured on the procedural captions only, not on "
                f"config.data.sources.caption={config.data.sources.caption!r}")
    batches = eval_batches(config, tokenizer, setup)
    evaluate = make_caption_eval(setup)

    def run(params) -> dict:
        blank = evaluate(params, batches, blank_images=True)
        return {**evaluate(params, batches),
                **{f"blank_images/{k}": v for k, v in blank.items() if k != "eval_captions"}}

    return run
