"""attached: memory per device, whether it fits, FLOPs, collectives, and a
step-time ESTIMATE.

  python -m mmjax.bench.aot --config experiments/tiny.py --topology v5p:2x2x1 \
      --config.mesh.data=1 --config.mesh.fsdp=4 --config.mesh.expert=1
  python -m mmjax.bench.aot --config experiments/mm1.py:3b --topology v5p:4x4x8 --workdir DIR
  python -m mmjax.bench.aot --config experiments/mm1.py:7b,tpu-v5p-512
  python -m mmjax.bench.aot --config experiments/tiny.py --topology v5p:2x2x1 --num_slices 2

Without --topology the config's own `topology` field is used (the hardware
presets of mmjax/hardware.py set it; `--config.hardware=NAME` applies
another preset first). Prints a report; with --workdir also writes
`aot_report.json` (every field below) and `compiled_hlo.txt`.

Needs libtpu (`pip install jax[tpu]`), not a TPU: libtpu describes the
slice's devices (`jax.experimental.topologies.get_topology_desc`) and
compiles for them. `compile_for_topology(config, topology)` builds the mesh
from `config.mesh` (a -1 axis takes the slice's remaining devices) over those
devices, builds the step with `mmjax.train.loop.build_step` exactly as
training does, lowers it with abstract inputs (`jax.ShapeDtypeStruct` with
shardings: the train state from `abstract_train_state`, the batch
`[global_batch, seq_len]` int32 fields, float32 `loss_mask` and
`region_masks`, uint8 images `[global_batch, max_images, image_size,
image_size, 3]`, or a pair batch's uint8 `image` `[global_batch, image_size,
image_size, 3]` for a contrastive model: the dtypes the data pipelines
produce) and compiles it. A contrastive model (a dual encoder) compiles the
same way: its batch holds only the fields it reads (no targets, no
loss_mask) and its FLOPs are the dual encoder's (`mmjax.train.flops_dual`).

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
scales bytes accessed by the same factor (noted in the report). Pallas
kernels (splash attention, megablox grouped matmuls) reach the cost
analysis only through the cost estimate they were given (megablox: every
row of its receive buffer, routed or not); with any in the program the
estimate's compute uses the analytic FLOPs (which count what the kernels
run) and the report says so. The report sets each kernel family's own
estimates, summed over its calls with loop trip counts
(`mmjax.bench.hlo_kernels`), against the analytic count of the operations
it runs (`kernels`, `kernel_flops_ratio`): for megablox the two agree when
the receive buffer is near the routed rows (`moe.dropless_buffer_factor`).

Collectives are counted from the compiled HLO (`mmjax.bench.hlo_collectives`:
bytes received per device) and compared with the analytic FSDP minimum
(`mmjax.bench.fsdp_analytic`): `collective_ratio` = measured / minimum.
Topology strings are described in `mmjax.bench.topology`.

Multislice: `--num_slices N` compiles for N identical slices of the
topology (libtpu's compile-only devices carry their `slice_index`), with the
mesh spread over the slices as `config.mesh.dcn_*` says (default: the data
axis spans every slice; `mmjax.parallel.mesh`). The compiled program runs
per slice: collectives inside a slice are ICI, transfers between slices DCN
(megascale sends); the report gives both (`ici_collective_bytes`,
`dcn_collective_bytes`, `dcn_bytes_by_kind`) and the estimate charges DCN
bytes at the DCN rate per chip (`mmjax.bench.estimate`).

Estimated MFU: useful FLOPs per device (`train_flops(...).model_flops_at`:
3 passes for trained components, fewer for frozen ones, the ViT and
connector scaled by the image slots the data fills) / the estimated step
(no overlap; also shown with perfect overlap) / the chip's peak. The fill
comes from packing 32 sequences of the config's own data on the host
(`--image_fill auto`, `mmjax.bench.image_fill`) or is given as a number;
a model without packed image slots (a dual encoder: one image per row) has
fill 1.
It is an estimate from published rates, not a measurement.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time

from mmjax.bench.estimate import CHIPS, ChipSpec, StepEstimate, estimate_step_time
from mmjax.bench.fsdp_analytic import FsdpAnalytic, fsdp_collective_breakdown
from mmjax.bench.hlo_collectives import COLLECTIVE_KINDS, analyse_compiled
from mmjax.bench.hlo_kernels import FAMILY_COMPONENTS, kernel_costs
from mmjax.bench.hlo_precision import analyse_precision
from mmjax.bench.topology import topology_devices, topology_mesh
from mmjax.errors import Refusal
from mmjax.parallel.mesh import slice_mesh_shape

FIT_FRACTION = 0.95


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
    largest_collectives: list[dict]       # CollectiveStats.largest
    fsdp_analytic: FsdpAnalytic
    estimate: StepEstimate
    notes: list[str] = dataclasses.field(default_factory=list)
    # Multislice: slices each mesh axis spans, and the collective bytes split
    # into inside slices (ICI) and across slices (DCN; by kind, with counts).
    dcn_mesh: dict[str, int] = dataclasses.field(default_factory=dict)
    ici_collective_bytes: float = 0.0
    dcn_collective_bytes: float = 0.0
    dcn_counts: dict[str, int] = dataclasses.field(default_factory=dict)
    dcn_bytes_by_kind: dict[str, float] = dataclasses.field(default_factory=dict)
    # Matmul FLOPs by operand dtypes and converts (mmjax.bench.hlo_precision).
    precision: dict = dataclasses.field(default_factory=dict)
    # Pallas kernels by family (mmjax.bench.hlo_kernels): their calls and own
    # cost estimates per step, with `analytic_flops` of the operations they run.
    kernels: dict = dataclasses.field(default_factory=dict)
    # Estimated MFU: useful FLOPs (`model_flops_at` the images present: a
    # fraction `image_fill` of the slots) / the estimated step / peak FLOP/s.
    image_fill: float = 1.0
    model_flops_per_device: float = 0.0
    estimated_mfu: float = 0.0
    estimated_mfu_overlapped: float = 0.0
    hlo_text: str = dataclasses.field(default="", repr=False)  # the compiled module (not in to_dict)

    @property
    def fit_limit_bytes(self) -> float:
        return FIT_FRACTION * self.hbm_bytes

    def kernel_flops_ratio(self, family: str) -> float:
        """A kernel family's own FLOP estimates / the analytic count of its operations."""
        costs = self.kernels.get(family, {})
        return costs["flops"] / costs["analytic_flops"] if costs.get("analytic_flops") else math.nan

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
        if self.num_slices > 1:
            mesh += " (slices: " + " x ".join(f"{a}={s}" for a, s in self.dcn_mesh.items()) + ")"
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
        ]
        if self.precision.get("dot_flops"):
            flops = self.precision["dot_flops"]
            total = sum(flops.values()) or 1.0
            shares = ", ".join(f"{k} {v / total:.1%}" for k, v in sorted(flops.items(), key=lambda kv: -kv[1]))
            lines.append(f"matmul FLOPs by operand dtypes: {shares}")
        for family, costs in sorted(self.kernels.items()):
            if not costs["flops"]:
                lines.append(f"Pallas kernels '{family}': {costs['calls']} call(s) without a cost estimate "
                             "(XLA's cost analysis counts them as 0 FLOPs and 0 bytes)")
                continue
            against = (f" against {costs['analytic_flops']:.4e} analytic for {FAMILY_COMPONENTS[family]} "
                       f"(ratio {self.kernel_flops_ratio(family):.3f})" if costs.get("analytic_flops") else "")
            lines.append(f"Pallas kernels '{family}': {costs['calls']} call(s), their own estimates "
                         f"{costs['flops']:.4e} FLOPs{against}, {costs['bytes_accessed'] / gib:.3f} GiB HBM")
        lines.append("collectives per device per step (bytes received; analytic: the FSDP minimum):")
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
        if self.largest_collectives:
            lines.append("  largest sources (bytes received, executions, group, result shape, JAX operation):")
            for top in self.largest_collectives[:5]:
                lines.append(f"    {top['bytes'] / 2**20:12.3f} MiB x{top['executions']:<5d} {top['kind']:18s} "
                             f"g={top['group']:<4d} {top['shape'][:32]:32s} {top['op_name'][-60:]}")
        if self.num_slices > 1:
            lines.append(f"  inside slices (ICI)     {self.ici_collective_bytes / 2**20:10.3f} MiB (the kinds above)")
            lines.append(f"  across slices (DCN)     {self.dcn_collective_bytes / 2**20:10.3f} MiB: " + (", ".join(
                f"{k} {self.dcn_counts.get(k, 0)} ops {v / 2**20:.3f} MiB" for k, v in self.dcn_bytes_by_kind.items())
                or "none"))
        lines += [
            f"  total {' ' * 21}{self.collective_bytes / 2**20:10.3f} MiB  analytic {a.total / 2**20:10.3f} MiB"
            f"  ratio {self.collective_ratio:.3f}",
            self.estimate.summary() + f" on {self.generation} (published rates; mmjax/bench/estimate.py)",
            f"ESTIMATED MFU {self.estimated_mfu:.1%} ({self.estimated_mfu_overlapped:.1%} with perfect overlap): "
            f"model FLOPs {self.model_flops_per_device:.4e} per device with {self.image_fill:.1%} of the "
            "image slots filled, no backward pass for frozen modules, over the estimated step and peak",
        ]
        lines += [f"note: {n}" for n in self.notes + list(self.estimate.notes)]
        return "\n".join(lines)


