"""Vision MoE (Mobile V-MoE): experts routed per image. The layer equals a
per-image reference loop (outputs, dropped images, gradients); every token
of an image reaches the same experts; the super-class routing loss is
minimised by its mapping; bad `vit.moe` settings are refused."""

import math
import re

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest
from flax import nnx

from mmjax.config_base import base_config
from mmjax.errors import ConfigError
from mmjax.models import build_model
from mmjax.models.vision_moe import VisionMoE, superclass_loss, superclass_targets
from mmjax.models.vit import ACTIVATIONS, ViT, param_count

EMBED, HIDDEN, TOKENS, BATCH = 16, 24, 5, 8
gelu = ACTIVATIONS["gelu_tanh"]


def _moe_cfg(**kw):
    cfg = dict(base_config().model.vit.moe)
    cfg.update(dict(num_experts=4, top_k=2, expert_mlp=HIDDEN, capacity_factor=4.0), **kw)
    return mlc.ConfigDict(cfg)


def _layer(prefix=0, seed=0, **kw) -> VisionMoE:
    layer = VisionMoE(EMBED, _moe_cfg(**kw), gelu, prefix=prefix, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed + 1)  # biases away from zero so they take part
    layer.bi.set_value(jnp.asarray(rng.normal(0, 0.5, layer.bi.shape), jnp.float32))
    layer.bo.set_value(jnp.asarray(rng.normal(0, 0.5, layer.bo.shape), jnp.float32))
    return layer


def _params(layer) -> dict:
    return {k: getattr(layer, k)[...] for k in ("router", "wi", "bi", "wo", "bo")}


def _reference(p: dict, x, choices: np.ndarray, cfg, prefix: int, groups: int = 1):
    """Per-image loop: image i's tokens through its chosen experts (`choices`
    `[b, k]`, constants), weighted by the router's probabilities; images past
    an expert's capacity (choice-major, image order, per group) dropped.
    Returns (y `[b, n, M]`, dropped share `[b]`)."""
    b, k, e = x.shape[0], cfg.top_k, cfg.num_experts
    probs = jax.nn.softmax(x[:, prefix:].mean(axis=1) @ p["router"], axis=-1)
    size = b // groups
    cap = math.ceil(k * size * cfg.capacity_factor / e)
    kept = np.zeros((b, k), bool)
    for g in range(groups):
        load = np.zeros(e, int)
        for j in range(k):
            for i in range(g * size, (g + 1) * size):
                if load[choices[i, j]] < cap:
                    kept[i, j] = True
                    load[choices[i, j]] += 1
    rows = []
    for i in range(b):
        w = probs[i, choices[i]]
        if cfg.renormalize:
            w = w / w.sum()
        y = jnp.zeros(x.shape[1:])
        for j in range(k):
            if kept[i, j]:
                ex = choices[i, j]
                y = y + w[j] * (gelu(x[i] @ p["wi"][ex] + p["bi"][ex]) @ p["wo"][ex] + p["bo"][ex])
        rows.append(y)
    return jnp.stack(rows), jnp.asarray(1.0 - kept.mean(axis=1))


def _choices(layer, x) -> np.ndarray:
    logits = np.asarray(layer.router_logits(x))
    return np.argsort(-logits, axis=-1, kind="stable")[:, :layer.cfg.top_k]


@pytest.mark.parametrize("prefix,settings", [
    (0, dict(top_k=2, capacity_factor=0.5)),                     # two experts per image, images dropped
    (1, dict(top_k=1, capacity_factor=4.0, renormalize=True)),   # class token, nothing dropped
    (0, dict(top_k=2, capacity_factor=4.0, renormalize=True))])
