"""Needle-in-a-haystack tasks: keys with hidden values in filler, essays or other needles."""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from itertools import cycle, islice

from sgl_kvtier.eval.ruler import data

__all__ = ["NiahSpec", "build_niah"]


@dataclass(frozen=True)
class NiahSpec:
    haystack: str  # repeat | essay | needle
    key_type: str = "words"  # words | uuids
    value_type: str = "numbers"  # numbers | uuids
    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1


def _key(rng: random.Random, kind: str) -> str:
    return rng.choice(data.words()) if kind == "words" else _uuid(rng)


def _value(rng: random.Random, kind: str) -> str:
    return str(rng.randint(1_000_000, 9_999_999)) if kind == "numbers" else _uuid(rng)


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _needle(kind: str, key: str, value: str) -> str:
    return f"One of the special magic {kind} for {key} is: {value}."


def _join_keys(keys: list[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + f", and {keys[-1]}"


def _insert_lines(rng, lines: list[str], needles: list[str]) -> str:
    spots = sorted(rng.sample(range(len(lines) + 1), len(needles)))
    for offset, (spot, needle) in enumerate(zip(spots, needles)):
        lines.insert(spot + offset, needle)
    return "\n".join(lines)


def _insert_essay(rng, size: int, needles: list[str]) -> str:
    sentences = list(islice(cycle(data.split_sentences(data.essay_text())), size))
    # Depths drawn without replacement from 40 evenly spaced percentages, on boundaries.
    depths = sorted(rng.sample([i * 100 / 39 for i in range(40)], len(needles)))
    cuts = [round(len(sentences) * d / 100) for d in depths]
    for offset, (cut, needle) in enumerate(zip(cuts, needles)):
        sentences.insert(cut + offset, needle)
    return " ".join(sentences)


def build_niah(spec: NiahSpec, seed: int, size: int) -> tuple[str, list[str]]:
    """Prompt (ending with the answer prefix) and the expected values, for ``size``
    haystack units (filler lines, essay sentences or distractor needles)."""
    rng = random.Random(seed)
    keys: list[str] = []
    while len(keys) < spec.num_keys:
        key = _key(rng, spec.key_type)
        if key not in keys:
            keys.append(key)
    values = {k: [_value(rng, spec.value_type) for _ in range(spec.num_values)] for k in keys}
    needles = [_needle(spec.value_type, k, v) for k in keys for v in values[k]]
    rng.shuffle(needles)
    queried = rng.sample(keys, spec.num_queries)
    if spec.haystack == "essay":
        context = _insert_essay(rng, size, needles)
    else:
        filler = (
            [data.NOISE] * size if spec.haystack == "repeat" else
            [_needle(spec.value_type, _key(rng, spec.key_type), _value(rng, spec.value_type))
             for _ in range(size)])
        context = _insert_lines(rng, filler, needles)
    kind, query = spec.value_type, _join_keys(queried)
    prompt = (f"A special magic {kind[:-1]} is hidden for each key in the text below; remember "
              f"them, you will be asked for them afterwards.\n{context}\n"
              f"What are all the special magic {kind} for {query} mentioned in the provided "
              f"text? The special magic {kind} for {query} mentioned in the provided text are")
    return prompt, [v for k in queried for v in values[k]]
