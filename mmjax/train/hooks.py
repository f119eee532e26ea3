"""What happens around the train steps, one job per hook.

The loop (`mmjax.train.loop`) fetches a batch, runs and times the step, and
hands a `StepResult` to each hook in order. A hook may implement
`before_step(step)`, `after_step(result) -> bool` (True asks the loop to stop
after this step) and `close()`. Shared pieces a hook needs (checkpointer,
metrics writer, step timer, summary) come from the `Run` it was built with.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
import time
from typing import Callable

import jax
import numpy as np

from mmjax.data.records import STREAMS
from mmjax.paths import copy_tree, is_remote
from mmjax.train.checkpoint import Checkpointer
from mmjax.train.evaluators import run_evaluators
from mmjax.train.flops import mfu
from mmjax.train.guards import PreemptionFlag, TrainingDiverged, Watchdog
from mmjax.train.metrics import MetricsWriter, log, progress_line
from mmjax.train.routing_health import StarvedExperts, moe_layer_names
from mmjax.train.timing import StepTimer, memory_bytes


def to_json(value):
    """Scalars as floats, arrays (e.g. per-expert fractions) as nested lists."""
    value = np.asarray(value)
    return float(value) if value.ndim == 0 else value.tolist()


def sum_over_processes(values: np.ndarray) -> np.ndarray:
    """Sum of a small host vector over all processes (itself with one process)."""
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(values, np.int64))).sum(axis=0)


@dataclasses.dataclass
class Run:
    """What the hooks of one run share."""

    config: object
    workdir: str
    ckpt: Checkpointer
    writer: MetricsWriter
    data_iter: object
    timer: StepTimer
    summary: dict
    state: dict = None  # the latest train state (hooks that save or evaluate read it)
    flops: object = None  # the step's FlopsBreakdown (mmjax.train.flops), for MFU
    # SIGTERM (preemption) on this process, installed while the loop steps; the loop sums it
    # over processes with the data counters.
    stop_signal: PreemptionFlag = None


@dataclasses.dataclass
class StepResult:
    step: int                  # steps done, 1-based
    metrics: dict              # the step's device metrics
    loss: float
    stream_counts: np.ndarray  # examples per stream so far (all processes)
    data_counts: dict          # dropped/skipped images, skipped records so far (all processes)
    stop_signalled: bool = False  # SIGTERM reached at least one process


def _timed_pause(run: Run, action: Callable[[], None]) -> float:
    """Runs `action` (a save, an evaluation) outside the step-time window."""
    t0 = time.perf_counter()
    action()
    seconds = time.perf_counter() - t0
    run.timer.exclude(seconds)
    return seconds


def caption_fractions(data_counts: dict) -> dict:
    """The realised VeCLIP caption mix so far: `data/caption_mix_<field>`,
    each caption field's share of the examples that had a choice."""
    fields = {k[len("caption_"):]: v for k, v in data_counts.items() if k.startswith("caption_")}
    total = max(sum(fields.values()), 1)
    return {f"data/caption_mix_{field}": v / total for field, v in fields.items()}


class Logging:
    """Every `train.log_every` steps and at the last step: the window's timing,
    the step metrics, MFU, memory, the realised mix and data counters go to
    metrics.jsonl / TensorBoard, and one progress line to the console. MoE
    runs add the starved-expert check (`routing_health.StarvedExperts`, its
    counters kept here across log windows; `train.moe_starved_share` of the
    fair load for `train.moe_starved_windows` windows): its counts go to the
    record and its warnings to the console."""

    def __init__(self, run: Run, total_steps: int):
        c = run.config
        self.run, self.total, self.every = run, total_steps, c.train.log_every
        self.tokens_per_step = c.data.global_batch * c.data.seq_len
        self.starved = StarvedExperts(c.train.get("moe_starved_share", 0.1), c.train.get("moe_starved_windows", 3),
                                      moe_layer_names(c.model.decoder))

    def after_step(self, r: StepResult) -> bool:
        if r.step % self.every and r.step != self.total:
            return False
        s = self.run.summary
        record = {"step": r.step, **{k: to_json(v) for k, v in jax.device_get(r.metrics).items()},
                  **self.run.timer.summary(self.tokens_per_step), "hbm_or_rss_bytes": memory_bytes(),
                  **{f"mix_{name}": float(c / max(r.stream_counts.sum(), 1))
                     for name, c in zip(STREAMS, r.stream_counts)},
                  **{f"data/{k}": v for k, v in r.data_counts.items()}, **caption_fractions(r.data_counts)}
        record.setdefault("moe_aux_loss", 0.0)
        health, warnings = self.starved.update(record)
        record.update(health)
        n = jax.device_count()
        # Useful work of the images actually present, not of every padded image slot.
        flops = (self.run.flops.model_flops_at(record["images_per_step"]) if self.run.flops is not None
                 else s["model_flops_per_step"])
        record.update(model_flops_per_step=flops, model_tflops_per_device=flops / n / record["step_time_s"] / 1e12,
                      mfu=mfu(flops, record["step_time_s"], n, s["peak_flops_per_device"]))
        log(progress_line(r.step, self.total, record, record["wall_per_step_s"] * (self.total - r.step)))
        for warning in warnings:
            log(warning)
        self.run.writer.write(record)
        self.run.timer.reset()
        return False


