"""MoE vs dense step time at matched active parameters, measured side by side.

  python -m mmjax.bench.moe_vs_dense --config experiments/moe_pairs.py:tiny --workdir DIR \
      [--steps 20] [--topology v5p:2x2x1]
  python -m mmjax.bench.moe_vs_dense --dense experiments/tiny.py --moe experiments/tiny_moe.py

Builds the dense config and the MoE config with each dispatch path
(capacity, dropless), compiles each train step for the same mesh, then times
`--steps` steps of each on one fixed batch, interleaving the configurations
round by round so machine noise hits all of them alike. Each step is timed to
device completion (`block_until_ready`). Prints a table with the median step
time, the dispatch path and the MoE/dense ratio; with --workdir also writes
`results.csv` and `moe_vs_dense.png`. With --topology each configuration is
also compiled ahead of time for a TPU topology and its step time ESTIMATED
from the compiled FLOPs, bytes and collectives (`mmjax/bench/estimate.py`).
"""

from __future__ import annotations

import argparse
import csv
import os
import runpy
import statistics
import time

import numpy as np


def _load_config(spec: str):
    path, _, arg = spec.partition(":")
    return runpy.run_path(path)["get_config"](arg or None)


def _active_params(config, params) -> tuple[int, int]:
    """(total, active per token): experts count top_k/num_experts of their weights."""
    import jax

    total = active = 0
    moe = config.model.decoder.moe
    for path, leaf in jax.tree_util.tree_flatten_with_path(params.to_pure_dict())[0]:
        name = jax.tree_util.keystr(path)
        total += leaf.size
        expert = any(k in name for k in ("wi_gate", "wi_up", "'wo'"))
        active += leaf.size * moe.top_k // moe.num_experts if expert else leaf.size
    return total, active


def _dispatch(config) -> str:
    moe = config.model.decoder.moe
    return moe.dispatch if moe.num_experts else "dense"


def _add_topology_estimates(runs: dict, rows: list[dict], topology: str) -> None:
    """AOT-compiles each configuration for `topology`; adds the estimated step
    time (an estimate from compiled FLOPs, bytes and collectives) and its ratio."""
    from mmjax.bench.aot import compile_for_topology

    estimates = {}
    for name, cfg in runs.items():
        report = compile_for_topology(cfg, topology)
        estimates[name] = report
    base = estimates["dense"].estimate.step_s
    print(f"\n{topology}: ESTIMATED step time from the ahead-of-time compiled step (not measured)")
    print(f"{'config':16s} {'fits':>5s} {'peak GiB':>9s} {'est. s':>9s} {'/dense':>7s}")
    for row in rows:
        report = estimates[row["config"]]
        row.update(topology=topology, tpu_fits=report.fits, tpu_peak_bytes=report.peak_bytes,
                   tpu_estimate_s=report.estimate.step_s, tpu_ratio_to_dense=report.estimate.step_s / base)
        print(f"{row['config']:16s} {str(report.fits):>5s} {report.peak_bytes / 2**30:9.3f} "
              f"{report.estimate.step_s:9.5f} {report.estimate.step_s / base:7.2f}")


