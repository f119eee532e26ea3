"""Spatial-aware region sampler (Ferret style): the ViT patch features inside
a region -> one region embedding for the decoder.

  features     `[b, P, vit_embed]` (one image per row) or `[b, n, P, vit_embed]`
               with `image_index` `[b, R]` (the image each region lies on;
               clipped into 0..n-1: an unused row has an empty mask anyway)
  masks        `[b, R, G, G]` float32 coverage of each grid cell in [0, 1],
               any grid side G: area-pooled to the sqrt(P) x sqrt(P) patch
               grid when G differs (row-major, as the ViT orders patches)
  -> `[b, R, embed]`

Ferret samples points inside the region, gathers each point's neighbours and
fuses them with their relative positions, then pools. Here the points are
the patches the region covers, with no random sampling:
  1. point features     h = W_f f + W_p pe(rel), `rel` the patch centre's
                        position inside the region's bounding box on the grid,
                        pe = (rel, sin/cos(2^k pi rel) for k < pos_freqs)
  2. neighbour fusion   h += W_n max over the 3x3 neighbours inside the region
                        of gelu(h_neighbour + e_offset)
  3. pooling            coverage-weighted mean and max of gelu(h) over the
                        region's points
  4. geometry           the bounding box (x1, y1, x2, y2) on the grid and the
                        covered area share -> W_g
  5. readout            Dense(3 hidden -> embed), gelu, Dense(embed -> embed)
A patch outside the region never reaches the output (it is neither pooled
nor anyone's neighbour); a region with an empty mask gets a zero embedding.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from mmjax.models.connectors import adaptive_avg_pool_matrix
from mmjax.models.layers import Dense, make_param
from mmjax.models.partitioning import constrain

_OFFSETS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))


def patch_grid_coverage(masks: jax.Array, grid: int) -> jax.Array:
    """masks `[b, R, G, G]` -> `[b, R, grid, grid]` float32 (area average;
    a cell is covered iff any masked cell it pools is)."""
    masks = masks.astype(jnp.float32)
    if masks.shape[-1] == grid and masks.shape[-2] == grid:
        return masks
    ph = jnp.asarray(adaptive_avg_pool_matrix(masks.shape[-2], grid))
    pw = jnp.asarray(adaptive_avg_pool_matrix(masks.shape[-1], grid))
    return jnp.einsum("ih,jw,brhw->brij", ph, pw, masks)


def region_frame(inside: jax.Array) -> tuple[jax.Array, jax.Array]:
    """inside bool `[b, R, g, g]` -> (box `[b, R, 4]` (x1, y1, x2, y2) as
    shares of the grid side, rel `[b, R, g, g, 2]` (x, y) of each patch
    centre inside that box, 0..1 within it). An empty mask gets the whole
    grid as its box."""
    g = inside.shape[-1]
    cells = jnp.arange(g, dtype=jnp.float32)

    def extent(occupied):  # occupied `[b, R, g]` -> (lo, hi) in cells
        lo = jnp.min(jnp.where(occupied, cells, g), axis=-1)
        hi = jnp.max(jnp.where(occupied, cells + 1, 0), axis=-1)
        nonempty = occupied.any(-1)
        return jnp.where(nonempty, lo, 0.0), jnp.where(nonempty, hi, float(g))

    y1, y2 = extent(inside.any(-1))
    x1, x2 = extent(inside.any(-2))
    rel_y = (cells + 0.5 - y1[..., None]) / (y2 - y1)[..., None]  # [b, R, g]
    rel_x = (cells + 0.5 - x1[..., None]) / (x2 - x1)[..., None]
    rel = jnp.stack(jnp.broadcast_arrays(rel_x[..., None, :], rel_y[..., :, None]), axis=-1)
    return jnp.stack([x1, y1, x2, y2], axis=-1) / g, rel


def fourier_features(rel: jax.Array, freqs: int) -> jax.Array:
    """`[..., 2]` -> `[..., 2 + 4 * freqs]`: rel, sin and cos of 2^k pi rel."""
    scales = jnp.pi * 2.0 ** jnp.arange(freqs, dtype=jnp.float32)
    angles = (rel[..., None, :] * scales[:, None]).reshape(rel.shape[:-1] + (2 * freqs,))
    return jnp.concatenate([rel, jnp.sin(angles), jnp.cos(angles)], axis=-1)


class RegionSampler(nnx.Module):
    """Config fields: hidden (point-feature width), pos_freqs (Fourier
    frequencies of a point's relative position)."""

    def __init__(self, cfg, *, vit_embed: int, embed: int, rngs: nnx.Rngs, dtype=jnp.float32):
        hidden, self.pos_freqs = cfg.hidden, cfg.pos_freqs
        self.point = Dense(vit_embed, hidden, ("vit_embed", "vit_mlp"), rngs=rngs, use_bias=True, dtype=dtype)
        self.position = Dense(2 + 4 * cfg.pos_freqs, hidden, (None, "vit_mlp"), rngs=rngs, dtype=dtype)
        self.offsets = make_param(rngs, nnx.initializers.normal(0.02), (len(_OFFSETS), hidden), (None, "vit_mlp"))
        self.fuse = Dense(hidden, hidden, (None, "vit_mlp"), rngs=rngs, use_bias=True, dtype=dtype)
        self.geometry = Dense(5, hidden, (None, "vit_mlp"), rngs=rngs, use_bias=True, dtype=dtype)
        self.readout1 = Dense(3 * hidden, embed, (None, "embed"), rngs=rngs, use_bias=True, dtype=dtype)
        self.readout2 = Dense(embed, embed, ("embed_in", "embed"), rngs=rngs, use_bias=True, dtype=dtype)

    def __call__(self, features: jax.Array, masks: jax.Array, image_index: jax.Array | None = None) -> jax.Array:
        """See the module doc: -> region embeddings `[b, R, embed]`."""
        b, R = masks.shape[:2]
        g = math.isqrt(features.shape[-2])
        if g * g != features.shape[-2]:
            raise ValueError(f"the region sampler needs a square patch grid, got {features.shape[-2]} patches")
        h = self.point(features)  # per patch: [b, (n,) P, hidden]
        if h.ndim == 4:
            index = jnp.clip(image_index, 0, h.shape[1] - 1)
            h = jnp.take_along_axis(h, index[:, :, None, None], axis=1)
        else:
            h = jnp.broadcast_to(h[:, None], (b, R) + h.shape[1:])
        h = constrain(h, ("batch", None, None, None))
        coverage = patch_grid_coverage(masks, g)  # [b, R, g, g]
        inside = coverage > 0
        nonempty = inside.any((-2, -1))  # [b, R]
        box, rel = region_frame(inside)
        h = h.reshape(b, R, g, g, -1) + self.position(fourier_features(rel, self.pos_freqs))
        h = h + self.fuse(self._neighbour_max(h, inside))
        p = jax.nn.gelu(h)
        lowest = jnp.finfo(p.dtype).min
        total = coverage.sum((-2, -1))  # [b, R]
        weighted = jnp.where(inside[..., None], p * coverage[..., None].astype(p.dtype), 0)
        mean = weighted.sum((2, 3)) / jnp.maximum(total, 1e-6)[..., None].astype(p.dtype)
        peak = jnp.where(inside[..., None], p, lowest).max((2, 3))
        peak = jnp.where(nonempty[..., None], peak, 0)
        geometry = jnp.concatenate([box, (total / (g * g))[..., None]], axis=-1)
        x = jnp.concatenate([mean, peak, jax.nn.gelu(self.geometry(geometry))], axis=-1)
        x = self.readout2(jax.nn.gelu(self.readout1(x)))
        x = jnp.where(nonempty[..., None], x, 0)
        return constrain(x, ("batch", None, "act_embed"))

    def _neighbour_max(self, h: jax.Array, inside: jax.Array) -> jax.Array:
        """h `[b, R, g, g, H]` -> per point the max over its 3x3 neighbours
        inside the region of gelu(h_neighbour + e_offset) (0 outside)."""
        g = h.shape[2]
        pad = ((0, 0), (0, 0), (1, 1), (1, 1))
        hp = jnp.pad(h, pad + ((0, 0),))
        ip = jnp.pad(inside, pad)
        offsets = self.offsets[...].astype(h.dtype)
        lowest = jnp.finfo(h.dtype).min
        fused = jnp.full(h.shape, lowest, h.dtype)
        for k, (dy, dx) in enumerate(_OFFSETS):
            neighbour = hp[:, :, 1 + dy:1 + dy + g, 1 + dx:1 + dx + g]
            present = ip[:, :, 1 + dy:1 + dy + g, 1 + dx:1 + dx + g, None]
            fused = jnp.maximum(fused, jnp.where(present, jax.nn.gelu(neighbour + offsets[k]), lowest))
        return jnp.where(inside[..., None], fused, 0)


def param_count(cfg, vit_embed: int, embed: int) -> int:
    """Analytic parameter count of `RegionSampler(cfg, ...)`."""
    h, f = cfg.hidden, cfg.pos_freqs
    return (vit_embed * h + h + (2 + 4 * f) * h + len(_OFFSETS) * h + h * h + h + 5 * h + h
            + 3 * h * embed + embed + embed * embed + embed)
