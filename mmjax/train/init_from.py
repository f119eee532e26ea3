"""Start training from converted weights (`config.init_from`).

Each entry of `config.init_from` is a folder written by
`python -m mmjax.tools.convert_hf` (`params/` + `mmjax.json`); its weights
replace the matching component (`vit` or `decoder`) of a freshly initialised
model, placed directly onto the run's shardings. Optimizer state starts fresh.
A dense decoder checkpoint given to an MoE decoder is upcycled: every expert
starts as a copy of the dense MLP (`mmjax.models.upcycle`).
"""

from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp
from flax import nnx

from mmjax.errors import ConfigError
from mmjax.models.upcycle import upcycle_decoder


class InitFromError(ConfigError):
    """An init_from folder is unreadable or does not match the model config."""


def _has_experts(decoder: dict) -> bool:
    return any("wi_gate" in layer["mlp"] for layer in decoder["layers"]["layers"].values()
               if isinstance(layer, dict) and "mlp" in layer)


def apply_init_from(state: dict, paths) -> dict:
    """Overwrites `state["params"][component]` from each folder in `paths`."""
    for path in paths:
        path = os.path.abspath(path)
        meta_path = os.path.join(path, "mmjax.json")
        if not os.path.exists(meta_path):
            raise InitFromError(f"config.init_from entry {path} has no mmjax.json; "
                                "create it with python -m mmjax.tools.convert_hf.")
        with open(meta_path) as f:
            meta = json.load(f)
        component = meta["component"]
        if component not in state["params"]:
            raise InitFromError(f"config.init_from entry {path} holds a {component!r} component, "
                                "which this model does not have.")
        target: nnx.State = state["params"][component]
        current = target.to_pure_dict()
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), current)
        dense_source = not (meta["config"].get("moe") or {}).get("num_experts")
        upcycle = component == "decoder" and dense_source and _has_experts(current)
        try:
            with ocp.StandardCheckpointer() as ckpt:
                if upcycle:  # dense checkpoint into an MoE decoder: copy the MLP into every expert
                    dense = ckpt.restore(os.path.join(path, "params"))
                    restored = jax.tree.map(lambda v, a: jax.device_put(v, a.sharding),
                                            upcycle_decoder(dense, current), abstract)
                else:
                    restored = ckpt.restore(os.path.join(path, "params"), abstract)
        except Exception as err:
            raise InitFromError(f"config.init_from entry {path} does not match "
                                f"config.model.{component}: {err}") from err
        nnx.replace_by_pure_dict(target, restored)
    return state
