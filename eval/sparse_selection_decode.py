"""Would a better chunk selection find the forced-question needle? Offline greedy decoding
with the embedded model (transformers, CPU, float32) under each selection rule.

    .venv/bin/python eval/sparse_selection_decode.py --out docs/results/sparse-selection-decode

The same samples as ``eval/configs/sparse_forced_needle.yaml`` (RULER niah, question forced
through decode steps, then a greedy answer of at most ``--max-answer-tokens``). Prefill is
dense; at every decode step each layer attends the sink, the outlier chunks, the local
window, every token generated since the prompt, and the ``k`` middle chunks its rule selects
per KV head, over the model's true keys and values unless the rule says otherwise.

- ``dense``: every chunk (the reference);
- ``landmark``: ShadowKV's mean-key scores, the server's default (``select.py``);
- ``bound``: Quest's bound (per-dimension key min and max of each chunk) in every layer
  (the server's ``selection: bound``);
- ``mixed``: the bound in the layers ``--bound-layers`` names, landmarks elsewhere;
- ``either``: a chunk's score is the larger of its landmark and bound softmax weights
  (selected if either scorer wants it);
- ``<rule>_lowrank``: that rule's chunks with their keys rebuilt from the rank-``r``
  pre-RoPE factors, as the server attends them (sink, outliers and local window keep true
  keys);
- ``oracle``: the ``k`` chunks with the most attention under the true keys (softmax mass,
  max over the GQA group): the best a selection of ``k`` chunks can do.

If ``oracle`` scores like ``dense`` and ``landmark`` does not, the loss is the selection
rule; if ``oracle`` falls short too, no chunk selection at this budget finds the needle on
this model; ``landmark_lowrank`` against ``landmark`` is what the low-rank keys cost.
Answers are greedy with newline tokens barred, as the server's forcing bars them
(``sgl_kvtier/eval/forced_tokens.py``; ``--forcing any`` is its older regex protocol).
"""

from __future__ import annotations

import argparse
import functools
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
from sgl_kvtier.eval.paired import mean_interval
from sgl_kvtier.eval.records import provenance
from sgl_kvtier.eval.ruler.scoring import score
from sgl_kvtier.sparse.budget import SparsePlan, plan_for
from sgl_kvtier.sparse.rope import Rotary
from sgl_kvtier.sparse.select import bound_scores, chunk_scores, select_chunks
from sgl_kvtier.sparse.state import LayerState, build_layer_state

RULES = ("dense", "landmark", "landmark_lowrank", "bound", "bound_lowrank", "mixed",
         "mixed_lowrank", "either", "either_lowrank", "oracle")


@dataclass
class Selection:
    """What the attention function needs for the current sample and rule."""

    rule: str = "dense"
    plan: SparsePlan | None = None
    rotary: Rotary | None = None
    states: dict[int, LayerState] = field(default_factory=dict)
    rebuilt: dict[int, torch.Tensor] = field(default_factory=dict)  # (H, M, D) per layer
    bound_layers: range = range(0)
    layer: int = 0


_SEL = Selection()


