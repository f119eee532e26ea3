"""JSONL files -> a Grain random-access source of raw records.

One JSON object per line; blank lines are skipped. `open_jsonl` indexes line
start offsets once (one binary pass per file), so reading record `i` is one
`pread` of its line. Per stream:
  text         {"text": str} -> [text] (verbatim).
  caption      {"caption" or "text": str, "image": path} -> [image, text]; the
               text is stripped of surrounding whitespace and `path` is relative
               to the JSONL file's directory (absolute paths work too). The image
               file's bytes are read as they are (decoding happens later).
  interleaved  {"segments": [{"text": s} | {"image": path}, ...]} (or parallel
               "texts"/"images" lists) -> the segments in order, images read as
               above; empty/whitespace-only texts are skipped.
A line that is not a JSON object, lacks a field, or names an image file that
is missing comes back as `bad_record(...)` with origin `path:line` (1-based).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import grain
import numpy as np

from mmjax.data.readers.webdataset import OpenFiles, interleaved_segments, usable_text
from mmjax.data.records import STREAMS, DataError, bad_record

__all__ = ["JsonlSource", "open_jsonl"]

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


class JsonlSource:
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

    def __len__(self) -> int:
        return len(self._starts)

    def __repr__(self) -> str:
        return f"JsonlSource({len(self.paths)} files, {len(self)} records, stream={self.stream!r})"

    def __getitem__(self, index) -> dict:
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} records")
        file = int(np.searchsorted(self._file_first, index, side="right")) - 1
        path = self.paths[file]
        origin = f"{path}:{int(self._lines[index])}"
        start = int(self._starts[index])
        next_file_first = int(self._file_first[file + 1]) if file + 1 < len(self._file_first) else len(self)
        stop = int(self._file_size[file]) if index + 1 == next_file_first else int(self._starts[index + 1])
        try:
            line = self._files.read(file, start, stop - start)
            try:
                doc = json.loads(line)
            except ValueError as err:
                raise ValueError(f"bad JSON ({err})") from None
            if not isinstance(doc, dict):
                raise TypeError("the line is not a JSON object")
            segments = self._segments(doc, os.path.dirname(path))
        except (ValueError, TypeError, OSError, RecursionError) as err:
            return bad_record(self.stream, origin, str(err) or type(err).__name__)
        return {"stream": self.stream, "segments": segments, "origin": origin}

    def _segments(self, doc: dict, directory: str) -> list[dict]:
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


def _read_image(directory: str, ref: str) -> bytes:
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
