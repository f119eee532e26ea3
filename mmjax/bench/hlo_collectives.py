"""Per-device statistics of a compiled program: memory and cost analysis,
and the collectives read from its HLO text.

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
  ragged-all-to-all   B x (g - 1) / g, B the smaller of its input and output
                      buffers (the routed rows; the other is sized for the
                      worst case), as if spread evenly over the peers;
                      counted as "all-to-all"
  collective-permute  B

`shape_bytes_by_kind` keeps the plain buffer sizes (all-gather: output;
reduce-scatter, all-reduce, all-to-all, collective-permute: operand).

Multislice programs (a mesh over several TPU slices) are compiled per
slice: the collectives above run inside a slice (ICI; their replica groups
name the slice's devices), and what crosses slices (DCN) becomes `send` /
`recv` host transfers to libtpu's megascale runtime, marked
`_xla_megascale_transfer_type` (ALL_REDUCE, ALL_GATHER, REDUCE_SCATTER, ...)
and `_xla_megascale_target` (the groups of slices: `"{1,2}x{0:3}"`, slices
1 and 2 by every device 0..3 of a slice, or `{{100000,200000},...}`, global
device ids). Each `send` is counted once (its `recv` and `-done` are not)
in `dcn_counts` / `dcn_bytes_by_kind`, with the same ring formulas over the
g slices of its group and its operand as B. `collective_bytes` is ICI + DCN.
"""

from __future__ import annotations

import dataclasses
import math
import re

COLLECTIVE_KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
TOP_SOURCES = 20  # largest collective sources kept in a report


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


_DCN_KINDS = {"ALL_REDUCE": "all-reduce", "ALL_GATHER": "all-gather", "REDUCE_SCATTER": "reduce-scatter",
              "ALL_TO_ALL": "all-to-all"}


def _dcn_transfer(attrs: str) -> tuple[str, int] | None:
    """(kind, slices in its group) of a megascale (cross-slice) `send`, or None."""
    match = re.search(r'_xla_megascale_transfer_type="?([A-Z_]+)', attrs)
    if not match:
        return None
    kind = _DCN_KINDS.get(match.group(1), "collective-permute")
    target = re.search(r'_xla_megascale_target="?\{(\{[^}]*\}|[^}]*)\}', attrs)
    group = 2
    if target:
        first = target.group(1).strip("{}")
        group = max(1, len([x for x in first.split(",") if x.strip()]))
    return kind, group


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
    # The largest sources of traffic: collectives grouped by kind, group size,
    # result shape and the JAX operation they come from (`op_name`), by bytes.
    largest: list[dict] = dataclasses.field(default_factory=list)
    # Cross-slice (DCN) transfers of a multislice program (module doc); the
    # fields above then hold the collectives inside a slice (ICI).
    dcn_counts: dict[str, int] = dataclasses.field(default_factory=dict)
    dcn_bytes_by_kind: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def ici_bytes(self) -> float:
        return float(sum(self.bytes_by_kind.values()))

    @property
    def dcn_bytes(self) -> float:
        return float(sum(self.dcn_bytes_by_kind.values()))

    @property
    def collective_bytes(self) -> float:
        return self.ici_bytes + self.dcn_bytes

    def to_dict(self) -> dict:
        return {"counts": dict(self.counts), "bytes_by_kind": dict(self.bytes_by_kind),
                "shape_bytes_by_kind": dict(self.shape_bytes_by_kind),
                "dcn_counts": dict(self.dcn_counts), "dcn_bytes_by_kind": dict(self.dcn_bytes_by_kind),
                "ici_bytes": self.ici_bytes, "dcn_bytes": self.dcn_bytes,
                "collective_bytes": self.collective_bytes, "notes": list(self.notes),
                "loops": [list(loop) for loop in self.loops],
                "gathers_as_all_reduce": self.gathers_as_all_reduce,
                "gathers_as_all_reduce_bytes": self.gathers_as_all_reduce_bytes,
                "largest": list(self.largest)}


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


