"""Score a checkpoint on named tasks and write the results.

`evaluate_checkpoint` loads the parameters (a training workdir's latest or
chosen checkpoint, or folders written by `mmjax.tools.convert_hf`) onto the
training mesh and layout, runs the evaluators the config defines (the same
ones the training loop runs at `train.eval_every`), and writes:
  WORKDIR/eval/<step>/results.json            {"step", "tasks": {task: {metric: value}}}
  WORKDIR/eval/<step>/<task>.predictions.jsonl one row per scored prompt
  WORKDIR/metrics.jsonl, WORKDIR/tensorboard/  `eval/<task>/<metric>` at that step
and returns the results; `format_table` renders them for the terminal.
WORKDIR may be a bucket path (`gs://BUCKET/FOLDER`, `mmjax.paths`).
"""

from __future__ import annotations

import json
import os
import re
import sys

import jax
import orbax.checkpoint as ocp
from etils import epath

from mmjax.errors import CheckpointError, ConfigError
from mmjax.parallel import get_layout, make_mesh
from mmjax.paths import workdir_path, write_text
from mmjax.train.config_checks import check_config
from mmjax.train.evaluators import EVALUATORS, evaluator_spec, load_builtins
from mmjax.train.init_from import apply_init_from
from mmjax.train.metrics import MetricsWriter, log


def task_names(config, requested: str) -> list[str]:
    """The tasks to run: `requested` (comma-separated names of
    `config.evaluators` blocks) or every evaluator switched on in `config.eval`."""
    load_builtins()
    if not requested:
        names = [name for name, on in config.get("eval", {}).items() if on]
        if not names:
            raise ConfigError("config.eval switches no evaluator on; name tasks with --tasks.")
        return names
    names = [n.strip() for n in requested.split(",") if n.strip()]
    known = sorted(set(config.get("evaluators", {}).keys()) | set(config.get("eval", {}).keys()))
    for name in names:
        if name not in known and name not in EVALUATORS:
            raise ConfigError(f"--tasks names {name!r}, which the config does not define; defined: {known}.")
        evaluator_spec(config, name)
    return names


def _restore_params(config, setup, workdir: str, step: int):
    """(params, step) from WORKDIR/checkpoints (the latest when `step` is 0)."""
    from mmjax.train.state import abstract_train_state

    directory = os.fspath(workdir_path(workdir) / "checkpoints")
    if not epath.Path(directory).is_dir():
        raise CheckpointError(f"--workdir {workdir} has no checkpoints/ folder; train first or give --converted.")
    manager = ocp.CheckpointManager(directory, item_names=("state", "data"))
    steps = sorted(manager.all_steps())
    if not steps:
        raise CheckpointError(f"{directory} holds no checkpoint.")
    if step and step not in steps:
        raise CheckpointError(f"--step {step}: {directory} has checkpoints of steps {steps} only.")
    step = step or steps[-1]
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_train_state(setup))))
    except Exception as err:  # orbax raises many types; the sentence names the step and the cause
        from mmjax.train.checkpoint import describe_damage

        raise CheckpointError(f"checkpoint step {step} in {directory} cannot be restored for this config: "
                              f"{describe_damage(os.fspath(epath.Path(directory) / str(step)), err)}") from None
    finally:
        manager.close()
    return restored["state"]["params"], step


def load_params(config, workdir: str, step: int, converted: list[str]):
    """(TrainSetup, params on the mesh, step label)."""
    from mmjax.train.loop import build_step
    from mmjax.train.state import init_train_state

    check_config(config, jax.device_count(), jax.process_count())
    setup, _ = build_step(config, make_mesh(dict(config.mesh)), get_layout(config.rules))
    if converted:
        state = apply_init_from(init_train_state(config, setup), converted)
        return setup, state["params"], "converted"
    params, step = _restore_params(config, setup, workdir, step)
    return setup, params, step


def _progress(total: int, description: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="prompt", file=sys.stderr, leave=False,
                disable=jax.process_index() != 0, dynamic_ncols=True)


def evaluate_checkpoint(config, workdir: str, tasks: list[str], step: int = 0,
                        converted: list[str] | None = None) -> dict:
    """Runs `tasks` on the checkpoint and writes the outputs (module doc)."""
    from mmjax.data.pipeline import default_tokenizer

    setup, params, step = load_params(config, workdir, step, list(converted or ()))
    tokenizer = default_tokenizer(config.data)
    results = {}
    out_dir = workdir_path(workdir) / "eval" / str(step)
    for name in tasks:
        made = evaluator_spec(config, name).make(config, setup, tokenizer, name)
        if isinstance(made, str):
            log(f"task {name!r} skipped: {made}")
            continue
        if hasattr(made, "progress_factory"):
            made.progress_factory = _progress
        results[name] = made(params)
        if jax.process_index() == 0 and getattr(made, "predictions", None) is not None:
            write_text(out_dir / f"{name}.predictions.jsonl", "".join(json.dumps(row) + "\n" for row in made.predictions))
    if jax.process_index() == 0:
        write_text(out_dir / "results.json", json.dumps({"step": step, "tasks": results}, indent=2))
        writer = MetricsWriter(workdir)
        writer.write({"step": step if isinstance(step, int) else 0,
                      **{f"eval/{task}/{k}": v for task, metrics in results.items() for k, v in metrics.items()}})
        writer.close()
    return {"step": step, "tasks": results, "output": os.fspath(out_dir)}


def _task_table(task: str, metrics: dict) -> list[str]:
    """Metrics named `<metric>@<k>shot` as one row per k; the rest as `key value`."""
    rows: dict[int, dict[str, object]] = {}
    others = []
    for key, value in metrics.items():
        found = re.fullmatch(r"(blank_images/)?(.+)@(\d+)shot", key)
        if found is None:
            others.append(f"{key} {value}")
            continue
        column = ("blank " if found.group(1) else "") + found.group(2)
        rows.setdefault(int(found.group(3)), {})[column] = value
    if not rows:
        return [f"{task}: " + ", ".join(f"{k} {_shown(v)}" for k, v in metrics.items())]
    columns = list(dict.fromkeys(c for row in rows.values() for c in row))
    width = {c: max(len(c), 7) for c in columns}
    lines = [f"{task}" + (f" ({', '.join(others)})" if others else ""),
             "  shots  " + "  ".join(f"{c:>{width[c]}}" for c in columns)]
    for shots in sorted(rows):
        lines.append(f"  {shots:>5}  " + "  ".join(f"{_shown(rows[shots].get(c, '')):>{width[c]}}" for c in columns))
    return lines


def _shown(value) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def format_table(results: dict) -> str:
    """Per task, one row per number of shots (scores, then the blank-image
    baseline, scored and dropped counts); other metrics on the task's line."""
    lines = []
    for task, metrics in results["tasks"].items():
        lines += _task_table(task, metrics)
    return "\n".join(lines) if lines else "no task was scored"
