"""The per-layer work of a sparse request besides attention: score the chunks, and bring
the chunks it did not hold last step into its workspace slots.

:class:`TorchOps` runs the PyTorch references (:mod:`sgl_kvtier.sparse.select`,
:mod:`sgl_kvtier.sparse.ops`) on any device: keys are rebuilt into a temporary, values are
gathered where they live (host memory) and both are copied into the slots. With exact keys
(``keys: exact``) the keys are gathered like the values instead of rebuilt.
:class:`TritonOps` runs the kernels instead (CUDA): keys are rebuilt straight into their
slots and values are read from pinned host memory in place, so neither passes through a
temporary. Both leave the same bytes in the workspace (keys up to rounding).
"""

from __future__ import annotations

import torch

from sgl_kvtier.sparse.ops import gather_values, rebuild_keys
from sgl_kvtier.sparse.rope import Rotary
from sgl_kvtier.sparse.select import bound_scores, chunk_scores, exact_scores
from sgl_kvtier.sparse.state import LayerState

__all__ = ["TorchOps", "TritonOps", "with_exact_heads"]


class TorchOps:
    """The PyTorch step operations (the references)."""

    name = "torch"

    def scores(self, q: torch.Tensor, state: LayerState, scale: float) -> torch.Tensor:
        """``q (H_q, D)`` -> ``(H, N)`` chunk scores (landmarks, or bounds when kept; the
        exact-score heads from their keys)."""
        if state.bounds is not None:
            scores = bound_scores(q, state.bounds, state.selectable, scale)
        else:
            scores = self.landmark_scores(q, state, scale)
        return with_exact_heads(scores, q, state, scale)

    def landmark_scores(self, q: torch.Tensor, state: LayerState, scale: float) -> torch.Tensor:
        return chunk_scores(q, state.landmarks, state.selectable, scale)

    def write_chunks(self, k_out: torch.Tensor, v_out: torch.Tensor, first: torch.Tensor,
                     state: LayerState, heads: torch.Tensor, chunks: torch.Tensor,
                     chunk: int, rotary: Rotary) -> int:
        """Rebuild and fetch whole chunks into workspace slots.

        Parameters
        ----------
        k_out, v_out : torch.Tensor
            ``(slots, D)`` one layer of the workspace.
        first : torch.Tensor
            ``(m,)`` int64, the first slot of each chunk (its ``C`` tokens follow).
        heads, chunks : torch.Tensor
            ``(m,)`` int64, KV head and chunk id of each.

        Returns
        -------
        int
            Bytes fetched from the host store (values, and keys when exact).
        """
        slots = (first[:, None] + torch.arange(chunk, device=first.device)).flatten()
        host = state.values.device
        values = gather_values(state.values, heads.to(host), chunks.to(host))
        if state.keys is None:
            keys, fetched = rebuild_keys(state.u, state.sv, heads, chunks, chunk, state.start,
                                         rotary), 0
        else:
            keys = gather_values(state.keys, heads.to(host), chunks.to(host))
            fetched = keys.numel() * keys.element_size()
        k_out[slots] = keys.flatten(0, 1).to(k_out)
        v_out[slots] = values.flatten(0, 1).to(v_out)
        return fetched + values.numel() * values.element_size()


def with_exact_heads(scores: torch.Tensor, q: torch.Tensor, state: LayerState,
                     scale: float) -> torch.Tensor:
    """``scores (H, N)`` with the rows of ``state.exact_heads`` replaced by their exact-key
    scores (:func:`~sgl_kvtier.sparse.select.exact_scores`; ``q (H_q, D)``)."""
    if state.exact_heads is None:
        return scores
    heads = state.exact_heads
    q = q.view(scores.shape[0], -1, q.shape[-1])[heads]  # [E, G, D]
    exact = exact_scores(q, state.exact_keys, state.selectable[heads], scale)
    return scores.index_copy(0, heads, exact.to(scores.dtype))


class TritonOps(TorchOps):
    """The Triton kernels: landmark scores (``selection: bound`` scores stay in PyTorch),
    rebuild and fetch. On an H200 at 128k, per request and layer: scores 0.12 ms against
    PyTorch's 0.28, rebuild 0.17 against 0.57, fetch from pinned memory 0.09 against 1.10
    (docs/results/sparse-gpu)."""

    name = "triton"

    def landmark_scores(self, q: torch.Tensor, state: LayerState, scale: float) -> torch.Tensor:
        from sgl_kvtier.sparse.triton_ops import chunk_scores_triton
        return chunk_scores_triton(q, state.landmarks, state.selectable, scale)

    def write_chunks(self, k_out: torch.Tensor, v_out: torch.Tensor, first: torch.Tensor,
                     state: LayerState, heads: torch.Tensor, chunks: torch.Tensor,
                     chunk: int, rotary: Rotary) -> int:
        from sgl_kvtier.sparse.triton_ops import gather_values_into, rebuild_keys_into
        if state.keys is None:
            rebuild_keys_into(k_out, first, state.u, state.sv, heads, chunks, chunk,
                              state.start, rotary)
        else:  # the value gather moves any (H, N, C, D) rows: the exact keys too
            gather_values_into(k_out, first, state.keys, heads, chunks)
        gather_values_into(v_out, first, state.values, heads, chunks)
        per_chunk = chunk * state.values.shape[-1] * state.values.element_size()
        return chunks.numel() * per_chunk * (1 if state.keys is None else 2)
