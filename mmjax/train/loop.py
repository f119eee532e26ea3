"""The training loop: build everything from the config, resume, train, log,
checkpoint, evaluate.

Timing is measured to device completion: the first step (compile + run) is
reported alone as `compile_time_s`; afterwards, at each log step the loop
waits for the step's outputs, so `step_time_s` is the wall time of the log
window divided by its steps, and `data_wait_s` is the mean time the host
spent blocked on the input iterator per step.
"""

from __future__ import annotations

import json
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
from mmjax.train.metrics import MetricsWriter, format_duration, log, progress_line
from mmjax.train.optimizer import learning_rate_schedule, make_optimizer
from mmjax.train.state import MODEL_INPUTS, abstract_train_state, build_train_setup, init_train_state
from mmjax.train.step import make_train_step


def _write_config(config, workdir: str) -> None:
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")


def _to_json(value):
    """Scalars as floats, arrays (e.g. per-expert fractions) as nested lists."""
    value = np.asarray(value)
    return float(value) if value.ndim == 0 else value.tolist()


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
    setup = build_train_setup(config, mesh, rules,
                              lambda params: make_optimizer(config.optimizer, total_steps, params))
    moe = config.model.decoder.moe
    train_step = make_train_step(setup, learning_rate_schedule(config.optimizer, total_steps),
                                 config.loss.z_loss, moe.load_balance_weight, moe.router_z_weight)
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

    tokens_per_step = config.data.global_batch * config.data.seq_len
    metrics = None
    window_start, window_steps, window_wait = time.perf_counter(), 0, 0.0
    window_losses: list = []  # per-step losses, fetched only at log steps
    loss_history: list[float] = []
    stream_counts = np.zeros(len(STREAMS))
    data_counts = dict.fromkeys(COUNTS, 0)  # images dropped / skipped, records skipped (all steps)
    run_start = time.perf_counter()
    for step in range(start, total_steps):
        t0 = time.perf_counter()
        local = next(data_iter)
        wait = time.perf_counter() - t0
        stream_counts += local["stream_counts"].sum(axis=0)
        for k in COUNTS:
            data_counts[k] += int(local[k].sum())
        batch = to_global_arrays({k: local[k] for k in MODEL_INPUTS}, setup.batch_shardings)
        state, metrics = train_step(state, batch)
        window_losses.append(metrics["loss"])
        done = step + 1
        if step == start:  # first step: compile + one run, reported on its own
            jax.block_until_ready(metrics)
            compile_s = time.perf_counter() - t0
            log(f"first step (compile + run) took {compile_s:.2f}s")
            writer.write({"step": done, "compile_time_s": compile_s})
            window_start, window_steps, window_wait = time.perf_counter(), 0, 0.0
            if done % config.train.log_every and done != total_steps:
                continue
        else:
            window_steps += 1
            window_wait += wait
        if done % config.train.log_every == 0 or done == total_steps:
            values, losses = jax.device_get((metrics, window_losses))  # waits for the step
            loss_history += [float(x) for x in losses]
            window_losses = []
            elapsed = time.perf_counter() - window_start
            record = {"step": done, **{k: _to_json(v) for k, v in values.items()},
                      "loss_window_mean": float(np.mean(losses)),
                      **{f"mix_{s}": float(c / max(stream_counts.sum(), 1))
                         for s, c in zip(STREAMS, stream_counts)},
                      **{f"data/{k}": v for k, v in data_counts.items()}}
            if window_steps:  # timing only for steps after the compile step
                step_time = elapsed / window_steps
                record.update(step_time_s=step_time, data_wait_s=window_wait / window_steps,
                              tokens_per_s=tokens_per_step / step_time)
                log(progress_line(done, total_steps, record, step_time * (total_steps - done)))
            writer.write(record)
            window_start, window_steps, window_wait = time.perf_counter(), 0, 0.0
        if done % config.train.checkpoint_every == 0 and done != total_steps:
            t_save = time.perf_counter()
            ckpt.save(done, state, data_iter)
            window_start += time.perf_counter() - t_save  # checkpoint time is not step time
    if metrics is not None:
        summary["final"] = {k: _to_json(v) for k, v in jax.device_get(metrics).items()}
    if len(loss_history) >= 20:
        first, last = float(np.mean(loss_history[:10])), float(np.mean(loss_history[-10:]))
        summary.update(loss_first10_mean=first, loss_last10_mean=last)
        log(f"loss: mean of the first 10 steps {first:.4f} -> last 10 steps {last:.4f} "
            f"({100 * last / first:.1f}%)")
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
    summary["wall_time_s"] = time.perf_counter() - run_start
    log(f"done: {total_steps} steps, checkpoints in {ckpt.directory} "
        f"(loop wall time {format_duration(summary['wall_time_s'])})")
    writer.close()
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary
