"""Attention implementations chosen by config agree: outputs and gradients
of the XLA einsum path, `jax.nn.dot_product_attention` and the Pallas
splash kernel (Pallas' interpreter on CPU), with packed documents,
bidirectional image blocks and grouped-query heads, sharded
over a mesh, and whole models built with each."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import small_config
from mmjax.models.attention import ATTENTION, SegmentMask
from mmjax.models.registry import build_model


def _inputs():
    rng = np.random.default_rng(0)
    b, s, h, kv, d = 2, 12, 4, 2, 16
    q, k, v = (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in
               ((b, s, h, d), (b, s, kv, d), (b, s, kv, d)))
    segments = jnp.asarray([[1] * 5 + [2] * 4 + [0] * 3, [1] * 12])  # packed documents, padding
    image_ids = jnp.asarray([[-1, 0, 0, 0, -1, -1, 1, 1, -1, -1, -1, -1], [-1] * 12])  # two image blocks
    return q, k, v, {"causal_segments": SegmentMask(segments),
                     "image_blocks": SegmentMask(segments, image_ids, image_span=3), "none": None}


def _outputs_and_grads(fn, q, k, v, mask):
    def loss(q, k, v):
        out = fn(q, k, v, mask)
        return (out * jnp.cos(jnp.arange(out.size).reshape(out.shape))).sum(), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def _assert_agree(got, want, what):
    np.testing.assert_allclose(got[0], want[0], atol=2e-5, rtol=2e-5, err_msg=what)
    for g, r, name in zip(got[1], want[1], "qkv"):
        np.testing.assert_allclose(g, r, atol=2e-5, rtol=2e-5, err_msg=f"{what}: d{name}")


@pytest.mark.parametrize("mask_name", ["causal_segments", "image_blocks", "none"])
@pytest.mark.parametrize("implementation", ["dot_product_attention", "splash"])
def test_outputs_and_gradients_agree(mask_name, implementation):
    q, k, v, masks = _inputs()
    mask = masks[mask_name]
    want = _outputs_and_grads(ATTENTION["xla"], q, k, v, mask)
    _assert_agree(_outputs_and_grads(ATTENTION[implementation], q, k, v, mask), want, implementation)


def test_image_query_positions_reach_the_end_of_their_image():
    from mmjax.models.splash import image_query_positions

    ids = jnp.asarray([[-1, 0, 0, 0, 1, 1, -1, 2, -1, 3, 3, 3]])  # adjacent images 0 and 1
    np.testing.assert_array_equal(image_query_positions(ids)[0], [0, 3, 3, 3, 5, 5, 6, 7, 8, 11, 11, 11])


@pytest.mark.parametrize("span", [0, 80])
def test_splash_image_blocks_across_kernel_blocks(span):
    """Images that straddle the kernel's 128-token blocks: a query early in an
    image sees keys in the next key block, which the causal block table
    would skip. span=80 is the longest image (blocks past the diagonal
    partial); 0 means unknown (every key block evaluated)."""
    rng = np.random.default_rng(3)
    b, s, h, kv, d = 2, 300, 2, 1, 8
    q, k, v = (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in
               ((b, s, h, d), (b, s, kv, d), (b, s, kv, d)))
    segments = np.ones((b, s), np.int32)
    segments[0, 200:] = 2
    segments[1, 290:] = 0
    image_ids = np.full((b, s), -1, np.int32)
    image_ids[0, 100:180], image_ids[0, 201:250], image_ids[1, 120:200], image_ids[1, 200:256] = 0, 1, 2, 3
    mask = SegmentMask(jnp.asarray(segments), jnp.asarray(image_ids), image_span=span)
    _assert_agree(_outputs_and_grads(ATTENTION["splash"], q, k, v, mask),
                  _outputs_and_grads(ATTENTION["xla"], q, k, v, mask), f"image blocks, span {span}")


def test_splash_sharded_over_the_mesh_agrees():
    """Inside a training step's layout the kernel runs per device under
    shard_map (batch over data x fsdp, heads over model)."""
    from mmjax.models.partitioning import activation_sharding
    from mmjax.parallel.mesh import make_mesh
    from mmjax.parallel.rules import activation_resolver, get_layout

    rng = np.random.default_rng(4)
    b, s, h, kv, d = 4, 12, 4, 2, 16
    q, k, v = (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in
               ((b, s, h, d), (b, s, kv, d), (b, s, kv, d)))
    mask = SegmentMask(jnp.asarray([[1] * 5 + [2] * 7, [1] * 12, [1] * 9 + [0] * 3, [3] * 12]))
    mesh = make_mesh({"data": 2, "fsdp": 2, "model": 2})
    resolver = activation_resolver(mesh, get_layout("fsdp"))

    def sharded(q, k, v, mask):
        with activation_sharding(resolver):
            return ATTENTION["splash"](q, k, v, mask)

    lowered = jax.jit(sharded).lower(q, k, v, mask)
    assert "shard_map" in lowered.as_text() or "sdy.manual_computation" in lowered.as_text()
    _assert_agree(_outputs_and_grads(sharded, q, k, v, mask),
                  _outputs_and_grads(ATTENTION["xla"], q, k, v, mask), "splash on a 2x2x2 mesh")


@pytest.mark.parametrize("implementation", ["dot_product_attention", "splash"])
def test_models_built_with_either_implementation_agree(implementation):
    c = small_config()
    c.model.bidirectional_image_attention = True
    model = build_model(c.model, nnx.Rngs(0))
    other_cfg = c.model.copy_and_resolve_references()
    other_cfg.vit.attention = other_cfg.decoder.attention = implementation
    other = build_model(other_cfg, nnx.Rngs(0))
    assert other.decoder.layers.layer(0).attn.implementation == implementation
    b, s, k = 2, 16, c.data.tokens_per_image
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(4, 500, (b, s)), jnp.int32)
    slots = np.full((b, s), -1, np.int32)
    slots[:, 1:1 + k] = np.arange(k)
    images = jnp.asarray(rng.integers(0, 255, (b, 1, c.data.image_size, c.data.image_size, 3)), jnp.uint8)
    segments = jnp.asarray([[1] * 10 + [2] * 6, [1] * 16], jnp.int32)
    positions = jnp.asarray(np.broadcast_to(np.arange(s), (b, s)), jnp.int32)
    run = nnx.jit(lambda m: m(tokens, jnp.asarray(slots), images, segments, positions))
    np.testing.assert_allclose(run(other), run(model), atol=1e-4, rtol=1e-4)


def test_cached_generation_with_either_implementation_gives_the_same_tokens():
    from mmjax.generate.decode import Sampling, jitted_generate

    c = small_config()
    c.model.name = "text_lm"
    lengths = jnp.asarray([6, 3], jnp.int32)
    tokens = jnp.asarray(np.random.default_rng(2).integers(4, 500, (2, 6)), jnp.int32)
    batch = {"tokens": tokens, "lengths": lengths}
    out = {}
    for name in ATTENTION:
        cfg = c.model.copy_and_resolve_references()
        cfg.decoder.attention = name
        out[name] = np.asarray(jitted_generate(build_model(cfg, nnx.Rngs(3)),
                                               Sampling(max_new_tokens=5, stop_ids=()))(batch)[0])
    np.testing.assert_array_equal(out["dot_product_attention"], out["xla"])


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu (jax[tpu]) is not installed")
def test_splash_train_step_compiles_for_v5p():
    """The whole train step with splash in the ViT and the decoder, compiled
    ahead of time for a v5p slice of 8 chips: the attention runs as Mosaic
    kernels (forward, dq and dkv for each stack), and it fits, with and
    without bidirectional image blocks."""
    from mmjax.bench import aot

    c = small_config()
    c.model.dtype = "bfloat16"
    c.model.vit.attention = c.model.decoder.attention = "splash"
    report = aot.compile_for_topology(c, "v5p:2x2x2")
    assert report.fits and report.num_devices == 8
    assert report.hlo_text.count('custom_call_target="tpu_custom_call"') == 6
    c.model.bidirectional_image_attention = True  # image blocks: per-example query positions
    report = aot.compile_for_topology(c, "v5p:2x2x2")
    assert report.fits and report.hlo_text.count('custom_call_target="tpu_custom_call"') == 6
    c.model.vit.attention = c.model.decoder.attention = "xla"
    assert 'custom_call_target="tpu_custom_call"' not in aot.compile_for_topology(c, "v5p:2x2x2").hlo_text
