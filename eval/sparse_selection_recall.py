"""How much of dense attention does sparse decode's chunk selection keep? Offline, on the
forced-question needle prompts, with the embedded model run by transformers (CPU, float32).

    .venv/bin/python eval/sparse_selection_recall.py --out docs/results/sparse-selection-recall

Each RULER niah sample's haystack is the prompt; its question and reference answer are
teacher-forced after it, as the forced-decode evaluation sends them, so each decode step's
query is the one dense decoding has. Per layer the sparse state is built by the server's own
code (:func:`build_layer_state`, the configured plan), and at each decode step every rule
picks its chunks per KV head. Measured against dense attention at that step:

- kept mass: of a query head's attention on the prompt's middle (what selection chooses
  from), the share on the selected and outlier chunks; mean over heads, layers and steps;
- needle mass: the same on the needle's value tokens only, summed over heads, layers and
  steps before the ratio (heads that read the needle weigh the most), at the answer steps.

Rules: ``landmark`` (ShadowKV's mean key per chunk, the server's default), ``bound``
(Quest's per-chunk key box), ``rerank`` (landmark's best ``2k`` chunks re-ranked by their
rebuilt low-rank keys), ``lowrank`` (every chunk scored by its rebuilt keys: the best that
the low-rank keys allow) and ``oracle`` (every chunk scored by its true keys: the best any
selection of ``k`` chunks can do). Scores per chunk are softmax mass, max over the GQA group.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from sgl_kvtier.config import SparseConfig
from sgl_kvtier.eval.accuracy import split_question
from sgl_kvtier.eval.offline_model import (
    add_sample_arguments,
    load_with_attention,
    needle_samples,
    rebuilt_middle,
    sdpa,
)
from sgl_kvtier.eval.records import provenance
from sgl_kvtier.sparse.budget import SparsePlan, plan_for
from sgl_kvtier.sparse.rope import Rotary
from sgl_kvtier.sparse.select import bound_scores, chunk_scores, select_chunks
from sgl_kvtier.sparse.state import LayerState, build_layer_state

RULES = ("landmark", "bound", "rerank", "lowrank", "oracle")


@dataclass
class Tally:
    """Running sums of one (rule, budget, phase) cell."""

    kept: float = 0.0  # sum over (layer, step, query head) of the kept share
    lost: float = 0.0  # ... and of the share of all attention lost
    count: int = 0
    needle_kept: float = 0.0  # summed needle mass kept and seen
    needle_seen: float = 0.0
    by_layer: dict = field(default_factory=dict)  # layer -> [kept sum, count]

    def add(self, layer: int, kept: torch.Tensor, lost: torch.Tensor,
            needle: tuple[float, float]) -> None:
        self.kept += float(kept.sum())
        self.lost += float(lost.sum())
        self.count += kept.numel()
        self.needle_kept += needle[0]
        self.needle_seen += needle[1]
        cell = self.by_layer.setdefault(layer, [0.0, 0])
        cell[0] += float(kept.sum())
        cell[1] += kept.numel()

    def summary(self) -> dict:
        return {"kept_mass": self.kept / max(self.count, 1),
                "lost_attention": self.lost / max(self.count, 1),
                "needle_mass": self.needle_kept / self.needle_seen if self.needle_seen else None,
                "by_layer": {k: s / n for k, (s, n) in sorted(self.by_layer.items())}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sample_arguments(parser)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.06],
                        help="budget fractions to measure (default 0.06)")
    parser.add_argument("--out", type=Path, help="folder for table.md, layers.png and "
                        "recall.json")
    args = parser.parse_args(argv)
    model, tokenizer, rotary = load_with_attention("kvtier_capture", capture)
    tallies: dict[tuple, Tally] = {}
    for sample in tqdm(needle_samples(tokenizer, args), desc="samples"):
        task = sample.task
        run = teacher_forced(model, tokenizer, sample)
        for budget in args.budgets:
            # ShadowKV's low-rank keys and chunks of 8, as a GPU server runs them.
            config = SparseConfig(enabled=True, budget_fraction=budget,
                                  budget_min_tokens=args.budget_min_tokens).resolved("cuda")
            _measure(run, config, rotary, tallies, task, budget)
    table = _table(tallies, args)
    print(table)
    if args.out:
        _write(args, tallies, table)
    return 0


# --- the model, with every layer's post-RoPE q, k, v captured ------------------------------

CAPTURED: dict[int, tuple[torch.Tensor, ...]] = {}


def capture(module, query, key, value, attention_mask, **kwargs):
    """An attention function that keeps each layer's ``(q, k, v)`` in :data:`CAPTURED`."""
    CAPTURED[module.layer_idx] = (query[0].detach(), key[0].detach(), value[0].detach())
    return sdpa(module, query, key, value, attention_mask, **kwargs)


