"""Activation sharding hints by logical axis names.

Models call `constrain(x, ("batch", "seq", "act_embed"))` at layer
boundaries. Outside a training step this is a no-op; the training code
installs a resolver (logical axes + shape -> `jax.sharding.Sharding`) with
`activation_sharding(...)` around tracing, so models never see a mesh.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator, Sequence

import jax

Resolver = Callable[[Sequence[str | None], Sequence[int]], jax.sharding.Sharding]

_RESOLVER: contextvars.ContextVar[Resolver | None] = contextvars.ContextVar(
    "mmjax_activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(resolver: Resolver | None) -> Iterator[None]:
    """Within the block, `constrain` applies `resolver`'s shardings."""
    token = _RESOLVER.set(resolver)
    try:
        yield
    finally:
        _RESOLVER.reset(token)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on `x` by logical axis names (no-op without a resolver)."""
    resolver = _RESOLVER.get()
    if resolver is None:
        return x
    return jax.lax.with_sharding_constraint(x, resolver(tuple(logical_axes), x.shape))


def num_shards(logical_axis: str) -> int:
    """How many ways the active layout splits `logical_axis` (1 outside a
    training step). MoE uses it to derive its group count from the runtime
    mesh instead of freezing it in the config."""
    resolver = _RESOLVER.get()
    return 1 if resolver is None else resolver.num_shards(logical_axis)


def current_resolver() -> Resolver | None:
    """The active resolver (it carries `.mesh`), or None outside a training step."""
    return _RESOLVER.get()
