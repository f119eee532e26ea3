"""Layout sweep on 8 simulated devices: enumerate, skip the invalid with a
reason, time the rest, write the documented CSV and a plot."""

import csv
import importlib.util
import os

import pytest
from conftest import small_config

from mmjax.bench.sweep import (COLUMNS, candidates, enumerate_meshes, parse_grid, parse_remats, run_aot_sweep,
                               run_sweep, write_outputs)
from mmjax.errors import ConfigError


def test_enumeration_covers_every_factorisation():
    meshes = enumerate_meshes(8)
    assert len(meshes) == 10  # ordered triples with product 8
    assert all(m["data"] * m["fsdp"] * m["expert"] == 8 and m["model"] == 1 for m in meshes)
    assert len(enumerate_meshes(8, with_model=True)) == 20
    both = candidates(meshes, ["fsdp", "data_parallel"])
    assert len(both) == 11  # data_parallel replicates every weight: one mesh suffices
    remats = parse_remats("none,full,dots_no_batch")
    assert remats == ["", "full", "dots_no_batch"] and parse_remats("") == [None]
    crossed = candidates(meshes, ["fsdp", "data_parallel"], remats)
    assert len(crossed) == 33 and crossed[0] == (meshes[0], "fsdp", "")
    with pytest.raises(ConfigError, match="--remat names 'ful', which is not a remat policy; did you mean 'full'"):
        parse_remats("none,ful")


@pytest.mark.slow  # an end-to-end benchmark run: several configurations compiled and timed
def test_sweep_times_four_layouts_and_skips_an_invalid_one(tmp_path):
    c = small_config()
    c.data.global_batch = 8
    grid = parse_grid("2x2x2x1,1x8x1x1,8x1x1x1,1x1x1x8")  # model=8: 4 heads cannot split 8 ways
    rows = run_sweep(c, candidates(grid, ["fsdp"]) + [(grid[2], "data_parallel")], steps=3, log=lambda *_: None)
    ok = [r for r in rows if r["status"] == "ok"]
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert len(ok) >= 4
    assert [r["rank"] for r in ok] == list(range(1, len(ok) + 1))
    assert all(r["step_time_s"] > 0 and r["peak_bytes_per_device"] > 0 for r in ok)
    assert [r["mesh"] for r in skipped] == ["1x1x1x8"] and "8" in skipped[0]["reason"]
    by_name = {(r["mesh"], r["layout"]): r for r in ok}
    # FSDP gathers weights; pure data parallelism only all-reduces gradients.
    assert by_name[("1x8x1x1", "fsdp")]["all_gather_bytes"] > 0
    assert by_name[("8x1x1x1", "data_parallel")]["all_gather_bytes"] == 0
    assert by_name[("8x1x1x1", "data_parallel")]["all_reduce_bytes"] > 0
    write_outputs(rows, str(tmp_path))
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == COLUMNS and len(table) == len(rows)
    assert os.path.getsize(tmp_path / "sweep.png") > 1000


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu (jax[tpu]) is not installed")
def test_aot_only_sweep_ranks_layouts_for_a_tpu_slice(tmp_path):
    """A slice that is not at hand: every candidate is compiled for it, none
    runs here; ranked by the estimated step time; a mesh of the wrong size
    is skipped with the reason."""
    c = small_config()
    grid = parse_grid("1x4x1x1,4x1x1x1,8x1x1x1")
    rows = run_aot_sweep(c, candidates(grid, ["fsdp"]) + [(grid[1], "data_parallel")], "v5p:2x2x1",
                         log=lambda *_: None)
    assert {r["remat"] for r in rows} == {"none"}  # the config's own policy
    ok = [r for r in rows if r["status"] == "ok"]
    assert [(r["mesh"], r["layout"]) for r in rows if r["status"] == "skipped"] == [("8x1x1x1", "fsdp")]
    assert "needs 8 devices but 4 are available" in rows[-1]["reason"]
    assert len(ok) == 3 and [r["rank"] for r in ok] == [1, 2, 3]
    assert all(r["tpu_fits"] and r["tpu_peak_bytes"] > 0 and "step_time_s" not in r for r in ok)
    estimates = [r["tpu_estimate_s"] for r in ok]
    assert estimates == sorted(estimates) and estimates[0] > 0
    by_layout = {(r["mesh"], r["layout"]): r for r in ok}
    # Pure FSDP moves about its analytic minimum; replicated weights move gradients only.
    assert 0.8 < by_layout[("1x4x1x1", "fsdp")]["tpu_collective_ratio"] < 1.6
    write_outputs(rows, str(tmp_path))
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["rank"] for t in table] == ["1", "2", "3", ""] and table[0]["step_time_s"] == ""
    assert os.path.getsize(tmp_path / "sweep.png") > 1000


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu (jax[tpu]) is not installed")
def test_aot_sweep_crosses_remat_policies():
    """`--remat` is a sweep dimension: each policy compiled for the slice,
    the ViT's and the decoder's remat set together."""
    c = small_config()
    rows = run_aot_sweep(c, candidates(parse_grid("1x4x1x1"), ["fsdp"], parse_remats("none,full")), "v5p:2x2x1",
                         log=lambda *_: None)
    assert sorted(r["remat"] for r in rows) == ["full", "none"] and all(r["status"] == "ok" for r in rows)
    assert sorted(r["rank"] for r in rows) == [1, 2] and all(r["tpu_fits"] for r in rows)
    none, full = sorted(rows, key=lambda r: r["remat"] == "full")
    assert (none["tpu_peak_bytes"], none["tpu_estimate_s"]) != (full["tpu_peak_bytes"], full["tpu_estimate_s"])
