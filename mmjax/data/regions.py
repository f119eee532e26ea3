"""Image regions: coordinates as text, and region masks on a grid.

Coordinates as text (Ferret / Shikra convention), the one place their format
lives:
  box    `[x1, y1, x2, y2]`  (x1, y1) top-left, (x2, y2) bottom-right corner
  point  `[x, y]`
each value an integer 0..999 (`BINS` = 1000 steps): a pixel coordinate `v`
along an image side of `size` pixels is written `round(v / size * 999)`,
clipped to 0..999, so 0 is the left/top edge and 999 the right/bottom edge
whatever the image's size or aspect. Read back, `q` stands for
`q / 999 * size` pixels (error at most `size / 1998`). Written as
`"[x1, y1, x2, y2]"`: a comma and one space between values; `parse_boxes`
accepts any spacing.

A region of a raw record (`mmjax.data.records`) is a segment
`{"region": value, "role": ...}` whose value names the record's image it
lies on (`"image"`: 0-based among the record's images, which comes before the
region) and its shape, one of
  {"box": [x1, y1, x2, y2]}                    pixels of the source image
  {"rle": {"size": [h, w], "counts": ...}}     COCO run-length mask (list or string counts)
  {"mask_bytes": bytes}                         an encoded (PNG) mask, nonzero inside
A free-form region is written as the coordinates of its bounding box.
`region_geometry` checks a region against its image's size: a box must be
non-degenerate and inside the image (`BOX_TOLERANCE` pixels of slack,
clipped), a mask must have the image's size and at least one pixel set;
otherwise it raises `ValueError` (the example builder skips and counts the
record).

Region masks for the region sampler are coverage fractions `[G, G]` float32
in [0, 1] (`G` = `data.region_grid`): the share of each grid cell (row-major,
rows = height) that the region covers, in normalised image coordinates, so
they apply to the image however it is resized to a square.
"""

from __future__ import annotations

import io
import math
import re

import numpy as np
from PIL import Image

BINS = 1000  # coordinate values 0 .. BINS - 1
BOX_TOLERANCE = 1.0  # pixels a box may reach past the image border (then clipped)

_NUMBER = r"\s*(\d{1,3})\s*"
_BOX = re.compile(r"\[" + ",".join([_NUMBER] * 4) + r"\]")
_POINT = re.compile(r"\[" + ",".join([_NUMBER] * 2) + r"\]")


def quantise(value: float, size: float) -> int:
    """Pixel coordinate `value` along a side of `size` pixels -> 0..999."""
    return int(min(max(round(value / size * (BINS - 1)), 0), BINS - 1))


def dequantise(q: int, size: float) -> float:
    """0..999 -> the pixel coordinate it stands for along a side of `size`."""
    return q / (BINS - 1) * size


def format_box(box, width: float, height: float) -> str:
    """Pixel box `[x1, y1, x2, y2]` on a `width` x `height` image -> `"[x1, y1, x2, y2]"` in 0..999."""
    x1, y1, x2, y2 = box
    values = (quantise(x1, width), quantise(y1, height), quantise(x2, width), quantise(y2, height))
    return "[" + ", ".join(map(str, values)) + "]"


def format_point(point, width: float, height: float) -> str:
    """Pixel point `[x, y]` on a `width` x `height` image -> `"[x, y]"` in 0..999."""
    x, y = point
    return f"[{quantise(x, width)}, {quantise(y, height)}]"


def parse_boxes(text: str, width: float | None = None, height: float | None = None) -> list[tuple]:
    """Every well-formed box in `text`, in order: `(x1, y1, x2, y2)` ints in
    0..999, or pixel floats when `width` and `height` are given. A bracket
    group that is not four integers of at most three digits with x1 <= x2
    and y1 <= y2 is no box."""
    boxes = []
    for match in _BOX.finditer(text):
        x1, y1, x2, y2 = map(int, match.groups())
        if x1 <= x2 and y1 <= y2:
            boxes.append((x1, y1, x2, y2))
    if width is None or height is None:
        return boxes
    return [(dequantise(x1, width), dequantise(y1, height), dequantise(x2, width), dequantise(y2, height))
            for x1, y1, x2, y2 in boxes]


def parse_points(text: str, width: float | None = None, height: float | None = None) -> list[tuple]:
    """Every well-formed point `[x, y]` in `text` (see `parse_boxes`)."""
    points = [tuple(map(int, m.groups())) for m in _POINT.finditer(text)]
    if width is None or height is None:
        return points
    return [(dequantise(x, width), dequantise(y, height)) for x, y in points]


def check_box(box, width: int, height: int) -> tuple[float, float, float, float]:
    """A pixel box checked against a `width` x `height` image and clipped to
    it; raises `ValueError` for a box that is not four finite numbers, is
    degenerate (x2 <= x1 or y2 <= y1) or lies outside the image by more than
    `BOX_TOLERANCE` pixels."""
    try:
        x1, y1, x2, y2 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"box {box!r:.80} is not four numbers") from None
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise ValueError(f"box {list(box)} has a non-finite coordinate")
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"box {list(box)} is degenerate (needs x1 < x2 and y1 < y2)")
    t = BOX_TOLERANCE
    if x1 < -t or y1 < -t or x2 > width + t or y2 > height + t:
        raise ValueError(f"box {list(box)} lies outside the {width}x{height} image")
    return max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height))


