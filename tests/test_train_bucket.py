"""A training workdir on a bucket (gs://, through a local storage emulator):
every output lands there, and a run killed with SIGKILL resumes from the
bucket's checkpoint with the uninterrupted run's losses."""

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from conftest import small_config
from gcs_emulator import BUCKET, emulated_bucket
from mmjax.train.loop import train
from mmjax.eval.__main__ import main as eval_main
from mmjax.frontend import run_command
from test_train import ROOT, SMALL_OVERRIDES, _cli_command

EVAL_OVERRIDES = ["--config", "experiments/tiny.py", *SMALL_OVERRIDES[:-1],
                  "--config.evaluators.shapes_vqa.num_examples=4", "--config.evaluators.shapes_vqa.shots=(0,)"]


def _bucket_records(remote):
    path = remote / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
def test_sigkill_then_rerun_on_a_bucket_workdir_matches_the_uninterrupted_run(tmp_path, monkeypatch):
    c = small_config(steps=30)
    c.train.checkpoint_every = 10
    c.eval.caption_accuracy = False
    train(c, str(tmp_path / "full"))
    ref = {json.loads(line)["step"]: json.loads(line)["loss"]
           for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line}

    with emulated_bucket(monkeypatch) as env:
        from mmjax import paths

        run = f"gs://{BUCKET}/run"
        remote = paths.workdir_path(run)
        args = ("--config.train.steps=30", "--config.train.checkpoint_every=10")
        proc = subprocess.Popen(_cli_command(run, *args), cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env={**os.environ, **env})
        deadline = time.time() + 300
        while not (remote / "checkpoints" / "10" / "commit_success.txt").exists():
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.time() < deadline, "checkpoint 10 not committed in 300s"
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        assert not (remote / "summary.json").exists()
        # The bucket's metrics reach the checkpoint: they are copied up at every save.
        assert max(r["step"] for r in _bucket_records(remote) if "loss" in r) >= 10
        resumed_from = max(int(p.name) for p in (remote / "checkpoints").iterdir()
                           if (p / "commit_success.txt").exists())
        assert resumed_from < 30

        rerun = subprocess.run(_cli_command(run, *args), cwd=ROOT, capture_output=True, text=True, timeout=400,
                               env={**os.environ, **env})
        assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
        assert f"resumed from {run}/checkpoints/{resumed_from}" in rerun.stdout
        records = [r for r in _bucket_records(remote) if "loss" in r]
        resumed = records[-(30 - resumed_from):]
        assert [r["step"] for r in resumed] == list(range(resumed_from + 1, 31))
        for r in resumed:  # same data order, same values
            np.testing.assert_allclose(r["loss"], ref[r["step"]], rtol=1e-5, err_msg=f"step {r['step']}")
        names = paths.files_under(remote)
        assert {"config.json", "metrics.jsonl", "summary.json"} <= set(names)
        assert json.loads((remote / "config.json").read_text())["train"]["steps"] == 30
        assert json.loads((remote / "summary.json").read_text())["steps"] == 30
        assert len([n for n in names if n.startswith("tensorboard/events.out.tfevents.")]) == 2  # one per run
        assert {"checkpoints/30/commit_success.txt", "checkpoints/30/state/manifest.ocdbt",
                "checkpoints/30/data/process_0-of-1.json"} <= set(names)

        # mmjax.eval reads the bucket's checkpoint and writes its results there.
        monkeypatch.chdir(ROOT)
        argv = [*EVAL_OVERRIDES, "--workdir", run, "--tasks", "shapes_vqa"]
        assert run_command(eval_main, argv) == 0
        results = json.loads((remote / "eval" / "30" / "results.json").read_text())
        assert results["step"] == 30 and results["tasks"]["shapes_vqa"]["scored@0shot"] == 4
        assert (remote / "eval" / "30" / "shapes_vqa.predictions.jsonl").exists()
        assert "eval/shapes_vqa/accuracy@0shot" in _bucket_records(remote)[-1]
