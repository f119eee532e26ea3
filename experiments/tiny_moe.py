"""The tiny default with a Mixture-of-Experts decoder: 8 experts, top-2, on
every 2nd layer, experts sharded over the expert mesh axis. Each expert's
hidden size is half the dense MLP's, so the active parameters per token match
`experiments/tiny.py`.

  python -m mmjax.train --config experiments/tiny_moe.py --workdir /tmp/mmjax-tiny-moe
  --config experiments/tiny_moe.py:dropless   (sort + ragged_dot dispatch)
"""

from experiments.tiny import get_config as tiny_config


def get_config(arg=None):
    args = set((arg or "").split(",")) - {""}
    unknown = args - {"smoke", "dropless"}
    if unknown:
        raise ValueError(f"experiments/tiny_moe.py takes 'smoke' and/or 'dropless', got {sorted(unknown)}.")
    c = tiny_config("smoke" if "smoke" in args else None)
    moe = c.model.decoder.moe
    moe.num_experts = 8
    moe.top_k = 2
    moe.moe_every = 2
    moe.expert_mlp = c.model.decoder.mlp // moe.top_k
    moe.capacity_factor = 2.0
    moe.group_size = 64  # 4 dispatch groups per device: cheaper one-hot einsums than one of 256
    moe.dispatch = "dropless" if "dropless" in args else "capacity"
    moe.dropless_buffer_factor = 1.25  # as the MM1 MoE configs: expert shards hold 1.25x their fair share
    return c
