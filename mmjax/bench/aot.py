"""Ahead-of-time compile of the real train step for a TPU slice that is not
attached: memory per device, whether it fits, FLOPs, collectives, and a
step-time ESTIMATE.

  python -m mmjax.bench.aot --config experiments/tiny.py --topology v5p:2x2x1 \
      --config.mesh.data=1 --config.mesh.fsdp=4 --config.mesh.expert=1
  python -m mmjax.bench.aot --config experiments/mm1.py:3b --topology v5p:4x4x8 --workdir DIR
  python -m mmjax.bench.aot --config experiments/mm1.py:7b,tpu-v5p-512

Without --topology the config's own `topology` field is used (the hardware
presets of experiments/hardware.py set it; `--config.hardware=NAME` applies
another preset first). Prints a report; with --workdir also writes
`aot_report.json` (every field below) and `compiled_hlo.txt`.

Needs libtpu (`pip install jax[tpu]`), not a TPU: libtpu describes the
slice's devices (`jax.experimental.topologies.get_topology_desc`) and
compiles for them. `compile_for_topology(config, topology)` builds the mesh
from `config.mesh` (a -1 axis takes the slice's remaining devices) over those
devices, builds the step with `mmjax.train.loop.build_step` exactly as
training does, lowers it with abstract inputs (`jax.ShapeDtypeStruct` with
shardings: the train state from `abstract_train_state`, the batch
`[global_batch, seq_len]` int32 fields, float32 `loss_mask` and uint8 images
`[global_batch, max_images, image_size, image_size, 3]`) and compiles it.

Topology strings (GENERATION:SHAPE; SHAPE counts chips; v4 and v5p use the
"megacore" chip config, one JAX device per chip as on real slices):

  accepted                                     generation  devices
  v5p:2x2x1  v5p:4x4x8  v5p:2x2  v5:2x2x1      v5p         product of SHAPE
  TPU v5p:2x2x1  "TPU v5:4x4x4"
  v4:2x2x1  v4:2x2x4  "TPU v4:4x4x4"           v4          product of SHAPE
  v5e:2x2  v5e:16x16  v5litepod:4x4  v5lite:2x2  v5e       product of SHAPE
  "TPU v5 lite:2x2"
  v6e:2x2  v6e:16x16  trillium:4x4  "TPU v6 lite:2x2"  v6e  product of SHAPE

Shapes smaller than one 2x2x1 host ("v5e:1x1", "v6e:1x1", "v5p:1x1x1",
"v5e:2x1") are sub-host slices. Not accepted: Cloud TPU accelerator-type
names that count TensorCores or chips without a shape ("v5p-8",
"v5litepod-16", "v6e-8"), shapes libtpu rejects (larger shapes must be
multiples of the 2x2x1 chips of one host: "v5p:3x3x3", "v5e:3x4"), and other
generations (v2, v3, v7x).

Memory (per device, from `compiled.memory_analysis()`):

  peak_bytes = argument + output + temp - alias

Arguments (the donated train state and the batch) and outputs (the new state
and the metrics) are live at once except where an output reuses a donated
argument's buffer (`alias`); temps are XLA's scratch for the whole program.
The program code (`generated_code_bytes`) is reported separately.
`fits` = peak_bytes + generated_code_bytes <= FIT_FRACTION (0.95) x HBM per
chip, leaving 5% for the runtime's own allocations and fragmentation. HBM per
chip is a table (`mmjax.bench.estimate.CHIPS`: v4 32 GiB, v5e 16 GiB, v5p 95
GiB, v6e 32 GiB), not `Device.memory_stats()`, which compile-only devices do
not have.

FLOPs and HBM traffic: `compiled.cost_analysis()` "flops" and "bytes
accessed", per device, compared with the analytic
`train_flops(config, num_devices).hardware_flops_per_device` (within a few
percent for unscanned stacks). The cost analysis counts a `while` body once,
so with a scanned layer stack (`scan=True`) the compiled figures fall short
by about the trip count; the report keeps them as compiled, and the
step-time estimate (`mmjax.bench.estimate`) then uses the analytic FLOPs and
scales bytes accessed by the same factor (noted in the report).

Collectives: parsed from the compiled HLO text. Every all-gather,
reduce-scatter, all-reduce, all-to-all and collective-permute is counted
once per execution: asynchronous pairs count at their `-start` (the `-done`
is skipped); operations inside a `while` body count its trip count times
(the known trip count, or the bound of the loop condition's counter
comparison: scanned layer stacks); TPU's fused reduce-scatter (a `fusion`
calling an `all-reduce-scatter` computation: an all-reduce and a dynamic
slice) counts as one reduce-scatter. On large slices (seen at 128 v5p chips)
XLA runs FSDP all-gathers as all-reduces of a zero buffer holding the
device's shard (`dynamic-update-slice(broadcast(0), shard)`); they stay in
"all-reduce" at the all-reduce's cost (what executes) and are also counted
in `gathers_as_all_reduce` / `gathers_as_all_reduce_bytes`. Bytes are BYTES
RECEIVED PER DEVICE with ring algorithms, for a group of g devices and an
operand of B bytes per device:

  all-gather          B x (g - 1)          (output g x B, all but own shard)
  reduce-scatter      B x (g - 1) / g      (B: the full, unreduced input)
  all-reduce          2 x B x (g - 1) / g  (a reduce-scatter + an all-gather)
  all-to-all          B x (g - 1) / g
  collective-permute  B

`shape_bytes_by_kind` keeps the plain buffer sizes (all-gather: output;
reduce-scatter, all-reduce, all-to-all, collective-permute: operand).

Analytic FSDP collectives (`analytic_fsdp_collective_bytes`), same
convention. A parameter of P bytes whose stored sharding splits it over f
devices of the data/fsdp axes (the `model` and `expert` axes are tensor and
expert parallelism: not gathered) is gathered for the forward pass and again
for the backward pass (ZeRO-3), its gradient (G bytes, float32) is
reduce-scattered, and the gradient shard is all-reduced over the r devices
that hold the same shard while computing on different batch shards:

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
resharding, MoE all-to-alls, or weights gathered more often than needed.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import re
import time
from collections.abc import Mapping

import numpy as np

from mmjax.bench.estimate import CHIPS, ChipSpec, StepEstimate, estimate_step_time

FIT_FRACTION = 0.95
COLLECTIVE_KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


class TopologyError(ValueError):
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
}
_MEGACORE = ("v4", "v5p")  # two TensorCores per chip presented as one device
_TOPOLOGY_RE = re.compile(r"^\s*(?P<gen>[A-Za-z0-9 _\-]+?)\s*:\s*(?P<shape>\d+(?:x\d+){1,2})\s*$")


def parse_topology(topology: str) -> tuple[str, str]:
    """'v5p:4x4x8' -> ('v5p', '4x4x8'); TopologyError (one sentence) otherwise."""
    match = _TOPOLOGY_RE.match(str(topology))
    gen = None
    if match:
        key = re.sub(r"[\s_\-]", "", match.group("gen").lower())
        gen = _GENERATION_NAMES.get(key.removeprefix("tpu"))
    if gen is None:
        raise TopologyError(
            f"topology {topology!r} is not GENERATION:SHAPE with GENERATION one of v4, v5p, v5e, v6e "
            f"and SHAPE chips per dimension, such as 'v5p:4x4x8', 'v4:2x2x1', 'v5e:2x2' or 'v6e:4x4'.")
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


def topology_devices(topology: str) -> tuple[str, list]:
    """(generation, compile-only devices of the slice) for a topology string."""
    gen, shape = parse_topology(topology)
    _prepare_compile_only_libtpu()
    from jax.experimental import topologies

    kwargs = {"chip_config_name": "megacore"} if gen in _MEGACORE else {}
    dims = [int(d) for d in shape.split("x")] + [1] * (3 - len(shape.split("x")))
    if dims != [2, 2, 1] and all(d <= bound for d, bound in zip(dims, (2, 2, 1))):
        kwargs["chips_per_host_bounds"] = tuple(dims)  # smaller than one 2x2x1 host: a sub-host slice
    try:
        desc = topologies.get_topology_desc(f"{gen}:{shape}", "tpu", **kwargs)
    except Exception as err:  # noqa: BLE001 (libtpu missing, or a runtime error for a rejected shape)
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        detail = re.sub(r"^[A-Z_]+: ", "", detail).rstrip(".")
        raise TopologyError(f"topology {topology!r} cannot be built by libtpu ({detail}).") from None
    return gen, list(desc.devices)


def topology_mesh(mesh_cfg: Mapping[str, int], devices: list, topology: str = ""):
    """A Mesh with axes MESH_AXES over a topology's devices (-1 resolved
    against their number); TopologyError when the sizes do not match."""
    from mmjax.parallel.mesh import MeshConfigError, make_mesh

    try:
        return make_mesh(dict(mesh_cfg), devices=devices)
    except MeshConfigError as err:
        where = f"topology {topology!r}" if topology else "the topology"
        raise TopologyError(f"{str(err).rstrip('.')} on {where}.") from None


# ---------------------------------------------------------------------------
# Compiled-program analysis
# ---------------------------------------------------------------------------

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "token": 0}
_ARRAY_RE = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")


def shape_bytes(shape: str) -> float:
    """Bytes of an HLO shape string (`f32[64,128]{1,0}`, tuples summed)."""
    total = 0.0
    for dtype, dims in _ARRAY_RE.findall(shape):
        size = _DTYPE_BYTES.get(dtype, 1 if dtype.startswith("f8") else None)
        if size is None:
            continue
        total += size * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _closing(text: str, open_at: int) -> int:
    """Index of the bracket closing the one at `open_at`."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    depth, opener = 0, text[open_at]
    for i in range(open_at, len(text)):
        if text[i] == opener:
            depth += 1
        elif text[i] == pairs[opener]:
            depth -= 1
            if depth == 0:
                return i
    return len(text) - 1


