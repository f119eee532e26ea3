"""A stack of identical layers, either a Python list or stacked for
`jax.lax.scan`, with optional rematerialisation.

Scanned stacks hold each parameter with a leading `layers` dimension (logical
axis `layers`), so compile time does not grow with depth.
"""

from __future__ import annotations

from typing import Callable

import jax
from flax import nnx


def _prepend_layers_axis(stack: nnx.Module) -> None:
    for _, variable in nnx.iter_graph(stack):
        if isinstance(variable, nnx.Variable):
            axes = variable.get_metadata().get("logical_axes")
            if axes is not None:
                variable.set_metadata(logical_axes=("layers",) + tuple(axes))


class LayerStack(nnx.Module):
    """`depth` layers built by `make_layer(rngs)`; called as
    `stack(x, *args, num_layers=None)` where each layer maps `x -> x`.

    Args:
      scan: store parameters stacked and apply with `jax.lax.scan`.
      remat: recompute each layer's activations in the backward pass.
    """

    def __init__(self, make_layer: Callable[[nnx.Rngs], nnx.Module], depth: int, *,
                 rngs: nnx.Rngs, scan: bool = False, remat: bool = False):
        self.depth, self.scan, self.remat = depth, scan, remat
        if scan:
            @nnx.split_rngs(splits=depth)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make_stacked(r):
                return make_layer(r)

            self.layers = make_stacked(rngs)
            _prepend_layers_axis(self.layers)
        else:
            self.layers = nnx.List([make_layer(rngs) for _ in range(depth)])

    def __call__(self, x: jax.Array, *args, num_layers: int | None = None) -> jax.Array:
        n = self.depth if num_layers is None else num_layers
        if not 0 <= n <= self.depth:
            raise ValueError(f"num_layers={n} is outside 0..{self.depth}")
        if not self.scan:
            for layer in list(self.layers)[:n]:
                x = nnx.remat(lambda l, h: l(h, *args))(layer, x) if self.remat else layer(x, *args)
            return x
        graphdef, state = nnx.split(self.layers)
        state = jax.tree.map(lambda a: a[:n], state)

        def body(h, layer_state):
            return nnx.merge(graphdef, layer_state)(h, *args), None

        if self.remat:
            body = jax.checkpoint(body)
        return jax.lax.scan(body, x, state)[0]

    def layer(self, index: int) -> nnx.Module:
        """The `index`-th layer (a view with unstacked parameters when scanned)."""
        if not self.scan:
            return self.layers[index]
        graphdef, state = nnx.split(self.layers)
        return nnx.merge(graphdef, jax.tree.map(lambda a: a[index], state))
