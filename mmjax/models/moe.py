"""Mixture-of-Experts feed-forward layer: router, aux losses, two dispatches.

x `[batch, seq, embed]` -> (y `[batch, seq, embed]`, aux dict). Config
fields (`config.model.decoder.moe`): num_experts, top_k, renormalize,
capacity_factor, group_size, dispatch ("capacity" | "dropless"),
grouped_matmul, dropless_buffer_factor, expert_mlp,
shared_expert, load_balance_weight, router_z_weight, balance ("aux_loss" |
"bias"), bias_update_rate.

- balance="bias" (DeepSeek-V3's auxiliary-loss-free balancing): the layer
  holds a per-expert `RouterBias` `[E]` (an `nnx.Variable`, not an
  `nnx.Param`: no gradient, no optimizer state, no weight decay) that is
  added to the router probabilities to choose the top-k experts; the combine
  weights stay the unbiased probabilities of the chosen experts. The train
  step moves it after each step with `update_router_bias` from the
  observed load. The load-balance loss keeps its own weight either way.

- capacity: GShard einsum dispatch/combine. Tokens are split into groups
  (one per batch shard of the runtime mesh, via
  `partitioning.num_shards("batch")`, each split further into groups of at
  most `group_size` tokens when that is set), each expert takes at most
  C = ceil(top_k * group_size * capacity_factor / num_experts) tokens per
  group, the rest are dropped (their MoE output is 0; the residual carries
  them). The `[E, G, C, M]` buffers are constrained group-sharded next to the
  dispatch/combine einsums and expert-sharded around the experts, so the
  exchange between the two layouts is an all-to-all (forward and backward).
- dropless: tokens sorted by expert and multiplied with a grouped matmul
  (`moe.grouped_matmul`: `ragged_dot` or the Pallas megablox kernel), then
  un-sorted; nothing is dropped. On a mesh with an `expert` axis this runs
  inside `jax.shard_map`: each device sends every expert shard only the rows
  routed to its experts with a ragged all-to-all and gets the results back
  the same way (`mmjax/models/moe_dropless.py`). `dropless_buffer_factor`
  (0: room for the worst case, nothing dropped) bounds each shard's receive
  buffer at that many times its fair share of rows; rows beyond it are
  dropped and counted in `dropped_fraction`.

aux: `load_balance_loss` (Switch/GShard: E * sum_e f_e * P_e, 1.0 when
balanced), `router_z_loss` (mean logsumexp(logits)^2), both unweighted and
over all tokens, and routing statistics over the non-padding tokens
`expert_fraction` `[E]`, `dropped_fraction`, `router_entropy`, the same per
modality (`_text`, `_image` suffixes; 0 when a modality has no tokens) and the
token counts `tokens_text`, `tokens_image` they are means over. The token
kinds come from an optional `token_kind` `[b, s]` (TOKEN_KINDS; None: all text).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from mmjax.models.layers import SwiGLU, fan_in_init, make_param
from mmjax.models.moe_dropless import GROUPED_MATMULS, expert_parallel_experts, local_experts
from mmjax.models.partitioning import constrain, current_resolver, num_shards
from mmjax.errors import ConfigError

DISPATCHES = ("capacity", "dropless")
BALANCES = ("aux_loss", "bias")
# token_kind codes of the routing statistics; 0 is padding (left out of them).
TOKEN_KINDS = {"text": 1, "image": 2}


class RouterBias(nnx.Variable):
    """Per-expert selection bias `[E]` (`[layers, E]` in a scanned stack) of
    aux-loss-free balancing. Not an `nnx.Param`: gradients, the optimizer and
    weight decay leave it alone; the train step updates it."""


def route(logits: jax.Array, top_k: int, renormalize: bool, bias: jax.Array | None = None):
    """logits `[..., E]` float32 -> (weights `[..., k]`, experts `[..., k]` int, probs `[..., E]`).

    bias `[E]` (optional) is added to the probabilities for choosing the
    experts only; weights are the unbiased probabilities of the chosen
    experts (renormalized to sum to 1 if `renormalize`)."""
    probs = jax.nn.softmax(logits, axis=-1)
    if bias is None:
        weights, experts = jax.lax.top_k(probs, top_k)
    else:
        _, experts = jax.lax.top_k(probs + jax.lax.stop_gradient(bias).astype(probs.dtype), top_k)
        weights = jnp.take_along_axis(probs, experts, axis=-1)
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts, probs


def update_router_bias(bias: jax.Array, expert_fraction: jax.Array, rate: float) -> jax.Array:
    """DeepSeek-V3's update: `bias_e += rate * sign(mean_load - load_e)`.

    bias `[..., E]`; expert_fraction `[..., E]` is load_e, the share of a
    step's routed assignments (all tokens of the global batch, all k choices)
    that went to expert e (the MoE aux `expert_fraction`). Overloaded experts
    move down, underloaded ones up; rate 0 leaves the bias as it is."""
    fraction = expert_fraction.astype(bias.dtype)
    return bias + rate * jnp.sign(jnp.mean(fraction, axis=-1, keepdims=True) - fraction)


def _router_bias_leaves(variables) -> list:
    """(path, RouterBias) pairs of an `nnx.State` in flattening order, which is
    layer order (list indices sort as integers), the order in which a layer
    stack stacks the MoE aux."""
    flat = jax.tree_util.tree_flatten_with_path(variables, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    return [(path, v) for path, v in flat if isinstance(v, RouterBias)]


def router_biases(variables) -> jax.Array | None:
    """Every MoE layer's RouterBias in `variables` (an `nnx.State`) stacked
    `[n_moe_layers, E]` in layer order, or None when there is none."""
    leaves = _router_bias_leaves(variables)
    if not leaves:
        return None
    return jnp.concatenate([v.get_value().reshape(-1, v.shape[-1]) for _, v in leaves])


def set_router_biases(variables, biases: jax.Array):
    """`variables` with its RouterBias values replaced by the rows of
    `biases` `[n_moe_layers, E]` (the layout `router_biases` returns)."""
    leaves = _router_bias_leaves(variables)
    rows = sum(math.prod(v.shape[:-1]) for _, v in leaves)
    if biases.shape[0] != rows:
        raise ValueError(f"{biases.shape[0]} rows of router biases for {rows} MoE layers.")
    new, start = {}, 0
    for path, v in leaves:
        n = math.prod(v.shape[:-1])
        new[path] = biases[start:start + n].reshape(v.shape).astype(v.dtype)
        start += n
    return jax.tree_util.tree_map_with_path(
        lambda path, v: v.replace(new[path]) if path in new else v, variables,
        is_leaf=lambda x: isinstance(x, nnx.Variable))


def token_kinds(segment_ids: jax.Array, image_slots: jax.Array | None = None) -> jax.Array:
    """segment_ids `[b, s]` (0: padding), image_slots `[b, s]` (>= 0: image
    token; None: text only) -> token_kind `[b, s]` int8 (TOKEN_KINDS, 0 padding)."""
    kind = jnp.where(segment_ids != 0, TOKEN_KINDS["text"], 0)
    if image_slots is not None:
        kind = jnp.where((segment_ids != 0) & (image_slots >= 0), TOKEN_KINDS["image"], kind)
    return kind.astype(jnp.int8)


def _kinds(token_kind: jax.Array | None, tokens: int) -> jax.Array:
    """token_kind `[T]`, or all text when None."""
    return jnp.full((tokens,), TOKEN_KINDS["text"], jnp.int8) if token_kind is None else token_kind


def modality_means(name: str, values: jax.Array, token_kind: jax.Array | None) -> dict:
    """Per-token values `[T, ...]` -> {name: mean over non-padding tokens,
    name_text / name_image: mean over that kind's tokens (0 when there are none)}."""
    kind = _kinds(token_kind, values.shape[0])

    def mean(mask):
        w = mask.astype(jnp.float32).reshape(mask.shape + (1,) * (values.ndim - 1))
        return (w * values.astype(jnp.float32)).sum(axis=0) / jnp.maximum(w.sum(), 1.0)

    out = {name: mean(kind > 0)}
    out.update({f"{name}_{m}": mean(kind == code) for m, code in TOKEN_KINDS.items()})
    return out


def routing_aux(logits: jax.Array, probs: jax.Array, experts: jax.Array, num_experts: int,
                token_kind: jax.Array | None = None) -> dict:
    """Aux losses over all tokens, routing statistics over the non-padding
    ones, overall and per modality. logits/probs `[T, E]`, experts `[T, k]`,
    token_kind `[T]` (TOKEN_KINDS, 0 padding; None: all text)."""
    chosen = jax.nn.one_hot(experts, num_experts, dtype=jnp.float32).sum(axis=-2)  # [T, E]
    fraction = chosen.mean(axis=0) / experts.shape[-1]                             # f_e, sums to 1
    mean_prob = probs.mean(axis=0)                                                 # P_e
    entropy = -jnp.sum(probs * jnp.log(jnp.clip(probs, 1e-9)), axis=-1)            # [T]
    kind = _kinds(token_kind, experts.shape[0])
    return {
        "load_balance_loss": num_experts * jnp.sum(fraction * mean_prob),
        "router_z_loss": jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1))),
        **modality_means("expert_fraction", chosen / experts.shape[-1], kind),
        **modality_means("router_entropy", entropy, kind),
        **{f"tokens_{m}": jnp.sum(kind == code).astype(jnp.float32) for m, code in TOKEN_KINDS.items()},
    }


