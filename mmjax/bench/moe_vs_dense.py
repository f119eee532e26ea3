"""MoE vs dense step time at matched active parameters, measured side by side.

  python -m mmjax.bench.moe_vs_dense --config experiments/moe_pairs.py:tiny --workdir DIR \
      [--steps 20] [--topology v5p:2x2x2]
  python -m mmjax.bench.moe_vs_dense --dense experiments/tiny.py --moe experiments/tiny_moe.py
      [--config.FIELD=VALUE ...]   (applied to both configurations)
  python -m mmjax.bench.moe_vs_dense --config experiments/vmoe_tiny.py:tiny   (a vision MoE pair)

Builds the dense config and the MoE config with each dispatch path
(`capacity`: GShard einsum with all-to-alls; `dropless`: sort + grouped
matmul, the routed rows sent along `expert` by ragged all-to-all, emulated
densely on CPU), compiles each train
step for the same mesh (`mmjax.bench.harness`; a pair whose MoE is in the
ViT, `config.model.vit.moe`, has the one `capacity` path: experts routed per
image, `mmjax.models.vision_moe`), then times `--steps` steps of
each on one fixed batch, interleaving the configurations round by round so
machine noise hits all of them alike. Each step is timed to device
completion (`block_until_ready`). Prints a table with the median step time,
the dispatch path and the MoE/dense ratio; with --workdir also writes
`results.csv` and `moe_vs_dense.png`. With --topology each configuration is
also compiled ahead of time for a TPU topology and its step time ESTIMATED
from the compiled FLOPs, bytes and collectives (`mmjax/bench/estimate.py`).

`results.csv` columns: config, dispatch, params, active_params,
capacity_factor, expert_flops_ratio (the MLP FLOPs the MoE layers execute
per step / the dense MLP's in the same layers, padding of the capacity
buffers included: a vision pair with E=2, top_k=1, capacity_factor=2 runs
2x the dense MLP FLOPs, so its ratio_to_dense is NOT at equal compute;
`expert_compute`), step_time_s, step_time_p90_s, ratio_to_dense, collective_bytes (per device per step, from
the compiled program), all_to_all_bytes, peak_bytes_per_device; with
--topology also topology, tpu_fits, tpu_peak_bytes, tpu_collective_bytes,
tpu_flops_ratio (compiled / analytic FLOPs of the whole step; XLA counts a
loop body once, so a scanned stack reads low), tpu_megablox_flops_ratio
(the megablox kernels' own FLOP estimates / the analytic count of the expert
matmuls they run; nan without them), tpu_estimate_s, tpu_ratio_to_dense.
`--aot_only` only compiles for --topology (a pair too large for this
machine, e.g. `experiments/moe_pairs.py:3b --topology v5p:4x8x8`).
"""

from __future__ import annotations

import os

from mmjax.bench.harness import TimedConfig, first_batch, time_round_robin
from mmjax.errors import ConfigError
from mmjax.paths import save_figure, workdir_path, write_csv
from mmjax.train.param_counts import param_counts

DISPATCHES = ("capacity", "dropless")


def vision_moe(config) -> bool:
    """Whether the config's MoE is the ViT's (per-image experts) rather than the decoder's."""
    return bool(config.model.vit.get("moe") and config.model.vit.moe.num_experts
                and not config.model.decoder.moe.num_experts)


def dispatch_name(config) -> str:
    """"dense", or the MoE's dispatch path ("capacity" for a vision MoE)."""
    if vision_moe(config):
        return "capacity"
    return config.model.decoder.moe.dispatch if config.model.decoder.moe.num_experts else "dense"


