"""AdamW with linear warmup, cosine decay to a floor, global-norm clipping,
configurable weight-decay exclusions and per-module freezing / LR scaling.

`config.optimizer` fields:

  lr                 peak learning rate when `lr_rule="fixed"`.
  lr_rule            "fixed": the peak LR is `lr`. "mm1": the peak LR follows
                     MM1's fit to the language model size,
                     `exp(-0.4214 ln N - 0.5535)`, with N the decoder's
                     parameter count without its vocabulary tables (see
                     `decoder_param_count`); `lr` is then ignored.
  lr_moe_count       what N counts for an MoE decoder under `lr_rule="mm1"`:
                     "dense" (MM1's choice: its MoE models reuse the dense
                     backbone's hyper-parameters, so an MoE decoder gets the
                     LR of the same decoder with `moe.num_experts=0`),
                     "active" (what one token passes through: top_k routed
                     experts, the shared expert, the router and everything
                     outside the experts) or "total" (every expert).
  warmup_steps       linear warmup from 0 to the peak.
  min_lr_ratio       the cosine decay ends at `peak * min_lr_ratio`.
  b1, b2, eps        Adam moments.
  weight_decay       decay coefficient in AdamW's LR-coupled form: every step a
                     decayed parameter shrinks by `lr(t) * weight_decay`
                     (used when `weight_decay_rule="fixed"`).
  weight_decay_rule  "fixed": use `weight_decay`. "mm1": MM1's decoupled decay
                     rate `0.1 x peak LR`; a decayed parameter shrinks by
                     `0.1 * peak * s(t)` per step, with `s(t)` the schedule's
                     fraction of the peak, i.e. a coefficient of 0.1 in the
                     LR-coupled form whatever the peak LR. MM1's recipe is
                     `lr_rule="mm1", weight_decay_rule="mm1"`.
  no_decay           categories excluded from weight decay, any of
                     "norms" (the `scale` of RMSNorm / LayerNorm),
                     "biases" (parameters named `bias`, e.g. the per-head
                     attention biases, and every other rank-1 parameter:
                     LayerNorm shifts, the ViT class embedding),
                     "embeddings" (parameters with a `vocab` or `patches`
                     logical axis: token tables, the LM head, patch position
                     embeddings). A stacked (scanned) layer's leading `layers`
                     axis does not count towards the rank.
  module_lr_scale    "path=scale,..." LR multipliers by module: `path` is a
                     top-level module (`vit`, `connector`, `decoder`) or a
                     dotted prefix of parameter paths (`vit.blocks`,
                     `decoder.final_norm`); the longest matching prefix wins.
                     The scale multiplies the module's whole AdamW update,
                     weight decay included, as a per-module LR would.
                     0 freezes: no update, no Adam moments, and (with the
                     train step's `trainable` mask) no gradient computed.
                     "" trains everything at scale 1.
  grad_clip          clip by the global norm of the trainable gradients.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from mmjax.errors import ConfigError

_EMBEDDING_AXES = {"vocab", "patches"}  # token tables, LM head, position embeddings
NO_DECAY_CATEGORIES = ("norms", "biases", "embeddings")
_STACK_AXIS = "layers"  # leading axis of scanned layer stacks
FROZEN, TRAINED = "frozen", "trained"


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _path_names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _map_params(fn, params: nnx.State):
    """`fn(path_names, variable)` for every `nnx.Param`; the result keeps the
    params' structure (each Variable holds fn's value). Other variables (MoE
    router biases) are left out: the optimizer never sees them."""
    if isinstance(params, nnx.State):
        params = nnx.split_state(params, nnx.Param, ...)[0]
    return jax.tree_util.tree_map_with_path(lambda p, v: v.replace(fn(_path_names(p), v)), params,
                                            is_leaf=_is_variable)


def _opt_get(opt_cfg, name: str, default):
    return opt_cfg.get(name, default) if hasattr(opt_cfg, "get") else getattr(opt_cfg, name, default)


# ----------------------------------------------------------------- learning rate

MOE_LR_COUNTS = ("dense", "active", "total")


def decoder_param_count(params: nnx.State, decoder_cfg=None, moe_count: str = "dense") -> int:
    """N of MM1's LR rule: the `nnx.Param`s under the top-level `decoder`
    module, excluding the vocabulary tables (token embedding, untied LM head).
    Works on abstract params.

    For an MoE decoder (`decoder_cfg` = `config.model.decoder` with
    `moe.num_experts > 0`) `moe_count` sets what its MoE layers count
    (`mmjax.train.param_counts.decoder_param_counts` has the closed forms):
      "dense": each MoE layer's router, experts and shared expert count as
        the dense SwiGLU of width `decoder.mlp` they replace (3 * embed * mlp),
        so N equals the dense twin's (the same decoder with num_experts=0);
      "active": the router (embed * E), top_k experts (top_k * 3 * embed *
        expert_mlp) and the shared expert (3 * embed * expert_mlp, if on);
      "total": all E experts (also what every count is without `decoder_cfg`).
    Attention, norms and dense layers count in full in every case."""
    if "decoder" not in params:
        raise ValueError("the params have no top-level `decoder` module to size the MM1 learning rate by.")
    if moe_count not in MOE_LR_COUNTS:
        raise ConfigError(f"config.optimizer.lr_moe_count={moe_count!r} must be one of {MOE_LR_COUNTS}.")
    total = 0
    for _, v in jax.tree_util.tree_flatten_with_path(params["decoder"], is_leaf=_is_variable)[0]:
        axes = v.get_metadata().get("logical_axes") or ()
        if isinstance(v, nnx.Param) and "vocab" not in axes:
            total += math.prod(v.shape)
    moe = decoder_cfg.get("moe") if decoder_cfg is not None else None
    if not moe or not moe.num_experts or moe_count == "total":
        return total
    from mmjax.train.param_counts import decoder_param_counts

    counts = decoder_param_counts(decoder_cfg)
    return total - (counts["total"] - counts[moe_count])


def peak_learning_rate(opt_cfg, decoder_param_count: int | None = None) -> float:
    """The schedule's peak: `opt_cfg.lr` ("fixed") or MM1's
    `exp(-0.4214 ln N - 0.5535)` with N = `decoder_param_count` ("mm1")."""
    rule = _opt_get(opt_cfg, "lr_rule", "fixed")
    if rule == "fixed":
        return float(opt_cfg.lr)
    if rule == "mm1":
        if not decoder_param_count:
            raise ConfigError("config.optimizer.lr_rule='mm1' needs the decoder's parameter count "
                             "(pass the params to learning_rate_schedule / make_optimizer).")
        return math.exp(-0.4214 * math.log(decoder_param_count) - 0.5535)
    raise ConfigError(f"config.optimizer.lr_rule={rule!r} must be 'fixed' or 'mm1'.")


def weight_decay_coefficient(opt_cfg) -> float:
    """The LR-coupled decay coefficient AdamW applies (see module doc)."""
    rule = _opt_get(opt_cfg, "weight_decay_rule", "fixed")
    if rule == "fixed":
        return float(opt_cfg.weight_decay)
    if rule == "mm1":
        return 0.1  # decoupled rate 0.1 * peak, divided by the peak LR it is coupled to
    raise ConfigError(f"config.optimizer.weight_decay_rule={rule!r} must be 'fixed' or 'mm1'.")


def learning_rate_schedule(opt_cfg, total_steps: int, params: nnx.State | None = None,
                           decoder_cfg=None) -> optax.Schedule:
    """Linear warmup to the peak (see `peak_learning_rate`), cosine decay to
    `peak * min_lr_ratio` at `total_steps`. `params` (abstract is enough) is
    needed for `lr_rule="mm1"`, and `decoder_cfg` (`config.model.decoder`)
    for an MoE decoder's count (`lr_moe_count`, see `decoder_param_count`)."""
    count = decoder_param_count(params, decoder_cfg, _opt_get(opt_cfg, "lr_moe_count", "dense")) \
        if params is not None and _opt_get(opt_cfg, "lr_rule", "fixed") == "mm1" else None
    peak = peak_learning_rate(opt_cfg, count)
    warmup = min(opt_cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=peak * opt_cfg.min_lr_ratio,
    )


