"""Dual encoder with CLIP / SigLIP losses: on the 8-device mesh the loss and
every parameter's gradient equal a single-device reference written here,
and the jitted train step learns a toy image-text pairing."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import small_config
from flax import nnx

from mmjax.errors import ConfigError
from mmjax.models import build_model, model_spec
from mmjax.models.partitioning import activation_sharding
from mmjax.models.text_encoder import TextEncoder
from mmjax.parallel import activation_resolver, get_layout, make_mesh
from mmjax.train.contrastive import contrastive_loss
from mmjax.train.loop import build_step
from mmjax.train.objectives import batch_loss
from mmjax.train.state import abstract_model, batch_row_shapes, init_train_state, step_inputs
from mmjax.train.step import model_forward

BATCH, TEXT_LEN = 16, 8
# (loss, vit flavour, image pool, causal text, text pool): both losses, both ways of pooling each tower
VARIANTS = {"clip": ("clip", "token", True, "last"), "siglip": ("siglip", "mean", False, "mean")}


def _config(kind: str, steps: int = 10):
    flavour, image_pool, causal, text_pool = VARIANTS[kind]
    c = small_config(steps)
    c.model.name = "dual_encoder"
    c.model.vit.flavour = flavour
    c.model.vit.patch_size = 8
    c.model.decoder.update(embed=64, heads=4, kv_heads=2, head_dim=16, mlp=128)
    c.model.contrastive.update(loss=kind, embed=32, image_pool=image_pool, text_causal=causal, text_pool=text_pool)
    c.data.global_batch = BATCH
    c.data.seq_len = TEXT_LEN
    c.data.max_images = 0  # a packed batch's image count; a pair batch holds one image per row
    c.optimizer.update(lr=3e-3, warmup_steps=min(5, steps))
    return c


def _random_batch(seed: int, size: int = 32) -> dict:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, TEXT_LEN + 1, BATCH)
    segment_ids = (np.arange(TEXT_LEN)[None] < lengths[:, None]).astype(np.int32)
    return {"image": rng.integers(0, 256, (BATCH, size, size, 3), dtype=np.uint8),
            "tokens": (rng.integers(4, 200, (BATCH, TEXT_LEN)) * segment_ids).astype(np.int32),
            "segment_ids": segment_ids}


def _place(batch: dict, setup) -> dict:
    return {k: jax.device_put(v, setup.batch_shardings[k]) for k, v in batch.items()}


# ------------------------------------------------------------------ reference

def _reference_loss(out: dict, kind: str) -> jax.Array:
    """CLIP / SigLIP from their papers' formulas, on one device."""
    image, text = out["image"], out["text"]
    n = image.shape[0]
    if kind == "clip":
        logits = jnp.exp(jnp.minimum(out["logit_scale"], jnp.log(100.0))) * image @ text.T
        rows, cols = jax.nn.log_softmax(logits, axis=1), jax.nn.log_softmax(logits, axis=0)
        return -(jnp.trace(rows) + jnp.trace(cols)) / (2 * n)
    logits = jnp.exp(out["logit_scale"]) * image @ text.T + out["logit_bias"]
    signs = 2.0 * jnp.eye(n) - 1.0
    return jnp.sum(jnp.logaddexp(0.0, -signs * logits)) / n  # -log sigmoid(sign * logit)


def _numpy_loss(image, text, log_scale, bias, kind: str) -> float:
    image, text = np.float64(image), np.float64(text)
    n = len(image)
    if kind == "clip":
        logits = math.exp(min(log_scale, math.log(100.0))) * image @ text.T
        i2t = [np.log(np.exp(logits[i]).sum()) - logits[i, i] for i in range(n)]
        t2i = [np.log(np.exp(logits[:, j]).sum()) - logits[j, j] for j in range(n)]
        return (np.mean(i2t) + np.mean(t2i)) / 2
    logits = math.exp(log_scale) * image @ text.T + bias
    return sum(np.log1p(np.exp(-(1.0 if i == j else -1.0) * logits[i, j]))
               for i in range(n) for j in range(n)) / n


