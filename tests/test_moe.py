"""Mixture of experts: aux losses in the loss and the gradient, dropping,
dispatch agreement, mesh invariance, expert sharding, end-to-end training."""

import json

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from conftest import small_config
from mmjax.data.pipeline import default_tokenizer, make_dataset, to_global_arrays
from mmjax.models.moe import MoEFeedForward, capacity_dispatch_masks, dispatch_groups
from mmjax.parallel import get_layout, make_mesh
from mmjax.train.loss import cross_entropy_loss
from mmjax.train.optimizer import make_optimizer
from mmjax.train.state import build_train_setup, init_train_state
from mmjax.train.step import model_forward, moe_losses


def moe_cfg(**kw):
    cfg = mlc.ConfigDict(dict(num_experts=4, top_k=2, moe_every=1, renormalize=True, capacity_factor=2.0,
                              dispatch="capacity", grouped_matmul="ragged_dot", expert_mlp=32, shared_expert=False,
                              load_balance_weight=0.01, router_z_weight=0.001))
    cfg.update(kw)
    return cfg


def small_moe_config(**moe):
    """The small test config with its one decoder layer made an MoE layer."""
    c = small_config()
    c.model.decoder.moe.update(dict(num_experts=4, top_k=2, moe_every=1, expert_mlp=128, **moe))
    return c


def test_capacity_masks_keep_first_choices_first():
    # 4 tokens, all first choices on expert 0, capacity 2: tokens 0 and 1 keep it.
    experts = jnp.array([[[0, 1], [0, 1], [0, 2], [0, 3]]])
    weights = jnp.full((1, 4, 2), 0.5)
    dispatch, combine, kept = capacity_dispatch_masks(weights, experts, 4, cap=2)
    assert kept[0, :, 0].tolist() == [True, True, False, False]
    assert kept[0, :, 1].tolist() == [True, True, True, True]
    assert dispatch[0, :, 0].sum(axis=-1).tolist() == [1, 1, 0, 0]
    np.testing.assert_allclose(combine.sum(axis=(2, 3))[0], [1.0, 1.0, 0.5, 0.5])


def test_capacity_and_dropless_agree_when_nothing_drops():
    x = jax.random.normal(jax.random.key(0), (2, 12, 16))
    capacity = MoEFeedForward(16, moe_cfg(capacity_factor=4.0), rngs=nnx.Rngs(0))
    dropless = MoEFeedForward(16, moe_cfg(dispatch="dropless"), rngs=nnx.Rngs(0))
    (yc, ac), (yd, ad) = capacity(x), dropless(x)
    assert float(ac["dropped_fraction"]) == 0.0
    np.testing.assert_allclose(ad["expert_fraction"], ac["expert_fraction"])
    np.testing.assert_allclose(yc, yd, atol=1e-5)
    gc = nnx.grad(lambda m: jnp.sum(jnp.sin(m(x)[0])))(capacity)
    gd = nnx.grad(lambda m: jnp.sum(jnp.sin(m(x)[0])))(dropless)
    for name in ("wi_gate", "wi_up", "wo", "router"):
        np.testing.assert_allclose(getattr(gc, name)[...], getattr(gd, name)[...], atol=1e-5)


def test_skewed_routing_with_capacity_factor_one_drops_and_reports():
    layer = MoEFeedForward(16, moe_cfg(capacity_factor=1.0), rngs=nnx.Rngs(0))
    layer.router[...] = layer.router[...].at[:, 0].add(5.0)  # push tokens to expert 0
    x = jnp.abs(jax.random.normal(jax.random.key(1), (2, 16, 16)))
    _, aux = layer(x)
    assert float(aux["dropped_fraction"]) > 0.1
    assert float(aux["expert_fraction"][0]) > 0.4
    _, metrics = moe_losses(jax.tree.map(lambda v: v[None], aux), 0.01, 0.001)
    assert float(metrics["dropped_fraction"]) == pytest.approx(float(aux["dropped_fraction"]))


def test_dispatch_groups():
    assert dispatch_groups(2048, 8) == 8                 # one group per batch shard
    assert dispatch_groups(2048, 8, group_size=64) == 32  # 256 tokens per shard -> 4 groups of 64
    assert dispatch_groups(2048, 8, group_size=512) == 8  # already small enough
    assert dispatch_groups(8 * 24, 8, group_size=10) == 24  # 24 per shard: 3 groups of 8 (not 10: equal sizes)
    assert dispatch_groups(30, 4) == 1                    # shards do not divide the tokens


