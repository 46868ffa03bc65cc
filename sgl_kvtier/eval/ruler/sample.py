"""A generated RULER sample and the fitting of a prompt to a token budget."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Sample", "fit"]


@dataclass(frozen=True)
class Sample:
    """One prompt with its references; ``prompt`` already ends with the answer prefix."""

    task: str
    index: int
    prompt: str
    answers: list[str]
    max_new_tokens: int
    metric: str
    prompt_tokens: int


def fit(build: Callable[[int], tuple[str, list[str]]], count: Callable[[str], int],
        budget: int, largest: int) -> tuple[str, list[str], int]:
    """The prompt of the largest haystack size in ``[1, largest]`` that fits ``budget``.

    ``build(size)`` must be deterministic; its token count must grow with ``size``
    (more sentences, lines or documents). Binary search, so about log2(largest) builds.

    Raises
    ------
    ValueError
        If even size 1 does not fit.
    """
    lo, hi, best = 1, largest, None
    while lo <= hi:
        mid = (lo + hi) // 2
        prompt, answers = build(mid)
        tokens = count(prompt)
        if tokens <= budget:
            best, lo = (prompt, answers, tokens), mid + 1
        else:
            hi = mid - 1
    if best is None:
        raise ValueError(f"no haystack size fits {budget} tokens")
    return best
