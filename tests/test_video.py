"""Videos as frames: frame folders and encoded video files referenced from
JSON/JSONL, uniform sampling checked by colour, frame counts that adapt to
the image and token budget, time markers before each frame, assistant-only
loss on video conversations, and bad videos skipped and counted."""

import json

import av
import numpy as np
import pytest
from PIL import Image

from conftest import small_config
from mmjax.data import records, video
from mmjax.data.examples import ExampleBuilder
from mmjax.data.pipeline import default_tokenizer, make_dataset
from mmjax.data.readers.jsonl import open_json, open_jsonl
from mmjax.data.records import decode_record, encode_record

K, T = 4, 32  # tokens per image, image size
FPS, COUNT = 4, 12  # the test videos: 12 frames at 4 fps, 3 seconds
# One solid colour per frame, far enough apart to survive lossy video coding.
COLOURS = np.array([(0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255),
                    (0, 255, 255), (255, 255, 255), (128, 0, 0), (0, 128, 0), (0, 0, 128), (128, 128, 128)],
                   np.uint8)


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer(small_config().data)


@pytest.fixture(autouse=True)
def _fresh_warning_budget(monkeypatch):
    monkeypatch.setattr(records, "_warned", 0)


def _frame(k: int) -> np.ndarray:
    return np.broadcast_to(COLOURS[k], (T, T, 3)).copy()


def _write_frames(folder, count: int = COUNT) -> None:
    """PNG frames named f1.png .. f12.png (name order differs from number order)."""
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        Image.fromarray(_frame(k)).save(folder / f"f{k + 1}.png")


def _write_video(path, count: int = COUNT, codec: str = "libx264", gop: int = 0) -> None:
    """Frame `k` in colour `k % 12`, encoded at `FPS` frames per second (a
    keyframe every `gop` frames when given)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=FPS)
        stream.width = stream.height = T
        stream.pix_fmt = "yuv420p"
        if gop:
            stream.codec_context.gop_size = gop
        for k in range(count):
            for packet in stream.encode(av.VideoFrame.from_ndarray(_frame(k % len(COLOURS)), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _colour_indices(frames: np.ndarray) -> list[int]:
    """The palette index nearest to each frame's mean colour."""
    mean = frames.reshape(len(frames), -1, 3).mean(axis=1)
    return np.argmin(((mean[:, None, :] - COLOURS[None].astype(float)) ** 2).sum(-1), axis=1).tolist()


def _write_jsonl(path, docs) -> str:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return str(path)


def _builder(tok, seq_len=512, max_images=16, video_frames=8, **kw):
    return ExampleBuilder(tok, seq_len=seq_len, max_images=max_images, tokens_per_image=K, image_size=T,
                          video_frames=video_frames, video_fps=FPS, **kw)


def _video_ids(tok, n: int, duration: float = COUNT / FPS) -> list[int]:
    """The ids of `n` sampled frames: each time marker, then the frame's image slots."""
    ids = []
    for t in video.sample_times(duration, n):
        ids += tok.encode(video.time_marker(t)) + [tok.image_id] * K
    return ids


def _expected_indices(n: int) -> list[int]:
    return [int(t * FPS) for t in video.sample_times(COUNT / FPS, n)]


def test_sample_times_are_uniform_and_frame_count_fits_the_budget():
    times = video.sample_times(3.0, 6)
    np.testing.assert_allclose(times, [0.25, 0.75, 1.25, 1.75, 2.25, 2.75])
    np.testing.assert_allclose(np.diff(video.sample_times(7.0, 5)), 7.0 / 5)
    assert video.sample_times(7.0, 5)[0] == pytest.approx(0.7)
    two = lambda n: 2 * n  # noqa: E731  (two marker tokens per frame)
    assert video.frame_count(8, 16, 1000, K, two) == 8  # the configured maximum
    assert video.frame_count(8, 3, 1000, K, two) == 3  # the image slots left
    assert video.frame_count(8, 16, 6 * 5, K, two) == 5  # 5 * (4 + 2) tokens fit, 6 do not
    assert video.frame_count(8, 16, 5, K, two) == 0 and video.frame_count(8, 0, 100, K, two) == 0
    assert video.time_marker(1.5) == "t=1.5s: "


