"""A text-only decoder: the MM1 decoder without the vision tower
(`config.model.name="text_lm"`), trained by the same loop on the text stream
alone. The shape text trainers are compared with (MaxText's decoder-only LM);
8 simulated CPU devices on the tiny default's mesh, 300 steps.

  python -m mmjax.train --config experiments/text_lm.py --workdir /tmp/mmjax-text-lm

`--config experiments/text_lm.py:smoke` gives a 40-step run.
"""

from mmjax.config_base import base_config


def get_config(arg=None):
    c = base_config()
    c.model.name = "text_lm"
    c.runtime.cpu_devices = 8
    c.mesh.update(data=2, fsdp=2, expert=2, model=1)  # keeps the slice counts (mesh.dcn_*)
    c.data.mix_weights = (0.0, 0.0, 1.0)  # caption : interleaved : text
    c.data.max_images = 0
    c.eval.caption_accuracy = False  # it reads images; this model does not
    c.train.steps = 300
    if arg == "smoke":
        c.train.steps = 40
        c.train.log_every = 5
        c.train.checkpoint_every = 20
    elif arg not in (None, ""):
        raise ValueError(f"experiments/text_lm.py takes no argument or 'smoke', got {arg!r}.")
    return c
