"""Ahead-of-time compilation for a TPU slice on this CPU-only machine
(libtpu describes the slice): memory and fit, FLOPs against the analytic
count, collectives against the FSDP minimum, the step-time estimate, the
one-sentence errors and the command line."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
from conftest import small_config

from mmjax.bench import aot, topology
from mmjax.bench.estimate import CHIPS, chip_spec, estimate_step_time
from mmjax.bench.fsdp_analytic import fsdp_collective_breakdown
from mmjax.bench.hlo_collectives import collective_stats
from mmjax.train.flops import train_flops

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu (jax[tpu]) is not installed")
ROOT = os.path.join(os.path.dirname(__file__), "..")


def fsdp_config():
    """Pure FSDP over 4 chips with whole-layer remat (as the TPU presets run),
    and a decoder whose MLP weights dominate the parameters."""
    c = small_config()
    c.mesh = dict(data=1, fsdp=4, expert=1, model=1)
    c.model.decoder.layers = 2
    c.model.decoder.mlp = 2048
    c.model.vit.remat = "full"
    c.model.decoder.remat = "full"
    return c


@pytest.fixture(scope="module")
def report():
    return aot.compile_for_topology(fsdp_config(), "v5p:2x2x1")


@needs_libtpu
def test_tiny_fsdp_step_on_v5p(report, tmp_path):
    c = fsdp_config()
    assert report.num_devices == 4 and report.device_kind == "TPU v5" and report.generation == "v5p"
    assert report.mesh == {"data": 1, "fsdp": 4, "expert": 1, "model": 1}
    assert report.fits and 0 < report.peak_bytes < 0.1 * report.hbm_bytes
    assert report.peak_bytes == (report.argument_bytes + report.output_bytes + report.temp_bytes
                                 - report.alias_bytes)
    assert report.hbm_bytes == 95 * 2**30
    # The compiled FLOPs (per device) match the analytic count of what runs.
    analytic = train_flops(c, 4).hardware_flops_per_device
    assert report.analytic_flops == pytest.approx(analytic)
    assert report.flops == pytest.approx(analytic, rel=0.15)
    # Gathers, gradient reduce-scatters: the FSDP traffic, about its analytic minimum.
    counts = report.collective_counts
    assert counts["all-gather"] > 0 and counts["reduce-scatter"] > 0
    assert report.fsdp_analytic.sharded_param_bytes > 0.9 * report.fsdp_analytic.param_bytes
    assert report.collective_ratio == pytest.approx(1.0, abs=0.10)
    assert report.fsdp_analytic == fsdp_collective_breakdown(c, report.mesh)  # config path agrees
    est = report.estimate
    assert est.step_s >= est.overlapped_s > 0 and est.chip == CHIPS["v5p"]
    assert est.step_s == pytest.approx(max(est.compute_s, est.memory_s) + est.collective_s)
    with open(aot.write_report(report, str(tmp_path))) as f:
        saved = json.load(f)
    assert saved["fits"] is True and saved["estimate"]["label"] == "estimate (not measured)"
    assert saved["collective_ratio"] == pytest.approx(report.collective_ratio)
    assert "peak" in report.format() and "ESTIMATE" in report.format()
    # Estimated MFU: the useful FLOPs (all image slots filled here) over the estimate and peak.
    useful = train_flops(c, 4).model_flops / 4
    assert report.image_fill == 1.0 and report.model_flops_per_device == pytest.approx(useful)
    assert report.estimated_mfu == pytest.approx(useful / est.step_s / CHIPS["v5p"].peak_flops)
    assert 0 < report.estimated_mfu <= report.estimated_mfu_overlapped
    assert f"ESTIMATED MFU {report.estimated_mfu:.1%}" in report.format()


@needs_libtpu
def test_small_config_compiles_for_tpu7x():
    """The newest generation libtpu knows: a TPU7x chip is two devices, so the
    data=2 x fsdp=2 x expert=2 mesh fills a 2x2x1 slice of 4 chips; its
    figures come from the TPU7x rows of the chip and peak tables."""
    c = small_config()
    c.model.dtype = "bfloat16"
    r = aot.compile_for_topology(c, "v7x:2x2x1")
    assert r.num_devices == 8 and r.device_kind == "TPU7x" and r.generation == "tpu7x"
    assert r.mesh == {"data": 2, "fsdp": 2, "expert": 2, "model": 1}
    assert r.fits and r.hbm_bytes == CHIPS["tpu7x"].hbm_bytes == 96 * 10**9
    assert r.estimate.chip.peak_flops == 1153.5e12 and r.estimate.step_s > 0
    assert r.flops == pytest.approx(r.analytic_flops, rel=0.15)
    assert sum(r.precision["dot_flops"].values()) > 0
    assert "matmul FLOPs by operand dtypes: bf16,bf16->bf16" in r.format()


def test_fsdp_analytic_counts_only_each_devices_expert_slice():
    from experiments.tiny_moe import get_config

    c = get_config()  # 8 experts of [128, 256] (gate, up) and [256, 128] (down) on 1 of 2 decoder layers
    expert_elements = 3 * 8 * 128 * 256
    one = fsdp_collective_breakdown(c, {"fsdp": 2})
    two = fsdp_collective_breakdown(c, {"fsdp": 2, "expert": 2})
    # fsdp=2: every device gathers half of each weight twice (bf16), reduce-scatters half (float32);
    # expert=2 halves what an fsdp pair gathers of the expert weights, and there are 2x the batch
    # shards, so replicated weights' all-reduce grows.
    halved = expert_elements / 2  # elements no longer in a device's slice
    assert one.all_gather_bytes - two.all_gather_bytes == pytest.approx(2 * halved * 2 * (2 - 1) / 2)
    assert one.reduce_scatter_bytes - two.reduce_scatter_bytes == pytest.approx(halved * 4 * (2 - 1) / 2)
    assert two.param_bytes == one.param_bytes and two.all_reduce_bytes > one.all_reduce_bytes


@needs_libtpu
def test_capacity_dispatch_exchanges_tokens_with_all_to_alls():
    """Expert parallelism over 2 of 4 v5p chips: the capacity dispatch moves
    tokens between group- and expert-sharded buffers with all-to-alls; the
    dispatch and combine einsums themselves need no collective (GSPMD would
    otherwise all-gather and all-reduce whole expert buffers there)."""
    from experiments.tiny_moe import get_config
    from mmjax.models.moe import capacity, dispatch_groups

    c = get_config()
    c.mesh = dict(data=1, fsdp=2, expert=2, model=1)
    r = aot.compile_for_topology(c, "v5p:2x2x1")
    sources = collective_stats(r.hlo_text, 4, top=None).largest
    exchange = [s for s in sources if "gsec," in s["op_name"]]
    assert exchange == [], exchange
    # 2048 tokens in groups (dispatch_groups) of `group_size` over 4 batch shards,
    # capacity C per group: a device holds [8, G / 4, C, 128] of the [E, G, C, M]
    # buffer and receives half of it per exchange, in bf16 (XLA moves the
    # default-precision matmuls' bf16 conversion ahead of the exchange).
    # Forward: into and out of the experts; backward: their transposes.
    # Nothing else crosses devices for the dispatch.
    groups = dispatch_groups(2048, 4, c.model.decoder.moe.group_size)
    cap = capacity(2048 // groups, 2, 8, 2.0)
    assert r.collective_counts["all-to-all"] == 4
    assert r.collective_bytes_by_kind["all-to-all"] == pytest.approx(4 * 8 * (groups // 4) * cap * 128 * 2 / 2)


@needs_libtpu
def test_dropless_sends_only_routed_rows_with_ragged_all_to_alls():
    """Dropless with expert parallelism over 2 of 4 v5p chips: the tokens
    travel by ragged all-to-all (to the experts and back, and the two
    transposes in the backward pass), the expert matmuls run as megablox
    kernels (three forward; three gmm and three tgmm backward), and nothing
    gathers the tokens of the peers any more. Bytes: the device's routed
    rows (tokens x top_k x embed, float32), half of them to the other shard."""
    from experiments.tiny_moe import get_config

    c = get_config()
    c.mesh = dict(data=1, fsdp=2, expert=2, model=1)
    c.model.decoder.moe.dispatch = "dropless"
    c.model.decoder.moe.grouped_matmul = "megablox"
    c.model.decoder.moe.dropless_buffer_factor = 0.0  # the worst-case receive buffer
    r = aot.compile_for_topology(c, "v5p:2x2x1")
    assert r.hlo_text.count("ragged-all-to-all-start(") == 4  # one MoE layer
    assert r.hlo_text.count('custom_call_target="tpu_custom_call"') == 9
    moe = [s for s in collective_stats(r.hlo_text, 4, top=None).largest if "shard_map" in s["op_name"]]
    big = [s for s in moe if s["bytes"] > 1024]  # beyond the per-peer row counts
    assert big and all(s["op_name"].endswith("/ragged_all_to_all") for s in big), big
    rows = c.data.global_batch * c.data.seq_len // 4 * c.model.decoder.moe.top_k
    assert {s["bytes"] for s in big} == {rows * c.model.decoder.embed * 4 / 2}
    # the kernels' work reaches the estimate through the analytic count, and the report says so
    assert any("9 Pallas kernel call site(s)" in note for note in r.notes)
    assert r.estimate.compute_s == pytest.approx(r.analytic_flops / CHIPS["v5p"].peak_flops)
    # the kernels' own estimates: 9 grouped matmuls of 2 x rows x 128 x 256 over the worst-case buffer
    buffer = 2 * rows
    assert r.kernels["megablox"]["calls"] == 9
    assert r.kernels["megablox"]["flops"] == 9 * 2 * buffer * 128 * 256


@needs_libtpu
@pytest.mark.slow  # an ahead-of-time compile
def test_a_bounded_receive_buffer_shapes_the_kernels():
    """`moe.dropless_buffer_factor=1`: each expert shard's buffer holds its fair
    share of rows (tokens x top_k) instead of the worst case (x 2 shards):
    the megablox kernels' own FLOP estimates halve, and the analytic count
    charges whole 512-row tiles plus one revisit per expert boundary."""
    from experiments.tiny_moe import get_config
    from mmjax.models.moe_dropless import megablox_rows_computed

    c = get_config()
    c.mesh = dict(data=1, fsdp=2, expert=2, model=1)
    c.model.decoder.moe.update(dispatch="dropless", grouped_matmul="megablox", dropless_buffer_factor=1.0)
    r = aot.compile_for_topology(c, "v5p:2x2x1")
    rows = c.data.global_batch * c.data.seq_len // 4 * c.model.decoder.moe.top_k
    assert r.hlo_text.count("ragged-all-to-all-start(") == 4
    assert r.kernels["megablox"]["flops"] == 9 * 2 * rows * 128 * 256
    computed = megablox_rows_computed(rows, rows, c.model.decoder.moe.num_experts // 2, 128, 256)
    assert computed == (rows // 512 + 3) * 512  # 4 experts per shard: 3 boundaries
    assert r.kernels["megablox"]["analytic_flops"] == pytest.approx(9 * 2 * computed * 128 * 256,
                                                                    rel=1e-6)


def _region_config():
    c = small_config()
    c.model.region_sampler.enabled = True
    c.data.max_regions = 2
    return c


def _pair_config():
    from experiments.clip_tiny import get_config

    c = get_config("clip")
    c.data.global_batch = 8
    return c


def _mofi_config():
    from experiments.clip_tiny import get_config

    c = get_config("mofi")  # reads entity_ids [b, max_entities]
    c.data.global_batch = 8
    return c


def _classifier_config():
    from experiments.vmoe_tiny import get_config

    c = get_config("moe")  # reads class_id and superclass_id [b]
    c.data.global_batch = 8
    return c


@pytest.mark.parametrize("make_config", [_pair_config, _mofi_config, _classifier_config, small_config,
                                         _region_config],
                         ids=["pairs", "pairs_mofi", "pairs_classifier", "packed", "regions"])
def test_abstract_batch_has_the_pipelines_shapes_and_dtypes(make_config):
    """What the AOT compile lowers with is what training feeds: every step
    input of one real batch (pair batches for a contrastive model: uint8
    `image`, no targets or loss mask) has the abstract batch's shape and dtype."""
    import collections
    import types

    from mmjax.data.pipeline import default_tokenizer
    from mmjax.train.loop import make_train_dataset
    from mmjax.train.state import step_inputs

    c = make_config()
    batch = next(iter(make_train_dataset(c, default_tokenizer(c.data), batch_size=c.data.global_batch,
                                         process_index=0, process_count=1)))
    setup = types.SimpleNamespace(batch_shardings=collections.defaultdict(lambda: None))
    abstract = aot.abstract_batch(c, setup)
    assert list(abstract) == list(step_inputs(c))
    for name, spec in abstract.items():
        assert (spec.shape, spec.dtype) == (batch[name].shape, batch[name].dtype), name
    if make_config is _pair_config:
        assert abstract["image"].dtype == "uint8" and not {"targets", "loss_mask"} & set(abstract)


