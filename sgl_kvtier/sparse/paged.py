"""The CSR page table of a sparse decode step, and attention over it in PyTorch.

FlashInfer's batch decode reads, for row ``i``, the pages ``indices[indptr[i]:indptr[i+1]]``
in order, all full except the last, which holds ``last_page_len[i]`` tokens. Sparse decode
gives every KV head of every request its own selection, and FlashInfer gives every row one
page list for all its KV heads, so the KV heads are flattened into the rows: row
``b * H + h`` is KV head ``h`` of request ``b``, with one KV head and the ``G`` query heads
of its group (``q (B, H*G, D)`` viewed as ``(B*H, G, D)``, no copy).

:func:`paged_decode_ref` is the row-by-row reference; :func:`paged_decode` computes the same
in one padded batch; the Triton kernel and FlashInfer read the same arrays. The CPU path
(:class:`TorchPagedDecode`) reads a table whose rows are contiguous spans (what
:func:`region_table` builds) in place, as strided views (:func:`contiguous_runs`), instead of
gathering its tokens: on a 2-core Xeon whose memory is slow to reach, the gather took a third
of an 8k batch-8 step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sgl_kvtier.attention.merge import partial_attention_ref

__all__ = ["PageTable", "region_table", "flatten_queries", "paged_decode", "paged_decode_ref",
           "paged_plan", "contiguous_runs", "strided_decode", "TorchPagedDecode", "row_tokens"]


@dataclass(frozen=True)
class PageTable:
    """A paged KV cache's CSR page table (int32, as FlashInfer takes it).

    Attributes
    ----------
    indptr : torch.Tensor
        ``(R + 1,)`` row ``i``'s pages are ``indices[indptr[i]:indptr[i+1]]``.
    indices : torch.Tensor
        ``(nnz,)`` page ids.
    last_page_len : torch.Tensor
        ``(R,)`` tokens in each row's last page, in ``[1, page_size]``.
    page_size : int
    max_len : int or None
        The longest row's tokens when the builder knew it (kernels that split rows read it
        instead of synchronising with the device to find it).
    """

    indptr: torch.Tensor
    indices: torch.Tensor
    last_page_len: torch.Tensor
    page_size: int
    max_len: int | None = None

    @property
    def rows(self) -> int:
        return self.indptr.numel() - 1

    def lengths(self) -> torch.Tensor:
        """``(R,)`` int64 tokens per row."""
        pages = (self.indptr[1:] - self.indptr[:-1]).long()
        return (pages - 1) * self.page_size + self.last_page_len.long()


def region_table(starts: torch.Tensor, lengths: torch.Tensor | int,
                 page_size: int = 1) -> PageTable:
    """Table of rows that each read consecutive slots: row ``i`` reads ``lengths[i]`` slots
    from ``starts[i]`` (``starts (R,)``; ``lengths`` an int or ``(R,)``).

    With ``page_size > 1`` every start must be a multiple of it (page ``p`` is slots
    ``p*page_size ..``).
    """
    lengths = torch.as_tensor(lengths, device=starts.device).long().expand(starts.shape)
    assert bool((lengths > 0).all()) and bool((starts % page_size == 0).all()), page_size
    pages = -(-lengths // page_size)  # [R]
    indptr = torch.zeros(starts.numel() + 1, dtype=torch.long, device=starts.device)
    indptr[1:] = pages.cumsum(0)
    row = torch.repeat_interleave(torch.arange(starts.numel(), device=starts.device), pages)
    offset = torch.arange(int(indptr[-1]), device=starts.device) - indptr[row]
    indices = starts.long()[row] // page_size + offset
    last = lengths - (pages - 1) * page_size
    return PageTable(indptr.int(), indices.int(), last.int(), page_size,
                     int(lengths.max()) if lengths.numel() else 0)


def row_tokens(table: PageTable, row: int) -> torch.Tensor:
    """Slot ids (``page * page_size + offset``) row ``row`` reads, in order, int64."""
    pages = table.indices[table.indptr[row]:table.indptr[row + 1]].long()
    slots = (pages[:, None] * table.page_size
             + torch.arange(table.page_size, device=pages.device)).flatten()
    return slots[:int(table.lengths()[row])]


def flatten_queries(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``(B, H*G, D) -> (B*H, G, D)``, a view: query heads of a group are adjacent."""
    b, h_q, d = q.shape
    return q.view(b * num_kv_heads, h_q // num_kv_heads, d)


def paged_decode_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     table: PageTable, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each row's queries over its pages, one row at a time.

    Parameters
    ----------
    q : torch.Tensor
        ``(R, G, D)``.
    k_cache, v_cache : torch.Tensor
        ``(slots, D)``: pages of ``page_size`` consecutive slots, one KV head.

    Returns
    -------
    out : torch.Tensor
        ``(R, G, D)`` float32.
    lse : torch.Tensor
        ``(R, G)`` float32, natural-log log-sum-exp of the scaled scores.
    """
    outs, lses = [], []
    for row in range(table.rows):
        slots = row_tokens(table, row)
        o, s = partial_attention_ref(q[row], k_cache[slots], v_cache[slots], scale)
        outs.append(o)
        lses.append(s)
    return torch.stack(outs), torch.stack(lses)


def paged_plan(table: PageTable) -> tuple[torch.Tensor, torch.Tensor]:
    """What :func:`paged_decode` derives from the table alone, once per step rather than
    once per layer: ``slots (R, W)`` int64 (padding reads slot 0) and ``valid (R, W)`` bool,
    ``W`` the longest row."""
    lengths = table.lengths()
    width = int(lengths.max())
    device = table.indices.device
    pages_per_row = -(-width // table.page_size)
    counts = (table.indptr[1:] - table.indptr[:-1]).long()
    page_pos = torch.arange(pages_per_row, device=device)
    gather = (table.indptr[:-1, None].long() + page_pos).clamp(max=table.indices.numel() - 1)
    pages = table.indices.long()[gather]  # [R, P]
    slots = (pages[:, :, None] * table.page_size
             + torch.arange(table.page_size, device=device)).flatten(1)[:, :width]
    valid = torch.arange(width, device=device) < lengths[:, None]
    valid &= (page_pos[:, None].expand(-1, table.page_size).flatten()[:width] < counts[:, None])
    return slots.masked_fill(~valid, 0), valid


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 table: PageTable, scale: float,
                 plan: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`paged_decode_ref` for all rows in one batch (rows padded to the longest);
    ``plan`` is :func:`paged_plan` of ``table`` when the caller kept it."""
    slots, valid = paged_plan(table) if plan is None else plan
    # index_select of the flat slots: several times faster on CPU than k_cache[slots].
    flat = slots.flatten()
    k = k_cache.index_select(0, flat).view(*slots.shape, -1).float()  # [R, W, D]
    v = v_cache.index_select(0, flat).view(*slots.shape, -1).float()
    scores = (q.float() @ k.transpose(1, 2)) * scale  # [R, G, W]
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    lse = scores.logsumexp(-1)
    return (scores - lse[..., None]).exp() @ v, lse


# A run of rows read in place: (first row, rows, first slot, slots between rows' starts,
# tokens per row).
Run = tuple[int, int, int, int, int]


def contiguous_runs(table: PageTable) -> list[Run] | None:
    """The table's rows as runs of strided blocks, or None if a row is not one contiguous
    span of slots.

    Consecutive rows of one length whose starts are evenly spaced form one run (a request's
    KV heads; a whole batch when its regions were allocated one after another).
    """
    pages = table.indices.long().cpu()
    indptr = table.indptr.long().cpu()
    step = pages[1:] - pages[:-1]
    row_end = torch.zeros(step.numel() + 1, dtype=torch.bool)
    row_end[indptr[1:] - 1] = True  # the step after a row's last page starts the next row
    if not bool(((step == 1) | row_end[:-1]).all()):
        return None
    starts = (pages[indptr[:-1]] * table.page_size).tolist()
    runs: list[Run] = []
    for row, (start, width) in enumerate(zip(starts, table.lengths().tolist())):
        if runs:
            first, rows, base, gap, w = runs[-1]
            gap = start - base if rows == 1 else gap
            if w == width and gap > 0 and start == base + rows * gap:
                runs[-1] = (first, rows + 1, base, gap, w)
                continue
        runs.append((row, 1, start, width, width))
    return runs


def strided_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   runs: list[Run], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`paged_decode` over the table that :func:`contiguous_runs` made ``runs`` of,
    reading the caches in place (no gather, no padding); arguments and results as there."""
    outs, lses = [], []
    for row, rows, start, gap, width in runs:
        k, v = (_block(c, start, gap, rows, width) for c in (k_cache, v_cache))
        scores = (q[row:row + rows].float() @ k.float().transpose(1, 2)) * scale  # [n, G, W]
        lse = scores.logsumexp(-1)
        outs.append((scores - lse[..., None]).exp() @ v.float())
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def _block(cache: torch.Tensor, start: int, gap: int, rows: int, width: int) -> torch.Tensor:
    # (rows, width, D) view of cache (slots, D): row r is slots start + r*gap .. + width
    s0, s1 = cache.stride()
    return cache.as_strided((rows, width, cache.shape[1]), (gap * s0, s0, s1),
                            cache.storage_offset() + start * s0)


class TorchPagedDecode:
    """:func:`paged_decode` planned once per table and run per layer (FlashInfer's shape):
    rows that are contiguous spans are read in place (:func:`strided_decode`), others
    gathered."""

    def __init__(self):
        self._table: PageTable | None = None  # held, so a new table is never mistaken for it
        self._runs: list[Run] | None = None
        self._plan: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 table: PageTable, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        if self._table is not table:
            self._table, self._runs = table, contiguous_runs(table)
            self._plan = paged_plan(table) if self._runs is None else None
        if self._runs is not None:
            return strided_decode(q, k_cache, v_cache, self._runs, scale)
        return paged_decode(q, k_cache, v_cache, table, scale, self._plan)
