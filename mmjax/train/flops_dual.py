"""Training FLOPs of the image-encoder pre-training models, trained on pair
batches: the operations `mmjax.train.flops.train_flops` counts for one step.

A dual encoder (the "contrastive" objective, `mmjax.models.dual_encoder`)
on `data.global_batch` = B image-text pairs:

  vit               the ViT on B images `[B, T, T, 3]`: patch embedding and
                    all `depth` blocks on patches (+ CLIP's class token),
                    plus the MAP head when it pools (SigLIP, image_pool
                    "token"); the class token and the mean pool are no matmuls
  text              the text tower: the decoder-layer count of
                    `train.flops` at L = `data.seq_len` tokens per text, no
                    lm_head (the token embedding is a gather); attention
                    counts s (s + 1) / 2 useful (query, key) pairs per text
                    and head when `contrastive.text_causal`, all L^2 when
                    bidirectional (hardware: L^2 either way through XLA; the
                    splash kernel's blocks when causal); padding counts as
                    text, as packing's does for the decoder
  image_projection  `[B, vit_embed] @ [vit_embed, joint_embed]`
  text_projection   `[B, embed] @ [embed, joint_embed]`
  similarity        the `[B, B]` logits `image @ text.T`: 2 B^2 joint_embed
                    forward; its backward takes the gradient of each side
                    that trains (2 x forward with both towers training, 1 x
                    with one of them frozen: LiT); it has no weights
  entity_head       MOFI's entity classifier (`model.mofi.num_labels` > 0)
                    on the projected image: `[B, joint_embed] @ [joint_embed,
                    num_labels]`; without a text tower
                    (`mofi.contrastive_weight` = 0) there is no text,
                    text_projection or similarity

The losses (softmax / sigmoid over B^2 logits or B x num_labels) are
elementwise and not counted. Components are named after the model's
parameters, so `optimizer.module_lr_scale="vit=0.0"` (locked-image tuning)
removes the image side's backward pass here as it does in the step.

An image classifier (the "classification" objective,
`mmjax.models.classifier`) on B images: the ViT (its Mobile V-MoE blocks
as `train.flops` counts them, one dispatch group per batch shard), the MAP
head when it pools, and the linear `head` `[B, vit_embed] @ [vit_embed,
num_classes]`.
"""

from __future__ import annotations

from mmjax.train.flops import StepOps, _batch_shards, _decoder_ops, _mesh_sizes, _Op, _vit_ops, frozen_components

COMPONENTS = ("vit", "text", "image_projection", "text_projection", "similarity", "entity_head")
UPSTREAM = {"vit": (), "text": (), "image_projection": ("vit",), "text_projection": ("text",),
            "similarity": ("vit", "text", "image_projection", "text_projection"),
            "entity_head": ("vit", "image_projection")}


def _pools_with_map_head(vit, pool: str) -> bool:
    """Whether `pool` ("token" | "mean") runs the MAP head (a SigLIP ViT's token pool)."""
    from mmjax.models.vit import FLAVOURS

    return pool == "token" and not FLAVOURS[vit.flavour].class_token


def dual_encoder_ops(config, num_devices: int) -> StepOps:
    """The operations of the module doc for `config` (a dual encoder)."""
    from mmjax.models.dual_encoder import has_text_tower, mofi_settings

    model, data = config.model, config.data
    vit, dec, c = model.vit, model.decoder, model.contrastive
    b, length = data.global_batch, data.seq_len
    text = has_text_tower(model)
    labels = mofi_settings(model)["num_labels"]
    sizes = _mesh_sizes(config, num_devices)
    ops = _vit_ops(vit, b, blocks=vit.depth, map_head=_pools_with_map_head(vit, c.image_pool))
    image = 2.0 * b * vit.embed * c.embed
    ops.append(_Op("image_projection/dense", image, image, entry=True))
    if labels > 0:
        head = 2.0 * b * c.embed * labels
        ops.append(_Op("entity_head/logits", head, head, entry=True))
    if text:
        ops += _decoder_ops(dec, b, length, 0, sizes, _batch_shards(config, sizes), "grouped",
                            causal=c.text_causal, lm_head=False, name="text")
        projection = 2.0 * b * dec.embed * c.embed
        ops.append(_Op("text_projection/dense", projection, projection, entry=True))
        frozen = frozen_components(config, COMPONENTS)
        sides = sum(any(part not in frozen for part in side)
                    for side in (("vit", "image_projection"), ("text", "text_projection")))
        similarity = 2.0 * b * b * c.embed
        ops.append(_Op("similarity/logits", similarity, similarity, grads=max(sides, 1), weights=False))
    policies = {"vit": vit.get("remat", ""), "text": dec.get("remat", "")}
    return StepOps(ops, COMPONENTS, UPSTREAM, policies, b * length if text else 0, b,
                   stateless=frozenset({"similarity"}))


def classifier_ops(config, num_devices: int) -> StepOps:
    """An image classifier's operations (module doc) on `data.global_batch` images."""
    model, b = config.model, config.data.global_batch
    vit, c = model.vit, model.classifier
    sizes = _mesh_sizes(config, num_devices)
    ops = _vit_ops(vit, b, blocks=vit.depth, map_head=_pools_with_map_head(vit, c.pool),
                   batch_shards=_batch_shards(config, sizes))
    head = 2.0 * b * vit.embed * c.num_classes
    ops.append(_Op("head/logits", head, head, entry=True))
    return StepOps(ops, ("vit", "head"), {"vit": (), "head": ("vit",)}, {"vit": vit.get("remat", "")}, 0, b)
