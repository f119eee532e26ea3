"""The training loop: build everything from the config, resume, step, and
let the hooks (`mmjax.train.hooks`) do the rest.

`train` builds the run (mesh, model by `config.model.name`, data (packed
sequences, or image-text pairs for a contrastive model), state,
checkpointer, evaluators by `config.eval`), runs the evaluators on a fresh
run's initial parameters, steps, then saves and evaluates at the end.
`run_steps` is the step loop: fetch a batch (counted over all processes),
compile ahead of time on the first one (`compile_time_s`), run and time each
step to device completion (`mmjax.train.timing`), and hand the result to
each hook: watchdog, profiler, NaN/Inf guard, logging, preemption,
checkpoints, evaluation.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import numpy as np

from mmjax.data.pairs import PAIR_FIELDS, caption_mix, make_pair_dataset
from mmjax.data.pipeline import default_tokenizer, make_dataset, to_global_arrays
from mmjax.data.packing import COUNTS
from mmjax.data.records import STREAMS
from mmjax.models.registry import PACKED_FIELDS, model_spec
from mmjax.parallel import get_layout, make_mesh
from mmjax.train import hooks
from mmjax.train.checkpoint import Checkpointer
from mmjax.errors import ConfigError
from mmjax.paths import is_remote, workdir_path, write_text
from mmjax.train.config_checks import check_config
from mmjax.train.init_from import apply_init_from
from mmjax.train.evaluators import make_evaluators
from mmjax.train.flops import peak_flops_per_device, train_flops
from mmjax.train.guards import PreemptionFlag
from mmjax.train.metrics import MetricsWriter, format_duration, log
from mmjax.train.objectives import batch_loss, model_objective
from mmjax.train.optimizer import learning_rate_schedule, make_optimizer, trainable_mask
from mmjax.train.prefetch import Prefetcher
from mmjax.train.state import abstract_train_state, build_train_setup, init_train_state, split_params
from mmjax.train.step import make_train_step
from mmjax.train.timing import StepTimer

# With several processes, host counters and the stop signal are exchanged at
# least this often (and at every log step); one process needs no exchange.
HOST_SYNC_EVERY = 10


def _write_config(config, workdir) -> None:
    if jax.process_index() == 0:
        write_text(workdir / "config.json", config.to_json_best_effort(indent=2, sort_keys=True) + "\n")


def build_step(config, mesh, rules) -> tuple:
    """(TrainSetup, jitted train step) exactly as `train` runs them."""
    total_steps = config.train.steps
    decoder = config.model.decoder
    setup = build_train_setup(config, mesh, rules,
                              lambda params: make_optimizer(config.optimizer, total_steps, params, decoder))
    moe = decoder.moe
    schedule = learning_rate_schedule(config.optimizer, total_steps, setup.abstract_params, decoder)
    train_step = make_train_step(setup, schedule, config.loss.z_loss, moe.load_balance_weight,
                                 moe.router_z_weight, grad_accum_steps=config.train.grad_accum_steps,
                                 trainable=trainable_mask(config.optimizer, setup.abstract_params),
                                 skip_nonfinite=config.train.on_nonfinite == "skip",
                                 router_bias_rate=moe.get("bias_update_rate", 0.0)
                                 if moe.get("balance", "aux_loss") == "bias" else 0.0,
                                 batch_loss=batch_loss(config.model))
    return setup, train_step


def train(config, workdir) -> dict:
    """Runs (or resumes) training; returns the summary (also summary.json):
    final metrics, timing, and the evaluators' results at the start of a
    fresh run and at the end (`eval`: {"initial": ..., "final": ...}).
    `workdir`: a local folder or a bucket path `gs://BUCKET/FOLDER` (`mmjax.paths`)."""
    workdir = workdir_path(workdir)
    if not is_remote(workdir):
        os.makedirs(workdir, exist_ok=True)
    check_config(config, jax.device_count(), jax.process_count())
    _check_data_feeds_model(config)
    finished = finished_run(workdir, config.train.steps)
    if finished is not None:  # outputs stay untouched: nothing is opened for writing
        log(f"{workdir} holds a finished run of {config.train.steps} steps (summary.json, checkpoint "
            f"{config.train.steps}); nothing to do. Raise config.train.steps to train further, or use a new --workdir.")
        return finished
    mesh = make_mesh(dict(config.mesh))
    tokenizer = default_tokenizer(config.data)
    if tokenizer.vocab_size > config.model.decoder.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens, more than "
                          f"config.model.decoder.vocab_size={config.model.decoder.vocab_size}.")
    total_steps = config.train.steps
    pc, pi = jax.process_count(), jax.process_index()  # the data sources are opened (DataError) before the model
    source = iter(make_train_dataset(config, tokenizer, batch_size=config.data.global_batch // pc,
                                     process_index=pi, process_count=pc))
    setup, train_step = build_step(config, mesh, get_layout(config.rules))
    # The next batches are read and placed on the devices while a step runs; checkpoints hold
    # the position after the last consumed batch (mmjax/train/prefetch.py).
    counters = data_counters(config)
    data_iter = Prefetcher(source, lambda local: _step_inputs(local, setup, counters),
                           depth=config.train.get("prefetch", 2))
    ckpt = Checkpointer(workdir, keep=config.train.keep_checkpoints, async_save=config.train.async_checkpoint,
                        on_bad=config.train.get("on_bad_checkpoint", "previous"), log=log)
    run = hooks.Run(config, workdir, ckpt, MetricsWriter(workdir), data_iter, StepTimer(),
                    {"eval": {}, "steps": total_steps})
    _write_config(config, workdir)
    log(f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} devices; "
        f"layout {config.rules!r}; model {config.model.get('name', 'mm1')!r}; workdir {workdir}")

    abstract = abstract_train_state(setup)
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(split_params(abstract["params"])[0]))
    log(f"model: {n_params:,} parameters")
    run.summary["num_params"] = int(n_params)
    # The newest checkpoint that restores (damaged ones are moved aside, see checkpoint.py), else a fresh init.
    try:
        run.state, start = run.ckpt.restore_latest(abstract, data_iter)
    except Exception:
        run.writer.close()
        raise
    if run.ckpt.recovered:
        run.summary["damaged_checkpoints"] = run.ckpt.recovered
    if start:
        log(f"resumed from {run.ckpt.directory}/{start}")
    else:
        run.state = init_train_state(config, setup)
        if config.init_from:
            run.state = apply_init_from(run.state, config.init_from, log)
            log(f"initialised from {', '.join(config.init_from)}")
    evaluators = make_evaluators(config, setup, tokenizer, log)
    if not start and evaluators:  # the baseline: the initial parameters, logged as step 0
        run.summary["eval"]["initial"] = hooks.write_evaluation(run, 0, evaluators)

    flops = run.flops = train_flops(config, num_devices=jax.device_count())
    peak, peak_source = peak_flops_per_device()
    run.summary.update(model_flops_per_step=flops.model_flops, hardware_flops_per_step=flops.hardware_flops,
                       peak_flops_per_device=peak, peak_source=peak_source)
    log(f"model FLOPs per step {flops.model_flops:.3e} with every image slot filled (MFU counts the images "
        f"present; hardware {flops.hardware_flops:.3e}); peak per device {peak:.3e} FLOP/s ({peak_source})")
    step_hooks = [hooks.StepWatchdog(run), hooks.Profiler(run), hooks.NonFiniteGuard(run),
                  hooks.Logging(run, total_steps), hooks.Preemption(run), hooks.Checkpointing(run, total_steps),
                  hooks.Evaluation(run, evaluators, total_steps)]
    run_steps(run, setup, train_step, start, total_steps, step_hooks)
    if run.summary.get("preempted_at") is None:
        if run.ckpt.latest_step() != total_steps:
            run.ckpt.save(total_steps, run.state, data_iter)
        run.ckpt.close()
        if evaluators:
            run.summary["eval"]["final"] = hooks.write_evaluation(run, total_steps, evaluators)
        log(f"done: {total_steps} steps, checkpoints in {run.ckpt.directory} "
            f"(loop wall time {format_duration(run.summary['wall_time_s'])})")
    run.ckpt.close()
    run.writer.close()
    _write_summary(workdir, run.summary)
    return run.summary


def _pairs(config) -> bool:
    """Whether the model trains on image-text pairs (its objective's data is
    "pairs") rather than packed sequences."""
    return model_objective(config.model).data == "pairs"


def data_counters(config) -> tuple[str, ...]:
    """The data counters summed over steps and processes and logged as
    `data/<name>`: dropped / skipped images, skipped records and, for pairs
    with `data.caption_mix`, the examples per caption field
    (`caption_<field>`)."""
    mix = caption_mix(config.data) if _pairs(config) else ()
    return COUNTS + tuple(f"caption_{field}" for field, _ in mix)


def make_train_dataset(config, tokenizer, *, batch_size: int, process_index: int, process_count: int):
    """The training batches the model reads: pair batches
    (`mmjax.data.pairs`) for a model whose objective trains on pairs (records without a caption
    kept when it reads no `tokens`), else packed sequences
    (`mmjax.data.pipeline`)."""
    if _pairs(config):
        return make_pair_dataset(config.data, tokenizer, batch_size=batch_size, process_index=process_index,
                                 process_count=process_count,
                                 require_text="tokens" in model_spec(config.model).inputs_for(config.model))
    return make_dataset(config.data, tokenizer, batch_size=batch_size, process_index=process_index,
                        process_count=process_count)


def _check_data_feeds_model(config) -> None:
    """ConfigError when the model reads batch fields its data pipeline
    (packed sequences, or pairs for a model that trains on pairs) does not produce."""
    pairs = _pairs(config)
    produced = PAIR_FIELDS if pairs else PACKED_FIELDS
    unfed = [f for f in model_spec(config.model).inputs_for(config.model) if f not in produced]
    if unfed:
        pipeline = "pair pipeline (mmjax.data.pairs)" if pairs else "packed data pipeline (mmjax.data.pipeline)"
        raise ConfigError(f"config.model.name={config.model.name!r} reads batch fields {unfed}, which the "
                          f"{pipeline} does not produce; train it with the step of "
                          "mmjax.train.loop.build_step on batches that hold them.")


def finished_run(workdir, total_steps: int) -> dict | None:
    """The summary of a run in `workdir` that already reached `total_steps`
    (committed checkpoint of that step, summary.json not preempted), else None."""
    from mmjax.train.checkpoint import COMMIT_MARKER

    workdir = workdir_path(workdir, check=False)
    marker = workdir / "checkpoints" / str(total_steps) / COMMIT_MARKER
    try:
        summary = json.loads((workdir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    done = marker.exists() and summary.get("preempted_at") is None and "final" in summary
    return summary if done and summary.get("steps", total_steps) == total_steps else None


def _write_summary(workdir, summary: dict) -> None:
    if jax.process_index() == 0:
        write_text(workdir / "summary.json", json.dumps(summary, indent=2))


def _step_inputs(local: dict, setup, counters: tuple[str, ...] = COUNTS) -> tuple[dict, np.ndarray]:
    """A process-local batch -> (the global batch on the mesh, this process's
    counters of it: examples per stream, `counters` (`data_counters`), images)."""
    choices = np.bincount(local["caption_choice"][local["caption_choice"] >= 0],
                          minlength=len(counters) - len(COUNTS)) if "caption_choice" in local else ()
    counts = np.concatenate([local["stream_counts"].sum(axis=0), [local[k].sum() for k in COUNTS],
                             choices[:len(counters) - len(COUNTS)], [local["image_mask"].sum()]])
    return to_global_arrays({k: local[k] for k in setup.batch_shardings}, setup.batch_shardings), counts


def _exchange_step(step: int, total_steps: int, log_every: int) -> bool:
    """Whether the host counters and the stop signal are summed over the
    processes after `step`: every step with one process (no exchange is
    needed), else at log steps, every HOST_SYNC_EVERY steps and at the end."""
    return (jax.process_count() == 1 or step % log_every == 0 or step % HOST_SYNC_EVERY == 0
            or step == total_steps)


def run_steps(run, setup, train_step, start: int, total_steps: int, step_hooks: list) -> None:
    """Steps `start+1 .. total_steps` (see the module doc); updates
    `run.state` and `run.summary` (compile time, final metrics, loss means,
    wall time)."""
    counters = data_counters(run.config)
    totals = np.zeros(len(STREAMS) + len(counters))  # examples per stream, then data counters (all processes)
    pending = np.zeros(len(STREAMS) + len(counters) + 1)  # this process's counters since the last exchange
    images_since, stop_signalled = 0, False
    compiled, metrics, losses = None, None, []
    run_start = time.perf_counter()
    run.stop_signal = PreemptionFlag()
    try:
        for step in range(start + 1, total_steps + 1):
            t0 = time.perf_counter()
            batch, local_counts = next(run.data_iter)
            wait = time.perf_counter() - t0
            if compiled is None:
                log("compiling the train step ahead of time ...")
                t_compile = time.perf_counter()
                compiled = train_step.lower(run.state, batch).compile()
                run.summary["compile_time_s"] = time.perf_counter() - t_compile
                log(f"compiled the train step ahead of time in {run.summary['compile_time_s']:.2f}s")
                run.writer.write({"step": step, "compile_time_s": run.summary["compile_time_s"]})
                run.timer.reset()
            t1 = time.perf_counter()
            for hook in step_hooks:
                getattr(hook, "before_step", lambda s: None)(step)
            run.state, metrics = compiled(run.state, batch)
            jax.block_until_ready((run.state, metrics))
            t2 = time.perf_counter()
            losses.append(float(metrics["loss"]))
            pending += local_counts
            if _exchange_step(step, total_steps, run.config.train.log_every):
                # The host exchange: data counters, images and the stop signal, summed over processes.
                synced = hooks.sum_over_processes(np.append(pending, int(bool(run.stop_signal))))
                totals += synced[:len(totals)]
                images_since, stop_signalled = int(synced[-2]), bool(synced[-1])
                pending[:] = 0
            run.timer.add(t2 - t1, wait, time.perf_counter() - t2, images_since)
            images_since = 0
            result = hooks.StepResult(step, metrics, losses[-1], totals[:len(STREAMS)],
                                      dict(zip(counters, (int(x) for x in totals[len(STREAMS):]))),
                                      stop_signalled=stop_signalled)
            if any(hook.after_step(result) for hook in step_hooks):  # a hook that stops the run ends the round
                break
    finally:
        run.data_iter.close()
        run.stop_signal.close()
        for hook in step_hooks:
            getattr(hook, "close", lambda: None)()
    if metrics is not None:
        run.summary["final"] = {k: hooks.to_json(v) for k, v in jax.device_get(metrics).items()}
    if len(losses) >= 20:
        first, last = float(np.mean(losses[:10])), float(np.mean(losses[-10:]))
        run.summary.update(loss_first10_mean=first, loss_last10_mean=last)
        log(f"loss: mean of the first 10 steps {first:.4f} -> last 10 steps {last:.4f} ({100 * last / first:.1f}%)")
    run.summary["wall_time_s"] = time.perf_counter() - run_start
