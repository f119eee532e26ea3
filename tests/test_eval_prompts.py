"""Few-shot prompts and the dataset formats the tasks read: k-shot layout,
demonstrations never the query, oldest demonstrations dropped to fit,
tokenisation identical to training, and bad input skipped or refused."""

import json

import numpy as np
import pytest
from PIL import Image

from conftest import small_config
from mmjax.data.examples import ExampleBuilder
from mmjax.data.pipeline import default_tokenizer
from mmjax.errors import DataError
from mmjax.eval import formats
from mmjax.eval.prompts import PromptMaker, Template

CAPTION = Template("<image>", " {answer}", separator="\n")


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer(small_config().data)


def _builder(tok):
    return ExampleBuilder(tok, 10**9, 10**9, 4, 32)


def _items(n):
    return formats.procedural_items("caption", "eval", n, 32, seed=0)


def test_k_shot_layout_matches_training_tokenisation(tok):
    items = _items(6)
    maker = PromptMaker(_builder(tok), CAPTION, items, shots=2, max_len=10**6, max_new_tokens=8, seed=3,
                        where="t")
    prompt = maker.make(0, items[0])
    demos = maker._demonstrations(0, items[0])
    assert prompt.shots == 2 and prompt.dropped_shots == 0 and len(prompt.images) == 3
    assert all(d.id != items[0].id for d, _ in demos)
    # The same interleaved record through the training example builder gives the same ids (less <eos>).
    segments = []
    for demo, _ in demos:
        segments += [{"image": demo.image}, {"text": demo.references[0] + "\n"}]
    segments.append({"image": items[0].image})
    example = _builder(tok)({"stream": "interleaved", "segments": segments})
    np.testing.assert_array_equal(prompt.ids, example["ids"][:-1])
    np.testing.assert_array_equal(prompt.slots, example["slots"][:-1])
    np.testing.assert_array_equal(prompt.images, example["images"])
    assert prompt.ids[0] == tok.bos_id and (prompt.ids == tok.image_id).sum() == 3 * 4
    # Deterministic from the seed; another seed draws other demonstrations.
    again = PromptMaker(_builder(tok), CAPTION, items, 2, 10**6, 8, 3, "t").make(0, items[0])
    np.testing.assert_array_equal(again.ids, prompt.ids)
    other = PromptMaker(_builder(tok), CAPTION, items, 2, 10**6, 8, 4, "t")
    assert [d.id for d, _ in other._demonstrations(0, items[0])] != [d.id for d, _ in demos]


def test_never_the_query_even_when_it_is_the_only_candidate(tok):
    items = _items(2)
    prompt = PromptMaker(_builder(tok), CAPTION, items, 4, 10**6, 8, 0, "t").make(0, items[0])
    assert prompt.shots == 1  # only the other item can be shown


def test_long_prompts_drop_the_oldest_demonstrations(tok):
    items = _items(8)
    full = PromptMaker(_builder(tok), CAPTION, items, 4, 10**6, 8, 0, "t").make(0, items[0])
    limit = len(full.ids) + 8 - 1  # one token short of fitting four demonstrations
    maker = PromptMaker(_builder(tok), CAPTION, items, 4, limit, 8, 0, "t")
    cut = maker.make(0, items[0])
    assert cut.shots == 3 and cut.dropped_shots == 1
    newest = maker._demonstrations(0, items[0])[1:]
    # The kept demonstrations are the three newest, in order.
    assert len(cut.ids) + 8 <= limit
    kept_ids = maker._build(newest, items[0], [items[0].image])
    np.testing.assert_array_equal(cut.ids, kept_ids["ids"][:-1])


def _png(path, colour):
    Image.fromarray(np.full((20, 24, 3), colour, np.uint8)).save(path)


