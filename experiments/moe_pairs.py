"""MoE-vs-dense pairs at matched active parameters.

  python -m mmjax.train --config experiments/moe_pairs.py:3b-dense --workdir DIR
  python -m mmjax.train --config experiments/moe_pairs.py:3b-moe --workdir DIR
  python -m mmjax.bench.moe_vs_dense --dense experiments/moe_pairs.py:tiny-dense \
      --moe experiments/moe_pairs.py:tiny-moe

Argument: `NAME[,HARDWARE]` with NAME one of `pairs()`'s entries. Both members
of a pair share everything (ViT, connector, data, schedule, hardware preset)
except the decoder's MLPs: the MoE member's experts are `top_k` times
narrower than the dense MLP (`expert_mlp = mlp / top_k`), so a token's two
experts do the dense MLP's work and the active parameters per token match
(the router adds `embed x num_experts` per MoE layer).

  pair            MoE layers                 expert_mlp  hardware
  tiny            8 experts, every 2nd layer    256       cpu-8 (= experiments/tiny.py, tiny_moe.py)
  3b              64 experts, every 2nd layer  3456       tpu-v5p-512
  7b              32 experts, every 4th layer  5504       tpu-v5p-512

`param_counts(config)` gives total and active parameters from the abstract
model (nothing allocated); `decoder_param_counts(config.model.decoder)` is the
same count for the decoder from its dims alone.
"""

from __future__ import annotations

import math

import jax
from flax import nnx

from experiments import mm1
from experiments.hardware import apply_hardware

# pair -> (dense config builder arg, MoE num_experts, moe_every, hardware)
_PAIRS = {
    "3b": ("3b", 64, 2, "tpu-v5p-512"),
    "7b": ("7b", 32, 4, "tpu-v5p-512"),
}
NAMES = ("tiny-dense", "tiny-moe") + tuple(f"{p}-{kind}" for p in _PAIRS for kind in ("dense", "moe"))


def pairs() -> list[tuple[str, str]]:
    """(dense arg, MoE arg) for every pair."""
    return [("tiny-dense", "tiny-moe")] + [(f"{p}-dense", f"{p}-moe") for p in _PAIRS]


def _tiny(moe: bool):
    from experiments.tiny import get_config as tiny
    from experiments.tiny_moe import get_config as tiny_moe

    c = tiny_moe() if moe else tiny()
    mm1.add_hardware_fields(c)
    return c


def get_config(arg=None):
    name, hardware = mm1.parse_arg(arg, "3b-moe", NAMES, "experiments/moe_pairs.py")
    size, kind = name.rsplit("-", 1)
    if size == "tiny":
        c = _tiny(kind == "moe")
        return apply_hardware(c, hardware or "cpu-8")
    dense, experts, every, default_hw = _PAIRS[size]
    c = mm1.build(dense)
    if kind == "moe":
        dims = mm1.DECODERS[dense]
        mm1.set_decoder(c, dims, num_experts=experts, moe_every=every, expert_mlp=dims["mlp"] // 2)
    return apply_hardware(c, hardware or default_hw)


# ---------------------------------------------------------------- parameter counts

def _is_expert_weight(variable) -> bool:
    return "expert" in (variable.get_metadata().get("logical_axes") or ())


def param_counts(config, component: str | None = None) -> dict[str, int]:
    """{"total", "active"} parameters of the model in `config` (or of one
    top-level component: "vit", "connector", "decoder"), from abstract
    params. Expert weights count `top_k / num_experts` of their size toward
    `active`: the parameters one token passes through."""
    from mmjax.train.state import abstract_model

    _, params = abstract_model(config.model)
    if component is not None:
        params = params[component]
    moe = config.model.decoder.moe
    total = active = 0
    for leaf in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        size = math.prod(leaf.shape)
        total += size
        active += size * moe.top_k // moe.num_experts if _is_expert_weight(leaf) else size
    return {"total": total, "active": active}


def decoder_param_counts(dec) -> dict[str, int]:
    """{"total", "active"} decoder parameters from `config.model.decoder`'s
    dims (the same numbers `param_counts(config, "decoder")` gives)."""
    from mmjax.models.decoder import is_moe_layer

    m, hd = dec.embed, dec.head_dim
    attention = m * hd * (2 * dec.heads + 2 * dec.kv_heads)
    if dec.get("qk_norm"):
        attention += 2 * hd
    total = active = (1 if dec.tie_embeddings else 2) * dec.vocab_size * m + m  # tables, final norm
    for i in range(dec.layers):
        layer = attention + 2 * m  # + two RMSNorms
        if is_moe_layer(dec, i):
            moe = dec.moe
            expert = 3 * m * moe.expert_mlp
            shared = expert if moe.shared_expert else 0
            total += layer + m * moe.num_experts + moe.num_experts * expert + shared
            active += layer + m * moe.num_experts + moe.top_k * expert + shared
        else:
            total += layer + 3 * m * dec.mlp
            active += layer + 3 * m * dec.mlp
    return {"total": total, "active": active}
