"""JSONL and JSON files -> Grain random-access sources of raw records.

JSONL (`jsonl:`): one JSON object per line; blank lines are skipped.
`open_jsonl` indexes line start offsets once (one binary pass per file), so
reading record `i` is one `pread` of its line. JSON (`json:`): one top-level
array of objects per file (LLaVA's layout); `open_json` indexes each
element's byte span once, so reading element `i` is one `pread` too.
Per stream:
  text         {"text": str} -> [text] (verbatim).
  caption      {"caption" or "text": str, "image": path} -> [image, text]; the
               text is stripped of surrounding whitespace and `path` is relative
               to the file's directory (absolute paths work too). The image
               file's bytes are read as they are (decoding happens later).
  interleaved  {"segments": [{"text": s} | {"image": path}, ...]} (or parallel
               "texts"/"images" lists) -> the segments in order, images read as
               above; empty/whitespace-only texts are skipped.
  any stream   {"conversations": [...], "image"/"images": path(s)} -> role-tagged
               segments (`mmjax.data.readers.conversation`), images read as above;
               with "video"/"videos": path(s) and `<video>` placeholders, each
               video becomes a video segment (`mmjax.data.video.reference_segment`:
               a file stays a path, a folder becomes its sorted frame paths, with
               the object's optional "fps").
  any stream   {"video": path, "caption" or "text": str, "fps": optional} -> [video, text]
               (text stripped), the video as above; frames are sampled later, in
               the example builder.
A line or element that is not a JSON object, lacks a field, or names an image
or video file that is missing (or an empty video file or frame folder) comes back as `bad_record(...)` with origin `path:line`
(1-based) for JSONL, `path:index` (0-based element) for JSON. A JSON array
that breaks off or turns malformed keeps every element before the damage; the
rest is one extra index that reads as a bad record.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import grain
import numpy as np

from mmjax.data import video
from mmjax.data.readers.conversation import conversation_segments, is_conversation
from mmjax.data.readers.webdataset import OpenFiles, interleaved_segments, usable_text
from mmjax.data.records import STREAMS, DataError, bad_record, warn_bad_input

__all__ = ["JsonSource", "JsonlSource", "open_json", "open_jsonl"]

_CHUNK = 1 << 22  # bytes read at a time while indexing
_SPACE = np.zeros(256, bool)
_SPACE[[9, 10, 11, 12, 13, 32]] = True


def _index_lines(path: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(start offsets, 1-based line numbers, file size) of the non-blank lines."""
    if os.path.isdir(path):
        raise DataError(f"jsonl: {path} is a directory, not a JSONL file.")
    starts: list[np.ndarray] = []
    numbers: list[np.ndarray] = []
    try:
        with open(path, "rb", buffering=0) as f:
            offset = 0  # file offset of the current chunk
            line_start, line_has_text = 0, False  # the line in progress at the chunk start
            lines_before = 0  # newlines before the current chunk
            while chunk := f.read(_CHUNK):
                a = np.frombuffer(chunk, np.uint8)
                newlines = np.flatnonzero(a == 10)
                text_count = np.zeros(len(a) + 1, np.int32)  # non-whitespace bytes in a[:k]
                np.cumsum(~_SPACE[a], out=text_count[1:])
                lo = np.concatenate([[0], newlines[:-1] + 1]) if len(newlines) else np.zeros(0, np.int64)
                has_text = text_count[newlines] > text_count[lo]
                line_starts = offset + lo
                if len(newlines):
                    has_text[0] |= line_has_text
                    line_starts[0] = line_start
                    keep = np.flatnonzero(has_text)
                    starts.append(line_starts[keep])
                    numbers.append(lines_before + keep + 1)
                    tail = int(newlines[-1]) + 1
                    line_start = offset + tail
                    line_has_text = bool(text_count[-1] > text_count[tail])
                else:
                    line_has_text |= bool(text_count[-1] > 0)
                lines_before += len(newlines)
                offset += len(chunk)
            if line_has_text:  # a last line without a newline
                starts.append(np.asarray([line_start], np.int64))
                numbers.append(np.asarray([lines_before + 1], np.int64))
    except OSError as err:
        raise DataError(f"jsonl: cannot read {path} ({err.strerror or err}).") from None
    if not starts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), offset
    return np.concatenate(starts).astype(np.int64), np.concatenate(numbers).astype(np.int64), offset


