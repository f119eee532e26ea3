"""Image decoding, resizing and MM1.5-style dynamic splitting (pixels are
normalised on the device, by the model: `mmjax.models.vit.normalize_pixels`).

numpy + Pillow only. Conventions:
  * decoded images are uint8 `[h, w, 3]` RGB, row-major (height first);
  * sizes are given as `(height, width)` (Pillow itself uses `(width, height)`);
  * resizing is Pillow BICUBIC (antialiased when downscaling) with
    `reducing_gap=3.0`: for downscales by 6x or more Pillow first box-reduces by
    an integer factor, which is much faster and visually equivalent;
  * transparent images (RGBA, LA, PA, palette/greyscale/RGB with a transparency
    key) are composited on a white background, so transparent regions become
    white rather than whatever colour the encoder left under alpha 0;
  * 16-bit greyscale (`I;16*`) keeps its top 8 bits; other modes (greyscale,
    palette, CMYK, YCbCr, ...) use Pillow's RGB conversion;
  * EXIF orientation is not applied: pixels come out in stored order.

Speed: `decode_and_resize` (the single-image path) and `split_encoded` let the
JPEG decoder downscale by DCT scaling (`Image.draft`, factors 1/2, 1/4, 1/8) to
the smallest size still at least the target on both sides, and do all resizing
on the Pillow image so there is a single conversion to numpy.
"""

from __future__ import annotations

import io
import math
from fractions import Fraction

import numpy as np
from PIL import Image

__all__ = [
    "choose_grid",
    "decode_and_resize",
    "decode_image",
    "resize",
    "split_encoded",
    "split_image",
]

_RESAMPLE = Image.Resampling.BICUBIC
_REDUCING_GAP = 3.0
_BACKGROUND = (255, 255, 255)
_ALPHA_MODES = frozenset({"RGBA", "LA", "La", "RGBa", "PA"})


# --------------------------------------------------------------------------- #
# Pillow helpers
# --------------------------------------------------------------------------- #


