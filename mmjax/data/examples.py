"""Raw records -> variable-length examples (packed into sequences later).

An example (numpy; `L` <= `seq_len + 1` token ids, `n` <= `max_images` images,
`K` = `tokens_per_image`, `T` = `image_size`):
  ids          `[L]` int32   `<bos>` text/`<image>` ... `<eos>`
  slots        `[L]` int32   image-token index within this example (`image * K + k`), -1 for text
  weights      `[L]` float32 loss weight for predicting `ids[t]` from `ids[:t]`:
                             the stream's loss weight on text, 0 on `<bos>`, image
                             slots and tile separators
  images       `[n, T, T, 3]` uint8 pixels (normalised on the device)
  attributes   `[L]` float32 (with `with_attributes=True`) 1 where `ids[t]` belongs
                             to a colour or kind word of a caption
  stream       int32 index into `STREAMS`
  dropped_images  images beyond `max_images` or without room in the sequence
                  (their text is kept)
  skipped_images  images that could not be decoded (named in a warning)
  skipped_records 1 for a record that could not be read or has nothing left
                  to train on (a caption whose image is corrupt); then `L` = 0

With `image_split=(min_tiles, max_tiles)` (MM1.5 dynamic splitting) each image
becomes its grid of tiles followed by an overview image, optionally each tile
preceded by a `(row,col)` text separator; every tile counts as one image.
"""

from __future__ import annotations

import numpy as np

from mmjax.data import images as image_ops
from mmjax.data.records import STREAMS, warn_bad_input
from mmjax.data.tokenizer import Tokenizer


class ExampleBuilder:
    """Callable turning a raw record (see `mmjax.data.records`) into an example
    dict (see module doc)."""

    def __init__(self, tokenizer: Tokenizer, seq_len: int, max_images: int,
                 tokens_per_image: int, image_size: int, *, with_attributes: bool = False,
                 loss_weights: tuple[float, ...] = (1.0, 1.0, 1.0),
                 image_split: tuple[int, int] = (0, 0), tile_separators: bool = False):
        self.tok = tokenizer
        self.seq_len, self.max_images = seq_len, max_images
        self.tokens_per_image, self.image_size = tokens_per_image, image_size
        self.with_attributes = with_attributes
        self.loss_weights = dict(zip(STREAMS, (float(w) for w in loss_weights)))
        self.image_split, self.tile_separators = tuple(image_split), tile_separators

    def _pixels(self, seg: dict) -> tuple[np.ndarray, list[list[int]]]:
        """One image segment -> (uint8 `[n_tiles, T, T, 3]`, separator token ids
        per tile (empty lists without separators)); raises ValueError if the
        image cannot be decoded."""
        T = self.image_size
        if self.image_split[1] > 0:
            lo, hi = self.image_split
            if "image" in seg:
                tiles, (n_h, n_w) = image_ops.split_image(_as_rgb(seg["image"]), T, lo, hi)
            else:
                tiles, (n_h, n_w) = image_ops.split_encoded(seg["image_bytes"], T, lo, hi)
            labels = [f"({r + 1},{c + 1})" for r in range(n_h) for c in range(n_w)]
            labels += [""] * (len(tiles) - len(labels))  # the overview has no label
            return tiles, [self.tok.encode(x) if (x and self.tile_separators) else [] for x in labels]
        if "image" in seg:
            return image_ops.resize(_as_rgb(seg["image"]), (T, T))[None], [[]]
        return image_ops.decode_and_resize(seg["image_bytes"], T)[None], [[]]

    def _empty(self, stream: str, skipped_records: int, skipped_images: int = 0) -> dict:
        return self._pack_lists(stream, [], [], [], [], [], 0, skipped_images, skipped_records)

    def __call__(self, record: dict) -> dict:
        stream, K = record["stream"], self.tokens_per_image
        if record.get("error") or not record["segments"]:
            return self._empty(stream, skipped_records=1)
        limit = self.seq_len + 1
        text_weight = self.loss_weights[stream]
        ids, slots, weights, attrs = [self.tok.bos_id], [-1], [0.0], [0.0]
        pixels: list[np.ndarray] = []
        dropped = skipped = 0
        image_number = 0
        for seg in record["segments"]:
            room = limit - len(ids) - 1  # keep one place for <eos>
            if "text" not in seg:
                image_number += 1
                try:
                    tiles, separators = self._pixels(seg)
                except ValueError as err:
                    skipped += 1
                    warn_bad_input(f"{record.get('origin') or 'a ' + stream + ' record'}, image {image_number}",
                                   str(err))
                    if stream == "caption":  # a caption without its image teaches nothing true
                        return self._empty(stream, skipped_records=1, skipped_images=skipped)
                    continue
                n_have = sum(len(p) for p in pixels)
                need = len(tiles) * K + sum(len(s) for s in separators)
                if n_have + len(tiles) > self.max_images or room < need:
                    dropped += 1
                    continue
                for t in range(len(tiles)):
                    if separators[t]:
                        ids += separators[t]
                        slots += [-1] * len(separators[t])
                        weights += [0.0] * len(separators[t])
                        attrs += [0.0] * len(separators[t])
                    base = (n_have + t) * K
                    ids += [self.tok.image_id] * K
                    slots += list(range(base, base + K))
                    weights += [0.0] * K
                    attrs += [0.0] * K
                pixels.append(tiles)
            else:
                lead = " " if len(ids) > 1 else ""
                if self.with_attributes:  # character offsets only when attribute masks need them
                    piece, offsets = self.tok.encode_with_offsets(lead + seg["text"])
                else:
                    piece = self.tok.encode(lead + seg["text"])
                piece = piece[:max(room, 0)]
                ids += piece
                slots += [-1] * len(piece)
                weights += [text_weight] * len(piece)
                if self.with_attributes:
                    spans = [(a + len(lead), b + len(lead)) for a, b in seg.get("spans", ())]
                    attrs += [float(any(s < b and a < e for a, b in spans)) for s, e in offsets[:len(piece)]]
                else:
                    attrs += [0.0] * len(piece)
        ids.append(self.tok.eos_id)
        slots.append(-1)
        weights.append(text_weight)
        attrs.append(0.0)
        if len(ids) <= 2 and not pixels:  # nothing but <bos> <eos>
            return self._empty(stream, skipped_records=1, skipped_images=skipped)
        return self._pack_lists(stream, ids, slots, weights, attrs, pixels, dropped, skipped, 0)

    def _pack_lists(self, stream, ids, slots, weights, attrs, pixels, dropped, skipped, skipped_records) -> dict:
        T = self.image_size
        example = {
            "ids": np.asarray(ids, np.int32),
            "slots": np.asarray(slots, np.int32),
            "weights": np.asarray(weights, np.float32),
            "images": (np.concatenate(pixels) if pixels else np.zeros((0, T, T, 3), np.uint8)),
            "stream": np.int32(STREAMS.index(stream)),
            "dropped_images": np.int32(dropped),
            "skipped_images": np.int32(skipped),
            "skipped_records": np.int32(skipped_records),
        }
        if self.with_attributes:
            example["attributes"] = np.asarray(attrs, np.float32)
        return example


def _as_rgb(image) -> np.ndarray:
    image = np.asarray(image, np.uint8)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image array of shape {image.shape} is not [h, w, 3]")
    return image
