"""What a sparse request keeps, in bytes by buffer, against the dense KV it replaces.

Counted from the implementation's own buffers: one layer's state is really built (random
keys and values of the model's shape; the sizes do not depend on the values) and its
tensors' bytes are read, then multiplied by the number of layers. The workspace region a
request holds per layer is counted too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sgl_kvtier.config import SparseConfig
from sgl_kvtier.sparse.budget import SparsePlan, plan_for
from sgl_kvtier.sparse.rope import Rotary, inv_freq
from sgl_kvtier.sparse.state import HOST_BUFFERS, build_layer_state

__all__ = ["MemoryReport", "measure_memory"]


@dataclass(frozen=True)
class MemoryReport:
    """Per-request bytes over all layers.

    Attributes
    ----------
    device : dict
        Buffer name -> device bytes (the shared state's buffers and ``workspace``).
    host : int
        Values (and exact keys) off the device.
    dense : int
        The dense KV of the same prompt (keys and values, every layer).
    """

    plan: SparsePlan
    layers: int
    device: dict[str, int]
    host: int
    dense: int

    @property
    def device_total(self) -> int:
        return sum(self.device.values())

    @property
    def saving(self) -> float:
        """Dense KV bytes per sparse device byte."""
        return self.dense / self.device_total


def measure_memory(config: SparseConfig, context: int, layers: int, num_kv_heads: int,
                   head_dim: int, dtype: torch.dtype = torch.bfloat16,
                   seed: int = 0, device: str = "cuda") -> MemoryReport:
    """Build one layer's state at these shapes on CPU and count its bytes.

    Parameters
    ----------
    context : int
        Prompt tokens.
    layers, num_kv_heads, head_dim : int
        The model's attention shape (e.g. Llama-3.1-8B: 32, 8, 128).
    device : str
        The server's device whose defaults ``config`` resolves to (the count is of device
        memory at scale: a GPU's by default).
    """
    config = config.resolved(device)
    plan = plan_for(config, context, num_kv_heads, head_dim)
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(plan.shared, num_kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(plan.shared, num_kv_heads, head_dim, generator=gen).to(dtype)
    rotary = Rotary(head_dim, inv_freq(head_dim, 500000.0))
    state = build_layer_state(k, v, plan, rotary, bounds=config.selection == "bound")
    per_layer = {name: n for name, n in state.nbytes().items() if name not in HOST_BUFFERS}
    element = torch.empty((), dtype=dtype).element_size()
    # Region: [sink | outliers | local | selected] keys and values per KV head; the
    # selection bookkeeping (held chunk ids) is int64 per selected chunk.
    per_layer["workspace"] = 2 * num_kv_heads * (plan.dense + plan.selected) * head_dim * element
    per_layer["held"] = num_kv_heads * plan.selected_chunks * 8
    dense = 2 * context * num_kv_heads * head_dim * element
    return MemoryReport(plan=plan, layers=layers,
                        device={name: b * layers for name, b in per_layer.items()},
                        host=state.host_bytes() * layers, dense=dense * layers)
