"""MM1's vision-language connector ablation: connector kind x image tokens x
image resolution, 3 x 2 x 2 = 12 runs on one encoder and one small decoder.

  python -m mmjax.train --config experiments/connector_ablation.py:c_abstractor-144-336 --workdir DIR
  python -m mmjax.train --config experiments/connector_ablation.py:avg_pool-64-224,tpu-v5p-128 ...

Argument: `KIND-TOKENS-IMAGE[,HARDWARE]` with KIND in `avg_pool`,
`attention_pool`, `c_abstractor`; TOKENS in 64 (8x8), 144 (12x12); IMAGE in
224 (16x16 patches), 336 (24x24 patches). `sweep()` returns the 12 runs as
override dicts (dotted config path -> value) for one base config
(`get_config()` is `c_abstractor-144-336`); `to_flags(overrides)` turns one
into `--config.PATH=VALUE` flags, `apply_overrides(config, overrides)` applies
one in Python.

Fixed for every run: a CLIP-flavour ViT-L/14 (303M parameters at 336), the
`1b` decoder of `experiments/mm1.py` (2048 wide, 16 layers, 1.17B
parameters), MM1's data shape and recipe (sequences of 4096 with up to 16
images, batch 512, mix 5:5:1, bf16, `lr_rule="mm1"`) and 50k steps
(a budget choice for an ablation, not MM1's 200k). Attention pooling uses 16
heads (64 per head on the 1024-wide ViT). Default hardware: tpu-v5p-128 (8
sequences per chip, as `experiments/mm1.py:1b`).
"""

from __future__ import annotations

import itertools

from experiments import mm1
from mmjax.hardware import apply_hardware

KINDS = ("avg_pool", "attention_pool", "c_abstractor")
TOKENS = (64, 144)
IMAGE_SIZES = (224, 336)
DEFAULT = "c_abstractor-144-336"
DEFAULT_HARDWARE = "tpu-v5p-128"
NAMES = tuple(f"{k}-{t}-{s}" for k, t, s in itertools.product(KINDS, TOKENS, IMAGE_SIZES))


def sweep() -> list[dict]:
    """The 12 runs as overrides of `get_config()`, in `NAMES` order."""
    return [{"model.connector.kind": k, "data.tokens_per_image": t, "data.image_size": s}
            for k, t, s in itertools.product(KINDS, TOKENS, IMAGE_SIZES)]


def apply_overrides(config, overrides: dict):
    """Sets each dotted path (in place; linked fields follow). Returns the config."""
    for path, value in overrides.items():
        *parents, leaf = path.split(".")
        node = config
        for key in parents:
            node = node[key]
        node[leaf] = value
    return config


def to_flags(overrides: dict) -> list[str]:
    """`--config.PATH=VALUE` command-line flags for one run of `sweep()`."""
    return [f"--config.{path}={value}" for path, value in overrides.items()]


def get_config(arg=None):
    name, hardware = mm1.parse_arg(arg, DEFAULT, NAMES, "experiments/connector_ablation.py")
    kind, tokens, image_size = name.split("-")[0], *map(int, name.split("-")[1:])
    c = mm1.build("1b")
    mm1.set_vit(c, "L/14", "clip", int(image_size))
    c.model.connector.kind = kind
    c.model.connector.heads = 16  # attention_pool: 1024 / 16 = 64 per head
    c.data.tokens_per_image = int(tokens)  # linked: model.connector.num_tokens
    c.train.steps = 50_000
    return apply_hardware(c, hardware or DEFAULT_HARDWARE)