def test_frame_folder_caption_record(tmp_path, tok):
    """Frames sorted by number, sampled at the middles of equal intervals:
    markers and image slots alternate, then the caption; loss on the caption only."""
    _write_frames(tmp_path / "clips" / "walk")
    path = _write_jsonl(tmp_path / "v.jsonl", [{"video": "clips/walk", "caption": " A walk. ", "fps": FPS}])
    record = open_jsonl([path], "caption")[0]
    seg, text = record["segments"]
    assert seg["video"] == [str(tmp_path / "clips" / "walk" / f"f{k + 1}.png") for k in range(COUNT)]
    assert seg["fps"] == FPS and text == {"text": "A walk."}
    ex = _builder(tok, video_frames=4)(record)
    caption = tok.encode(" A walk.")
    assert ex["ids"].tolist() == [tok.bos_id] + _video_ids(tok, 4) + caption + [tok.eos_id]
    assert _colour_indices(ex["images"]) == _expected_indices(4) == [1, 4, 7, 10]
    np.testing.assert_array_equal(ex["images"][0], _frame(1))  # PNG frames: exact pixels
    image_at = np.flatnonzero(ex["ids"] == tok.image_id)
    assert ex["slots"][image_at].tolist() == list(range(4 * K)) and np.all(np.delete(ex["slots"], image_at) == -1)
    trained = np.flatnonzero(ex["weights"])
    assert trained.tolist() == list(range(len(ex["ids"]) - len(caption) - 1, len(ex["ids"])))
    # Without an "fps" in the record the frames use the configured default.
    record["segments"][0].pop("fps")
    ex = ExampleBuilder(tok, seq_len=512, max_images=16, tokens_per_image=K, image_size=T, video_frames=3,
                        video_fps=2.0)(record)
    assert _colour_indices(ex["images"]) == [int(t * 2.0) for t in video.sample_times(COUNT / 2.0, 3)] == [2, 6, 10]


def test_video_file_conversation_frames_markers_and_loss(tmp_path, tok):
    """An MP4 decoded with PyAV: the frames at the sampled times (by colour),
    markers before each frame inside the user turn, loss only on the answer."""
    _write_video(tmp_path / "clip.mp4")
    doc = {"id": "v", "video": "clip.mp4", "conversations": [
        {"from": "human", "value": "<video>\nWhat colours?"}, {"from": "gpt", "value": "Many colours."}]}
    (tmp_path / "v.json").write_text(json.dumps([doc]))
    record = open_json([str(tmp_path / "v.json")], "interleaved")[0]
    assert record["segments"] == [{"video": str(tmp_path / "clip.mp4"), "role": "user"},
                                  {"text": "\nWhat colours?", "role": "user"},
                                  {"text": "Many colours.", "role": "assistant"}]
    ex = _builder(tok, video_frames=6, loss_weights=(1.0, 0.5, 1.0))(record)
    pieces = [(tok.encode("User: "), False), (_video_ids(tok, 6), False), (tok.encode("\nWhat colours?"), False),
              (tok.encode("\n"), False), (tok.encode("Assistant: "), False),
              (tok.encode("Many colours."), True), ([tok.eos_id], True)]
    ids, trained = [tok.bos_id], []
    for piece, is_trained in pieces:
        trained += range(len(ids), len(ids) + len(piece)) if is_trained else []
        ids += piece
    assert ex["ids"].tolist() == ids
    assert np.flatnonzero(ex["weights"]).tolist() == trained and set(ex["weights"][trained].tolist()) == {0.5}
    assert _colour_indices(ex["images"]) == _expected_indices(6) == [1, 3, 5, 7, 9, 11]
    assert ex["images"].shape == (6, T, T, 3) and int(ex["skipped_records"]) == 0
    # The same video as encoded bytes, and more frames than the video has (frames repeat).
    data = (tmp_path / "clip.mp4").read_bytes()
    with video.open_clip({"video": data}) as clip:
        assert clip.duration == pytest.approx(3.0)
        times = video.sample_times(clip.duration, 24)
        assert _colour_indices(clip.read(times, T)) == [int(t * FPS) for t in times]


@pytest.mark.parametrize("codec, ext", [("libx264", "mp4"), ("mpeg4", "avi"), ("libx264", "mkv")])
def test_long_videos_seek_to_the_sampled_frames(tmp_path, codec, ext):
    """48 frames (12 s), a keyframe every 5: 5 samples are more than 2 s apart
    (seeks), 16 are closer (decoded forward); Matroska has no stream duration
    (the container's is used)."""
    path = tmp_path / f"long.{ext}"
    _write_video(path, count=48, codec=codec, gop=5)
    with video.open_clip({"video": str(path)}) as clip:
        assert clip.duration == pytest.approx(12.0)
        for n in (5, 16):
            times = video.sample_times(clip.duration, n)
            assert _colour_indices(clip.read(times, T)) == [int(t * FPS) % len(COLOURS) for t in times]


