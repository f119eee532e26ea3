"""Peak FLOP/s per device and MFU.

`PEAK_FLOPS_PER_DEVICE` holds published bf16 dense peaks by
`jax.Device.device_kind`; devices not in the table (the host CPU) get a
measured peak from a matmul calibration, see `peak_flops_per_device`.
"""

from __future__ import annotations

import math
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

# Published dense bf16 peak FLOP/s per chip (TPU) or GPU, keyed by
# `jax.Device.device_kind`.
PEAK_FLOPS_PER_DEVICE: dict[str, float] = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,   # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,        # v5p reports itself as "TPU v5"
    "TPU v6 lite": 918e12,   # v6e (Trillium)
    "TPU v6e": 918e12,
    "TPU7x": 1153.5e12,      # Ironwood: 2307e12 per chip, two TensorCores = two devices
    "NVIDIA H100 80GB HBM3": 989e12,  # SXM
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12,
    "NVIDIA H200 NVL": 835e12,
    "NVIDIA GH200 480GB": 989e12,  # Grace Hopper: an H100-class GPU
}

# Normalised substrings (lowercase, letters and digits only) tried in order,
# most specific first, for kinds that are not spelled exactly as a table key.
_KIND_PATTERNS: tuple[tuple[str, str], ...] = (
    ("tpu7x", "TPU7x"), ("tpuv7x", "TPU7x"), ("ironwood", "TPU7x"),
    ("tpuv6lite", "TPU v6 lite"), ("tpuv6e", "TPU v6e"), ("trillium", "TPU v6 lite"),
    ("tpuv5lite", "TPU v5 lite"), ("tpuv5e", "TPU v5e"), ("tpuv5p", "TPU v5p"), ("tpuv5", "TPU v5"),
    ("tpuv4", "TPU v4"),
    ("h100pcie", "NVIDIA H100 PCIe"), ("h100nvl", "NVIDIA H100 NVL"), ("h100", "NVIDIA H100 80GB HBM3"),
    ("gh200", "NVIDIA GH200 480GB"), ("h200nvl", "NVIDIA H200 NVL"), ("h200", "NVIDIA H200"),
)


def _normalise(kind: str) -> str:
    return re.sub(r"[^a-z0-9]", "", kind.lower())


def table_peak(device_kind: str) -> tuple[str, float] | None:
    """(table key, peak FLOP/s) for a `device_kind`, or None if it is not listed."""
    if device_kind in PEAK_FLOPS_PER_DEVICE:
        return device_kind, PEAK_FLOPS_PER_DEVICE[device_kind]
    norm = _normalise(device_kind)
    for pattern, key in _KIND_PATTERNS:
        if pattern in norm:
            return key, PEAK_FLOPS_PER_DEVICE[key]
    return None


_CALIBRATION: dict[str, tuple[float, str]] = {}


def calibrate_peak_flops(platform: str | None = None, size: int = 1024, reps: int = 3) -> tuple[float, str]:
    """Measured peak: achieved float32 matmul FLOP/s per device.

    One `[size, size] @ [size, size]` matmul per local device of `platform`,
    all at once (the operands are sharded over a mesh of every local device,
    so simulated devices that share the same cores split them as they do in
    training). After a warm-up run, the fastest of `reps` timed runs gives the
    total FLOP/s, divided by the device count. Measured once per process and
    platform, then cached."""
    platform = platform or jax.default_backend()
    if platform in _CALIBRATION:
        return _CALIBRATION[platform]
    devices = jax.local_devices(backend=platform)
    n = len(devices)
    mesh = jax.sharding.Mesh(np.asarray(devices), ("devices",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("devices"))
    a = jax.device_put(jnp.asarray(np.random.default_rng(0).standard_normal((n, size, size)), jnp.float32),
                       sharding)
    matmul = jax.jit(lambda x, y: jnp.einsum("nij,njk->nik", x, y), out_shardings=sharding)
    matmul(a, a).block_until_ready()  # compile + warm up
    best = math.inf
    for _ in range(reps):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    per_device = 2.0 * size ** 3 / best
    source = (f"measured: float32 {size}x{size} matmul on {n} {platform} device(s) at once, "
              f"best of {reps}: {per_device / 1e9:.3g} GFLOP/s per device")
    result = (per_device, source)
    _CALIBRATION[platform] = result
    return result


def peak_flops_per_device(device: jax.Device | None = None, calibrate: bool = True) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number comes from).

    Listed device kinds (TPU v4/v5e/v5p/v6e, H100/H200) give the published
    bf16 dense peak; any other device (e.g. the host CPU) gets the measured
    peak of `calibrate_peak_flops` on its platform, or NaN if `calibrate` is
    False."""
    device = device or jax.local_devices()[0]
    hit = table_peak(device.device_kind)
    if hit is not None:
        return hit[1], f"table: {hit[0]} (bf16 dense peak)"
    if not calibrate:
        return math.nan, f"unknown device kind {device.device_kind!r}; no calibration"
    return calibrate_peak_flops(device.platform)


def mfu(model_flops_per_step: float, step_time_s: float, num_devices: int, peak: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the devices' peak."""
    if step_time_s <= 0 or num_devices <= 0 or not peak > 0:
        return math.nan
    return model_flops_per_step / step_time_s / (num_devices * peak)
