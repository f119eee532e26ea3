"""The embedded default: a small MM1 model (ViT -> C-Abstractor -> dense
decoder) on procedural shapes data, 8 simulated CPU devices, a
data=2 x fsdp=2 x expert=2 mesh, 300 steps.

  python -m mmjax.train --config experiments/tiny.py --workdir /tmp/mmjax-tiny

`--config experiments/tiny.py:smoke` gives a shorter run for tests.

`--config experiments/tiny.py:sft` is the supervised fine-tuning stage that
follows it (MM1.5's last stage at toy scale):

  python -m mmjax.train --config experiments/tiny.py:sft --workdir /tmp/mmjax-tiny-sft \
      --config.init_from=/tmp/mmjax-tiny

It starts from the pre-trained workdir's model and trains on the embedded
procedural conversations (`mmjax/data/procedural_sft.py`: questions,
grounding with boxes, referring to a region (its box as text and a region
token pooled from the ViT features inside it, `model.region_sampler`),
multi-image comparison, text continuation; single-image : multi-image : text = 80 : 10 : 10, loss on the
answers only), evaluated with the chat-template tasks (VQA, grounding IoU >=
0.5, referring) before the first step and at the end.
"""

from mmjax.config_base import base_config
from mmjax.eval.task_settings import shapes_chat_tasks, shapes_tasks

SFT_STEPS = 300
SFT_LR = 3e-4


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
    elif arg == "sft":
        fine_tuning(c)
    elif arg not in (None, ""):
        raise ValueError(f"experiments/tiny.py takes no argument, 'smoke' or 'sft', got {arg!r}.")
    return c


def fine_tuning(c) -> None:
    """The tiny SFT stage in place (module doc)."""
    c.data.sources = dict(caption="procedural:sft", interleaved="procedural:sft", text="procedural:sft")
    c.data.mix_weights = (80.0, 10.0, 10.0)
    # Ferret-style region tokens after a region's coordinates (the sampler is new: it starts fresh)
    c.model.region_sampler.enabled = True
    c.data.max_regions = 2
    c.optimizer.lr = SFT_LR
    c.optimizer.warmup_steps = 20
    c.train.steps = SFT_STEPS
    c.train.eval_every = 0  # before the first step (the pre-trained model) and at the end
    c.eval = dict(caption_accuracy=False)  # captions of the pre-training stream are not this stage's data
    for name, settings in shapes_chat_tasks().items():
        c.evaluators[name] = settings
        c.eval[name] = True
