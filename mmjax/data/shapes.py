"""Procedural scenes of coloured shapes and captions that describe them exactly.

A scene is an image split into a 2x2 grid of cells; each of 1-3 occupied cells
holds one shape with a kind and a colour. The caption names the count and,
in reading order, each cell's position, colour and kind, e.g.
"two shapes. top left: red circle. bottom right: blue square."
"""

from __future__ import annotations

import dataclasses

import numpy as np

KINDS = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 220, 50),
    "purple": (150, 60, 200),
    "white": (235, 235, 235),
}
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
COUNT_WORDS = ("zero", "one", "two", "three", "four")
MAX_SHAPES = 3


@dataclasses.dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    position: str


def _shape_mask(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean `[size, size]` mask of one shape, slightly jittered in scale."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    c = size / 2.0
    r = size * rng.uniform(0.33, 0.46)
    dy, dx = yy - c, xx - c
    if kind == "circle":
        return dy * dy + dx * dx <= r * r
    if kind == "square":
        return (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
    if kind == "triangle":  # apex up
        top, bottom = c - r, c + r
        t = np.clip((yy - top) / (bottom - top), 0.0, 1.0)
        return (yy >= top) & (yy <= bottom) & (np.abs(dx) <= t * r)
    if kind == "cross":
        w = r * 0.35
        return ((np.abs(dy) <= w) & (np.abs(dx) <= r)) | ((np.abs(dx) <= w) & (np.abs(dy) <= r))
    raise ValueError(f"unknown shape kind {kind!r}")


def sample_scene(rng: np.random.Generator) -> list[Shape]:
    """1..MAX_SHAPES shapes in distinct cells, listed in reading order."""
    count = int(rng.integers(1, MAX_SHAPES + 1))
    cells = sorted(rng.choice(len(POSITIONS), size=count, replace=False).tolist())
    colours = list(COLOURS)
    return [Shape(KINDS[rng.integers(len(KINDS))], colours[rng.integers(len(colours))], POSITIONS[c])
            for c in cells]


def render_scene(shapes: list[Shape], image_size: int, rng: np.random.Generator,
                 boxes: list | None = None) -> np.ndarray:
    """Draws `shapes` on a dark noisy background -> uint8 `[image_size, image_size, 3]`.
    With a list `boxes`, appends each shape's pixel bounding box
    `(x1, y1, x2, y2)` (x2, y2 exclusive), in the order of `shapes`."""
    img = rng.integers(0, 40, size=(image_size, image_size, 3)).astype(np.uint8)
    cell = image_size // 2
    for shape in shapes:
        row, col = divmod(POSITIONS.index(shape.position), 2)
        mask = _shape_mask(shape.kind, cell, rng)
        jitter = np.clip(rng.integers(-12, 13, size=3) + np.array(COLOURS[shape.colour]), 0, 255)
        region = img[row * cell:(row + 1) * cell, col * cell:(col + 1) * cell]
        region[mask] = jitter.astype(np.uint8)
        if boxes is not None:
            ys, xs = np.nonzero(mask)
            boxes.append((col * cell + int(xs.min()), row * cell + int(ys.min()),
                          col * cell + int(xs.max()) + 1, row * cell + int(ys.max()) + 1))
    return img


def caption(shapes: list[Shape]) -> str:
    """Exact description: count, then `position: colour kind.` per shape."""
    n = len(shapes)
    head = f"{COUNT_WORDS[n]} shape{'s' if n != 1 else ''}."
    return " ".join([head] + [f"{s.position}: {s.colour} {s.kind}." for s in shapes])


def attribute_spans(text: str, shapes: list[Shape]) -> list[tuple[int, int]]:
    """Character spans of every colour and kind word of `caption(shapes)` in `text`."""
    spans, cursor = [], 0
    for s in shapes:
        start = text.index(f"{s.position}: ", cursor) + len(s.position) + 2
        colour_end = start + len(s.colour)
        kind_start = colour_end + 1
        spans += [(start, colour_end), (kind_start, kind_start + len(s.kind))]
        cursor = kind_start + len(s.kind)
    return spans


def question_answers(shapes: list[Shape], rng: np.random.Generator) -> str:
    """Question/answer text about one scene, for interleaved documents."""
    s = shapes[rng.integers(len(shapes))]
    n = len(shapes)
    templates = [
        f"question: how many shapes are there? answer: {COUNT_WORDS[n]}.",
        f"question: what colour is the shape at the {s.position}? answer: {s.colour}.",
        f"question: what is at the {s.position}? answer: a {s.colour} {s.kind}.",
        f"question: where is the {s.colour} {s.kind}? answer: {s.position}.",
    ]
    picks = rng.choice(len(templates), size=2, replace=False)
    return " ".join(templates[i] for i in sorted(picks))
