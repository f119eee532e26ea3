"""The data-pipeline benchmark (mmjax.bench.data) end to end on the smoke config."""

import csv
import json
import os
import re
import subprocess
import sys

from experiments.data_bench import get_config
from mmjax.bench import data as bench


def test_smoke_run_writes_rows_with_positive_rates(tmp_path):
    config = get_config("smoke")
    printed: list[str] = []
    summary = bench.run(config, str(tmp_path), log=printed.append)

    with open(tmp_path / "results.csv") as f:
        rows = {r["mode"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["bare", "in-process", "workers=1"]
    for mode, row in rows.items():
        assert float(row["images_per_s"]) > 0, mode
        assert float(row["images_per_s_per_worker"]) > 0, mode
        if mode != "bare":
            assert float(row["sequences_per_s"]) > 0, mode
            assert float(row["tokens_per_s"]) > 0, mode
            assert 0 < float(row["packing_efficiency"]) <= 1, mode
            assert float(row["ratio_to_bare"]) > 0, mode
    assert rows["workers=1"]["workers"] == "1" and rows["in-process"]["workers"] == "0"

    text = "\n".join(printed)
    for mode in ("in-process", "workers=1"):
        match = re.search(rf"ratio {re.escape(mode)} .*= ([0-9.]+) +\(target >= 0\.80\): (PASS|BELOW)", text)
        assert match, text
        assert float(match.group(1)) > 0

    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["verdicts"] == summary["verdicts"]
    assert set(on_disk["verdicts"]) == {"in-process", "workers=1"}
    for mode in ("in-process", "workers=1"):
        r = on_disk["results"][mode]
        assert r["skipped_images"] == 0 and r["skipped_records"] == 0
        assert min(r["stream_examples"].values()) > 0  # all three streams were read


def test_generated_shards_are_reused_and_deterministic(tmp_path):
    cfg = get_config("smoke").bench
    cfg.records_per_shard = 2
    first = bench.prepare_shards(str(tmp_path / "a"), cfg, log=lambda s: None)
    messages: list[str] = []
    again = bench.prepare_shards(str(tmp_path / "a"), cfg, log=messages.append)
    assert again == first and any("reusing" in m for m in messages)
    bench.prepare_shards(str(tmp_path / "b"), cfg, log=lambda s: None)
    for name in ("caption-0000.tar", "interleaved-0001.tar", "text-0000.tar"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    images = bench.read_images([str(tmp_path / "a" / "interleaved-0000.tar")])
    lo, hi = cfg.interleaved_images
    assert lo * 2 <= len(images) <= hi * 2
    assert all(b[:2] == b"\xff\xd8" for b in images)  # JPEG


def test_help_explains_the_flags():
    root = os.path.join(os.path.dirname(__file__), "..")
    out = subprocess.run([sys.executable, "-m", "mmjax.bench.data", "--help"], check=False, cwd=root, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    for flag in ("--config", "--workdir", "--modes", "--profile_batches"):
        assert flag in out.stdout
    assert "decode_and_resize" in out.stdout  # the module doc explains what is measured
