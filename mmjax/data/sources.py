"""Source specs -> Grain datasets of raw records, one per stream.

`config.data.sources.<stream>` is a spec string:

  procedural                         the embedded generated data (default)
  procedural:sft                     the embedded generated conversations (fine-tuning)
  procedural:classes                 the embedded labelled scenes of one shape kind (caption stream)
  webdataset:/data/cc3m/{00000..00099}.tar   tar shards (`.jpg/.png` + `.txt`/`.json`)
  array_record:/data/mix/caption-*.array_record   records written by `mmjax.data.convert`
  parquet:/data/obelics/*.parquet    parquet files (`text`, `image` / `texts`, `images`)
  jsonl:/data/text/*.jsonl           one JSON object per line
  json:/data/sft/llava.json          one JSON array of objects per file
  tfds:NAME[@DATA_DIR]               a TFDS dataset prepared as array_record

Any of the file formats may hold LLaVA-style conversations (objects with a
`conversations` list; see `mmjax.data.readers.conversation`): they arrive on
the stream whose source reads them (`mmjax.data.chat` has the convention).
JSON/JSONL objects may also reference videos (a file or a folder of frames,
`"video": path`), sampled into frames by the example builder
(`mmjax.data.video`); multi-frame data belongs on the `interleaved` stream.

Paths take shell globs and `{a..b}` numeric ranges (zero padding kept).
Several sources of one stream, mixed by weight (the categories of a
fine-tuning mixture): `"json:/sft/general/*.json@37|json:/sft/ocr/*.json@26"`.
Random-access formats are sliced per process (`[process_index::process_count]`,
disjoint reads), shuffled with the seed and repeated forever; parquet files
are split between processes.
"""

from __future__ import annotations

import glob
import os
import re

import grain

from mmjax.data.procedural import SOURCES as PROCEDURAL
from mmjax.data.records import STREAMS, DataError

FORMATS = ("procedural", "webdataset", "array_record", "parquet", "jsonl", "json", "tfds")
TFDS_SPLITS = {"train": "train", "eval": "validation"}
# Reads are small `pread`s: a short read-ahead is enough (Grain's default buffer of
# 500 is scanned on every element, ~0.3 ms per record).
_READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=32)
_PROCEDURAL_READ = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def _sft_sources():
    from mmjax.data.procedural_sft import SOURCES
    return SOURCES


def _class_sources():
    from mmjax.data.procedural import CLASS_SOURCES
    return CLASS_SOURCES


# "procedural" -> pre-training records; "procedural:sft" -> conversations (mmjax/data/procedural_sft.py);
# "procedural:classes" -> labelled single-kind scenes (caption stream only, mmjax/data/procedural.py)
PROCEDURAL_KINDS = {"": lambda: PROCEDURAL, "sft": _sft_sources, "classes": _class_sources}


def expand_braces(pattern: str) -> list[str]:
    """`shard-{000..002}.tar` -> `[shard-000.tar, shard-001.tar, shard-002.tar]`."""
    match = _RANGE.search(pattern)
    if not match:
        return [pattern]
    lo, hi = match.group(1), match.group(2)
    width = len(lo) if lo.startswith("0") else 0
    out = []
    for n in range(int(lo), int(hi) + 1):
        out += expand_braces(pattern[:match.start()] + str(n).zfill(width) + pattern[match.end():])
    return out


def resolve_paths(pattern: str, where: str) -> list[str]:
    """Comma-separated globs/ranges -> sorted existing files; one clear error otherwise."""
    paths: list[str] = []
    for part in filter(None, (p.strip() for p in pattern.split(","))):
        for expanded in expand_braces(os.path.expanduser(part)):
            matches = sorted(glob.glob(expanded)) if glob.has_magic(expanded) else [expanded]
            for path in matches:
                if os.path.isdir(path):
                    raise DataError(f"{where}: {path!r} is a directory; name the files (e.g. {path}/*.tar).")
                if not os.path.exists(path):
                    raise DataError(f"{where}: no file matches {path!r}.")
                if not os.access(path, os.R_OK):
                    raise DataError(f"{where}: {path!r} is not readable.")
            if not matches:
                raise DataError(f"{where}: no file matches {expanded!r}.")
            paths += matches
    if not paths:
        raise DataError(f"{where}: the spec names no files.")
    return paths


