"""Vision Transformer image encoder (pre-LN, learned position embeddings).

images `[batch, height, width, 3]` float -> patch features
`[batch, num_patches, vit_embed]` (row-major patch order).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mmjax.models.attention import Attention
from mmjax.models.layers import Dense, LayerNorm, make_param
from mmjax.models.partitioning import constrain


def patchify(images: jax.Array, patch: int) -> jax.Array:
    """`[b, h, w, c]` -> `[b, (h/p)*(w/p), p*p*c]` in row-major patch order."""
    b, h, w, c = images.shape
    if h % patch or w % patch:
        raise ValueError(f"image size {h}x{w} is not divisible by patch size {patch}")
    x = images.reshape(b, h // patch, patch, w // patch, patch, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


class ViTBlock(nnx.Module):
    """Pre-LN transformer block: x + attn(ln(x)); x + mlp(ln(x))."""

    def __init__(self, embed: int, heads: int, mlp: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.ln1 = LayerNorm(embed, rngs=rngs)
        self.attn = Attention(embed, heads, heads, embed // heads, rngs=rngs,
                              embed_axis="vit_embed", use_bias=True, dtype=dtype)
        self.ln2 = LayerNorm(embed, rngs=rngs)
        self.fc1 = Dense(embed, mlp, ("vit_embed", "vit_mlp"), rngs=rngs, use_bias=True, dtype=dtype)
        self.fc2 = Dense(mlp, embed, ("vit_mlp", "vit_embed"), rngs=rngs, use_bias=True, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x))))


class ViT(nnx.Module):
    """ViT encoder. Config fields: image_size, patch_size, embed, depth, heads, mlp."""

    def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.patch_size = cfg.patch_size
        grid = cfg.image_size // cfg.patch_size
        self.grid = grid
        self.patch_embed = Dense(cfg.patch_size * cfg.patch_size * 3, cfg.embed,
                                 ("patch", "vit_embed"), rngs=rngs, use_bias=True, dtype=dtype)
        self.pos_embed = make_param(rngs, nnx.initializers.normal(0.02), (grid * grid, cfg.embed),
                                    ("patches", "vit_embed"))
        self.blocks = nnx.List([ViTBlock(cfg.embed, cfg.heads, cfg.mlp, rngs=rngs, dtype=dtype)
                                for _ in range(cfg.depth)])
        self.ln_post = LayerNorm(cfg.embed, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        """images `[b, h, w, 3]` -> `[b, grid*grid, vit_embed]`."""
        x = self.patch_embed(patchify(images, self.patch_size)) + self.pos_embed[...]
        for block in self.blocks:
            x = constrain(block(x), ("batch", "patches", "act_vit_embed"))
        return self.ln_post(x)
