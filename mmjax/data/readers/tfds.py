"""TensorFlow Datasets prepared in the ArrayRecord file format, read through
`tfds.data_source` (random access, no TensorFlow needed) as a
`grain.MapDataset` of raw records.

The first top-level `Image` feature is the image (TFDS decodes it to uint8
pixels; grayscale is repeated to 3 channels and an alpha channel dropped),
the first of the top-level features "caption", "text" is the text. Only the
"caption" and "text" streams can be read this way. An example that fails to
read or convert becomes a `bad_record` with origin "tfds:<name>/<split>:<index>".
"""

from __future__ import annotations

import grain
import numpy as np

from mmjax.data.records import STREAMS, DataError, bad_record

_TEXT_FEATURES = ("caption", "text")


def _image_segment(value) -> dict:
    if isinstance(value, (bytes, bytearray)):
        if not value:
            raise ValueError("empty image")
        return {"image_bytes": bytes(value)}
    image = np.asarray(value)
    if image.dtype != np.uint8:
        raise ValueError(f"image of dtype {image.dtype}, expected uint8")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image of shape {image.shape}, expected [h, w, 1|3|4]")
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    elif image.shape[-1] == 4:
        image = image[:, :, :3]
    return {"image": np.ascontiguousarray(image)}


def _text(value) -> str:
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8")
    if isinstance(value, str):
        return value
    raise ValueError(f"text of type {type(value).__name__}, expected a string")


class _ExampleSource:
    """Random access over a TFDS data source, converting each example."""

    def __init__(self, source, stream: str, label: str, image_key: str | None, text_key: str):
        self._source = source
        self._stream = stream
        self._label = label
        self._image_key = image_key
        self._text_key = text_key

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index) -> dict:
        index = index.__index__()
        if not 0 <= index < len(self):
            raise IndexError(f"example {index} out of range for {len(self)} examples")
        origin = f"{self._label}:{index}"
        try:
            example = self._source[index]
            segments = []
            if self._image_key is not None:
                segments.append(_image_segment(example[self._image_key]))
            segments.append({"text": _text(example[self._text_key])})
        except Exception as err:  # noqa: BLE001 - corrupt example, undecodable image
            return bad_record(self._stream, origin, f"unreadable example ({type(err).__name__}: {err})")
        return {"stream": self._stream, "segments": segments, "origin": origin}

    def __repr__(self) -> str:
        return f"TfdsRecords({self._label}, {len(self)} {self._stream} records)"


def open_tfds(name: str, data_dir: str | None, split: str, stream: str) -> grain.MapDataset:
    """The examples of split `split` of the prepared TFDS dataset `name`
    (found in `data_dir`; None: TFDS's default directory) as raw records of
    `stream` ("caption" or "text"). Nothing is downloaded or prepared here: a
    dataset that is missing, not prepared as ArrayRecord, lacks the split or
    the features the stream needs is a `DataError`."""
    if stream not in STREAMS:
        raise DataError(f"unknown stream {stream!r}; expected one of {', '.join(STREAMS)}")
    if stream == "interleaved":
        raise DataError(f"TFDS dataset {name}: the interleaved stream cannot be read from TFDS; use caption or text")
    import tensorflow_datasets as tfds

    where = f"TFDS dataset {name!r} (split {split!r}, data_dir {data_dir or 'default'!s})"
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as err:  # not found, not prepared, wrong format, unknown split
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"cannot open {where}: {first_line}") from err
    features = source.dataset_info.features
    found = ", ".join(f"{key}: {type(feature).__name__}" for key, feature in features.items())
    image_key = None
    if stream == "caption":
        image_key = next((key for key, feature in features.items() if isinstance(feature, tfds.features.Image)), None)
        if image_key is None:
            raise DataError(f"{where} has no Image feature for the caption stream (features: {found})")
    text_key = next((key for key in _TEXT_FEATURES if key in features), None)
    if text_key is None:
        raise DataError(f"{where} has neither a 'caption' nor a 'text' feature (features: {found})")
    label = f"tfds:{name}/{split}"
    return grain.MapDataset.source(_ExampleSource(source, stream, label, image_key, text_key))
