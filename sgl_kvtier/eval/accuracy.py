"""The RULER workload: generate each task's samples for each length, ask the server, score.

Prompts are plain completions (no chat template): small models answer them better, and
both configurations being compared see the same text.
"""

from __future__ import annotations

from collections.abc import Iterator

from sgl_kvtier.eval.ruler import generate
from sgl_kvtier.eval.ruler.scoring import score
from sgl_kvtier.eval.spec import RulerWorkload
from sgl_kvtier.harness.server import Server

__all__ = ["run_ruler", "steps"]


def steps(work: RulerWorkload) -> int:
    return len(work.tasks) * len(work.lengths) * work.num_samples


def run_ruler(server: Server, tokenizer, work: RulerWorkload, seed: int) -> Iterator[dict]:
    """Yield one scored record body per sample."""
    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    for length in work.lengths:
        for task in work.tasks:
            for sample in generate(task, count, length, work.num_samples, seed,
                                   work.max_new_tokens):
                gen = server.generate(sample.prompt, sample.max_new_tokens)
                yield {"workload": "ruler", "task": task, "length": length,
                       "index": sample.index, "prompt_tokens": gen.prompt_tokens,
                       "score": score(sample.metric, gen.text, sample.answers),
                       "prediction": gen.text, "answers": sample.answers,
                       "ttft_s": gen.ttft_s}
