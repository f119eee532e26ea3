"""Packing: first-fit-decreasing bins, image slots moving with their example,
loss masks kept exactly, no attention across examples (pre-training and
conversation examples), checkpointable packed iterator."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import small_config
from mmjax.data import shapes
from mmjax.data.packing import Packer, first_fit_decreasing
from mmjax.data.pipeline import default_tokenizer, make_builder, make_dataset, mixed_examples
from mmjax.models import MM1Model


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer(small_config().data)


def test_first_fit_decreasing_respects_tokens_and_images():
    lengths, images = [30, 10, 25, 40, 5, 20], [1, 0, 2, 0, 1, 1]
    bins = first_fit_decreasing(lengths, images, seq_len=64, max_images=2)
    assert sorted(i for b in bins for i in b) == list(range(6))
    for b in bins:
        assert sum(lengths[i] for i in b) <= 64 and sum(images[i] for i in b) <= 2
    assert len(bins) == 3  # 130 tokens need >= 3 bins of 64; FFD finds 3
    assert bins == sorted(bins, key=lambda b: b[0]) and all(b == sorted(b) for b in bins)


def test_packed_sequences_keep_each_example_whole(tok):
    c = small_config().data
    examples = [next(it) for it in [iter(mixed_examples(c, tok))] for _ in range(12)]
    packer = Packer(c.seq_len, c.max_images, c.tokens_per_image, c.image_size, tok.pad_id)
    packed = packer.pack_window(examples)
    assert len(packed) < len(examples)  # several examples share a sequence
    seen = []
    for seq in packed:
        for seg in range(1, seq["num_examples"] + 1):
            where = seq["segment_ids"] == seg
            ids = np.concatenate([seq["tokens"][where], seq["targets"][where][-1:]])
            match = [i for i, ex in enumerate(examples) if np.array_equal(ex["ids"], ids)]
            assert match, "a packed segment is not one whole example"
            ex = examples[match[0]]
            seen.append(match[0])
            np.testing.assert_array_equal(seq["positions"][where], np.arange(where.sum()))
            slots = seq["image_slots"][where]
            K = c.tokens_per_image
            first = sorted(set(slots[slots >= 0] // K))
            assert len(first) == len(ex["images"])
            for j, image_index in enumerate(first):  # the pixels moved with their slots
                np.testing.assert_array_equal(seq["images"][image_index], ex["images"][j])
    assert sorted(seen) == list(range(12))


def _conversation(i: int, image_size: int) -> dict:
    """Conversation record `i`: one picture, two pictures or text only, with
    one or two short answers."""
    rng = np.random.default_rng(i)
    scenes = [shapes.sample_scene(rng) for _ in range(2)]
    pictures = [{"image": shapes.render_scene(s, image_size, rng), "role": "user"} for s in scenes]
    colours = [s[0].colour for s in scenes]
    kind = i % 3
    if kind == 0:
        segments = [pictures[0], {"text": "\ncolour?", "role": "user"}, {"text": f"{colours[0]}.", "role": "assistant"}]
    elif kind == 1:
        segments = [pictures[0], pictures[1], {"text": "same?", "role": "user"},
                    {"text": "yes." if colours[0] == colours[1] else "no.", "role": "assistant"}]
    else:
        segments = [{"text": f"count {i}", "role": "user"}, {"text": f"{i + 1}.", "role": "assistant"}]
        if i % 2:
            segments += [{"text": "and?", "role": "user"}, {"text": "done.", "role": "assistant"}]
    return {"stream": ("caption", "interleaved", "text")[kind], "segments": segments, "origin": f"conversation {i}"}


def _examples(kind: str, tok, d, n: int) -> list[dict]:
    if kind == "pretraining":
        return [next(it) for it in [iter(mixed_examples(d, tok))] for _ in range(n)]
    builder = make_builder(d, tok)
    return [builder(_conversation(i, d.image_size)) for i in range(n)]


@pytest.mark.parametrize("kind", ["pretraining", "conversation"])
def test_packed_loss_mask_is_each_examples_own_mask(tok, kind):
    """A packed sequence's loss mask, segment ids and positions are the
    concatenation of its examples' own (targets shifted by one), then padding."""
    d = small_config().data
    examples = _examples(kind, tok, d, 12)
    if kind == "conversation":  # answers only: the conversations' masks are sparse
        assert all(0 < (ex["weights"] > 0).sum() < len(ex["ids"]) // 2 for ex in examples)
    packer = Packer(d.seq_len, d.max_images, d.tokens_per_image, d.image_size, tok.pad_id)
    packed = packer.pack_window(examples)
    assert max(s["num_examples"] for s in packed) >= 2
    placed = 0
    for seq in packed:
        members = []
        for seg in range(1, seq["num_examples"] + 1):
            where = seq["segment_ids"] == seg
            ids = np.concatenate([seq["tokens"][where], seq["targets"][where][-1:]])
            members.append(next(ex for ex in examples if np.array_equal(ex["ids"], ids)))
        pad = d.seq_len - sum(len(ex["ids"]) - 1 for ex in members)
        np.testing.assert_array_equal(seq["loss_mask"], np.concatenate([ex["weights"][1:] for ex in members]
                                                                       + [np.zeros(pad, np.float32)]))
        np.testing.assert_array_equal(seq["segment_ids"], np.concatenate(
            [np.full(len(ex["ids"]) - 1, k + 1) for k, ex in enumerate(members)] + [np.zeros(pad, int)]))
        np.testing.assert_array_equal(seq["positions"], np.concatenate(
            [np.arange(len(ex["ids"]) - 1) for ex in members] + [np.zeros(pad, int)]))
        placed += len(members)
    assert placed == len(examples)


def _logits(model, seq):
    batch = {k: jnp.asarray(v)[None] for k, v in seq.items()}
    return np.asarray(_forward(model, batch["tokens"], batch["image_slots"], batch["images"],
                               batch["segment_ids"], batch["positions"]))[0]


@nnx.jit
def _forward(model, tokens, image_slots, images, segment_ids, positions):
    return model(tokens, image_slots, images, segment_ids, positions)


@pytest.mark.parametrize("kind", ["pretraining", "conversation"])
def test_packed_tokens_never_attend_across_examples(tok, kind):
    """Each example's logits in a packed sequence equal its logits alone."""
    cfg = small_config()
    model = MM1Model(cfg.model, rngs=nnx.Rngs(0))
    d = cfg.data
    examples = _examples(kind, tok, d, 8)
    packer = Packer(d.seq_len, d.max_images, d.tokens_per_image, d.image_size, tok.pad_id)
    packed = max(packer.pack_window(examples), key=lambda s: (s["num_examples"], s["image_mask"].sum()))
    assert packed["num_examples"] >= 2
    together = _logits(model, packed)
    for seg in range(1, packed["num_examples"] + 1):
        where = packed["segment_ids"] == seg
        n = int(where.sum())
        ids = np.concatenate([packed["tokens"][where], packed["targets"][where][-1:]])
        ex = next(e for e in examples if np.array_equal(e["ids"], ids))
        alone = packer.build([ex], [0])
        np.testing.assert_array_equal(alone["loss_mask"][:n], packed["loss_mask"][where])
        np.testing.assert_allclose(together[where], _logits(model, alone)[:n], atol=2e-4)
    # ... and the check has teeth: one segment for everything changes the logits.
    merged = dict(packed, segment_ids=(packed["segment_ids"] > 0).astype(np.int32))
    assert np.abs(_logits(model, merged) - together)[packed["segment_ids"] == 2].max() > 1e-3


@pytest.mark.slow
def test_mixture_ratio_over_10000_examples_is_5_5_1(tok):
    c = small_config().data
    c.pack_window = 64
    it = iter(make_dataset(c, tok, batch_size=32))
    counts = np.zeros(3)
    while counts.sum() < 10_000:
        counts += next(it)["stream_counts"].sum(axis=0)
    np.testing.assert_allclose(counts / counts.sum(), np.array([5, 5, 1]) / 11, atol=0.01)


def test_mixture_weights_are_configurable(tok):
    c = small_config().data
    c.mix_weights = (50.0, 10.0, 40.0)  # MM1.5
    it = iter(mixed_examples(c, tok))
    streams = np.array([next(it)["stream"] for _ in range(500)])
    np.testing.assert_allclose(np.bincount(streams, minlength=3) / 500, [0.5, 0.1, 0.4], atol=0.01)


def test_loss_weights_per_stream(tok):
    c = small_config().data
    c.loss_weights = (0.0, 1.0, 0.5)
    it = iter(mixed_examples(c, tok))
    for _ in range(30):
        ex = next(it)
        text = ex["slots"] < 0
        expected = {0: 0.0, 1: 1.0, 2: 0.5}[int(ex["stream"])]
        assert set(np.unique(ex["weights"][1:][text[1:]])) <= {expected}


@pytest.mark.parametrize("workers,shards", [(0, 0), (2, 0), pytest.param(2, 4, marks=pytest.mark.slow)])
def test_restored_iterator_continues_with_the_identical_batch(tok, workers, shards):
    """Also with Grain worker processes reading several virtual data shards
    per process (shards=4 on one process)."""
    c = small_config().data
    c.workers, c.pack_window, c.shards = workers, 8, shards
    it = iter(make_dataset(c, tok, batch_size=4))
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(2)]
    fresh = iter(make_dataset(c, tok, batch_size=4))
    fresh.set_state(state)
    for want in expected:
        got = next(fresh)
        assert set(got) == set(want)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_uint8_images_are_normalised_by_the_model():
    cfg = small_config().model
    model = MM1Model(cfg, rngs=nnx.Rngs(0))
    pixels = jax.random.randint(jax.random.key(0), (1, 2, 32, 32, 3), 0, 256).astype(jnp.uint8)
    encode = jax.jit(lambda x: model.encode_images(x))  # compiled once per dtype, not op by op
    np.testing.assert_allclose(encode(pixels), encode(pixels.astype(jnp.float32) / 127.5 - 1.0), atol=1e-5)


def test_global_batch_is_the_same_for_any_process_count(tok):
    c = small_config().data
    c.shards = 2
    whole = next(iter(make_dataset(c, tok, batch_size=8)))
    halves = [next(iter(make_dataset(c, tok, batch_size=4, process_index=i, process_count=2))) for i in range(2)]
    for k in whole:
        np.testing.assert_array_equal(whole[k], np.concatenate([h[k] for h in halves]), err_msg=k)
    c.shards = 3
    with pytest.raises(ValueError, match="not a multiple of the 2 processes"):
        make_dataset(c, tok, batch_size=4, process_index=0, process_count=2)
