"""TPU slices for ahead-of-time compilation on a host without TPU chips:
topology strings, compile-only devices from libtpu, a mesh over them.

Topology strings (GENERATION:SHAPE; SHAPE counts chips; v4 and v5p use the
"megacore" chip config, one JAX device per chip as on real slices):

  accepted                                     generation  devices
  v5p:2x2x1  v5p:4x4x8  v5p:2x2  v5:2x2x1      v5p         product of SHAPE
  TPU v5p:2x2x1  "TPU v5:4x4x4"
  v4:2x2x1  v4:2x2x4  "TPU v4:4x4x4"           v4          product of SHAPE
  v5e:2x2  v5e:16x16  v5litepod:4x4  v5lite:2x2  v5e       product of SHAPE
  "TPU v5 lite:2x2"
  v6e:2x2  v6e:16x16  trillium:4x4  "TPU v6 lite:2x2"  v6e  product of SHAPE
  tpu7x:2x2x1  v7x:4x4x4  ironwood:2x2x1  "TPU7x:2x2x2"  tpu7x  2 x product of SHAPE

TPU7x (Ironwood) chips hold two TensorCores that are two JAX devices each
with its own half of the chip's HBM, so a 2x2x1 slice has 8 devices.

Shapes smaller than one 2x2x1 host ("v5e:1x1", "v6e:1x1", "v5p:1x1x1",
"v5e:2x1") are sub-host slices. Not accepted: Cloud TPU accelerator-type
names that count TensorCores or chips without a shape ("v5p-8",
"v5litepod-16", "v6e-8"), shapes libtpu rejects (larger shapes must be
multiples of the 2x2x1 chips of one host: "v5p:3x3x3", "v5e:3x4"), and other
generations (v2, v3).
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Mapping

from mmjax.errors import Refusal


class TopologyError(Refusal):
    """The topology string or the mesh cannot be used for ahead-of-time compilation."""


# ---------------------------------------------------------------------------
# Topologies
# ---------------------------------------------------------------------------

# Normalised generation spellings (lowercase, without spaces, "-", "_" and a
# leading "tpu") -> canonical generation.
_GENERATION_NAMES = {
    "v4": "v4",
    "v5p": "v5p", "v5": "v5p",
    "v5e": "v5e", "v5lite": "v5e", "v5litepod": "v5e",
    "v6e": "v6e", "v6lite": "v6e", "trillium": "v6e",
    "tpu7x": "tpu7x", "7x": "tpu7x", "v7x": "tpu7x", "v7": "tpu7x", "ironwood": "tpu7x",
}
_MEGACORE = ("v4", "v5p")  # two TensorCores per chip presented as one device
DEVICES_PER_CHIP = {"tpu7x": 2}  # TensorCores that are separate JAX devices (default 1)


def devices_per_chip(generation: str) -> int:
    """JAX devices per chip of a canonical generation ("tpu7x": 2, else 1)."""
    return DEVICES_PER_CHIP.get(generation, 1)
_TOPOLOGY_RE = re.compile(r"^\s*(?P<gen>[A-Za-z0-9 _\-]+?)\s*:\s*(?P<shape>\d+(?:x\d+){1,2})\s*$")


def parse_topology(topology: str) -> tuple[str, str]:
    """'v5p:4x4x8' -> ('v5p', '4x4x8'); TopologyError (one sentence) otherwise."""
    match = _TOPOLOGY_RE.match(str(topology))
    gen = None
    if match:
        key = re.sub(r"[\s_\-]", "", match.group("gen").lower())
        gen = _GENERATION_NAMES.get(key) or _GENERATION_NAMES.get(key.removeprefix("tpu"))
    if gen is None:
        raise TopologyError(
            f"topology {topology!r} is not GENERATION:SHAPE with GENERATION one of v4, v5p, v5e, v6e, "
            f"tpu7x and SHAPE chips per dimension, such as 'v5p:4x4x8', 'v4:2x2x1', 'v5e:2x2', 'v6e:4x4' "
            f"or 'tpu7x:2x2x1'.")
    return gen, match.group("shape")


def _prepare_compile_only_libtpu() -> None:
    """On a host without TPU chips: lets libtpu start although another
    process holds its lock file (a concurrent JAX process that probed for a
    TPU), and stops it querying the cloud metadata server for TPU workers
    that do not exist (which only prints alarming errors). Compile-only use
    needs none of that. Nothing is changed on TPU hosts."""
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return
    for name, value in (("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"), ("TPU_SKIP_MDS_QUERY", "1"),
                        ("TPU_WORKER_HOSTNAMES", "localhost")):
        os.environ.setdefault(name, value)


def topology_devices(topology: str, num_slices: int = 1) -> tuple[str, list]:
    """(generation, compile-only devices) for a topology string: one slice,
    or `num_slices` identical slices (multislice; each device's
    `slice_index` says which, as on a real multislice job)."""
    gen, shape = parse_topology(topology)
    if not isinstance(num_slices, int) or isinstance(num_slices, bool) or num_slices < 1:
        raise TopologyError(f"num_slices={num_slices!r} is invalid; use a positive number of slices.")
    _prepare_compile_only_libtpu()
    from jax.experimental import topologies

    kwargs = {"chip_config_name": "megacore"} if gen in _MEGACORE else {}
    if num_slices > 1:
        kwargs["num_slices"] = num_slices
    dims = [int(d) for d in shape.split("x")] + [1] * (3 - len(shape.split("x")))
    if dims != [2, 2, 1] and all(d <= bound for d, bound in zip(dims, (2, 2, 1), strict=True)):
        kwargs["chips_per_host_bounds"] = tuple(dims)  # smaller than one 2x2x1 host: a sub-host slice
    try:
        desc = topologies.get_topology_desc(f"{gen}:{shape}", "tpu", **kwargs)
    except Exception as err:  # noqa: BLE001 (libtpu missing, or a runtime error for a rejected shape)
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        detail = re.sub(r"^[A-Z_]+: ", "", detail).rstrip(".")
        slices = f" x {num_slices} slices" if num_slices > 1 else ""
        raise TopologyError(f"topology {topology!r}{slices} cannot be built by libtpu ({detail}).") from None
    return gen, list(desc.devices)


def topology_mesh(mesh_cfg: Mapping[str, int], devices: list, topology: str = ""):
    """A Mesh with axes MESH_AXES over a topology's devices (-1 resolved
    against their number); TopologyError when the sizes do not match."""
    from mmjax.parallel.mesh import MeshConfigError, make_mesh

    try:
        return make_mesh(dict(mesh_cfg), devices=devices)
    except MeshConfigError as err:
        slices = len({getattr(d, "slice_index", 0) for d in devices})
        where = f"topology {topology!r}" if topology else "the topology"
        where += f" x {slices} slices" if slices > 1 else ""
        raise TopologyError(f"{str(err).rstrip('.')} on {where}.") from None


# ---------------------------------------------------------------------------
# Compiled-program analysis
