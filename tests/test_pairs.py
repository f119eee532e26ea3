"""Image-text pair batches (`mmjax.data.pairs`): shapes and dtypes, each
row's text is its image's caption, records without an image or caption are
skipped and counted, the iterator resumes from its state, and `train()`
trains the dual encoder on them (its loss falls; it resumes from a
checkpoint with the same data and metrics)."""

import json
import os

import grain
import numpy as np
import pytest
import shard_writers as sw
from conftest import small_config

from experiments.clip_tiny import get_config as clip_tiny_config
from mmjax.data import shapes
from mmjax.data.images import decode_and_resize
from mmjax.data.pairs import PairBuilder, SkipIterDataset, make_pair_dataset
from mmjax.data.pipeline import default_tokenizer
from mmjax.data.procedural import CaptionSource
from mmjax.data.records import bad_record
from mmjax.train.loop import train

SEQ_LEN, T = 24, 32


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer(small_config().data)


def _data(spec: str = "procedural"):
    c = small_config().data
    c.seq_len = SEQ_LEN
    c.sources.caption = spec
    return c


def _text(tok, tokens, segment_ids) -> str:
    return tok.decode(tokens[segment_ids > 0]).strip()


def test_procedural_pairs_are_images_with_their_captions(tok):
    c = _data()
    batch = next(iter(make_pair_dataset(c, tok, batch_size=8)))
    assert batch["image"].shape == (8, T, T, 3) and batch["image"].dtype == np.uint8
    for k in ("tokens", "segment_ids"):
        assert batch[k].shape == (8, SEQ_LEN) and batch[k].dtype == np.int32
    assert batch["stream_counts"].sum(axis=0).tolist() == [8, 0, 0]
    assert batch["image_mask"].sum() == 8 and batch["skipped_records"].sum() == 0
    source = CaptionSource(image_size=T, seed=c.seed)
    for i in range(8):  # procedural records are read in index order, unshuffled
        record = source[i]
        np.testing.assert_array_equal(batch["image"][i], record["segments"][0]["image"])
        assert _text(tok, batch["tokens"][i], batch["segment_ids"][i]) == record["segments"][1]["text"]
        n = int(batch["segment_ids"][i].sum())
        assert batch["segment_ids"][i].tolist() == [1] * n + [0] * (SEQ_LEN - n)  # text from position 0
        assert batch["tokens"][i, n - 1] == tok.eos_id and (batch["tokens"][i, n:] == tok.pad_id).all()
        # regenerating the scene gives the same caption (shapes.caption of this record)
        scene = shapes.sample_scene(np.random.default_rng([c.seed, 0, 0, i]))
        assert record["segments"][1]["text"] == shapes.caption(scene)


def test_truncation_keeps_eos_and_per_process_shards_are_disjoint(tok):
    builder = PairBuilder(tok, 4, T)
    pair = builder({"stream": "caption", "segments": [{"image": np.zeros((10, 20, 3), np.uint8)},
                                                      {"text": "two shapes. top left: red circle."}]})
    assert pair["image"].shape == (T, T, 3) and pair["segment_ids"].tolist() == [1, 1, 1, 1]
    assert pair["tokens"][-1] == tok.eos_id
    c = _data()
    whole = next(iter(make_pair_dataset(c, tok, batch_size=8)))
    c.shards = 2
    halves = [next(iter(make_pair_dataset(c, tok, batch_size=4, process_index=i, process_count=2)))
              for i in range(2)]
    texts = lambda b: [_text(tok, t, s) for t, s in zip(b["tokens"], b["segment_ids"])]  # noqa: E731
    assert not set(texts(halves[0])) & set(texts(halves[1]))
    assert sorted(texts(whole)) == sorted(texts(halves[0]) + texts(halves[1]))  # shards 0 and 1 of the same 8


def test_webdataset_records_without_image_or_caption_are_skipped_and_counted(tmp_path, tok):
    samples = sw.caption_samples(6, corrupt=(1,))
    samples[3] = (samples[3][0], {"txt": b"a caption without its image"})
    samples[4] = (samples[4][0], {"jpg": samples[4][1]["jpg"], "txt": b"   "})
    sw.write_tar(tmp_path / "cap.tar", samples)
    it = iter(make_pair_dataset(_data(f"webdataset:{tmp_path}/cap.tar"), tok, batch_size=1))
    seen = {}
    for _ in range(3):  # the first epoch's three good records (shuffled), each with its own picture
        batch = next(it)
        seen[_text(tok, batch["tokens"][0], batch["segment_ids"][0])] = batch["image"][0]
    assert sorted(seen) == [f"caption number {i}" for i in (0, 2, 5)]
    for text, image in seen.items():
        np.testing.assert_array_equal(image, decode_and_resize(sw.encode(sw.picture(int(text.split()[-1]))), T))


