"""Workdir paths on a bucket (mmjax/paths.py), against a local storage emulator."""

import pytest

from conftest import free_port
from gcs_emulator import BUCKET, emulated_bucket, fresh_gcs_filesystem
from mmjax import paths
from mmjax.errors import ConfigError


@pytest.fixture
def bucket(monkeypatch):
    with emulated_bucket(monkeypatch) as env:
        yield env


def test_write_append_list_and_exists_on_a_bucket(bucket):
    root = paths.workdir_path(f"gs://{BUCKET}/run")
    assert str(root) == f"gs://{BUCKET}/run" and paths.is_remote(root)
    assert not (root / "config.json").exists()
    paths.write_text(root / "config.json", "{}\n")
    assert (root / "config.json").exists() and (root / "config.json").read_text() == "{}\n"

    mirror = paths.Mirror(root, download=("metrics.jsonl",), every_s=3600)
    with open(mirror.local / "metrics.jsonl", "a") as f:
        f.write('{"step": 1}\n')
    assert mirror.sync(force=False) == []  # not due yet
    assert mirror.sync() == ["metrics.jsonl"]
    assert mirror.sync() == []  # nothing changed
    mirror.close()
    # A new writer continues the object: "append" is download, append, rewrite.
    mirror = paths.Mirror(root, download=("metrics.jsonl",))
    with open(mirror.local / "metrics.jsonl", "a") as f:
        f.write('{"step": 2}\n')
    (mirror.local / "tensorboard").mkdir()
    (mirror.local / "tensorboard" / "events").write_bytes(b"\0\1")
    mirror.close()
    assert (root / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'
    assert sorted(p.name for p in root.iterdir()) == ["config.json", "metrics.jsonl", "tensorboard"]
    assert (root / "tensorboard" / "events").read_bytes() == b"\0\1"
    assert [p.name for p in root.glob("tensorboard/*")] == ["events"]
    assert paths.files_under(root) == ["config.json", "metrics.jsonl", "tensorboard/events"]


def test_copy_tree_between_a_folder_and_a_bucket(bucket, tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "top.txt").write_text("1")
    (tmp_path / "a" / "b" / "deep.txt").write_text("2")
    remote = paths.workdir_path(f"gs://{BUCKET}/copy")
    paths.copy_tree(tmp_path / "a", remote)
    assert paths.files_under(remote) == ["b/deep.txt", "top.txt"]
    paths.copy_tree(remote, tmp_path / "back")
    assert (tmp_path / "back" / "b" / "deep.txt").read_text() == "2"


def test_unreachable_or_missing_buckets_are_refused_in_one_sentence(bucket, monkeypatch):
    with pytest.raises(ConfigError, match="bucket gs://no-such-bucket does not exist"):
        paths.workdir_path("gs://no-such-bucket/run")
    with pytest.raises(ConfigError, match="only local folders and gs://"):
        paths.workdir_path("s3://bucket/run")
    with pytest.raises(ConfigError, match="names no bucket"):
        paths.workdir_path("gs:///run")
    # Nothing listens on this port: refused after REACH_TIMEOUT_S instead of gcsfs's minute of retries.
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setattr(paths, "REACH_TIMEOUT_S", 1.0)
    monkeypatch.setattr(paths, "_checked", set())
    fresh_gcs_filesystem()
    with pytest.raises(ConfigError, match=r"bucket gs://other cannot be reached \(no answer in 1s"):
        paths.workdir_path("gs://other/run")
    fresh_gcs_filesystem()


def test_missing_gcsfs_is_refused_in_one_sentence(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gcsfs", None)
    monkeypatch.setattr(paths, "_checked", set())
    with pytest.raises(ConfigError, match="needs the gcsfs package"):
        paths.workdir_path("gs://bucket/run")


def test_local_workdirs_are_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert paths.workdir_path("run") == tmp_path / "run"
    assert not paths.is_remote(paths.workdir_path("run"))


def test_benchmark_outputs_land_in_the_bucket(bucket):
    """The benchmarks' writers (results.csv, PNG plots, summary.json, the AOT report) on a gs:// workdir."""
    import csv
    import io
    import json

    from mmjax.bench import decode, moe_vs_dense, sweep

    root = paths.workdir_path(f"gs://{BUCKET}/bench")
    sweep.write_outputs([{"status": "ok", "mesh": "2x2x2x1", "layout": "fsdp", "step_time_s": 0.5,
                          "collective_bytes": 2**20}], root / "sweep")
    moe_vs_dense.write_outputs([{"config": "dense", "step_time_s": 1.0}, {"config": "moe", "step_time_s": 1.5}],
                               root / "moe")
    row = dict.fromkeys(decode.COLUMNS, 1.0)
    decode.write_results(root / "decode", row, row, {"speedup": 1.0})
    from types import SimpleNamespace

    from mmjax.bench import aot

    report = SimpleNamespace(hlo_text="HloModule m", to_dict=lambda: {"fits": True})
    assert aot.write_report(report, f"gs://{BUCKET}/bench/aot") == f"gs://{BUCKET}/bench/aot/aot_report.json"
    assert paths.files_under(root) == ["aot/aot_report.json", "aot/compiled_hlo.txt", "decode/results.csv",
                                       "decode/summary.json", "moe/moe_vs_dense.png",
                                       "moe/results.csv", "sweep/results.csv", "sweep/sweep.png"]
    assert json.loads((root / "aot" / "aot_report.json").read_text()) == {"fits": True}
    assert (root / "sweep" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    rows = list(csv.DictReader(io.StringIO((root / "moe" / "results.csv").read_text())))
    assert [r["config"] for r in rows] == ["dense", "moe"]
    assert json.loads((root / "decode" / "summary.json").read_text()) == {"speedup": 1.0}


def test_a_partial_checkpoint_on_a_bucket_is_moved_aside(bucket):
    """A bucket has no folders to rename: the partial step is copied to checkpoints_damaged/ and deleted."""
    from mmjax.train.checkpoint import Checkpointer

    root = paths.workdir_path(f"gs://{BUCKET}/partial")
    paths.write_text(root / "checkpoints" / "5" / "state" / "_METADATA", "{")
    lines = []
    ckpt = Checkpointer(root, async_save=False, log=lines.append)
    assert ckpt.latest_step() is None
    assert ckpt.recovered[0]["moved_to"] == f"gs://{BUCKET}/partial/checkpoints_damaged/5"
    assert paths.files_under(root) == ["checkpoints_damaged/5/state/_METADATA"]
    assert "has no commit_success.txt (a partial checkpoint)" in lines[0]
    ckpt.close()
