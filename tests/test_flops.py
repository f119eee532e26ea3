"""Analytic training FLOPs against XLA's cost analysis of the real train step;
peak FLOP/s table, CPU calibration and MFU."""

import math

import jax
import numpy as np
import pytest
from conftest import small_config

from mmjax.bench.aot import abstract_batch
from mmjax.parallel import get_layout, make_mesh
from mmjax.train.flops import (
    PEAK_FLOPS_PER_DEVICE,
    calibrate_peak_flops,
    mfu,
    peak_flops_per_device,
    table_peak,
    train_flops,
)
from mmjax.train.optimizer import learning_rate_schedule, make_optimizer, trainable_mask
from mmjax.train.state import abstract_train_state, build_train_setup
from mmjax.train.step import make_train_step

# LLVM optimisation level only: the optimised HLO, and so its cost analysis,
# is unchanged, while the CPU compile is about a third faster.
COMPILE_OPTIONS = {"xla_backend_optimization_level": 0}


def dense_config():
    """Small enough to compile fast, wide enough that matmuls dominate XLA's
    count (which includes elementwise work); remat on to check its recompute."""
    c = small_config()
    c.mesh = {"data": 1, "fsdp": 1, "expert": 1, "model": 1}
    c.model.vit.update({"embed": 128, "mlp": 512, "heads": 4, "depth": 1, "remat": "full"})
    c.model.connector.hidden = 128
    c.model.decoder.update({"embed": 256, "mlp": 1024, "heads": 4, "kv_heads": 2, "head_dim": 64, "layers": 1,
                            "remat": "full"})
    c.data.seq_len = 128
    c.data.global_batch = 8
    return c


def moe_config():
    """The dense config without remat, its decoder layer a capacity-dispatch MoE."""
    c = dense_config()
    c.model.vit.remat = ""
    c.model.decoder.remat = ""
    c.model.decoder.moe.update({"num_experts": 4, "top_k": 2, "moe_every": 1, "expert_mlp": 512,
                                "capacity_factor": 2.0, "dispatch": "capacity"})
    return c


def xla_flops(c) -> float:
    """`cost_analysis()["flops"]` of the compiled train step on a one-device
    mesh (for a partitioned program XLA reports per-device FLOPs)."""
    mesh = make_mesh(dict(c.mesh), jax.devices()[:1])
    setup = build_train_setup(c, mesh, get_layout(c.rules), lambda p: make_optimizer(c.optimizer, 10, p))
    step = make_train_step(setup, learning_rate_schedule(c.optimizer, 10), c.loss.z_loss,
                           c.model.decoder.moe.load_balance_weight, c.model.decoder.moe.router_z_weight,
                           trainable=trainable_mask(c.optimizer, setup.abstract_params))
    cost = step.lower(abstract_train_state(setup), abstract_batch(c, setup)).compile(COMPILE_OPTIONS).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # a dict in current JAX
    return float(cost["flops"])


def moe_grouped_config():
    """The capacity MoE with dispatch groups of 64 tokens (several per device)."""
    c = moe_config()
    c.model.decoder.moe.group_size = 64
    return c


def frozen_vit_config():
    """The dense config with the ViT frozen (no backward pass through it)."""
    c = dense_config()
    c.optimizer.module_lr_scale = "vit=0.0"
    return c


def named_remat_config():
    """The dense config keeping, by name, the ViT's q/k/v projections and the
    decoder's projections plus attention context."""
    c = dense_config()
    c.model.vit.remat = "qkv_proj"
    c.model.decoder.remat = "attention"
    return c


@pytest.mark.parametrize("make_config", [dense_config, moe_config, moe_grouped_config, frozen_vit_config,
                                         named_remat_config],
                         ids=["dense_remat", "moe_capacity", "moe_capacity_groups", "frozen_vit", "named_remat"])
def test_hardware_flops_match_xla_cost_analysis(make_config):
    c = make_config()
    analytic = train_flops(c, num_devices=1)
    measured = xla_flops(c)
    ratio = analytic.hardware_flops / measured
    print(f"{make_config.__name__}: analytic/XLA = {ratio:.4f}\n{analytic.table()}")
    # XLA also counts elementwise work (1-2 % here), the analytic count only matmuls: within
    # 2 %, as the README says.
    assert 0.98 <= ratio <= 1.02, f"analytic/XLA = {ratio:.4f} (XLA {measured:.6g})\n{analytic.table()}"


