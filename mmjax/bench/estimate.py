"""Step-time ESTIMATE for a TPU slice from ahead-of-time compile artefacts.

This is an estimate from three published per-chip rates, not a measurement;
nothing here runs on a TPU. Inputs are per device and per step, as
`mmjax.bench.aot.compile_for_topology` reports them:

  compute_s     = flops / peak bf16 FLOP/s
  memory_s      = bytes_accessed / HBM bandwidth
  collective_s  = ICI bytes received / ICI bandwidth
                  + DCN bytes received / DCN bandwidth   (multislice only)

  step_s        = max(compute_s, memory_s) + collective_s
                  (no overlap: every collective is exposed)
  overlapped_s  = max(compute_s, memory_s, collective_s)
                  (perfect overlap: a lower bound)

`flops` and `bytes_accessed` come from XLA's `cost_analysis()` of the
compiled program. Counting compute and HBM traffic as a max (not a sum)
assumes each fusion is limited by one of the two. Collective bytes use the
"bytes received per device" convention of `mmjax.bench.aot` (ring
algorithms: (g-1)/g of the gathered / reduced buffer per device in a group
of g, twice that for an all-reduce).

Per-chip figures (Cloud TPU system-architecture pages of each generation;
v4: six ICI links of 400 Gbps):

  generation  device_kind    HBM      HBM bandwidth   ICI per chip         bf16 peak
  v4          TPU v4         32 GiB   1.2e12 B/s      2400 Gbps = 3.0e11   275e12
  v5e         TPU v5 lite    16 GiB   8.19e11 B/s     1600 Gbps = 2.0e11   197e12
  v5p         TPU v5         95 GiB   2.765e12 B/s    4800 Gbps = 6.0e11   459e12
  v6e         TPU v6 lite    32 GiB   1.64e12 B/s     3584 Gbps = 4.48e11  918e12
  tpu7x       TPU7x          96 GB    3.69e12 B/s     4800 Gbps = 6.0e11   1153.5e12  (per device)

TPU7x (Ironwood) presents each chip as two JAX devices (one per TensorCore);
its row is per device: half of the chip's 192 GB HBM, 7.37e12 B/s and
2307e12 bf16 FLOP/s, and half of its 1.2 TB/s bidirectional ICI, one way.

The ICI figure is the chip's aggregate over all its links in one direction
(the Cloud TPU pages now also quote the bidirectional figure, twice as large
for v5e and v5p: 400 and 1200 GB/s), which is the rate at which a device can
receive, matching the bytes-received convention. It is still optimistic: a
collective over one mesh axis uses only the links along that axis, so treat
`collective_s` as a lower bound on the exposed communication time. The peak
FLOP/s come from `mmjax.train.flops.PEAK_FLOPS_PER_DEVICE` (dense bf16), so
float32 matmuls (which TPUs run as bf16 passes at the default precision) are
counted at the bf16 rate too.

Multislice: collective bytes that cross slices (DCN; `mmjax.bench.hlo_collectives`
reads them from the megascale transfers of the compiled program) are
charged at the data-center network rate per chip, the rest at ICI. DCN per
chip, one direction (each chip's share of its host's NICs):

  generation  DCN per chip        source
  v4          50 Gbps = 6.25e9    "How to Scale Your Model" (jax-ml/scaling-book, tpus.md): DCN
                                  "typically around 2.5e10 bytes/s per host" of 4 chips; the
                                  Cloud TPU v4 page gives no figure
  v5e         25 Gbps = 3.125e9   Cloud TPU v5e page: per-host NICs 2 x 100 Gbps, 8 chips per host
  v5p         50 Gbps = 6.25e9    Cloud TPU v5p page: "Data center network (DCN) bandwidth per
                                  chip (Gbps) 50" (200 Gbps per 4-chip host)
  v6e         100 Gbps = 1.25e10  Cloud TPU v6e page: per-host NICs 4 x 200 Gbps, 8 chips per host
  tpu7x       50 Gbps = 6.25e9    Cloud TPU TPU7x page: 100 Gbps DCN per chip, half per device
                (per device)

A chip's DCN share is 12-100x below its ICI rate, so a mesh should cross
slices only with the axis that moves the least per step (data parallelism:
one gradient all-reduce). The DCN term assumes every device sends and
receives at its share at once, with no contention in the data-center
network.
"""

from __future__ import annotations

import dataclasses
import math

from mmjax.train.flops import table_peak

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    """Published per-chip figures of one TPU generation."""

    generation: str        # "v4", "v5e", "v5p", "v6e", "tpu7x"
    device_kind: str       # what `jax.Device.device_kind` reports
    hbm_bytes: int         # HBM capacity per chip (one JAX device)
    hbm_bandwidth: float   # bytes/s
    ici_bandwidth: float   # bytes/s per chip, all links, one direction (what a chip can receive)
    peak_flops: float      # dense bf16 FLOP/s
    dcn_bandwidth: float = math.nan  # bytes/s per chip (JAX device) across slices, one direction

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _chip(generation: str, kind: str, hbm_gib: float, hbm_bw: float, ici_gbps: float,
          dcn_gbps: float) -> ChipSpec:
    peak = table_peak(kind)
    return ChipSpec(generation, kind, int(hbm_gib * GIB), hbm_bw, ici_gbps * 1e9 / 8,
                    peak[1] if peak else math.nan, dcn_gbps * 1e9 / 8)


