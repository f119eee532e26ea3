"""The jitted train step and the model call shared with evaluation.

The step is a `jax.jit` function with explicit NamedShardings: the state
keeps the layout's shardings across steps (and is donated), the batch is
sharded on its leading dimension. Parameters stay in their stored dtype
(float32) and the optimizer updates them there; `config.model.dtype` only
sets the compute dtype inside the model.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from mmjax.errors import ConfigError
from mmjax.models.moe import router_biases, set_router_biases, update_router_bias
from mmjax.models.partitioning import activation_sharding
from mmjax.models.precision import cast_weights_once
from mmjax.parallel import mesh_axes_size
from mmjax.train.loss import cross_entropy_loss
from mmjax.train.state import TrainSetup, split_params


def model_forward(graphdef, params: nnx.State, batch: dict, resolver=None) -> tuple[jax.Array, dict]:
    """Rebuilds the model from its variables (the train state's `params`);
    returns (logits `[b, s, vocab]`, MoE aux stacked over MoE layers). `resolver` (see
    `mmjax.parallel.activation_resolver`) shards activations. Weights that
    modules compute with in another dtype are cast once here
    (`mmjax.models.precision`)."""
    model = nnx.merge(graphdef, params)
    cast_weights_once(model)
    with activation_sharding(resolver):
        return model.forward_batch(batch)


def model_logits(graphdef, params: nnx.State, batch: dict, resolver=None) -> jax.Array:
    """Logits `[b, s, vocab]` only (see `model_forward`)."""
    return model_forward(graphdef, params, batch, resolver)[0]


# Routing statistics split by modality (`mmjax.models.moe.TOKEN_KINDS`).
_MODALITIES = ("text", "image")
_MOE_STATS = ("expert_fraction", "dropped_fraction", "router_entropy")


def moe_losses(aux: dict, load_balance_weight: float, router_z_weight: float) -> tuple[jax.Array, dict]:
    """Weighted MoE aux loss (summed over MoE layers) and the metrics to log.

    metrics: moe_aux_loss (what is added to the loss), load_balance_loss and
    router_z_loss (unweighted, mean over layers), dropped_fraction and
    router_entropy (mean over layers), expert_fraction `[n_moe_layers, E]`;
    per modality (routing statistics over non-padding tokens):
    expert_fraction_text/_image `[n_moe_layers, E]`,
    dropped_fraction_text/_image and router_entropy_text/_image
    `[n_moe_layers]`, and the token counts moe_tokens_text/_image."""
    if not aux:
        return jnp.zeros((), jnp.float32), {}
    total = (load_balance_weight * aux["load_balance_loss"].sum()
             + router_z_weight * aux["router_z_loss"].sum())
    metrics = {"moe_aux_loss": total,
               **{k: aux[k].mean() for k in ("load_balance_loss", "router_z_loss",
                                              "dropped_fraction", "router_entropy")},
               "expert_fraction": aux["expert_fraction"],
               **{f"{stat}_{m}": aux[f"{stat}_{m}"] for stat in _MOE_STATS for m in _MODALITIES},
               **{f"moe_tokens_{m}": aux[f"tokens_{m}"][0] for m in _MODALITIES}}
    return total, metrics


def merge_micro_metrics(metrics: dict) -> dict:
    """Metrics stacked over micro-batches `[k, ...]` -> the step's: token-weighted
    ones (already scaled by their share) and counts summed, MoE routing
    statistics weighted by their micro-batch's token count of the modality
    they are over, every other metric averaged."""
    counts = {m: metrics[f"moe_tokens_{m}"] for m in _MODALITIES if f"moe_tokens_{m}" in metrics}

    def weighted(value, count):
        w = count.reshape((-1,) + (1,) * (value.ndim - 1))
        return (value * w).sum(0) / jnp.maximum(count.sum(), 1.0)

    def merge(name, value):
        if name in _TOKEN_WEIGHTED + ("loss_tokens",) or name.startswith("moe_tokens_"):
            return value.sum(0)
        if counts and name in _MOE_STATS:
            return weighted(value, sum(counts.values()))
        stat, _, modality = name.rpartition("_")
        if stat in _MOE_STATS and modality in counts:
            return weighted(value, counts[modality])
        return value.mean(0)

    return {name: merge(name, value) for name, value in metrics.items()}


def split_micro_batches(batch: dict, k: int, setup: TrainSetup) -> dict:
    """`[B, ...]` -> `[k, B/k, ...]` for every field, each micro-batch still
    sharded over the batch axes.

    Micro-batch j takes rows j, j+k, j+2k, ...: each device's contiguous
    block of rows splits evenly into the k micro-batches, so the split needs
    no communication. Needs B divisible by k times the batch shards."""

    def split(name, x):
        spec = tuple(setup.batch_shardings[name].spec) if name in setup.batch_shardings else ()
        spec += (None,) * (x.ndim - len(spec))
        lead, rest = spec[0], spec[1:]
        shards = mesh_axes_size(setup.mesh, lead)
        if x.shape[0] % (k * shards):
            raise ValueError(f"batch field {name!r} has {x.shape[0]} rows, not divisible by "
                             f"grad_accum_steps={k} x {shards} batch shards.")
        x = x.reshape((x.shape[0] // k, k) + x.shape[1:])
        x = jax.lax.with_sharding_constraint(x, NamedSharding(setup.mesh, PartitionSpec(lead, None, *rest)))
        x = jnp.moveaxis(x, 1, 0)
        return jax.lax.with_sharding_constraint(x, NamedSharding(setup.mesh, PartitionSpec(None, lead, *rest)))

    return {name: split(name, x) for name, x in batch.items()}


# Metrics summed over micro-batches after weighting by their share of the
# counted tokens; every other metric (MoE statistics) is averaged.
_TOKEN_WEIGHTED = ("lm_loss", "z_loss", "token_accuracy")


def balance_router_biases(variables: nnx.State, expert_fraction: jax.Array | None,
                          rate: float) -> tuple[nnx.State, dict]:
    """Aux-loss-free balancing after a step: every MoE layer's RouterBias in
    `variables` moves by `mmjax.models.moe.update_router_bias` from the
    step's load `expert_fraction` `[n_moe_layers, E]` (global batch). Returns
    (variables, metrics): `router_bias_range`, the largest max - min of a
    layer's bias after the update ({} without router biases)."""
    biases = router_biases(variables)
    if biases is None:
        return variables, {}
    if rate and expert_fraction is not None:
        biases = update_router_bias(biases, expert_fraction, rate)
        variables = set_router_biases(variables, biases)
    return variables, {"router_bias_range": jnp.max(biases.max(-1) - biases.min(-1))}


def make_train_step(setup: TrainSetup, schedule: optax.Schedule, z_loss_weight: float,
                    load_balance_weight: float = 0.0, router_z_weight: float = 0.0, *,
                    grad_accum_steps: int = 1, trainable=None, skip_nonfinite: bool = False,
                    router_bias_rate: float = 0.0, batch_loss: Callable | None = None) -> Callable:
    """Returns `step(state, batch) -> (state, metrics)` (jitted, state donated).

    The loss is next-token CE + z-loss + the weighted MoE aux losses, or,
    with `batch_loss` (`(outputs, batch) -> (loss, metrics)`, a loss of the
    whole batch from the model's outputs and the batch fields its objective
    reads, e.g. labels: `mmjax.train.objectives`), that loss +
    the weighted MoE aux losses; `batch_loss` runs under the activation
    shardings and needs grad_accum_steps=1.
    Gradients and the optimizer update cover the `nnx.Param`s; after the
    update the MoE router biases (if the model has them, `moe.balance="bias"`)
    move by `router_bias_rate` towards balance (`balance_router_biases`), on
    the devices (no host sync).

    grad_accum_steps: k > 1 splits the batch into k micro-batches (see
      `split_micro_batches`) and accumulates their gradients with
      `jax.lax.scan`. CE and z-loss are means over all counted tokens of the
      batch: micro-batch j contributes its mean times `n_j / N` (its share of
      the counted tokens), so loss and gradients equal the single-batch ones.
      MoE aux losses are per micro-batch and averaged over the k.
    trainable: optional tree of bools shaped like the params
      (`mmjax.train.optimizer.trainable_mask`); parameters marked False get
      no gradient (none is computed through them) and are left out of
      `grad_norm`.

    skip_nonfinite: a step whose loss or gradient norm is NaN/Inf leaves the
      state unchanged (metric `skipped_step` = 1) instead of applying it.

    metrics: loss, lm_loss, z_loss, token_accuracy, loss_tokens, MoE metrics
    (and router_bias_range with router biases), grad_norm (global norm of
    the accumulated gradients, before clipping), learning_rate (the base
    schedule's value for this step)."""
    k = int(grad_accum_steps)
    if k < 1:
        raise ValueError(f"grad_accum_steps={grad_accum_steps} must be at least 1.")
    if batch_loss is not None and k > 1:
        raise ConfigError(f"config.train.grad_accum_steps={k}: this model's loss is over the whole batch "
                          "(every pair against every other), which micro-batches would change; use 1.")

    def freeze(params):
        if trainable is None:
            return params
        return jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable)

    def micro_grads(params, others, batch, total_tokens):
        """(weighted loss, metrics), grads of `params` for one (micro-)batch;
        `others`: the model's variables that are not Params."""

        def loss_fn(p):
            variables = nnx.merge_state(freeze(p), others)
            outputs, aux = model_forward(setup.graphdef, variables, batch, setup.resolver)
            if batch_loss is not None:
                with activation_sharding(setup.resolver):
                    loss, metrics = batch_loss(outputs, batch)
                moe_loss, moe_metrics = moe_losses(aux, load_balance_weight, router_z_weight)
                return loss + moe_loss, {**metrics, **moe_metrics}
            loss, metrics = cross_entropy_loss(outputs, batch["targets"], batch["loss_mask"], z_loss_weight)
            moe_loss, moe_metrics = moe_losses(aux, load_balance_weight, router_z_weight)
            share = metrics["loss_tokens"] / jnp.maximum(total_tokens, 1.0)
            metrics = {name: (value * share if name in _TOKEN_WEIGHTED else value)
                       for name, value in {**metrics, **moe_metrics}.items()}
            return loss * share + moe_loss / k, metrics

        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    def accumulated_grads(params, others, batch):
        if batch_loss is not None:
            return micro_grads(params, others, batch, None)
        total_tokens = batch["loss_mask"].astype(jnp.float32).sum()
        if k == 1:
            return micro_grads(params, others, batch, total_tokens)
        micro = split_micro_batches(batch, k, setup)
        grad_shardings = split_params(setup.state_shardings["params"])[0]

        def body(acc, mb):
            (loss, metrics), grads = micro_grads(params, others, mb, total_tokens)
            acc = jax.tree.map(jnp.add, acc, grads)
            return jax.lax.with_sharding_constraint(acc, grad_shardings), (loss, metrics)

        zeros = jax.lax.with_sharding_constraint(jax.tree.map(jnp.zeros_like, params), grad_shardings)
        grads, (losses, metrics) = jax.lax.scan(body, zeros, micro)
        metrics = merge_micro_metrics(metrics)
        return (losses.sum(), metrics), grads

    def train_step(state, batch):
        params, others = split_params(state["params"])
        (loss, metrics), grads = accumulated_grads(params, others, batch)
        updates, opt_state = setup.optimizer.update(grads, state["opt_state"], params)
        params = optax.apply_updates(params, updates)
        others, bias_metrics = balance_router_biases(others, metrics.get("expert_fraction"), router_bias_rate)
        params = nnx.merge_state(params, others)
        grad_norm = optax.global_norm(grads)
        metrics = dict(metrics, **bias_metrics, loss=loss, grad_norm=grad_norm,
                       learning_rate=schedule(state["step"]))
        new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
        if skip_nonfinite:
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            kept = {"params": state["params"], "opt_state": state["opt_state"]}
            new_state.update(jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                          {"params": params, "opt_state": opt_state}, kept))
            metrics["skipped_step"] = 1.0 - finite.astype(jnp.float32)
        return new_state, metrics

    replicated = NamedSharding(setup.mesh, PartitionSpec())
    return jax.jit(train_step, in_shardings=(setup.state_shardings, setup.batch_shardings),
                   out_shardings=(setup.state_shardings, replicated), donate_argnums=0)
