"""Mesh construction, config validation and parameter shardings from the rules."""

import os

import jax
import pytest
from jax.sharding import PartitionSpec as P

from conftest import small_config
from mmjax.parallel import get_layout, logical_to_spec, make_mesh, resolve_mesh_shape
from mmjax.parallel.mesh import MeshConfigError
from mmjax.parallel.rules import LayoutError
from mmjax.train.config_checks import ConfigError, check_config
from mmjax.train.optimizer import make_optimizer
from mmjax.train.state import build_train_setup, init_train_state


def test_mesh_has_requested_shape():
    mesh = make_mesh({"data": 2, "fsdp": 2, "expert": 2})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "expert": 2, "model": 1}
    assert mesh.devices.size == 8 == jax.device_count()


def test_minus_one_fills_remaining_devices():
    assert resolve_mesh_shape({"data": -1, "fsdp": 2}, 8) == {"data": 4, "fsdp": 2, "expert": 1, "model": 1}


@pytest.mark.parametrize("mesh, fragment", [
    ({"data": 3, "fsdp": 2}, "needs 6 devices but 8 are available"),
    ({"data": -1, "fsdp": -1}, "at most one axis may be -1"),
    ({"data": -1, "fsdp": 3}, "does not divide"),
    ({"data": 0}, "config.mesh.data=0 is invalid"),
    ({"pipeline": 2}, "unknown axis 'pipeline'"),
])
def test_impossible_meshes_are_rejected_with_a_sentence(mesh, fragment):
    with pytest.raises(MeshConfigError, match=fragment):
        resolve_mesh_shape(mesh, 8)


def test_config_checks_name_the_field():
    c = small_config()
    c.data.global_batch = 6
    with pytest.raises(ConfigError, match="config.data.global_batch=6 is not divisible by the 8 batch shards"):
        check_config(c, 8)
    c = small_config()
    c.model.connector.num_tokens = 9  # linked: data.tokens_per_image follows
    assert c.data.tokens_per_image == 9
    check_config(c, 8)


def test_logical_to_spec_and_divisibility():
    mesh = make_mesh({"data": 2, "fsdp": 2, "expert": 2})
    rules = get_layout("fsdp")
    assert logical_to_spec(("embed", "mlp"), rules, mesh) == P("fsdp", None)
    assert logical_to_spec(("batch", None), rules, mesh) == P(("data", "fsdp", "expert"), None)
    with pytest.raises(LayoutError, match="not divisible"):
        logical_to_spec(("embed",), rules, mesh, shape=(3,), where="w")
    with pytest.raises(LayoutError, match="not a known layout"):
        get_layout("nope")


def test_params_and_optimizer_state_are_sharded_as_the_rules_say():
    c = small_config()
    mesh = make_mesh(dict(c.mesh))
    setup = build_train_setup(c, mesh, get_layout(c.rules),
                              lambda p: make_optimizer(c.optimizer, c.train.steps, p))
    state = init_train_state(c, setup)
    params = state["params"]
    dec = params["decoder"]
    assert dec["layers"]["layers"][0]["mlp"]["gate"]["kernel"][...].sharding.spec == P("fsdp", None)
    assert dec["layers"]["layers"][0]["mlp"]["down"]["kernel"][...].sharding.spec == P(None, "fsdp")
    assert dec["layers"]["layers"][0]["attn"]["query"]["kernel"][...].sharding.spec == P("fsdp", None, None)
    assert dec["embedder"]["embedding"][...].sharding.spec == P(None, "fsdp")
    assert dec["final_norm"]["scale"][...].sharding.spec == P("fsdp")
    assert params["vit"]["blocks"]["layers"][0]["fc1"]["kernel"][...].sharding.spec == P("fsdp", None)
    # Adam moments inherit their parameter's sharding.
    adam = state["opt_state"][1][0]
    assert adam.mu["decoder"]["layers"]["layers"][0]["mlp"]["gate"]["kernel"][...].sharding.spec == P("fsdp", None)
    assert adam.nu["decoder"]["embedder"]["embedding"][...].sharding.spec == P(None, "fsdp")
    # The gate kernel [embed=128, mlp=256] is split in two along embed.
    kernel = dec["layers"]["layers"][0]["mlp"]["gate"]["kernel"][...]
    assert {s.data.shape for s in kernel.addressable_shards} == {(64, 256)}
    assert setup.batch_shardings["tokens"].spec == P(("data", "fsdp", "expert"), None)


def test_activation_constraints_follow_the_rules():
    import jax.numpy as jnp

    from mmjax.models.partitioning import activation_sharding, constrain
    from mmjax.parallel import activation_resolver

    mesh = make_mesh({"data": 2, "fsdp": 2, "expert": 2})
    resolver = activation_resolver(mesh, get_layout("fsdp"))
    f = jax.jit(lambda x: constrain(x * 2, ("batch", "seq", "act_embed")))
    x = jnp.ones((8, 4, 6))
    assert constrain(x, ("batch", "seq", "act_embed")) is x  # no resolver: no-op
    with activation_sharding(resolver):
        y = f(x)
    assert tuple(y.sharding.spec) + (None,) * (3 - len(y.sharding.spec)) == (("data", "fsdp", "expert"), None, None)
    with activation_sharding(resolver):  # a batch of 3 cannot be split 8 ways: left replicated
        z = jax.jit(lambda x: constrain(x, ("batch", "seq")))(jnp.ones((3, 4)))
    assert z.sharding.spec in (P(None, None), P())


@pytest.mark.slow
def test_train_steps_compile_without_involuntary_rematerialization():
    """XLA's SPMD partitioner warns "Involuntary full rematerialization" when
    an activation's sharding cannot be reached without replicating it (the
    C-Abstractor's readout did, before its activations were constrained).
    Every connector (also with gradient accumulation) and both MoE dispatch
    paths must compile without it."""
    import subprocess
    import sys

    kinds = ["c_abstractor", "avg_pool", "attention_pool", "c_abstractor-accum2", "avg_pool-accum2",
             "moe-capacity", "moe-dropless"]
    worker = os.path.join(os.path.dirname(__file__), "compile_warnings_worker.py")
    out = subprocess.run([sys.executable, worker, *kinds], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == [w for k in kinds for w in ("compiled", k)]
    bad = [line for line in out.stderr.splitlines() if "Involuntary full rematerialization" in line]
    assert bad == [], bad[:3]
