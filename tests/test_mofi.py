"""MOFI on the dual encoder: the entity head's parameters and logits are
split on the label axis of the 8-device mesh (model x fsdp, so with model=1
too) and the compiled step never gathers the head, the entity loss (softmax
and sigmoid, with padding labels masked) and every gradient there equal a
single-device reference written here, the weighted objective combines its
parts exactly, classification alone builds no text tower and keeps records
without a caption, training raises the entity precision well above chance,
and bad MOFI settings are refused before anything is built."""

import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import grain
import ml_collections
from conftest import small_config
from flax import nnx
from jax.sharding import PartitionSpec as P

from experiments.clip_tiny import get_config as clip_tiny_config
from mmjax.config_base import base_config
from mmjax.data import pairs as pairs_module
from mmjax.data.labels import label_set
from mmjax.data.pairs import make_pair_dataset
from mmjax.data.pipeline import default_tokenizer
from mmjax.errors import ConfigError
from mmjax.models.dual_encoder import EntityHead, mofi_settings
from mmjax.models.partitioning import activation_sharding
from mmjax.parallel import activation_resolver, get_layout, make_mesh
from mmjax.train.config_checks import check_config, check_static
from mmjax.train.contrastive import contrastive_loss
from mmjax.train.entity_loss import dual_encoder_loss, entity_loss, mofi_loss
from mmjax.train.loop import build_step, make_train_dataset, train
from mmjax.train.objectives import batch_loss
from mmjax.train.state import abstract_model, init_train_state, step_inputs
from mmjax.train.step import model_forward

BATCH, TEXT_LEN, LABELS, K = 16, 8, 16, 4
# the entity head's label axis (kernel, bias and logits) split in 4 over model x fsdp, the logits' rows over data
LABEL_MESH = {"data": 2, "fsdp": 2, "expert": 1, "model": 2}
# model=1 (the default): the label axis split in 4 over fsdp alone
FSDP_MESH = {"data": 2, "fsdp": 4, "expert": 1, "model": 1}


def _config(weights=(1.0, 1.0), loss: str = "softmax", labels: int = LABELS, steps: int = 10, entities: int = 0):
    c = small_config(steps)
    c.model.name = "dual_encoder"
    c.model.vit.flavour = "clip"
    c.model.vit.patch_size = 8
    c.model.decoder.update(embed=64, heads=4, kv_heads=2, head_dim=16, mlp=128)
    c.model.contrastive.update(loss="clip", embed=32, image_pool="token", text_causal=True, text_pool="last")
    c.model.mofi.update(num_labels=labels, num_entities=entities, contrastive_weight=weights[0],
                        classification_weight=weights[1], loss=loss)
    c.data.global_batch = BATCH
    c.data.seq_len = TEXT_LEN
    c.data.max_images = 0
    c.optimizer.update(lr=3e-3, warmup_steps=min(5, steps))
    return c


def _entity_ids(rng, rows: int = BATCH, labels: int = LABELS) -> np.ndarray:
    """`[rows, K]`: 0..K labels per row (a repeated one in row 1), -1 padding; rows 0 and 5 have none."""
    ids = np.full((rows, K), -1, np.int32)
    for i in range(rows):
        n = 0 if i in (0, 5) else int(rng.integers(1, K + 1))
        ids[i, :n] = rng.choice(labels, n, replace=False)
    ids[1, :3] = [3, 3, 7]
    return ids


def _random_batch(seed: int, entities: int = LABELS) -> dict:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, TEXT_LEN + 1, BATCH)
    segment_ids = (np.arange(TEXT_LEN)[None] < lengths[:, None]).astype(np.int32)
    return {"image": rng.integers(0, 256, (BATCH, 32, 32, 3), dtype=np.uint8),
            "tokens": (rng.integers(4, 200, (BATCH, TEXT_LEN)) * segment_ids).astype(np.int32),
            "segment_ids": segment_ids, "entity_ids": _entity_ids(rng, labels=entities)}


def _place(batch: dict, setup) -> dict:
    return {k: jax.device_put(batch[k], s) for k, s in setup.batch_shardings.items()}


# ------------------------------------------------------------------ references