def test_group_size_dispatches_each_group_on_its_own():
    """With `group_size`, each group of tokens competes for its own expert
    capacity: the layer equals the ungrouped layer run on each group alone,
    dropping included."""
    grouped = MoEFeedForward(16, moe_cfg(capacity_factor=1.0, group_size=12), rngs=nnx.Rngs(0))
    whole = MoEFeedForward(16, moe_cfg(capacity_factor=1.0), rngs=nnx.Rngs(0))
    for layer in (grouped, whole):
        layer.router[...] = layer.router[...].at[:, 0].add(3.0)  # skewed: some tokens drop
    x = jnp.abs(jax.random.normal(jax.random.key(2), (2, 12, 16)))
    y, aux = grouped(x)
    parts = [whole(x[i:i + 1]) for i in range(2)]
    np.testing.assert_allclose(y, jnp.concatenate([p[0] for p in parts]), atol=1e-6)
    dropped = [float(p[1]["dropped_fraction"]) for p in parts]
    assert float(aux["dropped_fraction"]) == pytest.approx(sum(dropped) / 2) and max(dropped) > 0
    y_whole, _ = whole(x)  # one group of 24 shares the capacity differently
    assert not np.allclose(y, y_whole, atol=1e-6)


def _loss_and_grads(c, mesh_cfg, batch_np, lb_weight, z_weight):
    mesh = make_mesh(mesh_cfg)
    setup = build_train_setup(c, mesh, get_layout(c.rules), lambda p: make_optimizer(c.optimizer, 10, p))
    state = init_train_state(c, setup)
    batch = to_global_arrays({k: batch_np[k] for k in setup.batch_shardings}, setup.batch_shardings)

    def loss_fn(params):
        logits, aux = model_forward(setup.graphdef, params, batch, setup.resolver)
        loss, _ = cross_entropy_loss(logits, batch["targets"], batch["loss_mask"])
        moe_loss, metrics = moe_losses(aux, lb_weight, z_weight)
        return loss + moe_loss, metrics

    (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(state["params"])
    return state, float(loss), metrics, jax.tree.map(np.asarray, grads.to_pure_dict())


@pytest.fixture(scope="module")
def batch_np():
    c = small_config()
    return next(iter(make_dataset(c.data, default_tokenizer(c.data), batch_size=c.data.global_batch)))


@pytest.mark.slow
def test_aux_losses_are_nonzero_and_reach_the_gradient(batch_np):
    c = small_moe_config()
    _, with_aux, metrics, g_with = _loss_and_grads(c, dict(c.mesh), batch_np, 0.01, 0.001)
    _, without, _, g_without = _loss_and_grads(c, dict(c.mesh), batch_np, 0.0, 0.0)
    assert float(metrics["moe_aux_loss"]) > 0
    assert with_aux == pytest.approx(without + float(metrics["moe_aux_loss"]), rel=1e-6)
    router = lambda g: g["decoder"]["layers"]["layers"][0]["mlp"]["router"]  # noqa: E731
    assert np.abs(router(g_with) - router(g_without)).max() > 1e-7


def test_megablox_and_ragged_dot_agree():
    """The Pallas grouped-matmul kernel (Pallas' interpreter here) against
    `ragged_dot`: same outputs and gradients, with an expert left empty."""
    x = jnp.abs(jax.random.normal(jax.random.key(5), (2, 12, 16)))  # positive: the push below lowers every logit
    results = {}
    for impl in ("ragged_dot", "megablox"):
        layer = MoEFeedForward(16, moe_cfg(dispatch="dropless", grouped_matmul=impl), rngs=nnx.Rngs(0))
        layer.router[...] = layer.router[...].at[:, 3].add(-50.0)  # nobody picks expert 3
        loss = lambda m: jnp.sum(jnp.sin(m(x)[0]))  # noqa: E731
        results[impl] = nnx.jit(nnx.value_and_grad(loss))(layer)
    (lr, gr), (lm, gm) = results["ragged_dot"], results["megablox"]
    assert float(lm) == pytest.approx(float(lr), rel=1e-5)  # float32, another summation order
    for name in ("wi_gate", "wi_up", "wo", "router"):
        np.testing.assert_allclose(getattr(gm, name)[...], getattr(gr, name)[...], atol=1e-5)
    assert float(jnp.abs(gm.wi_gate[...][3]).max()) == 0.0  # the empty expert gets no gradient


def test_unknown_grouped_matmul_is_refused():
    from mmjax.errors import ConfigError

    with pytest.raises(ConfigError, match="grouped_matmul='cutlass'"):
        MoEFeedForward(16, moe_cfg(dispatch="dropless", grouped_matmul="cutlass"), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("dispatch", ["capacity", "dropless", "dropless-megablox"])
def test_same_results_for_expert_parallel_meshes(dispatch):
    """The MoE layer alone, sharded by the fsdp layout on meshes with
    expert = 1, 2, 4: same output, aux losses and gradients. Dropless
    exchanges tokens with a ragged all-to-all (its dense emulation on CPU)."""
    from mmjax.models.partitioning import activation_sharding
    from mmjax.parallel import activation_resolver, batch_sharding, tree_shardings

    dispatch, _, impl = dispatch.partition("-")
    layer = MoEFeedForward(32, moe_cfg(num_experts=8, dispatch=dispatch, grouped_matmul=impl or "ragged_dot"),
                           rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(layer, nnx.Param)
    x = jax.random.normal(jax.random.key(3), (8, 16, 32))
    results = {}
    for expert in (1, 2, 4):
        mesh = make_mesh({"data": 8 // expert, "expert": expert})
        rules = get_layout("fsdp")
        shardings = tree_shardings(params, mesh, rules)
        sharded = jax.device_put(params, shardings)
        xs = jax.device_put(x, batch_sharding(mesh, rules, 3))

        def loss_fn(p, x):
            with activation_sharding(activation_resolver(mesh, rules)):
                y, aux = nnx.merge(graphdef, p)(x)
            return jnp.sum(jnp.sin(y)) + aux["load_balance_loss"] + aux["router_z_loss"], aux

        (loss, aux), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(sharded, xs)
        assert sharded["wi_gate"][...].sharding.spec == (P("expert", None, None) if expert > 1 else P(None, None, None))
        results[expert] = (float(loss), jax.tree.map(np.asarray, aux), jax.tree.map(np.asarray, grads.to_pure_dict()))
    for expert in (2, 4):
        assert results[expert][0] == pytest.approx(results[1][0], rel=1e-5)
        for tree in (1, 2):
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4),
                         results[expert][tree], results[1][tree])


def _kept_by_peer_order(experts: np.ndarray, devices: int, experts_per_device: int, buffer: int) -> np.ndarray:
    """experts `[devices * T, k]` -> kept `[devices * T, k]`: each expert shard
    takes its senders' assignments in sender order (each sender's sorted by
    expert, then token and choice) while its buffer has room."""
    t = experts.shape[0] // devices
    kept = np.zeros(experts.shape, bool)
    used = np.zeros(devices, int)
    for sender in range(devices):
        mine = experts[sender * t:(sender + 1) * t].reshape(-1)
        for j in np.argsort(mine, kind="stable"):
            peer = mine[j] // experts_per_device
            if used[peer] < buffer:
                used[peer] += 1
                kept[sender * t + j // experts.shape[1], j % experts.shape[1]] = True
    return kept


@pytest.mark.parametrize("factor", [0.0, 0.5, 4.0])
def test_bounded_receive_buffer_drops_exactly_what_does_not_fit(factor):
    """Dropless with expert parallelism over 4 shards and skewed routing (most
    rows to shard 0): with a receive buffer of `factor` times the fair share,
    exactly the rows that do not fit in sender order are dropped, and the
    outputs and gradients equal one device's experts with those assignments'
    weights zeroed. factor 0 (worst case) and 4 (= the shards) drop nothing."""
    from mmjax.models.moe_dropless import expert_parallel_experts, local_experts, receive_buffer_rows

    devices, t, k, m, n_experts = 4, 6, 2, 8, 8
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:devices]), ("expert",))
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (devices * t, m))
    weights = jax.nn.softmax(jax.random.normal(keys[1], (devices * t, k)), axis=-1)
    first = jnp.where(jax.random.uniform(keys[2], (devices * t,)) < 0.7, 0, 4)  # shard 0 or 2
    experts = jnp.stack([first, jax.random.randint(keys[3], (devices * t,), 1, n_experts)], axis=1)
    params = tuple(0.3 * jax.random.normal(key, shape) for key, shape in
                   zip(jax.random.split(keys[4], 3), [(n_experts, m, 16), (n_experts, m, 16), (n_experts, 16, m)],
                       strict=True))
    buffer = receive_buffer_rows(t, k, devices, factor)
    expected_kept = _kept_by_peer_order(np.asarray(experts), devices, n_experts // devices, buffer)
    if factor in (0.0, 4.0):
        assert expected_kept.all()
    else:
        assert 0 < (~expected_kept).sum() < expected_kept.size  # the case drops some rows, not all

    tokens, experts_spec = P("expert", None), P("expert", None, None)

    def sharded(x, weights, *params):
        def per_shard(x, weights, experts, *params):
            return expert_parallel_experts(x, weights, experts, params, "ragged_dot", axis="expert",
                                           platform="cpu", buffer_factor=factor)
        return jax.shard_map(per_shard, mesh=mesh, in_specs=(tokens,) * 3 + (experts_spec,) * 3,
                             out_specs=(tokens, tokens), check_vma=False)(x, weights, experts, *params)

    def reference(x, weights, *params):
        return local_experts(x, weights * expected_kept, experts, params, "ragged_dot"), None

    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)[0]))  # noqa: E731
    (y, kept), (y_ref, _) = jax.jit(sharded)(x, weights, *params), jax.jit(reference)(x, weights, *params)
    np.testing.assert_array_equal(np.asarray(kept), expected_kept)
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
    grads = jax.jit(jax.grad(loss(sharded), argnums=(0, 1, 2, 3, 4)))(x, weights, *params)
    grads_ref = jax.jit(jax.grad(loss(reference), argnums=(0, 1, 2, 3, 4)))(x, weights, *params)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        np.testing.assert_allclose(g, g_ref, atol=1e-5)


