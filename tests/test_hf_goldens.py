"""The HF importer against stored `transformers` references (tiny random
float32 models written by `tests/goldens/make_hf_goldens.py`; the versions
that wrote them are in `tests/goldens/hf/versions.json`): CLIP / SigLIP
vision towers, Llama (tied and untied), Mixtral on both dispatch paths, older
key layouts, errors that name the tensor, the CLI and `init_from`. Needs
neither torch nor transformers; `test_hf_parity.py` is the live comparison."""

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mmjax.tools import convert_hf

GOLDENS = os.path.join(os.path.dirname(__file__), "goldens", "hf")


def golden(name: str, tmp_path=None) -> str:
    """The golden checkpoint folder (a private copy under tmp_path when given)."""
    src = os.path.join(GOLDENS, name)
    if tmp_path is None:
        return src
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return str(dst)


def reference(name: str) -> dict:
    with np.load(os.path.join(GOLDENS, name, "reference.npz")) as f:
        return dict(f)


def rewrite(src: str, dst, rename) -> str:
    """The same checkpoint with tensors renamed/split by `rename(name, value) -> dict`."""
    os.makedirs(dst, exist_ok=True)
    out = {}
    for name, value in load_file(os.path.join(src, "model.safetensors")).items():
        out.update(rename(name, value))
    save_file(out, os.path.join(dst, "model.safetensors"))
    shutil.copy(os.path.join(src, "config.json"), os.path.join(dst, "config.json"))
    return str(dst)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_vision_towers_match_the_reference(kind, tmp_path):
    ref = reference(kind)
    ours = convert_hf.load(kind, golden(kind))
    older = convert_hf.load(kind, rewrite(golden(kind), tmp_path / "old", lambda n, v: {"vision_model." + n: v}))
    for batch in (1, 3):
        pixels = ref[f"pixels_{batch}"]
        got = np.asarray(ours(pixels))
        assert got.shape == ref[f"last_{batch}"].shape
        assert np.abs(got - ref[f"last_{batch}"]).max() <= 1e-4
        assert np.abs(np.asarray(older(pixels)) - ref[f"last_{batch}"]).max() <= 1e-4
        assert np.abs(np.asarray(ours.pooled(pixels)) - ref[f"pooled_{batch}"]).max() <= 1e-4
    # Connector features from the penultimate layer equal the reference's hidden_states[-2].
    ours.feature_layer = -2
    penultimate = ref["penultimate_3"][:, 1:] if kind == "clip" else ref["penultimate_3"]
    assert np.abs(np.asarray(ours.features(ref["pixels_3"])) - penultimate).max() <= 1e-4
    # A 32-pixel checkpoint runs at 48 pixels with interpolated position embeddings.
    big = np.asarray(ours.features(np.random.default_rng(0).normal(size=(2, 48, 48, 3)).astype(np.float32)))
    assert big.shape == (2, 36, 48) and np.isfinite(big).all()


@pytest.mark.parametrize("name", ["llama", "llama_tied"])
def test_llama_matches_the_reference(name):
    ref = reference(name)
    ours = convert_hf.load("llama", golden(name))
    assert json.load(open(os.path.join(GOLDENS, name, "config.json")))["tie_word_embeddings"] == (name == "llama_tied")
    for i in range(3):
        got = np.asarray(ours(ref[f"tokens_{i}"]))
        assert got.shape == ref[f"logits_{i}"].shape
        assert np.abs(got - ref[f"logits_{i}"]).max() <= 1e-4


def _older_mixtral_names(name, value):
    """Fused experts -> the older per-expert `block_sparse_moe` layout."""
    if name.endswith("mlp.gate.weight"):
        return {name.replace("mlp.gate", "block_sparse_moe.gate"): value}
    if name.endswith("mlp.experts.gate_up_proj"):
        pre, h = name[: -len("mlp.experts.gate_up_proj")], value.shape[1] // 2
        out = {}
        for i in range(value.shape[0]):
            out[f"{pre}block_sparse_moe.experts.{i}.w1.weight"] = value[i, :h]
            out[f"{pre}block_sparse_moe.experts.{i}.w3.weight"] = value[i, h:]
        return out
    if name.endswith("mlp.experts.down_proj"):
        pre = name[: -len("mlp.experts.down_proj")]
        return {f"{pre}block_sparse_moe.experts.{i}.w2.weight": value[i] for i in range(value.shape[0])}
    return {name: value}


def test_mixtral_matches_the_reference_on_both_dispatch_paths(tmp_path):
    ref = reference("mixtral")
    src = golden("mixtral")
    models = {
        "dropless": convert_hf.load("mixtral", src),
        "capacity": convert_hf.load("mixtral", src, dispatch="capacity", capacity_factor=2.0),
        "older layout": convert_hf.load("mixtral", rewrite(src, tmp_path / "old", _older_mixtral_names)),
    }
    for i in range(2):
        for name, model in models.items():
            got = np.asarray(model(ref[f"tokens_{i}"]))
            assert np.abs(got - ref[f"logits_{i}"]).max() <= 1e-4, (name, np.abs(got - ref[f"logits_{i}"]).max())


def test_missing_and_misshaped_tensors_are_named(tmp_path):
    src = golden("clip", tmp_path)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    bad = dict(tensors)
    del bad["encoder.layers.1.mlp.fc2.weight"]
    save_file(bad, os.path.join(src, "model.safetensors"))
    with pytest.raises(convert_hf.ConversionError, match="'encoder.layers.1.mlp.fc2.weight' is missing"):
        convert_hf.load("clip", src)
    bad = dict(tensors)
    bad["encoder.layers.0.mlp.fc1.bias"] = np.zeros((5,), np.float32)
    save_file(bad, os.path.join(src, "model.safetensors"))
    with pytest.raises(convert_hf.ConversionError,
                       match=r"'encoder.layers.0.mlp.fc1.bias' has shape \(5,\), expected \(96,\)"):
        convert_hf.load("clip", src)


