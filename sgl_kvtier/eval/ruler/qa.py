"""Question answering over many documents: SQuAD (qa_1) and HotpotQA (qa_2) dev sets."""

from __future__ import annotations

import random

from sgl_kvtier.eval.ruler import data

__all__ = ["build_qa"]

_INSTRUCTION = ("Answer the question using the documents below. Reply with the answer only, "
                "no other words.")


def _squad_documents(rng: random.Random, index: int, size: int) -> tuple[list[str], dict]:
    qa = data.squad()[index % len(data.squad())]
    paragraphs = data.squad_paragraphs()
    same = [p for a, p in paragraphs if a == qa["article"] and p != qa["gold"]]
    others = [p for a, p in paragraphs if a != qa["article"]]
    docs = [qa["gold"]] + same + rng.sample(others, min(size, len(others)))
    return docs[:max(size, 1)], qa


def _hotpot_documents(rng: random.Random, index: int, size: int) -> tuple[list[str], dict]:
    pool = data.hotpotqa()
    qa = pool[index % len(pool)]
    others = [d for q in rng.sample(pool, min(size // 8 + 2, len(pool))) if q is not qa
              for d in q["documents"]]
    # Supporting documents always stay; the question's own distractors go before others.
    return (qa["documents"] + others)[:max(size, qa["gold"])], qa


def build_qa(dataset: str, seed: int, index: int, size: int) -> tuple[str, list[str]]:
    """``size`` documents (the question's own first), shuffled with a seeded generator."""
    rng = random.Random(seed)
    pick = _squad_documents if dataset == "squad" else _hotpot_documents
    docs, qa = pick(rng, index, size)
    rng.shuffle(docs)
    context = "\n\n".join(f"Document {i + 1}:\n{d}" for i, d in enumerate(docs))
    prompt = (f"{_INSTRUCTION}\n\n{context}\n\n{_INSTRUCTION}\n\nQuestion: {qa['question']}\n"
              f"Answer:")
    return prompt, qa["answers"]
