"""The training loop's overhead, measured side by side with the bare step.

  python -m mmjax.bench.loop_overhead --config experiments/tiny.py --workdir DIR [--steps 60]
      [--config.FIELD=VALUE ...]

In one process: (1) the bare jitted train step (the very step `mmjax.train`
builds) called in a plain Python loop on one device-resident batch, each call
timed to completion; (2) `mmjax.train` itself for `--steps` steps (log every
step, no evaluation, no checkpoint until the end) without input prefetch
(`train.prefetch=0`: each batch is read and placed when the step needs it)
and (3) with it (the configured depth, default 2: the next batches are made
while the step runs); (4) the bare loop again. Prints the median step time
and the median wall time per step (data wait and host work included) of
each run over the bare step; the target is a wall time per step <= 1.05 x
the bare step with prefetch. On a CPU-only host the "device" computes on the
same cores the input pipeline uses, so overlap cannot hide the pipeline's
CPU time there; it shows as a longer step instead. Writes `results.csv` and
`summary.json` under --workdir.
"""

from __future__ import annotations

import json
import statistics
import time

from mmjax.paths import workdir_path, write_csv, write_text



def bare_step_times(config, steps: int) -> list[float]:
    """Seconds per call of the bare compiled step on one device-resident batch."""
    import jax

    from mmjax.data.pipeline import default_tokenizer, make_dataset, to_global_arrays
    from mmjax.parallel import get_layout, make_mesh
    from mmjax.train.loop import build_step
    from mmjax.train.state import init_train_state

    setup, train_step = build_step(config, make_mesh(dict(config.mesh)), get_layout(config.rules))
    local = next(iter(make_dataset(config.data, default_tokenizer(config.data),
                                   batch_size=config.data.global_batch)))
    batch = to_global_arrays({k: local[k] for k in setup.batch_shardings}, setup.batch_shardings)
    state = init_train_state(config, setup)
    step = train_step.lower(state, batch).compile()
    for _ in range(3):
        state, metrics = step(state, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    return times


def parse_args(argv: list[str]):
    """The command line (module doc); `--config.FIELD=VALUE` overrides apply."""
    from absl import flags

    from mmjax.frontend import parse_flags

    def define(fv):
        flags.DEFINE_string("workdir", None, "where the run, results.csv and summary.json go", flag_values=fv)
        flags.DEFINE_integer("steps", 60, "timed steps of each kind (the training run takes one more: its "
                             "first step pays one-off runtime warm-up and is dropped)", flag_values=fv)

    args = parse_flags(argv, "python -m mmjax.bench.loop_overhead", __doc__, define, "experiments/tiny.py")
    if not args.workdir:
        raise SystemExit("error: --workdir is required (the run, results.csv and summary.json go there).")
    return args


def main(argv=None) -> int:
    import sys

    from mmjax.frontend import prepare_runtime

    args = parse_args(sys.argv[1:] if argv is None else argv)
    config = args.config.copy_and_resolve_references()
    prepare_runtime(config)
    import jax

    from mmjax.train.loop import train

    workdir = workdir_path(args.workdir)
    config.train.steps = args.steps + 1  # the first step pays one-off runtime warm-up; dropped below
    config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, config.train.steps)  # LR is not timed
    config.train.log_every = 1
    config.train.checkpoint_every = config.train.steps
    for name in config.eval:  # no evaluation: only the steps are timed
        config.eval[name] = False
    print(f"bare step, {args.steps} calls ...", flush=True)
    bare = bare_step_times(config, args.steps)
    depth = config.train.prefetch
    runs = {}
    for name, prefetch in (("without prefetch", 0), (f"prefetch {depth}", depth)):
        run_dir = workdir / f"loop_run_prefetch{prefetch}"
        if (run_dir / "checkpoints").exists():
            raise SystemExit(f"{run_dir} already holds a run; choose a fresh --workdir.")
        print(f"mmjax.train {name}, {config.train.steps} steps ...", flush=True)
        config.train.prefetch = prefetch
        train(config, run_dir)
        records = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                   if "step_time_s" in r][1:]
        runs[name] = (statistics.median(r["step_time_s"] for r in records),
                      statistics.median(r["wall_per_step_s"] for r in records))
    print(f"bare step again, {args.steps} calls ...", flush=True)
    bare += bare_step_times(config, args.steps)
    bare_median = statistics.median(bare)
    rows = [{"measure": "bare jitted step (median)", "seconds": bare_median, "ratio_to_bare": 1.0}]
    for name, (step, wall) in runs.items():
        rows += [{"measure": f"mmjax.train {name}: step_time_s (median)", "seconds": step,
                  "ratio_to_bare": step / bare_median},
                 {"measure": f"mmjax.train {name}: wall per step (median)", "seconds": wall,
                  "ratio_to_bare": wall / bare_median}]
    print(f"\n{'measure':56s} {'seconds':>9s} {'x bare':>8s}")
    for row in rows:
        print(f"{row['measure']:56s} {row['seconds']:9.4f} {row['ratio_to_bare']:8.3f}")
    loop_step, loop_wall = runs[f"prefetch {depth}"]
    ratio = loop_wall / bare_median
    print(f"\nloop wall time per step: {ratio:.3f} x the bare step (target <= 1.05: "
          f"{'PASS' if ratio <= 1.05 else 'ABOVE'}); without prefetch "
          f"{runs['without prefetch'][1] / bare_median:.3f} x")
    write_csv(workdir / "results.csv", ["measure", "seconds", "ratio_to_bare"], rows)
    write_text(workdir / "summary.json", json.dumps({"config": config.to_dict(), "steps": args.steps, "devices": jax.device_count(),
                   "bare_median_s": bare_median, "loop_step_median_s": loop_step,
                   "loop_wall_per_step_median_s": loop_wall, "overhead_ratio": ratio,
                   "without_prefetch": {"step_median_s": runs["without prefetch"][0],
                                        "wall_per_step_median_s": runs["without prefetch"][1]}}, indent=2))
    return 0


if __name__ == "__main__":
    import sys

    from mmjax.frontend import run_command

    sys.exit(run_command(main))