def test_expert_weights_are_sharded_on_the_expert_axis():
    c = small_moe_config()
    mesh = make_mesh(dict(c.mesh))
    setup = build_train_setup(c, mesh, get_layout(c.rules), lambda p: make_optimizer(c.optimizer, 10, p))
    mlp = init_train_state(c, setup)["params"]["decoder"]["layers"]["layers"][0]["mlp"]
    assert mlp["wi_gate"][...].sharding.spec == P("expert", "fsdp", None)
    assert mlp["wo"][...].sharding.spec == P("expert", None, "fsdp")
    assert mlp["router"][...].sharding.spec == P("fsdp", None)


@pytest.mark.slow
def test_tiny_moe_trains_and_logs_routing(tmp_path):
    from mmjax.train.loop import train

    c = small_moe_config()
    c.train.steps = 40
    c.train.checkpoint_every = 40
    c.eval.caption_accuracy = False
    summary = train(c, str(tmp_path))
    assert summary["loss_last10_mean"] < 0.5 * summary["loss_first10_mean"]
    final = summary["final"]
    assert final["moe_aux_loss"] > 0 and 0 <= final["dropped_fraction"] < 1
    assert len(final["expert_fraction"]) == 1 and len(final["expert_fraction"][0]) == 4
    assert sum(final["expert_fraction"][0]) == pytest.approx(1.0, abs=1e-5)
    # Routing by modality per log step: lists per MoE layer in metrics.jsonl, summaries in TensorBoard.
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert np.asarray(last["expert_fraction_image"]).shape == (1, 4) and len(last["router_entropy_text"]) == 1
    assert last["moe_tokens_image"] > 0 and isinstance(last["moe_starved_experts"], int)
    events = b"".join(p.read_bytes() for p in (tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    for tag in ("moe_layer0/image/load_min_share", "moe_layer0/text/router_entropy", "moe_starved_experts"):
        assert tag.encode() in events, tag


def test_upcycled_moe_computes_the_dense_mlp():
    from mmjax.models.decoder import Decoder
    from mmjax.models.upcycle import upcycle_decoder

    dense_cfg = small_config().model.decoder
    dense_cfg.layers = 2
    moe_cfg_ = small_config().model.decoder
    moe_cfg_.layers = 2
    moe_cfg_.moe.update(dict(num_experts=4, top_k=2, moe_every=2, expert_mlp=dense_cfg.mlp))
    dense, moe = Decoder(dense_cfg, rngs=nnx.Rngs(0)), Decoder(moe_cfg_, rngs=nnx.Rngs(1))
    params = upcycle_decoder(jax.tree.map(np.asarray, nnx.state(dense, nnx.Param).to_pure_dict()),
                             jax.tree.map(np.asarray, nnx.state(moe, nnx.Param).to_pure_dict()))
    state = nnx.state(moe, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    nnx.update(moe, state)
    assert moe.layers.layers[1].mlp.wi_gate.shape == (4, 128, dense_cfg.mlp)
    tokens = jnp.arange(12)[None] + 4
    seg, pos = jnp.ones((1, 12), jnp.int32), jnp.arange(12)[None]
    run = lambda m: jax.jit(lambda t: m(m.embed(t), seg, pos))(tokens)  # noqa: E731
    np.testing.assert_allclose(run(moe), run(dense), atol=1e-5)


def test_shared_expert_adds_a_dense_mlp_to_every_token():
    x = jax.random.normal(jax.random.key(4), (2, 6, 16))
    routed = MoEFeedForward(16, moe_cfg(), rngs=nnx.Rngs(0))
    with_shared = MoEFeedForward(16, moe_cfg(shared_expert=True), rngs=nnx.Rngs(0))
    for name in ("router", "wi_gate", "wi_up", "wo"):
        getattr(with_shared, name)[...] = getattr(routed, name)[...]
    np.testing.assert_allclose(with_shared(x)[0], routed(x)[0] + with_shared.shared(x), atol=1e-5)


# ------------------------------------------- aux-loss-free balancing (router bias)

def _max_over_mean_load(fraction) -> float:
    fraction = np.asarray(fraction)
    return float(fraction.max() * fraction.shape[-1] / fraction.sum())


@pytest.mark.parametrize("rate", [0.01, 0.0])
def test_router_bias_updates_move_a_skewed_router_towards_balance(rate):
    """Most tokens prefer expert 0; the train step's bias update
    (`balance_router_biases`) pushes the load towards 1/E per expert, and
    rate 0 leaves bias and load as they are."""
    from mmjax.models.moe import RouterBias
    from mmjax.train.step import balance_router_biases

    layer = MoEFeedForward(16, moe_cfg(balance="bias", dispatch="dropless"), rngs=nnx.Rngs(0))
    layer.router[...] = layer.router[...].at[:, 0].add(0.2)
    x = jnp.abs(jax.random.normal(jax.random.key(5), (4, 32, 16)))
    load = nnx.jit(lambda m, x: m(x)[1]["expert_fraction"])
    update = jax.jit(lambda b, f: balance_router_biases(b, f[None], rate))
    before = _max_over_mean_load(load(layer, x))
    assert before > 1.6  # expert 0 takes nearly every token's first choice: 2.0 is the most with top-2 of 4
    for _ in range(60):
        biases, metrics = update(nnx.state(layer, RouterBias), load(layer, x))
        nnx.update(layer, biases)
    after = _max_over_mean_load(load(layer, x))
    if rate:
        assert after < 1.25 and after < 0.7 * before
        assert float(layer.router_bias[0]) < 0 and float(metrics["router_bias_range"]) > 0
    else:
        assert after == before
        assert not np.any(np.asarray(layer.router_bias[...])) and float(metrics["router_bias_range"]) == 0


@pytest.mark.parametrize("renormalize", [True, False])
def test_router_bias_changes_the_choice_but_not_the_combine_weights(renormalize):
    from mmjax.models.moe import route
    from mmjax.models.moe_dropless import local_experts

    logits = jax.random.normal(jax.random.key(6), (64, 4))
    bias = jnp.array([0.0, 0.0, 0.0, 0.3])
    weights, experts, probs = jax.jit(route, static_argnums=(1, 2))(logits, 2, renormalize, bias)
    _, plain, _ = route(logits, 2, renormalize)
    assert np.mean(np.any(np.asarray(experts) == 3, axis=-1)) > np.mean(np.any(np.asarray(plain) == 3, axis=-1))
    chosen = np.take_along_axis(np.asarray(probs), np.asarray(experts), axis=-1)
    expected = chosen / chosen.sum(-1, keepdims=True) if renormalize else chosen
    np.testing.assert_allclose(weights, expected, rtol=1e-6)
    # The layer routes with its bias: its output is the experts' for the biased choice.
    layer = MoEFeedForward(16, moe_cfg(balance="bias", dispatch="dropless", renormalize=renormalize),
                           rngs=nnx.Rngs(0))
    layer.router_bias[...] = bias
    x = jax.random.normal(jax.random.key(7), (2, 8, 16))
    y, aux = nnx.jit(lambda m, x: m(x))(layer, x)
    w, e, _ = route(jnp.einsum("bsm,me->bse", x, layer.router[...]), 2, renormalize, bias)
    params = (layer.wi_gate[...], layer.wi_up[...], layer.wo[...])
    want = local_experts(x.reshape(16, 16), w.reshape(16, 2), e.reshape(16, 2), params, "ragged_dot")
    np.testing.assert_allclose(y, want.reshape(y.shape), atol=1e-5)
    layer.router_bias[...] = jnp.zeros(4)
    assert not np.allclose(nnx.jit(lambda m, x: m(x)[0])(layer, x), y, atol=1e-5)


def test_balance_settings_are_checked():
    from mmjax.errors import ConfigError
    from mmjax.train.config_checks import check_static

    with pytest.raises(ConfigError, match="moe.balance"):
        MoEFeedForward(16, moe_cfg(balance="loss_free"), rngs=nnx.Rngs(0))
    for field, value in (("balance", "loss_free"), ("bias_update_rate", -0.1)):
        c = small_moe_config()
        c.model.decoder.moe[field] = value
        with pytest.raises(ConfigError, match=f"config.model.decoder.moe.{field}="):
            check_static(c)


@pytest.mark.parametrize("scan", [False, True])
def test_router_biases_line_up_with_the_stacked_aux(scan):
    """A 12-layer decoder, every layer MoE, listed or scanned: layer i's bias
    forces expert i % E, so row i of both the aux `expert_fraction` and
    `router_biases` must single out that expert, and the update lowers
    exactly it (list indices past 9 sort as integers)."""
    from mmjax.models.decoder import Decoder
    from mmjax.models.moe import RouterBias, router_biases, set_router_biases, update_router_bias

    d = small_config().model.decoder
    d.update(dict(layers=12, embed=32, heads=2, kv_heads=1, head_dim=16, mlp=32, scan=scan))
    d.moe.update(dict(num_experts=4, top_k=1, moe_every=1, expert_mlp=16, balance="bias"))
    decoder = Decoder(d, rngs=nnx.Rngs(0))
    forced = jnp.arange(12) % 4
    biases = nnx.state(decoder, RouterBias)
    assert router_biases(biases).shape == (12, 4)
    nnx.update(decoder, set_router_biases(biases, 10.0 * jax.nn.one_hot(forced, 4)))
    rows = router_biases(nnx.state(decoder, RouterBias))
    tokens = jnp.arange(16)[None] + 4
    seg, pos = jnp.ones((1, 16), jnp.int32), jnp.arange(16)[None]
    fraction = nnx.jit(lambda m, t: m.forward(m.embed(t), seg, pos)[1]["expert_fraction"])(decoder, tokens)
    np.testing.assert_array_equal(np.argmax(fraction, -1), forced)
    np.testing.assert_array_equal(np.argmax(rows, -1), forced)
    moved = np.asarray(update_router_bias(rows, fraction, 0.5) - rows)
    np.testing.assert_array_equal(moved, np.where(jax.nn.one_hot(forced, 4) > 0, -0.5, 0.5))


@pytest.mark.parametrize("scan", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_router_bias_trains_outside_the_optimizer_and_survives_a_checkpoint(batch_np, tmp_path, scan):
    """Real train steps (the loop's `build_step`, sharded on data x fsdp x
    expert) of the tiny MoE config's decoder, 2 layers, as a text model (the
    vision side plays no part and costs compile time), with
    balance="bias": listed (MoE on the 2nd layer, as in tiny_moe) or scanned
    (MoE on both, bias `[2, E]`). The bias moves in steps of the rate, is
    replicated, has no optimizer slot, and a checkpoint round trip restores it."""
    from experiments.tiny_moe import get_config as tiny_moe_config
    from mmjax.models.moe import router_biases
    from mmjax.train.checkpoint import Checkpointer
    from mmjax.train.loop import build_step
    from mmjax.train.state import abstract_train_state, split_params

    c = tiny_moe_config()
    ref = small_config()
    c.model.name, c.data = "text_lm", ref.data
    d = c.model.decoder
    d.layers, d.scan, d.mlp = 2, scan, 256
    d.moe.update(dict(moe_every=1 if scan else 2, expert_mlp=128, balance="bias", bias_update_rate=0.01))
    setup, step = build_step(c, make_mesh(dict(c.mesh)), get_layout(c.rules))
    state = init_train_state(c, setup)
    bias = lambda s: np.asarray(router_biases(s["params"]))  # noqa: E731
    assert bias(state).shape == (2 if scan else 1, d.moe.num_experts) and not bias(state).any()
    batch = to_global_arrays({k: batch_np[k] for k in setup.batch_shardings}, setup.batch_shardings)
    for _ in range(3):
        state, metrics = step(state, batch)
    b = bias(state)
    assert np.abs(b).max() > 0 and float(metrics["router_bias_range"]) == pytest.approx(
        (b.max(-1) - b.min(-1)).max(), abs=1e-6)
    np.testing.assert_allclose(b / 0.01, np.round(b / 0.01), atol=1e-4)  # three steps of +-rate (or 0)
    leaves = jax.tree_util.tree_leaves_with_path(state["params"])
    for path, value in leaves:
        if "router_bias" in jax.tree_util.keystr(path):
            assert value.sharding.is_fully_replicated
    trained = split_params(state["params"])[0]
    opt_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state["opt_state"])]
    assert not [p for p in opt_paths if "router_bias" in p]
    assert len(opt_paths) == 2 * len(jax.tree.leaves(trained)) + 2  # Adam's mu, nu + two counters
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    data = iter(make_dataset(c.data, default_tokenizer(c.data), batch_size=c.data.global_batch))
    ckpt.save(3, state, data)
    ckpt.close()
    restored = Checkpointer(str(tmp_path)).restore(3, abstract_train_state(setup), data)
    np.testing.assert_array_equal(bias(restored), b)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state))


