"""Preemption flag, watchdog, NaN stop naming the last good checkpoint, and
restoring a checkpoint onto a different mesh layout."""

import os
import signal
import time

import jax
import numpy as np
import pytest

from conftest import small_config
from mmjax.data.pipeline import default_tokenizer, make_dataset
from mmjax.parallel import get_layout, make_mesh
from mmjax.train.checkpoint import Checkpointer
from mmjax.train.guards import PreemptionFlag, TrainingDiverged, Watchdog
from mmjax.train.loop import train
from mmjax.train.optimizer import make_optimizer
from mmjax.train.state import abstract_train_state, build_train_setup, init_train_state


def test_sigterm_sets_the_preemption_flag_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    flag = PreemptionFlag()
    assert not flag
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)
    assert flag and flag.signal_name == "SIGTERM"
    flag.close()
    assert signal.getsignal(signal.SIGTERM) is before


def test_watchdog_reports_a_hung_step_once():
    reports = []
    dog = Watchdog(0.2, lambda step, s: reports.append((step, s)), poll_s=0.02)
    dog.beat(7)
    time.sleep(0.5)
    dog.beat(8)  # a step that finishes in time is not reported
    time.sleep(0.05)
    dog.close()
    assert [step for step, _ in reports] == [7] and reports[0][1] > 0.2


def _setup(config, mesh_shape: dict, layout: str):
    config.mesh.update(mesh_shape)
    config.rules = layout
    return build_train_setup(config, make_mesh(dict(config.mesh)), get_layout(layout),
                             lambda p: make_optimizer(config.optimizer, config.train.steps, p))


def _data_iter(config):
    return iter(make_dataset(config.data, default_tokenizer(config.data), batch_size=config.data.global_batch))


def test_checkpoint_restores_onto_a_different_mesh_layout(tmp_path):
    c = small_config()
    fsdp = _setup(c, dict(data=2, fsdp=2, expert=2), "fsdp")
    state = init_train_state(c, fsdp)
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(3, state, _data_iter(c))
    ckpt.close()

    c2 = small_config()
    wide = _setup(c2, dict(data=1, fsdp=8, expert=1), "fsdp")
    restored = Checkpointer(str(tmp_path)).restore(3, abstract_train_state(wide), _data_iter(c2))
    want = jax.tree_util.tree_leaves_with_path(jax.device_get(state))
    got = jax.tree_util.tree_leaves_with_path(restored)
    shardings = jax.tree.leaves(wide.state_shardings)
    assert len(want) == len(got) == len(shardings)
    moved = 0
    for (path, a), (_, b), sharding in zip(want, got, shardings):
        np.testing.assert_array_equal(a, np.asarray(b), err_msg=jax.tree_util.keystr(path))
        assert b.sharding.spec == sharding.spec, jax.tree_util.keystr(path)
        moved += "fsdp" in str(sharding.spec)
    assert moved > 0  # parameters really are laid out differently (fsdp=8)


def _allow_nan_loss_weights(monkeypatch):
    """NaN loss weights are refused by the config checks; these tests use them
    to force a non-finite loss, so the checks are bypassed here."""
    monkeypatch.setattr("mmjax.train.loop.check_config", lambda *args, **kwargs: None)


@pytest.mark.slow
def test_nan_loss_stops_the_run_naming_the_step_and_last_good_checkpoint(tmp_path, monkeypatch):
    _allow_nan_loss_weights(monkeypatch)
    c = small_config(steps=4)
    c.eval.caption_accuracy = False
    setup = _setup(c, dict(data=2, fsdp=2, expert=2), "fsdp")
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(2, init_train_state(c, setup), _data_iter(c))
    ckpt.close()
    c.data.loss_weights = (float("nan"),) * 3
    with pytest.raises(TrainingDiverged) as err:
        train(c, str(tmp_path))
    assert str(err.value) == (f"loss is nan at step 3; last good checkpoint: "
                              f"{tmp_path / 'checkpoints' / '2'}.")
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]  # nothing bad was saved


@pytest.mark.slow
def test_nonfinite_steps_can_be_skipped_leaving_the_state_unchanged(tmp_path, monkeypatch):
    _allow_nan_loss_weights(monkeypatch)
    c = small_config(steps=3)
    c.eval.caption_accuracy = False
    c.train.on_nonfinite = "skip"
    c.data.loss_weights = (float("nan"),) * 3
    summary = train(c, str(tmp_path))
    assert summary["skipped_steps"] == 3
    state = Checkpointer(str(tmp_path)).restore(
        3, abstract_train_state(_setup(c, dict(data=2, fsdp=2, expert=2), "fsdp")), _data_iter(c))
    fresh = init_train_state(c, _setup(c, dict(data=2, fsdp=2, expert=2), "fsdp"))
    for a, b in zip(jax.tree.leaves(fresh["params"]), jax.tree.leaves(state["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