def test_llava_video_image_placeholder_stands_for_the_video(tmp_path):
    _write_frames(tmp_path / "frames", 3)
    doc = {"video": "frames", "conversations": [{"from": "human", "value": "<image>\nDescribe."},
                                                {"from": "gpt", "value": "Colours."}]}
    record = open_jsonl([_write_jsonl(tmp_path / "v.jsonl", [doc])], "interleaved")[0]
    assert len(record["segments"][0]["video"]) == 3 and record["segments"][0]["role"] == "user"
    # With an image too, <image> is the image's and <video> the video's.
    Image.fromarray(_frame(5)).save(tmp_path / "still.png")
    doc = {"image": "still.png", "video": "frames", "fps": 2, "conversations": [
        {"from": "human", "value": "<image> then <video>?"}, {"from": "gpt", "value": "Yes."}]}
    record = open_jsonl([_write_jsonl(tmp_path / "w.jsonl", [doc])], "interleaved")[0]
    kinds = [next(k for k in ("image_bytes", "video", "text") if k in s) for s in record["segments"]]
    assert kinds == ["image_bytes", "text", "video", "text", "text"] and record["segments"][2]["fps"] == 2.0


def _folder_record(tmp_path, before=0, after=0, caption="Colours.") -> dict:
    _write_frames(tmp_path / "frames")
    still = {"image": _frame(0)}
    segments = [dict(still) for _ in range(before)] + [{"video": video.list_frames(str(tmp_path / "frames"))}]
    segments += [dict(still) for _ in range(after)] + [{"text": caption}]
    return {"stream": "interleaved", "segments": segments, "origin": "mem:0"}


def test_frame_count_adapts_to_image_slots_and_seq_len(tmp_path, tok):
    record = _folder_record(tmp_path)
    assert len(_builder(tok, video_frames=8)(record)["images"]) == 8  # data.video_frames
    assert len(_builder(tok, video_frames=8, max_images=3)(record)["images"]) == 3  # max_images
    # Images before and after the video keep their slots: 5 - 2 = 3 frames.
    mixed = _folder_record(tmp_path, before=1, after=1)
    ex = _builder(tok, video_frames=8, max_images=5)(mixed)
    assert len(ex["images"]) == 5 and _colour_indices(ex["images"]) == [0] + _expected_indices(3) + [0]
    assert int(ex["dropped_images"]) == 0
    # seq_len: exactly room for three frames and the caption; one token less gives two.
    caption = tok.encode(" Colours.")
    for n in (3, 2, 1):
        seq_len = 1 + len(_video_ids(tok, n)) + len(caption) + 1 - 1  # <bos> frames caption <eos>, minus one
        ex = _builder(tok, seq_len=seq_len, video_frames=8)(record)
        assert ex["ids"].tolist() == [tok.bos_id] + _video_ids(tok, n) + caption + [tok.eos_id]
        assert _colour_indices(ex["images"]) == _expected_indices(n)
        ex = _builder(tok, seq_len=seq_len - 1, video_frames=8)(record)
        assert len(ex["images"]) == max(n - 1, 1)  # one frame even when the caption must be cut
    # A caption longer than the sequence still leaves one frame (the caption is cut).
    long = _folder_record(tmp_path, caption="red green blue " * 40)
    ex = _builder(tok, seq_len=40, video_frames=8)(long)
    assert len(ex["images"]) == 1 and len(ex["ids"]) == 41 and ex["ids"][-1] == tok.eos_id
    assert _colour_indices(ex["images"]) == _expected_indices(1)
    # No image slot left: the video is dropped like an image, its text kept.
    ex = _builder(tok, max_images=1)(_folder_record(tmp_path, before=1))
    assert len(ex["images"]) == 1 and int(ex["dropped_images"]) == 1 and tok.image_id in ex["ids"]
    assert int(ex["skipped_records"]) == 0


