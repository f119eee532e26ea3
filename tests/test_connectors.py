"""Connectors: output shapes for each token count and input resolution,
gradients reaching every parameter, selection by config name."""

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest
from flax import nnx

from conftest import small_config
from mmjax.models import MM1Model
from mmjax.models.connectors import CONNECTORS, make_connector


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
