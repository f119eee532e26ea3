"""CLIP pre-training of a ViT-H/14 image encoder at pod scale: the dual
encoder (`mmjax.models.dual_encoder`) with CLIP's softmax loss over a
global batch of 32,768 image-text pairs on a TPU v5p slice.

  python -m mmjax.bench.aot --config experiments/clip_pods.py:vit_h14
  python -m mmjax.bench.aot --config experiments/clip_pods.py:vit_h14,tpu-v5p-512 --config.data.global_batch=65536
  python -m mmjax.train --config experiments/clip_pods.py:vit_h14 --workdir gs://BUCKET/clip-h14
  python -m mmjax.train --config experiments/clip_pods.py:smoke --workdir /tmp/clip-pods-smoke

Argument: `NAME[,HARDWARE]`. NAME is `vit_h14` or `smoke` (the same
family shrunk to run on 8 simulated CPU devices); HARDWARE a preset of
`mmjax/hardware.py` (default `DEFAULT_HARDWARE[NAME]`: tpu-v5p-256, i.e.
128 v5p chips, for vit_h14).

Model, after OpenCLIP's `ViT-H-14` (open_clip/model_configs/ViT-H-14.json:
embed_dim 1024; vision width 1280, 32 layers, head_width 80, patch 14,
image 224; text width 1024, 24 layers, 16 heads, context 77, vocab 49408,
mlp_ratio 4):

  image tower  ViT-H/14 CLIP flavour at 224 px (`vit.variant_config("H/14")`:
               embed 1280, depth 32, 16 heads, mlp 5120, patch 14; 256
               patches + the class token), pooled by its class token
  text tower   24 decoder layers (`models/text_encoder.py`: RMSNorm, RoPE,
               SwiGLU), width 1024, 16 heads of 64, causal, pooled at the
               last text token (CLIP's <eos>), vocabulary 49408, 77 tokens.
               SwiGLU's MLP has three matrices where OpenCLIP's GELU MLP has
               two, so its width is 2816 (2/3 of mlp_ratio 4's 4096, rounded
               up to a multiple of 256): 308M parameters in its layers
               against OpenCLIP's 302M (359M with the token embedding)
  joint space  1024, CLIP loss (learned temperature from 1/0.07, capped at 100)

Recipe (CLIP, Radford et al. 2021, appendix F, tables 19-20: batch 32,768,
weight decay 0.2, 2000 warm-up iterations, Adam beta2 0.98 and eps 1e-6 for
ViTs, ViT-L/14's learning rate 4e-4, cosine decay, 32 epochs of 400M pairs
= 390,625 steps of 32,768); bf16 compute with float32 master weights. Data:
the procedural captions here; point the caption stream at real pairs with
`--config.data.sources.caption='webdataset:/data/pairs/{00000..09999}.tar'`.

Hardware (v5p, 95 GiB per chip): 32,768 pairs on tpu-v5p-256 are 256 pairs
per chip, fully sharded (fsdp=128), both towers scanned and rematerialised
layer by layer ("full", the TPU presets' policy); attention through XLA in
both towers (257 and 77 tokens; see `get_config` for the text). Ahead-of-time
compiles for v5p:4x4x8 (`python -m mmjax.bench.aot --config
experiments/clip_pods.py:vit_h14`, jax 0.12.0.1 / libtpu 0.0.52, 2-13 minutes
on the 2 host CPU cores, idle or shared), per chip:

  pairs   per chip  remat (both towers)  peak GiB  ESTIMATE step  estimated MFU
  32768      256    full (default)         12.7       808 ms          79.2 %
  32768      256    dots_no_batch          58.2       835 ms          76.6 %
  65536      512    full                   24.9      1597 ms          80.1 %

(`--config.model.vit.remat=... --config.model.decoder.remat=...`,
`--config.data.global_batch=65536`.) The model FLOPs are 2.94e14 per chip
and step at 32k (`train.flops_dual`: 0.33 TFLOP per image and 0.05 per
text forward; the `[B, B]` similarity 0.02 %). The estimate is the larger of
compute and HBM time plus collectives at published rates
(`mmjax/bench/estimate.py`), not a measurement: with whole-layer remat it is
compute-bound (787 ms of 808 at 32k, the recompute a fifth of the executed
FLOPs); `dots_no_batch` recomputes almost nothing (647 ms of compute) but
its HBM estimate (814 ms, bytes accessed scaled by the scanned loops' trip
counts) makes it memory-bound and no faster. Collectives: 11.8 GiB
received per chip per step (XLA runs the scanned stacks' FSDP weight
gathers as all-reduces; the FSDP minimum is 7.5 GiB), 21 ms at ICI rates.
"""

