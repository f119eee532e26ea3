"""Vision Transformer image encoders in two flavours.

- `clip`:   class token, patch conv without bias, `pre_layrnorm` before the
            blocks, quick_gelu MLP; `last_hidden_state` is the block output
            (the post-norm only feeds the pooled output).
- `siglip`: no class token, patch conv with bias, gelu (tanh), post-norm
            applied to the whole sequence, optional MAP attention-pool head.

images `[batch, height, width, 3]` float (already normalised) ->
`last_hidden_state` `[batch, tokens, vit_embed]` (tokens = patches, +1 for
CLIP's class token), or `features` `[batch, patches, vit_embed]` from the
configured layer for the connector. Patches are in row-major order.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mmjax.models.attention import Attention
from mmjax.models.layers import Dense, LayerNorm, make_param
from mmjax.models.partitioning import constrain
from mmjax.models.stack import LayerStack
from mmjax.models.vision_moe import VisionMoE, check_vit_moe, is_moe_block
from mmjax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Flavour:
    class_token: bool
    patch_bias: bool
    pre_norm: bool
    post_norm_on_sequence: bool
    activation: str
    # uint8 pixels are normalised as (x / 255 - mean) / std per channel
    pixel_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    pixel_std: tuple[float, float, float] = (0.5, 0.5, 0.5)


FLAVOURS = {
    "clip": Flavour(class_token=True, patch_bias=False, pre_norm=True, post_norm_on_sequence=False,
                    activation="quick_gelu", pixel_mean=(0.48145466, 0.4578275, 0.40821073),
                    pixel_std=(0.26862954, 0.26130258, 0.27577711)),
    "siglip": Flavour(class_token=False, patch_bias=True, pre_norm=False, post_norm_on_sequence=True,
                      activation="gelu_tanh"),
}



def normalize_pixels(images: jax.Array, flavour: str) -> jax.Array:
    """uint8 pixels `[..., 3]` -> float32 normalised with the flavour's
    mean/std; float input is taken as already normalised."""
    if jnp.issubdtype(images.dtype, jnp.floating):
        return images
    f = FLAVOURS[flavour]
    scaled = images.astype(jnp.float32) / 255.0
    return (scaled - jnp.asarray(f.pixel_mean, jnp.float32)) / jnp.asarray(f.pixel_std, jnp.float32)


ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}

# name -> (embed, depth, heads, mlp, patch_size)
VARIANTS = {
    "B/16": (768, 12, 12, 3072, 16),
    "L/14": (1024, 24, 16, 4096, 14),
    "H/14": (1280, 32, 16, 5120, 14),
    "So400m/14": (1152, 27, 16, 4304, 14),
    "tiny/4": (64, 2, 4, 256, 4),
    "tiny/8": (64, 2, 4, 256, 8),
}


def patchify(images: jax.Array, patch: int) -> jax.Array:
    """`[b, h, w, c]` -> `[b, (h/p)*(w/p), p*p*c]` in row-major patch order."""
    b, h, w, c = images.shape
    if h % patch or w % patch:
        raise ValueError(f"image size {h}x{w} is not divisible by patch size {patch}")
    x = images.reshape(b, h // patch, patch, w // patch, patch, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def interpolate_pos_embed(pos: jax.Array, new_grid: int) -> jax.Array:
    """Resizes patch position embeddings `[g*g, d]` to `[new_grid**2, d]` (bicubic),
    so a checkpoint trained at one resolution runs at another."""
    grid = int(round(pos.shape[0] ** 0.5))
    if grid == new_grid:
        return pos
    table = pos.reshape(grid, grid, -1).astype(jnp.float32)
    resized = jax.image.resize(table, (new_grid, new_grid, table.shape[-1]), method="bicubic")
    return resized.reshape(new_grid * new_grid, -1).astype(pos.dtype)


class ViTBlock(nnx.Module):
    """Pre-LN transformer block: x + attn(ln1(x)); x + mlp(ln2(x)). With
    `moe=True` the MLP is a per-image routed `VisionMoE` (`vit.moe`) and the
    block returns (x, aux) (`mmjax.models.vision_moe`)."""

    def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32, moe: bool = False):
        eps, e = cfg.layer_norm_eps, cfg.embed
        flavour = FLAVOURS[cfg.flavour]
        self.activation = ACTIVATIONS[flavour.activation]
        self.ln1 = LayerNorm(e, rngs=rngs, eps=eps)
        self.attn = Attention(e, cfg.heads, cfg.heads, e // cfg.heads, rngs=rngs,
                              embed_axis="vit_embed", use_bias=True, dtype=dtype,
                              implementation=cfg.get("attention", "xla"))
        self.ln2 = LayerNorm(e, rngs=rngs, eps=eps)
        if moe:
            self.moe = VisionMoE(e, cfg.moe, self.activation, prefix=int(flavour.class_token), rngs=rngs,
                                 dtype=dtype)
        else:
            self.moe = None
            self.fc1 = Dense(e, cfg.mlp, ("vit_embed", "vit_mlp"), rngs=rngs, use_bias=True, dtype=dtype)
            self.fc2 = Dense(cfg.mlp, e, ("vit_mlp", "vit_embed"), rngs=rngs, use_bias=True, dtype=dtype)

    def __call__(self, x: jax.Array, superclass_id: jax.Array | None = None):
        """x `[b, n, vit_embed]` -> x, or (x, aux) for a MoE block;
        superclass_id `[b]` (optional) feeds the MoE's super-class routing loss."""
        x = x + self.attn(self.ln1(x))
        if self.moe is not None:
            y, aux = self.moe(self.ln2(x), superclass_id)
            return constrain(x + y, ("batch", "patches", "act_vit_embed")), aux
        x = x + self.fc2(self.activation(self.fc1(self.ln2(x))))
        return constrain(x, ("batch", "patches", "act_vit_embed"))


