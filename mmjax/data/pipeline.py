"""Grain pipeline: sources -> per-process shard -> weighted mix -> examples ->
batches -> global `jax.Array`s.

The mix interleaves the streams deterministically in proportion to
`data.mix_weights` (caption : interleaved : text, default 5:5:1), so every
batch carries close to the configured ratio and the iterator state is a
single index (checkpointable with Orbax through `grain.checkpoint`).
"""

from __future__ import annotations

from typing import Mapping

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding

from mmjax.data.examples import ExampleBuilder
from mmjax.data.procedural import SOURCES, STREAMS, tokenizer_corpus
from mmjax.data.tokenizer import Tokenizer, load_or_train


def default_tokenizer(data_cfg) -> Tokenizer:
    """The tokenizer for the embedded default data (trained once, then cached)."""
    return load_or_train(tokenizer_corpus(), data_cfg.vocab_size)


def stream_datasets(data_cfg, split: str, process_index: int = 0,
                    process_count: int = 1) -> list[grain.MapDataset]:
    """One MapDataset per stream, each restricted to this process's shard."""
    datasets = []
    for stream in STREAMS:
        source = SOURCES[stream](image_size=data_cfg.image_size, seed=data_cfg.seed, split=split)
        datasets.append(grain.MapDataset.source(source)[process_index::process_count])
    return datasets


def make_dataset(data_cfg, tokenizer: Tokenizer, *, batch_size: int, split: str = "train",
                 process_index: int = 0, process_count: int = 1,
                 streams: tuple[str, ...] | None = None,
                 with_attributes: bool = False) -> grain.IterDataset:
    """Batched examples for this process.

    Args:
      data_cfg: `config.data` (seq_len, max_images, tokens_per_image,
        image_size, mix_weights, seed, workers).
      batch_size: examples per batch on this process.
      streams: restrict to these streams (default: all, mixed by weight).
    """
    weights = dict(zip(STREAMS, data_cfg.mix_weights))
    chosen = [s for s in STREAMS if (streams is None or s in streams) and weights[s] > 0]
    if not chosen:
        raise ValueError(f"config.data.mix_weights={tuple(data_cfg.mix_weights)} selects no stream.")
    all_ds = dict(zip(STREAMS, stream_datasets(data_cfg, split, process_index, process_count)))
    ds = (all_ds[chosen[0]] if len(chosen) == 1 else
          grain.MapDataset.mix([all_ds[s] for s in chosen], [weights[s] for s in chosen]))
    builder = ExampleBuilder(tokenizer, data_cfg.seq_len, data_cfg.max_images,
                             data_cfg.tokens_per_image, data_cfg.image_size, with_attributes)
    ds = ds.map(lambda record: dict(builder(record), stream=np.int32(STREAMS.index(record["stream"]))))
    it = ds.batch(batch_size, drop_remainder=True).to_iter_dataset()
    if data_cfg.workers > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.workers))
    return it


def to_global_arrays(local_batch: Mapping[str, np.ndarray],
                     shardings: Mapping[str, NamedSharding]) -> dict[str, jax.Array]:
    """Assembles per-process numpy batches into global arrays (batch dim sharded)."""
    return {k: jax.make_array_from_process_local_data(shardings[k], v)
            for k, v in local_batch.items() if k in shardings}
