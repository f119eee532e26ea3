"""Image-aware packing of variable-length examples into fixed-length sequences.

Examples (see `mmjax.data.examples`) are read in windows of `window`; each
window is packed first-fit-decreasing (by token count) into bins of
`seq_len` positions and `max_images` images (and `max_regions` regions),
and the bins are emitted in order. An example's image slots and pixels
(and its region slots, masks and image indices) move with it; `segment_ids`
(1, 2, ... per example, 0 for padding) keep attention inside each example and
`positions` restart at 0 for each one. `window=1` gives one example per
sequence (no packing).

A packed sequence (`S` = seq_len, `N` = max_images, `K` = tokens_per_image):
  tokens, targets `[S]` int32, loss_mask `[S]` float32, image_slots `[S]` int32
  (index into the flattened `[N * K]` image tokens, -1 for text),
  segment_ids, positions `[S]` int32, images `[N, T, T, 3]` uint8,
  image_mask `[N]` int32, stream_counts `[3]` int32 (examples per stream),
  num_examples, dropped_images, skipped_images, skipped_records (int32),
  attribute_mask `[S]` float32 when the examples carry `attributes`;
  with `max_regions = R > 0` (`G` = region_grid): region_slots `[S]` int32
  (index into the sequence's `[R]` regions, -1 for none), region_images `[R]`
  int32 (index into `images`, -1 for an unused row), region_masks
  `[R, G, G]` float32 (zero for an unused row).

Checkpointing: the iterator state is the parent's state at the start of the
current window plus the number of its bins already emitted; restoring re-reads
and re-packs that window (deterministic) and skips what was emitted, so a
restored iterator continues with the identical next sequence.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

COUNTS = ("dropped_images", "skipped_images", "skipped_records")


def first_fit_decreasing(lengths: list[int], n_images: list[int], seq_len: int,
                         max_images: int, n_regions: list[int] | None = None,
                         max_regions: int = 0) -> list[list[int]]:
    """Assigns items (token length, image count[, region count]) to bins of
    capacity (`seq_len`, `max_images`[, `max_regions`]), largest first into
    the first bin that fits. Returns bins as lists of item indices, each in
    input order; bins ordered by their first item."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    if n_regions is None:
        n_regions = [0] * len(lengths)
    bins: list[list[int]] = []
    room: list[list[int]] = []  # [tokens left, images left, regions left] per bin
    for i in order:
        need = (lengths[i], n_images[i], n_regions[i])
        for b, left in enumerate(room):
            if all(n <= r for n, r in zip(need, left)):
                bins[b].append(i)
                room[b] = [r - n for r, n in zip(left, need)]
                break
        else:
            bins.append([i])
            room.append([seq_len - need[0], max_images - need[1], max_regions - need[2]])
    bins = [sorted(b) for b in bins]
    return sorted(bins, key=lambda b: b[0])


