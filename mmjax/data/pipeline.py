"""Grain pipeline: sources -> examples -> weighted mix -> packing -> batches ->
global `jax.Array`s.

  per stream:  open_stream (per-process shard, endless; file sources shuffled
               by seed, procedural streams not: they are random per index)
               -> ExampleBuilder (decode + resize images, tokenize, masks)
  mix:         IterDataset.mix in proportion to `data.mix_weights` (5:5:1
               caption : interleaved : text by default), deterministic by index
  pack:        PackIterDataset (first-fit-decreasing per `data.pack_window`)
  batch:       `batch_size` packed sequences per process
  workers:     `data.workers > 0` runs all of the above in Grain worker
               processes (`mp_prefetch`); the iterator state stays checkpointable.
"""

from __future__ import annotations

from typing import Mapping

import grain
import jax
import numpy as np
from absl import flags
from jax.sharding import NamedSharding

from mmjax.data.examples import ExampleBuilder
from mmjax.data.packing import Packer, PackIterDataset
from mmjax.data.procedural import tokenizer_corpus
from mmjax.data.records import STREAMS, DataError
from mmjax.data.sources import open_stream
from mmjax.data.tokenizer import Tokenizer, load_or_train


def default_tokenizer(data_cfg) -> Tokenizer:
    """The tokenizer for the embedded default data (trained once, then cached)."""
    return load_or_train(tokenizer_corpus(), data_cfg.vocab_size)


def make_builder(data_cfg, tokenizer: Tokenizer, with_attributes: bool = False) -> ExampleBuilder:
    return ExampleBuilder(tokenizer, data_cfg.seq_len, data_cfg.max_images, data_cfg.tokens_per_image,
                          data_cfg.image_size, with_attributes=with_attributes,
                          loss_weights=tuple(data_cfg.loss_weights), image_split=tuple(data_cfg.image_split),
                          tile_separators=data_cfg.tile_separators,
                          system_prompt=data_cfg.get("system_prompt", ""),
                          video_frames=data_cfg.get("video_frames", 8), video_fps=data_cfg.get("video_fps", 1.0),
                          **region_settings(data_cfg))


def region_settings(data_cfg) -> dict:
    """`max_regions` and `region_grid` from `config.data` (0: no region fields)."""
    return {"max_regions": data_cfg.get("max_regions", 0), "region_grid": data_cfg.get("region_grid", 0)}


def mixed_examples(data_cfg, tokenizer: Tokenizer, *, split: str = "train", process_index: int = 0,
                   process_count: int = 1, streams: tuple[str, ...] | None = None,
                   with_attributes: bool = False) -> grain.IterDataset:
    """Examples (unpacked, variable length) of the chosen streams, mixed by weight."""
    weights = dict(zip(STREAMS, data_cfg.mix_weights))
    chosen = [s for s in STREAMS if (streams is None or s in streams) and weights[s] > 0]
    if not chosen:
        raise DataError(f"config.data.mix_weights={tuple(data_cfg.mix_weights)} selects no stream.")
    builder = make_builder(data_cfg, tokenizer, with_attributes)
    per_stream = [open_stream(data_cfg.sources[s], s, split=split, image_size=data_cfg.image_size,
                              seed=data_cfg.seed, process_index=process_index,
                              process_count=process_count).map(builder)
                  for s in chosen]
    if len(per_stream) == 1:
        return per_stream[0]
    return grain.IterDataset.mix(per_stream, [weights[s] for s in chosen])


def shard_split(data_cfg, batch_size: int, process_count: int) -> tuple[int, int]:
    """(virtual shards, shards per process) for `data.shards` (0: one per
    process); `DataError` when they do not divide the processes or the
    per-process batch."""
    shards = data_cfg.get("shards", 0) or process_count
    if shards % process_count:
        raise DataError(f"config.data.shards={shards} is not a multiple of the {process_count} processes.")
    per_process = shards // process_count
    if batch_size % per_process:
        raise DataError(f"the per-process batch of {batch_size} cannot be split between "
                        f"config.data.shards / processes = {per_process} shards.")
    return shards, per_process


