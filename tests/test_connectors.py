"""Connectors: output shapes for each token count and input resolution,
gradients reaching every parameter, selection by config name; the
C-Abstractor's scanned ResBlocks against listed ones (outputs, gradients,
shardings, loading listed weights)."""

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from conftest import small_config
from mmjax.models import MM1Model
from mmjax.models.connectors import CONNECTORS, make_connector
from mmjax.parallel import get_layout, make_mesh
from mmjax.parallel.rules import tree_shardings
from mmjax.train.flops import train_flops


@pytest.mark.parametrize("kind", sorted(CONNECTORS))
@pytest.mark.parametrize("num_tokens", [4, 9])
def test_shapes_and_gradients(kind, num_tokens):
    cfg = mlc.ConfigDict(dict(kind=kind, num_tokens=num_tokens, hidden=16, depth=1, heads=2))
    conn = make_connector(cfg, vit_embed=24, num_patches=36, embed=40, rngs=nnx.Rngs(0))
    for grid in (6, 8):  # the trained resolution and a larger one (pos-emb interpolated)
        x = jax.random.normal(jax.random.key(grid), (2, grid * grid, 24))
        assert conn(x).shape == (2, num_tokens, 40)

    x = jax.random.normal(jax.random.key(0), (2, 36, 24))
    grads = nnx.grad(lambda m: jnp.sum(jnp.sin(m(x))))(conn)
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        assert np.abs(np.asarray(g)).max() > 0, f"{kind}: no gradient reaches {jax.tree_util.keystr(path)}"


