"""The embedded model in plain transformers, its attention routed through a function of
ours: for offline diagnostics that read or change each layer's post-RoPE queries, keys and
values, which SGLang's kernels do not expose.

Attention functions take transformers' signature: ``(module, query, key, value,
attention_mask, **kwargs) -> (out, weights)`` with ``query (B, H_q, T, D)`` and ``key,
value (B, H, T, D)`` (post-RoPE; with a cache, every token so far), ``out (B, T, H_q, D)``;
``module.layer_idx`` names the layer.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch

from sgl_kvtier.sparse.budget import SparsePlan
from sgl_kvtier.sparse.ops import rebuild_keys
from sgl_kvtier.sparse.rope import Rotary, rotary_from_config
from sgl_kvtier.sparse.state import LayerState

__all__ = ["load_with_attention", "sdpa", "rebuilt_middle", "add_sample_arguments",
           "needle_samples"]


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


def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that pick the forced-question needle samples (defaults: those of
    ``eval/configs/sparse_forced_needle.yaml``) and the budget floor."""
    parser.add_argument("--tasks", nargs="+",
                        default=["niah_single_1", "niah_single_2", "niah_single_3"],
                        help="RULER niah tasks (default: niah_single_1/2/3)")
    parser.add_argument("--length", type=int, default=4096, help="prompt tokens (default 4096)")
    parser.add_argument("--samples", type=int, default=6, help="samples per task (default 6)")
    parser.add_argument("--seed", type=int, default=42, help="RULER seed (default 42, as the "
                        "eval configs)")
    parser.add_argument("--budget-min-tokens", type=int, default=32,
                        help="budget floor in tokens (default 32, as sparse_forced_needle.yaml)")


def needle_samples(tokenizer, args: argparse.Namespace) -> list:
    """The RULER samples those flags name, in task order."""
    from sgl_kvtier.eval.ruler import generate

    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return [s for task in args.tasks
            for s in generate(task, count, args.length, args.samples, args.seed, 24)]
