"""Config validation: one pass over the whole resolved config before the
tokenizer, the model, the data pipeline or any compile. Every problem is a
`ConfigError` whose message is one sentence naming the field, its value and
what would be valid.

`check_static(config)` needs nothing but the config (every command runs it
in `mmjax.frontend.prepare_runtime`); `check_config(config, num_devices,
process_count)` adds what depends on the devices: the mesh and the batch
split.
"""

from __future__ import annotations

import difflib
import math
import os

from mmjax.errors import ConfigError
from mmjax.models.moe import check_moe_placement
from mmjax.parallel.mesh import axis_settings, resolve_mesh_shape
from mmjax.parallel.rules import get_layout
from mmjax.train.config_schema import field_problems, lookup

__all__ = ["ConfigError", "check_static", "check_config"]


def _fail(path: str, value, what: str) -> None:
    raise ConfigError(f"config.{path}={value!r} {what}.")


def check_static(config) -> None:
    """Raises ConfigError for the first problem found in `config` alone."""
    for path, value, what in field_problems(config):
        _fail(path, value, f"is invalid; use {what}")
    get_layout(config.rules)  # LayoutError (a ConfigError) for an unknown layout name
    resolve_mesh_shape(dict(config.mesh), _any_device_count(config.mesh))
    _check_model(config)
    _check_data(config)
    _check_vision_moe(config)
    _check_mofi(config)
    _check_optimizer(config)
    _check_train(config)
    _check_evaluators(config)
    for path in config.get("init_from", ()) or ():
        _check_init_from(str(path))


def _check_init_from(path: str) -> None:
    """An init_from entry is a converted folder or a training workdir with a finished checkpoint."""
    from mmjax.train.init_from import committed_steps, is_training_workdir

    if is_training_workdir(path):
        if not committed_steps(path):
            raise ConfigError(f"config.init_from entry {path!r} is a training workdir without a finished "
                              "checkpoint; train it first or name another one.")
        return
    if not os.path.isfile(os.path.join(os.path.expanduser(path), "mmjax.json")):
        raise ConfigError(f"config.init_from entry {path!r} is neither a training workdir (no checkpoints/) nor "
                          "a folder written by python -m mmjax.tools.convert_hf (no mmjax.json).")


def _any_device_count(mesh_cfg) -> int:
    """A device count the mesh's fixed axes can fill (checks sizes and -1s only)."""
    return math.prod(max(int(v), 1) if isinstance(v, int) else 1 for v in axis_settings(mesh_cfg).values())


def _check_model(config) -> None:
    m = config.model
    vit, conn, dec = m.vit, m.connector, m.decoder
    moe = dec.moe
    if vit.image_size % vit.patch_size:
        _fail("model.vit.image_size", vit.image_size, f"is not divisible by "
              f"config.model.vit.patch_size={vit.patch_size}")
    if vit.embed % vit.heads:
        _fail("model.vit.embed", vit.embed, f"is not divisible by config.model.vit.heads={vit.heads}")
    if vit.feature_layer < -vit.depth:
        _fail("model.vit.feature_layer", vit.feature_layer, f"is outside -{vit.depth}..-1 "
              f"(config.model.vit.depth={vit.depth})")
    if conn.kind in ("c_abstractor", "avg_pool") and math.isqrt(conn.num_tokens) ** 2 != conn.num_tokens:
        _fail("model.connector.num_tokens", conn.num_tokens, f"must be a perfect square for "
              f"config.model.connector.kind={conn.kind!r}")
    if conn.kind == "attention_pool" and vit.embed % conn.heads:
        _fail("model.connector.heads", conn.heads, f"does not divide config.model.vit.embed={vit.embed}")
    if dec.heads % dec.kv_heads:
        _fail("model.decoder.heads", dec.heads, f"is not a multiple of config.model.decoder.kv_heads={dec.kv_heads}")
    if dec.head_dim % 2:
        _fail("model.decoder.head_dim", dec.head_dim, "must be even (rotary embeddings rotate pairs of dimensions)")
    if moe.num_experts:
        check_moe_placement(moe, "config.model.decoder.moe", dec.layers, "config.model.decoder.layers")
        if dec.scan and moe.moe_every != 1:
            _fail("model.decoder.scan", True, f"needs identical layers, but MoE every "
                  f"{moe.moe_every} layers alternates dense and MoE layers; set "
                  "config.model.decoder.scan=False or moe_every=1")
        expert_axis = dict(config.mesh).get("expert", 1)
        if expert_axis > 1 and moe.num_experts % expert_axis:
            _fail("model.decoder.moe.num_experts", moe.num_experts, f"is not divisible by the "
                  f"config.mesh.expert={expert_axis} expert shards")


