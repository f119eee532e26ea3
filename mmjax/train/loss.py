"""Next-token cross-entropy on text tokens only, with optional z-loss.

logits `[b, s, vocab]` float32, targets `[b, s]` int, loss_mask `[b, s]`
(1 = counted). Image slots and padding have loss_mask 0, so they contribute
nothing to the loss or its gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy_loss(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array,
                       z_loss_weight: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns (total loss, metrics) averaged over counted tokens.

    metrics: lm_loss (mean CE), z_loss (mean log(Z)^2 times weight),
    loss_tokens (number of counted tokens), token_accuracy (argmax == target,
    over counted tokens).
    """
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = log_z - target_logit
    mask = loss_mask.astype(jnp.float32)
    count = jnp.maximum(mask.sum(), 1.0)
    lm_loss = (nll * mask).sum() / count
    z_loss = z_loss_weight * (jnp.square(log_z) * mask).sum() / count
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    metrics = {
        "lm_loss": lm_loss,
        "z_loss": z_loss,
        "loss_tokens": mask.sum(),
        "token_accuracy": (correct * mask).sum() / count,
    }
    return lm_loss + z_loss, metrics
