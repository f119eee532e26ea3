"""ArrayRecord shards of msgpack-encoded raw records (`mmjax.data.records.encode_record`).

`write_array_record` writes such a shard; `open_array_record` reads a list of
shards as one random-access `grain.MapDataset` of raw records. Element access
never raises: a record that cannot be read or decoded becomes a
`bad_record` placeholder with origin "<shard path>:<index within shard>".
Shards that cannot be opened at all are skipped with a warning.
"""

from __future__ import annotations

import bisect
import dataclasses
import os
from collections.abc import Iterable, Sequence

import grain

from mmjax.data.records import STREAMS, DataError, bad_record, decode_record, encode_record, warn_bad_input


@dataclasses.dataclass(frozen=True)
class _WholeFile:
    """A read instruction covering a whole shard whose record count is already
    known, so the Grain source does not open every shard a second time."""

    filename: str
    skip: int
    take: int
    examples_in_shard: int


def _array_record_module():
    from array_record.python import array_record_module

    return array_record_module


def _probe(path: str) -> int | str:
    """Number of records in the shard at `path`, or a one-line reason why it
    cannot be read."""
    module = _array_record_module()
    try:
        reader = module.ArrayRecordReader(path)
    except Exception as err:  # noqa: BLE001 - any failure to open means "unreadable"
        return f"{type(err).__name__}: {err}"
    if not reader.ok():
        # A failed reader reports its error when it is closed.
        try:
            reader.close()
        except Exception as err:  # noqa: BLE001
            return str(err) or type(err).__name__
        return "not a readable ArrayRecord file"
    try:
        return int(reader.num_records())
    finally:
        reader.close()


class _RecordSource:
    """Random access over several shards, decoding each record; picklable (the
    Grain ArrayRecord source reopens its readers lazily after unpickling)."""

    def __init__(self, files: Sequence[tuple[str, int]], stream: str):
        self._stream = stream
        self._paths = [path for path, _ in files]
        self._ends: list[int] = []
        total = 0
        for _, count in files:
            total += count
            self._ends.append(total)
        self._source = grain.sources.ArrayRecordDataSource(
            [_WholeFile(path, 0, count, count) for path, count in files])

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def _origin(self, index: int) -> str:
        shard = bisect.bisect_right(self._ends, index)
        start = self._ends[shard - 1] if shard else 0
        return f"{self._paths[shard]}:{index - start}"

    def __getitem__(self, index) -> dict:
        index = index.__index__()
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range for {len(self)} records")
        origin = self._origin(index)
        try:
            data = self._source[index]
        except Exception as err:  # noqa: BLE001 - corrupt chunk, I/O error
            return bad_record(self._stream, origin, f"unreadable record ({type(err).__name__}: {err})")
        try:
            record = decode_record(data, origin)
        except ValueError as err:
            return bad_record(self._stream, origin, str(err))
        if record["stream"] != self._stream:
            return bad_record(self._stream, origin, f"record of stream {record['stream']} in a {self._stream} source")
        return record

    def __repr__(self) -> str:
        return f"ArrayRecordRecords({len(self._paths)} shards, {len(self)} {self._stream} records)"


def open_array_record(paths: list[str], stream: str) -> grain.MapDataset:
    """All records of the ArrayRecord shards `paths`, in order, as raw records
    of `stream`.

    Each shard is opened once here to count its records; a shard that cannot
    be opened (missing, not an ArrayRecord file, truncated) is skipped with a
    warning. Raises `DataError` when no shard is readable.
    """
    if stream not in STREAMS:
        raise DataError(f"unknown stream {stream!r}; expected one of {', '.join(STREAMS)}")
    if not paths:
        raise DataError(f"no ArrayRecord files given for the {stream} stream")
    files: list[tuple[str, int]] = []
    for path in paths:
        path = os.fspath(path)
        probed = _probe(path)
        if isinstance(probed, str):
            warn_bad_input(path, f"cannot open ArrayRecord file ({probed})")
        else:
            files.append((path, probed))
    if not files:
        raise DataError(f"none of the ArrayRecord files for the {stream} stream can be read: {', '.join(paths)}")
    return grain.MapDataset.source(_RecordSource(files, stream))


def write_array_record(path: str, records: Iterable[dict | bytes], group_size: int = 1) -> int:
    """Writes raw records (encoded with `encode_record`; `bytes` are written
    as they are) to one ArrayRecord shard at `path`; returns how many were
    written. Group size 1 gives the fastest random access."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)
    writer = _array_record_module().ArrayRecordWriter(os.fspath(path), f"group_size:{group_size}")
    count = 0
    try:
        for record in records:
            writer.write(record if isinstance(record, bytes) else encode_record(record))
            count += 1
    finally:
        writer.close()
    return count