@pytest.mark.parametrize("seq, reach", [(384, 0), (384, 129), (4096, 143)])
def test_splash_block_count_is_the_kernels_table(seq, reach):
    """The FLOPs model's key blocks for the splash kernel are the blocks its
    mask table runs (forward and dkv), causal and with image reach."""
    from mmjax.models.splash import _kernel, evaluated_blocks

    kernel = _kernel(1, seq, True, True, reach)
    for info in (kernel.fwd_mask_info, kernel.dkv_mask_info):
        assert int((np.asarray(info.block_mask) > 0).sum()) == evaluated_blocks(seq, reach)


def test_splash_with_image_blocks_counts_the_blocks_past_the_diagonal():
    c = dense_config()
    c.model.decoder.attention = "splash"
    c.data.seq_len = 1024  # two 512-token key blocks: 3 causal, 4 once an image's queries look ahead
    plain = train_flops(c, num_devices=1)
    c.model.bidirectional_image_attention = True
    images = train_flops(c, num_devices=1)
    key = "decoder/attention_scores"
    assert images.hardware_forward[key] == pytest.approx(plain.hardware_forward[key] * 4 / 3)
    assert images.forward[key] == plain.forward[key]  # the useful count is unchanged


def test_model_and_hardware_counts_differ_where_documented():
    dense = dense_config()
    f = train_flops(dense, num_devices=1)
    b, s, dec = dense.data.global_batch, dense.data.seq_len, dense.model.decoder
    t = b * s
    assert f.forward["decoder/lm_head"] == 2 * t * dec.embed * dec.vocab_size
    pairs = f.hardware_forward["decoder/attention_scores"] / f.forward["decoder/attention_scores"]
    assert pairs == pytest.approx(s * s / (s * (s + 1) / 2))  # full matrix vs causal triangle
    assert f.forward["vit/attention_scores"] == f.hardware_forward["vit/attention_scores"]  # bidirectional
    assert f.remat_flops > 0 and f.model_flops == pytest.approx(3 * f.model_forward_flops)
    no_remat = dense.copy_and_resolve_references()
    no_remat.model.vit.remat = no_remat.model.decoder.remat = ""
    g = train_flops(no_remat, num_devices=1)
    assert g.model_flops == f.model_flops and g.remat_flops == 0
    assert f.hardware_flops == pytest.approx(g.hardware_flops + f.remat_flops)
    no_remat.model.decoder.remat = "dots"
    assert train_flops(no_remat, num_devices=1).remat_flops == 0  # every matmul output is saved

    moe = moe_config()
    moe.mesh = {"data": -1, "fsdp": 1, "expert": 1, "model": 1}
    m = train_flops(moe, num_devices=8)  # 8 token groups of 128 tokens, capacity 128 each
    cfg = moe.model.decoder.moe
    assert m.forward["decoder/moe_experts"] == 6 * t * cfg.top_k * dec.embed * cfg.expert_mlp
    assert m.forward["decoder/moe_router"] == 2 * t * dec.embed * cfg.num_experts
    # capacity factor 2: expert buffers hold twice the routed tokens
    assert m.hardware_forward["decoder/moe_experts"] == pytest.approx(2 * m.forward["decoder/moe_experts"])
    assert m.forward["decoder/moe_dispatch"] == 0 < m.hardware_forward["decoder/moe_dispatch"]
    assert m.hardware_flops_per_device == m.hardware_flops / 8
    assert m.model_flops_per_device == m.model_flops / 8


def test_peak_table_resolves_device_kinds():
    for kind, peak in [("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5p", 459e12),
                       ("TPU v5", 459e12), ("TPU v6 lite", 918e12), ("TPU v6e", 918e12),
                       ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12),
                       ("NVIDIA H100 SXM5 80GB", 989e12), ("NVIDIA H200 141GB HBM3e", 989e12)]:
        assert table_peak(kind)[1] == peak, kind
    assert all(table_peak(kind)[1] == peak for kind, peak in PEAK_FLOPS_PER_DEVICE.items())
    assert table_peak("cpu") is None


