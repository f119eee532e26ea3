"""Build a `jax.sharding.Mesh` over the axes (data, fsdp, expert[, model]).

`config.mesh` holds one size per axis; at most one size may be -1, which takes
whatever devices remain. Impossible meshes are rejected with one sentence
before anything is compiled.

Multislice (several TPU slices: ICI inside a slice, the data-center network,
DCN, between slices): `config.mesh.dcn_<axis>` says over how many slices an
axis is spread; `config.mesh.<axis>` stays the axis' whole size, so each
slice holds `<axis> / dcn_<axis>` of it (MaxText's `ici_*_parallelism` x
`dcn_*_parallelism` is mmjax's `mesh.<axis>`). The dcn sizes multiply to the
number of slices, read from the devices' `slice_index`. Default: `dcn_data=-1`
(the data axis spans every slice, as MaxText's default `dcn_data_parallelism=-1`)
and 1 for the other axes; on one slice (or on devices without a
`slice_index`: CPU, GPU) everything is 1. Over several slices the mesh is
`jax.experimental.mesh_utils.create_hybrid_device_mesh`: devices grouped by
slice, each slice laid out along its own physical topology, and the slices
placed along the dcn axes, so only collectives over a dcn-spread axis cross
slices.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
from jax.sharding import AxisType, Mesh

from mmjax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "expert", "model")
DCN_PREFIX = "dcn_"
DCN_KEYS = tuple(DCN_PREFIX + a for a in MESH_AXES)  # config.mesh.dcn_data, ...


def axis_settings(mesh_cfg: Mapping[str, int]) -> dict[str, int]:
    """`config.mesh` without the slice counts (`dcn_*`): the axis sizes as set."""
    return {k: v for k, v in dict(mesh_cfg).items() if not k.startswith(DCN_PREFIX)}


class MeshConfigError(ConfigError):
    """The requested mesh cannot be built from the available devices."""


def resolve_mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Returns {axis: size} for every axis in MESH_AXES with -1 filled in.

    Raises MeshConfigError naming the offending field when sizes are invalid
    or their product does not equal `num_devices`.
    """
    unknown = sorted(set(mesh_cfg) - set(MESH_AXES) - set(DCN_KEYS))
    if unknown:
        raise MeshConfigError(f"config.mesh has unknown axis {unknown[0]!r}; valid axes are {MESH_AXES} "
                              f"(and their slice counts {DCN_KEYS}).")
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
    dcn = _dcn_values(mesh_cfg)
    for axis, d in dcn.items():  # an axis given as -1 is checked once the devices are known
        if d > 1 and int(mesh_cfg.get(axis, 1)) != -1 and sizes[axis] % d:
            _not_divisible(axis, d, sizes[axis])
    return sizes


def _dcn_values(mesh_cfg: Mapping[str, int]) -> dict[str, int]:
    """{axis: dcn size as configured (-1 allowed)}, checked for valid values;
    a missing `dcn_data` is -1 (it takes the slices) unless another dcn size
    is -1, every other missing one 1."""
    given = {a: int(mesh_cfg[DCN_PREFIX + a]) for a in MESH_AXES if DCN_PREFIX + a in mesh_cfg}
    bad = [a for a, d in given.items() if d == 0 or d < -1]
    if bad:
        raise MeshConfigError(f"config.mesh.{DCN_PREFIX}{bad[0]}={given[bad[0]]} is invalid; use a positive "
                              "number of slices or -1 (the slices that remain).")
    dcn = {a: given.get(a, 1) for a in MESH_AXES}
    if "data" not in given and -1 not in given.values():
        dcn["data"] = -1
    fill = [DCN_PREFIX + a for a, d in dcn.items() if d == -1]
    if len(fill) > 1:
        raise MeshConfigError(f"config.mesh sets {fill} to -1; at most one dcn_ size may be -1.")
    return dcn


def _not_divisible(axis: str, dcn: int, size: int) -> None:
    raise MeshConfigError(
        f"config.mesh.{DCN_PREFIX}{axis}={dcn} does not divide config.mesh.{axis}={size} (each slice "
        f"holds {axis} / {DCN_PREFIX}{axis} of the axis); make config.mesh.{axis} a multiple of {dcn} or "
        f"spread the slices over another axis.")


def device_slices(devices: Sequence[jax.Device]) -> list[list[jax.Device]] | None:
    """The devices grouped by `slice_index` (sorted by it), or None when the
    devices carry no slice index (CPU, GPU: one slice)."""
    if not devices or not all(hasattr(d, "slice_index") for d in devices):
        return None
    groups: dict[int, list] = {}
    for d in devices:
        groups.setdefault(int(d.slice_index), []).append(d)
    return [groups[k] for k in sorted(groups)]


