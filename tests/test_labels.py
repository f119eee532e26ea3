"""Image labels and caption choice of pair batches: label sets
(`mmjax.data.labels`), the labelled `procedural:classes` scenes, entity /
class / super-class ids in pair batches, MOFI's entity-name text and
VeCLIP's caption mix (deterministic, its realised ratio within 1 % of the
config over 10,000 examples, counted by the loop)."""

import numpy as np
import pytest
from conftest import small_config

from mmjax.data import shapes
from mmjax.data.labels import label_set
from mmjax.data.pairs import PairBuilder, make_pair_dataset, parse_caption_mix, pick_caption
from mmjax.data.pipeline import default_tokenizer
from mmjax.data.procedural import CaptionSource, ClassesSource
from mmjax.data.records import DataError
from mmjax.train.config_checks import check_static
from mmjax.train.hooks import caption_fractions
from mmjax.train.loop import _step_inputs, data_counters

SEQ_LEN, T = 32, 32


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer(small_config().data)


def _data(spec: str = "procedural", **overrides):
    c = small_config().data
    c.seq_len = SEQ_LEN
    c.sources.caption = spec
    c.update(overrides)
    return c


def _text(tok, tokens, segment_ids) -> str:
    return tok.decode(tokens[segment_ids > 0]).strip()


def test_procedural_label_set():
    labels = label_set(_data())
    assert labels.entities == ("red", "green", "blue", "yellow", "purple", "white",
                               "circle", "square", "triangle", "cross")
    assert labels.classes == shapes.KINDS and labels.superclasses == ("round", "angular")
    assert [labels.superclasses[s] for s in labels.superclass_of] == ["round", "angular", "angular", "angular"]
    assert labels.ids("entities", ["blue", "dog", "cross"]) == ([2, 9], 1)


def test_label_files_and_their_refusals(tmp_path):
    (tmp_path / "entities.txt").write_text("golden retriever\nEiffel Tower\n\n")
    (tmp_path / "classes.txt").write_text("cat\tanimal\ncar\tvehicle\ndog\tanimal\nboat\n")
    c = _data()
    c.labels.update(entities=str(tmp_path / "entities.txt"), classes=str(tmp_path / "classes.txt"))
    labels = label_set(c)
    assert labels.entities == ("golden retriever", "Eiffel Tower")
    assert labels.classes == ("cat", "car", "dog", "boat")
    assert labels.superclasses == ("animal", "vehicle", "boat") and labels.superclass_of == (0, 1, 0, 2)
    (tmp_path / "twice.txt").write_text("cat\ncat\n")
    for field, path, match in (("entities", tmp_path / "missing.txt", "no such file"),
                               ("entities", tmp_path / "twice.txt", "'cat' is listed twice"),
                               ("classes", tmp_path / "twice.txt", "'cat' is listed twice")):
        cfg = small_config()
        cfg.data.labels[field] = str(path)
        with pytest.raises(DataError, match=f"config.data.labels.{field}=.*{match}"):
            check_static(cfg)


def test_classes_source_scenes_hold_one_kind_with_its_labels():
    kinds = set()
    for i in range(40):
        record = ClassesSource(image_size=T, seed=3)[i]
        text = record["segments"][1]["text"]
        labels = record["labels"]
        named = {k for k in shapes.KINDS if k in text}
        assert named == {labels["class"]}, text  # every shape of the scene is of the labelled kind
        assert labels["superclass"] == ("round" if labels["class"] == "circle" else "angular")
        assert set(labels["entities"]) == named | {c for c in shapes.COLOURS if f" {c} " in text}
        kinds.add(labels["class"])
    assert kinds == set(shapes.KINDS)
    plain = CaptionSource(image_size=T, seed=3)[5]
    assert "class" not in plain["labels"] and plain["labels"]["entities"]
    assert plain["captions"]["rewritten"] == plain["segments"][1]["text"]


def test_pair_batches_carry_the_record_labels(tok):
    c = _data("procedural:classes")
    batch = next(iter(make_pair_dataset(c, tok, batch_size=8)))
    labels = label_set(c)
    assert batch["entity_ids"].shape == (8, 8) and batch["entity_ids"].dtype == np.int32
    source = ClassesSource(image_size=T, seed=c.seed)
    for i in range(8):
        want = source[i]["labels"]
        ids = batch["entity_ids"][i]
        assert [labels.entities[j] for j in ids[ids >= 0]] == want["entities"] and (ids[len(want["entities"]):] == -1).all()
        assert labels.classes[batch["class_id"][i]] == want["class"]
        assert labels.superclasses[batch["superclass_id"][i]] == want["superclass"]
    plain = next(iter(make_pair_dataset(_data(), tok, batch_size=4)))
    assert (plain["class_id"] == -1).all() and (plain["superclass_id"] == -1).all()
    assert (plain["entity_ids"][:, 0] >= 0).all() and (plain["caption_choice"] == -1).all()


