"""Flax NNX modules: ViT encoder, vision-language connectors, decoder, MM1 model,
dual encoder, and the registry of trainable models (`mmjax.models.registry`:
"mm1", "text_lm", "dual_encoder", "vit_classifier").

Parameters carry logical axis names in their `logical_axes` metadata; the
mapping to mesh axes lives in `mmjax.parallel`.
"""

from mmjax.models.classifier import ViTClassifier
from mmjax.models.decoder import LanguageModel
from mmjax.models.dual_encoder import DualEncoder
from mmjax.models.mm1 import MM1Model
from mmjax.models.registry import MODELS, build_model, model_spec, register_model

__all__ = ["MM1Model", "LanguageModel", "DualEncoder", "ViTClassifier", "MODELS", "build_model", "model_spec", "register_model"]
