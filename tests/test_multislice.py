"""Multislice meshes (ICI inside a TPU slice, DCN between slices): the hybrid
mesh over libtpu's compile-only devices of two v5p slices, the one-sentence
refusals of bad `config.mesh.dcn_*` sizes, cross-slice transfers read from a
compiled program's HLO, the estimate's DCN term, and the two-slice compile
of the tiny config."""

import importlib.util
import json

import jax
import pytest

from experiments import tiny
from mmjax.bench import aot
from mmjax.bench.estimate import CHIPS, estimate_step_time
from mmjax.bench.hlo_collectives import collective_stats
from mmjax.bench.topology import TopologyError, topology_devices
from mmjax.errors import ConfigError
from mmjax.parallel.mesh import MeshConfigError, make_mesh, resolve_mesh_shape, slice_mesh_shape
from mmjax.train.config_checks import check_static

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu (jax[tpu]) is not installed")


@pytest.fixture(scope="module")
def two_slices():
    """Compile-only devices of two v5p:2x2x1 slices (4 chips each)."""
    gen, devices = topology_devices("v5p:2x2x1", num_slices=2)
    assert gen == "v5p" and len(devices) == 8
    return devices


@needs_libtpu
def test_data_axis_spans_the_slices(two_slices):
    mesh = make_mesh(dict(data=2, fsdp=2, expert=2, model=1), two_slices)  # dcn_data=-1: both slices
    assert dict(mesh.shape) == dict(data=2, fsdp=2, expert=2, model=1)
    for i in range(2):  # each index along data is one whole slice
        assert {d.slice_index for d in mesh.devices[i].flat} == {i}
    assert slice_mesh_shape(mesh) == dict(data=2, fsdp=1, expert=1, model=1)
    # Spread over fsdp instead: each fsdp index is one slice, data stays inside a slice.
    mesh = make_mesh(dict(data=2, fsdp=4, expert=1, model=1, dcn_data=1, dcn_fsdp=2), two_slices)
    assert slice_mesh_shape(mesh) == dict(data=1, fsdp=2, expert=1, model=1)
    for j in range(2):
        assert {d.slice_index for d in mesh.devices[:, 2 * j:2 * j + 2].flat} == {j}


@needs_libtpu
def test_bad_multislice_meshes_are_refused(two_slices):
    cases = [
        (dict(data=4, fsdp=2, dcn_data=4), r"config.mesh \(dcn_data=4\) spreads the mesh over 4 slices but "
                                           r"these 8 TPU v5 devices form 2 slices\.$"),
        (dict(data=8, dcn_data=1), r"spreads the mesh over 1 slice but these 8 TPU v5 devices form 2 slices"),
        (dict(data=1, fsdp=-1), r"config.mesh.dcn_data=2 does not divide config.mesh.data=1 "),
        (dict(data=8, dcn_data=-1, dcn_fsdp=-1), r"at most one dcn_ size may be -1"),
        (dict(data=8, dcn_expert=0), r"config.mesh.dcn_expert=0 is invalid"),
        (dict(data=8, dcn_data=3), r"config.mesh.dcn_data=3 does not divide config.mesh.data=8"),
    ]
    for mesh_cfg, message in cases:
        with pytest.raises(MeshConfigError, match=message):
            make_mesh(mesh_cfg, two_slices)
    with pytest.raises(MeshConfigError, match=r"hold different numbers of devices \(\[2, 4\]\)"):
        make_mesh(dict(data=-1), two_slices[:6])
    assert issubclass(MeshConfigError, ConfigError)


def test_dcn_sizes_without_slices_are_refused():
    cpu = jax.devices()[:2]
    with pytest.raises(MeshConfigError, match=r"config.mesh \(dcn_data=2\) spreads the mesh over 2 slices but "
                                              r"these 2 cpu devices carry no slice_index"):
        make_mesh(dict(data=2, dcn_data=2), cpu)
    assert dict(make_mesh(dict(data=2), cpu).shape)["data"] == 2  # the default dcn_data=-1 is 1 here
    # The slice counts are not devices: the mesh product ignores them.
    assert resolve_mesh_shape(dict(data=2, fsdp=4, dcn_data=2), 8)["data"] == 2
    c = tiny.get_config()
    c.mesh.dcn_data = 4  # tiny's data axis is 2: caught before anything is built
    with pytest.raises(ConfigError, match=r"config.mesh.dcn_data=4 does not divide config.mesh.data=2"):
        check_static(c)
    c.mesh.dcn_data, c.mesh.dcn_fsdp = 2, 2
    check_static(c)  # the slice count is only known from the devices
    with pytest.raises(TopologyError, match="num_slices=0 is invalid"):
        topology_devices("v5p:2x2x1", num_slices=0)