def test_cpu_peak_is_calibrated_once_and_gives_mfu():
    peak, source = peak_flops_per_device(jax.devices()[0])
    assert jax.devices()[0].platform == "cpu"
    assert peak > 0 and math.isfinite(peak) and source.startswith("measured")
    assert calibrate_peak_flops("cpu") == (peak, source)  # cached: measured once per process
    assert math.isnan(peak_flops_per_device(jax.devices()[0], calibrate=False)[0])
    assert mfu(1e12, 2.0, 4, 1e12) == pytest.approx(0.125)
    assert mfu(peak * 8, 1.0, 8, peak) == pytest.approx(1.0)


def test_frozen_modules_and_missing_images_lower_the_useful_flops():
    """MFU counts no backward pass for a frozen ViT (nothing before it
    trains), input gradients only for a frozen connector behind a trainable
    ViT, and only the images present in the batch."""
    base = train_flops(dense_config(), num_devices=1)
    vit = sum(v for k, v in base.forward.items() if k.startswith("vit/"))
    connector = sum(v for k, v in base.forward.items() if k.startswith("connector/"))
    assert base.model_flops == pytest.approx(3 * base.model_forward_flops)
    frozen = train_flops(frozen_vit_config(), num_devices=1)
    assert frozen.model_flops == pytest.approx(base.model_flops - 2 * vit)  # forward only
    assert frozen.hardware_backward["vit/mlp"] == 0 and frozen.remat.get("vit/mlp", 0) == 0
    c = dense_config()
    c.optimizer.module_lr_scale = "connector=0.0"
    behind = train_flops(c, num_devices=1)
    assert behind.model_flops == pytest.approx(base.model_flops - connector)  # forward + input gradients
    # Half the image slots empty: the image side's useful work halves, the text side's does not.
    half = base.images_per_step / 2
    assert base.model_flops_at(half) == pytest.approx(base.model_flops - 1.5 * (vit + connector))
    assert frozen.model_flops_at(half) == pytest.approx(frozen.model_flops - 0.5 * vit - 1.5 * connector)
    assert base.model_flops_at(base.images_per_step) == base.model_flops


def test_every_remat_policy_has_a_recompute_rule_and_named_ones_recompute_less():
    from mmjax.models.stack import REMAT_POLICIES
    from mmjax.train.flops import _SAVED_BY_POLICY

    assert set(_SAVED_BY_POLICY) == {""} | set(REMAT_POLICIES)
    c = dense_config()
    remat = {}
    for policy in ("full", "qkv_proj", "attention", "attention_offload", "dots"):
        c.model.vit.remat = c.model.decoder.remat = policy
        remat[policy] = train_flops(c, num_devices=1).remat
    full, qkv, attention = remat["full"], remat["qkv_proj"], remat["attention"]
    d = c.model.decoder
    b, s = c.data.global_batch, c.data.seq_len
    qkv_proj = 2.0 * b * s * d.embed * (d.heads + 2 * d.kv_heads) * d.head_dim
    assert full["decoder/attention_proj"] - qkv["decoder/attention_proj"] == pytest.approx(qkv_proj)
    assert qkv["decoder/attention_scores"] == full["decoder/attention_scores"]
    # a kept context spares the values' matmul, not q k^T (the softmax's backward needs it)
    assert attention["decoder/attention_scores"] == pytest.approx(full["decoder/attention_scores"] / 2)
    assert attention["decoder/mlp"] == full["decoder/mlp"] > 0
    assert remat["attention_offload"] == attention and sum(remat["dots"].values()) == 0


# ------------------------------------------------------------ dual encoder


def dual_config(loss: str = "clip"):
    """A dual encoder on one device, towers wide enough that matmuls dominate
    XLA's count; remat on in both stacks. `clip`: class-token pooling, causal
    text; `siglip`: MAP-head pooling, bidirectional text, mean text pool."""
    from experiments.clip_tiny import get_config

    c = get_config(loss)
    c.mesh = {"data": 1, "fsdp": 1, "expert": 1, "model": 1}
    c.model.vit.update(embed=128, mlp=512, heads=4, depth=1, remat="full")
    if loss == "siglip":
        c.model.vit.map_head = True
        c.model.contrastive.update(image_pool="token", text_causal=False, text_pool="mean")
    c.model.decoder.update(embed=256, mlp=1024, heads=4, kv_heads=2, head_dim=64, layers=1, remat="full")
    c.model.contrastive.embed = 128
    c.data.seq_len = 64
    c.data.global_batch = 16
    return c


