"""Score an mmjax checkpoint on EleutherAI lm-evaluation-harness text tasks
(MMLU, HellaSwag, GSM8K, ...), an optional extra (`pip install -e .[lm_eval]`).

  python -m mmjax.eval.lm_harness --config experiments/tiny.py --workdir /tmp/mmjax-tiny --tasks hellaswag
  python -m mmjax.eval.lm_harness --config experiments/tiny.py --workdir DIR --step 200 --tasks gsm8k \\
      --num_fewshot 5 --limit 100 --include_path my_tasks/

From Python, `register()` adds the model "mmjax" to lm_eval's registry:
  lm_eval.simple_evaluate(model="mmjax", model_args="config=experiments/tiny.py,workdir=DIR,step=200", tasks=[...])
model_args: `config` (a file, `FILE:ARG` allowed, or a config object), `workdir`, `step` (0: the latest
checkpoint), `converted` (folders of `mmjax.tools.convert_hf`, joined by `:`), `batch_size`, `max_gen_toks`.

`MmjaxLM` does the work without importing lm_eval; its methods take request
objects with `.args` as lm_eval's `Instance` has them:
  loglikelihood         (context, continuation) -> (sum of log p(continuation tokens), every one the argmax)
  loglikelihood_rolling (text,) -> sum of log p(text | <bos>), over disjoint windows of seq_len predictions
  generate_until        (context, {"until", "max_gen_toks", ...}) -> greedy text cut at the first stop string
Text is tokenised as the harness does for causal models: `<bos>` + context,
the context's trailing spaces moved to the continuation, whose tokens are
those of context + continuation past the context's. A sequence longer than
`data.seq_len` (generation: `data.seq_len` less the new tokens) is cut from
the left after `<bos>`. Generation makes at most `max_gen_toks` (the request's,
else the model's) and at most `data.seq_len // 2` tokens, greedily, whatever
`do_sample` or `temperature` ask. Rows are sorted by length, padded to
multiples of `LENGTH_BUCKET` and run in batches on the training mesh.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from mmjax.eval.batching import LENGTH_BUCKET, Generator, chunks, place
from mmjax.eval.prompts import Prompt
from mmjax.generate.decode import Sampling

DEFAULT_MAX_GEN_TOKS = 256


def fit_left(ids: list[int], limit: int) -> list[int]:
    """`ids` (starting with `<bos>`) cut to `limit` tokens from the left, `<bos>` kept."""
    if len(ids) <= limit:
        return ids
    return ids[:1] + ids[len(ids) - limit + 1:]


def rolling_windows(tokens: list[int], prefix: int, max_len: int) -> list[tuple[list[int], int]]:
    """Disjoint scoring windows over `tokens` (lm_eval's `get_rolling_token_windows`
    with context_len 1, then `make_disjoint_window`): one `(ids, n)` per
    window, `ids` at most `max_len + 1` long, its last `n` tokens predicted;
    every token is predicted once, the first from `prefix`."""
    if not tokens:
        return []
    first = min(max_len, len(tokens))
    windows = [([prefix] + tokens[:first], first)]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_len)
        end = done + n
        windows.append((tokens[end - max_len - 1:end], n))
        done = end
    return windows


def score_batch(rows: list[tuple[list[int], int]], batch_size: int, image_size: int | None) -> dict:
    """Rows `(ids, n)` (the last `n` of `ids` scored) -> host arrays
    `tokens`, `targets`, `scored`, `segment_ids`, `positions` `[batch_size, P]`
    with P the longest `len(ids) - 1` rounded up to `LENGTH_BUCKET`; position
    t reads `tokens[t]` and is scored on `targets[t] = ids[t + 1]`. With
    `image_size`, `image_slots [b, P]` (-1) and blank `images [b, 1, T, T, 3]`."""
    rows = rows + [rows[0]] * (batch_size - len(rows))
    length = -(-max(len(ids) - 1 for ids, _ in rows) // LENGTH_BUCKET) * LENGTH_BUCKET
    batch = {name: np.zeros((batch_size, length), dtype)
             for name, dtype in (("tokens", np.int32), ("targets", np.int32), ("scored", np.float32),
                                 ("segment_ids", np.int32))}
    for i, (ids, n) in enumerate(rows):
        inputs = len(ids) - 1
        batch["tokens"][i, :inputs] = ids[:-1]
        batch["targets"][i, :inputs] = ids[1:]
        batch["scored"][i, inputs - n:inputs] = 1.0
        batch["segment_ids"][i, :inputs] = 1
    batch["positions"] = np.broadcast_to(np.arange(length, dtype=np.int32), (batch_size, length)).copy()
    if image_size is not None:
        batch["image_slots"] = np.full((batch_size, length), -1, np.int32)
        batch["images"] = np.zeros((batch_size, 1, image_size, image_size, 3), np.uint8)
    return batch


def score_fn(setup):
    """jitted `fn(params, batch) -> (sum of scored log-probs [b], every scored
    target the argmax [b])`, replicated on the mesh."""
    from mmjax.train.step import model_logits

    def run(params, batch):
        logits = model_logits(setup.graphdef, params, batch, setup.resolver).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        picked = jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
        hit = (jnp.argmax(logits, axis=-1) == batch["targets"]) | (batch["scored"] == 0)
        return (picked * batch["scored"]).sum(axis=-1), hit.all(axis=-1)

    return jax.jit(run, out_shardings=NamedSharding(setup.mesh, PartitionSpec()))


def cut_at_stops(text: str, stops: Iterable[str]) -> str:
    """`text` before the first occurrence of each stop string in turn (as
    lm_eval's `postprocess_generated_text`; no stripping)."""
    for stop in stops:
        if stop:
            text = text.split(stop)[0]
    return text


def stop_strings(until) -> list[str]:
    """`until` (a string, a list or None) -> list of stop strings."""
    if until is None:
        return []
    return [until] if isinstance(until, str) else list(until)


def longest_first(lengths: list[int]) -> list[int]:
    """Indices into `lengths`, longest first (rows of a batch then pad little)."""
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


class MmjaxLM:
    """A checkpoint scored as lm_eval asks (module doc); results are plain
    Python floats, bools and strings."""

    def __init__(self, config, workdir: str, step: int = 0, converted: Iterable[str] = (), batch_size: int = 0,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, progress: bool = True):
        from mmjax.data.pipeline import default_tokenizer
        from mmjax.eval.runner import load_params
        from mmjax.models import model_spec
        from mmjax.parallel import mesh_axes_size

        self.config = config
        self.setup, self.params, self.step = load_params(config, workdir, step, list(converted))
        self.tokenizer = default_tokenizer(config.data)
        self.seq_len = config.data.seq_len
        self.max_gen_toks = max_gen_toks
        self.image_size = config.data.image_size if model_spec(config.model).uses_images else None
        self.batch_spec = self.setup.batch_shardings["tokens"].spec[0]
        shards = mesh_axes_size(self.setup.mesh, self.batch_spec)
        wanted = batch_size or config.data.global_batch
        self.batch_size = -(-wanted // shards) * shards
        self.progress = progress and jax.process_index() == 0
        self._score = score_fn(self.setup)
        self._generators: dict[int, Generator] = {}

    def _bar(self, total: int, description: str):
        from tqdm import tqdm

        return tqdm(total=total, desc=description, file=sys.stderr, leave=False, disable=not self.progress,
                    dynamic_ncols=True)

    def pair_row(self, context: str, continuation: str) -> tuple[list[int], int]:
        """`(ids, n)`: `<bos>` + context + continuation tokens, the last `n` the continuation's."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        tok = self.tokenizer
        context_ids = tok.encode(context)
        whole = tok.encode(context + continuation)
        ids = [tok.bos_id] + context_ids + whole[len(context_ids):]
        n = len(whole) - len(context_ids)
        ids = fit_left(ids, self.seq_len + 1)
        return ids, min(n, len(ids) - 1)

    def score_rows(self, rows: list[tuple[list[int], int]], description: str) -> list[tuple[float, bool]]:
        """`(sum of log-probs of the last n tokens, all of them the argmax)` per row `(ids, n)`."""
        order, out = longest_first([len(ids) for ids, _ in rows]), [None] * len(rows)
        bar = self._bar(len(rows), description)
        for part in chunks(order, self.batch_size):
            batch = place(score_batch([rows[i] for i in part], self.batch_size, self.image_size),
                          self.setup.mesh, self.batch_spec)
            sums, greedy = jax.device_get(self._score(self.params, batch))
            for j, i in enumerate(part):
                out[i] = (float(sums[j]), bool(greedy[j]))
            bar.update(len(part))
        bar.close()
        return out

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """`[(log p(continuation | context), greedy)]` for `req.args == (context, continuation)`."""
        rows = [self.pair_row(*req.args) for req in requests]
        return self.score_rows(rows, "loglikelihood") if rows else []

    def loglikelihood_rolling(self, requests) -> list[float]:
        """`[log p(text | <bos>)]` for `req.args == (text,)`."""
        rows, owner = [], []
        for index, req in enumerate(requests):
            windows = rolling_windows(self.tokenizer.encode(req.args[0]), self.tokenizer.bos_id, self.seq_len)
            rows += windows
            owner += [index] * len(windows)
        totals = [0.0] * len(requests)
        for index, (value, _) in zip(owner, self.score_rows(rows, "loglikelihood_rolling") if rows else []):
            totals[index] += value
        return totals

    def new_tokens(self, gen_kwargs: dict) -> int:
        """Tokens to generate: the request's `max_gen_toks` (or its aliases), else
        the model's, at most `seq_len // 2`."""
        for key in ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens"):
            if gen_kwargs.get(key) is not None:
                return max(1, min(int(gen_kwargs[key]), self.seq_len // 2))
        return max(1, min(self.max_gen_toks, self.seq_len // 2))

    def _generator(self, max_new: int) -> Generator:
        if max_new not in self._generators:
            tok = self.tokenizer
            sampling = Sampling(max_new_tokens=max_new, temperature=0.0, stop_ids=(tok.eos_id,), pad_id=tok.pad_id)
            model = nnx.merge(self.setup.graphdef, self.setup.abstract_params)
            shape = None if self.image_size is None else (self.image_size, self.image_size, 3)
            self._generators[max_new] = Generator(model, sampling, self.setup.mesh, self.setup.resolver,
                                                  self.batch_spec, self.batch_size, shape)
        return self._generators[max_new]

    def prompt(self, context: str, max_new: int) -> Prompt:
        """`<bos>` + context, cut to leave room for `max_new` tokens, as a text-only Prompt."""
        ids = np.asarray(fit_left([self.tokenizer.bos_id] + self.tokenizer.encode(context),
                                  self.seq_len - max_new), np.int32)
        size = self.image_size or 1
        return Prompt(ids, np.full(ids.shape, -1, np.int32), np.zeros((0, size, size, 3), np.uint8), 0, 0)

    def generate_until(self, requests) -> list[str]:
        """Greedy continuations for `req.args == (context, gen_kwargs)`, cut at `gen_kwargs["until"]`."""
        groups: dict[int, list[int]] = {}
        for index, req in enumerate(requests):
            groups.setdefault(self.new_tokens(req.args[1] or {}), []).append(index)
        out = [""] * len(requests)
        bar = self._bar(len(requests), "generate_until")
        for max_new, indices in groups.items():
            prompts = [self.prompt(requests[i].args[0], max_new) for i in indices]
            order = longest_first([len(p.ids) for p in prompts])
            generated = self._generator(max_new)(self.params, [prompts[j] for j in order], bar.update)
            for j, row in zip(order, generated):
                stops = stop_strings((requests[indices[j]].args[1] or {}).get("until"))
                out[indices[j]] = cut_at_stops(self.tokenizer.decode(row[0]), stops)
        bar.close()
        return out


def load_config(spec: str):
    """The config of an experiment file `FILE` or `FILE:ARG` (its `get_config(ARG)`)."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        from mmjax.errors import ConfigError

        raise ConfigError(f"config={spec!r}: no such file {path!r}.")
    module_spec = importlib.util.spec_from_file_location(f"_mmjax_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def _batch_size(value) -> int:
    """lm_eval's `batch_size` (an int, "8", "auto", "auto:4" or None) -> rows per batch (0: data.global_batch)."""
    return int(value) if isinstance(value, int) or (isinstance(value, str) and value.isdigit()) else 0


def _lm_class(base):
    """A subclass of lm_eval's `LM` (`base`) that delegates to `MmjaxLM`."""

    class MmjaxHarnessLM(base):
        """lm_eval model "mmjax": model_args as the module doc lists them."""

        def __init__(self, config, workdir: str, step: int = 0, converted: str = "", batch_size=None,
                     max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, **unused):
            super().__init__()
            if isinstance(config, str):
                from mmjax.frontend import prepare_runtime

                config = load_config(config)
                prepare_runtime(config)
            folders = converted.split(":") if isinstance(converted, str) else list(converted or ())
            self.core = MmjaxLM(config, workdir, int(step or 0), [f for f in folders if f],
                                _batch_size(batch_size), int(max_gen_toks))

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return self.core.loglikelihood(requests)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return self.core.loglikelihood_rolling(requests)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return self.core.generate_until(requests)

        @property
        def tokenizer_name(self) -> str:
            return f"mmjax-bpe-{self.core.tokenizer.vocab_size}"

    return MmjaxHarnessLM


_REGISTERED: dict[str, type] = {}


def register():
    """Registers "mmjax" in lm_eval's model registry (once per process) and
    returns its class, or None when lm_eval is not installed."""
    try:
        importlib.import_module("lm_eval.models")  # the built-in names are registered first
        from lm_eval.api.model import LM
        from lm_eval.api.registry import model_registry, register_model
    except ImportError:
        return None
    if "mmjax" not in _REGISTERED:
        _REGISTERED["mmjax"] = _lm_class(LM)
    cls = _REGISTERED["mmjax"]
    if model_registry.get("mmjax", None) is not cls:
        register_model("mmjax")(cls)
    return cls


def _define(fv) -> None:
    from absl import flags

    flags.DEFINE_string("workdir", None, "The training workdir whose checkpoints/ are read.", flag_values=fv)
    flags.DEFINE_integer("step", 0, "Checkpoint step (0: the latest).", lower_bound=0, flag_values=fv)
    flags.DEFINE_string("tasks", "", "Comma-separated lm_eval task names.", flag_values=fv)
    flags.DEFINE_integer("num_fewshot", None, "Demonstrations per prompt (default: the task's).", flag_values=fv)
    flags.DEFINE_float("limit", None, "Examples per task (a fraction when below 1).", flag_values=fv)
    flags.DEFINE_string("include_path", "", "A folder of extra task YAML files.", flag_values=fv)
    flags.DEFINE_integer("batch_size", 0, "Rows per batch (0: data.global_batch).", lower_bound=0, flag_values=fv)


def main(argv: list[str]) -> int:
    from mmjax.frontend import parse_flags, prepare_runtime

    args = parse_flags(argv, "python -m mmjax.eval.lm_harness", __doc__, _define)
    if not args.workdir or not args.tasks:
        raise SystemExit("error: --workdir and --tasks are required.")
    prepare_runtime(args.config)
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import make_table
    except ImportError:
        raise SystemExit("error: lm_eval is not installed; pip install -e .[lm_eval]") from None
    model = register()(args.config, args.workdir, step=args.step, batch_size=args.batch_size)
    limit = args.limit if args.limit is None or args.limit < 1 else int(args.limit)
    results = lm_eval.simple_evaluate(model=model, tasks=[t for t in args.tasks.split(",") if t],
                                      num_fewshot=args.num_fewshot, limit=limit,
                                      task_manager=TaskManager(include_path=args.include_path or None))
    if results is not None:
        print(make_table(results))
    return 0


if __name__ == "__main__":
    from mmjax.frontend import run_command

    sys.exit(run_command(main))
