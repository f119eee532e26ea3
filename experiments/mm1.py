"""MM1 pre-training at full scale: ViT-H/14 (CLIP flavour) at 378x378 ->
C-Abstractor (144 tokens per image) -> dense or MoE decoder.

  python -m mmjax.train --config experiments/mm1.py:3b --workdir gs-mounted/run
  python -m mmjax.train --config experiments/mm1.py:30b,tpu-v5p-1024 --workdir DIR
  python -m mmjax.train --config experiments/mm1.py:smoke-3b --workdir /tmp/mm1-smoke

Argument: `SIZE[,HARDWARE]`. SIZE is one of `1b`, `3b`, `7b`, `30b` (dense),
`3b-moe`, `7b-moe`, or `smoke-3b` / `smoke-3b-moe` (the same family shrunk
to run on 8 simulated CPU devices in seconds). HARDWARE is a preset from
`mmjax/hardware.py`; without it each size gets `DEFAULT_HARDWARE`.

Recipe (every size): sequences of 4096 tokens with up to 16 images, global
batch 512, 200k steps; caption : interleaved : text mixed 5:5:1 (45/45/10);
AdamW with linear warmup over 2k steps then cosine decay to 10% of the peak;
peak LR from the decoder size (`optimizer.lr_rule="mm1"`:
exp(-0.4214 ln N - 0.5535), N = decoder parameters without the vocabulary
tables) and decoupled weight decay 0.1 x peak LR
(`optimizer.weight_decay_rule="mm1"`); bf16 compute with float32 master
weights.

Decoders (untied input/output embeddings, vocabulary 100352 = 49 x 2048,
RMSNorm, RoPE, grouped-query attention, SwiGLU; parameter counts include both
vocabulary tables):

  size  embed layers heads kv_heads head_dim   mlp   decoder params
  1b     2048    16    16      8      128     5632    1,166,084,096
  3b     2560    32    20      4      128     6912    2,715,978,240
  7b     4096    32    32      8      128    11008    6,493,048,832
  30b    7168    52    56      8      128    20480   30,447,205,376

MoE decoders replace the MLP of every `moe_every`-th layer with `num_experts`
SwiGLU experts of the dense MLP's width, top-2 routing (renormalised), capacity
factor 2.0, load-balance loss 0.01, router z-loss 0.001:

  3b-moe   64 experts on every 2nd layer (16 of 32)   56,227,432,960 total, 3,567,946,240 active
  7b-moe   32 experts on every 4th layer  (8 of 32)   40,040,140,800 total, 7,576,227,840 active

(decoder parameters; active: each token passes 2 of the experts). The
whole models (ViT-H, C-Abstractor and decoder;
`mmjax.train.param_counts.param_counts`) against the MM1 paper's totals:

  size     here             paper
  3b-moe   56,939,490,816   64B
  7b-moe   40,763,998,208   47B

The experts and their placement are the paper's (64 on every 2nd layer, 32
on every 4th, of 32 layers) and hold almost every parameter (16 x 64 x 53.1M
= 54.4B; 8 x 32 x 135.3M = 34.6B); MoE on every layer or every other would
double or halve that, not close an 11-13 % gap, and the vocabulary tables
(100,352 tokens, untied: 0.51B and 0.82B) are far too small to. The gap is
the decoder dims, which MM1 does not publish (the dims here are the usual
3B / 7B shapes): at 32 layers the paper's totals need experts 13 % and 18 %
wider (hidden 7,810 instead of 6,912; 12,990 instead of 11,008).

Peak LR of the MoE sizes: MM1 trains them with the dense backbone's
hyper-parameters, so `optimizer.lr_moe_count="dense"` (the default) sizes
the MM1 rule by the dense twin's decoder: 3b-moe gets the 3b's 6.65e-5 and
7b-moe the 7b's 4.46e-5 ("total", counting every expert: 1.70e-5 and
1.97e-5; "active", 2 experts per token: 5.79e-5 and 4.14e-5).

The encoder side is the same for every size: ViT-H/14 at 378 (729 patches + a
class token) 631,371,520 parameters, C-Abstractor (hidden 1024, 3 ResBlocks
per stage) 77.8M-130.2M depending on the decoder width. Dense decoders are
scanned (`decoder.scan=True`, compile time independent of depth); MoE
decoders alternate dense and MoE layers and are listed. The ViT and the
C-Abstractor's ResBlocks (`connector.scan=True`) are scanned too;
converted CLIP weights (`python -m mmjax.tools.convert_hf --kind clip`,
e.g. a DFN5B-CLIP ViT-H/14-378) hold listed layers, which
`config.init_from` stacks for it.

Data: every stream is `procedural` here. Point a stream at real shards with
`--config.data.sources.caption='webdataset:/data/caption/{00000..09999}.tar'`
(formats: webdataset, array_record, parquet, jsonl, tfds; see the README's
Data section); the procedural caption-accuracy eval is skipped then.

Default hardware and why it fits. Per-device memory of the compiled train
step (arguments + outputs + temporaries, from `compiled.memory_analysis()` of
an ahead-of-time compile against the preset's TPU topology), 95 GiB per v5p
chip. The 3b row was re-measured as configured (ViT scanned, the decoder's
attention through the splash kernel) with jax 0.12.0.1 / libtpu 0.0.52
(`python -m mmjax.bench.aot --config experiments/mm1.py:3b`); the others
are from jax 0.10.2 / libtpu 0.0.42.1, with the ViT scanned unless noted:

  size     preset        sequences/chip  GiB per chip
  1b       tpu-v5p-128         8             42.8
  3b       tpu-v5p-128         8             37.2   (37.8 with the ViT listed; 39.6 listed with
                                                        XLA attention; estimated MFU 74.7 %)
  7b       tpu-v5p-256         4             37.7
  30b      tpu-v5p-512         2             40.1   (71.8 on tpu-v5p-256: too close)
  3b-moe   tpu-v5p-512         2             50.7   (fsdp=32 x expert=8, ViT listed, dispatch
                                                        groups of 1024; 64.1 with one group per chip
                                                        and GSPMD's gathers of whole expert buffers)
  7b-moe   tpu-v5p-1024        1             40.3   (fsdp=64 x expert=8; 80.6 on tpu-v5p-512; both
                                                        measured before the all-to-all dispatch)

Weights and Adam moments are a few GiB per chip at most (fully sharded over
fsdp, experts over fsdp x expert); the rest is activations, which grow with
the sequences per chip: whole-layer remat keeps one bf16 residual per layer,
and the layer being recomputed holds float32 attention scores
(`heads x 4096^2` per sequence) and, at the end, float32 logits over 100352
tokens (1.6 GB per sequence): roughly 5.4 (1b), 6.2 (3b), 9.4 (7b) and 16
(30b) GiB per sequence per chip. The MoE configs also hold the capacity
dispatch's one-hot `[groups, group_size, experts, capacity]` masks, which grow
with the tokens per chip times the group size (`moe.group_size` = 1024 here;
one group per chip would make them grow with the square of the tokens per
chip). `dispatch=dropless` is no lighter: its expert-parallel all-gather of
tokens took 7b-moe on tpu-v5p-512 to 96.0 GiB.

Other presets: pick `--config.train.grad_accum_steps=K` so that
global_batch / (K x devices) sequences per device fit the per-sequence costs
above (e.g. tpu-v5e-256 has 16 GiB per chip and 2 sequences per chip without
accumulation: 3b wants K=2).
"""

