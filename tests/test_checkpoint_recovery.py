"""Recovery from damaged checkpoints (mmjax/train/checkpoint.py): a latest
checkpoint that cannot be restored is reported in one sentence (step, file,
why), moved aside and the newest restorable one is used; a partial step
directory is never the latest; `on_bad_checkpoint="stop"` refuses; nothing is
deleted."""

import glob
import json
import os
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.errors import CheckpointError
from mmjax.train.checkpoint import DAMAGED_DIR, Checkpointer

STEPS = (10, 20, 30)


def _state(step: int) -> dict:
    return {"step": jnp.int32(step), "params": {"w": jnp.arange(4096.0).reshape(64, 64) + step,
                                                "b": jnp.full((16,), float(step))}}


def _abstract() -> dict:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(0))


def _iterator():
    return iter(grain.MapDataset.range(1000).batch(4).to_iter_dataset())


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> str:
    """A workdir with committed checkpoints at steps 10, 20, 30; after step s
    the data iterator has yielded s / 10 batches."""
    workdir = str(tmp_path_factory.mktemp("ckpt") / "run")
    ckpt, it = Checkpointer(workdir, keep=5, async_save=False), _iterator()
    for step in STEPS:
        next(it)
        ckpt.save(step, _state(step), it)
    ckpt.close()
    return workdir


def _copy(saved: str, tmp_path) -> str:
    workdir = str(tmp_path / "run")
    shutil.copytree(saved, workdir)
    return workdir


def _array_file(workdir: str, step: int) -> str:
    files = glob.glob(os.path.join(workdir, "checkpoints", str(step), "state", "d", "*"))
    return max(files, key=os.path.getsize)


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _overwrite(path):
    size = os.path.getsize(path)
    with open(path, "wb") as f:
        f.write(np.random.default_rng(0).integers(0, 256, size, np.uint8).tobytes())


def _garbage(path):
    with open(path, "w") as f:
        f.write("not json {")


DAMAGE = {
    "truncated array file": (lambda w: _truncate(_array_file(w, 30)), "state/d/", "is truncated"),
    "deleted array file": (lambda w: os.remove(_array_file(w, 30)), "state/d/", "is missing"),
    "overwritten array file": (lambda w: _overwrite(_array_file(w, 30)), "state/d/", "is corrupt"),
    "garbage _METADATA": (lambda w: _garbage(os.path.join(w, "checkpoints", "30", "state", "_METADATA")),
                          "state/_METADATA", "not valid JSON"),
    "garbage data-iterator file": (
        lambda w: _garbage(glob.glob(os.path.join(w, "checkpoints", "30", "data", "*.json"))[0]),
        "data/process_0-of-1.json", "not valid JSON"),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(saved, tmp_path, kind):
    workdir = _copy(saved, tmp_path)
    damage, file_named, how = DAMAGE[kind]
    damage(workdir)
    before = sorted(os.path.relpath(p, workdir) for p in glob.glob(os.path.join(workdir, "**"), recursive=True)
                    if os.path.isfile(p))
    lines = []
    ckpt = Checkpointer(workdir, keep=5, async_save=False, log=lines.append)
    it = _iterator()
    state, step = ckpt.restore_latest(_abstract(), it)
    assert step == 20
    np.testing.assert_array_equal(np.asarray(state["params"]["b"]), np.full(16, 20.0))
    np.testing.assert_array_equal(next(it), np.arange(8, 12))  # the iterator is at step 20's position
    warning = lines[0]
    assert warning.startswith("warning: checkpoint step 30 (") and "cannot be restored: " in warning
    assert file_named in warning and how in warning, warning
    assert "\n" not in warning and "tensorstore_spec" not in warning
    assert ckpt.manager.all_steps() == [10, 20] and ckpt.recovered[0]["step"] == 30
    moved = os.path.join(workdir, DAMAGED_DIR, "30")
    assert ckpt.recovered[0]["moved_to"] == moved and any("moved the damaged checkpoint" in x for x in lines)
    ckpt.close()
    after = sorted(os.path.relpath(p, workdir) for p in glob.glob(os.path.join(workdir, "**"), recursive=True)
                   if os.path.isfile(p))
    renamed = [p.replace(os.path.join("checkpoints", "30"), os.path.join(DAMAGED_DIR, "30"), 1) for p in before]
    assert sorted(renamed) == after  # every file kept, the damaged step only renamed


def test_a_partial_step_directory_is_never_the_latest(saved, tmp_path):
    workdir = _copy(saved, tmp_path)
    partial = os.path.join(workdir, "checkpoints", "40")
    shutil.copytree(os.path.join(workdir, "checkpoints", "30", "state"), os.path.join(partial, "state"))
    lines = []
    ckpt = Checkpointer(workdir, keep=5, async_save=False, log=lines.append)
    state, step = ckpt.restore_latest(_abstract(), _iterator())
    assert step == 30 and int(state["step"]) == 30
    assert "has no commit_success.txt (a partial checkpoint)" in lines[0]
    assert os.path.isdir(os.path.join(workdir, DAMAGED_DIR, "40", "state"))
    ckpt.close()


def test_on_bad_checkpoint_stop_refuses_in_one_sentence_and_moves_nothing(saved, tmp_path):
    workdir = _copy(saved, tmp_path)
    _truncate(_array_file(workdir, 30))
    ckpt = Checkpointer(workdir, keep=5, async_save=False, on_bad="stop", log=lambda line: None)
    with pytest.raises(CheckpointError) as err:
        ckpt.restore_latest(_abstract(), _iterator())
    message = str(err.value)
    assert message.startswith("checkpoint step 30 (") and "is truncated" in message
    assert "on_bad_checkpoint='stop'" in message and "\n" not in message
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "30")) and not os.path.exists(
        os.path.join(workdir, DAMAGED_DIR))
    ckpt.close()