@dataclasses.dataclass
class _Instr:
    name: str
    shape: str
    opcode: str
    operands: list[str]
    attrs: str


def _parse_instruction(line: str) -> _Instr | None:
    text = line.strip().removeprefix("ROOT ")
    name, sep, rest = text.partition(" = ")
    if not sep or not name.startswith("%") and not re.match(r"^[\w.\-]+$", name):
        return None
    rest = rest.lstrip()
    if rest.startswith("("):
        end = _closing(rest, 0)
        shape, rest = rest[:end + 1], rest[end + 1:].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    match = re.match(r"([a-z][\w\-]*)\(", rest)
    if not match:
        return None
    close = _closing(rest, match.end() - 1)
    args = re.sub(r"/\*.*?\*/", "", rest[match.end():close])
    operands = [op.split()[-1].lstrip("%") for op in _split_top(args) if op.strip()]
    return _Instr(name.lstrip("%"), shape, match.group(1), operands, rest[close + 1:])


def _split_top(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def parse_hlo_module(hlo_text: str) -> tuple[str, dict[str, list[_Instr]]]:
    """(entry computation name, {computation: instructions}) of an HLO module's text."""
    computations: dict[str, list[_Instr]] = {}
    entry, current = "", None
    header = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*)?\{\s*$")
    for line in hlo_text.splitlines():
        if current is None:
            match = header.match(line)
            if match and not line.startswith((" ", "HloModule")):
                current = match.group(2)
                computations[current] = []
                if match.group(1):
                    entry = current
            continue
        if line.strip() == "}":
            current = None
            continue
        instr = _parse_instruction(line)
        if instr is not None:
            computations[current].append(instr)
    return entry, computations


def _group_size(attrs: str, num_devices: int) -> int:
    match = re.search(r"replica_groups=\{(\{[^}]*\})", attrs)
    if match:
        return max(1, len([d for d in match.group(1).strip("{}").split(",") if d.strip()]))
    match = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attrs)
    if match:
        return int(match.group(2))
    match = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", attrs)  # [, device_ids=(...)]
    if match:
        sizes = {k: int(v) for k, v in re.findall(r"'?([\w]+)'?\s*=\s*(\d+)", match.group(1))}
        named = re.findall(r"'?([\w]+)'?", match.group(2))
        return math.prod(sizes.get(n, 1) for n in named) if named else num_devices
    return num_devices


