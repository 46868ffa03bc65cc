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

__all__ = ["run_ruler", "steps", "split_question", "literal_regex", "sparse_stats"]


def steps(work: RulerWorkload) -> int:
    return len(work.tasks) * len(work.lengths) * work.num_samples + 1  # + the counters


def run_ruler(server: Server, tokenizer, work: RulerWorkload, seed: int) -> Iterator[dict]:
    """Yield one scored record body per sample."""
    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    for length in work.lengths:
        for task in work.tasks:
            for sample in generate(task, count, length, work.num_samples, seed,
                                   work.max_new_tokens):
                if work.question_in_decode:
                    name, (gen, text) = f"{task}:decode", _question_in_decode(
                        server, sample, count)
                else:
                    name = task
                    gen = server.generate(sample.prompt, sample.max_new_tokens)
                    text = gen.text
                yield {"workload": "ruler", "task": name, "length": length,
                       "index": sample.index, "prompt_tokens": gen.prompt_tokens,
                       "score": score(sample.metric, text, sample.answers),
                       "prediction": text, "answers": sample.answers,
                       "ttft_s": gen.ttft_s}
    yield {"workload": "ruler_stats", "question_in_decode": work.question_in_decode,
           "sparse": sparse_stats(server)}


def sparse_stats(server: Server) -> dict | None:
    """The kvtier sparse-decode counters so far, or None (sparse decode off)."""
    state = server.server_info().get("internal_states", [{}])[0]
    return (state.get("kvtier") or {}).get("sparse")


def split_question(prompt: str) -> tuple[str, str]:
    """A niah prompt as ``(haystack with its instructions, question)``; the question starts
    at the line that asks for the special magic values."""
    cut = prompt.rfind("\nWhat are all the special magic")
    if cut < 0:
        raise ValueError("not a niah prompt: no question line")
    return prompt[:cut + 1], prompt[cut + 1:]


def literal_regex(text: str) -> str:
    """A regex matching exactly ``text`` (only the metacharacters escaped: the grammar
    backends do not all take Python's escaped spaces)."""
    return "".join("\\" + c if c in _META else c for c in text)


_META = set(".^$*+?{}[]\\|()")


def _question_in_decode(server: Server, sample, count) -> tuple:
    """Send the haystack only; the regex forces the question, token by token, then lets the
    model answer on one line. Returns the generation and the text after the question."""
    context, question = split_question(sample.prompt)
    regex = literal_regex(question) + "[^\\n]{1,120}"
    # The regex lets the model spell the question in any tokenization, which may take more
    # tokens than the tokenizer's own: room for twice as many before the answer's.
    gen = server.generate(context, 2 * count(question) + 16 + sample.max_new_tokens,
                          regex=regex)
    return gen, gen.text[len(question):] if gen.text.startswith(question) else gen.text
