"""What the Pallas kernels of a compiled TPU program say they cost.

A Pallas kernel reaches XLA as a `tpu_custom_call` whose backend config
carries the cost estimate the kernel was given (`"cost_estimate": {"flops",
"bytes_accessed", ...}`); XLA's `cost_analysis()` adds exactly those numbers
for it, counting a `while` body once. `kernel_costs` reads them per kernel
family, each call counted its loop trip count times, so that the compiled
view of a kernel's work can be set against the analytic count of the
operations it runs (`FAMILY_COMPONENTS`, components of
`mmjax.train.flops.FlopsBreakdown`).

Families by the JAX operation that called the kernel or the instruction's
name: "megablox" (`gmm`, `tgmm`: dropless MoE's grouped matmuls), "splash"
(attention: `splash_mha_*`; these kernels carry no cost estimate, so their
FLOPs read 0), "other".
"""

from __future__ import annotations

import collections
import json
import re

from mmjax.bench.hlo_collectives import parse_hlo_module
from mmjax.bench.hlo_precision import _computation_multipliers

FAMILY_COMPONENTS = {"megablox": "decoder/moe_experts", "splash": "decoder/attention_scores"}
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_COST = re.compile(r'"cost_estimate":(\{[^}]*\})')


def kernel_family(op_name: str, instruction: str = "") -> str:
    """"megablox" | "splash" | "other" for a kernel call, from the JAX
    operation that made it and its instruction's name."""
    if re.search(r"jit\(t?gmm\)", op_name):
        return "megablox"
    if any(word in text for word in ("splash", "flash") for text in (op_name, instruction)):
        return "splash"
    return "other"


def kernel_costs(hlo_text: str) -> dict[str, dict[str, float]]:
    """{family: {"calls", "flops", "bytes_accessed"}} per execution of the
    program (module doc); families without a kernel are absent."""
    entry, comps = parse_hlo_module(hlo_text)
    times = _computation_multipliers(entry, comps)
    costs: dict[str, dict[str, float]] = collections.defaultdict(lambda: dict(calls=0, flops=0.0,
                                                                                bytes_accessed=0.0))
    for comp, instrs in comps.items():
        count = times.get(comp, 0)
        for instr in instrs:
            if count == 0 or instr.opcode != "custom-call" or '"tpu_custom_call"' not in instr.attrs:
                continue
            name = _OP_NAME.search(instr.attrs)
            family = costs[kernel_family(name.group(1) if name else "", instr.name)]
            family["calls"] += count
            cost = _COST.search(instr.attrs)
            if cost:
                estimate = json.loads(cost.group(1))
                family["flops"] += count * float(estimate.get("flops", 0))
                family["bytes_accessed"] += count * float(estimate.get("bytes_accessed", 0))
    return dict(costs)
