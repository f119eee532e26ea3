"""The embedded default: a small MM1 model (ViT -> C-Abstractor -> dense
decoder) on procedural shapes data, 8 simulated CPU devices, a
data=2 x fsdp=2 x expert=2 mesh, 300 steps.

  python -m mmjax.train --config experiments/tiny.py --workdir /tmp/mmjax-tiny

`--config experiments/tiny.py:smoke` gives a shorter run for tests.
"""

from mmjax.config_base import base_config
from mmjax.eval.task_settings import shapes_tasks


def get_config(arg=None):
    c = base_config()
    c.runtime.cpu_devices = 8
    c.mesh.update(data=2, fsdp=2, expert=2, model=1)  # keeps the slice counts (mesh.dcn_*)
    c.train.steps = 300
    # Few-shot captioning and VQA on held-out shapes scenes (python -m mmjax.eval, and every
    # train.eval_every steps inside training).
    for name, settings in shapes_tasks().items():
        c.evaluators[name] = settings
        c.eval[name] = True
    c.train.eval_every = 100
    if arg == "smoke":
        c.train.steps = 40
        c.train.log_every = 5
        c.train.checkpoint_every = 20
        c.evaluators.caption_accuracy.num_examples = 32
    elif arg not in (None, ""):
        raise ValueError(f"experiments/tiny.py takes no argument or 'smoke', got {arg!r}.")
    return c
