"""Which heads read the needle at each answer step of a RULER sample, and does chunk selection
keep it for them? An ad-hoc diagnostic (not a maintained tool) for the samples that sparse
decode loses in ``sparse_ruler``: the plain RULER prompt (question in the prompt), dense's
own answer teacher-forced after it, the embedded model in transformers (CPU, float32), each
layer's state built by the server's code with a CPU server's defaults (exact keys, chunks of
4) at a 6 % budget (floor 32). Per answer step:

- the dense attention on the needle's value tokens, summed over layers and query heads, and
  the share of it that each rule's chosen chunks (selected and outliers) hold: ``landmark``
  (the server's rule), ``bound`` (Quest's key box), ``perhead`` / ``perhead_bound`` (each
  query head its own top ``k / G`` chunks, the union per KV head: no max over the group);
- the heads that put over half their attention on the needle: (layer, query head, mass,
  rank of its needle chunk among the landmark logits of that head alone, rank under the
  server's group-max score). Rank 0 is the best; the budget is about 60 chunks.

    .venv/bin/python docs/results/sparse-ruler/needle-heads/needle_heads.py \
        docs/results/sparse-ruler/sparse_ruler-20261205-121709/records.jsonl niah_single_2:8

A sample of another length is named ``task:index@8192``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[4] / "eval"))
from sparse_selection_recall import CAPTURED, capture, dense_probs

from sgl_kvtier.config import SparseConfig
from sgl_kvtier.eval.offline_model import load_with_attention
from sgl_kvtier.eval.ruler import generate
from sgl_kvtier.sparse.budget import plan_for
from sgl_kvtier.sparse.select import bound_scores, chunk_scores, select_chunks
from sgl_kvtier.sparse.state import build_layer_state

RULES = ("landmark", "bound", "perhead", "perhead_bound")


def per_head_union(logits: torch.Tensor, able: torch.Tensor, k: int) -> torch.Tensor:
    """(H, N) bool: each query head's own top ceil(k / G) chunks, united per KV head."""
    h, g, n = logits.shape
    best = logits.masked_fill(~able[:, None, :], float("-inf")).topk(-(-k // g), -1).indices
    chosen = torch.zeros(h, n, dtype=torch.bool)
    chosen.scatter_(1, best.reshape(h, -1), True)
    return chosen


def chosen_by(rule: str, q: torch.Tensor, state, k: int, scale: float) -> torch.Tensor:
    """(H, N) bool: the chunks ``rule`` attends for one step's ``q (H_q, D)``."""
    able = state.selectable
    h = able.shape[0]
    if rule in ("landmark", "bound"):
        score = chunk_scores if rule == "landmark" else bound_scores
        source = state.landmarks if rule == "landmark" else state.bounds
        picked = select_chunks(score(q, source, able, scale), k)
        return torch.zeros_like(able).scatter_(1, picked, True) | ~able
    qv = q.float().view(h, -1, q.shape[-1])
    if rule == "perhead":
        logits = qv @ state.landmarks.float().transpose(1, 2)
    else:
        low, high = state.bounds.float()
        logits = qv.clamp(min=0) @ high.transpose(1, 2) + qv.clamp(max=0) @ low.transpose(1, 2)
    return per_head_union(logits * scale, able, k) | ~able


def sample_run(model, tok, records: list[dict], task: str, index: int, length: int = 4096):
    """The prompt's tokens with dense's answer after them, the needle's positions, dense's
    record, and the number of prompt tokens; every layer's q, k, v captured."""
    count = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])
    sample = generate(task, count, length, index + 1, 42, 48)[index]
    rec = {r["server"]: r for r in records if r.get("task") == task and r.get("index") == index
           and r.get("length") == length and "prediction" in r
           and not r.get("question_in_decode")}
    enc = tok(sample.prompt, add_special_tokens=False, return_offsets_mapping=True)
    assert len(enc["input_ids"]) == rec["dense"]["prompt_tokens"], "not the run's prompt"
    answer = tok(rec["dense"]["prediction"], add_special_tokens=False)["input_ids"][:14]
    start = sample.prompt.find(sample.answers[0])
    end = start + len(sample.answers[0])
    needle = torch.tensor([i for i, (a, b) in enumerate(enc["offset_mapping"])
                           if a < end and b > start])
    CAPTURED.clear()
    with torch.no_grad():
        model(torch.tensor([enc["input_ids"] + answer]))
    return answer, needle, rec, len(enc["input_ids"])


