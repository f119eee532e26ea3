"""The analytic minimum of FSDP collective traffic per device per step,
the reference the compiled step's collectives are compared with.

Bytes received per device, as in `mmjax.bench.hlo_collectives`. A
parameter whose stored sharding splits it over f devices of the data/fsdp
axes (the `model` and `expert` axes are tensor and expert
parallelism: not gathered; a device's fsdp group gathers only its own
expert / tensor slice, of P bytes) is gathered for the forward pass and
again for the backward pass (ZeRO-3), its float32 gradient slice (G bytes)
is reduce-scattered, and the gradient shard is all-reduced over the r
devices that hold the same shard while computing on different batch shards:

  2 x P' x (f - 1) / f  +  G x (f - 1) / f  +  2 x (G / f) x (r - 1) / r

P' is P in the dtype the gather moves. With pure FSDP (data = expert =
model = 1) and float32 gathers this is the familiar 3 x P x (f - 1) / f per
sharded parameter, plus an all-reduce for the few that stay replicated.
`collective_ratio` = measured total / analytic total.

What the compiled program actually does differs per parameter, which is why
only the total is compared:
  * gather dtype: at the default matmul precision TPUs multiply float32 in
    bf16 passes, and XLA moves that conversion ahead of the all-gather, so
    matmul and convolution weights are gathered in bf16 even for a float32
    model; tables that are indexed (embeddings) or added (position
    embeddings), norm scales and biases are gathered in their stored dtype.
    `gather_dtype="matmul"` (the default for TPU meshes) models that
    (parameters named kernel / wi_gate / wi_up / wo / router with at least
    two dimensions in bf16); `gather_dtype="stored"` (the default for other
    devices) gathers everything in its stored dtype.
  * re-gathering: without rematerialisation XLA may keep a weight gathered
    in the forward pass alive for the backward pass (a single gather); with
    `remat="full"` the backward pass re-gathers, and may gather a weight
    twice (once for the recomputation, once for the gradient matmul).
  * gradients: XLA reduce-scatters most sharded gradients but all-reduces
    some in full (e.g. the embedding table) before slicing, which moves
    twice the bytes of a reduce-scatter.
On a 4-chip v5p with pure FSDP and whole-layer remat the totals agree within
a few percent once the decoder's weights dominate (tests/test_aot.py);
without remat the ratio is lower (0.8-0.95: fewer backward gathers). A
ratio well above 1 points at traffic beyond the weights: activation
resharding, MoE token exchange, or weights gathered more often than needed.
`largest_collectives` (and the report's "largest sources") names the
biggest contributors by the JAX operation they come from; e.g. MM1 3B-MoE on
v5p:4x8x8 (fsdp=32 x expert=8, capacity dispatch, whole-layer remat)
measures 1.35x the FSDP minimum: inside the expert einsums XLA moves the
weight gathers (forward and recomputation) and the gradient reductions as
collective-permute loops (51.6 GiB), and the token exchange adds 13.1 GiB of
all-to-alls. Before the capacity buffers were constrained
group-sharded beside the dispatch/combine einsums it was about 6x, mostly
all-gathers of whole expert outputs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np


_GATHERED_AXES = ("data", "fsdp")  # `model`: tensor parallel, `expert`: expert parallel
# Parameters used only as matmul / convolution operands (Linear, Conv and
# lm_head kernels, MoE expert weights, the router).
_MATMUL_WEIGHTS = ("kernel", "wi_gate", "wi_up", "wo", "router")


def _gathers_in_bf16(name: str, shape: tuple[int, ...]) -> bool:
    """Weights whose all-gather TPUs move in bf16 at the default matmul
    precision: matmul and convolution operands. Tables that are indexed or
    added (embeddings, position embeddings, class tokens), norm scales and
    biases are gathered in their stored dtype."""
    return len(shape) >= 2 and name in _MATMUL_WEIGHTS


@dataclasses.dataclass(frozen=True)
class FsdpAnalytic:
    """The analytic minimum of FSDP collectives per device per step (bytes
    received, module doc), by term."""

    all_gather_bytes: float       # forward + backward parameter gathers
    reduce_scatter_bytes: float   # gradient reduce-scatter
    all_reduce_bytes: float       # gradient all-reduce over replicas of a shard
    param_bytes: float            # all parameters, stored dtype
    sharded_param_bytes: float    # parameters split over at least 2 devices of data/fsdp
    gather_dtype: str

    @property
    def total(self) -> float:
        return self.all_gather_bytes + self.reduce_scatter_bytes + self.all_reduce_bytes

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "total": self.total}


def _param_name(path) -> str:
    """The parameter's own name (`kernel`, `scale`, ...) from its tree path."""
    keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    keys = [k for k in keys if k not in ("value", ".value")]
    return keys[-1] if keys else ""