def _kind(opcode: str) -> str | None:
    base = opcode.removesuffix("-start")
    if base == "ragged-all-to-all":
        return "all-to-all"
    return base if base in COLLECTIVE_KINDS else None


@dataclasses.dataclass
class CollectiveStats:
    """Collectives of one execution of a compiled program, per device."""

    counts: dict[str, int]
    bytes_by_kind: dict[str, float]        # bytes received per device (module doc)
    shape_bytes_by_kind: dict[str, float]  # plain buffer sizes (module doc)
    notes: list[str] = dataclasses.field(default_factory=list)
    loops: list[tuple[str, int | None]] = dataclasses.field(default_factory=list)  # (while, trip count)
    # All-reduces of a shard written into a zero buffer: all-gathers that XLA
    # executes as all-reduces (counted, at the all-reduce's cost, in "all-reduce").
    gathers_as_all_reduce: int = 0
    gathers_as_all_reduce_bytes: float = 0.0

    @property
    def collective_bytes(self) -> float:
        return float(sum(self.bytes_by_kind.values()))

    def to_dict(self) -> dict:
        return {"counts": dict(self.counts), "bytes_by_kind": dict(self.bytes_by_kind),
                "shape_bytes_by_kind": dict(self.shape_bytes_by_kind),
                "collective_bytes": self.collective_bytes, "notes": list(self.notes),
                "loops": [list(loop) for loop in self.loops],
                "gathers_as_all_reduce": self.gathers_as_all_reduce,
                "gathers_as_all_reduce_bytes": self.gathers_as_all_reduce_bytes}