@pytest.mark.parametrize("setup, doc, reason", [
    (None, {"video": "gone.mp4", "caption": "x"}, "cannot read video {d}/gone.mp4"),
    ("empty_dir", {"video": "empty", "caption": "x"}, "frame folder {d}/empty holds no image files"),
    ("empty_file", {"video": "zero.mp4", "caption": "x"}, "video file {d}/zero.mp4 is empty"),
    (None, {"video": "gone.mp4", "conversations": [{"from": "human", "value": "<video>?"},
                                                   {"from": "gpt", "value": "No."}]},
     "cannot read video {d}/gone.mp4"),
    (None, {"conversations": [{"from": "human", "value": "<video>?"}, {"from": "gpt", "value": "No."}]},
     "1 <video> placeholders but 0 videos"),
    ("empty_dir", {"video": "empty", "fps": -1, "caption": "x"}, "'fps' -1 is not a positive number"),
])
def test_missing_videos_and_empty_folders_are_bad_records(tmp_path, tok, caplog, setup, doc, reason):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no frames here")
    (tmp_path / "zero.mp4").write_bytes(b"")
    path = _write_jsonl(tmp_path / "bad.jsonl", [doc])
    record = open_jsonl([path], "caption")[0]
    reason = reason.format(d=tmp_path)
    assert record["segments"] == [] and reason in record["error"]
    assert f"{path}:1" in caplog.text and reason in caplog.text
    ex = _builder(tok)(record)
    assert len(ex["ids"]) == 0 and int(ex["skipped_records"]) == 1


def test_undecodable_videos_skip_their_record(tmp_path, tok, caplog):
    """Found only when decoding, in the example builder: skipped, counted, the file named."""
    (tmp_path / "junk.mp4").write_bytes(b"not a video, " * 200)
    path = _write_jsonl(tmp_path / "v.jsonl", [
        {"video": "junk.mp4", "caption": "x"},
        {"video": "junk.mp4", "conversations": [{"from": "human", "value": "<video>?"},
                                                {"from": "gpt", "value": "No."}]}])
    for i in range(2):
        record = open_jsonl([path], "caption")[i]
        assert not record.get("error")  # the file exists: the reader cannot tell
        caplog.clear()
        ex = _builder(tok)(record)
        assert len(ex["ids"]) == 0 and int(ex["skipped_records"]) == 1
        assert f"{path}:{i + 1}, video {tmp_path}/junk.mp4" in caplog.text and "cannot open video" in caplog.text
    # A frame that breaks after the folder was listed: named by its path.
    _write_frames(tmp_path / "frames", 2)
    frames = video.list_frames(str(tmp_path / "frames"))
    (tmp_path / "frames" / "f2.png").write_bytes(b"not a png")
    ex = _builder(tok, video_frames=2)({"stream": "caption", "origin": "o:1",
                                        "segments": [{"video": frames}, {"text": "x"}]})
    assert int(ex["skipped_records"]) == 1 and f"{tmp_path}/frames/f2.png" in caplog.text


def test_video_segments_survive_the_byte_encoding(tmp_path):
    _write_frames(tmp_path / "frames", 2)
    record = {"stream": "interleaved", "origin": "o", "segments": [
        {"video": video.list_frames(str(tmp_path / "frames")), "fps": 2.0, "role": "user"},
        {"video": b"\x00\x01", "role": "user"}, {"video": "/data/a.mp4", "role": "user"},
        {"text": "Yes.", "role": "assistant"}]}
    assert decode_record(encode_record(record))["segments"] == record["segments"]


def test_video_conversations_through_the_pipeline(tmp_path, tok):
    """Video conversations on the interleaved stream: packed with their frames,
    loss only on the answers."""
    _write_video(tmp_path / "clip.mp4")
    _write_frames(tmp_path / "frames")
    docs = [{"video": v, "fps": FPS, "conversations": [{"from": "human", "value": "<video>\nWhat is it?"},
                                                       {"from": "gpt", "value": "Colours."}]}
            for v in ("clip.mp4", "frames")]
    c = small_config().data
    c.sources.interleaved = f"jsonl:{_write_jsonl(tmp_path / 'v.jsonl', docs)}"
    c.mix_weights, c.pack_window, c.max_images, c.video_frames = (0.0, 1.0, 0.0), 4, 4, 3
    batch = next(iter(make_dataset(c, tok, batch_size=2)))
    assert batch["skipped_records"].sum() == 0 and batch["num_examples"].sum() >= 2
    for b in range(2):
        assert batch["image_mask"][b].sum() == 3 * batch["num_examples"][b]
        for seg in range(1, batch["num_examples"][b] + 1):
            where = (batch["segment_ids"][b] == seg) & (batch["loss_mask"][b] > 0)
            assert tok.decode(batch["targets"][b][where][:-1]) == "Colours."
