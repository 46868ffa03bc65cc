"""The latency workload: time to first token and decode rate per prompt length.

Per length and repeat, against one running server:

- ``cold``: after ``/flush_cache``, a prompt nothing has seen;
- ``repeat``: the same prompt again (a device prefix-cache hit);
- ``shared``: a different prompt with the cold prompt's first ``shared_prefix_tokens``
  tokens (only when that is non-zero);
- ``restart``: the cold prompts again after the server restarted (what a disk tier keeps).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from sgl_kvtier.eval.spec import LatencyWorkload
from sgl_kvtier.harness.prompts import token_prompt
from sgl_kvtier.harness.server import Generation, Server

__all__ = ["prompts_for", "run_latency", "steps"]

# Offsets into the corpus: each (length, repeat) starts its own text, so no cold prompt
# shares a prefix with anything measured before it (a disk tier would otherwise serve the
# shared prefix of earlier prompts to a "cold" one); its shared-prefix twin keeps its first
# tokens and continues elsewhere.
_OFFSET, _STRIDE = 20_000, 9_973


def prompts_for(tokenizer, work: LatencyWorkload, length: int, repeat: int) -> tuple[list, list]:
    """The (cold, shared) prompts for one length and repeat, as token ids."""
    n_shared = work.shared_prefix_tokens
    start = _OFFSET + _STRIDE * (repeat * len(work.lengths) + work.lengths.index(length))
    cold = token_prompt(tokenizer, length, start)
    shared = cold[:n_shared] + token_prompt(tokenizer, length - n_shared,
                                             start + n_shared + _STRIDE // 2)
    return cold, shared


def steps(work: LatencyWorkload) -> int:
    """Number of measurements per server, for the progress bar."""
    per = 2 + (work.shared_prefix_tokens > 0) + work.restart
    return per * len(work.lengths) * work.repeats


def _fields(phase: str, length: int, repeat: int, gen: Generation) -> dict:
    decode_tokens = max(len(gen.token_times) - 1, 0)
    decode_time = gen.total_s - gen.ttft_s
    return {"workload": "latency", "phase": phase, "prompt_tokens": gen.prompt_tokens,
            "target_tokens": length, "repeat": repeat, "cached_tokens": gen.cached_tokens,
            "ttft_s": gen.ttft_s, "decode_s_per_token": gen.decode_s_per_token,
            "output_tokens": len(gen.output_ids),
            "decode_tok_per_s": decode_tokens / decode_time if decode_time > 0 else None,
            "output_ids": gen.output_ids}


def _generate(server: Server, prompt: list[int], work: LatencyWorkload) -> Generation:
    # Every request decodes the same number of tokens, whatever the model would stop at.
    return server.generate(prompt, work.decode_tokens, ignore_eos=True)


def run_latency(server: Server, restart: Callable[[], Server], tokenizer,
                work: LatencyWorkload) -> Iterator[dict]:
    """Yield one record body per measurement; ``restart`` restarts and returns the server."""
    cases = [(length, r) for length in work.lengths for r in range(work.repeats)]
    for length, r in cases:
        cold, shared = prompts_for(tokenizer, work, length, r)
        server.flush_cache()
        yield _fields("cold", length, r, _generate(server, cold, work))
        yield _fields("repeat", length, r, _generate(server, cold, work))
        if work.shared_prefix_tokens:
            yield _fields("shared", length, r, _generate(server, shared, work))
    if not work.restart:
        return
    server = restart()
    for length, r in cases:
        cold, _ = prompts_for(tokenizer, work, length, r)
        server.flush_cache()  # only what survived the restart may serve the prompt
        yield _fields("restart", length, r, _generate(server, cold, work))
