"""Vision-language connectors: ViT patch features -> `num_tokens` LLM embeddings.

All connectors map `[batch, num_patches, vit_embed]` to
`[batch, num_tokens, embed]` and are selected by name from `CONNECTORS`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmjax.models.attention import Attention
from mmjax.models.layers import Conv2D, Dense, LayerNorm, make_param
from mmjax.models.partitioning import constrain
from mmjax.models.stack import LayerStack
from mmjax.models.vit import interpolate_pos_embed
from mmjax.errors import ConfigError


def _square(n: int, what: str) -> int:
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{what}={n} must be a perfect square (a side x side grid).")
    return side


def adaptive_avg_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
    """`[out_size, in_size]` averaging weights equal to torch's adaptive_avg_pool
    (bin i covers floor(i*n/m) .. ceil((i+1)*n/m))."""
    weights = np.zeros((out_size, in_size), np.float32)
    for i in range(out_size):
        start = (i * in_size) // out_size
        end = -((-(i + 1) * in_size) // out_size)
        weights[i, start:end] = 1.0 / (end - start)
    return weights


def adaptive_avg_pool2d(x: jax.Array, out_size: int) -> jax.Array:
    """x `[b, h, w, c]` -> `[b, out_size, out_size, c]` adaptive average pool
    (in x's dtype)."""
    ph = jnp.asarray(adaptive_avg_pool_matrix(x.shape[1], out_size), x.dtype)
    pw = jnp.asarray(adaptive_avg_pool_matrix(x.shape[2], out_size), x.dtype)
    # Batch-sharded in and out: left free, GSPMD splits the pooling matmul's
    # backward pass over the features instead and rematerialises it whole.
    x = constrain(x, ("batch", None, None, None))
    return constrain(jnp.einsum("ih,jw,bhwc->bijc", ph, pw, x), ("batch", None, None, None))


class ResBlock(nnx.Module):
    """Bottleneck residual block (1x1 -> 3x3 -> 1x1, LayerNorm, SiLU), NHWC."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        hidden = channels
        self.conv1 = Conv2D(channels, hidden, 1, rngs=rngs, dtype=dtype)
        self.norm1 = LayerNorm(hidden, rngs=rngs, logical_axes=("conv_out",))
        self.conv2 = Conv2D(hidden, hidden, 3, rngs=rngs, dtype=dtype)
        self.norm2 = LayerNorm(hidden, rngs=rngs, logical_axes=("conv_out",))
        self.conv3 = Conv2D(hidden, channels, 1, rngs=rngs, dtype=dtype)
        self.norm3 = LayerNorm(channels, rngs=rngs, logical_axes=("conv_out",))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.nn.silu(self.norm1(self.conv1(x)))
        y = jax.nn.silu(self.norm2(self.conv2(y)))
        y = self.norm3(self.conv3(y))
        return jax.nn.silu(x + y)


class ResStage(nnx.Module):
    """Optional input projection followed by `depth` ResBlocks, listed or
    (`scan=True`) stacked with a leading `layers` axis and applied with
    `jax.lax.scan`, so the compiled program holds one block.

    A scanned block keeps only its input and its convolutions' outputs for
    the backward pass (remat policy "dots") and recomputes the LayerNorms and
    SiLUs from them, as XLA's fusions do for listed blocks; otherwise the scan
    would stack every float32 LayerNorm intermediate of every block."""

    def __init__(self, in_channels: int, channels: int, depth: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 scan: bool = False):
        self.proj = Conv2D(in_channels, channels, 1, rngs=rngs, dtype=dtype) if in_channels != channels else None
        self.blocks = LayerStack(lambda r: ResBlock(channels, rngs=r, dtype=dtype), depth, rngs=rngs, scan=scan,
                                 remat="dots" if scan else "")

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.proj is not None:
            x = self.proj(x)
        return self.blocks(x)


class CAbstractor(nnx.Module):
    """Honeybee C-Abstractor: pos-emb -> ResNet stage -> adaptive average pool
    to sqrt(k) x sqrt(k) -> ResNet stage -> MLP readout.

    Config fields: num_tokens (a perfect square), hidden, depth, scan (each
    stage's ResBlocks stacked and scanned; default False).
    """

    def __init__(self, cfg, *, vit_embed: int, num_patches: int, embed: int,
                 rngs: nnx.Rngs, dtype=jnp.float32):
        side = math.isqrt(cfg.num_tokens)
        if side * side != cfg.num_tokens:
            raise ConfigError(f"config.model.connector.num_tokens={cfg.num_tokens} must be a perfect square for c_abstractor.")
        grid = math.isqrt(num_patches)
        if grid * grid != num_patches:
            raise ValueError(f"c_abstractor needs a square patch grid, got {num_patches} patches.")
        self.side, self.grid = side, grid
        self.pos_embed = make_param(rngs, nnx.initializers.normal(0.02), (num_patches, vit_embed),
                                    ("patches", "vit_embed"))
        scan = bool(cfg.get("scan", False))
        self.stage1 = ResStage(vit_embed, cfg.hidden, cfg.depth, rngs=rngs, dtype=dtype, scan=scan)
        self.stage2 = ResStage(cfg.hidden, cfg.hidden, cfg.depth, rngs=rngs, dtype=dtype, scan=scan)
        self.readout1 = Dense(cfg.hidden, embed, ("conv_out", "embed"), rngs=rngs, use_bias=True, dtype=dtype)
        self.readout2 = Dense(embed, embed, ("embed_in", "embed"), rngs=rngs, use_bias=True, dtype=dtype)

    def __call__(self, features: jax.Array) -> jax.Array:
        """features `[b, num_patches, vit_embed]` -> `[b, num_tokens, embed]`."""
        b, n, _ = features.shape
        grid = _square(n, "patches")
        pos = interpolate_pos_embed(self.pos_embed[...], grid).astype(features.dtype)
        x = (features + pos).reshape(b, grid, grid, -1)
        x = self.stage1(x)
        x = adaptive_avg_pool2d(x, self.side)
        x = self.stage2(x)
        # Batch-sharded like the ViT features: without these marks GSPMD shards
        # the readout on the kernels' fsdp axis and then has to rematerialise
        # the whole activation to return to the batch layout.
        x = constrain(x.reshape(b, self.side * self.side, -1), ("batch", None, None))
        x = constrain(jax.nn.silu(self.readout1(x)), ("batch", None, "act_embed"))
        return constrain(self.readout2(x), ("batch", None, "act_embed"))


class AveragePool(nnx.Module):
    """n x n average pooling to sqrt(k) x sqrt(k) tokens, then a linear map.
    Config fields: num_tokens (a perfect square)."""

    def __init__(self, cfg, *, vit_embed: int, num_patches: int, embed: int,
                 rngs: nnx.Rngs, dtype=jnp.float32):
        self.side, self.grid = _square(cfg.num_tokens, "num_tokens"), _square(num_patches, "patches")
        self.proj = Dense(vit_embed, embed, ("vit_embed", "embed"), rngs=rngs, use_bias=True, dtype=dtype)

    def __call__(self, features: jax.Array) -> jax.Array:
        """features `[b, num_patches, vit_embed]` -> `[b, num_tokens, embed]`."""
        b, n, c = features.shape
        grid = _square(n, "patches")
        x = adaptive_avg_pool2d(features.reshape(b, grid, grid, c), self.side)
        return self.proj(x.reshape(b, self.side * self.side, c))


class AttentionPool(nnx.Module):
    """k learned queries cross-attend to the (position-embedded) patch
    features, then LayerNorm and a linear map. Config fields: num_tokens, heads."""

    def __init__(self, cfg, *, vit_embed: int, num_patches: int, embed: int,
                 rngs: nnx.Rngs, dtype=jnp.float32):
        if vit_embed % cfg.heads:
            raise ConfigError(f"config.model.connector.heads={cfg.heads} does not divide vit embed {vit_embed}.")
        self.queries = make_param(rngs, nnx.initializers.normal(0.02), (cfg.num_tokens, vit_embed),
                                  ("image_tokens", "vit_embed"))
        self.pos_embed = make_param(rngs, nnx.initializers.normal(0.02), (num_patches, vit_embed),
                                    ("patches", "vit_embed"))
        self.attn = Attention(vit_embed, cfg.heads, cfg.heads, vit_embed // cfg.heads, rngs=rngs,
                              embed_axis="vit_embed", use_bias=True, dtype=dtype)
        self.norm = LayerNorm(vit_embed, rngs=rngs)
        self.proj = Dense(vit_embed, embed, ("vit_embed", "embed"), rngs=rngs, use_bias=True, dtype=dtype)

    def __call__(self, features: jax.Array) -> jax.Array:
        """features `[b, num_patches, vit_embed]` -> `[b, num_tokens, embed]`."""
        b = features.shape[0]
        pos = interpolate_pos_embed(self.pos_embed[...], _square(features.shape[1], "patches"))
        queries = jnp.broadcast_to(self.queries[...], (b,) + self.queries.shape).astype(features.dtype)
        pooled = self.attn.cross(queries, features + pos.astype(features.dtype))
        return self.proj(self.norm(pooled))


CONNECTORS = {"c_abstractor": CAbstractor, "avg_pool": AveragePool, "attention_pool": AttentionPool}


def make_connector(cfg, *, vit_embed: int, num_patches: int, embed: int, rngs: nnx.Rngs, dtype=jnp.float32):
    """Builds the connector named by `cfg.kind`."""
    if cfg.kind not in CONNECTORS:
        raise ConfigError(f"config.model.connector.kind={cfg.kind!r} is unknown; choose one of {sorted(CONNECTORS)}.")
    return CONNECTORS[cfg.kind](cfg, vit_embed=vit_embed, num_patches=num_patches,
                                embed=embed, rngs=rngs, dtype=dtype)
