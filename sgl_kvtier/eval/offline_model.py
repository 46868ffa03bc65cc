"""The embedded model in plain transformers, its attention routed through a function of
ours: for offline diagnostics that read or change each layer's post-RoPE queries, keys and
values, which SGLang's kernels do not expose.

Attention functions take transformers' signature: ``(module, query, key, value,
attention_mask, **kwargs) -> (out, weights)`` with ``query (B, H_q, T, D)`` and ``key,
value (B, H, T, D)`` (post-RoPE; with a cache, every token so far), ``out (B, T, H_q, D)``;
``module.layer_idx`` names the layer.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import torch

from sgl_kvtier.sparse.budget import SparsePlan
from sgl_kvtier.sparse.ops import rebuild_keys
from sgl_kvtier.sparse.rope import Rotary, rotary_from_config
from sgl_kvtier.sparse.state import LayerState

__all__ = ["load_with_attention", "sdpa", "rebuilt_middle"]


def load_with_attention(name: str, attend: Callable, model: str = "smollm2"):
    """``(model, tokenizer, rotary)``: the embedded ``model`` in float32, every attention
    layer calling ``attend`` (registered with transformers as ``name``)."""
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer

    from sgl_kvtier.harness.models import model_path

    path = model_path(model)
    AttentionInterface.register(name, attend)
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                  attn_implementation=name)
    config = json.loads((path / "config.json").read_text())
    return loaded.eval(), AutoTokenizer.from_pretrained(path), rotary_from_config(config)


def sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' own attention, for the calls an attention function leaves alone."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def rebuilt_middle(state: LayerState, plan: SparsePlan, rotary: Rotary) -> torch.Tensor:
    """``(H, M, D)`` float32: every middle key as sparse decode attends it, rebuilt from the
    low-rank factors by the server's own :func:`rebuild_keys`."""
    h = state.sv.shape[0]
    heads = torch.arange(h).repeat_interleave(plan.chunks)
    chunks = torch.arange(plan.chunks).repeat(h)
    keys = rebuild_keys(state.u, state.sv, heads, chunks, plan.chunk, state.start, rotary)
    return keys.view(h, plan.middle, -1)
