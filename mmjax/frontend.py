"""One front end for every command: a config file, `--config.FIELD=VALUE`
overrides, the hardware preset and the runtime set-up.

Every command loads its config with ml_collections' `DEFINE_config_file`
(`--config FILE[:ARG]`, then any `--config.a.b=value`; `--config.hardware=NAME`
applies that preset, see `mmjax.hardware`) and calls `prepare_runtime` before
JAX starts its backend: simulated CPU devices (`runtime.cpu_devices`) and,
for multi-process runs, `jax.distributed` initialisation.

Every command's `main(argv)` parses its flags on a private
`absl.flags.FlagValues` (`parse_flags`), so several of them can run in one
process without redefining global flags, and runs under `run_command`: bad
input (a `mmjax.errors.Refusal`: config, data, checkpoint, topology) ends the
command with one sentence as the last line and exit status 2, without a
traceback (`--verbose` or `MMJAX_TRACEBACK=1` shows it). The whole config is
validated (`mmjax.train.config_checks.check_static`) in `prepare_runtime`,
before anything is built or compiled.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
import traceback
from typing import Callable

from absl import flags, logging
from ml_collections import config_flags

from mmjax.errors import Refusal

TRACEBACK_ENV = "MMJAX_TRACEBACK"
VERBOSE_HELP = ("Show library INFO logs, and the traceback above a refusal's one-sentence error "
                f"(also ${TRACEBACK_ENV}=1).")

CONFIG_HELP = ("Experiment config file (experiments/*.py exposing get_config); 'FILE:ARG' passes ARG to "
               "get_config. Override any field with --config.<path>=<value>, e.g. --config.train.steps=50; "
               "--config.hardware=NAME applies a hardware preset (mmjax/hardware.py).")


def define_config_flag(default: str | None = None, flag_values: flags.FlagValues = flags.FLAGS,
                       sys_argv: list[str] | None = None):
    """`--config FILE[:ARG]` with `--config.FIELD=VALUE` overrides (locked
    config). ml_collections finds the override flags in `sys_argv` (default:
    `sys.argv`)."""
    return config_flags.DEFINE_config_file("config", default, CONFIG_HELP, flag_values=flag_values,
                                           lock_config=True, sys_argv=sys_argv)


def define_process_flags(fv: flags.FlagValues) -> None:
    """--coordinator_address, --num_processes, --process_id (multi-process runs)."""
    flags.DEFINE_string(
        "coordinator_address", None,
        "Multi-process runs: HOST:PORT of process 0, the same on every process (process 0 listens "
        "there). Default: $MMJAX_COORDINATOR_ADDRESS; unset on SLURM/Open MPI/multi-host TPU, where "
        "it is found automatically; unset elsewhere means a single-process run.", flag_values=fv)
    flags.DEFINE_integer(
        "num_processes", None,
        "Multi-process runs: how many processes take part (default: $MMJAX_NUM_PROCESSES).", lower_bound=1,
        flag_values=fv)
    flags.DEFINE_integer(
        "process_id", None,
        "Multi-process runs: this process's index, 0..num_processes-1 (default: $MMJAX_PROCESS_ID).",
        lower_bound=0, flag_values=fv)


def parse_flags(argv: list[str], prog: str, doc: str, define: Callable[[flags.FlagValues], None],
                config_default: str | None = None) -> flags.FlagValues:
    """Parses `argv` (without the program name) on a private FlagValues with
    the config flag plus what `define(flag_values)` adds. `--help` prints `doc`
    and the flags and exits 0; a bad flag exits with one sentence."""
    config_file = _config_arg(argv).split(":", 1)[0]
    if config_file != "(default)" and not os.path.isfile(config_file):
        raise SystemExit(f"error: --config {_config_arg(argv)}: no such file {config_file!r}.")
    values = flags.FlagValues()
    try:  # the config flag reads its default file and the overrides when defined
        define_config_flag(config_default, values, sys_argv=[prog, *argv])
    except flags.Error as err:
        raise SystemExit(f"error: {_flag_error(err, argv)}") from None
    except (AttributeError, KeyError) as err:
        raise SystemExit(f"error: {_unknown_field(err, argv)}") from None
    flags.DEFINE_bool("verbose", False, VERBOSE_HELP, flag_values=values)
    define(values)
    if any(arg in ("-h", "--help", "--helpshort", "--helpfull") for arg in argv):
        print(doc)
        print(values.get_help(include_special_flags=False))
        raise SystemExit(0)
    try:
        values([prog, *argv])
        config = values.config  # applies the --config.FIELD overrides
    except flags.Error as err:
        raise SystemExit(f"error: {_flag_error(err, argv)}") from None
    except (AttributeError, KeyError) as err:  # a --config.FIELD override naming no field
        raise SystemExit(f"error: {_unknown_field(err, argv)}") from None
    if config is None:
        raise SystemExit("error: --config FILE[:ARG] is required.")
    logging.set_verbosity(logging.INFO if values.verbose else logging.WARNING)
    return values


def _flag_error(err: flags.Error, argv: list[str]) -> str:
    """absl's message in one line; a config file whose `get_config` raised
    is named with the exception's own sentence, not its traceback."""
    text = str(err)
    if "Error whilst parsing config file" in text:
        causes = [line.strip() for line in text.splitlines() if re.match(r"\s*\w+(Error|Exception): ", line)]
        cause = causes[-1].split(": ", 1)[1] if causes else text.strip().splitlines()[-1]
        return f"--config {_config_arg(argv)}: {cause}"
    text = " ".join(text.split())
    wrong_type = re.match(r"flag (--\S+?)=(.*?): (invalid literal for int\(\)|could not convert string to float)", text)
    if wrong_type:
        kind = "an integer" if "int()" in wrong_type.group(3) else "a number"
        return f"{wrong_type.group(1)}={wrong_type.group(2)}: {wrong_type.group(2)!r} is not {kind}."
    return text


