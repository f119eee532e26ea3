"""One front end: every command loads `--config FILE[:ARG]` the same way and
applies `--config.FIELD=VALUE` overrides (mmjax.frontend)."""

import json
import os
import subprocess
import sys

import pytest

from mmjax.bench import loop_overhead, moe_vs_dense, sweep

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_sweep_and_loop_overhead_apply_overrides(tmp_path):
    args = sweep.parse_args(["--workdir", str(tmp_path), "--config.train.steps=3", "--config.mesh.data=4",
                             "--grid", "4x2x1x1", "--steps", "2"])
    assert (args.config.train.steps, args.config.mesh.data, args.grid, args.steps) == (3, 4, "4x2x1x1", 2)
    args = loop_overhead.parse_args(["--config", "experiments/tiny_moe.py", "--workdir", str(tmp_path),
                                     "--config.model.decoder.moe.top_k=1"])
    assert args.config.model.decoder.moe.top_k == 1 and args.config.model.decoder.moe.num_experts > 0
    # A linked field changes on both sides (image size: encoder and data).
    args = loop_overhead.parse_args(["--workdir", str(tmp_path), "--config.model.vit.image_size=64"])
    assert args.config.data.image_size == 64


def test_moe_vs_dense_applies_overrides_to_both_members(tmp_path):
    dense, moe = moe_vs_dense.parse_args(["--config", "experiments/moe_pairs.py:tiny", "--config.data.seq_len=32",
                                          "--steps", "3", "--workdir", str(tmp_path)])
    assert dense.config.data.seq_len == moe.config.data.seq_len == 32
    assert dense.config.model.decoder.moe.num_experts == 0 < moe.config.model.decoder.moe.num_experts
    assert dense.steps == moe.steps == 3
    dense, moe = moe_vs_dense.parse_args(["--dense", "experiments/tiny.py", "--moe", "experiments/tiny_moe.py",
                                          "--config.train.seed=5"])
    assert dense.config.train.seed == moe.config.train.seed == 5
    with pytest.raises(SystemExit, match="must name a pair"):
        moe_vs_dense.parse_args(["--config", "experiments/moe_pairs.py"])


def test_bad_flags_and_help_end_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"^error: .*stepz"):
        sweep.parse_args(["--workdir", str(tmp_path), "--stepz=3"])
    with pytest.raises(SystemExit, match="--workdir is required"):
        loop_overhead.parse_args([])
    with pytest.raises(SystemExit) as exit_:
        sweep.parse_args(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--config.<path>=<value>" in out and "--workdir" in out and "--undefok" not in out


@pytest.mark.slow
def test_aot_loop_overhead_and_data_commands_run_with_overrides(tmp_path):
    """The commands end to end, each changing the config from the command line
    (sweep and moe_vs_dense share loop_overhead's parser and are run by their
    own tests)."""
    aot = subprocess.run([sys.executable, "-m", "mmjax.bench.aot", "--config", "experiments/tiny.py",
                          "--topology", "v5p:2x2x1", "--config.mesh.data=1", "--config.mesh.fsdp=4",
                          "--config.mesh.expert=1", "--config.model.decoder.layers=1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    if "libtpu" in aot.stderr and aot.returncode:
        pytest.skip("libtpu (tpu extra) is not installed")
    assert aot.returncode == 0, aot.stderr[-2000:]
    assert "mesh data=1 x fsdp=4 x expert=1" in aot.stdout
    run = subprocess.run([sys.executable, "-m", "mmjax.bench.loop_overhead", "--workdir", str(tmp_path),
                          "--steps", "3", "--config.model.decoder.layers=1", "--config.data.seq_len=64"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["config"]["model"]["decoder"]["layers"] == 1 and summary["config"]["data"]["seq_len"] == 64
    assert summary["loop_wall_per_step_median_s"] > 0 and summary["without_prefetch"]["wall_per_step_median_s"] > 0
    assert sorted(os.listdir(tmp_path)) == ["loop_run_prefetch0", "loop_run_prefetch2", "results.csv",
                                            "summary.json"]
    data = subprocess.run([sys.executable, "-m", "mmjax.bench.data", "--config", "experiments/data_bench.py:smoke",
                           "--workdir", str(tmp_path / "data"), "--modes=bare", "--config.bench.rounds=1",
                           "--config.data.pack_window=4"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert data.returncode == 0, data.stderr[-2000:]
    summary = json.loads((tmp_path / "data" / "summary.json").read_text())
    assert summary["bench"]["rounds"] == 1 and summary["data"]["pack_window"] == 4