from __future__ import annotations

import ml_collections as mlc

from mmjax.hardware import HARDWARE, apply_hardware
from mmjax.config_base import base_config
from mmjax.eval.task_settings import caption_task, vqa_task
from mmjax.models.vit import variant_config

VOCAB = 100_352  # 49 x 2048: divides evenly for any power-of-two split up to 2048

# name -> decoder dims
DECODERS = {
    "1b": dict(embed=2048, layers=16, heads=16, kv_heads=8, head_dim=128, mlp=5632),
    "3b": dict(embed=2560, layers=32, heads=20, kv_heads=4, head_dim=128, mlp=6912),
    "7b": dict(embed=4096, layers=32, heads=32, kv_heads=8, head_dim=128, mlp=11008),
    "30b": dict(embed=7168, layers=52, heads=56, kv_heads=8, head_dim=128, mlp=20480),
}

# name -> (dense decoder, num_experts, moe_every)
MOE = {
    "3b-moe": ("3b", 64, 2),
    "7b-moe": ("7b", 32, 4),
}

DEFAULT_HARDWARE = {
    "1b": "tpu-v5p-128",
    "3b": "tpu-v5p-128",
    "7b": "tpu-v5p-256",
    "30b": "tpu-v5p-512",
    "3b-moe": "tpu-v5p-512",
    "7b-moe": "tpu-v5p-1024",
    "smoke-3b": "cpu-8",
    "smoke-3b-moe": "cpu-8",
}