class _JsonObjects:
    """One JSON object's bytes -> raw record of `self.stream` (shared by the
    JSONL and JSON sources)."""

    paths: list[str]
    stream: str
    _starts: np.ndarray  # per record: its first byte

    def __len__(self) -> int:
        return len(self._starts)

    def _position(self, index) -> int:
        """`index` (negative counts from the end) checked against the records."""
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} records")
        return index

    def _record(self, data: bytes, origin: str, directory: str) -> dict:
        try:
            try:
                doc = json.loads(data)
            except ValueError as err:
                raise ValueError(f"bad JSON ({err})") from None
            if not isinstance(doc, dict):
                raise TypeError("not a JSON object")
            segments = self._segments(doc, directory)
        except (ValueError, TypeError, OSError, RecursionError) as err:
            return bad_record(self.stream, origin, str(err) or type(err).__name__)
        return {"stream": self.stream, "segments": segments, "origin": origin}

    def _segments(self, doc: dict, directory: str) -> list[dict]:
        if is_conversation(doc):
            return conversation_segments(doc, lambda refs: [_read_image(directory, ref) for ref in refs],
                                         lambda refs: [video.reference_segment(ref, directory, doc.get("fps"))
                                                       for ref in refs])
        if doc.get("video") is not None:
            text = next((doc[f] for f in ("caption", "text") if usable_text(doc.get(f))), None)
            if text is None:
                raise ValueError("no 'caption' or 'text' string")
            return [video.reference_segment(doc["video"], directory, doc.get("fps")), {"text": text.strip()}]
        if self.stream == "text":
            if not usable_text(doc.get("text")):
                raise ValueError("no 'text' string")
            return [{"text": doc["text"]}]
        if self.stream == "interleaved":
            return interleaved_segments(doc, lambda ref: _read_image(directory, ref))
        text = next((doc[f] for f in ("caption", "text") if usable_text(doc.get(f))), None)
        if text is None:
            raise ValueError("no 'caption' or 'text' string")
        image = doc.get("image")
        if not isinstance(image, str) or not image:
            raise ValueError("no 'image' path")
        data = _read_image(directory, image)
        if not data:
            raise ValueError(f"image file {image!r} is empty")
        return [{"image_bytes": data}, {"text": text.strip()}]


class JsonlSource(_JsonObjects):
    """Random-access source over JSONL files (see the module doc).

    Index, all numpy: each record's line start offset and line number, and
    each file's first record and size; a line is read up to the next record's
    start (or the end of its file).
    """

    def __init__(self, paths: Sequence[str], stream: str):
        if stream not in STREAMS:
            raise DataError(f"unknown stream {stream!r}; expected one of {STREAMS}.")
        self.paths = list(paths)
        self.stream = stream
        starts, numbers, first, sizes = [], [], [], []
        count = 0
        for path in self.paths:
            s, n, size = _index_lines(path)
            first.append(count)
            sizes.append(size)
            starts.append(s)
            numbers.append(n)
            count += len(s)
        if not count:
            raise DataError(f"jsonl: no records in {self.paths}.")
        self._starts = np.concatenate(starts)
        self._lines = np.concatenate(numbers)
        self._file_first = np.asarray(first, np.int64)
        self._file_size = np.asarray(sizes, np.int64)
        self._files = OpenFiles(self.paths)


    def __repr__(self) -> str:
        return f"JsonlSource({len(self.paths)} files, {len(self)} records, stream={self.stream!r})"

    def __getitem__(self, index) -> dict:
        index = self._position(index)
        file = int(np.searchsorted(self._file_first, index, side="right")) - 1
        path = self.paths[file]
        origin = f"{path}:{int(self._lines[index])}"
        start = int(self._starts[index])
        next_file_first = int(self._file_first[file + 1]) if file + 1 < len(self._file_first) else len(self)
        stop = int(self._file_size[file]) if index + 1 == next_file_first else int(self._starts[index + 1])
        try:
            line = self._files.read(file, start, stop - start)
        except OSError as err:
            return bad_record(self.stream, origin, str(err) or type(err).__name__)
        return self._record(line, origin, os.path.dirname(path))


