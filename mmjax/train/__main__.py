"""Train an MM1-style model.

  python -m mmjax.train --config experiments/tiny.py --workdir /tmp/mmjax-tiny
  python -m mmjax.train --config experiments/tiny.py --workdir DIR --config.train.steps=50

Every config field can be overridden with `--config.<path>=<value>`. Running
again with the same --workdir resumes from its latest checkpoint.
Outputs under --workdir: config.json, metrics.jsonl, tensorboard/,
checkpoints/<step>/, summary.json.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None,
    "Experiment config file (experiments/*.py exposing get_config); 'FILE:ARG' passes ARG "
    "to get_config. Override fields with --config.<path>=<value>.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None,
    "Directory for all outputs (config.json, metrics.jsonl, tensorboard/, checkpoints/). "
    "An existing workdir with checkpoints is resumed from its latest step.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # library INFO chatter hides the progress lines
        logging.set_verbosity(logging.WARNING)
    import jax

    config = _CONFIG.value
    if config.runtime.cpu_devices:
        jax.config.update("jax_num_cpu_devices", config.runtime.cpu_devices)
    from mmjax.train.config_checks import ConfigError
    from mmjax.train.loop import train

    try:
        train(config, _WORKDIR.value)
    except ConfigError as err:
        raise SystemExit(f"config error: {err}") from None


if __name__ == "__main__":
    if any(arg in ("-h", "--help", "--helpshort") for arg in sys.argv[1:]):
        app.usage(shorthelp=True, writeto_stdout=True, exitcode=0)  # absl would exit 1
    app.run(main)
