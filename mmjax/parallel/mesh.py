"""Build a `jax.sharding.Mesh` over the axes (data, fsdp, expert[, model]).

`config.mesh` holds one size per axis; at most one size may be -1, which takes
whatever devices remain. Impossible meshes are rejected with one sentence
before anything is compiled.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
from jax.sharding import AxisType, Mesh

from mmjax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "expert", "model")


class MeshConfigError(ConfigError):
    """The requested mesh cannot be built from the available devices."""


def resolve_mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Returns {axis: size} for every axis in MESH_AXES with -1 filled in.

    Raises MeshConfigError naming the offending field when sizes are invalid
    or their product does not equal `num_devices`.
    """
    unknown = sorted(set(mesh_cfg) - set(MESH_AXES))
    if unknown:
        raise MeshConfigError(f"config.mesh has unknown axis {unknown[0]!r}; valid axes are {MESH_AXES}.")
    sizes = {axis: int(mesh_cfg.get(axis, 1)) for axis in MESH_AXES}
    fill = [a for a, s in sizes.items() if s == -1]
    bad = [a for a, s in sizes.items() if s == 0 or s < -1]
    if bad:
        raise MeshConfigError(f"config.mesh.{bad[0]}={sizes[bad[0]]} is invalid; use a positive size or -1.")
    if len(fill) > 1:
        raise MeshConfigError(f"config.mesh sets {fill} to -1; at most one axis may be -1.")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if fill:
        if num_devices % fixed:
            raise MeshConfigError(
                f"config.mesh fixes {fixed} devices, which does not divide the "
                f"{num_devices} available devices, so mesh.{fill[0]}=-1 cannot be filled."
            )
        sizes[fill[0]] = num_devices // fixed
    elif fixed != num_devices:
        shape = " x ".join(f"{a}={s}" for a, s in sizes.items())
        raise MeshConfigError(f"config.mesh ({shape}) needs {fixed} devices but {num_devices} are available.")
    return sizes


def mesh_axes_size(mesh: Mesh, axes: str | Sequence[str] | None) -> int:
    """Devices along a mesh axis, a tuple of axes (their product), or None (1)."""
    if axes is None:
        return 1
    return math.prod(mesh.shape[name] for name in ((axes,) if isinstance(axes, str) else axes))


def make_mesh(mesh_cfg: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Creates the device mesh with axis names MESH_AXES (size-1 axes kept)
    with `jax.make_mesh`, which orders devices along the physical topology;
    a shape it cannot lay out is a MeshConfigError, never a silent reshape.
    Axes are `AxisType.Auto` (the compiler propagates shardings).

    Args:
      mesh_cfg: mapping like {"data": 2, "fsdp": 2, "expert": 2}.
      devices: defaults to all of `jax.devices()`.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(mesh_cfg, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)
    except (ValueError, AssertionError, NotImplementedError) as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        layout = " x ".join(f"{a}={s}" for a, s in sizes.items())
        raise MeshConfigError(f"config.mesh ({layout}) cannot be laid out on these {len(devices)} "
                              f"{devices[0].device_kind} devices ({detail.rstrip('.')}).") from None
