"""Sharding-layout sweep: which `data × fsdp × expert [× model]` mesh and rule
set is fastest / fits.

  python -m mmjax.bench.sweep --config experiments/tiny.py --workdir DIR [--steps 10]
      [--grid 2x2x2x1,8x1x1x1,...] [--layouts fsdp,data_parallel] [--with_model]
      [--remat none,full,dots_no_batch] [--topology v5p:2x2x1] [--config.FIELD=VALUE ...]

Candidates are every factorisation of the device count into data × fsdp ×
expert (× model with --with_model) crossed with the named layouts, or the
explicit `--grid` (DATAxFSDPxEXPERTxMODEL), crossed with the `--remat`
policies (applied to the ViT and the decoder; the fastest that fits wins). A candidate the config cannot use
(batch not divisible, a weight dimension not divisible by its mesh axis,
wrong device count, ...) is skipped with the reason. For each valid one the
real train step is compiled for this machine's devices and timed (median of
`--steps` steps to device completion, round-robin over candidates), with
per-device memory and collective bytes from the compiled program; with
`--topology` the same step is also compiled ahead of time for that TPU
topology (fits, memory, collectives, FSDP collective ratio, step-time
estimate). Writes `results.csv` (columns in the README), a ranked table on
stdout and `sweep.png`.

For a pod that is not at hand, `--aot_only --topology v5p:4x8x8` enumerates
the meshes of the topology's device count instead, compiles every candidate
ahead of time for it (nothing runs here) and ranks the ones that fit by the
ESTIMATED step time (`mmjax/bench/estimate.py`); the local columns stay
empty and `rank` follows the estimate.
"""

from __future__ import annotations

import itertools
import os

from mmjax.bench.harness import (AXES, TimedConfig, first_batch, mesh_name, remat_name, time_round_robin,
                                 tpu_columns, with_candidate)
from mmjax.errors import ConfigError
from mmjax.paths import save_figure, workdir_path, write_csv

COLUMNS = ("rank", "mesh", "layout", "remat", "status", "reason", "step_time_s", "step_time_p90_s",
           "compile_s", "peak_bytes_per_device", "argument_bytes", "temp_bytes", "collective_bytes",
           "all_gather_bytes", "reduce_scatter_bytes", "all_reduce_bytes", "all_to_all_bytes",
           "fsdp_analytic_bytes", "collective_ratio", "tpu_topology", "tpu_fits", "tpu_peak_bytes",
           "tpu_collective_bytes", "tpu_collective_ratio", "tpu_estimate_s")


def parse_grid(text: str) -> list[dict]:
    """`"2x2x2x1,8x1x1x1"` -> mesh dicts (a missing model size means 1)."""
    meshes = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        try:
            sizes = [int(x) for x in item.split("x")]
        except ValueError:
            sizes = []
        if len(sizes) == 3:
            sizes.append(1)
        if len(sizes) != 4 or min(sizes) < 1:
            raise ConfigError(f"--grid entry {item!r} must be DATAxFSDPxEXPERT[xMODEL] with integer sizes >= 1, "
                              "e.g. 2x2x2 or 4x1x1x2.")
        meshes.append(dict(zip(AXES, sizes)))
    return meshes


def parse_layouts(text: str) -> list[str]:
    """`"fsdp,data_parallel"` -> layout names; an unknown or missing name is a ConfigError."""
    from mmjax.frontend import suggest
    from mmjax.parallel.rules import LAYOUTS

    layouts = [x.strip() for x in text.split(",") if x.strip()]
    if not layouts:
        raise ConfigError(f"--layouts={text!r} names no layout; choose from {', '.join(sorted(LAYOUTS))}.")
    for name in layouts:
        if name not in LAYOUTS:
            raise ConfigError(f"--layouts names {name!r}, which is not a layout{suggest(name, LAYOUTS)} "
                              f"(known: {', '.join(sorted(LAYOUTS))}).")
    return layouts


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


def parse_remats(text: str) -> list[str | None]:
    """`--remat none,full,dots` -> policies for the ViT and decoder ("" for
    none); empty: [None], the config's own."""
    from mmjax.frontend import suggest
    from mmjax.models.stack import REMAT_POLICIES

    names = [x.strip() for x in text.split(",") if x.strip()]
    for name in names:
        if name != "none" and name not in REMAT_POLICIES:
            raise ConfigError(f"--remat names {name!r}, which is not a remat policy"
                              f"{suggest(name, ['none', *REMAT_POLICIES])} (choose from none, "
                              f"{', '.join(sorted(REMAT_POLICIES))}).")
    return [("" if n == "none" else n) for n in names] or [None]


def candidates(meshes: list[dict], layouts: list[str], remats=(None,)) -> list[tuple]:
    """Meshes × layouts × remat policies, minus duplicates: with
    `data_parallel` every weight is replicated, so only the total batch split
    matters (one mesh per layout). Items are (mesh, layout) or, with remat
    policies, (mesh, layout, remat)."""
    out, seen = [], set()
    for mesh, layout, remat in itertools.product(meshes, layouts, remats):
        key = ((layout, mesh_name(mesh)) if layout != "data_parallel" else (layout,)) + (remat,)
        if key not in seen:
            seen.add(key)
            out.append((mesh, layout) if remat is None else (mesh, layout, remat))
    return out


