"""MoE-vs-dense benchmark on 8 simulated devices: both dispatch paths timed
beside the dense model at matched active parameters, ratios, CSV and plot."""

import csv
import importlib.util
import os

import pytest
from conftest import small_config

from mmjax.bench.moe_vs_dense import COLUMNS, compare, write_outputs
from mmjax.errors import ConfigError


def _pair():
    dense = small_config()
    moe = small_config()
    moe.model.decoder.moe.update(num_experts=4, top_k=2, moe_every=1, expert_mlp=dense.model.decoder.mlp // 2,
                                 capacity_factor=2.0)
    return dense, moe


@pytest.mark.slow  # an end-to-end benchmark run: several configurations compiled and timed
def test_compare_times_dense_and_both_dispatch_paths(tmp_path):
    dense, moe = _pair()
    rows = compare(dense, moe, steps=3, log=lambda *_: None)
    by_name = {r["config"]: r for r in rows}
    assert list(by_name) == ["dense", "moe-capacity", "moe-dropless"]
    assert [r["dispatch"] for r in rows] == ["dense", "capacity", "dropless"]
    assert by_name["dense"]["ratio_to_dense"] == 1.0
    for r in rows:
        assert r["step_time_s"] > 0 and r["step_time_p90_s"] >= r["step_time_s"]
        assert r["ratio_to_dense"] == pytest.approx(r["step_time_s"] / by_name["dense"]["step_time_s"])
    # Matched active parameters: two experts of half the width do the dense MLP's work;
    # only the router (embed x experts) is extra.
    d, m = by_name["dense"], by_name["moe-capacity"]
    assert m["active_params"] - d["active_params"] == dense.model.decoder.embed * 4
    assert m["params"] > m["active_params"] and d["params"] == d["active_params"]
    # The capacity path exchanges tokens by all-to-all over the expert axis; dense has none.
    assert m["all_to_all_bytes"] > 0 and d["all_to_all_bytes"] == 0
    write_outputs(rows, str(tmp_path))
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == COLUMNS and [t["config"] for t in table] == list(by_name)
    assert os.path.getsize(tmp_path / "moe_vs_dense.png") > 1000


def test_compare_refuses_two_meshes():
    dense, moe = _pair()
    moe.mesh.data, moe.mesh.fsdp = 4, 1
    with pytest.raises(ConfigError, match="does not split the dense config's .* devices the same way"):
        compare(dense, moe, steps=1, log=lambda *_: None)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (the `tpu` extra)")
@pytest.mark.slow  # three ahead-of-time compiles
def test_aot_only_compiles_for_the_topology_and_runs_nothing(tmp_path):
    """`--aot_only`: each configuration only compiled for the TPU topology
    (the MoE member on its own fsdp x expert split of the same devices), the
    estimate and its ratio to dense reported, nothing timed here."""
    dense, moe = _pair()
    dense.mesh.update(fsdp=4, expert=1)  # data=2: 8 devices either way
    rows = compare(dense, moe, steps=5, topology="v5p:2x2x2", log=lambda *_: None, aot_only=True)
    assert [r["config"] for r in rows] == ["dense", "moe-capacity", "moe-dropless"]
    for r in rows:
        assert "step_time_s" not in r and r["tpu_fits"] is True
        assert r["tpu_ratio_to_dense"] == pytest.approx(r["tpu_estimate_s"] / rows[0]["tpu_estimate_s"])
        assert r["tpu_flops_ratio"] > 0
    write_outputs(rows, str(tmp_path))
    with open(tmp_path / "results.csv") as f:
        assert [t["config"] for t in csv.DictReader(f)] == ["dense", "moe-capacity", "moe-dropless"]
    assert os.path.getsize(tmp_path / "moe_vs_dense.png") > 1000
