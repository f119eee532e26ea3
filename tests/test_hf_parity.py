"""Live numerical parity of imported HF models against `transformers`
references built locally from configs with random weights (float32, no
downloads). Opt-in: needs the `parity` extra (torch, transformers); without
it these tests are skipped and `test_hf_goldens.py` checks the same models
against stored reference outputs. The models are the ones
`goldens/make_hf_goldens.py` writes."""

import numpy as np
import pytest

from mmjax.tools import convert_hf

torch = pytest.importorskip("torch")  # the `parity` extra
transformers = pytest.importorskip("transformers")

from goldens.make_hf_goldens import VISION, llama, mixtral, randomise  # noqa: E402
from test_hf_goldens import _older_mixtral_names, rewrite  # noqa: E402


def _save(model, path):
    model.save_pretrained(path, safe_serialization=True)
    return str(path)


@pytest.mark.parametrize("kind", sorted(VISION))
def test_vision_parity(kind, tmp_path):
    ref = randomise(VISION[kind]())
    src = _save(ref, tmp_path / "hf")
    ours = convert_hf.load(kind, src)
    older = convert_hf.load(kind, rewrite(src, tmp_path / "old", lambda n, v: {"vision_model." + n: v}))
    rng = np.random.default_rng(0)
    for batch in (1, 3):
        pixels = rng.normal(size=(batch, 32, 32, 3)).astype(np.float32)
        with torch.no_grad():
            out = ref(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)), output_hidden_states=True)
        expected = out.last_hidden_state.numpy()
        got = np.asarray(ours(pixels))
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-4
        assert np.abs(np.asarray(older(pixels)) - expected).max() <= 1e-4
        assert np.abs(np.asarray(ours.pooled(pixels)) - out.pooler_output.numpy()).max() <= 1e-4
    # Connector features from the penultimate layer equal the reference's hidden_states[-2].
    ours.feature_layer = -2
    penultimate = out.hidden_states[-2].numpy()
    penultimate = penultimate[:, 1:] if kind == "clip" else penultimate
    assert np.abs(np.asarray(ours.features(pixels)) - penultimate).max() <= 1e-4


@pytest.mark.parametrize("tied", [False, True])
def test_llama_parity(tied, tmp_path):
    ref = randomise(llama(tied))
    if tied:
        ref.tie_weights()
    ours = convert_hf.load("llama", _save(ref, tmp_path / "hf"))
    rng = np.random.default_rng(1)
    for batch, seq in ((1, 5), (2, 17), (3, 32)):
        tokens = rng.integers(0, 96, size=(batch, seq))
        with torch.no_grad():
            expected = ref(input_ids=torch.from_numpy(tokens)).logits.numpy()
        got = np.asarray(ours(tokens.astype(np.int32)))
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-4, np.abs(got - expected).max()


def test_mixtral_parity_for_both_dispatch_paths(tmp_path):
    ref = randomise(mixtral())
    src = _save(ref, tmp_path / "hf")
    models = {
        "dropless": convert_hf.load("mixtral", src),
        "capacity": convert_hf.load("mixtral", src, dispatch="capacity", capacity_factor=2.0),
        "older layout": convert_hf.load("mixtral", rewrite(src, tmp_path / "old", _older_mixtral_names)),
    }
    rng = np.random.default_rng(2)
    for batch, seq in ((1, 7), (2, 24)):
        tokens = rng.integers(0, 96, size=(batch, seq))
        with torch.no_grad():
            expected = ref(input_ids=torch.from_numpy(tokens)).logits.numpy()
        for name, model in models.items():
            got = np.asarray(model(tokens.astype(np.int32)))
            assert np.abs(got - expected).max() <= 1e-4, (name, np.abs(got - expected).max())
