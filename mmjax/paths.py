"""Workdir paths: a local folder or a Google Cloud Storage prefix (`gs://bucket/run`).

Every file under a workdir is reached through `workdir_path`, which returns an
`etils.epath.Path` (what Orbax uses too): local paths go to the OS, `gs://`
ones to fsspec's `gcsfs`. Checkpoint arrays go through tensorstore's own GCS
driver (Orbax), everything else through gcsfs.

Object stores cannot append to or flush an open object, so files that grow
while a run goes on (metrics.jsonl, TensorBoard event files, profiler traces)
are written to a local staging folder and copied up whole by `Mirror.sync`:
each sync rewrites every staged file that changed since the previous sync
(the traffic grows with the file, which stays small: one line per log step).
What was written after the last sync is lost if the process is killed; the
training loop syncs at every checkpoint save, so the bucket's metrics reach
at least the latest checkpoint (the resumed run logs the steps after it).

A local storage emulator is used when `STORAGE_EMULATOR_HOST` is set (as
gcsfs and google-cloud-storage read it): `configure_gcs` then points
tensorstore at it too (`TENSORSTORE_GCS_HTTP_URL`, a fixed test token),
makes gcsfs anonymous and turns off its storage-layout lookup, which speaks
gRPC to the real service only. Unset, the real service and the machine's
Google credentials are used.
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
import time

from etils import epath

from mmjax.errors import ConfigError

REMOTE_SCHEMES = ("gs://",)


def is_remote(path) -> bool:
    """True for a bucket path (`gs://...`)."""
    return os.fspath(path).startswith(REMOTE_SCHEMES)


def configure_gcs() -> None:
    """Settings for the gcsfs filesystem that epath creates (before it does):
    no listings cache, since checkpoint arrays are written by tensorstore,
    past gcsfs, and other processes write the same prefix (a cached listing
    would miss their objects). With `STORAGE_EMULATOR_HOST` set, every client
    talks to that emulator without credentials (module doc). Values already
    set are kept."""
    import fsspec

    gcs = fsspec.config.conf.setdefault("gcs", {})
    gcs.setdefault("use_listings_cache", False)
    host = os.environ.get("STORAGE_EMULATOR_HOST", "")
    if not host:
        return
    url = host if host.startswith(("http://", "https://")) else f"http://{host}"
    os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", url)
    os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    os.environ.setdefault("NO_GCE_CHECK", "true")
    gcs.setdefault("token", "anon")


_checked: set[str] = set()
# gcsfs retries a failed request for about a minute; the check at start waits this long for an answer.
REACH_TIMEOUT_S = 20.0


def _bucket_exists(text: str, bucket: str) -> bool:
    """Whether the bucket exists (ConfigError when the service does not answer in REACH_TIMEOUT_S)."""
    import threading

    fs = epath.Path(text)._backend.fs(text)  # the fsspec filesystem epath uses
    answer: list = []

    def probe():
        try:
            answer.append(fs.exists(bucket))
        except Exception as err:  # auth and HTTP errors: gcsfs raises many types
            answer.append(err)

    thread = threading.Thread(target=probe, daemon=True)  # a daemon: a hung probe does not delay the exit
    thread.start()
    thread.join(REACH_TIMEOUT_S)
    if not answer:
        raise ConfigError(f"--workdir {text}: bucket gs://{bucket} cannot be reached (no answer in "
                          f"{REACH_TIMEOUT_S:.0f}s; check the network, credentials or STORAGE_EMULATOR_HOST).")
    if isinstance(answer[0], Exception):
        err = answer[0]
        raise ConfigError(f"--workdir {text}: bucket gs://{bucket} cannot be reached "
                          f"({type(err).__name__}: {' '.join(str(err).split())[:200]}).")
    return answer[0]


def workdir_path(path, *, check: bool = True) -> epath.Path:
    """`path` as an `epath.Path`: an absolute local path, or a `gs://` path.
    With `check`, a bucket path is refused in one sentence (ConfigError) when
    gcsfs is not installed or the bucket cannot be reached."""
    text = os.fspath(path)
    if "://" in text and not is_remote(text):
        raise ConfigError(f"--workdir {text}: only local folders and gs://bucket/... paths are supported.")
    if not is_remote(text):
        return epath.Path(os.path.abspath(text))
    configure_gcs()
    bucket = text[len("gs://"):].split("/", 1)[0]
    if not bucket:
        raise ConfigError(f"--workdir {text} names no bucket (expected gs://BUCKET/FOLDER).")
    if check and bucket not in _checked:
        try:
            importlib.import_module("gcsfs")
        except ImportError:
            raise ConfigError(f"--workdir {text} is on Google Cloud Storage, which needs the gcsfs package "
                              "(pip install gcsfs).") from None
        if not _bucket_exists(text, bucket):
            raise ConfigError(f"--workdir {text}: bucket gs://{bucket} does not exist or is not visible "
                              "with these credentials.")
        _checked.add(bucket)
    return epath.Path(text)


def write_text(path, text: str) -> None:
    """Writes a whole small file (a local file or an object)."""
    path = epath.Path(path)
    if not is_remote(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def write_bytes(path, data: bytes) -> None:
    path = epath.Path(path)
    if not is_remote(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def write_csv(path, fieldnames, rows) -> None:
    """A CSV file of `rows` (mappings) with the header `fieldnames`."""
    import csv
    import io

    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=list(fieldnames))
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def save_figure(fig, path, **kwargs) -> None:
    """A matplotlib figure as PNG at `path` (a local file or an object)."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", **kwargs)
    write_bytes(path, buffer.getvalue())


