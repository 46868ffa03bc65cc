"""One decoding request's view of a (possibly shared) sparse prefix state.

The prefix state (:class:`LayerState` per layer) is immutable and may serve several
requests; what is per request is its workspace region and which chunks it holds there.
Each step, a chunk already held from the last step keeps its slot (its rebuilt key and
fetched value are reused, ShadowKV's cache hit); only the new chunks are rebuilt and
fetched, into the slots the dropped chunks leave.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields

import torch

from sgl_kvtier.sparse.budget import SparsePlan
from sgl_kvtier.sparse.rope import Rotary
from sgl_kvtier.sparse.select import select_chunks
from sgl_kvtier.sparse.state import LayerState
from sgl_kvtier.sparse.step_ops import TorchOps
from sgl_kvtier.sparse.workspace import SparseWorkspace

__all__ = ["SparseRequest", "StepStats", "assign_slots"]


@dataclass
class StepStats:
    """Counters summed over layers and steps."""

    selected_chunks: int = 0
    missed_chunks: int = 0
    gathered_bytes: int = 0
    select_seconds: float = 0.0

    def add(self, other: StepStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    @property
    def hit_rate(self) -> float:
        return 1 - self.missed_chunks / self.selected_chunks if self.selected_chunks else 0.0


class SparseRequest:
    """Workspace region and selection state of one request.

    Parameters
    ----------
    layers : list of LayerState
        The prompt's state, one per layer (shared, never written).
    plan : SparsePlan
        Its sizes.
    workspace : SparseWorkspace
        Where this request's ``H`` regions of ``plan.dense + plan.selected`` slots go.
    rotary : Rotary
        The model's rotation, to rebuild keys at their positions.
    local : list of (k, v)
        Per layer, ``(plan.local, H, D)`` post-RoPE keys and values of the prompt's last
        tokens (the request's own, never shared).
    prompt_kv : list of (k, v), optional
        For each of the first layers that attend densely, ``(H, T, D)`` post-RoPE keys and
        values of the whole prompt (the request's own copy; those layers never select).
    ops : TorchOps or TritonOps
        Who scores chunks and writes missed chunks into the workspace (default PyTorch).
    """

    def __init__(self, layers: list[LayerState], plan: SparsePlan, workspace: SparseWorkspace,
                 rotary: Rotary, local: list[tuple[torch.Tensor, torch.Tensor]],
                 prompt_kv: list[tuple[torch.Tensor, torch.Tensor]] = (),
                 ops: TorchOps | None = None):
        self.layers, self.plan, self.workspace, self.rotary = layers, plan, workspace, rotary
        self.ops = TorchOps() if ops is None else ops
        self.prompt_kv = list(prompt_kv)
        self.heads = layers[0].sv.shape[0]
        self.region = plan.dense + plan.selected
        self.base = workspace.allocate(self.heads * self.region)
        device = workspace.k.device
        self.starts = self.base + self.region * torch.arange(self.heads, device=device)
        self.held = torch.full((len(layers), self.heads, plan.selected_chunks), -1,
                               dtype=torch.long, device=device)
        self.stats = StepStats()
        for index, (state, (k, v)) in enumerate(zip(layers, local, strict=True)):
            assert k.shape[0] == plan.local, (k.shape, plan.local)
            self._write_dense(index, state, k, v)

    def prompt_kv_bytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.prompt_kv)

    def release(self) -> None:
        """Give the workspace region back (the request finished or went dense)."""
        self.workspace.release(self.base)

    def _write_dense(self, layer: int, state: LayerState, local_k: torch.Tensor,
                     local_v: torch.Tensor) -> None:
        dev = state.sink_k.device
        local_k = local_k.transpose(0, 1).to(device=dev, dtype=state.sink_k.dtype)
        local_v = local_v.transpose(0, 1).to(device=dev, dtype=state.sink_v.dtype)
        k = torch.cat([state.sink_k, state.outlier_k, local_k], dim=1)  # [H, dense, D]
        v = torch.cat([state.sink_v, state.outlier_v, local_v], dim=1)
        slots = self.starts[:, None] + torch.arange(self.plan.dense, device=self.starts.device)
        self.workspace.k[layer, slots] = k.to(self.workspace.k.dtype)
        self.workspace.v[layer, slots] = v.to(self.workspace.v.dtype)

    def step(self, layer: int, q: torch.Tensor, scale: float) -> None:
        """Select this step's chunks for ``layer`` and bring the workspace up to date.

        Parameters
        ----------
        q : torch.Tensor
            ``(H_q, D)`` the request's post-RoPE query at this layer.
        """
        state = self.layers[layer]
        start = time.perf_counter()
        chunks = select_chunks(self.ops.scores(q, state, scale), self.plan.selected_chunks)
        self.stats.select_seconds += time.perf_counter() - start
        self.refresh(layer, chunks)

    def refresh(self, layer: int, chunks: torch.Tensor) -> None:
        """Hold exactly ``chunks (H, k)`` in ``layer``'s selected slots."""
        state, c = self.layers[layer], self.plan.chunk
        self.stats.selected_chunks += chunks.numel()
        held = self.held[layer]
        if torch.equal(held.sort(dim=1).values, chunks):
            return  # the common step: the chunks of last step, all in place
        slot, miss = assign_slots(held, chunks)
        held.scatter_(1, slot, chunks)
        heads, j = miss.nonzero(as_tuple=True)
        ids, where = chunks[heads, j], slot[heads, j]
        self.stats.missed_chunks += ids.numel()
        if ids.numel() == 0:
            return
        first = self.starts[heads] + self.plan.dense + where * c  # [m]
        ws = self.workspace
        self.stats.gathered_bytes += self.ops.write_chunks(
            ws.k[layer], ws.v[layer], first, state, heads, ids, c, self.rotary)


def assign_slots(held: torch.Tensor, chunks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots for this step's chunks, keeping every chunk held last step where it is.

    Parameters
    ----------
    held : torch.Tensor
        ``(H, k)`` chunk id in each slot, -1 for empty.
    chunks : torch.Tensor
        ``(H, k)`` this step's chunk ids, distinct within a row.

    Returns
    -------
    slot : torch.Tensor
        ``(H, k)`` int64, the slot of each chunk (a permutation of ``0..k-1`` per row).
    miss : torch.Tensor
        ``(H, k)`` bool, True where the chunk was not held (it must be rebuilt).
    """
    sorted_held, order = held.sort(dim=1)
    pos = torch.searchsorted(sorted_held, chunks).clamp(max=held.shape[1] - 1)
    hit = sorted_held.gather(1, pos) == chunks
    hit_slot = order.gather(1, pos)
    # A slot is kept if some hit lands in it (misses add zero to slot 0).
    kept = torch.zeros_like(chunks).scatter_add(1, torch.where(hit, hit_slot, 0),
                                                hit.long()) > 0
    # Free slots in ascending order go to the misses in order; counts match per row.
    free = torch.argsort(kept.int(), dim=1, stable=True)
    misses = torch.argsort(hit.int(), dim=1, stable=True)
    slot = torch.empty_like(chunks).scatter(1, misses, free)
    return torch.where(hit, hit_slot, slot), ~hit