@dataclass
class ForcedRun:
    """One sample's teacher-forced pass: ``T0`` prompt tokens, then question and answer."""

    q: list[torch.Tensor]  # per layer (H_q, T, D)
    k: list[torch.Tensor]  # per layer (H, T, D)
    v: list[torch.Tensor]
    prompt: int  # T0
    question: int  # forced question tokens
    answer: int  # answer tokens
    needle: torch.Tensor  # (n,) int64 positions of the needle value's tokens


def teacher_forced(model, tokenizer, sample) -> ForcedRun:
    """One dense pass over a niah sample's haystack, question and reference answer."""
    context, question = split_question(sample.prompt)
    answer = " " + sample.answers[0]
    enc = tokenizer(context, add_special_tokens=False, return_offsets_mapping=True)
    ids_q = tokenizer(question, add_special_tokens=False)["input_ids"]
    ids_a = tokenizer(answer, add_special_tokens=False)["input_ids"]
    ids = enc["input_ids"] + ids_q + ids_a
    start = context.find(sample.answers[0])
    end = start + len(sample.answers[0])
    needle = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start]
    assert start >= 0 and needle, "the needle's value is not in the haystack"
    CAPTURED.clear()
    with torch.no_grad():
        model(torch.tensor([ids]))
    layers = [CAPTURED[i] for i in range(len(CAPTURED))]
    return ForcedRun([x[0] for x in layers], [x[1] for x in layers], [x[2] for x in layers],
                     len(enc["input_ids"]), len(ids_q), len(ids_a), torch.tensor(needle))


# --- one sample: every layer, step and rule -------------------------------------------------

def _measure(run: ForcedRun, config: SparseConfig, rotary: Rotary, tallies: dict,
             task: str, budget: float) -> None:
    heads, _, dim = run.k[0].shape
    plan = plan_for(config, run.prompt, heads, dim)
    scale = dim ** -0.5
    steps = torch.arange(run.prompt, run.prompt + run.question + run.answer - 1)
    answer_from = run.question - 1  # this step's query writes the first answer token
    for layer in range(len(run.q)):
        k, v = run.k[layer].transpose(0, 1), run.v[layer].transpose(0, 1)  # (T, H, D)
        state = build_layer_state(k[:run.prompt], v[:run.prompt], plan, rotary, bounds=True)
        q = run.q[layer][:, steps].float()  # (H_q, S, D)
        probs = dense_probs(q, run.k[layer][:, :int(steps[-1]) + 1].float(), steps, scale)
        mass = {"oracle": _mass_scores(q, run.k[layer][:, plan.sink:plan.shared].float(),
                                       plan, scale),
                "lowrank": _mass_scores(q, rebuilt_middle(state, plan, rotary), plan, scale)}
        for i in range(len(steps)):
            phase = "answer" if i >= answer_from else "question"
            for rule in RULES:
                chosen = _choose(rule, q[:, i], state, plan, {r: m[:, i] for r, m in
                                                               mass.items()}, scale)
                kept, lost = _kept(probs[:, i], chosen, plan)
                needle = _needle(probs[:, i], chosen, plan, run.needle) \
                    if phase == "answer" else (0.0, 0.0)
                for key in ((rule, budget, phase, "all"), (rule, budget, phase, task)):
                    tallies.setdefault(key, Tally()).add(layer, kept, lost, needle)


def dense_probs(q: torch.Tensor, keys: torch.Tensor, steps: torch.Tensor,
                scale: float) -> torch.Tensor:
    """Dense attention at each step: ``q (H_q, S, D)``, ``keys (H, T, D)`` -> ``(H_q, S, T)``."""
    h, t, d = keys.shape
    logits = q.view(h, -1, d) @ keys.transpose(1, 2) * scale  # (H, G*S, T)
    logits = logits.view(q.shape[0], len(steps), t)
    future = torch.arange(t)[None, :] > steps[:, None]
    return logits.masked_fill(future, float("-inf")).softmax(-1)


def _mass_scores(q: torch.Tensor, keys: torch.Tensor, plan: SparsePlan,
                 scale: float) -> torch.Tensor:
    # Softmax mass of each chunk under these middle keys (H, M, D), max over the group:
    # q (H_q, S, D) -> (H, S, N)
    h, m, d = keys.shape
    probs = (q.view(h, -1, d) @ keys.transpose(1, 2) * scale).view(h, -1, q.shape[1], m)
    return probs.softmax(-1).view(*probs.shape[:3], plan.chunks, plan.chunk).sum(-1).amax(1)


