"""The RULER workload: generate each task's samples for each length, ask the server, score.

Prompts are plain completions (no chat template): small models answer them better, and
both configurations being compared see the same text.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from sgl_kvtier.eval.forced_tokens import forcing_params, processor_string
from sgl_kvtier.eval.ruler import generate
from sgl_kvtier.eval.ruler.scoring import score
from sgl_kvtier.eval.spec import RulerWorkload
from sgl_kvtier.harness.server import Server

__all__ = ["Variant", "run_ruler", "steps", "sample_keys", "split_question", "literal_regex",
           "sparse_stats"]


def steps(work: RulerWorkload) -> int:
    return len(work.tasks) * len(work.lengths) * len(_indices(work)) + 1  # + the counters


def sample_keys(work: RulerWorkload) -> set[tuple[str, int, int]]:
    """``(task as recorded, length, index)`` of every sample the workload scores."""
    return {(_recorded_task(work, task), length, index) for length in work.lengths
            for task in work.tasks for index in _indices(work)}


def _indices(work: RulerWorkload) -> set[int]:
    return set(work.indices) if work.indices else set(range(work.num_samples))


def _recorded_task(work: RulerWorkload, task: str) -> str:
    return f"{task}:decode" if work.question_in_decode else task


@dataclass(frozen=True)
class Variant:
    """One configuration asked on a server: its name in the records, the ``custom_params``
    of its requests, and the samples it already scored (keys as :func:`sample_keys`)."""

    name: str
    params: dict = field(default_factory=dict)
    done: frozenset | set = frozenset()


def run_ruler(server: Server, tokenizer, work: RulerWorkload, seed: int,
              variants: Sequence[Variant]) -> Iterator[tuple[str, dict]]:
    """Ask every variant each sample it has not scored yet; yield ``(variant name, scored
    record body)``, then the server's counters once, under the first variant's name.

    With several variants, a one-token dense request first puts each sample's prompt in the
    prefix cache: every variant then extends the same cached prefix by its last token (the
    same arithmetic for all), and the server prefills the prompt once, not once each.
    """
    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    for length in work.lengths:
        for task in work.tasks:
            name = _recorded_task(work, task)
            for sample in generate(task, count, length, work.num_samples, seed,
                                   work.max_new_tokens):
                if sample.index not in _indices(work):
                    continue
                todo = [v for v in variants if (name, length, sample.index) not in v.done]
                if todo and len(variants) > 1:  # also for one left in a resumed run
                    prompt = (split_question(sample.prompt)[0] if work.question_in_decode
                              else sample.prompt)
                    server.generate(prompt, 1, custom_params={"kvtier_sparse": False})
                for variant in todo:
                    gen, text = _ask(server, work, sample, tokenizer, count, variant.params)
                    yield variant.name, {
                        "workload": "ruler", "task": name, "length": length,
                        "index": sample.index, "prompt_tokens": gen.prompt_tokens,
                        "score": score(sample.metric, text, sample.answers),
                        "prediction": text, "answers": sample.answers, "ttft_s": gen.ttft_s}
    yield variants[0].name, {
        "workload": "ruler_stats", "question_in_decode": work.question_in_decode,
        "forcing": work.forcing if work.question_in_decode else None,
        "variants": [v.name for v in variants], "sparse": sparse_stats(server)}


def _ask(server: Server, work: RulerWorkload, sample, tokenizer, count,
         params: dict) -> tuple:
    if work.question_in_decode and work.forcing == "tokens":
        return _question_tokens_in_decode(server, sample, tokenizer, params)
    if work.question_in_decode:
        return _question_in_decode(server, sample, count, params)
    gen = server.generate(sample.prompt, sample.max_new_tokens, **_custom(params))
    return gen, gen.text


def _custom(params: dict) -> dict:
    return {"custom_params": params} if params else {}


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


def _question_in_decode(server: Server, sample, count, params: dict) -> tuple:
    """Send the haystack only; the regex forces the question, token by token, then lets the
    model answer on one line. Returns the generation and the text after the question."""
    context, question = split_question(sample.prompt)
    regex = literal_regex(question) + "[^\\n]{1,120}"
    # The regex lets the model spell the question in any tokenization, which may take more
    # tokens than the tokenizer's own: room for twice as many before the answer's.
    gen = server.generate(context, 2 * count(question) + 16 + sample.max_new_tokens,
                          regex=regex, **_custom(params))
    return gen, gen.text[len(question):] if gen.text.startswith(question) else gen.text


def _question_tokens_in_decode(server: Server, sample, tokenizer, params: dict) -> tuple:
    """Send the haystack only; the question follows as the tokenizer's own tokens, one per
    decode step (Quest's protocol), then the model answers on one line (newline tokens
    barred, as the regex protocol bars them). Returns the generation and the answer text."""
    context, question = split_question(sample.prompt)
    forced = tokenizer(question, add_special_tokens=False)["input_ids"]
    gen = server.generate(context, len(forced) + sample.max_new_tokens,
                          logit_processor=processor_string(),
                          custom_params={**params,
                                         **forcing_params(forced, _newline_tokens(tokenizer))})
    if gen.output_ids[:len(forced)] != forced:
        # The measurement is void if the server did not feed exactly these tokens.
        raise RuntimeError(f"the server did not force the question's tokens: sent {forced}, "
                           f"got {gen.output_ids[:len(forced)]}")
    return gen, tokenizer.decode(gen.output_ids[len(forced):], skip_special_tokens=True)


@functools.cache
def _newline_tokens(tokenizer) -> list[int]:
    return [i for i in range(len(tokenizer)) if "\n" in tokenizer.decode([i])]
