"""sgl_kvtier: long-context tiers for SGLang."""
__version__ = "0.1.0"
