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
"""

from __future__ import annotations

import re
from collections.abc import Callable

from mmjax.data import chat

PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
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
    loaded = load_images(refs)
    for n, data in enumerate(loaded):
        if not data:
            raise ValueError(f"image {n} ({refs[n]!r:.80}) is empty")
    sources = {"images": iter({"image_bytes": data} for data in loaded),
               "videos": iter(load_videos(videos) if videos else [])}
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
