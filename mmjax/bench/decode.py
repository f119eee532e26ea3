"""Cached against uncached greedy decoding, measured side by side.

  python -m mmjax.bench.decode --config experiments/tiny.py --workdir DIR [--batch 8] [--prompt_len 64]
      [--new_tokens 32] [--repeats 3] [--config.FIELD=VALUE ...]

On one device, with the config's model (random weights) and `--batch` prompts
of `--prompt_len` random token ids (a model that reads images gets `<bos>`,
one image's slot block and a random image per prompt):

  (1) cached: `mmjax.generate.decode.jitted_generate` (greedy, no stop ids,
      so every row makes `--new_tokens` tokens); its prefill alone is timed
      as well. Reported: prefill time, total time, new tokens/s and the
      per-token decode latency (total - prefill) / new tokens.
  (2) uncached: one jitted function over a fixed padded length (prompt + new
      tokens) runs the full forward pass over the whole growing sequence and
      takes the argmax at each row's last token; called `--new_tokens` times.
      Reported: total time, tokens/s and time per token.

Each function is compiled once and called once untimed before timing
(compile time reported separately: AOT compile time for the prefill and the
uncached step; the first call minus the median timed call for
`jitted_generate`, which compiles on first use). Every timing runs to device
completion (`jax.block_until_ready`) and is the median over `--repeats`.
Prints the ratio cached / uncached tokens/s and whether both produced
identical tokens. Writes `results.csv` (one row per decoding mode) and
`summary.json` under --workdir.
"""

from __future__ import annotations

import json
import math
import statistics
import time

from mmjax.paths import workdir_path, write_csv, write_text

COLUMNS = ("decoding", "compile_s", "prefill_s", "total_s", "new_tokens_per_s", "per_token_ms")
BOS, IMAGE = 1, 3


def make_prompts(config, batch: int, prompt_len: int, seed: int) -> dict:
    """Random prompts `tokens [batch, prompt_len]`, full `lengths [batch]`; for
    a model that reads images also `image_slots [batch, prompt_len]` (<bos>,
    then one image's slot block) and `images [batch, 1, size, size, 3]` uint8."""
    import jax.numpy as jnp
    import numpy as np

    from mmjax.models.registry import model_spec

    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, config.model.decoder.vocab_size, (batch, prompt_len)).astype(np.int32)
    prompts = {"tokens": tokens, "lengths": np.full((batch,), prompt_len, np.int32)}
    if model_spec(config.model).uses_images:
        k, size = config.model.connector.num_tokens, config.model.vit.image_size
        slots = np.full((batch, prompt_len), -1, np.int32)
        slots[:, 1:1 + k] = np.arange(k)
        tokens[:, 0], tokens[:, 1:1 + k] = BOS, IMAGE
        prompts["image_slots"] = slots
        prompts["images"] = rng.integers(0, 256, (batch, 1, size, size, 3), dtype=np.uint8)
    return {name: jnp.asarray(value) for name, value in prompts.items()}


def timed(fn, repeats: int) -> tuple[list[float], object]:
    """Seconds of each of `repeats` calls of `fn()` to device completion, and
    the last result."""
    import jax

    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return times, out


def compiled(fn, *args) -> tuple[object, float]:
    """(the AOT-compiled `fn` (a jax.jit) for `args`, seconds to lower and compile)."""
    t0 = time.perf_counter()
    executable = fn.lower(*args).compile()
    return executable, time.perf_counter() - t0


def cached_decoding(model, prompts: dict, new_tokens: int, repeats: int) -> dict:
    """`jitted_generate` (greedy, no stop) and its prefill alone, timed."""
    import jax
    from flax import nnx

    from mmjax.generate.decode import Sampling, jitted_generate, prefill, without_capacity_drops

    graphdef, state = nnx.split(without_capacity_drops(model))
    length = prompts["tokens"].shape[1] + new_tokens
    prefill_fn, prefill_compile = compiled(
        jax.jit(lambda state, batch: prefill(nnx.merge(graphdef, state), batch, length)), state, prompts)
    timed(lambda: prefill_fn(state, prompts), 1)  # warm-up: first-run allocations
    prefill_times, _ = timed(lambda: prefill_fn(state, prompts), repeats)

    generate = jitted_generate(model, Sampling(max_new_tokens=new_tokens, stop_ids=()))
    first, _ = timed(lambda: generate(prompts), 1)
    times, (tokens, counts) = timed(lambda: generate(prompts), repeats)
    total = statistics.median(times)
    prefill_s = statistics.median(prefill_times)
    rows = prompts["tokens"].shape[0]
    return {"decoding": "cached", "compile_s": max(first[0] - total, 0.0), "prefill_compile_s": prefill_compile,
            "first_call_s": first[0], "prefill_s": prefill_s, "total_s": total,
            "new_tokens_per_s": rows * new_tokens / total, "per_token_ms": 1e3 * (total - prefill_s) / new_tokens,
            "times_s": times, "prefill_times_s": prefill_times, "tokens": tokens,
            "all_rows_full": bool((counts == new_tokens).all())}