def _attend(module, query, key, value, attention_mask, scaling=None, **kwargs):
    layer = module.layer_idx
    if query.shape[2] > 1:  # prefill: dense, and the layer's sparse state from its prompt
        if _SEL.plan is not None:
            k, v = key[0].transpose(0, 1), value[0].transpose(0, 1)  # (T, H, D)
            state = build_layer_state(k, v, _SEL.plan, _SEL.rotary, bounds=True)
            _SEL.states[layer] = state
            _SEL.rebuilt[layer] = rebuilt_middle(state, _SEL.plan, _SEL.rotary)
        return sdpa(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    q, k, v = query[0, :, 0].float(), key[0].float(), value[0].float()  # (H_q, D), (H, T, D)
    _SEL.layer = layer
    h, t, d = k.shape
    if _SEL.rule.endswith("_lowrank"):
        k = k.clone()
        k[:, _SEL.plan.sink:_SEL.plan.shared] = _SEL.rebuilt[layer]
    logits = q.view(h, -1, d) @ k.transpose(1, 2) * scaling  # (H, G, T)
    if _SEL.rule != "dense":
        logits = logits.masked_fill(~_keep(q, k, _SEL.states[layer], scaling)[:, None],
                                    float("-inf"))
    out = logits.softmax(-1) @ v  # (H, G, D)
    return out.reshape(1, 1, -1, d).to(query.dtype), None


def _keep(q: torch.Tensor, k: torch.Tensor, state: LayerState, scale: float) -> torch.Tensor:
    """(H, T) bool: the keys this step attends under the current rule."""
    plan, able, rule = _SEL.plan, state.selectable, _SEL.rule
    rule = rule.removesuffix("_lowrank")
    bound = rule == "bound" or (rule == "mixed" and _SEL.layer in _SEL.bound_layers)
    if rule == "either":
        scores = torch.maximum(chunk_scores(q, state.landmarks, able, scale),
                               bound_scores(q, state.bounds, able, scale))
    elif bound:
        scores = bound_scores(q, state.bounds, able, scale)
    elif rule in ("landmark", "mixed"):
        scores = chunk_scores(q, state.landmarks, able, scale)
    else:  # oracle
        h, _, d = k.shape
        mid = k[:, plan.sink:plan.shared]
        probs = (q.view(h, -1, d) @ mid.transpose(1, 2) * scale).softmax(-1)  # (H, G, M)
        scores = probs.view(h, -1, plan.chunks, plan.chunk).sum(-1).amax(1)
        scores = scores.masked_fill(~able, -1.0)
    chosen = torch.zeros_like(able).scatter_(1, select_chunks(scores, plan.selected_chunks),
                                             True) | ~able
    keep = torch.ones(k.shape[:2], dtype=torch.bool)
    keep[:, plan.sink:plan.shared] = chosen.repeat_interleave(plan.chunk, 1)
    return keep


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sample_arguments(parser)
    parser.add_argument("--budget", type=float, default=0.06,
                        help="budget fraction (default 0.06)")
    parser.add_argument("--rank-min", type=int, default=SparseConfig().rank_min,
                        help="floor of the low-rank keys' rank (sparse.rank_min; the embedded "
                        "model's 192 key dimensions x rank_fraction 0.16 is below it, so "
                        "this is its rank; default %(default)s)")
    parser.add_argument("--chunk-tokens", type=int, default=8,
                        help="tokens per landmark chunk (sparse.chunk_tokens; default "
                        "%(default)s, ShadowKV's and a GPU server's)")
    parser.add_argument("--max-answer-tokens", type=int, default=40,
                        help="greedy tokens after the question at most (default 40)")
    parser.add_argument("--rules", nargs="+", choices=RULES, default=list(RULES),
                        help="rules to run (default: all; dense is the reference, always run)")
    parser.add_argument("--forcing", choices=("canonical", "any"), default="canonical",
                        help="canonical: the question's own tokens, one per decode step "
                        "(Quest's protocol); any: at each step the model's best token among "
                        "those that spell the rest of the question, as SGLang's regex "
                        "constraint lets it (default canonical)")
    parser.add_argument("--bound-layers", type=int, nargs=2, default=(3, 10),
                        metavar=("FIRST", "LAST"),
                        help="mixed: the layers (inclusive) that score by the bound "
                        "(default 3 10, where the recall run found it keeps more)")
    parser.add_argument("--out", type=Path, help="folder for table.md and records.jsonl")
    args = parser.parse_args(argv)
    args.rules = ["dense"] + [r for r in args.rules if r != "dense"]
    _SEL.bound_layers = range(args.bound_layers[0], args.bound_layers[1] + 1)
    model, tokenizer, _SEL.rotary = load_with_attention("kvtier_select", _attend)
    samples = needle_samples(tokenizer, args)
    config = SparseConfig(enabled=True, budget_fraction=args.budget,
                          budget_min_tokens=args.budget_min_tokens, rank_min=args.rank_min,
                          chunk_tokens=args.chunk_tokens, keys="lowrank")
    records = []
    for sample, rule in tqdm([(s, r) for s in samples for r in args.rules], desc="decodes"):
        text, spelled = _forced_decode(model, tokenizer, sample, rule, config,
                                       args.max_answer_tokens, args.forcing)
        records.append({"task": sample.task, "index": sample.index, "rule": rule,
                        "question_tokens": spelled,
                        "score": score(sample.metric, text, sample.answers),
                        "prediction": text, "answers": sample.answers})
    table = _table(records, args)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "table.md").write_text(table + "\n")
        meta = {"args": vars(args) | {"out": str(args.out)}, "provenance": provenance()}
        (args.out / "records.jsonl").write_text(
            "\n".join(json.dumps(r, default=str) for r in [meta] + records) + "\n")
    return 0


