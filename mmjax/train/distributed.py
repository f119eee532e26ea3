"""Joining a multi-process (multi-host) run: `jax.distributed` set-up for the trainer.

`initialize_from_flags_or_env` decides whether this process is one of several
and, if so, connects it to the others with `jax.distributed.initialize`. Where
the process count, the process id and the coordinator come from, first match wins:

1. the arguments (the trainer's `--coordinator_address`, `--num_processes`,
   `--process_id` flags), each falling back to its environment variable
   `MMJAX_COORDINATOR_ADDRESS`, `MMJAX_NUM_PROCESSES`, `MMJAX_PROCESS_ID`;
   all three must then be known;
2. SLURM: inside an `srun` step with more than one task (`SLURM_JOB_ID`,
   `SLURM_STEP_NUM_TASKS` or `SLURM_NTASKS` > 1, `SLURM_PROCID`,
   `SLURM_STEP_NODELIST`; the batch script itself is a single process). The coordinator
   is the step's first node on port `MMJAX_COORDINATOR_PORT` (or
   `JAX_COORDINATOR_PORT`, else one derived from the job id). With one task
   per node every task keeps all of its node's accelerators; with several tasks
   per node each task gets the one numbered `SLURM_LOCALID`;
3. Open MPI (`mpirun`) with more than one rank: JAX reads the ranks itself;
4. a Cloud TPU VM of a multi-host slice or of a multislice run (TPU VM pods
   created with `gcloud compute tpus tpu-vm`, GKE/XPK TPU node pools): JAX
   finds the workers from the VM metadata or the `TPU_WORKER_*` /
   `MEGASCALE_*` environment.

Anything else (a laptop, one GPU box, a single-host TPU VM) is a plain
single-process run and nothing is done.

The call must come before anything creates a JAX backend (`jax.devices()`,
any computation) and after `jax_num_cpu_devices` is set. On CPU the
processes exchange collectives over gloo (TCP).
"""

from __future__ import annotations

import dataclasses
import http.client
import os
import re
import sys
import urllib.request
from collections.abc import Mapping, Sequence

ENV_COORDINATOR_ADDRESS = "MMJAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "MMJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "MMJAX_PROCESS_ID"
ENV_COORDINATOR_PORT = "MMJAX_COORDINATOR_PORT"


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
    """How this process joins the others.

    `source` names where the settings came from: "flags", "env", "slurm",
    "openmpi" or "tpu". `auto` means JAX fills in whatever is None from the
    cluster environment; otherwise the values are passed as they are.
    """

    source: str
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    auto: bool = False


def _int(value, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} is not an integer.") from None


def _explicit(coordinator_address, num_processes, process_id, local_device_ids, env) -> ProcessGroup | None:
    """Flags, each falling back to its MMJAX_* environment variable."""
    fields = {
        "coordinator_address": (coordinator_address, ENV_COORDINATOR_ADDRESS),
        "num_processes": (num_processes, ENV_NUM_PROCESSES),
        "process_id": (process_id, ENV_PROCESS_ID),
    }
    values, from_flags = {}, False
    for name, (flag_value, env_name) in fields.items():
        if flag_value is not None and flag_value != "":
            values[name], from_flags = flag_value, True
        elif env.get(env_name, "") != "":
            values[name] = env[env_name]
    if not values:
        return None
    missing = [f"--{name} (or {fields[name][1]})" for name in fields if name not in values]
    if missing:
        given = ", ".join(f"{name}={values[name]!r}" for name in values)
        verb = "is" if len(missing) == 1 else "are"
        raise ValueError(f"a multi-process run was requested ({given}) but {' and '.join(missing)} {verb} "
                         "not set; give all three of coordinator address, process count and process id.")
    n = _int(values["num_processes"], "num_processes")
    pid = _int(values["process_id"], "process_id")
    address = str(values["coordinator_address"])
    if n < 1:
        raise ValueError(f"num_processes={n} must be at least 1.")
    if not 0 <= pid < n:
        raise ValueError(f"process_id={pid} must be in [0, num_processes={n}).")
    if not re.fullmatch(r"\S+:\d+", address):
        raise ValueError(f"coordinator_address={address!r} must be HOST:PORT, e.g. 10.0.0.2:8476.")
    return ProcessGroup("flags" if from_flags else "env", address, n, pid,
                        None if local_device_ids is None else tuple(local_device_ids))


def first_slurm_host(nodelist: str) -> str:
    """The first hostname of a SLURM host list such as `gpu[003-005,010],cpu01`
    (-> `gpu003`) or `node7,node9` (-> `node7`)."""
    head = re.match(r"[^,\[]*", nodelist).group(0)
    rest = nodelist[len(head):]
    if not rest.startswith("["):
        return head
    first = re.match(r"\[([^,\-\]]*)[^\]]*\]([^,\[]*)", rest)
    if first is None:
        raise ValueError(f"cannot read the first host of the SLURM node list {nodelist!r}.")
    return head + first.group(1) + first.group(2)