def test_layer_equals_per_image_reference_outputs_and_gradients(prefix, settings):
    layer = _layer(prefix, **settings)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(BATCH, TOKENS, EMBED)), jnp.float32)
    r = jnp.asarray(np.random.default_rng(3).normal(size=(BATCH, TOKENS, EMBED)), jnp.float32)
    choices = _choices(layer, x)
    graphdef, state = nnx.split(layer)

    def run(state, x):
        y, aux = nnx.merge(graphdef, state)(x)
        return jnp.sum(y * r), (y, aux)

    (_, (y, aux)), grads = jax.jit(jax.value_and_grad(run, argnums=(0, 1), has_aux=True))(state, x)
    grads = ({k: v.get_value() for k, v in grads[0].items()}, grads[1])

    def ref(p, x):
        y, dropped = _reference(p, x, choices, layer.cfg, prefix)
        return jnp.sum(y * r), (y, dropped)

    (_, (want, dropped)), want_grads = jax.jit(jax.value_and_grad(ref, argnums=(0, 1), has_aux=True))(
        _params(layer), x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(aux["dropped_fraction"]), dropped.mean(), rtol=1e-6)
    if settings["capacity_factor"] < 1:
        assert 0 < dropped.mean() < 1  # some images dropped, some kept
    else:
        assert dropped.max() == 0
    for name in want_grads[0]:
        np.testing.assert_allclose(np.asarray(grads[0][name]), np.asarray(want_grads[0][name]),
                                   rtol=1e-4, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(np.asarray(grads[1]), np.asarray(want_grads[1]), rtol=1e-4, atol=1e-5)
    # the routing statistics count images: each image's k choices
    fraction = np.bincount(choices.ravel(), minlength=4) / choices.size
    np.testing.assert_allclose(np.asarray(aux["expert_fraction"]), fraction, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(aux["expert_fraction_image"]), fraction, rtol=1e-6)
    assert float(aux["tokens_image"]) == BATCH and float(aux["tokens_text"]) == 0


def test_every_token_of_an_image_goes_to_the_same_experts():
    """Expert e outputs the marker one_hot(e) whatever its input, so each
    token's output names the experts it went through."""
    layer = _layer(top_k=2)
    layer.wi.set_value(jnp.zeros_like(layer.wi[...]))
    layer.bi.set_value(jnp.zeros_like(layer.bi[...]))  # gelu(0) = 0: the expert's output is bo[e]
    layer.bo.set_value(jnp.eye(4, EMBED) * 10.0)
    x = jnp.asarray(np.random.default_rng(4).normal(size=(BATCH, TOKENS, EMBED)), jnp.float32)
    y, _ = nnx.jit(lambda m, x: m(x))(layer, x)
    reached = np.asarray(y)[..., :4] > 1e-6  # [b, n, E]: the experts each token reached
    assert (reached == reached[:, :1]).all()  # the same for all tokens of an image
    assert (reached.sum(-1) == 2).all()
    want = np.zeros((BATCH, 4), bool)
    np.put_along_axis(want, _choices(layer, x), True, axis=1)  # top-2 of the router on the mean token
    np.testing.assert_array_equal(reached[:, 0], want)
    assert len({tuple(r) for r in want}) > 1  # images do differ in their experts
    # the dispatch itself: each buffer slot holds one whole image
    logits = layer.router_logits(x)
    w, e = jax.lax.top_k(jax.nn.softmax(logits), 2)
    _, dispatch, _ = layer.dispatch(x, w, e)  # [G, S, E, C]
    d = np.asarray(dispatch)[0]
    np.testing.assert_array_equal(d.sum(-1) > 0, want)
    assert (d.sum(0) <= 1).all()  # a slot takes at most one image


def test_superclass_loss_is_minimised_by_its_mapping():
    targets = superclass_targets(jnp.array([0, 1, 2, -1, 3]), 2)
    np.testing.assert_array_equal(np.asarray(targets), [0, 1, 0, -1, 1])  # s mod E, -1 unlabelled
    np.testing.assert_array_equal(np.asarray(superclass_targets(jnp.array([0, 1, 2]), 4, (3, 1))), [3, 1, 3])
    # one logit per image: the mapping's expert minimises the loss over every other assignment
    sup = jnp.array([0, 1, 0, 1, -1])
    mapping = np.asarray(superclass_targets(sup, 4))
    best, _ = superclass_loss(5.0 * jax.nn.one_hot(mapping, 4), jnp.asarray(mapping))
    for other in range(4):
        assignment = jnp.full(5, other)
        loss, routed = superclass_loss(5.0 * jax.nn.one_hot(assignment, 4), jnp.asarray(mapping))
        assert float(loss) > float(best) and float(routed) < 1.0
    # training the router on the loss alone sends each super-class to its expert
    layer = _layer(top_k=1)
    rng = np.random.default_rng(5)
    sup = np.tile([0, 1, -1, 1], BATCH // 4)
    centres = rng.normal(size=(2, EMBED))
    x = jnp.asarray(centres[np.maximum(sup, 0)][:, None] + rng.normal(0, 0.3, (BATCH, TOKENS, EMBED)), jnp.float32)
    graphdef, state = nnx.split(layer)

    def loss(router):
        return nnx.merge(graphdef, dict(state, router=router))(x, jnp.asarray(sup))[1]["superclass_loss"]

    router = state["router"]
    start = float(loss(router))
    grad = jax.jit(jax.grad(loss))
    for _ in range(100):
        router = jax.tree.map(lambda p, g: p - 0.5 * g, router, grad(router))
    layer.router.set_value(router.get_value())
    _, aux = layer(x, jnp.asarray(sup))
    assert float(aux["superclass_loss"]) < 0.2 * start and float(aux["superclass_routed"]) == 1.0
    top1 = np.argmax(np.asarray(layer.router_logits(x)), axis=-1)
    np.testing.assert_array_equal(top1[sup >= 0], sup[sup >= 0] % 4)


def _vit_cfg(**moe):
    c = base_config().model.vit
    c.moe.update(dict(num_experts=4, top_k=1, moe_every=2, expert_mlp=c.mlp), **moe)
    return c


def test_moe_blocks_and_parameter_count():
    cfg = _vit_cfg()
    cfg.depth = 4
    vit = ViT(cfg, rngs=nnx.Rngs(0))
    blocks = list(vit.blocks.layers)
    assert [b.moe is not None for b in blocks] == [False, True, False, True]
    n = sum(x.size for x in jax.tree.leaves(nnx.state(vit, nnx.Param)))
    assert n == param_count(cfg)
    images = jnp.zeros((2, 32, 32, 3))
    x, aux = nnx.jit(lambda m, i: m.forward(i))(vit, images)
    assert x.shape == (2, 64, 64) and aux["expert_fraction"].shape == (2, 4)
    # a dense ViT: forward equals the plain call, no aux
    dense = ViT(base_config().model.vit, rngs=nnx.Rngs(0))
    y, aux = nnx.jit(lambda m, i: m.forward(i))(dense, images + 1.0)
    assert aux == {}
    np.testing.assert_array_equal(np.asarray(y), np.asarray(nnx.jit(lambda m, i: m(i))(dense, images + 1.0)))


@pytest.mark.parametrize("change,message", [
    (dict(top_k=5), r"config.model.vit.moe.top_k=5 exceeds config.model.vit.moe.num_experts=4\."),
    (dict(moe_every=3), r"config.model.vit.moe.moe_every=3 must be in 1..config.model.vit.depth=2"),
    (dict(capacity_factor=0.0), r"config.model.vit.moe.capacity_factor=0.0 must be positive"),
    (dict(superclass_experts=(0, 4)), r"config.model.vit.moe.superclass_experts=\(0, 4\) names experts \[4\]"),
    (dict(superclass_weight=-1.0), r"config.model.vit.moe.superclass_weight=-1.0 must be non-negative"),
    (dict(scan=True), r"config.model.vit.scan=True needs identical blocks"),
])
def test_refusals(change, message):
    cfg = _vit_cfg()
    if "scan" in change:
        cfg.scan = True
    else:
        cfg.moe.update(change)
    with pytest.raises(ConfigError, match=message):
        ViT(cfg, rngs=nnx.Rngs(0))


def test_moe_vit_refuses_the_aux_less_calls_and_the_schema_checks_fields():
    from mmjax.train.config_schema import field_problems

    vit = ViT(_vit_cfg(), rngs=nnx.Rngs(0))
    for call in (vit, vit.pooled, vit.mean_pooled, vit.features):
        with pytest.raises(ConfigError, match=r"only the vit_classifier model trains one"):
            call(jnp.zeros((1, 32, 32, 3)))
    c = base_config()
    c.model.vit.moe.update(num_experts=-1, capacity_factor=0.0, superclass_experts=(0, -2))
    c.model.classifier.pool = "max"
    assert {p for p, _, _ in field_problems(c)} == {
        "model.vit.moe.num_experts", "model.vit.moe.capacity_factor", "model.vit.moe.superclass_experts",
        "model.classifier.pool"}
    c = base_config()
    c.model.name = "vit_classifier"
    c.model.classifier.pool = "token"  # a SigLIP ViT without its MAP head
    with pytest.raises(ConfigError, match=r"classifier.pool='token' pools a SigLIP ViT with its MAP head"):
        build_model(c.model, nnx.Rngs(0))


def test_scanned_moe_vit_equals_the_listed_one():
    listed_cfg = _vit_cfg(moe_every=1, top_k=2, expert_mlp=64)
    scanned_cfg = listed_cfg.copy_and_resolve_references()
    scanned_cfg.scan = True
    listed, scanned = ViT(listed_cfg, rngs=nnx.Rngs(0)), ViT(scanned_cfg, rngs=nnx.Rngs(1))
    per_layer = nnx.state(listed.blocks.layers, nnx.Param)
    nnx.update(scanned.blocks.layers, jax.tree.map(lambda *xs: jnp.stack(xs), *[per_layer[i] for i in range(2)]))
    scanned.pos_embed.set_value(listed.pos_embed[...])
    for name in ("patch_embed", "ln_post"):
        nnx.update(getattr(scanned, name), nnx.state(getattr(listed, name)))
    images = jnp.asarray(np.random.default_rng(6).normal(size=(4, 32, 32, 3)), jnp.float32)
    superclass_id = jnp.array([0, 1, -1, 1])
    run = nnx.jit(lambda m, i, s: m.forward(i, s))
    (x, aux), (y, scanned_aux) = run(listed, images, superclass_id), run(scanned, images, superclass_id)
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-6, atol=1e-6)
    assert aux.keys() == scanned_aux.keys() and aux["superclass_loss"].shape == (2,)
    for key in aux:
        np.testing.assert_allclose(np.asarray(scanned_aux[key]), np.asarray(aux[key]), rtol=1e-6, err_msg=key)


def _mesh_run(layer, x, r, mesh_shape=None):
    """Jitted (y, dropped share, (param grads, input grads)) of `sum(y * r)`, the layer sharded by the
    fsdp layout on `mesh_shape` (None: one device, no mesh)."""
    from mmjax.models.partitioning import activation_sharding
    from mmjax.parallel import activation_resolver, batch_sharding, get_layout, make_mesh, tree_shardings

    graphdef, params = nnx.split(layer, nnx.Param)
    resolver = None
    if mesh_shape is not None:
        mesh, rules = make_mesh(mesh_shape), get_layout("fsdp")
        resolver = activation_resolver(mesh, rules)
        params = jax.device_put(params, tree_shardings(params, mesh, rules))
        x = jax.device_put(x, batch_sharding(mesh, rules, 3))

    def loss(p, x):
        with activation_sharding(resolver):
            y, aux = nnx.merge(graphdef, p)(x)
        return jnp.sum(y * r), (y, aux["dropped_fraction"])

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (_, (y, dropped)), grads = fn(params, x)
    return fn, params, x, y, dropped, grads


MESH = {"data": 2, "fsdp": 2, "expert": 2}


def test_mesh_capacity_drops_per_batch_shard_like_the_reference():
    """On data=2 x fsdp=2 x expert=2 each of the 8 batch shards is a dispatch
    group with its own capacity: with capacity_factor < 1 the images dropped
    are those of `_reference(groups=8)`, not of one whole-batch group."""
    batch = 32
    layer = _layer(top_k=2, capacity_factor=0.5)
    x = jnp.asarray(np.random.default_rng(7).normal(size=(batch, TOKENS, EMBED)), jnp.float32)
    r = jnp.asarray(np.random.default_rng(8).normal(size=(batch, TOKENS, EMBED)), jnp.float32)
    choices = _choices(layer, x)
    _, _, _, y, dropped, grads = _mesh_run(layer, x, r, MESH)
    want, want_dropped = _reference(_params(layer), x, choices, layer.cfg, 0, groups=8)
    _, one_group = _reference(_params(layer), x, choices, layer.cfg, 0, groups=1)
    assert 0 < float(want_dropped.mean()) < 1 and not np.array_equal(np.asarray(one_group), np.asarray(want_dropped))
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(dropped), float(want_dropped.mean()), rtol=1e-6)

    def ref_loss(p, x):
        return jnp.sum(_reference(p, x, choices, layer.cfg, 0, groups=8)[0] * r)

    want_grads, want_x_grad = jax.jit(jax.grad(ref_loss, argnums=(0, 1)))(_params(layer), x)
    got = grads[0].to_pure_dict()
    for name in want_grads:
        np.testing.assert_allclose(np.asarray(got[name]), np.asarray(want_grads[name]), rtol=1e-4, atol=1e-5,
                                   err_msg=name)
    np.testing.assert_allclose(np.asarray(grads[1]), np.asarray(want_x_grad), rtol=1e-4, atol=1e-5)


