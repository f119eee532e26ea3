"""The decode benchmark (mmjax.bench.decode) end to end on tiny settings:
it writes its files, cached and uncached greedy decoding agree, and the
speed ratio is a positive number (timings themselves are not asserted)."""

import csv
import json
import math
import os

import pytest

from mmjax.bench.decode import main
from mmjax.frontend import run_command

ROOT = os.path.join(os.path.dirname(__file__), "..")
TINY = ["--config", "experiments/tiny.py", "--config.runtime.cpu_devices=8", "--config.model.decoder.layers=1",
        "--config.model.vit.depth=1"]
MODELS = {
    "mm1_image": [],
    "text_moe": ["--config.model.name=text_lm", "--config.model.decoder.moe.num_experts=4",
                 "--config.model.decoder.moe.moe_every=1"],
}


@pytest.mark.parametrize("model", sorted(MODELS))
def test_tiny_run_writes_results_and_the_tokens_match(model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    argv = [*TINY, *MODELS[model], "--workdir", str(tmp_path), "--batch", "2", "--prompt_len", "8",
            "--new_tokens", "3", "--repeats", "1"]
    assert run_command(main, argv) == 0
    printed = capsys.readouterr().out
    assert "tokens: identical" in printed
    with open(tmp_path / "results.csv") as f:
        rows = {r["decoding"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["cached", "uncached"]
    assert all(float(r["new_tokens_per_s"]) > 0 for r in rows.values())
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["tokens_match"] is True
    assert summary["cached"]["all_rows_full"] is True
    ratio = summary["speedup_tokens_per_s"]
    assert isinstance(ratio, float) and math.isfinite(ratio) and ratio > 0


def test_a_prompt_too_short_for_an_image_is_refused_before_building(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit, match="--prompt_len=4: model 'mm1' reads images"):
        main([*TINY, "--workdir", str(tmp_path), "--prompt_len", "4"])
    assert not (tmp_path / "results.csv").exists()
