"""Triton kernels of sgl_kvtier (``@triton.jit`` functions only; launchers and the PyTorch
reference each kernel must agree with live in ``sgl_kvtier``).

Sparse decode (launchers in :mod:`sgl_kvtier.sparse.triton_ops`): ``sparse_scores``
(landmark scores, max over the GQA group), ``sparse_rebuild`` (low-rank keys with RoPE into
workspace slots), ``sparse_gather`` (values into workspace slots), ``sparse_attention``
(paged decode over the CSR page table).

Importing this package never imports Triton: :data:`HAS_TRITON` only looks it up, so the
package stays importable on hosts without it.
"""

import importlib.util

HAS_TRITON = importlib.util.find_spec("triton") is not None

__all__ = ["HAS_TRITON"]