def capacity(group_size: int, top_k: int, num_experts: int, factor: float) -> int:
    return max(1, math.ceil(top_k * group_size * factor / num_experts))


def dispatch_groups(tokens: int, batch_shards: int, group_size: int = 0) -> int:
    """Number of capacity-dispatch groups for `tokens` tokens: one per batch
    shard (1 when the shards do not divide the tokens), each split further
    into the fewest equal groups of at most `group_size` tokens (0: no
    limit). The one-hot dispatch/combine einsums cost O(group size) per
    token, so smaller groups are cheaper (and drop more under imbalance)."""
    groups = batch_shards if tokens % batch_shards == 0 else 1
    per_shard = tokens // groups
    if group_size and per_shard > group_size:
        split = math.ceil(per_shard / group_size)
        while per_shard % split:
            split += 1
        groups *= split
    return groups


def capacity_dispatch_masks(weights: jax.Array, experts: jax.Array, num_experts: int, cap: int):
    """GShard masks for groups. weights/experts `[G, S, k]` ->
    (dispatch `[G, S, E, C]` 0/1, combine `[G, S, E, C]`, kept `[G, S, k]`).

    Buffer slots are filled choice-major: every token's first choice before
    any second choice, in token order."""
    g, s, k = experts.shape
    onehot = jax.nn.one_hot(experts, num_experts, dtype=jnp.int32)          # [G, S, k, E]
    order = onehot.transpose(0, 2, 1, 3).reshape(g, k * s, num_experts)     # choice-major
    position = jnp.cumsum(order, axis=1) - 1                                 # slot in the expert's buffer
    position = position.reshape(g, k, s, num_experts).transpose(0, 2, 1, 3)  # [G, S, k, E]
    kept = (onehot == 1) & (position < cap)
    slot = jax.nn.one_hot(jnp.where(kept, position, -1), cap, dtype=weights.dtype)  # [G,S,k,E,C]
    dispatch = slot.sum(axis=2)
    combine = (slot * weights[..., None, None]).sum(axis=2)
    return dispatch, combine, kept.any(axis=-1)