def test_mesh_layer_exchanges_images_with_all_to_alls_over_the_expert_axis():
    """The compiled forward + backward on data=2 x fsdp=2 x expert=2: the
    expert buffers `[E, G, C, n, M]` move between the group- and the
    expert-sharded layout by all-to-alls among the 2 devices of each expert
    group (forward 2, backward 2 with the input's gradient), and no buffer of rank 4 or more
    (the dispatch buffers, the images) is all-gathered."""
    from mmjax.bench.hlo_collectives import parse_hlo_module

    batch = 32
    layer = _layer(top_k=2, capacity_factor=2.0)
    x = jnp.asarray(np.random.default_rng(9).normal(size=(batch, TOKENS, EMBED)), jnp.float32)
    fn, params, xs, *_ = _mesh_run(layer, x, jnp.ones_like(x), MESH)
    hlo = fn.lower(params, xs).compile().as_text()
    ops = [i for instrs in parse_hlo_module(hlo)[1].values() for i in instrs]
    exchanges = [i for i in ops if i.opcode in ("all-to-all", "all-to-all-start")]
    assert len(exchanges) == 4, [i.shape for i in exchanges]
    for op in exchanges:
        axes = re.search(r"replica_groups=mesh\[[^\]]*\]\s*\{([^}]*)\}", op.attrs).group(1)
        assert axes == "'expert'", op.attrs  # among the devices that differ in their expert coordinate
        assert re.search(r"\[([0-9,]*)\]", op.shape).group(1).count(",") + 1 >= 5, op.shape  # [E,G,C,n,M] pieces
    gathers = [i for i in ops if i.opcode in ("all-gather", "all-gather-start")]
    assert all(len(re.search(r"\[([0-9,]*)\]", g.shape).group(1).split(",")) < 4 for g in gathers), \
        [g.shape for g in gathers]


