"""Run outputs: `metrics.jsonl`, TensorBoard events and a progress line.

Only process 0 writes files; every process may call the methods.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Mapping

import jax

from mmjax.paths import Mirror, is_remote, workdir_path
from mmjax.train.routing_health import load_summary, modality_present, routing_scalars


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _jsonable(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsWriter:
    """Appends one JSON object per record to `WORKDIR/metrics.jsonl` and
    mirrors scalar values to TensorBoard event files under `WORKDIR/tensorboard`
    (MoE routing statistics per layer and modality as the compact scalars of
    `mmjax.train.routing_health.routing_scalars`).

    On a bucket workdir (`gs://...`) both are written to a local staging
    folder and copied up (`mmjax.paths.Mirror`) at most every `sync_every_s`
    seconds at a write, at every `flush()` (the loop flushes at each
    checkpoint save) and at `close()`; an existing metrics.jsonl is copied
    down first so that a resumed run appends to it."""

    def __init__(self, workdir, enable_tensorboard: bool = True, sync_every_s: float = 30.0):
        self.is_writer = jax.process_index() == 0
        root = workdir_path(workdir, check=False)
        self.path = root / "metrics.jsonl"
        self._jsonl = None
        self._tb = None
        self._mirror = None
        if self.is_writer:
            if is_remote(root):
                self._mirror = Mirror(root, download=("metrics.jsonl",), every_s=sync_every_s)
                local = self._mirror.local
            else:
                os.makedirs(root, exist_ok=True)
                local = root
            self._jsonl = open(local / "metrics.jsonl", "a", buffering=1)
            if enable_tensorboard:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.fspath(local / "tensorboard"))

    def write(self, record: Mapping) -> None:
        if not self.is_writer:
            return
        record = {k: _jsonable(v) for k, v in record.items()}
        self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None and "step" in record:
            for key, value in {**record, **routing_scalars(record)}.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, record["step"])
        self.flush(force=False)

    def flush(self, force: bool = True) -> None:
        """Copies the records to a bucket workdir (without `force`: only when
        `sync_every_s` passed since the last copy); local files are line-buffered already."""
        if self._mirror is None or not (force or self._mirror.due()):
            return
        if self._tb is not None:
            self._tb.flush()
        self._mirror.sync()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._mirror is not None:
            self._mirror.close()
            self._mirror = None


def progress_line(step: int, total: int, record: Mapping, eta_s: float) -> str:
    """`step 120/300 | loss 2.3456 | step 0.412s (p90 0.430s) | data 0.003s | 4,971 tok/s | MFU 3.1% | ETA 1m14s`."""
    mfu = f" | MFU {100 * record['mfu']:.1f}%" if "mfu" in record else ""
    return (f"step {step}/{total} | loss {record['loss']:.4f} | step {record['step_time_s']:.3f}s"
            f" (p90 {record.get('step_time_p90_s', record['step_time_s']):.3f}s)"
            f" | data {record['data_wait_s']:.3f}s | {record['tokens_per_s']:,.0f} tok/s{mfu}"
            f"{moe_load(record)} | ETA {format_duration(eta_s)}")


def moe_load(record: Mapping) -> str:
    """` | experts max/mean 1.42 (text 1.30, image 2.10), dropped 0.8%` for MoE
    runs: the busiest expert's share of routed tokens over the mean share
    (1.00: perfectly balanced; the worst MoE layer), the same per modality
    present in the step, and the capacity-dropped fraction."""
    if "expert_fraction" not in record:
        return ""
    worst = lambda key: max(load_summary(layer)[0] for layer in record[key])  # noqa: E731
    split = [f"{m} {worst(f'expert_fraction_{m}'):.2f}" for m in ("text", "image")
             if f"expert_fraction_{m}" in record and modality_present(record, m)]
    split = f" ({', '.join(split)})" if split else ""
    dropped = f", dropped {100 * record['dropped_fraction']:.1f}%" if "dropped_fraction" in record else ""
    return f" | experts max/mean {worst('expert_fraction'):.2f}{split}{dropped}"


def log(message: str) -> None:
    """Prints on process 0 only (flushed, so progress shows in pipes and logs)."""
    if jax.process_index() == 0:
        print(message, file=sys.stdout, flush=True)
