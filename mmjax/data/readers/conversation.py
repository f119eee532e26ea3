"""LLaVA-style conversation objects -> the role-tagged segments of a raw record.

  {"id": ..., "image": ref | "images": [ref, ...],          (no image: text only)
   "video": ref | "videos": [ref, ...], "fps": float,       (optional; JSON/JSONL only)
   "conversations": [{"from": "human" | "user" | "gpt" | "assistant" | "system",
                      "value": "... <image> ..."}, ...]}

Every reader (JSON, JSONL, WebDataset, Parquet) recognises such an object by
its `conversations` list, whatever the stream, and turns it into segments
here, so the same object gives the same raw record from any of them (and
from ArrayRecord after `mmjax.data.convert`). Each `<image>` in the values,
in order, is where the next image goes; the text around it is kept as it is
(empty pieces dropped); every segment carries its turn's role ("human" ->
"user", "gpt" -> "assistant"). Checked (a `ValueError` naming the turn,
which the reader returns as a `bad_record`): the `<image>` count equals the
number of images, roles are known, two turns in a row never share a role, no
turn is blank, assistant turns hold no `<image>`, and the conversation ends
with an assistant turn (`mmjax.data.chat.turns`).

Videos (`mmjax.data.video`): each `<video>` is where the next video goes, as
one video segment (frames are sampled later, by the example builder); the
`<video>` count must equal the number of videos. An object with videos, no
images and no `<video>` (LLaVA-Video's own files) has its `<image>`
placeholders stand for the videos.

Regions (referring and grounding, Ferret style): each `<region>` in the
values, in order, is the next entry of the object's `regions` list,

  "regions": [{"box": [x1, y1, x2, y2], "image": 0}          pixels of that image
              | {"mask": {"size": [h, w], "counts": ...}}     COCO RLE
              | {"mask": "masks/a.png"}, ...]                 a mask image (reference like an image's)

(`image`: 0-based index of the object's image the region lies on, default 0;
that `<image>` must come before the region). It becomes a region segment
(`mmjax.data.regions`) in its turn, assistant turns included (there the
coordinates are the answer). Checked here: the `<region>` count equals the
number of regions, each has one shape and a valid image; the geometry is
checked against the image by the example builder.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Callable

from mmjax.data import chat

PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
REGION_PLACEHOLDER = "<region>"
_PIECES = re.compile(f"({re.escape(PLACEHOLDER)}|{re.escape(REGION_PLACEHOLDER)})")
ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def is_conversation(doc) -> bool:
    """A JSON object with a `conversations` entry."""
    return isinstance(doc, dict) and "conversations" in doc


def image_refs(doc: dict) -> list:
    """The object's image references in order: `image` (one, or a list) or
    `images` (a list); none when both are absent or null."""
    image, images = doc.get("image"), doc.get("images")
    if image is not None and images is not None:
        raise ValueError("both 'image' and 'images' are given")
    if images is None:
        images = [] if image is None else image
    if not isinstance(images, (list, tuple)):
        images = [images]
    return list(images)


def video_refs(doc: dict) -> list:
    """The object's video references in order: `video` (one) or `videos` (a
    list); none when both are absent or null."""
    video, videos = doc.get("video"), doc.get("videos")
    if video is not None and videos is not None:
        raise ValueError("both 'video' and 'videos' are given")
    if videos is None:
        return [] if video is None else [video]
    if not isinstance(videos, (list, tuple)):
        raise ValueError("'videos' is not a list")
    return list(videos)


def conversation_segments(doc: dict, load_images: Callable[[list], list[bytes]],
                          load_videos: Callable[[list], list[dict]] | None = None) -> list[dict]:
    """A conversation object -> role-tagged segments (see module doc).
    `load_images(refs)` returns the encoded bytes of each reference and
    `load_videos(refs)` a raw video segment for each (`mmjax.data.video`),
    both raising `ValueError` for one they cannot read; they are called only
    once the text has passed every check. Without `load_videos` an object
    with videos is refused."""
    entries = doc["conversations"]
    if not isinstance(entries, (list, tuple)) or not entries:
        raise ValueError("'conversations' is not a non-empty list")
    refs, videos = image_refs(doc), video_refs(doc)
    if videos and load_videos is None:
        raise ValueError("videos are read from JSON and JSONL files only")
    turns: list[tuple[str, str]] = []
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise TypeError(f"turn {n} is not an object")
        speaker, value = entry.get("from"), entry.get("value")
        role = ROLE_NAMES.get(speaker) if isinstance(speaker, str) else None
        if role is None:
            raise ValueError(f"turn {n} has unknown role {speaker!r} (expected human/user, gpt/assistant or system)")
        if not isinstance(value, str):
            raise ValueError(f"turn {n} has no 'value' string")
        if not value.strip():
            raise ValueError(f"turn {n}: the {role} turn is empty (whitespace only)")
        for mark in (PLACEHOLDER, VIDEO_PLACEHOLDER):
            if role == "assistant" and mark in value:
                raise ValueError(f"turn {n}: an {mark} in an assistant turn")
        if turns and turns[-1][0] == role:
            raise ValueError(f"turns {n - 1} and {n} are both {role} turns")
        turns.append((role, value))
    text = "".join(value for _, value in turns)
    if videos and not refs and VIDEO_PLACEHOLDER not in text:
        marks = {PLACEHOLDER: "videos"}
    else:
        marks = {PLACEHOLDER: "images", VIDEO_PLACEHOLDER: "videos"}
    for mark, kind in marks.items():
        count, given = text.count(mark), len(refs if kind == "images" else videos)
        if count != given:
            raise ValueError(f"{count} {mark} placeholders but {given} {kind}")
    regions = region_entries(doc, len(refs))
    references = text.count(REGION_PLACEHOLDER)
    if references != len(regions):
        raise ValueError(f"{references} {REGION_PLACEHOLDER} placeholders but {len(regions)} regions")
    _check_region_order(turns, regions)
    marks[REGION_PLACEHOLDER] = "regions"
    loaded = load_images(refs)
    for n, data in enumerate(loaded):
        if not data:
            raise ValueError(f"image {n} ({refs[n]!r:.80}) is empty")
    sources = {"images": iter({"image_bytes": data} for data in loaded),
               "videos": iter(load_videos(videos) if videos else []),
               "regions": iter({"region": region} for region in _load_masks(regions, load_images))}
    split = re.compile("(" + "|".join(re.escape(m) for m in marks) + ")")
    segments: list[dict] = []
    for role, value in turns:
        for piece in split.split(value):
            if piece in marks:
                segments.append({**next(sources[marks[piece]]), "role": role})
            elif piece:
                segments.append({"text": piece, "role": role})
    chat.turns(segments)  # the template's own checks (the conversation ends with the assistant)
    return segments


def region_entries(doc: dict, num_images: int) -> list[dict]:
    """The object's `regions` as region values (see module doc), a mask
    reference kept as `{"mask_ref": ref}` until loaded; [] when absent."""
    entries = doc.get("regions")
    if entries is None:
        return []
    if not isinstance(entries, (list, tuple)):
        raise ValueError("'regions' is not a list")
    out = []
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"region {n} is not an object")
        image = 0 if entry.get("image") is None else entry["image"]
        if _is_number(image) and float(image).is_integer():  # columnar readers may widen to float
            image = int(image)
        if not isinstance(image, int) or isinstance(image, bool) or not 0 <= image < num_images:
            raise ValueError(f"region {n} refers to image {image!r}, but the object has {num_images} images")
        box, mask = _plain(entry.get("box")), entry.get("mask")
        if (box is None) == (mask is None):
            raise ValueError(f"region {n} needs exactly one of 'box' and 'mask'")
        if box is not None:
            if not isinstance(box, list) or len(box) != 4 or not all(_is_number(v) for v in box):
                raise ValueError(f"region {n}: 'box' {box!r:.80} is not four numbers [x1, y1, x2, y2]")
            out.append({"image": image, "box": [float(v) for v in box]})
        elif isinstance(mask, dict):
            counts = mask.get("counts")
            counts = counts if isinstance(counts, (str, bytes)) else _plain(counts)
            out.append({"image": image, "rle": {"size": _plain(mask.get("size")), "counts": counts}})
        elif isinstance(mask, (bytes, bytearray)):
            out.append({"image": image, "mask_bytes": bytes(mask)})
        elif isinstance(mask, str) and mask:
            out.append({"image": image, "mask_ref": mask})
        else:
            raise ValueError(f"region {n}: 'mask' is neither an RLE object nor a mask image reference")
    return out


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _plain(value):
    """A list, tuple or array (columnar readers give numpy arrays) -> a list
    of plain Python numbers; anything else unchanged."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    return list(value) if isinstance(value, tuple) else value


def _check_region_order(turns: list[tuple[str, str]], regions: list[dict]) -> None:
    """Each region's image comes before the region in the conversation."""
    seen = r = 0
    for _, value in turns:
        for piece in _PIECES.split(value):
            if piece == PLACEHOLDER:
                seen += 1
            elif piece == REGION_PLACEHOLDER:
                if regions[r]["image"] >= seen:
                    raise ValueError(f"region {r} refers to image {regions[r]['image']}, which comes after it")
                r += 1


def _load_masks(regions: list[dict], load_images: Callable[[list], list[bytes]]) -> list[dict]:
    """Mask references -> `mask_bytes` (loaded like images)."""
    refs = [region["mask_ref"] for region in regions if "mask_ref" in region]
    if not refs:
        return regions
    loaded = iter(load_images(refs))
    out = []
    for region in regions:
        if "mask_ref" in region:
            data = next(loaded)
            if not data:
                raise ValueError(f"mask {region['mask_ref']!r:.80} is empty")
            region = {"image": region["image"], "mask_bytes": data}
        out.append(region)
    return out
