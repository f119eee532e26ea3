"""A tiny dual encoder (CLIP / SigLIP image-encoder pre-training) on the
procedural shapes captions: the tiny experiment's ViT (experiments/tiny.py)
and a small text tower, 8 simulated CPU devices, a data=2 x fsdp=2 x
expert=2 mesh, 300 steps of 64 image-caption pairs (`mmjax.data.pairs`).

  python -m mmjax.train --config experiments/clip_tiny.py --workdir /tmp/mmjax-clip-tiny
  python -m mmjax.train --config experiments/clip_tiny.py:clip --workdir /tmp/mmjax-clip-tiny-clip

  python -m mmjax.train --config experiments/clip_tiny.py:mofi --workdir /tmp/mmjax-clip-tiny-mofi

The argument picks the loss: `siglip` (default: sigmoid loss, a SigLIP ViT
mean-pooled) or `clip` (softmax loss, a CLIP ViT pooled by its class token).
The text tower is causal and pooled at the caption's last token (`<eos>`).
Evaluators: zero-shot classification of held-out `procedural:classes`
images by their shape kind, and image<->text retrieval recall@1/5/10 on
held-out captions; the train metrics carry the batch's retrieval accuracy.

MOFI (`config.model.mofi`): `mofi` is `clip` with an entity head over the
label set's entities (the procedural set: 6 colours and 4 kinds) trained
with MOFI's softmax loss, plus the contrastive loss against the entity names
as text (`data.pair_text="entities"`), both weighted 1; `mofi-cls` trains
the entity head alone (no text tower; a record needs no caption). The 10
labels split evenly over the fsdp=2 shards of the head; a label set whose
size does not divide them pads the head (`mofi.num_labels` rounded up,
`mofi.num_entities` the label set's size). Their train metrics add
entity_loss and entity_precision (the top-scoring entity is one of the
image's). MOFI's zero-shot prompts are entity-name lists ("red, {}"), the
text its tower trained on; `mofi-cls` has no text tower, so its zero-shot
and retrieval evaluators are skipped with the reason.
"""

from mmjax.config_base import base_config
from mmjax.data import shapes

LOSSES = ("siglip", "clip")
MOFI = {"mofi": 1.0, "mofi-cls": 0.0}  # variant -> contrastive weight (the classification weight is 1)


def get_config(arg=None):
    variant = arg or "siglip"
    if variant not in LOSSES + tuple(MOFI):
        raise ValueError(f"experiments/clip_tiny.py takes 'siglip' (default) or 'clip', or MOFI's "
                         f"{' or '.join(map(repr, MOFI))}, got {arg!r}.")
    loss = "clip" if variant in MOFI else variant
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
    if variant in MOFI:
        from mmjax.data.labels import label_set

        c.model.mofi.update(num_labels=len(label_set(c.data).entities), classification_weight=1.0,
                            contrastive_weight=MOFI[variant], loss="softmax")
        if MOFI[variant]:
            c.data.pair_text = "entities"  # the contrastive text: the image's entity names
            c.evaluators.zero_shot.templates = tuple(f"{colour}, {{}}" for colour in shapes.COLOURS)
    return c
