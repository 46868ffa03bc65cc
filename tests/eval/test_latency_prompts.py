"""Latency prompts: exact lengths, distinct cold prompts, the shared prefix really shared."""

import pytest

from sgl_kvtier.eval.latency import prompts_for
from sgl_kvtier.eval.spec import LatencyWorkload
from sgl_kvtier.harness.prompts import load_tokenizer


@pytest.mark.parametrize("shared", [0, 256])
def test_prompts_for_every_length_and_repeat(model_dir, shared):
    tok = load_tokenizer(model_dir)
    work = LatencyWorkload(kind="latency", lengths=[1024, 4096, 8000], repeats=5,
                           shared_prefix_tokens=shared)
    colds = []
    for length in work.lengths:
        for r in range(work.repeats):
            cold, other = prompts_for(tok, work, length, r)
            assert len(cold) == len(other) == length
            assert cold[:shared] == other[:shared]
            assert cold[shared:shared + 8] != other[shared:shared + 8]
            colds.append(cold)
    # No two cold prompts start alike: each is cold even where a disk tier kept the others.
    heads = {tuple(c[:16]) for c in colds}
    assert len(heads) == len(colds)