def _check_vision_moe(config) -> None:
    """`config.model.vit.moe` (Mobile V-MoE): its own fields
    (`check_vit_moe`), a model whose registry entry trains it, the expert
    shards, a router the loss reaches, super-classes to route by."""
    from mmjax.data.labels import label_set
    from mmjax.models import model_spec
    from mmjax.models.vision_moe import check_vit_moe

    vit = config.model.vit
    moe = vit.get("moe")
    if not moe or not moe.num_experts:
        return
    check_vit_moe(vit)
    name = config.model.get("name", "mm1")
    if not model_spec(config.model).vision_moe:
        _fail("model.vit.moe.num_experts", moe.num_experts, f"makes a mixture-of-experts ViT, which model "
              f"{name!r} does not train (its objective ignores the routing losses); use 0 or a model registered "
              "with vision_moe=True such as 'vit_classifier'")
    expert_axis = dict(config.mesh).get("expert", 1)
    if isinstance(expert_axis, int) and expert_axis > 1 and moe.num_experts % expert_axis:
        _fail("model.vit.moe.num_experts", moe.num_experts, f"is not divisible by the config.mesh.expert="
              f"{expert_axis} expert shards")
    if moe.renormalize and moe.top_k == 1:
        _fail("model.vit.moe.renormalize", True, "with config.model.vit.moe.top_k=1 makes every combine weight "
              "1, so the classification loss gives the router no gradient; set renormalize=False or top_k > 1")
    supers = label_set(config.data).superclasses
    if moe.superclass_weight > 0 and len(supers) < 2:
        _fail("model.vit.moe.superclass_weight", moe.superclass_weight, f"routes images by super-class, but the "
              f"label set (config.data.labels.classes) has {len(supers)} super-class(es) {supers}, nothing to tell "
              "apart; set it to 0 or give the classes at least two super-classes")


def _check_data(config) -> None:
    from mmjax.data.records import STREAMS
    from mmjax.data.sources import weighted_parts

    d, m = config.data, config.model
    if d.image_size != m.vit.image_size:
        _fail("data.image_size", d.image_size, f"differs from config.model.vit.image_size={m.vit.image_size}")
    if d.tokens_per_image != m.connector.num_tokens:
        _fail("data.tokens_per_image", d.tokens_per_image, f"differs from "
              f"config.model.connector.num_tokens={m.connector.num_tokens}")
    if d.vocab_size != m.decoder.vocab_size:
        _fail("data.vocab_size", d.vocab_size, f"differs from config.model.decoder.vocab_size={m.decoder.vocab_size}")
    if sum(d.mix_weights) <= 0:
        _fail("data.mix_weights", tuple(d.mix_weights), "selects no stream; give at least one positive weight")
    if d.max_images * d.tokens_per_image >= d.seq_len:
        _fail("data.max_images", d.max_images, f"images of {d.tokens_per_image} tokens do not fit in "
              f"config.data.seq_len={d.seq_len}")
    low, high = d.image_split
    if (low, high) != (0, 0) and not 1 <= low <= high:
        _fail("data.image_split", tuple(d.image_split), "must be (0, 0) for off or (min_tiles, max_tiles) "
              "with 1 <= min_tiles <= max_tiles")
    sampler = m.get("region_sampler") or {}
    if sampler.get("enabled", False) and d.get("max_regions", 0) < 1:
        _fail("data.max_regions", d.get("max_regions", 0), "must be at least 1 with "
              "config.model.region_sampler.enabled=True (region tokens per sequence)")
    patch_grid = m.vit.image_size // m.vit.patch_size
    if sampler.get("enabled", False) and d.get("region_grid", 0) % patch_grid:
        _fail("data.region_grid", d.get("region_grid", 0), f"must be a multiple of the ViT's patch grid "
              f"(config.model.vit.image_size / patch_size = {patch_grid}) so region masks pool onto it exactly")
    if d.get("max_regions", 0) > 0 and not sampler.get("enabled", False):
        _fail("data.max_regions", d.max_regions, "needs config.model.region_sampler.enabled=True (a region token "
              "has no embedding without the region sampler); use 0 for coordinates as text only")
    sources = dict(d.sources)
    for stream in STREAMS:
        if stream not in sources:
            raise ConfigError(f"config.data.sources has no {stream!r} entry; every stream "
                              f"({', '.join(STREAMS)}) needs a source.")
        if not isinstance(sources[stream], str):
            _fail(f"data.sources.{stream}", sources[stream], "must be a spec string such as 'procedural'")
        weighted_parts(sources[stream], f"config.data.sources.{stream}")
    from mmjax.data.labels import label_set
    from mmjax.data.pairs import caption_mix

    caption_mix(d)  # VeCLIP's "FIELD@W|FIELD@W"
    label_set(d)  # label files exist and hold labels


