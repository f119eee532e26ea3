"""The vit_classifier model (a Mobile V-MoE ViT + a class head) with the
"classification" objective: on the 8-device mesh with expert=2 the expert
weights are split over `expert` and loss and gradients equal one device;
the jitted train step learns; the top1_accuracy evaluator equals numpy."""

import types

import jax
import numpy as np
import pytest
from flax import nnx

from experiments.vmoe_tiny import get_config
from mmjax.models import build_model, model_spec
from mmjax.models.partitioning import activation_sharding
from mmjax.parallel import batch_sharding, get_layout, make_mesh
from mmjax.parallel.rules import logical_to_spec
from mmjax.train.loop import build_step
from mmjax.train.objectives import batch_loss
from mmjax.train.state import init_train_state, step_inputs
from mmjax.train.step import model_forward

BATCH, SIZE = 16, 16


def _config(steps: int = 10, **moe):
    c = get_config("moe")
    c.model.vit.update(depth=2, patch_size=4)
    c.data.image_size = SIZE
    c.model.vit.moe.update(dict(num_experts=4, top_k=2, capacity_factor=2.0, superclass_weight=0.5), **moe)
    c.data.global_batch = BATCH
    c.train.steps = steps
    c.optimizer.update(lr=3e-3, warmup_steps=min(5, steps))
    return c


def _place(batch: dict, setup) -> dict:
    rules = get_layout("fsdp")
    return {k: jax.device_put(v, batch_sharding(setup.mesh, rules, v.ndim)) for k, v in batch.items()}


def _random_batch(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    class_id = rng.integers(0, 4, BATCH).astype(np.int32)
    class_id[:3] = -1  # unlabelled rows are left out
    superclass_id = np.where(class_id == 0, 0, 1).astype(np.int32)
    superclass_id[:2] = -1
    return {"image": rng.integers(0, 256, (BATCH, SIZE, SIZE, 3), dtype=np.uint8), "class_id": class_id,
            "superclass_id": superclass_id}


def _leaves(tree) -> dict:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}


def test_registered_with_the_classification_objective_and_a_vocab_sharded_head():
    config = _config()
    spec = model_spec(config.model)
    assert spec.objective == "classification" and spec.uses_images
    assert step_inputs(config) == ("image", "superclass_id", "class_id")
    config.model.vit.moe.superclass_weight = 0.0
    assert step_inputs(config) == ("image", "class_id")  # no super-class labels needed
    model = nnx.eval_shape(lambda: build_model(config.model, nnx.Rngs(0)))
    axes = model.head.kernel.get_metadata()["logical_axes"]
    mesh = types.SimpleNamespace(shape={"data": 1, "fsdp": 2, "expert": 1, "model": 2})
    assert logical_to_spec(axes, get_layout("fsdp"), mesh, (64, 4)) == jax.sharding.PartitionSpec("fsdp", "model")


