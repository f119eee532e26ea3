"""WebDataset tar shards -> a Grain random-access source of raw records.

A shard is an uncompressed tar whose members are grouped into samples by key:
the member's path up to the first '.' of its basename (`000123.jpg`,
`000123.txt` -> key `000123`; `doc7.0.png` -> key `doc7`, extension `0.png`).
Members of one sample are consecutive in the tar; samples keep tar order and
shards keep the order of `paths`.

`open_webdataset` indexes every shard once (header scan only: each member's
data offset and size), so reading sample `i` is a couple of `pread`s of
exactly the bytes it needs. Images stay encoded (`{"image_bytes": ...}`);
decoding happens later, in the workers.

Sample -> raw record, per stream:
  caption      image = first member with extension jpg/jpeg/png/webp/bmp/gif;
               text = `.txt` (utf-8) or else `.json` "caption" or "text",
               stripped of surrounding whitespace -> [image, text].
  interleaved  `.json` with {"segments": [{"text": s} | {"image": ref}, ...]}
               or parallel lists {"texts": [s|null, ...], "images": [ref|null, ...]}
               (exactly one non-null per position); `ref` names a member by its
               extension (`"0.jpg"` -> member `<key>.0.jpg`; a leading `<key>.`
               is accepted too). Empty/whitespace-only texts are skipped.
  text         `.txt` (verbatim) or else `.json` "text" -> [text].
  any stream   `.json` with a `conversations` list (read when the sample has no
               `.txt`, or always on the interleaved stream) -> role-tagged
               segments (`mmjax.data.readers.conversation`). Image references
               name members as above; when none does (LLaVA paths such as
               "coco/train2017/000000033471.jpg"), the sample's image members
               are taken in tar order, one per reference.

Malformed samples (bad JSON, no caption text, a reference to an absent member,
nothing usable) come back as `bad_record(...)`. A shard that is cut short (or
whose headers turn to garbage part-way) keeps every sample before the damage;
the lost tail is one extra index that reads as a bad record, so it is counted.
"""

from __future__ import annotations

import contextlib
import json
import os
import tarfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

import grain
import numpy as np

from mmjax.data.readers.conversation import conversation_segments, is_conversation
from mmjax.data.records import STREAMS, DataError, bad_record, warn_bad_input

__all__ = ["IMAGE_EXTS", "OpenFiles", "WebDatasetSource", "interleaved_segments", "open_webdataset", "usable_text"]

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")

_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
_COMPRESSED_MAGIC = ((b"\x1f\x8b", "gzip"), (b"\x28\xb5\x2f\xfd", "zstd"), (b"BZh", "bzip2"),
                     (b"\xfd7zXZ\x00", "xz"))


# --------------------------------------------------------------------------- #
# Shared helpers (also used by the JSONL reader)
# --------------------------------------------------------------------------- #


class OpenFiles:
    """Read-only descriptors for a list of files, opened lazily per process and
    read with `os.pread` (safe from several threads, no shared file position).

    At most `limit` descriptors stay open (least recently used are closed when
    no read is using them). Pickling keeps only the paths, so a dataset holding
    this can be sent to Grain workers; a forked child starts a fresh cache.
    """

    def __init__(self, paths: Sequence[str], limit: int = 64):
        self.paths = list(paths)
        self.limit = limit
        self._reset()

    def _reset(self) -> None:
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._busy: dict[int, int] = {}
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        return {"paths": self.paths, "limit": self.limit}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    def read(self, file_index: int, offset: int, size: int) -> bytes:
        """Exactly `size` bytes at `offset` of file `file_index`; `OSError` if
        the file cannot be opened or is shorter than that now."""
        if self._pid != os.getpid():  # forked: the parent's lock/descriptors are not ours
            self._reset()
        fd = self._acquire(file_index)
        try:
            parts = []
            got = 0
            while got < size:
                chunk = os.pread(fd, size - got, offset + got)
                if not chunk:
                    raise OSError(f"{self.paths[file_index]} ends at byte {offset + got}, "
                                  f"expected {size} bytes at {offset}")
                parts.append(chunk)
                got += len(chunk)
        finally:
            self._release(file_index)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _acquire(self, file_index: int) -> int:
        with self._lock:
            fd = self._fds.get(file_index)
            if fd is None:
                fd = os.open(self.paths[file_index], os.O_RDONLY)
                self._fds[file_index] = fd
            else:
                self._fds.move_to_end(file_index)
            self._busy[file_index] = self._busy.get(file_index, 0) + 1
            if len(self._fds) > self.limit:
                for idle in [i for i in self._fds if not self._busy.get(i)][:len(self._fds) - self.limit]:
                    os.close(self._fds.pop(idle))
            return fd

    def _release(self, file_index: int) -> None:
        with self._lock:
            left = self._busy[file_index] - 1
            if left:
                self._busy[file_index] = left
            else:
                del self._busy[file_index]

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self):
        with contextlib.suppress(OSError, AttributeError, TypeError):  # also at interpreter shutdown
            if self._pid == os.getpid():
                self.close()


