"""A tiny dual encoder (CLIP / SigLIP image-encoder pre-training) on the
procedural shapes captions: the tiny experiment's ViT (experiments/tiny.py)
and a small text tower, 8 simulated CPU devices, a data=2 x fsdp=2 x
expert=2 mesh, 300 steps of 64 image-caption pairs (`mmjax.data.pairs`).

  python -m mmjax.train --config experiments/clip_tiny.py --workdir /tmp/mmjax-clip-tiny
  python -m mmjax.train --config experiments/clip_tiny.py:clip --workdir /tmp/mmjax-clip-tiny-clip

The argument picks the loss: `siglip` (default: sigmoid loss, a SigLIP ViT
mean-pooled) or `clip` (softmax loss, a CLIP ViT pooled by its class token).
The text tower is causal and pooled at the caption's last token (`<eos>`).
Evaluators: zero-shot classification of held-out `procedural:classes`
images by their shape kind, and image<->text retrieval recall@1/5/10 on
held-out captions; the train metrics carry the batch's retrieval accuracy.
"""

from mmjax.config_base import base_config

LOSSES = ("siglip", "clip")


def get_config(arg=None):
    loss = arg or "siglip"
    if loss not in LOSSES:
        raise ValueError(f"experiments/clip_tiny.py takes 'siglip' (default) or 'clip', got {arg!r}.")
    c = base_config()
    c.runtime.cpu_devices = 8
    c.mesh.update(data=2, fsdp=2, expert=2, model=1)
    c.model.name = "dual_encoder"
    c.model.vit.flavour = loss
    c.model.decoder.update(embed=64, layers=2, heads=4, kv_heads=2, head_dim=16, mlp=256)
    c.model.contrastive.update(loss=loss, embed=64, image_pool="token" if loss == "clip" else "mean",
                               text_pool="last", text_causal=True)
    c.data.seq_len = 32  # the longest shapes caption and its <eos> fit
    c.data.global_batch = 64
    c.data.max_images = 0  # packed sequences' image slots; a pair batch holds one image per row
    c.optimizer.update(lr=1e-3, warmup_steps=20)
    c.train.steps = 300
    # Zero-shot classification by class-name prompts and image<->text retrieval recall@K on held-out
    # data (mmjax/train/contrastive_eval.py): at the start, every 100 steps and at the end.
    c.train.eval_every = 100
    c.eval = dict(caption_accuracy=False, zero_shot=True, retrieval=True)
    c.evaluators.zero_shot.num_examples = 256
    c.evaluators.retrieval.num_examples = 256
    return c