def test_unknown_connector_is_named():
    cfg = mlc.ConfigDict(dict(kind="perceiver", num_tokens=4))
    with pytest.raises(ValueError, match="connector.kind='perceiver' is unknown"):
        make_connector(cfg, vit_embed=8, num_patches=16, embed=8, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("kind", sorted(CONNECTORS))
def test_config_kind_switches_the_connector(kind):
    c = small_config()
    c.model.connector.kind = kind  # the only edit
    model = MM1Model(c.model, rngs=nnx.Rngs(0))
    assert type(model.connector) is CONNECTORS[kind]
    images = jnp.zeros((1, 2, 32, 32, 3))
    tokens = jax.jit(lambda im: model.encode_images(im))(images)
    assert tokens.shape == (1, 2 * c.model.connector.num_tokens, c.model.decoder.embed)


def _c_abstractor(scan: bool, seed: int, depth: int = 3):
    cfg = mlc.ConfigDict(dict(kind="c_abstractor", num_tokens=4, hidden=16, depth=depth, heads=2, scan=scan))
    return make_connector(cfg, vit_embed=24, num_patches=36, embed=40, rngs=nnx.Rngs(seed))


def _stacked_blocks(pure: dict, depth: int) -> dict:
    """A listed C-Abstractor's pure params with each stage's blocks stacked `[depth, ...]`."""
    out = dict(pure)
    for stage in ("stage1", "stage2"):
        layers = [pure[stage]["blocks"]["layers"][i] for i in range(depth)]
        out[stage] = dict(pure[stage], blocks={"layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)})
    return out


def test_scanned_c_abstractor_matches_listed_outputs_and_gradients():
    depth = 3
    listed, scanned = _c_abstractor(False, 0, depth), _c_abstractor(True, 1, depth)
    kernel = scanned.stage1.blocks.layers.conv2.kernel
    assert kernel.shape == (depth, 3, 3, 16, 16)
    assert kernel.get_metadata()["logical_axes"] == ("layers", "conv_height", "conv_width", "conv_in", "conv_out")
    assert scanned.stage2.blocks.layers.norm1.scale.shape == (depth, 16)
    assert listed.stage1.blocks.layers[0].conv2.kernel.shape == (3, 3, 16, 16)

    weights = _stacked_blocks(nnx.state(listed, nnx.Param).to_pure_dict(), depth)
    state = nnx.state(scanned, nnx.Param)
    nnx.replace_by_pure_dict(state, weights)
    nnx.update(scanned, state)

    x = jax.random.normal(jax.random.key(0), (2, 36, 24))
    forward = nnx.jit(lambda m, v: m(v))
    np.testing.assert_allclose(forward(scanned, x), forward(listed, x), rtol=1e-5, atol=1e-5)
    grad = nnx.jit(nnx.grad(lambda m, v: jnp.sum(jnp.sin(m(v)))))
    want = _stacked_blocks(nnx.state(grad(listed, x), nnx.Param).to_pure_dict(), depth)
    got = nnx.state(grad(scanned, x), nnx.Param).to_pure_dict()
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))

    # The same through jax.jit of the split state.
    graphdef, params = nnx.split(scanned)
    loss = jax.jit(jax.value_and_grad(lambda p, v: jnp.sum(jnp.sin(nnx.merge(graphdef, p)(v)))))
    value, g = loss(params, x)
    assert value == pytest.approx(float(jnp.sum(jnp.sin(forward(listed, x)))), rel=1e-5, abs=1e-5)
    np.testing.assert_allclose(g.to_pure_dict()["stage2"]["blocks"]["layers"]["conv2"]["kernel"],
                               want["stage2"]["blocks"]["layers"]["conv2"]["kernel"], rtol=1e-5, atol=1e-5)


def test_scanned_c_abstractor_shards_like_listed_plus_a_layers_axis():
    mesh = make_mesh({"data": 2, "fsdp": 2, "expert": 1, "model": 2})
    rules = get_layout("fsdp")
    listed = tree_shardings(nnx.state(_c_abstractor(False, 0), nnx.Param), mesh, rules).to_pure_dict()
    scanned = tree_shardings(nnx.state(_c_abstractor(True, 0), nnx.Param), mesh, rules).to_pure_dict()
    for stage in ("stage1", "stage2"):
        for module, leaves in listed[stage]["blocks"]["layers"][0].items():
            for name, sharding in leaves.items():
                stacked = scanned[stage]["blocks"]["layers"][module][name]
                assert stacked.spec == P(None, *sharding.spec), (stage, module, name)
    assert scanned["stage1"]["blocks"]["layers"]["conv2"]["kernel"].spec == P(None, None, None, None, "model")


def test_listed_c_abstractor_weights_init_a_scanned_one(tmp_path):
    """`config.init_from` and `match_layer_stacking` stack the connector's
    listed blocks into a scanned one, and unstack them back."""
    import json

    import orbax.checkpoint as ocp

    from mmjax.train.init_from import apply_init_from, match_layer_stacking

    listed, scanned = _c_abstractor(False, 0), _c_abstractor(True, 1)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(str(tmp_path / "listed" / "params"), nnx.state(listed, nnx.Param).to_pure_dict())
    cfg = dict(kind="c_abstractor", num_tokens=4, hidden=16, depth=3, heads=2, scan=False)
    (tmp_path / "listed" / "mmjax.json").write_text(json.dumps({"component": "connector", "config": cfg}))

    class Model(nnx.Module):
        def __init__(self, connector):
            self.connector = connector

    model = Model(scanned)
    state = apply_init_from({"params": nnx.state(model, nnx.Param)}, [str(tmp_path / "listed")])
    nnx.update(model, state["params"])
    x = jax.random.normal(jax.random.key(0), (2, 36, 24))
    np.testing.assert_allclose(model.connector(x), listed(x), rtol=1e-5, atol=1e-5)

    relisted = _c_abstractor(False, 2)
    target = nnx.state(relisted, nnx.Param)
    nnx.replace_by_pure_dict(target, match_layer_stacking(nnx.state(scanned, nnx.Param).to_pure_dict(),
                                                          target.to_pure_dict()))
    nnx.update(relisted, target)
    np.testing.assert_allclose(relisted(x), listed(x), rtol=1e-5, atol=1e-5)


def test_config_scan_stacks_the_c_abstractor_and_keeps_its_flops():
    c = small_config()
    c.model.connector.depth = 2
    flops = train_flops(c, num_devices=8)
    c.model.connector.scan = True
    assert train_flops(c, num_devices=8).forward == flops.forward
    model = MM1Model(c.model, rngs=nnx.Rngs(0))
    assert model.connector.stage1.blocks.scan and model.connector.stage1.blocks.layers.conv1.kernel.shape[0] == 2
    tokens = jax.jit(lambda im: model.encode_images(im))(jnp.zeros((1, 2, 32, 32, 3)))
    assert tokens.shape == (1, 2 * c.model.connector.num_tokens, c.model.decoder.embed)