def test_param_counts_weigh_each_moe_by_its_own_top_k():
    """The ViT's experts count vit.moe's top_k / num_experts toward `active`,
    the decoder's their own (the tiny V-MoE: the decoder has no experts)."""
    from experiments import vmoe_tiny
    from mmjax.train.param_counts import decoder_param_counts, param_counts

    def vit_expert_params(vit) -> tuple[int, int]:  # (all experts' weights, the unused share's) over the MoE blocks
        n_moe = sum((i + 1) % vit.moe.moe_every == 0 for i in range(vit.depth))
        per_expert = 2 * vit.embed * vit.moe.expert_mlp + vit.moe.expert_mlp + vit.embed
        return n_moe * vit.moe.num_experts * per_expert, n_moe * (vit.moe.num_experts - vit.moe.top_k) * per_expert

    c = vmoe_tiny.get_config("moe")
    n, dense = param_counts(c), param_counts(vmoe_tiny.get_config("dense"))
    experts, unused = vit_expert_params(c.model.vit)
    n_moe, e, mlp = 2, c.model.vit.embed, c.model.vit.mlp
    assert n["total"] == dense["total"] + experts + n_moe * (e * 2 - (2 * e * mlp + mlp + e))  # + routers - MLPs
    assert n["active"] == n["total"] - unused and dense["active"] == dense["total"]
    # both MoEs, with different top_k / num_experts
    c = base_config()
    c.model.vit.update(depth=2, embed=32, heads=2, mlp=64)
    c.model.vit.moe.update(num_experts=4, top_k=1, moe_every=1, expert_mlp=48)
    c.model.decoder.update(layers=2, embed=32, mlp=64, vocab_size=512)
    c.model.decoder.moe.update(num_experts=8, top_k=2, moe_every=2, expert_mlp=40)
    vit, dec = param_counts(c, "vit"), param_counts(c, "decoder")
    experts, unused = vit_expert_params(c.model.vit)
    assert vit["active"] == vit["total"] - unused and experts > 0
    want = decoder_param_counts(c.model.decoder)
    assert (dec["total"], dec["active"]) == (want["total"], want["active"])
    whole = param_counts(c)
    assert whole["total"] - whole["active"] == (vit["total"] - vit["active"]) + (dec["total"] - dec["active"])


