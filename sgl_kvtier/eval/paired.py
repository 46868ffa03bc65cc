"""Paired score differences: each server against a reference on the very same samples.

Two configurations scored on the same RULER prompts differ far less than two independent
score estimates suggest: most samples are answered alike. Pairing them sample by sample
(``(task, length, index)``) and taking the Student-t interval of the mean difference is what
says whether a change of a few points is real at ten samples per task.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict

__all__ = ["paired_differences", "mean_interval", "pool_of", "POOLS"]

POOLS = ("mean", "mean:decode")


def pool_of(task: str) -> str:
    """The pooled row a recorded task counts in: ``"mean:decode"`` for a task asked with the
    question forced through decode (recorded ``"<task>:decode"``), else ``"mean"``."""
    return "mean:decode" if task.endswith(":decode") else "mean"


def mean_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)``: the Student-t interval of the mean of ``values``; for one
    value, or values that do not vary, the interval is the mean itself."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, mean, mean
    from scipy.stats import t

    half = t.ppf((1 + confidence) / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(
        len(values))
    return mean, mean - half, mean + half


def paired_differences(records: list[dict], reference: str,
                       confidence: float = 0.95) -> dict[tuple[str, str, int], dict]:
    """Per ``(server, task, length)``: the mean of ``score(server) - score(reference)`` over
    the samples both scored, its interval, ``n`` and the reference's mean score there (a
    task the reference scores near zero cannot show a loss). Task ``"mean"`` pools the
    differences of every task asked as usual at that length (every task has the same samples
    count, so its mean is the mean over tasks), ``"mean:decode"`` those of the tasks asked
    with the question forced through decode (:func:`pool_of`): two workloads, two means."""
    scores: dict[tuple[str, str, int, int], float] = {}
    for r in records:
        if r.get("workload") == "ruler":
            scores[(r["server"], r["task"], r["length"], r["index"])] = r["score"]
    diffs: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    base: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for (server, task, length, index), value in sorted(scores.items()):
        ref = scores.get((reference, task, length, index))
        if server == reference or ref is None:
            continue
        for name in (task, pool_of(task)):
            diffs[(server, name, length)].append(value - ref)
            base[(server, name, length)].append(ref)
    out = {}
    for key, values in diffs.items():
        mean, low, high = mean_interval(values, confidence)
        out[key] = {"diff": mean, "low": low, "high": high, "n": len(values),
                    "reference_score": statistics.fmean(base[key])}
    return out
