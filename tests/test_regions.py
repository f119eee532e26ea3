"""Regions in conversations: coordinates as text and back, region records from
every reader, the example builder's coordinates + region token, bad regions
skipped and counted, region fields moving with their example through packing."""

import json
import re

import numpy as np
import pytest

import shard_writers as sw
from conftest import small_config
from mmjax.data import records
from mmjax.data import regions as R
from mmjax.data.examples import ExampleBuilder
from mmjax.data.packing import Packer
from mmjax.data.pipeline import default_tokenizer, make_dataset
from mmjax.data.readers.jsonl import open_jsonl
from mmjax.data.readers.parquet import open_parquet
from mmjax.data.readers.webdataset import open_webdataset
from mmjax.data.records import decode_record, encode_record

K, GRID = 4, 8  # tokens per image, region grid (32-pixel images, 4-pixel patches)


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer(small_config().data)


@pytest.fixture(autouse=True)
def _fresh_warning_budget(monkeypatch):
    monkeypatch.setattr(records, "_warned", 0)


# ----------------------------------------------------------------- coordinates


def test_boxes_and_points_survive_a_text_round_trip():
    rng = np.random.default_rng(0)
    for _ in range(300):
        width, height = (int(v) for v in rng.integers(8, 5000, 2))
        x1, x2 = sorted(rng.uniform(0, width, 2))
        y1, y2 = sorted(rng.uniform(0, height, 2))
        text = R.format_box([x1, y1, x2, y2], width, height)
        assert re.fullmatch(r"\[\d{1,3}, \d{1,3}, \d{1,3}, \d{1,3}\]", text)
        (back,) = R.parse_boxes(f"the cat {text}.", width, height)
        np.testing.assert_allclose(back[0::2], (x1, x2), atol=width / 1000)
        np.testing.assert_allclose(back[1::2], (y1, y2), atol=height / 1000)
        (normalised,) = R.parse_boxes(text)
        assert all(0 <= v <= 999 for v in normalised)
        point = R.format_point([x1, y2], width, height)
        (px, py), = R.parse_points(f"at {point}", width, height)
        assert abs(px - x1) <= width / 1000 and abs(py - y2) <= height / 1000
    # The edges are 0 and 999; coordinates past them are clipped.
    assert R.format_box([0, 0, 640, 480], 640, 480) == "[0, 0, 999, 999]"
    assert R.format_box([-3, -1, 700, 481], 640, 480) == "[0, 0, 999, 999]"
    assert R.format_point([320, 240], 640, 480) == "[500, 500]"


def test_parse_boxes_is_tolerant_of_spacing_and_finds_every_box_in_order():
    text = "a [ 1 ,2,  3 ,4 ] and [10,20,30,40]; point [5, 6]"
    assert R.parse_boxes(text) == [(1, 2, 3, 4), (10, 20, 30, 40)]
    assert R.parse_points(text) == [(5, 6)]
    assert R.parse_boxes(text, 999, 1998) == [(1.0, 4.0, 3.0, 8.0), (10.0, 40.0, 30.0, 80.0)]


@pytest.mark.parametrize("text", [
    "", "no box here", "[1, 2, 3]", "[1, 2, 3, 4", "1, 2, 3, 4]", "[1000, 2, 3, 4]", "[-1, 2, 3, 4]",
    "[1.5, 2, 3, 4]", "[a, b, c, d]", "[5, 5, 4, 6]", "[5, 7, 6, 6]", "[1, 2, 3, 4, 5]", "[1; 2; 3; 4]",
])
def test_malformed_text_yields_no_box(text):
    assert R.parse_boxes(text) == [] and R.parse_boxes(text, 640, 480) == []


def test_check_box_refuses_degenerate_and_outside_boxes_and_clips_the_slack():
    assert R.check_box([-0.5, 0, 640.8, 480], 640, 480) == (0.0, 0.0, 640.0, 480.0)
    for box, reason in [([10, 10, 10, 20], "degenerate"), ([10, 30, 20, 20], "degenerate"),
                        ([0, 0, 642, 100], "outside the 640x480 image"), ([-5, 0, 10, 10], "outside"),
                        ([1, 2, 3], "not four numbers"), ([0, 0, float("nan"), 4], "non-finite")]:
        with pytest.raises(ValueError, match=reason):
            R.check_box(box, 640, 480)


