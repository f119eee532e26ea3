"""End-to-end training: outputs, learning, resumption, the command line."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import small_config
from mmjax.train.loop import train

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_small_run_learns_and_writes_its_outputs(tmp_path):
    c = small_config(steps=120)
    c.train.log_every = 1
    c.train.checkpoint_every = 60
    summary = train(c, str(tmp_path))
    recs = [r for r in _records(tmp_path) if "loss" in r]
    assert [r["step"] for r in recs] == list(range(1, 121))
    timed = [r for r in recs if "step_time_s" in r]
    assert [r["step"] for r in timed] == list(range(2, 121))  # step 1 is compile + run
    assert "compile_time_s" in _records(tmp_path)[0]
    for key in ("step_time_s", "tokens_per_s", "data_wait_s"):
        assert all(r[key] > 0 for r in timed), key
    for key in ("grad_norm", "learning_rate", "lm_loss", "mix_caption"):
        assert all(key in r for r in recs), key
    losses = np.array([r["loss"] for r in recs])
    assert losses[-10:].mean() < 0.5 * losses[:10].mean()
    assert (tmp_path / "config.json").exists()
    assert json.loads((tmp_path / "config.json").read_text())["mesh"]["fsdp"] == 2
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["120", "60"]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    untrained, trained = summary["untrained"], summary["trained"]
    assert untrained["attribute_accuracy"] < 0.1
    assert trained["attribute_accuracy"] > untrained["attribute_accuracy"] + 0.2


@pytest.mark.slow
def test_rerun_resumes_from_the_latest_checkpoint_and_matches(tmp_path):
    c = small_config(steps=8)
    c.train.checkpoint_every = 4
    c.train.keep_checkpoints = 3
    c.eval.caption_accuracy = False
    full = tmp_path / "full"
    train(c, str(full))
    # Simulate an interruption after step 4: drop the final checkpoint and its log lines.
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "8")
    train(c, str(cut))
    ref = {r["step"]: r for r in _records(full) if "loss" in r}
    resumed = [r for r in _records(cut) if "loss" in r][len(ref):]
    assert [r["step"] for r in resumed] == [5, 6, 7, 8]
    for r in resumed:
        np.testing.assert_allclose(r["loss"], ref[r["step"]]["loss"], rtol=1e-5)
    assert sorted(os.listdir(cut / "checkpoints"), key=int) == ["4", "8"]


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "mmjax.train", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_help_documents_the_flags():
    out = _run_cli("--helpshort")
    assert out.returncode == 0
    assert "--config" in out.stdout and "--workdir" in out.stdout and "resumed" in out.stdout


def test_impossible_mesh_is_one_clear_error(tmp_path):
    out = _run_cli("--config", "experiments/tiny.py", "--workdir", str(tmp_path),
                   "--config.mesh.data=3")
    assert out.returncode != 0
    assert "config error: config.mesh (data=3 x fsdp=2 x expert=2 x model=1) needs 12 devices " \
           "but 8 are available." in out.stderr
    assert "Traceback" not in out.stderr


def test_readme_and_ci_run_the_same_test_command():
    readme = open(os.path.join(ROOT, "README.md")).read()
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    command = ci.strip().splitlines()[-1]
    assert command in readme
