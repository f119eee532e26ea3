"""The training loop: build everything from the config, resume, train, log,
checkpoint, evaluate.

The step is compiled ahead of time on the first batch (`compile_time_s`);
every step is then timed to device completion (`mmjax.train.timing`). SIGTERM
saves a checkpoint and stops cleanly; a NaN/Inf loss stops the run naming the
step and the last good checkpoint; a watchdog reports a step that hangs;
`train.profile_steps=(a, b)` writes a profiler trace of steps a..b to
`WORKDIR/profile`.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import numpy as np

from mmjax.data.pipeline import default_tokenizer, make_dataset, to_global_arrays
from mmjax.data.packing import COUNTS
from mmjax.data.records import STREAMS
from mmjax.parallel import get_layout, make_mesh
from mmjax.train.caption_eval import eval_batches, make_caption_eval
from mmjax.train.checkpoint import Checkpointer
from mmjax.train.config_checks import ConfigError, check_config
from mmjax.train.init_from import apply_init_from
from mmjax.train.flops import mfu, peak_flops_per_device, train_flops
from mmjax.train.guards import PreemptionFlag, TrainingDiverged, Watchdog
from mmjax.train.metrics import MetricsWriter, format_duration, log, progress_line
from mmjax.train.optimizer import learning_rate_schedule, make_optimizer, trainable_mask
from mmjax.train.state import MODEL_INPUTS, abstract_train_state, build_train_setup, init_train_state
from mmjax.train.step import make_train_step
from mmjax.train.timing import StepTimer, memory_bytes


def _write_config(config, workdir: str) -> None:
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")


def _to_json(value):
    """Scalars as floats, arrays (e.g. per-expert fractions) as nested lists."""
    value = np.asarray(value)
    return float(value) if value.ndim == 0 else value.tolist()


def build_step(config, mesh, rules) -> tuple:
    """(TrainSetup, jitted train step) exactly as `train` runs them."""
    total_steps = config.train.steps
    setup = build_train_setup(config, mesh, rules,
                              lambda params: make_optimizer(config.optimizer, total_steps, params))
    moe = config.model.decoder.moe
    schedule = learning_rate_schedule(config.optimizer, total_steps, setup.abstract_params)
    train_step = make_train_step(setup, schedule, config.loss.z_loss, moe.load_balance_weight,
                                 moe.router_z_weight, grad_accum_steps=config.train.grad_accum_steps,
                                 trainable=trainable_mask(config.optimizer, setup.abstract_params),
                                 skip_nonfinite=config.train.on_nonfinite == "skip")
    return setup, train_step


def train(config, workdir: str) -> dict:
    """Runs (or resumes) training; returns a summary with the final metrics
    and the untrained/trained caption accuracy."""
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    check_config(config, jax.device_count(), jax.process_count())
    mesh = make_mesh(dict(config.mesh))
    rules = get_layout(config.rules)
    tokenizer = default_tokenizer(config.data)
    if tokenizer.vocab_size > config.model.decoder.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens, more than "
                          f"config.model.decoder.vocab_size={config.model.decoder.vocab_size}.")
    total_steps = config.train.steps
    setup, train_step = build_step(config, mesh, rules)
    pc, pi = jax.process_count(), jax.process_index()
    data_iter = iter(make_dataset(config.data, tokenizer, batch_size=config.data.global_batch // pc,
                                  process_index=pi, process_count=pc))
    ckpt = Checkpointer(workdir, keep=config.train.keep_checkpoints,
                        async_save=config.train.async_checkpoint)
    writer = MetricsWriter(workdir)
    _write_config(config, workdir)
    log(f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} devices; "
        f"layout {config.rules!r}; workdir {workdir}")

    state = init_train_state(config, setup)
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    log(f"model: {n_params:,} parameters")
    summary: dict = {"num_params": int(n_params)}
    start = ckpt.latest_step() or 0
    if config.init_from and not start:
        state = apply_init_from(state, config.init_from)
        log(f"initialised from {', '.join(config.init_from)}")
    evaluate = batches = None
    if config.eval.caption_accuracy and config.data.sources.caption != "procedural":
        log("caption accuracy is measured on the procedural captions only; skipped for "
            f"config.data.sources.caption={config.data.sources.caption!r}")
    elif config.eval.caption_accuracy:
        evaluate = make_caption_eval(setup)
        batches = eval_batches(config, tokenizer, setup)
        summary["untrained"] = evaluate(state["params"], batches)

    if start:
        state = ckpt.restore(start, abstract_train_state(setup), data_iter)
        log(f"resumed from {ckpt.directory}/{start}")

    flops = train_flops(config, num_devices=jax.device_count())
    peak, peak_source = peak_flops_per_device()
    summary.update(model_flops_per_step=flops.model_flops, hardware_flops_per_step=flops.hardware_flops,
                   peak_flops_per_device=peak, peak_source=peak_source)
    log(f"model FLOPs per step {flops.model_flops:.3e} (hardware {flops.hardware_flops:.3e}); "
        f"peak per device {peak:.3e} FLOP/s ({peak_source})")
    state, summary = _run_steps(config, setup, train_step, state, data_iter, ckpt, writer, start, summary)
    if summary.get("preempted_at") is not None:
        ckpt.close()
        writer.close()
        _write_summary(workdir, summary)
        return summary
    if ckpt.latest_step() != total_steps:
        ckpt.save(total_steps, state, data_iter)
    ckpt.close()
    if evaluate is not None:
        summary["trained"] = evaluate(state["params"], batches)
        summary["trained_blank_images"] = evaluate(state["params"], batches, blank_images=True)
        log(f"held-out caption accuracy, colour+kind words, teacher-forced, "
            f"{summary['trained']['eval_captions']} captions (exact caption / per word):")
        for name in ("untrained", "trained", "trained_blank_images"):
            r = summary[name]
            log(f"  {name:22s} {r['caption_exact_match']:.3f} / {r['attribute_accuracy']:.3f}")
        writer.write({"step": total_steps, **{f"eval/{name}/{k}": v for name in
                                               ("untrained", "trained", "trained_blank_images")
                                               for k, v in summary[name].items()}})
    log(f"done: {total_steps} steps, checkpoints in {ckpt.directory} "
        f"(loop wall time {format_duration(summary['wall_time_s'])})")
    writer.close()
    _write_summary(workdir, summary)
    return summary


def _all_processes(values: np.ndarray) -> np.ndarray:
    """Sum of a small host vector over all processes (itself with one process)."""
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(values, np.int64))).sum(axis=0)


def _any_process(flag: bool) -> bool:
    return bool(_all_processes(np.array([int(flag)]))[0])


def _write_summary(workdir: str, summary: dict) -> None:
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)


def _compile(train_step, state, batch) -> tuple:
    """Ahead-of-time compile for these exact shapes/shardings: (executable, seconds)."""
    t0 = time.perf_counter()
    compiled = train_step.lower(state, batch).compile()
    return compiled, time.perf_counter() - t0


def _run_steps(config, setup, train_step, state, data_iter, ckpt, writer, start, summary):
    """The step loop (see `mmjax.train.timing` for what is timed and how).
    Returns (state, summary); `summary["preempted_at"]` is set when SIGTERM
    stopped the run after saving."""
    total_steps, t = config.train.steps, config.train
    tokens_per_step = config.data.global_batch * config.data.seq_len
    timer = StepTimer()
    loss_history: list[float] = []
    stream_counts = np.zeros(len(STREAMS))
    data_counts = dict.fromkeys(COUNTS, 0)  # images dropped / skipped, records skipped (all steps)
    preempted = PreemptionFlag()
    watchdog = Watchdog(t.watchdog_s, lambda step, s: log(f"watchdog: step {step} has not finished after {s:.0f}s"))
    profile_start, profile_stop = tuple(t.profile_steps) if t.profile_steps else (0, 0)
    profiling = False
    compiled, metrics = None, None
    skipped_steps = 0
    run_start = time.perf_counter()
    try:
        for step in range(start, total_steps):
            done = step + 1
            t0 = time.perf_counter()
            local = next(data_iter)
            counts = _all_processes(np.concatenate([local["stream_counts"].sum(axis=0),
                                                    [local[k].sum() for k in COUNTS],
                                                    [local["image_mask"].sum()]]))
            stream_counts += counts[:len(STREAMS)]
            for i, k in enumerate(COUNTS):
                data_counts[k] += int(counts[len(STREAMS) + i])
            batch = to_global_arrays({k: local[k] for k in MODEL_INPUTS}, setup.batch_shardings)
            t1 = time.perf_counter()
            wait = t1 - t0
            if compiled is None:
                compiled, compile_s = _compile(train_step, state, batch)
                log(f"compiled the train step ahead of time in {compile_s:.2f}s")
                writer.write({"step": done, "compile_time_s": compile_s})
                summary["compile_time_s"] = compile_s
                timer.reset()
                t1 = time.perf_counter()
            if done == profile_start:
                trace_dir = os.path.join(os.path.dirname(ckpt.directory), "profile")
                if jax.process_count() > 1:
                    trace_dir = os.path.join(trace_dir, f"process_{jax.process_index()}")
                jax.profiler.start_trace(trace_dir)
                profiling = True
            watchdog.beat(done)
            state, metrics = compiled(state, batch)
            jax.block_until_ready((state, metrics))
            t2 = time.perf_counter()
            if profiling and done >= profile_stop:
                jax.profiler.stop_trace()
                profiling = False
                log(f"profiler trace of steps {profile_start}-{profile_stop} written")
            loss = float(metrics["loss"])
            loss_history.append(loss)
            skipped_steps += int(float(metrics.get("skipped_step", 0.0)))
            if not math.isfinite(loss) and t.on_nonfinite == "skip":
                log(f"step {done}: loss is {loss}; update skipped ({skipped_steps} skipped so far)")
            elif not math.isfinite(loss):
                last = ckpt.latest_step()
                raise TrainingDiverged(
                    f"loss is {loss} at step {done}; last good checkpoint: "
                    f"{os.path.join(ckpt.directory, str(last)) if last else 'none (no checkpoint yet)'}.")
            images = int(counts[-1])
            if done % t.log_every == 0 or done == total_steps:
                values = jax.device_get(metrics)
                timer.add(t2 - t1, wait, time.perf_counter() - t2, images)
                record = {"step": done, **{k: _to_json(v) for k, v in values.items()},
                          **timer.summary(tokens_per_step),
                          "hbm_or_rss_bytes": memory_bytes(),
                          **{f"mix_{s}": float(c / max(stream_counts.sum(), 1))
                             for s, c in zip(STREAMS, stream_counts)},
                          **{f"data/{k}": v for k, v in data_counts.items()}}
                record.setdefault("moe_aux_loss", 0.0)
                achieved = summary["model_flops_per_step"] / jax.device_count() / record["step_time_s"]
                record.update(model_tflops_per_device=achieved / 1e12,
                              mfu=mfu(summary["model_flops_per_step"], record["step_time_s"],
                                      jax.device_count(), summary["peak_flops_per_device"]))
                log(progress_line(done, total_steps, record,
                                  record["wall_per_step_s"] * (total_steps - done)))
                writer.write(record)
                timer.reset()
            else:
                timer.add(t2 - t1, wait, time.perf_counter() - t2, images)
            if _any_process(bool(preempted)):  # all processes stop at the same step
                t_save = time.perf_counter()
                ckpt.save(done, state, data_iter)
                ckpt.wait()
                log(f"{preempted.signal_name or 'stop signal on another process'} received: saved step {done} in "
                    f"{time.perf_counter() - t_save:.1f}s and stopped; run the same command to resume")
                summary["preempted_at"] = done
                break
            if done % t.checkpoint_every == 0 and done != total_steps:
                t_save = time.perf_counter()
                watchdog.idle()
                ckpt.save(done, state, data_iter)
                timer.exclude(time.perf_counter() - t_save)  # checkpoint time is not step time
    finally:
        watchdog.close()
        preempted.close()
        if profiling:
            jax.profiler.stop_trace()
    if metrics is not None:
        summary["final"] = {k: _to_json(v) for k, v in jax.device_get(metrics).items()}
    if len(loss_history) >= 20:
        first, last = float(np.mean(loss_history[:10])), float(np.mean(loss_history[-10:]))
        summary.update(loss_first10_mean=first, loss_last10_mean=last)
        log(f"loss: mean of the first 10 steps {first:.4f} -> last 10 steps {last:.4f} "
            f"({100 * last / first:.1f}%)")
    summary["wall_time_s"] = time.perf_counter() - run_start
    summary["skipped_steps"] = skipped_steps
    return state, summary
