"""Hardware presets shared by the experiment configs.

A preset names one machine shape (`"cpu-8"`, `"tpu-v5p-256"`, `"gpu-h100-8"`,
...) and holds what a config needs to run on it:

  devices         JAX devices of the whole slice/cluster (TPU: chips; one
                  v4/v5p chip is one device, so `tpu-v5p-256`, named by its
                  256 TensorCores as Cloud TPU does, has 128 devices; v5e and
                  v6e names count chips; a TPU7x chip is two devices, so
                  `tpu-7x-256`, named by its 256 TensorCores, has 256
                  devices on 128 chips)
  topology        the string `jax.experimental.topologies.get_topology_desc(
                  topology, "tpu")` accepts for ahead-of-time compilation
                  without the hardware ("v5p:4x4x8"); "" for CPU and GPU
                  presets (compile against the local devices instead)
  chip_config     `chip_config_name` for that call: "megacore" on v4 and v5p,
                  whose two TensorCores per chip are one JAX device (without
                  it a v4 description lists every core: 32 devices for
                  "v4:2x2x4"); `topology_description(name)` makes the call
  device_kind     what `jax.Device.device_kind` reports there
  hbm_gib         memory per device (GiB), for reading compile reports
  mesh            `config.mesh` for a dense model (-1 fills the remaining
                  devices)
  expert_parallel size of the `expert` mesh axis for an MoE model (reduced to
                  a divisor of `num_experts`); `fsdp` takes the rest
  vit_remat, decoder_remat
                  `model.vit.remat` / `model.decoder.remat` ("" off or a
                  policy of mmjax/models/stack.py: "full", "attention", ...)
  decoder_attention
                  `model.decoder.attention`: "splash" (the Pallas kernel) on
                  TPU presets (bidirectional image blocks included), "xla"
                  elsewhere
  grouped_matmul  `model.decoder.moe.grouped_matmul` (dropless MoE's expert
                  matmuls): "megablox" (the Pallas kernel) on TPU presets,
                  "ragged_dot" elsewhere
  rules           a layout name from `mmjax.parallel.rules.LAYOUTS`
  cpu_devices     `runtime.cpu_devices` (simulated devices; 0 on real
                  accelerators)
  data_workers    `data.workers` (Grain worker processes per host)

`apply_hardware(config, name)` writes those fields into a config and records
`config.hardware = name`, `config.topology` and `config.hardware_applied`.

Choosing a preset on the command line: pass it in the config argument,
`--config experiments/mm1.py:3b,tpu-v5p-512`, which applies it inside
`get_config`. `--config.hardware=NAME` only changes the string, because
ml_collections applies command-line overrides after `get_config` has run; an
entry point that honours it calls `resolve_hardware(config)` right after the
overrides are applied (and before JAX starts its backend, because of
`runtime.cpu_devices`). `resolve_hardware` re-applies the named preset when
it differs from the one applied, keeping any hardware field that was
overridden explicitly on the command line.

Remat: the TPU and GPU presets rematerialise whole layers ("full") in both
stacks. The decoder's attention materialises float32 score matrices
(`heads x 4096 x 4096` per sequence and layer), and "dots" would save them
for every layer; ViT blocks on 16 images per sequence are similar.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from mmjax.errors import ConfigError
from mmjax.parallel.mesh import axis_settings


@dataclasses.dataclass(frozen=True)
class Hardware:
    name: str
    platform: str
    devices: int
    topology: str
    device_kind: str
    hbm_gib: float
    mesh: dict
    chip_config: str = ""
    expert_parallel: int = 1
    vit_remat: str = "full"
    decoder_remat: str = "full"
    decoder_attention: str = "xla"
    grouped_matmul: str = "ragged_dot"
    rules: str = "fsdp"
    cpu_devices: int = 0
    data_workers: int = 0

    def mesh_for(self, num_experts: int = 0) -> dict:
        """`config.mesh` for a model with `num_experts` experts (0: dense)."""
        if self.platform == "cpu":
            return dict(self.mesh)  # the simulated meshes carry their own expert axis
        expert = math.gcd(self.expert_parallel, num_experts) if num_experts > 0 else 1
        if expert == 1:
            return dict(self.mesh)
        # Expert weights split over expert x fsdp, everything else over fsdp;
        # no data axis, which would replicate the experts.
        return dict(data=1, fsdp=-1, expert=expert, model=1)


def _cpu(n: int, mesh: dict) -> Hardware:
    return Hardware(name=f"cpu-{n}", platform="cpu", devices=n, topology="", device_kind="cpu",
                    hbm_gib=0.0, mesh=mesh, expert_parallel=mesh.get("expert", 1), vit_remat="",
                    decoder_remat="", cpu_devices=n, data_workers=0)


def _tpu(name: str, devices: int, topology: str, kind: str, hbm: float, *, mesh: dict | None = None,
         expert_parallel: int = 8, workers: int = 8) -> Hardware:
    megacore = topology.split(":")[0] in ("v4", "v5p")
    return Hardware(name=name, platform="tpu", devices=devices, topology=topology, device_kind=kind,
                    hbm_gib=hbm, mesh=mesh or dict(data=1, fsdp=-1, expert=1, model=1),
                    chip_config="megacore" if megacore else "", expert_parallel=expert_parallel,
                    data_workers=workers, decoder_attention="splash", grouped_matmul="megablox")


def _gpu(name: str, devices: int, kind: str, hbm: float, per_node: int = 8) -> Hardware:
    # FSDP inside a node (NVLink), data parallelism across nodes.
    mesh = dict(data=-1, fsdp=min(per_node, devices), expert=1, model=1)
    return Hardware(name=name, platform="gpu", devices=devices, topology="", device_kind=kind,
                    hbm_gib=hbm, mesh=mesh, expert_parallel=min(per_node, devices), data_workers=8)


_PRESETS = [
    _cpu(1, dict(data=1, fsdp=1, expert=1, model=1)),
    _cpu(4, dict(data=2, fsdp=2, expert=1, model=1)),
    _cpu(8, dict(data=2, fsdp=2, expert=2, model=1)),
    # TPU v4: 32 GiB per chip, 2 TensorCores per chip (one device).
    _tpu("tpu-v4-32", 16, "v4:2x2x4", "TPU v4", 32.0),
    _tpu("tpu-v4-128", 64, "v4:4x4x4", "TPU v4", 32.0),
    # TPU v5e: 16 GiB per chip, one core per chip.
    _tpu("tpu-v5e-256", 256, "v5e:16x16", "TPU v5 lite", 16.0, workers=4),
    # TPU v5p: 95 GiB per chip, 2 TensorCores per chip (one device).
    _tpu("tpu-v5p-128", 64, "v5p:4x4x4", "TPU v5", 95.0),
    _tpu("tpu-v5p-256", 128, "v5p:4x4x8", "TPU v5", 95.0),
    _tpu("tpu-v5p-512", 256, "v5p:4x8x8", "TPU v5", 95.0),
    # 512 chips: fsdp stays at 256 because ViT-H's 1280-wide weights do not
    # split 512 ways; the remaining factor 2 is data parallelism.
    _tpu("tpu-v5p-1024", 512, "v5p:8x8x8", "TPU v5", 95.0,
         mesh=dict(data=2, fsdp=-1, expert=1, model=1)),
    # TPU v6e (Trillium): 32 GiB per chip.
    _tpu("tpu-v6e-256", 256, "v6e:16x16", "TPU v6 lite", 32.0, workers=4),
    # TPU7x (Ironwood): 192 GB per chip, two TensorCores per chip that are
    # two devices of 96 GB each; named by TensorCores as Cloud TPU does
    # (tpu7x-256 = 4x4x8 = 128 chips = 256 devices).
    _tpu("tpu-7x-256", 256, "tpu7x:4x4x8", "TPU7x", 96e9 / 2 ** 30, workers=4),
    _gpu("gpu-h100-8", 8, "NVIDIA H100 80GB HBM3", 80.0),
    _gpu("gpu-h100-64", 64, "NVIDIA H100 80GB HBM3", 80.0),
    _gpu("gpu-h200-8", 8, "NVIDIA H200", 141.0),
]

HARDWARE: dict[str, Hardware] = {hw.name: hw for hw in _PRESETS}


def get_hardware(name: str) -> Hardware:
    if name not in HARDWARE:
        raise ConfigError(f"config.hardware={name!r} is not a hardware preset; choose one of {sorted(HARDWARE)}.")
    return HARDWARE[name]


def topology_description(name: str):
    """`jax.experimental.topologies.get_topology_desc` for a TPU preset: its
    `.devices` stand in for the slice's devices in ahead-of-time compilation
    (needs libtpu; no TPU attached)."""
    hw = get_hardware(name)
    if not hw.topology:
        raise ValueError(f"hardware preset {name!r} ({hw.platform}) has no TPU topology; "
                         "compile against the local devices instead.")
    from jax.experimental import topologies

    kwargs = {"chip_config_name": hw.chip_config} if hw.chip_config else {}
    return topologies.get_topology_desc(hw.topology, "tpu", **kwargs)


def _num_experts(config) -> int:
    moe = config.model.decoder.get("moe")
    return int(moe.num_experts) if moe is not None else 0


def preset_values(config, name: str) -> dict[str, Any]:
    """The config fields (dotted paths) preset `name` sets for this config's model."""
    hw = get_hardware(name)
    values = {
        "mesh": hw.mesh_for(_num_experts(config)),
        "rules": hw.rules,
        "model.vit.remat": hw.vit_remat,
        "model.decoder.remat": hw.decoder_remat,
        "model.decoder.attention": hw.decoder_attention,
        "runtime.cpu_devices": hw.cpu_devices if hw.platform == "cpu" else 0,
        "data.workers": hw.data_workers,
    }
    if config.model.decoder.get("moe") is not None:
        values["model.decoder.moe.grouped_matmul"] = hw.grouped_matmul
    return values