def decode_rle(rle: dict) -> np.ndarray:
    """COCO run-length encoding `{"size": [h, w], "counts": [...] | str}` ->
    bool `[h, w]`. Runs alternate outside/inside starting outside and go
    down the columns (column-major); string counts are COCO's compressed
    form. Raises `ValueError` for a malformed encoding."""
    try:
        h, w = (int(v) for v in rle["size"])
        counts = rle["counts"]
    except (KeyError, TypeError, ValueError):
        raise ValueError("an RLE mask needs 'size' [h, w] and 'counts'") from None
    if isinstance(counts, bytes):
        counts = counts.decode("ascii", "replace")
    runs = _rle_string_counts(counts) if isinstance(counts, str) else counts
    try:
        runs = np.asarray(runs, np.int64)
    except (TypeError, ValueError):
        raise ValueError("RLE 'counts' is neither a list of integers nor a string") from None
    if h <= 0 or w <= 0 or runs.ndim != 1 or (runs < 0).any() or runs.sum() != h * w:
        raise ValueError(f"RLE counts do not cover a {h}x{w} mask")
    values = np.arange(len(runs)) % 2 == 1
    return np.repeat(values, runs).reshape(w, h).T


def _rle_string_counts(text: str) -> list[int]:
    """COCO's compressed RLE string -> run lengths (pycocotools' rleFrString)."""
    counts: list[int] = []
    p = 0
    while p < len(text):
        x, k, more = 0, 0, True
        while more:
            if p >= len(text):
                raise ValueError("RLE string counts end inside a number")
            c = ord(text[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def decode_mask_image(data: bytes) -> np.ndarray:
    """Encoded mask image (PNG, ...) -> bool `[h, w]`, True where the value
    (greyscale, palette index) or the colour is nonzero. Raises `ValueError`
    if it cannot be decoded."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.mode in ("1", "L", "P", "I", "I;16"):
                return np.asarray(img) != 0
            return (np.asarray(img.convert("RGB")) != 0).any(-1)
    except Exception as err:  # Pillow raises many exception types
        raise ValueError(f"cannot decode mask image: {str(err) or type(err).__name__}") from None


def source_size(segment: dict) -> tuple[int, int]:
    """(height, width) of an image segment as the source has it (`image`
    array or `image_bytes` header). Raises `ValueError` if unreadable."""
    if "image" in segment:
        return tuple(int(v) for v in np.shape(segment["image"])[:2])
    try:
        with Image.open(io.BytesIO(segment["image_bytes"])) as img:
            width, height = img.size
    except Exception as err:  # Pillow raises many exception types
        raise ValueError(f"cannot decode image: {str(err) or type(err).__name__}") from None
    return height, width


def region_geometry(region: dict, height: int, width: int) -> tuple[tuple[float, ...], np.ndarray | None]:
    """(pixel box, bool mask `[height, width]` or None for a box region) of a
    region value on its `height` x `width` image; a mask region's box is its
    pixels' bounding box. Raises `ValueError` naming what is wrong."""
    if "box" in region:
        return check_box(region["box"], width, height), None
    if "rle" in region:
        mask = decode_rle(region["rle"])
    elif "mask_bytes" in region:
        mask = decode_mask_image(region["mask_bytes"])
    else:
        raise ValueError("a region needs a 'box' or a mask")
    if mask.shape != (height, width):
        raise ValueError(f"a {mask.shape[0]}x{mask.shape[1]} mask does not match its {height}x{width} image")
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if not len(rows):
        raise ValueError("the mask is empty")
    return (float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)), mask


def _cell_weights(n: int, grid: int) -> np.ndarray:
    """`[grid, n]`: the share of grid cell i that unit interval piece p of n
    covers (both tiling [0, 1]); rows sum to 1."""
    cells = np.arange(grid + 1) / grid
    pieces = np.arange(n + 1) / n
    overlap = np.minimum(cells[1:, None], pieces[None, 1:]) - np.maximum(cells[:-1, None], pieces[None, :-1])
    return np.clip(overlap, 0.0, None) * grid


def box_coverage(box, width: float, height: float, grid: int) -> np.ndarray:
    """float32 `[grid, grid]`: the share of each cell a pixel box covers."""
    x1, y1, x2, y2 = box

    def along(lo, hi):
        edges = np.arange(grid + 1) / grid
        return np.clip(np.minimum(hi, edges[1:]) - np.maximum(lo, edges[:-1]), 0.0, None) * grid

    return np.outer(along(y1 / height, y2 / height), along(x1 / width, x2 / width)).astype(np.float32)


def mask_coverage(mask: np.ndarray, grid: int) -> np.ndarray:
    """bool `[h, w]` -> float32 `[grid, grid]`: the share of each cell the mask covers."""
    rows, cols = _cell_weights(mask.shape[0], grid), _cell_weights(mask.shape[1], grid)
    return (rows @ mask.astype(np.float64) @ cols.T).astype(np.float32)


def region_coverage(box, mask: np.ndarray | None, height: int, width: int, grid: int) -> np.ndarray:
    """float32 `[grid, grid]` coverage of a region from `region_geometry`."""
    return box_coverage(box, width, height, grid) if mask is None else mask_coverage(mask, grid)
