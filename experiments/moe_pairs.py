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

`param_counts(config)` (total and active parameters from the abstract model)
and `decoder_param_counts(config.model.decoder)` (the decoder's, from its
dims) come from `mmjax.train.param_counts`.
"""

from __future__ import annotations

from experiments import mm1
from mmjax.hardware import apply_hardware

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
