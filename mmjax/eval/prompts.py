"""k-shot prompts laid out as MM1 lays them out, tokenised exactly as training.

A task's `Template` turns an item into text with `<image>` marks:
  demonstration   prefix? query + answer + separator   (k of them, oldest first)
  query           query                                 (the model continues)
e.g. VQA `query="<image> Question: {question} Answer:"`, `answer=" {answer}"`,
`separator="\\n"`; captioning `query="<image>"`, `answer=" {answer}"`;
`{number}` in the query counts the pictures of the prompt from 1.
The text between `<image>` marks becomes the segments of one raw record
that `mmjax.data.examples.ExampleBuilder` (the training tokeniser and image
pipeline, tiling included) turns into ids and image slots; as in training a
space joins consecutive segments.

Demonstrations come from a support set, drawn per query from a fixed seed
and never the query itself. A prompt whose ids plus the new tokens would
exceed `max_len` drops its oldest demonstrations (counted per prompt).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from mmjax.data import images as image_ops
from mmjax.data.examples import ExampleBuilder
from mmjax.data.records import warn_bad_input
from mmjax.eval.formats import Item

IMAGE_MARK = "<image>"
REGION_MARK = "<region>"  # an item's `box` on its own image (referring)


@dataclasses.dataclass(frozen=True)
class Template:
    """`chat=True` (a fine-tuned model): the prompt is a conversation in the
    training chat template (`mmjax.data.chat`): `prefix` as the system turn
    (none if empty), each demonstration a user turn (its query) and an
    assistant turn (its answer, stripped), the query a last user turn
    followed by the assistant's marker; `separator` is not used."""

    query: str
    answer: str = " {answer}"
    separator: str = "\n"
    prefix: str = ""
    chat: bool = False

    def demonstration(self, item: Item, number: int) -> str:
        return self.prompt(item, number) + self.answer.format(answer=item.shown_answer()) + self.separator

    def prompt(self, item: Item, number: int) -> str:
        return self.query.format(question=item.question, number=number)


@dataclasses.dataclass
class Prompt:
    """`ids [L]` (no `<eos>`), `slots [L]` (-1 for text), `images [n, T, T, 3]`;
    `regions`: the region fields (`region_slots [L]`, `region_images [r]`,
    `region_masks [r, G, G]`) when the builder makes region tokens."""

    ids: np.ndarray
    slots: np.ndarray
    images: np.ndarray
    shots: int
    dropped_shots: int
    regions: dict | None = None


def load_image(item: Item, where: str) -> np.ndarray | None:
    """The item's pixels uint8 `[h, w, 3]`, or None (missing or undecodable
    file, named in a warning)."""
    if item.image is None or isinstance(item.image, np.ndarray):
        return item.image
    try:
        with open(item.image, "rb") as f:
            return image_ops.decode_image(f.read())
    except (OSError, ValueError) as err:
        warn_bad_input(f"{where}: item {item.id} ({item.image})", str(err) or type(err).__name__)
        return None


def _segments(text: str, pixels: list[np.ndarray], box=()) -> list[dict]:
    """Text with `<image>` (and `<region>`) marks -> raw-record segments,
    consuming `pixels` in order; a region is `box` on the last image before
    it (`"image"` left None: the conversation numbers its images)."""
    out, pieces = [], re.split(f"({re.escape(IMAGE_MARK)}|{re.escape(REGION_MARK)})", text)
    for piece in pieces:
        if piece == IMAGE_MARK:
            out.append({"image": pixels.pop(0)})
        elif piece == REGION_MARK:
            out.append({"region": {"image": None, "box": list(box)}})
        elif piece.strip():
            out.append({"text": piece.strip(" ")})
    return out


def _number_regions(segments: list[dict]) -> list[dict]:
    """Regions point at the last image before them, counted over the whole prompt."""
    images = 0
    for seg in segments:
        if "image" in seg:
            images += 1
        elif "region" in seg and seg["region"]["image"] is None:
            seg["region"] = dict(seg["region"], image=images - 1)
    return segments


