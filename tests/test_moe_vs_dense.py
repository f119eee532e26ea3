"""MoE-vs-dense benchmark on 8 simulated devices: both dispatch paths timed
beside the dense model at matched active parameters, ratios, CSV and plot."""

import csv
import os

import pytest
from conftest import small_config

from mmjax.bench.moe_vs_dense import COLUMNS, compare, write_outputs


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
    with pytest.raises(ValueError, match="differs from the dense config's"):
        compare(dense, moe, steps=1, log=lambda *_: None)
