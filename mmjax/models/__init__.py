"""Flax NNX modules: ViT encoder, vision-language connectors, decoder, MM1 model.

Parameters carry logical axis names in their `logical_axes` metadata; the
mapping to mesh axes lives in `mmjax.parallel`.
"""

from mmjax.models.mm1 import MM1Model

__all__ = ["MM1Model"]
