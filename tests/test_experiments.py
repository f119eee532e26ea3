"""The experiment configs (experiments/mm1.py, mm1_5.py, connector_ablation.py,
moe_pairs.py, clip_pods.py) and the hardware presets: every config passes `check_config`
on its preset's device count, every parameter divides over its preset's mesh,
parameter counts land where the configs document them. Nothing is compiled:
parameters are abstract (`nnx.eval_shape`), and the full-depth counts come
from the analytic helpers, which are checked against abstract params."""

import json
import math
import os
import re
import subprocess
import sys
import types

import jax
import pytest
from flax import nnx

from experiments import clip_pods, connector_ablation, mm1, mm1_5, moe_pairs
from mmjax import hardware
from mmjax.bench.topology import devices_per_chip, parse_topology
from mmjax.models.connectors import make_connector
from mmjax.models.decoder import Decoder, is_moe_layer
from mmjax.models.vit import ViT, param_count
from mmjax.parallel.mesh import MESH_AXES, resolve_mesh_shape
from mmjax.parallel.rules import get_layout, logical_to_spec
from mmjax.train.config_checks import check_config
from mmjax.train.param_counts import decoder_param_counts, param_counts

ALL_CONFIGS = ([(mm1, a) for a in mm1.SIZES] + [(mm1_5, a) for a in mm1_5.SIZES]
               + [(connector_ablation, a) for a in connector_ablation.NAMES]
               + [(moe_pairs, a) for a in moe_pairs.NAMES]
               + [(clip_pods, a) for a in clip_pods.NAMES])


def _id(case):
    module, arg = case
    return f"{module.__name__.split('.')[-1]}:{arg}"


def _variables(module):
    return jax.tree.leaves(nnx.state(module, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable))