def _received(kind: str, operand: float, group: int) -> tuple[float, float]:
    """(bytes received per device, shape bytes) for one collective."""
    frac = (group - 1) / group if group > 0 else 0.0
    if kind == "all-gather":
        return operand * (group - 1), operand * group
    if kind == "all-reduce":
        return 2.0 * operand * frac, operand
    if kind == "collective-permute":
        return operand, operand
    return operand * frac, operand  # reduce-scatter, all-to-all


def _trip_count(instr: _Instr, comp: str, comps: dict[str, list[_Instr]]) -> int | None:
    """Iterations of a `while`: its known trip count, or read off a
    condition `compare(counter, constant(N))` and the counter's constant
    initial value in the loop's input tuple (0 when not found)."""
    match = re.search(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"', instr.attrs)
    if match:
        return int(match.group(1))
    match = re.search(r"condition=%?([\w.\-]+)", instr.attrs)
    cond = comps.get(match.group(1), []) if match else []
    by_name = {i.name: i for i in cond}
    for i in cond:
        if i.opcode != "compare" or len(i.operands) != 2:
            continue
        direction = re.search(r"direction=(\w+)", i.attrs)
        ops = [by_name.get(o) for o in i.operands]
        if direction is None or None in ops:
            continue
        kinds = [o.opcode for o in ops]
        if kinds.count("constant") != 1 or "get-tuple-element" not in kinds:
            continue
        const = ops[kinds.index("constant")]
        gte = ops[kinds.index("get-tuple-element")]
        bound = _constant_value(const)
        index = re.search(r"index=(\d+)", gte.attrs)
        if bound is None or index is None:
            continue
        init = _initial_value(instr, int(index.group(1)), comps.get(comp, []))
        d = direction.group(1)
        if kinds[0] == "constant":  # constant OP counter: flip the comparison
            d = {"LT": "GT", "LE": "GE", "GT": "LT", "GE": "LE"}.get(d, d)
        trips = {"LT": bound - init, "LE": bound - init + 1, "GT": init - bound,
                 "GE": init - bound + 1, "NE": abs(bound - init)}.get(d)
        if trips is not None:
            return max(int(trips), 0)
    return None


def _constant_value(instr: _Instr) -> int | None:
    """N of a scalar integer `constant(N)` (its operand text is the value)."""
    return int(instr.operands[0]) if instr.operands and re.fullmatch(r"-?\d+", instr.operands[0]) else None


def _initial_value(loop: _Instr, index: int, caller: list[_Instr]) -> int:
    by_name = {i.name: i for i in caller}
    init = by_name.get(loop.operands[0]) if loop.operands else None
    if init is not None and init.opcode == "tuple" and index < len(init.operands):
        element = by_name.get(init.operands[index])
        if element is not None and element.opcode == "constant":
            value = _constant_value(element)
            return 0 if value is None else value
    return 0


_PASS_THROUGH = ("copy", "copy-start", "copy-done", "bitcast", "reshape", "get-tuple-element")


def _is_padded_shard(name: str, comp: str, comps: dict, by_name: dict, depth: int = 0) -> bool:
    """Whether `name` (in `comp`) is a shard written into a broadcast buffer
    (`dynamic-update-slice(broadcast(0), shard, ...)`), directly or as the
    root of a fusion: an all-reduce of it is an all-gather in all-reduce form."""
    instr = by_name[comp].get(name)
    while instr is not None and instr.opcode in _PASS_THROUGH and instr.operands and depth < 16:
        instr, depth = by_name[comp].get(instr.operands[0]), depth + 1
    if instr is None or depth >= 16:
        return False
    if instr.opcode == "dynamic-update-slice" and instr.operands:
        base = by_name[comp].get(instr.operands[0])
        while base is not None and base.opcode in _PASS_THROUGH and base.operands:
            base = by_name[comp].get(base.operands[0])
        return base is not None and base.opcode in ("broadcast", "constant")
    if instr.opcode == "fusion":
        match = re.search(r"calls=%?([\w.\-]+)", instr.attrs)
        fused = match.group(1) if match else ""
        root = next((i for i in reversed(comps.get(fused, [])) if i.opcode != "parameter"), None)
        return root is not None and _is_padded_shard(root.name, fused, comps, by_name, depth + 1)
    return False


def collective_stats(hlo_text: str, num_devices: int) -> CollectiveStats:
    """Counts and bytes of the collectives in a compiled module's HLO text
    (conventions in the module doc)."""
    entry, comps = parse_hlo_module(hlo_text)
    counts = dict.fromkeys(COLLECTIVE_KINDS, 0)
    received = dict.fromkeys(COLLECTIVE_KINDS, 0.0)
    shapes = dict.fromkeys(COLLECTIVE_KINDS, 0.0)
    notes: list[str] = []
    loops: list[tuple[str, int | None]] = []
    tables = {name: {i.name: i.shape for i in instrs} for name, instrs in comps.items()}
    by_name = {name: {i.name: i for i in instrs} for name, instrs in comps.items()}
    gathers = [0, 0.0]  # all-gathers in all-reduce form: count, bytes received

    def operand_bytes(comp: str, instr: _Instr) -> float:
        table = tables.get(comp, {})
        return sum(shape_bytes(table.get(op, "")) for op in instr.operands)

    def add(kind: str, operand: float, group: int, times: int) -> None:
        got, size = _received(kind, operand, group)
        counts[kind] += times
        received[kind] += got * times
        shapes[kind] += size * times

    def visit(comp: str, times: int, depth: int = 0) -> None:
        if depth > 64 or comp not in comps:
            return
        for instr in comps[comp]:
            op = instr.opcode
            if op.endswith(("-done", "-update")):
                continue
            kind = _kind(op)
            if kind is not None:
                group = _group_size(instr.attrs, num_devices)
                add(kind, operand_bytes(comp, instr), group, times)
                if kind == "all-reduce" and instr.operands and all(
                        _is_padded_shard(o, comp, comps, by_name) for o in instr.operands):
                    gathers[0] += times
                    gathers[1] += _received(kind, operand_bytes(comp, instr), group)[0] * times
                continue
            called = re.findall(r"(?:calls|body|branch_computations|true_computation|false_computation"
                                r"|called_computations)=\{?([^,}\s]+(?:,\s*%[\w.\-]+)*)", instr.attrs)
            if op == "call":
                called += re.findall(r"to_apply=(%[\w.\-]+)", instr.attrs)
            targets = [t.strip().lstrip("%") for group in called for t in group.split(",") if t.strip()]
            if op == "fusion" and len(targets) == 1 and targets[0].startswith("all-reduce-scatter"):
                inner = [i for i in comps.get(targets[0], []) if i.opcode in ("all-reduce", "all-reduce-start")]
                if inner:
                    add("reduce-scatter", operand_bytes(targets[0], inner[0]),
                        _group_size(inner[0].attrs, num_devices), times)
                    continue
            trips = 1
            if op == "while":
                trips = _trip_count(instr, comp, comps)
                loops.append((instr.name, trips))
                if trips is None:
                    notes.append(f"while loop {instr.name}: trip count not found, its collectives counted once")
                    trips = 1
            for target in targets:
                if op == "while" and "condition=%" + target in instr.attrs:
                    continue
                visit(target, times * trips, depth + 1)

    visit(entry, 1)
    return CollectiveStats(counts, received, shapes, notes, loops, gathers[0], gathers[1])


@dataclasses.dataclass
class CompiledStats:
    """Per-device memory, cost and collectives of one compiled program."""

    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int
    generated_code_bytes: int
    flops: float
    bytes_accessed: float
    collectives: CollectiveStats

    @property
    def peak_bytes(self) -> int:
        """argument + output + temp - alias (see the module doc)."""
        return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes

    @property
    def collective_bytes(self) -> float:
        return self.collectives.collective_bytes

    @property
    def bytes_by_kind(self) -> dict[str, float]:
        return self.collectives.bytes_by_kind

    def to_dict(self) -> dict:
        return {"argument_bytes": self.argument_bytes, "output_bytes": self.output_bytes,
                "temp_bytes": self.temp_bytes, "alias_bytes": self.alias_bytes,
                "generated_code_bytes": self.generated_code_bytes, "peak_bytes": self.peak_bytes,
                "flops": self.flops, "bytes_accessed": self.bytes_accessed,
                "collectives": self.collectives.to_dict()}


def analyse_compiled(compiled, num_devices: int | None = None, hlo_text: str | None = None) -> CompiledStats:
    """Memory, cost and collective statistics of a `jax.stages.Compiled`
    (per device; `num_devices` sizes collectives whose replica groups are
    empty, by default the devices of its input shardings)."""
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    cost = cost or {}
    if num_devices is None:
        import jax

        shardings = [s for s in jax.tree.leaves(compiled.input_shardings) if hasattr(s, "num_devices")]
        num_devices = shardings[0].num_devices if shardings else 1
    get = (lambda name: int(getattr(mem, name, 0) or 0)) if mem is not None else (lambda name: 0)
    return CompiledStats(
        argument_bytes=get("argument_size_in_bytes"), output_bytes=get("output_size_in_bytes"),
        temp_bytes=get("temp_size_in_bytes"), alias_bytes=get("alias_size_in_bytes"),
        generated_code_bytes=get("generated_code_size_in_bytes"),
        flops=float(cost.get("flops", 0.0)), bytes_accessed=float(cost.get("bytes accessed", 0.0)),
        collectives=collective_stats(compiled.as_text() if hlo_text is None else hlo_text, num_devices))


# ---------------------------------------------------------------------------
# Analytic FSDP collectives
# ---------------------------------------------------------------------------

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
            spec = setup.batch_shardings["tokens"].spec
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
    for (path, leaf), sharding in zip(leaves, jax.tree.leaves(shardings)):
        stored = float(np.dtype(leaf.dtype).itemsize) * math.prod(leaf.shape)
        grad = 4.0 * math.prod(leaf.shape)
        used = {a for entry in sharding.spec if entry is not None
                for a in ((entry,) if isinstance(entry, str) else entry)}
        f = math.prod(sizes[a] for a in used if a in _GATHERED_AXES)
        expert_split = "expert" in used
        # Devices that compute gradients for the same shard on different batch shards.
        r = math.prod(sizes[a] for a in names if a not in used and not (expert_split and a == "expert"))
        gathered = stored
        if gather_dtype == "matmul" and _gathers_in_bf16(_param_name(path), tuple(leaf.shape)):
            gathered = min(stored, 2.0 * math.prod(leaf.shape))
        total += stored
        if f > 1:
            sharded += stored
            gather += 2.0 * gathered * (f - 1) / f
            reduce += grad * (f - 1) / f
        if r > 1:
            allreduce += 2.0 * (grad / f) * (r - 1) / r
    return FsdpAnalytic(gather, reduce, allreduce, total, sharded, gather_dtype)


def analytic_fsdp_collective_bytes(setup_or_config, mesh_shape: Mapping[str, int] | None = None, *,
                                   gather_dtype: str = "auto") -> float:
    """Minimum FSDP collective bytes received per device per step (module
    doc): `fsdp_collective_breakdown(...).total`."""
    return fsdp_collective_breakdown(setup_or_config, mesh_shape, gather_dtype=gather_dtype).total


# ---------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class AotReport:
    """Ahead-of-time compile of the train step for one TPU topology; all
    byte and FLOP figures are per device and per step."""

    topology: str
    generation: str
    device_kind: str
    num_devices: int
    num_slices: int
    mesh: dict[str, int]
    rules: str
    lower_s: float
    compile_s: float
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int
    generated_code_bytes: int
    peak_bytes: int
    hbm_bytes: int
    fits: bool
    flops: float
    bytes_accessed: float
    analytic_flops: float          # train_flops(...).hardware_flops_per_device
    loops: list                    # [while name, trip count] of the compiled program
    collective_counts: dict[str, int]
    collective_bytes_by_kind: dict[str, float]
    collective_shape_bytes_by_kind: dict[str, float]
    collective_bytes: float
    gathers_as_all_reduce: int            # all-gathers executed as all-reduces (inside "all-reduce")
    gathers_as_all_reduce_bytes: float
    fsdp_analytic: FsdpAnalytic
    estimate: StepEstimate
    notes: list[str] = dataclasses.field(default_factory=list)
    hlo_text: str = dataclasses.field(default="", repr=False)  # the compiled module (not in to_dict)

    @property
    def fit_limit_bytes(self) -> float:
        return FIT_FRACTION * self.hbm_bytes

    @property
    def flops_ratio(self) -> float:
        return self.flops / self.analytic_flops if self.analytic_flops else math.nan

    @property
    def analytic_fsdp_bytes(self) -> float:
        return self.fsdp_analytic.total

    @property
    def collective_ratio(self) -> float:
        return self.collective_bytes / self.fsdp_analytic.total if self.fsdp_analytic.total else math.nan

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "hlo_text"}
        out.update(fsdp_analytic=self.fsdp_analytic.to_dict(), estimate=self.estimate.to_dict(),
                   fit_fraction=FIT_FRACTION, fit_limit_bytes=self.fit_limit_bytes,
                   flops_ratio=self.flops_ratio, analytic_fsdp_bytes=self.analytic_fsdp_bytes,
                   collective_ratio=self.collective_ratio,
                   peak_formula="argument + output + temp - alias",
                   collective_convention="bytes received per device (ring)")
        return out

    def format(self) -> str:
        gib = 2 ** 30
        mesh = " x ".join(f"{a}={s}" for a, s in self.mesh.items())
        lines = [
            f"topology {self.topology}: {self.num_devices} x {self.device_kind} ({self.generation}), "
            f"{self.num_slices} slice(s); mesh {mesh}; layout {self.rules!r}",
            f"lowered in {self.lower_s:.1f}s, compiled in {self.compile_s:.1f}s",
            "memory per device:",
            f"  arguments {self.argument_bytes / gib:10.3f} GiB   outputs {self.output_bytes / gib:10.3f} GiB",
            f"  temps     {self.temp_bytes / gib:10.3f} GiB   aliased {self.alias_bytes / gib:10.3f} GiB",
            f"  peak      {self.peak_bytes / gib:10.3f} GiB   (arguments + outputs + temps - aliased)"
            f"  + code {self.generated_code_bytes / 2**20:.1f} MiB",
            f"  fits: {'YES' if self.fits else 'NO'}  (limit {FIT_FRACTION:.0%} of {self.hbm_bytes / gib:.0f} GiB"
            f" = {self.fit_limit_bytes / gib:.2f} GiB)",
            f"compute per device: {self.flops:.4e} FLOPs compiled, {self.analytic_flops:.4e} analytic "
            f"(ratio {self.flops_ratio:.3f}); {self.bytes_accessed / gib:.3f} GiB HBM accessed",
            "collectives per device per step (bytes received; analytic: the FSDP minimum):",
        ]
        a = self.fsdp_analytic
        analytic = {"all-gather": a.all_gather_bytes, "reduce-scatter": a.reduce_scatter_bytes,
                    "all-reduce": a.all_reduce_bytes}
        for kind in COLLECTIVE_KINDS:
            ref = f"  analytic {analytic[kind] / 2**20:10.3f} MiB" if kind in analytic else ""
            lines.append(f"  {kind:19s} {self.collective_counts.get(kind, 0):6d} ops "
                         f"{self.collective_bytes_by_kind.get(kind, 0.0) / 2**20:10.3f} MiB{ref}")
        if self.gathers_as_all_reduce:
            lines.append(f"  (all-reduce includes {self.gathers_as_all_reduce} all-gather(s) that XLA runs as "
                         f"all-reduces of a zero-padded buffer: {self.gathers_as_all_reduce_bytes / 2**20:.3f} MiB, "
                         "twice what all-gathers would receive)")
        lines += [
            f"  total {' ' * 21}{self.collective_bytes / 2**20:10.3f} MiB  analytic {a.total / 2**20:10.3f} MiB"
            f"  ratio {self.collective_ratio:.3f}",
            self.estimate.summary() + f" on {self.generation} (published rates; mmjax/bench/estimate.py)",
        ]
        lines += [f"note: {n}" for n in self.notes + list(self.estimate.notes)]
        return "\n".join(lines)


