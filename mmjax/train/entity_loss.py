"""MOFI's entity classification loss, and the dual encoder's objective that
weighs it against the contrastive loss.

entity_logits `[B, V]` (the entity head over V labels) and entity_ids
`[B, K]` (each image's labels, -1 padding) -> a multi-label loss:
- "softmax" (MOFI): cross-entropy of the softmax over the V labels against
  the normalised multi-hot target (an image's n labels weigh 1/n each),
  `logsumexp(z) - sum_{v in labels} z_v / n` per image;
- "sigmoid": a binary cross-entropy per label, summed over the V labels.
Either is the mean over the images that have a label; an image without one
contributes nothing (nor to the gradient). A label listed twice counts once.
Labels from `num_entities` on pad the head (`config.model.mofi`): never a
target, their logits are set to -1e9 in the softmax and the precision's
maximum and left out of the sigmoid's sum (no gradient reaches them).

The global batch and a large vocabulary: like `mmjax.train.contrastive`,
the code is the single-device loss plus sharding hints. The logits keep the
entity head's split (`mmjax.models.dual_encoder`): the label axis over
`act_entities` (the mesh axes that split the head's kernel), the rows over
`act_entity_rows` (the remaining batch axes; `mmjax.parallel.rules`). The
multi-hot target is built by comparing each id (the small `[B, K]` ids
gathered like the rows) with a label index that carries the same split, so
it is never gathered, and the reductions over the label axis (the softmax's
logsumexp, the target's sum, the precision's maxima) are the compiler's
cross-device reductions of `[B]` vectors, exact whatever the mesh.

`mofi_loss` combines: `contrastive_weight * contrastive +
classification_weight * classification`, a part with weight 0 not computed
(classification alone has no text tower). Metrics: the contrastive loss's
(`contrastive_loss`, retrieval accuracies, temperature), entity_loss,
entity_precision (the share of labelled images whose top-scoring label is
one of theirs) and entity_images (how many images have a label).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from mmjax.models.dual_encoder import ENTITY_LOSSES, mofi_settings, num_entities
from mmjax.models.partitioning import constrain
from mmjax.train.contrastive import contrastive_loss


PADDING_LOGIT = -1e9  # a padding label's logit in the softmax and the precision


def label_index(num_labels: int) -> jax.Array:
    """`[1, num_labels]` int32 0..num_labels-1, split like the logits' label axis."""
    return constrain(jax.lax.broadcasted_iota(jnp.int32, (1, num_labels), 1), (None, "act_entities"))


def multi_hot(entity_ids: jax.Array, num_labels: int) -> jax.Array:
    """entity_ids `[B, K]` (-1 padding) -> `[B, num_labels]` float32, 1 on
    each image's labels; split like the logits."""
    labels = label_index(num_labels)
    ids = constrain(entity_ids.astype(jnp.int32), ("act_entity_rows", None))
    hot = jnp.zeros((ids.shape[0], num_labels), jnp.bool_)
    for k in range(ids.shape[1]):  # K is small; each pass is elementwise over [B, V]
        hot = hot | (ids[:, k, None] == labels)  # -1 matches no label
    return constrain(hot.astype(jnp.float32), ("act_entity_rows", "act_entities"))


def _softmax_rows(logits: jax.Array, target: jax.Array, count: jax.Array, real: jax.Array) -> jax.Array:
    """`[B]` softmax cross-entropy over the real labels (`real` `[1, V]`)
    against target / count (0 where count is 0)."""
    lse = jax.nn.logsumexp(jnp.where(real, logits, PADDING_LOGIT), axis=1)
    return lse - jnp.sum(target * logits, axis=1) / jnp.maximum(count, 1.0)


def _sigmoid_rows(logits: jax.Array, target: jax.Array, count: jax.Array, real: jax.Array) -> jax.Array:
    """`[B]` binary cross-entropy summed over the real labels:
    -log sigmoid(z) on a label, -log(1 - sigmoid(z)) elsewhere."""
    del count
    return jnp.sum(jnp.where(real, jax.nn.softplus(logits) - target * logits, 0.0), axis=1)