def usable_text(value) -> bool:
    """A str with something other than whitespace in it."""
    return isinstance(value, str) and bool(value.strip())


def interleaved_segments(doc: dict, load_image: Callable[[str], bytes]) -> list[dict]:
    """An interleaved JSON document -> ordered segments. `doc` has
    {"segments": [{"text": s} | {"image": ref}, ...]} or the parallel lists
    {"texts": [...], "images": [...]}; `load_image(ref)` returns the encoded
    image bytes (or raises `ValueError` naming what is missing). Texts that are
    empty or whitespace-only are skipped; anything else malformed raises
    `ValueError` or `TypeError` with the reason."""
    if "segments" in doc:
        entries = doc["segments"]
        if not isinstance(entries, list):
            raise ValueError("'segments' is not a list")
        pairs = []
        for n, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise TypeError(f"segment {n} is not an object")
            text, image = entry.get("text"), entry.get("image")
            if (text is None) == (image is None):
                raise ValueError(f"segment {n} needs exactly one of 'text' or 'image'")
            pairs.append((text, image))
    elif "texts" in doc or "images" in doc:
        texts, images = doc.get("texts"), doc.get("images")
        if not isinstance(texts, list) or not isinstance(images, list):
            raise ValueError("'texts' and 'images' must both be lists")
        if len(texts) != len(images):
            raise ValueError(f"'texts' has {len(texts)} entries but 'images' has {len(images)}")
        pairs = list(zip(texts, images))
        for n, (text, image) in enumerate(pairs):
            if (text is None) == (image is None):
                raise ValueError(f"position {n} needs exactly one non-null of texts/images")
    else:
        raise ValueError("JSON has neither 'segments' nor 'texts'/'images'")
    segments = []
    for n, (text, image) in enumerate(pairs):
        if image is not None:
            if not isinstance(image, str) or not image:
                raise ValueError(f"image reference {n} is not a non-empty string")
            data = load_image(image)
            if not data:
                raise ValueError(f"image {image!r} is empty")
            segments.append({"image_bytes": data})
        elif not isinstance(text, str):
            raise ValueError(f"text {n} is not a string")
        elif text.strip():
            segments.append({"text": text})
    if not segments:
        raise ValueError("no text or image in the document")
    return segments


# --------------------------------------------------------------------------- #
# Tar header scan
# --------------------------------------------------------------------------- #


class _NotTar(Exception):
    """The file does not start with a tar header."""


def _number(field: bytes) -> int:
    """A numeric header field: NUL/space-terminated octal or GNU base-256."""
    if field[:1] and field[0] & 0x80:
        return tarfile.nti(field)
    digits = field.split(b"\0", 1)[0].strip()
    return int(digits, 8) if digits else 0


