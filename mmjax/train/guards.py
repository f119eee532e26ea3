"""Guards around the loop: preemption (SIGTERM), non-finite losses, hung steps."""

from __future__ import annotations

import faulthandler
import signal
import sys
import threading
import time
from typing import Callable

from mmjax.errors import Refusal


class TrainingDiverged(Refusal):
    """The loss became NaN or infinite."""

    label = "training stopped"


class PreemptionFlag:
    """Set by SIGTERM (and SIGINT when asked); the loop saves and exits cleanly
    at the next step boundary. Restores the previous handlers on `close`."""

    def __init__(self, signals=(signal.SIGTERM,)):
        self.signal_name: str | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def __bool__(self) -> bool:
        return self.signal_name is not None

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Watchdog:
    """Reports a step that has not finished within `timeout_s`: calls
    `report(step, seconds)` once per hung step and dumps all threads' stacks
    to stderr. `beat(step)` marks the start of a step."""

    def __init__(self, timeout_s: float, report: Callable[[int, float], None], poll_s: float | None = None):
        self.timeout_s, self.report = timeout_s, report
        self._step, self._since, self._reported = 0, time.monotonic(), True
        self._stop = threading.Event()
        self._thread = None
        if timeout_s > 0:
            self._poll = poll_s or min(10.0, timeout_s / 4)
            self._thread = threading.Thread(target=self._run, name="mmjax-watchdog", daemon=True)
            self._thread.start()

    def beat(self, step: int) -> None:
        self._step, self._since, self._reported = step, time.monotonic(), False

    def idle(self) -> None:
        """Nothing to watch (e.g. during evaluation or a checkpoint)."""
        self._reported = True

    def _run(self) -> None:
        while not self._stop.wait(self._poll):
            waited = time.monotonic() - self._since
            if not self._reported and waited > self.timeout_s:
                self._reported = True
                self.report(self._step, waited)
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
