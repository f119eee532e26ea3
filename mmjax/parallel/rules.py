"""Named layouts: tables mapping logical axis names to mesh axes.

Models declare parameters with logical names only (`embed`, `mlp`, `vocab`,
`vit_embed`, ...). A layout maps each name to a mesh axis, a tuple of mesh
axes, or None (replicated). Names a layout does not list are replicated.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mmjax.errors import ConfigError
from mmjax.parallel.mesh import mesh_axes_size

MeshAxes = str | tuple[str, ...] | None

# Batch-like axes are split over every data-parallel mesh axis; the expert axis
# acts as an extra data axis for the non-expert parts of the model.
_BATCH = ("data", "fsdp", "expert")

LAYOUTS: dict[str, dict[str, MeshAxes]] = {
    # ZeRO-3 style: weights split on their embedding dimension over `fsdp`,
    # hidden dimensions over `model` (size 1 unless tensor parallelism is on).
    "fsdp": {
        "batch": _BATCH,
        "embed": "fsdp",
        "vit_embed": "fsdp",
        "mlp": "model",
        "vit_mlp": "model",
        "heads": "model",
        "kv_heads": "model",
        "vocab": "model",
        # MOFI's entity head (mmjax/models/dual_encoder.py): its label axis, up to millions of labels,
        # split over model and fsdp (its input dimension stays whole). Its logits split their label axis
        # the same way, so each device multiplies the image features (gathered over model and fsdp) by
        # its own kernel piece and no piece moves; their rows split over the remaining batch axes.
        "entities": ("model", "fsdp"),
        "act_entities": ("model", "fsdp"),
        "act_entity_rows": ("data", "expert"),
        "expert": "expert",
        "conv_out": "model",
    },
    # Pure data parallelism: every weight replicated.
    "data_parallel": {"batch": _BATCH, "act_entity_rows": _BATCH},
}


class LayoutError(ConfigError):
    """A parameter cannot be partitioned as the layout asks."""


def get_layout(name_or_table: str | Mapping[str, MeshAxes]) -> dict[str, MeshAxes]:
    """Returns the rule table for a layout name (or passes a table through)."""
    if isinstance(name_or_table, str):
        if name_or_table not in LAYOUTS:
            raise LayoutError(
                f"config.rules={name_or_table!r} is not a known layout; choose one of {sorted(LAYOUTS)}."
            )
        return dict(LAYOUTS[name_or_table])
    return dict(name_or_table)


def logical_to_spec(
    logical_axes: Sequence[str | None],
    rules: Mapping[str, MeshAxes],
    mesh: Mesh | None = None,
    shape: Sequence[int] | None = None,
    where: str = "array",
) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec.

    A mesh axis is used at most once per array (first logical axis wins).
    With `mesh` and `shape`, mesh axes of size 1 are dropped and each
    partitioned dimension must divide evenly; otherwise LayoutError names
    `where`.
    """
    used: set[str] = set()
    spec: list[MeshAxes] = []
    for dim, name in enumerate(logical_axes):
        axes = rules.get(name) if name is not None else None
        names = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        names = tuple(a for a in names if a not in used)
        if mesh is not None:
            names = tuple(a for a in names if mesh.shape[a] > 1)
        used.update(names)
        entry: MeshAxes = None if not names else (names[0] if len(names) == 1 else names)
        if mesh is not None and shape is not None and entry is not None:
            size = mesh_axes_size(mesh, entry)
            if shape[dim] % size:
                raise LayoutError(
                    f"{where}: dimension {dim} ({name}, size {shape[dim]}) is not divisible "
                    f"by mesh axes {entry} of size {size}."
                )
        spec.append(entry)
    return PartitionSpec(*spec)


def tree_shardings(tree: Any, mesh: Mesh, rules: Mapping[str, MeshAxes]) -> Any:
    """NamedShardings for an nnx.State whose Variables carry `logical_axes`.

    Works on concrete or abstract (`nnx.eval_shape`) states; the result has a
    same structure as `tree`, with a NamedSharding as each Variable's value.
    """

    def one(path, variable):
        value = variable.get_value()
        axes = variable.get_metadata().get("logical_axes")
        where = jax.tree_util.keystr(path, simple=True, separator="/")
        if axes is None:
            axes = (None,) * len(value.shape)
        if len(axes) != len(value.shape):
            raise LayoutError(
                f"{where}: logical axes {axes} do not match its shape {tuple(value.shape)}."
            )
        return variable.replace(NamedSharding(mesh, logical_to_spec(axes, rules, mesh, value.shape, where)))

    return jax.tree_util.tree_map_with_path(
        one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


class ActivationResolver:
    """`(logical_axes, shape) -> NamedSharding` for `mmjax.models.partitioning`.

    When any dimension does not divide its mesh axes, the whole activation is
    replicated (all dimensions, not only that one) rather than failing:
    activation shapes vary by batch."""

    def __init__(self, mesh: Mesh, rules: Mapping[str, MeshAxes]):
        self.mesh, self.rules = mesh, dict(rules)

    def __call__(self, logical_axes, shape) -> NamedSharding:
        try:
            spec = logical_to_spec(logical_axes, self.rules, self.mesh, shape)
        except LayoutError:
            spec = logical_to_spec([None] * len(shape), self.rules, self.mesh)
        return NamedSharding(self.mesh, spec)

    def num_shards(self, logical_axis: str) -> int:
        return mesh_axes_size(self.mesh, logical_to_spec((logical_axis,), self.rules, self.mesh)[0])


def activation_resolver(mesh: Mesh, rules: Mapping[str, MeshAxes]) -> ActivationResolver:
    return ActivationResolver(mesh, rules)


def batch_sharding(mesh: Mesh, rules: Mapping[str, MeshAxes], ndim: int) -> NamedSharding:
    """Sharding for a batch-major array `[batch, ...]` of rank `ndim`."""
    spec = logical_to_spec(("batch",) + (None,) * (ndim - 1), rules, mesh)
    return NamedSharding(mesh, spec)
