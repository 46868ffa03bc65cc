"""A generated RULER sample and the fitting of a prompt to a token budget."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Sample", "fit"]

_FIRST_SIZE = 16


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
    (more sentences, lines or documents). Sizes double from 16 until one does not fit,
    then a binary search between the last two: about 2 log2(answer) builds, none of them
    much longer than the budget (tokenizing far larger candidates dominated the cost).

    Raises
    ------
    ValueError
        If even size 1 does not fit.
    """
    def attempt(size: int):
        prompt, answers = build(size)
        tokens = count(prompt)
        return (prompt, answers, tokens) if tokens <= budget else None

    # lo: a size known to fit (0: none yet); hi: the smallest size known not to fit.
    lo, hi, best = 0, largest + 1, None
    size = min(_FIRST_SIZE, largest)  # some builds need a few units (a chain of variables)
    while size < hi and (found := attempt(size)) is not None:
        best, lo, size = found, size, size * 2
    hi = min(hi, size)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if (found := attempt(mid)) is not None:
            best, lo = found, mid
        else:
            hi = mid
    if best is None:
        raise ValueError(f"no haystack size fits {budget} tokens")
    return best
