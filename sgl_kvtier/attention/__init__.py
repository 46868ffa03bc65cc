"""Attention computations behind the ``kvtier`` attention backend (plain PyTorch here; the
SGLang-facing backend class is in ``patches/attention_backend.py``)."""
