"""The raw record every reader produces, and its byte encoding for ArrayRecord.

A raw record is a dict:

  {"stream": "caption" | "interleaved" | "text",
   "segments": [{"text": str, "spans": [(start, end), ...]}      # spans optional
                | {"image": uint8 [h, w, 3]}                        # decoded pixels
                | {"image_bytes": bytes}                            # encoded JPEG/PNG/...
                | {"video": path | bytes | [frame, ...], "fps": f}              # mmjax.data.video
                | {"region": {"image": int, "box" | "rle" | "mask_bytes": ...}}, ...],  # mmjax.data.regions
   "origin": "shard path:record"}                                   # where it came from

A region segment (conversations only) refers to a region of one of the
record's images (`mmjax.data.regions` has its format).

A conversation is a raw record whose segments all carry `"role"`: "system" |
"user" | "assistant" (`ROLES`); a turn is a run of segments of one role, its
images included (see `mmjax.data.chat`).

A record that cannot be read (malformed JSON, missing member, truncated
shard) is not dropped silently: readers return `bad_record(...)`, which the
example builder turns into an empty example counted as `skipped_records`.
"""

from __future__ import annotations

import logging

import msgpack
import numpy as np

from mmjax.errors import DataError  # noqa: F401  (re-exported: the data layer's refusal)

STREAMS = ("caption", "interleaved", "text")
ROLES = ("system", "user", "assistant")

_log = logging.getLogger("mmjax.data")
_MAX_WARNINGS = 100
_warned = 0


def warn_bad_input(where: str, reason: str) -> None:
    """One warning line naming the file/record and what is wrong (the first
    100 per process; after that they are only counted)."""
    global _warned
    _warned += 1
    if _warned <= _MAX_WARNINGS:
        _log.warning("skipping %s: %s%s", where, reason,
                     " (further bad-input warnings are counted, not printed)" if _warned == _MAX_WARNINGS else "")


def bad_record(stream: str, origin: str, reason: str) -> dict:
    """A placeholder for an unreadable record (warned about here): counted by
    the example builder as `skipped_records`, never trained on."""
    warn_bad_input(origin, reason)
    return {"stream": stream, "segments": [], "origin": origin, "error": reason}


def encode_record(record: dict) -> bytes:
    """Raw record -> bytes (msgpack). Decoded images are stored as raw uint8
    with their shape; encoded images (`image_bytes`) and regions are stored
    as they are; a video segment is stored as it is (a path stays a path); a
    segment's `role` is kept."""
    segments = []
    for seg in record["segments"]:
        if "image" in seg:
            image = np.ascontiguousarray(seg["image"], np.uint8)
            segments.append({"pixels": image.tobytes(), "shape": list(image.shape)})
        elif "image_bytes" in seg:
            segments.append({"image_bytes": bytes(seg["image_bytes"])})
        elif "video" in seg:
            segments.append({k: seg[k] for k in ("video", "fps") if k in seg})
        elif "region" in seg:
            segments.append({"region": dict(seg["region"])})
        else:
            entry = {"text": seg["text"]}
            if seg.get("spans"):
                entry["spans"] = [list(s) for s in seg["spans"]]
            segments.append(entry)
        if "role" in seg:
            segments[-1]["role"] = seg["role"]
    return msgpack.packb({"stream": record["stream"], "segments": segments,
                          "origin": record.get("origin", "")}, use_bin_type=True)


def decode_record(data: bytes, origin: str = "") -> dict:
    """bytes (from `encode_record`) -> raw record. Raises `ValueError` on
    anything that is not such a record (an unknown stream or role included)."""
    try:
        raw = msgpack.unpackb(data, raw=False)
        segments = []
        for seg in raw["segments"]:
            if "pixels" in seg:
                segments.append({"image": np.frombuffer(seg["pixels"], np.uint8).reshape(seg["shape"])})
            elif "image_bytes" in seg:
                segments.append({"image_bytes": seg["image_bytes"]})
            elif "video" in seg:
                segments.append({k: seg[k] for k in ("video", "fps") if k in seg})
            elif "region" in seg:
                segments.append({"region": dict(seg["region"])})
            else:
                segments.append({"text": str(seg["text"]),
                                 **({"spans": [tuple(s) for s in seg["spans"]]} if "spans" in seg else {})})
            if "role" in seg:
                segments[-1]["role"] = seg["role"]
        stream = raw["stream"]
    except Exception as err:  # msgpack errors, missing keys, bad shapes
        raise ValueError(f"not an mmjax record ({type(err).__name__}: {err})") from err
    if stream not in STREAMS:
        raise ValueError(f"unknown stream {stream!r}")
    for n, seg in enumerate(segments):
        if "role" in seg and seg["role"] not in ROLES:
            raise ValueError(f"segment {n} has unknown role {seg['role']!r}; expected one of {', '.join(ROLES)}")
    return {"stream": stream, "segments": segments, "origin": origin or raw.get("origin", "")}
