"""Frequent words extraction: name the most frequent words of a Zipf-distributed text."""

from __future__ import annotations

import random
import string

__all__ = ["build_fwe"]

_ZETA_2 = 1.6449340668482264  # zeta(2): normalises the rank frequencies for alpha = 2


def _vocabulary(rng: random.Random, n: int) -> list[str]:
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(string.ascii_lowercase) for _ in range(6)))
    return sorted(words)


def build_fwe(seed: int, size: int, vocab_size: int = 100,
              alpha: float = 2.0) -> tuple[str, list[str]]:
    """``size`` coded words; the word of rank k occurs about ``size / zeta(alpha) / k^alpha``
    times, rank 1 is shown as ``...`` (noise), and the answer is ranks 2 to 4."""
    rng = random.Random(seed)
    vocab = _vocabulary(rng, vocab_size)
    rng.shuffle(vocab)
    zeta = _ZETA_2 if alpha == 2.0 else sum(k ** -alpha for k in range(1, 10_000))
    counts = [max(int(size / zeta * k ** -alpha), 1) for k in range(1, vocab_size + 1)]
    text = [("..." if rank == 0 else word) for rank, word in enumerate(vocab)
            for _ in range(counts[rank])]
    rng.shuffle(text)
    prompt = ("Read the following coded text and track how often each coded word appears.\n"
              f"{' '.join(text)}\n"
              "Question: What are the three most frequently appeared words in the above coded "
              "text? Answer: According to the coded text above, the three most frequently "
              "appeared words are:")
    return prompt, vocab[1:4]
