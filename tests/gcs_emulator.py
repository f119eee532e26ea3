"""A local Google Cloud Storage emulator (the gcp-storage-emulator package) for
tests of gs:// workdirs: started as a subprocess on a free port, in memory,
with one bucket. The environment it yields points gcsfs and
google-cloud-storage at it (`STORAGE_EMULATOR_HOST`);
mmjax.paths.configure_gcs derives tensorstore's settings from it.

One fix is applied to the emulator (`python tests/gcs_emulator.py PORT BUCKET`
runs it so): its media downloads carry no `x-goog-generation` header, which
tensorstore's GCS driver (Orbax's arrays, OCDBT manifests) needs on every
read ("Malformed StorageGeneration"); the patched download adds the object's
generation. The emulator ignores `ifGenerationMatch` preconditions, so it
suits one writer at a time only (a test's training process)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time


BUCKET = "mmjax-test"


@contextlib.contextmanager
def storage_emulator(bucket: str = BUCKET):
    """Yields the environment (a dict) that points clients at a fresh emulator
    holding the empty bucket `bucket`; stops it on exit."""
    from conftest import free_port

    port = free_port()
    log = tempfile.TemporaryFile()  # a file, not a pipe: a full pipe would stall the server's request log
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(port), bucket],
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 30
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            log.seek(0)
            raise RuntimeError(f"the storage emulator did not start: {log.read().decode()[-2000:]}")
        time.sleep(0.05)
    try:
        yield {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}"}
    finally:
        proc.kill()
        proc.wait()
        log.close()


@contextlib.contextmanager
def emulated_bucket(monkeypatch, bucket: str = BUCKET):
    """The emulator, with this process's environment pointed at it."""
    with storage_emulator(bucket) as env:
        for key in ("TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING"):
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        from mmjax import paths

        paths._checked.clear()
        fresh_gcs_filesystem()
        yield env
        for key in ("TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING"):
            os.environ.pop(key, None)


def fresh_gcs_filesystem() -> None:
    """gcsfs and epath cache the filesystem (and its endpoint): a new endpoint needs a new one."""
    from mmjax import paths

    paths.configure_gcs()  # before gcsfs is first imported: it reads GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT then
    import gcsfs
    from etils.epath import backend

    gcsfs.GCSFileSystem.clear_instance_cache()
    backend.fsspec_backend._get_filesystem.cache_clear()


def _serve(port: int, bucket: str) -> None:
    """The emulator in memory on 127.0.0.1:`port` with `bucket`, downloads patched (module doc)."""
    import logging

    from gcp_storage_emulator.handlers import objects

    download = objects.download

    def download_with_generation(request, response, storage, *args, **kwargs):
        download(request, response, storage, *args, **kwargs)
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except Exception:  # not found: the original handler answered 404 already
            return
        response["x-goog-generation"] = obj["generation"]
        response["x-goog-metageneration"] = obj["metageneration"]

    objects.download = download_with_generation  # before the server module binds its routes
    from gcp_storage_emulator.server import RequestHandler, create_server

    RequestHandler.log_message = lambda self, *args: None  # no line per request

    logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    server.run()


if __name__ == "__main__":
    _serve(int(sys.argv[1]), sys.argv[2])
