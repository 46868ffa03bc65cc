"""Force a request's first output tokens on the server: Quest's protocol, exactly.

A needle question fed through decode steps must arrive as the tokenizer's own tokens, one per
step, as Quest and ``eval/sparse_selection_decode.py`` feed it. A regex constraint does not
do that: it lets the model spell the question in any tokenization, and a model that attends
less (sparse decode) spells it worse, so the measurement mixes the selection's loss with a
longer, stranger question. :class:`ForcedTokens` is an SGLang custom logit processor (the
server needs ``--enable-custom-logit-processor`` and ``--disable-overlap-schedule``: the
overlap scheduler samples a step before it appends the previous token, and the processor
counts the request's output so far): while a request has produced fewer tokens
than ``forced``, only the next forced token may be sampled; afterwards the ``barred`` tokens
(e.g. those containing a newline, to keep the answer on one line) may not be.

The processor is duck-typed (SGLang calls it with the logits and one parameter dict per row)
so that this module imports no SGLang; it is sent by reference, so the server imports it
from this installed package.
"""

from __future__ import annotations

import json
import pickle

import torch

__all__ = ["ForcedTokens", "processor_string", "forcing_params"]


class ForcedTokens:
    """Per row: the next forced token only, then anything but the barred tokens."""

    def __call__(self, logits: torch.Tensor, custom_param_list: list | None = None
                 ) -> torch.Tensor:
        """``logits (B, V)`` for the rows SGLang selected; ``custom_param_list`` one dict
        per row with ``forced``, ``barred`` (token ids) and SGLang's ``__req__``."""
        for row, params in enumerate(custom_param_list or []):
            if not params or "forced" not in params:
                continue
            step, forced = len(params["__req__"].output_ids), params["forced"]
            if step < len(forced):
                logits[row] = float("-inf")
                logits[row, forced[step]] = 0.0
            elif params.get("barred"):
                logits[row, params["barred"]] = float("-inf")
        return logits


def processor_string() -> str:
    """The request field ``custom_logit_processor`` for :class:`ForcedTokens` (SGLang's
    serialised form: a pickle, here a reference to this module's class)."""
    return json.dumps({"callable": pickle.dumps(ForcedTokens).hex()})


def forcing_params(forced: list[int], barred: list[int] | None = None) -> dict:
    """The sampling parameters' ``custom_params`` for one request."""
    return {"forced": [int(t) for t in forced], "barred": [int(t) for t in barred or []]}
