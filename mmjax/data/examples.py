"""Raw records -> fixed-length training examples.

An example (all numpy, `seq_len = S`, `max_images = N`, `tokens_per_image = K`):
  tokens       `[S]` int32   input ids; `<image>` id at image slots
  targets      `[S]` int32   next-token ids (tokens shifted left by one)
  loss_mask    `[S]` float32 1 where `targets` is a text token to be learned
                             (never an image slot, padding or `<bos>`)
  image_slots  `[S]` int32   position in the flattened `[N*K]` image tokens, -1 for text
  segment_ids  `[S]` int32   1 for the document, 0 for padding
  positions    `[S]` int32   0..S-1 within the document
  images       `[N, H, W, 3]` float32 pixels normalised to [-1, 1] (zeros if unused)
  image_mask   `[N]` int32   1 where an image is present
  attribute_mask `[S]` float32 (with `with_attributes=True`) 1 where the target
               token belongs to a colour or kind word of a caption
Images beyond `max_images` are dropped with their text kept (`dropped_images`
counts them); an image whose slots do not fit in the sequence is dropped too.
"""

from __future__ import annotations

import numpy as np

from mmjax.data.tokenizer import Tokenizer


def normalize_image(image: np.ndarray) -> np.ndarray:
    """uint8 `[h, w, 3]` -> float32 in [-1, 1]."""
    return image.astype(np.float32) / 127.5 - 1.0


class ExampleBuilder:
    """Callable turning a raw record into an example dict (see module doc)."""

    def __init__(self, tokenizer: Tokenizer, seq_len: int, max_images: int,
                 tokens_per_image: int, image_size: int, with_attributes: bool = False):
        self.tok = tokenizer
        self.seq_len, self.max_images = seq_len, max_images
        self.tokens_per_image, self.image_size = tokens_per_image, image_size
        self.with_attributes = with_attributes

    def __call__(self, record: dict) -> dict:
        S, K = self.seq_len, self.tokens_per_image
        ids = [self.tok.bos_id]
        slots = [-1]
        attr = [0.0]
        images = np.zeros((self.max_images, self.image_size, self.image_size, 3), np.float32)
        image_mask = np.zeros((self.max_images,), np.int32)
        n_images = dropped = 0
        for seg in record["segments"]:
            room = S + 1 - len(ids)
            if "image" in seg:
                if n_images >= self.max_images or room < K:
                    dropped += 1
                    continue
                image = seg["image"]
                if image.shape != (self.image_size, self.image_size, 3):
                    raise ValueError(f"image of shape {image.shape} does not match image_size={self.image_size}")
                images[n_images] = normalize_image(image)
                image_mask[n_images] = 1
                ids += [self.tok.image_id] * K
                slots += list(range(n_images * K, (n_images + 1) * K))
                attr += [0.0] * K
                n_images += 1
            else:
                text = (" " if len(ids) > 1 else "") + seg["text"]
                piece, offsets = self.tok.encode_with_offsets(text)
                ids += piece
                slots += [-1] * len(piece)
                spans = [(a + len(text) - len(seg["text"]), b + len(text) - len(seg["text"]))
                         for a, b in seg.get("spans", ())]
                attr += [float(any(start < b and a < end for a, b in spans)) for start, end in offsets]
        ids.append(self.tok.eos_id)
        slots.append(-1)
        attr.append(0.0)
        ids, slots, attr = ids[: S + 1], slots[: S + 1], attr[: S + 1]
        n = len(ids)
        tokens = np.full((S + 1,), self.tok.pad_id, np.int32)
        tokens[:n] = ids
        slot_arr = np.full((S + 1,), -1, np.int32)
        slot_arr[:n] = slots
        real = np.zeros((S + 1,), np.int32)
        real[:n] = 1
        loss_mask = (real[1:] == 1) & (slot_arr[1:] < 0) & (tokens[1:] != self.tok.bos_id)
        example = {
            "tokens": tokens[:S],
            "targets": tokens[1:],
            "loss_mask": loss_mask.astype(np.float32),
            "image_slots": slot_arr[:S],
            "segment_ids": real[:S],
            "positions": np.arange(S, dtype=np.int32),
            "images": images,
            "image_mask": image_mask,
            "dropped_images": np.int32(dropped),
        }
        if self.with_attributes:
            attr_arr = np.zeros((S + 1,), np.float32)
            attr_arr[:n] = attr
            example["attribute_mask"] = attr_arr[1:] * example["loss_mask"]
        return example