@pytest.mark.slow  # the held-out batches rendered, two compiles
def test_top1_evaluator_equals_numpy():
    from mmjax.data.labels import label_set
    from mmjax.data.pairs import make_pair_dataset
    from mmjax.data.pipeline import default_tokenizer
    from mmjax.train.evaluators import evaluator_spec

    config = _config()
    config.data.sources.caption = "procedural"  # the evaluator reads its own source, not the training one
    config.evaluators.top1_accuracy.num_examples = 40  # 3 batches of 16
    setup, _ = build_step(config, make_mesh(dict(config.mesh)), get_layout(config.rules))
    params = init_train_state(config, setup)["params"]
    tokenizer = default_tokenizer(config.data)
    got = evaluator_spec(config, "top1_accuracy").make(config, setup, tokenizer, "top1_accuracy")(params)
    # numpy: the source's held-out records, the model on one device
    data = config.data.copy_and_resolve_references()
    data.sources.caption = "procedural:classes"
    rows = iter(make_pair_dataset(data, tokenizer, batch_size=BATCH, split="eval"))
    host = jax.device_put(jax.device_get(params), jax.devices()[0])
    predicted, class_id, superclass_id = [], [], []
    for _ in range(3):
        batch = next(rows)
        logits = jax.jit(lambda p, b: model_forward(setup.graphdef, p, b)[0]["logits"])(
            host, {"image": batch["image"], "superclass_id": batch["superclass_id"]})
        predicted.append(np.argmax(np.asarray(logits), axis=-1))
        class_id.append(batch["class_id"])
        superclass_id.append(batch["superclass_id"])
    predicted, class_id, superclass_id = map(np.concatenate, (predicted, class_id, superclass_id))
    assert (class_id >= 0).all()  # every procedural:classes record is labelled
    correct = predicted == class_id
    want = {"top1_accuracy": correct.mean(), "eval_images": 48}
    for s, name in enumerate(label_set(config.data).superclasses):
        want[f"superclass/{name}"] = correct[superclass_id == s].mean()
    assert got.keys() == want.keys() and got["eval_images"] == 48
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
    assert 0 < got["top1_accuracy"] < 1  # an untrained head: neither all right nor all wrong
    # a model that is not a classifier is skipped with a reason
    other = get_config("moe")
    other.model.name = "dual_encoder"
    assert "is not a classifier" in evaluator_spec(other, "top1_accuracy").make(other, setup, tokenizer, "x")


@pytest.mark.slow  # two compiles of the forward and backward pass (8 devices and one)
def test_sharded_loss_and_gradients_equal_single_device():
    config = _config(capacity_factor=2.0)  # = num_experts / top_k: no image dropped on either side
    setup, _ = build_step(config, make_mesh(dict(config.mesh)), get_layout(config.rules))
    params = init_train_state(config, setup)["params"]
    moe = params["vit"]["blocks"]["layers"][1]["moe"]
    for name in ("wi", "bi", "wo", "bo"):
        assert moe[name].get_value().sharding.spec[0] == "expert", name
    assert moe["wi"].get_value().sharding.spec == jax.sharding.PartitionSpec("expert", "fsdp", None)
    batch = _random_batch(1)
    loss_fn = batch_loss(config.model)

    def value_and_grad(p, b, resolver):
        def f(q):
            outputs, _ = model_forward(setup.graphdef, q, b, resolver)
            with activation_sharding(resolver):
                loss, metrics = loss_fn(outputs, b)
            return loss, metrics
        return jax.value_and_grad(f, has_aux=True)(p)

    (loss, metrics), grads = jax.jit(lambda p, b: value_and_grad(p, b, setup.resolver))(
        params, _place(batch, setup))
    device = jax.devices()[0]
    (ref_loss, ref_metrics), ref_grads = jax.jit(lambda p, b: value_and_grad(p, b, None))(
        jax.device_put(jax.device_get(params), device), jax.device_put(batch, device))
    assert len(ref_loss.sharding.device_set) == 1
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    for key in ("classification_loss", "accuracy", "superclass_loss", "load_balance_loss", "router_z_loss"):
        np.testing.assert_allclose(float(metrics[key]), float(ref_metrics[key]), rtol=1e-5, err_msg=key)
    assert float(metrics["dropped_fraction"]) == 0.0 and float(metrics["labelled_images"]) == BATCH - 3
    # the loss is CE + the MoE aux losses weighted by vit.moe (one MoE block)
    moe_cfg = config.model.vit.moe
    want = (metrics["classification_loss"] + moe_cfg.load_balance_weight * metrics["load_balance_loss"]
            + moe_cfg.router_z_weight * metrics["router_z_loss"]
            + moe_cfg.superclass_weight * metrics["superclass_loss"])
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)
    got, ref = _leaves(grads), _leaves(ref_grads)
    assert got.keys() == ref.keys() and any("moe" in k and "wi" in k for k in got)
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-4, atol=1e-5, err_msg=name)
        if "bias" not in name or "attn" not in name:
            assert np.abs(ref[name]).max() > 1e-6, name  # every parameter takes part


