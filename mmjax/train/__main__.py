"""Train an MM1-style model.

  python -m mmjax.train --config experiments/tiny.py --workdir /tmp/mmjax-tiny
  python -m mmjax.train --config experiments/tiny.py --workdir DIR --config.train.steps=50

Every config field can be overridden with `--config.<path>=<value>`. Running
again with the same --workdir resumes from its latest checkpoint.
Outputs under --workdir: config.json, metrics.jsonl, tensorboard/,
checkpoints/<step>/, summary.json.

Multi-process (multi-host) runs start the same command once per process:

  python -m mmjax.train --config ... --workdir SHARED_DIR
      --coordinator_address=HOST0:PORT --num_processes=N --process_id=I

or set MMJAX_COORDINATOR_ADDRESS / MMJAX_NUM_PROCESSES / MMJAX_PROCESS_ID, or
run under srun (SLURM), mpirun (Open MPI) or on a multi-host Cloud TPU slice,
where they are found automatically (mmjax/train/distributed.py). Only process
0 writes config.json, metrics.jsonl, tensorboard/ and summary.json;
checkpoints are written by all processes together.
"""

import sys

from absl import app, flags, logging

from mmjax.frontend import define_config_flag, prepare_runtime

_CONFIG = define_config_flag()
_WORKDIR = flags.DEFINE_string(
    "workdir", None,
    "Directory for all outputs (config.json, metrics.jsonl, tensorboard/, checkpoints/). "
    "An existing workdir with checkpoints is resumed from its latest step.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "Multi-process runs: HOST:PORT of process 0, the same on every process (process 0 listens "
    "there). Default: $MMJAX_COORDINATOR_ADDRESS; unset on SLURM/Open MPI/multi-host TPU, where "
    "it is found automatically; unset elsewhere means a single-process run.")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None,
    "Multi-process runs: how many processes take part (default: $MMJAX_NUM_PROCESSES).", lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None,
    "Multi-process runs: this process's index, 0..num_processes-1 (default: $MMJAX_PROCESS_ID).",
    lower_bound=0)
_PROFILE_STEPS = flags.DEFINE_string(
    "profile_steps", None,
    "FIRST:LAST (e.g. 10:12): write a JAX profiler trace of these steps to WORKDIR/profile "
    "(open with TensorBoard's profile plugin or Perfetto). Same as --config.train.profile_steps.")
flags.mark_flags_as_required(["config", "workdir"])


def _profile_window(text: str) -> tuple[int, int]:
    first, sep, last = text.partition(":")
    try:
        window = (int(first), int(last or first))
    except ValueError:
        window = (0, -1)
    if not sep and not last or window[0] < 1 or window[1] < window[0]:
        raise app.UsageError(f"--profile_steps={text!r} must be FIRST:LAST with 1 <= FIRST <= LAST.")
    return window



def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # library INFO chatter hides the progress lines
        logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    if _PROFILE_STEPS.value:
        with config.unlocked():
            config.train.profile_steps = _profile_window(_PROFILE_STEPS.value)
    # --config.hardware=NAME preset, simulated CPU devices, multi-process set-up
    prepare_runtime(config, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, distributed=True)
    from mmjax.data.records import DataError
    from mmjax.train.config_checks import ConfigError
    from mmjax.train.guards import TrainingDiverged
    from mmjax.train.loop import train

    try:
        train(config, _WORKDIR.value)
    except ConfigError as err:
        raise SystemExit(f"config error: {err}") from None
    except DataError as err:
        raise SystemExit(f"data error: {err}") from None
    except TrainingDiverged as err:
        raise SystemExit(f"training stopped: {err}") from None


if __name__ == "__main__":
    if any(arg in ("-h", "--help", "--helpshort") for arg in sys.argv[1:]):
        app.usage(shorthelp=True, writeto_stdout=True, exitcode=0)  # absl would exit 1
    app.run(main)