def _check_mofi(config) -> None:
    """MOFI's entity head and loss weights (`config.model.mofi`); the head's
    split over the mesh is checked by `_check_mofi_split`."""
    from mmjax.config_base import MOFI_DEFAULTS

    mofi = config.model.get("mofi")
    if mofi is None:
        return
    name = config.model.name
    if name != "dual_encoder":
        for key, default in MOFI_DEFAULTS.items():
            value = mofi.get(key, default)
            if value != default:
                _fail(f"model.mofi.{key}", value, f"puts an entity head on the dual encoder, but config.model."
                      f"name={name!r}; use 0" if key == "num_labels" else f"applies to the dual encoder only, "
                      f"which config.model.name={name!r} is not; leave it at {default!r}")
        return
    labels, contrastive, classification = mofi.num_labels, mofi.contrastive_weight, mofi.classification_weight
    if contrastive == 0 and classification == 0:
        _fail("model.mofi.contrastive_weight", contrastive, "and config.model.mofi.classification_weight=0 leave "
              "the dual encoder no loss; give one of them a positive weight")
    if classification and not labels:
        _fail("model.mofi.classification_weight", classification, "weighs an entity loss without an entity head; "
              "set config.model.mofi.num_labels to the number of entities or the weight to 0")
    if labels and not classification:
        _fail("model.mofi.num_labels", labels, "builds an entity head that config.model.mofi.classification_weight=0 "
              "leaves untrained; give the classification a positive weight or set num_labels=0")
    if not labels:
        if contrastive != 1:
            _fail("model.mofi.contrastive_weight", contrastive, "would only scale the contrastive loss, which "
                  "trains alone without an entity head (config.model.mofi.num_labels=0); leave it at 1")
        if mofi.get("num_entities", 0):
            _fail("model.mofi.num_entities", mofi.num_entities, "counts the entities of an entity head that "
                  "config.model.mofi.num_labels=0 does not build; leave it at 0")
        return
    from mmjax.data.labels import label_set

    entities = len(label_set(config.data).entities)
    if labels < entities:
        _fail("model.mofi.num_labels", labels, f"is fewer than the {entities} entities of the label set "
              f"(config.data.labels.entities)")
    given = mofi.get("num_entities", 0)
    if given and given != entities:
        _fail("model.mofi.num_entities", given, f"differs from the {entities} entities of the label set "
              f"(config.data.labels.entities)")
    if not given and labels != entities:
        _fail("model.mofi.num_entities", given, f"makes all config.model.mofi.num_labels={labels} labels "
              f"entities, but the label set has {entities} (config.data.labels.entities); set it to {entities} "
              "to pad the head with the rest")