def padded_inputs(model_inputs: tuple[str, ...], prompts: dict, new_tokens: int) -> dict:
    """The prompts padded to prompt + new tokens: `tokens` (0 after each
    prompt), `image_slots` (-1 there) and the images the model reads."""
    import jax.numpy as jnp

    pad = ((0, 0), (0, new_tokens))
    inputs = {"tokens": jnp.pad(prompts["tokens"], pad)}
    if "image_slots" in model_inputs:
        inputs["image_slots"] = jnp.pad(prompts["image_slots"], pad, constant_values=-1)
    if "images" in model_inputs:
        inputs["images"] = prompts["images"]
    return inputs


def uncached_step(graphdef):
    """A jitted `step(state, inputs, lengths) -> (inputs, token [b], lengths + 1)`:
    the full forward pass over the padded sequence `[b, prompt + new]` (rows
    valid up to `lengths`), the argmax after each row's last token, written
    at slot `lengths`."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    @jax.jit
    def step(state, inputs, lengths):
        model = nnx.merge(graphdef, state)
        b, s = inputs["tokens"].shape
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        segment_ids = (positions < lengths[:, None]).astype(jnp.int32)
        logits, _ = model.forward_batch({**inputs, "segment_ids": segment_ids, "positions": positions})
        last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
        token = jnp.argmax(last, axis=-1).astype(jnp.int32)
        inputs = {**inputs, "tokens": inputs["tokens"].at[jnp.arange(b), lengths].set(token)}
        return inputs, token, lengths + 1

    return step


def uncached_decoding(model, model_inputs: tuple[str, ...], prompts: dict, new_tokens: int, repeats: int) -> dict:
    """Greedy decoding by recomputing the whole sequence per token, timed."""
    import jax.numpy as jnp
    from flax import nnx

    from mmjax.generate.decode import without_capacity_drops

    graphdef, state = nnx.split(without_capacity_drops(model))
    start = padded_inputs(model_inputs, prompts, new_tokens)
    lengths = prompts["lengths"].astype(jnp.int32)
    step, compile_s = compiled(uncached_step(graphdef), state, start, lengths)

    def run():
        inputs, length, tokens = start, lengths, []
        for _ in range(new_tokens):
            inputs, token, length = step(state, inputs, length)
            tokens.append(token)
        return jnp.stack(tokens, axis=1)

    timed(run, 1)  # warm-up: first-run allocations
    times, tokens = timed(run, repeats)
    total = statistics.median(times)
    rows = prompts["tokens"].shape[0]
    return {"decoding": "uncached", "compile_s": compile_s, "prefill_s": None, "total_s": total,
            "new_tokens_per_s": rows * new_tokens / total, "per_token_ms": 1e3 * total / new_tokens,
            "times_s": times, "tokens": tokens}


def parse_args(argv: list[str]):
    """The command line (module doc); `--config.FIELD=VALUE` overrides apply."""
    from absl import flags

    from mmjax.frontend import parse_flags

    def define(fv):
        flags.DEFINE_string("workdir", None, "where results.csv and summary.json go", flag_values=fv)
        flags.DEFINE_integer("batch", 8, "prompts decoded together (rows)", flag_values=fv, lower_bound=1)
        flags.DEFINE_integer("prompt_len", 64, "tokens per prompt (random ids; for a model that reads images "
                             "<bos> and one image's slot block come first)", flag_values=fv, lower_bound=1)
        flags.DEFINE_integer("new_tokens", 32, "tokens generated per prompt (no stop ids: all are produced)",
                             flag_values=fv, lower_bound=1)
        flags.DEFINE_integer("repeats", 3, "timed runs of each measurement after compiling; medians are "
                             "reported", flag_values=fv, lower_bound=1)

    args = parse_flags(argv, "python -m mmjax.bench.decode", __doc__, define, "experiments/tiny.py")
    if not args.workdir:
        raise SystemExit("error: --workdir is required (results.csv and summary.json go there).")
    return args


def check_prompt_len(config, prompt_len: int) -> None:
    """A prompt must hold <bos>, one image's slot block and a text token when
    the model reads images."""
    from mmjax.models.registry import model_spec

    need = config.model.connector.num_tokens + 2
    if model_spec(config.model).uses_images and prompt_len < need:
        raise SystemExit(f"error: --prompt_len={prompt_len}: model {config.model.name!r} reads images; a prompt "
                         f"needs at least {need} tokens (<bos>, {need - 2} image slots, one text token).")


def report(cached: dict, uncached: dict, match: bool, log=print) -> float:
    """Prints the side-by-side table, the ratio and the token check; returns the ratio."""
    log(f"\n{'decoding':10s} {'compile s':>10s} {'prefill s':>10s} {'total s':>9s} {'tokens/s':>10s} "
        f"{'ms/token':>9s}")
    for row in (cached, uncached):
        prefill = "-" if row["prefill_s"] is None else f"{row['prefill_s']:.4f}"
        log(f"{row['decoding']:10s} {row['compile_s']:10.2f} {prefill:>10s} {row['total_s']:9.4f} "
            f"{row['new_tokens_per_s']:10.1f} {row['per_token_ms']:9.3f}")
    ratio = cached["new_tokens_per_s"] / uncached["new_tokens_per_s"]
    log(f"\ncached / uncached tokens/s: {ratio:.2f}x")
    log(f"prefill compile (AOT) {cached['prefill_compile_s']:.2f} s; jitted_generate first call "
        f"{cached['first_call_s']:.2f} s")
    log("tokens: identical" if match else "tokens: DIFFERENT (cached and uncached greedy disagree)")
    return ratio


def write_results(workdir: str, cached: dict, uncached: dict, summary: dict) -> None:
    """`results.csv` (one row per decoding mode) and `summary.json`."""
    workdir = workdir_path(workdir)
    write_csv(workdir / "results.csv", COLUMNS,
              [{k: "" if row[k] is None else row[k] for k in COLUMNS} for row in (cached, uncached)])
    write_text(workdir / "summary.json", json.dumps(summary, indent=2))


def public(row: dict) -> dict:
    """A result row without its token arrays (for summary.json)."""
    return {k: v for k, v in row.items() if k != "tokens"}


def main(argv=None) -> int:
    import sys

    from mmjax.frontend import prepare_runtime

    args = parse_args(sys.argv[1:] if argv is None else argv)
    config = args.config.copy_and_resolve_references()
    prepare_runtime(config)
    check_prompt_len(config, args.prompt_len)
    import jax
    import numpy as np
    from flax import nnx

    from mmjax.models.registry import build_model, model_spec

    workdir_path(args.workdir)  # a bucket that cannot be reached is refused before the model is built
    model = build_model(config.model, nnx.Rngs(config.train.seed))
    prompts = make_prompts(config, args.batch, args.prompt_len, config.train.seed)
    device = jax.devices()[0]
    print(f"model {config.model.get('name', 'mm1')} ({config.model.dtype}) on {device.platform}:{device.id}; "
          f"batch {args.batch}, prompt {args.prompt_len}, new tokens {args.new_tokens}, repeats {args.repeats}",
          flush=True)
    print("cached decoding (jitted_generate) ...", flush=True)
    cached = cached_decoding(model, prompts, args.new_tokens, args.repeats)
    print("uncached decoding (full forward pass per token) ...", flush=True)
    uncached = uncached_decoding(model, model_spec(config.model).inputs, prompts, args.new_tokens, args.repeats)
    match = bool(np.array_equal(np.asarray(cached["tokens"]), np.asarray(uncached["tokens"])))
    ratio = report(cached, uncached, match)
    summary = {"config": config.to_dict(), "batch": args.batch, "prompt_len": args.prompt_len,
               "new_tokens": args.new_tokens, "repeats": args.repeats, "device": str(device),
               "cached": public(cached), "uncached": public(uncached), "tokens_match": match,
               "speedup_tokens_per_s": ratio if math.isfinite(ratio) else None}
    write_results(args.workdir, cached, uncached, summary)
    return 0


if __name__ == "__main__":
    import sys

    from mmjax.frontend import run_command

    sys.exit(run_command(main))
