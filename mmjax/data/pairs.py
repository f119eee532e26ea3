"""Image-text pair batches for a dual encoder (CLIP / SigLIP pre-training).

  caption stream:  open_stream(`data.sources.caption`) (any source format;
                   per-process shard, endless)
  PairBuilder:     the record's first image resized to `data.image_size`
                   x `data.image_size`; its text (below) tokenized,
                   truncated to `data.seq_len` (the last place holds
                   `<eos>`), padded with `<pad>`; its labels as ids of the
                   label set (`mmjax.data.labels`)
  SkipIterDataset: drops records without an image or a caption (or whose
                   first image cannot be decoded); their counts ride on the
                   next pair. `require_text=False` (a model that reads no
                   text: MOFI's classification alone) keeps a record without
                   a caption, its tokens all `<pad>` and segment_ids 0
  batch:           `batch_size` pairs per process (`data.shards` virtual
                   shards as in `mmjax.data.pipeline.make_dataset`; Grain
                   workers with `data.workers > 0`); the iterator state stays
                   checkpointable

A pair batch (`b` pairs, `T` = image_size, `L` = seq_len):
  image          `[b, T, T, 3]` uint8
  tokens         `[b, L]` int32 the caption from position 0, then `<eos>`, `<pad>`
  segment_ids    `[b, L]` int32 1 on the caption and its `<eos>`, 0 on padding
  image_mask     `[b, 1]` int32 (all 1: the images of the batch)
  entity_ids     `[b, K]` int32 the record's entity labels (`labels.entities`)
                              as ids, -1 padding; K = `data.labels.max_entities`
  class_id       `[b]` int32 its class (`labels.class`), -1 when it has none
  superclass_id  `[b]` int32 its class's super-class (else `labels.superclass`), -1
  caption_choice `[b]` int32 the `data.caption_mix` field its text came from, -1
  stream_counts  `[b, 3]` int32 one example of the caption stream per row
  dropped_images, skipped_images, skipped_records  `[b]` int32
Names a label set does not hold are left out.

The text of a pair (`data.pair_text`):
  "caption"   the record's text segments joined by spaces; with
              `data.caption_mix` (VeCLIP: "FIELD@W|FIELD@W") and a record that
              carries `captions` {field: text}, one of those fields instead,
              drawn with the given weights (renormalised over the fields the
              record holds) by a hash of (`data.seed`, the record's origin):
              the same record gets the same caption in every run and on
              every process count, and resuming needs no extra state
  "entities"  the record's entity names joined by ", " (MOFI's contrastive
              training with entity names); records without any are skipped
"""

from __future__ import annotations

import hashlib
from typing import Any

import grain
import numpy as np

from mmjax.data import images as image_ops
from mmjax.data.labels import LabelSet, label_set
from mmjax.data.packing import COUNTS
from mmjax.data.pipeline import combine_shards, shard_split
from mmjax.data.records import STREAMS, DataError, warn_bad_input
from mmjax.data.sources import open_stream
from mmjax.data.tokenizer import Tokenizer

PAIR_FIELDS = ("image", "tokens", "segment_ids", "entity_ids", "class_id", "superclass_id")
STREAM = "caption"
PAIR_TEXTS = ("caption", "entities")


def parse_caption_mix(spec: str, where: str = "config.data.caption_mix") -> tuple[tuple[str, float], ...]:
    """`"alt_text@0.5|rewritten@0.5"` -> (("alt_text", 0.5), ("rewritten", 0.5));
    "" -> () (off). DataError naming `where` for a malformed spec."""
    if not str(spec or "").strip():
        return ()
    out = []
    for part in str(spec).split("|"):
        field, at, weight = part.strip().rpartition("@")
        try:
            value = float(weight) if at else float("nan")
        except ValueError:
            value = float("nan")
        if not field or not value >= 0 or value == float("inf"):
            raise DataError(f"{where}={spec!r}: the part {part.strip()!r} must be FIELD@WEIGHT with a "
                            "non-negative weight, e.g. 'alt_text@0.5|rewritten@0.5'.")
        if field in dict(out):
            raise DataError(f"{where}={spec!r}: the caption field {field!r} is named twice.")
        out.append((field, value))
    if not sum(w for _, w in out) > 0:
        raise DataError(f"{where}={spec!r}: every weight is 0; give one a positive weight.")
    return tuple(out)


def caption_mix(data_cfg) -> tuple[tuple[str, float], ...]:
    """`data.caption_mix` parsed (`parse_caption_mix`); () when off."""
    return parse_caption_mix(data_cfg.get("caption_mix", ""))


def _unit_hash(seed: int, key: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, key)."""
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def pick_caption(captions: dict, mix: tuple[tuple[str, float], ...], seed: int, key: str) -> tuple[str, int]:
    """(text, index in `mix`) of the field drawn for this record, or ("", -1)
    when it holds none of the mix's fields (module doc)."""
    held = [(i, w) for i, (field, w) in enumerate(mix) if str(captions.get(field) or "").strip() and w > 0]
    if not held:
        return "", -1
    u, total, acc = _unit_hash(seed, key), sum(w for _, w in held), 0.0
    for i, w in held:
        acc += w / total
        if u < acc:
            break
    return str(captions[mix[i][0]]).strip(), i


