"""MM1 model: ViT -> connector -> image embeddings spliced at `<image>` slots
-> decoder -> logits.

Batch fields consumed (see `mmjax.data.examples`):
  tokens       `[b, s]` int32   token ids (`<image>` id at image slots)
  image_slots  `[b, s]` int32   index into the flattened image tokens
                                `[num_images * tokens_per_image]`, -1 for text
  images       `[b, n, h, w, 3]` uint8 pixels (normalised here with the ViT
                                flavour's mean/std) or float32 normalised pixels
  segment_ids  `[b, s]` int32   1.. per document, 0 for padding
  positions    `[b, s]` int32   position within the document
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mmjax.models.connectors import make_connector
from mmjax.models.decoder import Decoder
from mmjax.models.moe import token_kinds
from mmjax.models.partitioning import constrain
from mmjax.models.precision import compute_dtype
from mmjax.models.registry import register_model
from mmjax.models.vit import ViT, normalize_pixels


def splice_image_embeddings(text_embeddings: jax.Array, image_embeddings: jax.Array,
                            image_slots: jax.Array) -> jax.Array:
    """Replaces text embeddings at image slots with image embeddings.

    text_embeddings `[b, s, e]`, image_embeddings `[b, n*k, e]`,
    image_slots `[b, s]` (-1 keeps the text embedding) -> `[b, s, e]`.
    """
    index = jnp.clip(image_slots, 0, image_embeddings.shape[1] - 1)
    gathered = jnp.take_along_axis(image_embeddings, index[..., None], axis=1)
    return jnp.where((image_slots >= 0)[..., None], gathered.astype(text_embeddings.dtype), text_embeddings)


class MM1Model(nnx.Module):
    """Config fields: vit, connector, decoder (sub-configs), dtype,
    bidirectional_image_attention (tokens of one image see each other)."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        dtype = compute_dtype(cfg.dtype)
        self.vit = ViT(cfg.vit, rngs=rngs, dtype=dtype)
        num_patches = (cfg.vit.image_size // cfg.vit.patch_size) ** 2
        self.connector = make_connector(cfg.connector, vit_embed=cfg.vit.embed, num_patches=num_patches,
                                        embed=cfg.decoder.embed, rngs=rngs, dtype=dtype)
        self.decoder = Decoder(cfg.decoder, rngs=rngs, dtype=dtype)
        self.tokens_per_image = cfg.connector.num_tokens
        self.bidirectional_image_attention = cfg.bidirectional_image_attention
        self.flavour = cfg.vit.flavour

    def encode_images(self, images: jax.Array) -> jax.Array:
        """images `[b, n, h, w, 3]` -> image tokens `[b, n * num_tokens, embed]`."""
        b, n = images.shape[:2]
        images = normalize_pixels(images, self.flavour)
        features = self.vit.features(images.reshape((b * n,) + images.shape[2:]))
        tokens = self.connector(features)
        tokens = tokens.reshape(b, n * tokens.shape[1], tokens.shape[2])
        return constrain(tokens, ("batch", "image_tokens", "act_embed"))

    def input_embeddings(self, tokens: jax.Array, image_slots: jax.Array, images: jax.Array) -> jax.Array:
        """The decoder's input `[b, s, embed]`: token embeddings with image tokens spliced in."""
        text = constrain(self.decoder.embed(tokens), ("batch", "seq", "act_embed"))
        spliced = splice_image_embeddings(text, self.encode_images(images), image_slots)
        return constrain(spliced, ("batch", "seq", "act_embed"))

    def __call__(self, tokens, image_slots, images, segment_ids, positions) -> jax.Array:
        """Returns logits `[b, s, vocab]` float32."""
        return self.forward(tokens, image_slots, images, segment_ids, positions)[0]

    def forward(self, tokens, image_slots, images, segment_ids, positions) -> tuple[jax.Array, dict]:
        """(logits `[b, s, vocab]`, MoE aux stacked over MoE layers; empty when dense)."""
        x = self.input_embeddings(tokens, image_slots, images)
        image_ids = None
        if self.bidirectional_image_attention:
            image_ids = jnp.where(image_slots >= 0, image_slots // self.tokens_per_image, -1)
        return self.decoder.forward(x, segment_ids, positions, image_ids, self.tokens_per_image,
                                    token_kinds(segment_ids, image_slots))

    def forward_batch(self, batch) -> tuple[jax.Array, dict]:
        """`forward` on a batch dict (the fields `mm1` is registered with)."""
        return self.forward(batch["tokens"], batch["image_slots"], batch["images"],
                            batch["segment_ids"], batch["positions"])


@register_model("mm1", inputs=("tokens", "image_slots", "images", "segment_ids", "positions"))
def build_mm1(cfg, rngs: nnx.Rngs) -> MM1Model:
    return MM1Model(cfg, rngs=rngs)
