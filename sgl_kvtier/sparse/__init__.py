"""ShadowKV-style sparse decode, the core (plain PyTorch; no SGLang import).

``rope`` undoes and redoes the rotation; ``budget`` sizes a request; ``state`` builds one
layer's low-rank keys, landmarks, outliers and off-device values; ``select`` picks chunks
per KV head; ``ops`` rebuilds keys and gathers values (references of the Triton kernels);
``workspace`` and ``request`` hold the selected chunks across steps; ``paged`` is the CSR
page table FlashInfer reads; ``decode`` runs a step.
"""
