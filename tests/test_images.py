"""Image decoding, resizing, dynamic splitting and normalisation."""

import io
import math

import numpy as np
import pytest
from PIL import Image

from mmjax.data.images import (
    choose_grid,
    decode_and_resize,
    decode_image,
    resize,
    split_encoded,
    split_image,
)


def _encode(array: np.ndarray, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **kwargs)
    return buf.getvalue()


def _random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _smooth_image(h: int, w: int) -> np.ndarray:
    """Low-frequency colour pattern (compresses well, survives resizing)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 127.5 + 120 * np.sin(2 * np.pi * x / w)
    g = 127.5 + 120 * np.cos(3 * np.pi * y / h)
    b = 255 * (x + y) / (h + w)
    return np.stack([r, g, b], -1).round().clip(0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- #
# Decoding
# --------------------------------------------------------------------------- #


def test_png_round_trip_is_exact():
    img = _random_image(37, 53)
    out = decode_image(_encode(img, "PNG"))
    assert out.dtype == np.uint8 and out.shape == (37, 53, 3)
    np.testing.assert_array_equal(out, img)
    out[0, 0] = 0  # decoded arrays are writable


def test_jpeg_round_trip_is_close():
    img = _smooth_image(96, 128)
    out = decode_image(_encode(img, "JPEG", quality=95))
    assert out.dtype == np.uint8 and out.shape == (96, 128, 3)
    assert np.abs(out.astype(np.int32) - img).mean() < 2.0


@pytest.mark.parametrize("fmt", ["WEBP", "BMP", "GIF"])
def test_other_formats_decode_to_rgb(fmt):
    img = _smooth_image(20, 30)
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    out = decode_image(_encode(img, fmt, **kwargs))
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    if fmt != "GIF":  # GIF quantises to a palette
        np.testing.assert_array_equal(out, img)


def test_greyscale_becomes_three_equal_channels():
    grey = np.arange(12 * 20, dtype=np.uint8).reshape(12, 20)
    for fmt in ("PNG", "JPEG"):
        out = decode_image(_encode(grey, fmt))
        assert out.shape == (12, 20, 3)
        np.testing.assert_array_equal(out[..., 0], out[..., 1])
        np.testing.assert_array_equal(out[..., 0], out[..., 2])
    np.testing.assert_array_equal(decode_image(_encode(grey, "PNG"))[..., 0], grey)


def test_rgba_is_composited_on_white():
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[..., :3] = (10, 20, 30)
    rgba[:2, :, 3] = 255  # opaque top half
    rgba[2:, :, 3] = 0  # transparent bottom half
    out = decode_image(_encode(rgba, "PNG"))
    assert out.shape == (4, 6, 3)
    np.testing.assert_array_equal(out[:2], np.broadcast_to([10, 20, 30], (2, 6, 3)))
    np.testing.assert_array_equal(out[2:], np.full((2, 6, 3), 255))


def test_palette_cmyk_and_16bit_inputs():
    img = _smooth_image(16, 24)
    pal = Image.fromarray(img).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    buf = io.BytesIO()
    pal.save(buf, "PNG")
    np.testing.assert_array_equal(decode_image(buf.getvalue()), np.asarray(pal.convert("RGB")))

    buf = io.BytesIO()
    Image.fromarray(img).convert("CMYK").save(buf, "JPEG", quality=95)
    out = decode_image(buf.getvalue())
    assert out.shape == (16, 24, 3)
    assert np.abs(out.astype(np.int32) - img).mean() < 8.0

    deep = (np.arange(8 * 8, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    out = decode_image(_encode(deep, "PNG"))
    np.testing.assert_array_equal(out[..., 0], (deep >> 8).astype(np.uint8))


def test_corrupt_and_truncated_data_raise_value_error():
    rng = np.random.default_rng(1)
    with pytest.raises(ValueError, match="cannot decode image"):
        decode_image(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError):
        decode_image(b"")
    jpeg = _encode(_random_image(128, 160), "JPEG", quality=90)
    half = jpeg[: len(jpeg) // 2]
    for fn in (decode_image, lambda d: decode_and_resize(d, 64), lambda d: split_encoded(d, 32, 1, 4)):
        with pytest.raises(ValueError, match="cannot decode image"):
            fn(half)
    png = _encode(_random_image(64, 64), "PNG")
    with pytest.raises(ValueError):
        decode_image(png[: len(png) // 2])


def test_jpeg_draft_decodes_at_reduced_scale_but_not_below_max_side():
    jpeg = _encode(_smooth_image(768, 1024), "JPEG", quality=90)
    out = decode_image(jpeg, max_side=300)
    h, w, _ = out.shape
    assert h >= 300 and w >= 300
    assert h < 768 and w < 1024
    assert (h, w) == (384, 512)  # 1/2 scale; 1/4 would give 192 < 300
    assert decode_image(jpeg, max_side=100).shape == (192, 256, 3)  # 1/4; 1/8 gives 96 < 100
    assert decode_image(jpeg, max_side=2000).shape == (768, 1024, 3)  # never upscales
    # Non-JPEG formats ignore the hint.
    assert decode_image(_encode(_smooth_image(100, 120), "PNG"), max_side=10).shape == (100, 120, 3)


def test_decode_and_resize_matches_full_decode_then_resize():
    img = _smooth_image(768, 1024)
    jpeg = _encode(img, "JPEG", quality=95)
    out = decode_and_resize(jpeg, 224)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    reference = resize(decode_image(jpeg), (224, 224))
    assert np.abs(out.astype(np.int32) - reference).mean() < 6.0
    # A PNG has no draft: identical to decode + resize.
    png = _encode(img[:300, :400], "PNG")
    np.testing.assert_array_equal(decode_and_resize(png, 128), resize(decode_image(png), (128, 128)))


def test_resize_shapes_and_identity():
    img = _random_image(30, 40)
    assert resize(img, (30, 40)) is img
    out = resize(img, (15, 60))
    assert out.shape == (15, 60, 3) and out.dtype == np.uint8
    flat = np.full((30, 40, 3), 77, np.uint8)
    np.testing.assert_array_equal(resize(flat, (7, 9)), np.full((7, 9, 3), 77))
    with pytest.raises(ValueError):
        resize(img.astype(np.float32), (10, 10))


# --------------------------------------------------------------------------- #
# Dynamic splitting
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "h, w, tile, lo, hi, expected",
    [
        # Only 3x3 (2016 x 2016 canvas) holds 2000 x 2000 without downscaling.
        (2000, 2000, 672, 4, 9, (3, 3)),
        # 2x2 (1344 x 1344) already holds 1000 x 1000: least waste among lossless grids.
        (1000, 1000, 672, 4, 9, (2, 2)),
        # Tall 1:4 fits 4x1 exactly: no downscale, zero waste.
        (2688, 672, 672, 4, 9, (4, 1)),
        # 700 x 1400 needs n_h >= 2 and n_w >= 3 (2 * 672 = 1344 < 1400) to be lossless;
        # 2x3 is the lossless grid with the least waste (2x4 wastes more).
        (700, 1400, 672, 4, 9, (2, 3)),
        # Wide strip: only the width limits the scale, so more columns always help.
        (336, 2000, 336, 1, 4, (1, 4)),
        # Every grid keeps 1000 x 1000 at scale 0.672: 1x1 wastes nothing.
        (1000, 1000, 672, 1, 3, (1, 1)),
        # Tiny image, at least 4 tiles: 1x4, 2x2, 4x1 tie on resolution, waste and
        # count; 2x2 matches the square aspect ratio.
        (100, 100, 672, 4, 9, (2, 2)),
        (100, 100, 672, 1, 9, (1, 1)),
    ],
)
def test_choose_grid_exact_cases(h, w, tile, lo, hi, expected):
    assert choose_grid(h, w, tile, lo, hi) == expected


def _effective(h, w, tile, n_h, n_w):
    scale = min(n_h * tile / h, n_w * tile / w)
    return min(h * w * scale * scale, h * w)


def test_choose_grid_is_within_bounds_and_maximises_resolution():
    rng = np.random.default_rng(2)
    for _ in range(200):
        h, w = (int(v) for v in rng.integers(16, 4000, 2))
        tile = int(rng.choice([224, 336, 378, 672]))
        lo = int(rng.integers(1, 6))
        hi = int(rng.integers(lo, 13))
        n_h, n_w = choose_grid(h, w, tile, lo, hi)
        assert lo <= n_h * n_w <= hi
        best = max(_effective(h, w, tile, a, b) for a in range(1, hi + 1) for b in range(1, hi // a + 1) if a * b >= lo)
        assert math.isclose(_effective(h, w, tile, n_h, n_w), best, rel_tol=1e-9)


@pytest.mark.parametrize(
    "args, name",
    [
        ((100, 100, 0, 1, 4), "tile"),
        ((100, 100, 336, 0, 4), "min_tiles"),
        ((100, 100, 336, 5, 4), "max_tiles"),
        ((0, 100, 336, 1, 4), "height"),
    ],
)
def test_choose_grid_rejects_invalid_arguments(args, name):
    with pytest.raises(ValueError, match=name):
        choose_grid(*args)


def test_split_image_tiles_and_overview():
    tile = 32
    img = _random_image(50, 100, seed=3)
    tiles, (n_h, n_w) = split_image(img, tile, 2, 8)
    assert (n_h, n_w) == choose_grid(50, 100, tile, 2, 8)
    assert tiles.shape == (n_h * n_w + 1, tile, tile, 3) and tiles.dtype == np.uint8
    np.testing.assert_array_equal(tiles[-1], resize(img, (tile, tile)))
    canvas = resize(img, (n_h * tile, n_w * tile))
    rows = [np.concatenate(list(tiles[r * n_w : (r + 1) * n_w]), axis=1) for r in range(n_h)]
    np.testing.assert_array_equal(np.concatenate(rows, axis=0), canvas)
    # Row-major: the second tile is to the right of the first.
    if n_w > 1:
        np.testing.assert_array_equal(tiles[1], canvas[:tile, tile : 2 * tile])

    no_overview, grid = split_image(img, tile, 2, 8, overview=False)
    assert grid == (n_h, n_w)
    np.testing.assert_array_equal(no_overview, tiles[:-1])


def test_split_encoded_matches_split_image():
    img = _smooth_image(90, 200)
    png = _encode(img, "PNG")
    tiles, grid = split_encoded(png, 48, 1, 6)
    ref_tiles, ref_grid = split_image(img, 48, 1, 6)
    assert grid == ref_grid
    np.testing.assert_array_equal(tiles, ref_tiles)

    big = _smooth_image(1200, 1600)
    jpeg = _encode(big, "JPEG", quality=95)
    tiles, grid = split_encoded(jpeg, 64, 1, 4)  # the decoder can use 1/4 scale here
    ref_tiles, ref_grid = split_image(decode_image(jpeg), 64, 1, 4)
    assert grid == ref_grid and tiles.shape == ref_tiles.shape
    assert np.abs(tiles.astype(np.int32) - ref_tiles).mean() < 6.0
