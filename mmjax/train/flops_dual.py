"""Training FLOPs of a dual encoder (the "contrastive" objective,
`mmjax.models.dual_encoder`): the operations `mmjax.train.flops.train_flops`
counts for one step on `data.global_batch` = B image-text pairs.

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

The loss (softmax / sigmoid over B^2 logits) is elementwise and not counted.
Components are named after the model's parameters, so
`optimizer.module_lr_scale="vit=0.0"` (locked-image tuning) removes the
image side's backward pass here as it does in the step.
"""

from __future__ import annotations

from mmjax.train.flops import StepOps, _batch_shards, _decoder_ops, _mesh_sizes, _Op, _vit_ops, frozen_components

COMPONENTS = ("vit", "text", "image_projection", "text_projection", "similarity")
UPSTREAM = {"vit": (), "text": (), "image_projection": ("vit",), "text_projection": ("text",),
            "similarity": ("vit", "text", "image_projection", "text_projection")}


def dual_encoder_ops(config, num_devices: int, ragged_dot: str) -> StepOps:
    """The operations of the module doc for `config` (a dual encoder)."""
    from mmjax.models.vit import FLAVOURS

    model, data = config.model, config.data
    vit, dec, c = model.vit, model.decoder, model.contrastive
    b, length = data.global_batch, data.seq_len
    map_head = c.image_pool == "token" and not FLAVOURS[vit.flavour].class_token
    sizes = _mesh_sizes(config, num_devices)
    ops = (_vit_ops(vit, b, blocks=vit.depth, map_head=map_head)
           + _decoder_ops(dec, b, length, 0, sizes, _batch_shards(config, sizes), ragged_dot,
                          causal=c.text_causal, lm_head=False, name="text"))
    image = 2.0 * b * vit.embed * c.embed
    text = 2.0 * b * dec.embed * c.embed
    ops += [_Op("image_projection/dense", image, image, entry=True),
            _Op("text_projection/dense", text, text, entry=True)]
    frozen = frozen_components(config, COMPONENTS)
    sides = sum(any(part not in frozen for part in side)
                for side in (("vit", "image_projection"), ("text", "text_projection")))
    similarity = 2.0 * b * b * c.embed
    ops.append(_Op("similarity/logits", similarity, similarity, grads=max(sides, 1), weights=False))
    policies = {"vit": vit.get("remat", ""), "text": dec.get("remat", "")}
    return StepOps(ops, COMPONENTS, UPSTREAM, policies, b * length, b, stateless=frozenset({"similarity"}))
