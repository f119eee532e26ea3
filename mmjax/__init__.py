"""mmjax: MM1-style multimodal LLM training in JAX (ViT -> connector -> decoder)."""

from mmjax.libtpu_env import quiet_libtpu_without_tpus

__version__ = "0.1.0"

quiet_libtpu_without_tpus()  # before JAX starts its backends (see mmjax/libtpu_env.py)
