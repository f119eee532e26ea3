"""Sharded train state: `{"step", "params", "opt_state"}` created directly on
the mesh (parameters are never materialised unsharded).

`params` is the model's whole `nnx.State`: its `nnx.Param`s and any other
variables (the MoE router biases of `moe.balance="bias"`); each variable's
logical axes go through the layout rules to a NamedSharding. Gradients and
the optimizer see only the `nnx.Param`s (`split_params`); the train step
updates the other variables itself. Optimizer moments inherit the sharding
of the parameter they belong to. The model is the one
`config.model.name` names (`mmjax.models.registry`); the batch fields the step
receives are the ones it reads plus those its objective's loss reads
(`mmjax.train.objectives`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mmjax.models import build_model, model_spec
from mmjax.parallel import activation_resolver, batch_sharding, tree_shardings
from mmjax.train.objectives import model_objective


def step_inputs(config) -> tuple[str, ...]:
    """Batch fields the jitted step consumes (model inputs + loss inputs);
    anything else stays on the host."""
    return model_spec(config.model).inputs_for(config.model) + model_objective(config.model).inputs


def batch_row_shapes(config) -> dict[str, tuple[int, ...]]:
    """Per-row shape of each step input: `[seq_len]`, images `[max_images, size, size, 3]`,
    image `[size, size, 3]` (pair batches), region_images `[max_regions]`,
    region_masks `[max_regions, region_grid, region_grid]`, the pair labels
    entity_ids `[max_entities]`, class_id and superclass_id `[]`."""
    d = config.data
    regions, grid = d.get("max_regions", 0), d.get("region_grid", 0)
    special = {"images": (d.max_images, d.image_size, d.image_size, 3), "image": (d.image_size, d.image_size, 3),
               "region_images": (regions,), "region_masks": (regions, grid, grid),
               "entity_ids": (d.get("labels", {}).get("max_entities", 8),), "class_id": (), "superclass_id": ()}
    return {k: special.get(k, (d.seq_len,)) for k in step_inputs(config)}


@dataclasses.dataclass
class TrainSetup:
    """Static pieces of a run: how to rebuild the model and where arrays live."""

    graphdef: Any
    abstract_params: nnx.State  # every variable of the model (`split_params` keeps the trained ones)
    optimizer: optax.GradientTransformation
    mesh: Mesh
    state_shardings: dict
    batch_shardings: dict[str, NamedSharding]
    resolver: Callable  # activation shardings by logical axes


def abstract_model(model_cfg, seed: int = 0) -> tuple[Any, nnx.State]:
    """(graphdef, abstract variables: params and the rest) without allocating any."""
    model = nnx.eval_shape(lambda: build_model(model_cfg, nnx.Rngs(seed)))
    return nnx.split(model)


def split_params(variables: nnx.State) -> tuple[nnx.State, nnx.State]:
    """(the `nnx.Param`s: what gradients and the optimizer see, every other
    variable), e.g. of the train state's `params`; `nnx.merge_state` joins them."""
    return nnx.split_state(variables, nnx.Param, ...)


def _optimizer_state_shardings(optimizer, abstract_opt, param_shardings, mesh: Mesh):
    """Each optimizer-state leaf that stands for a parameter (a moment) gets
    that parameter's sharding; counters and scalars are replicated.
    `optax.tree_utils.tree_map_params` finds the parameter positions; a
    masked-out parameter (`optax.MaskedNode`, no moment) stays as it is."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return optax.tree_utils.tree_map_params(
        optimizer, lambda leaf, sharding: leaf if isinstance(leaf, optax.MaskedNode) else sharding,
        abstract_opt, param_shardings, transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, (NamedSharding, optax.MaskedNode)))


def build_train_setup(config, mesh: Mesh, rules: dict,
                      make_optimizer: Callable[[nnx.State], optax.GradientTransformation]) -> TrainSetup:
    """Derives every sharding of the run from the config and layout rules."""
    graphdef, abstract_params = abstract_model(config.model, config.train.seed)
    param_shardings = tree_shardings(abstract_params, mesh, rules)
    trained = split_params(abstract_params)[0]
    optimizer = make_optimizer(trained)
    abstract_opt = jax.eval_shape(optimizer.init, trained)
    opt_shardings = _optimizer_state_shardings(optimizer, abstract_opt, split_params(param_shardings)[0], mesh)
    state_shardings = {
        "step": NamedSharding(mesh, PartitionSpec()),
        "params": param_shardings,
        "opt_state": opt_shardings,
    }
    batch_shardings = {k: batch_sharding(mesh, rules, 1 + len(v)) for k, v in batch_row_shapes(config).items()}
    return TrainSetup(graphdef, abstract_params, optimizer, mesh, state_shardings, batch_shardings,
                      activation_resolver(mesh, rules))


def init_train_state(config, setup: TrainSetup) -> dict:
    """Initial state, created inside jit with the target shardings."""

    def init():
        model = build_model(config.model, nnx.Rngs(config.train.seed))
        variables = nnx.state(model)
        return {"step": jnp.zeros((), jnp.int32), "params": variables,
                "opt_state": setup.optimizer.init(split_params(variables)[0])}

    return jax.jit(init, out_shardings=setup.state_shardings)()


def abstract_train_state(setup: TrainSetup) -> dict:
    """ShapeDtypeStructs with shardings, the target of a checkpoint restore."""
    shapes = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": setup.abstract_params,
              "opt_state": jax.eval_shape(setup.optimizer.init, split_params(setup.abstract_params)[0])}
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, setup.state_shardings)
