"""Keeps libtpu quiet on hosts without TPUs.

With the `tpu` extra installed (for ahead-of-time TPU compiles), JAX loads
libtpu when it starts its backends; on a host without TPU chips libtpu then
prints "Failed to find host bounds for accelerator type" and an
"unexpected worker hostname" error while it looks for a TPU it cannot find.
On such a host (no `/dev/accel*` or `/dev/vfio/<n>` device nodes) and only
when the user set none of them, this gives libtpu the answers it would look
up: no accelerator type, a 1x1x1 host and this host as the only worker.
TPU hosts, GPU hosts (libtpu is not their backend) and any explicit setting
are left untouched; ahead-of-time compiles name their topology and do not
read these variables.
"""

from __future__ import annotations

import glob
import os
from typing import MutableMapping

QUIET_ENV = {"TPU_ACCELERATOR_TYPE": "none", "TPU_HOST_BOUNDS": "1,1,1", "TPU_WORKER_HOSTNAMES": "localhost"}


def host_has_tpu(dev: str = "/dev") -> bool:
    """TPU VMs expose their chips as /dev/accel<n> (v2-v5e) or /dev/vfio/<n> (v5p, v6e, TPU7x)."""
    return bool(glob.glob(os.path.join(dev, "accel*")) or glob.glob(os.path.join(dev, "vfio", "[0-9]*")))


def quiet_libtpu_without_tpus(environ: MutableMapping[str, str] = os.environ, dev: str = "/dev") -> bool:
    """Sets `QUIET_ENV` in `environ` on a host without TPUs unless the user
    chose any TPU variable or `JAX_PLATFORMS` names tpu; returns whether it did."""
    if host_has_tpu(dev) or "tpu" in environ.get("JAX_PLATFORMS", "").lower():
        return False
    if any(name in environ for name in QUIET_ENV):
        return False
    environ.update(QUIET_ENV)
    return True
