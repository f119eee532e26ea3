"""What the step-time benchmarks share: load a config, compile its real train
step for this machine's devices, time several configurations side by side.

`TimedConfig` builds the step exactly as `mmjax.train` does
(`mmjax.train.loop.build_step`), compiles it ahead of time, reads memory and
collectives from the compiled program, and times single steps to device
completion (`block_until_ready` on the new state and the metrics).
`time_round_robin` interleaves the configurations step by step, so machine
noise hits every one of them alike; the first executed step (runtime warm-up)
is never timed.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

AXES = ("data", "fsdp", "expert", "model")


def mesh_name(mesh: dict) -> str:
    """{data: 2, fsdp: 2, expert: 2, model: 1} -> "2x2x2x1"."""
    return "x".join(str(mesh.get(a, 1)) for a in AXES)


def first_batch(config) -> dict:
    """One host-local batch of this process from the data pipeline the
    config's model trains on (`mmjax.train.loop.make_train_dataset`: packed
    sequences, or pair batches for a model that reads pairs)."""
    import jax

    from mmjax.data.pipeline import default_tokenizer
    from mmjax.train.loop import make_train_dataset

    pc = jax.process_count()
    return next(iter(make_train_dataset(config, default_tokenizer(config.data),
                                        batch_size=config.data.global_batch // pc,
                                        process_index=jax.process_index(), process_count=pc)))


def with_candidate(config, mesh: dict | None = None, layout: str | None = None, remat: str | None = None):
    """A copy of `config` with another mesh, layout or remat policy (the ViT's
    and the decoder's; "" turns it off); None keeps the config's."""
    config = config.copy_and_resolve_references()
    if mesh is not None:
        config.mesh.update(mesh)
    if layout is not None:
        config.rules = layout
    if remat is not None:
        config.model.vit.remat = config.model.decoder.remat = remat
    return config


def remat_name(config) -> str:
    """"none", a policy, or "vit=P,decoder=Q" when they differ."""
    vit, dec = config.model.vit.get("remat", "") or "none", config.model.decoder.get("remat", "") or "none"
    return vit if vit == dec else f"vit={vit},decoder={dec}"


class TimedConfig:
    """One configuration (optionally with another mesh or layout): set up,
    compiled and timed on this machine. `row` collects what is measured."""

    def __init__(self, config, mesh: dict | None = None, layout: str | None = None, remat: str | None = None):
        self.config = with_candidate(config, mesh, layout, remat)
        self.row = {"mesh": mesh_name(dict(self.config.mesh)), "layout": str(self.config.rules),
                    "remat": remat_name(self.config), "status": "ok", "reason": ""}
        self.times: list[float] = []
        self.state = self.batch = self.step = self.setup = None

    def prepare(self, local_batch) -> bool:
        """Builds, compiles and warms up; on a config the mesh cannot run
        records the reason (`status` "skipped") and returns False."""
        import jax

        from mmjax.bench.fsdp_analytic import analytic_fsdp_collective_bytes
        from mmjax.bench.hlo_collectives import analyse_compiled
        from mmjax.data.pipeline import to_global_arrays
        from mmjax.parallel import get_layout, make_mesh
        from mmjax.train.config_checks import check_config
        from mmjax.train.loop import build_step
        from mmjax.train.state import init_train_state

        try:
            check_config(self.config, jax.device_count(), jax.process_count())
            mesh = make_mesh(dict(self.config.mesh))
            self.setup, step = build_step(self.config, mesh, get_layout(self.config.rules))
        except ValueError as err:  # ConfigError, MeshConfigError, LayoutError: one sentence each
            self.row.update(status="skipped", reason=str(err))
            return False
        shardings = self.setup.batch_shardings
        self.batch = to_global_arrays({k: local_batch[k] for k in shardings}, shardings)
        self.state = init_train_state(self.config, self.setup)
        t0 = time.perf_counter()
        self.step = step.lower(self.state, self.batch).compile()
        self.row["compile_s"] = time.perf_counter() - t0
        stats = analyse_compiled(self.step)
        self.row.update(peak_bytes_per_device=stats.peak_bytes, argument_bytes=stats.argument_bytes,
                        temp_bytes=stats.temp_bytes, collective_bytes=stats.collective_bytes,
                        **{f"{kind.replace('-', '_')}_bytes": stats.bytes_by_kind.get(kind, 0)
                           for kind in ("all-gather", "reduce-scatter", "all-reduce", "all-to-all")})
        analytic = analytic_fsdp_collective_bytes(self.setup)
        self.row["fsdp_analytic_bytes"] = analytic
        self.row["collective_ratio"] = stats.collective_bytes / analytic if analytic else ""
        self.state, metrics = self.step(self.state, self.batch)  # one-off runtime warm-up, not timed
        jax.block_until_ready(metrics)
        return True

    def time_step(self) -> None:
        import jax

        t0 = time.perf_counter()
        self.state, metrics = self.step(self.state, self.batch)
        jax.block_until_ready((self.state, metrics))
        self.times.append(time.perf_counter() - t0)

    def finish(self) -> None:
        """Records median / p90 step time and frees the device buffers."""
        self.row["step_time_s"] = statistics.median(self.times)
        self.row["step_time_p90_s"] = float(np.percentile(self.times, 90))
        self.state = self.batch = self.step = None

    def add_topology(self, topology: str) -> None:
        """Compiles the same step ahead of time for a TPU topology; adds
        `tpu_*` columns (an error sentence in `tpu_fits` when it cannot)."""
        from mmjax.bench.aot import compile_for_topology

        try:
            report = compile_for_topology(self.config, topology)
        except ValueError as err:
            self.row.update(tpu_topology=topology, tpu_fits=f"error: {err}")
            return
        self.row.update(tpu_columns(report))


def tpu_columns(report) -> dict:
    """The `tpu_*` result columns of an `mmjax.bench.aot.AotReport`."""
    return dict(tpu_topology=report.topology, tpu_fits=report.fits, tpu_peak_bytes=report.peak_bytes,
                tpu_collective_bytes=report.collective_bytes, tpu_collective_ratio=report.collective_ratio,
                tpu_flops_ratio=report.flops_ratio,
                tpu_megablox_flops_ratio=report.kernel_flops_ratio("megablox"),
                tpu_estimate_s=report.estimate.step_s)


def time_round_robin(runs: list[TimedConfig], steps: int) -> None:
    """Times `steps` steps of every prepared run, one step of each in turn."""
    for _ in range(steps):
        for run in runs:
            run.time_step()
    for run in runs:
        run.finish()