SIZES = tuple(DEFAULT_HARDWARE)


def set_vit(config, variant: str, flavour: str, image_size: int, **overrides) -> None:
    """Fills `config.model.vit` from the ViT variant table in place, so the
    image size stays linked to `config.data.image_size`."""
    config.data.image_size = image_size  # linked: model.vit.image_size
    for key, value in variant_config(variant, flavour, image_size, **overrides).items():
        if key != "image_size":
            config.model.vit[key] = value


def set_decoder(config, dims: dict, num_experts: int = 0, moe_every: int = 2,
                expert_mlp: int | None = None) -> None:
    """Decoder dims in place; `num_experts > 0` turns every `moe_every`-th
    layer's MLP into experts of width `expert_mlp` (default: the dense MLP's)."""
    dec = config.model.decoder
    for key, value in dims.items():
        dec[key] = value
    moe = dec.moe
    moe.num_experts = num_experts
    moe.moe_every = moe_every
    moe.top_k = 2
    moe.renormalize = True
    moe.capacity_factor = 2.0
    # Dispatch groups of 1024 tokens (8 per device at 2 sequences per chip):
    # the one-hot dispatch/combine einsums cost O(group size) per token; with
    # one group per device they added a third to the 3B-MoE step's FLOPs.
    moe.group_size = 1024
    moe.dispatch = "capacity"
    # dispatch="dropless": each expert shard's receive buffer holds 1.25x its
    # fair share of rows (0 would size it for the worst case, 8x with 8 expert
    # shards, and the megablox kernels would be shaped by it).
    moe.dropless_buffer_factor = 1.25
    moe.expert_mlp = expert_mlp or dims["mlp"]
    moe.load_balance_weight = 0.01
    moe.router_z_weight = 0.001
    # A scanned stack needs identical layers; MoE on every n-th layer (n > 1) is not.
    dec.scan = num_experts == 0 or moe_every == 1


def mm1_recipe(config) -> None:
    """MM1's pre-training data shape, schedule and optimizer, in place."""
    config.model.dtype = "bfloat16"
    config.model.connector.kind = "c_abstractor"
    config.model.connector.hidden = 1024
    config.model.connector.depth = 3
    config.data.tokens_per_image = 144  # linked: model.connector.num_tokens (12 x 12)
    config.data.vocab_size = VOCAB  # linked: model.decoder.vocab_size
    config.data.seq_len = 4096
    config.data.max_images = 16
    config.data.global_batch = 512
    config.data.mix_weights = (5.0, 5.0, 1.0)  # caption : interleaved : text = 45 : 45 : 10
    config.data.pack_window = 32
    # Real data: "webdataset:/path/{00000..09999}.tar", "array_record:/path/*.array_record", ...
    config.data.sources = dict(caption="procedural", interleaved="procedural", text="procedural")
    config.optimizer.lr_rule = "mm1"
    config.optimizer.weight_decay_rule = "mm1"
    config.optimizer.warmup_steps = 2000
    config.optimizer.min_lr_ratio = 0.1
    config.optimizer.grad_clip = 1.0
    config.train.steps = 200_000
    config.train.log_every = 50
    config.train.checkpoint_every = 2000
    config.train.keep_checkpoints = 3
    config.train.watchdog_s = 1800.0  # first steps on a large slice include runtime warm-up
    mm1_eval_tasks(config)