def _get(config, path: str):
    node = config
    for key in path.split("."):
        node = node[key]
    return axis_settings(node) if path == "mesh" else node


def _set(config, path: str, value) -> None:
    if path == "mesh":  # per key: works on a locked config and keeps unknown axes out
        for axis in axis_settings(config.mesh):  # the slice counts (mesh.dcn_*) are not the preset's
            if axis not in value:
                value = {**value, axis: 1}
        for axis, size in value.items():
            config.mesh[axis] = size
        return
    *parents, leaf = path.split(".")
    node = config
    for key in parents:
        node = node[key]
    node[leaf] = value


def _set_field(config, key: str, value) -> None:
    if key in config:
        config[key] = value
    else:
        with config.unlocked():
            config[key] = value


def apply_hardware(config, name: str):
    """Sets mesh, rules, remat, runtime.cpu_devices and data.workers from
    preset `name` and records `hardware`, `topology` and `hardware_applied`.
    Returns the config (changed in place)."""
    hw = get_hardware(name)
    for path, value in preset_values(config, name).items():
        _set(config, path, value)
    _set_field(config, "hardware", name)
    _set_field(config, "topology", hw.topology)
    _set_field(config, "hardware_applied", name)
    return config


def resolve_hardware(config) -> list[str]:
    """Re-applies `config.hardware` when it differs from the preset applied in
    `get_config` (i.e. `--config.hardware=NAME` was given). A field whose value
    no longer equals what the previous preset set was overridden explicitly
    and is kept. Returns the dotted paths it kept that way (empty when
    nothing changed or nothing was overridden)."""
    name = config.get("hardware", "")
    applied = config.get("hardware_applied", "")
    if not name or name == applied:
        return []
    new = preset_values(config, name)
    old = preset_values(config, applied) if applied else {}
    kept = []
    for path, value in new.items():
        if path in old and _get(config, path) != old[path]:
            kept.append(path)
            continue
        _set(config, path, value)
    _set_field(config, "topology", get_hardware(name).topology)
    _set_field(config, "hardware_applied", name)
    return kept


def num_devices(config) -> int:
    """Devices of the preset recorded in `config.hardware`."""
    return get_hardware(config.hardware).devices
