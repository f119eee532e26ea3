"""Generation on the training mesh: parameters laid out by the training
rules, the batch split over the data axes, every key/value cache sharded by
batch and kv-heads; the tokens equal those of the unsharded model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from mmjax.generate.decode import CACHE_AXES, Sampling, jitted_generate, prefill, without_capacity_drops
from mmjax.models.partitioning import activation_sharding
from mmjax.models.registry import build_model
from mmjax.parallel import activation_resolver, batch_sharding, get_layout, make_mesh, tree_shardings
from test_generate import _text_config

NEW = 5
LENGTHS = np.array([9, 3, 6, 1, 8, 5, 2, 7], np.int32)


def _batch(vocab: int) -> dict:
    tokens = np.random.default_rng(4).integers(4, vocab, (len(LENGTHS), LENGTHS.max())).astype(np.int32)
    tokens[np.arange(LENGTHS.max())[None, :] >= LENGTHS[:, None]] = 0
    return {"tokens": tokens, "lengths": LENGTHS}


def _on_mesh(model, mesh, rules):
    """The model with its parameters placed as training places them."""
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.device_put(params, tree_shardings(params, mesh, rules)))
    return model


def _trimmed(spec) -> tuple:
    """A PartitionSpec without trailing replicated dimensions."""
    parts = list(spec)
    while parts and parts[-1] is None:
        parts.pop()
    return tuple(parts)


@pytest.mark.parametrize("mesh_shape,decoder", [
    (dict(data=2, fsdp=2, expert=1, model=2), dict(heads=4, kv_heads=2)),
    (dict(data=2, fsdp=1, expert=2, model=2), dict(heads=4, kv_heads=2, moe=dict(
        num_experts=4, top_k=2, moe_every=1, capacity_factor=1.0, expert_mlp=64))),
], ids=["dense_tensor_parallel", "moe_expert_parallel"])
def test_sharded_generation_matches_unsharded(mesh_shape, decoder):
    c = _text_config(**decoder)
    rules = get_layout("fsdp")
    mesh = make_mesh(mesh_shape)
    batch = _batch(c.model.decoder.vocab_size)
    sampling = Sampling(max_new_tokens=NEW, stop_ids=())
    want, _ = jitted_generate(build_model(c.model, nnx.Rngs(5)), sampling)(
        {k: jnp.asarray(v) for k, v in batch.items()})

    model = _on_mesh(build_model(c.model, nnx.Rngs(5)), mesh, rules)
    placed = {k: jax.device_put(v, batch_sharding(mesh, rules, v.ndim)) for k, v in batch.items()}
    resolver = activation_resolver(mesh, rules)
    got, _ = jitted_generate(model, sampling, resolver=resolver)(placed)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

    graphdef, state = nnx.split(without_capacity_drops(model))

    @jax.jit
    def caches(state, batch):
        with activation_sharding(resolver):
            return prefill(nnx.merge(graphdef, state), batch, LENGTHS.max() + NEW)[1]

    expected = resolver(CACHE_AXES, (len(LENGTHS), LENGTHS.max() + NEW, 2, c.model.decoder.head_dim)).spec
    assert expected[0] and expected[2] == "model"  # batch split over the data axes, kv-heads over `model`
    for k, v in caches(state, placed):
        assert _trimmed(k.sharding.spec) == _trimmed(expected) == _trimmed(v.sharding.spec)
    wq = model.decoder.layers.layer(0).attn.query.kernel.value
    assert isinstance(wq.sharding, NamedSharding) and wq.sharding.spec != PartitionSpec()