def capacity_experts(x: jax.Array, weights: jax.Array, experts: jax.Array, cfg, run_experts,
                     embed_axis: str = "act_embed", group_size: int = 0):
    """GShard capacity dispatch of routed units with trailing axes: x
    `[U, ..., M]` (U units: tokens, or images with their n tokens), weights /
    experts `[U, k]` -> (y `[U, ..., M]`, dispatch `[G, S, E, C]` 0/1,
    dropped `[U]` share of the unit's k choices dropped). Groups: one per batch
    shard (`dispatch_groups`, split further by `group_size`); C from
    `cfg.capacity_factor`. `run_experts` maps the buffers `[E, G, C, ..., M]`
    to the same shape.

    Dispatch and combine are local to each group's shard; the two re-layouts
    between group-sharded and expert-sharded buffers are the all-to-alls (and
    their transposes in the backward pass). Without the group-sharded
    constraints GSPMD partitions the einsums over the expert-sharded operand:
    all-gathers and all-reduces of whole buffers."""
    units, trailing, m = x.shape[0], x.shape[1:-1], x.shape[-1]
    rest = (None,) * len(trailing)
    by_group = (None, "batch", None) + rest + (embed_axis,)
    by_expert = ("expert", "batch", None) + rest + (embed_axis,)
    groups = dispatch_groups(units, num_shards("batch"), group_size)
    size = units // groups
    cap = capacity(size, cfg.top_k, cfg.num_experts, cfg.capacity_factor)
    xg = constrain(x.reshape(groups, size, *trailing, m), ("batch", None) + rest + (embed_axis,))
    dispatch, combine, kept = capacity_dispatch_masks(
        weights.reshape(groups, size, -1), experts.reshape(groups, size, -1), cfg.num_experts, cap)
    expert_in = jnp.einsum("gsec,gs...m->egc...m", dispatch.astype(x.dtype), xg)
    expert_in = constrain(expert_in, by_group)
    expert_in = constrain(expert_in, by_expert)
    expert_out = constrain(run_experts(expert_in), by_expert)
    expert_out = constrain(expert_out, by_group)
    y = jnp.einsum("gsec,egc...m->gs...m", combine.astype(x.dtype), expert_out)
    y = constrain(y, ("batch", None) + rest + (embed_axis,))
    return y.reshape(x.shape), dispatch, 1.0 - kept.mean(axis=-1).reshape(units)


