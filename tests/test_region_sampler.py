"""The region sampler sees only the features inside its region; the MM1 model
splices region embeddings at region slots (and is unchanged without them);
packed sequences with regions give each example its own logits; the config
switch and the train step."""

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest
from flax import nnx

import shard_writers as sw
from conftest import small_config
from mmjax.data.examples import ExampleBuilder
from mmjax.data.packing import Packer
from mmjax.data.pipeline import default_tokenizer
from mmjax.errors import ConfigError
from mmjax.models import MM1Model
from mmjax.models.region_sampler import RegionSampler, param_count
from mmjax.parallel import get_layout, make_mesh
from mmjax.train.config_checks import check_static
from mmjax.train.state import step_inputs

G = 8  # patch grid of the small config (32-pixel images, 4-pixel patches)
D = 16  # feature width in the sampler tests


def _sampler(seed=0):
    cfg = mlc.ConfigDict(dict(hidden=32, pos_freqs=3))
    return RegionSampler(cfg, vit_embed=D, embed=24, rngs=nnx.Rngs(seed))


@nnx.jit
def _sample(sampler, features, masks, index):
    return sampler(features, masks, index)


def _masks():
    """`[2, 3, G, G]`: a box with partial cells, a free-form blob, an empty mask."""
    masks = np.zeros((2, 3, G, G), np.float32)
    masks[:, 0, 2:5, 1:6] = 1.0
    masks[:, 0, 5, 1:6] = 0.25  # a box edge covering a quarter of its cells
    blob = np.hypot(*np.mgrid[0:G, 0:G] - 4.5) < 2.6
    masks[:, 1] = blob
    return jnp.asarray(masks)


def test_the_output_depends_only_on_features_inside_the_region():
    sampler = _sampler()
    masks = _masks()
    features = jax.random.normal(jax.random.key(0), (2, 2, G * G, D))  # two images per row
    index = jnp.asarray([[1, 0, 0], [0, 1, 1]])  # the image each region lies on
    out = _sample(sampler, features, masks, index)
    assert out.shape == (2, 3, 24) and bool(jnp.isfinite(out).all())
    assert np.abs(np.asarray(out[:, :2])).min(-1).max() > 0 and not np.asarray(out[:, 2]).any()  # empty -> 0
    noise = 10.0 * jax.random.normal(jax.random.key(1), features.shape)
    for row in range(2):
        for r in range(2):
            image = int(index[row, r])
            inside = np.asarray(masks[row, r]).reshape(-1) > 0
            # Everything outside the region (on its image and on the other image) changes ...
            outside = jnp.ones(features.shape, bool).at[row, image, inside].set(False)
            moved = _sample(sampler, jnp.where(outside, features + noise, features), masks, index)
            np.testing.assert_array_equal(moved[row, r], out[row, r])
            # ... one patch inside changes: the region's embedding changes.
            patch = int(np.flatnonzero(inside)[len(np.flatnonzero(inside)) // 2])
            poked = _sample(sampler, features.at[row, image, patch].add(1.0), masks, index)
            assert np.abs(np.asarray(poked[row, r] - out[row, r])).max() > 1e-4


def test_empty_masks_give_zero_and_finite_gradients():
    sampler = _sampler(1)
    features = jax.random.normal(jax.random.key(2), (2, G * G, D))  # one image per row, shared by the regions
    masks = jnp.zeros((2, 2, G, G)).at[0, 0, 3:5, 3:5].set(1.0)

    def loss(model, f):
        return (model(f, masks) ** 2).sum()

    value, (grads, feature_grads) = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1)))(sampler, features)
    out = _sample(sampler, features, masks, None)
    assert not np.asarray(out[0, 1]).any() and not np.asarray(out[1]).any() and np.asarray(out[0, 0]).any()
    leaves = jax.tree.leaves(grads) + [feature_grads]
    assert np.isfinite(float(value)) and all(bool(jnp.isfinite(x).all()) for x in leaves)
    assert not np.asarray(feature_grads[1]).any()  # no region on row 1's image
    assert sum(x.size for x in jax.tree.leaves(nnx.state(sampler, nnx.Param))) == param_count(
        mlc.ConfigDict(dict(hidden=32, pos_freqs=3)), D, 24)


def test_masks_on_a_finer_grid_are_pooled_to_the_patch_grid():
    sampler = _sampler(2)
    features = jax.random.normal(jax.random.key(3), (2, G * G, D))
    coarse = _masks()
    fine = jnp.repeat(jnp.repeat(coarse, 2, axis=-1), 2, axis=-2)  # the same coverage on a 16 x 16 grid
    np.testing.assert_allclose(_sample(sampler, features, fine, None), _sample(sampler, features, coarse, None),
                               atol=1e-5)


