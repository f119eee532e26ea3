"""Optimizer options (LR rule, weight-decay exclusions, per-module freezing
and LR scales) and the train step's gradient accumulation and bf16 compute."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import small_config
from flax import nnx

from mmjax.models.layers import Dense, RMSNorm
from mmjax.parallel import get_layout, make_mesh
from mmjax.train import optimizer as opt
from mmjax.train.state import abstract_model, build_train_setup
from mmjax.train.step import make_train_step


class _Block(nnx.Module):
    def __init__(self, rngs):
        self.dense = Dense(8, 16, ("embed", "mlp"), rngs=rngs, use_bias=True)
        self.norm = RMSNorm(16, rngs=rngs, logical_axes=("mlp",))


class _Toy(nnx.Module):
    """Three top-level modules named like MM1Model's, a few parameters each
    (cheap to compile optimizer updates for)."""

    def __init__(self, rngs):
        self.vit, self.connector, self.decoder = _Block(rngs), _Block(rngs), _Block(rngs)


def _toy_params(seed=0):
    """The toy's params filled from a host RNG."""
    rng = np.random.default_rng(seed)
    params = nnx.state(nnx.eval_shape(lambda: _Toy(nnx.Rngs(0))), nnx.Param)
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(0.0, 0.5, x.shape).astype(np.float32)), params)


def _flat(tree) -> dict:
    """{"dotted.path": leaf value} of a params-shaped tree."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    return {".".join(opt._path_names(p)): (v.get_value() if isinstance(v, nnx.Variable) else v) for p, v in leaves}


# ------------------------------------------------------------------ weight decay

_NORMS = ["decoder.final_norm.scale", "vit.ln_post.scale", "connector.stage1.blocks.layers.0.norm1.scale"]
_BIASES = ["vit.ln_post.bias", "vit.blocks.layers.0.fc1.bias", "vit.blocks.layers.0.attn.query.bias",
           "connector.readout1.bias"]
_EMBEDDINGS = ["decoder.embedder.embedding", "decoder.lm_head.kernel", "vit.pos_embed", "connector.pos_embed"]
_MATRICES = ["decoder.layers.layers.0.mlp.gate.kernel", "vit.patch_embed.kernel",
             "connector.stage1.blocks.layers.0.conv2.kernel", "decoder.layers.layers.0.attn.query.kernel"]


@pytest.mark.parametrize("no_decay", [(), ("norms",), ("biases",), ("embeddings",),
                                      ("norms", "biases", "embeddings")])
def test_weight_decay_mask_excludes_the_chosen_categories(no_decay):
    _, params = abstract_model(small_config().model)
    mask = _flat(opt.weight_decay_mask(params, no_decay))
    for names, category in ((_NORMS, "norms"), (_BIASES, "biases"), (_EMBEDDINGS, "embeddings")):
        for name in names:
            assert mask[name] == (category not in no_decay), name
    assert all(mask[name] for name in _MATRICES)
    # Every parameter falls in exactly one category.
    cats = {name: opt.parameter_category(tuple(name.split(".")), v) for name, v in
            ((".".join(opt._path_names(p)), v) for p, v in jax.tree_util.tree_flatten_with_path(
                params, is_leaf=lambda x: isinstance(x, nnx.Variable))[0])}
    assert {cats[n] for n in _NORMS} == {"norms"} and {cats[n] for n in _BIASES} == {"biases"}
    assert all(mask[n] == (c not in no_decay) for n, c in cats.items())


def test_scanned_layers_keep_their_categories_and_bad_categories_fail():
    cfg = small_config().model
    cfg.decoder.scan = True
    cfg.vit.scan = True
    cfg.connector.scan = True
    _, params = abstract_model(cfg)
    mask = _flat(opt.weight_decay_mask(params))
    scanned = [n for n in mask if n.startswith("decoder.layers.layers.")]
    assert not mask["decoder.layers.layers.attn_norm.scale"] and not mask["vit.blocks.layers.fc1.bias"]
    assert not mask["connector.stage1.blocks.layers.norm1.scale"]
    assert not mask["connector.stage2.blocks.layers.conv1.bias"]
    assert mask["connector.stage1.blocks.layers.conv2.kernel"]
    assert mask["decoder.layers.layers.mlp.up.kernel"] and len(scanned) > 3
    with pytest.raises(ValueError, match="no_decay"):
        opt.weight_decay_mask(params, ("norms", "gains"))


# ----------------------------------------------------------------- learning rate

def test_mm1_rule_sizes_the_peak_lr_by_the_decoder_without_vocab_tables():
    c = small_config()
    _, params = abstract_model(c.model)
    d = c.model.decoder  # 1 layer, embed 128, heads 4, kv_heads 2, head_dim 32, mlp 256
    layer = 2 * d.embed * d.heads * d.head_dim + 2 * d.embed * d.kv_heads * d.head_dim + 3 * d.embed * d.mlp
    expected_n = d.layers * (layer + 2 * d.embed) + d.embed
    assert opt.decoder_param_count(params) == expected_n
    c.optimizer.lr_rule = "mm1"
    peak = opt.peak_learning_rate(c.optimizer, expected_n)
    assert peak == pytest.approx(math.exp(-0.4214 * math.log(expected_n) - 0.5535))
    assert opt.peak_learning_rate(c.optimizer, 3e9) == pytest.approx(5.85e-5, rel=1e-2)
    schedule = opt.learning_rate_schedule(c.optimizer, 100, params)
    assert float(schedule(c.optimizer.warmup_steps)) == pytest.approx(peak, rel=1e-6)
    assert float(schedule(100)) == pytest.approx(peak * c.optimizer.min_lr_ratio, rel=1e-5)
    with pytest.raises(ValueError, match="lr_rule='mm1'"):
        opt.learning_rate_schedule(c.optimizer, 100)
    c.optimizer.lr_rule = "fixed"
    assert float(opt.learning_rate_schedule(c.optimizer, 100)(c.optimizer.warmup_steps)) == pytest.approx(1e-3)


def _mm1_peak(config) -> float:
    """The peak LR the train loop's schedule reaches for `config`."""
    _, params = abstract_model(config.model)
    schedule = opt.learning_rate_schedule(config.optimizer, config.train.steps, params, config.model.decoder)
    return float(schedule(config.optimizer.warmup_steps))