class DoesNotFit(Refusal):
    """libtpu refused to compile the step: it needs more HBM than the chip has."""

    label = "does not fit"

    def __init__(self, message: str, needed_bytes: float):
        super().__init__(message)
        self.needed_bytes = needed_bytes


_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_HBM_OOM = re.compile(r"HLO temporaries \(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)")


def _compile(lowered, topology: str):
    """`lowered.compile()`; libtpu's compile-time out-of-memory error (the
    step cannot fit at all) becomes a `DoesNotFit` sentence."""
    try:
        return lowered.compile()
    except Exception as err:  # jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED
        match = _HBM_OOM.search(str(err))
        if match is None:
            raise
        needed = float(match.group(1)) * _UNITS[match.group(2)]
        hbm = float(match.group(3)) * _UNITS[match.group(4)]
        raise DoesNotFit(f"the step needs {needed / 2**30:.2f} GiB of HBM temporaries per chip on {topology}, "
                         f"which has {hbm / 2**30:.2f} GiB (libtpu refused to compile it).", needed) from None


def abstract_batch(config, setup) -> dict:
    """ShapeDtypeStructs (with the step's batch shardings) of one global batch."""
    import jax
    import jax.numpy as jnp

    from mmjax.train.state import batch_row_shapes

    # as the pipelines produce them (mmjax.data.packing, mmjax.data.pairs); every other field is int32
    dtypes = {"loss_mask": jnp.float32, "region_masks": jnp.float32, "images": jnp.uint8, "image": jnp.uint8}
    return {name: jax.ShapeDtypeStruct((config.data.global_batch,) + row, dtypes.get(name, jnp.int32),
                                       sharding=setup.batch_shardings[name])
            for name, row in batch_row_shapes(config).items()}