def _regions_as_text(text: str, item: Item, pixels: list[np.ndarray]) -> str:
    """A plain (not chat) prompt writes an item's region as its coordinates."""
    if REGION_MARK not in text:
        return text
    from mmjax.data.regions import format_box

    height, width = np.shape(pixels[-1])[:2] if pixels else (1, 1)
    return text.replace(REGION_MARK, format_box(item.box, width, height))


class PromptMaker:
    """`make(index, query) -> Prompt | None` (None: the query's image is unusable)."""

    def __init__(self, builder: ExampleBuilder, template: Template, support: list[Item], shots: int,
                 max_len: int, max_new_tokens: int, seed: int, where: str):
        self.builder, self.template, self.support, self.shots = builder, template, support, shots
        self.max_len, self.max_new_tokens, self.seed, self.where = max_len, max_new_tokens, seed, where
        self.uses_images = IMAGE_MARK in template.query

    def _pixels(self, item: Item) -> list[np.ndarray] | None:
        if not self.uses_images:
            return []
        image = load_image(item, self.where)
        return None if image is None else [image]

    def _demonstrations(self, index: int, query: Item) -> list[tuple[Item, list[np.ndarray]]]:
        """Up to `shots` usable demonstrations, oldest first."""
        chosen = []
        order = np.random.default_rng([self.seed, index]).permutation(len(self.support))
        for candidate in order:
            if len(chosen) == self.shots:
                break
            item = self.support[candidate]
            if item.id == query.id and item.image is query.image:
                continue
            pixels = self._pixels(item)
            if pixels is not None:
                chosen.append((item, pixels))
        return chosen

    def _conversation(self, demos, query: Item, query_pixels) -> dict:
        """The prompt as role-tagged segments (`Template.chat`)."""
        t = self.template
        segments = [{"text": t.prefix, "role": "system"}] if t.prefix else []
        for number, (item, pixels) in enumerate(demos, 1):
            segments += [dict(seg, role="user") for seg in _segments(t.prompt(item, number), list(pixels), item.box)]
            segments.append({"text": t.answer.format(answer=item.shown_answer()).strip(), "role": "assistant"})
        segments += [dict(seg, role="user") for seg in _segments(t.prompt(query, len(demos) + 1),
                                                                 list(query_pixels), query.box)]
        return self.builder({"stream": "interleaved", "segments": _number_regions(segments), "prompt": True,
                             "origin": f"{self.where}: item {query.id}"})

    def _build(self, demos, query: Item, query_pixels) -> dict:
        if self.template.chat:
            return self._conversation(demos, query, query_pixels)
        text = self.template.prefix + "".join(_regions_as_text(self.template.demonstration(item, number), item, px)
                                              for number, (item, px) in enumerate(demos, 1))
        pixels = [p for _, px in demos for p in px] + list(query_pixels)
        text += _regions_as_text(self.template.prompt(query, len(demos) + 1), query, list(query_pixels))
        return self.builder({"stream": "interleaved", "segments": _segments(text, pixels),
                             "origin": f"{self.where}: item {query.id}"})

    def make(self, index: int, query: Item) -> Prompt | None:
        query_pixels = self._pixels(query)
        if query_pixels is None:
            return None
        demos = self._demonstrations(index, query)
        wanted = len(demos)
        while True:
            example = self._build(demos, query, query_pixels)
            length = len(example["ids"]) - 1  # without <eos>
            if length + self.max_new_tokens <= self.max_len or not demos:
                break
            demos = demos[1:]
        if length + self.max_new_tokens > self.max_len or example["skipped_images"]:
            return None
        regions = None
        if "region_slots" in example:
            regions = {"region_slots": example["region_slots"][:-1], "region_images": example["region_images"],
                       "region_masks": example["region_masks"]}
        return Prompt(example["ids"][:-1], example["slots"][:-1], example["images"], len(demos),
                      wanted - len(demos), regions)
