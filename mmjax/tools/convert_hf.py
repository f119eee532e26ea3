"""Import Hugging Face checkpoints (safetensors + config.json) into mmjax.

  python -m mmjax.tools.convert_hf --kind clip|siglip|llama|mixtral SRC_DIR DST_DIR

In Python, `load(kind, src_dir)` returns a ready NNX module:
  clip / siglip: pixels `[b, h, w, 3]` float32 (reference preprocessing
                 applied) -> `last_hidden_state` `[b, tokens, embed]`
  llama/mixtral: token ids `[b, s]` -> logits `[b, s, vocab]`
Both the current key layout and the older one (`vision_model.` prefix;
Mixtral's per-expert `block_sparse_moe.experts.N.w1/w2/w3`) are read. DST_DIR gets `params/` (Orbax) and `mmjax.json` (component + config),
the input of `config.init_from`.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from flax import nnx

from mmjax.errors import Refusal
from mmjax.models.decoder import LanguageModel
from mmjax.models.vit import ViT


class ConversionError(Refusal):
    """A source checkpoint is missing a tensor or has one of the wrong shape."""


def read_safetensors(src_dir: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json dict, {tensor name: float32 array}) from a checkpoint folder."""
    from safetensors.numpy import load_file

    config_path = os.path.join(src_dir, "config.json")
    if not os.path.exists(config_path):
        raise ConversionError(f"{config_path} does not exist; SRC must be a Hugging Face model folder.")
    with open(config_path) as f:
        config = json.load(f)
    files = sorted(glob.glob(os.path.join(src_dir, "*.safetensors")))
    if not files:
        raise ConversionError(f"{src_dir} holds no *.safetensors files.")
    tensors: dict[str, np.ndarray] = {}
    for path in files:
        for name, value in load_file(path).items():
            tensors[name] = np.asarray(value, dtype=np.float32)
    return config, tensors


