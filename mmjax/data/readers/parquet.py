"""Parquet files (as written by Hugging Face `datasets` and similar tools) as a
sequential `grain.IterDataset` of raw records.

Expected columns per stream:

  "text":        `text` (string)
  "caption":     `image` (binary, or a struct with a `bytes` field) and
                 `caption` or `text` (string; `caption` wins when both exist)
  "interleaved": `texts` (list<string>) and `images` (list<binary | struct
                 with `bytes`), OBELICS style: at every position exactly one
                 of the two is non-null.

  any stream:    `conversations` (list<struct<from: string, value: string>>)
                 marks a file of LLaVA-style conversations, with optional
                 `image` (as above) or `images` (list of those) and
                 `regions` (list<struct>: `box`, `image`, `mask` as RLE struct
                 or mask image bytes); each row becomes role-tagged segments
                 (`mmjax.data.readers.conversation`).

Images stay encoded (`image_bytes`). A row with nulls where a value is
required becomes a `bad_record` with origin "<file>:<row>".

Each process reads its own files (`paths[process_index::process_count]`);
every epoch visits them in a fresh order derived from `seed`, reading up to
`cycle_length` files at once (rows alternate between them). The iterator
state (`get_state` / `set_state`) covers the file order, the open files and
the row within each.
"""

from __future__ import annotations

import functools
import os

import grain

from mmjax.data.readers.conversation import conversation_segments
from mmjax.data.records import STREAMS, DataError, bad_record, warn_bad_input

_CAPTION_TEXT_COLUMNS = ("caption", "text")


def _is_image_type(pa, dtype) -> bool:
    if pa.types.is_binary(dtype) or pa.types.is_large_binary(dtype):
        return True
    return pa.types.is_struct(dtype) and dtype.get_field_index("bytes") >= 0 and _is_image_type(
        pa, dtype.field("bytes").type)


def _is_text_type(pa, dtype) -> bool:
    return pa.types.is_string(dtype) or pa.types.is_large_string(dtype)


def _is_list_of(pa, dtype, check) -> bool:
    return (pa.types.is_list(dtype) or pa.types.is_large_list(dtype)) and check(pa, dtype.value_type)


def _is_turn_list(pa, dtype) -> bool:
    def is_turn(pa, item) -> bool:
        return pa.types.is_struct(item) and all(
            item.get_field_index(f) >= 0 and _is_text_type(pa, item.field(f).type) for f in ("from", "value"))
    return _is_list_of(pa, dtype, is_turn)


def _columns_for(path: str, stream: str, schema) -> dict[str, str]:
    """The columns `stream` reads from a file with `schema` ({role: column
    name}); raises `DataError` naming the file and its columns when they are
    missing or of the wrong type."""
    import pyarrow as pa

    types = {field.name: field.type for field in schema}
    found = ", ".join(f"{name}: {dtype}" for name, dtype in types.items()) or "none"

    def need(column: str, check, what: str) -> str:
        if column not in types:
            raise DataError(f"{path} has no column {column!r} needed by the {stream} stream (columns: {found})")
        if not check(pa, types[column]):
            raise DataError(f"{path}: column {column!r} is {types[column]}, expected {what}")
        return column

    if "conversations" in types:
        columns = {"conversations": need("conversations", _is_turn_list, "list<struct<from: string, value: "
                                                                         "string>>")}
        if "image" in types and "images" in types:
            raise DataError(f"{path} has both an 'image' and an 'images' column; a conversation file has one")
        if "image" in types:
            columns["image"] = need("image", _is_image_type, "binary or struct<bytes: binary>")
        if "images" in types:
            columns["images"] = need("images", functools.partial(_is_list_of, check=_is_image_type),
                                     "list<binary> or list<struct<bytes: binary>>")
        if "regions" in types:
            is_struct = functools.partial(_is_list_of, check=lambda pa, item: pa.types.is_struct(item))
            columns["regions"] = need("regions", is_struct, "list<struct<box, image, mask>>")
        return columns
    if stream == "text":
        return {"text": need("text", _is_text_type, "string")}
    if stream == "caption":
        text = next((c for c in _CAPTION_TEXT_COLUMNS if c in types), None)
        if text is None:
            raise DataError(f"{path} has neither a 'caption' nor a 'text' column needed by the caption stream "
                            f"(columns: {found})")
        return {"image": need("image", _is_image_type, "binary or struct<bytes: binary>"),
                "text": need(text, _is_text_type, "string")}
    return {"texts": need("texts", functools.partial(_is_list_of, check=_is_text_type), "list<string>"),
            "images": need("images", functools.partial(_is_list_of, check=_is_image_type),
                           "list<binary> or list<struct<bytes: binary>>")}


def _image_bytes(value) -> bytes | None:
    if isinstance(value, dict):
        value = value.get("bytes")
    if value is None:
        return None
    return bytes(value)