HLO = """HloModule m

ENTRY %main (p0: f32[64,128], p1: bf16[32,16]) -> f32[64,128] {
  %p0 = f32[64,128]{1,0} parameter(0)
  %p1 = bf16[32,16]{1,0} parameter(1)
  %all-gather = bf16[64,16]{1,0} all-gather(%p1), replica_groups={{0,1}}, dimensions={0}
  %after-all = token[] after-all()
  %send = (f32[64,128]{1,0}, u32[], token[]) send(%p0, %after-all), channel_id=3, is_host_transfer=true, frontend_attributes={_xla_host_transfer_rendezvous="all-reduce_0",_xla_megascale_target="{1,2}x{0:3}",_xla_megascale_transfer_type="ALL_REDUCE"}
  %recv = (f32[64,128]{1,0}, u32[], token[]) recv(%after-all), channel_id=2, is_host_transfer=true, frontend_attributes={_xla_host_transfer_rendezvous="all-reduce_0",_xla_megascale_target="{1,2}x{0:3}",_xla_megascale_transfer_type="ALL_REDUCE"}
  %send.1 = (bf16[32,16]{1,0}, u32[], token[]) send(%p1, %after-all), channel_id=5, is_host_transfer=true, frontend_attributes={_xla_host_transfer_rendezvous="all-gather.1_0",_xla_megascale_target={{100000,200000,300000,400000},{100001,200001,300001,400001}},_xla_megascale_transfer_type="ALL_GATHER"}
  %send-done = token[] send-done(%send), channel_id=3, is_host_transfer=true
  %recv-done = (f32[64,128]{1,0}, token[]) recv-done(%recv), channel_id=2, is_host_transfer=true
  ROOT %r = f32[64,128]{1,0} get-tuple-element(%recv-done), index=0
}
"""


def test_cross_slice_transfers_are_read_from_the_hlo():
    stats = collective_stats(HLO, 4)
    assert stats.counts["all-gather"] == 1 and stats.ici_bytes == pytest.approx(32 * 16 * 2)  # in-slice, g=2
    assert stats.dcn_counts == {"all-reduce": 1, "all-gather": 1}  # sends only; recv and -done skipped
    assert stats.dcn_bytes_by_kind["all-reduce"] == pytest.approx(2 * 64 * 128 * 4 * 1 / 2)  # 2 slices
    assert stats.dcn_bytes_by_kind["all-gather"] == pytest.approx(32 * 16 * 2 * 3)            # 4 slices
    assert stats.collective_bytes == pytest.approx(stats.ici_bytes + stats.dcn_bytes)
    assert {t["kind"] for t in stats.largest} == {"all-gather", "dcn all-reduce", "dcn all-gather"}


def test_estimate_charges_dcn_bytes_at_the_dcn_rate():
    v5p = CHIPS["v5p"]
    assert v5p.dcn_bandwidth == 50e9 / 8 and CHIPS["v6e"].dcn_bandwidth == 100e9 / 8
    est = estimate_step_time(0, 0, v5p.ici_bandwidth / 4 + v5p.dcn_bandwidth, v5p, num_slices=2,
                             dcn_bytes_per_device=v5p.dcn_bandwidth)
    assert (est.ici_collective_s, est.dcn_collective_s) == pytest.approx((0.25, 1.0))
    assert est.collective_s == pytest.approx(1.25) and est.step_s == pytest.approx(1.25)
    assert "DCN 1000.000 ms across 2 slices" in est.summary()
    with pytest.raises(ValueError, match="dcn_bytes_per_device=2 must lie between 0 and"):
        estimate_step_time(0, 0, 1, v5p, 2, dcn_bytes_per_device=2)


@pytest.mark.slow
@needs_libtpu
def test_tiny_on_two_v5p_slices(tmp_path):
    """The tiny config's data axis over two v5p:2x2x1 slices: the gradient
    all-reduce over data crosses the slices (DCN), FSDP and expert traffic
    stays inside them (ICI)."""
    report = aot.compile_for_topology(tiny.get_config(), "v5p:2x2x1", num_slices=2)
    assert report.num_devices == 8 and report.num_slices == 2
    assert report.mesh == dict(data=2, fsdp=2, expert=2, model=1)
    assert report.dcn_mesh == dict(data=2, fsdp=1, expert=1, model=1)
    assert report.dcn_collective_bytes > 0 and report.ici_collective_bytes > 0
    assert report.dcn_counts.get("all-reduce", 0) > 0 and set(report.dcn_counts) == {"all-reduce"}
    assert report.collective_bytes == pytest.approx(report.ici_collective_bytes + report.dcn_collective_bytes)
    est = report.estimate
    assert est.dcn_bytes_per_device == pytest.approx(report.dcn_collective_bytes)
    assert est.dcn_collective_s == pytest.approx(report.dcn_collective_bytes / CHIPS["v5p"].dcn_bandwidth)
    assert est.collective_s == pytest.approx(est.ici_collective_s + est.dcn_collective_s)
    assert est.dcn_collective_s > est.ici_collective_s  # 96x slower per byte
    text = report.format()
    assert "across slices (DCN)" in text and "inside slices (ICI)" in text and "DCN" in est.summary()
    saved = json.loads(open(aot.write_report(report, str(tmp_path))).read())
    assert saved["dcn_collective_bytes"] == pytest.approx(report.dcn_collective_bytes)
    assert saved["estimate"]["dcn_collective_s"] == pytest.approx(est.dcn_collective_s)
