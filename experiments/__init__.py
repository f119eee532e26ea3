"""Experiment configs: one file per experiment family, each exposing
`get_config(arg=None)`. Installed with mmjax (`pip install -e .`), so a config
file loads from any working directory:

  python -m mmjax.train --config /abs/path/to/experiments/tiny.py --workdir DIR
"""