def _index_array(path: str) -> tuple[np.ndarray, np.ndarray, tuple[int, str] | None]:
    """(start, stop) byte offsets of each element of the top-level JSON array
    in `path`, and (byte, reason) where the array breaks off or turns
    malformed (None for a whole array). Raises `DataError` for a file that is
    not a JSON array at all."""
    if os.path.isdir(path):
        raise DataError(f"json: {path} is a directory, not a JSON file.")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise DataError(f"json: cannot read {path} ({err.strerror or err}).") from None
    # Latin-1 maps each byte to one character, so string positions are byte
    # offsets; JSON's structure is ASCII, so element boundaries come out right.
    text = data.decode("latin-1")
    decoder = json.JSONDecoder()
    pos = _skip_space(text, 3 if data.startswith(b"\xef\xbb\xbf") else 0)
    if not text.startswith("[", pos):
        raise DataError(f"json: {path} does not hold a JSON array (it starts with {text[pos:pos + 20]!r}); "
                        "a file of one object per line is read with jsonl:.")
    starts: list[int] = []
    stops: list[int] = []
    pos = _skip_space(text, pos + 1)
    if text.startswith("]", pos):
        return np.zeros(0, np.int64), np.zeros(0, np.int64), None
    while True:
        try:
            _, end = decoder.raw_decode(text, pos)
        except ValueError as err:
            return np.asarray(starts, np.int64), np.asarray(stops, np.int64), (pos, f"bad JSON ({err})")
        starts.append(pos)
        stops.append(end)
        pos = _skip_space(text, end)
        if text.startswith(",", pos):
            pos = _skip_space(text, pos + 1)
        elif text.startswith("]", pos):
            return np.asarray(starts, np.int64), np.asarray(stops, np.int64), None
        else:
            reason = "the array ends without ']'" if pos >= len(text) else f"expected ',' or ']' at byte {pos}"
            return np.asarray(starts, np.int64), np.asarray(stops, np.int64), (pos, reason)


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


class JsonSource(_JsonObjects):
    """Random-access source over files each holding one JSON array of objects
    (see the module doc).

    Index, all numpy: each element's byte span and each file's first element;
    a damaged array adds one tail entry that reads as a bad record.
    """

    def __init__(self, paths: Sequence[str], stream: str):
        if stream not in STREAMS:
            raise DataError(f"unknown stream {stream!r}; expected one of {STREAMS}.")
        self.paths = list(paths)
        self.stream = stream
        starts, stops, first = [], [], []
        self._tails: dict[int, tuple[str, str]] = {}
        count = 0
        for path in self.paths:
            first.append(count)
            a, b, damage = _index_array(path)
            if damage is not None:
                at, reason = damage
                reason = f"{reason}; the {len(a)} elements before byte {at} are kept, the rest is lost"
                warn_bad_input(path, reason + " (counted as one bad record)")
                self._tails[count + len(a)] = (f"{path}:<tail after byte {at}>", reason)
                a, b = np.append(a, -1), np.append(b, -1)
            starts.append(a)
            stops.append(b)
            count += len(a)
        if not count:
            raise DataError(f"json: no records in {self.paths}.")
        self._starts = np.concatenate(starts)
        self._stops = np.concatenate(stops)
        self._file_first = np.asarray(first, np.int64)
        self._files = OpenFiles(self.paths)


    def __repr__(self) -> str:
        return f"JsonSource({len(self.paths)} files, {len(self)} records, stream={self.stream!r})"

    def __getitem__(self, index) -> dict:
        index = self._position(index)
        if index in self._tails:
            origin, reason = self._tails[index]
            return bad_record(self.stream, origin, reason)
        file = int(np.searchsorted(self._file_first, index, side="right")) - 1
        path = self.paths[file]
        origin = f"{path}:{index - int(self._file_first[file])}"
        start = int(self._starts[index])
        try:
            data = self._files.read(file, start, int(self._stops[index]) - start)
        except OSError as err:
            return bad_record(self.stream, origin, str(err) or type(err).__name__)
        return self._record(data, origin, os.path.dirname(path))


def _read_image(directory: str, ref) -> bytes:
    if not isinstance(ref, str) or not ref:
        raise ValueError(f"image reference {ref!r} is not a non-empty path")
    path = os.path.join(directory, ref)
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise ValueError(f"cannot read image {path} ({err.strerror or err})") from None


def open_jsonl(paths: list[str], stream: str) -> grain.MapDataset:
    """A MapDataset of raw `stream` records, one per non-blank line of the JSONL
    files `paths` (in order). Raises `DataError` if a file cannot be read or
    there are no records."""
    return grain.MapDataset.source(JsonlSource(paths, stream))


def open_json(paths: list[str], stream: str) -> grain.MapDataset:
    """A MapDataset of raw `stream` records, one per element of the top-level
    JSON array of each file in `paths` (in order). Raises `DataError` if a
    file cannot be read or holds no array, or there are no records."""
    return grain.MapDataset.source(JsonSource(paths, stream))
