"""Long prompts from text that ships with every Python (``pydoc_data.topics``, ~465k chars)."""

from __future__ import annotations

import functools
from pathlib import Path

__all__ = ["corpus", "token_prompt", "load_tokenizer"]


@functools.cache
def corpus() -> str:
    """CPython's own reference-manual topics, concatenated in a fixed order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


@functools.cache
def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def token_prompt(tokenizer, num_tokens: int, offset: int = 0) -> list[int]:
    """``num_tokens`` token ids of the corpus, starting ``offset`` tokens in (taken modulo
    the room the corpus leaves, so any offset works).

    Different offsets give prompts that share no prefix (for cold measurements).
    """
    ids = _corpus_ids(tokenizer)
    if num_tokens > len(ids):
        raise ValueError(f"the corpus has {len(ids)} tokens; asked for {num_tokens}")
    start = offset % (len(ids) - num_tokens + 1)
    return ids[start:start + num_tokens]


@functools.cache
def _corpus_ids(tokenizer) -> list[int]:
    return tokenizer(corpus(), add_special_tokens=False)["input_ids"]
