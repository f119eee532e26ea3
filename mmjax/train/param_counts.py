"""Total and active (per token) parameter counts, for MoE-vs-dense pairs.

`param_counts(config)` reads the abstract model (nothing allocated);
`decoder_param_counts(config.model.decoder)` gives the decoder's counts from
its dims alone. Expert weights count `top_k / num_experts` of their size
toward `active`: the parameters one token passes through. The decoder's
`dense` count is its dense backbone's: every MoE layer's router, experts and
shared expert replaced by the dense SwiGLU of width `decoder.mlp` (the
decoder with `moe.num_experts = 0`).
"""

from __future__ import annotations

import math

import jax
from flax import nnx


def _is_expert_weight(variable) -> bool:
    return "expert" in (variable.get_metadata().get("logical_axes") or ())


def _key_name(entry) -> str:
    """A tree path entry (DictKey, GetAttrKey, ...) as its plain name."""
    return str(getattr(entry, "key", getattr(entry, "name", entry)))


def _moe_of(config, path) -> object:
    """The MoE settings of an expert leaf at `path` (tree keys): the ViT's
    (`config.model.vit.moe`) under the top-level "vit", else the decoder's."""
    return config.model.vit.moe if _key_name(path[0]) == "vit" else config.model.decoder.moe


def param_counts(config, component: str | None = None) -> dict[str, int]:
    """{"total", "active"} parameters of the model in `config` (or of one
    top-level component: "vit", "connector", "decoder"), from abstract
    params. Expert weights count `top_k / num_experts` of their size toward
    `active` (the top_k and num_experts of their own MoE, the ViT's or the
    decoder's): the parameters one routed unit (a token, or an image for
    the ViT's MoE) passes through."""
    from mmjax.train.state import abstract_model

    _, params = abstract_model(config.model)
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    total = active = 0
    for path, leaf in flat:
        if component is not None and _key_name(path[0]) != component:
            continue
        size = math.prod(leaf.shape)
        total += size
        if _is_expert_weight(leaf):
            moe = _moe_of(config, path)
            size = size * moe.top_k // moe.num_experts
        active += size
    return {"total": total, "active": active}


def decoder_param_counts(dec) -> dict[str, int]:
    """{"total", "active", "dense"} decoder parameters from
    `config.model.decoder`'s dims (total and active are the numbers
    `param_counts(config, "decoder")` gives; dense: see the module doc)."""
    from mmjax.models.decoder import is_moe_layer

    m, hd = dec.embed, dec.head_dim
    attention = m * hd * (2 * dec.heads + 2 * dec.kv_heads)
    if dec.get("qk_norm"):
        attention += 2 * hd
    total = active = dense = (1 if dec.tie_embeddings else 2) * dec.vocab_size * m + m  # tables, final norm
    for i in range(dec.layers):
        layer = attention + 2 * m  # + two RMSNorms
        dense += layer + 3 * m * dec.mlp
        if is_moe_layer(dec, i):
            moe = dec.moe
            expert = 3 * m * moe.expert_mlp
            shared = expert if moe.shared_expert else 0
            total += layer + m * moe.num_experts + moe.num_experts * expert + shared
            active += layer + m * moe.num_experts + moe.top_k * expert + shared
        else:
            total += layer + 3 * m * dec.mlp
            active += layer + 3 * m * dec.mlp
    return {"total": total, "active": active, "dense": dense}