@pytest.mark.parametrize("moe_size,dense_size", [("3b-moe", "3b"), ("7b-moe", "7b")])
def test_mm1_moe_configs_get_their_dense_twins_peak_lr(moe_size, dense_size):
    """MM1 trains its MoE models with the dense backbone's hyper-parameters:
    same peak LR. Counting every expert (the old rule) gives a 2-4x lower one."""
    from experiments import mm1

    moe_cfg, dense_cfg = mm1.get_config(moe_size), mm1.get_config(dense_size)
    assert moe_cfg.model.decoder.moe.num_experts > 0 and dense_cfg.model.decoder.moe.num_experts == 0
    assert moe_cfg.optimizer.lr_rule == dense_cfg.optimizer.lr_rule == "mm1"
    dense_lr, moe_lr = _mm1_peak(dense_cfg), _mm1_peak(moe_cfg)
    assert moe_lr == pytest.approx(dense_lr, rel=1e-6)
    moe_cfg.optimizer.lr_moe_count = "total"
    assert _mm1_peak(moe_cfg) < dense_lr / 2
    moe_cfg.optimizer.lr_moe_count = "active"  # top-2 experts of the dense MLP's width: more than dense
    assert _mm1_peak(moe_cfg) < 0.95 * dense_lr


def test_decoder_param_count_of_an_moe_decoder_against_closed_forms():
    """N for `lr_moe_count` = total / active / dense on a small MoE decoder
    (2 layers, MoE on the 2nd, shared expert on), written out by hand."""
    c = small_config()
    d = c.model.decoder
    d.layers = 2
    d.moe.update(dict(num_experts=4, top_k=2, moe_every=2, expert_mlp=64, shared_expert=True))
    _, params = abstract_model(c.model)
    m, e, k, h = d.embed, 4, 2, 64
    attention = m * d.head_dim * (2 * d.heads + 2 * d.kv_heads)
    common = 2 * (attention + 2 * m) + m  # two layers' attention and norms, the final norm
    dense_mlp = 3 * m * d.mlp
    expected = {
        "total": common + dense_mlp + m * e + e * 3 * m * h + 3 * m * h,
        "active": common + dense_mlp + m * e + k * 3 * m * h + 3 * m * h,
        "dense": common + 2 * dense_mlp,
    }
    for count, n in expected.items():
        assert opt.decoder_param_count(params, d, count) == n, count
    assert opt.decoder_param_count(params) == expected["total"]  # without the decoder config
    d.moe.num_experts = 0
    _, dense_params = abstract_model(c.model)
    assert opt.decoder_param_count(dense_params, d) == expected["dense"]
    with pytest.raises(ValueError, match="lr_moe_count"):
        opt.decoder_param_count(params, d, "routed")


