"""libtpu stays quiet on hosts without TPUs and untouched elsewhere (mmjax/libtpu_env.py)."""

import importlib.util
import os
import subprocess
import sys

import pytest

from mmjax.libtpu_env import QUIET_ENV, host_has_tpu, quiet_libtpu_without_tpus

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_only_a_host_without_tpus_and_without_user_settings_is_changed(tmp_path):
    dev = tmp_path / "dev"
    dev.mkdir()
    env = {"PATH": "/usr/bin"}
    assert quiet_libtpu_without_tpus(env, str(dev)) and env == {"PATH": "/usr/bin", **QUIET_ENV}
    for user in ({"TPU_WORKER_HOSTNAMES": "w-0,w-1"}, {"JAX_PLATFORMS": "tpu,cpu"}):
        env = dict(user)
        assert not quiet_libtpu_without_tpus(env, str(dev)) and env == user
    for node in ("accel0", "vfio/0"):
        tpu_dev = tmp_path / node.replace("/", "_")
        (tpu_dev / node).parent.mkdir(parents=True, exist_ok=True)
        (tpu_dev / node).touch()
        env = {}
        assert host_has_tpu(str(tpu_dev)) and not quiet_libtpu_without_tpus(env, str(tpu_dev)) and env == {}


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu (tpu extra) is not installed")
def test_no_libtpu_lines_when_jax_starts_here_and_aot_still_compiles():
    env = {k: v for k, v in os.environ.items() if k not in QUIET_ENV and k != "JAX_PLATFORMS"}
    code = ("import mmjax, jax, jax.numpy as jnp\n"
            "from mmjax.bench.topology import topology_devices\n"
            "print(jax.devices()[0].platform)\n"
            "_, devices = topology_devices('v5p:2x2x1')\n"
            "mesh = jax.sharding.Mesh(devices, ('x',))\n"
            "f = jax.jit(lambda a: a * 2, in_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('x')))\n"
            "print(f.lower(jax.ShapeDtypeStruct((8,), jnp.float32)).compile().as_text()[:10] != '')\n")
    if not host_has_tpu():
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.split() == ["cpu", "True"]
        for noise in ("host bounds", "worker hostname", "E0000", "InitGoogle"):
            assert noise not in out.stderr, out.stderr[-2000:]
