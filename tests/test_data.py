"""Procedural data, tokenizer, example building and the Grain mixture."""

import numpy as np
import pytest

from conftest import small_config
from mmjax.data import shapes
from mmjax.data.examples import ExampleBuilder
from mmjax.data.pipeline import default_tokenizer, make_dataset
from mmjax.data.procedural import CaptionSource, InterleavedSource, TextSource
from mmjax.data.tokenizer import load_or_train


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer(small_config().data)


def test_sources_are_deterministic_and_splits_differ():
    a, b = CaptionSource(32, seed=0)[7], CaptionSource(32, seed=0)[7]
    assert a["segments"][1]["text"] == b["segments"][1]["text"]
    np.testing.assert_array_equal(a["segments"][0]["image"], b["segments"][0]["image"])
    ev = CaptionSource(32, seed=0, split="eval")[7]
    assert not np.array_equal(ev["segments"][0]["image"], a["segments"][0]["image"])
    assert len(TextSource()[3]["segments"][0]["text"]) > 20


def test_captions_describe_the_scene_exactly():
    rng = np.random.default_rng(3)
    for _ in range(50):
        scene = shapes.sample_scene(rng)
        image = shapes.render_scene(scene, 32, rng)
        text = shapes.caption(scene)
        assert text.startswith(shapes.COUNT_WORDS[len(scene)] + " shape")
        for s in scene:
            assert f"{s.position}: {s.colour} {s.kind}." in text
            row, col = divmod(shapes.POSITIONS.index(s.position), 2)
            cell = image[row * 16:(row + 1) * 16, col * 16:(col + 1) * 16].reshape(-1, 3).astype(int)
            bright = cell[cell.max(axis=1) > 60]
            assert len(bright) > 20
            assert np.abs(bright.mean(axis=0) - shapes.COLOURS[s.colour]).max() < 20
        empty = set(shapes.POSITIONS) - {s.position for s in scene}
        for position in empty:
            row, col = divmod(shapes.POSITIONS.index(position), 2)
            assert image[row * 16:(row + 1) * 16, col * 16:(col + 1) * 16].max() < 40
        words = [text[a:b] for a, b in shapes.attribute_spans(text, scene)]
        assert words == [w for s in scene for w in (s.colour, s.kind)]


def test_tokenizer_specials_and_cache(tok, tmp_path, monkeypatch):
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.image_id) == (0, 1, 2, 3)
    text = "two shapes. top left: red circle."
    assert tok.decode(tok.encode(text)) == text
    literal = "<image> is plain text here, <bos> too"
    assert not {0, 1, 2, 3} & set(tok.encode(literal))
    assert tok.decode(tok.encode(literal)) == literal
    monkeypatch.setenv("MMJAX_CACHE_DIR", str(tmp_path))
    first = load_or_train(["a b c", "red circle"] * 50, 300)
    files = list((tmp_path / "tokenizers").glob("*.json"))
    assert len(files) == 1
    again = load_or_train(["a b c", "red circle"] * 50, 300)
    assert again.encode("red circle") == first.encode("red circle")


def test_example_masks_image_slots_padding_and_drops_extra_images(tok):
    builder = ExampleBuilder(tok, seq_len=96, max_images=2, tokens_per_image=4, image_size=32)
    record = InterleavedSource(32, seed=0)[0]
    while sum("image" in s for s in record["segments"]) < 3:
        record = InterleavedSource(32, seed=0)[np.random.randint(1000)]
    n_images = sum("image" in s for s in record["segments"])
    ex = builder(record)
    assert ex["dropped_images"] == n_images - 2
    assert ex["image_mask"].tolist() == [1, 1]
    slots = ex["image_slots"]
    assert sorted(slots[slots >= 0].tolist()) == list(range(8))
    assert np.all(ex["tokens"][slots >= 0] == tok.image_id)
    targets_are_images = np.concatenate([slots[1:] >= 0, [False]])
    assert np.all(ex["loss_mask"][targets_are_images] == 0)
    assert np.all(ex["loss_mask"][ex["targets"] == tok.pad_id] == 0)
    assert np.all(ex["targets"][:-1] == ex["tokens"][1:])
    # The text of the dropped third picture is kept.
    assert "picture 3:" in tok.decode(ex["tokens"])


def test_attribute_mask_marks_colour_and_kind_tokens(tok):
    builder = ExampleBuilder(tok, seq_len=64, max_images=1, tokens_per_image=4, image_size=32,
                             with_attributes=True)
    record = CaptionSource(32, seed=0)[5]
    ex = builder(record)
    words = tok.decode(ex["targets"][ex["attribute_mask"] > 0]).split()
    text = record["segments"][1]["text"]
    scene_words = [text[a:b] for a, b in record["segments"][1]["spans"]]
    assert words == scene_words


def test_mixture_ratio_is_5_5_1(tok):
    c = small_config().data
    ds = iter(make_dataset(c, tok, batch_size=11))
    streams = np.concatenate([next(ds)["stream"] for _ in range(100)])
    counts = np.bincount(streams, minlength=3) / len(streams)
    np.testing.assert_allclose(counts, np.array([5, 5, 1]) / 11, atol=0.01)


def test_processes_read_disjoint_records(tok):
    c = small_config().data
    a = next(iter(make_dataset(c, tok, batch_size=8, process_index=0, process_count=2)))
    b = next(iter(make_dataset(c, tok, batch_size=8, process_index=1, process_count=2)))
    assert not np.array_equal(a["tokens"], b["tokens"])