class PairBuilder:
    """Callable: raw record -> one pair (the fields of the module doc without
    the batch dimension), or an empty pair (`tokens` of length 0) carrying
    `skipped_records = 1` for a record without an image, or without a caption
    when `require_text`."""

    def __init__(self, tokenizer: Tokenizer, seq_len: int, image_size: int, *, labels: LabelSet | None = None,
                 max_entities: int = 8, mix: tuple[tuple[str, float], ...] = (), text: str = "caption",
                 seed: int = 0, require_text: bool = True):
        if seq_len < 2:
            raise DataError(f"config.data.seq_len={seq_len} leaves no room for a caption and its <eos>.")
        if text not in PAIR_TEXTS:
            raise DataError(f"config.data.pair_text={text!r} is unknown; choose one of {PAIR_TEXTS}.")
        self.tok, self.seq_len, self.image_size = tokenizer, seq_len, image_size
        self.labels, self.max_entities, self.mix, self.text, self.seed = labels, max_entities, mix, text, seed
        self.require_text = require_text

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

    def _text(self, record: dict, segments: list, labels: dict) -> tuple[str, int]:
        """(the pair's text, its caption_choice) per `data.pair_text` (module doc)."""
        if self.text == "entities":
            return ", ".join(str(n) for n in labels.get("entities") or []), -1
        if self.mix and isinstance(record.get("captions"), dict):
            key = record.get("origin") or " ".join(s.get("text", "") for s in segments)
            text, choice = pick_caption(record["captions"], self.mix, self.seed, key)
            if text:
                return text, choice
        return " ".join(s["text"].strip() for s in segments if s.get("text", "").strip()), -1

    def _label_ids(self, labels: dict) -> dict:
        """`labels` {entities, class, superclass} -> entity_ids `[K]`, class_id, superclass_id."""
        entity_ids = np.full((self.max_entities,), -1, np.int32)
        class_id = superclass_id = -1
        if self.labels is not None:
            ids, _ = self.labels.ids("entities", labels.get("entities") or [])
            entity_ids[:min(len(ids), self.max_entities)] = ids[:self.max_entities]
            if labels.get("class") is not None:
                found, _ = self.labels.ids("classes", [labels["class"]])
                if found:
                    class_id, superclass_id = found[0], self.labels.superclass_of[found[0]]
            if superclass_id < 0 and labels.get("superclass") is not None:
                found, _ = self.labels.ids("superclasses", [labels["superclass"]])
                superclass_id = found[0] if found else -1
        return {"entity_ids": entity_ids, "class_id": np.int32(class_id), "superclass_id": np.int32(superclass_id)}

    def __call__(self, record: dict) -> dict:
        if record.get("error"):
            return self._empty()
        segments = record.get("segments") or []
        labels = record.get("labels") if isinstance(record.get("labels"), dict) else {}
        first = next((s for s in segments if "image" in s or "image_bytes" in s), None)
        text, choice = self._text(record, segments, labels)
        if first is None or (self.require_text and not text):
            return self._empty()
        try:
            image = self._pixels(first)
        except ValueError as err:
            warn_bad_input(f"{record.get('origin') or 'a caption record'}, image 1", str(err))
            return self._empty(skipped_images=1)
        ids = self.tok.encode(text)[:self.seq_len - 1] + [self.tok.eos_id] if text else []
        tokens = np.full((self.seq_len,), self.tok.pad_id, np.int32)
        tokens[:len(ids)] = ids
        segment_ids = np.zeros((self.seq_len,), np.int32)
        segment_ids[:len(ids)] = 1
        stream_counts = np.zeros((len(STREAMS),), np.int32)
        stream_counts[STREAMS.index(STREAM)] = 1
        return {"image": image, "tokens": tokens, "segment_ids": segment_ids, **self._label_ids(labels),
                "caption_choice": np.int32(choice), "image_mask": np.ones((1,), np.int32),
                "stream_counts": stream_counts, **{k: np.int32(0) for k in COUNTS}}


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
          process_count: int = 1, require_text: bool = True) -> grain.IterDataset:
    """Endless unbatched pairs of the caption stream for one shard (records
    without a caption kept unless `require_text`)."""
    records = open_stream(data_cfg.sources[STREAM], STREAM, split=split, image_size=data_cfg.image_size,
                          seed=data_cfg.seed, process_index=process_index, process_count=process_count)
    labels = data_cfg.get("labels", {})
    builder = PairBuilder(tokenizer, data_cfg.seq_len, data_cfg.image_size, labels=label_set(data_cfg),
                          max_entities=int(labels.get("max_entities", 8)), mix=caption_mix(data_cfg),
                          text=data_cfg.get("pair_text", "caption"), seed=data_cfg.seed,
                          require_text=require_text)
    return SkipIterDataset(records.map(builder))


def make_pair_dataset(data_cfg, tokenizer: Tokenizer, *, batch_size: int, split: str = "train",
                      process_index: int = 0, process_count: int = 1,
                      require_text: bool = True) -> grain.IterDataset:
    """Pair batches (module doc) of `batch_size` rows for this process;
    `require_text=False` for a model that reads no text keeps records
    without a caption.

    As `make_dataset`: `data.shards` virtual shards (0: one per process),
    each read by its own pipeline; a process concatenates the batches of its
    `shards / process_count` shards, so the global batch is the same for any
    process count that divides `data.shards`."""
    shards, per_process = shard_split(data_cfg, batch_size, process_count)
    parts = [pairs(data_cfg, tokenizer, split=split, process_index=process_index * per_process + j,
                   process_count=shards, require_text=require_text).batch(batch_size // per_process,
                                                                          drop_remainder=True)
             for j in range(per_process)]
    return combine_shards(parts, data_cfg)
