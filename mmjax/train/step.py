"""The jitted train step and the model call shared with evaluation.

Both are `jax.jit` functions with explicit NamedShardings: the state keeps
the layout's shardings across steps (and is donated), the batch is sharded
on its leading dimension.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from mmjax.models.partitioning import activation_sharding
from mmjax.train.loss import cross_entropy_loss
from mmjax.train.state import TrainSetup


def model_forward(graphdef, params: nnx.State, batch: dict, resolver=None) -> tuple[jax.Array, dict]:
    """Rebuilds the model from its params; returns (logits `[b, s, vocab]`,
    MoE aux stacked over MoE layers). `resolver` (see
    `mmjax.parallel.activation_resolver`) shards activations."""
    model = nnx.merge(graphdef, params)
    with activation_sharding(resolver):
        return model.forward(batch["tokens"], batch["image_slots"], batch["images"],
                             batch["segment_ids"], batch["positions"])


def model_logits(graphdef, params: nnx.State, batch: dict, resolver=None) -> jax.Array:
    """Logits `[b, s, vocab]` only (see `model_forward`)."""
    return model_forward(graphdef, params, batch, resolver)[0]


def moe_losses(aux: dict, load_balance_weight: float, router_z_weight: float) -> tuple[jax.Array, dict]:
    """Weighted MoE aux loss (summed over MoE layers) and the metrics to log.

    metrics: moe_aux_loss (what is added to the loss), load_balance_loss and
    router_z_loss (unweighted, mean over layers), dropped_fraction and
    router_entropy (mean over layers), expert_fraction `[n_moe_layers, E]`."""
    if not aux:
        return jnp.zeros((), jnp.float32), {}
    total = (load_balance_weight * aux["load_balance_loss"].sum()
             + router_z_weight * aux["router_z_loss"].sum())
    metrics = {"moe_aux_loss": total,
               **{k: aux[k].mean() for k in ("load_balance_loss", "router_z_loss",
                                              "dropped_fraction", "router_entropy")},
               "expert_fraction": aux["expert_fraction"]}
    return total, metrics


def make_train_step(setup: TrainSetup, schedule: optax.Schedule, z_loss_weight: float,
                    load_balance_weight: float = 0.0, router_z_weight: float = 0.0) -> Callable:
    """Returns `step(state, batch) -> (state, metrics)` (jitted, state donated).

    The loss is next-token CE + z-loss + the weighted MoE aux losses."""

    def train_step(state, batch):
        def loss_fn(params):
            logits, aux = model_forward(setup.graphdef, params, batch, setup.resolver)
            loss, metrics = cross_entropy_loss(logits, batch["targets"], batch["loss_mask"], z_loss_weight)
            moe_loss, moe_metrics = moe_losses(aux, load_balance_weight, router_z_weight)
            return loss + moe_loss, {**metrics, **moe_metrics}

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = setup.optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads),
                       learning_rate=schedule(state["step"]))
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    replicated = NamedSharding(setup.mesh, PartitionSpec())
    return jax.jit(train_step, in_shardings=(setup.state_shardings, setup.batch_shardings),
                   out_shardings=(setup.state_shardings, replicated), donate_argnums=0)