def run_sweep(config, candidates_: list[tuple[dict, str]], steps: int, topology: str | None = None,
              log=print) -> list[dict]:
    """Prepares, times (round-robin) and ranks the candidates; returns result rows."""
    local = first_batch(config)
    runs = [TimedConfig(config, *candidate) for candidate in candidates_]
    ready = []
    for i, run in enumerate(runs, 1):
        ok = run.prepare(local)
        state = f"compiled in {run.row['compile_s']:.1f}s" if ok else f"skipped: {run.row['reason']}"
        log(f"[{i}/{len(runs)}] mesh {run.row['mesh']} layout {run.row['layout']} remat {run.row['remat']}: {state}")
        if ok:
            ready.append(run)
        if topology and ok:
            run.add_topology(topology)
    time_round_robin(ready, steps)
    ranked = sorted(ready, key=lambda r: r.row["step_time_s"])
    for rank, run in enumerate(ranked, 1):
        run.row["rank"] = rank
    return [r.row for r in ranked] + [r.row for r in runs if r.row["status"] != "ok"]


def run_aot_sweep(config, candidates_: list[tuple[dict, str]], topology: str, log=print) -> list[dict]:
    """Compiles every candidate ahead of time for `topology` only; ranks the
    ones that fit by estimated step time, then those that do not fit."""
    from mmjax.bench.aot import DoesNotFit, compile_for_topology

    rows = []
    for i, candidate in enumerate(candidates_, 1):
        mesh, layout = candidate[:2]
        cfg = with_candidate(config, *candidate)
        row = {"mesh": mesh_name(mesh), "layout": layout, "remat": remat_name(cfg), "status": "ok", "reason": "",
               "tpu_topology": topology}
        try:
            report = compile_for_topology(cfg, topology)
        except DoesNotFit as err:  # libtpu would not compile it: listed after the ranked candidates
            row.update(status="does not fit", tpu_fits=False, tpu_peak_bytes=err.needed_bytes, reason=str(err))
            log(f"[{i}/{len(candidates_)}] mesh {row['mesh']} layout {layout}: does not fit: {err}")
            rows.append(row)
            continue
        except ValueError as err:  # TopologyError, ConfigError, LayoutError: one sentence each
            row.update(status="skipped", reason=str(err))
            log(f"[{i}/{len(candidates_)}] mesh {row['mesh']} layout {layout}: skipped: {err}")
            rows.append(row)
            continue
        row.update(compile_s=report.compile_s, **tpu_columns(report))
        log(f"[{i}/{len(candidates_)}] mesh {row['mesh']} layout {layout}: compiled in {report.compile_s:.1f}s, "
            f"peak {report.peak_bytes / 2**30:.2f} GiB, fits={report.fits}")
        rows.append(row)
    ok = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: (not r["tpu_fits"], r["tpu_estimate_s"]))
    for rank, row in enumerate(ok, 1):
        row["rank"] = rank
    return ok + [r for r in rows if r["status"] != "ok"]


def print_table(rows: list[dict], log=print) -> None:
    log(f"\n{'rank':>4s} {'mesh d×f×e×m':>13s} {'layout':>14s} {'remat':>13s} {'step s':>8s} {'p90 s':>8s} "
        f"{'peak MiB':>9s} {'coll MiB':>9s} {'coll/fsdp':>9s}  notes")
    for r in rows:
        remat = r.get("remat", "")
        if r["status"] != "ok":
            log(f"{'-':>4s} {r['mesh']:>13s} {r['layout']:>14s} {remat:>13s} {'':>8s} {'':>8s} {'':>9s} {'':>9s} "
                f"{'':>9s}  {'skipped' if r['status'] == 'skipped' else r['status']}: {r['reason']}")
            continue
        if "step_time_s" not in r:  # compiled for the topology only
            log(f"{r['rank']:>4d} {r['mesh']:>13s} {r['layout']:>14s} {remat:>13s} {'':>8s} {'':>8s} "
                f"{r['tpu_peak_bytes'] / 2**20:9.0f} {r['tpu_collective_bytes'] / 2**20:9.1f} "
                f"{r['tpu_collective_ratio']:9.2f}  {r['tpu_topology']}: fits={r['tpu_fits']} "
                f"ESTIMATE {r['tpu_estimate_s'] * 1e3:.3f} ms")
            continue
        ratio = f"{r['collective_ratio']:.2f}" if r.get("collective_ratio") not in ("", None) else "-"
        tpu = ""
        if r.get("tpu_topology"):
            tpu_ratio, est = r.get("tpu_collective_ratio"), r.get("tpu_estimate_s")
            tpu = (f"  {r['tpu_topology']}: fits={r['tpu_fits']}"
                   + (f" coll/fsdp {tpu_ratio:.2f} ESTIMATE {est * 1e3:.3f} ms" if isinstance(est, float) else ""))
        log(f"{r['rank']:>4d} {r['mesh']:>13s} {r['layout']:>14s} {remat:>13s} {r['step_time_s']:8.4f} "
            f"{r['step_time_p90_s']:8.4f} {r['peak_bytes_per_device'] / 2**20:9.2f} "
            f"{r['collective_bytes'] / 2**20:9.2f} {ratio:>9s}{tpu}")


