"""The embedded default dataset: deterministic, random-access Grain sources.

Each source maps an index to a raw record, generated from
`(seed, split, stream, index)` alone, so any process can read any record and
resumption needs only an index. A raw record is a dict:

  {"stream": "caption" | "interleaved" | "text",
   "segments": [{"text": str, "spans": [(start, end), ...]} | {"image": uint8 [h, w, 3]}, ...]}

`spans` (optional) marks the characters of colour and kind words in captions,
for the caption-accuracy evaluation. Caption records also carry
`labels = {"entities": [...]}` (the colour and kind words of the scene, MOFI's
entity labels) and VeCLIP's two captions, `captions = {"alt_text": ...,
"rewritten": ...}`: the exact caption is the visually enriched rewrite, the
alt-text a short web-style line that names one shape of the scene
(`mmjax.data.pairs` picks one per `config.data.caption_mix`). `ClassesSource`
(`procedural:classes`) draws scenes of one shape kind, labelled with that
kind as the class and its round / angular super-class.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mmjax.data import shapes
from mmjax.data.labels import SHAPE_SUPERCLASS_OF
from mmjax.data.records import STREAMS
from mmjax.data.text_corpus import pydoc_chunks

SPLITS = {"train": 0, "eval": 1, "support": 2}  # support: few-shot demonstrations
VIRTUAL_LENGTH = 10**9  # procedural sources are effectively endless


def _rng(seed: int, split: str, stream: str, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    return np.random.default_rng([seed, SPLITS[split], STREAMS.index(stream), index])


class ProceduralSource:
    """A random-access source of generated records of one stream (`origin`
    names the record in warnings)."""

    stream = ""
    kind = "procedural"

    def __init__(self, image_size: int, seed: int = 0, split: str = "train"):
        self.image_size, self.seed, self.split = image_size, seed, split

    def __len__(self) -> int:
        return VIRTUAL_LENGTH

    def origin(self, index: int) -> str:
        """Where a record comes from, for warnings: `<kind>:<stream>/<split>:<index>`."""
        return f"{self.kind}:{self.stream}/{self.split}:{index}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_size={self.image_size}, seed={self.seed}, split={self.split!r})"


def entities(scene: list[shapes.Shape]) -> list[str]:
    """The scene's entity labels: its colour words, then its kinds, each once
    (in the order of `labels.label_set`'s procedural entities)."""
    present = {s.colour for s in scene} | {s.kind for s in scene}
    return [name for name in (*shapes.COLOURS, *shapes.KINDS) if name in present]


def alt_text(scene: list[shapes.Shape], rng: np.random.Generator) -> str:
    """A web-style alt-text: names one random shape of the scene and nothing
    of the rest (VeCLIP's noisy original caption)."""
    s = scene[rng.integers(len(scene))]
    return ("picture of a {} {}.", "a {} {} and more.", "{} {} image.")[rng.integers(3)].format(s.colour, s.kind)


class CaptionSource(ProceduralSource):
    """One image followed by its exact caption."""

    stream = "caption"

    def scene(self, rng: np.random.Generator) -> list[shapes.Shape]:
        return shapes.sample_scene(rng)

    def labels(self, scene: list[shapes.Shape]) -> dict:
        return {"entities": entities(scene)}

    def __getitem__(self, index: int) -> dict:
        rng = _rng(self.seed, self.split, self.stream, index)
        scene = self.scene(rng)
        text = shapes.caption(scene)
        image = shapes.render_scene(scene, self.image_size, rng)
        # Its own generator: the records' images and captions stay what they were before alt-texts.
        alt = alt_text(scene, np.random.default_rng([self.seed, SPLITS[self.split], 7, index]))
        return {"stream": self.stream, "segments": [
            {"image": image},
            {"text": text, "spans": shapes.attribute_spans(text, scene)},
        ], "labels": self.labels(scene), "captions": {"alt_text": alt, "rewritten": text},
            "origin": self.origin(index)}


class ClassesSource(CaptionSource):
    """`procedural:classes`: 1-3 shapes of one kind (random colours and cells)
    and their exact caption; the kind is the class, round / angular its
    super-class."""

    kind = "procedural:classes"

    def scene(self, rng: np.random.Generator) -> list[shapes.Shape]:
        kind = shapes.KINDS[rng.integers(len(shapes.KINDS))]
        return [dataclasses.replace(s, kind=kind) for s in shapes.sample_scene(rng)]

    def labels(self, scene: list[shapes.Shape]) -> dict:
        kind = scene[0].kind
        return {"entities": entities(scene), "class": kind, "superclass": SHAPE_SUPERCLASS_OF[kind]}


class InterleavedSource(ProceduralSource):
    """Documents of 2-4 scenes: half are pages of numbered pictures, each
    followed by questions and answers about it; half are albums of pictures
    each followed by its caption (the layout of few-shot captioning)."""

    stream = "interleaved"

    def __getitem__(self, index: int) -> dict:
        rng = _rng(self.seed, self.split, self.stream, index)
        album = bool(rng.integers(2))
        segments: list[dict] = [] if album else [{"text": "a page of pictures with questions."}]
        for number in range(int(rng.integers(2, 5))):
            scene = shapes.sample_scene(rng)
            if not album:
                segments.append({"text": f"picture {number + 1}:"})
            segments.append({"image": shapes.render_scene(scene, self.image_size, rng)})
            segments.append({"text": shapes.caption(scene) if album else shapes.question_answers(scene, rng)})
        return {"stream": self.stream, "segments": segments, "origin": self.origin(index)}


class TextSource(ProceduralSource):
    """Prose chunks from Python's own help topics, chosen at random per index."""

    stream = "text"

    def __init__(self, image_size: int = 0, seed: int = 0, split: str = "train"):
        super().__init__(image_size, seed, split)
        self.chunks = pydoc_chunks()

    def __getitem__(self, index: int) -> dict:
        rng = _rng(self.seed, self.split, self.stream, index)
        return {"stream": self.stream, "segments": [{"text": self.chunks[rng.integers(len(self.chunks))]}],
                "origin": self.origin(index)}


SOURCES = {"caption": CaptionSource, "interleaved": InterleavedSource, "text": TextSource}
CLASS_SOURCES = {"caption": ClassesSource}  # procedural:classes has the caption stream only


def tokenizer_corpus(num_generated: int = 3000) -> list[str]:
    """Texts the default tokenizer is trained on: all pydoc chunks plus generated
    captions and question/answer documents (fixed seed, so the tokenizer is stable)."""
    texts = list(pydoc_chunks())
    rng = np.random.default_rng(12345)
    for _ in range(num_generated):
        scene = shapes.sample_scene(rng)
        texts.append(shapes.caption(scene))
        texts.append(shapes.question_answers(scene, rng))
    texts.append("a page of pictures with questions. " + " ".join(f"picture {i}:" for i in range(1, 10)))
    return texts
