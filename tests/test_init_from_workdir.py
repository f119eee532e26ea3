"""`config.init_from` naming a training workdir: the next stage starts from
the newest checkpoint that restores, takes the components both models share,
keeps fresh what the source lacks, and refuses in one sentence what cannot be
used."""

import glob
import os

import grain
import jax
import numpy as np
import pytest
from flax import nnx

from conftest import small_config
from mmjax.errors import ConfigError
from mmjax.parallel import get_layout, make_mesh
from mmjax.train.checkpoint import Checkpointer
from mmjax.train.config_checks import check_static
from mmjax.train.init_from import InitFromError, apply_init_from
from mmjax.train.optimizer import make_optimizer
from mmjax.train.state import build_train_setup, init_train_state


def _setup(c):
    mesh = make_mesh(dict(c.mesh))
    return build_train_setup(c, mesh, get_layout(c.rules), lambda p: make_optimizer(c.optimizer, 10, p))


def _shifted(state: dict, by: float) -> dict:
    """The state with every model variable moved by `by` (a 'trained' one)."""
    params = jax.tree.map(lambda x: x + by if jax.numpy.issubdtype(x.dtype, jax.numpy.floating) else x,
                          state["params"])
    return {**state, "params": params}


def _pure(params) -> dict:
    return jax.tree.map(np.asarray, params.to_pure_dict())


@pytest.fixture(scope="module")
def stage_one(tmp_path_factory):
    """A workdir with checkpoints at steps 2 and 4 of the small config: the
    variables moved by 2 and by 4 from their initialisation (seed 0)."""
    c = small_config()
    setup = _setup(c)
    state = init_train_state(c, setup)
    workdir = str(tmp_path_factory.mktemp("stage") / "one")
    ckpt = Checkpointer(workdir, async_save=False)
    it = iter(grain.MapDataset.range(10).to_iter_dataset())
    for step in (2, 4):
        ckpt.save(step, _shifted(state, float(step)), it)
    ckpt.close()
    return workdir, {step: _pure(_shifted(state, float(step))["params"]) for step in (2, 4)}


def test_the_next_stage_starts_from_the_newest_checkpoint(stage_one):
    workdir, saved = stage_one
    c = small_config()
    c.train.seed = 1  # another initialisation: everything must come from the workdir
    setup = _setup(c)
    fresh = init_train_state(c, setup)
    before_opt = jax.tree.map(np.asarray, fresh["opt_state"])
    lines = []
    state = apply_init_from(fresh, [workdir], lines.append)
    jax.tree.map(np.testing.assert_array_equal, _pure(state["params"]), saved[4])
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state["opt_state"]), before_opt)
    assert int(state["step"]) == 0
    placed = jax.tree.map(lambda x, sharding: x.sharding == sharding, state["params"], setup.state_shardings["params"])
    assert all(jax.tree.leaves(placed))  # restored straight onto the run's shardings
    assert any("connector, decoder, vit" in line or "vit, connector, decoder" in line for line in lines), lines


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(stage_one, tmp_path):
    import shutil

    workdir = str(tmp_path / "one")
    shutil.copytree(stage_one[0], workdir)
    files = glob.glob(os.path.join(workdir, "checkpoints", "4", "state", "d", "*"))
    for path in files:
        with open(path, "r+b") as f:
            f.truncate(16)
    c = small_config()
    lines = []
    state = apply_init_from(init_train_state(c, _setup(c)), [workdir], lines.append)
    jax.tree.map(np.testing.assert_array_equal, _pure(state["params"]), stage_one[1][2])
    assert any(line.startswith("warning: init_from cannot read") and "/checkpoints/4" in line for line in lines)
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "4"))  # nothing moved or deleted


def test_only_shared_components_are_taken(tmp_path):
    """A source with a ViT and a decoder only (an encoder pre-training run, say):
    those two are taken, the connector keeps its initialisation."""
    c = small_config()
    setup = _setup(c)
    state = _shifted(init_train_state(c, setup), 3.0)
    partial = dict(state, params=nnx.State({"vit": state["params"]["vit"], "decoder": state["params"]["decoder"]}))
    ckpt = Checkpointer(str(tmp_path / "enc"), async_save=False)
    ckpt.save(1, partial, iter(grain.MapDataset.range(4).to_iter_dataset()))
    ckpt.close()
    fresh = init_train_state(c, setup)
    connector = _pure(fresh["params"]["connector"])
    lines = []
    out = apply_init_from(fresh, [str(tmp_path / "enc")], lines.append)
    assert any("keep their initialisation: connector" in line for line in lines), lines
    jax.tree.map(np.testing.assert_array_equal, _pure(out["params"]["vit"]), _pure(state["params"]["vit"]))
    jax.tree.map(np.testing.assert_array_equal, _pure(out["params"]["connector"]), connector)


def test_a_shape_that_differs_is_refused_naming_the_variable(stage_one):
    c = small_config()
    c.model.decoder.mlp = 128
    with pytest.raises(InitFromError, match=r"^config.init_from: decoder\.layers\..*\.mlp\..* has shape .* in .* "
                                            r"and .* in this model\.$"):
        apply_init_from(init_train_state(c, _setup(c)), [stage_one[0]], lambda _: None)


def test_a_workdir_without_a_checkpoint_is_refused_before_anything_is_built(tmp_path):
    os.makedirs(tmp_path / "empty" / "checkpoints" / "5")  # a step that never finished writing
    c = small_config()
    c.init_from = (str(tmp_path / "empty"),)
    with pytest.raises(ConfigError, match=r"is a training workdir without a finished checkpoint; train it first"):
        check_static(c)
    c.init_from = (str(tmp_path / "nothing"),)
    with pytest.raises(ConfigError, match=r"is neither a training workdir \(no checkpoints/\) nor a folder"):
        check_static(c)


def test_a_dual_encoder_run_hands_its_vit_to_mm1(tmp_path):
    """The encoder pre-training hand-off: an MM1 run whose init_from names a
    CLIP / SigLIP workdir starts with that run's ViT; its connector and
    decoder keep their initialisation (the text tower and projections have
    no place in MM1)."""
    from experiments.clip_tiny import get_config as clip_tiny_config
    from experiments.tiny import get_config as tiny_config

    clip = clip_tiny_config()
    trained = _shifted(init_train_state(clip, _setup(clip)), 3.0)
    ckpt = Checkpointer(str(tmp_path / "clip"), async_save=False)
    ckpt.save(5, trained, iter(grain.MapDataset.range(4).to_iter_dataset()))
    ckpt.close()
    mm1 = tiny_config()
    mm1.init_from = (str(tmp_path / "clip"),)
    check_static(mm1)
    fresh = init_train_state(mm1, _setup(mm1))
    kept = {k: _pure(fresh["params"][k]) for k in ("connector", "decoder")}
    shardings = [leaf.sharding for leaf in jax.tree.leaves(fresh["params"]["vit"])]
    lines = []
    out = apply_init_from(fresh, list(mm1.init_from), lines.append)
    assert any("keep their initialisation: connector, decoder" in line for line in lines), lines
    jax.tree.map(np.testing.assert_array_equal, _pure(out["params"]["vit"]), _pure(trained["params"]["vit"]))
    for name, values in kept.items():
        jax.tree.map(np.testing.assert_array_equal, _pure(out["params"][name]), values)
    assert [leaf.sharding for leaf in jax.tree.leaves(out["params"]["vit"])] == shardings  # the MM1 run's layout