def _open(data: bytes, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Open and fully decode `data`, as an RGB Pillow image.

    `draft_size` is `(width, height)`: JPEG decoding then downscales by the
    largest power-of-two factor (up to 8) that keeps both sides >= it. Other
    formats ignore it. Any failure raises `ValueError`.
    """
    try:
        img = Image.open(io.BytesIO(data))
        if draft_size is not None:
            img.draft("RGB", draft_size)
        img.load()  # full decode here, so truncated / corrupt data fails now
        return _to_rgb(img)
    except Exception as e:  # Pillow raises many exception types
        reason = str(e) or type(e).__name__
        raise ValueError(f"cannot decode image: {reason}") from e


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> "RGB" (alpha composited on white)."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I;16"):
        grey = (np.asarray(img).astype(np.uint16) >> 8).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode in _ALPHA_MODES or (mode in ("P", "L", "RGB", "1") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, _BACKGROUND)
        out.paste(rgba, (0, 0), rgba)
        return out
    return img.convert("RGB")


def _resize_pil(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize an RGB Pillow image to `size = (height, width)`."""
    h, w = size
    if img.size == (w, h):
        return img
    return img.resize((w, h), _RESAMPLE, reducing_gap=_REDUCING_GAP)


def _to_numpy(img: Image.Image) -> np.ndarray:
    """RGB Pillow image -> writable uint8 `[h, w, 3]`."""
    return np.array(img, dtype=np.uint8)


def _from_numpy(image: np.ndarray) -> Image.Image:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected a uint8 [h, w, 3] image, got {image.dtype} {image.shape}")
    return Image.fromarray(np.ascontiguousarray(image))


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    h, w = (int(s) for s in size)
    if h <= 0 or w <= 0:
        raise ValueError(f"size must be positive, got {size}")
    return h, w


# --------------------------------------------------------------------------- #
# Decoding and resizing
# --------------------------------------------------------------------------- #


def decode_image(data: bytes, max_side: int | None = None) -> np.ndarray:
    """Encoded JPEG/PNG/WebP/GIF/BMP bytes -> uint8 `[h, w, 3]` RGB.

    With `max_side`, a JPEG is decoded at a reduced scale (1/2, 1/4 or 1/8) when
    both sides stay >= `max_side`; the result is never below `max_side` on a
    side that was at least that large. Other formats are decoded at full size.
    GIFs give their first frame; transparency is composited on white.
    Raises `ValueError` if the data cannot be fully decoded.
    """
    draft = None
    if max_side is not None:
        if max_side <= 0:
            raise ValueError(f"max_side must be positive, got {max_side}")
        draft = (int(max_side), int(max_side))
    return _to_numpy(_open(data, draft))


def resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 `[h, w, 3]` -> uint8 `[size_h, size_w, 3]` (Pillow bicubic).

    Aspect ratio is not preserved. The input is returned unchanged when it
    already has the requested size.
    """
    h, w = _check_size(size)
    if image.shape[:2] == (h, w):
        return image
    return _to_numpy(_resize_pil(_from_numpy(image), (h, w)))


def decode_and_resize(data: bytes, size: int) -> np.ndarray:
    """Encoded image bytes -> uint8 `[size, size, 3]`.

    JPEGs are decoded with DCT downscaling to the smallest scale still >= `size`
    on both sides, then resized (bicubic, aspect ratio not kept) to
    `size x size`. Raises `ValueError` on undecodable data.
    """
    size = int(size)
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    img = _open(data, (size, size))
    return _to_numpy(_resize_pil(img, (size, size)))


# --------------------------------------------------------------------------- #
# Dynamic splitting (MM1.5 / "any resolution")
# --------------------------------------------------------------------------- #


def _grid_key(height: int, width: int, tile: int, n_h: int, n_w: int):
    """Sort key (smaller is better) of grid `(n_h, n_w)` for an image."""
    a, b = n_h * tile, n_w * tile  # canvas height, width
    full = height * width
    if a >= height and b >= width:
        effective = Fraction(full)
    elif a * width <= b * height:  # scale = a / height
        effective = Fraction(a * a * width, height)
    else:  # scale = b / width
        effective = Fraction(b * b * height, width)
    waste = n_h * n_w * tile * tile - effective
    aspect = abs(math.log((n_w * height) / (n_h * width)))
    return (-effective, waste, n_h * n_w, aspect, n_h)


def choose_grid(height: int, width: int, tile: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """Pick the tile grid `(n_h, n_w)`, `min_tiles <= n_h * n_w <= max_tiles`.

    Rule: the image is scaled, keeping its aspect ratio, to fit each candidate
    canvas of `(n_h * tile) x (n_w * tile)` pixels, with
    `scale = min(n_h * tile / height, n_w * tile / width)`; the grid's effective
    resolution is `min(height * width * scale**2, height * width)` (upscaling
    adds nothing). The grid with the largest effective resolution wins; ties go
    to the least wasted canvas area (`n_h * n_w * tile**2 - effective`), then to
    fewer tiles, then to the grid whose aspect ratio is closest to the image's,
    then to fewer rows. All comparisons up to the aspect term are exact.
    """
    if tile <= 0:
        raise ValueError(f"tile must be positive, got {tile}")
    if min_tiles < 1:
        raise ValueError(f"min_tiles must be >= 1, got {min_tiles}")
    if max_tiles < min_tiles:
        raise ValueError(f"max_tiles must be >= min_tiles ({min_tiles}), got {max_tiles}")
    if height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive, got {height}x{width}")
    height, width, tile = int(height), int(width), int(tile)
    best, best_key = None, None
    for n_h in range(1, max_tiles + 1):
        for n_w in range(max(1, -(-min_tiles // n_h)), max_tiles // n_h + 1):
            key = _grid_key(height, width, tile, n_h, n_w)
            if best_key is None or key < best_key:
                best, best_key = (n_h, n_w), key
    assert best is not None
    return best


def _split_pil(img: Image.Image, tile: int, grid: tuple[int, int], overview: bool) -> np.ndarray:
    n_h, n_w = grid
    canvas = _to_numpy(_resize_pil(img, (n_h * tile, n_w * tile)))
    n = n_h * n_w
    out = np.empty((n + int(overview), tile, tile, 3), np.uint8)
    out[:n] = canvas.reshape(n_h, tile, n_w, tile, 3).swapaxes(1, 2).reshape(n, tile, tile, 3)
    if overview:
        out[n] = np.asarray(_resize_pil(img, (tile, tile)))
    return out


def split_image(
    image: np.ndarray, tile: int, min_tiles: int, max_tiles: int, overview: bool = True
) -> tuple[np.ndarray, tuple[int, int]]:
    """uint8 `[h, w, 3]` -> (uint8 `[n_h * n_w (+1), tile, tile, 3]`, `(n_h, n_w)`).

    The grid comes from `choose_grid`; the image is resized to exactly
    `(n_h * tile, n_w * tile)` and cut into tiles in row-major order. With
    `overview`, the whole image resized to `tile x tile` is appended LAST.
    """
    img = _from_numpy(image)
    grid = choose_grid(image.shape[0], image.shape[1], tile, min_tiles, max_tiles)
    return _split_pil(img, tile, grid, overview), grid


def split_encoded(
    data: bytes, tile: int, min_tiles: int, max_tiles: int, overview: bool = True
) -> tuple[np.ndarray, tuple[int, int]]:
    """Encoded image bytes -> `split_image` of it, decoding JPEGs at reduced scale.

    The grid is chosen from the full (header) size, so it matches
    `split_image(decode_image(data), ...)`; the JPEG decoder then downscales to
    the smallest scale still covering the grid canvas. Raises `ValueError` on
    undecodable data.
    """
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
    except Exception as e:  # Pillow raises many exception types
        raise ValueError(f"cannot decode image: {str(e) or type(e).__name__}") from e
    grid = choose_grid(height, width, tile, min_tiles, max_tiles)
    img = _open(data, (grid[1] * tile, grid[0] * tile))
    return _split_pil(img, tile, grid, overview), grid
