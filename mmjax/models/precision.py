"""Mixed precision: cast the float32 master weights to the compute dtype
once per step instead of at every use.

A module that casts some of its parameters to its compute dtype `self.dtype`
each time it uses them names those parameters in a class attribute
`cast_at_use` (Dense and Conv2D kernels and biases, the MoE experts).
`cast_weights_once(model)` replaces each such parameter of a merged model by
its cast copy before the forward pass; the per-use casts then become no-ops.
Inside a jitted train step (`model = nnx.merge(graphdef, params)`) the cast
is part of the differentiated function, so gradients still reach the float32
parameters. Compared with casting at every use it converts each FSDP shard
once (not each gathered copy at every use, again in the rematerialised
forward pass and in the backward pass) and all-gathers half the bytes.
Parameters without the attribute (norm scales, the MoE router, the token
embedding table, position embeddings) keep their stored dtype.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx
from mmjax.errors import ConfigError

# config.model.dtype -> compute dtype (parameters are always stored in float32)
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str):
    """The compute dtype `config.model.dtype` names (ValueError naming the field otherwise)."""
    if name not in COMPUTE_DTYPES:
        raise ConfigError(f"config.model.dtype={name!r}; choose one of {sorted(COMPUTE_DTYPES)}.")
    return COMPUTE_DTYPES[name]


def cast_weights_once(model: nnx.Module) -> int:
    """Casts, in place, every parameter a module lists in `cast_at_use` to
    that module's `dtype` when it differs. Returns how many were cast."""
    cast = 0
    for _, module in nnx.iter_graph(model):
        names = getattr(type(module), "cast_at_use", ())
        dtype = getattr(module, "dtype", None)
        if not names or dtype is None:
            continue
        for name in names:
            variable = getattr(module, name, None)
            if not isinstance(variable, nnx.Variable):
                continue
            value = variable.get_value()
            if jnp.issubdtype(value.dtype, jnp.floating) and value.dtype != jnp.dtype(dtype):
                variable.set_value(value.astype(dtype))
                cast += 1
    return cast
