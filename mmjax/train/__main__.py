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

from __future__ import annotations

import sys

from absl import flags

from mmjax.frontend import define_process_flags, parse_flags, prepare_runtime, run_command


def _define(fv: flags.FlagValues) -> None:
    flags.DEFINE_string(
        "workdir", None,
        "Directory for all outputs (config.json, metrics.jsonl, tensorboard/, checkpoints/). "
        "An existing workdir with checkpoints is resumed from its latest step (a damaged latest "
        "checkpoint is moved aside and the newest good one is used; config.train.on_bad_checkpoint).",
        flag_values=fv)
    define_process_flags(fv)
    flags.DEFINE_string(
        "profile_steps", None,
        "FIRST:LAST (e.g. 10:12): write a JAX profiler trace of these steps to WORKDIR/profile "
        "(open with TensorBoard's profile plugin or Perfetto). Same as --config.train.profile_steps.",
        flag_values=fv)


def _profile_window(text: str) -> tuple[int, int]:
    first, sep, last = text.partition(":")
    try:
        window = (int(first), int(last or first))
    except ValueError:
        window = (0, -1)
    if not sep and not last or window[0] < 1 or window[1] < window[0]:
        raise SystemExit(f"error: --profile_steps={text!r} must be FIRST:LAST with 1 <= FIRST <= LAST.")
    return window


def main(argv: list[str]) -> int:
    args = parse_flags(argv, "python -m mmjax.train", __doc__, _define)
    if not args.workdir:
        raise SystemExit("error: --workdir is required (every output of the run goes there).")
    config = args.config
    if args.profile_steps:
        with config.unlocked():
            config.train.profile_steps = _profile_window(args.profile_steps)
    # --config.hardware=NAME preset, the whole config checked, simulated CPU devices, multi-process set-up
    prepare_runtime(config, args.coordinator_address, args.num_processes, args.process_id, distributed=True)
    from mmjax.train.loop import train

    train(config, args.workdir)
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
