"""Start training from converted weights or another run (`config.init_from`).

Each entry of `config.init_from` is either
- a folder written by `python -m mmjax.tools.convert_hf` (`params/` +
  `mmjax.json`): its weights replace the matching component (`vit` or
  `decoder`) of a freshly initialised model, or
- a training workdir (`checkpoints/<step>/` written by `mmjax.train`, e.g.
  the previous stage of a staged recipe): the model variables of its newest
  checkpoint that restores (a damaged newer one is skipped with a warning)
  replace those of every component the two models share, matched by path
  (a CLIP run's `vit` into an MM1 model; the whole model for the next stage
  of the same one). Variables the source lacks (a new module) keep their
  fresh initialisation and are listed in the log; a shape that differs is
  refused naming the variable.
Weights are placed directly onto the run's shardings. Optimizer state,
step and data position start fresh.
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
from mmjax.train.checkpoint import COMMIT_MARKER
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


def is_training_workdir(path) -> bool:
    """Whether `path` is a training workdir (has `checkpoints/`)."""
    return os.path.isdir(os.path.join(os.path.expanduser(str(path)), "checkpoints"))


def committed_steps(workdir) -> list[int]:
    """Steps of `workdir`'s checkpoints that finished writing, newest first."""
    folder = os.path.join(os.path.expanduser(str(workdir)), "checkpoints")
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted((int(n) for n in names if n.isdigit() and os.path.exists(os.path.join(folder, n, COMMIT_MARKER))),
                  reverse=True)


def _leaves(tree, prefix=()) -> dict[tuple, object]:
    """Nested dict -> {path of str keys: leaf}."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(_leaves(value, prefix + (str(key),)))
    return out


def _nest(flat: dict[tuple, object]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def _restore_step(step_dir: str, state: dict, log) -> list[str]:
    """Copies the shared model variables of one checkpoint into
    `state["params"]` (module doc); returns the components taken. Raises
    InitFromError on a shape mismatch or nothing shared, RestoreFailed-like
    `OSError`/`ValueError` from Orbax when the checkpoint cannot be read."""
    saved = ocp.PyTreeCheckpointer().metadata(os.path.join(step_dir, "state")).item_metadata.tree["params"]
    taken, target, missing = [], {}, []
    for component in state["params"]:
        if component not in saved:
            missing.append(component)
            continue
        have = _leaves(saved[component])  # paths end in "value" (nnx.Variable)
        for path, leaf in _leaves(state["params"][component].to_pure_dict()).items():
            meta = have.get(path + ("value",))
            name = ".".join((component,) + path)
            if meta is None:
                missing.append(name)
                continue
            if tuple(meta.shape) != tuple(leaf.shape):
                raise InitFromError(f"config.init_from: {name} has shape {tuple(meta.shape)} in {step_dir} and "
                                    f"{tuple(leaf.shape)} in this model.")
            target[(component,) + path + ("value",)] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                                            sharding=leaf.sharding)
        taken.append(component)
    if not taken:
        raise InitFromError(f"config.init_from: {step_dir} holds the components {sorted(saved)}, none of which "
                            f"this model has ({sorted(state['params'])}).")
    item = {"params": _nest(target)}
    restored = ocp.PyTreeCheckpointer().restore(os.path.join(step_dir, "state"), args=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
    for component in taken:
        values = {path[1:-1]: value for path, value in _leaves(restored["params"]).items() if path[0] == component}
        nnx.replace_by_pure_dict(state["params"][component], _nest(values) if values else {})
    if missing:
        log(f"init_from: {len(missing)} component(s) or variable(s) not in {step_dir} keep their initialisation: "
            f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    return taken


def apply_workdir(state: dict, workdir: str, log=print) -> dict:
    """Overwrites the shared components of `state["params"]` from the newest
    checkpoint of the training `workdir` that restores (module doc)."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    steps = committed_steps(workdir)
    if not steps:
        raise InitFromError(f"config.init_from entry {workdir} is a training workdir without a finished "
                            "checkpoint; train it first or name another one.")
    errors = []
    for step in steps:
        step_dir = os.path.join(workdir, "checkpoints", str(step))
        try:
            taken = _restore_step(step_dir, state, log)
        except InitFromError:
            raise
        except Exception as err:  # a damaged checkpoint: an older one may still serve
            errors.append(f"step {step}: {type(err).__name__}: {' '.join(str(err).split())[:200]}")
            log(f"warning: init_from cannot read {step_dir} ({errors[-1]}); trying the previous checkpoint.")
            continue
        log(f"init_from: {', '.join(taken)} from {step_dir}")
        return state
    raise InitFromError(f"config.init_from entry {workdir}: none of its {len(steps)} checkpoint(s) can be read "
                        f"(newest: {errors[0]}).")


def apply_init_from(state: dict, paths, log=print) -> dict:
    """Overwrites `state["params"]` components from each entry of `paths`
    (converted folders or training workdirs, module doc)."""
    for path in paths:
        if is_training_workdir(path):
            state = apply_workdir(state, str(path), log)
            continue
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
