"""Config validation: every problem is one sentence naming the field, raised
before anything is compiled."""

from __future__ import annotations

import math

from mmjax.parallel.mesh import resolve_mesh_shape
from mmjax.parallel.rules import get_layout


class ConfigError(ValueError):
    """The experiment config is inconsistent or impossible."""


def check_config(config, num_devices: int, process_count: int = 1) -> None:
    """Raises ConfigError (one sentence) for the first problem found."""
    try:
        mesh = resolve_mesh_shape(dict(config.mesh), num_devices)
        rules = get_layout(config.rules)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    t, d, m = config.train, config.data, config.model
    for field in ("steps", "log_every", "checkpoint_every", "keep_checkpoints"):
        if t[field] < 1:
            raise ConfigError(f"config.train.{field}={t[field]} must be at least 1.")
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
    if t.get("on_nonfinite", "stop") not in ("stop", "skip"):
        raise ConfigError(f"config.train.on_nonfinite={t.on_nonfinite!r} must be 'stop' or 'skip'.")
    accum = t.get("grad_accum_steps", 1)
    if accum < 1 or d.global_batch % (accum * shards):
        raise ConfigError(f"config.data.global_batch={d.global_batch} must split into "
                          f"config.train.grad_accum_steps={accum} micro-batches of a multiple of the "
                          f"{shards} batch shards.")
    if d.global_batch % process_count:
        raise ConfigError(f"config.data.global_batch={d.global_batch} is not divisible by the "
                          f"{process_count} processes.")
    if m.vit.image_size % m.vit.patch_size:
        raise ConfigError(f"config.model.vit.image_size={m.vit.image_size} is not divisible by "
                          f"patch_size={m.vit.patch_size}.")
    if d.image_size != m.vit.image_size:
        raise ConfigError(f"config.data.image_size={d.image_size} differs from "
                          f"config.model.vit.image_size={m.vit.image_size}.")
    if d.tokens_per_image != m.connector.num_tokens:
        raise ConfigError(f"config.data.tokens_per_image={d.tokens_per_image} differs from "
                          f"config.model.connector.num_tokens={m.connector.num_tokens}.")
    if d.vocab_size != m.decoder.vocab_size:
        raise ConfigError(f"config.data.vocab_size={d.vocab_size} differs from "
                          f"config.model.decoder.vocab_size={m.decoder.vocab_size}.")
    if len(d.mix_weights) != 3 or min(d.mix_weights) < 0 or sum(d.mix_weights) <= 0:
        raise ConfigError(f"config.data.mix_weights={tuple(d.mix_weights)} must be three non-negative "
                          "weights (caption, interleaved, text) with a positive sum.")
    if d.max_images * d.tokens_per_image >= d.seq_len:
        raise ConfigError(f"config.data.max_images={d.max_images} images of {d.tokens_per_image} tokens "
                          f"do not fit in seq_len={d.seq_len}.")
    dec = m.decoder
    if dec.heads % dec.kv_heads:
        raise ConfigError(f"config.model.decoder.heads={dec.heads} is not a multiple of kv_heads={dec.kv_heads}.")
    if m.vit.embed % m.vit.heads:
        raise ConfigError(f"config.model.vit.embed={m.vit.embed} is not divisible by heads={m.vit.heads}.")
    if m.dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"config.model.dtype={m.dtype!r} must be 'float32' or 'bfloat16'.")