ROW_LOSSES = {"softmax": _softmax_rows, "sigmoid": _sigmoid_rows}  # keys: dual_encoder.ENTITY_LOSSES


def entity_loss(logits: jax.Array, entity_ids: jax.Array, kind: str,
                num_entities: int | None = None) -> tuple[jax.Array, dict]:
    """(loss, metrics) of entity logits `[B, V]` against entity_ids `[B, K]`
    by `kind` ("softmax" or "sigmoid"), the labels from `num_entities` on
    padding (None: none); see the module doc."""
    if kind not in ROW_LOSSES:
        raise ValueError(f"entity loss {kind!r} is unknown; choose one of {ENTITY_LOSSES}.")
    logits = constrain(logits.astype(jnp.float32), ("act_entity_rows", "act_entities"))
    num_labels = logits.shape[1]
    real = label_index(num_labels) < (num_labels if num_entities is None else num_entities)
    target = multi_hot(entity_ids, num_labels)
    count = jnp.sum(target, axis=1)
    labelled = (count > 0).astype(jnp.float32)
    images = jnp.sum(labelled)
    rows = ROW_LOSSES[kind](logits, target, count, real)
    loss = jnp.sum(jnp.where(count > 0, rows, 0.0)) / jnp.maximum(images, 1.0)
    best_label = jnp.max(jnp.where(target > 0, logits, -jnp.inf), axis=1)
    best = jnp.max(jnp.where(real, logits, PADDING_LOGIT), axis=1)
    hit = (best_label >= best).astype(jnp.float32) * labelled
    metrics = {"entity_loss": loss, "entity_precision": jnp.sum(hit) / jnp.maximum(images, 1.0),
               "entity_images": images}
    return loss, metrics


def mofi_loss(outputs: dict, *, contrastive_kind: str, entity_kind: str, contrastive_weight: float,
              classification_weight: float, num_entities: int | None = None) -> tuple[jax.Array, dict]:
    """(loss, metrics) of a dual encoder with the entity head: the weighted
    sum of the contrastive loss (on `image`, `text`, `logit_scale`,
    `logit_bias`) and the entity loss (on `entity_logits`, `entity_ids`,
    the labels from `num_entities` on padding)."""
    loss, metrics = jnp.zeros((), jnp.float32), {}
    if contrastive_weight > 0:
        part, part_metrics = contrastive_loss(outputs, contrastive_kind)
        loss, metrics = loss + contrastive_weight * part, {**metrics, **part_metrics}
    if classification_weight > 0:
        part, part_metrics = entity_loss(outputs["entity_logits"], outputs["entity_ids"], entity_kind,
                                         num_entities)
        loss, metrics = loss + classification_weight * part, {**metrics, **part_metrics}
    return loss, metrics


def dual_encoder_loss(model_cfg) -> Callable:
    """The dual encoder's whole-batch loss `outputs -> (loss, metrics)`:
    CLIP's or SigLIP's alone without the entity head, else `mofi_loss`
    with `config.model.mofi`'s weights."""
    mofi = mofi_settings(model_cfg)
    if not mofi["num_labels"]:
        return functools.partial(contrastive_loss, kind=model_cfg.contrastive.loss)
    return functools.partial(mofi_loss, contrastive_kind=model_cfg.contrastive.loss, entity_kind=mofi["loss"],
                             contrastive_weight=float(mofi["contrastive_weight"]),
                             classification_weight=float(mofi["classification_weight"]),
                             num_entities=num_entities(mofi))


def entity_inputs(model_cfg) -> tuple[str, ...]:
    """The batch fields the dual encoder's loss reads under `model_cfg`:
    the entity labels when the entity head is on."""
    return ("entity_ids",) if mofi_settings(model_cfg)["num_labels"] else ()
