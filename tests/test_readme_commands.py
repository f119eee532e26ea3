"""Every command README.md prints is either run here exactly as printed (the
ones that take under a minute) or listed with the reason it is not, so a
documented command cannot rot unnoticed."""

import os
import shutil
import subprocess
import sys

import pytest

from readme_commands import readme_commands

ROOT = os.path.join(os.path.dirname(__file__), "..")

# command -> (timeout in seconds, what its output must contain)
RUN = {
    "python -m mmjax.train --helpshort": (120, "--workdir"),
    "python -m mmjax.eval --helpshort": (120, "--converted"),
    "python -m mmjax.bench.decode --config experiments/tiny.py --workdir /tmp/mmjax-bench-decode":
        (300, "tokens: identical"),
    "python -m mmjax.bench.aot --config experiments/tiny.py --topology v5p:2x2x2 --workdir /tmp/mmjax-aot":
        (300, "wrote /tmp/mmjax-aot/aot_report.json"),
}
LONGER = "longer than a minute on a 2-core machine"
NOT_RUN = {
    "python3.12 -m venv .venv && . .venv/bin/activate && pip install -q -e . && python -m mmjax.train "
    "--config experiments/tiny.py --workdir /tmp/mmjax-tiny": f"{LONGER}; test_train.py trains the same experiment "
                                                              "shortened, from the command line too",
    'python3.12 -m venv .venv && . .venv/bin/activate && pip install -q -e ".[test,tpu]" && '
    "python -m pytest -q -n 2 tests": "it is .ci/run itself (test_train.py checks the two agree)",
    'pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu && pip install -e ".[parity]"':
        "downloads torch; the opt-in live parity tests use it when installed",
    "python -m mmjax.train --config experiments/tiny.py --workdir DIR [--config.FIELD=VALUE ...]": "a synopsis",
    'pip install -e ".[lm_eval]" && python -m mmjax.eval.lm_harness --config experiments/tiny.py '
    "--workdir /tmp/mmjax-tiny --tasks hellaswag": "installs the lm_eval extra and downloads HellaSwag; "
                                                   "test_lm_harness.py runs a local task when lm-eval is installed",
    "python -m mmjax.train --config experiments/tiny.py:sft --workdir /tmp/mmjax-tiny-sft "
    "--config.init_from=/tmp/mmjax-tiny": "needs the trained workdir of the README's first command; "
                                          "test_sft.py chains a shortened pre-training and fine-tuning",
    "python -m mmjax.eval --config experiments/tiny.py --workdir /tmp/mmjax-tiny":
        "needs the trained workdir of the README's first command; test_eval_cli.py scores a shortened run",
    "python -m mmjax.eval --config experiments/tiny.py --workdir DIR --step 200 --tasks shapes_vqa":
        "a synopsis; test_eval_cli.py picks a step and a task the same way",
    "python -m mmjax.bench.loop_overhead --config experiments/tiny.py --workdir /tmp/mmjax-overhead":
        f"{LONGER}; test_frontend.py runs it with 3 steps",
    "python -m mmjax.train --config experiments/tiny.py --workdir DIR "
    "--config.data.sources.caption='webdataset:/data/cc3m/{00000..00099}.tar' "
    "--config.data.sources.text='jsonl:/data/text/*.jsonl'": "needs the user's data; test_data_formats.py trains "
                                                             "on generated shards of every format",
    "python -m mmjax.data.convert --input='webdataset:/data/cc3m/*.tar' --stream=caption --output=/data/cc3m-ar "
    "--records_per_shard=10000": "needs the user's data; test_data_formats.py converts generated shards",
    "python -m mmjax.train --config experiments/tiny_moe.py --workdir /tmp/mmjax-tiny-moe":
        f"{LONGER}; test_moe.py trains the same experiment shortened",
    "python -m mmjax.bench.moe_vs_dense --steps 20 --workdir /tmp/bench": f"{LONGER}; test_moe_vs_dense.py",
    "python -m mmjax.tools.convert_hf --kind clip|siglip|llama|mixtral SRC_DIR DST_DIR":
        "a synopsis; test_hf_goldens.py converts generated checkpoints",
    "python -m mmjax.train --config experiments/mm1.py:smoke-3b --workdir /tmp/mm1-smoke":
        f"{LONGER}; test_experiments.py checks the smoke configs",
    "python -m mmjax.bench.aot --config experiments/mm1.py:3b-moe": f"{LONGER} (a 512-chip compile)",
    "python -m mmjax.bench.aot --config experiments/tiny.py --topology v5p:2x2x1 --num_slices 2":
        "test_multislice.py compiles the same two-slice step and checks its report",
    "python -m mmjax.bench.aot --config experiments/mm1.py:3b --config.hardware=tpu-v5p-256":
        f"{LONGER} (a 256-chip compile)",
    "python -m mmjax.bench.moe_vs_dense --config experiments/moe_pairs.py:tiny --workdir /tmp/moe "
    "[--topology v5p:2x2x2]": f"{LONGER}; test_moe_vs_dense.py",
    "python -m mmjax.bench.moe_vs_dense --config experiments/moe_pairs.py:3b --topology v5p:4x8x8 --aot_only":
        f"{LONGER} (three 256-chip compiles, 19 min); test_moe_vs_dense.py compiles a small pair --aot_only",
    "python -m mmjax.bench.sweep --config experiments/tiny.py --workdir /tmp/sweep [--grid 2x2x2x1,8x1x1x1] "
    "[--topology v5p:2x2x2]": f"{LONGER}; test_sweep.py",
    "python -m mmjax.bench.sweep --config experiments/tiny.py --aot_only --topology v5p:2x2x2 "
    "--workdir /tmp/sweep-aot": f"{LONGER}; test_sweep.py runs an AOT-only sweep",
    "python -m mmjax.bench.sweep --config experiments/mm1.py:3b --aot_only --topology v5p:4x4x4 "
    "--grid 1x64x1x1,2x32x1x1 --layouts fsdp --workdir /tmp/sweep-3b": f"{LONGER} (minutes per candidate)",
    "python -m mmjax.train --config experiments/clip_tiny.py --workdir /tmp/clip":
        f"{LONGER}; test_pairs.py and test_contrastive_eval.py train it shortened",
    "python -m mmjax.train --config experiments/tiny.py --workdir /tmp/mm1-from-clip "
    "--config.init_from=\"('/tmp/clip',)\"": "needs the trained workdir of the command above; "
                                            "test_init_from_workdir.py hands a dual encoder's ViT to MM1",
    "python -m mmjax.train --config experiments/vmoe_tiny.py --workdir /tmp/vmoe":
        f"{LONGER}; test_vit_classifier.py trains the classifier shortened",
    "python -m mmjax.bench.moe_vs_dense --config experiments/vmoe_tiny.py:tiny --steps 20 --workdir /tmp/vmoe-bench":
        f"{LONGER}; test_vit_classifier.py checks the vision pair it builds",
    "python -m mmjax.bench.aot --config experiments/clip_pods.py:vit_h14": f"{LONGER} (a 128-chip compile); "
                                                                           "test_aot.py compiles a small dual encoder",
    "launch/local_multiprocess.sh experiments/tiny.py /tmp/mmjax-mp 2 4 --config.data.shards=2":
        f"{LONGER}; test_multihost.py runs the launcher with 6 steps",
    "launch/tpu_vm.sh my-v5e-16 us-west4-a experiments/tiny.py /mnt/shared/tiny --config.mesh.data=-1 "
    "--config.mesh.fsdp=4 --config.mesh.expert=1": "needs a Cloud TPU VM",
    "sbatch --nodes=4 launch/slurm.sbatch experiments/tiny.py /shared/runs/tiny --config.mesh.data=-1 "
    "--config.mesh.fsdp=8 --config.mesh.expert=1": "needs a SLURM cluster",
}


def test_every_readme_command_is_run_or_has_a_reason():
    commands = readme_commands()
    unlisted = [c for c in commands if c not in RUN and c not in NOT_RUN]
    assert not unlisted, f"README commands neither run nor excused: {unlisted}"
    assert not [c for c in [*RUN, *NOT_RUN] if c not in commands], "listed commands no longer in README.md"


@pytest.mark.slow
@pytest.mark.parametrize("command", sorted(RUN))
def test_readme_command_runs_as_printed(command):
    if "bench.aot" in command:
        pytest.importorskip("libtpu", reason="ahead-of-time TPU compilation needs the tpu extra")
    timeout, expected = RUN[command]
    shutil.rmtree("/tmp/mmjax-aot", ignore_errors=True)
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])  # `python`: this one
    out = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert expected in out.stdout, out.stdout[-2000:]
    assert "Traceback" not in out.stderr