def dual_encoder_config():
    """experiments/clip_pods.py's smoke dual encoder (CLIP loss, bf16), one
    layer per tower, fully sharded over 4 chips, whole-layer remat."""
    from experiments import clip_pods

    c = clip_pods.get_config("smoke")
    c.mesh = dict(data=1, fsdp=4, expert=1, model=1)
    c.model.vit.update(depth=1, remat="full")
    c.model.decoder.update(layers=1, remat="full")
    return c


@needs_libtpu
def test_dual_encoder_step_compiles_for_v5p():
    """A contrastive model through the whole AOT path: its pair batch
    (uint8 images, no targets or loss mask) compiles for 4 v5p chips; the
    FLOPs are the dual encoder's, every image slot counts as filled."""
    c = dual_encoder_config()
    fill = aot._image_fill("auto", c)  # no packed image slots: nothing to measure
    r = aot.compile_for_topology(c, "v5p:2x2x1", image_fill=fill)
    f = train_flops(c, 4)
    assert fill == 1.0 and r.num_devices == 4 and r.mesh == {"data": 1, "fsdp": 4, "expert": 1, "model": 1}
    assert r.fits and 0 < r.peak_bytes < 0.01 * r.hbm_bytes
    assert r.analytic_flops == pytest.approx(f.hardware_flops_per_device)
    assert "similarity/logits" in f.forward and not any(k.startswith("decoder/") for k in f.forward)
    assert r.flops == pytest.approx(r.analytic_flops, rel=0.15)
    assert r.model_flops_per_device == pytest.approx(f.model_flops / 4)
    assert 0 < r.estimated_mfu <= r.estimated_mfu_overlapped and r.estimate.step_s > 0
    b, t = c.data.global_batch // 4, c.data.image_size  # each chip's rows of the batch
    entry = r.hlo_text[r.hlo_text.index("ENTRY"):].split("\n", 1)[0]
    assert f"u8[{b},{t},{t},3]" in entry and f"s32[{b},{c.data.seq_len}]" in entry
    assert "ESTIMATE" in r.format() and "ESTIMATED MFU" in r.format()