def abstract_batch(config, setup) -> dict:
    """ShapeDtypeStructs (with the step's batch shardings) of one global batch."""
    import jax
    import jax.numpy as jnp

    from mmjax.train.state import MODEL_INPUTS

    b, s, d = config.data.global_batch, config.data.seq_len, config.data
    dtypes = {"loss_mask": jnp.float32, "images": jnp.uint8}
    out = {}
    for name in MODEL_INPUTS:
        shape = (b, d.max_images, d.image_size, d.image_size, 3) if name == "images" else (b, s)
        out[name] = jax.ShapeDtypeStruct(shape, dtypes.get(name, jnp.int32), sharding=setup.batch_shardings[name])
    return out


def compile_for_topology(config, topology: str) -> AotReport:
    """Compiles the train step of `config` for a TPU topology string
    ("v5p:4x4x8", "v4:2x2x1", "v5e:2x2", "v6e:2x2"; see the module doc) and
    reports memory, fit, FLOPs, collectives and a step-time estimate.

    Raises TopologyError for an unknown topology or a mesh that does not
    match its device count, ConfigError/LayoutError for other config problems
    (all ValueErrors with one sentence)."""
    from mmjax.parallel import get_layout
    from mmjax.train.config_checks import check_config
    from mmjax.train.flops import train_flops
    from mmjax.train.loop import build_step
    from mmjax.train.state import abstract_train_state

    gen, devices = topology_devices(topology)
    mesh = topology_mesh(config.mesh, devices, topology)
    n = len(devices)
    check_config(config, n, 1)
    setup, step = build_step(config, mesh, get_layout(config.rules))
    t0 = time.perf_counter()
    lowered = step.lower(abstract_train_state(setup), abstract_batch(config, setup))
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    hlo_text = compiled.as_text()
    stats = analyse_compiled(compiled, n, hlo_text)
    chip: ChipSpec = CHIPS[gen]
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    analytic_flops = train_flops(config, n, ragged_dot="grouped").hardware_flops_per_device
    notes = list(stats.collectives.notes)
    loops = [trips for _, trips in stats.collectives.loops if trips and trips > 1]
    flops, accessed = stats.flops, stats.bytes_accessed
    if loops and 0 < flops < analytic_flops:
        # XLA's cost analysis counts a while body once: scale both figures by
        # the analytic / compiled FLOPs for the estimate (the raw values stay).
        scale = analytic_flops / flops
        flops, accessed = analytic_flops, accessed * scale
        notes.append(f"loops with {sorted(set(loops))} iterations: the cost analysis counts a loop body "
                     f"once, so the estimate scales its FLOPs and bytes accessed by analytic / compiled "
                     f"FLOPs = {scale:.2f}")
    estimate = estimate_step_time(flops, accessed, stats.collective_bytes, chip, slices)
    return AotReport(
        topology=topology, generation=gen, device_kind=devices[0].device_kind, num_devices=n,
        num_slices=slices, mesh=dict(mesh.shape), rules=str(config.rules) if isinstance(config.rules, str)
        else "custom", lower_s=t1 - t0, compile_s=t2 - t1,
        argument_bytes=stats.argument_bytes, output_bytes=stats.output_bytes, temp_bytes=stats.temp_bytes,
        alias_bytes=stats.alias_bytes, generated_code_bytes=stats.generated_code_bytes,
        peak_bytes=stats.peak_bytes, hbm_bytes=chip.hbm_bytes,
        fits=stats.peak_bytes + stats.generated_code_bytes <= FIT_FRACTION * chip.hbm_bytes,
        flops=stats.flops, bytes_accessed=stats.bytes_accessed, analytic_flops=analytic_flops,
        loops=[list(loop) for loop in stats.collectives.loops],
        collective_counts=dict(stats.collectives.counts),
        collective_bytes_by_kind=dict(stats.collectives.bytes_by_kind),
        collective_shape_bytes_by_kind=dict(stats.collectives.shape_bytes_by_kind),
        collective_bytes=stats.collective_bytes,
        gathers_as_all_reduce=stats.collectives.gathers_as_all_reduce,
        gathers_as_all_reduce_bytes=stats.collectives.gathers_as_all_reduce_bytes,
        fsdp_analytic=fsdp_collective_breakdown(setup),
        estimate=estimate, notes=notes, hlo_text=hlo_text)


