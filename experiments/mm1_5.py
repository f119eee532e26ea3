"""MM1.5: the MM1 family with dynamic image splitting, a text-heavier mix,
and its three training stages.

  python -m mmjax.train --config experiments/mm1_5.py:3b --workdir PT
  python -m mmjax.train --config experiments/mm1_5.py:3b-cpt --workdir CPT --config.init_from=PT
  python -m mmjax.train --config experiments/mm1_5.py:3b-sft --workdir SFT --config.init_from=CPT
  python -m mmjax.train --config experiments/mm1_5.py:1b-moe-sft,tpu-v5p-512 --workdir DIR

Argument: `SIZE[-STAGE][,HARDWARE]`, SIZE one of `1b`, `3b`, `7b`, `30b`,
`1b-moe`, `3b-moe` (64 experts on every 2nd layer) or `smoke-3b`; STAGE
`cpt` or `sft` (none: pre-training). Everything not listed here is
`experiments/mm1.py`'s recipe for the same decoder (ViT-H/14 at 378,
C-Abstractor with 144 tokens per image, sequences of 4096, batch 512,
bf16, MM1's LR rule and schedule). Each stage starts from the previous
stage's workdir (`config.init_from=WORKDIR`: its newest checkpoint's model,
fresh optimizer and data position; `mmjax/train/init_from.py`).

Pre-training (no stage):
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

`cpt`, continual pre-training on high-resolution text-rich image-text pairs
(OCR documents, synthetic dense captions): the caption stream alone
(`data.mix_weights=(1, 0, 0)`; point `data.sources.caption` at the data),
the same splitting, every module trained, MM1's LR rule with a short warm-up,
`CPT_STEPS` steps.

`sft`, supervised fine-tuning on an instruction mixture of conversations
(`mmjax/data/chat.py`: loss on the assistant turns only). The categories are
the streams: single-image conversations on `caption`, multi-image on
`interleaved`, text-only on `text`; `data.mix_weights` is their ratio,
`SFT_MIX` = 80 : 10 : 10. The defaults read the embedded procedural
conversations (`procedural:sft`); real data: `data.sources.caption=
"json:/data/sft/single/*.json"` and likewise. Every module is trained
(`optimizer.module_lr_scale` freezes or scales one, e.g. `"vit=0.1"`), at a
fixed peak LR of `SFT_LR` with cosine decay over `SFT_STEPS` steps.

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


STAGES = ("cpt", "sft")
NAMES = tuple(SIZES) + tuple(f"{size}-{stage}" for size in SIZES for stage in STAGES)
CPT_STEPS = 30_000
SFT_MIX = (80.0, 10.0, 10.0)  # single-image : multi-image : text-only conversations
SFT_LR = 2e-5
SFT_STEPS = 10_000


def continual_pretraining(c) -> None:
    """The `cpt` stage in place (module doc)."""
    c.data.mix_weights = (1.0, 0.0, 0.0)
    c.optimizer.warmup_steps = 500
    c.train.steps = CPT_STEPS


def supervised_finetuning(c) -> None:
    """The `sft` stage in place (module doc)."""
    c.data.mix_weights = SFT_MIX
    c.data.sources = dict(caption="procedural:sft", interleaved="procedural:sft", text="procedural:sft")
    c.optimizer.lr_rule = "fixed"
    c.optimizer.lr = SFT_LR
    c.optimizer.warmup_steps = 200
    c.optimizer.module_lr_scale = ""
    c.train.steps = SFT_STEPS


def get_config(arg=None):
    name, hardware = mm1.parse_arg(arg, "3b", NAMES, "experiments/mm1_5.py")
    stage = next((s for s in STAGES if name.endswith(f"-{s}")), "")
    name = name[:-len(stage) - 1] if stage else name
    base, experts, every = SIZES[name]
    c = mm1.build(base)
    if experts:
        mm1.set_decoder(c, mm1.DECODERS[base], num_experts=experts, moe_every=every)
    c.data.image_split = (MIN_TILES, MAX_TILES)
    c.data.tile_separators = True
    c.data.mix_weights = (50.0, 10.0, 40.0)  # caption : interleaved : text
    c.data.max_images = 2 * SLOTS_PER_IMAGE  # two fully split images per sequence
    if stage == "cpt":
        continual_pretraining(c)
    elif stage == "sft":
        supervised_finetuning(c)
    return apply_hardware(c, hardware or DEFAULT_HARDWARE[name])
