"""Sharding-layout sweep: which `data × fsdp × expert [× model]` mesh and rule
set is fastest / fits.

  python -m mmjax.bench.sweep --config experiments/tiny.py --workdir DIR [--steps 10]
      [--grid 2x2x2x1,8x1x1x1,...] [--layouts fsdp,data_parallel] [--with_model]
      [--topology v5p:2x2x1]

Candidates are every factorisation of the device count into data × fsdp ×
expert (× model with --with_model) crossed with the named layouts, or the
explicit `--grid` (DATAxFSDPxEXPERTxMODEL). A candidate the config cannot use
(batch not divisible, a weight dimension not divisible by its mesh axis,
wrong device count, ...) is skipped with the reason. For each valid one the
real train step is compiled for this machine's devices and timed (median of
`--steps` steps to device completion, round-robin over candidates), with
per-device memory and collective bytes from the compiled program; with
`--topology` the same step is also compiled ahead of time for that TPU
topology (fits, memory, collectives, FSDP collective ratio, step-time
estimate). Writes `results.csv` (columns in the README), a ranked table on
stdout and `sweep.png`.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import os
import runpy
import statistics
import time

import numpy as np

AXES = ("data", "fsdp", "expert", "model")
COLUMNS = ("rank", "mesh", "layout", "status", "reason", "step_time_s", "step_time_p90_s",
           "compile_s", "peak_bytes_per_device", "argument_bytes", "temp_bytes", "collective_bytes",
           "all_gather_bytes", "reduce_scatter_bytes", "all_reduce_bytes", "all_to_all_bytes",
           "fsdp_analytic_bytes", "collective_ratio", "tpu_topology", "tpu_fits", "tpu_peak_bytes",
           "tpu_collective_bytes", "tpu_collective_ratio", "tpu_estimate_s")


def _load_config(spec: str):
    path, _, arg = spec.partition(":")
    return runpy.run_path(path)["get_config"](arg or None)


def mesh_name(mesh: dict) -> str:
    return "x".join(str(mesh[a]) for a in AXES)


def parse_grid(text: str) -> list[dict]:
    """`"2x2x2x1,8x1x1x1"` -> mesh dicts (a missing model size means 1)."""
    meshes = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        sizes = [int(x) for x in item.split("x")]
        if len(sizes) == 3:
            sizes.append(1)
        if len(sizes) != 4 or min(sizes) < 1:
            raise ValueError(f"--grid entry {item!r} must be DATAxFSDPxEXPERT[xMODEL] with sizes >= 1.")
        meshes.append(dict(zip(AXES, sizes)))
    return meshes


def enumerate_meshes(num_devices: int, with_model: bool = False) -> list[dict]:
    """Every data × fsdp × expert (× model) factorisation of `num_devices`."""
    divisors = [d for d in range(1, num_devices + 1) if num_devices % d == 0]
    meshes = []
    for data, fsdp, expert in itertools.product(divisors, repeat=3):
        rest, rem = divmod(num_devices, data * fsdp * expert)
        if rem or (rest != 1 and not with_model):
            continue
        meshes.append(dict(data=data, fsdp=fsdp, expert=expert, model=rest))
    return meshes


def candidates(meshes: list[dict], layouts: list[str]) -> list[tuple[dict, str]]:
    """Meshes × layouts, minus duplicates: with `data_parallel` every weight is
    replicated, so only the total batch split matters (one mesh per layout)."""
    out, seen = [], set()
    for mesh, layout in itertools.product(meshes, layouts):
        key = (layout, mesh_name(mesh)) if layout != "data_parallel" else (layout,)
        if key not in seen:
            seen.add(key)
            out.append((mesh, layout))
    return out


class Candidate:
    """One mesh × layout: set up, compiled and timed on this machine."""

    def __init__(self, config, mesh: dict, layout: str):
        self.config = config.copy_and_resolve_references()
        self.config.mesh.update(mesh)
        self.config.rules = layout
        self.row = {"mesh": mesh_name(mesh), "layout": layout, "status": "ok", "reason": ""}
        self.times: list[float] = []

    def prepare(self, local_batch) -> bool:
        """Builds and compiles; on failure records the reason and returns False."""
        import jax

        from mmjax.bench.fsdp_analytic import analytic_fsdp_collective_bytes
        from mmjax.bench.hlo_collectives import analyse_compiled
        from mmjax.data.pipeline import to_global_arrays
        from mmjax.parallel import get_layout, make_mesh
        from mmjax.train.config_checks import check_config
        from mmjax.train.loop import build_step
        from mmjax.train.state import MODEL_INPUTS, init_train_state

        try:
            check_config(self.config, jax.device_count(), jax.process_count())
            mesh = make_mesh(dict(self.config.mesh))
            setup, step = build_step(self.config, mesh, get_layout(self.config.rules))
        except ValueError as err:  # ConfigError, MeshConfigError, LayoutError: one sentence each
            self.row.update(status="skipped", reason=str(err))
            return False
        self.batch = to_global_arrays({k: local_batch[k] for k in MODEL_INPUTS}, setup.batch_shardings)
        self.state = init_train_state(self.config, setup)
        t0 = time.perf_counter()
        self.step = step.lower(self.state, self.batch).compile()
        self.row["compile_s"] = time.perf_counter() - t0
        stats = analyse_compiled(self.step)
        self.row.update(peak_bytes_per_device=stats.peak_bytes, argument_bytes=stats.argument_bytes,
                        temp_bytes=stats.temp_bytes, collective_bytes=stats.collective_bytes,
                        **{f"{kind.replace('-', '_')}_bytes": stats.bytes_by_kind.get(kind, 0)
                           for kind in ("all-gather", "reduce-scatter", "all-reduce", "all-to-all")})
        analytic = analytic_fsdp_collective_bytes(setup)
        self.row["fsdp_analytic_bytes"] = analytic
        self.row["collective_ratio"] = stats.collective_bytes / analytic if analytic else ""
        self.state, metrics = self.step(self.state, self.batch)  # one-off runtime warm-up
        jax.block_until_ready(metrics)
        return True

    def time_step(self) -> None:
        import jax

        t0 = time.perf_counter()
        self.state, metrics = self.step(self.state, self.batch)
        jax.block_until_ready((self.state, metrics))
        self.times.append(time.perf_counter() - t0)

    def release(self) -> None:
        self.state = self.batch = self.step = None

    def add_topology(self, topology: str) -> None:
        from mmjax.bench.aot import compile_for_topology

        try:
            report = compile_for_topology(self.config, topology)
        except ValueError as err:
            self.row.update(tpu_topology=topology, tpu_fits=f"error: {err}")
            return
        self.row.update(tpu_topology=topology, tpu_fits=report.fits, tpu_peak_bytes=report.peak_bytes,
                        tpu_collective_bytes=report.collective_bytes,
                        tpu_collective_ratio=report.collective_ratio, tpu_estimate_s=report.estimate.step_s)


def run_sweep(config, candidates_: list[tuple[dict, str]], steps: int, topology: str | None = None,
              log=print) -> list[dict]:
    """Prepares, times (round-robin) and ranks the candidates; returns result rows."""
    import jax

    from mmjax.data.pipeline import default_tokenizer, make_dataset

    local = next(iter(make_dataset(config.data, default_tokenizer(config.data),
                                   batch_size=config.data.global_batch // jax.process_count(),
                                   process_index=jax.process_index(), process_count=jax.process_count())))
    runs = [Candidate(config, mesh, layout) for mesh, layout in candidates_]
    ready = []
    for i, run in enumerate(runs, 1):
        ok = run.prepare(local)
        state = f"compiled in {run.row['compile_s']:.1f}s" if ok else f"skipped: {run.row['reason']}"
        log(f"[{i}/{len(runs)}] mesh {run.row['mesh']} layout {run.row['layout']}: {state}")
        if ok:
            ready.append(run)
        if topology and ok:
            run.add_topology(topology)
    for _ in range(steps):  # round-robin: machine noise hits every candidate alike
        for run in ready:
            run.time_step()
    for run in ready:
        run.row["step_time_s"] = statistics.median(run.times)
        run.row["step_time_p90_s"] = float(np.percentile(run.times, 90))
        run.release()
    ranked = sorted(ready, key=lambda r: r.row["step_time_s"])
    for rank, run in enumerate(ranked, 1):
        run.row["rank"] = rank
    return [r.row for r in ranked] + [r.row for r in runs if r.row["status"] != "ok"]


def print_table(rows: list[dict], log=print) -> None:
    log(f"\n{'rank':>4s} {'mesh d×f×e×m':>13s} {'layout':>14s} {'step s':>8s} {'p90 s':>8s} "
        f"{'peak MiB':>9s} {'coll MiB':>9s} {'coll/fsdp':>9s}  notes")
    for r in rows:
        if r["status"] != "ok":
            log(f"{'-':>4s} {r['mesh']:>13s} {r['layout']:>14s} {'':>8s} {'':>8s} {'':>9s} {'':>9s} {'':>9s}"
                f"  skipped: {r['reason']}")
            continue
        ratio = f"{r['collective_ratio']:.2f}" if r.get("collective_ratio") not in ("", None) else "-"
        tpu = ""
        if r.get("tpu_topology"):
            tpu = (f"  {r['tpu_topology']}: fits={r['tpu_fits']} estimate "
                   f"{r.get('tpu_estimate_s', float('nan')):.4f}s")
        log(f"{r['rank']:>4d} {r['mesh']:>13s} {r['layout']:>14s} {r['step_time_s']:8.4f} "
            f"{r['step_time_p90_s']:8.4f} {r['peak_bytes_per_device'] / 2**20:9.2f} "
            f"{r['collective_bytes'] / 2**20:9.2f} {ratio:>9s}{tpu}")


def write_outputs(rows: list[dict], workdir: str) -> None:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in COLUMNS})
    ok = [r for r in rows if r["status"] == "ok"]
    if ok:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        labels = [f"{r['mesh']}\n{r['layout']}" for r in ok]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8, 1.2 * len(ok)), 4.5))
        ax1.bar(labels, [r["step_time_s"] for r in ok], color="tab:blue")
        ax1.set_ylabel("median step time (s)")
        ax1.set_title("measured on this machine")
        ax2.bar(labels, [r["collective_bytes"] / 2**20 for r in ok], color="tab:orange")
        ax2.set_ylabel("collective MiB per device per step")
        ax2.set_title("from the compiled program")
        for ax in (ax1, ax2):
            ax.tick_params(axis="x", labelsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(workdir, "sweep.png"), dpi=100)
        plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmjax.bench.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="experiments/tiny.py", help="experiment config FILE[:ARG]")
    parser.add_argument("--workdir", required=True, help="where results.csv and sweep.png go")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per candidate")
    parser.add_argument("--grid", default="", help="explicit meshes DATAxFSDPxEXPERT[xMODEL],... "
                        "(default: every factorisation of the device count)")
    parser.add_argument("--layouts", default="fsdp,data_parallel", help="comma-separated layout names")
    parser.add_argument("--with_model", action="store_true", help="also enumerate a model (tensor) axis")
    parser.add_argument("--topology", default=None, help="also compile each candidate for this TPU "
                        "topology ahead of time, e.g. v5p:2x2x1 (needs the `tpu` extra)")
    args = parser.parse_args(argv)
    config = _load_config(args.config)
    import jax

    if config.runtime.cpu_devices:
        jax.config.update("jax_num_cpu_devices", config.runtime.cpu_devices)
    meshes = parse_grid(args.grid) if args.grid else enumerate_meshes(jax.device_count(), args.with_model)
    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    rows = run_sweep(config, candidates(meshes, layouts), args.steps, args.topology)
    print_table(rows)
    write_outputs(rows, args.workdir)
    print(f"\nwrote {os.path.join(args.workdir, 'results.csv')} and sweep.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
