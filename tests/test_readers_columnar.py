"""ArrayRecord, Parquet and TFDS readers: exact round trips of raw records,
bad records and unreadable files, process sharding and iterator state."""

import io
import logging
import pickle

import numpy as np
import pytest
from PIL import Image

from mmjax.data import records
from mmjax.data.readers.array_record import open_array_record, write_array_record
from mmjax.data.readers.parquet import open_parquet
from mmjax.data.readers.tfds import open_tfds
from mmjax.data.records import DataError


def _pixels(seed: int, shape=(6, 5, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_pixels(seed)).save(buf, format="PNG")
    return buf.getvalue()


def _assert_segments_equal(got: list[dict], want: list[dict]):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        if "image" in w:
            np.testing.assert_array_equal(g["image"], w["image"])
            assert g["image"].dtype == np.uint8
        elif "image_bytes" in w:
            assert bytes(g["image_bytes"]) == w["image_bytes"]
        else:
            assert g == w


@pytest.fixture(autouse=True)
def _fresh_warning_budget(monkeypatch):
    # Warnings past the first 100 of the process are only counted; start each test afresh.
    monkeypatch.setattr(records, "_warned", 0)


# ---------------------------------------------------------------- ArrayRecord

def _sample_records() -> dict[str, list[dict]]:
    return {
        "caption": [{"stream": "caption", "segments": [{"image_bytes": _png(i)}, {"text": f"caption {i}"}]}
                    for i in range(4)],
        "interleaved": [
            {"stream": "interleaved", "segments": [{"text": "intro", "spans": [(0, 5)]}, {"image_bytes": _png(7)},
                                                   {"image": _pixels(8)}, {"text": "outro"}]},
            {"stream": "interleaved", "segments": [{"image": _pixels(9, (3, 4, 3))}, {"text": "only"}]},
        ],
        "text": [{"stream": "text", "segments": [{"text": f"document {i} ü"}]} for i in range(3)],
    }


@pytest.mark.parametrize("stream", ["caption", "interleaved", "text"])
def test_array_record_round_trip_with_bad_records(tmp_path, stream):
    want = _sample_records()[stream]
    other = "text" if stream != "text" else "caption"
    wrong_stream = _sample_records()[other][0]
    path = str(tmp_path / f"{stream}.array_record")
    # garbage at 1, a record of another stream at 3
    written = [want[0], b"\x00not msgpack at all\xff", *want[1:2], wrong_stream, *want[2:]]
    assert write_array_record(path, written) == len(written)

    ds = open_array_record([path], stream)
    assert len(ds) == len(written)
    got = [ds[i] for i in range(len(ds))]
    assert [r["origin"] for r in got] == [f"{path}:{i}" for i in range(len(written))]
    assert all(r["stream"] == stream for r in got)
    bad = {i: r for i, r in enumerate(got) if "error" in r}
    assert sorted(bad) == [1, 3]
    assert bad[1]["segments"] == [] and "not an mmjax record" in bad[1]["error"]
    assert bad[3]["error"] == f"record of stream {other} in a {stream} source"
    good = [r for i, r in enumerate(got) if i not in bad]
    assert len(good) == len(want)
    for g, w in zip(good, want):
        _assert_segments_equal(g["segments"], w["segments"])
    # through a Grain iterator, and after pickling (as for worker processes)
    assert [r["origin"] for r in ds.to_iter_dataset()] == [r["origin"] for r in got]
    assert [r["origin"] for r in pickle.loads(pickle.dumps(ds))] == [r["origin"] for r in got]


def test_array_record_skips_unreadable_files(tmp_path, caplog):
    caption = _sample_records()["caption"]
    good_a, good_b = str(tmp_path / "a.array_record"), str(tmp_path / "b.array_record")
    write_array_record(good_a, caption[:3])
    write_array_record(good_b, caption[3:])
    garbage = tmp_path / "garbage.array_record"
    garbage.write_text("this is a text file, not an ArrayRecord shard\n" * 10)
    truncated = tmp_path / "truncated.array_record"
    big = str(tmp_path / "big.array_record")
    write_array_record(big, [b"x" * 3000 for _ in range(100)])
    data = (tmp_path / "big.array_record").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    missing = str(tmp_path / "missing.array_record")

    with caplog.at_level(logging.WARNING, logger="mmjax.data"):
        ds = open_array_record([good_a, str(garbage), str(truncated), missing, good_b], "caption")
    assert len(ds) == 4
    assert [ds[i]["origin"] for i in range(4)] == [f"{good_a}:0", f"{good_a}:1", f"{good_a}:2", f"{good_b}:0"]
    for i in range(4):
        _assert_segments_equal(ds[i]["segments"], caption[i]["segments"])
    warned = caplog.text
    assert str(garbage) in warned and str(truncated) in warned and missing in warned
    assert good_a not in warned

    with pytest.raises(DataError) as err:
        open_array_record([str(garbage), missing], "caption")
    assert str(garbage) in str(err.value) and missing in str(err.value)


# -------------------------------------------------------------------- Parquet

def _write_parquet(path, columns: dict, schema=None, row_group_size=None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(columns, schema=schema)
    pq.write_table(table, str(path), row_group_size=row_group_size)
    return str(path)


def test_parquet_caption_rows_exact(tmp_path):
    import pyarrow as pa

    images = [_png(i) for i in range(5)]
    plain = _write_parquet(tmp_path / "plain.parquet", {
        "image": pa.array([images[0], images[1], None, images[3], images[4]], pa.binary()),
        "caption": ["c0", "c1", "c2", None, "c4"],
        "extra": [1, 2, 3, 4, 5],
    }, row_group_size=2)
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    hf = _write_parquet(tmp_path / "hf.parquet", {
        "image": pa.array([{"bytes": images[2], "path": "x.png"}, {"bytes": None, "path": "y.png"}], struct),
        "text": ["t0", "t1"],
    })
    got = list(open_parquet([plain, hf], "caption", num_epochs=1, cycle_length=1, seed=3))
    by_origin = {r["origin"]: r for r in got}
    assert sorted(by_origin) == sorted([f"{plain}:{i}" for i in range(5)] + [f"{hf}:{i}" for i in range(2)])
    want = {f"{plain}:0": (images[0], "c0"), f"{plain}:1": (images[1], "c1"), f"{plain}:4": (images[4], "c4"),
            f"{hf}:0": (images[2], "t0")}
    for origin, (image, text) in want.items():
        assert by_origin[origin]["stream"] == "caption"
        _assert_segments_equal(by_origin[origin]["segments"], [{"image_bytes": image}, {"text": text}])
    for origin in (f"{plain}:2", f"{plain}:3", f"{hf}:1"):
        assert by_origin[origin]["segments"] == [] and "null" in by_origin[origin]["error"]
    # cycle_length=1 reads files one after the other, rows in file order
    assert [r["origin"].rsplit(":", 1)[1] for r in got if r["origin"].startswith(plain)] == list("01234")


def test_parquet_interleaved_and_text_rows_exact(tmp_path):
    import pyarrow as pa

    img = [_png(10 + i) for i in range(3)]
    path = _write_parquet(tmp_path / "obelics.parquet", {
        "texts": pa.array([["a", None, "b"], [None, "c"], ["x", None], ["y"], None], pa.list_(pa.string())),
        "images": pa.array([[None, img[0], None], [img[1], None], [None, None], [img[2]], [img[0]]],
                           pa.list_(pa.binary())),
        "url": ["u"] * 5,
    })
    got = list(open_parquet([path], "interleaved", num_epochs=1))
    assert [r["origin"] for r in got] == [f"{path}:{i}" for i in range(5)]
    _assert_segments_equal(got[0]["segments"], [{"text": "a"}, {"image_bytes": img[0]}, {"text": "b"}])
    _assert_segments_equal(got[1]["segments"], [{"image_bytes": img[1]}, {"text": "c"}])
    assert "both null" in got[2]["error"]
    assert "both set" in got[3]["error"]
    assert "null" in got[4]["error"]

    text_path = _write_parquet(tmp_path / "text.parquet", {"text": ["one", None, "three ü"], "id": [1, 2, 3]})
    got = list(open_parquet([text_path], "text", num_epochs=1))
    assert [r["segments"] for r in got] == [[{"text": "one"}], [], [{"text": "three ü"}]]
    assert "error" in got[1] and got[1]["origin"] == f"{text_path}:1"


def test_parquet_missing_columns_and_too_few_files(tmp_path):
    path = _write_parquet(tmp_path / "wrong.parquet", {"body": ["x"], "img": [b"y"]})
    with pytest.raises(DataError) as err:
        open_parquet([path], "text")
    assert path in str(err.value) and "'text'" in str(err.value) and "body" in str(err.value)
    with pytest.raises(DataError, match="neither a 'caption' nor a 'text'"):
        open_parquet([path], "caption")
    with pytest.raises(DataError, match="'texts'"):
        open_parquet([path], "interleaved")
    with pytest.raises(DataError, match="1 Parquet file"):
        open_parquet([path], "text", process_index=1, process_count=2)


def _text_files(tmp_path, num_files: int, rows: int) -> list[str]:
    return [_write_parquet(tmp_path / f"part-{f}.parquet", {"text": [f"f{f} r{r}" for r in range(rows)]},
                           row_group_size=3) for f in range(num_files)]


def test_parquet_process_sharding_is_disjoint(tmp_path):
    paths = _text_files(tmp_path, 2, 4)
    shards = [[r["segments"][0]["text"] for r in open_parquet(paths, "text", process_index=p, process_count=2,
                                                                num_epochs=1)] for p in range(2)]
    assert shards[0] and shards[1] and not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(f"f{f} r{r}" for f in range(2) for r in range(4))


def test_parquet_epochs_cover_every_row_once(tmp_path):
    paths = _text_files(tmp_path, 3, 4)
    everything = sorted(f"f{f} r{r}" for f in range(3) for r in range(4))
    # files are read one at a time: each epoch is a permutation of the files
    got = [r["segments"][0]["text"] for r in open_parquet(paths, "text", num_epochs=2, cycle_length=1, seed=5)]
    assert len(got) == 24
    assert sorted(got[:12]) == everything and sorted(got[12:]) == everything
    # with several files open at once, the last files of an epoch overlap the next epoch's first
    got = [r["segments"][0]["text"] for r in open_parquet(paths, "text", num_epochs=2, cycle_length=2, seed=5)]
    assert sorted(got) == sorted(everything * 2)


def test_parquet_iterator_state_round_trip(tmp_path):
    paths = _text_files(tmp_path, 3, 4)
    ds = open_parquet(paths, "text", seed=1, cycle_length=2)  # forever
    it = iter(ds)
    for _ in range(5):
        next(it)
    state = it.get_state()
    after = [next(it)["origin"] for _ in range(3)]
    fresh = iter(open_parquet(paths, "text", seed=1, cycle_length=2))
    fresh.set_state(state)
    assert [next(fresh)["origin"] for _ in range(3)] == after
    # across an epoch boundary (12 rows per epoch) as well
    for _ in range(10):
        next(it)
    state = it.get_state()
    after = [next(it)["origin"] for _ in range(4)]
    fresh = iter(pickle.loads(pickle.dumps(open_parquet(paths, "text", seed=1, cycle_length=2))))
    fresh.set_state(state)
    assert [next(fresh)["origin"] for _ in range(4)] == after


# ----------------------------------------------------------------------- TFDS

def _prepare_tfds_captions(data_dir: str, num: int) -> str:
    """Prepares a tiny caption dataset in ArrayRecord format with TFDS's own
    builder machinery (no TensorFlow involved); returns its name."""
    import tensorflow_datasets as tfds

    class TinyCaptionsForTest(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "caption": tfds.features.Text(),
                "id": tfds.features.Scalar(dtype=np.int64),
            }))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(num):
                yield i, {"image": _png(i), "caption": f"a caption number {i}", "id": i}

    builder = TinyCaptionsForTest(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return builder.name


def test_tfds_caption_dataset_read_back_exactly(tmp_path):
    import sys

    data_dir = str(tmp_path / "tfds")
    name = _prepare_tfds_captions(data_dir, 4)
    assert "tensorflow" not in sys.modules
    ds = open_tfds(name, data_dir, "train", "caption")
    assert len(ds) == 4
    got = sorted((ds[i] for i in range(4)), key=lambda r: r["segments"][1]["text"])
    for i, record in enumerate(got):
        assert record["stream"] == "caption" and "error" not in record
        _assert_segments_equal(record["segments"], [{"image": _pixels(i)}, {"text": f"a caption number {i}"}])
    assert {ds[i]["origin"] for i in range(4)} == {f"tfds:{name}/train:{i}" for i in range(4)}
    assert pickle.loads(pickle.dumps(ds))[2]["segments"][1] == ds[2]["segments"][1]

    text = open_tfds(name, data_dir, "train[:2]", "text")
    assert len(text) == 2 and all(len(text[i]["segments"]) == 1 for i in range(2))

    with pytest.raises(DataError) as err:
        open_tfds("no_such_dataset_here", data_dir, "train", "caption")
    assert "no_such_dataset_here" in str(err.value) and data_dir in str(err.value)
    with pytest.raises(DataError, match="split"):
        open_tfds(name, data_dir, "validation", "caption")