class NonFiniteGuard:
    """A NaN/Inf loss stops the run naming the step and the last good
    checkpoint, or (`train.on_nonfinite="skip"`, the update already skipped
    inside the step) is reported and counted."""

    def __init__(self, run: Run):
        self.run, self.skip = run, run.config.train.on_nonfinite == "skip"
        run.summary["skipped_steps"] = 0

    def after_step(self, r: StepResult) -> bool:
        self.run.summary["skipped_steps"] += int(float(r.metrics.get("skipped_step", 0.0)))
        if math.isfinite(r.loss):
            return False
        if self.skip:
            log(f"step {r.step}: loss is {r.loss}; update skipped "
                f"({self.run.summary['skipped_steps']} skipped so far)")
            return False
        last = self.run.ckpt.latest_step()
        where = os.path.join(self.run.ckpt.directory, str(last)) if last else "none (no checkpoint yet)"
        raise TrainingDiverged(f"loss is {r.loss} at step {r.step}; last good checkpoint: {where}.")


class Preemption:
    """SIGTERM on any process: all processes see it at the same step boundary
    (`StepResult.stop_signalled`, summed over processes by the loop with the
    data counters, one host exchange per step), save a checkpoint and stop
    (`summary["preempted_at"]`)."""

    def __init__(self, run: Run):
        self.run = run

    def after_step(self, r: StepResult) -> bool:
        if not r.stop_signalled:
            return False
        seconds = _timed_pause(self.run, lambda: (self.run.ckpt.save(r.step, self.run.state, self.run.data_iter),
                                                  self.run.ckpt.wait(), self.run.writer.flush()))
        log(f"{self.run.stop_signal.signal_name or 'stop signal on another process'} received: saved step "
            f"{r.step} in {seconds:.1f}s and stopped; run the same command to resume")
        self.run.summary["preempted_at"] = r.step
        return True


class Checkpointing:
    """A checkpoint every `train.checkpoint_every` steps (the last step is
    saved by the loop); save time is not step time. Each save also copies the
    metrics to a bucket workdir (`MetricsWriter.flush`)."""

    def __init__(self, run: Run, total_steps: int):
        self.run, self.every, self.total = run, run.config.train.checkpoint_every, total_steps

    def after_step(self, r: StepResult) -> bool:
        if r.step % self.every == 0 and r.step != self.total:
            _timed_pause(self.run, lambda: (self.run.ckpt.save(r.step, self.run.state, self.run.data_iter),
                                            self.run.writer.flush()))
        return False


class Evaluation:
    """The registered evaluators every `train.eval_every` steps (0: never here;
    the loop also runs them at the start and the end)."""

    def __init__(self, run: Run, evaluators: dict, total_steps: int):
        self.run, self.evaluators = run, evaluators
        self.every, self.total = run.config.train.get("eval_every", 0), total_steps

    def after_step(self, r: StepResult) -> bool:
        if self.evaluators and self.every and r.step % self.every == 0 and r.step != self.total:
            _timed_pause(self.run, lambda: write_evaluation(self.run, r.step, self.evaluators))
        return False


def write_evaluation(run: Run, step: int, evaluators: dict) -> dict:
    """Runs the evaluators on the current params; writes `eval/<name>/<metric>`."""
    results = run_evaluators(evaluators, run.state["params"])
    if results:
        run.writer.write({"step": step, **{f"eval/{k}": v for k, v in results.items()}})
        scores = {k: v for k, v in results.items() if isinstance(v, float)}  # counts: metrics.jsonl only
        log(f"step {step} evaluation: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()))
    return results


class Profiler:
    """A JAX profiler trace of steps `train.profile_steps=(first, last)` under
    WORKDIR/profile (per process when there are several). On a bucket
    workdir the trace is written to a local folder and copied up when it stops."""

    def __init__(self, run: Run):
        window = tuple(run.config.train.profile_steps) if run.config.train.profile_steps else (0, 0)
        self.first, self.last = window
        self.target = os.path.join(run.workdir, "profile")
        if jax.process_count() > 1:
            self.target = os.path.join(self.target, f"process_{jax.process_index()}")
        self.dir = tempfile.mkdtemp(prefix="mmjax-profile-") if is_remote(self.target) and self.first else self.target
        self.active = False

    def before_step(self, step: int) -> None:
        if step == self.first:
            jax.profiler.start_trace(self.dir)
            self.active = True

    def after_step(self, r: StepResult) -> bool:
        if self.active and r.step >= self.last:
            self.close()
            log(f"profiler trace of steps {self.first}-{self.last} written")
        return False

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            if self.dir != self.target:
                copy_tree(self.dir, self.target)
                shutil.rmtree(self.dir, ignore_errors=True)


class StepWatchdog:
    """Reports (with every thread's stack) a step running longer than
    `train.watchdog_s`; time between steps (saves, evaluation) is not watched."""

    def __init__(self, run: Run):
        self.dog = Watchdog(run.config.train.watchdog_s,
                            lambda step, s: log(f"watchdog: step {step} has not finished after {s:.0f}s"))

    def before_step(self, step: int) -> None:
        self.dog.beat(step)

    def after_step(self, r: StepResult) -> bool:
        self.dog.idle()
        return False

    def close(self) -> None:
        self.dog.close()