def _shallow_modules(config):
    """Abstract ViT, connector and decoder with the configured widths but the
    fewest layers that still hold every kind of layer (one ViT block; one
    decoder layer, or one MoE period)."""
    m = config.model
    vit_cfg = m.vit.copy_and_resolve_references()
    vit_cfg.depth, vit_cfg.feature_layer = 1, -1
    dec_cfg = m.decoder.copy_and_resolve_references()
    dec_cfg.layers = dec_cfg.moe.moe_every if dec_cfg.moe.num_experts else 1
    patches = (vit_cfg.image_size // vit_cfg.patch_size) ** 2
    return nnx.eval_shape(lambda: (
        ViT(vit_cfg, rngs=nnx.Rngs(0)),
        make_connector(m.connector, vit_embed=vit_cfg.embed, num_patches=patches, embed=dec_cfg.embed,
                       rngs=nnx.Rngs(0)),
        Decoder(dec_cfg, rngs=nnx.Rngs(0))))


@pytest.mark.parametrize("case", ALL_CONFIGS, ids=_id)
def test_config_resolves_on_its_hardware(case):
    module, arg = case
    config = module.get_config(arg)
    n = hardware.num_devices(config)
    check_config(config, n)
    hw = hardware.get_hardware(config.hardware)
    assert config.topology == hw.topology and config.hardware_applied == config.hardware
    assert config.runtime.cpu_devices == (n if hw.platform == "cpu" else 0)
    # the links between model and data survive the config builders
    assert config.model.vit.image_size == config.data.image_size
    assert config.model.connector.num_tokens == config.data.tokens_per_image
    assert config.model.decoder.vocab_size == config.data.vocab_size


def _shardable(config, mesh_sizes, modules=None):
    """Every parameter of the (shallow) model divides over the mesh (LayoutError otherwise)."""
    rules = get_layout(config.rules)
    mesh = types.SimpleNamespace(shape=mesh_sizes)
    for module in modules or _shallow_modules(config):
        for v in _variables(module):
            logical_to_spec(v.get_metadata()["logical_axes"], rules, mesh, v.shape, type(module).__name__)


_DISTINCT_MODELS = [(mm1, a) for a in mm1.SIZES] + [(mm1_5, "1b-moe"), (moe_pairs, "3b-moe"), (moe_pairs, "7b-moe"),
                                                    (connector_ablation, "attention_pool-64-224")]


@pytest.mark.parametrize("case", _DISTINCT_MODELS, ids=_id)
def test_parameters_divide_over_the_default_mesh(case):
    module, arg = case
    config = module.get_config(arg)
    _shardable(config, resolve_mesh_shape(dict(config.mesh), hardware.num_devices(config)))


def test_mm1_sizes_on_every_preset():
    """3b and 3b-moe pass the checks and shard on every hardware preset."""
    modules = {size: _shallow_modules(mm1.get_config(size)) for size in ("3b", "3b-moe")}
    for name, hw in hardware.HARDWARE.items():
        for size in ("3b", "3b-moe"):
            config = mm1.get_config(f"{size},{name}")
            check_config(config, hw.devices)
            sizes = resolve_mesh_shape(dict(config.mesh), hw.devices)
            if size == "3b-moe":
                assert 64 % sizes["expert"] == 0, name
            _shardable(config, sizes, modules[size])


def test_analytic_counts_match_abstract_params():
    for module, arg in [(mm1, "smoke-3b"), (mm1, "smoke-3b-moe"), (moe_pairs, "tiny-moe"), (mm1, "3b")]:
        config = module.get_config(arg)
        counts = decoder_param_counts(config.model.decoder)
        assert param_counts(config, "decoder") == {"total": counts["total"], "active": counts["active"]}
    assert param_counts(mm1.get_config("3b"), "vit")["total"] == param_count(mm1.get_config("3b").model.vit)


def _documented_decoders() -> dict:
    """The decoder table of experiments/mm1.py's docstring:
    size -> (embed, layers, heads, kv_heads, head_dim, mlp, params)."""
    rows = {}
    for line in mm1.__doc__.splitlines():
        parts = line.split()
        if len(parts) == 8 and parts[0] in ("1b", "3b", "7b", "30b"):
            rows[parts[0]] = tuple(int(p.replace(",", "")) for p in parts[1:])
    return rows


def _dense_decoder_params(d) -> int:
    """Closed form: untied embedding and LM head, per layer GQA projections,
    SwiGLU and two RMSNorm scales, and the final norm."""
    attention = d.embed * d.head_dim * (2 * d.heads + 2 * d.kv_heads)
    return 2 * d.vocab_size * d.embed + d.layers * (attention + 3 * d.embed * d.mlp + 2 * d.embed) + d.embed


def test_decoder_sizes_follow_the_formula_and_the_documented_table():
    documented = _documented_decoders()
    assert set(documented) == {"1b", "3b", "7b", "30b"}
    for size, (embed, layers, heads, kv_heads, head_dim, mlp, params) in documented.items():
        d = mm1.get_config(size).model.decoder
        assert (d.embed, d.layers, d.heads, d.kv_heads, d.head_dim, d.mlp) == \
            (embed, layers, heads, kv_heads, head_dim, mlp), size
        counts = decoder_param_counts(d)
        assert counts["total"] == counts["active"] == _dense_decoder_params(d) == params, size
    for size in ("3b-moe", "7b-moe"):
        d = mm1.get_config(size).model.decoder
        counts = decoder_param_counts(d)
        moe_layers = sum(is_moe_layer(d, i) for i in range(d.layers))
        experts = 3 * d.embed * d.moe.expert_mlp  # one SwiGLU expert
        dense = _dense_decoder_params(d)  # every layer with a dense MLP of width d.mlp
        swap = moe_layers * (d.moe.num_experts * experts + d.embed * d.moe.num_experts - 3 * d.embed * d.mlp)
        assert counts["total"] == dense + swap, size
        assert counts["active"] == dense + moe_layers * (d.moe.top_k * experts + d.embed * d.moe.num_experts
                                                         - 3 * d.embed * d.mlp), size
        documented_line = next(line for line in mm1.__doc__.splitlines() if line.strip().startswith(size))
        assert f"{counts['total']:,} total, {counts['active']:,} active" in documented_line, size


def test_mm1_recipe():
    c = mm1.get_config("3b")
    assert (c.data.seq_len, c.data.max_images, c.data.global_batch, c.train.steps) == (4096, 16, 512, 200_000)
    assert (c.optimizer.warmup_steps, c.optimizer.min_lr_ratio) == (2000, 0.1)
    assert (c.optimizer.lr_rule, c.optimizer.weight_decay_rule, c.model.dtype) == ("mm1", "mm1", "bfloat16")
    assert tuple(c.data.mix_weights) == (5.0, 5.0, 1.0)
    assert (c.model.connector.kind, c.data.tokens_per_image) == ("c_abstractor", 144)
    assert set(c.data.sources.values()) == {"procedural"}
    assert c.hardware == "tpu-v5p-128" and mm1.get_config("3b,tpu-v5p-512").hardware == "tpu-v5p-512"
    with pytest.raises(ValueError, match="unknown"):
        mm1.get_config("4b")
    with pytest.raises(ValueError, match="hardware"):
        mm1.get_config("3b,tpu-v9-8")


def test_vit_h14_at_378():
    vit = mm1.get_config("7b").model.vit
    assert (vit.flavour, vit.image_size, vit.patch_size, vit.embed, vit.depth) == ("clip", 378, 14, 1280, 32)
    assert (vit.image_size // vit.patch_size) ** 2 == 729
    assert 620e6 < param_count(vit) < 640e6


def test_3b_moe_layout():
    c = mm1.get_config("3b-moe")
    dec = c.model.decoder
    assert (dec.moe.num_experts, dec.moe.moe_every, dec.moe.top_k, dec.moe.capacity_factor) == (64, 2, 2, 2.0)
    assert dec.moe.group_size == 1024  # 8 dispatch groups per device at 2 sequences of 4096
    assert (dec.moe.load_balance_weight, dec.moe.router_z_weight) == (0.01, 0.001)
    assert [is_moe_layer(dec, i) for i in range(dec.layers)] == [i % 2 == 1 for i in range(dec.layers)]
    assert not dec.scan  # alternating layers are listed
    # the built (abstract) decoder: 64 experts on layers 2, 4, ..., none on the others
    shallow = dec.copy_and_resolve_references()
    shallow.layers = 4
    decoder = nnx.eval_shape(lambda: Decoder(shallow, rngs=nnx.Rngs(0)))
    for i, layer in enumerate(decoder.layers.layers):
        if i % 2:
            assert layer.mlp.wi_gate.shape == (64, dec.embed, dec.moe.expert_mlp)
        else:
            assert not hasattr(layer.mlp, "wi_gate")
    c7 = mm1.get_config("7b-moe").model.decoder
    assert (c7.moe.num_experts, c7.moe.moe_every) == (32, 4)
    assert sum(is_moe_layer(c7, i) for i in range(c7.layers)) == 8
    assert resolve_mesh_shape(dict(c.mesh), hardware.num_devices(c))["expert"] == 8


def test_mm1_5_splitting_and_mix():
    for size in mm1_5.SIZES:
        c = mm1_5.get_config(size)
        assert tuple(c.data.image_split) == (4, 9) and c.data.tile_separators
        assert tuple(c.data.mix_weights) == (50.0, 10.0, 40.0)
        # at least one fully split image (9 tiles + overview) fits, with room for its separators
        assert c.data.max_images >= 10
        assert 10 * c.data.tokens_per_image + 9 * 8 < c.data.seq_len
    assert mm1_5.get_config("3b-moe").model.decoder.moe.num_experts == 64


def test_mm1_5_stages():
    """`-cpt`: the caption stream alone, same model and splitting; `-sft`: the
    conversation mixture 80:10:10 at a fixed LR, same model; both chain from
    a workdir through init_from."""
    base = mm1_5.get_config("3b")
    for stage in mm1_5.STAGES:
        c = mm1_5.get_config(f"3b-{stage}")
        assert c.model.to_json() == base.model.to_json() and tuple(c.data.image_split) == (4, 9)
        assert c.hardware == base.hardware
    cpt, sft = mm1_5.get_config("3b-cpt"), mm1_5.get_config("1b-moe-sft")
    assert tuple(cpt.data.mix_weights) == (1.0, 0.0, 0.0) and cpt.optimizer.lr_rule == "mm1"
    assert tuple(sft.data.mix_weights) == (80.0, 10.0, 10.0) and sft.model.decoder.moe.num_experts == 64
    assert (sft.optimizer.lr_rule, sft.optimizer.lr) == ("fixed", mm1_5.SFT_LR)
    assert set(sft.data.sources.values()) == {"procedural:sft"}
    with pytest.raises(ValueError, match="'3b-dpo' is unknown"):
        mm1_5.get_config("3b-dpo")


def test_connector_sweep():
    overrides = connector_ablation.sweep()
    assert len(overrides) == 12
    seen = set()
    for name, change in zip(connector_ablation.NAMES, overrides):
        c = connector_ablation.apply_overrides(connector_ablation.get_config(), change)
        n = hardware.num_devices(c)
        check_config(c, n)
        key = (c.model.connector.kind, c.model.connector.num_tokens, c.model.vit.image_size)
        assert key == (change["model.connector.kind"], change["data.tokens_per_image"], change["data.image_size"])
        assert c.to_json() == connector_ablation.get_config(name).to_json(), name
        assert math.isqrt(key[1]) ** 2 == key[1] and key[2] % c.model.vit.patch_size == 0
        seen.add(key)
    assert len(seen) == 12
    assert connector_ablation.to_flags(overrides[0])[0].startswith("--config.model.connector.kind=")


def test_documented_moe_totals_match_the_param_counts():
    """The 3b-moe / 7b-moe rows of experiments/mm1.py's docstring: decoder
    total and active, and the whole model's total beside the paper's."""
    decoder_rows, model_rows = {}, {}
    for line in mm1.__doc__.splitlines():
        parts = line.split()
        if parts and parts[0] in ("3b-moe", "7b-moe"):
            numbers = [int(n.replace(",", "")) for n in re.findall(r"\d{1,3}(?:,\d{3})+", line)]
            if "active" in parts:
                decoder_rows[parts[0]] = tuple(numbers)
            elif parts[-1].endswith("B"):
                model_rows[parts[0]] = (numbers[0], parts[-1])
    assert model_rows == {"3b-moe": (model_rows["3b-moe"][0], "64B"), "7b-moe": (model_rows["7b-moe"][0], "47B")}
    for size in ("3b-moe", "7b-moe"):
        config = mm1.get_config(size)
        counts = decoder_param_counts(config.model.decoder)
        assert decoder_rows[size] == (counts["total"], counts["active"]), size
        assert model_rows[size][0] == param_counts(config)["total"], size


def test_moe_pairs_match_active_params():
    assert moe_pairs.pairs()[0] == ("tiny-dense", "tiny-moe")
    for dense_arg, moe_arg in moe_pairs.pairs():
        dense, moe = moe_pairs.get_config(dense_arg), moe_pairs.get_config(moe_arg)
        assert dense.hardware == moe.hardware
        assert dense.model.vit.to_json() == moe.model.vit.to_json()
        d = decoder_param_counts(dense.model.decoder)
        m = decoder_param_counts(moe.model.decoder)
        assert moe.model.decoder.moe.num_experts > 0 and dense.model.decoder.moe.num_experts == 0
        assert m["total"] > 1.5 * d["total"]
        assert abs(m["active"] / d["active"] - 1) < 0.1, (dense_arg, moe_arg)
    tiny = param_counts(moe_pairs.get_config("tiny-moe"))
    tiny_dense = param_counts(moe_pairs.get_config("tiny-dense"))
    assert abs(tiny["active"] / tiny_dense["active"] - 1) < 0.1


def test_hardware_presets():
    expected = {"cpu-8", "tpu-v4-32", "tpu-v5e-256", "tpu-v5p-128", "tpu-v5p-256", "tpu-v5p-512",
                "tpu-v6e-256", "tpu-7x-256", "gpu-h100-8"}
    assert expected <= set(hardware.HARDWARE)
    for name, hw in hardware.HARDWARE.items():
        sizes = resolve_mesh_shape(hw.mesh, hw.devices)
        assert math.prod(sizes.values()) == hw.devices, name
        get_layout(hw.rules)
        assert (hw.cpu_devices > 0) == (hw.platform == "cpu")
        assert bool(hw.topology) == (hw.platform == "tpu"), name
        if hw.topology:  # "v5p:4x4x8" -> chips along each axis (a TPU7x chip is two devices)
            gen, shape = parse_topology(hw.topology)
            assert math.prod(int(x) for x in shape.split("x")) * devices_per_chip(gen) == hw.devices, name


_TOPOLOGIES = """
import json, sys
sys.path.insert(0, sys.argv[1])
from mmjax import hardware
out = {}
for name, hw in hardware.HARDWARE.items():
    if hw.topology:
        devices = hardware.topology_description(name).devices
        out[name] = [len(devices), devices[0].device_kind]
print(json.dumps(out))
"""


def test_topologies_parse():
    """Each TPU preset's topology string is accepted by get_topology_desc and
    describes the preset's devices. In a subprocess: libtpu takes a lockfile
    that other processes on the machine may hold (ALLOW_MULTIPLE_LIBTPU_LOAD)."""
    pytest.importorskip("libtpu")
    root = os.path.join(os.path.dirname(__file__), "..")
    env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", _TOPOLOGIES, root], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    described = json.loads(result.stdout.strip().splitlines()[-1])
    tpus = {name: hw for name, hw in hardware.HARDWARE.items() if hw.topology}
    assert set(described) == set(tpus)
    for name, hw in tpus.items():
        assert described[name] == [hw.devices, hw.device_kind], name


def test_hardware_flag_applies_the_preset():
    """`--config.hardware=NAME` reaches the entry points as a changed string;
    `apply_hardware_flag` (called by `mmjax.train` and `mmjax.bench.aot`)
    applies that preset."""
    from mmjax.config_base import apply_hardware_flag

    c = mm1.get_config("smoke-3b")
    apply_hardware_flag(c)  # nothing changed: nothing to do
    assert c.runtime.cpu_devices == 8 and c.hardware_applied == "cpu-8"
    c.hardware = "cpu-4"
    apply_hardware_flag(c)
    assert c.runtime.cpu_devices == 4 and c.hardware_applied == "cpu-4"
    assert {k: c.mesh[k] for k in MESH_AXES} == dict(data=2, fsdp=2, expert=1, model=1)


def test_apply_and_resolve_hardware():
    c = mm1.get_config("smoke-3b")
    assert c.runtime.cpu_devices == 8 and c.model.decoder.remat == ""
    # `--config.hardware=...` only changes the string; resolve_hardware applies the preset
    c.hardware = "tpu-v5p-256"
    assert hardware.resolve_hardware(c) == []
    assert (c.runtime.cpu_devices, c.model.decoder.remat, c.topology) == (0, "full", "v5p:4x4x8")
    assert {k: c.mesh[k] for k in MESH_AXES} == dict(data=1, fsdp=-1, expert=1, model=1)
    assert c.mesh.dcn_data == -1  # the slice counts are not the preset's
    assert c.model.decoder.attention == "splash"  # TPU presets draw the decoder's attention with the kernel
    c.model.bidirectional_image_attention = True  # the kernel draws image blocks too
    hardware.apply_hardware(c, "tpu-v5p-128")
    assert c.model.decoder.attention == "splash"
    assert hardware.apply_hardware(mm1.get_config("3b"), "gpu-h100-8").model.decoder.attention == "xla"
    assert hardware.resolve_hardware(c) == []  # nothing left to do
    # a field overridden explicitly (here mesh.data) wins over the new preset
    c = mm1.get_config("3b")
    c.lock()
    c.mesh.data = 2
    c.hardware = "tpu-v5p-512"
    assert hardware.resolve_hardware(c) == ["mesh"]
    assert c.mesh.data == 2 and c.hardware_applied == "tpu-v5p-512" and c.topology == "v5p:4x8x8"
    # MoE models get an expert axis from the preset
    c = hardware.apply_hardware(mm1.get_config("7b-moe"), "gpu-h100-8")
    assert resolve_mesh_shape(dict(c.mesh), 8) == dict(data=1, fsdp=1, expert=8, model=1)
    with pytest.raises(ValueError, match="'tpu-v9-1' is not a hardware preset"):
        hardware.apply_hardware(c, "tpu-v9-1")


def _shallow_dual_encoder(config):
    """The abstract dual encoder with its widths, one ViT block and one text layer."""
    from mmjax.models import build_model

    m = config.model.copy_and_resolve_references()
    m.vit.depth, m.decoder.layers = 1, 1
    return nnx.eval_shape(lambda: build_model(m, nnx.Rngs(0)))


def test_clip_pods_vit_h14():
    """ViT-H/14 at 224 and OpenCLIP ViT-H-14's text tower, CLIP's recipe,
    on v5p: the checks pass, every parameter divides over the fsdp mesh of
    each v5p preset, the batch over its devices, and the parameter counts are
    the documented ones."""
    from mmjax.models.vit import VARIANTS

    c = clip_pods.get_config("vit_h14")
    v, d = c.model.vit, c.model.decoder
    assert c.hardware == "tpu-v5p-256" and c.topology == "v5p:4x4x8" and c.model.name == "dual_encoder"
    assert (v.embed, v.depth, v.heads, v.mlp, v.patch_size) == VARIANTS["H/14"] == (1280, 32, 16, 5120, 14)
    assert (v.flavour, c.data.image_size, v.image_size) == ("clip", 224, 224)
    assert (d.embed, d.layers, d.heads, d.kv_heads, d.head_dim, d.mlp) == (1024, 24, 16, 16, 64, 2816)
    assert (c.data.vocab_size, d.vocab_size, c.data.seq_len) == (49408, 49408, 77)
    assert dict(c.model.contrastive) == dict(loss="clip", embed=1024, image_pool="token", text_pool="last",
                                             text_causal=True)
    assert (c.data.global_batch, c.model.dtype, v.remat, d.remat) == (32768, "bfloat16", "full", "full")
    assert d.attention == "xla" and v.scan and d.scan
    assert param_count(v) == 630_766_080
    shallow = _shallow_dual_encoder(c)
    text_layer = sum(x.size for x in _variables(shallow.text.layers))
    text = sum(x.size for x in _variables(shallow.text))
    assert d.layers * text_layer == 308_330_496  # OpenCLIP's text transformer: 302M
    assert text + (d.layers - 1) * text_layer == 358_925_312
    for name in ("tpu-v5p-128", "tpu-v5p-256", "tpu-v5p-512"):
        config = clip_pods.get_config(f"vit_h14,{name}")
        n = hardware.num_devices(config)
        check_config(config, n)
        assert config.data.global_batch % n == 0
        _shardable(config, resolve_mesh_shape(dict(config.mesh), n), [shallow])
    # `--config.hardware=NAME` keeps the text tower's XLA attention
    c.hardware = "tpu-v5p-512"
    hardware.resolve_hardware(c)
    assert c.topology == "v5p:4x8x8" and c.model.decoder.attention == "xla"
    with pytest.raises(ValueError, match="'vit_g14' is unknown"):
        clip_pods.get_config("vit_g14")

