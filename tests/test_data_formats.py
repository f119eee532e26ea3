"""Every on-disk format through the full pipeline (read, decode, tokenize,
build, mix, pack, batch), corrupt input skipped and counted, the converter."""

import subprocess
import sys

import numpy as np
import pytest

import shard_writers as sw
from conftest import small_config
from mmjax.data.convert import convert
from mmjax.data.images import decode_and_resize
from mmjax.data.pipeline import default_tokenizer, make_dataset
from mmjax.data.records import DataError


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer(small_config().data)


def _config(stream: str, spec: str, n_records: int):
    c = small_config().data
    c.mix_weights = tuple(1.0 if s == stream else 0.0 for s in ("caption", "interleaved", "text"))
    c.sources[stream] = spec
    c.pack_window = n_records  # the first window is exactly one epoch
    return c


def _one_epoch(c, tok, n_records: int):
    """(texts per example, images per example, skipped records) over the first epoch."""
    it = iter(make_dataset(c, tok, batch_size=1))
    texts, images, skipped, consumed = [], [], 0, 0
    while consumed < n_records:
        seq = {k: v[0] for k, v in next(it).items()}
        consumed += int(seq["num_examples"] + seq["skipped_records"])
        skipped += int(seq["skipped_records"])
        for seg in range(1, seq["num_examples"] + 1):
            ids = seq["tokens"][seq["segment_ids"] == seg]
            texts.append(tok.decode(ids[ids > 3]).strip())
            slots = seq["image_slots"][seq["segment_ids"] == seg]
            used = sorted(set(slots[slots >= 0] // c.tokens_per_image))
            images.append(seq["images"][used])
    assert consumed == n_records
    return texts, images, skipped


def test_webdataset_captions_with_corrupt_jpegs_are_skipped_and_counted(tmp_path, tok):
    sw.write_tar(tmp_path / "cap-0.tar", sw.caption_samples(5, 0, corrupt=(1,)))
    sw.write_tar(tmp_path / "cap-1.tar", sw.caption_samples(5, 5, corrupt=(7,)))
    c = _config("caption", f"webdataset:{tmp_path}/cap-{{0..1}}.tar", 10)
    texts, images, skipped = _one_epoch(c, tok, 10)
    assert skipped == 2
    assert sorted(texts) == sorted(f"caption number {i}" for i in range(10) if i not in (1, 7))
    for text, pixels in zip(texts, images):  # each caption keeps its own picture
        i = int(text.split()[-1])
        np.testing.assert_array_equal(pixels[0], decode_and_resize(sw.encode(sw.picture(i)), 32))


def test_parquet_interleaved_documents(tmp_path, tok):
    sw.write_interleaved_parquet(tmp_path / "docs-0.parquet", range(0, 3))
    sw.write_interleaved_parquet(tmp_path / "docs-1.parquet", range(3, 6))
    c = _config("interleaved", f"parquet:{tmp_path}/docs-*.parquet", 6)
    texts, images, skipped = _one_epoch(c, tok, 6)
    assert skipped == 0
    assert sorted(texts) == sorted(f"document {i} starts between pictures of {i} end of {i}" for i in range(6))
    for text, pixels in zip(texts, images):
        i = int(text.split()[1])
        assert len(pixels) == 2
        np.testing.assert_array_equal(pixels[1], decode_and_resize(sw.encode(sw.picture(2 * i + 1), "PNG"), 32))


def test_jsonl_text(tmp_path, tok):
    sw.write_jsonl(tmp_path / "a.jsonl", [f"plain text line {i}" for i in range(4)])
    with open(tmp_path / "a.jsonl", "a") as f:
        f.write("{not json\n")
    c = _config("text", f"jsonl:{tmp_path}/a.jsonl", 5)
    texts, _, skipped = _one_epoch(c, tok, 5)
    assert skipped == 1 and sorted(texts) == [f"plain text line {i}" for i in range(4)]


def test_convert_webdataset_to_array_record_then_train_on_it(tmp_path, tok):
    sw.write_tar(tmp_path / "cap.tar", sw.caption_samples(7, 0, corrupt=(3,)))
    result = convert(f"webdataset:{tmp_path}/cap.tar", "caption", str(tmp_path / "out"),
                     records_per_shard=4, progress=False)
    assert result["records"] == 7 and result["skipped"] == 0  # the bad JPEG is found at decode time
    assert [p.rsplit("/", 1)[1] for p in result["shards"]] == [
        "caption-00000-of-00002.array_record", "caption-00001-of-00002.array_record"]
    c = _config("caption", f"array_record:{tmp_path}/out/*.array_record", 7)
    texts, _, skipped = _one_epoch(c, tok, 7)
    assert skipped == 1 and sorted(texts) == sorted(f"caption number {i}" for i in range(7) if i != 3)
    with pytest.raises(DataError, match="already holds"):  # nothing written is overwritten
        convert(f"webdataset:{tmp_path}/cap.tar", "caption", str(tmp_path / "out"), progress=False)


def test_convert_command_line(tmp_path):
    sw.write_jsonl(tmp_path / "t.jsonl", ["one", "two", "three"])
    out = subprocess.run([sys.executable, "-m", "mmjax.data.convert", f"--input=jsonl:{tmp_path}/t.jsonl",
                          "--stream=text", f"--output={tmp_path}/o"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "wrote 3 records to 1 shards" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "mmjax.data.convert", f"--input=jsonl:{tmp_path}/none*.jsonl",
                          "--stream=text", f"--output={tmp_path}/o2"], capture_output=True, text=True)
    assert bad.returncode != 0 and "no file matches" in bad.stderr


def test_tfds_captions(tmp_path, tok):
    name = sw.prepare_tfds_captions(str(tmp_path / "tfds"), 4)
    c = _config("caption", f"tfds:{name}@{tmp_path}/tfds", 4)
    texts, images, _ = _one_epoch(c, tok, 4)
    assert sorted(texts) == [f"tfds caption {i}" for i in range(4)]
    assert all(p.shape == (1, 32, 32, 3) for p in images)


@pytest.mark.parametrize("spec, message", [
    ("webdataset:/nonexistent/shard-{0..3}.tar", "no file matches '/nonexistent/shard-0.tar'"),
    ("csv:/data/x.csv", "unknown format 'csv'"),
    ("jsonl:", "give a location"),
])
def test_bad_source_specs_fail_at_start_up_in_one_sentence(tok, spec, message):
    c = _config("text", spec, 1)
    with pytest.raises(DataError, match="config.data.sources.text") as err:
        make_dataset(c, tok, batch_size=1)
    assert message in str(err.value)


def test_empty_dataset_is_an_error(tmp_path, tok):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no records"):
        make_dataset(_config("text", f"jsonl:{tmp_path}/empty.jsonl", 1), tok, batch_size=1)


def test_dynamic_splitting_makes_tiles_and_an_overview(tok):
    from mmjax.data.examples import ExampleBuilder

    builder = ExampleBuilder(tok, seq_len=128, max_images=9, tokens_per_image=4, image_size=32,
                             image_split=(2, 4), tile_separators=True)
    wide = sw.picture(0, size=(32, 64))
    ex = builder({"stream": "caption", "segments": [{"image_bytes": sw.encode(wide, "PNG")}, {"text": "wide"}]})
    assert len(ex["images"]) == 3  # 1x2 tiles + overview
    np.testing.assert_array_equal(ex["images"][0], wide[:, :32])
    np.testing.assert_array_equal(ex["images"][1], wide[:, 32:])
    text = tok.decode(ex["ids"][ex["ids"] > 3])
    assert text.startswith("(1,1)(1,2)") and text.endswith("wide")
    assert np.all(ex["weights"][ex["slots"] < 0][1:-len(tok.encode(" wide")) - 1] == 0)  # no loss on separators
