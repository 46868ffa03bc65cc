"""Paired score differences, the forced-question split and their run-file keys."""

import re

import pytest
from pydantic import ValidationError
from scipy.stats import ttest_rel

from sgl_kvtier.eval.accuracy import literal_regex, split_question
from sgl_kvtier.eval.paired import mean_interval, paired_differences
from sgl_kvtier.eval.report import markdown
from sgl_kvtier.eval.ruler import generate
from sgl_kvtier.eval.spec import RulerWorkload

TAGS = {"git_commit": "abc", "sglang_version": "0.5.23", "hardware": "cpu x2",
        "config_hash": "123"}


def rec(server, task, index, score, length=4096):
    return {"workload": "ruler", "server": server, "task": task, "length": length,
            "index": index, "score": score}


def test_interval_matches_the_paired_t_test():
    a = [100, 100, 0, 100, 0, 100, 100, 0, 100, 100]
    b = [100, 0, 0, 100, 0, 100, 0, 0, 100, 100]
    mean, low, high = mean_interval([x - y for x, y in zip(b, a)])
    assert mean == pytest.approx(-20)
    # The interval excludes 0 exactly when the paired t-test rejects at 5 %.
    p = ttest_rel(b, a).pvalue
    assert (high < 0) == (p < 0.05)
    assert mean_interval([5.0]) == (5.0, 5.0, 5.0)
    assert mean_interval([3.0, 3.0, 3.0]) == (3.0, 3.0, 3.0)


def test_differences_pair_by_sample_and_pool_tasks_in_the_mean():
    records = [rec("dense", "niah", i, s) for i, s in enumerate([100, 100, 0, 100])]
    records += [rec("sparse", "niah", i, s) for i, s in enumerate([100, 0, 0, 100])]
    records += [rec("dense", "qa", i, s) for i, s in enumerate([0, 100, 0, 0])]
    records += [rec("sparse", "qa", i, s) for i, s in enumerate([100, 100, 0, 0])]
    records += [rec("sparse", "qa", 9, 100)]  # no dense partner: left out
    out = paired_differences(records, "dense")
    assert set(out) == {("sparse", "niah", 4096), ("sparse", "qa", 4096),
                        ("sparse", "mean", 4096)}
    assert out[("sparse", "niah", 4096)]["diff"] == -25
    assert out[("sparse", "niah", 4096)]["reference_score"] == 75
    assert out[("sparse", "qa", 4096)]["n"] == 4 and out[("sparse", "qa", 4096)]["diff"] == 25
    assert out[("sparse", "mean", 4096)]["diff"] == 0 and out[("sparse", "mean", 4096)]["n"] == 8
    text = markdown("t", {}, [], TAGS, True, paired=out, reference="dense")
    assert "paired sample by sample" in text and "-25.0 [" in text


def test_forced_question_tasks_pool_in_their_own_mean():
    """Two workloads, two means: a forced-question loss does not move the plain mean."""
    records = [rec("dense", "niah", i, 100) for i in range(4)]
    records += [rec("sparse", "niah", i, 100) for i in range(4)]
    records += [rec("dense", "niah:decode", i, 100) for i in range(4)]
    records += [rec("sparse", "niah:decode", i, 0 if i == 0 else 100) for i in range(4)]
    out = paired_differences(records, "dense")
    assert out[("sparse", "mean", 4096)]["diff"] == 0 and out[("sparse", "mean", 4096)]["n"] == 4
    assert out[("sparse", "mean:decode", 4096)]["diff"] == -25
    text = markdown("t", {}, [], TAGS, True, paired=out, reference="dense")
    rows = [line.split(" |")[0] for line in text.splitlines() if line.startswith("| ")]
    assert rows[-2:] == ["| mean", "| mean:decode"]


def test_an_interval_wholly_below_zero_is_marked():
    records = [rec("dense", "niah", i, 100) for i in range(6)]
    records += [rec("sparse", "niah", i, 0 if i < 5 else 100) for i in range(6)]
    out = paired_differences(records, "dense")
    assert out[("sparse", "niah", 4096)]["high"] < 0
    assert "**below**" in markdown("t", {}, [], TAGS, True, paired=out, reference="dense")


def test_a_niah_prompt_splits_at_its_question_and_the_regex_is_literal():
    sample = generate("niah_single_2", lambda s: len(s) // 4, 2048, 1)[0]
    context, question = split_question(sample.prompt)
    assert context + question == sample.prompt
    assert question.startswith("What are all the special magic") and "\n" not in question
    assert sample.answers[0] in context and sample.answers[0] not in question
    assert re.fullmatch(literal_regex(question), question)
    assert re.fullmatch(literal_regex("a.b?(c)"), "a.b?(c)")
    assert not re.fullmatch(literal_regex("a.b"), "axb")
    with pytest.raises(ValueError, match="no question line"):
        split_question("no question here")


def test_question_in_decode_takes_niah_tasks_only():
    RulerWorkload(kind="ruler", tasks=["niah_single_1"], lengths=[4096],
                  question_in_decode=True)
    with pytest.raises(ValidationError, match="niah tasks only; got 'vt'"):
        RulerWorkload(kind="ruler", tasks=["niah_single_1", "vt"], lengths=[4096],
                      question_in_decode=True)
