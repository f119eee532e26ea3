"""The jitted train step and the model call shared with evaluation.

Both are `jax.jit` functions with explicit NamedShardings: the state keeps
the layout's shardings across steps (and is donated), the batch is sharded
on its leading dimension.
"""

from __future__ import annotations

from typing import Callable

import jax
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from mmjax.models.partitioning import activation_sharding
from mmjax.train.loss import cross_entropy_loss
from mmjax.train.state import TrainSetup


def model_logits(graphdef, params: nnx.State, batch: dict, resolver=None) -> jax.Array:
    """Rebuilds the model from its params and returns logits `[b, s, vocab]`;
    `resolver` (see `mmjax.parallel.activation_resolver`) shards activations."""
    model = nnx.merge(graphdef, params)
    with activation_sharding(resolver):
        return model(batch["tokens"], batch["image_slots"], batch["images"],
                     batch["segment_ids"], batch["positions"])


def make_train_step(setup: TrainSetup, schedule: optax.Schedule, z_loss_weight: float) -> Callable:
    """Returns `step(state, batch) -> (state, metrics)` (jitted, state donated)."""

    def train_step(state, batch):
        def loss_fn(params):
            logits = model_logits(setup.graphdef, params, batch, setup.resolver)
            return cross_entropy_loss(logits, batch["targets"], batch["loss_mask"], z_loss_weight)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = setup.optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads),
                       learning_rate=schedule(state["step"]))
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    replicated = NamedSharding(setup.mesh, PartitionSpec())
    return jax.jit(train_step, in_shardings=(setup.state_shardings, setup.batch_shardings),
                   out_shardings=(setup.state_shardings, replicated), donate_argnums=0)