def fsdp_collective_breakdown(setup_or_config, mesh_shape: Mapping[str, int] | None = None, *,
                              gather_dtype: str = "auto", batch_axes=None) -> FsdpAnalytic:
    """The analytic FSDP minimum (module doc) for a TrainSetup (its parameter
    shardings and mesh), or for a config and a mesh shape {axis: size} with
    every size given (shardings from `config.rules`).

    gather_dtype: "matmul" (matmul weights gathered in bf16, as TPUs do at
    the default precision), "stored" (everything in its stored dtype), or
    "auto": "matmul" for a TPU mesh and for a config, "stored" for a mesh of
    other devices (the host CPU keeps float32 matmuls in float32)."""
    import jax

    from mmjax.parallel import resolve_mesh_shape, tree_shardings
    from mmjax.parallel.mesh import MESH_AXES
    from mmjax.parallel.rules import get_layout
    from mmjax.train.state import abstract_model

    if gather_dtype not in ("auto", "matmul", "stored"):
        raise ValueError(f"gather_dtype={gather_dtype!r}; choose 'auto', 'matmul' or 'stored'.")
    if hasattr(setup_or_config, "state_shardings"):
        setup = setup_or_config
        params, shardings = setup.abstract_params, setup.state_shardings["params"]
        sizes = dict(setup.mesh.shape)
        if batch_axes is None:
            # every batch field is split over the same batch axes (an image classifier reads no tokens)
            spec = next(iter(setup.batch_shardings.values())).spec
            batch_axes = spec[0] if spec else None
        if gather_dtype == "auto":
            platform = getattr(setup.mesh.devices.flat[0], "platform", "tpu")
            gather_dtype = "matmul" if platform == "tpu" else "stored"
    else:
        config = setup_or_config
        given = {a: int(v) for a, v in dict(mesh_shape or {}).items()}
        if not given or min(given.values()) < 1:
            raise ValueError(f"mesh_shape={mesh_shape!r} must give positive axis sizes, e.g. {{'fsdp': 4}}.")
        sizes = resolve_mesh_shape(given, math.prod(given.values()))
        mesh = jax.sharding.AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES)
        _, params = abstract_model(config.model, config.train.seed)
        rules = get_layout(config.rules)
        shardings = tree_shardings(params, mesh, rules)
        if batch_axes is None:
            batch_axes = rules.get("batch")
        if gather_dtype == "auto":
            gather_dtype = "matmul"
    names = () if batch_axes is None else ((batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes))
    gather = reduce = allreduce = total = sharded = 0.0
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for (path, leaf), sharding in zip(leaves, jax.tree.leaves(shardings), strict=True):
        size, itemsize = math.prod(leaf.shape), np.dtype(leaf.dtype).itemsize
        used = {a for entry in sharding.spec if entry is not None
                for a in ((entry,) if isinstance(entry, str) else entry)}
        f = math.prod(sizes[a] for a in used if a in _GATHERED_AXES)
        # Elements of this device's expert / tensor slice: what its fsdp group gathers.
        local = size / math.prod(sizes[a] for a in used if a not in _GATHERED_AXES)
        # Devices that compute gradients for the same shard on different batch shards.
        r = math.prod(sizes[a] for a in names if a not in used and not ("expert" in used and a == "expert"))
        gather_itemsize = itemsize
        if gather_dtype == "matmul" and _gathers_in_bf16(_param_name(path), tuple(leaf.shape)):
            gather_itemsize = min(itemsize, 2)
        total += size * itemsize
        if f > 1:
            sharded += size * itemsize
            gather += 2.0 * local * gather_itemsize * (f - 1) / f
            reduce += 4.0 * local * (f - 1) / f
        if r > 1:
            allreduce += 2.0 * 4.0 * (local / f) * (r - 1) / r
    return FsdpAnalytic(gather, reduce, allreduce, total, sharded, gather_dtype)


def analytic_fsdp_collective_bytes(setup_or_config, mesh_shape: Mapping[str, int] | None = None, *,
                                   gather_dtype: str = "auto") -> float:
    """Minimum FSDP collective bytes received per device per step (module
    doc): `fsdp_collective_breakdown(...).total`."""
    return fsdp_collective_breakdown(setup_or_config, mesh_shape, gather_dtype=gather_dtype).total


# ---------------------------------------------------------------------------
# The report
