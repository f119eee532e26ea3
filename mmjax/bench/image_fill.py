"""How full the image slots of a config's batches are, measured on its data.

MFU counts only the images a batch holds (`FlopsBreakdown.model_flops_at`).
An ahead-of-time compile has no batch, so `mmjax.bench.aot` draws a few
packed sequences from the config's own pipeline on the host (procedural
streams or the user's files) and takes the fraction of image slots filled.
"""

from __future__ import annotations

import time

import numpy as np


def measured_image_fill(config, sequences: int = 32, batch_size: int = 8) -> tuple[float, str]:
    """(filled image slots / all slots over `sequences` packed sequences, a
    sentence saying what was measured). Packing does not depend on the batch
    size, so a small batch stands in for the global one."""
    from mmjax.data.pipeline import default_tokenizer, make_dataset

    data_cfg = config.data.copy_and_resolve_references()
    with data_cfg.unlocked():
        data_cfg.workers = 0
        data_cfg.shards = 0
    t0 = time.perf_counter()
    present = slots = 0
    iterator = iter(make_dataset(data_cfg, default_tokenizer(data_cfg), batch_size=batch_size))
    while slots < sequences * data_cfg.max_images:
        mask = np.asarray(next(iterator)["image_mask"])
        present, slots = present + int(mask.sum()), slots + mask.size
    fill = present / slots if slots else 0.0
    return fill, (f"image slots filled: {fill:.1%} ({present} of {slots} over {slots // data_cfg.max_images} "
                  f"packed sequences of the config's data, measured in {time.perf_counter() - t0:.1f}s)")