# ------------------------------------------------------------------ weight decay

def _no_decay_categories(opt_cfg) -> set[str]:
    value = _opt_get(opt_cfg, "no_decay", NO_DECAY_CATEGORIES)
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    chosen = set(value)
    unknown = chosen - set(NO_DECAY_CATEGORIES)
    if unknown:
        raise ConfigError(f"config.optimizer.no_decay has unknown categories {sorted(unknown)}; "
                         f"choose from {NO_DECAY_CATEGORIES}.")
    return chosen


def parameter_category(path: tuple[str, ...], variable: nnx.Variable) -> str:
    """"embeddings", "norms", "biases" or "matrices" (see module doc)."""
    axes = tuple(variable.get_metadata().get("logical_axes") or ())
    if _EMBEDDING_AXES & set(axes):
        return "embeddings"
    name = path[-1] if path else ""
    rank = len(variable.shape) - (1 if axes[:1] == (_STACK_AXIS,) else 0)
    if rank <= 1 and name == "scale":
        return "norms"
    if rank <= 1 or name == "bias":
        return "biases"
    return "matrices"


def weight_decay_mask(params: nnx.State, no_decay=NO_DECAY_CATEGORIES):
    """True for parameters that get weight decay: every parameter whose
    category (see `parameter_category`) is not in `no_decay`."""
    excluded = _no_decay_categories({"no_decay": no_decay})
    return _map_params(lambda path, v: parameter_category(path, v) not in excluded, params)