def test_a_step_that_cannot_fit_is_refused_in_one_sentence():
    class Lowered:
        def compile(self):
            raise RuntimeError("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total "
                               "memory required for HLO temporaries (132.11G) exceeds available HBM (95.73G).")

    with pytest.raises(aot.DoesNotFit, match=r"needs 132.11 GiB .* on v5p:4x4x4, which has 95.73 GiB") as err:
        aot._compile(Lowered(), "v5p:4x4x4")
    assert err.value.needed_bytes == pytest.approx(132.11 * 2**30)


def test_topology_strings():
    accepted = {"v5p:4x4x8": ("v5p", "4x4x8"), "TPU v5:2x2x1": ("v5p", "2x2x1"), "v4:2x2x1": ("v4", "2x2x1"),
                "v5e:2x2": ("v5e", "2x2"), "v5litepod:4x4": ("v5e", "4x4"), "TPU v5 lite:2x2": ("v5e", "2x2"),
                "v6e:16x16": ("v6e", "16x16"), "trillium:4x4": ("v6e", "4x4"),
                "tpu7x:2x2x1": ("tpu7x", "2x2x1"), "v7x:4x4x4": ("tpu7x", "4x4x4"),
                "TPU7x:2x2x2": ("tpu7x", "2x2x2"), "ironwood:2x2x1": ("tpu7x", "2x2x1")}
    for name, parsed in accepted.items():
        assert topology.parse_topology(name) == parsed
    for bad in ("v5p-8", "bogus", "v3:2x2", "tpu7x-8", "v5p"):
        with pytest.raises(topology.TopologyError) as err:
            topology.parse_topology(bad)
        message = str(err.value)
        assert repr(bad) in message and message.endswith(".") and ". " not in message