def _pax_records(data: bytes) -> dict[str, str]:
    """'LEN key=value\\n' records of a pax extended header."""
    out, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        length = int(data[pos:space])
        if length <= 0:
            raise ValueError("bad pax record length")
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _scan_tar(fd: int, file_size: int) -> tuple[list[tuple[str, int, int]], str | None, int]:
    """Regular-file members of a tar as (name, data offset, size) in tar order,
    plus (damage, byte) when the archive does not end properly: damage is None
    for a clean end-of-archive block. Handles ustar/GNU/pax headers (long names
    from GNU 'L' and pax 'path', pax 'size'). Raises `_NotTar` if the very first
    header is not a tar header."""
    members: list[tuple[str, int, int]] = []
    pos = 0
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        if pos + _BLOCK > file_size:
            return members, ("it ends without an end-of-archive block" if pos >= file_size
                             else "it is cut inside a member header"), min(pos, file_size)
        buf = os.pread(fd, _BLOCK, pos)
        if len(buf) < _BLOCK:
            return members, "it is cut inside a member header", pos
        if buf == _ZERO_BLOCK:
            return members, None, pos
        try:
            stored = _number(buf[148:156])
            if stored != 256 + sum(buf[:148]) + sum(buf[156:]) and stored not in tarfile.calc_chksums(buf):
                raise ValueError("checksum mismatch")
            size = _number(buf[124:136])
            kind = buf[156:157]
        except (ValueError, tarfile.HeaderError) as err:
            if pos == 0:
                raise _NotTar(str(err)) from None
            return members, f"its header at byte {pos} is invalid ({err})", pos
        data = pos + _BLOCK
        if kind in (tarfile.GNUTYPE_LONGNAME, tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGLINK):
            if data + size > file_size:
                return members, "it is cut inside a member header", pos
            if kind == tarfile.GNUTYPE_LONGNAME:
                long_name = os.pread(fd, size, data).split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            elif kind == tarfile.XHDTYPE:
                try:
                    pax = _pax_records(os.pread(fd, size, data))
                except ValueError as err:
                    return members, f"its pax header at byte {pos} is invalid ({err})", pos
            pos = data + -(-size // _BLOCK) * _BLOCK
            continue
        name = buf[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        prefix = buf[345:500].split(b"\0", 1)[0] if buf[257:263] == b"ustar\0" else b""
        if prefix:
            name = prefix.decode("utf-8", "surrogateescape") + "/" + name
        if "path" in pax:
            name = pax["path"]
        elif long_name is not None:
            name = long_name
        if "size" in pax:
            try:
                size = int(pax["size"])
            except ValueError:
                return members, f"its pax header at byte {pos} has a bad size", pos
        long_name, pax = None, {}
        if kind in _REGULAR or kind not in tarfile.SUPPORTED_TYPES:
            if data + size > file_size:
                return members, f"it is cut inside member {name!r}", pos
            if kind in _REGULAR:
                members.append((name, data, size))
            pos = data + -(-size // _BLOCK) * _BLOCK
        else:  # directories, links, devices: no data blocks
            pos = data


# --------------------------------------------------------------------------- #
# The source
# --------------------------------------------------------------------------- #


class WebDatasetSource:
    """Random-access source over WebDataset tar shards (see the module doc).

    Index, all numpy: per member its data offset, size and extension id; per
    sample its first/stop member and key (one utf-8 blob + offsets); per shard
    its first sample. Truncated shards add one tail entry (members -1) that
    reads as a bad record.
    """

    def __init__(self, paths: Sequence[str], stream: str):
        if stream not in STREAMS:
            raise DataError(f"unknown stream {stream!r}; expected one of {STREAMS}.")
        self.paths = list(paths)
        self.stream = stream
        self.exts: list[str] = []
        ext_ids: dict[str, int] = {}
        m_offset, m_size, m_ext, s_first, s_stop, key_blobs, key_lens = ([] for _ in range(7))
        shard_first = []
        self._tails: dict[int, tuple[str, str]] = {}
        members_before = samples_before = 0
        for path in self.paths:  # per shard: Python lists, then numpy parts (keeps the peak small)
            shard_first.append(samples_before)
            members, damage, at = _index_shard(path)
            offsets, sizes, ext_list = [], [], []
            groups: list[list] = []  # [key, first member, stop member, extensions]
            for name, offset, size in members:
                slash = name.rfind("/")
                dot = name.find(".", slash + 1)
                if dot <= slash + 1:  # no key or no extension: not part of any sample
                    continue
                key, ext = name[:dot], name[dot + 1:].lower()
                ext_id = ext_ids.get(ext)
                if ext_id is None:
                    ext_id = ext_ids[ext] = len(self.exts)
                    self.exts.append(ext)
                if not groups or groups[-1][0] != key:
                    groups.append([key, len(offsets), len(offsets), set()])
                groups[-1][2] = len(offsets) + 1
                groups[-1][3].add(ext)
                offsets.append(offset)
                sizes.append(size)
                ext_list.append(ext_id)
            # After damage the last sample may have lost members to the cut: keep
            # it only when it has the same member kinds as the sample before it.
            if damage is not None and groups and (len(groups) < 2 or groups[-1][3] != groups[-2][3]):
                groups.pop()
            keys = [g[0].encode("utf-8", "surrogateescape") for g in groups]
            firsts = [members_before + g[1] for g in groups]
            stops = [members_before + g[2] for g in groups]
            if damage is not None:
                reason = f"truncated after {len(groups)} samples: {damage}; the rest of the shard is lost"
                warn_bad_input(path, reason + " (counted as one bad record)")
                self._tails[samples_before + len(groups)] = (f"{path}:<tail after byte {at}>", reason)
                keys.append(b"")
                firsts.append(-1)
                stops.append(-1)
            m_offset.append(np.asarray(offsets, np.int64))
            m_size.append(np.asarray(sizes, np.int64))
            m_ext.append(np.asarray(ext_list, np.int32))
            s_first.append(np.asarray(firsts, np.int64))
            s_stop.append(np.asarray(stops, np.int64))
            key_blobs.append(b"".join(keys))
            key_lens.append(np.asarray([len(k) for k in keys], np.int64))
            members_before += len(offsets)
            samples_before += len(firsts)
        if not samples_before:
            raise DataError(f"webdataset: no records in {self.paths}.")
        self._m_offset = np.concatenate(m_offset)
        self._m_size = np.concatenate(m_size)
        self._m_ext = np.concatenate(m_ext)
        self._s_first = np.concatenate(s_first)
        self._s_stop = np.concatenate(s_stop)
        self._key_blob = b"".join(key_blobs)
        self._key_end = np.cumsum(np.concatenate(key_lens))
        self._shard_first = np.asarray(shard_first, np.int64)
        self._files = OpenFiles(self.paths)

    def __len__(self) -> int:
        return len(self._s_first)

    def __repr__(self) -> str:
        return f"WebDatasetSource({len(self.paths)} shards, {len(self)} samples, stream={self.stream!r})"

    def _key(self, index: int) -> str:
        start = int(self._key_end[index - 1]) if index else 0
        return self._key_blob[start:int(self._key_end[index])].decode("utf-8", "surrogateescape")

    def __getitem__(self, index) -> dict:
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        if index in self._tails:
            origin, reason = self._tails[index]
            return bad_record(self.stream, origin, reason)
        shard = int(np.searchsorted(self._shard_first, index, side="right")) - 1
        key = self._key(index)
        origin = f"{self.paths[shard]}:{key}"
        first, stop = int(self._s_first[index]), int(self._s_stop[index])
        members = {self.exts[self._m_ext[m]]: m for m in range(stop - 1, first - 1, -1)}  # first wins
        try:
            segments = self._segments(shard, key, members)
        except (ValueError, TypeError, OSError, RecursionError) as err:  # incl. Unicode/JSON decode errors
            return bad_record(self.stream, origin, str(err) or type(err).__name__)
        return {"stream": self.stream, "segments": segments, "origin": origin}

    def _read(self, shard: int, member: int) -> bytes:
        return self._files.read(shard, int(self._m_offset[member]), int(self._m_size[member]))

    def _json(self, shard: int, members: dict[str, int]) -> dict | None:
        if "json" not in members:
            return None
        try:
            doc = json.loads(self._read(shard, members["json"]))
        except ValueError as err:
            raise ValueError(f"bad .json ({err})") from None
        if not isinstance(doc, dict):
            raise TypeError(".json is not an object")
        return doc

    def _segments(self, shard: int, key: str, members: dict[str, int]) -> list[dict]:
        doc = None
        if "json" in members and (self.stream == "interleaved" or "txt" not in members):
            doc = self._json(shard, members)
            if is_conversation(doc):
                return conversation_segments(doc, lambda refs: self._conversation_images(shard, key, members, refs))
        if self.stream == "interleaved":
            if doc is None:
                raise ValueError("no .json member for an interleaved sample")

            def load_image(ref: str) -> bytes:
                ext = _member_ext(ref, key, members)
                if ext is None:
                    raise ValueError(f"image {ref!r} is not a member of the sample")
                return self._read(shard, members[ext])

            return interleaved_segments(doc, load_image)

        text = None
        if "txt" in members:
            text = self._read(shard, members["txt"]).decode("utf-8-sig")
        if not usable_text(text):
            if doc is None:
                doc = self._json(shard, members)
            if doc is not None:
                fields = ("caption", "text") if self.stream == "caption" else ("text",)
                text = next((doc[f] for f in fields if usable_text(doc.get(f))), None)
        if self.stream == "text":
            if not usable_text(text):
                raise ValueError("no text (.txt or .json 'text')")
            return [{"text": text}]
        if not usable_text(text):
            raise ValueError("no caption text (.txt or .json 'caption'/'text')")
        image = next((members[e] for e in sorted(members, key=members.get) if e in IMAGE_EXTS), None)
        if image is None:
            raise ValueError(f"no image member ({'/'.join(IMAGE_EXTS)})")
        data = self._read(shard, image)
        if not data:
            raise ValueError(f"image member .{self.exts[self._m_ext[image]]} is empty")
        return [{"image_bytes": data}, {"text": text.strip()}]

    def _conversation_images(self, shard: int, key: str, members: dict[str, int], refs: list) -> list[bytes]:
        """The bytes of a conversation's image references: the members they
        name, or else the sample's image members in tar order."""
        if any(not isinstance(ref, str) or not ref for ref in refs):
            raise ValueError("an image reference is not a non-empty string")
        named = [_member_ext(ref, key, members) for ref in refs]
        if all(ext is not None for ext in named):
            return [self._read(shard, members[ext]) for ext in named]
        in_order = [members[e] for e in sorted(members, key=members.get) if e.rsplit(".", 1)[-1] in IMAGE_EXTS]
        if len(in_order) != len(refs):
            raise ValueError(f"image {refs[named.index(None)]!r} is not a member of the sample, and the sample "
                             f"has {len(in_order)} image members for {len(refs)} references")
        return [self._read(shard, m) for m in in_order]


def _member_ext(ref: str, key: str, members: dict[str, int]) -> str | None:
    """The member extension an image reference names (`"0.jpg"`, or with the
    sample's key in front), or None."""
    ext = ref.lower()
    base = key[key.rfind("/") + 1:].lower() + "."
    if ext.startswith(base) and ext not in members:
        ext = ext[len(base):]
    return ext if ext in members else None


def _index_shard(path: str) -> tuple[list[tuple[str, int, int]], str | None, int]:
    """Scan one shard; `DataError` naming it if it cannot be read as a tar at all."""
    if os.path.isdir(path):
        raise DataError(f"webdataset: {path} is a directory, not a tar shard.")
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as err:
        raise DataError(f"webdataset: cannot open {path} ({err.strerror or err}).") from None
    try:
        file_size = os.fstat(fd).st_size
        if file_size == 0:
            warn_bad_input(path, "empty file (no samples)")
            return [], None, 0
        head = os.pread(fd, 8, 0)
        for magic, kind in _COMPRESSED_MAGIC:
            if head.startswith(magic):
                raise DataError(f"webdataset: {path} is {kind}-compressed; shards must be uncompressed .tar "
                                "files (random access needs plain tar).")
        try:
            return _scan_tar(fd, file_size)
        except _NotTar as err:
            if file_size < _BLOCK:  # cut inside the very first header
                return [], "it is cut inside the first member header", 0
            raise DataError(f"webdataset: {path} is not a tar archive ({err}).") from None
    except OSError as err:
        raise DataError(f"webdataset: cannot read {path} ({err.strerror or err}).") from None
    finally:
        os.close(fd)


def open_webdataset(paths: list[str], stream: str) -> grain.MapDataset:
    """A MapDataset of raw `stream` records, one per sample of the tar shards
    `paths` (in order). Raises `DataError` if a shard cannot be read at all or
    there are no samples."""
    return grain.MapDataset.source(WebDatasetSource(paths, stream))