def test_no_restorable_checkpoint_refuses_and_moves_nothing(saved, tmp_path):
    workdir = _copy(saved, tmp_path)
    for step in STEPS:
        _garbage(os.path.join(workdir, "checkpoints", str(step), "state", "_METADATA"))
    ckpt = Checkpointer(workdir, keep=5, async_save=False, log=lambda line: None)
    with pytest.raises(CheckpointError, match=r"none of the 3 checkpoints .* can be restored \(newest: "
                                              r"checkpoint step 30"):
        ckpt.restore_latest(_abstract(), _iterator())
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "20", "30"]
    ckpt.close()


def _losses(workdir) -> dict[int, float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.slow
def test_training_resumes_past_a_damaged_checkpoint_with_the_uninterrupted_losses(tmp_path):
    """An uninterrupted 6-step run saves at 2, 4, 6. A copy of it without its
    summary (killed after the last save) has the step-6 checkpoint truncated
    and a partial step-8 directory beside it: the rerun of
    the same config resumes from step 4 and steps 5-6 give the uninterrupted
    run's losses."""
    from conftest import small_config

    from mmjax.train.loop import train

    c = small_config(steps=6)
    c.train.checkpoint_every, c.train.keep_checkpoints = 2, 5
    c.eval.caption_accuracy = False
    reference = tmp_path / "reference"
    train(c, str(reference))
    want = _losses(reference)
    damaged = tmp_path / "damaged"
    shutil.copytree(reference, damaged)
    os.remove(damaged / "metrics.jsonl")
    os.remove(damaged / "summary.json")  # as if killed after its last save: a finished run is not rerun
    _truncate(_array_file(str(damaged), 6))
    shutil.copytree(damaged / "checkpoints" / "6" / "state", damaged / "checkpoints" / "8" / "state")
    summary = train(c, str(damaged))
    got = _losses(damaged)
    assert sorted(got) == [5, 6]
    np.testing.assert_allclose([got[5], got[6]], [want[5], want[6]], rtol=1e-6)
    assert [d["step"] for d in summary["damaged_checkpoints"]] == [8, 6]
    assert sorted(os.listdir(damaged / DAMAGED_DIR)) == ["6", "8"]
    assert sorted(os.listdir(damaged / "checkpoints")) == ["2", "4", "6"]  # step 6 saved again
