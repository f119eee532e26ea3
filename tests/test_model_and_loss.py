"""Image embeddings land at the image slots; the loss ignores masked positions."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from conftest import small_config
from mmjax.models import MM1Model
from mmjax.models.connectors import adaptive_avg_pool2d, adaptive_avg_pool_matrix
from mmjax.train.loss import cross_entropy_loss


def _inputs(b=2, s=16, n=2, k=4, size=32):
    tokens = jnp.arange(b * s, dtype=jnp.int32).reshape(b, s) % 50 + 4
    slots = np.full((b, s), -1, np.int32)
    slots[:, 1:1 + k] = np.arange(k)            # image 0 at positions 1..4
    slots[:, 8:8 + k] = np.arange(k, 2 * k)     # image 1 at positions 8..11
    images = jax.random.normal(jax.random.key(0), (b, n, size, size, 3))
    return tokens, jnp.asarray(slots), images


def test_image_slots_carry_the_connector_output():
    cfg = small_config().model
    model = MM1Model(cfg, rngs=nnx.Rngs(0))
    tokens, slots, images = _inputs()
    emb = model.input_embeddings(tokens, slots, images)
    image_tokens = model.encode_images(images)  # [b, n*k, embed]
    np.testing.assert_allclose(emb[:, 1:5], image_tokens[:, 0:4], rtol=1e-6)
    np.testing.assert_allclose(emb[:, 8:12], image_tokens[:, 4:8], rtol=1e-6)
    text = np.asarray(slots[0]) < 0
    np.testing.assert_allclose(emb[:, text], model.decoder.embed(tokens)[:, text], rtol=1e-6)

    # Changing the second image changes exactly its slots.
    images2 = images.at[:, 1].set(-images[:, 1])
    emb2 = model.input_embeddings(tokens, slots, images2)
    changed = np.abs(np.asarray(emb2 - emb)).max(axis=(0, 2)) > 1e-6
    assert changed.tolist() == [8 <= i < 12 for i in range(16)]


def test_logits_at_text_positions_depend_on_the_image_only_after_it():
    cfg = small_config().model
    model = MM1Model(cfg, rngs=nnx.Rngs(1))
    tokens, slots, images = _inputs()
    seg = jnp.ones(tokens.shape, jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    a = model(tokens, slots, images, seg, pos)
    b = model(tokens, slots, images.at[:, 1].set(0.0), seg, pos)
    diff = np.abs(np.asarray(a - b)).max(axis=(0, 2))
    assert np.all(diff[:8] == 0) and np.all(diff[8:] > 0)  # causal: before image 1 unaffected


def test_loss_ignores_masked_positions():
    key = jax.random.key(0)
    logits = jax.random.normal(key, (2, 6, 11))
    targets = jnp.array([[1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1]])
    mask = jnp.array([[1, 1, 0, 1, 0, 0], [0, 1, 1, 1, 1, 0]], jnp.float32)
    loss, metrics = cross_entropy_loss(logits, targets, mask)
    # Scrambling logits and targets where mask == 0 changes nothing ...
    noisy = jnp.where(mask[..., None] == 0, 100.0 * jax.random.normal(jax.random.key(1), logits.shape), logits)
    other_targets = jnp.where(mask == 0, 0, targets)
    loss2, _ = cross_entropy_loss(noisy, other_targets, mask)
    np.testing.assert_allclose(loss, loss2, rtol=1e-6)
    # ... the value is the mean over counted tokens ...
    logp = jax.nn.log_softmax(logits)
    manual = -(jnp.take_along_axis(logp, targets[..., None], -1)[..., 0] * mask).sum() / mask.sum()
    np.testing.assert_allclose(loss, manual, rtol=1e-6)
    assert metrics["loss_tokens"] == 7
    # ... and no gradient reaches a masked position.
    grads = jax.grad(lambda l: cross_entropy_loss(l, targets, mask)[0])(logits)
    assert np.all(np.asarray(grads)[np.asarray(mask) == 0] == 0)
    assert np.all(np.abs(np.asarray(grads)[np.asarray(mask) == 1]).sum(-1) > 0)


def test_adaptive_pool_matches_definition():
    np.testing.assert_allclose(adaptive_avg_pool_matrix(5, 2), [[1 / 3] * 3 + [0, 0], [0, 0, 1 / 3, 1 / 3, 1 / 3]])
    x = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
    pooled = adaptive_avg_pool2d(x, 2)
    np.testing.assert_allclose(pooled[:, 0, 1], x[:, 0:2, 2:4].mean(axis=(1, 2)))