def _targets(entity_ids: np.ndarray, labels: int) -> tuple[np.ndarray, np.ndarray]:
    """(multi-hot `[B, V]`, labelled-row mask `[B]`) in numpy."""
    hot = np.zeros((len(entity_ids), labels))
    for i, row in enumerate(entity_ids):
        hot[i, sorted({int(v) for v in row if v >= 0})] = 1.0
    return hot, hot.sum(1) > 0


def _numpy_entity_loss(logits: np.ndarray, entity_ids: np.ndarray, kind: str,
                       entities: int | None = None) -> tuple[float, float]:
    """(loss, top-1 precision) from the definitions, float64, row by row,
    over the first `entities` labels (the rest padding)."""
    logits = np.float64(logits)[:, :entities]
    hot, labelled = _targets(entity_ids, logits.shape[1])
    losses, hits = [], []
    for z, y in zip(logits[labelled], hot[labelled]):
        if kind == "softmax":
            log_p = z - np.log(np.exp(z - z.max()).sum()) - z.max()
            losses.append(-(y / y.sum() * log_p).sum())
        else:
            p = 1 / (1 + np.exp(-z))
            losses.append(-(y * np.log(p) + (1 - y) * np.log(1 - p)).sum())
        hits.append(y[np.argmax(z)])
    return float(np.mean(losses)), float(np.mean(hits))


def _reference_loss(out: dict, entity_ids: np.ndarray, kind: str, weights, entities: int) -> jax.Array:
    """The weighted objective on one device: CLIP's loss from log-softmaxes,
    the entity loss against a target built in numpy over the first
    `entities` labels (the rest padding)."""
    hot, labelled = _targets(entity_ids, entities)
    rows = jnp.asarray(labelled, jnp.float32) / labelled.sum()
    z = out["entity_logits"][:, :entities]
    if kind == "softmax":
        per_row = -jnp.sum(jnp.asarray(hot / np.maximum(hot.sum(1, keepdims=True), 1)) * jax.nn.log_softmax(z), 1)
    else:
        per_row = -jnp.sum(hot * jax.nn.log_sigmoid(z) + (1 - hot) * jax.nn.log_sigmoid(-z), 1)
    loss = weights[1] * jnp.sum(rows * per_row)
    if weights[0]:
        logits = jnp.exp(jnp.minimum(out["logit_scale"], jnp.log(100.0))) * out["image"] @ out["text"].T
        n = logits.shape[0]
        clip = -(jnp.trace(jax.nn.log_softmax(logits, 1)) + jnp.trace(jax.nn.log_softmax(logits, 0))) / (2 * n)
        loss = loss + weights[0] * clip
    return loss


def _leaves(tree) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ------------------------------------------------------------------------ tests

@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_entity_loss_matches_numpy_on_split_labels(kind):
    rng = np.random.default_rng(0)
    mesh = make_mesh(LABEL_MESH)
    resolver = activation_resolver(mesh, get_layout("fsdp"))
    split = jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), "model"))
    rows = jax.sharding.NamedSharding(mesh, P(("data", "fsdp")))
    for entities in (LABELS, 13):  # 13: the head's last 3 labels are padding
        logits = rng.normal(0, 3, (BATCH, LABELS)).astype(np.float32)
        logits[:, entities:] = 20.0  # padding that would win the softmax and the precision if it counted
        ids = _entity_ids(rng, labels=entities)

        def loss(z, i, entities=entities):
            with activation_sharding(resolver):
                return entity_loss(z, i, kind, entities)

        value, metrics = jax.jit(loss)(jax.device_put(logits, split), jax.device_put(ids, rows))
        want, precision = _numpy_entity_loss(logits, ids, kind, entities)
        np.testing.assert_allclose(float(value), want, rtol=1e-5)
        np.testing.assert_allclose(float(metrics["entity_precision"]), precision, rtol=1e-6)
        assert float(metrics["entity_images"]) == BATCH - 2
        single = jax.jit(lambda z, i, entities=entities: entity_loss(z, i, kind, entities)[0])
        np.testing.assert_allclose(float(single(logits, ids)), float(value), rtol=1e-6)
        # an unlabelled row (0) changes nothing; a label listed twice (row 1: 3, 3, 7) counts once
        other = logits.copy()
        other[0] = rng.normal(0, 3, LABELS)
        once = ids.copy()
        once[1, :3] = [7, 3, -1]
        np.testing.assert_allclose(float(single(other, once)), float(value), rtol=1e-6)
        # padding labels take no part: another padding value changes nothing and their gradient is 0
        grad = np.asarray(jax.grad(single)(logits, ids))
        assert not grad[:, entities:].any() and np.abs(grad[:, :entities]).max() > 1e-3
        if entities < LABELS:
            moved = logits.copy()
            moved[:, entities:] = rng.normal(0, 30, (BATCH, LABELS - entities))
            np.testing.assert_allclose(float(single(moved, ids)), float(value), rtol=1e-6)


