"""Small building blocks whose parameters carry logical axis names.

Every parameter is an `nnx.Param` with metadata `logical_axes`, a tuple with
one name per dimension (None = never partitioned).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mmjax.models.partitioning import constrain

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]


def _tuple(x: int | Sequence[int]) -> tuple[int, ...]:
    return (x,) if isinstance(x, int) else tuple(x)


def make_param(
    rngs: nnx.Rngs,
    init: Initializer,
    shape: Sequence[int],
    logical_axes: Sequence[str | None],
    dtype=jnp.float32,
) -> nnx.Param:
    """Creates an nnx.Param of `shape` annotated with `logical_axes`."""
    if len(shape) != len(logical_axes):
        raise ValueError(f"shape {tuple(shape)} and logical axes {tuple(logical_axes)} differ in rank")
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), logical_axes=tuple(logical_axes))


def fan_in_init(fan_in: int, scale: float = 1.0) -> Initializer:
    """Truncated-normal-free variance scaling: std = scale / sqrt(fan_in)."""
    std = scale / math.sqrt(fan_in)
    return lambda key, shape, dtype: std * jax.random.normal(key, shape, dtype)


class Dense(nnx.Module):
    """Generalised linear map `y = x @ kernel (+ bias)`.

    x: `[..., *in_features]` -> y: `[..., *out_features]`; the kernel is
    `[*in_features, *out_features]` with `logical_axes` naming each dimension.
    Computes in `dtype` (kernel and bias cast at use unless
    `mmjax.models.precision.cast_weights_once` cast them already).
    """

    cast_at_use = ("kernel", "bias")

    def __init__(
        self,
        in_features: int | Sequence[int],
        out_features: int | Sequence[int],
        logical_axes: Sequence[str | None],
        *,
        rngs: nnx.Rngs,
        use_bias: bool = False,
        init_scale: float = 1.0,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        self.in_features = _tuple(in_features)
        self.out_features = _tuple(out_features)
        self.dtype = dtype
        fan_in = math.prod(self.in_features)
        self.kernel = make_param(
            rngs, fan_in_init(fan_in, init_scale), self.in_features + self.out_features,
            logical_axes, param_dtype,
        )
        self.bias = (
            make_param(rngs, nnx.initializers.zeros, self.out_features,
                       tuple(logical_axes)[len(self.in_features):], param_dtype)
            if use_bias else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        n_in = len(self.in_features)
        y = jnp.tensordot(x.astype(self.dtype), self.kernel[...].astype(self.dtype), axes=n_in)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Embed(nnx.Module):
    """Token embedding table `[vocab, embed]`; `attend` gives tied logits."""

    def __init__(self, vocab: int, features: int, *, rngs: nnx.Rngs,
                 logical_axes=("vocab", "embed"), dtype=jnp.float32, param_dtype=jnp.float32):
        self.dtype = dtype
        self.embedding = make_param(rngs, fan_in_init(1, 1.0), (vocab, features), logical_axes, param_dtype)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens `[batch, seq]` int -> `[batch, seq, embed]`.

        The table is gathered whole along `embed` first (FSDP all-gather;
        its gradient is a reduce-scatter), so the lookup never has to move a
        batch-sharded result onto an embed-sharded layout."""
        table = constrain(self.embedding[...], ("vocab", "act_embed"))
        return jnp.take(table, tokens, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """x `[batch, seq, embed]` -> logits `[batch, seq, vocab]`."""
        return jnp.einsum("bse,ve->bsv", x, self.embedding[...].astype(self.dtype))


class RMSNorm(nnx.Module):
    """Root-mean-square norm over the last dimension (float32 statistics)."""

    def __init__(self, features: int, *, rngs: nnx.Rngs, eps: float = 1e-6,
                 logical_axes=("embed",), param_dtype=jnp.float32):
        del rngs
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((features,), param_dtype), logical_axes=tuple(logical_axes))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm over the last dimension with scale and bias."""

    def __init__(self, features: int, *, rngs: nnx.Rngs, eps: float = 1e-5,
                 logical_axes=("vit_embed",), param_dtype=jnp.float32):
        del rngs
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((features,), param_dtype), logical_axes=tuple(logical_axes))
        self.bias = nnx.Param(jnp.zeros((features,), param_dtype), logical_axes=tuple(logical_axes))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


class Conv2D(nnx.Module):
    """2-D convolution, NHWC, SAME padding. x `[b, h, w, c_in]` -> `[b, h, w, c_out]`."""

    cast_at_use = ("kernel", "bias")

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *,
                 rngs: nnx.Rngs, use_bias: bool = True, param_dtype=jnp.float32, dtype=jnp.float32):
        self.dtype = dtype
        fan_in = kernel_size * kernel_size * in_channels
        self.kernel = make_param(
            rngs, fan_in_init(fan_in), (kernel_size, kernel_size, in_channels, out_channels),
            ("conv_height", "conv_width", "conv_in", "conv_out"), param_dtype,
        )
        self.bias = (make_param(rngs, nnx.initializers.zeros, (out_channels,), ("conv_out",), param_dtype)
                     if use_bias else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), self.kernel[...].astype(self.dtype), window_strides=(1, 1),
            padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class SwiGLU(nnx.Module):
    """x `[..., embed]` -> down(silu(gate(x)) * up(x)) `[..., embed]`."""

    def __init__(self, embed: int, mlp: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.gate = Dense(embed, mlp, ("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.up = Dense(embed, mlp, ("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.down = Dense(mlp, embed, ("mlp", "embed"), rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))
