"""Writes the `transformers` reference checkpoints and outputs that
`tests/test_hf_goldens.py` checks the HF importer against, so the default test
command needs neither torch nor transformers.

Tiny models with random float32 weights (no downloads), saved with
`save_pretrained`, plus `reference.npz` holding the inputs and the reference
outputs. Regenerate (the `parity` extra: torch CPU build + transformers) with

    python tests/goldens/make_hf_goldens.py tests/goldens/hf

The live comparison against an installed `transformers` is
`tests/test_hf_parity.py` (skipped without torch).
"""

import json
import os
import sys

import numpy as np
import torch
import transformers


def randomise(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


VISION = {
    "clip": lambda: transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, patch_size=8)),
    "siglip": lambda: transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, patch_size=8)),
}


def llama(tied: bool):
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=tied,
        max_position_embeddings=128))


def llama_small():
    """Shaped like tests/conftest.py's small_config decoder (init_from tests)."""
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, rope_theta=10_000.0, rms_norm_eps=1e-6))


def mixtral():
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=96, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, rope_theta=1e6,
        max_position_embeddings=128))


def lm_reference(model, shapes, seed):
    rng = np.random.default_rng(seed)
    out = {}
    for i, (batch, seq) in enumerate(shapes):
        tokens = rng.integers(0, model.config.vocab_size, size=(batch, seq))
        with torch.no_grad():
            out[f"logits_{i}"] = model(input_ids=torch.from_numpy(tokens)).logits.numpy()
        out[f"tokens_{i}"] = tokens.astype(np.int32)
    return out


def vision_reference(model):
    rng = np.random.default_rng(0)
    out = {}
    for batch in (1, 3):
        pixels = rng.normal(size=(batch, 32, 32, 3)).astype(np.float32)
        with torch.no_grad():
            ref = model(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)), output_hidden_states=True)
        out[f"pixels_{batch}"] = pixels
        out[f"last_{batch}"] = ref.last_hidden_state.numpy()
        out[f"pooled_{batch}"] = ref.pooler_output.numpy()
        out[f"penultimate_{batch}"] = ref.hidden_states[-2].numpy()
    return out


def write(model, dst, reference):
    os.makedirs(dst, exist_ok=True)
    model.save_pretrained(dst, safe_serialization=True)
    for extra in ("generation_config.json",):
        if os.path.exists(os.path.join(dst, extra)):
            os.remove(os.path.join(dst, extra))
    if reference:
        np.savez_compressed(os.path.join(dst, "reference.npz"), **reference)


def main(root):
    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    for kind, make in VISION.items():
        model = randomise(make())
        write(model, os.path.join(root, kind), vision_reference(model))
    for tied in (False, True):
        model = randomise(llama(tied))
        if tied:
            model.tie_weights()
        write(model, os.path.join(root, "llama_tied" if tied else "llama"),
              lm_reference(model, ((1, 5), (2, 17), (3, 32)), seed=1))
    write(randomise(llama_small()), os.path.join(root, "llama_small"), None)
    model = randomise(mixtral())
    write(model, os.path.join(root, "mixtral"), lm_reference(model, ((1, 7), (2, 24)), seed=2))
    with open(os.path.join(root, "versions.json"), "w") as f:
        json.dump(versions, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "hf"))
