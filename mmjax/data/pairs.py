"""Image-text pair batches for a dual encoder (CLIP / SigLIP pre-training).

  caption stream:  open_stream(`data.sources.caption`) (any source format;
                   per-process shard, endless)
  PairBuilder:     the record's first image resized to `data.image_size`
                   x `data.image_size`; its text segments joined by spaces,
                   tokenized, truncated to `data.seq_len` (the last place
                   holds `<eos>`), padded with `<pad>`
  SkipIterDataset: drops records without an image or a caption (or whose
                   first image cannot be decoded); their counts ride on the
                   next pair
  batch:           `batch_size` pairs per process (`data.shards` virtual
                   shards as in `mmjax.data.pipeline.make_dataset`; Grain
                   workers with `data.workers > 0`); the iterator state stays
                   checkpointable

A pair batch (`b` pairs, `T` = image_size, `L` = seq_len):
  image          `[b, T, T, 3]` uint8
  tokens         `[b, L]` int32 the caption from position 0, then `<eos>`, `<pad>`
  segment_ids    `[b, L]` int32 1 on the caption and its `<eos>`, 0 on padding
  image_mask     `[b, 1]` int32 (all 1: the images of the batch)
  stream_counts  `[b, 3]` int32 one example of the caption stream per row
  dropped_images, skipped_images, skipped_records  `[b]` int32
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from mmjax.data import images as image_ops
from mmjax.data.packing import COUNTS
from mmjax.data.pipeline import shard_split
from mmjax.data.records import STREAMS, DataError, warn_bad_input
from mmjax.data.sources import open_stream
from mmjax.data.tokenizer import Tokenizer

PAIR_FIELDS = ("image", "tokens", "segment_ids")
STREAM = "caption"


class PairBuilder:
    """Callable: raw record -> one pair (the fields of the module doc without
    the batch dimension), or an empty pair (`tokens` of length 0) carrying
    `skipped_records = 1` for a record without an image or caption."""

    def __init__(self, tokenizer: Tokenizer, seq_len: int, image_size: int):
        if seq_len < 2:
            raise DataError(f"config.data.seq_len={seq_len} leaves no room for a caption and its <eos>.")
        self.tok, self.seq_len, self.image_size = tokenizer, seq_len, image_size

    def _empty(self, skipped_images: int = 0) -> dict:
        return {"tokens": np.zeros((0,), np.int32), "skipped_records": np.int32(1),
                "skipped_images": np.int32(skipped_images)}

    def _pixels(self, seg: dict) -> np.ndarray:
        """An image segment -> uint8 `[T, T, 3]`; ValueError if it cannot be decoded."""
        T = self.image_size
        if "image" in seg:
            image = np.asarray(seg["image"], np.uint8)
            if image.ndim != 3 or image.shape[-1] != 3:
                raise ValueError(f"image array of shape {image.shape} is not [h, w, 3]")
            return image_ops.resize(image, (T, T))
        return image_ops.decode_and_resize(seg["image_bytes"], T)

    def __call__(self, record: dict) -> dict:
        if record.get("error"):
            return self._empty()
        segments = record.get("segments") or []
        first = next((s for s in segments if "image" in s or "image_bytes" in s), None)
        text = " ".join(s["text"].strip() for s in segments if s.get("text", "").strip())
        if first is None or not text:
            return self._empty()
        try:
            image = self._pixels(first)
        except ValueError as err:
            warn_bad_input(f"{record.get('origin') or 'a caption record'}, image 1", str(err))
            return self._empty(skipped_images=1)
        ids = self.tok.encode(text)[:self.seq_len - 1] + [self.tok.eos_id]
        tokens = np.full((self.seq_len,), self.tok.pad_id, np.int32)
        tokens[:len(ids)] = ids
        segment_ids = np.zeros((self.seq_len,), np.int32)
        segment_ids[:len(ids)] = 1
        stream_counts = np.zeros((len(STREAMS),), np.int32)
        stream_counts[STREAMS.index(STREAM)] = 1
        return {"image": image, "tokens": tokens, "segment_ids": segment_ids,
                "image_mask": np.ones((1,), np.int32), "stream_counts": stream_counts,
                **{k: np.int32(0) for k in COUNTS}}


class SkipIterDataset(grain.IterDataset):
    """Drops the parent's empty pairs (`PairBuilder`), adding their counts to
    the next pair it yields."""

    def __iter__(self) -> grain.DatasetIterator:
        return _SkipIterator(self._parent.__iter__())


class _SkipIterator(grain.DatasetIterator):
    """Stateless beyond the parent: after each yielded pair nothing is carried,
    so the parent's state is the whole state."""

    def __next__(self) -> dict:
        carried = {k: 0 for k in COUNTS}
        while True:
            pair = next(self._parent)
            if len(pair["tokens"]):
                return {**pair, **{k: np.int32(pair[k] + carried[k]) for k in COUNTS}}
            for k in COUNTS:
                carried[k] += int(pair.get(k, 0))

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)


def pairs(data_cfg, tokenizer: Tokenizer, *, split: str = "train", process_index: int = 0,
          process_count: int = 1) -> grain.IterDataset:
    """Endless unbatched pairs of the caption stream for one shard."""
    records = open_stream(data_cfg.sources[STREAM], STREAM, split=split, image_size=data_cfg.image_size,
                          seed=data_cfg.seed, process_index=process_index, process_count=process_count)
    return SkipIterDataset(records.map(PairBuilder(tokenizer, data_cfg.seq_len, data_cfg.image_size)))


def make_pair_dataset(data_cfg, tokenizer: Tokenizer, *, batch_size: int, split: str = "train",
                      process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """Pair batches (module doc) of `batch_size` rows for this process.

    As `make_dataset`: `data.shards` virtual shards (0: one per process),
    each read by its own pipeline; a process concatenates the batches of its
    `shards / process_count` shards, so the global batch is the same for any
    process count that divides `data.shards`."""
    shards, per_process = shard_split(data_cfg, batch_size, process_count)
    parts = [pairs(data_cfg, tokenizer, split=split, process_index=process_index * per_process + j,
                   process_count=shards).batch(batch_size // per_process, drop_remainder=True)
             for j in range(per_process)]
    it = parts[0] if per_process == 1 else grain.experimental.ZipIterDataset(parts).map(_concatenate)
    if data_cfg.workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags (library use, tests)
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.workers,
                                                         per_worker_buffer_size=data_cfg.worker_buffer))
    return it


def _concatenate(batches: tuple[dict, ...]) -> dict:
    """Batches of several shards -> one batch (shard order kept)."""
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
