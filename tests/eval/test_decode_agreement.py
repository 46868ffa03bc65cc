"""The decode_agreement workload without a server: step metrics, comparison of saved
scorings, the summary, its gates and report, and strict validation of the run file."""

import numpy as np
import pytest
from test_agreement import random_probs, scoring

from sgl_kvtier.config import ConfigError
from sgl_kvtier.eval.decode_agreement import compare, decode_metrics, summarise_decode
from sgl_kvtier.eval.gates import DecodeGate, check_gates
from sgl_kvtier.eval.report import markdown
from sgl_kvtier.eval.runner import _server_order
from sgl_kvtier.eval.spec import DecodeAgreementWorkload, load_spec

TAGS = {"git_commit": "abc", "sglang_version": "0.5.23", "hardware": "cpu", "config_hash": "h"}


def test_identical_decode_agrees_at_every_step():
    p = random_probs(np.random.default_rng(0), t=30)
    ids = p.argmax(-1).tolist()
    m = decode_metrics(scoring(p, 10), scoring(p, 10), ids, ids)
    assert m["steps"] == 30 and m["top1_agreement"] == 1.0 and m["first_disagreement"] is None
    assert m["kl_max"] < 1e-6 and m["exact"] and m["prefix_fraction"] == 1.0
    assert m["agree_per_step"] == [1] * 30 and len(m["kl_per_step"]) == 30


def test_a_token_other_than_the_references_argmax_is_a_disagreement_at_its_step():
    p = random_probs(np.random.default_rng(1), t=10)
    ids = p.argmax(-1).tolist()
    taken = list(ids)
    taken[2] = int(np.argsort(-p[2])[1])  # step 3 takes the runner-up
    taken[7] = int(np.argsort(-p[7])[1])
    m = decode_metrics(scoring(p, 10), scoring(p, 10), taken, ids)
    assert m["first_disagreement"] == 3 and m["top1_agreement"] == pytest.approx(0.8)
    assert m["agree_per_step"] == [1, 1, 0, 1, 1, 1, 1, 0, 1, 1]
    assert not m["exact"] and m["prefix_fraction"] == pytest.approx(0.2)
    # How much the reference preferred its own token at steps 3 and 8.
    want = [[t + 1, np.log(p[t].max() / p[t, taken[t]])] for t in (2, 7)]
    assert [s for s, _ in m["margins"]] == [3, 8]
    np.testing.assert_allclose([x for _, x in m["margins"]], [x for _, x in want], atol=1e-3)


def test_a_token_outside_the_references_top_k_gets_a_lower_bound_margin():
    p = random_probs(np.random.default_rng(5), t=4)
    order = np.argsort(-p, axis=-1)
    taken = order[:, 0].tolist()
    taken[1] = int(order[1, -1])  # the reference's least likely token: not in its top 3
    m = decode_metrics(scoring(p, 3), scoring(p, 3), taken, None)
    bound = np.log(p[1, order[1, 0]] / p[1, order[1, 2]])  # top-1 over the 3rd
    assert m["margins"][0][0] == 2 and m["margins"][0][1] == pytest.approx(bound, abs=1e-3)


def test_step_kl_is_the_exact_kl_when_top_k_covers_the_vocabulary():
    rng = np.random.default_rng(2)
    p, q = random_probs(rng, t=40, v=12), random_probs(rng, t=40, v=12)
    exact = (p * np.log(p / q)).sum(-1)
    m = decode_metrics(scoring(p, 12), scoring(q, 12), q.argmax(-1).tolist(), None)
    np.testing.assert_allclose(m["kl_per_step"], exact, rtol=1e-4)
    assert m["kl_mean"] == pytest.approx(exact.mean(), rel=1e-4)
    assert m["top1_agreement"] == pytest.approx(np.mean(p.argmax(-1) == q.argmax(-1)))
    assert m["exact"] is None  # no greedy continuation of the reference to compare with


def test_step_count_mismatch_is_an_error():
    p = random_probs(np.random.default_rng(3), t=5)
    with pytest.raises(ValueError, match="4 tokens for 5 scored steps"):
        decode_metrics(scoring(p, 4), scoring(p, 4), [0, 1, 2, 3], None)


