"""The offline RULER generator: reproducible, fitted to the token budget, answerable, and
scored like RULER."""

import pytest

from sgl_kvtier.eval.accuracy import sample_keys, steps
from sgl_kvtier.eval.ruler import TASKS, generate
from sgl_kvtier.eval.ruler.data import split_sentences
from sgl_kvtier.eval.ruler.scoring import string_match_all, string_match_part
from sgl_kvtier.eval.spec import RulerWorkload
from sgl_kvtier.harness.prompts import load_tokenizer

MAX_LEN = 1024


@pytest.fixture(scope="module")
def count(model_dir):
    tok = load_tokenizer(model_dir)
    return lambda text: len(tok(text, add_special_tokens=False)["input_ids"])


def test_the_eleven_tasks():
    assert sorted(TASKS) == sorted(
        ["niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
         "niah_multivalue", "niah_multiquery", "vt", "fwe", "qa_1", "qa_2"])


@pytest.mark.parametrize("task", sorted(TASKS))
def test_samples_fit_and_can_be_answered(task, count):
    samples = generate(task, count, MAX_LEN, num_samples=2, seed=7)
    for s in samples:
        budget = MAX_LEN - s.max_new_tokens
        assert count(s.prompt) == s.prompt_tokens <= budget
        assert s.prompt_tokens >= 0.8 * budget  # filled, not just barely started
        assert s.answers and all(s.answers)
        if task != "qa_2":  # HotpotQA answers (yes/no, syntheses) need not appear verbatim
            assert all(a in s.prompt for a in s.answers)
    assert samples[0].prompt != samples[1].prompt


@pytest.mark.parametrize("task", ["niah_multiquery", "vt", "qa_1"])
def test_same_seed_same_samples_other_seed_other_samples(task, count):
    a = generate(task, count, MAX_LEN, num_samples=2, seed=1)
    assert a == generate(task, count, MAX_LEN, num_samples=2, seed=1)
    assert a[0].prompt != generate(task, count, MAX_LEN, num_samples=1, seed=2)[0].prompt


@pytest.mark.parametrize("task", ["niah_multikey_1", "fwe"])
def test_a_sample_does_not_depend_on_how_many_are_drawn(task, count):
    """What ``indices`` rests on: sample i of a 2-sample run is sample i of a 4-sample one,
    so a second look at chosen samples asks the very prompts the larger run asked."""
    assert generate(task, count, MAX_LEN, num_samples=4, seed=3)[1] == \
        generate(task, count, MAX_LEN, num_samples=2, seed=3)[1]


def test_indices_choose_the_samples_scored():
    work = RulerWorkload(kind="ruler", tasks=["vt", "qa_1"], lengths=[512, 1024],
                         num_samples=7, indices=[6, 2])
    assert sample_keys(work) == {(t, n, i) for t in ("vt", "qa_1") for n in (512, 1024)
                                 for i in (2, 6)}
    assert steps(work) == 2 * 2 * 2 + 1
    decode = work.model_copy(update={"tasks": ["niah_single_2"], "question_in_decode": True,
                                     "indices": None})
    assert {i for _, _, i in sample_keys(decode)} == set(range(7))
    assert {t for t, _, _ in sample_keys(decode)} == {"niah_single_2:decode"}


def test_multiquery_asks_for_every_value_of_four_keys(count):
    s = generate("niah_multiquery", count, MAX_LEN, 1)[0]
    assert len(s.answers) == 4 and s.prompt.count("One of the special magic numbers") >= 4
    assert s.prompt.endswith("mentioned in the provided text are")


def test_vt_answer_is_the_whole_chain(count):
    s = generate("vt", count, MAX_LEN, 1)[0]
    assert len(s.answers) == 5 and all(len(n) == 5 and n.isupper() for n in s.answers)


def test_fwe_answers_are_the_most_frequent_shown_words(count):
    s = generate("fwe", count, MAX_LEN, 1)[0]
    text = s.prompt.split("\n")[1].split()
    frequencies = sorted({w: text.count(w) for w in set(text) if w != "..."}.items(),
                         key=lambda kv: -kv[1])
    assert [w for w, _ in frequencies[:3]] == s.answers


def test_max_new_tokens_override_changes_the_budget(count):
    s = generate("niah_single_1", count, MAX_LEN, 1, max_new_tokens=16)[0]
    assert s.max_new_tokens == 16 and s.prompt_tokens > MAX_LEN - 128


def test_unknown_task():
    with pytest.raises(KeyError, match="unknown RULER task 'cwe'"):
        generate("cwe", len, MAX_LEN, 1)


def test_scoring():
    assert string_match_all(" 123 and 456\x07", ["123", "456", "789"]) == pytest.approx(200 / 3)
    assert string_match_all("The answer: FRANCE", ["france"]) == 100.0
    assert string_match_part("paris, maybe", ["Lyon", "Paris"]) == 100.0
    assert string_match_part("no idea", ["Lyon", "Paris"]) == 0.0


def test_sentence_splitter():
    text = "It works. Does it? Yes! 3 cats came. e.g. this stays"
    assert split_sentences(text) == ["It works.", "Does it?", "Yes!",
                                     "3 cats came. e.g. this stays"]
