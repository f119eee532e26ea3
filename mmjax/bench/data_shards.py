"""Generated WebDataset shards for the input-pipeline benchmark.

`prepare_shards(shard_dir, bench)` writes (once; reused while the generation
settings recorded in `manifest.json` match) tar shards of the three streams:
caption samples (a JPEG of a smooth picture with shapes and mild noise, and
a 15-30 word caption), interleaved documents (2-6 JPEGs with paragraphs
between, 100-400 words) and text documents (300-800 words).
`read_images(paths)` returns every image member's bytes (the bare decode
loop's input).
"""

from __future__ import annotations

import io
import itertools
import json
import os
import tarfile
import time
from collections.abc import Iterable

import numpy as np

STREAMS = ("caption", "interleaved", "text")
_MANIFEST = "manifest.json"
_INCOMPLETE = ".generating"
_GENERATOR_VERSION = 1
_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")

_WORDS = tuple("""
the a of and to in is was for on with as by at from that this it an be are or which
one two three four five six seven many few some every each other small large long short
red green blue yellow orange purple black white grey brown dark light bright pale golden
dog cat bird horse tree river mountain city street house window door garden field road
boat bridge train car bicycle table chair book lamp cup plate bottle flower cloud sky sun
moon star water stone wall roof tower market shop child woman man people family friend
walks runs sits stands looks shows holds carries opens crosses follows watches waits turns
near under over behind beside between across along around through inside outside above
morning evening night summer winter spring autumn day week year old new quiet busy warm cold
picture photo image view scene detail corner edge center middle side front back top bottom
early late slowly quickly together alone again still almost always often never sometimes
village forest lake beach island valley hill path wood glass metal paper cloth painted
""".split())



def _words(rng: np.random.Generator, n: int) -> str:
    """`n` words from the fixed list, as sentences of 6-14 words."""
    picks = rng.integers(0, len(_WORDS), n)
    out, left = [], 0
    for i, w in enumerate(picks):
        word = _WORDS[w]
        if left == 0:
            word = word.capitalize()
            left = int(rng.integers(6, 15))
        left -= 1
        out.append(word + ("." if left == 0 or i == n - 1 else ""))
    return " ".join(out)


def _paragraphs(rng: np.random.Generator, n_words: int, n_parts: int) -> list[str]:
    """`n_words` words split into `n_parts` non-empty paragraphs."""
    cuts = np.sort(rng.choice(np.arange(1, n_words), n_parts - 1, replace=False)) if n_parts > 1 else []
    bounds = [0, *[int(c) for c in cuts], n_words]
    return [_words(rng, b - a) for a, b in itertools.pairwise(bounds)]


