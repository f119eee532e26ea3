"""Refusals: bad input from the user (config, data, checkpoint, topology).

Every command prints a `Refusal` as one sentence on the last line of its
output, without a traceback, and exits with status 2 (`mmjax.frontend.
run_command`; `--verbose` or `MMJAX_TRACEBACK=1` shows the traceback too).
Anything else that escapes is a bug and keeps its traceback. The classes
derive from `ValueError`, so callers that catch that keep working.
"""


class Refusal(ValueError):
    """Bad input; the message is one sentence naming what is wrong and where.
    `label` starts the printed line ("config error: ...")."""

    label = "error"


class ConfigError(Refusal):
    """The experiment config is inconsistent or impossible."""

    label = "config error"


class DataError(Refusal):
    """A data source cannot be read as configured."""

    label = "data error"


class CheckpointError(Refusal):
    """No checkpoint in the workdir can be restored (or the config says stop)."""

    label = "checkpoint error"