# ------------------------------------------------------- per-module LR / freezing

def parse_module_lr_scale(spec) -> dict[str, float]:
    """"vit=0.0,connector=2.0" -> {"vit": 0.0, "connector": 2.0} ("" -> {})."""
    if not spec:
        return {}
    if not isinstance(spec, str):
        return {str(k): float(v) for k, v in dict(spec).items()}
    out = {}
    for item in spec.split(","):
        if not item.strip():
            continue
        path, sep, value = item.partition("=")
        try:
            scale = float(value)
        except ValueError:
            scale = None
        if not sep or not path.strip() or scale is None or scale < 0 or not math.isfinite(scale):
            raise ConfigError(f"config.optimizer.module_lr_scale item {item.strip()!r} must be "
                             "'module.path=scale' with a finite scale >= 0.")
        out[path.strip()] = scale
    return out


def module_lr_scales(opt_cfg, params: nnx.State):
    """The LR multiplier of every parameter (1.0 where no prefix matches).
    Raises ValueError for a prefix that matches no parameter."""
    rules = parse_module_lr_scale(_opt_get(opt_cfg, "module_lr_scale", ""))
    prefixes = {name: tuple(name.split(".")) for name in rules}
    used: set[str] = set()

    def scale(path, _):
        hits = [n for n, pre in prefixes.items() if path[:len(pre)] == pre]
        if not hits:
            return 1.0
        best = max(hits, key=lambda n: len(prefixes[n]))
        used.add(best)
        return rules[best]

    scales = _map_params(scale, params)
    unused = sorted(set(rules) - used)
    if unused:
        top = sorted(params.keys()) if hasattr(params, "keys") else []
        raise ConfigError(f"config.optimizer.module_lr_scale: {unused} match no parameter "
                         f"(top-level modules: {top}).")
    return scales


def trainable_mask(opt_cfg, params: nnx.State):
    """True for parameters that are updated (LR scale > 0). The train step
    takes it to skip gradients of frozen parameters."""
    return jax.tree.map(lambda s: s > 0, module_lr_scales(opt_cfg, params))


def _scale_updates(scales) -> optax.GradientTransformation:
    """Multiplies each update by its (static) per-parameter factor."""

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, s: u if s == 1.0 else u * jnp.asarray(s, u.dtype), updates, scales), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(opt_cfg, total_steps: int, params: nnx.State,
                   decoder_cfg=None) -> optax.GradientTransformation:
    """The optimizer for the `nnx.Param`s of `params` (abstract is enough;
    its init and update take the Params alone, `state.split_params`) per
    `config.optimizer` (see module doc): clip -> AdamW (masked decay) ->
    per-module LR scale. `decoder_cfg`: see `learning_rate_schedule`.

    Frozen modules get `optax.set_to_zero()` through `optax.partition`, so
    they hold no moments and are left out of the clipping norm. Without
    frozen or scaled modules the state is `chain(clip, adamw)`'s."""
    schedule = learning_rate_schedule(opt_cfg, total_steps, params, decoder_cfg)
    adamw = optax.chain(
        optax.clip_by_global_norm(opt_cfg.grad_clip),
        optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                    weight_decay=weight_decay_coefficient(opt_cfg),
                    mask=weight_decay_mask(params, _opt_get(opt_cfg, "no_decay", NO_DECAY_CATEGORIES))),
    )
    scales = module_lr_scales(opt_cfg, params)
    values = set(jax.tree.leaves(scales))
    if values <= {1.0}:
        return adamw
    tx = adamw
    if 0.0 in values:
        labels = jax.tree.map(lambda s: TRAINED if s > 0 else FROZEN, scales)
        tx = optax.partition({TRAINED: adamw, FROZEN: optax.set_to_zero()}, labels)
    if values - {0.0, 1.0}:
        tx = optax.chain(tx, _scale_updates(scales))
    return tx
