"""Raw records -> variable-length examples (packed into sequences later).

An example (numpy; `L` <= `seq_len + 1` token ids, `n` <= `max_images` images,
`K` = `tokens_per_image`, `T` = `image_size`):
  ids          `[L]` int32   `<bos>` text/`<image>` ... `<eos>`
  slots        `[L]` int32   image-token index within this example (`image * K + k`), -1 for text
  weights      `[L]` float32 loss weight for predicting `ids[t]` from `ids[:t]`:
                             the stream's loss weight on text, 0 on `<bos>`, image
                             slots and tile separators; in a conversation (segments
                             with roles) only on assistant text and the `<eos>`
                             closing each assistant turn (`mmjax.data.chat`)
  images       `[n, T, T, 3]` uint8 pixels (normalised on the device)
  attributes   `[L]` float32 (with `with_attributes=True`) 1 where `ids[t]` belongs
                             to a colour or kind word of a caption
  stream       int32 index into `STREAMS`
  region_slots    `[L]` int32 (with `max_regions > 0`) region index at each region token, -1 elsewhere
  region_images   `[r]` int32 the image (tile) index each region lies on (its overview tile when split)
  region_masks    `[r, G, G]` float32 the region's coverage of a `region_grid` x `region_grid` grid
  dropped_images  images beyond `max_images` or without room in the sequence
                  (their text is kept)
  skipped_images  images that could not be decoded (named in a warning)
  skipped_records 1 for a record that could not be read or has nothing left
                  to train on (a caption whose image is corrupt); then `L` = 0

A region in a conversation (`mmjax.data.regions`) is written as its box's
coordinates (trained in assistant turns); elsewhere, with `max_regions > 0`,
a region token follows them (the `<image>` id as a placeholder, loss weight
0) while the example has fewer than `max_regions` regions and the region's
image was placed (otherwise the coordinates stand alone). A region whose
geometry does not fit its image skips the record (counted, named).

With `image_split=(min_tiles, max_tiles)` (MM1.5 dynamic splitting) each image
becomes its grid of tiles followed by an overview image, optionally each tile
preceded by a `(row,col)` text separator; every tile counts as one image.

A video segment (`{"video": ...}`, see `mmjax.data.video`) becomes up to
`video_frames` uniformly sampled frames, each one image preceded by its time
marker (weight 0); a video that cannot be read or decoded skips its record
(`skipped_records`, warned with the video's name).
"""

from __future__ import annotations

import numpy as np

from mmjax.data import chat
from mmjax.data import images as image_ops
from mmjax.data import video
from mmjax.data import regions as region_ops
from mmjax.data.records import STREAMS, warn_bad_input
from mmjax.data.tokenizer import Tokenizer


