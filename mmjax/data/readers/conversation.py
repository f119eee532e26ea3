"""LLaVA-style conversation objects -> the role-tagged segments of a raw record.

  {"id": ..., "image": ref | "images": [ref, ...],          (no image: text only)
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
"""

from __future__ import annotations

from collections.abc import Callable

from mmjax.data import chat

PLACEHOLDER = "<image>"
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


def conversation_segments(doc: dict, load_images: Callable[[list], list[bytes]]) -> list[dict]:
    """A conversation object -> role-tagged segments (see module doc).
    `load_images(refs)` returns the encoded bytes of each reference (raising
    `ValueError` for one it cannot read); it is called only once the text
    has passed every check."""
    entries = doc["conversations"]
    if not isinstance(entries, (list, tuple)) or not entries:
        raise ValueError("'conversations' is not a non-empty list")
    refs = image_refs(doc)
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
        if not value.replace(PLACEHOLDER, "").strip() and PLACEHOLDER not in value:
            raise ValueError(f"turn {n}: the {role} turn is empty (whitespace only)")
        if role == "assistant" and PLACEHOLDER in value:
            raise ValueError(f"turn {n}: an {PLACEHOLDER} in an assistant turn")
        if turns and turns[-1][0] == role:
            raise ValueError(f"turns {n - 1} and {n} are both {role} turns")
        turns.append((role, value))
    placeholders = sum(value.count(PLACEHOLDER) for _, value in turns)
    if placeholders != len(refs):
        raise ValueError(f"{placeholders} {PLACEHOLDER} placeholders but {len(refs)} images")
    loaded = load_images(refs)
    for n, data in enumerate(loaded):
        if not data:
            raise ValueError(f"image {n} ({refs[n]!r:.80}) is empty")
    images = iter(loaded)
    segments: list[dict] = []
    for role, value in turns:
        for k, text in enumerate(value.split(PLACEHOLDER)):
            if k:
                segments.append({"image_bytes": next(images), "role": role})
            if text:
                segments.append({"text": text, "role": role})
    chat.turns(segments)  # the template's own checks (the conversation ends with the assistant)
    return segments
