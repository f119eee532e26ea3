"""Vision Mixture-of-Experts MLP (Mobile V-MoE): experts routed per IMAGE.

x `[b, n, vit_embed]` (a ViT block's normed MLP input, n tokens per image,
the first `prefix` of them not patches, e.g. CLIP's class token) ->
(y `[b, n, vit_embed]`, aux). Config: `config.model.vit.moe` (fields in
`mmjax.config_base`; `check_vit_moe` refuses bad ones).

Routing: the router sees one vector per image, the mean of its patch tokens
`[b, vit_embed]` (float32), and picks the image's top-k experts
(`mmjax.models.moe.route`); every token of the image (class token included)
goes through those k experts, each a ViT MLP (fc1 + bias, the flavour's
activation, fc2 + bias; hidden width `expert_mlp`), and their outputs are
combined with the router weights.

Dispatch: capacity per image (the decoder MoE's GShard path,
`moe.capacity_experts`, with the image and its n tokens as the routed
unit). Images are split into groups, one per batch shard
(`moe.dispatch_groups`); each expert takes at most
C = ceil(top_k * S * capacity_factor / E) of a group's S images; an image
past its expert's capacity gets nothing from that expert (it is dropped
there; the residual carries it). capacity_factor >= E / top_k gives C >= S:
nothing can be dropped. The held-out evaluation runs at
`vit.moe.eval_capacity_factor`, by default E / top_k (`eval_model_config`),
so an image's prediction does not depend on its batch. Expert buffers
`[E, G, C, n, vit_embed]` are group-sharded around dispatch and combine and
expert-sharded around the experts, so the re-layout between them is an
all-to-all of whole images.

aux (the decoder MoE's keys, from `moe.routing_aux`, with images as the
routed units, all of kind "image"): load_balance_loss, router_z_loss,
expert_fraction, router_entropy, dropped_fraction (each also `_text`, 0, and
`_image`), tokens_text (0) and tokens_image (images routed); and
superclass_loss: Mobile V-MoE's super-class routing loss, the cross-entropy
of the router's softmax against the expert of the image's super-class
(`superclass_id [b]`, -1 = no label, left out; super-class s -> expert
`superclass_experts[s % len]`, or s mod E when that tuple is empty), the mean
over labelled images (0 without any), unweighted; superclass_routed: the
share of labelled images whose top-1 expert is their super-class's.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from mmjax.errors import ConfigError
from mmjax.models.layers import fan_in_init, make_param
from mmjax.models.moe import (TOKEN_KINDS, capacity_experts, check_moe_placement, modality_means, route,
                              routing_aux)
from mmjax.models.partitioning import constrain


def is_moe_block(vit_cfg, index: int) -> bool:
    """MoE replaces the MLP of every `moe.moe_every`-th ViT block (1-based, as
    the decoder's: moe_every=2 -> blocks 2, 4, ...) when `moe.num_experts > 0`."""
    moe = vit_cfg.get("moe")
    return bool(moe and moe.num_experts > 0 and (index + 1) % moe.moe_every == 0)


def check_vit_moe(vit_cfg) -> None:
    """ConfigError (one sentence naming the field) for a bad `vit.moe`."""
    moe = vit_cfg.get("moe")
    if not moe or moe.num_experts == 0:
        return
    where = "config.model.vit.moe"
    e = moe.num_experts
    if not isinstance(e, int) or e < 0:
        raise ConfigError(f"{where}.num_experts={e!r} must be a non-negative integer (0: a dense ViT).")
    check_moe_placement(moe, where, vit_cfg.depth, "config.model.vit.depth")
    if not moe.capacity_factor > 0:
        raise ConfigError(f"{where}.capacity_factor={moe.capacity_factor!r} must be positive.")
    if not isinstance(moe.expert_mlp, int) or moe.expert_mlp < 1:
        raise ConfigError(f"{where}.expert_mlp={moe.expert_mlp!r} must be a positive integer.")
    bad = [s for s in moe.superclass_experts if not (isinstance(s, int) and 0 <= s < e)]
    if bad:
        raise ConfigError(f"{where}.superclass_experts={tuple(moe.superclass_experts)} names experts {bad} "
                          f"outside 0..{e - 1}.")
    for name in ("superclass_weight", "load_balance_weight", "router_z_weight"):
        if not moe[name] >= 0:
            raise ConfigError(f"{where}.{name}={moe[name]!r} must be non-negative.")
    if vit_cfg.scan and moe.moe_every > 1:
        raise ConfigError(f"config.model.vit.scan=True needs identical blocks; with MoE on every "
                          f"{moe.moe_every}-th block set scan=False (or {where}.moe_every=1).")


def eval_model_config(model_cfg):
    """A copy of `config.model` whose ViT MoE uses its evaluation capacity:
    `vit.moe.eval_capacity_factor`, or num_experts / top_k (C >= S: no image
    dropped, each image's output independent of the rest of its batch) when
    that is 0. `model_cfg` itself when the ViT has no MoE."""
    moe = model_cfg.vit.get("moe")
    if not moe or not moe.num_experts:
        return model_cfg
    out = model_cfg.copy_and_resolve_references()
    out.vit.moe.capacity_factor = moe.get("eval_capacity_factor", 0.0) or moe.num_experts / moe.top_k
    return out


def superclass_targets(superclass_id: jax.Array, num_experts: int, mapping=()) -> jax.Array:
    """superclass_id `[b]` (-1: none) -> the expert each image should go to
    `[b]` int32 (-1 where unlabelled): `mapping[s % len(mapping)]`, or s mod E."""
    s = jnp.maximum(superclass_id, 0)
    if mapping:
        target = jnp.asarray(mapping, jnp.int32)[s % len(mapping)]
    else:
        target = s % num_experts
    return jnp.where(superclass_id >= 0, target, -1).astype(jnp.int32)


def superclass_loss(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """logits `[b, E]`, targets `[b]` (-1: none) -> (mean cross-entropy over
    labelled images, share of them whose top-1 expert is the target); 0, 0
    without labelled images."""
    labelled = (targets >= 0).astype(jnp.float32)
    count = jnp.maximum(labelled.sum(), 1.0)
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, jnp.maximum(targets, 0)[:, None], axis=-1)[:, 0]
    hit = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return -(picked * labelled).sum() / count, (hit * labelled).sum() / count


class VisionMoE(nnx.Module):
    """Per-image routed ViT MLP experts (see the module doc). The router and
    its statistics stay float32; the experts compute in `dtype`."""

    cast_at_use = ("wi", "bi", "wo", "bo")

    def __init__(self, embed: int, cfg, activation: Callable, *, prefix: int = 0, rngs: nnx.Rngs,
                 dtype=jnp.float32):
        e, h = cfg.num_experts, cfg.expert_mlp
        self.cfg, self.activation, self.prefix, self.dtype = cfg, activation, prefix, dtype
        self.router = make_param(rngs, fan_in_init(embed), (embed, e), ("vit_embed", "router_experts"))
        self.wi = make_param(rngs, fan_in_init(embed), (e, embed, h), ("expert", "vit_embed", "vit_mlp"))
        self.bi = make_param(rngs, nnx.initializers.zeros, (e, h), ("expert", "vit_mlp"))
        self.wo = make_param(rngs, fan_in_init(h), (e, h, embed), ("expert", "vit_mlp", "vit_embed"))
        self.bo = make_param(rngs, nnx.initializers.zeros, (e, embed), ("expert", "vit_embed"))

    def router_logits(self, x: jax.Array) -> jax.Array:
        """x `[b, n, vit_embed]` -> logits `[b, E]` float32 from the mean patch token."""
        # Rows stay split like the batch (and so do their gradients): without the hint the
        # backward pass meets the router's fsdp-split embedding and replicates the [b, M] mean.
        pooled = constrain(x[:, self.prefix:].astype(jnp.float32).mean(axis=1), ("batch", "act_vit_embed"))
        return constrain(pooled @ self.router[...].astype(jnp.float32), ("batch", None))

    def experts(self, x: jax.Array) -> jax.Array:
        """x `[E, G, C, n, M]` -> `[E, G, C, n, M]`, each expert its own MLP."""
        w = lambda p: p[...].astype(self.dtype)  # noqa: E731
        h = jnp.einsum("egcnm,emh->egcnh", x, w(self.wi)) + w(self.bi)[:, None, None, None]
        return jnp.einsum("egcnh,ehm->egcnm", self.activation(h), w(self.wo)) + w(self.bo)[:, None, None, None]

    def dispatch(self, x: jax.Array, weights: jax.Array, experts: jax.Array):
        """x `[b, n, M]`, weights/experts `[b, k]` -> (y `[b, n, M]`, dispatch
        `[G, S, E, C]` 0/1, dropped `[b]` share of the image's k choices dropped):
        `moe.capacity_experts` with the image (its n tokens) as the unit."""
        return capacity_experts(x, weights, experts, self.cfg, self.experts, embed_axis="act_vit_embed")

    def __call__(self, x: jax.Array, superclass_id: jax.Array | None = None) -> tuple[jax.Array, dict]:
        """x `[b, n, vit_embed]`, superclass_id `[b]` (optional, -1: none) ->
        (y `[b, n, vit_embed]`, aux of the module doc)."""
        e, k = self.cfg.num_experts, self.cfg.top_k
        logits = self.router_logits(x)
        weights, experts, probs = route(logits, k, self.cfg.renormalize)
        kind = jnp.full((x.shape[0],), TOKEN_KINDS["image"], jnp.int8)
        aux = routing_aux(logits, probs, experts, e, kind)
        y, _, dropped = self.dispatch(x, weights, experts)
        aux.update(modality_means("dropped_fraction", dropped, kind))
        if superclass_id is None:
            aux["superclass_loss"] = aux["superclass_routed"] = jnp.zeros((), jnp.float32)
        else:
            targets = superclass_targets(superclass_id, e, tuple(self.cfg.superclass_experts))
            aux["superclass_loss"], aux["superclass_routed"] = superclass_loss(logits, targets)
        return y.astype(x.dtype), aux