def collective_stats(hlo_text: str, num_devices: int, top: int | None = TOP_SOURCES) -> CollectiveStats:
    """Counts and bytes of the collectives in a compiled module's HLO text
    (conventions in the module doc); `largest` keeps the `top` sources by
    bytes (None: all of them)."""
    entry, comps = parse_hlo_module(hlo_text)
    counts = dict.fromkeys(COLLECTIVE_KINDS, 0)
    received = dict.fromkeys(COLLECTIVE_KINDS, 0.0)
    shapes = dict.fromkeys(COLLECTIVE_KINDS, 0.0)
    notes: list[str] = []
    loops: list[tuple[str, int | None]] = []
    tables = {name: {i.name: i.shape for i in instrs} for name, instrs in comps.items()}
    by_name = {name: {i.name: i for i in instrs} for name, instrs in comps.items()}
    dcn_counts = dict.fromkeys(COLLECTIVE_KINDS, 0)
    dcn_received = dict.fromkeys(COLLECTIVE_KINDS, 0.0)
    gathers = [0, 0.0]  # all-gathers in all-reduce form: count, bytes received
    sources: dict[tuple, list] = {}  # (kind, group, shape, op_name) -> [executions, bytes received]

    def operand_bytes(comp: str, instr: _Instr) -> float:
        table = tables.get(comp, {})
        sizes = [shape_bytes(table.get(op, "")) for op in instr.operands]
        if instr.opcode.startswith("ragged-all-to-all") and len(sizes) >= 2:
            # (input, output, offsets and sizes): the rows that travel are the
            # smaller buffer (the other is the worst-case receive buffer)
            return min(sizes[:2])
        return sum(sizes)

    def add(kind: str, operand: float, group: int, times: int, instr: _Instr, dcn: bool = False) -> None:
        got, size = _received(kind, operand, group)
        if dcn:
            dcn_counts[kind] += times
            dcn_received[kind] += got * times
        else:
            counts[kind] += times
            received[kind] += got * times
            shapes[kind] += size * times
        source = re.search(r'op_name="([^"]*)"', instr.attrs)
        shape = re.sub(r"\{[^{}]*\}", "", instr.shape)
        if dcn:  # a send's shape is (buffer, context, token); the name says what it serves
            shape = _ARRAY_RE.search(shape).group(0) if _ARRAY_RE.search(shape) else shape
            rendezvous = re.search(r'_xla_host_transfer_rendezvous="([^"]*)"', instr.attrs)
            kind = "dcn " + kind
            op_name = rendezvous.group(1) if rendezvous else ""
        else:
            op_name = source.group(1) if source else ""
        key = (kind, group, shape, op_name)
        entry = sources.setdefault(key, [0, 0.0])
        entry[0] += times
        entry[1] += got * times

    def visit(comp: str, times: int, depth: int = 0) -> None:
        if depth > 64 or comp not in comps:
            return
        for instr in comps[comp]:
            op = instr.opcode
            if op.endswith(("-done", "-update")):
                continue
            if op == "send":
                transfer = _dcn_transfer(instr.attrs)
                if transfer is not None:
                    operand = sum(shape_bytes(tables.get(comp, {}).get(o, "")) for o in instr.operands[:1])
                    add(transfer[0], operand, transfer[1], times, instr, dcn=True)
                continue
            kind = _kind(op)
            if kind is not None:
                group = _group_size(instr.attrs, num_devices)
                add(kind, operand_bytes(comp, instr), group, times, instr)
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
                        _group_size(inner[0].attrs, num_devices), times, instr)
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
    ranked = sorted(sources.items(), key=lambda item: -item[1][1])[:top]
    largest = [{"kind": k[0], "group": k[1], "shape": k[2], "op_name": k[3], "executions": v[0],
                "bytes": v[1]} for k, v in ranked]
    return CollectiveStats(counts, received, shapes, notes, loops, gathers[0], gathers[1], largest,
                           {k: v for k, v in dcn_counts.items() if v},
                           {k: v for k, v in dcn_received.items() if dcn_counts[k]})


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
        """argument + output + temp - alias: all live at once, less the outputs
        that reuse a donated argument's buffer."""
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
