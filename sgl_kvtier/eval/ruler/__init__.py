"""RULER-style synthetic long-context tasks, generated offline and fitted to a token length.

``generate(task, count_tokens, max_len, num_samples, seed)`` returns samples whose prompt
plus generated tokens fit ``max_len`` tokens of the model's tokenizer. The 11 tasks are the
ones ShadowKV reports (RULER's 13 without niah_multikey_3 and cwe).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from functools import partial

from sgl_kvtier.eval.ruler.fwe import build_fwe
from sgl_kvtier.eval.ruler.niah import NiahSpec, build_niah
from sgl_kvtier.eval.ruler.qa import build_qa
from sgl_kvtier.eval.ruler.sample import Sample, fit
from sgl_kvtier.eval.ruler.vt import build_vt

__all__ = ["TASKS", "Sample", "generate"]

_ALL, _PART = "string_match_all", "string_match_part"


def _niah(**kw):
    spec = NiahSpec(**kw)
    return lambda seed, index, size: build_niah(spec, seed, size)


# name -> (build(seed, index, size) -> (prompt, answers), tokens to generate, metric)
TASKS: dict[str, tuple[Callable, int, str]] = {
    "niah_single_1": (_niah(haystack="repeat"), 128, _ALL),
    "niah_single_2": (_niah(haystack="essay"), 128, _ALL),
    "niah_single_3": (_niah(haystack="essay", value_type="uuids"), 128, _ALL),
    "niah_multikey_1": (_niah(haystack="essay", num_keys=4), 128, _ALL),
    "niah_multikey_2": (_niah(haystack="needle"), 128, _ALL),
    "niah_multivalue": (_niah(haystack="essay", num_values=4), 128, _ALL),
    "niah_multiquery": (_niah(haystack="essay", num_keys=4, num_queries=4), 128, _ALL),
    "vt": (lambda seed, index, size: build_vt(seed, size), 30, _ALL),
    "fwe": (lambda seed, index, size: build_fwe(seed, size), 50, _ALL),
    "qa_1": (partial(build_qa, "squad"), 32, _PART),
    "qa_2": (partial(build_qa, "hotpotqa"), 32, _PART),
}


def generate(task: str, count_tokens: Callable[[str], int], max_len: int, num_samples: int,
             seed: int = 42, max_new_tokens: int | None = None) -> list[Sample]:
    """``num_samples`` reproducible samples of ``task`` fitted to ``max_len`` tokens.

    Parameters
    ----------
    count_tokens : callable
        Number of tokens of a prompt under the served model's tokenizer.
    max_new_tokens : int, optional
        Tokens to generate (and to reserve); RULER's per-task default when omitted.
    """
    if task not in TASKS:
        raise KeyError(f"unknown RULER task {task!r}; known: {', '.join(TASKS)}")
    build, default_new, metric = TASKS[task]
    new_tokens = max_new_tokens or default_new
    samples = []
    for index in range(num_samples):
        sample_seed = seed * 1_000_003 + index * 7919 + sum(map(ord, task))
        prompt, answers, tokens = fit(functools.partial(build, sample_seed, index),
                                      count_tokens, max_len - new_tokens, largest=max_len)
        samples.append(Sample(task, index, prompt, answers, new_tokens, metric, tokens))
    return samples