CHIPS: dict[str, ChipSpec] = {c.generation: c for c in (
    _chip("v4", "TPU v4", 32, 1.2e12, 2400, 50),
    _chip("v5e", "TPU v5 lite", 16, 8.19e11, 1600, 25),
    _chip("v5p", "TPU v5", 95, 2.765e12, 4800, 50),
    _chip("v6e", "TPU v6 lite", 32, 1.64e12, 3584, 100),
    _chip("tpu7x", "TPU7x", 96e9 / GIB, 3.685e12, 4800, 50),
)}

_KIND_TO_GENERATION = {c.device_kind: c.generation for c in CHIPS.values()}


def chip_spec(generation_or_kind: str) -> ChipSpec:
    """The ChipSpec for a generation ("v5p") or a device kind ("TPU v5")."""
    key = _KIND_TO_GENERATION.get(generation_or_kind, generation_or_kind)
    if key not in CHIPS:
        raise ValueError(f"no chip figures for {generation_or_kind!r}; known generations are "
                         f"{sorted(CHIPS)} (device kinds {sorted(_KIND_TO_GENERATION)}).")
    return CHIPS[key]


@dataclasses.dataclass(frozen=True)
class StepEstimate:
    """An ESTIMATE of one training step's time on a TPU slice (seconds).

    `step_s` (no overlap) is the headline number; `overlapped_s` is the
    perfect-overlap lower bound. The inputs and the rates used are kept so
    the arithmetic can be checked."""

    compute_s: float
    memory_s: float
    collective_s: float
    step_s: float
    overlapped_s: float
    bound: str                   # "compute", "memory" or "collective": the largest term
    flops_per_device: float
    bytes_accessed_per_device: float
    collective_bytes_per_device: float
    chip: ChipSpec
    num_slices: int = 1
    notes: tuple[str, ...] = ()
    # The collective term split: inside slices (ICI) and across slices (DCN).
    ici_collective_s: float = 0.0
    dcn_collective_s: float = 0.0
    dcn_bytes_per_device: float = 0.0

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["chip"] = self.chip.to_dict()
        out["notes"] = list(self.notes)
        out["label"] = "estimate (not measured)"
        return out

    def summary(self) -> str:
        return (f"ESTIMATE {self.step_s * 1e3:.3f} ms/step without overlap "
                f"({self.overlapped_s * 1e3:.3f} ms with perfect overlap); "
                f"compute {self.compute_s * 1e3:.3f} ms, HBM {self.memory_s * 1e3:.3f} ms, "
                f"collectives {self.collective_s * 1e3:.3f} ms{self._split()}; {self.bound}-bound")

    def _split(self) -> str:
        if self.num_slices <= 1 and not self.dcn_bytes_per_device:
            return ""
        return (f" (ICI {self.ici_collective_s * 1e3:.3f} ms + DCN {self.dcn_collective_s * 1e3:.3f} ms "
                f"across {self.num_slices} slices)")


def estimate_step_time(flops_per_device: float, bytes_accessed_per_device: float,
                       collective_bytes_per_device: float, chip: ChipSpec | str,
                       num_slices: int = 1, dcn_bytes_per_device: float = 0.0) -> StepEstimate:
    """Estimated step time (see the module doc for the formula and the rates).
    `collective_bytes_per_device` is all collective traffic; the part of it
    that crosses slices, `dcn_bytes_per_device`, is charged at the DCN rate."""
    spec = chip if isinstance(chip, ChipSpec) else chip_spec(chip)
    if not 0 <= dcn_bytes_per_device <= collective_bytes_per_device:
        raise ValueError(f"dcn_bytes_per_device={dcn_bytes_per_device} must lie between 0 and "
                         f"collective_bytes_per_device={collective_bytes_per_device}.")
    compute = flops_per_device / spec.peak_flops
    memory = bytes_accessed_per_device / spec.hbm_bandwidth
    ici = (collective_bytes_per_device - dcn_bytes_per_device) / spec.ici_bandwidth
    dcn = dcn_bytes_per_device / spec.dcn_bandwidth if dcn_bytes_per_device else 0.0
    collective = ici + dcn
    terms = {"compute": compute, "memory": memory, "collective": collective}
    notes = []
    if num_slices > 1 and not dcn_bytes_per_device:
        notes.append(f"{num_slices} slices but no collective bytes cross them: every collective is "
                     "timed at the ICI rate")
    if dcn_bytes_per_device:
        notes.append(f"{dcn_bytes_per_device / 2**20:.3f} MiB per device cross slices (DCN) at "
                     f"{spec.dcn_bandwidth * 8 / 1e9:.0f} Gbps per device, "
                     f"{spec.ici_bandwidth / spec.dcn_bandwidth:.0f}x below ICI")
    return StepEstimate(
        compute_s=compute, memory_s=memory, collective_s=collective,
        step_s=max(compute, memory) + collective, overlapped_s=max(terms.values()),
        bound=max(terms, key=terms.get), flops_per_device=float(flops_per_device),
        bytes_accessed_per_device=float(bytes_accessed_per_device),
        collective_bytes_per_device=float(collective_bytes_per_device), chip=spec,
        num_slices=num_slices, notes=tuple(notes), ici_collective_s=ici, dcn_collective_s=dcn,
        dcn_bytes_per_device=float(dcn_bytes_per_device))