# ----------------------------------------------------------------- the model


def _config(enabled: bool):
    c = small_config()
    c.model.region_sampler.enabled = enabled
    c.model.region_sampler.hidden = 32
    c.data.max_regions = 2 if enabled else 0
    c.data.region_grid = G
    c.data.seq_len = 96
    return c


@nnx.jit
def _logits(model, batch):
    return model.forward_batch(batch)[0]


def _batch(b=2, s=24, n=2, k=4, size=32):
    tokens = (jnp.arange(b * s, dtype=jnp.int32).reshape(b, s) % 50) + 4
    slots = np.full((b, s), -1, np.int32)
    slots[:, 1:1 + k] = np.arange(k)
    slots[:, 8:8 + k] = np.arange(k, 2 * k)
    return {"tokens": tokens, "image_slots": jnp.asarray(slots),
            "images": jax.random.randint(jax.random.key(0), (b, n, size, size, 3), 0, 256).astype(jnp.uint8),
            "segment_ids": jnp.ones((b, s), jnp.int32), "positions": jnp.broadcast_to(jnp.arange(s), (b, s))}


def _regions(b=2, s=24, at=(14, 18)):
    region_slots = np.full((b, s), -1, np.int32)
    region_slots[:, at[0]], region_slots[:, at[1]] = 0, 1
    masks = np.zeros((b, 2, G, G), np.float32)
    masks[:, 0, 1:4, 2:7] = 1
    masks[:, 1, 5:8, 0:3] = 1
    return {"region_slots": jnp.asarray(region_slots), "region_images": jnp.asarray([[0, 1], [1, 1]]),
            "region_masks": jnp.asarray(masks)}


def test_without_the_switch_the_model_is_unchanged_and_ignores_region_fields():
    c = _config(False)
    model = MM1Model(c.model, rngs=nnx.Rngs(0))
    assert set(nnx.state(model).keys()) == {"vit", "connector", "decoder"}
    assert not any(k.startswith("region") for k in step_inputs(c))
    batch = _batch()
    np.testing.assert_array_equal(_logits(model, {**batch, **_regions()}), _logits(model, batch))
    # Same parameters as a config that predates the switch.
    del c.model["region_sampler"]
    old = MM1Model(c.model, rngs=nnx.Rngs(0))
    same = jax.tree.map(lambda a, b: bool((a == b).all()), nnx.state(old), nnx.state(model))
    assert all(jax.tree.leaves(same))


