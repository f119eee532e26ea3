"""`python -m mmjax.eval` on a training workdir, and the same tasks inside
training (`train.eval_every`): results.json, predictions, metrics.jsonl rows,
the table, and one-sentence refusals."""

import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import free_port, small_config
from mmjax.eval.__main__ import main
from mmjax.frontend import run_command
from mmjax.train.loop import train

ROOT = os.path.join(os.path.dirname(__file__), "..")
# The command-line twin of small_config with the shapes tasks on, shortened.
OVERRIDES = ["--config", "experiments/tiny.py", "--config.model.vit.depth=1", "--config.model.decoder.layers=1",
             "--config.model.decoder.mlp=256", "--config.data.seq_len=64", "--config.data.global_batch=8",
             "--config.data.max_images=2", "--config.eval.caption_accuracy=False",
             "--config.evaluators.shapes_caption.num_examples=16", "--config.evaluators.shapes_vqa.num_examples=16",
             "--config.evaluators.shapes_caption.shots=(0,2)", "--config.evaluators.shapes_vqa.shots=(0,2)",
             "--config.evaluators.shapes_caption.max_new_tokens=12"]


def _two_processes(argv):
    """Runs `python -m mmjax.eval ARGV` as two processes of 4 CPU devices each."""
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, "-m", "mmjax.eval", *argv, "--config.runtime.cpu_devices=4",
                               f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                               f"--process_id={i}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True) for i in range(2)]
    try:
        outputs = [p.communicate(timeout=400)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "8 global devices" in outputs[1] and "results in" not in outputs[1]  # process 0 reports


def _config(steps):
    c = small_config(steps=steps)
    c.eval.caption_accuracy = False
    c.eval.shapes_caption = c.eval.shapes_vqa = True
    for name in ("shapes_caption", "shapes_vqa"):
        c.evaluators[name].num_examples = 16
        c.evaluators[name].shots = (0, 2)
    c.evaluators.shapes_caption.max_new_tokens = 12
    c.train.eval_every = 10
    c.train.checkpoint_every = 10
    return c


@pytest.mark.slow
def test_eval_command_and_eval_every(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    summary = train(_config(20), str(tmp_path))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/shapes_vqa/accuracy@2shot" in r]
    assert [r["step"] for r in evals] == [0, 10, 20]  # initial parameters, train.eval_every, the end
    assert all("eval/shapes_caption/blank_images/cider@2shot" in r for r in evals)
    assert summary["eval"]["final"]["shapes_caption/scored@0shot"] == 16
    capsys.readouterr()

    argv = [*OVERRIDES, "--workdir", str(tmp_path), "--step", "10", "--tasks", "shapes_vqa"]
    assert run_command(main, argv) == 0
    out = capsys.readouterr().out
    table = out[out.index("shapes_vqa"):].splitlines()
    assert table[1].split() == ["shots", "accuracy", "scored", "dropped_shots", "blank", "accuracy"]
    assert [line.split()[0] for line in table[2:4]] == ["0", "2"] and f"results in {tmp_path}/eval/10" in out
    results = json.loads((tmp_path / "eval" / "10" / "results.json").read_text())
    assert results["step"] == 10 and set(results["tasks"]) == {"shapes_vqa"}
    # The checkpoint of step 10 scores exactly as the loop scored it at step 10.
    at_10 = next(r for r in evals if r["step"] == 10)
    for key, value in results["tasks"]["shapes_vqa"].items():
        assert value == pytest.approx(at_10[f"eval/shapes_vqa/{key}"]), key
    predictions = [json.loads(line) for line in
                   (tmp_path / "eval" / "10" / "shapes_vqa.predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 16 * 2 * 2  # 16 questions x (0, 2 shots) x (images, blank images)
    assert {"id", "prediction", "references", "score", "shots"} <= set(predictions[0])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 10 and "eval/shapes_vqa/accuracy@0shot" in rows[-1]

    # Two processes x 4 devices score the same checkpoint on the same mesh alike.
    single = (tmp_path / "eval" / "10" / "results.json").read_text()
    _two_processes([*OVERRIDES, "--workdir", str(tmp_path), "--step", "10", "--tasks", "shapes_vqa"])
    assert json.loads((tmp_path / "eval" / "10" / "results.json").read_text()) == json.loads(single)

    # The latest checkpoint by default; bad choices are one sentence each.
    assert run_command(main, [*OVERRIDES, "--workdir", str(tmp_path), "--tasks", "shapes_caption"]) == 0
    assert (tmp_path / "eval" / "20" / "shapes_caption.predictions.jsonl").exists()
    capsys.readouterr()
    for extra, sentence in ((["--step", "7"], "--step 7: "), (["--tasks", "nope"], "--tasks names 'nope'")):
        assert run_command(main, [*OVERRIDES, "--workdir", str(tmp_path), *extra]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert sentence in last and "Traceback" not in last


def test_eval_needs_a_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert run_command(main, [*OVERRIDES, "--workdir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"checkpoint error: --workdir {tmp_path} has no checkpoints/ folder; train first or give --converted.")


@pytest.mark.parametrize("command", ["eval", "train"])
def test_task_files_that_match_nothing_are_refused_before_anything_is_built(command, tmp_path, monkeypatch,
                                                                            capsys):
    from mmjax.train.__main__ import main as train_main

    monkeypatch.chdir(ROOT)
    argv = ["--config", "experiments/mm1.py:smoke-3b", "--workdir", str(tmp_path), "--config.eval.coco=True",
            f"--config.evaluators.coco.annotations={tmp_path}/nope/*.json",
            f"--config.evaluators.coco.images={tmp_path}"]
    assert run_command(main if command == "eval" else train_main, argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"data error: config.evaluators.coco.annotations='{tmp_path}/nope/*.json' matches no file.")
    assert not (tmp_path / "checkpoints").exists()