class MAPHead(nnx.Module):
    """SigLIP multihead attention pooling: one learned probe attends to the
    sequence, then LayerNorm + MLP residual. `[b, n, d]` -> `[b, d]`."""

    def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32):
        e = cfg.embed
        self.probe = make_param(rngs, nnx.initializers.normal(0.02), (1, e), (None, "vit_embed"))
        self.attn = Attention(e, cfg.heads, cfg.heads, e // cfg.heads, rngs=rngs,
                              embed_axis="vit_embed", use_bias=True, dtype=dtype,
                              implementation=cfg.get("attention", "xla"))
        self.norm = LayerNorm(e, rngs=rngs, eps=cfg.layer_norm_eps)
        self.fc1 = Dense(e, cfg.mlp, ("vit_embed", "vit_mlp"), rngs=rngs, use_bias=True, dtype=dtype)
        self.fc2 = Dense(cfg.mlp, e, ("vit_mlp", "vit_embed"), rngs=rngs, use_bias=True, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        probe = jnp.broadcast_to(self.probe[...], (x.shape[0], 1, x.shape[-1])).astype(x.dtype)
        h = self.attn.cross(probe, x)
        h = h + self.fc2(jax.nn.gelu(self.fc1(self.norm(h)), approximate=True))
        return h[:, 0]


class ViT(nnx.Module):
    """Config fields: flavour, image_size, patch_size, embed, depth, heads,
    mlp, layer_norm_eps, feature_layer (-1 last, -2 penultimate, ...),
    map_head, scan, remat, and moe (`mmjax.models.vision_moe`; num_experts=0:
    dense). A MoE ViT is called through `forward`, which also returns the
    routing aux; the aux-less entry points refuse it."""

    def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32):
        if cfg.flavour not in FLAVOURS:
            raise ConfigError(f"config.model.vit.flavour={cfg.flavour!r} is unknown; choose one of {sorted(FLAVOURS)}.")
        flavour = FLAVOURS[cfg.flavour]
        self.flavour, self.patch_size, self.embed = flavour, cfg.patch_size, cfg.embed
        self.feature_layer = cfg.feature_layer
        if not -cfg.depth <= cfg.feature_layer <= -1:
            raise ConfigError(f"config.model.vit.feature_layer={cfg.feature_layer} must be in -{cfg.depth}..-1.")
        grid = cfg.image_size // cfg.patch_size
        e, eps = cfg.embed, cfg.layer_norm_eps
        self.patch_embed = Dense(cfg.patch_size * cfg.patch_size * 3, e, ("patch", "vit_embed"),
                                 rngs=rngs, use_bias=flavour.patch_bias, dtype=dtype)
        self.class_embed = (make_param(rngs, nnx.initializers.normal(0.02), (e,), ("vit_embed",))
                            if flavour.class_token else None)
        self.pos_embed = make_param(rngs, nnx.initializers.normal(0.02), (grid * grid, e),
                                    ("patches", "vit_embed"))
        self.cls_pos_embed = (make_param(rngs, nnx.initializers.normal(0.02), (1, e), (None, "vit_embed"))
                              if flavour.class_token else None)
        self.ln_pre = LayerNorm(e, rngs=rngs, eps=eps) if flavour.pre_norm else None
        check_vit_moe(cfg)
        kinds = {is_moe_block(cfg, i) for i in range(cfg.depth)}
        self.has_moe = True in kinds
        if len(kinds) > 1:
            self.blocks = LayerStack(lambda r, i=0: ViTBlock(cfg, rngs=r, dtype=dtype, moe=is_moe_block(cfg, i)),
                                     cfg.depth, rngs=rngs, scan=cfg.scan, remat=cfg.remat, indexed=True)
        else:
            self.blocks = LayerStack(lambda r: ViTBlock(cfg, rngs=r, dtype=dtype, moe=self.has_moe), cfg.depth,
                                     rngs=rngs, scan=cfg.scan, remat=cfg.remat)
        self.ln_post = LayerNorm(e, rngs=rngs, eps=eps)
        self.head = MAPHead(cfg, rngs=rngs, dtype=dtype) if cfg.map_head else None

    def _embed(self, images: jax.Array) -> jax.Array:
        """`[b, h, w, 3]` -> tokens `[b, (1+)patches, vit_embed]` before the blocks."""
        b, h, w, _ = images.shape
        if h != w:
            raise ValueError(f"ViT expects square images, got {h}x{w}")
        x = self.patch_embed(patchify(images, self.patch_size))
        x = x + interpolate_pos_embed(self.pos_embed[...], h // self.patch_size).astype(x.dtype)
        if self.class_embed is not None:
            cls = (self.class_embed[...] + self.cls_pos_embed[0]).astype(x.dtype)
            x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.embed)), x], axis=1)
        if self.ln_pre is not None:
            x = self.ln_pre(x)
        return constrain(x, ("batch", "patches", "act_vit_embed"))

    def _refuse_moe(self) -> None:
        if self.has_moe:
            raise ConfigError("config.model.vit.moe.num_experts > 0 makes a mixture-of-experts ViT, whose routing "
                              "losses only ViT.forward returns; only the vit_classifier model trains one.")

    def forward(self, images: jax.Array, superclass_id: jax.Array | None = None) -> tuple[jax.Array, dict]:
        """(`last_hidden_state` `[b, tokens, vit_embed]`, MoE aux stacked over
        the MoE blocks `[n_moe, ...]`, {} for a dense ViT); superclass_id `[b]`
        (optional, -1: none) feeds the super-class routing loss."""
        out = self.blocks(self._embed(images), superclass_id) if self.has_moe else self.blocks(self._embed(images))
        x, aux = out if isinstance(out, tuple) else (out, {})
        return (self.ln_post(x) if self.flavour.post_norm_on_sequence else x), aux

    def __call__(self, images: jax.Array) -> jax.Array:
        """`last_hidden_state` `[b, tokens, vit_embed]`, as the reference models return it."""
        self._refuse_moe()
        x = self.blocks(self._embed(images))
        return self.ln_post(x) if self.flavour.post_norm_on_sequence else x

    def pool(self, x: jax.Array, how: str) -> jax.Array:
        """last_hidden_state `[b, tokens, vit_embed]` -> `[b, vit_embed]`: how
        "token" (CLIP's post-normed class token, SigLIP's MAP head) or "mean"
        (the mean patch token, post-normed: SigLIP's norm is on the sequence
        already, CLIP's `ln_post` is applied to the mean)."""
        if how == "mean":
            return self.ln_post(x[:, 1:].mean(axis=1)) if self.flavour.class_token else x.mean(axis=1)
        if self.flavour.class_token:
            return self.ln_post(x[:, 0])
        if self.head is None:
            raise ValueError("this SigLIP encoder has no MAP head (config.model.vit.map_head=False)")
        return self.head(x)

    def pooled(self, images: jax.Array) -> jax.Array:
        """`[b, vit_embed]`: CLIP post-normed class token, SigLIP MAP head output."""
        return self.pool(self(images), "token")

    def mean_pooled(self, images: jax.Array) -> jax.Array:
        """`[b, vit_embed]`: the mean of the patch tokens of the last hidden
        state (the class token left out), post-normed (see `pool`)."""
        return self.pool(self(images), "mean")

    def features(self, images: jax.Array) -> jax.Array:
        """Patch features for the connector `[b, patches, vit_embed]` from
        `feature_layer` (-1: last block, post-normed for SigLIP; -2: the block
        before it, un-normed, as LLaVA/MM1 take CLIP's penultimate layer)."""
        self._refuse_moe()
        n = self.blocks.depth + 1 + self.feature_layer
        x = self.blocks(self._embed(images), num_layers=n)
        if self.feature_layer == -1 and self.flavour.post_norm_on_sequence:
            x = self.ln_post(x)
        return x[:, 1:] if self.flavour.class_token else x


