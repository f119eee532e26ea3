"""Decoder masking and options: packed segments, bidirectional image
attention, scan/remat equivalence, remat policies, QK-norm."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import small_config
from mmjax.models import MM1Model
from mmjax.models.decoder import Decoder


def _decoder_cfg(**kw):
    cfg = small_config().model.decoder
    cfg.layers = 2
    cfg.update(kw)
    return cfg


def _run(model, tokens, seg, pos, image_ids=None):
    return jax.jit(lambda t: model(model.embed(t), seg, pos, image_ids))(tokens)


def test_packed_segments_do_not_attend_across_documents():
    model = Decoder(_decoder_cfg(), rngs=nnx.Rngs(0))
    seg = jnp.array([[1] * 6 + [2] * 6 + [0] * 4])
    pos = jnp.array([list(range(6)) + list(range(6)) + [0] * 4])
    tokens = jnp.arange(16)[None] + 4
    base = _run(model, tokens, seg, pos)
    changed_first = _run(model, tokens.at[0, 2].set(99), seg, pos)
    changed_second = _run(model, tokens.at[0, 8].set(99), seg, pos)
    d1 = np.abs(np.asarray(changed_first - base)).max(axis=(0, 2))
    d2 = np.abs(np.asarray(changed_second - base)).max(axis=(0, 2))
    assert np.all(d1[6:12] == 0) and np.all(d1[2:6] > 0)   # doc 2 never sees doc 1
    assert np.all(d2[:6] == 0) and np.all(d2[8:12] > 0)    # doc 1 never sees doc 2
    # A packed document gives the same logits as the same document alone.
    alone = _run(model, tokens[:, 6:12], jnp.ones((1, 6), jnp.int32), jnp.arange(6)[None])
    np.testing.assert_allclose(base[:, 6:12], alone, atol=1e-5)


def test_bidirectional_attention_within_one_image_only():
    c = small_config()
    tokens = jnp.full((1, 12), 5, jnp.int32)
    slots = jnp.array([[-1, 0, 1, 2, 3, -1, 4, 5, 6, 7, -1, -1]])
    images = jax.random.normal(jax.random.key(0), (1, 2, 32, 32, 3))
    seg, pos = jnp.ones((1, 12), jnp.int32), jnp.arange(12)[None]
    effect = {}
    for flag in (False, True):
        c.model.bidirectional_image_attention = flag
        model = MM1Model(c.model, rngs=nnx.Rngs(0))
        f = jax.jit(lambda im: model(tokens, slots, im, seg, pos))
        other = images.at[:, 1].set(0.0)  # change the second image only
        effect[flag] = np.abs(np.asarray(f(other) - f(images))).max(axis=(0, 2))
    assert np.all(effect[False][:6] == 0)          # causal: the first image cannot see the second
    assert np.all(effect[True][:6] == 0)           # nor across images with the option
    # With the option, the first slot of image 2 sees the later slots of image 2.
    model_ids_changed = effect[True][6] > 0
    assert model_ids_changed


@pytest.mark.parametrize("remat", ["", "full", "dots"])
def test_scanned_decoder_matches_listed(remat):
    listed = Decoder(_decoder_cfg(), rngs=nnx.Rngs(0))
    scanned = Decoder(_decoder_cfg(scan=True, remat=remat), rngs=nnx.Rngs(1))
    lp = nnx.state(listed, nnx.Param).to_pure_dict()
    layers = [lp["layers"]["layers"][i] for i in range(2)]
    lp["layers"] = {"layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}
    sp = nnx.state(scanned, nnx.Param)
    nnx.replace_by_pure_dict(sp, lp)
    nnx.update(scanned, sp)
    tokens = jnp.arange(10)[None] + 4
    seg, pos = jnp.ones((1, 10), jnp.int32), jnp.arange(10)[None]
    loss = lambda m: jnp.sum(jnp.sin(m(m.embed(tokens), seg, pos)))  # noqa: E731
    np.testing.assert_allclose(jax.jit(loss)(scanned), jax.jit(loss)(listed), rtol=1e-5)
    g_scan = nnx.grad(loss)(scanned).to_pure_dict()["layers"]["layers"]["mlp"]["gate"]["kernel"]
    g_list = nnx.grad(loss)(listed).to_pure_dict()["layers"]["layers"][1]["mlp"]["gate"]["kernel"]
    np.testing.assert_allclose(g_scan[1], g_list, rtol=1e-5, atol=1e-4)


def test_qk_norm_adds_head_dim_scales_and_changes_the_output():
    plain = Decoder(_decoder_cfg(), rngs=nnx.Rngs(0))
    normed = Decoder(_decoder_cfg(qk_norm=True), rngs=nnx.Rngs(0))
    q_norm = normed.layers.layers[0].attn.q_norm
    assert q_norm.scale.shape == (32,) and q_norm.scale.get_metadata()["logical_axes"] == ("head_dim",)
    tokens = jnp.arange(8)[None] + 4
    seg, pos = jnp.ones((1, 8), jnp.int32), jnp.arange(8)[None]
    assert not np.allclose(_run(plain, tokens, seg, pos), _run(normed, tokens, seg, pos))


@pytest.mark.parametrize("remat,named", [
    ("full", set()), ("dots_no_batch", set()),
    ("qkv_proj", {"query_proj", "key_proj", "value_proj"}),
    ("attention", {"query_proj", "key_proj", "value_proj", "attention_context"}),
])
def test_remat_policies_keep_the_activations_they_name(remat, named):
    """What the backward pass keeps per layer (listed stack, 2 layers): the
    named policies keep exactly their tagged activations, one per layer
    each, and nothing else is recomputed differently from `full`; offload
    variants keep the same residuals (in host memory on TPU)."""
    from jax._src.ad_checkpoint import saved_residuals

    tokens = jnp.arange(10)[None] + 4
    seg, pos = jnp.ones((1, 10), jnp.int32), jnp.arange(10)[None]

    def residuals(policy):
        graphdef, params = nnx.split(Decoder(_decoder_cfg(remat=policy), rngs=nnx.Rngs(0)))

        def loss(p):
            m = nnx.merge(graphdef, p)
            return jnp.sum(jnp.sin(m(m.embed(tokens), seg, pos)))

        return saved_residuals(loss, params)

    saved = residuals(remat)
    names = [d.split("named '")[1].split("'")[0] for _, d in saved if "named '" in d]
    assert set(names) == named and len(names) == 2 * len(named)
    assert len(saved) == len(residuals("full")) + len(names) + (12 if remat == "dots_no_batch" else 0)
    if remat != "full":
        assert len(residuals(remat + "_offload")) == len(saved)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu (jax[tpu]) is not installed")
def test_offload_policy_moves_the_kept_activations_to_host_memory_on_tpu():
    """Compiled ahead of time for v5p: the offload policy's program holds
    arrays in the host memory space (`S(5)`), the plain one none."""
    from mmjax.bench import aot

    def hlo(policy):
        c = small_config()
        c.model.dtype = "bfloat16"
        c.model.vit.remat = c.model.decoder.remat = policy
        return aot.compile_for_topology(c, "v5p:2x2x2").hlo_text

    assert "S(5)" in hlo("attention_offload")
    assert "S(5)" not in hlo("attention")