# Routing health by modality: token kinds 0 padding, 1 text, 2 image (mmjax.models.moe.TOKEN_KINDS).

def _kinds(shape, seed=5):
    kind = np.asarray(jax.random.randint(jax.random.key(seed), shape, 0, 3), np.int8)
    assert {0, 1, 2} <= set(kind.ravel().tolist())
    return kind


def _assert_recombines(aux, kind):
    """Each overall statistic is the count-weighted mean of the text and image ones."""
    n_text, n_image = float((kind == 1).sum()), float((kind == 2).sum())
    assert float(aux["tokens_text"]) == n_text and float(aux["tokens_image"]) == n_image
    for stat in ("expert_fraction", "dropped_fraction", "router_entropy"):
        combined = (n_text * np.asarray(aux[f"{stat}_text"]) + n_image * np.asarray(aux[f"{stat}_image"]))
        np.testing.assert_allclose(combined / (n_text + n_image), aux[stat], atol=1e-6, err_msg=stat)


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_modality_statistics_recombine_to_the_overall_ones_without_padding(dispatch):
    layer = MoEFeedForward(16, moe_cfg(dispatch=dispatch, capacity_factor=1.0), rngs=nnx.Rngs(0))
    layer.router[...] = layer.router[...].at[:, 0].add(1.0)  # skewed: the capacity path drops
    x = jax.random.normal(jax.random.key(1), (4, 16, 16))
    kind = _kinds((4, 16))
    call = nnx.jit(lambda m, x, k: m(x, k)[1])
    aux = jax.tree.map(np.asarray, call(layer, x, jnp.asarray(kind)))
    _assert_recombines(aux, kind)
    for key in ("expert_fraction_text", "expert_fraction_image", "expert_fraction"):
        assert aux[key].shape == (4,) and aux[key].sum() == pytest.approx(1.0, abs=1e-5)
    # Direct computation: router probabilities and top-2 choices of each modality's tokens only.
    logits = np.einsum("bsm,me->bse", np.asarray(x), np.asarray(layer.router[...])).reshape(-1, 4)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top2 = np.argsort(-probs, axis=-1)[:, :2]
    load = np.zeros_like(probs)
    np.put_along_axis(load, top2, 0.5, axis=-1)
    entropy = -(probs * np.log(probs)).sum(-1)
    for name, mask in (("text", kind.ravel() == 1), ("image", kind.ravel() == 2), ("", kind.ravel() > 0)):
        suffix = f"_{name}" if name else ""
        np.testing.assert_allclose(aux["expert_fraction" + suffix], load[mask].mean(0), atol=1e-6)
        np.testing.assert_allclose(aux["router_entropy" + suffix], entropy[mask].mean(), rtol=1e-5)
    # Padding is left out: all tokens counted as text give other statistics.
    everything = jax.tree.map(np.asarray, call(layer, x, None))
    assert float(everything["tokens_text"]) == 64 and float(everything["tokens_image"]) == 0
    assert not np.allclose(everything["expert_fraction"], aux["expert_fraction"], atol=1e-3)
    if dispatch == "capacity":
        assert aux["dropped_fraction_text"] > 0 and aux["dropped_fraction_image"] > 0
        assert aux["dropped_fraction_text"] != pytest.approx(aux["dropped_fraction_image"])
    else:
        assert aux["dropped_fraction"] == aux["dropped_fraction_text"] == aux["dropped_fraction_image"] == 0