def _tiny(arg="moe"):
    from experiments import vmoe_tiny

    return vmoe_tiny.get_config(arg)


@pytest.mark.parametrize("change,message", [
    (lambda c: c.model.vit.moe.update(num_experts=3),
     r"config.model.vit.moe.num_experts=3 is not divisible by the config.mesh.expert=2 expert shards"),
    (lambda c: c.model.update(name="dual_encoder"),
     r"config.model.vit.moe.num_experts=2 makes a mixture-of-experts ViT, which model 'dual_encoder' does not train"),
    (lambda c: c.model.update(name="mm1"), r"which model 'mm1' does not train"),
    (lambda c: c.model.vit.moe.update(renormalize=True),
     r"config.model.vit.moe.renormalize=True with config.model.vit.moe.top_k=1 makes every combine weight 1"),
    (lambda c: c.model.vit.moe.update(top_k=3),
     r"config.model.vit.moe.top_k=3 exceeds config.model.vit.moe.num_experts=2\."),
])
def test_config_refusals_before_any_build(change, message):
    from mmjax.train.config_checks import check_static

    c = _tiny()
    change(c)
    with pytest.raises(ConfigError, match=message):
        check_static(c)


def test_superclass_routing_needs_two_super_classes_and_the_mesh_check_counts_experts(tmp_path):
    from mmjax.train.config_checks import check_config, check_static

    classes = tmp_path / "classes.txt"
    classes.write_text("cat\tanimal\ndog\tanimal\n")
    c = _tiny()
    c.data.labels.classes = str(classes)
    c.model.classifier.num_classes = 2
    with pytest.raises(ConfigError, match=r"config.model.vit.moe.superclass_weight=1.0 routes images by "
                                          r"super-class, but the label set .* has 1 super-class"):
        check_static(c)
    c.model.vit.moe.superclass_weight = 0.0
    check_static(c)
    two = tmp_path / "two_superclasses.txt"
    two.write_text("cat\tanimal\ncar\tvehicle\n")
    c.model.vit.moe.superclass_weight = 1.0
    c.data.labels.classes = str(two)
    check_static(c)
    # an expert axis resolved from -1 (fsdp=1, expert=-1: 8 shards) does not divide 2 experts
    c.mesh.update(data=1, fsdp=1, expert=-1)
    check_static(c)
    with pytest.raises(ConfigError, match=r"config.model.vit.moe.num_experts=2 is not divisible by the 8 expert"):
        check_config(c, 8)