def _runs(mask: np.ndarray) -> list[int]:
    """COCO uncompressed RLE counts of a bool mask (column-major, outside first)."""
    flat = mask.T.ravel()
    change = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    return ([0] + runs) if flat[0] else runs


def test_rle_masks_decode_as_pycocotools_encodes_them():
    rng = np.random.default_rng(1)
    mask = rng.random((13, 17)) > 0.6
    np.testing.assert_array_equal(R.decode_rle({"size": [13, 17], "counts": _runs(mask)}), mask)
    mask_utils = pytest.importorskip("pycocotools.mask")
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    np.testing.assert_array_equal(R.decode_rle({"size": rle["size"], "counts": rle["counts"].decode()}), mask)
    big = np.zeros((300, 200), bool)
    big[40:260, 10:190] = rng.random((220, 180)) > 0.3
    rle = mask_utils.encode(np.asfortranarray(big.astype(np.uint8)))
    np.testing.assert_array_equal(R.decode_rle(rle), big)
    for bad in [{"size": [4, 4], "counts": [3, 2]}, {"counts": [16]}, {"size": [4, 4], "counts": "!!"}]:
        with pytest.raises(ValueError):
            R.decode_rle(bad)


def test_coverage_of_boxes_and_masks_on_the_grid():
    cover = R.box_coverage((8, 4, 24, 20), 32, 32, GRID)  # cells of 4 pixels: x 2..5, y 1..4
    want = np.zeros((GRID, GRID), np.float32)
    want[1:5, 2:6] = 1
    np.testing.assert_array_equal(cover, want)
    half = R.box_coverage((0, 0, 2, 6), 32, 32, GRID)  # half a cell wide, one and a half high
    np.testing.assert_allclose(half[:3, :2], [[0.5, 0], [0.25, 0], [0, 0]])
    mask = np.zeros((32, 32), bool)
    mask[4:20, 8:24] = True
    np.testing.assert_allclose(R.mask_coverage(mask, GRID), want)
    box, geometry = R.region_geometry({"rle": {"size": [32, 32], "counts": _runs(mask)}}, 32, 32)
    assert box == (8.0, 4.0, 24.0, 20.0) and geometry.sum() == 16 * 16


# ----------------------------------------------------------------- records


def _png(i: int, size=(32, 48)) -> bytes:
    return sw.encode(sw.picture(i, size=size), "PNG")


def _mask_png(mask: np.ndarray) -> bytes:
    return sw.encode(np.repeat(mask[..., None].astype(np.uint8) * 255, 3, -1), "PNG")


MASK = np.zeros((32, 48), bool)
MASK[8:24, 12:30] = True  # 32 x 48 image: 32 high, 48 wide


def _doc(regions, human="<image>\nWhat is <region>?", answer="It is at <region>.", image="imgs/a.png"):
    return {"id": "r", "image": image, "regions": regions, "conversations": [
        {"from": "human", "value": human}, {"from": "gpt", "value": "A square."},
        {"from": "human", "value": "Where is the red one?"}, {"from": "gpt", "value": answer}]}


REGIONS = [{"box": [12, 4, 36, 20]}, {"mask": "masks/m.png", "image": 0}]


def _files(tmp_path):
    (tmp_path / "imgs").mkdir(exist_ok=True)
    (tmp_path / "masks").mkdir(exist_ok=True)
    (tmp_path / "imgs/a.png").write_bytes(_png(1))
    (tmp_path / "imgs/b.png").write_bytes(_png(2))
    (tmp_path / "masks/m.png").write_bytes(_mask_png(MASK))


def _jsonl(tmp_path, docs, name="r.jsonl"):
    _files(tmp_path)
    path = tmp_path / name
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return str(path)


