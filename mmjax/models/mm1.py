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

and, with `region_sampler.enabled` (Ferret-style region tokens; read only
when present, see `mmjax.models.region_sampler`):
  region_slots   `[b, s]` int32        index into the row's R regions, -1 elsewhere
  region_images  `[b, R]` int32        the image (index into `images`) each region lies on, -1 unused
  region_masks   `[b, R, G, G]` float32  the region's coverage of a G x G grid over that image
The region embeddings replace the token embeddings at region slots, as image
tokens do at image slots. Without the flag or the fields the model is the
plain MM1 model.
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
from mmjax.models.region_sampler import RegionSampler
from mmjax.models.registry import REGION_FIELDS, register_model
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


def regions_enabled(cfg) -> bool:
    """Whether `config.model` asks for the region sampler."""
    sampler = cfg.get("region_sampler")
    return bool(sampler and sampler.get("enabled", False))


class MM1Model(nnx.Module):
    """Config fields: vit, connector, decoder (sub-configs), dtype,
    bidirectional_image_attention (tokens of one image see each other),
    region_sampler (optional: enabled, hidden, pos_freqs)."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        dtype = compute_dtype(cfg.dtype)
        self.vit = ViT(cfg.vit, rngs=rngs, dtype=dtype)
        num_patches = (cfg.vit.image_size // cfg.vit.patch_size) ** 2
        self.connector = make_connector(cfg.connector, vit_embed=cfg.vit.embed, num_patches=num_patches,
                                        embed=cfg.decoder.embed, rngs=rngs, dtype=dtype)
        self.decoder = Decoder(cfg.decoder, rngs=rngs, dtype=dtype)
        self.region_sampler = (RegionSampler(cfg.region_sampler, vit_embed=cfg.vit.embed, embed=cfg.decoder.embed,
                                             rngs=rngs, dtype=dtype) if regions_enabled(cfg) else None)
        self.tokens_per_image = cfg.connector.num_tokens
        self.bidirectional_image_attention = cfg.bidirectional_image_attention
        self.flavour = cfg.vit.flavour

    def image_features(self, images: jax.Array) -> jax.Array:
        """images `[b, n, h, w, 3]` -> ViT patch features `[b * n, patches, vit_embed]`."""
        b, n = images.shape[:2]
        images = normalize_pixels(images, self.flavour)
        return self.vit.features(images.reshape((b * n,) + images.shape[2:]))

    def connect(self, features: jax.Array, b: int) -> jax.Array:
        """features `[b * n, patches, vit_embed]` -> image tokens `[b, n * num_tokens, embed]`."""
        tokens = self.connector(features)
        tokens = tokens.reshape(b, -1, tokens.shape[2])
        return constrain(tokens, ("batch", "image_tokens", "act_embed"))

    def encode_images(self, images: jax.Array) -> jax.Array:
        """images `[b, n, h, w, 3]` -> image tokens `[b, n * num_tokens, embed]`."""
        return self.connect(self.image_features(images), images.shape[0])

    def input_embeddings(self, tokens: jax.Array, image_slots: jax.Array, images: jax.Array,
                         region_slots=None, region_images=None, region_masks=None) -> jax.Array:
        """The decoder's input `[b, s, embed]`: token embeddings with image
        tokens spliced in (and region embeddings, when the model has a region
        sampler and the region fields are given)."""
        text = constrain(self.decoder.embed(tokens), ("batch", "seq", "act_embed"))
        if self.region_sampler is None or region_slots is None:
            spliced = splice_image_embeddings(text, self.encode_images(images), image_slots)
            return constrain(spliced, ("batch", "seq", "act_embed"))
        b, n = images.shape[:2]
        features = self.image_features(images)
        spliced = splice_image_embeddings(text, self.connect(features, b), image_slots)
        features = features.reshape((b, n) + features.shape[1:])
        regions = self.region_sampler(features, region_masks, region_images)
        spliced = splice_image_embeddings(spliced, regions, region_slots)
        return constrain(spliced, ("batch", "seq", "act_embed"))

    def __call__(self, tokens, image_slots, images, segment_ids, positions, **regions) -> jax.Array:
        """Returns logits `[b, s, vocab]` float32 (`regions`: the optional
        region fields, see the module doc)."""
        return self.forward(tokens, image_slots, images, segment_ids, positions, **regions)[0]

    def forward(self, tokens, image_slots, images, segment_ids, positions, region_slots=None, region_images=None,
                region_masks=None) -> tuple[jax.Array, dict]:
        """(logits `[b, s, vocab]`, MoE aux stacked over MoE layers; empty when dense)."""
        x = self.input_embeddings(tokens, image_slots, images, region_slots, region_images, region_masks)
        image_ids = None
        if self.bidirectional_image_attention:
            image_ids = jnp.where(image_slots >= 0, image_slots // self.tokens_per_image, -1)
        return self.decoder.forward(x, segment_ids, positions, image_ids, self.tokens_per_image,
                                    token_kinds(segment_ids, image_slots))

    def forward_batch(self, batch) -> tuple[jax.Array, dict]:
        """`forward` on a batch dict (the fields `mm1` is registered with)."""
        return self.forward(batch["tokens"], batch["image_slots"], batch["images"],
                            batch["segment_ids"], batch["positions"],
                            **{k: batch[k] for k in REGION_FIELDS if k in batch})


@register_model("mm1", inputs=("tokens", "image_slots", "images", "segment_ids", "positions"),
                optional_inputs=lambda cfg: REGION_FIELDS if regions_enabled(cfg) else ())
def build_mm1(cfg, rngs: nnx.Rngs) -> MM1Model:
    return MM1Model(cfg, rngs=rngs)
