"""mmjax: MM1-style multimodal LLM training in JAX (ViT -> connector -> decoder)."""

__version__ = "0.1.0"
