"""WebDataset tar and JSONL readers: records per stream, bad records, truncated
shards, input errors, pickling, and the tar header scan against `tarfile`."""

import io
import json
import logging
import os
import pickle
import tarfile
from pathlib import Path

import grain
import numpy as np
import pytest
from PIL import Image

from mmjax.data import records
from mmjax.data.readers import jsonl as jsonl_reader
from mmjax.data.readers.jsonl import open_jsonl
from mmjax.data.readers.webdataset import WebDatasetSource, open_webdataset
from mmjax.data.records import DataError

# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #


def image_bytes(seed: int, fmt: str = "PNG", size=(6, 5)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def write_tar(path, members, fmt=tarfile.PAX_FORMAT):
    """members: [(name, bytes)] in order."""
    with tarfile.open(path, "w", format=fmt) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return str(path)


def caption_members(n, start=0):
    out = []
    for i in range(start, start + n):
        key = f"{i:06d}"
        out += [(f"{key}.jpg", image_bytes(i, "JPEG")), (f"{key}.txt", f"caption number {i}\n".encode())]
    return out


def is_bad(record):
    return bool(record.get("error")) and record["segments"] == []


@pytest.fixture(autouse=True)
def _fresh_warning_budget(monkeypatch):
    monkeypatch.setattr(records, "_warned", 0)


# --------------------------------------------------------------------------- #
# webdataset: records per stream
# --------------------------------------------------------------------------- #


def test_caption_shards_in_order(tmp_path):
    a = write_tar(tmp_path / "a.tar", caption_members(4))
    extra = [("000100.png", image_bytes(100)), ("000100.json", json.dumps({"caption": " from json "}).encode()),
             ("000101.webp", b"webp-bytes"), ("000101.json", json.dumps({"text": "text field"}).encode())]
    b = write_tar(tmp_path / "b.tar", caption_members(2, start=4) + extra)
    ds = open_webdataset([a, b], "caption")
    assert isinstance(ds, grain.MapDataset)
    assert len(ds) == 8
    got = [ds[i] for i in range(len(ds))]
    for i in range(6):
        rec = got[i]
        assert rec["stream"] == "caption" and "error" not in rec
        assert rec["origin"] == f"{a if i < 4 else b}:{i:06d}"
        assert rec["segments"] == [{"image_bytes": image_bytes(i, "JPEG")}, {"text": f"caption number {i}"}]
    assert got[6]["segments"] == [{"image_bytes": image_bytes(100)}, {"text": "from json"}]
    assert got[6]["origin"] == f"{b}:000100"
    assert got[7]["segments"] == [{"image_bytes": b"webp-bytes"}, {"text": "text field"}]


def test_interleaved_segments_and_obelics_lists(tmp_path):
    img = {n: image_bytes(n) for n in range(4)}
    doc_a = {"segments": [{"text": "Intro."}, {"image": "0.png"}, {"text": ""}, {"text": "Middle."},
                          {"image": "doc_a.1.png"}]}
    doc_b = {"texts": ["Title", None, "", None, "End."], "images": [None, "0.PNG", None, "1.png", None]}
    path = write_tar(tmp_path / "inter.tar", [
        ("doc_a.json", json.dumps(doc_a).encode()), ("doc_a.0.png", img[0]), ("doc_a.1.png", img[1]),
        ("doc_b.json", json.dumps(doc_b).encode()), ("doc_b.0.png", img[2]), ("doc_b.1.png", img[3]),
    ])
    ds = open_webdataset([path], "interleaved")
    assert len(ds) == 2
    a, b = ds[0], ds[1]
    assert a["origin"] == f"{path}:doc_a" and b["origin"] == f"{path}:doc_b"
    assert a["segments"] == [{"text": "Intro."}, {"image_bytes": img[0]}, {"text": "Middle."}, {"image_bytes": img[1]}]
    assert b["segments"] == [{"text": "Title"}, {"image_bytes": img[2]}, {"image_bytes": img[3]}, {"text": "End."}]


def test_text_stream(tmp_path):
    path = write_tar(tmp_path / "text.tar", [
        ("d0.txt", b"first document\nwith two lines\n"),
        ("d1.json", json.dumps({"text": "from json", "url": "x"}).encode()),
        ("d2.txt", "é ü 漢字".encode()),
    ])
    ds = open_webdataset([path], "text")
    assert [ds[i]["segments"] for i in range(3)] == [
        [{"text": "first document\nwith two lines\n"}], [{"text": "from json"}], [{"text": "é ü 漢字"}]]
    assert ds[2]["origin"] == f"{path}:d2"


def test_malformed_samples_are_bad_records(tmp_path, caplog):
    img = image_bytes(0)
    path = write_tar(tmp_path / "mixed.tar", [
        ("ok0.json", json.dumps({"segments": [{"text": "fine"}, {"image": "0.png"}]}).encode()), ("ok0.0.png", img),
        ("badjson.json", b"{not json"), ("badjson.0.png", img),
        ("missing.json", json.dumps({"segments": [{"text": "x"}, {"image": "3.jpg"}]}).encode()),
        ("missing.0.png", img),
        ("empty.json", json.dumps({"texts": ["", None], "images": [None, None]}).encode()),
        ("nojson.0.png", img),
        ("ok1.json", json.dumps({"texts": ["last"], "images": [None]}).encode()),
    ])
    ds = open_webdataset([path], "interleaved")
    with caplog.at_level(logging.WARNING, logger="mmjax.data"):
        got = [ds[i] for i in range(len(ds))]
    assert [r["origin"].rsplit(":", 1)[1] for r in got] == ["ok0", "badjson", "missing", "empty", "nojson", "ok1"]
    assert [is_bad(r) for r in got] == [False, True, True, True, True, False]
    assert "bad .json" in got[1]["error"] and "'3.jpg'" in got[2]["error"]
    assert got[5]["segments"] == [{"text": "last"}]
    assert f"{path}:missing" in caplog.text

    cap = write_tar(tmp_path / "cap.tar", [
        ("a.jpg", img), ("a.txt", b"good"),
        ("b.jpg", img), ("b.txt", b"   "),  # no caption text
        ("c.txt", b"no image"),
        ("d.jpg", img), ("d.json", b"[1, 2]"),  # json but not an object
        ("e.jpg", b""), ("e.txt", b"empty image"),
        ("f.jpg", img), ("f.txt", b"\xff\xfe not utf-8"),
    ])
    ds = open_webdataset([cap], "caption")
    assert [is_bad(ds[i]) for i in range(len(ds))] == [False, True, True, True, True, True]


# --------------------------------------------------------------------------- #
# webdataset: truncated shards and input errors
# --------------------------------------------------------------------------- #


def _member_ends(path):
    with tarfile.open(path) as tf:
        return [(m.name, m.offset, m.offset_data + m.size) for m in tf.getmembers()]


@pytest.mark.parametrize("cut", ["60%", "inside_header", "member_boundary", "inside_txt"])
def test_truncated_shard_keeps_complete_samples(tmp_path, caplog, cut):
    members = caption_members(10)
    full = write_tar(tmp_path / "full.tar", members)
    ends = _member_ends(full)
    data = Path(full).read_bytes()
    header_of = {name: off for name, off, _ in ends}
    size = {"60%": int(len(data) * 0.6), "inside_header": header_of["000006.jpg"] + 100,
            "member_boundary": header_of["000006.jpg"],
            "inside_txt": next(end for name, _, end in ends if name == "000005.txt") - 3}[cut]
    cut_path = tmp_path / "cut.tar"
    cut_path.write_bytes(data[:size])
    complete = sum(1 for name, _, end in ends if name.endswith(".txt") and end <= size)
    assert 0 < complete < 10

    with caplog.at_level(logging.WARNING, logger="mmjax.data"):
        ds = open_webdataset([full, str(cut_path)], "caption")
    assert f"truncated after {complete} samples" in caplog.text and str(cut_path) in caplog.text
    assert len(ds) == 10 + complete + 1
    got = [ds[i] for i in range(len(ds))]
    for i in range(complete):
        assert got[10 + i]["segments"] == got[i]["segments"]
        assert got[10 + i]["origin"] == f"{cut_path}:{i:06d}"
    assert is_bad(got[-1]) and got[-1]["origin"].startswith(f"{cut_path}:")
    assert not any(is_bad(r) for r in got[:-1])


def test_input_errors_name_the_file(tmp_path):
    good = write_tar(tmp_path / "good.tar", caption_members(1))
    missing = str(tmp_path / "missing.tar")
    with pytest.raises(DataError, match="missing.tar"):
        open_webdataset([good, missing], "caption")
    with pytest.raises(DataError, match="is a directory"):
        open_webdataset([str(tmp_path)], "caption")
    empty = write_tar(tmp_path / "empty.tar", [])
    with pytest.raises(DataError, match=r"no records in .*empty\.tar"):
        open_webdataset([empty], "caption")
    zero = tmp_path / "zero.tar"
    zero.write_bytes(b"")
    with pytest.raises(DataError, match=r"no records in .*zero\.tar"):
        open_webdataset([str(zero)], "caption")
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar archive at all\n" * 40)
    with pytest.raises(DataError, match=r"junk\.tar is not a tar archive"):
        open_webdataset([str(junk)], "caption")
    gz = tmp_path / "shard.tar.gz"
    with tarfile.open(gz, "w:gz") as tf:
        tf.add(good, arcname="x.txt")
    with pytest.raises(DataError, match=r"shard\.tar\.gz is gzip-compressed"):
        open_webdataset([str(gz)], "caption")
    with pytest.raises(DataError, match="unknown stream"):
        open_webdataset([good], "video")


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_header_scan_matches_tarfile(tmp_path, fmt):
    deep = "sub/" + "d" * 120 + "/"  # ustar: prefix field; gnu: 'L' long name; pax: 'path' record
    members = [(f"{deep}k{i}.{ext}", data) for i in range(3)
               for ext, data in (("png", image_bytes(i)), ("txt", f"long name {i}".encode()))]
    members.append(("ünïcode.txt", b"unicode key"))
    members.append(("noext", b"ignored: no extension"))
    if fmt == tarfile.USTAR_FORMAT:
        members.pop(-2)  # ustar cannot store non-ASCII names portably
    path = write_tar(tmp_path / "names.tar", members, fmt=fmt)
    with tarfile.open(path) as tf:
        regular = [(m.name, m.offset_data, m.size) for m in tf.getmembers() if m.isfile()]
    src = WebDatasetSource([path], "text")
    starts = [int(src._m_offset[i]) for i in range(len(src._m_offset))]
    assert starts == [off for name, off, _ in regular if "." in name]
    assert src[0]["origin"] == f"{path}:{deep}k0" and src[0]["segments"] == [{"text": "long name 0"}]
    assert src[2]["segments"] == [{"text": "long name 2"}]
    if fmt != tarfile.USTAR_FORMAT:
        assert src[3]["origin"] == f"{path}:ünïcode"


def test_pickles_and_reads_from_threads(tmp_path):
    path = write_tar(tmp_path / "a.tar", caption_members(6))
    ds = open_webdataset([path], "caption")
    first = ds[2]
    clone = pickle.loads(pickle.dumps(ds))
    assert clone[2] == first
    assert [clone[i] for i in range(6)] == [ds[i] for i in range(6)]
    threaded = list(ds.to_iter_dataset(grain.ReadOptions(num_threads=4, prefetch_buffer_size=8)))
    assert threaded == [ds[i] for i in range(6)]
    assert ds[-1] == ds[5]


# --------------------------------------------------------------------------- #
# JSONL
# --------------------------------------------------------------------------- #


def write_lines(path, lines, newline="\n", final_newline=True):
    text = newline.join(lines) + (newline if final_newline else "")
    path.write_bytes(text.encode())
    return str(path)


def test_jsonl_text(tmp_path):
    a = write_lines(tmp_path / "a.jsonl", [json.dumps({"text": "one"}), "", "  ", json.dumps({"text": "two\nlines"}),
                                           json.dumps({"text": "three", "meta": 1})], newline="\r\n")
    b = write_lines(tmp_path / "b.jsonl", [json.dumps({"text": "é"}), json.dumps({"text": "last"})],
                    final_newline=False)
    ds = open_jsonl([a, b], "text")
    assert len(ds) == 5
    got = [ds[i] for i in range(5)]
    assert [r["segments"] for r in got] == [[{"text": t}] for t in ("one", "two\nlines", "three", "é", "last")]
    assert [r["origin"] for r in got] == [f"{a}:1", f"{a}:4", f"{a}:5", f"{b}:1", f"{b}:2"]
    assert pickle.loads(pickle.dumps(ds))[4] == got[4]


def test_jsonl_caption_and_interleaved_with_relative_images(tmp_path):
    (tmp_path / "img").mkdir()
    imgs = {n: image_bytes(n, "JPEG" if n % 2 else "PNG") for n in range(3)}
    for n, data in imgs.items():
        (tmp_path / "img" / f"{n}.bin").write_bytes(data)
    absolute = str(tmp_path / "img" / "2.bin")
    cap = write_lines(tmp_path / "cap.jsonl", [
        json.dumps({"image": "img/0.bin", "caption": "zero "}),
        json.dumps({"image": absolute, "text": "two"}),
        '{"image": "img/1.bin", "caption": ',  # malformed
        json.dumps({"image": "img/nope.bin", "caption": "missing image"}),
        json.dumps({"caption": "no image field"}),
        json.dumps({"image": "img/1.bin", "caption": "one"}),
    ])
    ds = open_jsonl([cap], "caption")
    got = [ds[i] for i in range(len(ds))]
    assert got[0]["segments"] == [{"image_bytes": imgs[0]}, {"text": "zero"}]
    assert got[1]["segments"] == [{"image_bytes": imgs[2]}, {"text": "two"}]
    assert [is_bad(r) for r in got] == [False, False, True, True, True, False]
    assert got[2]["origin"] == f"{cap}:3" and "bad JSON" in got[2]["error"]
    assert "nope.bin" in got[3]["error"] and got[3]["origin"] == f"{cap}:4"
    assert got[5]["segments"] == [{"image_bytes": imgs[1]}, {"text": "one"}]

    inter = write_lines(tmp_path / "inter.jsonl", [
        json.dumps({"segments": [{"text": "a"}, {"image": "img/0.bin"}, {"text": ""}, {"text": "b"}]}),
        json.dumps({"texts": [None, "c"], "images": ["img/1.bin", None]}),
        json.dumps({"segments": [{"image": "img/gone.bin"}]}),
        "[1, 2]",
    ])
    ds = open_jsonl([inter], "interleaved")
    assert ds[0]["segments"] == [{"text": "a"}, {"image_bytes": imgs[0]}, {"text": "b"}]
    assert ds[1]["segments"] == [{"image_bytes": imgs[1]}, {"text": "c"}]
    assert is_bad(ds[2]) and is_bad(ds[3]) and ds[3]["origin"] == f"{inter}:4"


def test_jsonl_errors(tmp_path):
    with pytest.raises(DataError, match="nothere.jsonl"):
        open_jsonl([str(tmp_path / "nothere.jsonl")], "text")
    with pytest.raises(DataError, match="is a directory"):
        open_jsonl([str(tmp_path)], "text")
    blank = write_lines(tmp_path / "blank.jsonl", ["", "   ", ""])
    with pytest.raises(DataError, match=r"no records in .*blank\.jsonl"):
        open_jsonl([blank], "text")


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_jsonl_line_index_across_chunks(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(jsonl_reader, "_CHUNK", chunk)
    lines = ["", json.dumps({"text": "a"}), " \t", json.dumps({"text": "bb"}), "", "", json.dumps({"text": "c c"}),
             "   " + json.dumps({"text": "d"})]
    path = write_lines(tmp_path / "c.jsonl", lines, final_newline=False)
    ds = open_jsonl([path], "text")
    expected = [(n + 1, json.loads(line)["text"]) for n, line in enumerate(lines) if line.strip()]
    assert [(int(r["origin"].rsplit(":", 1)[1]), r["segments"][0]["text"]) for r in (ds[i] for i in range(len(ds)))] \
        == expected
    assert os.path.getsize(path) > chunk


def test_corrupt_header_mid_shard(tmp_path, caplog):
    path = write_tar(tmp_path / "a.tar", caption_members(6))
    header = next(off for name, off, _ in _member_ends(path) if name == "000004.jpg")
    data = bytearray(Path(path).read_bytes())
    data[header:header + 512] = b"\x07garbage" * 64
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="mmjax.data"):
        ds = open_webdataset([str(bad)], "caption")
    assert "truncated after 4 samples" in caplog.text and "invalid" in caplog.text
    assert len(ds) == 5 and not any(is_bad(ds[i]) for i in range(4)) and is_bad(ds[4])