def saved_run(tmp_path):
    """Records as the runner leaves them: servers ``same`` (decodes like the reference) and
    ``off`` (another distribution), reference ``ref`` teacher-forced on both."""
    rng = np.random.default_rng(4)
    (tmp_path / "raw").mkdir()
    records = []
    for prompt in range(2):
        p, q = random_probs(rng, t=24), random_probs(rng, t=24)
        greedy = p.argmax(-1).tolist()
        for server, probs, ids in (("ref", p, greedy), ("same", p, greedy),
                                   ("off", q, q.argmax(-1).tolist())):
            name = f"raw/{server}-{prompt}.npz"
            np.savez(tmp_path / name, **scoring(probs, 8))
            records.append({"workload": "decode_agreement", "kind": "decode", "server": server,
                            "length": 64, "prompt": prompt, "output_ids": ids, "raw": name})
        for other in ("same", "off"):  # the reference sees p whatever the context
            name = f"raw/ref-teacher-{other}-{prompt}.npz"
            np.savez(tmp_path / name, **scoring(p, 8))
            records.append({"workload": "decode_agreement", "kind": "teacher", "server": "ref",
                            "of": other, "length": 64, "prompt": prompt, "raw": name})
    records.append({"workload": "decode_agreement", "kind": "attention_stats", "server": "same",
                    "stats": {"decode_in_place": 30, "decode_multi_run": 20,
                              "decode_gathered": 0}})
    records.append({"workload": "decode_agreement", "kind": "attention_stats", "server": "off",
                    "stats": None})
    return records


def test_compare_and_summary_from_saved_scorings(tmp_path):
    records = saved_run(tmp_path)
    work = DecodeAgreementWorkload(kind="decode_agreement", reference="ref", prompt_tokens=[64])
    compared = [{"server": body["server"], **body} for body in compare(records, tmp_path, work)]
    assert sorted((c["server"], c["prompt"]) for c in compared) == [
        ("off", 0), ("off", 1), ("same", 0), ("same", 1)]
    summary = summarise_decode(records + compared)
    same, off = summary["same"], summary["off"]
    assert same["top1_agreement"] == 1.0 and same["kl"] < 1e-6 and same["greedy_match"] == 1.0
    assert same["steps"] == 48 and same["disagreements"] == 0
    assert same["first_disagreement"] == [None, None]
    assert same["attention_stats"]["decode_multi_run"] == 20 and off["attention_stats"] is None
    assert off["top1_agreement"] < 0.5 and off["kl"] > 0.1 and off["greedy_match"] == 0.0
    assert off["disagreements"] == round(48 * (1 - off["top1_agreement"]))
    assert len(off["margins"]) == off["disagreements"] and same["margins"] == []
    assert off["margins"] == sorted(off["margins"]) and min(off["margins"]) > 0
    assert len(off["agree_by_step"]) == 24 and len(off["kl_by_step"]) == 24
    assert np.mean(off["kl_by_step"]) == pytest.approx(off["kl"])
    text = markdown("t", {}, [], TAGS, True, decoded=summary)
    assert "| same | ref | 2 x 24 | 1.0000 | 0 | none |" in text and "| 1-8 |" in text
    assert f"| {off['disagreements']} | {off['margins'][0]:.2f}, " in text
    assert f"({off['disagreements'] - 8} more)" in text
    assert "20 (not kvtier)" not in text and "— (not kvtier)" in text and "30 (20) / 0" in text


def decode_summary(**kl_and_top1) -> dict:
    return {server: {"kl": kl, "top1_agreement": top1, "greedy_match": 1.0}
            for server, (kl, top1) in kl_and_top1.items()}


@pytest.mark.parametrize("gate,value,passed", [
    ({"metric": "decode_kl", "server": "a", "baseline": "b", "max_ratio": 1.25}, 1.2, True),
    ({"metric": "decode_kl", "server": "b", "baseline": "a", "max_ratio": 1.25}, 1 / 1.2, True),
    ({"metric": "decode_top1_agreement", "server": "a", "baseline": "b", "max_drop": 0.01},
     0.02, False),
    ({"metric": "decode_top1_agreement", "server": "a", "min_value": 0.9}, 0.96, True),
    ({"metric": "decode_kl", "server": "a", "max_value": 0.001}, 0.012, False),
    ({"metric": "decode_greedy_match", "server": "a", "min_value": 1.0}, 1.0, True),
])
def test_decode_gates(gate, value, passed):
    decoded = decode_summary(a=(0.012, 0.96), b=(0.010, 0.98))
    verdict, = check_gates([DecodeGate(**gate)], {}, decode=decoded)
    assert verdict["value"] == pytest.approx(value) and verdict["passed"] is passed