def _strip_prefix(tensors: dict[str, np.ndarray], prefixes: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Drops the first of `prefixes` found on the keys (older layouts)."""
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in tensors):
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    return tensors


class _Reader:
    """Pops tensors by name, naming what is missing or mis-shaped."""

    def __init__(self, tensors: dict[str, np.ndarray], src: str):
        self.tensors, self.src = dict(tensors), src

    def __call__(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        if name not in self.tensors:
            raise ConversionError(f"{self.src}: tensor {name!r} is missing.")
        value = self.tensors.pop(name)
        if shape is not None and tuple(value.shape) != tuple(shape):
            raise ConversionError(f"{self.src}: tensor {name!r} has shape {tuple(value.shape)}, "
                                  f"expected {tuple(shape)}.")
        return value


def _linear(read: _Reader, name: str, d_in: int, d_out: int, out_shape=None, in_shape=None, bias=True):
    """torch Linear `[out, in]` -> kernel `[*in_shape, *out_shape]` (+ bias `[*out_shape]`)."""
    w = read(f"{name}.weight", (d_out, d_in)).T
    out = {"kernel": w.reshape(tuple(in_shape or (d_in,)) + tuple(out_shape or (d_out,)))}
    if bias:
        out["bias"] = read(f"{name}.bias", (d_out,)).reshape(tuple(out_shape or (d_out,)))
    return out


def _norm(read: _Reader, name: str, dim: int, bias: bool = True) -> dict:
    out = {"scale": read(f"{name}.weight", (dim,))}
    if bias:
        out["bias"] = read(f"{name}.bias", (dim,))
    return out


def _attention(read, prefix, e, heads, kv_heads, head_dim, bias, out_name="out_proj"):
    return {
        "query": _linear(read, f"{prefix}.q_proj", e, heads * head_dim, (heads, head_dim), bias=bias),
        "key": _linear(read, f"{prefix}.k_proj", e, kv_heads * head_dim, (kv_heads, head_dim), bias=bias),
        "value": _linear(read, f"{prefix}.v_proj", e, kv_heads * head_dim, (kv_heads, head_dim), bias=bias),
        "out": _linear(read, f"{prefix}.{out_name}", heads * head_dim, e, in_shape=(heads, head_dim), bias=bias),
    }


def _stack_layers(layers: list[dict], scan: bool):
    """Per-layer param dicts -> the LayerStack's pure dict."""
    if scan:
        return {"layers": jax.tree.map(lambda *xs: np.stack(xs), *layers)}
    return {"layers": {i: layer for i, layer in enumerate(layers)}}


# ---------------------------------------------------------------- vision


def vision_config(kind: str, hf: dict) -> mlc.ConfigDict:
    """mmjax ViT config from a CLIP/SigLIP (vision) config.json."""
    v = hf.get("vision_config", hf)
    image_size, patch = v.get("image_size", 224), v.get("patch_size", 32)
    return mlc.ConfigDict(dict(
        flavour=kind, image_size=image_size, patch_size=patch, embed=v["hidden_size"],
        depth=v["num_hidden_layers"], heads=v["num_attention_heads"], mlp=v["intermediate_size"],
        layer_norm_eps=v.get("layer_norm_eps", 1e-5 if kind == "clip" else 1e-6), feature_layer=-1,
        map_head=bool(kind == "siglip" and v.get("vision_use_head", True)), scan=False, remat=""))


def vision_params(kind: str, cfg, tensors: dict[str, np.ndarray], src: str) -> dict:
    """ViT pure-dict params from HF tensors."""
    t = _strip_prefix(tensors, ("vision_model.", "vision_tower.vision_model."))
    read = _Reader(t, src)
    e, p, m, h = cfg.embed, cfg.patch_size, cfg.mlp, cfg.heads
    grid = (cfg.image_size // p) ** 2
    patch_w = read("embeddings.patch_embedding.weight", (e, 3, p, p))
    params = {"patch_embed": {"kernel": patch_w.transpose(2, 3, 1, 0).reshape(p * p * 3, e)}}
    pos = read("embeddings.position_embedding.weight", (grid + (kind == "clip"), e))
    if kind == "clip":
        params["class_embed"] = read("embeddings.class_embedding", (e,))
        params["cls_pos_embed"], params["pos_embed"] = pos[:1], pos[1:]
        params["ln_pre"] = _norm(read, "pre_layrnorm", e)
    else:
        params["patch_embed"]["bias"] = read("embeddings.patch_embedding.bias", (e,))
        params["pos_embed"] = pos
    layers = []
    for i in range(cfg.depth):
        pre = f"encoder.layers.{i}"
        layers.append({
            "ln1": _norm(read, f"{pre}.layer_norm1", e),
            "attn": _attention(read, f"{pre}.self_attn", e, h, h, e // h, bias=True),
            "ln2": _norm(read, f"{pre}.layer_norm2", e),
            "fc1": _linear(read, f"{pre}.mlp.fc1", e, m),
            "fc2": _linear(read, f"{pre}.mlp.fc2", m, e),
        })
    params["blocks"] = _stack_layers(layers, cfg.scan)
    params["ln_post"] = _norm(read, "post_layernorm", e)
    if cfg.map_head:
        in_w = read("head.attention.in_proj_weight", (3 * e, e))
        in_b = read("head.attention.in_proj_bias", (3 * e,))
        d = e // h
        split = {n: (in_w[j * e:(j + 1) * e], in_b[j * e:(j + 1) * e]) for j, n in enumerate(("query", "key", "value"))}
        attn = {n: {"kernel": w.T.reshape(e, h, d), "bias": b.reshape(h, d)} for n, (w, b) in split.items()}
        attn["out"] = _linear(read, "head.attention.out_proj", e, e, in_shape=(h, d))
        params["head"] = {"probe": read("head.probe", (1, 1, e)).reshape(1, e), "attn": attn,
                          "norm": _norm(read, "head.layernorm", e),
                          "fc1": _linear(read, "head.mlp.fc1", e, m), "fc2": _linear(read, "head.mlp.fc2", m, e)}
    else:
        for name in [k for k in read.tensors if k.startswith("head.")]:
            read.tensors.pop(name)  # a pooling head the config turned off
    return params


# ---------------------------------------------------------------- llama


def llama_config(hf: dict) -> mlc.ConfigDict:
    heads = hf["num_attention_heads"]
    return mlc.ConfigDict(dict(
        vocab_size=hf["vocab_size"], embed=hf["hidden_size"], layers=hf["num_hidden_layers"], heads=heads,
        kv_heads=hf.get("num_key_value_heads", heads), head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        mlp=hf["intermediate_size"], rope_theta=float(hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))),
        norm_eps=hf.get("rms_norm_eps", 1e-6), qk_norm=False,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), scan=False, remat=""))