def test_mm1_weight_decay_shrinks_by_a_tenth_of_the_scheduled_lr():
    c = small_config()
    c.optimizer.weight_decay_rule = "mm1"
    c.optimizer.lr_rule = "mm1"
    params = _toy_params()
    assert opt.decoder_param_count(params) == 8 * 16 + 16 + 16
    tx = opt.make_optimizer(c.optimizer, 50, params)
    update = jax.jit(lambda s: tx.update(jax.tree.map(jnp.zeros_like, params), s, params))
    _, state = update(tx.init(params))  # step 0: lr 0 in warmup
    updates, _ = update(state)  # step 1: zero gradients, only the decay moves
    lr = float(opt.learning_rate_schedule(c.optimizer, 50, params)(1))
    assert lr > 0
    u, p = _flat(updates), _flat(params)
    for name in ("decoder.dense.kernel", "vit.dense.kernel"):
        np.testing.assert_allclose(u[name], -0.1 * lr * p[name], rtol=1e-5, atol=1e-12)
    assert not np.any(u["decoder.norm.scale"]) and not np.any(u["decoder.dense.bias"])


# ------------------------------------------------------- freezing and LR scales

def test_module_lr_scale_parses_and_longest_prefix_wins():
    assert opt.parse_module_lr_scale("vit=0.0, connector=2") == {"vit": 0.0, "connector": 2.0}
    assert opt.parse_module_lr_scale("") == {}
    for bad in ("vit", "vit=-1", "vit=x", "=2"):
        with pytest.raises(ValueError, match="module_lr_scale"):
            opt.parse_module_lr_scale(bad)
    _, params = abstract_model(small_config().model)
    scales = _flat(opt.module_lr_scales({"module_lr_scale": "vit=0,vit.ln_post=0.5"}, params))
    assert scales["vit.ln_post.scale"] == 0.5 and scales["vit.pos_embed"] == 0.0
    assert scales["decoder.final_norm.scale"] == 1.0
    trainable = _flat(opt.trainable_mask({"module_lr_scale": "vit=0"}, params))
    assert all(t == (not n.startswith("vit.")) for n, t in trainable.items())
    with pytest.raises(ValueError, match="match no parameter"):
        opt.module_lr_scales({"module_lr_scale": "vision=0"}, params)


def test_frozen_modules_stay_bit_identical_and_scaled_modules_move_proportionally():
    c = small_config()
    params = _toy_params()
    grads = [_toy_params(seed) for seed in (1, 2, 3)]

    def run(spec):
        c.optimizer.module_lr_scale = spec
        tx = opt.make_optimizer(c.optimizer, 10, params)

        @jax.jit
        def step(g, s, p):
            updates, s = tx.update(g, s, p)
            return optax.apply_updates(p, updates), s

        p, s = params, tx.init(params)
        for g in grads:
            p, s = step(g, s, p)
        return _flat(p), s

    base, frozen, scaled = _flat(params), *[run(spec) for spec in ("vit=0", "vit=0,connector=2.0")]
    (p1, s1), (p2, _) = frozen, scaled
    for name, value in base.items():
        if name.startswith("vit."):  # frozen: bit-identical in both runs
            assert np.array_equal(p1[name], value) and np.array_equal(p2[name], value), name
        elif name.startswith("connector."):  # same moments, twice the step
            np.testing.assert_allclose(p2[name] - value, 2.0 * (p1[name] - value), rtol=1e-4, atol=1e-6)
            assert np.abs(p1[name] - value).max() > 0, name
        else:
            np.testing.assert_array_equal(p2[name], p1[name])
    # Frozen parameters hold no Adam moments.
    n_trained = sum(1 for n in base if not n.startswith("vit."))
    assert len(jax.tree.leaves(s1)) == 2 * n_trained + 2  # mu, nu + two step counters