def _shape_batch(rng, palette) -> dict:
    """Class c: images of colour c (plus noise); super-class: c == 0 or not."""
    class_id = rng.integers(0, 4, BATCH).astype(np.int32)
    noise = rng.normal(0, 16, (BATCH, SIZE, SIZE, 3))
    images = np.clip(palette[class_id][:, None, None, :] + noise, 0, 255).astype(np.uint8)
    return {"image": images, "class_id": class_id, "superclass_id": (class_id != 0).astype(np.int32)}


@pytest.mark.slow  # 30 jitted train steps
def test_train_step_learns_to_classify(capfd):
    steps = 30
    config = _config(steps)
    setup, step = build_step(config, make_mesh(dict(config.mesh)), get_layout(config.rules))
    state = init_train_state(config, setup)
    rng = np.random.default_rng(0)
    palette = rng.uniform(0, 255, (4, 3))
    history = []
    for _ in range(steps):
        state, metrics = step(state, _place(_shape_batch(rng, palette), setup))
        history.append([float(metrics[k]) for k in ("loss", "accuracy", "superclass_routed")])
    loss, accuracy, routed = np.asarray(history).T
    assert np.isfinite(loss).all()
    assert loss[-5:].mean() < 0.5 * loss[:5].mean(), loss
    assert accuracy[:5].mean() < 0.6 and accuracy[-5:].mean() > 0.9, accuracy
    # the super-class loss pulls routing to its mapping: from about chance (1 of 4 experts) to nearly all images
    assert routed[:5].mean() < 0.6 and routed[-10:].min() >= 0.9, routed
    assert metrics["expert_fraction_image"].shape == (1, 4) and float(metrics["moe_tokens_image"]) == BATCH
    # the routing health report reads the images' statistics (no text tokens)
    from mmjax.train.routing_health import routing_scalars

    scalars = routing_scalars(jax.device_get(metrics))
    assert {"moe_layer0/image/load_max_over_mean", "moe_layer0/all/dropped_fraction"} <= set(scalars)
    assert not any("/text/" in k for k in scalars)
    assert "Involuntary full rematerialization" not in capfd.readouterr().err


def test_vision_pair_of_moe_vs_dense_has_dense_active_params_and_reports_executed_expert_flops():
    """Per image the tiny pair's MoE passes through the dense MLP's parameters
    (+ the router), but its capacity buffers (E=2, top_k=1, capacity_factor=2:
    C = S images per expert) execute twice the dense MLP FLOPs; the bench
    reports that next to the step time, and capacity_factor=1 halves it."""
    import math

    from experiments import vmoe_tiny
    from mmjax.bench.harness import first_batch
    from mmjax.bench.moe_vs_dense import COLUMNS, dispatch_name, expert_compute, parse_args, print_table, \
        variants, vision_moe
    from mmjax.train.param_counts import param_counts

    dense_args, moe_args = parse_args(["--config", "experiments/vmoe_tiny.py:tiny", "--steps", "2"])
    dense, moe = dense_args.config, moe_args.config
    assert not vision_moe(dense) and vision_moe(moe) and dense_args.steps == 2
    assert list(variants(dense, moe)) == ["dense", "moe-capacity"]
    assert (dispatch_name(dense), dispatch_name(moe)) == ("dense", "capacity")
    d, m = param_counts(dense), param_counts(moe)
    assert d["total"] == d["active"]
    # top-1 of experts as wide as the dense MLP: per image the same MLP parameters, plus the router
    n_moe = moe.model.vit.depth // moe.model.vit.moe.moe_every
    assert m["active"] - d["active"] == n_moe * moe.model.vit.embed * moe.model.vit.moe.num_experts
    assert m["total"] > m["active"]
    # executed expert FLOPs: each of E experts runs C slots of each batch shard's S images
    e, k, f = moe.model.vit.moe.num_experts, moe.model.vit.moe.top_k, moe.model.vit.moe.capacity_factor
    shards = moe.mesh.data * moe.mesh.fsdp * moe.mesh.expert
    s = moe.data.global_batch // shards
    assert expert_compute(moe) == (f, e * math.ceil(k * s * f / e) / s) == (2.0, 2.0)
    assert expert_compute(dense)[1] == 1.0
    moe.model.vit.moe.capacity_factor = 1.0
    assert expert_compute(moe) == (1.0, 1.0)
    assert {"capacity_factor", "expert_flops_ratio"} <= set(COLUMNS)
    lines = []
    row = dict(config="moe-capacity", dispatch="capacity", params=1, active_params=1, capacity_factor=2.0,
               expert_flops_ratio=2.0, step_time_s=0.1, step_time_p90_s=0.1, collective_bytes=0, ratio_to_dense=1.0)
    print_table([row], "2x2x2x1", 2, log=lines.append)
    assert "MLP FLOPs" in lines[1] + lines[2] and " 2.00x " in lines[-1]
    # the bench's batch comes from the pipeline the model trains on: pair batches for the classifier
    batch = first_batch(dense)
    assert batch["image"].shape == (dense.data.global_batch, 8, 8, 3) and (batch["class_id"] >= 0).all()
    with pytest.raises(ValueError, match="takes one of"):
        vmoe_tiny.get_config("sparse")
    from mmjax.train.config_checks import check_config

    for name in vmoe_tiny.NAMES:
        check_config(vmoe_tiny.get_config(name), 8)