@needs_libtpu
def test_topology_devices_and_one_sentence_errors():
    assert [(g, len(d), d[0].device_kind) for g, d in map(topology.topology_devices, ("v4:2x2x1", "v5e:1x1"))] == [
        ("v4", 4, "TPU v4"), ("v5e", 1, "TPU v5 lite")]  # v4: one device per chip (megacore)
    c = small_config()  # data=2 x fsdp=2 x expert=2: 8 devices
    with pytest.raises(topology.TopologyError, match=r"needs 8 devices but 4 are available on topology 'v5p:2x2x1'\.$"):
        aot.compile_for_topology(c, "v5p:2x2x1")
    with pytest.raises(topology.TopologyError, match=r"^topology 'v5p:3x3x3' cannot be built by libtpu \(.*\)\.$"):
        aot.compile_for_topology(c, "v5p:3x3x3")
    with pytest.raises(topology.TopologyError, match="not GENERATION:SHAPE"):
        aot.compile_for_topology(c, "v5p-8")


HLO = """HloModule synthetic

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

%all-reduce-scatter.1 (input: f32[64,128]) -> f32[16,128] {
  %input = f32[64,128]{1,0} parameter(0)
  %all-reduce.1 = f32[64,128]{1,0} all-reduce(%input), replica_groups={{0,1,2,3}}, to_apply=%add
  ROOT %slice = f32[16,128]{1,0} dynamic-slice(%all-reduce.1, %c, %c), dynamic_slice_sizes={16,128}
}

%cond (p: (s32[], bf16[8,256])) -> pred[] {
  %p = (s32[], bf16[8,256]) parameter(0)
  %n = s32[] constant(6)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (p.1: (s32[], bf16[8,256])) -> (s32[], bf16[8,256]) {
  %p.1 = (s32[], bf16[8,256]) parameter(0)
  %w = bf16[8,256]{1,0} get-tuple-element(%p.1), index=1
  %ag = bf16[32,256]{1,0} all-gather(%w), replica_groups=[1,4]<=[4], dimensions={0}
  ROOT %t = (s32[], bf16[8,256]) tuple(%i.1, %w)
}

ENTRY %main (a: f32[64,128], b: bf16[8,256], c: f32[1024]) -> f32[16,128] {
  %a = f32[64,128]{1,0} parameter(0)
  %b = bf16[8,256]{1,0} parameter(1)
  %c = f32[1024]{0} parameter(2)
  %zero = s32[] constant(0)
  %init = (s32[], bf16[8,256]) tuple(%zero, %b)
  %loop = (s32[], bf16[8,256]) while(%init), condition=%cond, body=%body
  %ags = ((bf16[8,256]), bf16[32,256]) all-gather-start(%b), replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}
  %agd = bf16[32,256]{1,0} all-gather-done(%ags)
  %ar = f32[1024]{0} all-reduce(%c), replica_groups={}, to_apply=%add
  %cp = f32[1024]{0} collective-permute(%c), source_target_pairs={{0,1},{1,2},{2,3},{3,0}}
  %zeros = f32[4096]{0} broadcast(%zero), dimensions={}
  %padded = f32[4096]{0} dynamic-update-slice(%zeros, %c, %zero)
  %gathered = f32[4096]{0} all-reduce(%padded), replica_groups=[2,4]<=[8], to_apply=%add
  ROOT %rs = f32[16,128]{1,0} fusion(%a), kind=kCustom, calls=%all-reduce-scatter.1
}
"""