def mixtral_config(hf: dict) -> mlc.ConfigDict:
    cfg = llama_config(hf)
    cfg.moe = mlc.ConfigDict(dict(
        num_experts=hf["num_local_experts"], top_k=hf["num_experts_per_tok"], moe_every=1, renormalize=True,
        capacity_factor=float(hf["num_local_experts"]) / hf["num_experts_per_tok"], dispatch="dropless",
        expert_mlp=hf["intermediate_size"], shared_expert=False,
        load_balance_weight=float(hf.get("router_aux_loss_coef", 0.01)), router_z_weight=0.001))
    return cfg


def _mixtral_experts(read: _Reader, pre: str, e: int, h: int, n: int) -> dict:
    """Experts of one layer from the fused (current) or per-expert (older) layout."""
    if f"{pre}.mlp.gate.weight" in read.tensors:
        router = read(f"{pre}.mlp.gate.weight", (n, e))
        gate_up = read(f"{pre}.mlp.experts.gate_up_proj", (n, 2 * h, e))
        down = read(f"{pre}.mlp.experts.down_proj", (n, e, h))
        gate, up = gate_up[:, :h], gate_up[:, h:]
    else:
        router = read(f"{pre}.block_sparse_moe.gate.weight", (n, e))
        ex = f"{pre}.block_sparse_moe.experts"
        gate = np.stack([read(f"{ex}.{i}.w1.weight", (h, e)) for i in range(n)])
        up = np.stack([read(f"{ex}.{i}.w3.weight", (h, e)) for i in range(n)])
        down = np.stack([read(f"{ex}.{i}.w2.weight", (e, h)) for i in range(n)])
    return {"router": router.T, "wi_gate": gate.transpose(0, 2, 1), "wi_up": up.transpose(0, 2, 1),
            "wo": down.transpose(0, 2, 1)}


def llama_params(cfg, tensors: dict[str, np.ndarray], src: str) -> dict:
    """Llama (dense MLP) or Mixtral (`cfg.moe`: experts on every layer) params."""
    t = _strip_prefix(tensors, ("language_model.",))
    read = _Reader(t, src)
    moe = cfg.get("moe")
    e, m, h, kv, d, v = cfg.embed, cfg.mlp, cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.vocab_size
    params = {"embedder": {"embedding": read("model.embed_tokens.weight", (v, e))}}
    layers = []
    for i in range(cfg.layers):
        pre = f"model.layers.{i}"
        attn = _attention(read, f"{pre}.self_attn", e, h, kv, d, bias=False, out_name="o_proj")
        layers.append({
            "attn_norm": _norm(read, f"{pre}.input_layernorm", e, bias=False),
            "attn": attn,
            "mlp_norm": _norm(read, f"{pre}.post_attention_layernorm", e, bias=False),
            "mlp": _mixtral_experts(read, pre, e, m, moe.num_experts) if moe else
                   {"gate": _linear(read, f"{pre}.mlp.gate_proj", e, m, bias=False),
                    "up": _linear(read, f"{pre}.mlp.up_proj", e, m, bias=False),
                    "down": _linear(read, f"{pre}.mlp.down_proj", m, e, bias=False)},
        })
    params["layers"] = _stack_layers(layers, cfg.scan)
    params["final_norm"] = _norm(read, "model.norm", e, bias=False)
    if cfg.tie_embeddings:
        read.tensors.pop("lm_head.weight", None)
    else:
        params["lm_head"] = _linear(read, "lm_head", e, v, bias=False)
    return {"decoder": params}


# ---------------------------------------------------------------- assembly