def _slurm(local_device_ids, env) -> ProcessGroup | None:
    # SLURM_STEP_* exist only inside an srun step, not in the batch script itself.
    needed = ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_STEP_NODELIST")
    tasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")
    if any(not env.get(name) for name in needed) or tasks is None or _int(tasks, "SLURM_STEP_NUM_TASKS") < 2:
        return None
    nodelist, n = env["SLURM_STEP_NODELIST"], _int(tasks, "SLURM_STEP_NUM_TASKS")
    port = env.get(ENV_COORDINATOR_PORT) or env.get("JAX_COORDINATOR_PORT")
    if not port:  # the same on every task of the job, away from the usual service ports
        port = str(40000 + _int(env["SLURM_JOB_ID"], "SLURM_JOB_ID") % 20000)
    if local_device_ids is not None:
        devices = tuple(local_device_ids)
    else:
        nodes = env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES")
        one_task_per_node = nodes is not None and _int(nodes, "SLURM_STEP_NUM_NODES") == n
        if one_task_per_node or "JAX_LOCAL_DEVICE_IDS" in env or "SLURM_LOCALID" not in env:
            devices = None  # all of this node's devices (or JAX_LOCAL_DEVICE_IDS, read by JAX)
        else:
            devices = (_int(env["SLURM_LOCALID"], "SLURM_LOCALID"),)
    return ProcessGroup("slurm", f"{first_slurm_host(nodelist)}:{port}", n,
                        _int(env["SLURM_PROCID"], "SLURM_PROCID"), devices)


def _openmpi(local_device_ids, env) -> ProcessGroup | None:
    size = env.get("OMPI_COMM_WORLD_SIZE")
    if "OMPI_MCA_orte_hnp_uri" not in env or size is None or _int(size, "OMPI_COMM_WORLD_SIZE") < 2:
        return None
    return ProcessGroup("openmpi", local_device_ids=None if local_device_ids is None else tuple(local_device_ids),
                        auto=True)


def _on_cloud_tpu_vm() -> bool:
    """Whether `import jax` found TPU chips and libtpu (it records this before any backend starts)."""
    try:
        from jax._src import cloud_tpu_init
    except ImportError:
        return False
    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def _gce_metadata(key: str, timeout_s: float = 5.0) -> str | None:
    """A TPU VM instance attribute from the GCE metadata server, or None."""
    host = os.environ.get("GCE_METADATA_IP", "metadata.google.internal")
    request = urllib.request.Request(f"http://{host}/computeMetadata/v1/instance/attributes/{key}",
                                     headers={"Metadata-Flavor": "Google"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.read().decode()
    except (OSError, ValueError, http.client.HTTPException):  # unreachable or malformed: not known
        return None


def _tpu_hosts_and_slices(env) -> tuple[int | None, int]:
    """(hosts in this slice or None when unknown, number of slices)."""
    slices = env.get("MEGASCALE_NUM_SLICES")
    hostnames = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES")  # GKE
    if hostnames is None:  # a TPU VM created with gcloud: ask the metadata server
        hostnames = _gce_metadata("worker-network-endpoints")
        if slices is None:
            tpu_env = _gce_metadata("tpu-env") or ""
            found = re.search(r"^MEGASCALE_NUM_SLICES:\s*'?(\d+)", tpu_env, re.MULTILINE)
            slices = found.group(1) if found else None
    hosts = None if hostnames is None else len([h for h in hostnames.split(",") if h.strip()])
    return hosts, int(slices or 1)


def _cloud_tpu(env, on_tpu_vm: bool) -> ProcessGroup | None:
    if not on_tpu_vm:
        return None
    hosts, slices = _tpu_hosts_and_slices(env)
    if hosts == 1 and slices == 1:
        return None  # a single-host TPU VM
    return ProcessGroup("tpu", auto=True)  # several hosts (or unknown: let JAX decide)


def resolve(coordinator_address: str | None = None, num_processes: int | None = None,
            process_id: int | None = None, local_device_ids: Sequence[int] | None = None,
            env: Mapping[str, str] | None = None, on_tpu_vm: bool | None = None) -> ProcessGroup | None:
    """How this process joins a multi-process run, or None for a single-process run.

    Raises ValueError (one sentence) for incomplete or inconsistent settings.
    """
    env = os.environ if env is None else env
    group = (_explicit(coordinator_address, num_processes, process_id, local_device_ids, env)
             or _slurm(local_device_ids, env) or _openmpi(local_device_ids, env))
    if group is None:
        group = _cloud_tpu(env, _on_cloud_tpu_vm() if on_tpu_vm is None else on_tpu_vm)
    return group


def initialize_from_flags_or_env(coordinator_address: str | None = None, num_processes: int | None = None,
                                 process_id: int | None = None,
                                 local_device_ids: Sequence[int] | None = None) -> ProcessGroup | None:
    """Connects this process to the others of a multi-process run (see the
    module docstring for where the settings come from); a no-op returning None
    for a plain single-process run or when `jax.distributed` is already up.

    Call it after `jax_num_cpu_devices` is set and before anything creates a
    JAX backend. Prints one line per process: its index, the process count and
    the local and global device counts.
    """
    import jax

    if jax.distributed.is_initialized():
        return None
    group = resolve(coordinator_address, num_processes, process_id, local_device_ids)
    if group is None:
        return None
    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:  # cross-process collectives on CPU
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    devices = None if group.local_device_ids is None else list(group.local_device_ids)
    if group.auto:
        jax.distributed.initialize(group.coordinator_address, group.num_processes, group.process_id, devices)
    else:
        jax.distributed.initialize(group.coordinator_address, group.num_processes, group.process_id, devices,
                                   cluster_detection_method="deactivate")
    coordinator = group.coordinator_address
    if coordinator is None:  # found by JAX from the cluster environment
        from jax._src import distributed as jax_distributed

        coordinator = getattr(jax_distributed.global_state, "coordinator_address", None) or "auto-detected"
    print(f"process {jax.process_index()}/{jax.process_count()}: {jax.local_device_count()} local devices, "
          f"{jax.device_count()} global devices ({jax.devices()[0].platform}); coordinator {coordinator}, "
          f"from {group.source}", file=sys.stdout, flush=True)
    return group
