"""Compiles train steps in a fresh process, so a test can read what XLA
prints on stderr (its warnings bypass Python's logging):

  python tests/compile_warnings_worker.py KIND [KIND ...]

KIND: a connector kind on the small test config (c_abstractor, avg_pool,
attention_pool; `KIND-accum2`: with two gradient-accumulation micro-batches),
or moe-capacity / moe-dropless for the tiny MoE config.
Prints "compiled KIND" after each.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import conftest  # noqa: E402,F401  (8 simulated devices)
from conftest import small_config  # noqa: E402

from experiments.tiny_moe import get_config as tiny_moe  # noqa: E402
from mmjax.bench.aot import abstract_batch  # noqa: E402
from mmjax.parallel import get_layout, make_mesh  # noqa: E402
from mmjax.train.loop import build_step  # noqa: E402
from mmjax.train.state import abstract_train_state  # noqa: E402


def config_for(kind: str):
    if kind.startswith("moe-"):
        c = tiny_moe()
        c.model.decoder.moe.dispatch = kind.removeprefix("moe-")
        return c
    c = small_config()
    c.model.connector.kind = kind.removesuffix("-accum2")
    if kind.endswith("-accum2"):
        c.data.global_batch, c.train.grad_accum_steps = 16, 2
    return c


if __name__ == "__main__":
    for kind in sys.argv[1:]:
        c = config_for(kind)
        setup, step = build_step(c, make_mesh(dict(c.mesh)), get_layout(c.rules))
        step.lower(abstract_train_state(setup), abstract_batch(c, setup)).compile()
        print(f"compiled {kind}", flush=True)