def _check_mofi_split(config, mesh: dict, rules: dict) -> None:
    """The entity head's label axis divides the mesh axes the layout splits it over."""
    mofi = config.model.get("mofi")
    if config.model.name != "dual_encoder" or not mofi or not mofi.num_labels:
        return
    axes = rules.get("entities") or ()
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    split = math.prod(mesh.get(a, 1) for a in axes)
    if mofi.num_labels % split:
        padded = -(-mofi.num_labels // split) * split
        raise ConfigError(f"config.model.mofi.num_labels={mofi.num_labels} is not divisible by the {split} shards "
                          f"of mesh axes {axes} that split the entity head; pad it to a multiple of {split} "
                          f"(e.g. {padded}, with config.model.mofi.num_entities the entity count).")


def _check_optimizer(config) -> None:
    from mmjax.train.optimizer import NO_DECAY_CATEGORIES, parse_module_lr_scale

    o = config.optimizer
    if o.warmup_steps > config.train.steps:
        _fail("optimizer.warmup_steps", o.warmup_steps, f"is longer than the run "
              f"(config.train.steps={config.train.steps})")
    no_decay = o.get("no_decay", ())
    unknown = [c for c in ((no_decay,) if isinstance(no_decay, str) else no_decay) if c not in NO_DECAY_CATEGORIES]
    if unknown:
        _fail("optimizer.no_decay", tuple(no_decay), f"names {unknown[0]!r}; use any of {NO_DECAY_CATEGORIES}")
    parse_module_lr_scale(o.get("module_lr_scale", ""))  # ConfigError naming the item


def _check_train(config) -> None:
    t = config.train
    first, last = t.profile_steps
    if (first, last) != (0, 0) and not 1 <= first <= last <= t.steps:
        _fail("train.profile_steps", tuple(t.profile_steps), f"must be (0, 0) for off or (first, last) with "
              f"1 <= first <= last <= config.train.steps={t.steps}")


def _check_evaluators(config) -> None:
    from mmjax.train.evaluators import evaluator_spec

    for name, on in dict(config.get("eval", {})).items():
        spec = evaluator_spec(config, name)
        if not isinstance(on, bool):
            _fail(f"eval.{name}", on, "is invalid; use True or False")
        settings = lookup(config, f"evaluators.{name}")
        for key in (settings.keys() if hasattr(settings, "keys") else ()):
            if key != "kind" and key not in spec.fields:
                close = difflib.get_close_matches(key, list(spec.fields), n=1)
                raise ConfigError(f"config.evaluators.{name} has no setting {key!r}"
                                  + (f"; did you mean {close[0]!r}?" if close else
                                     f"; its settings are {sorted(spec.fields)}."))
        for key, rule in spec.fields.items():
            value = settings.get(key) if hasattr(settings, "get") else None
            problem = rule(value)
            if problem:
                _fail(f"evaluators.{name}.{key}", value, f"is invalid; use {problem}")
        if on and spec.check is not None:
            spec.check(settings, f"config.evaluators.{name}")


def check_config(config, num_devices: int, process_count: int = 1) -> None:
    """`check_static` plus the mesh and batch split for `num_devices` devices
    in `process_count` processes; raises ConfigError (one sentence)."""
    check_static(config)
    mesh = resolve_mesh_shape(dict(config.mesh), num_devices)
    rules = get_layout(config.rules)
    t, d = config.train, config.data
    batch_axes = rules.get("batch") or ()
    batch_axes = (batch_axes,) if isinstance(batch_axes, str) else batch_axes
    shards = math.prod(mesh[a] for a in batch_axes)
    if d.global_batch % shards:
        raise ConfigError(f"config.data.global_batch={d.global_batch} is not divisible by the "
                          f"{shards} batch shards of mesh axes {tuple(batch_axes)}.")
    data_shards = d.get("shards", 0) or process_count
    if data_shards % process_count or d.global_batch % data_shards:
        raise ConfigError(f"config.data.shards={d.shards} must be a multiple of the {process_count} processes "
                          f"and divide config.data.global_batch={d.global_batch}.")
    accum = t.get("grad_accum_steps", 1)
    if d.global_batch % (accum * shards):
        raise ConfigError(f"config.data.global_batch={d.global_batch} must split into "
                          f"config.train.grad_accum_steps={accum} micro-batches of a multiple of the "
                          f"{shards} batch shards.")
    if d.global_batch % process_count:
        raise ConfigError(f"config.data.global_batch={d.global_batch} is not divisible by the "
                          f"{process_count} processes.")
    _check_mofi_split(config, mesh, rules)
    expert_axis = mesh.get("expert", 1)
    for where, moe in (("decoder", config.model.decoder.moe), ("vit", config.model.vit.get("moe"))):
        if moe and moe.num_experts and moe.num_experts % expert_axis:
            raise ConfigError(f"config.model.{where}.moe.num_experts={moe.num_experts} is not divisible by the "
                              f"{expert_axis} expert shards of the mesh.")