def variant_config(variant: str, flavour: str, image_size: int, **overrides):
    """A ViT config from the `VARIANTS` table (e.g. "H/14", "clip", 378)."""
    import ml_collections as mlc

    if variant not in VARIANTS:
        raise ValueError(f"ViT variant {variant!r} is unknown; choose one of {sorted(VARIANTS)}.")
    embed, depth, heads, mlp, patch = VARIANTS[variant]
    cfg = dict(flavour=flavour, image_size=image_size, patch_size=patch, embed=embed, depth=depth,
               heads=heads, mlp=mlp, layer_norm_eps=1e-5 if flavour == "clip" else 1e-6,
               feature_layer=-1, map_head=flavour == "siglip", scan=False, remat="")
    cfg.update(overrides)
    return mlc.ConfigDict(cfg)


def param_count(cfg) -> int:
    """Analytic parameter count of `ViT(cfg)`."""
    f = FLAVOURS[cfg.flavour]
    e, m, p = cfg.embed, cfg.mlp, cfg.patch_size
    patches = (cfg.image_size // p) ** 2
    count = p * p * 3 * e + (e if f.patch_bias else 0) + patches * e
    count += 2 * e if f.class_token else 0  # class embedding + its position embedding
    count += 2 * e if f.pre_norm else 0
    block = 4 * e * e + 2 * e * m + 9 * e + m  # qkvo + biases, mlp + biases, two LayerNorms
    count += cfg.depth * block + 2 * e  # + ln_post
    moe = cfg.get("moe")
    if moe and moe.num_experts:  # a MoE block's MLP: router + experts (with biases) instead of fc1/fc2
        n_moe = sum(is_moe_block(cfg, i) for i in range(cfg.depth))
        h, experts = moe.expert_mlp, moe.num_experts
        count += n_moe * (e * experts + experts * (2 * e * h + h + e) - (2 * e * m + m + e))
    if cfg.map_head:
        count += e + 4 * e * e + 4 * e + 2 * e + 2 * e * m + m + e
    return count
