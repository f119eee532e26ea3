"""AdamW with linear warmup, cosine decay to a floor, and global-norm clipping.

Weight decay applies to matrices only (rank >= 2 parameters other than
embeddings tables and position embeddings), never to norms or biases.
"""

from __future__ import annotations

import jax
import optax
from flax import nnx

_NO_DECAY_AXES = {"vocab", "patches"}  # embedding tables and position embeddings


def learning_rate_schedule(opt_cfg, total_steps: int) -> optax.Schedule:
    """Linear warmup to `lr`, cosine decay to `lr * min_lr_ratio` at `total_steps`."""
    warmup = min(opt_cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=opt_cfg.lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=opt_cfg.lr * opt_cfg.min_lr_ratio,
    )


def weight_decay_mask(params: nnx.State):
    """True for parameters that get weight decay (see module doc)."""

    def decays(variable):
        axes = variable.get_metadata().get("logical_axes") or ()
        return len(axes) >= 2 and not (_NO_DECAY_AXES & set(axes))

    return jax.tree.map(lambda v: v.replace(decays(v)), params,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(opt_cfg, total_steps: int, params: nnx.State) -> optax.GradientTransformation:
    """AdamW per `config.optimizer` (lr, warmup_steps, min_lr_ratio, b1, b2,
    eps, weight_decay, grad_clip)."""
    schedule = learning_rate_schedule(opt_cfg, total_steps)
    return optax.chain(
        optax.clip_by_global_norm(opt_cfg.grad_clip),
        optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                    weight_decay=opt_cfg.weight_decay, mask=weight_decay_mask(params)),
    )