def test_skipped_records_ride_on_the_next_pair(tok):
    def caption(i, image=True, text=None):
        segments = [{"image_bytes": sw.encode(sw.picture(i))}] if image else []
        return {"stream": "caption", "segments": segments + [{"text": f"caption {i}" if text is None else text}]}

    records = [caption(0), caption(1, image=False), caption(2),
               {"stream": "caption", "segments": [{"image_bytes": b"not an image"}, {"text": "x"}]},
               caption(4, text=" "), caption(5), bad_record("caption", "record 6", "unreadable"), caption(7)]
    source = grain.MapDataset.source(records).to_iter_dataset()
    got = list(SkipIterDataset(source.map(PairBuilder(tok, SEQ_LEN, T))))
    assert [_text(tok, p["tokens"], p["segment_ids"]) for p in got] == ["caption 0", "caption 2", "caption 5",
                                                                       "caption 7"]
    assert [int(p["skipped_records"]) for p in got] == [0, 1, 2, 1]
    assert [int(p["skipped_images"]) for p in got] == [0, 0, 1, 0]


def test_iterator_resumes_from_its_state(tmp_path, tok):
    sw.write_tar(tmp_path / "cap.tar", sw.caption_samples(7, corrupt=(2,)))
    for spec in ("procedural", f"webdataset:{tmp_path}/cap.tar"):
        c = _data(spec)
        it = iter(make_pair_dataset(c, tok, batch_size=2))
        for _ in range(3):
            next(it)
        state = it.get_state()
        expected = [next(it) for _ in range(3)]
        fresh = iter(make_pair_dataset(c, tok, batch_size=2))
        fresh.set_state(state)
        for want in expected:
            got = next(fresh)
            for k in want:
                np.testing.assert_array_equal(got[k], want[k], err_msg=f"{spec}: {k}")


def _records(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "loss" in r]


def _clip_config(steps: int):
    c = clip_tiny_config("clip")
    c.model.vit.depth = 1
    c.model.decoder.layers = 1
    c.data.global_batch = 16
    c.data.seq_len = SEQ_LEN
    c.data.caption_mix = "rewritten@0.9|alt_text@0.1"  # VeCLIP: mixed captions resume with the run
    c.optimizer.update(lr=3e-3, warmup_steps=5, min_lr_ratio=1.0)  # the schedule is the same for 10 and 20 steps
    c.train.update(steps=steps, log_every=1, checkpoint_every=10)
    return c


@pytest.mark.slow
def test_train_dual_encoder_learns_and_resumes(tmp_path):
    whole = train(_clip_config(20), str(tmp_path / "whole"))
    assert whole["loss_last10_mean"] < 0.8 * whole["loss_first10_mean"], whole
    assert whole["final"]["image_to_text_accuracy"] > 1 / 16
    cut = str(tmp_path / "cut")
    train(_clip_config(10), cut)
    resumed = train(_clip_config(20), cut)
    assert os.path.isdir(os.path.join(cut, "checkpoints", "20"))
    assert resumed["final"]["loss"] == pytest.approx(whole["final"]["loss"], rel=1e-5)
    after = [r for r in _records(cut) if r["step"] > 10]
    assert [r["step"] for r in after] == list(range(11, 21))
    for r, w in zip(after, _records(tmp_path / "whole")[10:]):  # same batches, same values
        assert r["loss"] == pytest.approx(w["loss"], rel=1e-5), r["step"]
    last = _records(tmp_path / "whole")[-1]  # every example's caption field is counted and its share logged
    assert last["data/caption_rewritten"] + last["data/caption_alt_text"] == 20 * 16
    assert 0.8 < last["data/caption_mix_rewritten"] < 1.0
    assert last["data/caption_mix_rewritten"] == last["data/caption_rewritten"] / (20 * 16)


def test_clip_tiny_config():
    from mmjax.train.config_checks import check_config

    for loss in ("siglip", "clip"):
        c = clip_tiny_config(loss)
        check_config(c, 8, 1)
        assert c.model.contrastive.loss == loss and c.model.vit.flavour == loss
        assert c.eval.zero_shot and c.eval.retrieval and not c.eval.caption_accuracy
    assert clip_tiny_config().model.contrastive.loss == "siglip"
    with pytest.raises(ValueError, match="'siglip' \\(default\\) or 'clip'"):
        clip_tiny_config("vit")
