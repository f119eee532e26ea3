"""The embedded fine-tuning data: procedural conversations about shapes
scenes (`mmjax.data.shapes`), one Grain random-access source per stream
(`config.data.sources.<stream> = "procedural:sft"`), each record generated
from `(seed, split, stream, index)` alone.

  caption      one picture, then 1-3 question/answer turns:
                 count      "how many shapes are there?" -> "two."
                 colour     "what colour is the shape at the top left?" -> "red."
                 identify   "what is at the top left?" -> "a red circle."
                 describe   "describe the picture." -> the exact caption
                 grounding  "where is the red circle? answer with its box."
                            -> "[x1, y1, x2, y2]" (`mmjax.data.regions.format_box`)
                 referring  "what is in <region>?" -> "a red circle.", the region
                            a shape's box: written as "[x1, y1, x2, y2]"
                            and, with `data.max_regions > 0`, followed by a
                            region token (`mmjax.models.region_sampler`)
  interleaved  2-3 numbered pictures ("picture 1: <image> picture 2: <image>"),
               then one comparison: which picture has the most shapes, which
               one shows a given shape, how many shapes in all.
  text         "continue the text: <first half>" -> the second half of a
               `TEXT_WORDS`-word window of a prose chunk (Python's help
               topics, as the pre-training text stream).

A raw record is a conversation (role-tagged segments, `mmjax.data.chat`).
Grounding asks only for a colour-and-kind pair that appears once in the
scene; boxes are the shape's pixel bounding box. `grounding_question` and
`referring_question` are shared with the evaluation tasks
(`mmjax.eval.formats.procedural_items`), so training and evaluation phrase
them alike.
"""

from __future__ import annotations

import numpy as np

from mmjax.data import shapes
from mmjax.data.procedural import SPLITS, ProceduralSource
from mmjax.data.records import STREAMS
from mmjax.data.regions import format_box
from mmjax.data.text_corpus import pydoc_chunks

_STREAM_OFFSET = 100  # keeps these records' random streams apart from the pre-training ones
TEXT_WORDS = 32  # words of prose per text conversation: half asked, half answered (fits short sequences)