def _picture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A structured picture (uint8 [h, w, 3]): a two-colour gradient in a random
    direction, 4-10 filled shapes and mild pixel noise. Photographs compress
    and decode like this far more than like pure noise."""
    from PIL import Image, ImageDraw, ImageFilter

    angle = rng.uniform(0, 2 * np.pi)
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    t = (np.cos(angle) * x + np.sin(angle) * y)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    c0, c1 = rng.uniform(0, 255, 3).astype(np.float32), rng.uniform(0, 255, 3).astype(np.float32)
    base = c0 + t[..., None] * (c1 - c0)
    img = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(4, 11))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1 = min(width, x0 + int(rng.integers(width // 10, width // 2)))
        y1 = min(height, y0 + int(rng.integers(height // 10, height // 2)))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        kind = int(rng.integers(0, 3))
        if kind == 0:
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif kind == 1:
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=fill)
    img = img.filter(ImageFilter.GaussianBlur(1.0))
    pixels = np.asarray(img, np.int16) + rng.integers(-6, 7, (height, width, 3), dtype=np.int16)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _jpeg(rng: np.random.Generator, size: tuple[int, int], quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_picture(rng, *size)).save(buf, "JPEG", quality=int(quality))
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def _write_shard(path: str, stream: str, shard: int, bench) -> int:
    """One tar shard of `stream`; returns the number of images in it."""
    rng = np.random.default_rng([_GENERATOR_VERSION, STREAMS.index(stream), shard])
    size, quality = tuple(bench.source_image_size), bench.jpeg_quality
    lo, hi = bench.interleaved_images
    n_images = 0
    tmp = f"{path}.{os.getpid()}.tmp"
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for r in range(bench.records_per_shard):
            key = f"{stream[:3]}{shard:04d}{r:06d}"
            if stream == "caption":
                _add(tar, f"{key}.jpg", _jpeg(rng, size, quality))
                _add(tar, f"{key}.txt", _words(rng, int(rng.integers(15, 31))).encode())
                n_images += 1
            elif stream == "interleaved":
                k = int(rng.integers(lo, hi + 1))
                texts = _paragraphs(rng, int(rng.integers(100, 401)), k + 1)
                segments = [{"text": texts[0]}]
                for i in range(k):
                    segments += [{"image": f"{i}.jpg"}, {"text": texts[i + 1]}]
                _add(tar, f"{key}.json", json.dumps({"segments": segments}).encode())
                for i in range(k):
                    _add(tar, f"{key}.{i}.jpg", _jpeg(rng, size, quality))
                n_images += k
            else:
                n = int(rng.integers(300, 801))
                _add(tar, f"{key}.txt", "\n\n".join(_paragraphs(rng, n, int(rng.integers(2, 6)))).encode())
    os.replace(tmp, path)
    return n_images


def _shard_name(stream: str, shard: int) -> str:
    return f"{stream}-{shard:04d}.tar"


def _settings(bench) -> dict:
    return dict(version=_GENERATOR_VERSION, num_shards=int(bench.num_shards),
                records_per_shard=int(bench.records_per_shard),
                source_image_size=[int(s) for s in bench.source_image_size],
                jpeg_quality=int(bench.jpeg_quality),
                interleaved_images=[int(s) for s in bench.interleaved_images])


def prepare_shards(shard_dir: str, bench, log=print, *, accept_existing: bool = False) -> dict[str, str]:
    """Makes sure `shard_dir` holds the shards; returns `config.data.sources`
    specs (stream -> "webdataset:..."). Shards generated earlier with the same
    settings (recorded in its manifest.json) are reused, anything else is
    generated afresh. With `accept_existing`, a directory holding
    `<stream>-*.tar` for every stream but no manifest (data prepared
    elsewhere) is used as it is."""
    os.makedirs(shard_dir, exist_ok=True)
    manifest, marker = os.path.join(shard_dir, _MANIFEST), os.path.join(shard_dir, _INCOMPLETE)
    settings = _settings(bench)
    if accept_existing and not os.path.exists(manifest) and not os.path.exists(marker):
        existing = [f for f in os.listdir(shard_dir) if f.endswith(".tar")]
        if all(any(f.startswith(f"{s}-") for f in existing) for s in STREAMS):
            log(f"[shards] using the shards in {shard_dir} as they are (no {_MANIFEST}: not generated here)")
            return {s: f"webdataset:{os.path.join(shard_dir, f'{s}-*.tar')}" for s in STREAMS}
    have = None
    if os.path.exists(manifest):
        with open(manifest) as f:
            have = json.load(f)
    n = settings["num_shards"]
    numbers = f"{{{0:04d}..{n - 1:04d}}}"
    specs = {s: f"webdataset:{os.path.join(shard_dir, f'{s}-{numbers}.tar')}" for s in STREAMS}
    names = [_shard_name(s, i) for s in STREAMS for i in range(n)]
    if have == settings and all(os.path.exists(os.path.join(shard_dir, x)) for x in names):
        log(f"[shards] reusing {len(names)} shards in {shard_dir}")
        return specs
    open(marker, "w").close()  # a run cut short leaves this: never mistaken for finished shards
    if os.path.exists(manifest):
        os.remove(manifest)
    t0 = time.perf_counter()
    log(f"[shards] generating {len(names)} shards ({settings['records_per_shard']} records each, "
        f"JPEG {settings['source_image_size'][0]}x{settings['source_image_size'][1]} "
        f"q{settings['jpeg_quality']}) in {shard_dir}")
    images = 0
    for stream in STREAMS:
        for i in range(n):
            images += _write_shard(os.path.join(shard_dir, _shard_name(stream, i)), stream, i, bench)
        log(f"[shards]   {stream}: {n} shards done ({time.perf_counter() - t0:.1f}s)")
    with open(manifest, "w") as f:
        json.dump(settings, f, indent=1)
    os.remove(marker)
    log(f"[shards] {images} images written in {time.perf_counter() - t0:.1f}s")
    return specs


def read_images(paths: Iterable[str]) -> list[bytes]:
    """Every image member's bytes, in tar order."""
    out = []
    for path in paths:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if member.isfile() and member.name.lower().endswith(_IMAGE_EXTS):
                    out.append(tar.extractfile(member).read())
    return out
