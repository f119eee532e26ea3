"""Step timing that a reviewer can trust.

Every step is timed from the moment its batch is ready on the host to the
moment its outputs are ready on the device (`jax.block_until_ready`): that is
`step_time_s`, device time to completion, with nothing else in flight. The
time the host waited for the input iterator is `data_wait_s`; whatever else
the loop spent per step (logging, metric transfers) is `host_overhead_s`.
Compilation never enters these numbers: the step is compiled ahead of time
(`lower().compile()`, reported as `compile_time_s`) before the first step.
Checkpoint saves and evaluations are excluded from the window as well.
"""

from __future__ import annotations

import resource
import time

import jax
import numpy as np


class StepTimer:
    """Collects per-step (step, data wait, overhead) seconds for one log window."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.step_s: list[float] = []
        self.wait_s: list[float] = []
        self.overhead_s: list[float] = []
        self.images = 0
        self.window_start = time.perf_counter()
        self.excluded = 0.0

    def add(self, step_s: float, wait_s: float, overhead_s: float, images: int) -> None:
        self.step_s.append(step_s)
        self.wait_s.append(wait_s)
        self.overhead_s.append(overhead_s)
        self.images += images

    def exclude(self, seconds: float) -> None:
        """Time spent on checkpoints/evaluation inside the window."""
        self.excluded += seconds

    def summary(self, tokens_per_step: int) -> dict:
        """Window statistics; empty when no step was timed."""
        if not self.step_s:
            return {}
        step = np.asarray(self.step_s)
        wall = time.perf_counter() - self.window_start - self.excluded
        per_step_wall = wall / len(step)
        median = float(np.median(step))
        return {
            "step_time_s": median,
            "step_time_p50_s": median,
            "step_time_p90_s": float(np.percentile(step, 90)),
            "step_time_mean_s": float(step.mean()),
            "data_wait_s": float(np.mean(self.wait_s)),
            "host_overhead_s": float(np.mean(self.overhead_s)),
            "wall_per_step_s": per_step_wall,
            # throughput as delivered: wall time of the window, data waits included
            "tokens_per_s": tokens_per_step / per_step_wall,
            "images_per_s": self.images / len(step) / per_step_wall,
            "images_per_step": self.images / len(step),
            "timed_steps": len(step),
        }


def memory_bytes() -> int:
    """Bytes in use on the first local device (HBM) where the backend reports
    it, else this process's peak resident set size (CPU)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_in_use" in stats:
        return int(stats["bytes_in_use"])
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