def _rng(seed: int, split: str, stream: str, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    return np.random.default_rng([seed, SPLITS[split], _STREAM_OFFSET + STREAMS.index(stream), index])


REGION_MARK = "<region>"


def _turn(role: str, *parts, box=None) -> list[dict]:
    """Segments of one turn: strings become text (a `<region>` in one becomes
    a region segment of `box` on the record's first image), arrays images."""
    out: list[dict] = []
    for part in parts:
        if not isinstance(part, str):
            out.append({"image": part, "role": role})
            continue
        for n, piece in enumerate(part.split(REGION_MARK)):
            if n:
                out.append({"region": {"image": 0, "box": list(box)}, "role": role})
            if piece.strip():
                out.append({"text": piece.strip(), "role": role})
    return out


def grounding_question(scene: list[shapes.Shape], boxes: list, image_size: int,
                       rng: np.random.Generator) -> tuple[str, str, tuple] | None:
    """(question, answer, pixel box) asking where a shape whose colour and kind
    appear once in the scene is; None when every pair repeats."""
    unique = [i for i, s in enumerate(scene)
              if sum((o.colour, o.kind) == (s.colour, s.kind) for o in scene) == 1]
    if not unique:
        return None
    i = unique[int(rng.integers(len(unique)))]
    s = scene[i]
    return (f"where is the {s.colour} {s.kind}? answer with its box.",
            format_box(boxes[i], image_size, image_size), tuple(boxes[i]))


def referring_question(scene: list[shapes.Shape], boxes: list, rng: np.random.Generator) -> tuple[str, str, tuple]:
    """(question with a `<region>` mark, answer, the region's pixel box) naming
    the shape inside one shape's box."""
    i = int(rng.integers(len(scene)))
    return f"what is in {REGION_MARK}?", f"a {scene[i].colour} {scene[i].kind}.", tuple(boxes[i])


def _single_image_turns(scene, boxes, image_size, rng) -> list[tuple[str, str, tuple | None]]:
    """(question, answer, region box or None) for 1-3 turns about one scene."""
    s = scene[int(rng.integers(len(scene)))]
    n = len(scene)
    asks = [
        ("how many shapes are there?", f"{shapes.COUNT_WORDS[n]}.", None),
        (f"what colour is the shape at the {s.position}?", f"{s.colour}.", None),
        (f"what is at the {s.position}?", f"a {s.colour} {s.kind}.", None),
        ("describe the picture.", shapes.caption(scene), None),
        referring_question(scene, boxes, rng),
    ]
    grounding = grounding_question(scene, boxes, image_size, rng)
    if grounding is not None:
        asks.append(grounding[:2] + (None,))
    picks = rng.choice(len(asks), size=int(rng.integers(1, 4)), replace=False)
    return [asks[i] for i in picks]


class _Source(ProceduralSource):
    kind = "procedural:sft"

    def _record(self, segments: list[dict], index: int) -> dict:
        return {"stream": self.stream, "segments": segments, "origin": self.origin(index)}


class SingleImageConversations(_Source):
    """One picture and 1-3 question/answer turns about it."""

    stream = "caption"

    def __getitem__(self, index: int) -> dict:
        rng = _rng(self.seed, self.split, self.stream, index)
        scene, boxes = shapes.sample_scene(rng), []
        image = shapes.render_scene(scene, self.image_size, rng, boxes)
        segments: list[dict] = []
        for n, (question, answer, box) in enumerate(_single_image_turns(scene, boxes, self.image_size, rng)):
            segments += _turn("user", image, question, box=box) if n == 0 else _turn("user", question, box=box)
            segments += _turn("assistant", answer)
        return self._record(segments, index)


class MultiImageConversations(_Source):
    """2-3 numbered pictures and one question comparing them."""

    stream = "interleaved"

    def __getitem__(self, index: int) -> dict:
        rng = _rng(self.seed, self.split, self.stream, index)
        scenes = [shapes.sample_scene(rng) for _ in range(int(rng.integers(2, 4)))]
        parts: list = []
        for number, scene in enumerate(scenes, 1):
            parts += [f"picture {number}:", shapes.render_scene(scene, self.image_size, rng)]
        counts = [len(s) for s in scenes]
        asks = [("how many shapes are there in all?", f"{sum(counts)}.")]
        if counts.count(max(counts)) == 1:
            asks.append(("which picture has the most shapes?", f"picture {counts.index(max(counts)) + 1}."))
        target = scenes[int(rng.integers(len(scenes)))][0]
        showing = [n for n, scene in enumerate(scenes, 1)
                   if any((s.colour, s.kind) == (target.colour, target.kind) for s in scene)]
        if len(showing) == 1:
            asks.append((f"which picture shows a {target.colour} {target.kind}?", f"picture {showing[0]}."))
        question, answer = asks[int(rng.integers(len(asks)))]
        return self._record(_turn("user", *parts, question) + _turn("assistant", answer), index)


class TextConversations(_Source):
    """Continue a prose chunk from its first half."""

    stream = "text"

    def __init__(self, image_size: int = 0, seed: int = 0, split: str = "train"):
        super().__init__(image_size, seed, split)
        self.chunks = pydoc_chunks()

    def __getitem__(self, index: int) -> dict:
        rng = _rng(self.seed, self.split, self.stream, index)
        words = self.chunks[int(rng.integers(len(self.chunks)))].split()
        start = int(rng.integers(max(1, len(words) - TEXT_WORDS)))
        window = words[start:start + TEXT_WORDS]
        half = max(1, len(window) // 2)
        rest = " ".join(window[half:]) or "."
        return self._record(_turn("user", "continue the text: " + " ".join(window[:half]))
                            + _turn("assistant", rest), index)


SOURCES = {"caption": SingleImageConversations, "interleaved": MultiImageConversations, "text": TextConversations}