def _choose(rule: str, q, state: LayerState, plan: SparsePlan, mass: dict,
            scale: float) -> torch.Tensor:
    """(H, N) bool: the chunks this rule attends (selected or outlier) for ``q (H_q, D)``."""
    k, able = plan.selected_chunks, state.selectable
    if rule == "landmark":
        scores = chunk_scores(q, state.landmarks, able, scale)
    elif rule == "bound":
        scores = bound_scores(q, state.bounds, able, scale)
    elif rule == "oracle":
        scores = mass["oracle"].masked_fill(~able, -1.0)
    else:
        scores = mass["lowrank"].masked_fill(~able, -1.0)
        if rule == "rerank":
            wide = select_chunks(chunk_scores(q, state.landmarks, able, scale),
                                 min(2 * k, int(able.sum(1).min())))
            keep = torch.zeros_like(able).scatter_(1, wide, True)
            scores = scores.masked_fill(~keep, -2.0)
    chosen = torch.zeros_like(able).scatter_(1, select_chunks(scores, k), True)
    return chosen | ~able


def _middle_mass(probs: torch.Tensor, plan: SparsePlan) -> torch.Tensor:
    # (H_q, p+1) -> (H_q, N) the dense attention on each middle chunk
    return probs[:, plan.sink:plan.shared].reshape(probs.shape[0], plan.chunks, plan.chunk).sum(-1)


def _kept(probs: torch.Tensor, chosen: torch.Tensor,
          plan: SparsePlan) -> tuple[torch.Tensor, torch.Tensor]:
    """(H_q,) twice: each query head's share of its middle attention on the chosen chunks,
    and the attention it loses (the share of its whole attention on the others)."""
    mass = _middle_mass(probs, plan)
    group = probs.shape[0] // chosen.shape[0]
    kept = (mass * chosen.repeat_interleave(group, 0)).sum(1)
    return kept / mass.sum(1).clamp_min(1e-30), mass.sum(1) - kept


def _needle(probs: torch.Tensor, chosen: torch.Tensor, plan: SparsePlan,
            needle: torch.Tensor) -> tuple[float, float]:
    """(kept, seen): dense attention on the needle's middle tokens, summed over heads."""
    inside = needle[(needle >= plan.sink) & (needle < plan.shared)]
    if inside.numel() == 0:
        return 0.0, 0.0
    group = probs.shape[0] // chosen.shape[0]
    chunk = (inside - plan.sink) // plan.chunk
    on = probs[:, inside]  # (H_q, n)
    hit = chosen.repeat_interleave(group, 0)[:, chunk]
    return float((on * hit).sum()), float(on.sum())


# --- output -----------------------------------------------------------------------------------

def _table(tallies: dict, args) -> str:
    cols = [("all", "question", "kept"), ("all", "answer", "kept"), ("all", "answer", "lost"),
            ("all", "answer", "needle")]
    cols += [(task, "answer", "needle") for task in args.tasks]
    head = ["rule", "budget", "kept mass, question steps", "kept mass, answer steps",
            "attention lost, answer steps",
            "needle mass, answer steps"] + [f"needle, {t}" for t in args.tasks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for budget in args.budgets:
        for rule in RULES:
            cells = []
            for task, phase, what in cols:
                got = tallies[(rule, budget, phase, task)].summary()
                value = got[{"kept": "kept_mass", "lost": "lost_attention",
                             "needle": "needle_mass"}[what]]
                cells.append("-" if value is None else f"{100 * value:.1f} %")
            lines.append(f"| {rule} | {100 * budget:g} % | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _write(args, tallies: dict, table: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(table + "\n")
    cells = [{"rule": r, "budget": b, "phase": p, "task": t} | tally.summary()
             for (r, b, p, t), tally in tallies.items()]
    (args.out / "recall.json").write_text(json.dumps(
        {"args": vars(args) | {"out": str(args.out)}, "provenance": provenance(),
         "cells": cells}, indent=1, default=str))
    fig, axes = plt.subplots(1, len(args.budgets), figsize=(6 * len(args.budgets), 4),
                             squeeze=False)
    for ax, budget in zip(axes[0], args.budgets):
        for rule in RULES:
            layers = tallies[(rule, budget, "answer", "all")].summary()["by_layer"]
            ax.plot(list(layers), [100 * x for x in layers.values()], label=rule)
        ax.set(title=f"budget {100 * budget:g} %, answer steps", xlabel="layer",
               ylabel="dense attention on the middle kept (%)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "layers.png", dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
