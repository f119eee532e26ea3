"""Start training from converted weights (`config.init_from`).

Each entry of `config.init_from` is a folder written by
`python -m mmjax.tools.convert_hf` (`params/` + `mmjax.json`); its weights
replace the matching component (`vit` or `decoder`) of a freshly initialised
model, placed directly onto the run's shardings. Optimizer state starts fresh.
"""

from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp
from flax import nnx


class InitFromError(ValueError):
    """An init_from folder is unreadable or does not match the model config."""


def apply_init_from(state: dict, paths) -> dict:
    """Overwrites `state["params"][component]` from each folder in `paths`."""
    for path in paths:
        path = os.path.abspath(path)
        meta_path = os.path.join(path, "mmjax.json")
        if not os.path.exists(meta_path):
            raise InitFromError(f"config.init_from entry {path} has no mmjax.json; "
                                "create it with python -m mmjax.tools.convert_hf.")
        with open(meta_path) as f:
            component = json.load(f)["component"]
        if component not in state["params"]:
            raise InitFromError(f"config.init_from entry {path} holds a {component!r} component, "
                                "which this model does not have.")
        target: nnx.State = state["params"][component]
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                target.to_pure_dict())
        try:
            with ocp.StandardCheckpointer() as ckpt:
                restored = ckpt.restore(os.path.join(path, "params"), abstract)
        except Exception as err:
            raise InitFromError(f"config.init_from entry {path} does not match "
                                f"config.model.{component}: {err}") from err
        nnx.replace_by_pure_dict(target, restored)
    return state
