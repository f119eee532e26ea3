"""A stack of identical layers, either a Python list or stacked for
`jax.lax.scan`, with optional rematerialisation.

Scanned stacks hold each parameter with a leading `layers` dimension (logical
axis `layers`), so compile time does not grow with depth.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx


_CP = jax.checkpoint_policies
# Activations `Attention` tags with `checkpoint_name`: the q/k/v projections
# `[b, s, heads, d]` and the attention context before the output projection.
QKV_NAMES = ("query_proj", "key_proj", "value_proj")
ATTENTION_NAMES = QKV_NAMES + ("attention_context",)
_HOST = dict(offload_src="device", offload_dst="pinned_host")

# remat policy name -> what the backward pass may keep instead of recomputing
REMAT_POLICIES = {
    "full": None,  # keep nothing: recompute the whole layer
    "dots": _CP.checkpoint_dots,
    "dots_no_batch": _CP.dots_with_no_batch_dims_saveable,  # matmul outputs without batch dims
    "qkv_proj": _CP.save_only_these_names(*QKV_NAMES),  # recompute attention and MLP
    "attention": _CP.save_only_these_names(*ATTENTION_NAMES),  # recompute only the MLP
    # the same activations kept in host memory between the passes
    "qkv_proj_offload": _CP.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=list(QKV_NAMES), **_HOST),
    "attention_offload": _CP.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=list(ATTENTION_NAMES), **_HOST),
    "dots_no_batch_offload": _CP.offload_dot_with_no_batch_dims(**_HOST),
}
# Policies that move activations to host memory (`pinned_host`).
OFFLOAD_POLICIES = frozenset(name for name in REMAT_POLICIES if name.endswith("_offload"))


def _prepend_layers_axis(stack: nnx.Module) -> None:
    for _, variable in nnx.iter_graph(stack):
        if isinstance(variable, nnx.Variable):
            axes = variable.get_metadata().get("logical_axes")
            if axes is not None:
                variable.set_metadata(logical_axes=("layers",) + tuple(axes))


class LayerStack(nnx.Module):
    """`depth` layers built by `make_layer(rngs)` (or `make_layer(rngs, index)`
    when `indexed=True`, list mode only); called as `stack(x, *args,
    num_layers=None)`. A layer maps `x -> x`, or `x -> (x, aux)` with `aux` a
    dict of arrays; then the stack returns `(x, aux)` with each aux value
    stacked over the layers that produced one `[n, ...]`.

    Args:
      scan: store parameters stacked and apply with `jax.lax.scan`.
      remat: "" (off) or a policy name from REMAT_POLICIES: recompute each
        layer's activations in the backward pass, keeping what the policy saves.
    """

    def __init__(self, make_layer: Callable[..., nnx.Module], depth: int, *,
                 rngs: nnx.Rngs, scan: bool = False, remat: str = "", indexed: bool = False):
        if remat is True:
            remat = "full"
        if remat and remat not in REMAT_POLICIES:
            raise ValueError(f"remat={remat!r} is not a policy; choose '' or one of {sorted(REMAT_POLICIES)}.")
        self.depth, self.scan, self.remat = depth, scan, remat or ""
        if scan and indexed:
            raise ValueError("layers that differ by index (e.g. MoE every n-th layer) cannot be scanned")
        if scan:
            @nnx.split_rngs(splits=depth)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make_stacked(r):
                return make_layer(r)

            self.layers = make_stacked(rngs)
            _prepend_layers_axis(self.layers)
        else:
            self.layers = nnx.List([make_layer(rngs, i) if indexed else make_layer(rngs) for i in range(depth)])

    def __call__(self, x: jax.Array, *args, num_layers: int | None = None) -> jax.Array:
        n = self.depth if num_layers is None else num_layers
        if not 0 <= n <= self.depth:
            raise ValueError(f"num_layers={n} is outside 0..{self.depth}")
        if not self.scan:
            auxes, has_aux = [], False
            for layer in list(self.layers)[:n]:
                if self.remat:
                    out = nnx.remat(lambda l, h: l(h, *args), policy=REMAT_POLICIES[self.remat])(layer, x)
                else:
                    out = layer(x, *args)
                if isinstance(out, tuple):
                    has_aux = True
                    x, aux = out
                    if aux:
                        auxes.append(aux)
                else:
                    x = out
            if not has_aux:
                return x
            stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *auxes) if auxes else {}
            return x, stacked
        graphdef, state = nnx.split(self.layers)
        state = jax.tree.map(lambda a: a[:n], state)

        def body(h, layer_state):
            out = nnx.merge(graphdef, layer_state)(h, *args)
            return out if isinstance(out, tuple) else (out, None)

        if self.remat:
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat])
        x, aux = jax.lax.scan(body, x, state)
        return x if aux is None else (x, aux)

    def layer(self, index: int) -> nnx.Module:
        """The `index`-th layer (a view with unstacked parameters when scanned)."""
        if not self.scan:
            return self.layers[index]
        graphdef, state = nnx.split(self.layers)
        return nnx.merge(graphdef, jax.tree.map(lambda a: a[index], state))