def test_evaluation_prediction_does_not_depend_on_the_other_images_of_its_batch():
    """Trained with capacity_factor=0.5 (images dropped), the top1 evaluator's
    forward runs at the evaluation capacity (vit.moe.eval_capacity_factor=0:
    E / top_k): the logits of an image are the same in two batches that
    differ in every other image (each sharing a dispatch group with it);
    at the training capacity they are not."""
    from mmjax.models.vision_moe import eval_model_config
    from mmjax.train.classification_eval import make_predict
    from mmjax.train.state import abstract_model

    config = _config(capacity_factor=0.5)
    setup, _ = build_step(config, make_mesh(dict(config.mesh)), get_layout(config.rules))
    params = init_train_state(config, setup)["params"]
    a, b = _random_batch(1), _random_batch(2)
    shared = np.arange(BATCH) % 2 == 0  # every group of 2 images: one shared, one other
    b = {k: np.where(shared.reshape((-1,) + (1,) * (v.ndim - 1)), a[k], v) for k, v in b.items()}
    a, b = _place(a, setup), _place(b, setup)
    eval_graphdef = abstract_model(eval_model_config(config.model))[0]
    forward = jax.jit(lambda p, x, train: jax.lax.cond(  # noqa: E731
        train, lambda: model_forward(setup.graphdef, p, x, setup.resolver)[0]["logits"],
        lambda: model_forward(eval_graphdef, p, x, setup.resolver)[0]["logits"]))
    (eval_a, train_a), (eval_b, train_b) = ([np.asarray(forward(params, x, t)) for t in (False, True)] for x in (a, b))
    np.testing.assert_allclose(eval_a[shared], eval_b[shared], rtol=1e-6, atol=1e-6)
    assert np.abs(train_a[shared] - train_b[shared]).max() > 1e-3  # dropped images: the batch decides
    predict = make_predict(config, setup)
    got_a, got_b = (np.asarray(predict(params, x)[0]) for x in (a, b))
    np.testing.assert_array_equal(got_a[shared], got_b[shared])
    np.testing.assert_array_equal(got_a, np.argmax(eval_a, axis=-1))
    assert eval_model_config(config.model).vit.moe.capacity_factor == 2.0  # 4 experts / top_k 2
    config.model.vit.moe.eval_capacity_factor = 1.5
    assert eval_model_config(config.model).vit.moe.capacity_factor == 1.5