def compile_for_topology(config, topology: str, num_slices: int = 1, image_fill: float = 1.0) -> AotReport:
    """Compiles the train step of `config` for a TPU topology string
    ("v5p:4x4x8", "v4:2x2x1", "v5e:2x2", "v6e:2x2"; see `mmjax.bench.topology`),
    or for `num_slices` slices of it (multislice: the mesh spread over them by
    `config.mesh.dcn_*`), and reports memory, fit, FLOPs, collectives (inside
    and across slices) and a step-time estimate.

    Raises TopologyError for an unknown topology or a mesh that does not
    match its device count, ConfigError/LayoutError for other config problems
    (all ValueErrors with one sentence)."""
    from mmjax.parallel import get_layout
    from mmjax.train.config_checks import check_config
    from mmjax.train.flops import train_flops
    from mmjax.train.loop import build_step
    from mmjax.train.state import abstract_train_state

    gen, devices = topology_devices(topology, num_slices)
    mesh = topology_mesh(config.mesh, devices, topology)
    n = len(devices)
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    check_config(config, n, 1)
    setup, step = build_step(config, mesh, get_layout(config.rules))
    t0 = time.perf_counter()
    lowered = step.lower(abstract_train_state(setup), abstract_batch(config, setup))
    t1 = time.perf_counter()
    compiled = _compile(lowered, topology)  # DoesNotFit: one sentence
    t2 = time.perf_counter()
    hlo_text = compiled.as_text()
    stats = analyse_compiled(compiled, n // slices, hlo_text)  # the program runs per slice
    chip: ChipSpec = CHIPS[gen]
    breakdown = train_flops(config, n, ragged_dot="grouped")
    analytic_flops = breakdown.hardware_flops_per_device
    useful = breakdown.model_flops_at(image_fill * breakdown.images_per_step) / n
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
    kernels = hlo_text.count('custom_call_target="tpu_custom_call"')
    if kernels:
        # XLA sees a Pallas kernel only through the cost estimate it was given
        # (megablox: every row of its buffer, routed or not; or none at all).
        notes.append(f"{kernels} Pallas kernel call site(s): the cost analysis cannot count their work, so the "
                     f"estimate's compute uses the analytic FLOPs ({analytic_flops:.4e}) instead of the "
                     f"compiled figure ({stats.flops:.4e})")
        flops = analytic_flops
    kernel_stats = kernel_costs(hlo_text)
    executed = {name: breakdown.hardware_forward.get(name, 0.0) + breakdown.hardware_backward.get(name, 0.0)
                + breakdown.remat.get(name, 0.0) for name in FAMILY_COMPONENTS.values()}
    for family, costs in kernel_stats.items():
        if family in FAMILY_COMPONENTS:
            costs["analytic_flops"] = executed[FAMILY_COMPONENTS[family]] / n
    estimate = estimate_step_time(flops, accessed, stats.collective_bytes, chip, slices,
                                  dcn_bytes_per_device=stats.collectives.dcn_bytes)
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
        largest_collectives=stats.collectives.largest,
        fsdp_analytic=fsdp_collective_breakdown(setup),
        estimate=estimate, notes=notes, dcn_mesh=slice_mesh_shape(mesh),
        ici_collective_bytes=stats.collectives.ici_bytes, dcn_collective_bytes=stats.collectives.dcn_bytes,
        dcn_counts=dict(stats.collectives.dcn_counts), dcn_bytes_by_kind=dict(stats.collectives.dcn_bytes_by_kind),
        precision=analyse_precision(hlo_text).to_dict(), kernels=kernel_stats, hlo_text=hlo_text,
        image_fill=image_fill, model_flops_per_device=useful,
        estimated_mfu=useful / estimate.step_s / chip.peak_flops if estimate.step_s else 0.0,
        estimated_mfu_overlapped=useful / estimate.overlapped_s / chip.peak_flops if estimate.overlapped_s else 0.0)