def _config_arg(argv: list[str]) -> str:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return "(default)"


def _unknown_field(err: Exception, argv: list[str]) -> str:
    """'--config.train.stepz=5: config.train has no field 'stepz'; did you mean config.train.steps?'"""
    while err.args and isinstance(err.args[0], BaseException):
        err = err.args[0]
    message = str(err.args[0] if err.args else err)
    key = message.strip("'\" \n").split("'")[0].split("\n")[0]
    overrides = [a for a in argv if a.startswith("--config.")]
    arg = next((a for a in overrides if key in a.split("=", 1)[0].split(".")[1:]),
               overrides[0] if overrides else "--config")
    parts = arg.split("=", 1)[0][len("--"):].split(".")
    depth = parts.index(key) if key in parts else len(parts) - 1
    parent, leaf = ".".join(parts[:depth]), parts[depth]
    suggestion = re.search(r'Did you mean "([^"]+)"', message)
    hint = f"; did you mean {parent}.{suggestion.group(1)}?" if suggestion else "."
    return f"{arg}: {parent} has no field {leaf!r}{hint}"


def suggest(name: str, known) -> str:
    """'; did you mean X?' for the closest of `known`, or ''."""
    close = difflib.get_close_matches(name, list(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def run_command(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> int:
    """Runs `main(argv)` (default: `sys.argv[1:]`) and returns the exit
    status: a `Refusal` is printed as `<label>: <one sentence>`, the last line
    on stderr, and gives status 2; with `--verbose` or `$MMJAX_TRACEBACK` its
    traceback comes first. Other exceptions propagate (they are bugs)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return int(main(argv) or 0)
    except Refusal as err:
        if "--verbose" in argv or os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            traceback.print_exc()
        sys.stdout.flush()
        print(f"{err.label}: {' '.join(str(err).split())}", file=sys.stderr, flush=True)
        return 2


def prepare_runtime(config, coordinator_address: str | None = None, num_processes: int | None = None,
                    process_id: int | None = None, distributed: bool = False) -> None:
    """Applies `--config.hardware=NAME`, validates the whole config (a
    ConfigError names the first bad field), sets the simulated CPU device count
    and (with `distributed=True`) initialises `jax.distributed` from the
    arguments, the environment or the cluster. Must run before JAX starts its
    backend."""
    import jax

    from mmjax.config_base import apply_hardware_flag

    from mmjax.train.config_checks import check_static

    apply_hardware_flag(config)
    check_static(config)  # every field, before anything is built or compiled
    if config.runtime.cpu_devices:  # per process; before the backend and the distributed set-up
        jax.config.update("jax_num_cpu_devices", config.runtime.cpu_devices)
    if distributed:
        from mmjax.train.distributed import initialize_from_flags_or_env

        try:
            initialize_from_flags_or_env(coordinator_address, num_processes, process_id)
        except ValueError as err:
            raise SystemExit(f"multi-process set-up: {err}") from None
