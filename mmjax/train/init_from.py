"""Start training from converted weights (`config.init_from`).

Each entry of `config.init_from` is a folder written by
`python -m mmjax.tools.convert_hf` (`params/` + `mmjax.json`); its weights
replace the matching component (`vit` or `decoder`) of a freshly initialised
model, placed directly onto the run's shardings. Optimizer state starts fresh.
A dense decoder checkpoint given to an MoE decoder is upcycled: every expert
starts as a copy of the dense MLP (`mmjax.models.upcycle`). Converted weights
hold listed layers; a scanned stack receives them stacked (and the reverse).
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from mmjax.errors import ConfigError
from mmjax.models.upcycle import upcycle_decoder


class InitFromError(ConfigError):
    """An init_from folder is unreadable or does not match the model config."""


def _target_scanned(component: dict) -> bool:
    """Whether the component's layer stacks (a `layers` or `blocks` entry
    holding `layers`: the decoder's, the ViT's, or nested like the
    C-Abstractor's `stage1.blocks`) are scanned; the first one found decides."""
    return bool(_find_stack_scanned(component))


def _find_stack_scanned(tree) -> bool | None:
    if not isinstance(tree, dict) or _is_layer_list(tree):
        return None
    for name in ("layers", "blocks"):
        stack = tree.get(name)
        if isinstance(stack, dict) and "layers" in stack:
            return not _is_layer_list(stack["layers"])
    for value in tree.values():
        found = _find_stack_scanned(value)
        if found is not None:
            return found
    return None


def _placed(value, abstract: jax.ShapeDtypeStruct) -> jax.Array:
    if tuple(value.shape) != tuple(abstract.shape):
        raise ValueError(f"an array of shape {tuple(value.shape)} where the model has {tuple(abstract.shape)}")
    return jax.device_put(np.asarray(value, abstract.dtype), abstract.sharding)


def _has_experts(decoder: dict) -> bool:
    return any("wi_gate" in layer["mlp"] for layer in decoder["layers"]["layers"].values()
               if isinstance(layer, dict) and "mlp" in layer)


def _is_layer_list(tree) -> bool:
    return isinstance(tree, dict) and bool(tree) and all(str(k).isdigit() for k in tree)


def match_layer_stacking(source, target):
    """`source` (a restored pure dict) with each layer stack laid out as in
    `target`: per-layer dicts `{0: {...}, 1: {...}}` (a listed stack, as
    `convert_hf` writes) stacked into arrays with a leading `[layers]`
    dimension where the target is scanned, or unstacked the other way."""
    if not isinstance(source, dict) or not isinstance(target, dict):
        return source
    if _is_layer_list(source) and not _is_layer_list(target):
        layers = [source[k] for k in sorted(source, key=int)]
        return match_layer_stacking(jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *layers),
                                    target)
    if _is_layer_list(target) and not _is_layer_list(source):
        keys = sorted(target, key=int)
        return {k: match_layer_stacking(jax.tree.map(lambda x, i=i: np.asarray(x)[i], source), target[k])
                for i, k in enumerate(keys)}
    return {k: match_layer_stacking(v, target.get(k, target.get(str(k)))) if k in target or str(k) in target
            else v for k, v in source.items()}


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
        # Only the Params: variables a converted folder does not hold (MoE router biases) keep their values.
        target, others = nnx.split_state(state["params"][component], nnx.Param, ...)
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
                elif bool(meta["config"].get("scan")) == _target_scanned(current):
                    restored = ckpt.restore(os.path.join(path, "params"), abstract)
                else:  # listed layers into a scanned stack, or the reverse
                    raw = match_layer_stacking(ckpt.restore(os.path.join(path, "params")), current)
                    restored = jax.tree.map(lambda v, a: _placed(v, a), raw, abstract)
        except Exception as err:
            raise InitFromError(f"config.init_from entry {path} does not match "
                                f"config.model.{component}: {err}") from err
        nnx.replace_by_pure_dict(target, restored)
        state["params"][component] = nnx.merge_state(target, others)
    return state
