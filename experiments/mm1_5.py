"""MM1.5: the MM1 family with dynamic image splitting and a text-heavier mix.

  python -m mmjax.train --config experiments/mm1_5.py:3b --workdir DIR
  python -m mmjax.train --config experiments/mm1_5.py:1b-moe,tpu-v5p-512 --workdir DIR

Argument: `SIZE[,HARDWARE]`, SIZE one of `1b`, `3b`, `7b`, `30b`, `1b-moe`,
`3b-moe` (64 experts on every 2nd layer) or `smoke-3b`. Everything not listed
here is `experiments/mm1.py`'s recipe for the same decoder (ViT-H/14 at 378,
C-Abstractor with 144 tokens per image, sequences of 4096, batch 512,
bf16, MM1's LR rule and schedule).

- Dynamic splitting, `data.image_split=(4, 9)`: each image becomes the
  `n_h x n_w` grid of 378x378 tiles (4 <= n_h * n_w <= 9) that wastes the
  least canvas, followed by an overview tile (the whole image at 378x378), so
  one image takes 5 to 10 image slots of 144 tokens (720 to 1440 tokens).
- `data.tile_separators=True`: a `(row,col)` text marker before each tile.
- `data.max_images=20`: room for two fully split images (2 x 10 tiles =
  2880 image tokens of the 4096); a further image in the same sequence is
  dropped with its text kept (`data/dropped_images`). ViT work per sequence is
  up to 20/16 of MM1's.
- Mix caption : interleaved : text = 50 : 10 : 40 (`data.mix_weights`).

Default hardware as in `experiments/mm1.py` (1b/3b on tpu-v5p-128, 7b on
tpu-v5p-256, 30b and the MoE sizes on tpu-v5p-512). The extra tiles cost
little: 3b on tpu-v5p-128 compiles to 56.7 GiB per chip (MM1: 52.1).
"""

from __future__ import annotations

from experiments import mm1
from mmjax.hardware import apply_hardware

MIN_TILES, MAX_TILES = 4, 9
SLOTS_PER_IMAGE = MAX_TILES + 1  # tiles + the overview image

# name -> (mm1 dense decoder, num_experts, moe_every)
SIZES = {
    "1b": ("1b", 0, 2),
    "3b": ("3b", 0, 2),
    "7b": ("7b", 0, 2),
    "30b": ("30b", 0, 2),
    "1b-moe": ("1b", 64, 2),
    "3b-moe": ("3b", 64, 2),
    "smoke-3b": ("smoke-3b", 0, 2),
}

DEFAULT_HARDWARE = {
    "1b": "tpu-v5p-128",
    "3b": "tpu-v5p-128",
    "7b": "tpu-v5p-256",
    "30b": "tpu-v5p-512",
    "1b-moe": "tpu-v5p-512",
    "3b-moe": "tpu-v5p-512",
    "smoke-3b": "cpu-8",
}


def get_config(arg=None):
    name, hardware = mm1.parse_arg(arg, "3b", tuple(SIZES), "experiments/mm1_5.py")
    base, experts, every = SIZES[name]
    c = mm1.build(base)
    if experts:
        mm1.set_decoder(c, mm1.DECODERS[base], num_experts=experts, moe_every=every)
    c.data.image_split = (MIN_TILES, MAX_TILES)
    c.data.tile_separators = True
    c.data.mix_weights = (50.0, 10.0, 40.0)  # caption : interleaved : text
    c.data.max_images = 2 * SLOTS_PER_IMAGE  # two fully split images per sequence
    return apply_hardware(c, hardware or DEFAULT_HARDWARE[name])
