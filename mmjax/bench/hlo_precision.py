"""Where the precision goes in a compiled program: matmul FLOPs by operand
dtype and the bytes moved by dtype conversions, read from its HLO text.

    python -m mmjax.bench.hlo_precision HLO_TEXT_FILE

reads e.g. the `compiled_hlo.txt` that `python -m mmjax.bench.aot ...
--workdir DIR` writes (whose report prints the same matmul shares) or a file
of an XLA dump (`XLA_FLAGS=--xla_dump_to=DIR`, `*after_optimizations.txt`).

A mixed-precision step should run (nearly) all of its matmul FLOPs on
bfloat16 operands (accumulating in float32 where `preferred_element_type`
asks for it) and convert each float32 weight to bfloat16 a bounded number of
times per step. `dots` counts `dot` and `convolution` instructions, with their
FLOPs (2 x output elements x contracted size), by `lhs,rhs->out` dtypes;
`converts` counts `convert` instructions (fused or not) by `from->to` with
the bytes they write. Instructions inside a `while` body (scanned layers,
gradient accumulation) count their trip count times.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

from mmjax.bench.hlo_collectives import _trip_count, parse_hlo_module, shape_bytes

_CALLED_RE = re.compile(r"\b(?:calls|to_apply|body|condition|branch_computations|called_computations)"
                        r"=(?:\{([^}]*)\}|%?([\w.\-]+))")
_SHAPE_RE = re.compile(r"^\(?([a-z]+[0-9]*)\[([0-9,]*)\]")


def _dtype_dims(shape: str) -> tuple[str, tuple[int, ...]]:
    match = _SHAPE_RE.match(shape.strip())
    if not match:
        return "", ()
    return match.group(1), tuple(int(d) for d in match.group(2).split(",") if d)


def _dims_attr(attrs: str, key: str) -> tuple[int, ...]:
    match = re.search(key + r"=\{([0-9,]*)\}", attrs)
    return tuple(int(d) for d in match.group(1).split(",") if d) if match else ()


@dataclasses.dataclass
class PrecisionStats:
    """Per-device matmul FLOPs and conversions of one execution."""

    dot_flops: dict[str, float]      # "bf16,bf16->f32" -> FLOPs
    dot_counts: dict[str, int]
    convert_bytes: dict[str, float]  # "f32->bf16" -> bytes written
    convert_counts: dict[str, int]

    def flops_fraction(self, operand_dtype: str) -> float:
        """Share of matmul FLOPs whose two operands are both `operand_dtype`."""
        total = sum(self.dot_flops.values())
        own = sum(f for k, f in self.dot_flops.items() if k.split("->")[0] == f"{operand_dtype},{operand_dtype}")
        return own / total if total else 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def analyse_precision(hlo_text: str, matmuls: tuple[str, ...] = ("dot", "convolution")) -> PrecisionStats:
    """Reads the `matmuls` opcodes and converts from an HLO module's text
    (module doc). XLA:CPU runs bfloat16 convolutions as float32 ones (it
    inserts the converts itself); `matmuls=("dot",)` leaves them out."""
    entry, comps = parse_hlo_module(hlo_text)
    multiplier = _computation_multipliers(entry, comps)
    dot_flops, dot_counts = collections.Counter(), collections.Counter()
    convert_bytes, convert_counts = collections.Counter(), collections.Counter()
    for comp, instrs in comps.items():
        times = multiplier.get(comp, 0)
        if not times:
            continue
        shapes = {i.name: i.shape for i in instrs}
        for instr in instrs:
            if instr.opcode in matmuls:
                out_dtype, out_dims = _dtype_dims(instr.shape)
                lhs_dtype, lhs_dims = _dtype_dims(shapes.get(instr.operands[0], ""))
                rhs_dtype, rhs_dims = _dtype_dims(shapes.get(instr.operands[1], ""))
                if instr.opcode == "dot":
                    contracted = math.prod(lhs_dims[d] for d in _dims_attr(instr.attrs, "lhs_contracting_dims")
                                           if d < len(lhs_dims))
                else:  # every kernel dimension but the output features ('o' in dim_labels) is contracted
                    labels = re.search(r"dim_labels=[^_]*_([^-]*)->", instr.attrs)
                    kernel = labels.group(1) if labels and len(labels.group(1)) == len(rhs_dims) else ""
                    contracted = math.prod(d for d, label in zip(rhs_dims, kernel, strict=True) if label != "o") \
                        if kernel else math.prod(rhs_dims) // max(out_dims[-1] if out_dims else 1, 1)
                key = f"{lhs_dtype},{rhs_dtype}->{out_dtype}"
                dot_flops[key] += times * 2.0 * math.prod(out_dims) * contracted
                dot_counts[key] += times
            elif instr.opcode == "convert":
                src, _ = _dtype_dims(shapes.get(instr.operands[0], ""))
                dst, _ = _dtype_dims(instr.shape)
                key = f"{src}->{dst}"
                convert_bytes[key] += times * shape_bytes(instr.shape)
                convert_counts[key] += times
    return PrecisionStats(dict(dot_flops), dict(dot_counts), dict(convert_bytes), dict(convert_counts))


def _computation_multipliers(entry: str, comps: dict) -> dict[str, int]:
    """How many times each computation runs per execution of the entry:
    called computations inherit their caller's count, `while` bodies times
    their trip count (1 when unknown)."""
    counts: dict[str, int] = collections.defaultdict(int)

    def visit(comp: str, times: int, depth: int = 0) -> None:
        if comp not in comps or depth > 64:
            return
        counts[comp] += times
        for instr in comps[comp]:
            names = []
            for braced, single in _CALLED_RE.findall(instr.attrs):
                names += [n.strip().lstrip("%") for n in (braced or single).split(",") if n.strip()]
            trips = 1
            if instr.opcode == "while":
                trips = _trip_count(instr, comp, comps) or 1
            condition = re.search(r"condition=%?([\w.\-]+)", instr.attrs)
            for name in names:
                if instr.opcode == "while" and condition and name == condition.group(1):
                    continue
                visit(name, times * trips, depth + 1)

    visit(entry, 1)
    return counts


def format_stats(stats: PrecisionStats) -> str:
    """A small table: matmul FLOPs and converts by dtype."""
    total = sum(stats.dot_flops.values()) or 1.0
    lines = ["matmul operands,result      count     GFLOP   share"]
    for key, flops in sorted(stats.dot_flops.items(), key=lambda kv: -kv[1]):
        lines.append(f"{key:26s} {stats.dot_counts[key]:6d} {flops / 1e9:9.3f} {flops / total:7.1%}")
    lines.append("convert                     count        MB")
    for key, nbytes in sorted(stats.convert_bytes.items(), key=lambda kv: -kv[1]):
        lines.append(f"{key:26s} {stats.convert_counts[key]:6d} {nbytes / 1e6:9.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] in ("-h", "--help", "--helpshort"):
        print(__doc__)
        return 0 if args and args[0] in ("-h", "--help", "--helpshort") else 2
    try:
        with open(args[0]) as f:
            text = f.read()
    except OSError as err:
        print(f"error: cannot read the HLO text file {args[0]!r} ({err.strerror}).")
        return 1
    print(format_stats(analyse_precision(text)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
