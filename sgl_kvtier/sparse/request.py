"""One decoding request's view of a (possibly shared) sparse prefix state.

The prefix state (:class:`LayerState` per layer) is immutable and may serve several
requests; what is per request is its workspace region and which chunks it holds there.
Each step, a chunk already held from the last step keeps its slot (its rebuilt key and
fetched value are reused, ShadowKV's cache hit); only the new chunks are rebuilt and
fetched, into the slots the dropped chunks leave.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from sgl_kvtier.sparse.batch_select import select_and_refresh
from sgl_kvtier.sparse.budget import SparsePlan
from sgl_kvtier.sparse.rope import Rotary
from sgl_kvtier.sparse.state import LayerState
from sgl_kvtier.sparse.step_ops import TorchOps
from sgl_kvtier.sparse.workspace import SparseWorkspace

__all__ = ["SparseRequest", "StepStats"]


@dataclass
class StepStats:
    """Counters summed over layers and steps."""

    selected_chunks: int = 0
    missed_chunks: int = 0
    gathered_bytes: int = 0
    select_seconds: float = 0.0
    exact_scored: int = 0  # (KV head, layer, step) selections scored from exact keys

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
        """Select this step's chunks for ``layer`` and bring the workspace up to date (a
        batch of one: :func:`~sgl_kvtier.sparse.batch_select.select_and_refresh`).

        Parameters
        ----------
        q : torch.Tensor
            ``(H_q, D)`` the request's post-RoPE query at this layer.
        """
        select_and_refresh([self], layer, q[None], scale)

    def write_missed(self, layer: int, heads: torch.Tensor, chunks: torch.Tensor,
                     where: torch.Tensor) -> None:
        """Rebuild and fetch chunks this request did not hold into their selected slots.

        Parameters
        ----------
        heads, chunks, where : torch.Tensor
            ``(m,)`` int64: KV head, chunk id and selected-slot index of each missed chunk.
        """
        ws = self.workspace
        first = self.starts[heads] + self.plan.dense + where * self.plan.chunk  # [m]
        self.stats.missed_chunks += chunks.numel()
        self.stats.gathered_bytes += self.ops.write_chunks(
            ws.k[layer], ws.v[layer], first, self.layers[layer], heads, chunks,
            self.plan.chunk, self.rotary)