def test_coco_and_vqav2_files_with_bad_entries(tmp_path, tok):
    images = tmp_path / "images"
    images.mkdir()
    _png(images / "a.png", 10)
    (images / "broken.jpg").write_bytes(b"not an image")
    coco = {"images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "missing.png"},
                       {"id": 3, "file_name": "broken.jpg"}, {"id": 4, "file_name": "a.png"}],
            "annotations": [{"image_id": 1, "caption": "A red thing."}, {"image_id": 1, "caption": "red"},
                            {"image_id": 2, "caption": "x"}, {"image_id": 3, "caption": "y"}]}
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    items, skipped = formats.read_coco_captions("t", str(tmp_path / "captions.json"), str(images))
    assert [i.id for i in items] == ["1", "2", "3"] and skipped == 1  # image 4 has no caption
    assert items[0].references == ("A red thing.", "red")
    maker = PromptMaker(_builder(tok), CAPTION, items, 0, 10**6, 8, 0, "t")
    assert maker.make(0, items[0]) is not None
    assert maker.make(1, items[1]) is None and maker.make(2, items[2]) is None  # missing, undecodable

    questions = {"questions": [{"question_id": 7, "image_id": 5, "question": "what?"},
                               {"question_id": 8, "image_id": 5, "question": "no answers?"}]}
    answers = {"annotations": [{"question_id": 7, "multiple_choice_answer": "two",
                                "answers": [{"answer": "2"}] * 9 + [{"answer": "two"}]}]}
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(answers))
    items, skipped = formats.read_vqa("t", str(tmp_path / "q.json"), str(tmp_path / "a.json"), str(images),
                                      "img_{image_id:03d}.png")
    assert skipped == 1 and len(items) == 1
    assert items[0].image.endswith("img_005.png") and items[0].shown_answer() == "two"
    assert len(items[0].references) == 10


@pytest.mark.parametrize("content,match", [
    (None, "matches no file"),
    ("{not json", "is not readable JSON"),
    (json.dumps({"images": []}), "has no 'annotations' list"),
    (json.dumps({"images": [{"id": 1}], "annotations": []}), "without a valid 'file_name'"),
])
def test_bad_annotation_files_are_one_sentence(tmp_path, content, match):
    path = tmp_path / "captions.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=match) as err:
        formats.read_coco_captions("config.evaluators.coco", str(path), str(tmp_path))
    assert str(err.value).startswith("config.evaluators.coco.annotations") and "\n" not in str(err.value)


def test_multiple_choice_lines(tmp_path):
    path = tmp_path / "mc.jsonl"
    path.write_text("\n".join([json.dumps({"context": "1 + 1 =", "choices": ["2", "3"], "gold": 0}),
                               "{broken", json.dumps({"context": "x", "choices": ["a"], "gold": 0}),
                               json.dumps({"context": "y", "choices": ["a", "b"], "gold": 5}), ""]))
    items, skipped = formats.read_multiple_choice("t", str(path))
    assert len(items) == 1 and skipped == 3 and items[0].choices == ("2", "3")


def test_procedural_vqa_references_are_normalised_like_vqa_releases():
    items = formats.procedural_items("vqa", "eval", 40, 32, seed=0)
    counts = [i for i in items if i.question.startswith("how many")]
    assert counts and all(i.references[0].isdigit() and not i.shown_answer().isdigit() for i in counts)
    assert all(len(i.references) == 10 for i in items)
    assert {i.id for i in items}.isdisjoint({i.id for i in formats.procedural_items("vqa", "support", 40, 32, 0)})


def test_stop_strings_become_stop_tokens(tok):
    from mmjax.eval.tasks import cut_at_stop, stop_token_ids

    ids = stop_token_ids(tok, (".",))
    assert tok.encode(".")[0] in ids and tok.eos_id not in ids
    assert all("." in tok.decode([i]) for i in ids)
    assert not any("." in tok.decode([i]) for i in set(range(tok.vocab_size)) - set(ids))
    assert cut_at_stop(" red. question:", (".",)) == "red" and cut_at_stop("a\nb", ("\n", "x")) == "a"


def test_support_files_switch_a_support_set_on(tmp_path):
    import ml_collections

    from mmjax.eval.task_settings import caption_task
    from mmjax.eval.tasks import SCORINGS

    images = tmp_path / "images"
    images.mkdir()
    _png(images / "a.png", 10)
    for name, caption in (("val.json", "the query"), ("train.json", "a demonstration")):
        (tmp_path / name).write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}],
                                                 "annotations": [{"image_id": 1, "caption": caption}]}))
    settings = ml_collections.ConfigDict(caption_task(annotations=str(tmp_path / "val.json"), images=str(images)))
    read = SCORINGS["caption"].read
    assert read("t", settings, "support", None) == (None, 0)  # no support files: the evaluated set serves
    settings.support_annotations, settings.support_images = str(tmp_path / "train.json"), str(images)
    support, _ = read("t", settings, "support", None)
    assert [i.references for i in support] == [("a demonstration",)]
    assert read("t", settings, "query", None)[0][0].references == ("the query",)