def test_cli_writes_an_orbax_checkpoint(tmp_path):
    assert convert_hf.main(["--kind", "siglip", golden("siglip"), str(tmp_path / "out")]) == 0
    meta = json.loads((tmp_path / "out" / "mmjax.json").read_text())
    assert meta["component"] == "vit" and meta["config"]["embed"] == 48
    assert (tmp_path / "out" / "params").is_dir()


@pytest.mark.slow
def test_init_from_places_converted_weights_on_the_mesh(tmp_path):
    from conftest import small_config
    from jax.sharding import PartitionSpec as P

    from mmjax.parallel import get_layout, make_mesh
    from mmjax.train.init_from import InitFromError, apply_init_from
    from mmjax.train.optimizer import make_optimizer
    from mmjax.train.state import build_train_setup, init_train_state

    c = small_config()
    d = c.model.decoder
    hf = json.load(open(os.path.join(GOLDENS, "llama_small", "config.json")))
    assert (hf["vocab_size"], hf["hidden_size"], hf["intermediate_size"], hf["num_hidden_layers"]) == \
        (d.vocab_size, d.embed, d.mlp, d.layers)
    tensors = load_file(os.path.join(GOLDENS, "llama_small", "model.safetensors"))
    assert convert_hf.main(["--kind", "llama", golden("llama_small"), str(tmp_path / "llama")]) == 0
    mesh = make_mesh(dict(c.mesh))
    setup = build_train_setup(c, mesh, get_layout(c.rules), lambda p: make_optimizer(c.optimizer, 10, p))
    state = apply_init_from(init_train_state(c, setup), [str(tmp_path / "llama")])
    emb = state["params"]["decoder"]["embedder"]["embedding"][...]
    np.testing.assert_array_equal(np.asarray(emb), tensors["model.embed_tokens.weight"])
    assert emb.sharding.spec == P(None, "fsdp")
    gate = state["params"]["decoder"]["layers"]["layers"][0]["mlp"]["gate"]["kernel"][...]
    np.testing.assert_array_equal(np.asarray(gate), tensors["model.layers.0.mlp.gate_proj.weight"].T)

    # The same listed checkpoint into a scanned decoder: layers stacked on a leading axis.
    c.model.decoder.scan = True
    setup = build_train_setup(c, mesh, get_layout(c.rules), lambda p: make_optimizer(c.optimizer, 10, p))
    state = apply_init_from(init_train_state(c, setup), [str(tmp_path / "llama")])
    gate = state["params"]["decoder"]["layers"]["layers"]["mlp"]["gate"]["kernel"][...]
    assert gate.shape[0] == d.layers and gate.sharding.spec[0] is None
    for i in range(d.layers):
        np.testing.assert_array_equal(np.asarray(gate[i]), tensors[f"model.layers.{i}.mlp.gate_proj.weight"].T)
    c.model.decoder.scan = False

    # The same dense checkpoint into an MoE decoder: every expert is a copy of the MLP; the
    # router biases of aux-loss-free balancing (not in the checkpoint) keep their zeros.
    c.model.decoder.moe.update(dict(num_experts=4, moe_every=1, expert_mlp=d.mlp, balance="bias"))
    setup = build_train_setup(c, mesh, get_layout(c.rules), lambda p: make_optimizer(c.optimizer, 10, p))
    state = apply_init_from(init_train_state(c, setup), [str(tmp_path / "llama")])
    mlp = state["params"]["decoder"]["layers"]["layers"][0]["mlp"]
    wi_gate = mlp["wi_gate"][...]
    assert wi_gate.sharding.spec == P("expert", "fsdp", None)
    for e in range(4):
        np.testing.assert_array_equal(np.asarray(wi_gate[e]), tensors["model.layers.0.mlp.gate_proj.weight"].T)
    assert mlp["router_bias"].shape == (4,) and not np.any(np.asarray(mlp["router_bias"][...]))
    c.model.decoder.moe.update(dict(num_experts=0, balance="aux_loss"))

    c.model.decoder.mlp = 128  # a config that no longer matches the checkpoint
    setup = build_train_setup(c, mesh, get_layout(c.rules), lambda p: make_optimizer(c.optimizer, 10, p))
    with pytest.raises(InitFromError, match="does not match config.model.decoder"):
        apply_init_from(init_train_state(c, setup), [str(tmp_path / "llama")])


def test_listed_layers_stack_for_a_scanned_model_and_back():
    from mmjax.train.init_from import match_layer_stacking

    listed = {"blocks": {"layers": {"0": {"w": np.zeros((2, 3))}, "1": {"w": np.ones((2, 3))}}}, "norm": np.ones(3)}
    scanned_target = {"blocks": {"layers": {"w": None}}, "norm": None}
    stacked = match_layer_stacking(listed, scanned_target)
    assert stacked["blocks"]["layers"]["w"].shape == (2, 2, 3) and stacked["blocks"]["layers"]["w"][1].sum() == 6
    back = match_layer_stacking(stacked, {"blocks": {"layers": {0: {"w": None}, 1: {"w": None}}}, "norm": None})
    np.testing.assert_array_equal(back["blocks"]["layers"][1]["w"], np.ones((2, 3)))
    assert set(back["blocks"]["layers"]) == {0, 1}