def test_region_embeddings_land_at_region_slots():
    c = _config(True)
    model = MM1Model(c.model, rngs=nnx.Rngs(0))
    assert "region_sampler" in nnx.state(model)
    assert step_inputs(c)[-5:] == ("region_slots", "region_images", "region_masks", "targets", "loss_mask")
    batch, regions = _batch(), _regions()
    plain = _logits(model, batch)
    unused = dict(regions, region_slots=jnp.full_like(regions["region_slots"], -1))
    np.testing.assert_array_equal(_logits(model, {**batch, **unused}), plain)  # no slot: nothing changes
    with_regions = _logits(model, {**batch, **regions})
    diff = np.abs(np.asarray(with_regions - plain)).max(axis=(0, 2))
    assert np.all(diff[:14] == 0) and np.all(diff[14:] > 0)  # causal: only from the first region token on
    embed = nnx.jit(lambda m, x: m.input_embeddings(x["tokens"], x["image_slots"], x["images"],
                                                   x["region_slots"], x["region_images"], x["region_masks"]))
    emb = embed(model, {**batch, **regions})
    features = nnx.jit(lambda m, images: m.image_features(images))(model, batch["images"]).reshape(2, 2, G * G, -1)
    sampled = _sample(model.region_sampler, features, regions["region_masks"], regions["region_images"])
    np.testing.assert_allclose(emb[:, 14], sampled[:, 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(emb[:, 18], sampled[:, 1], rtol=1e-5, atol=1e-6)


def _region_conversations(n: int, image_size: int) -> list[dict]:
    out = []
    for i in range(n):
        segments = [{"image": sw.picture(i + j, size=(32, 32)), "role": "user"} for j in range(1 + i % 2)]
        for r in range(1 + i % 2):
            segments += [{"text": " this", "role": "user"},
                         {"region": {"image": r, "box": [2 + i, 3, 20 + r, 14 + i]}, "role": "user"}]
        segments += [{"text": f"it is {i}.", "role": "assistant"}]
        out.append({"stream": "caption", "segments": segments, "origin": f"conversation {i}"})
    return out


def test_packed_sequences_with_regions_give_each_example_its_own_logits():
    c = _config(True)
    d = c.data
    tok = default_tokenizer(d)
    model = MM1Model(c.model, rngs=nnx.Rngs(0))
    builder = ExampleBuilder(tok, d.seq_len, d.max_images, d.tokens_per_image, d.image_size,
                             max_regions=d.max_regions, region_grid=d.region_grid)
    examples = [builder(r) for r in _region_conversations(6, d.image_size)]
    assert all(len(ex["region_images"]) == 1 + i % 2 for i, ex in enumerate(examples))
    packer = Packer(d.seq_len, d.max_images, d.tokens_per_image, d.image_size, tok.pad_id,
                    max_regions=d.max_regions, region_grid=d.region_grid)
    packed = max(packer.pack_window(examples), key=lambda s: s["num_examples"])
    assert packed["num_examples"] >= 2 and (packed["region_images"] >= 0).sum() == 2

    def logits(seq):
        fields = ("tokens", "image_slots", "images", "segment_ids", "positions", "region_slots", "region_images",
                  "region_masks")
        return np.asarray(_logits(model, {k: jnp.asarray(seq[k])[None] for k in fields}))[0]

    together = logits(packed)
    for seg in range(1, packed["num_examples"] + 1):
        where = packed["segment_ids"] == seg
        ids = np.concatenate([packed["tokens"][where], packed["targets"][where][-1:]])
        ex = next(e for e in examples if np.array_equal(e["ids"], ids))
        alone = packer.build([ex], [0])
        np.testing.assert_allclose(together[where], logits(alone)[:int(where.sum())], atol=2e-4)
    # ... and the check has teeth: the regions matter to the logits.
    blank = dict(packed, region_masks=np.zeros_like(packed["region_masks"]))
    assert np.abs(logits(blank) - together).max() > 1e-3


def test_the_switch_and_max_regions_must_agree():
    c = _config(True)
    check_static(c)
    c.data.region_grid = 12
    with pytest.raises(ConfigError, match=r"config.data.region_grid=12 must be a multiple of the ViT's patch grid "
                                          r"\(config.model.vit.image_size / patch_size = 8\)"):
        check_static(c)
    c.data.region_grid = 16
    check_static(c)
    c.data.max_regions = 0
    with pytest.raises(ConfigError, match=r"config.data.max_regions=0 must be at least 1 with "
                                          r"config.model.region_sampler.enabled=True"):
        check_static(c)
    c = _config(False)
    c.data.max_regions = 3
    with pytest.raises(ConfigError, match=r"config.data.max_regions=3 needs config.model.region_sampler.enabled"):
        check_static(c)
    c.model.region_sampler.hidden = 0
    with pytest.raises(ConfigError, match=r"config.model.region_sampler.hidden=0 is invalid"):
        check_static(c)


def test_a_train_step_with_regions_trains_the_sampler(tmp_path):
    import json

    from mmjax.data.pipeline import make_dataset
    from mmjax.train.loop import build_step
    from mmjax.train.state import init_train_state

    c = _config(True)
    (tmp_path / "a.png").write_bytes(sw.encode(sw.picture(3, size=(40, 48)), "PNG"))
    doc = {"image": "a.png", "regions": [{"box": [4, 4, 30, 36]}, {"box": [0, 0, 48, 20]}], "conversations": [
        {"from": "human", "value": "<image>\nWhat is <region>?"}, {"from": "gpt", "value": "It is <region>."}]}
    (tmp_path / "r.jsonl").write_text(json.dumps(doc) + "\n")
    c.data.sources.caption = f"jsonl:{tmp_path}/r.jsonl"
    c.data.mix_weights = (1.0, 1.0, 0.0)
    c.optimizer.warmup_steps, c.optimizer.weight_decay = 0, 0.0  # a sampler weight moves only by its gradient
    check_static(c)
    mesh = make_mesh(dict(c.mesh))
    setup, step = build_step(c, mesh, get_layout(c.rules))
    assert {"region_slots", "region_images", "region_masks"} <= set(setup.batch_shardings)
    tok = default_tokenizer(c.data)
    local = next(iter(make_dataset(c.data, tok, batch_size=c.data.global_batch)))
    assert (local["region_slots"] >= 0).any()
    batch = {k: jax.device_put(local[k], setup.batch_shardings[k]) for k in setup.batch_shardings}
    state = init_train_state(c, setup)
    before = jax.tree.map(np.asarray, state["params"]["region_sampler"])
    state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), state["params"]["region_sampler"],
                         before)
    assert max(jax.tree.leaves(moved)) > 0
