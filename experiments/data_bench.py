"""Input-pipeline throughput benchmark at the MM1 data shape.

  python -m mmjax.bench.data --config experiments/data_bench.py --workdir /tmp/bench-data

Sequences of 4096 positions with up to 16 images of 378x378 pixels, 144 image
tokens per image (the linked `model.vit.image_size` / `model.connector.num_tokens`
follow), caption : interleaved : text mixed 5:5:1 and packed. The sources are
WebDataset shards that the benchmark generates (deterministically) under
`<workdir>/shards` unless `bench.data_dir` names a directory of them.

`bench` fields:
  num_shards           tar shards per stream
  records_per_shard    samples per shard
  source_image_size    (height, width) of the generated JPEGs
  jpeg_quality         their JPEG quality
  interleaved_images   (min, max) images per interleaved document
  warmup_batches       batches read (and not timed) by each pipeline before
                       anything is timed; this covers worker start-up
  measure_seconds      timed seconds per mode (bare, in-process, workers)
  rounds               the timed seconds are split into this many rounds that
                       visit the modes in turn, so load from other processes
                       on the machine hits all modes alike
  batch_size           packed sequences per batch (one process)
  data_dir             "" generates shards under <workdir>/shards; otherwise a
                       directory holding caption-*.tar, interleaved-*.tar and
                       text-*.tar (generated there when it holds none)

`--config experiments/data_bench.py:smoke` shrinks everything for tests.
"""

import ml_collections as mlc

from mmjax.config_base import base_config


def get_config(arg=None):
    c = base_config()
    c.model.vit.patch_size = 14  # 378 / 14 = 27 patches a side (MM1's ViT)
    c.data.seq_len = 4096
    c.data.max_images = 16
    c.data.image_size = 378  # linked: model.vit.image_size
    c.data.tokens_per_image = 144  # linked: model.connector.num_tokens
    c.data.mix_weights = (5.0, 5.0, 1.0)
    c.data.workers = 1
    c.bench = mlc.ConfigDict(dict(
        num_shards=4,
        records_per_shard=64,
        source_image_size=(480, 640),
        jpeg_quality=90,
        interleaved_images=(2, 6),
        warmup_batches=4,
        measure_seconds=20.0,
        rounds=4,
        batch_size=2,
        data_dir="",
    ))
    if arg == "smoke":
        c.model.vit.patch_size = 8  # 96 / 8 = 12
        c.data.seq_len = 1024
        c.data.max_images = 4
        c.data.image_size = 96
        c.data.tokens_per_image = 16
        c.data.pack_window = 16
        c.data.workers = 1
        c.bench.num_shards = 2
        c.bench.records_per_shard = 8
        c.bench.source_image_size = (128, 160)
        c.bench.warmup_batches = 1
        c.bench.measure_seconds = 2.0
        c.bench.rounds = 2
    elif arg not in (None, ""):
        raise ValueError(f"experiments/data_bench.py takes no argument or 'smoke', got {arg!r}.")
    return c