def write_outputs(rows: list[dict], workdir: str) -> None:
    workdir = workdir_path(workdir)
    write_csv(workdir / "results.csv", COLUMNS, [{k: row.get(k, "") for k in COLUMNS} for row in rows])
    ok = [r for r in rows if r["status"] == "ok"]
    if ok:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        labels = [f"{r['mesh']}\n{r['layout']}" + (f"\n{r['remat']}" if r.get("remat") else "") for r in ok]
        local = all("step_time_s" in r for r in ok)
        time_key, bytes_key = ("step_time_s", "collective_bytes") if local else ("tpu_estimate_s",
                                                                               "tpu_collective_bytes")
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8, 1.2 * len(ok)), 4.5))
        ax1.bar(labels, [r[time_key] for r in ok], color="tab:blue")
        ax1.set_ylabel("median step time (s)" if local else "ESTIMATED step time (s)")
        ax1.set_title("measured on this machine" if local else f"estimate for {ok[0]['tpu_topology']}")
        ax2.bar(labels, [r[bytes_key] / 2**20 for r in ok], color="tab:orange")
        ax2.set_ylabel("collective MiB per device per step")
        ax2.set_title("from the compiled program")
        for ax in (ax1, ax2):
            ax.tick_params(axis="x", labelsize=7)
        fig.tight_layout()
        save_figure(fig, workdir / "sweep.png", dpi=100)
        plt.close(fig)


def parse_args(argv: list[str]):
    """The command line (module doc); `--config.FIELD=VALUE` overrides apply."""
    from absl import flags

    from mmjax.frontend import parse_flags

    def define(fv):
        flags.DEFINE_string("workdir", None, "where results.csv and sweep.png go", flag_values=fv)
        flags.DEFINE_integer("steps", 10, "timed steps per candidate", flag_values=fv)
        flags.DEFINE_string("grid", "", "explicit meshes DATAxFSDPxEXPERT[xMODEL],... (default: every "
                            "factorisation of the device count)", flag_values=fv)
        flags.DEFINE_string("layouts", "fsdp,data_parallel", "comma-separated layout names", flag_values=fv)
        flags.DEFINE_bool("with_model", False, "also enumerate a model (tensor) axis", flag_values=fv)
        flags.DEFINE_string("remat", "", "comma-separated remat policies for the ViT and decoder to sweep "
                            "(none or a policy of mmjax/models/stack.py: full, dots, dots_no_batch, qkv_proj, attention, "
                            "their _offload variants); default: the config's own", flag_values=fv)
        flags.DEFINE_string("topology", None, "also compile each candidate for this TPU topology ahead of "
                            "time, e.g. v5p:2x2x1 (needs the `tpu` extra)", flag_values=fv)
        flags.DEFINE_bool("aot_only", False, "only compile for --topology (a pod not at hand): enumerate "
                          "its device count, rank by the estimated step time", flag_values=fv)

    args = parse_flags(argv, "python -m mmjax.bench.sweep", __doc__, define, "experiments/tiny.py")
    if not args.workdir:
        raise SystemExit("error: --workdir is required (results.csv and sweep.png go there).")
    if args.aot_only and not args.topology:
        raise SystemExit("error: --aot_only needs --topology (the TPU slice to compile for).")
    return args


def main(argv=None) -> int:
    import sys

    from mmjax.frontend import prepare_runtime

    args = parse_args(sys.argv[1:] if argv is None else argv)
    config = args.config
    grid, layouts = parse_grid(args.grid), parse_layouts(args.layouts)  # ConfigError: one sentence
    remats = parse_remats(args.remat)
    workdir_path(args.workdir)  # a bucket that cannot be reached is refused before the sweep
    prepare_runtime(config)
    import jax

    if args.aot_only:
        from mmjax.bench.topology import topology_devices

        devices = len(topology_devices(args.topology)[1])  # TopologyError: one sentence
    else:
        devices = jax.device_count()
    meshes = grid or enumerate_meshes(devices, args.with_model)
    if args.aot_only:
        rows = run_aot_sweep(config, candidates(meshes, layouts, remats), args.topology)
    else:
        rows = run_sweep(config, candidates(meshes, layouts, remats), args.steps, args.topology)
    print_table(rows)
    write_outputs(rows, args.workdir)
    print(f"\nwrote {os.path.join(args.workdir, 'results.csv')} and sweep.png")
    if not any(r["status"] == "ok" for r in rows):
        print(f"error: none of the {len(rows)} candidates could be used; results.csv gives each reason.",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    import sys

    from mmjax.frontend import run_command

    sys.exit(run_command(main))