def write_report(report: AotReport, workdir: str) -> str:
    """Writes `aot_report.json` (and the compiled HLO as `compiled_hlo.txt`)
    under `workdir`; returns the JSON path."""
    from mmjax.paths import workdir_path, write_text

    folder = workdir_path(workdir)  # a local folder or gs://bucket/...
    if report.hlo_text:
        write_text(folder / "compiled_hlo.txt", report.hlo_text)
    path = folder / "aot_report.json"
    write_text(path, json.dumps(report.to_dict(), indent=2, default=float) + "\n")
    return str(path)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def _define(fv) -> None:
    from absl import flags

    flags.DEFINE_string(
        "topology", None,
        "TPU slice to compile for, GENERATION:SHAPE in chips: v5p:4x4x8, v4:2x2x1, v5e:2x2, v6e:4x4, "
        "tpu7x:2x2x1 (also 'TPU v5 lite:2x2', v5litepod:4x4, trillium:4x4, v7x:2x2x1, ironwood:4x4x4). "
        "Default: config.topology, which the hardware presets of mmjax/hardware.py set. Needs libtpu, "
        "not a TPU.", flag_values=fv)
    flags.DEFINE_integer(
        "num_slices", 1, "Multislice: compile for this many identical slices of --topology, joined by the "
        "data-center network (DCN); config.mesh.dcn_* says which mesh axes span them (default: data). "
        "MaxText calls it compile_topology_num_slices.", lower_bound=1, flag_values=fv)
    flags.DEFINE_string("workdir", None, "If set, write aot_report.json here.", flag_values=fv)
    flags.DEFINE_string(
        "image_fill", "auto", "Fraction of the image slots the batches fill, for the estimated MFU's useful "
        "FLOPs: 'auto' measures it by packing 32 sequences of the config's own data on the host "
        "(mmjax.bench.image_fill); a number in [0, 1] takes it as given.", flag_values=fv)


def _image_fill(text: str, config) -> float:
    """--image_fill: 'auto' (measured on the config's data) or a fraction."""
    from mmjax.errors import ConfigError
    from mmjax.models import model_spec

    if text == "auto":
        if "images" not in model_spec(config.model).inputs_for(config.model):
            return 1.0  # no packed image slots: text only, or one image per pair batch row
        from mmjax.bench.image_fill import measured_image_fill

        fill, sentence = measured_image_fill(config)
        print(sentence)
        return fill
    try:
        fill = float(text)
    except ValueError:
        fill = math.nan
    if not 0.0 <= fill <= 1.0:
        raise ConfigError(f"--image_fill={text!r} is neither 'auto' nor a fraction in [0, 1].")
    return fill


def main(argv: list[str]) -> int:
    from mmjax.frontend import parse_flags, prepare_runtime

    args = parse_flags(argv, "python -m mmjax.bench.aot", __doc__, _define)
    config = args.config
    prepare_runtime(config)  # --config.hardware=NAME, the config checked; the compile targets the topology
    topology = args.topology or config.get("topology", "")
    if not topology:
        raise SystemExit("error: --topology is required (the config names none in config.topology).")
    fill = _image_fill(args.image_fill, config)
    report = compile_for_topology(config, topology, args.num_slices, fill)  # TopologyError/ConfigError: one sentence
    print(report.format())
    if args.workdir:
        print(f"wrote {write_report(report, args.workdir)} and the compiled HLO as "
              f"{str(args.workdir).rstrip('/')}/compiled_hlo.txt")
    return 0


if __name__ == "__main__":
    import sys

    from mmjax.frontend import run_command

    sys.exit(run_command(main))