def _leaves(tree) -> dict:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}


# ---------------------------------------------------------------------- tests

@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_loss_on_sharded_embeddings_matches_numpy(kind):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(2, BATCH, 32)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    log_scale, bias = (math.log(1 / 0.07), None) if kind == "clip" else (math.log(10.0), -10.0)
    log_scale += 0.3  # away from the initial values
    mesh = make_mesh({"data": 2, "fsdp": 2, "expert": 2})
    rules = get_layout("fsdp")
    resolver = activation_resolver(mesh, rules)
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp", "expert")))
    outputs = {"image": jax.device_put(emb[0], rows), "text": jax.device_put(emb[1], rows),
               "logit_scale": jnp.float32(log_scale)}
    if bias is not None:
        outputs["logit_bias"] = jnp.float32(bias)

    def loss(o):
        with activation_sharding(resolver):
            return contrastive_loss(o, kind)

    value, metrics = jax.jit(loss)(outputs)
    np.testing.assert_allclose(float(value), _numpy_loss(emb[0], emb[1], log_scale, bias or 0.0, kind), rtol=1e-5)
    assert float(metrics["contrastive_loss"]) == float(value)
    # the same embeddings unsharded (each row the pair of the row with the same index) score the same
    single = jax.jit(lambda o: contrastive_loss(o, kind)[0])({k: np.asarray(v) for k, v in outputs.items()})
    np.testing.assert_allclose(float(single), float(value), rtol=1e-6)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_sharded_loss_and_gradients_equal_single_device_reference(kind, capfd):
    config = _config(kind)
    setup, _ = build_step(config, make_mesh(dict(config.mesh)), get_layout(config.rules))
    assert setup.batch_shardings["image"].spec[0] == ("data", "fsdp", "expert")  # 8 batch shards, 2 rows each
    params = init_train_state(config, setup)["params"]
    batch = _random_batch(1)
    loss_fn = batch_loss(config.model)

    def sharded(p, b):
        def f(q):
            outputs, _ = model_forward(setup.graphdef, q, b, setup.resolver)
            with activation_sharding(setup.resolver):
                return loss_fn(outputs, b)[0]
        return jax.value_and_grad(f)(p)

    loss, grads = jax.jit(sharded, in_shardings=(setup.state_shardings["params"], setup.batch_shardings))(
        params, _place(batch, setup))

    device = jax.devices()[0]
    host_params = jax.device_put(jax.device_get(params), device)
    host_batch = jax.device_put(batch, device)

    def reference(p, b):
        return jax.value_and_grad(lambda q: _reference_loss(model_forward(setup.graphdef, q, b)[0], kind))(p)

    ref_loss, ref_grads = jax.jit(reference)(host_params, host_batch)
    assert len(ref_loss.sharding.device_set) == 1
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    got, want = _leaves(grads), _leaves(ref_grads)
    assert got.keys() == want.keys() and any("logit_scale" in k for k in got)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5, err_msg=name)
        if not ("key" in name and "bias" in name):  # softmax ignores a bias shared by every key
            assert np.abs(want[name]).max() > 1e-4, name  # every other parameter takes part
    assert "Involuntary full rematerialization" not in capfd.readouterr().err