from __future__ import annotations

import ml_collections as mlc

from experiments.mm1 import add_hardware_fields, parse_arg, set_vit
from mmjax.config_base import base_config
from mmjax.hardware import apply_hardware

# OpenCLIP ViT-H-14 text tower (open_clip/model_configs/ViT-H-14.json)
TEXT_VOCAB = 49_408
TEXT_CONTEXT = 77
TEXT = dict(embed=1024, layers=24, heads=16, kv_heads=16, head_dim=64, mlp=2816)
JOINT_EMBED = 1024

DEFAULT_HARDWARE = {"vit_h14": "tpu-v5p-256", "smoke": "cpu-8"}
NAMES = tuple(DEFAULT_HARDWARE)


def clip_recipe(config) -> None:
    """CLIP's batch, optimizer and schedule (module doc), in place."""
    config.model.name = "dual_encoder"
    config.model.dtype = "bfloat16"
    config.model.contrastive.update(loss="clip", embed=JOINT_EMBED, image_pool="token", text_pool="last",
                                    text_causal=True)
    config.data.global_batch = 32_768
    config.data.max_images = 0  # packed sequences' image slots; a pair batch holds one image per row
    config.data.sources = dict(caption="procedural", interleaved="procedural", text="procedural")
    config.optimizer.update(lr=4e-4, warmup_steps=2000, min_lr_ratio=0.0, b1=0.9, b2=0.98, eps=1e-6,
                            weight_decay=0.2, grad_clip=1.0)
    config.train.steps = 390_625
    config.train.log_every = 50
    config.train.checkpoint_every = 2000
    config.train.keep_checkpoints = 3
    config.train.watchdog_s = 1800.0
    config.eval = dict(caption_accuracy=False)  # scores a generative model; the train metrics carry retrieval


def build(name: str) -> mlc.ConfigDict:
    """The config `name` before a hardware preset is applied."""
    c = base_config()
    add_hardware_fields(c)
    clip_recipe(c)
    dec = c.model.decoder
    if name == "smoke":
        set_vit(c, "tiny/4", "clip", 32, embed=64, depth=2, heads=4, mlp=256)
        dec.update(embed=64, layers=2, heads=4, kv_heads=4, head_dim=16, mlp=256)
        c.data.vocab_size = 1024  # linked: model.decoder.vocab_size
        c.data.seq_len = 32
        c.data.global_batch = 64
        c.model.contrastive.embed = 64
        c.optimizer.warmup_steps = 2
        c.train.update(steps=20, log_every=5, checkpoint_every=10, keep_checkpoints=2, watchdog_s=600.0)
        return c
    # Scanned stacks: the compile time does not grow with depth.
    set_vit(c, "H/14", "clip", 224, scan=True)
    dec.update(scan=True, **TEXT)
    c.data.vocab_size = TEXT_VOCAB  # linked: model.decoder.vocab_size
    c.data.seq_len = TEXT_CONTEXT
    return c


def get_config(arg=None):
    name, hardware = parse_arg(arg, "vit_h14", NAMES, "experiments/clip_pods.py")
    c = build(name)
    apply_hardware(c, hardware or DEFAULT_HARDWARE[name])
    # 77-token texts: XLA's attention computes 77^2 (query, key) pairs; the
    # TPU presets' splash kernel would pad them to 128^2 and head_dim 64 to
    # 128 lanes (11x the useful work, `train.flops`). Kept over a later
    # `--config.hardware=NAME` (`resolve_hardware` keeps changed fields).
    c.model.decoder.attention = "xla"
    return c