KINDS: dict[str, tuple[str, Callable, Callable, Callable]] = {
    # kind: (component, config_fn, params_fn, module class)
    "clip": ("vit", lambda hf: vision_config("clip", hf), lambda c, t, s: vision_params("clip", c, t, s), ViT),
    "siglip": ("vit", lambda hf: vision_config("siglip", hf), lambda c, t, s: vision_params("siglip", c, t, s), ViT),
    "llama": ("decoder", llama_config, llama_params, LanguageModel),
    "mixtral": ("decoder", mixtral_config, llama_params, LanguageModel),
}


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ConversionError(f"--kind={kind!r} is not supported; choose one of {sorted(KINDS)}.")


def fill_module(module: nnx.Module, pure: dict, src: str) -> nnx.Module:
    """Copies `pure` into `module`'s params, checking every shape."""
    state = nnx.state(module, nnx.Param)
    expected = state.to_pure_dict()
    flat_expected = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    flat_given = dict(jax.tree_util.tree_flatten_with_path(pure)[0])
    name = lambda path: "/".join(str(getattr(k, "key", k)) for k in path)  # noqa: E731
    for path, leaf in flat_expected.items():
        if path not in flat_given:
            raise ConversionError(f"{src}: no tensor maps to mmjax parameter {name(path)}.")
        if tuple(flat_given[path].shape) != tuple(leaf.shape):
            raise ConversionError(f"{src}: mmjax parameter {name(path)} expects shape {tuple(leaf.shape)}, "
                                  f"got {tuple(flat_given[path].shape)}.")
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, pure))
    nnx.update(module, state)
    return module


def convert(kind: str, src_dir: str) -> tuple[str, mlc.ConfigDict, dict]:
    """(component, mmjax sub-config, pure-dict params) for a HF checkpoint."""
    _check_kind(kind)
    component, config_fn, params_fn, _ = KINDS[kind]
    hf_config, tensors = read_safetensors(src_dir)
    cfg = config_fn(hf_config)
    return component, cfg, params_fn(cfg, tensors, src_dir)


def load(kind: str, src_dir: str, **moe_overrides) -> nnx.Module:
    """A ready NNX module with the checkpoint's weights (see module doc).

    For mixtral, `moe_overrides` (e.g. `dispatch="capacity"`,
    `capacity_factor=4.0`) change the MoE config before the module is built."""
    component, cfg, params = convert(kind, src_dir)
    if moe_overrides:
        if not cfg.get("moe"):
            raise ConversionError(f"--kind={kind} has no experts; MoE options {sorted(moe_overrides)} do not apply.")
        cfg.moe.update(moe_overrides)
    module = KINDS[kind][3](cfg, rngs=nnx.Rngs(0))
    return fill_module(module, params, src_dir)


def save(kind: str, src_dir: str, dst_dir: str) -> None:
    """Writes `dst_dir/params` (Orbax) and `dst_dir/mmjax.json`."""
    import orbax.checkpoint as ocp

    component, cfg, params = convert(kind, src_dir)
    module = KINDS[kind][3](cfg, rngs=nnx.Rngs(0))
    fill_module(module, params, src_dir)  # validates before anything is written
    state = nnx.state(module, nnx.Param).to_pure_dict()
    if component == "decoder":
        state = state["decoder"]
    dst_dir = os.path.abspath(dst_dir)
    os.makedirs(dst_dir, exist_ok=True)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.join(dst_dir, "params"), state, force=True)
    with open(os.path.join(dst_dir, "mmjax.json"), "w") as f:
        json.dump({"kind": kind, "component": component, "config": cfg.to_dict()}, f, indent=2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmjax.tools.convert_hf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", required=True, choices=sorted(KINDS), help="source model family")
    parser.add_argument("src", help="Hugging Face model folder (config.json + *.safetensors)")
    parser.add_argument("dst", help="output folder for the Orbax params and mmjax.json")
    args = parser.parse_args(argv)
    try:
        save(args.kind, args.src, args.dst)
    except ConversionError as err:
        print(f"convert_hf: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.dst}/params and {args.dst}/mmjax.json ({args.kind})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