def _text(value) -> str | None:
    if value is None:
        return None
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _row_to_record(index: int, row: dict, *, path: str, stream: str, columns: dict[str, str]) -> dict:
    """One Parquet row (column -> value, as Grain's Parquet reader yields it)
    -> raw record; never raises."""
    origin = f"{path}:{index}"
    try:
        if "conversations" in columns:
            turns = row[columns["conversations"]]
            if turns is None:
                return bad_record(stream, origin, "null 'conversations'")
            doc = {"conversations": list(turns)}
            for key in ("image", "images", "regions"):
                if key in columns and row[columns[key]] is not None:
                    doc[key] = list(row[columns[key]]) if key != "image" else row[columns[key]]
            try:
                segments = conversation_segments(doc, lambda refs: [_image_bytes(ref) for ref in refs])
            except (ValueError, TypeError) as err:
                return bad_record(stream, origin, str(err))
            return {"stream": stream, "segments": segments, "origin": origin}
        if stream == "text":
            text = _text(row[columns["text"]])
            if text is None:
                return bad_record(stream, origin, f"null {columns['text']!r}")
            return {"stream": stream, "segments": [{"text": text}], "origin": origin}
        if stream == "caption":
            image = _image_bytes(row[columns["image"]])
            text = _text(row[columns["text"]])
            if not image:
                return bad_record(stream, origin, "null or empty 'image'")
            if text is None:
                return bad_record(stream, origin, f"null {columns['text']!r}")
            return {"stream": stream, "segments": [{"image_bytes": image}, {"text": text}], "origin": origin}
        texts, images = row[columns["texts"]], row[columns["images"]]
        if texts is None or images is None:
            return bad_record(stream, origin, "null 'texts' or 'images' list")
        if len(texts) != len(images):
            return bad_record(stream, origin, f"'texts' has {len(texts)} entries but 'images' {len(images)}")
        segments: list[dict] = []
        for position, (text, image) in enumerate(zip(texts, images)):
            text, image = _text(text), _image_bytes(image)
            if (text is None) == (image is None):
                state = "both null" if text is None else "both set"
                return bad_record(stream, origin, f"position {position}: text and image are {state}")
            if image is not None:
                if not image:
                    return bad_record(stream, origin, f"position {position}: empty image")
                segments.append({"image_bytes": image})
            else:
                segments.append({"text": text})
        if not segments:
            return bad_record(stream, origin, "no segments")
        return {"stream": stream, "segments": segments, "origin": origin}
    except Exception as err:  # noqa: BLE001 - unexpected value types
        return bad_record(stream, origin, f"unreadable row ({type(err).__name__}: {err})")


def _file_records(entry: tuple[str, dict[str, str]], stream: str) -> grain.IterDataset:
    path, columns = entry
    return grain.experimental.ParquetIterDataset(path).map_with_index(
        functools.partial(_row_to_record, path=path, stream=stream, columns=columns))


def open_parquet(paths: list[str], stream: str, *, process_index: int = 0, process_count: int = 1, seed: int = 0,
                 num_epochs: int | None = None, cycle_length: int = 8) -> grain.IterDataset:
    """Raw records of `stream` from this process's share of the Parquet files
    `paths`, repeated `num_epochs` times (None: forever).

    Every file of this process is checked here (schema only): a file that
    cannot be read is skipped with a warning, a file without the columns the
    stream needs is a `DataError`, as is having fewer files than processes.
    """
    if stream not in STREAMS:
        raise DataError(f"unknown stream {stream!r}; expected one of {', '.join(STREAMS)}")
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index {process_index} is not in [0, {process_count})")
    if num_epochs is not None and num_epochs < 1:
        raise DataError(f"num_epochs must be None (forever) or >= 1, got {num_epochs}")
    if cycle_length < 1:
        raise DataError(f"cycle_length must be >= 1, got {cycle_length}")
    paths = [os.fspath(p) for p in paths]
    if len(paths) < process_count:
        raise DataError(f"{len(paths)} Parquet file(s) for the {stream} stream cannot be shared by {process_count} "
                        f"processes; every process needs at least one file")
    import pyarrow.parquet as pq

    mine = paths[process_index::process_count]
    entries: list[tuple[str, dict[str, str]]] = []
    for path in mine:
        try:
            schema = pq.read_schema(path)
        except Exception as err:  # noqa: BLE001 - missing file, not Parquet, truncated footer
            warn_bad_input(path, f"cannot open Parquet file ({type(err).__name__}: {err})")
            continue
        entries.append((path, _columns_for(path, stream, schema)))
    if not entries:
        raise DataError(f"none of the Parquet files of process {process_index} for the {stream} stream can be read: "
                        f"{', '.join(mine)}")
    files = grain.MapDataset.source(entries).shuffle(seed=seed).repeat(num_epochs)
    per_file = files.map(functools.partial(_file_records, stream=stream))
    return grain.experimental.InterleaveIterDataset(per_file, cycle_length=min(cycle_length, len(entries)))

