"""Live numerical parity of imported HF models against `transformers`
references built locally from configs with random weights (float32, no
downloads). Opt-in: needs the `parity` extra (torch, transformers); without
it these tests are skipped and `test_hf_goldens.py` checks the same models
against stored reference outputs."""

import os

import numpy as np
import pytest
from safetensors.numpy import save_file

from mmjax.tools import convert_hf

torch = pytest.importorskip("torch")  # the `parity` extra
transformers = pytest.importorskip("transformers")


def _randomise(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


def _save(model, path):
    model.save_pretrained(path, safe_serialization=True)
    return str(path)


def _older_layout(src, dst, prefix):
    """The same checkpoint with every tensor name prefixed (older key layout)."""
    from safetensors.numpy import load_file

    os.makedirs(dst, exist_ok=True)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    save_file({prefix + k: v for k, v in tensors.items()}, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f, open(os.path.join(dst, "config.json"), "w") as g:
        g.write(f.read())
    return str(dst)


VISION = {
    "clip": lambda: transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, patch_size=8)),
    "siglip": lambda: transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, patch_size=8)),
}


@pytest.mark.parametrize("kind", sorted(VISION))
def test_vision_parity(kind, tmp_path):
    ref = _randomise(VISION[kind]())
    src = _save(ref, tmp_path / "hf")
    ours = convert_hf.load(kind, src)
    older = convert_hf.load(kind, _older_layout(src, tmp_path / "old", "vision_model."))
    rng = np.random.default_rng(0)
    for batch in (1, 3):
        pixels = rng.normal(size=(batch, 32, 32, 3)).astype(np.float32)
        with torch.no_grad():
            out = ref(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
        expected = out.last_hidden_state.numpy()
        got = np.asarray(ours(pixels))
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-4
        assert np.abs(np.asarray(older(pixels)) - expected).max() <= 1e-4
        assert np.abs(np.asarray(ours.pooled(pixels)) - out.pooler_output.numpy()).max() <= 1e-4

    # Connector features from the penultimate layer equal the reference's hidden_states[-2].
    with torch.no_grad():
        hidden = ref(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)),
                     output_hidden_states=True).hidden_states
    ours.feature_layer = -2
    penultimate = hidden[-2].numpy()[:, 1:] if kind == "clip" else hidden[-2].numpy()
    assert np.abs(np.asarray(ours.features(pixels)) - penultimate).max() <= 1e-4
    # A 32-pixel checkpoint runs at 48 pixels with interpolated position embeddings.
    big = np.asarray(ours.features(rng.normal(size=(2, 48, 48, 3)).astype(np.float32)))
    assert big.shape == (2, 36, 48) and np.isfinite(big).all()


@pytest.mark.parametrize("tied", [False, True])
def test_llama_parity(tied, tmp_path):
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
                                   rms_norm_eps=1e-5, tie_word_embeddings=tied, max_position_embeddings=128)
    ref = _randomise(transformers.LlamaForCausalLM(cfg))
    if tied:
        ref.tie_weights()
    src = _save(ref, tmp_path / "hf")
    ours = convert_hf.load("llama", src)
    rng = np.random.default_rng(1)
    for batch, seq in ((1, 5), (2, 17), (3, 32)):
        tokens = rng.integers(0, 96, size=(batch, seq))
        with torch.no_grad():
            expected = ref(input_ids=torch.from_numpy(tokens)).logits.numpy()
        got = np.asarray(ours(tokens.astype(np.int32)))
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-4, np.abs(got - expected).max()


def _older_mixtral_layout(src, dst):
    """Rewrites a fused-expert Mixtral checkpoint in the older per-expert layout."""
    from safetensors.numpy import load_file

    os.makedirs(dst, exist_ok=True)
    out = {}
    for name, value in load_file(os.path.join(src, "model.safetensors")).items():
        if name.endswith("mlp.gate.weight"):
            out[name.replace("mlp.gate", "block_sparse_moe.gate")] = value
        elif name.endswith("mlp.experts.gate_up_proj"):
            pre, h = name[: -len("mlp.experts.gate_up_proj")], value.shape[1] // 2
            for i in range(value.shape[0]):
                out[f"{pre}block_sparse_moe.experts.{i}.w1.weight"] = value[i, :h]
                out[f"{pre}block_sparse_moe.experts.{i}.w3.weight"] = value[i, h:]
        elif name.endswith("mlp.experts.down_proj"):
            pre = name[: -len("mlp.experts.down_proj")]
            for i in range(value.shape[0]):
                out[f"{pre}block_sparse_moe.experts.{i}.w2.weight"] = value[i]
        else:
            out[name] = value
    save_file(out, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f, open(os.path.join(dst, "config.json"), "w") as g:
        g.write(f.read())
    return str(dst)


def test_mixtral_parity_for_both_dispatch_paths(tmp_path):
    cfg = transformers.MixtralConfig(vocab_size=96, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, rope_theta=1e6, max_position_embeddings=128)
    ref = _randomise(transformers.MixtralForCausalLM(cfg))
    src = _save(ref, tmp_path / "hf")
    models = {
        "dropless": convert_hf.load("mixtral", src),
        "capacity": convert_hf.load("mixtral", src, dispatch="capacity", capacity_factor=2.0),
        "older layout": convert_hf.load("mixtral", _older_mixtral_layout(src, tmp_path / "old")),
    }
    rng = np.random.default_rng(2)
    for batch, seq in ((1, 7), (2, 24)):
        tokens = rng.integers(0, 96, size=(batch, seq))
        with torch.no_grad():
            expected = ref(input_ids=torch.from_numpy(tokens)).logits.numpy()
        for name, model in models.items():
            got = np.asarray(model(tokens.astype(np.int32)))
            assert np.abs(got - expected).max() <= 1e-4, (name, np.abs(got - expected).max())
