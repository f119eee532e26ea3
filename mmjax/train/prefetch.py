"""Overlap the input with the device: the next batches are read, counted and
placed on the devices in a background thread while the current step runs.

`Prefetcher(source, make, depth)` wraps a Grain iterator (depth 0: no
thread, each batch is read and placed when the loop asks for it): a thread draws
`local = next(source)`, records the source's state right after it, turns the
batch into what the loop consumes with `make(local)` (global arrays on the
mesh and the host counters) and queues the pair, at most `depth` ahead.
`next(prefetcher)` returns the made item; an error in the thread is raised
there, at the step it belongs to.

Checkpoints see the position of the consumed batches, not of the prefetched
ones: `get_state()` is the source's state just after the last consumed
batch (bytes, the JSON Grain itself writes), so a restored run continues
with exactly the batch the interrupted run would have taken next.
`set_state` (restoring) stops the thread, moves the source and discards
what was prefetched. `Prefetcher` has the iterator interface Grain's Orbax
checkpoint handler uses (`get_state`, `set_state`, `start_prefetch`).
"""

from __future__ import annotations

import json
import queue
import threading
from typing import Any, Callable

_DONE = object()


class Prefetcher:
    def __init__(self, source, make: Callable[[Any], Any], depth: int = 2):
        if depth < 0:
            raise ValueError(f"prefetch depth must be at least 0, got {depth}")
        self.source, self.make, self.depth = source, make, depth
        self._consumed_state = source.get_state()
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # -- the producer ------------------------------------------------------------------------
    def _produce(self, out: queue.Queue, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                local = next(self.source)
                state = self.source.get_state()
                entry = (self.make(local), state, None)
            except StopIteration:
                entry = (_DONE, None, None)
            except BaseException as err:  # raised in the consumer, at the step that needed the batch
                entry = (None, None, err)
            while not stop.is_set():
                try:
                    out.put(entry, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if entry[0] is _DONE or entry[2] is not None:
                return

    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.depth)
        self._thread = threading.Thread(target=self._produce, args=(self._queue, self._stop),
                                        name="mmjax-prefetch", daemon=True)
        self._thread.start()

    # -- the consumer ------------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self):
        if self.depth == 0:  # in the caller's thread
            item = self.make(next(self.source))
            self._consumed_state = self.source.get_state()
            return item
        if self._thread is None:
            self._start()
        item, state, err = self._queue.get()
        if err is not None:
            self.close()
            raise err
        if item is _DONE:
            self.close()
            raise StopIteration
        self._consumed_state = state
        return item

    def get_state(self) -> bytes:
        """The source's state after the last consumed batch (Grain's JSON)."""
        return json.dumps(self._consumed_state, indent=4).encode()

    def set_state(self, state: bytes | dict) -> None:
        """Moves the source to `state`; prefetched batches are discarded."""
        self.close()
        if isinstance(state, (bytes, str)):
            state = json.loads(state)
        self.source.set_state(state)
        self._consumed_state = self.source.get_state()

    def start_prefetch(self) -> None:
        """Grain's restore calls this; the thread starts on the next `next`."""

    def close(self) -> None:
        """Stops the thread (it finishes the batch it is making)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._queue = None