class ExampleBuilder:
    """Callable turning a raw record (see `mmjax.data.records`) into an example
    dict (see module doc)."""

    def __init__(self, tokenizer: Tokenizer, seq_len: int, max_images: int,
                 tokens_per_image: int, image_size: int, *, with_attributes: bool = False,
                 loss_weights: tuple[float, ...] = (1.0, 1.0, 1.0),
                 image_split: tuple[int, int] = (0, 0), tile_separators: bool = False,
                 system_prompt: str = "", video_frames: int = 8, video_fps: float = 1.0,
                 max_regions: int = 0, region_grid: int = 0):
        self.tok = tokenizer
        self.seq_len, self.max_images = seq_len, max_images
        self.tokens_per_image, self.image_size = tokens_per_image, image_size
        self.with_attributes = with_attributes
        self.loss_weights = dict(zip(STREAMS, (float(w) for w in loss_weights)))
        self.image_split, self.tile_separators = tuple(image_split), tile_separators
        self.system_prompt = system_prompt
        self.frames = video.FrameSampler(tokenizer.encode, video_frames, video_fps, tokens_per_image, image_size)
        self.max_regions, self.region_grid = max_regions, region_grid

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

    def _add_image(self, parts: _Parts, seg: dict, room: int) -> None:
        """Appends one image's tiles (and tile separators) when they fit in
        `room` tokens and the image budget, else counts it as dropped. Raises
        `ValueError` if the image cannot be decoded."""
        K = self.tokens_per_image
        tiles, separators = self._pixels(seg)
        n_have = parts.num_images
        need = len(tiles) * K + sum(len(s) for s in separators)
        if n_have + len(tiles) > self.max_images or room < need:
            parts.dropped += 1
            return
        for t in range(len(tiles)):
            parts.add(separators[t], 0.0)
            base = (n_have + t) * K
            parts.add([self.tok.image_id] * K, 0.0, slots=range(base, base + K))
        parts.pixels.append(tiles)

    def _add_video(self, parts: _Parts, seg: dict, room: int, later: list[tuple[str, object]]) -> None:
        """Appends a video's frames, each after its time marker, leaving room
        for the `later` pieces (see `mmjax.data.video`); a video without room
        for one frame counts as dropped. Raises `ValueError` if the video
        cannot be read or decoded."""
        K, base = self.tokens_per_image, parts.num_images * self.tokens_per_image
        markers, frames = self.frames.sample(seg, self.max_images - parts.num_images, room,
                                             self.frames.later_need(later))
        if not len(frames):
            parts.dropped += 1
            return
        for k, marker in enumerate(markers):
            parts.add(marker, 0.0)
            parts.add([self.tok.image_id] * K, 0.0, slots=range(base + k * K, base + (k + 1) * K))
        parts.pixels.append(frames)

    def __call__(self, record: dict) -> dict:
        stream = record["stream"]
        if record.get("error") or not record["segments"]:
            return self._empty(stream, skipped_records=1)
        if chat.is_conversation(record):
            return self._conversation(record)
        limit = self.seq_len + 1
        text_weight = self.loss_weights[stream]
        parts = _Parts(self.tok.bos_id)
        image_number = 0
        for n, seg in enumerate(record["segments"]):
            room = limit - len(parts.ids) - 1  # keep one place for <eos>
            if "video" in seg:
                later = [("text", " " + s["text"]) if "text" in s else ("image", s)
                         for s in record["segments"][n + 1:]]
                if not self._video_added(parts, seg, room, later, record.get("origin") or f"a {stream} record"):
                    return self._empty(stream, skipped_records=1, skipped_images=parts.skipped)
            elif "text" not in seg:
                image_number += 1
                try:
                    self._add_image(parts, seg, room)
                except ValueError as err:
                    parts.skipped += 1
                    warn_bad_input(f"{record.get('origin') or 'a ' + stream + ' record'}, image {image_number}",
                                   str(err))
                    if stream == "caption":  # a caption without its image teaches nothing true
                        return self._empty(stream, skipped_records=1, skipped_images=parts.skipped)
            else:
                lead = " " if len(parts.ids) > 1 else ""
                if self.with_attributes:  # character offsets only when attribute masks need them
                    piece, offsets = self.tok.encode_with_offsets(lead + seg["text"])
                else:
                    piece = self.tok.encode(lead + seg["text"])
                piece = piece[:max(room, 0)]
                attrs = None
                if self.with_attributes:
                    spans = [(a + len(lead), b + len(lead)) for a, b in seg.get("spans", ())]
                    attrs = [float(any(s < b and a < e for a, b in spans)) for s, e in offsets[:len(piece)]]
                parts.add(piece, text_weight, attrs=attrs)
        parts.add([self.tok.eos_id], text_weight)
        if len(parts.ids) <= 2 and not parts.pixels:  # nothing but <bos> <eos>
            return self._empty(stream, skipped_records=1, skipped_images=parts.skipped)
        return self._pack_lists(stream, parts.ids, parts.slots, parts.weights, parts.attrs, parts.pixels,
                                parts.dropped, parts.skipped, 0)

    def _conversation(self, record: dict) -> dict:
        """A role-tagged record through the chat template (`mmjax.data.chat`):
        loss weight on assistant text and each assistant turn's `<eos>`, 0
        elsewhere. A record with `"prompt": True` is a generation prompt
        (ends with a user turn, then the assistant's marker; no loss). Cut at `seq_len + 1` ids: a cut example ends with an
        untrained `<eos>`. Skipped (counted) when the roles are malformed, an
        image cannot be decoded, or no assistant token fits."""
        stream = record["stream"]
        where = record.get("origin") or f"a {stream} conversation"
        prompt = bool(record.get("prompt"))  # a generation prompt: ends with the assistant's marker
        try:
            pieces = chat.render(record["segments"], self.system_prompt, prompt)
        except ValueError as err:
            warn_bad_input(where, str(err))
            return self._empty(stream, skipped_records=1)
        limit = self.seq_len + 1
        weight = self.loss_weights[stream]
        parts = _Parts(self.tok.bos_id)
        image_number = region_number = 0
        trained = False
        images: list[tuple[dict, int | None]] = []  # per image: its segment, overview tile (None: dropped)
        regions: list[tuple[int, int, np.ndarray]] = []  # per region token: position, tile, coverage
        for n, (kind, value, is_trained) in enumerate(pieces):
            room = limit - len(parts.ids) - 1  # keep one place for a closing <eos>
            token = None
            if kind == "region":  # its coordinates as text, then perhaps a region token
                region_number += 1
                try:
                    value, token = self._region(value["region"], images, is_trained, len(regions))
                except ValueError as err:  # a wrong box teaches wrong answers
                    warn_bad_input(f"{where}, region {region_number}", str(err))
                    return self._empty(stream, skipped_records=1)
                kind = "text"
            if kind == "eos":  # may take that place: the example then ends with this turn
                parts.add([self.tok.eos_id], weight if is_trained else 0.0)
                trained |= is_trained
            elif kind == "image" and "video" in value:  # the last piece, an <eos>, takes the kept place
                if not self._video_added(parts, value, room, [p[:2] for p in pieces[n + 1:-1]], where):
                    return self._empty(stream, skipped_records=1)
            elif kind == "image":
                image_number += 1
                placed = parts.num_images
                try:
                    self._add_image(parts, value, room)
                except ValueError as err:  # answers about a missing image teach nothing true
                    warn_bad_input(f"{where}, image {image_number}", str(err))
                    return self._empty(stream, skipped_records=1, skipped_images=1)
                images.append((value, parts.num_images - 1 if parts.num_images > placed else None))
            else:
                ids = self.tok.encode(value)
                parts.add(ids[:max(room, 0)], weight if is_trained else 0.0)
                trained |= is_trained and room > 0
                if len(ids) > room:
                    break
                if token is not None and room > len(ids):
                    regions.append((len(parts.ids), *token))
                    parts.add([self.tok.image_id], 0.0)
        if parts.ids[-1] != self.tok.eos_id:  # cut inside a turn (text never encodes to <eos>)
            parts.add([self.tok.eos_id], 0.0)
        if not trained and not prompt:
            warn_bad_input(where, f"no assistant token fits in seq_len={self.seq_len}")
            return self._empty(stream, skipped_records=1)
        return self._pack_lists(stream, parts.ids, parts.slots, parts.weights, parts.attrs, parts.pixels,
                                parts.dropped, 0, 0, regions)

    def _video_added(self, parts: _Parts, seg: dict, room: int, later: list, where: str) -> bool:
        """`_add_video`; False (warned, naming the video) if it cannot be read."""
        try:
            self._add_video(parts, seg, room, later)
        except ValueError as err:
            warn_bad_input(f"{where}, video {video.describe(seg)}", str(err))
            return False
        return True

    def _region(self, region: dict, images: list, trained: bool, count: int) -> tuple[str, tuple | None]:
        """(coordinates text, (image tile, coverage `[G, G]`) for a region
        token or None) of a region value; `images` holds (segment, overview
        tile) of the conversation's images so far. Raises `ValueError` for a
        region that does not fit its image."""
        n = region.get("image", 0)
        if not 0 <= n < len(images):
            raise ValueError(f"it refers to image {n}, which does not come before it")
        segment, tile = images[n]
        height, width = region_ops.source_size(segment)
        box, mask = region_ops.region_geometry(region, height, width)
        text = region_ops.format_box(box, width, height)
        if trained or tile is None or count >= self.max_regions:
            return text, None
        return text, (tile, region_ops.region_coverage(box, mask, height, width, self.region_grid))

    def _pack_lists(self, stream, ids, slots, weights, attrs, pixels, dropped, skipped, skipped_records,
                    regions=()) -> dict:
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
        if self.max_regions > 0:
            G = self.region_grid
            example["region_slots"] = np.full((len(ids),), -1, np.int32)
            example["region_slots"][[at for at, _, _ in regions]] = np.arange(len(regions), dtype=np.int32)
            example["region_images"] = np.asarray([tile for _, tile, _ in regions], np.int32).reshape(-1)
            example["region_masks"] = np.asarray([m for _, _, m in regions], np.float32).reshape(-1, G, G)
        return example


class _Parts:
    """The growing per-token lists of one example (see module doc) and its
    images (`[n_tiles, T, T, 3]` per image) and counts."""

    def __init__(self, bos_id: int):
        self.ids, self.slots, self.weights, self.attrs = [bos_id], [-1], [0.0], [0.0]
        self.pixels: list[np.ndarray] = []
        self.dropped = self.skipped = 0

    @property
    def num_images(self) -> int:
        return sum(len(p) for p in self.pixels)

    def add(self, ids: list[int], weight: float, slots=None, attrs: list[float] | None = None) -> None:
        self.ids += ids
        self.slots += list(slots) if slots is not None else [-1] * len(ids)
        self.weights += [weight] * len(ids)
        self.attrs += attrs if attrs is not None else [0.0] * len(ids)


def _as_rgb(image) -> np.ndarray:
    image = np.asarray(image, np.uint8)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image array of shape {image.shape} is not [h, w, 3]")
    return image
