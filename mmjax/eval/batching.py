"""Prompts -> padded device batches on the training mesh, and the jitted
generation that runs on them.

A batch holds `tokens [b, P]` (right-padded), `lengths [b]` and, for models
that read images, `image_slots [b, P]` and `images [b, n, T, T, 3]` (and the
region fields when the prompts have region tokens). `P` is
rounded up to a multiple of `LENGTH_BUCKET` so that few shapes compile. Rows
past the last prompt repeat the first prompt and are dropped afterwards.
Arrays are placed with the training batch sharding (batch over the data
axes) from host copies every process holds, and results come back
replicated, so the same code runs on one process or many.
"""

from __future__ import annotations

from typing import Callable, Iterator

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from mmjax.eval.prompts import Prompt
from mmjax.generate.decode import Sampling, generate_fn

LENGTH_BUCKET = 32


def pad_batch(prompts: list[Prompt], batch_size: int, image_shape: tuple[int, ...] | None) -> dict:
    """Host arrays for `prompts` (at most `batch_size`), padded to `batch_size`
    rows; `image_shape` `(T, T, 3)` or None for text-only models."""
    rows = prompts + [prompts[0]] * (batch_size - len(prompts))
    length = -(-max(len(p.ids) for p in rows) // LENGTH_BUCKET) * LENGTH_BUCKET
    batch = {"tokens": np.zeros((batch_size, length), np.int32),
             "lengths": np.array([len(p.ids) for p in rows], np.int32)}
    if image_shape is not None:
        n = max(1, max(len(p.images) for p in rows))
        batch["image_slots"] = np.full((batch_size, length), -1, np.int32)
        batch["images"] = np.zeros((batch_size, n) + tuple(image_shape), np.uint8)
    for i, p in enumerate(rows):
        batch["tokens"][i, :len(p.ids)] = p.ids
        if image_shape is not None:
            batch["image_slots"][i, :len(p.ids)] = p.slots
            batch["images"][i, :len(p.images)] = p.images
    if image_shape is not None and any(p.regions is not None for p in rows):
        batch.update(_region_fields(rows, length))
    return batch


def _region_fields(rows: list[Prompt], length: int) -> dict:
    """`region_slots [b, P]` (-1 padding), `region_images [b, R]` (-1),
    `region_masks [b, R, G, G]` for prompts with region tokens (R: the most
    regions of a row, at least 1)."""
    known = [p.regions for p in rows if p.regions is not None]
    grid = known[0]["region_masks"].shape[-1]
    most = max(1, max(len(r["region_images"]) for r in known))
    out = {"region_slots": np.full((len(rows), length), -1, np.int32),
           "region_images": np.full((len(rows), most), -1, np.int32),
           "region_masks": np.zeros((len(rows), most, grid, grid), np.float32)}
    for i, p in enumerate(rows):
        if p.regions is None:
            continue
        r = p.regions
        out["region_slots"][i, :len(r["region_slots"])] = r["region_slots"]
        out["region_images"][i, :len(r["region_images"])] = r["region_images"]
        out["region_masks"][i, :len(r["region_masks"])] = r["region_masks"]
    return out


def place(batch: dict, mesh, batch_spec) -> dict:
    """Host arrays (the same on every process) -> global arrays split on their
    first dimension as `batch_spec` (a PartitionSpec entry) says."""
    out = {}
    for key, value in batch.items():
        sharding = NamedSharding(mesh, PartitionSpec(batch_spec, *([None] * (value.ndim - 1))))
        out[key] = jax.make_array_from_callback(value.shape, sharding, lambda index, v=value: v[index])
    return out


def chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class Generator:
    """`generate(params, prompts) -> [(token ids before the stop, stopped,
    the stop token or -1)]`, batch by batch on the mesh; `progress(n)` is
    called after each batch."""

    def __init__(self, abstract_model: nnx.Module, sampling: Sampling, mesh, resolver, batch_spec,
                 batch_size: int, image_shape: tuple[int, ...] | None):
        self.mesh, self.batch_spec, self.batch_size = mesh, batch_spec, batch_size
        self.image_shape, self.sampling = image_shape, sampling
        self.fn = generate_fn(abstract_model, sampling, resolver, NamedSharding(mesh, PartitionSpec()))

    def __call__(self, params, prompts: list[Prompt], progress: Callable[[int], None] = lambda n: None):
        out = []
        stops = set(self.sampling.stop_ids)
        for part in chunks(prompts, self.batch_size):
            batch = place(pad_batch(part, self.batch_size, self.image_shape), self.mesh, self.batch_spec)
            tokens, counts = jax.device_get(self.fn(params, batch, jax.random.key(0)))
            for row in range(len(part)):
                ids = tokens[row, :counts[row]].tolist()
                stopped = bool(ids) and ids[-1] in stops
                out.append((ids[:-1], True, ids[-1]) if stopped else (ids, False, -1))
            progress(len(part))
        return out