def make_dataset(data_cfg, tokenizer: Tokenizer, *, batch_size: int, split: str = "train",
                 process_index: int = 0, process_count: int = 1,
                 streams: tuple[str, ...] | None = None, with_attributes: bool = False,
                 pack: bool = True) -> grain.IterDataset:
    """Batches of packed sequences for this process (see `mmjax.data.packing`
    for the fields; each gets a leading `[batch_size]` dimension).

    The data is split into `data.shards` virtual shards (0: one per process),
    each read and packed by its own pipeline; a process concatenates the
    batches of its `shards / process_count` shards. The global batch is thus
    the same for any process count that divides `data.shards`.

    Args:
      data_cfg: `config.data`.
      batch_size: sequences per batch on this process.
      streams: restrict to these streams (default: all, mixed by weight).
      pack: False puts one example in each sequence (evaluation).
    """
    shards, per_process = shard_split(data_cfg, batch_size, process_count)
    packer = Packer(data_cfg.seq_len, data_cfg.max_images, data_cfg.tokens_per_image, data_cfg.image_size,
                    tokenizer.pad_id, **region_settings(data_cfg))
    if data_cfg.workers > 0 and per_process == 1:
        # Workers hand over packed sequences with only their used image slots
        # (a third of a full image buffer is usually empty); the main process
        # pads them back and forms the batch.
        _mark_flags_parsed()
        examples = mixed_examples(data_cfg, tokenizer, split=split, process_index=process_index,
                                  process_count=shards, streams=streams, with_attributes=with_attributes)
        sequences = PackIterDataset(examples, packer, window=data_cfg.pack_window if pack else 1).map(_trim_images)
        sequences = sequences.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=data_cfg.workers, per_worker_buffer_size=data_cfg.worker_buffer * batch_size))
        return sequences.map(_PadImages(data_cfg.max_images)).batch(batch_size, drop_remainder=True)
    parts = []
    for j in range(per_process):
        examples = mixed_examples(data_cfg, tokenizer, split=split, process_index=process_index * per_process + j,
                                  process_count=shards, streams=streams, with_attributes=with_attributes)
        packed = PackIterDataset(examples, packer, window=data_cfg.pack_window if pack else 1)
        parts.append(packed.batch(batch_size // per_process, drop_remainder=True))
    return combine_shards(parts, data_cfg)


def combine_shards(parts: list, data_cfg) -> grain.IterDataset:
    """One process's batches from its shards' batch datasets (concatenated
    in shard order), read by Grain workers when `data.workers > 0`."""
    it = parts[0] if len(parts) == 1 else grain.experimental.ZipIterDataset(parts).map(_concatenate)
    if data_cfg.workers > 0:
        _mark_flags_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.workers,
                                                         per_worker_buffer_size=data_cfg.worker_buffer))
    return it


def _mark_flags_parsed() -> None:
    if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags (library use, tests)
        flags.FLAGS.mark_as_parsed()


def _trim_images(sequence: dict) -> dict:
    return {**sequence, "images": sequence["images"][:int(sequence["image_mask"].sum())]}


class _PadImages:
    """Restores the `[max_images, T, T, 3]` image buffer of a trimmed sequence."""

    def __init__(self, max_images: int):
        self.max_images = max_images

    def __call__(self, sequence: dict) -> dict:
        images = sequence["images"]
        full = np.zeros((self.max_images, *images.shape[1:]), np.uint8)
        full[:len(images)] = images
        return {**sequence, "images": full}


def _concatenate(batches: tuple[dict, ...]) -> dict:
    """Batches of several shards -> one batch (shard order kept)."""
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def to_global_arrays(local_batch: Mapping, shardings: Mapping[str, NamedSharding]) -> dict[str, jax.Array]:
    """Assembles per-process numpy batches into global arrays (batch dim sharded)
    with `jax.make_array_from_process_local_data`."""
    return {k: jax.make_array_from_process_local_data(shardings[k], v)
            for k, v in local_batch.items() if k in shardings}