class Packer:
    """Builds packed sequences (see module doc) from lists of examples."""

    def __init__(self, seq_len: int, max_images: int, tokens_per_image: int, image_size: int,
                 pad_id: int = 0, max_regions: int = 0, region_grid: int = 0):
        self.seq_len, self.max_images = seq_len, max_images
        self.tokens_per_image, self.image_size, self.pad_id = tokens_per_image, image_size, pad_id
        self.max_regions, self.region_grid = max_regions, region_grid

    def pack_window(self, examples: list[dict]) -> list[dict]:
        """All examples of a window -> packed sequences. Counts of empty
        (skipped) examples ride on the first sequence; a window of only empty
        examples yields one all-padding sequence carrying the counts."""
        real = [i for i, ex in enumerate(examples) if len(ex["ids"]) > 1]
        lengths = [len(examples[i]["ids"]) - 1 for i in real]
        n_images = [len(examples[i]["images"]) for i in real]
        n_regions = [len(examples[i]["region_images"]) if self.max_regions else 0 for i in real]
        bins = [[real[j] for j in b] for b in first_fit_decreasing(lengths, n_images, self.seq_len, self.max_images,
                                                                   n_regions, self.max_regions)] or [[]]
        out = [self.build(examples, b) for b in bins]
        for i, ex in enumerate(examples):
            if i not in real:
                for k in COUNTS:
                    out[0][k] += ex[k]
        return out

    def build(self, examples: list[dict], members: list[int]) -> dict:
        """One packed sequence holding `examples[i]` for `i` in `members`."""
        S, N, K, T = self.seq_len, self.max_images, self.tokens_per_image, self.image_size
        seq = {
            "tokens": np.full((S,), self.pad_id, np.int32),
            "targets": np.full((S,), self.pad_id, np.int32),
            "loss_mask": np.zeros((S,), np.float32),
            "image_slots": np.full((S,), -1, np.int32),
            "segment_ids": np.zeros((S,), np.int32),
            "positions": np.zeros((S,), np.int32),
            "images": np.zeros((N, T, T, 3), np.uint8),
            "image_mask": np.zeros((N,), np.int32),
            "stream_counts": np.zeros((3,), np.int32),
            "num_examples": np.int32(len(members)),
            **{k: np.int32(0) for k in COUNTS},
        }
        with_attributes = bool(examples) and "attributes" in examples[0]
        if with_attributes:
            seq["attribute_mask"] = np.zeros((S,), np.float32)
        R, G = self.max_regions, self.region_grid
        if R:
            seq["region_slots"] = np.full((S,), -1, np.int32)
            seq["region_images"] = np.full((R,), -1, np.int32)
            seq["region_masks"] = np.zeros((R, G, G), np.float32)
        at = n_img = n_reg = 0
        for segment, i in enumerate(members, start=1):
            ex = examples[i]
            n = len(ex["ids"]) - 1
            span = slice(at, at + n)
            seq["tokens"][span] = ex["ids"][:-1]
            seq["targets"][span] = ex["ids"][1:]
            seq["loss_mask"][span] = ex["weights"][1:]
            slots = ex["slots"][:-1]
            seq["image_slots"][span] = np.where(slots >= 0, slots + n_img * K, -1)
            seq["segment_ids"][span] = segment
            seq["positions"][span] = np.arange(n, dtype=np.int32)
            m = len(ex["images"])
            seq["images"][n_img:n_img + m] = ex["images"]
            seq["image_mask"][n_img:n_img + m] = 1
            seq["stream_counts"][ex["stream"]] += 1
            for k in COUNTS:
                seq[k] += ex[k]
            if with_attributes:
                seq["attribute_mask"][span] = ex["attributes"][1:] * (ex["weights"][1:] > 0)
            if R:
                r = len(ex["region_images"])
                region_slots = ex["region_slots"][:-1]
                seq["region_slots"][span] = np.where(region_slots >= 0, region_slots + n_reg, -1)
                seq["region_images"][n_reg:n_reg + r] = ex["region_images"] + n_img
                seq["region_masks"][n_reg:n_reg + r] = ex["region_masks"]
                n_reg += r
            at, n_img = at + n, n_img + m
        return seq


class PackIterDataset(grain.IterDataset):
    """Packs the parent's examples into sequences (see module doc)."""

    def __init__(self, parent: grain.IterDataset, packer: Packer, window: int):
        super().__init__(parent)
        if window < 1:
            raise ValueError(f"packing window must be >= 1, got {window}")
        self.packer, self.window = packer, window

    def __iter__(self) -> grain.DatasetIterator:
        return _PackIterator(self._parent.__iter__(), self.packer, self.window)

    def __str__(self) -> str:
        return f"PackIterDataset(seq_len={self.packer.seq_len}, max_images={self.packer.max_images}, " \
               f"window={self.window})"


class _PackIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, packer: Packer, window: int):
        super().__init__(parent)
        self.packer, self.window = packer, window
        self._window_state = parent.get_state()
        self._ready: list[dict] = []
        self._emitted = 0

    def _fill(self) -> None:
        self._window_state = self._parent.get_state()
        examples = []
        for _ in range(self.window):
            try:
                examples.append(next(self._parent))
            except StopIteration:
                break
        if not examples:
            raise StopIteration
        self._ready, self._emitted = self.packer.pack_window(examples), 0

    def __next__(self) -> dict:
        if self._emitted >= len(self._ready):
            self._fill()
        sequence = self._ready[self._emitted]
        self._emitted += 1
        return sequence

    def get_state(self) -> dict[str, Any]:
        return {"window_start": self._window_state, "emitted": self._emitted}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["window_start"])
        self._ready, self._emitted = [], 0
        if state["emitted"]:
            self._fill()
            self._emitted = state["emitted"]