def mofi_alone_config():
    """MOFI's entity head on the dual encoder's image side alone (no text
    tower: `mofi.contrastive_weight=0`), a wider ViT. (A head of many labels
    on few images is dominated by the optimizer's per-parameter work, which
    XLA counts and the analytic count does not: 256 labels here.)"""
    c = dual_config("clip")
    c.model.vit.update(embed=256, mlp=1024)
    c.model.mofi.update(num_labels=256, classification_weight=1.0, contrastive_weight=0.0)
    return c


def vision_moe_classifier_config():
    """experiments/vmoe_tiny.py's Mobile V-MoE classifier on one device,
    widened: 4 experts, top-2 per image, capacity factor 1, 1000 classes."""
    from experiments.vmoe_tiny import get_config

    c = get_config("moe")
    c.mesh = {"data": 1, "fsdp": 1, "expert": 1, "model": 1}
    c.data.image_size = 32
    c.data.global_batch = 16
    c.model.vit.update(patch_size=4, embed=256, mlp=1024, heads=4, depth=2, remat="full")
    c.model.vit.moe.update(num_experts=4, top_k=2, expert_mlp=1024, capacity_factor=1.0)
    c.model.classifier.num_classes = 1000
    return c


def dual_pairs_heavy_config(joint_embed: int, locked_image: bool):
    """Many pairs through small towers, so the `[B, B]` similarity and the
    projections are a large share of the step; with `locked_image` the image
    side is frozen (locked-image tuning): neither the ViT nor the
    similarity's image gradient runs backward."""
    c = dual_config("clip")
    c.model.vit.update(embed=32, mlp=128, heads=2, remat="")
    c.model.decoder.update(embed=64, mlp=256, heads=2, kv_heads=2, head_dim=32, remat="")
    c.model.contrastive.embed = joint_embed
    c.data.image_size = 8
    c.data.seq_len = 8
    c.data.global_batch = 512
    c.optimizer.module_lr_scale = "vit=0.0,image_projection=0.0" if locked_image else ""
    return c


def dual_xla_flops(c) -> float:
    """XLA's FLOPs of the step `train()` builds (contrastive loss) on one device."""
    from mmjax.train.loop import build_step

    mesh = make_mesh(dict(c.mesh), jax.devices()[:1])
    setup, step = build_step(c, mesh, get_layout(c.rules))
    cost = step.lower(abstract_train_state(setup), abstract_batch(c, setup)).compile(COMPILE_OPTIONS).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


@pytest.mark.parametrize("make_config", [lambda: dual_config("clip"), lambda: dual_config("siglip"),
                                         mofi_alone_config, vision_moe_classifier_config],
                         ids=["clip_token_causal", "siglip_map_bidirectional", "mofi_entity_head_alone",
                              "classifier_vision_moe"])
def test_pair_models_flops_match_xla_cost_analysis(make_config):
    """The dual encoder (CLIP, SigLIP, MOFI's entity head without a text
    tower) and the Mobile V-MoE image classifier (capacity dispatch per
    image) against XLA's count of the step `train()` runs."""
    c = make_config()
    analytic = train_flops(c, num_devices=1)
    measured = dual_xla_flops(c)
    ratio = analytic.hardware_flops / measured
    print(f"analytic/XLA = {ratio:.4f}\n{analytic.table()}")
    assert 0.98 <= ratio <= 1.02, f"analytic/XLA = {ratio:.4f} (XLA {measured:.6g})\n{analytic.table()}"


@pytest.mark.parametrize("locked_image", [False, True], ids=["both_towers", "locked_image"])
def test_similarity_and_projections_match_xla_by_difference(locked_image):
    """Doubling joint_embed adds only the similarity's and the projections'
    work (elementwise work of small towers, several percent of XLA's count
    here, cancels): the analytic and XLA differences agree within 1 %."""
    small, large = (dual_pairs_heavy_config(d, locked_image) for d in (512, 1024))
    analytic = train_flops(large, num_devices=1).hardware_flops - train_flops(small, num_devices=1).hardware_flops
    measured = dual_xla_flops(large) - dual_xla_flops(small)
    b = small.data.global_batch
    similarity = 2 * b * b * 512 * (2 if locked_image else 3)  # forward + the trained sides' gradients
    assert analytic > similarity  # the similarity dominates the difference
    assert analytic / measured == pytest.approx(1.0, abs=0.01), (analytic, measured)


