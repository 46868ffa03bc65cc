"""One sparse decode step over a batch: select, refresh the workspace, attend, merge.

A step is planned once (:class:`SparseStep`: the page table of every (request, KV head)
region) and run per layer. Per layer, the requests select their chunks and bring their
workspace regions up to date, all together (:mod:`sgl_kvtier.sparse.batch_select`); one
paged attention covers every region (``[sink | outliers | local | selected]``: the whole
prompt as the request sees it); the caller's tail (every generated token, which stays in
the KV pool) is attended separately and the two states merge exactly. The tail has no
length limit, so neither has the output.

The first ``dense_layers`` layers (see :class:`SparseRequest`) skip selection and attend
the request's whole prompt exactly instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from sgl_kvtier.attention.merge import partial_attention
from sgl_kvtier.sparse.batch_select import select_and_refresh
from sgl_kvtier.sparse.paged import PageTable, flatten_queries, paged_decode, region_table
from sgl_kvtier.sparse.request import SparseRequest

__all__ = ["SparseStep", "PagedAttention", "merge_tail"]

# (q (R, G, D), k_cache (slots, D), v_cache (slots, D), table, scale) -> (out, lse) float32
PagedAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, PageTable, float],
                          tuple[torch.Tensor, torch.Tensor]]


class SparseStep:
    """One decode step of the sparse requests of a batch.

    Parameters
    ----------
    requests : sequence of SparseRequest
        All on the same workspace.
    attend : PagedAttention
        The paged decode to run per layer (PyTorch, Triton or FlashInfer, same arrays).
    """

    def __init__(self, requests: Sequence[SparseRequest], attend: PagedAttention = paged_decode):
        assert requests, "a sparse step needs at least one sparse request"
        self.requests = list(requests)
        self.workspace = requests[0].workspace
        self.heads = requests[0].heads
        starts = torch.cat([r.starts for r in requests])
        lengths = torch.cat([torch.full((r.heads,), r.region) for r in requests])
        self.table = region_table(starts, lengths.to(starts.device))
        self.attend = attend

    def run(self, layer: int, q: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of ``q (B, H_q, D)`` over each request's sparse prompt state at ``layer``.

        Returns
        -------
        out : torch.Tensor
            ``(B, H_q, D)`` float32.
        lse : torch.Tensor
            ``(B, H_q)`` float32 (natural log).
        """
        if layer < len(self.requests[0].prompt_kv):
            return self._exact(layer, q, scale)
        select_and_refresh(self.requests, layer, q, scale)
        ws = self.workspace
        out, lse = self.attend(flatten_queries(q, self.heads), ws.k[layer], ws.v[layer],
                               self.table, scale)
        return out.view(q.shape[0], q.shape[1], -1), lse.view(q.shape[0], q.shape[1])

    def _exact(self, layer: int, q: torch.Tensor, scale: float):
        h = self.heads
        outs, lses = [], []
        for b, request in enumerate(self.requests):
            k, v = request.prompt_kv[layer]
            out, lse = partial_attention(q[b].view(h, q.shape[1] // h, -1), k, v, scale)
            outs.append(out.reshape(q.shape[1], -1))
            lses.append(lse.reshape(-1))
        return torch.stack(outs), torch.stack(lses)


def merge_tail(q: torch.Tensor, sparse: tuple[torch.Tensor, torch.Tensor],
               tail_k: torch.Tensor, tail_v: torch.Tensor, scale: float) -> torch.Tensor:
    """Merge one request's sparse state with attention over its dense tail.

    Parameters
    ----------
    q : torch.Tensor
        ``(H_q, D)``.
    sparse : (out, lse)
        ``(H_q, D)`` and ``(H_q,)`` from :meth:`SparseStep.run`, this request's row.
    tail_k, tail_v : torch.Tensor
        ``(T, H, D)`` the generated tokens (``T >= 1``: at least the current token).

    Returns
    -------
    torch.Tensor
        ``(H_q, D)`` float32.
    """
    h = tail_k.shape[1]
    g = q.shape[0] // h
    out, lse = partial_attention(q.view(h, g, -1), tail_k.transpose(0, 1),
                                 tail_v.transpose(0, 1), scale)
    # Both parts saw keys (lse finite), so the merge of two states is one weight: the
    # sparse part's share of the total mass, sigmoid(lse_sparse - lse_tail).
    share = torch.sigmoid(sparse[1] - lse.reshape(-1))[:, None]
    return torch.lerp(out.reshape(q.shape[0], -1), sparse[0], share)