def write_report(report: AotReport, workdir: str) -> str:
    """Writes `aot_report.json` (and the compiled HLO as `compiled_hlo.txt`)
    under `workdir`; returns the JSON path."""
    os.makedirs(workdir, exist_ok=True)
    if report.hlo_text:
        with open(os.path.join(workdir, "compiled_hlo.txt"), "w") as f:
            f.write(report.hlo_text)
    path = os.path.join(workdir, "aot_report.json")
    with open(path, "w") as f:
        json.dump(report.to_dict(), f, indent=2, default=float)
        f.write("\n")
    return path


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def _main(argv) -> None:
    from absl import app

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    if config.get("hardware") and config.get("hardware") != config.get("hardware_applied"):
        from experiments.hardware import resolve_hardware  # --config.hardware=NAME: apply that preset

        resolve_hardware(config)
    topology = _TOPOLOGY.value or config.get("topology", "")
    if not topology:
        raise app.UsageError("--topology is required (the config names none in config.topology).")
    try:
        report = compile_for_topology(config, topology)
    except ValueError as err:  # TopologyError, ConfigError, LayoutError: one sentence each
        raise SystemExit(f"error: {err}") from None
    print(report.format())
    if _WORKDIR.value:
        print(f"wrote {write_report(report, _WORKDIR.value)}")


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file(
        "config", None,
        "Experiment config file (experiments/*.py exposing get_config); 'FILE:ARG' passes ARG to "
        "get_config. Override fields with --config.<path>=<value>, e.g. --config.mesh.fsdp=-1.",
        lock_config=True)
    topology = flags.DEFINE_string(
        "topology", None,
        "TPU slice to compile for, GENERATION:SHAPE in chips: v5p:4x4x8, v4:2x2x1, v5e:2x2, v6e:4x4 "
        "(also 'TPU v5 lite:2x2', v5litepod:4x4, trillium:4x4). Default: config.topology, which "
        "the hardware presets of experiments/hardware.py set. Needs libtpu, not a TPU.")
    workdir = flags.DEFINE_string("workdir", None, "If set, write aot_report.json here.")
    flags.mark_flags_as_required(["config"])
    return config, topology, workdir


if __name__ == "__main__":
    import sys

    from absl import app, logging

    _CONFIG, _TOPOLOGY, _WORKDIR = _define_flags()
    if any(arg in ("-h", "--help", "--helpshort") for arg in sys.argv[1:]):
        print(__doc__)
        app.usage(shorthelp=True, writeto_stdout=True, exitcode=0)
    logging.set_verbosity(logging.WARNING)
    app.run(_main)
