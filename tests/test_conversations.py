"""LLaVA-style conversations: every reader gives the same role-tagged raw
record, the chat template and its assistant-only loss token by token, cut
conversations, and bad conversations skipped and counted."""

import json

import numpy as np
import pytest

import shard_writers as sw
from conftest import small_config
from mmjax.data import records
from mmjax.data.convert import convert
from mmjax.data.examples import ExampleBuilder
from mmjax.data.images import decode_and_resize
from mmjax.data.pipeline import default_tokenizer, make_dataset
from mmjax.data.readers.array_record import open_array_record
from mmjax.data.readers.jsonl import open_json, open_jsonl
from mmjax.data.readers.parquet import open_parquet
from mmjax.data.readers.webdataset import open_webdataset
from mmjax.data.records import decode_record, encode_record

K = 4  # tokens per image


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer(small_config().data)


@pytest.fixture(autouse=True)
def _fresh_warning_budget(monkeypatch):
    monkeypatch.setattr(records, "_warned", 0)


def _png(i: int) -> bytes:
    return sw.encode(sw.picture(i, size=(32, 32)), "PNG")


# Conversations as LLaVA writes them; image references are paths relative to the file.
CONVERSATIONS = [
    {"id": "two-images", "images": ["imgs/a.png", "imgs/b.png"], "conversations": [
        {"from": "human", "value": "Compare <image> and\n<image>."},
        {"from": "gpt", "value": "The first is brighter."},
        {"from": "user", "value": "Which one has more blue?"},
        {"from": "assistant", "value": "The second one."}]},
    {"id": "one-image", "image": "imgs/c.png", "conversations": [
        {"from": "system", "value": "Answer in one sentence."},
        {"from": "human", "value": "<image>\nWhat is shown?"},
        {"from": "gpt", "value": "A smooth gradient."}]},
    {"id": "text-only", "conversations": [
        {"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "Hello!"}]},
]
IMAGES = {"imgs/a.png": _png(1), "imgs/b.png": _png(2), "imgs/c.png": _png(3)}
# The same conversation with one <image> too many: bad in every format.
BAD = {"id": "bad", "image": "imgs/a.png", "conversations": [
    {"from": "human", "value": "<image> and <image>?"}, {"from": "gpt", "value": "Two?"}]}


def _expected_segments() -> list[list[dict]]:
    a, b, c = IMAGES["imgs/a.png"], IMAGES["imgs/b.png"], IMAGES["imgs/c.png"]
    return [
        [{"text": "Compare ", "role": "user"}, {"image_bytes": a, "role": "user"},
         {"text": " and\n", "role": "user"}, {"image_bytes": b, "role": "user"}, {"text": ".", "role": "user"},
         {"text": "The first is brighter.", "role": "assistant"},
         {"text": "Which one has more blue?", "role": "user"}, {"text": "The second one.", "role": "assistant"}],
        [{"text": "Answer in one sentence.", "role": "system"}, {"image_bytes": c, "role": "user"},
         {"text": "\nWhat is shown?", "role": "user"}, {"text": "A smooth gradient.", "role": "assistant"}],
        [{"text": "Say hello.", "role": "user"}, {"text": "Hello!", "role": "assistant"}],
    ]


def _write_images(directory):
    for ref, data in IMAGES.items():
        (directory / ref).parent.mkdir(parents=True, exist_ok=True)
        (directory / ref).write_bytes(data)


def _write_jsonl(path, docs):
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return str(path)


def _write_formats(tmp_path, docs) -> dict[str, list[dict]]:
    """`docs` in JSON, JSONL, WebDataset, Parquet and (converted from JSONL)
    ArrayRecord -> {format: records read back, in order}."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    _write_images(tmp_path)
    json_path = tmp_path / "conv.json"
    json_path.write_text(json.dumps(docs, indent=1))
    jsonl_path = _write_jsonl(tmp_path / "conv.jsonl", docs)
    samples = []
    for n, doc in enumerate(docs):
        refs = doc.get("images") or ([doc["image"]] if "image" in doc else [])
        members = {"json": json.dumps(doc).encode()}
        members.update({f"{i}.png": IMAGES[ref] for i, ref in enumerate(refs)})
        samples.append((f"{n:06d}", members))
    sw.write_tar(tmp_path / "conv.tar", samples)
    table = pa.table({
        "id": [d["id"] for d in docs],
        "conversations": [d["conversations"] for d in docs],
        "images": pa.array([[IMAGES[r] for r in (d.get("images") or ([d["image"]] if "image" in d else []))]
                            for d in docs], pa.list_(pa.binary())),
    })
    pq.write_table(table, tmp_path / "conv.parquet")
    result = convert(f"jsonl:{jsonl_path}", "caption", str(tmp_path / "ar"), progress=False)
    n = len(docs)
    out = {
        "json": [open_json([str(json_path)], "caption")[i] for i in range(n)],
        "jsonl": [open_jsonl([jsonl_path], "caption")[i] for i in range(n)],
        "webdataset": [open_webdataset([str(tmp_path / "conv.tar")], "caption")[i] for i in range(n)],
        "parquet": list(open_parquet([str(tmp_path / "conv.parquet")], "caption", num_epochs=1)),
    }
    shards = open_array_record(result["shards"], "caption")
    out["array_record"] = [shards[i] for i in range(len(shards))]
    out["convert_skipped"] = result["skipped"]
    return out


def test_every_reader_gives_the_same_raw_record(tmp_path):
    got = _write_formats(tmp_path, CONVERSATIONS + [BAD])
    assert got.pop("convert_skipped") == 1
    want = _expected_segments()
    for fmt, recs in got.items():
        good = [r for r in recs if not r.get("error")]
        assert [r["segments"] for r in good] == want, fmt
        assert all(r["stream"] == "caption" for r in recs), fmt
        if fmt != "array_record":  # the converter skips the bad one, counted above
            assert len(recs) == 4 and recs[3]["error"] == "2 <image> placeholders but 1 images", fmt


def test_webdataset_image_references_may_name_members(tmp_path):
    doc = {"images": ["1.png", "000000.0.png"], "conversations": [
        {"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "Two."}]}
    sw.write_tar(tmp_path / "s.tar", [("000000", {"json": json.dumps(doc).encode(), "0.png": _png(5),
                                                  "1.png": _png(6)})])
    record = open_webdataset([str(tmp_path / "s.tar")], "interleaved")[0]
    assert [s.get("image_bytes") for s in record["segments"][:2]] == [_png(6), _png(5)]
    doc["images"] = ["x.png", "y.png", "z.png"]
    doc["conversations"][0]["value"] = "<image>" * 3
    sw.write_tar(tmp_path / "t.tar", [("000000", {"json": json.dumps(doc).encode(), "0.png": _png(5),
                                                  "1.png": _png(6)})])
    record = open_webdataset([str(tmp_path / "t.tar")], "interleaved")[0]
    assert "2 image members for 3 references" in record["error"]


def test_roles_survive_the_byte_encoding():
    record = {"stream": "text", "segments": [{"text": "hi", "role": "user"}, {"image": np.zeros((2, 3, 3), np.uint8),
                                                                            "role": "user"},
                                             {"text": "yo", "role": "assistant"}], "origin": "o"}
    back = decode_record(encode_record(record))
    assert [s.get("role") for s in back["segments"]] == ["user", "user", "assistant"]
    bad = dict(record, segments=[{"text": "hi", "role": "robot"}])
    with pytest.raises(ValueError, match="unknown role 'robot'"):
        decode_record(encode_record(bad))


def _builder(tok, seq_len=256, **kw):
    return ExampleBuilder(tok, seq_len=seq_len, max_images=4, tokens_per_image=K, image_size=32, **kw)


def _layout(tok, parts):
    """[(ids or text, trained)] -> (ids, positions of trained ids), `<bos>` first."""
    ids, trained = [tok.bos_id], []
    for piece, is_trained in parts:
        piece = tok.encode(piece) if isinstance(piece, str) else piece
        if is_trained:
            trained += range(len(ids), len(ids) + len(piece))
        ids += piece
    return ids, trained


def test_loss_only_on_assistant_answers_token_by_token(tmp_path, tok):
    """Multi-turn, two images, a system prompt from the config: the weights are
    the stream's loss weight exactly on each answer and its closing <eos>."""
    _write_images(tmp_path)
    record = open_jsonl([_write_jsonl(tmp_path / "c.jsonl", CONVERSATIONS[:1])], "interleaved")[0]
    ex = _builder(tok, system_prompt="Be brief.", loss_weights=(1.0, 0.5, 1.0))(record)
    image, eos = [tok.image_id] * K, [tok.eos_id]
    ids, trained = _layout(tok, [
        ("System: ", False), ("Be brief.", False), ("\n", False),
        ("User: ", False), ("Compare ", False), (image, False), (" and\n", False), (image, False), (".", False),
        ("\n", False),
        ("Assistant: ", False), ("The first is brighter.", True), (eos, True),
        ("User: ", False), ("Which one has more blue?", False), ("\n", False),
        ("Assistant: ", False), ("The second one.", True), (eos, True)])
    assert ex["ids"].tolist() == ids
    assert np.flatnonzero(ex["weights"]).tolist() == trained
    assert set(ex["weights"][trained].tolist()) == {0.5}  # the interleaved stream's loss weight
    image_at = [i for i, t in enumerate(ids) if t == tok.image_id]
    assert ex["slots"][image_at].tolist() == list(range(2 * K)) and np.all(np.delete(ex["slots"], image_at) == -1)
    np.testing.assert_array_equal(ex["images"][1], decode_and_resize(IMAGES["imgs/b.png"], 32))
    assert int(ex["stream"]) == 1 and int(ex["skipped_records"]) == 0
    # A conversation's own system turn replaces the configured prompt.
    one = open_jsonl([_write_jsonl(tmp_path / "d.jsonl", CONVERSATIONS[1:2])], "caption")[0]
    ex = _builder(tok, system_prompt="Be brief.")(one)
    ids, trained = _layout(tok, [
        ("System: ", False), ("Answer in one sentence.", False), ("\n", False),
        ("User: ", False), (image, False), ("\nWhat is shown?", False), ("\n", False),
        ("Assistant: ", False), ("A smooth gradient.", True), (eos, True)])
    assert ex["ids"].tolist() == ids and np.flatnonzero(ex["weights"]).tolist() == trained


def test_a_cut_conversation_ends_with_an_untrained_eos(tok):
    segments = _expected_segments()[2] + [{"text": "Again.", "role": "user"},
                                          {"text": "Hello again, and a long answer.", "role": "assistant"}]
    record = {"stream": "text", "segments": segments, "origin": "o"}
    full = _builder(tok)(record)
    answer = tok.encode("Hello again, and a long answer.")
    cut = _builder(tok, seq_len=len(full["ids"]) - 4)(record)  # three answer tokens and the <eos> do not fit
    assert cut["ids"].tolist() == full["ids"][:-4].tolist() + [tok.eos_id]
    np.testing.assert_array_equal(cut["weights"][:-1], full["weights"][:-4])
    assert cut["weights"][-1] == 0 and cut["weights"][-2] == 1 and len(answer) > 3
    # Exactly up to the first answer's <eos>: the example ends there, trained.
    first_eos = full["ids"].tolist().index(tok.eos_id)
    ex = _builder(tok, seq_len=first_eos)(record)
    assert ex["ids"].tolist() == full["ids"][:first_eos + 1].tolist() and ex["weights"][-1] == 1
    # No answer token fits: nothing to train on, skipped and counted.
    ex = _builder(tok, seq_len=8)(record)
    assert len(ex["ids"]) == 0 and int(ex["skipped_records"]) == 1


@pytest.mark.parametrize("turns, images, reason", [
    ([("human", "<image> and <image>"), ("gpt", "Two.")], 1, "2 <image> placeholders but 1 images"),
    ([("human", "What?"), ("gpt", "This.")], 1, "0 <image> placeholders but 1 images"),
    ([("human", "Hi."), ("robot", "Beep.")], 0, "turn 1 has unknown role 'robot'"),
    ([("human", "Hi."), ("gpt", "  \n ")], 0, "turn 1: the assistant turn is empty (whitespace only)"),
    ([("human", "Hi."), ("gpt", "Hello."), ("human", "Bye.")], 0, "does not end with an assistant turn"),
    ([("human", "Hi."), ("human", "Hello?"), ("gpt", "Yes.")], 0, "turns 0 and 1 are both user turns"),
    ([("human", "Draw."), ("gpt", "<image>")], 1, "turn 1: an <image> in an assistant turn"),
])
def test_bad_conversations_are_skipped_and_counted(tmp_path, tok, caplog, turns, images, reason):
    _write_images(tmp_path)
    doc = {"conversations": [{"from": f, "value": v} for f, v in turns]}
    if images:
        doc["images"] = list(IMAGES)[:images]
    path = _write_jsonl(tmp_path / "bad.jsonl", [doc])
    record = open_jsonl([path], "caption")[0]
    assert record["segments"] == [] and reason in record["error"] and record["origin"] == f"{path}:1"
    assert f"{path}:1" in caplog.text and reason in caplog.text
    ex = _builder(tok)(record)
    assert len(ex["ids"]) == 0 and int(ex["skipped_records"]) == 1


def test_malformed_roles_reaching_the_builder_are_skipped(tok, caplog):
    """Records written by other tools (e.g. straight into ArrayRecord)."""
    for segments, reason in [
        ([{"text": "Hi.", "role": "user"}], "does not end with an assistant turn"),
        ([{"text": "Hi.", "role": "user"}, {"text": "Yo."}], "segment 1 has no role"),
        ([{"text": "Hi.", "role": "user"}, {"text": " ", "role": "assistant"}], "the assistant turn is empty"),
    ]:
        ex = _builder(tok)({"stream": "text", "segments": segments, "origin": "elsewhere:7"})
        assert len(ex["ids"]) == 0 and int(ex["skipped_records"]) == 1
        assert reason in caplog.text and "elsewhere:7" in caplog.text


def test_a_corrupt_image_skips_its_conversation(tok):
    segments = [{"image_bytes": b"not an image", "role": "user"}, {"text": "What?", "role": "user"},
                {"text": "A cat.", "role": "assistant"}]
    ex = _builder(tok)({"stream": "caption", "segments": segments, "origin": "o"})
    assert len(ex["ids"]) == 0 and int(ex["skipped_records"]) == 1 and int(ex["skipped_images"]) == 1


def test_damaged_json_array_keeps_the_elements_before_the_damage(tmp_path, caplog):
    _write_images(tmp_path)
    text = json.dumps(CONVERSATIONS)
    path = tmp_path / "cut.json"
    path.write_text(text[:text.index('{"id": "text-only"') + 20])
    ds = open_json([str(path)], "caption")
    assert len(ds) == 3
    assert [r["segments"] for r in (ds[0], ds[1])] == _expected_segments()[:2]
    assert ds[2]["segments"] == [] and "the 2 elements before byte" in ds[2]["error"]
    assert str(path) in caplog.text
    (tmp_path / "obj.json").write_text('{"conversations": []}')
    with pytest.raises(records.DataError, match="does not hold a JSON array"):
        open_json([str(tmp_path / "obj.json")], "caption")


def test_conversations_through_the_pipeline_on_two_streams(tmp_path, tok):
    """Single-image conversations on the caption stream, text-only on the text
    stream: packed, counted per stream, loss only on the answers."""
    _write_images(tmp_path)
    c = small_config().data
    c.sources.caption = f"json:{tmp_path}/one.json"
    c.sources.text = f"jsonl:{_write_jsonl(tmp_path / 'text.jsonl', CONVERSATIONS[2:] + [BAD])}"
    (tmp_path / "one.json").write_text(json.dumps(CONVERSATIONS[1:2] * 3))
    c.mix_weights, c.pack_window, c.system_prompt = (1.0, 0.0, 1.0), 8, "Be brief."
    batch = next(iter(make_dataset(c, tok, batch_size=2)))
    answers = {"A smooth gradient.", "Hello!"}
    assert batch["stream_counts"].sum(axis=0)[1] == 0 and batch["stream_counts"].sum(axis=0)[[0, 2]].min() > 0
    assert batch["skipped_records"].sum() >= 1 and batch["num_examples"].sum() >= 2
    for b in range(2):
        for seg in range(1, batch["num_examples"][b] + 1):
            where = (batch["segment_ids"][b] == seg) & (batch["loss_mask"][b] > 0)
            targets = batch["targets"][b][where]
            assert targets[-1] == tok.eos_id and tok.decode(targets[:-1]) in answers
            tokens = batch["tokens"][b][batch["segment_ids"][b] == seg]
            system = "Answer in one sentence." if tok.image_id in tokens else "Be brief."
            assert tok.decode(tokens).startswith(f"System: {system}\nUser: ")
