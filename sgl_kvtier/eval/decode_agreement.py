"""The decode_agreement workload: how far does a server's greedy decode stray from a
reference's next-token distributions, step by step?

For each essay prompt (``essay_slice``), on every server alike:

- the prompt's KV is stored in ``slot_runs`` runs of pool slots: its first parts go first
  as prompts of their own, each followed by a short unrelated request, so prefix caching
  leaves gaps between the parts (kvtier then decodes over several runs in place; each
  server's attention counters before and after are recorded);
- ``decode``: the server generates ``decode_tokens`` tokens greedily (EOS ignored) with its
  top-k log-probabilities at each step (``raw/*.npz``).

The reference server runs last and is, in addition, teacher-forced on the prompt plus each
other server's generated tokens (``teacher``): its distribution at every generated step,
given the very context the other server had.

:func:`compare` then scores each (server, prompt), steps numbered from 1 (step 1 comes from
the prefill, the others from decode): top-1 agreement (the server's token is the reference's
most likely one), KL(reference || server) on the reference's top-k plus a tail bucket
(:func:`sgl_kvtier.eval.agreement.topk_kl`), the first step that disagrees, and whether the
whole continuation equals the reference's own greedy one.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from sgl_kvtier.eval.agreement import essay_slice, greedy_metrics, topk_kl
from sgl_kvtier.eval.spec import DecodeAgreementWorkload
from sgl_kvtier.harness.server import Server

__all__ = ["steps", "prompts", "run_decode_agreement", "compare", "decode_metrics",
           "summarise_decode", "attention_stats"]

WORKLOAD = "decode_agreement"
_FIRST_PROMPT = 10_000  # essay indices far from the agreement workload's (0, 1, 2, ...)
_FIRST_FILLER = 20_000
_FILLER_TOKENS = 8


def steps(work: DecodeAgreementWorkload) -> int:
    """Records per server, for the progress bar (the reference yields more: its teacher
    forcings of the others)."""
    return sum(work.prompt_counts()) + 1


def prompts(tokenizer, work: DecodeAgreementWorkload) -> list[tuple[int, int, list[int]]]:
    """``(length, index among that length's prompts, token ids)`` of every prompt."""
    out, n = [], itertools.count(_FIRST_PROMPT)
    for length, count in zip(work.prompt_tokens, work.prompt_counts()):
        out += [(length, i, essay_slice(tokenizer, length, next(n))) for i in range(count)]
    return out


def attention_stats(server: Server) -> dict | None:
    """The kvtier attention backend's counters, or None (another backend)."""
    state = server.server_info().get("internal_states", [{}])[0]
    return (state.get("kvtier") or {}).get("attention_stats")


def run_decode_agreement(server: Server, server_name: str, tokenizer,
                         work: DecodeAgreementWorkload, raw_dir: Path,
                         records: list[dict]) -> Iterator[dict]:
    """Yield one record body per decoded prompt, per teacher-forced continuation (reference
    only; ``records`` must hold the other servers' decodes) and one of attention counters."""
    raw_dir.mkdir(exist_ok=True)
    others = [r for r in records if r.get("workload") == WORKLOAD and r["kind"] == "decode"
              and r["server"] != work.reference]
    fillers = itertools.count(_FIRST_FILLER)
    before = attention_stats(server)
    for length, i, prompt in prompts(tokenizer, work):
        _store_in_runs(server, prompt, work.slot_runs,
                       lambda: essay_slice(tokenizer, _FILLER_TOKENS, next(fillers)))
        decoded = server.scored_decode(prompt, work.decode_tokens, work.top_k)
        name = f"{server_name}-decode-{length}-{i}.npz"
        _save(raw_dir / name, decoded)
        yield {"workload": WORKLOAD, "kind": "decode", "length": length, "prompt": i,
               "prompt_tokens": decoded.prompt_tokens, "cached_tokens": decoded.cached_tokens,
               "output_ids": decoded.output_ids, "raw": f"raw/{name}"}
        if server_name == work.reference:
            mine = [r for r in others if (r["length"], r["prompt"]) == (length, i)]
            yield from _teacher_force(server, prompt, mine, work, raw_dir)
    yield {"workload": WORKLOAD, "kind": "attention_stats",
           "stats": _difference(attention_stats(server), before)}


def _store_in_runs(server: Server, prompt: list[int], runs: int,
                   filler: Callable[[], list[int]]) -> None:
    # Each part is cached, and the unrelated request after it takes the next free slots, so
    # the next part (and finally the prompt's rest) is allocated after a gap.
    for part in range(1, runs):
        server.generate(prompt[:len(prompt) * part // runs], 1)
        server.generate(filler(), 1)


def _teacher_force(server: Server, prompt: list[int], decodes: list[dict],
                   work: DecodeAgreementWorkload, raw_dir: Path) -> Iterator[dict]:
    for other in decodes:
        # Scored from position len(prompt): the distribution of each generated token.
        scored = server.next_token_logprobs(prompt + other["output_ids"], work.top_k,
                                            start=len(prompt) - 1)
        name = f"{work.reference}-teacher-{other['server']}-{other['length']}-{other['prompt']}.npz"
        _save(raw_dir / name, scored)
        yield {"workload": WORKLOAD, "kind": "teacher", "of": other["server"],
               "length": other["length"], "prompt": other["prompt"],
               "steps": len(scored.token_logprobs), "raw": f"raw/{name}"}


def _save(path: Path, scored) -> None:
    np.savez_compressed(path, token_logprobs=np.asarray(scored.token_logprobs, np.float32),
                        top_ids=np.asarray(scored.top_ids, np.int32),
                        top_logprobs=np.asarray(scored.top_logprobs, np.float32))


def _difference(after: dict | None, before: dict | None) -> dict | None:
    if after is None or before is None:
        return None
    return {k: v - before.get(k, 0) for k, v in after.items()}


def decode_metrics(ref: dict[str, np.ndarray], other: dict[str, np.ndarray],
                   other_ids: list[int], ref_greedy_ids: list[int] | None) -> dict:
    """Step-by-step agreement of a greedy decode with the reference teacher-forced on it.

    Parameters
    ----------
    ref : dict
        The reference's scoring of the generated steps: ``top_ids`` ``(T, k)`` int and
        ``top_logprobs`` ``(T, k)`` descending.
    other : dict
        The decoding server's own ``top_ids`` and ``top_logprobs`` at those steps.
    other_ids : list of int
        ``(T,)`` the tokens it generated.
    ref_greedy_ids : list of int or None
        The reference's own greedy continuation of the same prompt, if it ran one.

    Returns
    -------
    dict
        ``steps``; ``top1_agreement`` (fraction of steps whose token is the reference's
        argmax); ``agree_per_step`` (0/1 per step); ``kl_mean``, ``kl_max``,
        ``kl_per_step`` (nats); ``first_disagreement`` (step from 1, None if none);
        ``margins``: at each disagreeing step, ``[step, nats]`` by which the reference
        preferred its own top-1 token to the one taken (a lower bound, the reference's
        top-1 minus its k-th log-probability, where the token taken is outside its top-k);
        and ``exact``, ``prefix_fraction`` against ``ref_greedy_ids`` (None without it).
    """
    kl = topk_kl(ref, other)
    if len(other_ids) != len(kl):
        raise ValueError(f"{len(other_ids)} tokens for {len(kl)} scored steps")
    taken = np.asarray(other_ids)
    agree = taken == ref["top_ids"][:, 0]
    greedy = (greedy_metrics(ref_greedy_ids, other_ids) if ref_greedy_ids is not None
              else {"exact": None, "prefix_fraction": None})
    return {"steps": int(len(kl)), "top1_agreement": float(agree.mean()),
            "agree_per_step": agree.astype(int).tolist(), "kl_mean": float(kl.mean()),
            "kl_max": float(kl.max()), "kl_per_step": kl.tolist(),
            "first_disagreement": None if agree.all() else int(np.argmin(agree)) + 1,
            "margins": _margins(ref, taken, agree), **greedy}


def _margins(ref: dict[str, np.ndarray], taken: np.ndarray, agree: np.ndarray) -> list:
    # Near-ties say a disagreement is the reference's own indecision, not a lost token.
    lp = ref["top_logprobs"].astype(np.float64)
    hit = ref["top_ids"] == taken[:, None]  # (T, k)
    taken_lp = np.where(hit.any(1), (hit * lp).sum(1), lp[:, -1])
    return [[int(t) + 1, round(float(lp[t, 0] - taken_lp[t]), 4)]
            for t in np.flatnonzero(~agree)]


def compare(records: list[dict], folder: Path, work: DecodeAgreementWorkload) -> Iterator[dict]:
    """Yield one ``decode_compare`` record body per (server, prompt) the reference scored."""
    mine = [r for r in records if r.get("workload") == WORKLOAD]
    decodes = {(r["server"], r["length"], r["prompt"]): r for r in mine if r["kind"] == "decode"}
    for r in mine:
        if r["kind"] != "teacher":
            continue
        other = decodes.get((r["of"], r["length"], r["prompt"]))
        if other is None:
            continue
        ref_greedy = decodes.get((work.reference, r["length"], r["prompt"]))
        metrics = decode_metrics(_load(folder / r["raw"]), _load(folder / other["raw"]),
                                 other["output_ids"],
                                 None if ref_greedy is None else ref_greedy["output_ids"])
        yield {"workload": WORKLOAD, "kind": "decode_compare", "server": r["of"],
               "reference": work.reference, "length": r["length"], "prompt": r["prompt"],
               **metrics}


def _load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def summarise_decode(records: list[dict]) -> dict[str, dict]:
    """Per compared server: step-weighted top-1 agreement and mean KL, worst KL, first
    disagreements per prompt, greedy matches, per-step means over prompts, and the
    server's attention counters over the workload (None for a non-kvtier backend)."""
    compared = [r for r in records if r.get("kind") == "decode_compare"]
    out = {}
    for server in dict.fromkeys(r["server"] for r in compared):
        rows = [r for r in compared if r["server"] == server]
        agree = np.array([r["agree_per_step"] for r in rows], dtype=float)  # (prompts, T)
        kl = np.array([r["kl_per_step"] for r in rows])
        exact = [r["exact"] for r in rows if r["exact"] is not None]
        out[server] = {
            "reference": rows[0]["reference"], "prompts": len(rows), "steps": int(agree.size),
            "top1_agreement": float(agree.mean()), "disagreements": int((agree == 0).sum()),
            "kl": float(kl.mean()), "kl_max": float(kl.max()),
            "first_disagreement": [r["first_disagreement"] for r in rows],
            "margins": (sorted(m for r in rows for _, m in r["margins"])
                        if all("margins" in r for r in rows) else None),  # None: older records
            "greedy_match": sum(exact) / len(exact) if exact else None,
            "agree_by_step": agree.mean(0).tolist(), "kl_by_step": kl.mean(0).tolist(),
            "attention_stats": _stats_of(records, server)}
    return out


def _stats_of(records: list[dict], server: str) -> dict | None:
    found = [r["stats"] for r in records if r.get("workload") == WORKLOAD
             and r.get("kind") == "attention_stats" and r["server"] == server]
    return found[-1] if found else None
