"""Attention implementations chosen by config agree: outputs and gradients
of the XLA einsum path and `jax.nn.dot_product_attention`, with packed
documents, bidirectional image blocks and grouped-query heads, and whole
models built with either."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import small_config
from mmjax.models.attention import ATTENTION, causal_segment_mask
from mmjax.models.decoder import attention_mask
from mmjax.models.registry import build_model


def _inputs():
    rng = np.random.default_rng(0)
    b, s, h, kv, d = 2, 12, 4, 2, 16
    q, k, v = (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in
               ((b, s, h, d), (b, s, kv, d), (b, s, kv, d)))
    segments = jnp.asarray([[1] * 5 + [2] * 4 + [0] * 3, [1] * 12])  # packed documents, padding
    image_ids = jnp.asarray([[-1, 0, 0, 0, -1, -1, 1, 1, -1, -1, -1, -1], [-1] * 12])  # two image blocks
    return q, k, v, {"causal_segments": causal_segment_mask(segments),
                     "image_blocks": attention_mask(segments, image_ids), "none": None}


@pytest.mark.parametrize("mask_name", ["causal_segments", "image_blocks", "none"])
def test_outputs_and_gradients_agree(mask_name):
    q, k, v, masks = _inputs()
    mask = masks[mask_name]

    def loss(fn, q, k, v):
        out = fn(q, k, v, mask)
        return (out * jnp.cos(jnp.arange(out.size).reshape(out.shape))).sum(), out

    results = {}
    for name, fn in ATTENTION.items():
        (_, out), grads = jax.jit(jax.value_and_grad(lambda *a, fn=fn: loss(fn, *a), argnums=(0, 1, 2),
                                                     has_aux=True))(q, k, v)
        results[name] = (out, grads)
    ref_out, ref_grads = results["xla"]
    for name, (out, grads) in results.items():
        np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=2e-5, err_msg=name)
        for g, r in zip(grads, ref_grads):
            np.testing.assert_allclose(g, r, atol=2e-5, rtol=2e-5, err_msg=name)


def test_models_built_with_either_implementation_agree():
    c = small_config()
    c.model.bidirectional_image_attention = True
    model = build_model(c.model, nnx.Rngs(0))
    other_cfg = c.model.copy_and_resolve_references()
    other_cfg.vit.attention = other_cfg.decoder.attention = "dot_product_attention"
    other = build_model(other_cfg, nnx.Rngs(0))
    assert other.decoder.layers.layer(0).attn.implementation == "dot_product_attention"
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
