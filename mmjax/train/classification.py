"""The "classification" objective's loss over the whole batch: softmax
cross-entropy of an image classifier's logits on `class_id`, plus its vision
MoE's aux losses weighted by `config.model.vit.moe`.

outputs (`mmjax.models.classifier`): logits `[B, C]` float32, class_id `[B]`
int32 (-1: no label, left out of the loss and the accuracy), moe_aux (the
ViT's MoE aux stacked over its MoE blocks `[n_moe, ...]`, {} when dense).

loss = mean CE over labelled rows
       + load_balance_weight * sum_layers load_balance_loss
       + router_z_weight * sum_layers router_z_loss     (`step.moe_losses`, as the decoder's)
       + superclass_weight * sum_layers superclass_loss  (Mobile V-MoE's super-class routing)
metrics: classification_loss, accuracy (top-1 over labelled rows),
labelled_images, superclass_loss / superclass_routed (means over MoE
blocks, with a MoE ViT), and the MoE metrics of `step.moe_losses`
(expert_fraction, load_balance_loss, dropped_fraction, ... which
`mmjax.train.routing_health` reads).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def label_cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """logits `[B, C]`, labels `[B]` (-1: none) -> (mean CE, top-1 accuracy,
    labelled count), both means over labelled rows (0 without any)."""
    logits = logits.astype(jnp.float32)
    mask = (labels >= 0).astype(jnp.float32)
    count = jnp.maximum(mask.sum(), 1.0)
    target = jnp.take_along_axis(logits, jnp.maximum(labels, 0)[:, None], axis=-1)[:, 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - target
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return (nll * mask).sum() / count, (correct * mask).sum() / count, mask.sum()


def classification_loss(outputs: dict, moe_cfg) -> tuple[jax.Array, dict]:
    """(loss, metrics) of the module doc; `moe_cfg` is `config.model.vit.moe` (or None)."""
    from mmjax.train.step import moe_losses  # the step imports the objectives

    ce, accuracy, labelled = label_cross_entropy(outputs["logits"], outputs["class_id"])
    metrics = {"classification_loss": ce, "accuracy": accuracy, "labelled_images": labelled}
    aux = dict(outputs.get("moe_aux") or {})
    if not aux:
        return ce, metrics
    superclass, routed = aux.pop("superclass_loss"), aux.pop("superclass_routed")
    moe_loss, moe_metrics = moe_losses(aux, moe_cfg.load_balance_weight, moe_cfg.router_z_weight)
    moe_loss = moe_loss + moe_cfg.superclass_weight * superclass.sum()
    metrics.update(moe_metrics, moe_aux_loss=moe_loss, superclass_loss=superclass.mean(),
                   superclass_routed=routed.mean())
    return ce + moe_loss, metrics
