"""Multi-process runs: how a process finds the others (`mmjax.train.distributed`),
the local launcher, and a two-process training run that matches one process."""

import json
import os
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import free_port

from mmjax.train.distributed import ProcessGroup, first_slurm_host, resolve

ROOT = os.path.join(os.path.dirname(__file__), "..")
LAUNCHER = os.path.join(ROOT, "launch", "local_multiprocess.sh")
SMALL = ["--config.train.steps=6", "--config.optimizer.warmup_steps=3", "--config.train.log_every=1",
         "--config.train.checkpoint_every=3",
         "--config.eval.caption_accuracy=False", "--config.eval.shapes_caption=False",
         "--config.eval.shapes_vqa=False", "--config.model.vit.depth=1", "--config.model.decoder.layers=1",
         "--config.data.seq_len=64", "--config.data.global_batch=8", "--config.data.shards=2"]


def _resolve(env, **flags):
    return resolve(env=env, on_tpu_vm=False, **flags)


def test_a_plain_run_is_single_process():
    assert _resolve({}) is None
    assert _resolve({"HOME": "/root", "PATH": "/usr/bin"}) is None


def test_flags_win_over_the_environment_field_by_field():
    env = {"MMJAX_COORDINATOR_ADDRESS": "10.0.0.2:1234", "MMJAX_NUM_PROCESSES": "4", "MMJAX_PROCESS_ID": "3"}
    assert _resolve(env) == ProcessGroup("env", "10.0.0.2:1234", 4, 3)
    assert _resolve(env, process_id=1) == ProcessGroup("flags", "10.0.0.2:1234", 4, 1)
    got = _resolve({}, coordinator_address="h:9", num_processes=2, process_id=0, local_device_ids=[0, 1])
    assert got == ProcessGroup("flags", "h:9", 2, 0, (0, 1))


@pytest.mark.parametrize("flags, message", [
    ({"num_processes": 2, "process_id": 0}, "--coordinator_address"),
    ({"coordinator_address": "h:1", "num_processes": 2}, "--process_id"),
    ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, "process_id=2"),
    ({"coordinator_address": "h", "num_processes": 2, "process_id": 0}, "HOST:PORT"),
    ({"coordinator_address": "h:1", "num_processes": 0, "process_id": 0}, "at least 1"),
])
def test_incomplete_or_inconsistent_settings_are_one_sentence(flags, message):
    with pytest.raises(ValueError, match=message):
        _resolve({}, **flags)


def test_slurm_node_list_first_host():
    assert first_slurm_host("node7") == "node7"
    assert first_slurm_host("node7,node9") == "node7"
    assert first_slurm_host("gpu[003-005,010],cpu01") == "gpu003"
    assert first_slurm_host("gpu[010,003-005]") == "gpu010"
    assert first_slurm_host("rack1-n[07-08]-ib,x") == "rack1-n07-ib"


SLURM = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_LOCALID": "0",
         "SLURM_STEP_NODELIST": "gpu[003-006]", "SLURM_STEP_NUM_NODES": "4", "SLURM_STEP_NUM_TASKS": "4"}


def test_slurm_srun_step_with_one_task_per_node_keeps_all_node_devices():
    assert _resolve(SLURM) == ProcessGroup("slurm", "gpu003:44242", 4, 2, None)
    assert _resolve({**SLURM, "MMJAX_COORDINATOR_PORT": "7000"}).coordinator_address == "gpu003:7000"


def test_slurm_with_several_tasks_per_node_gives_each_task_one_device():
    env = {**SLURM, "SLURM_STEP_NUM_NODES": "2", "SLURM_LOCALID": "1"}
    assert _resolve(env).local_device_ids == (1,)


def test_slurm_single_task_and_batch_script_are_single_process():
    assert _resolve({**SLURM, "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1"}) is None
    batch_step = {k: v for k, v in SLURM.items() if not k.startswith("SLURM_STEP_")}
    assert _resolve(batch_step) is None


def test_explicit_settings_win_over_slurm():
    env = {**SLURM, "MMJAX_COORDINATOR_ADDRESS": "a:1", "MMJAX_NUM_PROCESSES": "2", "MMJAX_PROCESS_ID": "1"}
    assert _resolve(env).source == "env"


def test_cloud_tpu_multi_host_is_left_to_jax_and_single_host_is_plain():
    gke = {"TPU_WORKER_HOSTNAMES": "w-0,w-1,w-2,w-3", "TPU_WORKER_ID": "1"}
    assert resolve(env=gke, on_tpu_vm=True) == ProcessGroup("tpu", auto=True)
    assert resolve(env={"TPU_WORKER_HOSTNAMES": "w-0", "MEGASCALE_NUM_SLICES": "2"}, on_tpu_vm=True).auto
    assert resolve(env={"TPU_WORKER_HOSTNAMES": "w-0"}, on_tpu_vm=True) is None
    assert resolve(env=gke, on_tpu_vm=False) is None