# ------------------------------------- train step: accumulation, bf16, freezing

def _batch(c, setup, seed=0):
    """A synthetic batch: two images per row, ragged loss masks (rows count
    different numbers of tokens, so micro-batch means differ)."""
    rng = np.random.default_rng(seed)
    b, s, n, k = c.data.global_batch, c.data.seq_len, c.data.max_images, c.data.tokens_per_image
    slots = np.full((b, s), -1, np.int32)
    slots[:, 1:1 + n * k] = np.arange(n * k)
    tokens = rng.integers(4, c.model.decoder.vocab_size, (b, s)).astype(np.int32)
    keep = np.arange(s)[None, :] < rng.integers(s // 4, s, (b, 1))
    batch = {"tokens": tokens,
             "targets": rng.integers(0, c.model.decoder.vocab_size, (b, s)).astype(np.int32),
             "loss_mask": (keep & (slots < 0)).astype(np.float32),
             "image_slots": slots,
             "segment_ids": np.where(np.arange(s)[None] < s // 2, 1, 2).astype(np.int32).repeat(b, 0),
             "positions": np.tile(np.arange(s, dtype=np.int32) % (s // 2), (b, 1)),
             "images": rng.integers(0, 256, (b, n, c.data.image_size, c.data.image_size, 3)).astype(np.uint8)}
    return {name: jax.device_put(x, setup.batch_shardings[name]) for name, x in batch.items()}


def _step_config():
    c = small_config()
    c.model.connector.kind = "avg_pool"  # fewer ops to compile than the C-Abstractor
    c.data.global_batch = 16  # 2 rows per batch shard: k=2 micro-batches of 8
    c.data.seq_len = 32
    c.data.max_images = 1
    return c


def _setup(c, make_tx):
    return build_train_setup(c, make_mesh(dict(c.mesh)), get_layout(c.rules), make_tx)


def _host_init(abstract_params, seed=0):
    """Params from a host RNG (no compiled init): norm scales 1, biases 0,
    everything else N(0, 0.05)."""
    rng = np.random.default_rng(seed)

    def one(path, x):
        name = opt._path_names(path)[-1]
        if name in ("scale", "bias"):
            return np.full(x.shape, 1.0 if name == "scale" else 0.0, np.float32)
        return rng.normal(0.0, 0.05, x.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(one, abstract_params)


@pytest.fixture(scope="module")
def f32_step_results():
    """One SGD(lr=1) step with k=1 and k=2 on the same batch: the params
    move by exactly minus the gradient."""
    c = _step_config()
    setup = _setup(c, lambda p: optax.sgd(1.0))
    batch = _batch(c, setup)
    init = _host_init(setup.abstract_params)
    out = {"init": init, "batch": batch, "config": c}
    for k in (1, 2):
        state = {"step": jnp.zeros((), jnp.int32), "params": jax.device_put(init, setup.state_shardings["params"]),
                 "opt_state": setup.optimizer.init(init)}  # SGD: no state
        step = make_train_step(setup, lambda s: 1.0, c.loss.z_loss, grad_accum_steps=k)
        state, metrics = step(state, batch)
        out[k] = (jax.device_get(state["params"]), jax.device_get(metrics))
    return out


def test_gradient_accumulation_matches_the_full_batch(f32_step_results):
    r = f32_step_results
    (p1, m1), (p2, m2) = r[1], r[2]
    for name in ("loss", "lm_loss", "z_loss", "token_accuracy", "loss_tokens", "grad_norm"):
        np.testing.assert_allclose(m2[name], m1[name], rtol=2e-5, err_msg=name)
    mask = np.asarray(r["batch"]["loss_mask"])
    assert m1["loss_tokens"] == mask.sum()
    init, a, b = _flat(r["init"]), _flat(p1), _flat(p2)
    g1 = {n: init[n] - a[n] for n in init}  # SGD(lr=1): the gradients
    g2 = {n: init[n] - b[n] for n in init}
    assert math.isclose(math.sqrt(sum(float((g ** 2).sum()) for g in g1.values())), float(m1["grad_norm"]),
                        rel_tol=1e-3)
    for n in init:
        np.testing.assert_allclose(g2[n], g1[n], rtol=1e-3, atol=2e-6, err_msg=n)
    assert np.abs(g1["vit.patch_embed.kernel"]).max() > 0


def test_gradient_accumulation_matches_with_non_unit_loss_weights(f32_step_results):
    """Streams weighted in the loss (`data.loss_weights`) make `loss_mask`
    non-binary; micro-batches are weighted by their share of the weighted
    token count, so k=2 still equals the full batch."""
    r = f32_step_results
    c = r["config"]
    setup = _setup(c, lambda p: optax.sgd(1.0))
    mask = np.asarray(r["batch"]["loss_mask"])
    weights = np.where(np.arange(mask.shape[0])[:, None] % 3 == 0, 0.25, 2.0)  # rows of three "streams"
    batch = dict(r["batch"], loss_mask=jax.device_put((mask * weights).astype(np.float32),
                                                       setup.batch_shardings["loss_mask"]))
    out = {}
    for k in (1, 2):
        state = {"step": jnp.zeros((), jnp.int32), "params": jax.device_put(r["init"], setup.state_shardings["params"]),
                 "opt_state": setup.optimizer.init(r["init"])}
        state, metrics = make_train_step(setup, lambda s: 1.0, c.loss.z_loss, grad_accum_steps=k)(state, batch)
        out[k] = (_flat(jax.device_get(state["params"])), jax.device_get(metrics))
    (p1, m1), (p2, m2) = out[1], out[2]
    assert m1["loss_tokens"] == pytest.approx(float((mask * weights).sum()))
    for name in ("loss", "lm_loss", "token_accuracy", "grad_norm"):
        np.testing.assert_allclose(m2[name], m1[name], rtol=2e-5, err_msg=name)
    unweighted = _flat(r[1][0])  # the same step with the binary mask: the weights changed the update
    assert max(float(np.abs(p1[n] - unweighted[n]).max()) for n in p1) > 1e-4
    for n in p1:
        np.testing.assert_allclose(p2[n], p1[n], rtol=1e-3, atol=2e-6, err_msg=n)


def test_bf16_compute_keeps_float32_params_frozen_vit_and_reports_pre_clip_norm(f32_step_results):
    c = f32_step_results["config"].copy_and_resolve_references()
    c.model.dtype = "bfloat16"
    c.optimizer.module_lr_scale = "vit=0"
    c.optimizer.grad_clip = 1e-4
    setup = _setup(c, lambda p: opt.make_optimizer(c.optimizer, 10, p))
    params = jax.device_put(f32_step_results["init"], setup.state_shardings["params"])
    state = {"step": jax.device_put(jnp.zeros((), jnp.int32), setup.state_shardings["step"]), "params": params,
             "opt_state": jax.jit(setup.optimizer.init, out_shardings=setup.state_shardings["opt_state"])(params)}
    vit_before = f32_step_results["init"]["vit"]
    step = make_train_step(setup, opt.learning_rate_schedule(c.optimizer, 10), c.loss.z_loss,
                           trainable=opt.trainable_mask(c.optimizer, setup.abstract_params))
    batch = _batch(c, setup)
    losses = []
    for _ in range(2):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["params"]))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["opt_state"]) if x.ndim)
    metrics = jax.device_get(metrics)
    assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 10 * c.optimizer.grad_clip
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state["params"]["vit"]), vit_before)
    f32_loss = f32_step_results[1][1]["loss"]  # same init and batch, first step in float32
    np.testing.assert_allclose(losses[0], f32_loss, rtol=3e-2)