@torch.no_grad()
def _forced_decode(model, tokenizer, sample, rule: str, config: SparseConfig,
                   max_answer: int, forcing: str) -> tuple[str, int]:
    """The greedy answer after the forced question, and the question's decode steps."""
    context, question = split_question(sample.prompt)
    ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    forced = tokenizer(question, add_special_tokens=False)["input_ids"]
    heads = model.config.num_key_value_heads
    dim = model.config.hidden_size // model.config.num_attention_heads
    _SEL.rule, _SEL.states, _SEL.rebuilt = rule, {}, {}
    _SEL.plan = plan_for(config, len(ids), heads, dim) if rule != "dense" else None
    out = model(torch.tensor([ids]), use_cache=True)
    cache, answer = out.past_key_values, []
    if forcing == "any":
        forced, out = _spell(tokenizer, question, cache, out, model)
    else:
        for token in forced:
            out = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
    for _ in range(max_answer):
        logits = out.logits[0, -1]
        token = int(logits.masked_fill(_newlines(tokenizer, logits.shape[0]),
                                       float("-inf")).argmax())
        if token == tokenizer.eos_token_id:
            break
        answer.append(token)
        out = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
    return tokenizer.decode(answer), len(forced)


def _spell(tokenizer, text: str, cache, out, model) -> tuple[list[int], object]:
    """Feed ``text`` token by token, each the model's best among the tokens that spell a
    prefix of what is left; returns the tokens and the model's output after the last."""
    texts, chosen = _token_texts(tokenizer), []
    while text:
        allowed = [i for i, t in enumerate(texts) if t and text.startswith(t)]
        token = allowed[int(out.logits[0, -1, allowed].argmax())]
        chosen.append(token)
        text = text[len(texts[token]):]
        out = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
    return chosen, out


@functools.cache
def _token_texts(tokenizer) -> list[str]:
    return [tokenizer.decode([i]) for i in range(len(tokenizer))]


@functools.cache
def _newlines(tokenizer, vocab: int) -> torch.Tensor:
    """(vocab,) bool: the tokens whose text holds a newline."""
    return torch.tensor([i < len(tokenizer) and "\n" in tokenizer.decode([i])
                         for i in range(vocab)])


def _table(records: list[dict], args) -> str:
    by = {}
    for r in records:
        by.setdefault((r["rule"], r["task"]), []).append(r["score"])
    head = ["task"] + args.rules
    lines = [f"Question forced ({args.forcing} tokens), budget {100 * args.budget:g} % "
             f"(floor {args.budget_min_tokens} tokens), chunks of {args.chunk_tokens}, "
             f"key rank floor {args.rank_min}, "
             f"{args.length} tokens, RULER score (paired difference vs dense, mean "
             f"[95 % interval])", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task in args.tasks + ["mean"]:
        cells = []
        for rule in args.rules:
            pick = lambda r, t=task: [s for (rr, tt), ss in by.items() if rr == r
                                      and (t == "mean" or tt == t) for s in ss]
            got, ref = pick(rule), pick("dense")
            cell = f"{sum(got) / len(got):.1f}"
            if rule != "dense":  # records hold the samples in the same order per rule
                mean, low, high = mean_interval([a - b for a, b in zip(got, ref)])
                cell += f", {mean:+.1f} [{low:+.1f}, {high:+.1f}]"
            cells.append(cell)
        lines.append(f"| {task} (n={len(pick('dense'))}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
