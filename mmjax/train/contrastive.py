"""Contrastive losses of a dual encoder over the global batch: CLIP's
softmax loss (symmetric cross-entropy) and SigLIP's sigmoid loss.

image, text `[B, d]` unit-norm embeddings (row i of both is a pair) ->
logits `[B, B]` = exp(logit_scale) * image @ text.T (+ logit_bias); rows
are images, columns texts, the diagonal holds the pairs.

The global batch: inside the jitted train step the embeddings are global
`jax.Array`s sharded on their batch dimension over the data-parallel mesh
axes, so `image @ text.T` is the whole `[B, B]` similarity and every other
row of the global batch is a negative, whatever the sharding; the compiler
inserts the collectives. The sharding constraints of `pair_logits` choose
them: the text embeddings are gathered whole onto every device (an
all-gather of `[B, d]`, small), the image embeddings and the logits stay
sharded on their rows, so each device computes and holds `[B / n, B]`
rather than `[B, B]`. Row reductions (image -> text softmax, the sigmoid
terms) stay on the device; column reductions (text -> image softmax)
combine `[B]` vectors across devices. The code is the single-device loss
plus sharding hints (no-ops without the train step's resolver), so one code
path serves every mesh and layout; a `shard_map` with an explicit
`all_gather` would compute the same with per-device code written for one
set of mesh axes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mmjax.models.partitioning import constrain

# CLIP caps its multiplier at 100 (OpenAI CLIP clamps the learned value).
CLIP_MAX_LOG_SCALE = math.log(100.0)


def pair_logits(image: jax.Array, text: jax.Array, logit_scale: jax.Array,
                logit_bias: jax.Array | None = None) -> jax.Array:
    """image, text `[B, d]` -> logits `[B, B]` float32 (module doc), rows
    sharded like the batch, the text embeddings gathered whole."""
    image = constrain(image.astype(jnp.float32), ("batch", None))
    text = constrain(text.astype(jnp.float32), (None, None))
    logits = jnp.exp(logit_scale) * jnp.einsum("id,jd->ij", image, text)
    if logit_bias is not None:
        logits = logits + logit_bias
    return constrain(logits, ("batch", None))


def clip_loss(logits: jax.Array) -> jax.Array:
    """Symmetric cross-entropy of logits `[B, B]` with the pairs on the
    diagonal: the mean of the image -> text and text -> image losses."""
    positives = jnp.diagonal(logits)
    image_to_text = jax.nn.logsumexp(logits, axis=1) - positives
    text_to_image = jax.nn.logsumexp(logits, axis=0) - positives
    return 0.5 * (image_to_text.mean() + text_to_image.mean())


def siglip_loss(logits: jax.Array) -> jax.Array:
    """Sigmoid loss of logits `[B, B]`: label +1 on the diagonal, -1
    elsewhere; the sum over all B^2 pairs divided by B (SigLIP's
    normalisation)."""
    n = logits.shape[0]
    labels = jnp.where(jnp.arange(n)[:, None] == jnp.arange(n)[None, :], 1.0, -1.0)
    return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / n


LOSSES = {"clip": clip_loss, "siglip": siglip_loss}


def contrastive_loss(outputs: dict, kind: str) -> tuple[jax.Array, dict]:
    """(loss, metrics) of a dual encoder's outputs (`image`, `text` `[B, d]`,
    `logit_scale`, and `logit_bias` for SigLIP) by `kind` ("clip" or
    "siglip"). metrics: contrastive_loss, image_to_text_accuracy and
    text_to_image_accuracy (the pair ranks first among the global batch),
    temperature (the multiplier exp(logit_scale)), logit_bias (SigLIP)."""
    if kind not in LOSSES:
        raise ValueError(f"contrastive loss {kind!r} is unknown; choose one of {sorted(LOSSES)}.")
    log_scale = outputs["logit_scale"].astype(jnp.float32)
    if kind == "clip":
        log_scale = jnp.minimum(log_scale, CLIP_MAX_LOG_SCALE)
    bias = outputs["logit_bias"].astype(jnp.float32) if kind == "siglip" else None
    logits = pair_logits(outputs["image"], outputs["text"], log_scale, bias)
    loss = LOSSES[kind](logits)
    pairs = jnp.arange(logits.shape[0])
    metrics = {"contrastive_loss": loss,
               "image_to_text_accuracy": (jnp.argmax(logits, axis=1) == pairs).mean(),
               "text_to_image_accuracy": (jnp.argmax(logits, axis=0) == pairs).mean(),
               "temperature": jnp.exp(log_scale)}
    if bias is not None:
        metrics["logit_bias"] = bias
    return loss, metrics