def resolve_dcn_shape(mesh_cfg: Mapping[str, int], sizes: Mapping[str, int],
                      devices: Sequence[jax.Device]) -> dict[str, int]:
    """{axis: slices it spans} for every axis in MESH_AXES (a -1 filled in)
    for the resolved mesh `sizes` over `devices`; MeshConfigError naming
    the field when the dcn sizes do not multiply to the devices' number of
    slices, the slices differ in size, or a dcn size does not divide its
    axis."""
    dcn = _dcn_values(mesh_cfg)
    slices = device_slices(devices)
    num_slices = len(slices) if slices else 1
    fixed = math.prod(d for d in dcn.values() if d != -1)
    fill = [a for a, d in dcn.items() if d == -1]
    named = ", ".join(f"{DCN_PREFIX}{a}={d}" for a, d in dcn.items() if d != 1) or f"{DCN_PREFIX}data=1"
    kind = f"{len(devices)} {devices[0].device_kind} devices" if devices else "0 devices"
    where = (f"these {kind} carry no slice_index (one slice; a multislice mesh needs TPU slices)"
             if slices is None else f"these {kind} form {num_slices} slice{'s' if num_slices > 1 else ''}")
    if fill and num_slices % fixed:
        raise MeshConfigError(f"config.mesh ({named}) fixes {fixed} slices, which does not divide the "
                              f"{num_slices} slices, so mesh.{DCN_PREFIX}{fill[0]}=-1 cannot be filled: {where}.")
    if fill:
        dcn[fill[0]] = num_slices // fixed
    elif fixed != num_slices:
        raise MeshConfigError(f"config.mesh ({named}) spreads the mesh over {fixed} slice"
                              f"{'s' if fixed > 1 else ''} but {where}.")
    if slices is not None and len({len(s) for s in slices}) > 1:
        raise MeshConfigError(f"config.mesh spreads the mesh over {num_slices} slices but they hold different "
                              f"numbers of devices ({sorted(len(s) for s in slices)}); every slice must be the "
                              "same size.")
    for axis, d in dcn.items():
        if sizes[axis] % d:
            _not_divisible(axis, d, sizes[axis])
    return dcn


def mesh_axes_size(mesh: Mesh, axes: str | Sequence[str] | None) -> int:
    """Devices along a mesh axis, a tuple of axes (their product), or None (1)."""
    if axes is None:
        return 1
    return math.prod(mesh.shape[name] for name in ((axes,) if isinstance(axes, str) else axes))


def make_mesh(mesh_cfg: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Creates the device mesh with axis names MESH_AXES (size-1 axes kept)
    with `jax.make_mesh`, which orders devices along the physical topology;
    over several slices with `mesh_utils.create_hybrid_device_mesh` (module
    doc). A shape that cannot be laid out is a MeshConfigError, never a
    silent reshape. Axes are `AxisType.Auto` (the compiler propagates
    shardings).

    Args:
      mesh_cfg: mapping like {"data": 2, "fsdp": 2, "expert": 2} (and
        optionally "dcn_data": 2, ...).
      devices: defaults to all of `jax.devices()`.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(mesh_cfg, len(devices))
    dcn = resolve_dcn_shape(mesh_cfg, sizes, devices)
    shape = tuple(sizes[a] for a in MESH_AXES)
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    try:
        if math.prod(dcn.values()) == 1:
            return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
        from jax.experimental import mesh_utils

        ici = tuple(sizes[a] // dcn[a] for a in MESH_AXES)
        split = devices[0].device_kind in ("TPU v5 lite", "TPU v5e")  # as jax.make_mesh does
        grid = mesh_utils.create_hybrid_device_mesh(ici, tuple(dcn[a] for a in MESH_AXES), devices,
                                                    allow_split_physical_axes=split)
        return Mesh(grid, MESH_AXES, axis_types=axis_types)
    except (ValueError, AssertionError, NotImplementedError) as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        layout = " x ".join(f"{a}={s}" for a, s in sizes.items())
        if math.prod(dcn.values()) > 1:
            layout += ", over slices " + " x ".join(f"{DCN_PREFIX}{a}={d}" for a, d in dcn.items())
        raise MeshConfigError(f"config.mesh ({layout}) cannot be laid out on these {len(devices)} "
                              f"{devices[0].device_kind} devices ({detail.rstrip('.')}).") from None


def slice_mesh_shape(mesh: Mesh) -> dict[str, int]:
    """{axis: number of slices its devices come from} of a built mesh (1 for
    every axis on one slice or on devices without a `slice_index`)."""
    import numpy as np

    grid = mesh.devices
    if not all(hasattr(d, "slice_index") for d in grid.flat):
        return dict.fromkeys(mesh.axis_names, 1)
    slices = np.vectorize(lambda d: int(d.slice_index), otypes=[int])(grid)
    out = {}
    for i, name in enumerate(mesh.axis_names):
        lines = np.moveaxis(slices, i, -1).reshape(-1, grid.shape[i])
        out[name] = max(len(set(line.tolist())) for line in lines)
    return out
