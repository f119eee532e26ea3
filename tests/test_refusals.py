"""Bad settings are refused before anything is built: one sentence naming the
field as the last line, a non-zero exit status, no traceback, nothing
compiled (mmjax/train/config_checks.py, mmjax/frontend.py).

Each case runs a command's `main` in-process under `run_command`, exactly as
`python -m <command>` does; a few run as real subprocesses at the end."""

import importlib
import os
import subprocess
import sys

import jax
import pytest

from mmjax.frontend import run_command

ROOT = os.path.join(os.path.dirname(__file__), "..")
TRAIN, AOT, SWEEP = "mmjax.train.__main__", "mmjax.bench.aot", "mmjax.bench.sweep"
MOE = ("--config.model.decoder.moe.num_experts=4",)

_compiles: list[str] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kwargs: _compiles.append(event) if event.endswith("backend_compile_duration") else None)

# (command, extra arguments, text the last line must contain)
CASES = [
    # a good sentence that used to be buried under a traceback (raised while building)
    (TRAIN, ("--config.model.vit.flavour=clipp",), "config.model.vit.flavour='clipp'"),
    (TRAIN, ("--config.model.connector.kind=pooling",), "config.model.connector.kind='pooling'"),
    (TRAIN, (*MOE, "--config.model.decoder.moe.top_k=8"), "config.model.decoder.moe.top_k=8"),
    (TRAIN, (*MOE, "--config.model.decoder.moe.dispatch=sparse"), "config.model.decoder.moe.dispatch='sparse'"),
    (TRAIN, ("--config.model.decoder.remat=everything",), "config.model.decoder.remat='everything'"),
    (TRAIN, ("--config.model.vit.remat=some",), "config.model.vit.remat='some'"),
    (TRAIN, ("--config.model.vit.feature_layer=-5",), "config.model.vit.feature_layer=-5"),
    (TRAIN, ("--config.model.vit.feature_layer=0",), "config.model.vit.feature_layer=0"),
    # no field named before
    (TRAIN, (*MOE, "--config.model.decoder.moe.moe_every=0"), "config.model.decoder.moe.moe_every=0"),
    (TRAIN, ("--config.model.decoder.head_dim=31",), "config.model.decoder.head_dim=31"),
    (TRAIN, ("--config.data.global_batch=0",), "config.data.global_batch=0"),
    (TRAIN, ("--config.data.loss_weights=(1.0,1.0)",), "config.data.loss_weights=(1.0, 1.0)"),
    (SWEEP, ("--grid", "2x2xa"), "--grid entry '2x2xa'"),
    # not refused at all before
    (TRAIN, (*MOE, "--config.model.decoder.moe.capacity_factor=0.0"), "config.model.decoder.moe.capacity_factor=0.0"),
    (TRAIN, (*MOE, "--config.model.decoder.moe.capacity_factor=-1.0"), "capacity_factor=-1.0"),
    (TRAIN, ("--config.optimizer.lr=-0.001",), "config.optimizer.lr=-0.001"),
    (TRAIN, ("--config.optimizer.lr=nan",), "config.optimizer.lr=nan"),
    (TRAIN, ("--config.optimizer.warmup_steps=500",), "config.optimizer.warmup_steps=500"),
    (TRAIN, ("--config.train.profile_steps=(5,2)",), "config.train.profile_steps=(5, 2)"),
    (TRAIN, ("--config.data.image_split=(4,2)",), "config.data.image_split=(4, 2)"),
    (SWEEP, ("--layouts", "fsdpp,data_paralel"), "--layouts names 'fsdpp'"),
    (SWEEP, ("--layouts", ","), "--layouts=',' names no layout"),
    # the flag layer
    (TRAIN, ("--config.train.stepz=5",), "did you mean config.train.steps?"),
    (TRAIN, ("--config.modle.dtype=float32",), "did you mean config.model?"),
    (TRAIN, ("--config.train.steps=abc",), "--config.train.steps=abc: 'abc' is not an integer."),
    (TRAIN, ("--config.optimizer.lr=fast",), "--config.optimizer.lr=fast: 'fast' is not a number."),
    (TRAIN, ("--config=experiments/tiny.py:bogus",), "experiments/tiny.py takes no argument, 'smoke' or 'sft'"),
    (TRAIN, ("--config=experiments/nothere.py",), "no such file 'experiments/nothere.py'"),
    (SWEEP, ("--steps=abc",), "--steps=abc"),
    # more fields, types, ranges, enumerations and cross-field constraints
    (TRAIN, ("--config.mesh.data=3",), "config.mesh (data=3 x fsdp=2 x expert=2 x model=1) needs 12 devices"),
    (TRAIN, ("--config.mesh.fsdp=0",), "config.mesh.fsdp=0"),
    (TRAIN, ("--config.data.global_batch=12",), "config.data.global_batch=12"),
    (TRAIN, ("--config.model.dtype=float16",), "config.model.dtype='float16'"),
    (TRAIN, ("--config.model.name=gpt",), "config.model.name='gpt'"),
    (TRAIN, ("--config.rules=fsdpp",), "config.rules='fsdpp'"),
    (TRAIN, ("--config.data.sources.caption=webdatasett:/x.tar",), "config.data.sources.caption="),
    (TRAIN, ("--config.data.sources.text=jsonl:/nonexistent/*.jsonl",), "config.data.sources.text"),
    (TRAIN, ("--config.train.on_nonfinite=ignore",), "config.train.on_nonfinite='ignore'"),
    (TRAIN, ("--config.train.on_bad_checkpoint=ignore",), "config.train.on_bad_checkpoint='ignore'"),
    (TRAIN, ("--config.optimizer.b2=1.0",), "config.optimizer.b2=1.0"),
    (TRAIN, ("--config.model.decoder.heads=5",), "config.model.decoder.heads=5"),
    (TRAIN, ("--config.model.vit.image_size=30",), "config.model.vit.image_size=30"),
    (TRAIN, ("--config.model.connector.num_tokens=5",), "config.model.connector.num_tokens=5"),
    (TRAIN, ("--config.data.max_images=40",), "config.data.max_images=40"),
    (TRAIN, ("--config.data.mix_weights=(0.0,0.0,0.0)",), "config.data.mix_weights=(0.0, 0.0, 0.0)"),
    (TRAIN, ("--config.evaluators.caption_accuracy.num_examples=0",),
     "config.evaluators.caption_accuracy.num_examples=0"),
    (TRAIN, ("--config.train.grad_accum_steps=3",), "config.train.grad_accum_steps=3"),
    (TRAIN, ("--config=experiments/mm1.py:smoke-3b", "--config.hardware=tpu-v9-8"), "config.hardware='tpu-v9-8'"),
    (TRAIN, ("--config.optimizer.no_decay=('norms','bias')",), "config.optimizer.no_decay=('norms', 'bias')"),
    (TRAIN, ("--config.optimizer.module_lr_scale=vit:0",), "config.optimizer.module_lr_scale item 'vit:0'"),
    (TRAIN, ("--config.init_from=('/nonexistent/vit',)",), "config.init_from entry '/nonexistent/vit'"),
    (TRAIN, (*MOE, "--config.model.decoder.scan=True"), "config.model.decoder.scan=True"),
    (TRAIN, ("--config.model.decoder.moe.num_experts=3",), "config.model.decoder.moe.num_experts=3"),
    (TRAIN, ("--config.data.seq_len=1",), "config.data.seq_len=1"),
    (TRAIN, ("--config.train.watchdog_s=-1.0",), "config.train.watchdog_s=-1.0"),
    (TRAIN, ("--config.data.pack_window=0",), "config.data.pack_window=0"),
    (TRAIN, ("--config.model.vit.attention=flash",), "config.model.vit.attention='flash'"),
    (SWEEP, ("--config.data.global_batch=0",), "config.data.global_batch=0"),
    (SWEEP, ("--config.model.decoder.moe.dispatch=sparse",), "config.model.decoder.moe.dispatch='sparse'"),
    (AOT, ("--topology", "v9:2x2"), "v9:2x2"),
    (AOT, ("--config.model.decoder.moe.router_z_weight=-1.0",), "config.model.decoder.moe.router_z_weight=-1.0"),
    (AOT, ("--config.train.keep_checkpoints=0",), "config.train.keep_checkpoints=0"),
]