def _colour_batch(rng, palette: np.ndarray, size: int = 32) -> dict:
    """Each row: an image of one colour (plus noise) and the text `<4> colour-word <5>`."""
    colours = rng.permutation(len(palette))[:BATCH]
    noise = rng.normal(0, 8, (BATCH, size, size, 3))
    images = np.clip(palette[colours][:, None, None, :] + noise, 0, 255).astype(np.uint8)
    tokens = np.zeros((BATCH, TEXT_LEN), np.int32)
    tokens[:, :3] = np.stack([np.full(BATCH, 4), 10 + colours, np.full(BATCH, 5)], axis=1)
    return {"image": images, "tokens": tokens, "segment_ids": (tokens > 0).astype(np.int32)}


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_train_step_learns_colour_words(kind, capfd):
    steps = 40
    config = _config(kind, steps)
    setup, step = build_step(config, make_mesh(dict(config.mesh)), get_layout(config.rules))
    state = init_train_state(config, setup)
    rng = np.random.default_rng(0)
    palette = rng.uniform(0, 255, (24, 3))
    losses, accuracies, metrics = [], [], None
    for _ in range(steps):
        state, metrics = step(state, _place(_colour_batch(rng, palette), setup))
        losses.append(float(metrics["loss"]))
        accuracies.append([float(metrics[f"{d}_accuracy"]) for d in ("image_to_text", "text_to_image")])
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.4 * np.mean(losses[:5]), losses
    assert np.mean(accuracies[:5]) < 0.5 and np.mean(accuracies[-5:]) > 0.85, accuracies  # of 16 pairs
    assert {"contrastive_loss", "temperature", "grad_norm", "learning_rate"} <= set(metrics)
    assert ("logit_bias" in metrics) == (kind == "siglip")
    # XLA's SPMD partitioner found every sharding without replicating an activation (its stderr warning)
    assert "Involuntary full rematerialization" not in capfd.readouterr().err


def test_registered_with_pair_inputs_and_parameter_axes():
    config = _config("siglip")
    spec = model_spec(config.model)
    assert spec.objective == "contrastive" and spec.uses_images
    assert step_inputs(config) == ("image", "tokens", "segment_ids")  # no targets / loss_mask
    assert batch_row_shapes(config) == {"image": (32, 32, 3), "tokens": (TEXT_LEN,), "segment_ids": (TEXT_LEN,)}
    _, abstract = abstract_model(config.model)
    assert set(abstract.keys()) == {"vit", "text", "image_projection", "text_projection", "logit_scale",
                                    "logit_bias"}
    for path, v in jax.tree_util.tree_flatten_with_path(abstract, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]:
        axes = v.get_metadata().get("logical_axes")
        assert axes is not None and len(axes) == len(v.shape), jax.tree_util.keystr(path)
    siglip = build_model(config.model, nnx.Rngs(0))
    assert float(siglip.logit_scale[...]) == pytest.approx(math.log(10.0))
    assert float(siglip.logit_bias[...]) == -10.0
    clip = build_model(_config("clip").model, nnx.Rngs(0))
    assert clip.logit_bias is None and float(clip.logit_scale[...]) == pytest.approx(math.log(1 / 0.07))


def test_refusals():
    config = _config("clip")
    config.train.grad_accum_steps = 2
    with pytest.raises(ConfigError, match=r"config.train.grad_accum_steps=2: this model's loss is over the whole"):
        build_step(config, make_mesh(dict(config.mesh)), get_layout(config.rules))
    config = _config("clip")
    config.model.vit.flavour = "siglip"
    config.model.vit.map_head = False
    with pytest.raises(ConfigError, match=r"image_pool='token' pools a SigLIP ViT with its MAP head"):
        build_step(config, make_mesh(dict(config.mesh)), get_layout(config.rules))


@pytest.mark.parametrize("causal,pool", [(True, "last"), (False, "mean")])
def test_text_embedding_ignores_padding(causal, pool):
    cfg = _config("clip").model.decoder
    encoder = TextEncoder(cfg, causal=causal, pool=pool, rngs=nnx.Rngs(0))
    batch = _random_batch(2)
    mask = batch["segment_ids"] > 0
    noisy = np.where(mask, batch["tokens"], np.random.default_rng(3).integers(4, 200, mask.shape)).astype(np.int32)
    run = nnx.jit(lambda m, t, k: m(t, k))
    a, b = run(encoder, batch["tokens"], mask), run(encoder, noisy, mask)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # a text token does change it
    changed = np.asarray(run(encoder, np.where(mask, noisy + 1, noisy).astype(np.int32), mask))
    assert np.abs(changed - np.asarray(a)).max(axis=1).min() > 1e-4
