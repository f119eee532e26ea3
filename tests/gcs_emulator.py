"""A local Google Cloud Storage emulator (the gcp-storage-emulator package) for
tests of gs:// workdirs: started as a subprocess on a free port, in memory,
with one bucket. `env` holds what points gcsfs, google-cloud-storage and
tensorstore at it (mmjax.paths.configure_emulator derives the rest)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time

from conftest import free_port

BUCKET = "mmjax-test"


@contextlib.contextmanager
def storage_emulator(bucket: str = BUCKET):
    """Yields the environment (a dict) that points clients at a fresh emulator
    holding the empty bucket `bucket`; stops it on exit."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gcp_storage_emulator", "start", "--port", str(port),
                             "--host", "127.0.0.1", "--in-memory", "--default-bucket", bucket, "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 30
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"the storage emulator did not start: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    try:
        yield {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}"}
    finally:
        proc.kill()
        proc.wait()


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
        yield env
        for key in ("TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING"):
            os.environ.pop(key, None)
