"""The ``sparse.kernel`` choice: which paged decode consumes the page table.

``auto`` takes FlashInfer where a CUDA device and FlashInfer are present, else the Triton
kernel where a CUDA device and Triton are, else PyTorch (:class:`TorchPagedDecode`). On a CPU
``triton`` runs the kernel in Triton's interpreter: correct, and far too slow to serve
(tests use it); ``flashinfer`` is refused.

The rest of a step (chunk scores, rebuilding and fetching missed chunks) follows
:func:`resolve_ops`: the Triton kernels on a CUDA device, PyTorch on a CPU, where the
interpreter would make every request's every layer pay for it.
"""

from __future__ import annotations

import importlib.util
import logging

import torch

from sgl_kvtier.sparse.paged import TorchPagedDecode
from sgl_kvtier.sparse.step_ops import TorchOps, TritonOps

__all__ = ["resolve_kernel", "resolve_ops", "KernelUnavailable"]

log = logging.getLogger("sgl_kvtier")


class KernelUnavailable(ValueError):
    """The configured ``sparse.kernel`` cannot run on this host."""


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def resolve_kernel(kernel: str, device: torch.device | str):
    """``(name, paged_attention)`` for the ``sparse.kernel`` setting on ``device``.

    Raises
    ------
    KernelUnavailable
        Naming ``sparse.kernel``, when the choice cannot run here.
    """
    cuda = torch.device(device).type == "cuda"
    if kernel == "auto":
        kernel = ("flashinfer" if cuda and _has("flashinfer") else
                  "triton" if cuda and _has("triton") else "torch")
    if kernel == "torch":
        return "torch", TorchPagedDecode()
    if kernel == "flashinfer":
        if not (cuda and _has("flashinfer")):
            raise KernelUnavailable(
                f"sparse.kernel: flashinfer needs a CUDA device and the flashinfer package; "
                f"this server runs on {device} (use auto or torch)")
        from sgl_kvtier.sparse.flashinfer_decode import FlashInferDecode
        return "flashinfer", FlashInferDecode(torch.device(device))
    if kernel == "triton":
        if not _has("triton"):
            raise KernelUnavailable("sparse.kernel: triton is not installed (use auto)")
        from sgl_kvtier.sparse.triton_ops import paged_decode_triton
        if not cuda:
            log.warning("sgl_kvtier: sparse.kernel triton on %s runs in Triton's "
                        "interpreter (correct, very slow)", device)
        return "triton", paged_decode_triton
    raise KernelUnavailable(f"sparse.kernel: unknown kernel {kernel!r}")


def resolve_ops(kernel: str, device: torch.device | str) -> TorchOps:
    """The step operations for the ``sparse.kernel`` setting on ``device``: Triton on a
    CUDA device with Triton (unless the setting is ``torch``), PyTorch elsewhere."""
    cuda = torch.device(device).type == "cuda"
    return TritonOps() if cuda and kernel != "torch" and _has("triton") else TorchOps()