def test_collective_parser_conventions():
    stats = collective_stats(HLO, num_devices=8)
    shard = 8 * 256 * 2  # one bf16[8,256] operand
    assert stats.loops == [("loop", 6)]
    assert stats.counts == {"all-gather": 6 + 1, "reduce-scatter": 1, "all-reduce": 2, "all-to-all": 0,
                            "collective-permute": 1}
    got = stats.bytes_by_kind
    assert got["all-gather"] == pytest.approx(7 * shard * 3)            # (g - 1) shards each, g = 4
    assert got["reduce-scatter"] == pytest.approx(64 * 128 * 4 * 3 / 4)  # input x (g - 1) / g
    # Empty replica groups: all 8 devices; an all-gather run as an all-reduce costs an all-reduce.
    assert got["all-reduce"] == pytest.approx(2 * 1024 * 4 * 7 / 8 + 2 * 4096 * 4 * 3 / 4)
    assert stats.gathers_as_all_reduce == 1
    assert stats.gathers_as_all_reduce_bytes == pytest.approx(2 * 4096 * 4 * 3 / 4)
    assert got["collective-permute"] == pytest.approx(1024 * 4)
    assert stats.shape_bytes_by_kind["all-gather"] == pytest.approx(7 * 4 * shard)
    assert stats.collective_bytes == pytest.approx(sum(got.values()))


