"""Mixed precision: a bfloat16 step runs its matmuls on bfloat16 operands
(forward and backward, attention included), float32 weights are cast once per
step, and bfloat16 training follows the float32 loss curve."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import small_config
from flax import nnx

from mmjax.bench.harness import first_batch
from mmjax.bench.hlo_precision import analyse_precision
from mmjax.data.pipeline import default_tokenizer, make_dataset, to_global_arrays
from mmjax.models.attention import dot_product_attention, einsum_f32_accumulate
from mmjax.models.layers import Conv2D, Dense
from mmjax.models.moe import MoEFeedForward
from mmjax.models.precision import cast_weights_once
from mmjax.models.vit import ViT
from mmjax.parallel import get_layout, make_mesh
from mmjax.train.loop import build_step
from mmjax.train.state import init_train_state


def _config(dtype: str, steps: int = 12):
    c = small_config(steps)
    c.model.dtype = dtype
    c.model.decoder.layers = 2
    c.model.decoder.scan = True
    c.model.decoder.remat = "full"
    c.optimizer.lr = 3e-3
    c.optimizer.warmup_steps = 2
    return c


def _lowered_step(c):
    setup, step = build_step(c, make_mesh(dict(c.mesh)), get_layout(c.rules))
    local = first_batch(c)
    batch = to_global_arrays({k: local[k] for k in setup.batch_shardings}, setup.batch_shardings)
    state = init_train_state(c, setup)
    return setup, step.lower(state, batch), state


@pytest.fixture(scope="module")
def lowered():
    return {dtype: _lowered_step(_config(dtype)) for dtype in ("bfloat16", "float32")}


def test_bf16_step_asks_for_every_matmul_on_bf16_operands(lowered):
    """The bf16 train step as mmjax emits it (ViT, C-Abstractor, scanned and
    rematerialised decoder, forward and backward) has every dot and
    convolution on bfloat16 operands; the float32 step's are float32.
    (Checked before XLA:CPU's own rewrites, which run bfloat16 convolutions
    and some small dots in float32; the TPU test checks the compiled
    program.)"""
    bf16 = analyse_precision(lowered["bfloat16"][1].as_text(dialect="hlo"))
    f32 = analyse_precision(lowered["float32"][1].as_text(dialect="hlo"))
    assert sum(bf16.dot_flops.values()) == pytest.approx(sum(f32.dot_flops.values()), rel=0.02)
    float32_operands = {k: v for k, v in bf16.dot_flops.items() if "f32" in k.split("->")[0]}
    assert float32_operands == {}, float32_operands
    assert bf16.flops_fraction("bf16") == 1.0
    assert f32.flops_fraction("f32") == 1.0
    # Attention's two matmuls accumulate in float32 (bf16 x bf16 -> f32).
    assert bf16.dot_counts.get("bf16,bf16->f32", 0) > 0


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu (tpu extra) is not installed")
def test_bf16_step_compiled_for_tpu_runs_every_matmul_and_convolution_in_bf16():
    from mmjax.bench import aot

    c = _config("bfloat16")
    c.mesh = dict(data=1, fsdp=4, expert=1, model=1)
    stats = analyse_precision(aot.compile_for_topology(c, "v5p:2x2x1").hlo_text)
    assert stats.flops_fraction("bf16") == 1.0, stats.dot_flops
    assert stats.dot_counts.get("bf16,bf16->f32", 0) > 0


@pytest.mark.slow
def test_bf16_and_float32_training_follow_the_same_loss_curve(lowered):
    """Same init, same batches: the bf16 run's losses stay within 2 % of the
    float32 run's while both fall; parameters and moments stay float32."""
    losses = {}
    for dtype, (setup, step, state) in lowered.items():
        c = _config(dtype)
        step = step.compile()
        data = iter(make_dataset(c.data, default_tokenizer(c.data), batch_size=c.data.global_batch))
        curve = []
        for _ in range(c.train.steps):
            local = next(data)
            batch = to_global_arrays({k: local[k] for k in setup.batch_shardings}, setup.batch_shardings)
            state, metrics = step(state, batch)
            curve.append(float(metrics["loss"]))
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["params"]))
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["opt_state"]) if x.ndim)
        losses[dtype] = np.array(curve)
    bf16, f32 = losses["bfloat16"], losses["float32"]
    assert f32[-3:].mean() < 0.8 * f32[:3].mean() and bf16[-3:].mean() < 0.8 * bf16[:3].mean()
    np.testing.assert_allclose(bf16, f32, rtol=0.02)


