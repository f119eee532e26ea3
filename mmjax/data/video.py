"""Videos as frames (MM1.5-Video): a video segment -> N uniformly sampled
frames, each an image in the sequence preceded by its time marker.

Raw video segments (see `mmjax.data.records`; made by the JSON/JSONL readers
with `reference_segment`, expanded by the example builder with `FrameSampler`):

  {"video": path | bytes}               a video file: its path (resolved by the
                                        reader) or its encoded bytes
  {"video": [path | bytes, ...],        a video as its frames, in order: image
   "fps": float}                        files or encoded images; `fps` optional
                                        (else `data.video_fps`)

plus `"role"` inside a conversation. The readers check what needs no decoding
(the file exists and is not empty; a folder holds image files, listed in
name order with numbers compared by value: `f2.png` before `f10.png`), so a
record names its video by reference and only the sampled frames are ever
decoded, in the example builder.

Sampling: a video of `D` seconds gives `N` frames at
`t_i = (i + 0.5) * D / N`, `i = 0..N-1` (the middles of `N` equal intervals);
frame `i` is the one on screen at `t_i`. Frames of a folder: frame `k` is shown
during `[k / fps, (k + 1) / fps)`, `D = count / fps`. A file is decoded with
PyAV (ffmpeg comes inside its wheels): `D` is the video stream's duration
(else the container's, else the end of its last packet), times count from the
stream's start, and the frame shown at `t` is the last one whose presentation
time is `<= t` (the first one when none is); a stream without timestamps (a
raw elementary stream) is refused as undecodable.

In the example each frame is `time_marker(t_i)` (text, loss weight 0)
followed by its `tokens_per_image` image slots; frames are never split into
tiles:

  ... t=0.4s: <image>*K t=1.1s: <image>*K ... t=2.6s: <image>*K <text that follows>

`N` = min(`data.video_frames`, image slots left in the example, the most
frames whose slots and markers fit in the tokens left), where what follows
the video in the record (its text, one image per later image, one frame per
later video, the closing `<eos>`) keeps its room first; when that leaves no
frame, one frame is still taken if it fits at all. No free image slot or no
room for one frame drops the video like an image (`dropped_images`).
"""

from __future__ import annotations

import io
import math
import os
import re
from collections.abc import Callable, Sequence

import numpy as np

from mmjax.data import images as image_ops

FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
_SEEK_GAP = 2.0  # seconds: a later frame further than this past the last decoded one is reached by seeking
_DIGITS = re.compile(r"(\d+)")


def time_marker(t: float) -> str:
    """The text before the frame shown at `t` seconds: `"t=1.5s: "`."""
    return f"t={t:.1f}s: "


def sample_times(duration: float, n: int) -> np.ndarray:
    """`n` uniform sampling times (float64 `[n]`, seconds): `(i + 0.5) * duration / n`."""
    return (np.arange(n, dtype=np.float64) + 0.5) * (float(duration) / max(n, 1))


def frame_count(max_frames: int, free_images: int, room: int, tokens_per_image: int,
                marker_tokens: Callable[[int], int]) -> int:
    """The largest `n <= min(max_frames, free_images)` whose `n * tokens_per_image`
    slots and `marker_tokens(n)` marker tokens fit in `room` tokens; 0 if none."""
    n = min(max_frames, free_images, room // (tokens_per_image + 1))  # a marker has at least one token
    while n > 0 and n * tokens_per_image + marker_tokens(n) > room:
        n -= 1
    return max(n, 0)


def describe(seg: dict) -> str:
    """A short name of a video segment's source for warnings."""
    source = seg["video"]
    if isinstance(source, (list, tuple)):
        first = next((f for f in source if isinstance(f, str)), None)
        where = f"frames in {os.path.dirname(first) or '.'}" if first else "frames"
        return f"{where} ({len(source)} frames)"
    return source if isinstance(source, str) else f"<{len(source)} bytes of video>"


def _natural_key(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in _DIGITS.split(name)]


def list_frames(folder: str) -> list[str]:
    """The image files of `folder` (`FRAME_EXTENSIONS`, any case), sorted by
    name with numbers compared by value. Raises `ValueError` if there are none."""
    try:
        names = [n for n in os.listdir(folder) if n.lower().endswith(FRAME_EXTENSIONS)
                 and os.path.isfile(os.path.join(folder, n))]
    except OSError as err:
        raise ValueError(f"cannot list frame folder {folder} ({err.strerror or err})") from None
    if not names:
        raise ValueError(f"frame folder {folder} holds no image files ({', '.join(FRAME_EXTENSIONS)})")
    return [os.path.join(folder, n) for n in sorted(names, key=_natural_key)]


def check_fps(fps) -> float | None:
    """A record's `fps` (None or a positive finite number) -> float or None;
    raises `ValueError` otherwise."""
    if fps is None:
        return None
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"'fps' {fps!r} is not a positive number")
    return float(fps)


