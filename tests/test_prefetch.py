"""The background prefetcher: the same batches in the same order as the plain
iterator, checkpoint state at the consumed position (not the prefetched
one), errors raised at the batch they belong to, and a Grain/Orbax
checkpoint round trip that resumes with exactly the next batch."""

import threading
import time

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mmjax.train.prefetch import Prefetcher


def _source(n=40):
    return iter(grain.MapDataset.range(n).map(lambda i: {"x": np.array([i, i * i])}).to_iter_dataset())


def _wait_until_full(prefetcher, depth):
    deadline = time.time() + 5
    while prefetcher._queue.qsize() < depth and time.time() < deadline:
        time.sleep(0.01)


def test_same_batches_and_state_at_the_consumed_position():
    made_in = set()

    def make(local):
        made_in.add(threading.current_thread().name)
        return int(local["x"][0])

    prefetcher = Prefetcher(_source(), make, depth=3)
    assert [next(prefetcher) for _ in range(5)] == [0, 1, 2, 3, 4]
    _wait_until_full(prefetcher, 3)  # the thread is 3 batches ahead
    state = prefetcher.get_state()
    assert made_in == {"mmjax-prefetch"}
    again = Prefetcher(_source(), make, depth=3)
    again.set_state(state)
    assert next(again) == 5  # the batch after the consumed ones, not after the prefetched ones
    assert [next(prefetcher) for _ in range(3)] == [5, 6, 7]
    prefetcher.close()
    again.close()


def test_errors_arrive_with_their_batch_and_the_end_is_the_end():
    def make(local):
        if int(local["x"][0]) == 3:
            raise ValueError("record 3 is broken")
        return int(local["x"][0])

    prefetcher = Prefetcher(_source(), make, depth=2)
    assert [next(prefetcher) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="record 3 is broken"):
        next(prefetcher)
    assert list(Prefetcher(_source(4), lambda b: int(b["x"][0]))) == [0, 1, 2, 3]


def test_orbax_grain_checkpoint_round_trip(tmp_path):
    """Saved through Grain's Orbax handler, as the training checkpoints are."""
    prefetcher = Prefetcher(_source(), lambda b: int(b["x"][0]), depth=2)
    consumed = [next(prefetcher) for _ in range(7)]
    _wait_until_full(prefetcher, 2)
    with ocp.CheckpointManager(tmp_path, item_names=("data",)) as manager:
        manager.save(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(prefetcher)))
        manager.wait_until_finished()
    after = [next(prefetcher) for _ in range(4)]
    resumed = Prefetcher(_source(), lambda b: int(b["x"][0]), depth=2)
    with ocp.CheckpointManager(tmp_path, item_names=("data",)) as manager:
        manager.restore(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    assert consumed == list(range(7)) and [next(resumed) for _ in range(4)] == after == [7, 8, 9, 10]
    prefetcher.close()
    resumed.close()
