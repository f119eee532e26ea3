"""Evaluators by name: what the loop runs on the parameters at
`train.eval_every` steps, at the start of a fresh run and at the end.

`config.eval.<name> = True` switches evaluator `<name>` on; its settings live
in `config.evaluators.<name>`. A settings block with a `kind` field is an
instance of the evaluator registered under that kind (several captioning
tasks, say, each with its own files); otherwise the name is the kind. A
registered evaluator is a factory

    make(config, setup, tokenizer, name) -> evaluate(params) -> {metric: float}
                                            | str (why it cannot run on this config)

that builds its fixed data once; `evaluate` returns flat metrics, which the
loop writes as `eval/<name>/<metric>` to metrics.jsonl and TensorBoard and
keeps in `summary.json` under `eval`. The loop knows no evaluator by name.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable
from mmjax.errors import ConfigError

# Modules whose import registers the built-in evaluators.
_BUILTIN_MODULES = ("mmjax.train.caption_eval", "mmjax.eval.tasks", "mmjax.eval.choice",
                    "mmjax.train.contrastive_eval", "mmjax.train.classification_eval")


@dataclasses.dataclass(frozen=True)
class EvaluatorSpec:
    name: str
    make: Callable  # (config, setup, tokenizer, name) -> evaluate(params) -> dict | str
    fields: dict  # setting name -> config_schema rule, checked before anything is built
    check: Callable | None = None  # (settings, where) -> None or a Refusal: files, cross-field rules


EVALUATORS: dict[str, EvaluatorSpec] = {}


def register_evaluator(name: str, fields: dict | None = None, check: Callable | None = None):
    """Decorator registering `make(config, setup, tokenizer, name)` as evaluator
    `name`; `fields` maps each setting in `config.evaluators.<name>` to a rule
    from `mmjax.train.config_schema`, and `check(settings, where)` refuses
    what the rules cannot see (missing files); both run with the rest of the
    config check, before anything is built (`check` for switched-on ones)."""

    def register(make):
        EVALUATORS[name] = EvaluatorSpec(name, make, dict(fields or {}), check)
        return make

    return register


def load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def evaluator_spec(config, name: str) -> EvaluatorSpec:
    """The registered evaluator `config.eval.<name>` runs: the kind its
    settings name, else `name` itself (ConfigError for an unknown one)."""
    load_builtins()
    settings = config.get("evaluators", {}).get(name)
    kind = settings.get("kind", name) if hasattr(settings, "get") else name
    if kind not in EVALUATORS:
        where = f"config.evaluators.{name}.kind={kind!r}" if kind != name else f"config.eval.{name}"
        raise ConfigError(f"{where} names no registered evaluator; choose from {sorted(EVALUATORS)}.")
    return EVALUATORS[kind]


def enabled_evaluators(config) -> list[str]:
    """Names switched on in `config.eval` (ConfigError for an unknown one)."""
    names = [name for name, on in config.get("eval", {}).items() if on]
    for name in names:
        evaluator_spec(config, name)
    return names


def make_evaluators(config, setup, tokenizer, log: Callable[[str], None]) -> dict[str, Callable]:
    """{name: evaluate(params) -> metrics} for the switched-on evaluators that
    can run on this config; the others are skipped with their reason logged."""
    out = {}
    for name in enabled_evaluators(config):
        made = evaluator_spec(config, name).make(config, setup, tokenizer, name)
        if isinstance(made, str):
            log(f"evaluator {name!r} skipped: {made}")
        else:
            out[name] = made
    return out


def run_evaluators(evaluators: dict[str, Callable], params) -> dict[str, float]:
    """All evaluators on `params`: {"<name>/<metric>": value}."""
    return {f"{name}/{key}": value for name, evaluate in evaluators.items()
            for key, value in evaluate(params).items()}