def test_dual_encoder_counts_each_part_by_hand():
    """The ViT-H/14 CLIP pre-training config: the image tower (all 32 blocks
    on 257 tokens), the text tower's causal attention pairs and no lm_head,
    the projections and the `[B, B]` similarity, 3 passes each; the
    objective (not the name) picks the count."""
    from experiments import clip_pods

    c = clip_pods.get_config("vit_h14")
    b, s, d = c.data.global_batch, c.data.seq_len, c.model.contrastive.embed
    vit, dec = c.model.vit, c.model.decoder
    f = train_flops(c, num_devices=128)
    assert (f.tokens_per_step, f.images_per_step) == (b * s, b)
    assert f.forward["similarity/logits"] == 2 * b * b * d
    assert f.hardware_backward["similarity/logits"] == 2 * f.forward["similarity/logits"]
    assert f.forward["image_projection/dense"] == 2 * b * vit.embed * d
    assert f.forward["text_projection/dense"] == 2 * b * dec.embed * d
    tokens, e, m = 257, vit.embed, vit.mlp
    vit_block = 2 * tokens * e * (4 * e + 2 * m) + 2 * 2 * tokens * tokens * e
    vit_total = b * (2 * 256 * 14 * 14 * 3 * e + 32 * vit_block)
    assert sum(v for k, v in f.forward.items() if k.startswith("vit/")) == pytest.approx(vit_total)
    pairs = s * (s + 1) / 2  # causal: the lower triangle with its diagonal
    scores = f.forward["text/attention_scores"]
    assert scores == pytest.approx(dec.layers * 2 * 2 * b * dec.heads * dec.head_dim * pairs)
    assert f.hardware_forward["text/attention_scores"] / scores == pytest.approx(s * s / pairs)  # XLA: all pairs
    assert not any(k.endswith("lm_head") for k in f.forward)
    assert f.model_flops == pytest.approx(3 * f.model_forward_flops)
    # bidirectional text: every pair is useful
    c.model.contrastive.text_causal = False
    g = train_flops(c, num_devices=128)
    assert g.forward["text/attention_scores"] == pytest.approx(f.forward["text/attention_scores"] * s * s / pairs)
    # locked image: no backward through the image side; the similarity differentiates the text only
    c.optimizer.module_lr_scale = "vit=0.0,image_projection=0.0"
    lit = train_flops(c, num_devices=128)
    image_side = sum(v for k, v in g.forward.items() if k.startswith(("vit/", "image_projection/")))
    assert lit.model_flops == pytest.approx(g.model_flops - 2 * image_side)
    assert lit.hardware_backward["similarity/logits"] == f.forward["similarity/logits"]
    assert lit.hardware_backward["vit/mlp"] == 0 and lit.remat["vit/mlp"] == 0
    # MOFI: an entity head on the projected image; without a text tower no text side, no similarity
    c.optimizer.module_lr_scale = ""
    c.model.mofi.update(num_labels=100_000, classification_weight=1.0, contrastive_weight=0.0)
    mofi = train_flops(c, num_devices=128)
    assert mofi.forward["entity_head/logits"] == 2 * b * d * 100_000
    assert mofi.hardware_backward["entity_head/logits"] == 2 * mofi.forward["entity_head/logits"]
    assert not any(k.startswith(("text", "similarity")) for k in mofi.forward) and mofi.tokens_per_step == 0
    # the same towers as a next-token model count MM1's way (a decoder with an lm_head)
    c.model.name = "mm1"
    assert "decoder/lm_head" in train_flops(c, num_devices=128).forward


def test_a_model_with_an_objective_without_a_count_is_refused(monkeypatch):
    import dataclasses

    from mmjax.models import registry

    spec = registry.MODELS["dual_encoder"]
    monkeypatch.setitem(registry.MODELS, "dual_encoder", dataclasses.replace(spec, objective="masked_tokens"))
    with pytest.raises(ValueError, match="no FLOPs count for objective 'masked_tokens' of model 'dual_encoder'"):
        train_flops(dual_config(), num_devices=1)