def expert_compute(config) -> tuple[float, float]:
    """(capacity_factor, expert_flops_ratio) of a configuration: the MLP
    FLOPs its MoE layers execute per step over the FLOPs the dense MLP of
    the same layers would (1.0 for dense). Capacity dispatch runs every
    expert on all its C slots of every group, padding included:
    E * C * expert_mlp / (S * mlp) for groups of S routed units (tokens, or
    images for the ViT's MoE; `mmjax.models.moe.capacity`); dropless runs
    only the routed rows: top_k * expert_mlp / mlp. The one-hot dispatch /
    combine einsums come on top of this."""
    import math

    import jax

    from mmjax.models.moe import capacity, dispatch_groups
    from mmjax.parallel.mesh import resolve_mesh_shape
    from mmjax.parallel.rules import get_layout

    if dispatch_name(config) == "dense":
        return float("nan"), 1.0
    if vision_moe(config):
        moe, mlp = config.model.vit.moe, config.model.vit.mlp
        units, group_size = config.data.global_batch, 0
    else:
        moe, mlp = config.model.decoder.moe, config.model.decoder.mlp
        units, group_size = config.data.global_batch * config.data.seq_len, moe.get("group_size", 0)
        if moe.dispatch == "dropless":
            return float("nan"), moe.top_k * moe.expert_mlp / mlp
    units //= config.train.get("grad_accum_steps", 1)
    axes = get_layout(config.rules).get("batch") or ()
    mesh = resolve_mesh_shape(dict(config.mesh), jax.device_count())
    shards = math.prod(mesh.get(a, 1) for a in ((axes,) if isinstance(axes, str) else axes))
    groups = dispatch_groups(units, max(shards, 1), group_size)
    cap = capacity(units // groups, moe.top_k, moe.num_experts, moe.capacity_factor)
    return float(moe.capacity_factor), moe.num_experts * cap * moe.expert_mlp / (units // groups * mlp)


def variants(dense, moe) -> dict:
    """{"dense": dense, "moe-capacity": ..., "moe-dropless": ...}: the MoE
    config once per dispatch path (a vision MoE: "moe-capacity" only)."""
    runs = {"dense": dense}
    if vision_moe(moe):
        runs["moe-capacity"] = moe
        return runs
    for dispatch in DISPATCHES:
        cfg = moe.copy_and_resolve_references()
        cfg.model.decoder.moe.dispatch = dispatch
        runs[f"moe-{dispatch}"] = cfg
    return runs


def compare(dense, moe, steps: int, topology: str | None = None, log=print, aot_only: bool = False) -> list[dict]:
    """Times the dense config and the MoE config with both dispatch paths
    side by side on this machine's devices (the dense config's mesh);
    returns one row per configuration (the module doc lists the columns).
    `aot_only`: only the ahead-of-time compiles for `topology` (a pod not at
    hand), nothing runs here."""
    others = lambda mesh: {a: v for a, v in dict(mesh).items() if a not in ("fsdp", "expert")}  # noqa: E731
    if others(moe.mesh) != others(dense.mesh) or (-1 not in (moe.mesh.fsdp, dense.mesh.fsdp) and
                                                  moe.mesh.fsdp * moe.mesh.expert != dense.mesh.fsdp * dense.mesh.expert):
        raise ConfigError(f"the MoE config's mesh {dict(moe.mesh)} does not split the dense config's "
                         f"{dict(dense.mesh)} devices the same way (only fsdp x expert may differ); a side-by-side "
                         f"comparison needs the same devices.")
    configs = variants(dense, moe)
    local = None if aot_only else first_batch(dense)
    runs = {}
    for name, cfg in configs.items():
        run = TimedConfig(cfg)
        if not aot_only and not run.prepare(local):
            raise ConfigError(f"{name}: {run.row['reason']}")
        n = param_counts(cfg)
        factor, ratio = expert_compute(cfg)
        run.row.update(config=name, dispatch=dispatch_name(cfg), params=n["total"], active_params=n["active"],
                       capacity_factor=factor, expert_flops_ratio=ratio)
        where = "" if aot_only else f" compiled in {run.row['compile_s']:.1f}s"
        unit = "image" if vision_moe(moe) else "token"
        log(f"{name}:{where} ({n['total']:,} params, {n['active']:,} active per {unit})")
        if topology:
            run.add_topology(topology)
            fits = run.row["tpu_fits"]
            log(f"{name}: {topology} estimate {run.row.get('tpu_estimate_s', float('nan')):.4f} s, fits: {fits}")
        runs[name] = run
    rows = [run.row for run in runs.values()]
    base = runs["dense"].row
    if not aot_only:
        time_round_robin(list(runs.values()), steps)
        for row in rows:
            row["ratio_to_dense"] = row["step_time_s"] / base["step_time_s"]
    for row in rows:
        if topology and isinstance(base.get("tpu_estimate_s"), float) and isinstance(row.get("tpu_estimate_s"), float):
            row["tpu_ratio_to_dense"] = row["tpu_estimate_s"] / base["tpu_estimate_s"]
    return rows


COLUMNS = ("config", "dispatch", "params", "active_params", "capacity_factor", "expert_flops_ratio",
           "step_time_s", "step_time_p90_s", "ratio_to_dense", "collective_bytes", "all_to_all_bytes",
           "peak_bytes_per_device")
TPU_COLUMNS = ("tpu_topology", "tpu_fits", "tpu_peak_bytes", "tpu_collective_bytes", "tpu_flops_ratio",
               "tpu_megablox_flops_ratio", "tpu_estimate_s", "tpu_ratio_to_dense")


def print_table(rows: list[dict], mesh: str, steps: int, log=print) -> None:
    if "step_time_s" in rows[0]:
        log(f"\nmesh {mesh}, {steps} timed steps each, median step time to device completion")
        log("cap: capacity factor; MLP FLOPs: the MoE layers' executed expert FLOPs / their dense MLP's "
            "(padding included; dispatch and combine on top)")
        log(f"{'config':14s} {'dispatch':>9s} {'params':>14s} {'active':>14s} {'cap':>5s} {'MLP FLOPs':>9s} "
            f"{'step s':>8s} {'p90 s':>8s} {'coll MiB':>9s} {'/dense':>7s}")
        for r in rows:
            log(f"{r['config']:14s} {r['dispatch']:>9s} {r['params']:>14,} {r['active_params']:>14,} "
                f"{r['capacity_factor']:5.2f} {r['expert_flops_ratio']:8.2f}x "
                f"{r['step_time_s']:8.4f} {r['step_time_p90_s']:8.4f} {r['collective_bytes'] / 2**20:9.2f} "
                f"{r['ratio_to_dense']:7.2f}")
    if rows[0].get("tpu_topology"):
        log(f"\n{rows[0]['tpu_topology']}: ESTIMATED step time from the ahead-of-time compiled step (not measured); "
            f"megablox: the kernels' own FLOP estimates / the analytic count of the expert matmuls")
        log(f"{'config':14s} {'active':>14s} {'fits':>5s} {'peak GiB':>9s} {'coll MiB':>10s} {'megablox':>8s} "
            f"{'est. s':>10s} {'/dense':>7s}")
        for r in rows:
            if not isinstance(r.get("tpu_estimate_s"), float):
                log(f"{r['config']:14s} {r['tpu_fits']}")
                continue
            log(f"{r['config']:14s} {r['active_params']:>14,} {str(r['tpu_fits']):>5s} "
                f"{r['tpu_peak_bytes'] / 2**30:9.3f} {r['tpu_collective_bytes'] / 2**20:10.2f} "
                f"{r['tpu_megablox_flops_ratio']:8.3f} {r['tpu_estimate_s']:10.5f} "
                f"{r.get('tpu_ratio_to_dense', float('nan')):7.2f}")


def _plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["config"] for r in rows]
    panels = [("step_time_s", "measured median step time (s)")] if "step_time_s" in rows[0] else []
    if all(isinstance(r.get("tpu_estimate_s"), float) for r in rows):
        panels.append(("tpu_estimate_s", f"ESTIMATED step time on {rows[0]['tpu_topology']} (s)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels, strict=False):
        bars = ax.bar(names, [r[key] for r in rows], color=["tab:gray", "tab:blue", "tab:orange"][:len(rows)])
        for bar, r in zip(bars, rows, strict=True):
            ax.annotate(f"{r[key] / rows[0][key]:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)


def write_outputs(rows: list[dict], workdir: str) -> None:
    """`results.csv` (COLUMNS, + TPU_COLUMNS when estimated) and `moe_vs_dense.png`."""
    workdir = workdir_path(workdir)
    columns = COLUMNS + (TPU_COLUMNS if rows[0].get("tpu_topology") else ())
    write_csv(workdir / "results.csv", columns, [{k: row.get(k, "") for k in columns} for row in rows])
    _plot(rows, workdir / "moe_vs_dense.png")


def _config_spec(argv: list[str]) -> tuple[str | None, list[str]]:
    """(the value of `--config` or None, argv without it; `--config.FIELD=...` stay)."""
    rest, spec, i = [], None, 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config" and i + 1 < len(argv):
            spec, i = argv[i + 1], i + 2
            continue
        if arg.startswith("--config="):
            spec = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    return spec, rest


def parse_args(argv: list[str]):
    """(flags of the dense run, flags of the MoE run): the same command line
    with `--config` set to each member; `--config.FIELD=VALUE` overrides
    apply to both."""
    from absl import flags

    from mmjax.frontend import parse_flags

    def define(fv):
        flags.DEFINE_string("dense", "experiments/tiny.py", "dense experiment config FILE[:ARG]", flag_values=fv)
        flags.DEFINE_string("moe", "experiments/tiny_moe.py", "MoE experiment config FILE[:ARG]", flag_values=fv)
        flags.DEFINE_integer("steps", 20, "timed steps per configuration", flag_values=fv)
        flags.DEFINE_bool("aot_only", False, "only compile each configuration for --topology (a pod not at "
                          "hand, e.g. the 3b pair on v5p:4x8x8); nothing runs on this machine", flag_values=fv)
        flags.DEFINE_string("workdir", None, "where to write results.csv and moe_vs_dense.png", flag_values=fv)
        flags.DEFINE_string("topology", None, "also compile each configuration ahead of time for this TPU "
                            "topology (e.g. v5p:2x2x2 for the 8-device tiny pair; needs the `tpu` extra) and "
                            "report its ESTIMATED step time", flag_values=fv)

    prog = "python -m mmjax.bench.moe_vs_dense"
    doc = __doc__ + ("\n--config FILE:PAIR names a pair, read as get_config('PAIR-dense') and "
                     "get_config('PAIR-moe'); without it --dense and --moe name the two configs.")
    spec, rest = _config_spec(argv)
    if spec is not None:
        path, _, pair = spec.partition(":")
        if not pair:
            raise SystemExit(f"error: --config={spec!r} must name a pair: FILE:PAIR.")
        dense_spec, moe_spec = f"{path}:{pair}-dense", f"{path}:{pair}-moe"
    else:
        names = parse_flags(["--config", "experiments/tiny.py", *rest], prog, doc, define)
        dense_spec, moe_spec = names.dense, names.moe
    return (parse_flags(["--config", dense_spec, *rest], prog, doc, define),
            parse_flags(["--config", moe_spec, *rest], prog, doc, define))


def main(argv=None) -> int:
    import sys

    from mmjax.frontend import prepare_runtime

    args, moe_args = parse_args(sys.argv[1:] if argv is None else argv)
    dense, moe = args.config, moe_args.config
    prepare_runtime(dense)
    prepare_runtime(moe)  # the same runtime; checks the MoE member's config too
    if args.workdir:
        workdir_path(args.workdir)  # a bucket that cannot be reached is refused before the runs
    if args.aot_only and not args.topology:
        raise SystemExit("error: --aot_only needs --topology (the TPU slice to compile for).")
    rows = compare(dense, moe, args.steps, args.topology, aot_only=args.aot_only)  # a Refusal: one sentence
    print_table(rows, rows[0]["mesh"], args.steps)
    if args.workdir:
        write_outputs(rows, args.workdir)
        print(f"wrote {os.path.join(args.workdir, 'results.csv')} and moe_vs_dense.png")
    return 0


if __name__ == "__main__":
    import sys

    from mmjax.frontend import run_command

    sys.exit(run_command(main))