def test_help_documents_the_multiprocess_flags():
    out = subprocess.run([sys.executable, "-m", "mmjax.train", "--helpshort"], check=False, cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for flag in ("--coordinator_address", "--num_processes", "--process_id", "MMJAX_NUM_PROCESSES"):
        assert flag in out.stdout, flag


def test_launcher_stops_the_others_when_one_process_fails(tmp_path):
    """A stand-in interpreter: process 1 fails at once, the others would run for a minute."""
    fake = tmp_path / "python"
    fake.write_text(f"""#!/bin/sh
case "$1" in -c) exec {sys.executable} "$@" ;; esac
case " $* " in *" --process_id=1 "*) echo "process 1 fails"; exit 3 ;; esac
echo "waiting"
exec sleep 60
""")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    t0 = time.perf_counter()
    out = subprocess.run(["bash", LAUNCHER, "cfg.py", str(tmp_path / "w"), "3", "2"],
                         env=dict(os.environ, PYTHON=str(fake)), capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 3, out.stdout + out.stderr
    assert time.perf_counter() - t0 < 30
    assert "[1] process 1 fails" in out.stdout.splitlines()
    assert "process 1 exited with status 3" in out.stderr


def test_launcher_usage():
    out = subprocess.run(["bash", LAUNCHER], check=False, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "usage:" in out.stderr


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    """2 processes x 4 CPU devices (gloo) against 1 process x 8 devices, same
    mesh, same global batches (config.data.shards=2): the same losses.
    Both runs skip XLA's backend optimisations, which only shortens compiles."""
    xla_flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
    env = dict(os.environ, PYTHON=sys.executable, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags)
    multi, single = tmp_path / "multi", tmp_path / "single"
    # The reference runs alongside the launcher: the test's wall time is the longer of the two.
    # Each gets its own session so that a timeout stops it with everything it started.
    commands = {"multi": ["bash", LAUNCHER, "experiments/tiny.py", str(multi), "2", "4", *SMALL],
                "single": [sys.executable, "-m", "mmjax.train", "--config", "experiments/tiny.py",
                           "--workdir", str(single), "--config.runtime.cpu_devices=8", *SMALL]}
    procs, logs = {}, {}
    for name, cmd in commands.items():
        with open(tmp_path / f"{name}.out", "w") as out, open(tmp_path / f"{name}.err", "w") as err:
            procs[name] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, start_new_session=True)
    try:
        for name, p in procs.items():
            p.wait(timeout=400)
            logs[name] = (tmp_path / f"{name}.out").read_text() + (tmp_path / f"{name}.err").read_text()
            assert p.returncode == 0, f"{name}: " + logs[name][-4000:]
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    stdout = (tmp_path / "multi.out").read_text()

    lines = stdout.splitlines()
    for i in range(2):
        assert any(line.startswith(f"[{i}] process {i}/2: 4 local devices, 8 global devices") for line in lines)
    assert any(line.startswith("[0] step 6/6") for line in lines)
    assert not any(line.startswith("[1] step ") for line in lines)  # only process 0 reports
    assert "[Gloo]" not in stdout and any("Gloo connection lines hidden" in line for line in lines)

    assert {"3", "6"} <= set(os.listdir(multi / "checkpoints"))
    for step in ("3", "6"):  # every process saved its data-iterator state
        assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(multi / "checkpoints" / step / "data"))
    # One writer: one event file, every step logged once, and the run's files present.
    assert len(list((multi / "tensorboard").glob("events.out.tfevents.*"))) == 1
    records = [r for r in _metrics(multi) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 7))
    assert sum("compile_time_s" in r for r in _metrics(multi)) == 1
    assert (multi / "config.json").exists() and (multi / "summary.json").exists()

    reference_records = [r for r in _metrics(single) if "loss" in r]
    assert [r["step"] for r in reference_records] == list(range(1, 7))
    np.testing.assert_allclose([r["loss"] for r in records], [r["loss"] for r in reference_records], rtol=1e-4)


@pytest.mark.slow
def test_sigterm_on_one_process_stops_both_at_the_same_step(tmp_path):
    """Preemption of one host: SIGTERM reaches process 1 only; at the next step
    boundary both processes agree, save the same checkpoint (each with its own
    data-iterator state) and exit 0."""
    port = free_port()
    xla_flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags)
    args = [a for a in SMALL if not a.startswith(("--config.train.steps", "--config.train.checkpoint_every"))]
    procs = []
    for pid in range(2):
        cmd = [sys.executable, "-m", "mmjax.train", "--config", "experiments/tiny.py", "--workdir", str(tmp_path),
               f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={pid}",
               "--config.runtime.cpu_devices=4", "--config.train.steps=500", "--config.train.checkpoint_every=1000",
               *args]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, start_new_session=True))
    try:
        deadline = time.time() + 400
        while time.time() < deadline:
            assert all(p.poll() is None for p in procs), [p.stdout.read()[-3000:] for p in procs if p.poll()]
            path = tmp_path / "metrics.jsonl"
            if path.exists() and any(r.get("step", 0) >= 3 and "loss" in r for r in _metrics(tmp_path)):
                break
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert [p.returncode for p in procs] == [0, 0], [o[-3000:] for o in outs]
    # Process 0 (the only one that reports) never got the signal, yet stopped with process 1.
    saved = [int(line.split("saved step ")[1].split()[0]) for line in outs[0].splitlines()
             if "stop signal on another process received: saved step" in line]
    assert len(saved) == 1 and 3 <= saved[0] < 500, outs[0][-3000:]
    assert os.listdir(tmp_path / "checkpoints") == [str(saved[0])]  # the same step for both processes
    step_dir = tmp_path / "checkpoints" / str(saved[0])
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(step_dir / "data"))
    assert json.loads((tmp_path / "summary.json").read_text())["preempted_at"] == saved[0]
