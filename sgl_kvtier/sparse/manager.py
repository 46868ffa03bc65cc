"""Sparse decode's bookkeeping for a server: which requests are sparse, shared prompt
states, the workspace, and the counters the server reports.

No SGLang here: the adapter (``patches/sparse_backend.py``) tells the manager what it sees
(a request's id, its tokens, a way to read its KV from the pool) and asks for a
:class:`SparseStep` per decode batch.

Prompt states are shared by content: two requests whose first ``plan.shared`` tokens are
equal (the same document, with a question in the local window) get the same
:class:`LayerState` list, built once. A state lives while a request uses it, plus in a
small cache of recently released ones, so a request that arrives right after another with
the same document reuses it too.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from sgl_kvtier.config import SparseConfig
from sgl_kvtier.sparse.budget import SparsePlan, plan_for
from sgl_kvtier.sparse.decode import PagedAttention, SparseStep
from sgl_kvtier.sparse.host_memory import usable_memory
from sgl_kvtier.sparse.paged import TorchPagedDecode
from sgl_kvtier.sparse.request import SparseRequest, StepStats
from sgl_kvtier.sparse.rope import Rotary
from sgl_kvtier.sparse.state import LayerState, build_layer_state
from sgl_kvtier.sparse.step_ops import TorchOps
from sgl_kvtier.sparse.workspace import SparseWorkspace, WorkspaceFull

__all__ = ["SparseManager", "SparseCounters"]

log = logging.getLogger("sgl_kvtier")

# (layer) -> (k, v), each (T, H, D): the request's prompt KV as the pool holds it.
ReadLayer = Callable[[int], tuple[torch.Tensor, torch.Tensor]]

_KEEP_RELEASED = 4  # unreferenced prompt states kept for a request that comes right after


@dataclass
class SparseCounters:
    """What ``/get_server_info`` and the Prometheus metrics show."""

    requests: int = 0
    active: int = 0
    shared_hits: int = 0
    pool_tokens_released: int = 0
    refused_workspace_full: int = 0
    refused_host_memory: int = 0
    steps: int = 0  # decode batches with sparse rows
    request_steps: int = 0  # sparse rows over those batches: tokens decoded sparsely
    build_seconds: float = 0.0
    finished: StepStats = field(default_factory=StepStats)


@dataclass
class _Shared:
    layers: list[LayerState]
    users: int = 0

    def host_bytes(self) -> int:
        return sum(s.host_bytes() for s in self.layers)

    def device_bytes(self) -> int:
        return sum(sum(s.nbytes().values()) - s.host_bytes() for s in self.layers)


class SparseManager:
    """Sparse requests of one server (one model, one device).

    Parameters
    ----------
    config : SparseConfig
        The ``sparse`` section; its device-dependent defaults resolve for ``device``.
    rotary : Rotary
        The model's rotation.
    num_layers, num_kv_heads, head_dim : int
        The attention shape.
    workspace_slots : int
        Capacity of the shared workspace: slots of one token and one KV head (the buffers
        are ``(num_layers, slots, head_dim)``, keys and values).
    dtype, device
        Of the device-side buffers.
    attend : PagedAttention, optional
        The paged decode (see :func:`sgl_kvtier.sparse.backend.resolve_kernel`); PyTorch
        when not given.
    ops : TorchOps or TritonOps, optional
        The requests' other step operations (:func:`sgl_kvtier.sparse.backend.resolve_ops`);
        PyTorch when not given.
    """

    def __init__(self, config: SparseConfig, rotary: Rotary, num_layers: int,
                 num_kv_heads: int, head_dim: int, workspace_slots: int,
                 dtype: torch.dtype, device: torch.device | str,
                 attend: PagedAttention | None = None, ops: TorchOps | None = None):
        self.device = torch.device(device)
        self.config, self.rotary = config.resolved(self.device.type), rotary
        self.shape = (num_layers, num_kv_heads, head_dim)
        self.workspace = SparseWorkspace(num_layers, head_dim, workspace_slots, dtype, device)
        self.dtype = dtype
        self.host_memory = (self.config.host_memory if self.config.host_memory is not None
                            else usable_memory() // 2)
        self.attend = TorchPagedDecode() if attend is None else attend
        self.ops = TorchOps() if ops is None else ops
        self.requests: dict[str, SparseRequest] = {}
        self._keys: dict[str, str] = {}
        self._shared: OrderedDict[str, _Shared] = OrderedDict()
        self.counters = SparseCounters()
        self.exact_heads = exact_heads_by_layer(self.config.exact_score_heads, num_layers,
                                                num_kv_heads)

    def wants(self, context: int) -> bool:
        """Whether a request with ``context`` tokens before its current one goes sparse."""
        return context >= self.config.min_context_tokens

    def plan(self, context: int, budget: float | None = None) -> SparsePlan:
        """Sizes for a ``context``-token prompt; ``budget`` replaces ``budget_fraction``."""
        config = self.config if budget is None else self.config.model_copy(
            update={"budget_fraction": budget})
        return plan_for(config, context, self.shape[1], self.shape[2])

    def convert(self, rid: str, tokens: Sequence[int], read_layer: ReadLayer,
                scope: str = "", budget: float | None = None) -> bool:
        """Make request ``rid`` sparse over its ``len(tokens)`` tokens so far.

        ``scope`` is the request's tenant (its LoRA / extra key and cache salt, as the NVMe
        tier's namespaces): only requests of one scope share a prompt state, so a shared
        (faster) conversion never tells one tenant what another sent. ``budget`` is the
        request's own ``budget_fraction`` (None: the server's): it sizes the selection only,
        so requests at different budgets share one prompt state.

        Returns False (the request stays dense) when the workspace has no room for it, or
        host memory (``sparse.host_memory``) none for a new prompt state.
        """
        start = time.perf_counter()
        plan = self.plan(len(tokens), budget)
        key = _key(tokens[:plan.shared], plan, scope)
        shared = self._shared.get(key)
        if shared is None and not self._host_room(rid, plan):
            return False
        built, local, exact = self._read_layers(read_layer, plan, build=shared is None)
        if shared is None:
            shared = _Shared(built)
        else:
            self.counters.shared_hits += 1
        try:
            request = SparseRequest(shared.layers, plan, self.workspace, self.rotary, local,
                                    exact, self.ops)
        except WorkspaceFull as e:
            self.counters.refused_workspace_full += 1
            log.warning("sgl_kvtier: sparse decode: request %s stays dense: %s", rid, e)
            return False
        self._shared[key] = shared
        self._shared.move_to_end(key)
        shared.users += 1
        self.requests[rid], self._keys[rid] = request, key
        c = self.counters
        c.requests += 1
        c.active = len(self.requests)
        c.build_seconds += time.perf_counter() - start
        self._trim()
        return True

    def _read_layers(self, read_layer: ReadLayer, plan: SparsePlan, build: bool) -> tuple:
        """Per layer: its new state (``build``), the request's own tokens past the shared
        part, and a dense layer's whole prompt. One layer's prompt KV is read at a time and
        only copies are kept: all layers at once would be a transient copy of the whole
        prompt beside the pool (16 GiB at 128k tokens of Llama-3.1-8B shapes)."""
        bounds = self.config.selection == "bound"
        built, local, exact = [], [], []
        for layer in range(self.shape[0]):
            k, v = read_layer(layer)
            if build:
                built.append(build_layer_state(k, v, plan, self.rotary, self.device,
                                               bounds=bounds,
                                               exact_heads=self.exact_heads.get(layer, ())))
            local.append((k[plan.shared:].clone(), v[plan.shared:].clone()))
            if layer < self.config.dense_layers:
                exact.append((k.transpose(0, 1).to(self.device).contiguous(),
                              v.transpose(0, 1).to(self.device).contiguous()))
            del k, v
        return built, local, exact

    def finish(self, rid: str) -> None:
        """Request ``rid`` ended (or left sparse decode): free its region, unshare."""
        request = self.requests.pop(rid, None)
        if request is None:
            return
        request.release()
        self.counters.finished.add(request.stats)
        shared = self._shared[self._keys.pop(rid)]
        shared.users -= 1
        self.counters.active = len(self.requests)
        self._trim()

    def step(self, rids: Sequence[str]) -> SparseStep:
        """The decode step of these sparse requests, in this order."""
        self.counters.steps += 1
        self.counters.request_steps += len(rids)
        return SparseStep([self.requests[r] for r in rids], self.attend)

    def host_bytes(self) -> int:
        return sum(s.host_bytes() for s in self._shared.values())

    def device_bytes(self) -> int:
        """Shared states on the device, the workspace buffers and the dense layers' copies."""
        return (sum(s.device_bytes() for s in self._shared.values()) + self.workspace.nbytes()
                + sum(r.prompt_kv_bytes() for r in self.requests.values()))

    def report(self) -> dict:
        """Counters and sizes for ``/get_server_info``."""
        c = self.counters
        total = StepStats()
        total.add(c.finished)
        for request in self.requests.values():
            total.add(request.stats)
        return {"requests": c.requests, "active": c.active, "shared_state_hits": c.shared_hits,
                "pool_tokens_released": c.pool_tokens_released,
                "refused_workspace_full": c.refused_workspace_full,
                "refused_host_memory": c.refused_host_memory, "host_memory": self.host_memory,
                "states": len(self._shared), "host_bytes": self.host_bytes(),
                "device_bytes": self.device_bytes(),
                "workspace_used_slots": self.workspace.used_slots,
                "workspace_slots": self.workspace.slots, "decode_steps": c.steps,
                "request_steps": c.request_steps,
                "selection_seconds": round(total.select_seconds, 4),
                "build_seconds": round(c.build_seconds, 4),
                "selected_chunks": total.selected_chunks, "missed_chunks": total.missed_chunks,
                "exact_scored": total.exact_scored,
                "hit_rate": round(total.hit_rate, 4), "gathered_bytes": total.gathered_bytes,
                "gathered_bytes_per_step": total.gathered_bytes // max(c.steps, 1)}

    def state_host_bytes(self, plan: SparsePlan) -> int:
        """Host bytes of a new prompt state under ``plan``: the middle's values, and its
        keys too with exact keys (``plan.exact_keys``)."""
        layers, heads, head_dim = self.shape
        per_token = heads * head_dim * self.dtype.itemsize * (2 if plan.exact_keys else 1)
        return layers * plan.middle * per_token

    def _host_room(self, rid: str, plan: SparsePlan) -> bool:
        """Whether a new state fits ``host_memory``, after dropping the released states
        kept for reuse (oldest first); counts and reports a refusal."""
        need = self.state_host_bytes(plan)
        idle = [k for k, s in self._shared.items() if s.users == 0]
        in_use = self.host_bytes() - sum(self._shared[k].host_bytes() for k in idle)
        if in_use + need <= self.host_memory:
            for key in idle:
                if self.host_bytes() + need <= self.host_memory:
                    break
                del self._shared[key]
            return True
        self.counters.refused_host_memory += 1
        # Under a burst of long prompts every one would be refused: say it once, count all.
        level = logging.WARNING if self.counters.refused_host_memory == 1 else logging.DEBUG
        log.log(level, "sgl_kvtier: sparse decode: request %s stays dense: its prompt state "
                "needs %.1f MiB of host memory and %.1f of sparse.host_memory's %.1f MiB are "
                "held by running requests (further refusals are counted in "
                "refused_host_memory)", rid, need / 2**20, in_use / 2**20,
                self.host_memory / 2**20)
        return False

    def _trim(self) -> None:
        idle = [k for k, s in self._shared.items() if s.users == 0]
        for key in idle[:max(0, len(idle) - _KEEP_RELEASED)]:
            del self._shared[key]


def exact_heads_by_layer(pairs: Sequence[tuple[int, int]], num_layers: int,
                         num_kv_heads: int) -> dict[int, tuple[int, ...]]:
    """``sparse.exact_score_heads`` as ``{layer: KV heads}``, checked against the model."""
    out: dict[int, set[int]] = {}
    for layer, head in pairs:
        if layer >= num_layers or head >= num_kv_heads:
            raise ValueError(
                f"sparse.exact_score_heads: [{layer}, {head}] is not a (layer, KV head) of "
                f"this model ({num_layers} layers, {num_kv_heads} KV heads)")
        out.setdefault(layer, set()).add(head)
    return {layer: tuple(sorted(heads)) for layer, heads in out.items()}


def _key(tokens: Sequence[int], plan: SparsePlan, scope: str) -> str:
    ids = np.asarray(tokens, dtype=np.int64).tobytes()
    shape = f"{plan.shared}:{plan.sink}:{plan.chunk}:{plan.rank}:{plan.outlier_chunks}:"
    # The scope goes last, after a separator the shape never contains: it cannot shift
    # into the token bytes or the shape (both are fixed in length for one plan).
    return hashlib.blake2b(ids + shape.encode() + scope.encode(), digest_size=16).hexdigest()