def reference_segment(ref, directory: str, fps=None) -> dict:
    """A record's video reference -> raw video segment (see module doc),
    checked without decoding. `ref` is a path relative to `directory` (or
    absolute): a folder gives its frames (with `fps` when given), a file its
    path. Raises `ValueError` naming the path when it is missing, unreadable,
    empty, or a folder without image files."""
    if not isinstance(ref, str) or not ref:
        raise ValueError(f"video reference {ref!r} is not a non-empty path")
    fps = check_fps(fps)
    path = os.path.join(directory, ref)
    if os.path.isdir(path):
        return {"video": list_frames(path), **({"fps": fps} if fps is not None else {})}
    try:
        size = os.path.getsize(path)
        if not os.access(path, os.R_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as err:
        raise ValueError(f"cannot read video {path} ({err.strerror or err})") from None
    if size == 0:
        raise ValueError(f"video file {path} is empty")
    return {"video": path}


class FrameSampler:
    """Expands video segments into frames and time markers for the example
    builder (see module doc)."""

    def __init__(self, encode: Callable[[str], list[int]], max_frames: int, default_fps: float,
                 tokens_per_image: int, image_size: int):
        if max_frames < 1:
            raise ValueError(f"video_frames must be >= 1, got {max_frames}")
        self.encode, self.max_frames = encode, int(max_frames)
        self.default_fps = check_fps(default_fps)
        self.tokens_per_image, self.image_size = tokens_per_image, image_size

    def later_need(self, pieces: Sequence[tuple[str, object]]) -> tuple[int, int]:
        """(tokens, images) the pieces after a video need at least: `pieces`
        are ("text", str) (tokenized), ("eos", _) (1), or ("image", segment)
        (one image's slots; a video's one frame and its marker)."""
        tokens = images = 0
        for kind, value in pieces:
            if kind == "text":
                tokens += len(self.encode(value))
            elif kind == "eos":
                tokens += 1
            else:
                images += 1
                tokens += self.tokens_per_image + int(isinstance(value, dict) and "video" in value)
        return tokens, images

    def sample(self, seg: dict, free_images: int, room: int,
               later: tuple[int, int] = (0, 0)) -> tuple[list[list[int]], np.ndarray]:
        """A video segment -> (marker ids per frame, uint8 `[N, T, T, 3]` frames),
        `N` as in the module doc for an example with `free_images` image slots
        and `room` tokens left, of which `later` = (tokens, images) go to what
        follows the video; `N` = 0 (no markers, empty frames) when not even one
        frame fits. Raises `ValueError` if the video cannot be read or decoded."""
        K, T = self.tokens_per_image, self.image_size
        with open_clip(seg, self.default_fps) as clip:
            duration = clip.duration

            def marker_tokens(n: int) -> int:
                return sum(len(self.encode(time_marker(t))) for t in sample_times(duration, n))

            n = frame_count(self.max_frames, free_images - later[1], room - later[0], K, marker_tokens)
            n = n or frame_count(1, free_images, room, K, marker_tokens)
            if n == 0:
                return [], np.zeros((0, T, T, 3), np.uint8)
            times = sample_times(duration, n)
            frames = clip.read(times, T)
        return [self.encode(time_marker(t)) for t in times], frames


def open_clip(seg: dict, default_fps: float | None = None) -> "FrameList | VideoFile":
    """A raw video segment -> an open clip (`duration` in seconds, `read(times,
    size)` -> uint8 `[n, size, size, 3]`), to be used in a `with` block.
    Raises `ValueError` if it cannot be opened."""
    source = seg["video"]
    if isinstance(source, (list, tuple)):
        fps = check_fps(seg.get("fps")) or default_fps
        if fps is None:
            raise ValueError("frames without 'fps' and no default frame rate")
        return FrameList(list(source), fps)
    if isinstance(source, (str, bytes, bytearray, memoryview)):
        return VideoFile(source)
    raise ValueError(f"'video' is a {type(source).__name__}, not a path, bytes or a list of frames")


class FrameList:
    """A video given as its frames (paths or encoded images) at `fps`."""

    def __init__(self, frames: list, fps: float):
        if not frames:
            raise ValueError("the video has no frames")
        self.frames, self.fps = frames, float(fps)
        self.duration = len(frames) / self.fps

    def __enter__(self) -> "FrameList":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def indices(self, times: np.ndarray) -> np.ndarray:
        """int64 `[n]`: the frame shown at each time (seconds)."""
        return np.clip(np.floor(np.asarray(times) * self.fps).astype(np.int64), 0, len(self.frames) - 1)

    def read(self, times: np.ndarray, size: int) -> np.ndarray:
        """The frames shown at `times` -> uint8 `[n, size, size, 3]`; raises
        `ValueError` naming a frame that cannot be read or decoded."""
        out = np.empty((len(times), size, size, 3), np.uint8)
        for j, k in enumerate(self.indices(times)):
            frame = self.frames[k]
            name = frame if isinstance(frame, str) else f"frame {k}"
            try:
                if isinstance(frame, str):
                    with open(frame, "rb") as f:
                        frame = f.read()
                out[j] = image_ops.decode_and_resize(bytes(frame), size)
            except OSError as err:
                raise ValueError(f"cannot read {name} ({err.strerror or err})") from None
            except (ValueError, TypeError) as err:
                raise ValueError(f"{name}: {err}") from None
        return out


class VideoFile:
    """A video file (path or encoded bytes) decoded with PyAV; its first video stream."""

    def __init__(self, source):
        import av

        self._av = av
        try:
            self.container = av.open(source if isinstance(source, str) else io.BytesIO(bytes(source)))
        except Exception as err:  # PyAV raises its own error types and OSError
            raise ValueError(f"cannot open video: {str(err) or type(err).__name__}") from None
        try:
            if not self.container.streams.video:
                raise ValueError("no video stream")
            self.stream = self.container.streams.video[0]
            self.stream.thread_type = "AUTO"
            base = self.stream.time_base
            self.start = float(self.stream.start_time * base) if self.stream.start_time is not None else 0.0
            self.duration = self._duration()
        except Exception as err:
            self.container.close()
            raise ValueError(f"cannot read video: {str(err) or type(err).__name__}") from None

    def __enter__(self) -> "VideoFile":
        return self

    def __exit__(self, *exc) -> None:
        self.container.close()

    def _duration(self) -> float:
        s, base = self.stream, self.stream.time_base
        if s.duration and base:
            return float(s.duration * base)
        if self.container.duration:
            return self.container.duration / self._av.time_base
        end = None
        for packet in self.container.demux(s):
            if packet.pts is not None:
                stop = float((packet.pts + (packet.duration or 0)) * packet.time_base)
                end = stop if end is None else max(end, stop)
        if end is None or end <= self.start:
            raise ValueError("no timed video frames")
        return end - self.start

    def _frames_from(self, t: float):
        """Decoded frames with a time, from the keyframe at or before `t` (seconds from the start)."""
        target = self.start + t
        self.container.seek(max(int(target / self.stream.time_base), 0), stream=self.stream, backward=True)
        return (f for f in self.container.decode(self.stream) if f.time is not None)

    def read(self, times: np.ndarray, size: int) -> np.ndarray:
        """The frames shown at ascending `times` (seconds from the start) ->
        uint8 `[n, size, size, 3]`. Decodes forward, seeking when the next
        time is more than `_SEEK_GAP` past the last frame decoded. Raises
        `ValueError` if the stream cannot be decoded."""
        out = np.empty((len(times), size, size, 3), np.uint8)
        decoded = shown = upcoming = None
        for j, t in enumerate(np.asarray(times, np.float64)):
            target = self.start + float(t)
            try:
                if decoded is None or (shown is not None and target - shown.time > _SEEK_GAP):
                    decoded = self._frames_from(float(t))
                    shown, upcoming = None, next(decoded, None)
                while upcoming is not None and (shown is None or upcoming.time <= target):
                    shown, upcoming = upcoming, next(decoded, None)
                pixels = None if shown is None else shown.to_ndarray(format="rgb24")
            except Exception as err:  # PyAV's decoding errors
                raise ValueError(f"cannot decode video: {str(err) or type(err).__name__}") from None
            if pixels is None:
                raise ValueError(f"no frame decoded at {t:.2f}s")
            out[j] = image_ops.resize(pixels, (size, size))
        return out
