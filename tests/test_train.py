"""End-to-end training: outputs, learning, resumption, the command line."""

import json
import os
import signal
import subprocess
import sys
import time

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
    c.train.eval_every = 60
    summary = train(c, str(tmp_path))
    recs = [r for r in _records(tmp_path) if "loss" in r]
    assert [r["step"] for r in recs] == list(range(1, 121))
    compile_s = next(r["compile_time_s"] for r in _records(tmp_path) if "compile_time_s" in r)
    for key in ("step_time_s", "step_time_p90_s", "tokens_per_s", "images_per_s", "data_wait_s", "mfu",
                "model_tflops_per_device",
                "host_overhead_s", "hbm_or_rss_bytes"):
        assert all(r[key] > 0 for r in recs), key
    for key in ("grad_norm", "learning_rate", "lm_loss", "z_loss", "moe_aux_loss", "mix_caption"):
        assert all(key in r for r in recs), key
    # Step time excludes compilation: even the first step (which still pays one-off
    # runtime warm-up) is far cheaper than the compile, reported on its own.
    step_times = np.array([r["step_time_s"] for r in recs])
    assert step_times.max() < 0.3 * compile_s, (step_times.max(), compile_s)
    # MFU counts the images present in each window's batches, not every padded image slot.
    from mmjax.train.flops import train_flops

    flops = train_flops(c, num_devices=8)
    for r in recs:
        assert r["model_flops_per_step"] == pytest.approx(flops.model_flops_at(r["images_per_step"]))
    assert np.mean([r["images_per_step"] for r in recs]) < c.data.global_batch * c.data.max_images
    assert np.mean([r["model_flops_per_step"] for r in recs]) < flops.model_flops
    losses = np.array([r["loss"] for r in recs])
    assert losses[-10:].mean() < 0.5 * losses[:10].mean()
    assert (tmp_path / "config.json").exists()
    assert json.loads((tmp_path / "config.json").read_text())["mesh"]["fsdp"] == 2
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["120", "60"]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    # The caption check runs as a registered evaluator at the start and the end.
    untrained, trained = summary["eval"]["initial"], summary["eval"]["final"]
    assert untrained["caption_accuracy/attribute_accuracy"] < 0.1
    assert trained["caption_accuracy/attribute_accuracy"] > untrained["caption_accuracy/attribute_accuracy"] + 0.2
    assert "caption_accuracy/blank_images/attribute_accuracy" in trained
    evals = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
             if "eval/caption_accuracy/attribute_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 60, 120]  # the initial parameters, train.eval_every, the end
    # Running the finished workdir again says so and leaves every output byte-identical.
    outputs = sorted(p for p in tmp_path.rglob("*") if p.is_file() and "checkpoints" not in p.parts)
    before = {p: p.read_bytes() for p in outputs}
    assert train(c, str(tmp_path)) == json.loads((tmp_path / "summary.json").read_text())
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file() and "checkpoints" not in p.parts) == outputs
    assert all(p.read_bytes() == data for p, data in before.items())


SMALL_OVERRIDES = ("--config.model.vit.depth=1", "--config.model.decoder.layers=1", "--config.model.decoder.mlp=256",
                   "--config.data.seq_len=64", "--config.data.global_batch=8", "--config.data.max_images=2",
                   "--config.eval.caption_accuracy=False", "--config.eval.shapes_caption=False",
                   "--config.eval.shapes_vqa=False", "--config.train.log_every=1")


def _cli_command(workdir, *args) -> list[str]:
    return [sys.executable, "-m", "mmjax.train", "--config", "experiments/tiny.py", "--workdir", str(workdir),
            *SMALL_OVERRIDES, *args]


def _start_cli(workdir, *args):
    return subprocess.Popen(_cli_command(workdir, *args), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for_step(proc, workdir, step, checkpoint=None, timeout=240):
    """Polls metrics.jsonl until `step` is logged (and `checkpoint` is committed)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        path = workdir / "metrics.jsonl"
        logged = [r["step"] for r in _records(workdir) if "loss" in r] if path.exists() else []
        if logged and max(logged) >= step and (
                checkpoint is None or (workdir / "checkpoints" / str(checkpoint) / "state").exists()):
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout}s")


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_matches_the_uninterrupted_run(tmp_path):
    c = small_config(steps=30)
    c.train.checkpoint_every = 10
    c.eval.caption_accuracy = False
    train(c, str(tmp_path / "full"))
    ref = {r["step"]: r["loss"] for r in _records(tmp_path / "full") if "loss" in r}

    cut = tmp_path / "cut"
    args = ("--config.train.steps=30", "--config.train.checkpoint_every=10")
    proc = _start_cli(cut, *args)
    _wait_for_step(proc, cut, 12, checkpoint=10)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = max(r["step"] for r in _records(cut) if "loss" in r)
    assert killed_at < 30
    rerun = subprocess.run(_cli_command(cut, *args), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from {cut / 'checkpoints'}/10" in rerun.stdout
    resumed = [r for r in _records(cut) if "loss" in r][killed_at:]
    assert [r["step"] for r in resumed] == list(range(11, 31))
    for r in resumed:  # same data order, same values
        np.testing.assert_allclose(r["loss"], ref[r["step"]], rtol=1e-5, err_msg=f"step {r['step']}")


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path):
    proc = _start_cli(tmp_path, "--config.train.steps=500", "--config.train.checkpoint_every=1000")
    _wait_for_step(proc, tmp_path, 3)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-3000:]
    saved = int(output.split("SIGTERM received: saved step ")[1].split()[0])
    assert 3 <= saved < 500
    assert (tmp_path / "checkpoints" / str(saved) / "state").exists()
    assert json.loads((tmp_path / "summary.json").read_text())["preempted_at"] == saved


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


def test_bad_data_source_and_profile_window_are_one_clear_error(tmp_path):
    out = _run_cli("--config", "experiments/tiny.py", "--workdir", str(tmp_path),
                   "--config.data.sources.text=jsonl:/nonexistent/text-*.jsonl")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "data error: config.data.sources.text: no file matches '/nonexistent/text-*.jsonl'." in out.stderr
    out = _run_cli("--config", "experiments/tiny.py", "--workdir", str(tmp_path), "--profile_steps=5:2")
    assert out.returncode != 0 and "--profile_steps='5:2' must be FIRST:LAST" in out.stderr


@pytest.mark.slow
def test_an_experiment_file_loads_from_any_working_directory(tmp_path):
    """`--config /abs/path/experiments/X.py` from `/`: experiment files import
    only installed packages (mmjax, and their siblings as `experiments.*`);
    the hardware presets live in `mmjax.hardware`. moe_pairs.py imports
    experiments.mm1 and experiments.tiny."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    config = os.path.abspath(os.path.join(ROOT, "experiments", "moe_pairs.py")) + ":tiny-dense"
    run = subprocess.run([sys.executable, "-m", "mmjax.train", "--config", config, "--workdir", str(tmp_path),
                          *SMALL_OVERRIDES, "--config.train.steps=2", "--config.train.checkpoint_every=2",
                          "--config.optimizer.warmup_steps=2"],
                         cwd="/", env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert [r["step"] for r in _records(tmp_path) if "loss" in r] == [1, 2]


@pytest.mark.slow
def test_profile_steps_write_a_trace_of_that_window(tmp_path, capsys):
    c = small_config(steps=4)
    c.eval.caption_accuracy = False
    c.train.profile_steps = (2, 3)
    train(c, str(tmp_path))
    traces = list((tmp_path / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    assert "profiler trace of steps 2-3 written" in capsys.readouterr().out
