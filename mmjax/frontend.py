"""One front end for every command: a config file, `--config.FIELD=VALUE`
overrides, the hardware preset and the runtime set-up.

Every command loads its config with ml_collections' `DEFINE_config_file`
(`--config FILE[:ARG]`, then any `--config.a.b=value`; `--config.hardware=NAME`
applies that preset, see `mmjax.hardware`) and calls `prepare_runtime` before
JAX starts its backend: simulated CPU devices (`runtime.cpu_devices`) and,
for multi-process runs, `jax.distributed` initialisation.

Commands whose `main(argv)` is also called in-process (the benchmarks) parse
their flags on a private `absl.flags.FlagValues` (`parse_flags`), so several
of them can run in one process without redefining global flags; `mmjax.train`
and `mmjax.bench.aot` keep absl's global flags (`app.run`) and share the same
config flag definition (`define_config_flag`).
"""

from __future__ import annotations

from typing import Callable

from absl import flags
from ml_collections import config_flags

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


def parse_flags(argv: list[str], prog: str, doc: str, define: Callable[[flags.FlagValues], None],
                config_default: str | None = None) -> flags.FlagValues:
    """Parses `argv` (without the program name) on a private FlagValues with
    the config flag plus what `define(flag_values)` adds. `--help` prints `doc`
    and the flags and exits 0; a bad flag exits with one sentence."""
    values = flags.FlagValues()
    define_config_flag(config_default, values, sys_argv=[prog, *argv])
    define(values)
    if any(arg in ("-h", "--help", "--helpshort") for arg in argv):
        print(doc)
        print(values.get_help(include_special_flags=False))
        raise SystemExit(0)
    try:
        values([prog, *argv])
    except flags.Error as err:
        raise SystemExit(f"error: {err}") from None
    if values.config is None:
        raise SystemExit("error: --config FILE[:ARG] is required.")
    return values


def prepare_runtime(config, coordinator_address: str | None = None, num_processes: int | None = None,
                    process_id: int | None = None, distributed: bool = False) -> None:
    """Applies `--config.hardware=NAME`, sets the simulated CPU device count and
    (with `distributed=True`) initialises `jax.distributed` from the arguments,
    the environment or the cluster. Must run before JAX starts its backend."""
    import jax

    from mmjax.config_base import apply_hardware_flag

    apply_hardware_flag(config)
    if config.runtime.cpu_devices:  # per process; before the backend and the distributed set-up
        jax.config.update("jax_num_cpu_devices", config.runtime.cpu_devices)
    if distributed:
        from mmjax.train.distributed import initialize_from_flags_or_env

        try:
            initialize_from_flags_or_env(coordinator_address, num_processes, process_id)
        except ValueError as err:
            raise SystemExit(f"multi-process set-up: {err}") from None
