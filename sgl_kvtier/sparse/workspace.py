"""The device buffers sparse decode attends over: one region of slots per (request, KV head).

A region holds ``[sink | outliers | local window | selected chunks]`` of one KV head, for
every layer at the same offsets, so a decode step's page table is the same for all layers
(planned once, run per layer). Slot ``t`` of layer ``l`` is ``k[l, t]`` / ``v[l, t]``, each
``(D,)``: the buffers seen as ``(slots, 1, D)`` are a paged KV cache with pages of one token
and one KV head, which is what FlashInfer's batch decode reads with the KV heads flattened
into the batch.
"""

from __future__ import annotations

import bisect

import torch

__all__ = ["SparseWorkspace", "WorkspaceFull"]


class WorkspaceFull(RuntimeError):
    """No free run of slots is long enough for a new region."""


class SparseWorkspace:
    """Per-layer K/V slot buffers and a first-fit allocator of contiguous regions.

    Parameters
    ----------
    num_layers, head_dim : int
        ``L`` and ``D``.
    slots : int
        Capacity in slots, shared by all regions.
    dtype, device
        Of the buffers.
    """

    def __init__(self, num_layers: int, head_dim: int, slots: int,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu"):
        self.k = torch.zeros(num_layers, slots, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.slots = slots
        self._free: list[tuple[int, int]] = [(0, slots)]  # sorted (start, length)
        self._used: dict[int, int] = {}

    @property
    def used_slots(self) -> int:
        return sum(self._used.values())

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def allocate(self, length: int) -> int:
        """Start of a free region of ``length`` slots; raises :class:`WorkspaceFull`."""
        for i, (start, size) in enumerate(self._free):
            if size >= length:
                if size == length:
                    del self._free[i]
                else:
                    self._free[i] = (start + length, size - length)
                self._used[start] = length
                return start
        raise WorkspaceFull(f"sparse workspace: no {length} free consecutive slots "
                            f"({self.slots - self.used_slots} of {self.slots} free)")

    def release(self, start: int) -> None:
        """Return the region that :meth:`allocate` gave at ``start``."""
        length = self._used.pop(start)
        i = bisect.bisect(self._free, (start, length))
        self._free.insert(i, (start, length))
        # Coalesce with the neighbours so long regions fit again.
        if i + 1 < len(self._free) and start + length == self._free[i + 1][0]:
            self._free[i] = (start, length + self._free.pop(i + 1)[1])
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == start:
            prev = self._free.pop(i - 1)
            self._free[i - 1] = (prev[0], prev[1] + self._free[i - 1][1])