def _plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["config"] for r in rows]
    panels = [("step_time_s", "measured median step time (s)")]
    if "tpu_estimate_s" in rows[0]:
        panels.append(("tpu_estimate_s", f"estimated step time on {rows[0]['topology']} (s)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        bars = ax.bar(names, [r[key] for r in rows], color=["tab:gray", "tab:blue", "tab:orange"][:len(rows)])
        for bar, r in zip(bars, rows):
            ax.annotate(f"{r[key] / rows[0][key]:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmjax.bench.moe_vs_dense", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None,
                        help="a pair file FILE:PAIR, e.g. experiments/moe_pairs.py:tiny, read as "
                             "get_config('PAIR-dense') and get_config('PAIR-moe'); overrides --dense/--moe")
    parser.add_argument("--dense", default="experiments/tiny.py", help="dense experiment config FILE[:ARG]")
    parser.add_argument("--moe", default="experiments/tiny_moe.py", help="MoE experiment config FILE[:ARG]")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    parser.add_argument("--workdir", default=None, help="where to write results.csv and moe_vs_dense.png")
    parser.add_argument("--topology", default=None,
                        help="also compile each configuration ahead of time for this TPU topology "
                             "(e.g. v5p:2x2x1; needs the `tpu` extra) and report its estimated step time")
    args = parser.parse_args(argv)
    if args.config:
        path, _, pair = args.config.partition(":")
        if not pair:
            parser.error(f"--config={args.config!r} must name a pair: FILE:PAIR")
        args.dense, args.moe = f"{path}:{pair}-dense", f"{path}:{pair}-moe"

    dense = _load_config(args.dense)
    import jax

    jax.config.update("jax_num_cpu_devices", dense.runtime.cpu_devices or jax.config.jax_num_cpu_devices)
    from mmjax.data.pipeline import default_tokenizer, make_dataset, to_global_arrays
    from mmjax.parallel import get_layout, make_mesh
    from mmjax.train.optimizer import learning_rate_schedule, make_optimizer
    from mmjax.train.state import MODEL_INPUTS, build_train_setup, init_train_state
    from mmjax.train.step import make_train_step

    runs = {"dense": dense}
    for dispatch in ("capacity", "dropless"):
        cfg = _load_config(args.moe)
        cfg.model.decoder.moe.dispatch = dispatch
        runs[f"moe-{dispatch}"] = cfg
    mesh = make_mesh(dict(dense.mesh))
    local = next(iter(make_dataset(dense.data, default_tokenizer(dense.data),
                                   batch_size=dense.data.global_batch)))
    prepared = {}
    for name, cfg in runs.items():
        setup = build_train_setup(cfg, mesh, get_layout(cfg.rules),
                                  lambda p, c=cfg: make_optimizer(c.optimizer, 1000, p))
        moe = cfg.model.decoder.moe
        step = make_train_step(setup, learning_rate_schedule(cfg.optimizer, 1000), cfg.loss.z_loss,
                               moe.load_balance_weight, moe.router_z_weight)
        state = init_train_state(cfg, setup)
        total, active = _active_params(cfg, state["params"]) if moe.num_experts else (
            (n := sum(x.size for x in jax.tree.leaves(state["params"]))), n)
        batch = to_global_arrays({k: local[k] for k in MODEL_INPUTS}, setup.batch_shardings)
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        print(f"{name}: compiled + first step in {time.perf_counter() - t0:.1f}s "
              f"({total:,} params, {active:,} active per token)", flush=True)
        prepared[name] = dict(step=step, state=state, batch=batch, times=[], total=total, active=active)
    for _ in range(args.steps):  # round-robin: every config sees the same machine conditions
        for run in prepared.values():
            t0 = time.perf_counter()
            run["state"], metrics = run["step"](run["state"], run["batch"])
            jax.block_until_ready(metrics)
            run["times"].append(time.perf_counter() - t0)

    base = statistics.median(prepared["dense"]["times"])
    rows = []
    print(f"\nmesh {dict(mesh.shape)}, {args.steps} timed steps each, median step time to device completion")
    print(f"{'config':16s} {'params':>11s} {'active':>11s} {'step s':>8s} {'p90 s':>8s} {'/dense':>7s}")
    for name, run in prepared.items():
        med, p90 = statistics.median(run["times"]), float(np.percentile(run["times"], 90))
        rows.append(dict(config=name, dispatch=_dispatch(runs[name]), params=run["total"],
                         active_params=run["active"], step_time_s=med, step_time_p90_s=p90,
                         ratio_to_dense=med / base))
        print(f"{name:16s} {run['total']:>11,} {run['active']:>11,} {med:8.4f} {p90:8.4f} {med / base:7.2f}")
    if args.topology:
        _add_topology_estimates(runs, rows, args.topology)
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
        with open(os.path.join(args.workdir, "results.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        _plot(rows, os.path.join(args.workdir, "moe_vs_dense.png"))
        print(f"wrote {os.path.join(args.workdir, 'results.csv')} and moe_vs_dense.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
