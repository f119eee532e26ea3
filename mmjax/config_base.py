"""The full config schema with defaults; experiments start from `base_config()`.

Linked fields (`ml_collections.FieldReference`) keep values that two parts of
the system must agree on in one place: the image size (encoder and data), the
image tokens per image (connector and data) and the vocabulary size
(tokenizer and decoder). Overriding either side on the command line changes
both.
"""

from __future__ import annotations

import ml_collections as mlc

from mmjax.data import shapes


# config.model.mofi's defaults: no entity head, the dual encoder's contrastive loss alone.
MOFI_DEFAULTS = dict(num_labels=0, num_entities=0, classification_weight=0.0, contrastive_weight=1.0,
                     loss="softmax")


def base_config() -> mlc.ConfigDict:
    image_size = mlc.FieldReference(32)
    tokens_per_image = mlc.FieldReference(4)
    vocab_size = mlc.FieldReference(1024)

    c = mlc.ConfigDict()
    c.runtime = dict(
        cpu_devices=0,  # >0: simulate this many devices on the host CPU
    )
    # dcn_*: over how many TPU slices each axis is spread (mmjax/parallel/mesh.py); dcn_data=-1
    # spreads the data axis over every slice (on one slice: 1).
    c.mesh = dict(data=-1, fsdp=1, expert=1, model=1, dcn_data=-1, dcn_fsdp=1, dcn_expert=1, dcn_model=1)
    c.rules = "fsdp"  # a layout name from mmjax.parallel.rules.LAYOUTS
    # Folders from `python -m mmjax.tools.convert_hf` whose weights replace the
    # matching component (vit or decoder) at the start of a fresh run.
    c.init_from = ()

    c.model = mlc.ConfigDict()
    c.model.name = "mm1"  # a registered model (mmjax/models/registry.py): mm1 | text_lm | dual_encoder
    c.model.dtype = "float32"
    c.model.vit = dict(flavour="siglip", image_size=image_size, patch_size=4, embed=64, depth=2, heads=4,
                       mlp=256, layer_norm_eps=1e-5, feature_layer=-1, map_head=False, scan=False,
                       remat="", attention="xla")
    # Vision MoE (Mobile V-MoE, mmjax/models/vision_moe.py; num_experts=0: dense): every moe_every-th ViT
    # block's MLP becomes num_experts MLPs of width expert_mlp, top_k of them chosen per IMAGE by a router on
    # the image's mean patch token (weights: the softmax probabilities, renormalised over the k chosen when
    # renormalize); capacity_factor: images per expert per batch shard = ceil(top_k * images *
    # capacity_factor / num_experts), the rest dropped (>= num_experts / top_k: none dropped).
    # superclass_weight: Mobile V-MoE's super-class routing loss (images of super-class s -> expert
    # superclass_experts[s % len], or s mod num_experts when that is empty). The aux losses' weights here
    # apply to a model trained with the "classification" objective (vit_classifier).
    # eval_capacity_factor: the capacity factor of the held-out evaluation's forward (top1_accuracy;
    # 0: num_experts / top_k, no image dropped, so an image's prediction does not depend on its batch).
    c.model.vit.moe = dict(num_experts=0, top_k=1, moe_every=2, renormalize=False, capacity_factor=2.0,
                           eval_capacity_factor=0.0, expert_mlp=256, superclass_weight=0.0,
                           superclass_experts=(), load_balance_weight=0.01, router_z_weight=0.001)
    # kind: c_abstractor | avg_pool | attention_pool (hidden/depth: C-Abstractor; heads: attention pool;
    # scan: the C-Abstractor's ResBlocks stacked and scanned per stage)
    c.model.connector = dict(kind="c_abstractor", num_tokens=tokens_per_image, hidden=64, depth=1, heads=4,
                             scan=False)
    c.model.decoder = dict(vocab_size=vocab_size, embed=128, layers=2, heads=4, kv_heads=2, head_dim=32,
                           mlp=512, rope_theta=10_000.0, norm_eps=1e-6, qk_norm=False, tie_embeddings=False,
                           scan=False, remat="", attention="xla")
    # Mixture of experts (num_experts=0: dense). MM1 3B-MoE: 64 experts, moe_every=2, top_k=2.
    # balance: "aux_loss" (the load-balance loss alone) or "bias" (DeepSeek-V3: a per-expert selection
    # bias moved by bias_update_rate after each step towards balance; load_balance_weight still applies,
    # 0.01 unless set: 0 for no balance loss).
    c.model.decoder.moe = dict(num_experts=0, top_k=2, moe_every=2, renormalize=True, capacity_factor=2.0,
                               group_size=0, dispatch="capacity", grouped_matmul="ragged_dot",
                               dropless_buffer_factor=0.0,
                               expert_mlp=512, shared_expert=False,
                               load_balance_weight=0.01, router_z_weight=0.001, balance="aux_loss",
                               bias_update_rate=0.001)
    c.model.bidirectional_image_attention = False
    # Ferret-style region inputs (mmjax/models/region_sampler.py): with enabled=True the model pools the
    # patch features inside each region of data.max_regions (> 0 then) into a region token's embedding.
    # hidden: the sampler's point-feature width; pos_freqs: Fourier frequencies of a point's position.
    c.model.region_sampler = dict(enabled=False, hidden=64, pos_freqs=4)
    # The dual encoder (model.name="dual_encoder", mmjax/models/dual_encoder.py): vit and decoder are its
    # image and text towers. loss: "clip" (softmax) | "siglip" (sigmoid); embed: the shared embedding width;
    # image_pool: "token" (CLIP class token / SigLIP MAP head) | "mean"; text_pool: "last" | "mean".
    c.model.contrastive = dict(loss="siglip", embed=64, image_pool="mean", text_pool="last", text_causal=True)
    # MOFI (mmjax/models/dual_encoder.py, mmjax/train/entity_loss.py): num_labels > 0 puts an entity
    # classification head of num_labels outputs on the dual encoder's image embedding; its first
    # num_entities (0: all num_labels) are the label set's entities (data.labels), the rest pad the head to
    # a multiple of the mesh axes that split it (never a target, masked out of the loss); loss: "softmax"
    # (MOFI: against the multi-hot target spread evenly over an image's entities) | "sigmoid" (binary CE
    # per entity); the objective is contrastive_weight * contrastive + classification_weight *
    # classification (contrastive_weight=0: no text tower is built, and records need no caption).
    c.model.mofi = dict(MOFI_DEFAULTS)
    # The image classifier (model.name="vit_classifier", mmjax/models/classifier.py): the vit pooled by
    # `pool` ("token": CLIP class token / SigLIP MAP head, "mean": the mean patch token) and a linear head
    # over num_classes classes, trained with the "classification" objective on the pair batches' class_id.
    c.model.classifier = dict(num_classes=4, pool="mean")

    c.data = mlc.ConfigDict()
    c.data.seq_len = 128
    c.data.global_batch = 16
    c.data.max_images = 3
    c.data.image_size = image_size
    c.data.tokens_per_image = tokens_per_image
    c.data.vocab_size = vocab_size
    c.data.mix_weights = (5.0, 5.0, 1.0)  # caption : interleaved : text
    # Where each stream comes from: "procedural" or "<format>:<paths>" with format
    # webdataset | array_record | parquet | jsonl | json | tfds (see mmjax/data/sources.py).
    c.data.sources = dict(caption="procedural", interleaved="procedural", text="procedural")
    c.data.loss_weights = (1.0, 1.0, 1.0)  # loss weight of text tokens per stream
    c.data.pack_window = 32  # examples packed first-fit-decreasing per window; 1 = no packing
    c.data.image_split = (0, 0)  # MM1.5 dynamic splitting (min_tiles, max_tiles); (0, 0) = off
    c.data.tile_separators = False  # "(row,col)" text before each tile when splitting
    # Regions in conversations (mmjax/data/regions.py) are written as [x1, y1, x2, y2] in 0..999; with
    # max_regions > 0 (needs model.region_sampler.enabled) each is also followed by a region token, and the
    # batches carry region_slots/images/masks, masks on a region_grid x region_grid grid (the model pools
    # them to its patch grid: a multiple of image_size / patch_size).
    c.data.max_regions = 0
    c.data.region_grid = 8
    c.data.system_prompt = ""  # system turn for conversations that have none ("" = none; mmjax/data/chat.py)
    # Videos (mmjax/data/video.py): at most this many uniformly sampled frames per video (fewer when the
    # example's image slots or seq_len run short); frame folders without an "fps" of their own use video_fps.
    c.data.video_frames = 8
    c.data.video_fps = 1.0
    # Image-text pairs (mmjax/data/pairs.py) and image labels (mmjax/data/labels.py):
    c.data.pair_text = "caption"  # a pair's text: "caption" | "entities" (MOFI: entity names joined by ", ")
    c.data.caption_mix = ""  # VeCLIP: "alt_text@0.5|rewritten@0.5" picks a caption field per record; "" = off
    c.data.labels = dict(entities="procedural", classes="procedural", max_entities=8)
    c.data.seed = 0
    c.data.shards = 0  # virtual data shards (0: one per process); fixed -> same batches for any process count
    c.data.workers = 0  # >0: Grain multiprocess workers (mp_prefetch)
    c.data.worker_buffer = 2  # batches prefetched per worker

    # lr_rule / weight_decay_rule: "fixed" (lr, weight_decay) or "mm1" (peak LR from the decoder size,
    # decoupled decay 0.1 x peak LR); lr_moe_count: the size "mm1" gives an MoE decoder, "dense" (its
    # dense twin's, as MM1), "active" or "total"; no_decay: any of norms, biases, embeddings;
    # module_lr_scale: "module.path=scale,..." (0 freezes), e.g. "vit=0.0,connector=2.0".
    # See mmjax/train/optimizer.py.
    c.optimizer = dict(lr=1e-3, lr_rule="fixed", lr_moe_count="dense", warmup_steps=20, min_lr_ratio=0.1,
                       b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.01, weight_decay_rule="fixed",
                       no_decay=("norms", "biases", "embeddings"), module_lr_scale="", grad_clip=1.0)
    c.loss = dict(z_loss=1e-4)
    c.train = dict(steps=300, log_every=10, checkpoint_every=100, keep_checkpoints=2, seed=0,
                   async_checkpoint=True, grad_accum_steps=1)  # micro-batches per step (gradient accumulation)
    # Evaluators (mmjax/train/evaluators.py): eval.<name>=True switches one on; its settings are
    # evaluators.<name>; they run at the start of a fresh run, every train.eval_every steps and at the end.
    c.eval = dict(caption_accuracy=True)
    c.evaluators = dict(caption_accuracy=dict(num_examples=128))
    # A dual encoder's zero-shot classification and image<->text retrieval (mmjax/train/contrastive_eval.py).
    # zero_shot: images of `source` (split "eval") with a class of data.labels.classes, each class embedded as
    # the renormalised mean of its `templates` ("{}" -> the class name; the default: the procedural data's
    # one-shape captions in every cell and colour, so colour and place average out and the kind remains).
    # retrieval: recall@1/5/10 both ways on `num_examples` pairs of `source` ("" = data.sources.caption).
    c.evaluators.zero_shot = dict(source="procedural:classes", num_examples=256,
                                  templates=tuple(f"one shape. {p}: {colour} {{}}." for p in shapes.POSITIONS
                                                  for colour in shapes.COLOURS))
    c.evaluators.retrieval = dict(source="", num_examples=256)
    c.train.eval_every = 0  # 0: only at the start and the end
    c.train.watchdog_s = 600.0  # report a step that takes longer than this (0: off)
    c.train.on_nonfinite = "stop"  # NaN/Inf loss: "stop" (naming the last good checkpoint) or "skip" the update
    # A latest checkpoint that cannot be restored: "previous" resumes from the newest one that can
    # (the damaged step directory is moved aside), "stop" refuses to start.
    c.train.on_bad_checkpoint = "previous"
    c.train.profile_steps = (0, 0)  # (first, last) step of a profiler trace under WORKDIR/profile
    c.train.prefetch = 2  # batches read and placed on the devices ahead of the running step (0: none)
    # MoE routing health: a warning when an expert's load (per modality) stays under this share of its
    # fair load 1/E for this many consecutive log windows (0: off). See mmjax/train/routing_health.py.
    c.train.moe_starved_share = 0.1
    c.train.moe_starved_windows = 3
    return c


def apply_hardware_flag(config) -> None:
    """Honours `--config.hardware=NAME`: ml_collections applies command-line
    overrides after `get_config` has run, so a changed preset name is applied
    here (`mmjax.hardware.resolve_hardware`; explicit overrides of its
    fields are kept). Call before JAX starts its backend."""
    if config.get("hardware") and config.get("hardware") != config.get("hardware_applied"):
        from mmjax.hardware import resolve_hardware

        resolve_hardware(config)