def copy_tree(source, target) -> None:
    """Copies every file under the folder `source` to `target` (either may be a bucket path)."""
    source, target = epath.Path(source), epath.Path(target)
    for name in files_under(source):
        write_bytes(target / name, (source / name).read_bytes())


def move_tree(source, target) -> None:
    """Moves the folder `source` to `target`: a rename locally; on a bucket,
    which has no folders to rename, a copy of every object and then a delete."""
    source, target = epath.Path(source), epath.Path(target)
    if not is_remote(source) and not is_remote(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(os.fspath(source), os.fspath(target))
        return
    copy_tree(source, target)
    source.rmtree()


def files_under(folder) -> list[str]:
    """The files under `folder`, as sorted paths relative to it (a local folder or a bucket prefix)."""
    folder = epath.Path(folder)
    out = []
    base = os.fspath(folder).removeprefix("gs://")
    for top, _, names in folder.walk():
        rel = os.path.relpath(os.fspath(top).removeprefix("gs://"), base)
        out += [name if rel == "." else f"{rel}/{name}" for name in names]
    return sorted(out)


class Mirror:
    """A local staging folder whose files are copied to the folder `remote`
    when they change (module doc). `download` names files copied down first,
    so that appending continues an existing remote file."""

    def __init__(self, remote, download: tuple[str, ...] = (), every_s: float = 30.0):
        self.remote = epath.Path(remote)
        self.local = epath.Path(tempfile.mkdtemp(prefix="mmjax-staging-"))
        self.every_s = every_s
        self._sent: dict[str, tuple[int, int]] = {}
        self._last = time.monotonic()
        for name in download:
            if (self.remote / name).exists():
                (self.local / name).write_bytes((self.remote / name).read_bytes())
                self._sent[name] = self._stamp(self.local / name)

    @staticmethod
    def _stamp(file: epath.Path) -> tuple[int, int]:
        st = os.stat(file)
        return st.st_size, st.st_mtime_ns

    def due(self) -> bool:
        """Whether `every_s` passed since the last sync."""
        return time.monotonic() - self._last >= self.every_s

    def sync(self, force: bool = True) -> list[str]:
        """Copies up the staged files that changed; without `force` only when
        `every_s` passed since the last sync. Returns the names copied."""
        if not force and not self.due():
            return []
        self._last = time.monotonic()
        sent = []
        for name in files_under(self.local):
            file = self.local / name
            stamp = self._stamp(file)
            if self._sent.get(name) != stamp:
                write_bytes(self.remote / name, file.read_bytes())
                self._sent[name] = stamp
                sent.append(name)
        return sent

    def close(self) -> None:
        """Syncs and removes the staging folder."""
        self.sync()
        shutil.rmtree(self.local, ignore_errors=True)