def _collective_shapes(hlo: str) -> list[tuple[str, tuple[int, ...]]]:
    """(instruction line, result dims) of every collective in compiled HLO text."""
    out = []
    for line in hlo.splitlines():
        op = re.search(r"\s(all-gather|all-reduce|all-to-all|reduce-scatter|collective-permute)(-start)?\(", line)
        if op and "=" in line[:op.start()]:
            result = line[line.index("=", 0, op.start()) + 1:op.start()]
            out += [(line.strip(), tuple(int(d) for d in dims.split(",") if d))
                    for dims in re.findall(r"\[([\d,]*)\]", result)]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind,weights,mesh,labels,entities,label_axes", [
    ("sigmoid", (1.0, 1.0), LABEL_MESH, 20, 20, ("model", "fsdp")),
    ("softmax", (0.0, 1.0), FSDP_MESH, 40, 37, "fsdp"),  # model=1; the last 3 labels pad the head
])
def test_split_head_loss_and_gradients_equal_single_device_reference(kind, weights, mesh, labels, entities,
                                                                     label_axes, capfd):
    config = _config(weights, kind, labels=labels, entities=entities)
    config.mesh.update(mesh)
    setup, _ = build_step(config, make_mesh(dict(config.mesh)), get_layout(config.rules))
    params = init_train_state(config, setup)["params"]
    head = params["entity_head"]
    assert head["kernel"].shape == (32, labels)
    assert head["kernel"].sharding.spec == P(None, label_axes)  # the label axis split 4 ways
    assert head["bias"].sharding.spec == P(label_axes)
    batch = _random_batch(1, entities)
    loss_fn = batch_loss(config.model)

    def sharded(p, b):
        def f(q):
            outputs, _ = model_forward(setup.graphdef, q, b, setup.resolver)
            with activation_sharding(setup.resolver):
                return loss_fn(outputs)[0], outputs["entity_logits"]
        return jax.value_and_grad(f, has_aux=True)(p)

    placed = _place(batch, setup)
    compiled = jax.jit(sharded, in_shardings=(setup.state_shardings["params"], setup.batch_shardings)).lower(
        params, placed).compile()
    (loss, logits), grads = compiled(params, placed)
    # the logits split their label axis like the kernel, their rows over the other batch axis
    assert logits.sharding.spec == P("data", label_axes)
    # the head never moves: no collective yields its kernel [32, V], bias [V] or anything else V wide
    collectives = _collective_shapes(compiled.as_text())
    assert collectives  # the parser sees them (the image features' gather, the gradients' reductions)
    wide = [op for op, dims in collectives if labels in dims]
    assert not wide, [op[:100] for op in wide[:3]]

    device = jax.devices()[0]
    host_params = jax.device_put(jax.device_get(params), device)
    host_batch = jax.device_put({k: batch[k] for k in setup.batch_shardings}, device)

    def reference(p, b):
        return jax.value_and_grad(lambda q: _reference_loss(model_forward(setup.graphdef, q, b)[0],
                                                            batch["entity_ids"], kind, weights, entities))(p)

    ref_loss, ref_grads = jax.jit(reference)(host_params, host_batch)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    got, want = _leaves(grads), _leaves(ref_grads)
    assert got.keys() == want.keys() and any("entity_head" in k for k in got)
    assert any("text" in k for k in got) == bool(weights[0])  # classification alone: no text tower
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5, err_msg=name)
        if not ("key" in name and "bias" in name):  # softmax ignores a bias shared by every key
            assert np.abs(want[name]).max() > 1e-4, name
    assert "Involuntary full rematerialization" not in capfd.readouterr().err