def test_modality_statistics_without_image_tokens_are_zero_with_count_zero():
    layer = MoEFeedForward(16, moe_cfg(), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 8, 16))
    kind = np.ones((2, 8), np.int8)
    kind[1, 5:] = 0
    aux = jax.tree.map(np.asarray, nnx.jit(lambda m, x, k: m(x, k)[1])(layer, x, jnp.asarray(kind)))
    assert float(aux["tokens_image"]) == 0 and float(aux["tokens_text"]) == 13
    for stat in ("expert_fraction", "dropped_fraction", "router_entropy"):
        assert np.all(np.isfinite(aux[f"{stat}_image"])) and not np.any(aux[f"{stat}_image"])
        np.testing.assert_allclose(aux[f"{stat}_text"], aux[stat], atol=1e-6)


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_passing_the_modality_leaves_the_aux_losses_and_outputs_unchanged(dispatch):
    layer = MoEFeedForward(16, moe_cfg(dispatch=dispatch, capacity_factor=1.0), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (4, 16, 16))
    call = nnx.jit(lambda m, x, k: m(x, k))
    (y_kind, with_kind), (y_none, without) = call(layer, x, jnp.asarray(_kinds((4, 16)))), call(layer, x, None)
    np.testing.assert_array_equal(y_kind, y_none)
    for name in ("load_balance_loss", "router_z_loss"):
        np.testing.assert_array_equal(with_kind[name], without[name])
    # Both over every token, padding included (Switch/GShard E * sum f_e P_e; mean logsumexp^2).
    logits = jnp.einsum("bsm,me->bse", x, layer.router[...]).reshape(-1, 4)
    probs = jax.nn.softmax(logits)
    f = jax.nn.one_hot(jax.lax.top_k(probs, 2)[1], 4).sum(-2).mean(0) / 2
    assert float(with_kind["load_balance_loss"]) == pytest.approx(float(4 * jnp.sum(f * probs.mean(0))), rel=1e-6)
    assert float(with_kind["router_z_loss"]) == pytest.approx(
        float(jnp.mean(jax.nn.logsumexp(logits, -1) ** 2)), rel=1e-6)


