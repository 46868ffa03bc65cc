"""Variable tracking: follow a chain of assignments hidden among filler lines."""

from __future__ import annotations

import random
import string

from sgl_kvtier.eval.ruler import data

__all__ = ["build_vt"]


def _names(rng: random.Random, n: int) -> list[str]:
    names: list[str] = []
    while len(names) < n:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if name not in names:
            names.append(name)
    return names


def _chain_text(rng: random.Random, size: int, hops: int) -> tuple[str, list[str], str]:
    names = _names(rng, hops + 1)
    value = str(rng.randint(10_000, 99_999))
    chain = [f"VAR {names[0]} = {value}"]
    chain += [f"VAR {names[i + 1]} = VAR {names[i]}" for i in range(hops)]
    lines = [data.NOISE] * size
    spots = sorted(rng.sample(range(size + 1), len(chain)))
    for offset, (spot, line) in enumerate(zip(spots, chain)):
        lines.insert(spot + offset, line)
    return "\n".join(lines), names, value


def _question(value: str) -> str:
    return (f"Question: Find all variables that are assigned the value {value} in the text "
            f"above. Answer: According to the chain(s) of variable assignment in the text "
            f"above, these variables are assigned the value {value}:")


def build_vt(seed: int, size: int, hops: int = 4) -> tuple[str, list[str]]:
    """Prompt with a one-shot example first, and the variable names of the chain."""
    rng = random.Random(seed)
    example, ex_names, ex_value = _chain_text(random.Random(seed + 1), 8, hops)
    text, names, value = _chain_text(rng, size, hops)
    instruction = "Memorize and track the chain(s) of variable assignment hidden in the text."
    prompt = (f"{instruction}\n{example}\n{_question(ex_value)} {' '.join(ex_names)}\n\n"
              f"{instruction}\n{text}\n{_question(value)}")
    return prompt, names