def test_weights_combine_exactly_and_pick_the_inputs():
    rng = np.random.default_rng(2)
    emb = rng.normal(size=(2, BATCH, 32)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    outputs = {"image": jnp.asarray(emb[0]), "text": jnp.asarray(emb[1]), "logit_scale": jnp.float32(2.0),
               "entity_logits": jnp.asarray(rng.normal(0, 2, (BATCH, LABELS)), jnp.float32),
               "entity_ids": jnp.asarray(_entity_ids(rng))}
    contrastive, _ = contrastive_loss(outputs, "clip")
    for kind in ("softmax", "sigmoid"):
        entity, _ = entity_loss(outputs["entity_logits"], outputs["entity_ids"], kind)
        for weights in ((1.0, 1.0), (0.0, 1.0), (2.0, 0.5)):
            loss, metrics = dual_encoder_loss(_config(weights, kind).model)(outputs)
            assert float(loss) == float(weights[0] * contrastive + weights[1] * entity), (kind, weights)
            assert float(metrics["entity_loss"]) == float(entity)
            assert ("contrastive_loss" in metrics) == bool(weights[0])
        without_text = {k: v for k, v in outputs.items() if k not in ("text", "logit_scale")}
        assert float(mofi_loss(without_text, contrastive_kind="clip", entity_kind=kind, contrastive_weight=0.0,
                               classification_weight=1.0)[0]) == float(entity)
    plain = _config((1.0, 0.0), labels=0).model
    assert float(dual_encoder_loss(plain)(outputs)[0]) == float(contrastive)  # (1, 0): plain CLIP

    assert step_inputs(_config((1.0, 0.0), labels=0)) == ("image", "tokens", "segment_ids")
    assert step_inputs(_config((1.0, 1.0))) == ("image", "tokens", "segment_ids", "entity_ids")
    assert step_inputs(_config((0.0, 1.0))) == ("image", "entity_ids")  # no text reaches the devices
    _, alone = abstract_model(_config((0.0, 1.0)).model)
    assert set(alone.keys()) == {"vit", "image_projection", "entity_head"}
    _, both = abstract_model(_config((1.0, 1.0), "sigmoid").model)
    assert {"text", "text_projection", "logit_scale", "entity_head"} <= set(both.keys())
    for path, v in jax.tree_util.tree_flatten_with_path(both, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]:
        assert len(v.get_metadata()["logical_axes"]) == len(v.shape), jax.tree_util.keystr(path)
    # the sigmoid head starts at the log-odds of a 1/V prior, the softmax head at 0
    sigmoid = EntityHead(32, LABELS, "sigmoid", rngs=nnx.Rngs(0))
    np.testing.assert_allclose(np.asarray(sigmoid.bias[...]), -math.log(LABELS - 1), rtol=1e-6)
    assert not np.asarray(EntityHead(32, LABELS, "softmax", rngs=nnx.Rngs(0)).bias[...]).any()


def _tiny_mofi(steps: int):
    """experiments/clip_tiny.py:mofi shrunk: one ViT block and text layer, 16 pairs a step."""
    c = clip_tiny_config("mofi")
    c.model.vit.depth = 1
    c.model.decoder.layers = 1
    c.data.global_batch = 16
    c.data.seq_len = 24
    c.optimizer.update(lr=3e-3, warmup_steps=5)
    c.train.update(steps=steps, log_every=1, checkpoint_every=steps)
    return c


@pytest.mark.slow
def test_mofi_on_procedural_pairs_raises_entity_precision_well_above_chance(tmp_path):
    config = _tiny_mofi(30)
    # chance: a label picked at random is one of the image's n entities with probability n / 10
    batch = next(iter(make_pair_dataset(config.data, default_tokenizer(config.data), batch_size=64)))
    counts = (batch["entity_ids"] >= 0).sum(1)
    chance = float(np.mean(counts[counts > 0] / config.model.mofi.num_labels))
    assert 0.2 < chance < 0.45 and counts.min() > 0
    train(config, str(tmp_path))
    with open(tmp_path / "metrics.jsonl") as f:
        records = [r for r in map(json.loads, f) if "loss" in r]
    assert len(records) == 30
    precision = [r["entity_precision"] for r in records]
    assert np.mean(precision[:3]) < chance + 0.2, precision  # the first steps' metrics: the initial head's
    assert np.mean(precision[-5:]) > max(0.75, chance + 0.4), precision
    for part in ("entity_loss", "contrastive_loss"):  # both objectives train
        first, last = (np.mean([r[part] for r in rs]) for rs in (records[:5], records[-5:]))
        assert last < 0.9 * first, (part, first, last)
    for r in records:
        assert r["loss"] == pytest.approx(r["contrastive_loss"] + r["entity_loss"], rel=1e-5)


def test_clip_tiny_mofi_configs():
    both, alone = clip_tiny_config("mofi"), clip_tiny_config("mofi-cls")
    for c in (both, alone):
        check_config(c, 8, 1)
        assert c.model.mofi.num_labels == 10 and c.model.mofi.classification_weight == 1.0
    assert both.model.mofi.contrastive_weight == 1.0 and both.data.pair_text == "entities"
    assert alone.model.mofi.contrastive_weight == 0.0
    assert step_inputs(alone) == ("image", "entity_ids")
    assert clip_tiny_config("clip").model.mofi.num_labels == 0  # the CLIP / SigLIP variants are unchanged
    # one set of defaults: a model config without a mofi block reads the base config's
    assert mofi_settings(clip_tiny_config("clip").model) == mofi_settings(ml_collections.ConfigDict()) == dict(
        base_config().model.mofi)
    with pytest.raises(ValueError, match="'siglip' \\(default\\) or 'clip', or MOFI's 'mofi' or 'mofi-cls'"):
        clip_tiny_config("mofi-x")


@pytest.mark.parametrize("change,message", [
    (dict(loss="focal"), r"config.model.mofi.loss='focal' is invalid; use one of 'sigmoid', 'softmax'"),
    (dict(contrastive_weight=-1.0), r"config.model.mofi.contrastive_weight=-1.0 is invalid; use a non-negative"),
    (dict(classification_weight=-0.5), r"config.model.mofi.classification_weight=-0.5 is invalid"),
    (dict(num_entities=-1), r"config.model.mofi.num_entities=-1 is invalid"),
    (dict(contrastive_weight=0.0, classification_weight=0.0), r"contrastive_weight=0.0 and config.model.mofi."
                                                              r"classification_weight=0 leave the dual encoder"),
    (dict(num_labels=0), r"config.model.mofi.classification_weight=1.0 weighs an entity loss without an entity"),
    (dict(classification_weight=0.0), r"config.model.mofi.num_labels=10 builds an entity head that config.model."
                                      r"mofi.classification_weight=0 leaves untrained"),
    # without the entity head the contrastive loss trains alone: a weight would only scale it
    (dict(num_labels=0, classification_weight=0.0, contrastive_weight=2.0),
     r"config.model.mofi.contrastive_weight=2.0 would only scale the contrastive loss, which trains alone without "
     r"an entity head \(config.model.mofi.num_labels=0\); leave it at 1\.$"),
    (dict(num_labels=0, classification_weight=0.0, num_entities=10),
     r"config.model.mofi.num_entities=10 counts the entities of an entity head that config.model.mofi.num_labels=0"),
])
def test_refusals(change, message):
    config = _config(labels=10)
    config.model.mofi.update(change)
    with pytest.raises(ConfigError, match=message):
        check_static(config)


def test_a_dual_encoder_without_text_tower_or_entity_head_is_refused():
    config = _config((0.0, 1.0), labels=0)
    with pytest.raises(ConfigError, match=r"contrastive_weight=0.0 drops the text tower, which leaves a dual encoder "
                                          r"without an entity head"):
        build_step(config, make_mesh(dict(config.mesh)), get_layout(config.rules))


def test_label_count_padding_and_split_refusals():
    config = _config(labels=10)  # the procedural label set: 6 colours and 4 kinds
    check_config(config, 8)
    config.model.mofi.num_labels = 9
    with pytest.raises(ConfigError, match=r"config.model.mofi.num_labels=9 is fewer than the 10 entities of the "
                                          r"label set \(config.data.labels.entities\)\.$"):
        check_static(config)
    config.model.mofi.num_labels = 12  # two padding labels, once num_entities says so
    with pytest.raises(ConfigError, match=r"config.model.mofi.num_entities=0 makes all config.model.mofi."
                                          r"num_labels=12 labels entities, but the label set has 10"):
        check_static(config)
    config.model.mofi.num_entities = 11
    with pytest.raises(ConfigError, match=r"config.model.mofi.num_entities=11 differs from the 10 entities"):
        check_static(config)
    config.model.mofi.num_entities = 10
    check_config(config, 8)
    # the head's label axis must divide the mesh axes that split it (model x fsdp), checked before any build
    config.model.mofi.num_labels = 11
    check_static(config)
    with pytest.raises(ConfigError, match=r"config.model.mofi.num_labels=11 is not divisible by the 2 shards of mesh "
                                          r"axes \('model', 'fsdp'\) that split the entity head; pad it to a "
                                          r"multiple of 2 \(e.g. 12, with config.model.mofi.num_entities"):
        check_config(config, 8)
    config.model.mofi.num_labels = 14
    check_config(config, 8)  # data=2 x fsdp=2 x expert=2: split in 2
    config.mesh.update(LABEL_MESH)
    with pytest.raises(ConfigError, match=r"num_labels=14 is not divisible by the 4 shards"):
        check_config(config, 8)
    config.rules = "data_parallel"  # a layout that keeps the head whole takes any count
    check_config(config, 8)


@pytest.mark.parametrize("change,message", [
    (dict(num_labels=10, classification_weight=1.0), r"config.model.mofi.num_labels=10 puts an entity head on "
                                                     r"the dual encoder, but config.model.name='mm1'; use 0\.$"),
    (dict(contrastive_weight=0.5), r"config.model.mofi.contrastive_weight=0.5 applies to the dual encoder only, "
                                   r"which config.model.name='mm1' is not; leave it at 1.0\.$"),
    (dict(loss="sigmoid"), r"config.model.mofi.loss='sigmoid' applies to the dual encoder only"),
    (dict(num_entities=10), r"config.model.mofi.num_entities=10 applies to the dual encoder only"),
])
def test_mofi_settings_on_another_model_are_refused(change, message):
    config = small_config()
    check_static(config)
    config.model.mofi.update(change)
    with pytest.raises(ConfigError, match=message):
        check_static(config)


def test_classification_alone_keeps_labelled_records_without_a_caption(monkeypatch):
    def record(i, caption=None, image=True, entities=()):
        segments = ([{"image": np.full((40, 48, 3), 40 * i, np.uint8)}] if image else []) + (
            [{"text": caption}] if caption else [])
        return {"stream": "caption", "origin": f"record {i}", "segments": segments,
                "labels": {"entities": list(entities)} if entities else {}}

    records = [record(1, "a red circle", entities=("red", "circle")), record(2, entities=("blue", "square")),
               record(3, "no image", image=False, entities=("red",)), record(4)]
    monkeypatch.setattr(pairs_module, "open_stream",
                        lambda *a, **k: grain.MapDataset.source(records).repeat().to_iter_dataset())
    alone, both = clip_tiny_config("mofi-cls"), clip_tiny_config("mofi")
    both.data.pair_text = "caption"
    tok = default_tokenizer(alone.data)
    ids = lambda names: sorted(label_set(alone.data).ids("entities", names)[0])  # noqa: E731
    # no text tower: the record without a caption (2) and the unlabelled one (4) are kept, the imageless one not
    batch = next(iter(make_train_dataset(alone, tok, batch_size=3, process_index=0, process_count=1)))
    assert batch["image"][:, 0, 0, 0].tolist() == [40, 80, 160]
    assert [sorted(i for i in row if i >= 0) for row in batch["entity_ids"]] == [ids(["red", "circle"]),
                                                                               ids(["blue", "square"]), []]
    assert batch["segment_ids"][0].sum() > 0 and not batch["segment_ids"][1:].any()
    assert (batch["tokens"][1:] == tok.pad_id).all() and batch["skipped_records"].tolist() == [0, 0, 1]
    # with the text tower every pair needs its caption: record 1 alone comes through
    batch = next(iter(make_train_dataset(both, tok, batch_size=2, process_index=0, process_count=1)))
    assert batch["image"][:, 0, 0, 0].tolist() == [40, 40] and batch["segment_ids"].sum(1).min() > 0
