"""Score a trained model on few-shot captioning, VQA and multiple-choice tasks.

  python -m mmjax.eval --config experiments/tiny.py --workdir /tmp/mmjax-tiny
  python -m mmjax.eval --config experiments/tiny.py --workdir DIR --step 200 --tasks shapes_vqa
  python -m mmjax.eval --config experiments/mm1.py:3b --workdir DIR --converted /ckpt/vit,/ckpt/decoder

The tasks are the evaluators the config defines (`config.evaluators.<task>`,
switched on in `config.eval`; the same ones training runs every
`train.eval_every` steps); `--tasks` picks some by name. Give the config the
run was trained with: the checkpoint is restored onto its model, mesh and
layout. Outputs: WORKDIR/eval/<step>/results.json, one
<task>.predictions.jsonl per task, `eval/<task>/<metric>` in
WORKDIR/metrics.jsonl and TensorBoard, and a table on stdout. Multi-process
runs start the same command once per process, as `mmjax.train` does
(--coordinator_address etc., or found on SLURM / Open MPI / TPU slices);
every process builds the same prompts and process 0 writes the outputs.
"""

from __future__ import annotations

import sys

from absl import flags

from mmjax.frontend import define_process_flags, parse_flags, prepare_runtime, run_command


def _define(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("workdir", None, "The training workdir: its checkpoints/ are read and the results are "
                        "written to WORKDIR/eval/<step>/ and WORKDIR/metrics.jsonl.", flag_values=fv)
    flags.DEFINE_integer("step", 0, "Checkpoint step to score (0: the latest).", lower_bound=0, flag_values=fv)
    flags.DEFINE_string("tasks", "", "Comma-separated task names (config.evaluators blocks); default: every "
                        "evaluator switched on in config.eval.", flag_values=fv)
    flags.DEFINE_string("converted", "", "Comma-separated folders written by python -m mmjax.tools.convert_hf "
                        "(a vit and/or decoder component): score these weights instead of a checkpoint "
                        "(results under WORKDIR/eval/converted/).", flag_values=fv)
    define_process_flags(fv)


def main(argv: list[str]) -> int:
    args = parse_flags(argv, "python -m mmjax.eval", __doc__, _define)
    if not args.workdir:
        raise SystemExit("error: --workdir is required (the checkpoints are read and the results written there).")
    config = args.config
    prepare_runtime(config, args.coordinator_address, args.num_processes, args.process_id, distributed=True)
    from mmjax.eval.runner import evaluate_checkpoint, format_table, task_names
    from mmjax.train.metrics import log

    tasks = task_names(config, args.tasks)
    converted = [p for p in args.converted.split(",") if p]
    results = evaluate_checkpoint(config, args.workdir, tasks, step=args.step, converted=converted)
    log(format_table(results))
    log(f"results in {results['output']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
