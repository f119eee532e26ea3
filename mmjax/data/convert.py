"""Converts WebDataset / JSONL / JSON / Parquet data to ArrayRecord shards.

  python -m mmjax.data.convert --input 'webdataset:/data/cc3m/{00000..00099}.tar' \\
      --stream caption --output /data/mmjax/cc3m --records_per_shard 10000

writes `/data/mmjax/cc3m/caption-00000-of-00012.array_record`, ... in input
order (images stay encoded, nothing is re-compressed), with a progress bar.
Conversations keep their segments' roles. Unreadable records are skipped,
counted and named in warnings; the shards
then serve as `config.data.sources.caption=array_record:/data/mmjax/cc3m/*.array_record`.
"""

from __future__ import annotations

import glob
import os
import sys
from typing import Iterator

from absl import app, flags
from tqdm import tqdm

from mmjax.data.records import STREAMS, DataError
from mmjax.data.sources import parse_spec, resolve_paths

FLAGS = flags.FLAGS
flags.DEFINE_string("input", None, "Source spec: webdataset:GLOB, jsonl:GLOB, json:GLOB or parquet:GLOB "
                    "(globs, comma-separated lists and {000..099} ranges).")
flags.DEFINE_enum("stream", None, list(STREAMS), "Which stream the records belong to.")
flags.DEFINE_string("output", None, "Directory for the ArrayRecord shards (created if missing).")
flags.DEFINE_integer("records_per_shard", 10_000, "Records per output shard.")
flags.DEFINE_integer("limit", 0, "Convert at most this many records (0: all).")

INPUT_FORMATS = ("webdataset", "jsonl", "json", "parquet")


def read_records(spec: str, stream: str) -> tuple[int | None, Iterator[dict]]:
    """(number of records if known, iterator of raw records in input order)."""
    where = "--input"
    fmt, location = parse_spec(spec, where)
    if fmt not in INPUT_FORMATS:
        raise DataError(f"--input={spec!r}: convert reads {', '.join(INPUT_FORMATS)}, not {fmt}.")
    paths = resolve_paths(location, where)
    if fmt == "parquet":
        from mmjax.data.readers.parquet import open_parquet
        return None, iter(open_parquet(paths, stream, num_epochs=1))
    if fmt == "webdataset":
        from mmjax.data.readers.webdataset import open_webdataset as reader
    elif fmt == "json":
        from mmjax.data.readers.jsonl import open_json as reader
    else:
        from mmjax.data.readers.jsonl import open_jsonl as reader
    ds = reader(paths, stream)
    return len(ds), (ds[i] for i in range(len(ds)))


def convert(spec: str, stream: str, output: str, records_per_shard: int = 10_000, limit: int = 0,
            progress: bool = True) -> dict:
    """Writes the shards; returns {"records", "skipped", "shards": [paths]}."""
    from mmjax.data.readers.array_record import write_array_record

    if records_per_shard < 1:
        raise DataError(f"--records_per_shard={records_per_shard} must be at least 1.")
    existing = glob.glob(os.path.join(output, f"{stream}-*.array_record"))
    if existing:
        raise DataError(f"--output={output!r} already holds {len(existing)} {stream} shards; "
                        "choose an empty directory (nothing is overwritten).")
    total, records = read_records(spec, stream)
    if limit:
        total = min(total, limit) if total is not None else limit
    os.makedirs(output, exist_ok=True)
    good: list[dict] = []
    written, skipped, parts = 0, 0, []
    bar = tqdm(total=total, unit="rec", desc=f"convert {stream}", disable=not progress, file=sys.stderr)

    def flush():
        path = os.path.join(output, f"{stream}-{len(parts):05d}.array_record.tmp")
        write_array_record(path, good)
        parts.append(path)
        good.clear()

    for record in records:
        if limit and written + skipped >= limit:
            break
        bar.update(1)
        if record.get("error"):
            skipped += 1
            continue
        good.append(record)
        written += 1
        if len(good) == records_per_shard:
            flush()
    if good or not parts:
        flush()
    bar.close()
    shards = []
    for i, tmp in enumerate(parts):  # final names carry the shard count
        final = os.path.join(output, f"{stream}-{i:05d}-of-{len(parts):05d}.array_record")
        os.replace(tmp, final)
        shards.append(final)
    return {"records": written, "skipped": skipped, "shards": shards}


def main(argv) -> None:
    del argv
    for name in ("input", "stream", "output"):
        if getattr(FLAGS, name) is None:
            raise app.UsageError(f"--{name} is required (see --help).")
    try:
        result = convert(FLAGS.input, FLAGS.stream, FLAGS.output, FLAGS.records_per_shard, FLAGS.limit)
    except DataError as err:
        sys.exit(f"error: {err}")
    print(f"wrote {result['records']} records to {len(result['shards'])} shards in {FLAGS.output} "
          f"({result['skipped']} unreadable records skipped)")


if __name__ == "__main__":
    app.run(main)