def parse_spec(spec: str, where: str) -> tuple[str, str]:
    """`"fmt:location"` -> (fmt, location); `"procedural"` -> ("procedural", "")."""
    fmt, _, location = spec.partition(":")
    if fmt not in FORMATS:
        raise DataError(f"{where}={spec!r}: unknown format {fmt!r}; expected one of {', '.join(FORMATS)}.")
    if fmt != "procedural" and not location:
        raise DataError(f"{where}={spec!r}: give a location after '{fmt}:'.")
    if fmt == "procedural" and location not in PROCEDURAL_KINDS:
        raise DataError(f"{where}={spec!r}: unknown procedural data {location!r}; expected 'procedural' "
                        "(pre-training), 'procedural:sft' (conversations) or 'procedural:classes' (labelled "
                        "scenes, caption stream).")
    return fmt, location


def weighted_parts(spec: str, where: str) -> list[tuple[str, float]]:
    """`"SPEC@W|SPEC@W|..."` (several sources of one stream mixed by weight,
    e.g. the categories of a fine-tuning mixture) -> [(spec, weight)]; a
    plain spec -> [(spec, 1.0)]. Each part's spec is checked (`parse_spec`)."""
    if "|" not in spec:
        parse_spec(spec, where)
        return [(spec, 1.0)]
    parts = []
    for part in spec.split("|"):
        sub, at, weight = part.strip().rpartition("@")
        try:
            value = float(weight) if at else float("nan")
        except ValueError:
            value = float("nan")
        if not at or not value > 0 or value == float("inf"):
            raise DataError(f"{where}={spec!r}: the part {part.strip()!r} needs a positive weight: SPEC@WEIGHT.")
        parse_spec(sub, where)
        parts.append((sub, value))
    return parts


def open_stream(spec: str, stream: str, *, split: str, image_size: int, seed: int,
                process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """An endless IterDataset of raw records of `stream` for this process;
    a weighted spec (`weighted_parts`) mixes its parts by weight, each part
    shuffled with its own seed. Every `DataError` names the stream's config
    field first."""
    where = f"config.data.sources.{stream}"
    try:
        parts = weighted_parts(spec, where)
        opened = [_open_stream(sub, stream, split=split, image_size=image_size, seed=seed + 7919 * n,
                               process_index=process_index, process_count=process_count)
                  for n, (sub, _) in enumerate(parts)]
    except DataError as err:
        if str(err).startswith(where):
            raise
        raise DataError(f"{where}={spec!r}: {err}") from None
    return opened[0] if len(opened) == 1 else grain.IterDataset.mix(opened, [w for _, w in parts])


def _open_stream(spec: str, stream: str, *, split: str, image_size: int, seed: int,
                 process_index: int, process_count: int) -> grain.IterDataset:
    if stream not in STREAMS:
        raise DataError(f"unknown stream {stream!r}; expected one of {STREAMS}.")
    where = f"config.data.sources.{stream}"
    fmt, location = parse_spec(spec, where)
    stream_seed = seed * len(STREAMS) + STREAMS.index(stream)
    if fmt == "procedural":  # already random per index: no shuffle, results stay comparable
        kinds = PROCEDURAL_KINDS[location]()
        if stream not in kinds:
            raise DataError(f"{where}={spec!r}: {spec} has no {stream} records; it feeds the "
                            f"{' and '.join(kinds)} stream{'s' if len(kinds) > 1 else ''}.")
        source = kinds[stream](image_size=image_size, seed=seed, split=split)
        # Generated in the reading thread: the loop's prefetcher overlaps it with the step, and a
        # thread pool here only adds GIL contention (31 ms of CPU per tiny batch instead of 57 ms).
        return grain.MapDataset.source(source)[process_index::process_count].to_iter_dataset(_PROCEDURAL_READ)
    if fmt == "parquet":
        from mmjax.data.readers.parquet import open_parquet
        return open_parquet(resolve_paths(location, where), stream, process_index=process_index,
                            process_count=process_count, seed=stream_seed)
    if fmt == "tfds":
        from mmjax.data.readers.tfds import open_tfds
        name, _, data_dir = location.partition("@")
        ds = open_tfds(name, data_dir or None, TFDS_SPLITS.get(split, split), stream)
    else:
        paths = resolve_paths(location, where)
        if fmt == "webdataset":
            from mmjax.data.readers.webdataset import open_webdataset as reader
        elif fmt == "array_record":
            from mmjax.data.readers.array_record import open_array_record as reader
        elif fmt == "json":
            from mmjax.data.readers.jsonl import open_json as reader
        else:
            from mmjax.data.readers.jsonl import open_jsonl as reader
        ds = reader(paths, stream)
    if len(ds) < process_count:
        raise DataError(f"{where}: {len(ds)} records cannot be split between {process_count} processes.")
    return ds[process_index::process_count].shuffle(seed=stream_seed).repeat().to_iter_dataset(_READ_OPTIONS)