@pytest.mark.parametrize("scan", [False, True])
def test_decoder_passes_token_kinds_to_every_moe_layer(scan):
    """Scanned and listed decoders: per-layer statistics `[n_moe, ...]`
    recombine, padding (segment_ids 0) is left out by default, and the aux
    losses do not depend on the token kinds."""
    from mmjax.models.decoder import Decoder

    cfg = small_config().model.decoder
    cfg.update(dict(layers=2, scan=scan))
    cfg.moe.update(dict(num_experts=4, top_k=2, moe_every=1, expert_mlp=64, capacity_factor=1.0))
    decoder = Decoder(cfg, rngs=nnx.Rngs(0))
    b, s = 2, 16
    tokens = jax.random.randint(jax.random.key(0), (b, s), 4, 100)
    segment_ids = jnp.ones((b, s), jnp.int32).at[1, 10:].set(0)
    positions = jnp.broadcast_to(jnp.arange(s), (b, s))
    kind = np.where(np.asarray(segment_ids) == 0, 0, 1).astype(np.int8)
    kind[:, 2:7] = 2
    kind[1, 10:] = 0

    @nnx.jit
    def aux_of(m, tokens, kind):
        return m.forward(m.embed(tokens), segment_ids, positions, token_kind=kind)[1]

    aux = jax.tree.map(np.asarray, aux_of(decoder, tokens, jnp.asarray(kind)))
    default = jax.tree.map(np.asarray, aux_of(decoder, tokens, None))
    assert aux["expert_fraction_image"].shape == (2, 4) and aux["router_entropy_text"].shape == (2,)
    for layer in range(2):
        _assert_recombines({k: v[layer] for k, v in aux.items()}, kind)
    assert default["tokens_text"].tolist() == [26.0, 26.0] and default["tokens_image"].tolist() == [0.0, 0.0]
    np.testing.assert_allclose(default["expert_fraction"], aux["expert_fraction"], atol=1e-6)
    for name in ("load_balance_loss", "router_z_loss"):
        np.testing.assert_array_equal(aux[name], default[name])


