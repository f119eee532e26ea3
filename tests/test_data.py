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


def test_example_masks_image_slots_and_drops_extra_images(tok):
    # long enough for a whole page: only images are dropped, never text
    builder = ExampleBuilder(tok, seq_len=512, max_images=2, tokens_per_image=4, image_size=32)

    def page_of_questions(record):  # numbered pictures (the other documents are captioned albums)
        return sum("image" in s for s in record["segments"]) >= 3 and "text" in record["segments"][0]

    source = InterleavedSource(32, seed=0)
    record = next(source[i] for i in range(1000) if page_of_questions(source[i]))
    n_images = sum("image" in s for s in record["segments"])
    ex = builder(record)
    assert ex["dropped_images"] == n_images - 2
    assert ex["images"].shape == (2, 32, 32, 3) and ex["images"].dtype == np.uint8
    slots = ex["slots"]
    assert sorted(slots[slots >= 0].tolist()) == list(range(8))
    assert np.all(ex["ids"][slots >= 0] == tok.image_id)
    assert np.all(ex["weights"][slots >= 0] == 0) and ex["weights"][0] == 0  # images, <bos>
    assert np.all(ex["weights"][1:][slots[1:] < 0] == 1)
    assert ex["ids"][0] == tok.bos_id and ex["ids"][-1] == tok.eos_id
    first_image = [s for s in record["segments"] if "image" in s][0]["image"]
    np.testing.assert_array_equal(ex["images"][0], first_image)
    # The text of the dropped third picture is kept.
    assert "picture 3:" in tok.decode(ex["ids"])


def test_interleaved_documents_hold_question_pages_and_captioned_albums():
    records = [InterleavedSource(32, seed=0)[i] for i in range(40)]
    albums = [r for r in records if "image" in r["segments"][0]]
    assert 8 <= len(albums) <= 32
    for r in albums:  # image, caption, image, caption, ...
        assert all(("image" in s) == (i % 2 == 0) for i, s in enumerate(r["segments"]))
        assert all(s["text"].endswith(".") and "shape" in s["text"] for s in r["segments"][1::2])


def test_attribute_mask_marks_colour_and_kind_tokens(tok):
    c = small_config().data
    ds = iter(make_dataset(c, tok, batch_size=2, split="eval", streams=("caption",),
                           with_attributes=True, pack=False))
    batch = next(ds)
    record = CaptionSource(32, seed=0, split="eval")[0]
    words = tok.decode(batch["targets"][0][batch["attribute_mask"][0] > 0]).split()
    text = record["segments"][1]["text"]
    assert words == [text[a:b] for a, b in record["segments"][1]["spans"]]


def test_processes_read_disjoint_records(tok):
    c = small_config().data
    a = next(iter(make_dataset(c, tok, batch_size=8, process_index=0, process_count=2)))
    b = next(iter(make_dataset(c, tok, batch_size=8, process_index=1, process_count=2)))
    assert not np.array_equal(a["tokens"], b["tokens"])
    assert a["num_examples"].sum() > 8  # packed