def test_estimate_arithmetic():
    chip = chip_spec("TPU v5")
    assert chip is CHIPS["v5p"] and chip.ici_bandwidth == 6e11 and chip.peak_flops == 459e12
    est = estimate_step_time(459e12, 2.765e12 / 2, 6e11 / 4, "v5p")
    assert (est.compute_s, est.memory_s, est.collective_s) == pytest.approx((1.0, 0.5, 0.25))
    assert est.step_s == pytest.approx(1.25) and est.overlapped_s == pytest.approx(1.0)
    assert est.bound == "compute" and not est.notes
    assert estimate_step_time(1, 1, 1, "v6e", num_slices=2).notes
    assert math.isclose(CHIPS["v5e"].hbm_bytes, 16 * 2**30)


def test_cli_help_exits_zero():
    out = subprocess.run([sys.executable, "-m", "mmjax.bench.aot", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--topology" in out.stdout and "peak_bytes = argument + output + temp - alias" in out.stdout


def test_image_fill_is_measured_on_the_configs_data_or_given():
    from mmjax.bench.image_fill import measured_image_fill
    from mmjax.errors import ConfigError

    c = small_config()
    fill, sentence = measured_image_fill(c, sequences=8, batch_size=4)
    assert 0.0 < fill <= 1.0 and "image slots filled" in sentence
    assert aot._image_fill("0.5", c) == 0.5
    with pytest.raises(ConfigError, match="--image_fill='lots'"):
        aot._image_fill("lots", c)
    with pytest.raises(ConfigError, match="--image_fill='1.5'"):
        aot._image_fill("1.5", c)