def _argv(command: str, extra: tuple, tmp_path) -> list[str]:
    config = [] if any(a.startswith("--config=") for a in extra) else ["--config", "experiments/tiny.py"]
    if command == TRAIN:
        return [*config, "--workdir", str(tmp_path / "run"), *extra]
    if command == SWEEP:
        return [*config, "--workdir", str(tmp_path / "sweep"), *extra]
    topology = [] if "--topology" in extra else ["--topology", "v5p:2x2x1"]
    return [*config, *topology, *extra]


def _run(command: str, argv: list[str], capsys) -> tuple[int, str, str]:
    main = importlib.import_module(command).main
    try:
        status = run_command(main, argv)
    except SystemExit as exit_:  # what the interpreter does with it
        status = exit_.code if isinstance(exit_.code, int) else 1
        if not isinstance(exit_.code, int):
            print(exit_.code, file=sys.stderr)
    out = capsys.readouterr()
    return status, out.out, out.err


@pytest.mark.parametrize("command,extra,named", CASES,
                         ids=[f"{c.split('.')[-1].strip('_')}:{' '.join(e)}" for c, e, _ in CASES])
def test_bad_setting_is_one_sentence_naming_the_field(command, extra, named, tmp_path, capsys, monkeypatch):
    if command == AOT:
        pytest.importorskip("libtpu", reason="ahead-of-time TPU compilation needs the tpu extra")
    monkeypatch.chdir(ROOT)
    compiles = len(_compiles)
    status, out, err = _run(command, _argv(command, extra, tmp_path), capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert status != 0, out + err
    assert "Traceback" not in out + err
    assert lines and named in lines[-1], lines[-1:]
    assert lines[-1].startswith(("error: ", "config error: ", "data error: ")), lines[-1]
    assert len(_compiles) == compiles, "something was compiled before the refusal"


def test_the_battery_covers_forty_distinct_settings():
    assert len({(c, e) for c, e, _ in CASES}) >= 40
    assert {c for c, _, _ in CASES} == {TRAIN, AOT, SWEEP}


def test_a_sweep_that_can_use_no_candidate_exits_non_zero(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    status, out, err = _run(SWEEP, ["--workdir", str(tmp_path), "--grid", "3x1x1", "--steps", "1"], capsys)
    assert status == 1 and "none of the 2 candidates could be used" in err.splitlines()[-1]
    assert "skipped" in out and (tmp_path / "results.csv").exists()


@pytest.mark.slow
def test_refusals_from_the_command_line(tmp_path):
    """The real processes: exit status 2 for a config refusal, the sentence as
    the last line of stderr, no traceback; MMJAX_TRACEBACK=1 shows it."""
    def run(*args, env=None):
        return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=300, env=dict(os.environ, **(env or {})))

    out = run("mmjax.train", "--config", "experiments/tiny.py", "--workdir", str(tmp_path),
              "--config.model.decoder.moe.num_experts=4", "--config.model.decoder.moe.top_k=8")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == ("config error: config.model.decoder.moe.top_k=8 exceeds "
                                                   "config.model.decoder.moe.num_experts=4.")
    out = run("mmjax.train", "--config", "experiments/tiny.py", "--workdir", str(tmp_path),
              "--config.train.stepz=5")
    assert out.returncode == 1 and out.stderr.strip().splitlines()[-1] == (
        "error: --config.train.stepz=5: config.train has no field 'stepz'; did you mean config.train.steps?")
    out = run("mmjax.bench.sweep", "--workdir", str(tmp_path), "--grid", "2x2xa")
    assert out.returncode == 2 and "Traceback" not in out.stderr and "--grid entry" in out.stderr
    out = run("mmjax.train", "--config", "experiments/tiny.py", "--workdir", str(tmp_path),
              "--config.optimizer.lr=nan", env={"MMJAX_TRACEBACK": "1"})
    assert out.returncode == 2 and "Traceback" in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("config error: config.optimizer.lr=nan")


def test_data_source_errors_name_the_stream(tmp_path, capsys, monkeypatch):
    """An empty shard, a file that is not a tar, and Parquet without the
    stream's columns: each refusal names `config.data.sources.<stream>`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.chdir(ROOT)
    (tmp_path / "empty.tar").write_bytes(b"")
    (tmp_path / "notatar.tar").write_bytes(b"this is plain text, not a tar archive\n" * 40)
    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "text.parquet")
    cases = {"caption": (f"webdataset:{tmp_path}/empty.tar", "no records"),
             "interleaved": (f"webdataset:{tmp_path}/notatar.tar", "is not a tar archive"),
             "text": (f"parquet:{tmp_path}/text.parquet", "has no column 'text'")}
    for stream, (spec, reason) in cases.items():
        compiles = len(_compiles)
        status, out, err = _run(TRAIN, ["--config", "experiments/tiny.py", "--workdir", str(tmp_path / stream),
                                        f"--config.data.sources.{stream}={spec}"], capsys)
        last = err.strip().splitlines()[-1]
        assert status == 2 and "Traceback" not in out + err, err
        assert last.startswith(f"data error: config.data.sources.{stream}") and reason in last, last
        assert len(_compiles) == compiles