def test_merge_micro_metrics_weights_routing_statistics_by_token_counts():
    from mmjax.train.step import merge_micro_metrics

    stacked = {"moe_tokens_text": jnp.array([30.0, 10.0]), "moe_tokens_image": jnp.array([0.0, 20.0]),
               "expert_fraction_image": jnp.array([[[0.0, 0.0]], [[0.8, 0.2]]]),
               "router_entropy_text": jnp.array([[1.0], [2.0]]),
               "dropped_fraction": jnp.array([0.1, 0.4]), "lm_loss": jnp.array([1.0, 2.0]),
               "load_balance_loss": jnp.array([1.0, 3.0])}
    merged = jax.tree.map(np.asarray, jax.jit(merge_micro_metrics)(stacked))
    np.testing.assert_allclose(merged["expert_fraction_image"], [[0.8, 0.2]])  # micro-batch 0 has no image token
    np.testing.assert_allclose(merged["router_entropy_text"], [1.25])
    assert merged["dropped_fraction"] == pytest.approx(0.25) and merged["load_balance_loss"] == pytest.approx(2.0)
    assert merged["moe_tokens_image"] == 20 and merged["lm_loss"] == pytest.approx(3.0)


def test_tiny_moe_train_step_reports_routing_by_modality(batch_np):
    """One train step of a small MM1 MoE model (average-pool connector, one
    device: a quick compile): the per-layer, per-modality metrics, and the
    image statistics of the first MoE layer equal a direct computation over
    the image tokens only."""
    from mmjax.models.attention import SegmentMask
    from mmjax.train.loop import build_step

    c = small_moe_config(capacity_factor=1.0)
    c.model.decoder.layers = 2
    c.model.connector.kind = "avg_pool"
    mesh = make_mesh(dict(data=1, fsdp=1, expert=1, model=1), jax.devices()[:1])  # one device: a quick compile
    setup, train_step = build_step(c, mesh, get_layout(c.rules))
    state = init_train_state(c, setup)
    batch = to_global_arrays({k: batch_np[k] for k in setup.batch_shardings}, setup.batch_shardings)
    seg, slots = batch_np["segment_ids"], batch_np["image_slots"]
    image, text = (seg != 0) & (slots >= 0), (seg != 0) & (slots < 0)

    @jax.jit
    def first_router_probs(params, batch):
        model = nnx.merge(setup.graphdef, params)
        x = model.input_embeddings(batch["tokens"], batch["image_slots"], batch["images"])
        layer = model.decoder.layers.layer(0)
        h = x + layer.attn(layer.attn_norm(x), SegmentMask(batch["segment_ids"]), batch["positions"])
        return jax.nn.softmax(jnp.einsum("bsm,me->bse", layer.mlp_norm(h), layer.mlp.router[...]))

    probs = np.asarray(first_router_probs(state["params"], batch)).reshape(-1, 4)
    load = np.zeros_like(probs)
    np.put_along_axis(load, np.argsort(-probs, axis=-1)[:, :2], 0.5, axis=-1)
    _, metrics = train_step(state, batch)
    m = jax.tree.map(np.asarray, metrics)
    for stat in ("expert_fraction_text", "expert_fraction_image"):
        assert m[stat].shape == (2, 4)
    for stat in ("dropped_fraction", "router_entropy"):
        assert m[f"{stat}_text"].shape == m[f"{stat}_image"].shape == (2,)
    assert m["moe_tokens_image"] == image.sum() > 0 and m["moe_tokens_text"] == text.sum() > 0
    np.testing.assert_allclose(m["expert_fraction_image"][0], load[image.ravel()].mean(0), atol=1e-5)
    np.testing.assert_allclose(m["expert_fraction_text"][0], load[text.ravel()].mean(0), atol=1e-5)
    entropy = -(probs * np.log(np.clip(probs, 1e-9, None))).sum(-1)
    assert float(m["router_entropy_image"][0]) == pytest.approx(entropy[image.ravel()].mean(), rel=1e-4)
    n = image.sum() + text.sum()
    for stat in ("dropped_fraction", "router_entropy"):
        combined = (image.sum() * m[f"{stat}_image"] + text.sum() * m[f"{stat}_text"]) / n
        assert float(m[stat]) == pytest.approx(float(combined.mean()), rel=1e-5, abs=1e-7)
