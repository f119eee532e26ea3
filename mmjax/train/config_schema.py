"""Field rules of the experiment config: type, range or choice of every field
`mmjax.config_base.base_config` defines, checked before anything is built.

`FIELDS` maps a dotted path under `config.` to a rule; a rule returns None
for a good value or what a good value is ("a positive integer"). Choices
come from the registries that use them (models, connectors, ViT flavours,
MoE dispatches, remat policies, layouts, data formats, hardware presets,
evaluators), so a new registry entry is accepted without editing this file.
Cross-field constraints live in `mmjax.train.config_checks`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

Rule = Callable[[Any], "str | None"]


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def integer(low: int | None = None, high: int | None = None, also: tuple = (), what: str = "") -> Rule:
    """An int in [low, high] (either bound optional) or one of `also`;
    `what` describes a good value (default: from the bounds)."""
    if what:
        pass
    elif low is not None and high is not None:
        what = f"an integer in {low}..{high}"
    elif low == 1:
        what = "a positive integer"
    elif low == 0:
        what = "a non-negative integer"
    else:
        what = "an integer" + (f" >= {low}" if low is not None else "") + (f" <= {high}" if high is not None else "")
    what += "".join(f" or {a}" for a in also)

    def rule(x):
        if x in also and _is_int(x):
            return None
        ok = _is_int(x) and (low is None or x >= low) and (high is None or x <= high)
        return None if ok else what
    return rule


def number(low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False) -> Rule:
    """A finite number within the bounds (open or closed)."""
    if low == 0 and low_open and high is None:
        what = "a positive finite number"
    elif low == 0 and high is None:
        what = "a non-negative finite number"
    elif low is not None and high is not None:
        what = f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    else:
        what = "a finite number"

    def rule(x):
        if not _is_number(x) or not math.isfinite(x):
            return what
        if low is not None and (x <= low if low_open else x < low):
            return what
        if high is not None and (x >= high if high_open else x > high):
            return what
        return None
    return rule


def boolean(x) -> str | None:
    return None if isinstance(x, bool) else "True or False"


def text(x) -> str | None:
    return None if isinstance(x, str) else "a string"


def one_of(choices: Callable[[], Iterable[str]], allow_empty: bool = False) -> Rule:
    """A string among `choices()` (read when checked: registries fill at import)."""

    def rule(x):
        names = sorted(choices())
        if allow_empty and x == "":
            return None
        if isinstance(x, str) and x in names:
            return None
        return "one of " + ", ".join(repr(n) for n in ([""] if allow_empty else []) + names)
    return rule


def sequence_of(length: int | None, item: Rule, what: str) -> Rule:
    """A tuple/list (of `length` items when given) whose items pass `item`."""

    def rule(x):
        if not isinstance(x, (tuple, list)) or (length is not None and len(x) != length):
            return what
        return what if any(item(v) for v in x) else None
    return rule


def _models():
    from mmjax.models.registry import MODELS
    return MODELS


def _flavours():
    from mmjax.models.vit import FLAVOURS
    return FLAVOURS


def _contrastive_losses():
    from mmjax.models.dual_encoder import CONTRASTIVE_LOSSES
    return CONTRASTIVE_LOSSES


def _image_pools():
    from mmjax.models.dual_encoder import IMAGE_POOLS
    return IMAGE_POOLS


def _text_pools():
    from mmjax.models.text_encoder import TEXT_POOLS
    return TEXT_POOLS


def _entity_losses():
    from mmjax.models.dual_encoder import ENTITY_LOSSES
    return ENTITY_LOSSES


def _connectors():
    from mmjax.models.connectors import CONNECTORS
    return CONNECTORS


def _dispatches():
    from mmjax.models.moe import DISPATCHES
    return DISPATCHES


def _grouped_matmuls():
    from mmjax.models.moe_dropless import GROUPED_MATMULS
    return GROUPED_MATMULS


def _balances():
    from mmjax.models.moe import BALANCES
    return BALANCES


def _moe_lr_counts():
    from mmjax.train.optimizer import MOE_LR_COUNTS
    return MOE_LR_COUNTS


def _remat():
    from mmjax.models.stack import REMAT_POLICIES
    return REMAT_POLICIES


def _attention():
    from mmjax.models.attention import ATTENTION

    return ATTENTION


def _dtypes():
    from mmjax.models.precision import COMPUTE_DTYPES
    return COMPUTE_DTYPES


def _hardware():
    from mmjax.hardware import HARDWARE
    return HARDWARE


ON_BAD_CHECKPOINT = ("previous", "stop")

FIELDS: dict[str, Rule] = {
    "runtime.cpu_devices": integer(0),
    "model.name": one_of(_models),
    "model.dtype": one_of(_dtypes),
    "model.bidirectional_image_attention": boolean,
    "model.region_sampler.enabled": boolean,
    "model.region_sampler.hidden": integer(1),
    "model.region_sampler.pos_freqs": integer(0),
    "model.contrastive.loss": one_of(_contrastive_losses),
    "model.contrastive.embed": integer(1),
    "model.contrastive.image_pool": one_of(_image_pools),
    "model.contrastive.text_pool": one_of(_text_pools),
    "model.contrastive.text_causal": boolean,
    "model.mofi.num_labels": integer(0),
    "model.mofi.num_entities": integer(0),
    "model.mofi.classification_weight": number(0),
    "model.mofi.contrastive_weight": number(0),
    "model.mofi.loss": one_of(_entity_losses),
    "model.vit.flavour": one_of(_flavours),
    "model.vit.image_size": integer(1),
    "model.vit.patch_size": integer(1),
    "model.vit.embed": integer(1),
    "model.vit.depth": integer(1),
    "model.vit.heads": integer(1),
    "model.vit.mlp": integer(1),
    "model.vit.layer_norm_eps": number(0, low_open=True),
    "model.vit.feature_layer": integer(high=-1, what="a negative integer (-1: the last block, -2: the one "
                                                     "before, ...)"),
    "model.vit.map_head": boolean,
    "model.vit.scan": boolean,
    "model.vit.remat": one_of(_remat, allow_empty=True),
    "model.vit.attention": one_of(_attention),
    "model.vit.moe.num_experts": integer(0),
    "model.vit.moe.top_k": integer(1),
    "model.vit.moe.moe_every": integer(1),
    "model.vit.moe.renormalize": boolean,
    "model.vit.moe.capacity_factor": number(0, low_open=True),
    "model.vit.moe.eval_capacity_factor": number(0),
    "model.vit.moe.expert_mlp": integer(1),
    "model.vit.moe.superclass_weight": number(0),
    "model.vit.moe.superclass_experts": sequence_of(None, integer(0), "a tuple of expert indices (one per "
                                                    "super-class; empty: super-class s -> expert s mod "
                                                    "num_experts)"),
    "model.vit.moe.load_balance_weight": number(0),
    "model.vit.moe.router_z_weight": number(0),
    "model.classifier.num_classes": integer(1),
    "model.classifier.pool": one_of(_image_pools),
    "model.connector.kind": one_of(_connectors),
    "model.connector.num_tokens": integer(1),
    "model.connector.hidden": integer(1),
    "model.connector.depth": integer(1),
    "model.connector.heads": integer(1),
    "model.connector.scan": boolean,
    "model.decoder.vocab_size": integer(4),
    "model.decoder.embed": integer(1),
    "model.decoder.layers": integer(1),
    "model.decoder.heads": integer(1),
    "model.decoder.kv_heads": integer(1),
    "model.decoder.head_dim": integer(2),
    "model.decoder.mlp": integer(1),
    "model.decoder.rope_theta": number(0, low_open=True),
    "model.decoder.norm_eps": number(0, low_open=True),
    "model.decoder.qk_norm": boolean,
    "model.decoder.tie_embeddings": boolean,
    "model.decoder.scan": boolean,
    "model.decoder.remat": one_of(_remat, allow_empty=True),
    "model.decoder.attention": one_of(_attention),
    "model.decoder.moe.num_experts": integer(0),
    "model.decoder.moe.top_k": integer(1),
    "model.decoder.moe.moe_every": integer(1),
    "model.decoder.moe.renormalize": boolean,
    "model.decoder.moe.capacity_factor": number(0, low_open=True),
    "model.decoder.moe.group_size": integer(0),
    "model.decoder.moe.dispatch": one_of(_dispatches),
    "model.decoder.moe.grouped_matmul": one_of(_grouped_matmuls),
    "model.decoder.moe.dropless_buffer_factor": number(0),
    "model.decoder.moe.expert_mlp": integer(1),
    "model.decoder.moe.shared_expert": boolean,
    "model.decoder.moe.load_balance_weight": number(0),
    "model.decoder.moe.router_z_weight": number(0),
    "model.decoder.moe.balance": one_of(_balances),
    "model.decoder.moe.bias_update_rate": number(0),
    "data.seq_len": integer(2),
    "data.global_batch": integer(1),
    "data.max_images": integer(0),
    "data.mix_weights": sequence_of(3, number(0), "three non-negative finite weights (caption, interleaved, "
                                    "text)"),
    "data.loss_weights": sequence_of(3, number(0), "three non-negative finite loss weights (caption, "
                                     "interleaved, text)"),
    "data.pack_window": integer(1),
    "data.image_split": sequence_of(2, integer(0), "(min_tiles, max_tiles): (0, 0) for off, else "
                                    "1 <= min_tiles <= max_tiles"),
    "data.tile_separators": boolean,
    "data.system_prompt": text,
    "data.video_frames": integer(1),
    "data.video_fps": number(0, low_open=True),
    "data.max_regions": integer(0),
    "data.region_grid": integer(1),
    "data.seed": integer(0),
    "data.pair_text": one_of(lambda: ("caption", "entities")),
    "data.caption_mix": text,
    "data.labels.entities": text,
    "data.labels.classes": text,
    "data.labels.max_entities": integer(1),
    "data.shards": integer(0),
    "data.workers": integer(0),
    "data.worker_buffer": integer(1),
    "optimizer.lr": number(0, low_open=True),
    "optimizer.lr_rule": one_of(lambda: ("fixed", "mm1")),
    "optimizer.lr_moe_count": one_of(_moe_lr_counts),
    "optimizer.warmup_steps": integer(0),
    "optimizer.min_lr_ratio": number(0, 1),
    "optimizer.b1": number(0, 1, high_open=True),
    "optimizer.b2": number(0, 1, high_open=True),
    "optimizer.eps": number(0, low_open=True),
    "optimizer.weight_decay": number(0),
    "optimizer.weight_decay_rule": one_of(lambda: ("fixed", "mm1")),
    "optimizer.grad_clip": number(0),
    "loss.z_loss": number(0),
    "train.steps": integer(1),
    "train.log_every": integer(1),
    "train.checkpoint_every": integer(1),
    "train.keep_checkpoints": integer(1),
    "train.seed": integer(0),
    "train.async_checkpoint": boolean,
    "train.grad_accum_steps": integer(1),
    "train.eval_every": integer(0),
    "train.prefetch": integer(0),
    "train.moe_starved_share": number(0, 1),
    "train.moe_starved_windows": integer(0),
    "train.watchdog_s": number(0),
    "train.on_nonfinite": one_of(lambda: ("stop", "skip")),
    "train.on_bad_checkpoint": one_of(lambda: ON_BAD_CHECKPOINT),
    "train.profile_steps": sequence_of(2, integer(0), "(first, last): (0, 0) for off, else "
                                       "1 <= first <= last"),
    "hardware": one_of(_hardware, allow_empty=True),
}

_MISSING = object()


def lookup(config, path: str):
    """The value at dotted `path` under `config`, or `_MISSING`."""
    node = config
    for key in path.split("."):
        try:
            node = node[key]
        except (KeyError, TypeError, AttributeError):
            return _MISSING
    return node


def field_problems(config) -> Iterable[tuple[str, Any, str]]:
    """(path, value, what a good value is) for each field that breaks its rule;
    fields the config does not have are skipped (older experiment files)."""
    for path, rule in FIELDS.items():
        value = lookup(config, path)
        if value is _MISSING:
            continue
        problem = rule(value)
        if problem:
            yield path, value, problem
