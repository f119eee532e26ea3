"""Test setup: 8 simulated CPU devices (set before JAX creates its backend),
a private tokenizer cache, and small shared configs."""

import os
import sys

import pytest

os.environ.setdefault("MMJAX_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "mmjax"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


def free_port() -> int:
    """A TCP port on 127.0.0.1 free right now (for a jax.distributed coordinator)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small_config(steps: int = 10):
    """The tiny experiment shrunk for tests: one ViT block, one decoder layer,
    64-token sequences, batch 8, on the data=2 x fsdp=2 x expert=2 mesh."""
    from experiments.tiny import get_config

    c = get_config()
    c.model.vit.depth = 1
    c.model.decoder.layers = 1
    c.model.decoder.mlp = 256
    c.data.seq_len = 64
    c.data.global_batch = 8
    c.data.max_images = 2
    c.train.steps = steps
    c.optimizer.warmup_steps = min(c.optimizer.warmup_steps, steps)  # a warm-up longer than the run is refused
    c.train.log_every = 1
    c.train.checkpoint_every = steps
    c.evaluators.caption_accuracy.num_examples = 16
    c.eval.shapes_caption = c.eval.shapes_vqa = False  # generation tasks are tested on their own
    c.train.eval_every = 0
    return c


@pytest.fixture
def config():
    return small_config()