def test_readers_turn_region_placeholders_into_region_segments(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    record = open_jsonl([_jsonl(tmp_path, [_doc(REGIONS)])], "caption")[0]
    image, mask = _png(1), _mask_png(MASK)
    assert record["segments"] == [
        {"image_bytes": image, "role": "user"}, {"text": "\nWhat is ", "role": "user"},
        {"region": {"image": 0, "box": [12.0, 4.0, 36.0, 20.0]}, "role": "user"}, {"text": "?", "role": "user"},
        {"text": "A square.", "role": "assistant"}, {"text": "Where is the red one?", "role": "user"},
        {"text": "It is at ", "role": "assistant"}, {"region": {"image": 0, "mask_bytes": mask}, "role": "assistant"},
        {"text": ".", "role": "assistant"}]
    # The byte encoding (ArrayRecord) keeps them.
    assert decode_record(encode_record(record))["segments"] == record["segments"]
    # WebDataset: image and mask references name the sample's members.
    doc = _doc([REGIONS[0], {"mask": "mask.png"}], image="0.png")
    sw.write_tar(tmp_path / "r.tar", [("000000", {"json": json.dumps(doc).encode(), "0.png": image,
                                                  "mask.png": mask})])
    assert open_webdataset([str(tmp_path / "r.tar")], "caption")[0]["segments"] == record["segments"]
    # Parquet: a regions column of structs (masks as RLE or image bytes).
    rle = {"size": [32, 48], "counts": _runs(MASK)}
    doc = _doc([{"box": [12, 4, 36, 20], "image": 0, "mask": None}, {"box": None, "image": None, "mask": rle}])
    pq.write_table(pa.table({"conversations": [doc["conversations"]], "image": pa.array([image], pa.binary()),
                             "regions": [doc["regions"]]}), tmp_path / "r.parquet")
    (row,) = list(open_parquet([str(tmp_path / "r.parquet")], "caption", num_epochs=1))
    assert row["segments"][2]["region"] == {"image": 0, "box": [12.0, 4.0, 36.0, 20.0]}
    assert row["segments"][7]["region"] == {"image": 0, "rle": rle}


def _builder(tok, seq_len=128, **kw):
    kw.setdefault("max_regions", 4)
    return ExampleBuilder(tok, seq_len=seq_len, max_images=6, tokens_per_image=K, image_size=32,
                          region_grid=GRID, **kw)


def _layout(tok, parts):
    """[(ids or text, trained)] -> (ids, positions of trained ids), `<bos>` first."""
    ids, trained = [tok.bos_id], []
    for piece, is_trained in parts:
        piece = tok.encode(piece) if isinstance(piece, str) else piece
        if is_trained:
            trained += range(len(ids), len(ids) + len(piece))
        ids += piece
    return ids, trained


def test_coordinates_then_a_region_token_and_loss_only_on_answers(tmp_path, tok):
    """The question's region: its coordinates (0..999 of the 48 x 32 image)
    then a region token; the answer's region: coordinates only, trained."""
    record = open_jsonl([_jsonl(tmp_path, [_doc(REGIONS)])], "caption")[0]
    ex = _builder(tok)(record)
    image, eos, region = [tok.image_id] * K, [tok.eos_id], [tok.image_id]
    asked = R.format_box([12, 4, 36, 20], 48, 32)
    answered = R.format_box([12, 8, 30, 24], 48, 32)  # the mask's bounding box
    assert (asked, answered) == ("[250, 125, 749, 624]", "[250, 250, 624, 749]")
    parts = [
        ("User: ", False), (image, False), ("\nWhat is ", False), (asked, False), (region, False), ("?", False),
        ("\n", False), ("Assistant: ", False), ("A square.", True), (eos, True),
        ("User: ", False), ("Where is the red one?", False), ("\n", False),
        ("Assistant: ", False), ("It is at ", True), (answered, True), (".", True), (eos, True)]
    ids, trained = _layout(tok, parts)
    assert ex["ids"].tolist() == ids
    assert np.flatnonzero(ex["weights"]).tolist() == trained
    at = len(_layout(tok, parts[:4])[0])  # the region token
    assert ex["region_slots"].tolist() == [0 if i == at else -1 for i in range(len(ids))]
    assert ex["slots"][at] == -1 and ex["weights"][at] == 0
    assert ex["region_images"].tolist() == [0]
    np.testing.assert_allclose(ex["region_masks"][0], R.box_coverage((12, 4, 36, 20), 48, 32, GRID))
    # Without region slots: the same text, no region token, no region fields.
    plain = _builder(tok, max_regions=0)(record)
    assert plain["ids"].tolist() == ids[:at] + ids[at + 1:]
    assert not any(k.startswith("region") for k in plain)


def test_regions_on_split_images_lie_on_the_overview_tile(tmp_path, tok):
    doc = _doc([{"box": [0, 0, 48, 32]}, {"box": [24, 0, 48, 16], "image": 1}],
               human="<image> and <image>: <region>, <region>?", answer="Here.", image=None)
    doc.pop("image")
    doc["images"] = ["imgs/a.png", "imgs/b.png"]
    record = open_jsonl([_jsonl(tmp_path, [doc])], "interleaved")[0]
    ex = _builder(tok, seq_len=200, image_split=(2, 2))(record)
    assert len(ex["images"]) == 6  # two tiles and an overview per image
    assert ex["region_images"].tolist() == [2, 5]
    np.testing.assert_allclose(ex["region_masks"][0], np.ones((GRID, GRID)))
    np.testing.assert_allclose(ex["region_masks"][1][:4, 4:], np.ones((4, 4)))
    assert ex["region_masks"][1].sum() == 16


def test_regions_beyond_max_regions_keep_only_their_coordinates(tmp_path, tok):
    doc = _doc([{"box": [0, 0, 10, 10]}] * 3, human="<image> <region> <region> <region>", answer="Yes.")
    record = open_jsonl([_jsonl(tmp_path, [doc])], "caption")[0]
    ex = _builder(tok, max_regions=2)(record)
    assert ex["region_images"].tolist() == [0, 0] and sorted(ex["region_slots"][ex["region_slots"] >= 0]) == [0, 1]
    text = tok.decode(ex["ids"])
    assert text.count("[0, 0, 208, 312]") == 3


@pytest.mark.parametrize("regions, reason", [
    ([{"box": [0, 0, 60, 16]}], "lies outside the 48x32 image"),
    ([{"box": [10, 10, 10, 20]}], "is degenerate"),
    ([{"mask": {"size": [8, 8], "counts": [64]}}], "a 8x8 mask does not match its 32x48 image"),
    ([{"mask": {"size": [32, 48], "counts": [32 * 48]}}], "the mask is empty"),
    ([{"mask": {"size": [32, 48], "counts": [5, 3]}}], "RLE counts do not cover a 32x48 mask"),
])
def test_a_region_that_does_not_fit_its_image_skips_the_record(tmp_path, tok, caplog, regions, reason):
    path = _jsonl(tmp_path, [_doc(regions, answer="Here.")])
    record = open_jsonl([path], "caption")[0]
    ex = _builder(tok)(record)
    assert len(ex["ids"]) == 0 and int(ex["skipped_records"]) == 1
    assert f"{path}:1, region 1" in caplog.text and reason in caplog.text


@pytest.mark.parametrize("regions, human, answer, reason", [
    ([{"box": [0, 0, 4, 4]}], "<image> <region> <region>", "Two.", "2 <region> placeholders but 1 regions"),
    ([{"box": [0, 0, 4, 4]}], "<image> what?", "Two.", "0 <region> placeholders but 1 regions"),
    ([{"box": [0, 0, 4, 4], "image": 1}], "<image> <region>", "One.", "region 0 refers to image 1, but the object "
                                                                       "has 1 images"),
    ([{"box": [0, 0, 4]}], "<image> <region>", "One.", "region 0: 'box' [0, 0, 4] is not four numbers"),
    ([{"box": [0, 0, 4, 4], "mask": "m.png"}], "<image> <region>", "One.", "exactly one of 'box' and 'mask'"),
    ([{"box": [0, 0, 4, 4]}], "<region> <image>", "One.", "region 0 refers to image 0, which comes after it"),
    ([{"mask": "masks/none.png"}], "<image> <region>", "One.", "cannot read image"),
    ("box", "<image> <region>", "One.", "'regions' is not a list"),
])
def test_malformed_region_records_are_skipped_and_counted(tmp_path, tok, caplog, regions, human, answer, reason):
    path = _jsonl(tmp_path, [_doc(regions, human=human, answer=answer)])
    record = open_jsonl([path], "caption")[0]
    assert record["segments"] == [] and reason in record["error"]
    assert f"{path}:1" in caplog.text
    ex = _builder(tok)(record)
    assert len(ex["ids"]) == 0 and int(ex["skipped_records"]) == 1


# ----------------------------------------------------------------- packing


def _region_records(n: int) -> list[dict]:
    """Conversations with 0..2 regions on one or two images."""
    out = []
    for i in range(n):
        rng = np.random.default_rng(i)
        images = 1 + i % 2
        segments = [{"image": sw.picture(i + j, size=(32, 32)), "role": "user"} for j in range(images)]
        for r in range(i % 3):
            x1, y1 = (int(v) for v in rng.integers(0, 20, 2))
            box = [x1, y1, x1 + int(rng.integers(2, 12)), y1 + int(rng.integers(2, 12))]
            segments += [{"text": f" region {r}", "role": "user"},
                         {"region": {"image": r % images, "box": box}, "role": "user"}]
        segments += [{"text": f"answer {i}.", "role": "assistant"}]
        out.append({"stream": "caption", "segments": segments, "origin": f"conversation {i}"})
    return out


def test_packed_region_fields_are_each_examples_own(tok):
    d = small_config().data
    d.seq_len = 128
    builder = ExampleBuilder(tok, d.seq_len, d.max_images, d.tokens_per_image, d.image_size,
                             max_regions=3, region_grid=GRID)
    examples = [builder(r) for r in _region_records(12)]
    assert sum(len(ex["region_images"]) for ex in examples) == 12
    packer = Packer(d.seq_len, d.max_images, d.tokens_per_image, d.image_size, tok.pad_id, max_regions=3,
                    region_grid=GRID)
    packed = packer.pack_window(examples)
    assert max(s["num_examples"] for s in packed) >= 2 and max((s["region_images"] >= 0).sum() for s in packed) >= 2
    placed = 0
    for seq in packed:
        n_img = n_reg = 0
        assert (seq["region_images"] >= 0).sum() <= 3
        for seg in range(1, seq["num_examples"] + 1):
            where = seq["segment_ids"] == seg
            ids = np.concatenate([seq["tokens"][where], seq["targets"][where][-1:]])
            ex = next(e for e in examples if np.array_equal(e["ids"], ids))
            r, m = len(ex["region_images"]), len(ex["images"])
            slots = seq["region_slots"][where]
            np.testing.assert_array_equal(np.where(slots >= 0, slots - n_reg, -1), ex["region_slots"][:-1])
            np.testing.assert_array_equal(seq["region_images"][n_reg:n_reg + r] - n_img, ex["region_images"])
            np.testing.assert_array_equal(seq["region_masks"][n_reg:n_reg + r], ex["region_masks"])
            for k in range(r):  # the region's image is its example's image, moved with it
                np.testing.assert_array_equal(seq["images"][seq["region_images"][n_reg + k]],
                                              ex["images"][ex["region_images"][k]])
            n_img, n_reg, placed = n_img + m, n_reg + r, placed + 1
        assert (seq["region_images"][n_reg:] == -1).all() and not seq["region_masks"][n_reg:].any()
        assert not (seq["region_slots"][seq["segment_ids"] == 0] >= 0).any()
    assert placed == len(examples)


def test_batches_carry_region_fields_only_when_asked(tmp_path, tok):
    c = small_config().data
    plain = next(iter(make_dataset(c, tok, batch_size=2)))
    assert not any(k.startswith("region") for k in plain)
    docs = [_doc([{"box": [4 * i, 0, 4 * i + 10, 12]}, {"box": [0, 0, 20, 20]}], answer=f"At <region>, {i}.")
            for i in range(4)]
    c.sources.caption = f"jsonl:{_jsonl(tmp_path, docs)}"
    c.mix_weights, c.max_regions, c.region_grid, c.pack_window = (1.0, 0.0, 0.0), 2, GRID, 4
    batch = next(iter(make_dataset(c, tok, batch_size=2)))
    assert batch["region_slots"].shape == (2, c.seq_len) and batch["region_images"].shape == (2, 2)
    assert batch["region_masks"].shape == (2, 2, GRID, GRID) and batch["region_masks"].dtype == np.float32
    assert (batch["region_slots"] >= 0).sum() == (batch["region_images"] >= 0).sum() >= 2
