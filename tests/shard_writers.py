"""Tiny datasets in every supported format, written into a temp dir by tests."""

import io
import json
import tarfile

import numpy as np
from PIL import Image


def picture(i: int, size=(40, 48)) -> np.ndarray:
    """A smooth, index-dependent uint8 `[h, w, 3]` picture."""
    h, w = size
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([(x * 5 + i * 40) % 256, (y * 5 + i * 17) % 256,
                     np.full_like(x, (i * 70) % 256)], -1).astype(np.uint8)


def encode(image: np.ndarray, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_tar(path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """samples: (key, {extension: bytes}) -> WebDataset tar shard."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def caption_samples(n: int, start: int = 0, corrupt: tuple[int, ...] = ()) -> list:
    """WebDataset caption samples; indices in `corrupt` get bytes that are not an image."""
    samples = []
    for i in range(start, start + n):
        image = b"\xff\xd8\xff\xe0 not really a jpeg" if i in corrupt else encode(picture(i))
        samples.append((f"{i:06d}", {"jpg": image, "txt": f"caption number {i}".encode()}))
    return samples


def interleaved_doc(i: int) -> tuple[dict, dict[str, bytes]]:
    """A document with two pictures: (json segments, {member ext: bytes})."""
    doc = {"segments": [{"text": f"document {i} starts"}, {"image": "0.png"},
                        {"text": f"between pictures of {i}"}, {"image": "1.png"}, {"text": f"end of {i}"}]}
    return doc, {"0.png": encode(picture(2 * i), "PNG"), "1.png": encode(picture(2 * i + 1), "PNG")}


def write_jsonl(path, texts: list[str]) -> None:
    with open(path, "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")


def write_interleaved_parquet(path, docs: range) -> None:
    """OBELICS-style parquet: `texts` / `images` list columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts, images = [], []
    for i in docs:
        texts.append([f"document {i} starts", None, f"between pictures of {i}", None, f"end of {i}"])
        images.append([None, encode(picture(2 * i), "PNG"), None, encode(picture(2 * i + 1), "PNG"), None])
    table = pa.table({"texts": pa.array(texts, pa.list_(pa.string())),
                      "images": pa.array(images, pa.list_(pa.binary()))})
    pq.write_table(table, path)


def prepare_tfds_captions(data_dir: str, num: int) -> str:
    """A TFDS caption dataset in ArrayRecord format built with TFDS's builder
    (no TensorFlow); returns its name."""
    import tensorflow_datasets as tfds

    class TinyTfdsCaptions(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)), "caption": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(num):
                yield i, {"image": encode(picture(i), "PNG"), "caption": f"tfds caption {i}"}

    builder = TinyTfdsCaptions(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return builder.name