def test_decode_kl_ratio_to_a_baseline_that_matches_the_reference_exactly():
    gate = DecodeGate(metric="decode_kl", server="a", baseline="b", max_ratio=1.25)
    assert check_gates([gate], {}, decode=decode_summary(a=(0.0, 1), b=(0.0, 1)))[0]["passed"]
    verdict, = check_gates([gate], {}, decode=decode_summary(a=(1e-6, 1), b=(0.0, 1)))
    assert verdict["value"] == float("inf") and not verdict["passed"]
    missing, = check_gates([gate], {}, decode=decode_summary(a=(0.0, 1)))
    assert missing["why"] == "not measured in this run"


GOOD = """
name: t
servers:
  - {name: ref, args: [--attention-backend, torch_native, --dtype, float32]}
  - {name: a, args: [--attention-backend, torch_native]}
  - {name: b, args: [--enable-kvtier]}
workloads:
  - {kind: decode_agreement, reference: ref, prompt_tokens: [512, 2048], prompts: [5, 2]}
gates:
  - {metric: decode_kl, server: b, baseline: a, max_ratio: 1.25}
"""


def test_good_decode_spec_parses_and_the_reference_runs_last(tmp_path):
    (tmp_path / "run.yaml").write_text(GOOD)
    spec = load_spec(tmp_path / "run.yaml")
    work = spec.workloads[0]
    assert work.prompt_counts() == [5, 2] and work.decode_tokens == 64 and work.slot_runs == 3
    assert [[s.name for s in g] for g in _server_order(spec)] == [["a"], ["b"], ["ref"]]


@pytest.mark.parametrize("change,fragment", [
    (("reference: ref", "reference: z"), "decode_agreement reference names server 'z'"),
    (("prompts: [5, 2]", "prompts: [5]"), "one positive count, or one per prompt_tokens"),
    (("prompts: [5, 2]", "prompts: 0"), "one positive count"),
    (("prompts: [5, 2]", "decode_tokens: 16"), "workloads.0.decode_tokens"),
    (("prompts: [5, 2]", "slot_runs: 9"), "workloads.0.slot_runs"),
    (("prompts: [5, 2]", "top_k: 20, tokens: 3"), "workloads.0.tokens: unknown key"),
    (("prompt_tokens: [512, 2048]", "prompt_tokens: [4, 2048]"), "at least 2 * slot_runs"),
    (("baseline: a, max_ratio", "baseline: ref, max_ratio"), "compares the reference server"),
    (("baseline: a, max_ratio: 1.25", "max_ratio: 1.25"), "need a baseline server"),
    (("baseline: a, max_ratio: 1.25", "baseline: a, max_value: 0.1"), "need a baseline"),
    (("max_ratio: 1.25", "max_ratio: 1.25, max_drop: 0.1"), "exactly one of"),
    (("{kind: decode_agreement, reference: ref, prompt_tokens: [512, 2048], prompts: [5, 2]}",
      "{kind: latency, lengths: [64]}"), "gate on decode_kl needs a decode_agreement"),
    (("  - {kind: decode", "  - {kind: decode_agreement, reference: a, prompt_tokens: [64]}\n"
                          "  - {kind: decode"), "at most one decode_agreement workload"),
])
def test_decode_mistakes_name_the_key(tmp_path, change, fragment):
    path = tmp_path / "run.yaml"
    path.write_text(GOOD.replace(*change))
    with pytest.raises(ConfigError) as info:
        load_spec(path)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_a_lone_reference_is_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("name: t\nservers: [{name: ref}]\nworkloads:\n"
                    "  - {kind: decode_agreement, reference: ref, prompt_tokens: [64]}\n")
    with pytest.raises(ConfigError, match="needs a server besides its reference"):
        load_spec(path)
