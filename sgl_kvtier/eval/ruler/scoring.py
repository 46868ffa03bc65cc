"""RULER's scores: ``string_match_all`` (fraction of references found) and
``string_match_part`` (1 if any reference is found), case-insensitive, times 100."""

from __future__ import annotations

import re

__all__ = ["clean", "string_match_all", "string_match_part", "score"]

_CONTROL = re.compile(r"[\x00-\x1f]")


def clean(prediction: str) -> str:
    return _CONTROL.sub("\n", prediction).strip()


def string_match_all(prediction: str, references: list[str]) -> float:
    text = clean(prediction).lower()
    return 100.0 * sum(r.lower() in text for r in references) / len(references)


def string_match_part(prediction: str, references: list[str]) -> float:
    text = clean(prediction).lower()
    return 100.0 * any(r.lower() in text for r in references)


def score(metric: str, prediction: str, references: list[str]) -> float:
    return {"string_match_all": string_match_all,
            "string_match_part": string_match_part}[metric](prediction, references)