def test_entity_names_as_the_pair_text(tok):
    c = _data(pair_text="entities")
    batch = next(iter(make_pair_dataset(c, tok, batch_size=4)))
    source = CaptionSource(image_size=T, seed=c.seed)
    for i in range(4):
        assert _text(tok, batch["tokens"][i], batch["segment_ids"][i]) == ", ".join(source[i]["labels"]["entities"])
    builder = PairBuilder(tok, SEQ_LEN, T, labels=label_set(c), text="entities")
    unlabelled = builder({"stream": "caption", "segments": [{"image": np.zeros((8, 8, 3), np.uint8)},
                                                             {"text": "a caption"}]})
    assert len(unlabelled["tokens"]) == 0 and unlabelled["skipped_records"] == 1  # no entity names: skipped


def test_caption_mix_picks_each_record_a_field_deterministically(tok):
    c = _data(caption_mix="alt_text@0.5|rewritten@0.5")
    batch = next(iter(make_pair_dataset(c, tok, batch_size=16)))
    source = CaptionSource(image_size=T, seed=c.seed)
    fields = ("alt_text", "rewritten")
    for i in range(16):
        want = source[i]["captions"][fields[batch["caption_choice"][i]]]
        assert _text(tok, batch["tokens"][i], batch["segment_ids"][i]) == want
    assert set(batch["caption_choice"].tolist()) == {0, 1}
    again = next(iter(make_pair_dataset(c, tok, batch_size=16)))
    np.testing.assert_array_equal(again["caption_choice"], batch["caption_choice"])
    c.shards = 2  # the same record gets the same caption whichever process reads it
    halves = [next(iter(make_pair_dataset(c, tok, batch_size=8, process_index=p, process_count=2))) for p in (0, 1)]
    texts = lambda b: sorted(_text(tok, t, s) for t, s in zip(b["tokens"], b["segment_ids"]))  # noqa: E731
    assert sorted(texts(halves[0]) + texts(halves[1])) == texts(batch)
    # a record without the fields keeps its caption; one that holds one field gets it
    mix = parse_caption_mix("alt_text@0.5|rewritten@0.5")
    assert pick_caption({"other": "x"}, mix, 0, "k") == ("", -1)
    assert pick_caption({"rewritten": "only this"}, mix, 0, "k") == ("only this", 1)


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_realised_caption_mix_is_within_one_percent_over_10000_examples(tok, ratio):
    c = _data(caption_mix=f"alt_text@{ratio}|rewritten@{1 - ratio}", image_size=8)
    it = iter(make_pair_dataset(c, tok, batch_size=500))
    counters = data_counters(_loop_config(c))
    assert counters[-2:] == ("caption_alt_text", "caption_rewritten")
    counts = np.zeros(2)
    for _ in range(20):
        _, step_counts = _step_inputs(next(it), _NoSetup(), counters)
        counts += step_counts[-3:-1]  # the caption counters sit before the image count
    assert counts.sum() == 10_000
    fractions = caption_fractions({"caption_alt_text": counts[0], "caption_rewritten": counts[1]})
    assert abs(fractions["data/caption_mix_alt_text"] - ratio) < 0.01, fractions


class _NoSetup:
    batch_shardings: dict = {}


def _loop_config(data_cfg):
    from experiments.clip_tiny import get_config

    c = get_config("clip")
    c.data = data_cfg
    return c


@pytest.mark.parametrize("spec, match", [
    ("alt_text", "must be FIELD@WEIGHT"), ("alt_text@-1", "must be FIELD@WEIGHT"),
    ("alt_text@0|rewritten@0", "every weight is 0"), ("a@1|a@2", "named twice")])
def test_bad_caption_mix_is_refused(spec, match):
    c = small_config()
    c.data.caption_mix = spec
    with pytest.raises(DataError, match=f"config.data.caption_mix={spec!r}.*{match}"):
        check_static(c)


def test_procedural_classes_feeds_the_caption_stream_only(tok):
    c = _data()
    c.sources.interleaved = "procedural:classes"
    from mmjax.data.sources import open_stream

    with pytest.raises(DataError, match="config.data.sources.interleaved='procedural:classes'.*caption stream"):
        open_stream(c.sources.interleaved, "interleaved", split="train", image_size=T, seed=0)