# MM1's few-shot benchmarks (captioning: CIDEr; VQA: VQA accuracy), off until their files are given:
#   --config.eval.coco=True --config.evaluators.coco.annotations=/data/coco/captions_val2014.json
#   --config.evaluators.coco.images=/data/coco/val2014
CAPTION_TASKS = ("coco", "nocaps", "textcaps")
VQA_TASKS = ("vqav2", "textvqa", "vizwiz", "okvqa")


def mm1_eval_tasks(config) -> None:
    """The task blocks (0/4/8-shot, MM1's prompt layouts), switched off."""
    for name in CAPTION_TASKS:
        config.evaluators[name] = caption_task()
        config.eval[name] = False
    for name in VQA_TASKS:
        config.evaluators[name] = vqa_task()
        config.eval[name] = False


def add_hardware_fields(config) -> None:
    """The fields `mmjax/hardware.py` records (so `--config.hardware=...` parses)."""
    with config.unlocked():
        for key in ("hardware", "topology", "hardware_applied"):
            if key not in config:
                config[key] = ""


def parse_arg(arg: str | None, default: str, known, file: str) -> tuple[str, str | None]:
    """`NAME[,HARDWARE]` -> (name, hardware or None), with one-sentence errors."""
    parts = [p.strip() for p in (arg or default).split(",")]
    if len(parts) > 2 or not parts[0]:
        raise ValueError(f"{file} takes NAME[,HARDWARE], got {arg!r}.")
    name, hardware = parts[0], (parts[1] if len(parts) == 2 and parts[1] else None)
    if name not in known:
        raise ValueError(f"{file}: {name!r} is unknown; choose one of {list(known)}.")
    if hardware is not None and hardware not in HARDWARE:
        raise ValueError(f"{file}: hardware {hardware!r} is unknown; choose one of {sorted(HARDWARE)}.")
    return name, hardware


def _smoke(config, moe: bool) -> None:
    """The family at toy scale: CLIP-flavour ViT with 14-pixel patches on
    56x56 images, C-Abstractor to 2x2 tokens, a 4-layer GQA decoder."""
    set_vit(config, "tiny/4", "clip", 56, patch_size=14, embed=64, depth=2, heads=4, mlp=256)
    config.model.connector.hidden = 64
    config.model.connector.depth = 1
    config.data.tokens_per_image = 4
    config.data.vocab_size = 1024
    set_decoder(config, dict(embed=128, layers=4, heads=4, kv_heads=2, head_dim=32, mlp=384),
                num_experts=8 if moe else 0, moe_every=2)
    config.data.seq_len = 256
    config.data.max_images = 4
    config.data.global_batch = 8
    config.data.pack_window = 8
    config.optimizer.warmup_steps = 2
    config.train.steps = 20
    config.train.log_every = 5
    config.train.checkpoint_every = 10
    config.train.keep_checkpoints = 2
    config.train.watchdog_s = 600.0
    config.evaluators.caption_accuracy.num_examples = 16


def build(name: str) -> mlc.ConfigDict:
    """The config of size `name` (before a hardware preset is applied)."""
    c = base_config()
    add_hardware_fields(c)
    mm1_recipe(c)
    if name.startswith("smoke-"):
        _smoke(c, moe=name.endswith("-moe"))
        return c
    # 27 x 27 = 729 patches; scanned: on mm1-3b's v5p preset the listed ViT's
    # program had 1017 MiB of code against 181 MiB scanned, and 37.8 GiB peak
    # against 37.2 (init_from stacks converted CLIP layers for it).
    set_vit(c, "H/14", "clip", 378, scan=True)
    # The C-Abstractor's 3 ResBlocks per stage scanned too: on a proxy of
    # mm1-3b (4 ViT and 4 decoder layers, v5p:2x2x2, batch 16) 113 MiB of code
    # against 165 listed, 8.79 GiB peak against 9.00, compiled in 128 s against 162.
    c.model.connector.scan = True
    if name in MOE:
        dense, experts, every = MOE[name]
        set_decoder(c, DECODERS[dense], num_experts=experts, moe_every=every)
    else:
        set_decoder(c, DECODERS[name])
    return c


def get_config(arg=None):
    name, hardware = parse_arg(arg, "3b", SIZES, "experiments/mm1.py")
    c = build(name)
    apply_hardware(c, hardware or DEFAULT_HARDWARE[name])
    return c