def measure(answer, needle, n0: int, rotary):
    """Per step: kept needle mass per rule, the needle mass seen, and the needle heads."""
    steps = torch.arange(n0 - 1, n0 + len(answer) - 1)  # step j's query writes token j
    _, k0, _ = CAPTURED[0]
    config = SparseConfig(enabled=True, budget_fraction=0.06,
                          budget_min_tokens=32).resolved("cpu")
    plan = plan_for(config, n0, k0.shape[0], k0.shape[2])
    scale = k0.shape[2] ** -0.5
    inside = needle[(needle >= plan.sink) & (needle < plan.shared)]
    chunk = (inside - plan.sink) // plan.chunk
    kept = {r: torch.zeros(len(steps)) for r in RULES}
    seen, heads = torch.zeros(len(steps)), {}
    for layer in range(len(CAPTURED)):
        q, k, v = CAPTURED[layer]
        state = build_layer_state(k.transpose(0, 1)[:n0], v.transpose(0, 1)[:n0], plan,
                                  rotary, bounds=True)
        qs = q[:, steps].float()
        probs = dense_probs(qs, k[:, :int(steps[-1]) + 1].float(), steps, scale)
        g = qs.shape[0] // k.shape[0]
        for i in range(len(steps)):
            on = probs[:, i][:, inside]  # (H_q, n)
            seen[i] += float(on.sum())
            for rule in RULES:
                hit = chosen_by(rule, qs[:, i], state, plan.selected_chunks, scale)
                kept[rule][i] += float((on * hit.repeat_interleave(g, 0)[:, chunk]).sum())
            heads.setdefault(i, []).extend(
                needle_heads(qs[:, i], on, chunk, state, layer, g, scale))
    return kept, seen, heads


def needle_heads(q, on, chunk, state, layer: int, g: int, scale: float) -> list[tuple]:
    """(layer, query head, needle mass, own landmark rank, group-max rank) of each query head
    with over half its attention on the needle."""
    out = []
    group = chunk_scores(q, state.landmarks, state.selectable, scale)
    for head in (on.sum(1) > 0.5).nonzero().flatten().tolist():
        kv, nc = head // g, int(chunk[on[head].argmax()])
        own = (q[head].float() @ state.landmarks[kv].float().T).masked_fill(
            ~state.selectable[kv], float("-inf"))
        out.append((layer, head, round(float(on[head].sum()), 2),
                    int((own > own[nc]).sum()), int((group[kv] > group[kv, nc]).sum())))
    return out


def main(argv: list[str]) -> None:
    records = [json.loads(line) for line in open(argv[0])]
    model, tok, rotary = load_with_attention("kvtier_capture", capture)
    for arg in argv[1:]:  # task:index or task:index@length
        name, _, length = arg.partition("@")
        task, index = name.split(":")
        answer, needle, rec, n0 = sample_run(model, tok, records, task, int(index),
                                             int(length or 4096))
        kept, seen, heads = measure(answer, needle, n0, rotary)
        print(f"\n{task} #{index}: dense {rec['dense']['prediction'][:24]!r} "
              f"(score {rec['dense']['score']:.0f}), sparse_6 "
              f"{rec['sparse_6']['prediction'][:24]!r} (score {rec['sparse_6']['score']:.0f})")
        for i, token in enumerate(tok.decode([t]) for t in answer[:12]):
            shares = " ".join(f"{r} {kept[r][i] / seen[i]:.0%}" for r in RULES)
            print(f"  step {i:2d} -> {token!r:6}: needle mass {seen[i]:5.2f}, kept: {shares}; "
                  f"needle heads {heads.get(i, [])[:4]}")


if __name__ == "__main__":
    main(sys.argv[1:])