def check_moe_placement(moe, where: str, layers: int, layers_field: str) -> None:
    """ConfigError (one sentence) for a `top_k` outside 1..num_experts or a
    `moe_every` that leaves no MoE layer among `layers` (`layers_field`);
    shared by the decoder's and the ViT's MoE. `where`: "config.model.decoder.moe"."""
    e = moe.num_experts
    if isinstance(moe.top_k, int) and moe.top_k > e:
        raise ConfigError(f"{where}.top_k={moe.top_k!r} exceeds {where}.num_experts={e}.")
    if not isinstance(moe.top_k, int) or not 1 <= moe.top_k <= e:
        raise ConfigError(f"{where}.top_k={moe.top_k!r} must be in 1..num_experts={e}.")
    if not isinstance(moe.moe_every, int) or not 1 <= moe.moe_every <= layers:
        raise ConfigError(f"{where}.moe_every={moe.moe_every!r} must be in 1..{layers_field}={layers} "
                          "(a larger value leaves no MoE layer).")


class MoEFeedForward(nnx.Module):
    """Routed SwiGLU experts (+ optional always-on shared expert). The router
    stays float32; the experts compute in `dtype`."""

    cast_at_use = ("wi_gate", "wi_up", "wo")

    def __init__(self, embed: int, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32):
        e, h = cfg.num_experts, cfg.expert_mlp
        if cfg.dispatch not in DISPATCHES:
            raise ConfigError(f"config.model.decoder.moe.dispatch={cfg.dispatch!r}; choose one of {DISPATCHES}.")
        if cfg.get("grouped_matmul", "ragged_dot") not in GROUPED_MATMULS:
            raise ConfigError(f"config.model.decoder.moe.grouped_matmul={cfg.grouped_matmul!r}; "
                              f"choose one of {GROUPED_MATMULS}.")
        if not isinstance(cfg.top_k, int) or not 1 <= cfg.top_k <= e:
            raise ConfigError(f"config.model.decoder.moe.top_k={cfg.top_k!r} must be in 1..num_experts={e}.")
        balance = cfg.get("balance", "aux_loss")
        if balance not in BALANCES:
            raise ConfigError(f"config.model.decoder.moe.balance={balance!r}; choose one of {BALANCES}.")
        self.cfg, self.dtype = cfg, dtype
        self.router = make_param(rngs, fan_in_init(embed), (embed, e), ("embed", "router_experts"))
        # Tiny and replicated: its logical axis is not partitioned by any layout.
        self.router_bias = (RouterBias(jnp.zeros((e,), jnp.float32), logical_axes=("router_experts",))
                            if balance == "bias" else None)
        self.wi_gate = make_param(rngs, fan_in_init(embed), (e, embed, h), ("expert", "embed", "mlp"))
        self.wi_up = make_param(rngs, fan_in_init(embed), (e, embed, h), ("expert", "embed", "mlp"))
        self.wo = make_param(rngs, fan_in_init(h), (e, h, embed), ("expert", "mlp", "embed"))
        if cfg.shared_expert:
            self.shared = SwiGLU(embed, h, rngs=rngs, dtype=dtype)
        else:
            self.shared = None

    def _experts_einsum(self, x: jax.Array) -> jax.Array:
        """x `[E, G, C, M]` -> `[E, G, C, M]`, each expert its own SwiGLU."""
        w = lambda p: p[...].astype(self.dtype)  # noqa: E731
        gate = jnp.einsum("egcm,emh->egch", x, w(self.wi_gate))
        up = jnp.einsum("egcm,emh->egch", x, w(self.wi_up))
        return jnp.einsum("egch,ehm->egcm", jax.nn.silu(gate) * up, w(self.wo))

    def _capacity(self, x, weights, experts):
        b, s, m = x.shape
        y, _, dropped = capacity_experts(x.reshape(b * s, m), weights.reshape(b * s, -1),
                                         experts.reshape(b * s, -1), self.cfg, self._experts_einsum,
                                         group_size=self.cfg.get("group_size", 0))
        return y.reshape(b, s, m), dropped

    def _dropless(self, x, weights, experts):
        w = lambda p: p[...].astype(self.dtype)  # noqa: E731
        params = (w(self.wi_gate), w(self.wi_up), w(self.wo))
        impl = self.cfg.get("grouped_matmul", "ragged_dot")
        b, s, m = x.shape
        resolver = current_resolver()
        mesh = None if resolver is None else resolver.mesh
        platform = jax.default_backend() if mesh is None else mesh.devices.flat[0].platform
        if mesh is None or mesh.shape.get("expert", 1) == 1:
            y = local_experts(x.reshape(b * s, m), weights.reshape(b * s, -1), experts.reshape(b * s, -1),
                              params, impl, platform)
            return y.reshape(b, s, m), jnp.zeros(b * s, jnp.float32)
        # Expert parallelism: each device sends every expert shard only the
        # rows routed to its experts (ragged all-to-all) and gets the results back.
        batch_axes = resolver(("batch", None, None), x.shape).spec[0]
        batch_spec = jax.sharding.PartitionSpec(batch_axes, None, None)
        expert_spec = jax.sharding.PartitionSpec("expert", None, None)

        buffer_factor = float(self.cfg.get("dropless_buffer_factor", 0.0))

        def per_shard(x, weights, experts, *params):
            bl, sl, _ = x.shape
            flat = lambda a: a.reshape(bl * sl, -1)  # noqa: E731
            y, kept = expert_parallel_experts(flat(x), flat(weights), flat(experts), params, impl,
                                              axis="expert", platform=platform, buffer_factor=buffer_factor)
            return y.reshape(bl, sl, m), kept.reshape(bl, sl, -1)

        y, kept = jax.shard_map(per_shard, mesh=mesh, in_specs=(batch_spec,) * 3 + (expert_spec,) * 3,
                                out_specs=(batch_spec, batch_spec), check_vma=False)(x, weights, experts, *params)
        return y, 1.0 - kept.astype(jnp.float32).mean(axis=-1).reshape(b * s)

    def __call__(self, x: jax.Array, token_kind: jax.Array | None = None) -> tuple[jax.Array, dict]:
        """x `[b, s, embed]`, token_kind `[b, s]` (TOKEN_KINDS, 0 padding; None:
        all text) -> (y `[b, s, embed]`, aux)."""
        kind = None if token_kind is None else token_kind.reshape(-1)
        logits = jnp.einsum("bsm,me->bse", x.astype(jnp.float32), self.router[...].astype(jnp.float32))
        bias = None if self.router_bias is None else self.router_bias[...]
        weights, experts, probs = route(logits, self.cfg.top_k, self.cfg.renormalize, bias)
        e = self.cfg.num_experts
        aux = routing_aux(logits.reshape(-1, e), probs.reshape(-1, e), experts.reshape(-1, self.cfg.top_k), e, kind)
        dispatch = self._capacity if self.cfg.dispatch == "capacity" else self._dropless
        y, dropped = dispatch(x, weights, experts)
        aux.update(modality_means("dropped_fraction", dropped, kind))
        if self.shared is not None:
            y = y + self.shared(x)
        return y.astype(x.dtype), aux