def test_cast_weights_once_casts_what_modules_cast_at_use_and_nothing_else():
    cfg = small_config().model
    vit = ViT(cfg.vit, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    moe_cfg = small_config().model.decoder.moe
    moe_cfg.num_experts, moe_cfg.top_k, moe_cfg.expert_mlp = 4, 2, 32
    moe = MoEFeedForward(16, moe_cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    assert cast_weights_once(moe) == 3
    assert {moe.wi_gate.dtype, moe.wi_up.dtype, moe.wo.dtype} == {jnp.dtype(jnp.bfloat16)}
    assert moe.router.dtype == jnp.float32  # routing stays float32
    n = cast_weights_once(vit)
    assert n > 0 and cast_weights_once(vit) == 0  # idempotent
    kinds = set()
    for path, module in nnx.iter_graph(vit):
        if isinstance(module, nnx.Module):
            expected = jnp.bfloat16 if isinstance(module, (Dense, Conv2D)) else jnp.float32
            for name, variable in vars(module).items():
                if isinstance(variable, nnx.Param):  # norms, position embeddings, class token: float32
                    assert variable.get_value().dtype == expected, (path, name)
                    kinds.add((type(module).__name__, jnp.dtype(expected).name))
    assert {("Dense", "bfloat16"), ("LayerNorm", "float32")} <= kinds
    f32_vit = ViT(cfg.vit, rngs=nnx.Rngs(0), dtype=jnp.float32)
    assert cast_weights_once(f32_vit) == 0


def test_casting_once_gives_the_gradients_of_casting_at_use():
    """The cast is inside the differentiated function: gradients reach the
    float32 parameters as float32, equal to those of per-use casting."""
    cfg = small_config().model
    vit = ViT(cfg.vit, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    graphdef, params = nnx.split(vit, nnx.Param)
    images = jax.random.uniform(jax.random.key(1), (2, cfg.vit.image_size, cfg.vit.image_size, 3))

    def loss(p, once):
        model = nnx.merge(graphdef, p)
        if once:
            cast_weights_once(model)
        return jnp.mean(model.features(images).astype(jnp.float32) ** 2)

    at_use = jax.jit(jax.grad(lambda p: loss(p, False)))(params)
    cast_once = jax.jit(jax.grad(lambda p: loss(p, True)))(params)
    for a, b in zip(jax.tree.leaves(at_use), jax.tree.leaves(cast_once), strict=True):
        assert b.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_float32_accumulating_einsum_matches_float32_in_value_and_gradient():
    """Forward: float32 accumulation of bf16 operands; backward: cotangents
    cast to bf16, so the transposed matmuls also take bf16 operands. Values
    and gradients match float32 attention to bf16 accuracy; float32 inputs
    give float32 attention's gradients exactly."""
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(key, (2, 16, 4, 8)) for key in keys[:3])
    ct = jax.random.normal(keys[3], (2, 16, 4, 8))
    mask = jnp.tril(jnp.ones((16, 16), bool))[None].repeat(2, 0)

    def grads(dtype, fn=dot_product_attention):
        args = [x.astype(dtype) for x in (q, k, v)]
        out, vjp = jax.vjp(lambda *a: fn(*a, mask), *args)
        return out, vjp(ct.astype(dtype))

    out32, g32 = jax.jit(grads, static_argnums=0)(jnp.float32)
    out16, g16 = jax.jit(grads, static_argnums=0)(jnp.bfloat16)
    assert out16.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in g16)
    np.testing.assert_allclose(np.asarray(out16, np.float32), out32, atol=4e-2)
    for a, b in zip(g16, g32, strict=True):
        scale = float(jnp.abs(b).max())
        assert float(jnp.abs(a.astype(jnp.float32) - b).max()) < 0.05 * scale

    def plain(q, k, v, mask):  # the same attention with ordinary float32 einsums
        scores = jnp.einsum("btkd,bskd->bkts", q / jnp.sqrt(8.0), k)
        probs = jax.nn.softmax(jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min), axis=-1)
        return jnp.einsum("bkts,bskd->btkd", probs, v)

    ref_out, ref_g = jax.jit(grads, static_argnums=(0, 1))(jnp.float32, plain)
    np.testing.assert_allclose(out32, ref_out, rtol=1e-5, atol=1e-6)
    for a, b in zip(g32, ref_g, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    x = jax.random.normal(keys[0], (3, 5))
    y = jax.random.normal(keys[1], (5, 4))
    assert einsum_f32_accumulate("ij,jk->ik", x.astype(jnp.bfloat16), y.astype(jnp.bfloat16)).dtype == jnp.float32
