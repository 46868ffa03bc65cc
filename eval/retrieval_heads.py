"""Which KV heads should sparse decode score from their exact keys? A calibration, offline,
with the embedded model run by transformers (CPU, float32).

    .venv/bin/python eval/retrieval_heads.py --out docs/results/retrieval-heads

A few query heads copy from the prompt: at an answer step one of them puts most of its
attention on the needle's few tokens, and when the needle's chunk has an unremarkable mean
key, no landmark finds it and the answer goes wrong (``docs/results/sparse-ruler``). This
script finds those heads on RULER niah samples drawn with a seed of their own (``--seed``,
default 7: not the seed 42 the evaluation runs use, so the heads are not fitted to the
samples they are judged on). Each sample's haystack is the prompt; its question and reference
answer are teacher-forced after it. At every answer step, for every layer, the sparse state
is built by the server's code and the landmark rule picks its chunks per KV head; a query
head *misses* when at least ``--mass`` of its dense attention is on the needle's tokens and
its KV head's selection keeps less than half of that. A KV head is named when one of its
query heads misses in at least ``--min-samples`` samples. The result goes into the server's
file as ``sparse.exact_score_heads``.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch
from sparse_selection_recall import capture, dense_probs, teacher_forced
from tqdm import tqdm

from sgl_kvtier.config import SparseConfig
from sgl_kvtier.eval.offline_model import add_sample_arguments, load_with_attention, needle_samples
from sgl_kvtier.eval.records import provenance
from sgl_kvtier.sparse.budget import SparsePlan, plan_for
from sgl_kvtier.sparse.select import chunk_scores, select_chunks
from sgl_kvtier.sparse.state import build_layer_state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sample_arguments(parser)
    parser.set_defaults(seed=7, samples=4)
    parser.add_argument("--budget", type=float, default=0.06,
                        help="budget fraction the selection runs at (default 0.06)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="whose defaults the state takes: cpu (exact keys, chunks of 4) "
                        "or cuda (low-rank keys, chunks of 8); default cpu")
    parser.add_argument("--mass", type=float, default=0.5,
                        help="needle attention that makes a query head a reader (default 0.5)")
    parser.add_argument("--min-samples", type=int, default=2,
                        help="samples a KV head must miss in to be named (default 2)")
    parser.add_argument("--out", type=Path, help="folder for table.md, heads.yaml, misses.json")
    args = parser.parse_args(argv)
    model, tokenizer, rotary = load_with_attention("kvtier_capture", capture)
    config = SparseConfig(enabled=True, budget_fraction=args.budget,
                          budget_min_tokens=args.budget_min_tokens).resolved(args.device)
    misses: dict[tuple[int, int], list[dict]] = defaultdict(list)
    samples = needle_samples(tokenizer, args)
    for sample in tqdm(samples, desc="samples"):
        run = teacher_forced(model, tokenizer, sample)
        for (layer, head), worst in sample_misses(run, config, rotary, args.mass).items():
            misses[layer, head].append({"task": sample.task, "index": sample.index, **worst})
    named = sorted(key for key, found in misses.items() if len(found) >= args.min_samples)
    table = _table(misses, named, len(samples), args)
    print(table)
    print(heads_yaml(named))
    if args.out:
        _write(args, misses, named, table)
    return 0


def sample_misses(run, config: SparseConfig, rotary, mass: float) -> dict[tuple[int, int], dict]:
    """``{(layer, KV head): worst miss}`` over one sample's answer steps.

    A miss is a query head with ``>= mass`` of its attention on the needle whose KV head's
    landmark selection keeps under half of it; the worst is the one that loses the most
    (``{"step", "query_head", "mass", "kept"}``).
    """
    heads, _, dim = run.k[0].shape
    plan = plan_for(config, run.prompt, heads, dim)
    scale = dim ** -0.5
    first = run.prompt + run.question - 1  # its query writes the first answer token
    steps = torch.arange(first, first + run.answer)
    chunk = (run.needle - plan.sink) // plan.chunk
    inside = (run.needle >= plan.sink) & (run.needle < plan.shared)
    found: dict[tuple[int, int], dict] = {}
    for layer in range(len(run.q)):
        k, v = run.k[layer].transpose(0, 1), run.v[layer].transpose(0, 1)  # (T, H, D)
        q = run.q[layer][:, steps].float()  # (H_q, S, D)
        probs = dense_probs(q, run.k[layer][:, :int(steps[-1]) + 1].float(), steps, scale)
        on = probs[:, :, run.needle[inside]]  # (H_q, S, n)
        if not bool((on.sum(-1) >= mass).any()):
            continue  # no query head reads the needle here: skip building the state
        state = build_layer_state(k[:run.prompt], v[:run.prompt], plan, rotary)
        for i in range(len(steps)):
            kept = needle_kept(q[:, i], on[:, i], state, plan, chunk[inside], scale)
            total = on[:, i].sum(-1)
            for qh in torch.nonzero((total >= mass) & (kept < total / 2)).flatten().tolist():
                key, lost = (layer, qh // (q.shape[0] // heads)), float(total[qh] - kept[qh])
                if key not in found or lost > found[key]["mass"] - found[key]["kept"]:
                    found[key] = {"step": i, "query_head": qh,
                                  "mass": round(float(total[qh]), 3),
                                  "kept": round(float(kept[qh]), 3)}
    return found


def needle_kept(q: torch.Tensor, on: torch.Tensor, state, plan: SparsePlan,
                chunks: torch.Tensor, scale: float) -> torch.Tensor:
    """``(H_q,)``: each query head's attention on the needle tokens the landmark rule keeps.

    ``q (H_q, D)`` one step's queries, ``on (H_q, n)`` their attention on the needle's
    middle tokens, ``chunks (n,)`` the chunk of each of those tokens.
    """
    able = state.selectable
    picked = select_chunks(chunk_scores(q, state.landmarks, able, scale), plan.selected_chunks)
    chosen = torch.zeros_like(able).scatter_(1, picked, True) | ~able  # outliers are dense
    group = q.shape[0] // able.shape[0]
    return (on * chosen.repeat_interleave(group, 0)[:, chunks]).sum(-1)


def heads_yaml(named: list[tuple[int, int]]) -> str:
    """The run-file lines that name these heads."""
    pairs = ", ".join(f"[{layer}, {head}]" for layer, head in named)
    return f"sparse:\n  exact_score_heads: [{pairs}]\n"


def _table(misses: dict, named: list, samples: int, args) -> str:
    lines = [f"{samples} samples ({', '.join(args.tasks)}; {args.length} tokens, seed "
             f"{args.seed}), budget {args.budget:g}, {args.device} defaults; a miss: a query "
             f"head with >= {args.mass:g} of its attention on the needle, under half of it kept",
             "", "| layer | KV head | samples missed | worst: query head, step, mass, kept "
             "| named |",
             "|---:|---:|---:|---|---|"]
    order = sorted(misses, key=lambda key: (-len(misses[key]), key))
    for layer, head in order:
        found = misses[layer, head]
        w = max(found, key=lambda m: m["mass"] - m["kept"])
        mark = "yes" if (layer, head) in named else ""
        lines.append(f"| {layer} | {head} | {len(found)} | {w['query_head']}, {w['step']}, "
                     f"{w['mass']:.2f}, {w['kept']:.2f} | {mark} |")
    return "\n".join(lines) + "\n"


def _write(args, misses: dict, named: list, table: str) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(table)
    (args.out / "heads.yaml").write_text(heads_yaml(named))
    record = {"args": {k: str(v) for k, v in vars(args).items()}, "provenance": provenance(),
              "named": named,
              "misses": {f"{layer}.{head}": m for (layer, head), m in misses.items()}}
    (args.out / "misses.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
