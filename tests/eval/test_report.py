"""Summaries, gates, the Markdown report and the plot, from records of a known shape."""

from sgl_kvtier.eval.gates import AgreementGate, ScoreGate, check_gates
from sgl_kvtier.eval.gates import LatencyGate as Gate
from sgl_kvtier.eval.report import markdown, plot_ttft, summarise

TAGS = {"git_commit": "abc", "sglang_version": "0.5.23", "hardware": "cpu x2",
        "config_hash": "123"}


def rec(server, phase, length, ttft, decode=0.1, cached=0):
    return {"workload": "latency", "server": server, "phase": phase, "target_tokens": length,
            "prompt_tokens": length, "ttft_s": ttft, "decode_s_per_token": decode,
            "cached_tokens": cached}


RECORDS = [rec("a", "cold", 512, 2.0), rec("a", "cold", 512, 4.0), rec("a", "repeat", 512, 1.0),
           rec("b", "cold", 512, 2.0), rec("b", "repeat", 512, 0.2, cached=511),
           rec("b", "repeat", 512, 0.3, cached=511)]


def test_summary_takes_medians_per_server_phase_length():
    s = summarise(RECORDS)
    assert s[("a", "cold", 512)]["ttft_s"] == 3.0 and s[("a", "cold", 512)]["n"] == 2
    assert s[("b", "repeat", 512)]["ttft_s"] == 0.25
    assert s[("b", "repeat", 512)]["cached_tokens"] == 511


def test_ratio_gates_pass_and_fail():
    s = summarise(RECORDS)
    ok = Gate(metric="ttft_s", phase="repeat", server="b", baseline="a", prompt_tokens=512,
              max_ratio=0.5)
    bad = Gate(metric="ttft_s", phase="repeat", server="b", baseline="a", prompt_tokens=512,
               max_ratio=0.1)
    missing = Gate(metric="ttft_s", phase="restart", server="b", baseline="a",
                   prompt_tokens=512, max_ratio=0.5)
    v_ok, v_bad, v_missing = check_gates([ok, bad, missing], s)
    assert v_ok["passed"] and abs(v_ok["value"] - 0.25) < 1e-9
    assert not v_bad["passed"]
    assert not v_missing["passed"] and v_missing["why"] == "not measured in this run"


def test_markdown_marks_partial_runs():
    s = summarise(RECORDS)
    full = markdown("t", s, check_gates([], s), TAGS, complete=True)
    partial = markdown("t", s, [], TAGS, complete=False)
    assert "| b | repeat | 512 | 511 | 0.250 |" in full and "INCOMPLETE" not in full
    assert partial.splitlines()[2].startswith("**INCOMPLETE")


def test_plot_is_a_png(tmp_path):
    path = plot_ttft(summarise(RECORDS), tmp_path / "ttft.png", "t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_ttft({}, tmp_path / "none.png", "t") is None


def test_ruler_scores_table_and_plot(tmp_path):
    from sgl_kvtier.eval.report import plot_scores, summarise_scores

    def r(server, task, length, score):
        return {"workload": "ruler", "server": server, "task": task, "length": length,
                "score": score}

    records = [r("a", "vt", 512, 100.0), r("a", "vt", 512, 50.0), r("a", "fwe", 512, 0.0),
               r("b", "vt", 512, 100.0), r("b", "fwe", 512, 100.0)]
    scores = summarise_scores(records)
    assert scores[("a", "vt", 512)] == {"score": 75.0, "n": 2}
    assert scores[("a", "mean", 512)]["score"] == 37.5
    text = markdown("t", {}, [], TAGS, True, scores)
    assert "| vt | 75.0 (n=2) | 100.0 (n=1) |" in text and "| mean | 37.5 | 100.0 |" in text
    assert plot_scores(scores, tmp_path / "s.png", "t").read_bytes()[:4] == b"\x89PNG"
    forced = summarise_scores(records + [r("a", "vt:decode", 512, 10.0)])
    assert forced[("a", "mean", 512)]["score"] == 37.5  # the plain tasks only
    assert forced[("a", "mean:decode", 512)] == {"score": 10.0, "n": 1}
    only_forced = summarise_scores([r("a", "vt:decode", 512, 10.0)])
    assert plot_scores(only_forced, tmp_path / "f.png", "t") is not None


def test_score_and_agreement_gates():
    from sgl_kvtier.eval.report import summarise_scores

    def r(server, task, score):
        return {"workload": "ruler", "server": server, "task": task, "length": 512,
                "score": score}

    scores = summarise_scores([r("a", "vt", 100.0), r("b", "vt", 80.0), r("a", "fwe", 50.0),
                               r("b", "fwe", 50.0)])
    agreed = {"b": {"reference": "a", "top1_agreement": 0.995, "kl": 2e-4,
                    "greedy_match": 0.75}}
    gates = [ScoreGate(metric="score", server="b", baseline="a", task="vt", length=512,
                       max_drop=10.0),
             ScoreGate(metric="score", server="b", length=512, min_value=60.0),
             ScoreGate(metric="score", server="b", length=1024, min_value=1.0),
             AgreementGate(metric="top1_agreement", server="b", min_value=0.99),
             AgreementGate(metric="kl", server="b", max_value=1e-4),
             AgreementGate(metric="greedy_match", server="c", min_value=0.5)]
    drop, mean, missing, top1, kl, nobody = check_gates(gates, {}, scores, agreed)
    assert drop["value"] == 20.0 and not drop["passed"] and drop["why"] == "<= 10.0"
    assert mean["value"] == 65.0 and mean["passed"]
    assert not missing["passed"] and missing["why"] == "not measured in this run"
    assert top1["passed"] and not kl["passed"] and not nobody["passed"]
    text = markdown("t", {}, [drop, top1], TAGS, True, scores, agreed)
    assert "| score vt @512: b / a | 20 | <= 10.0 | FAIL |" in text
    assert "| top1_agreement: b vs reference | 0.995 | >= 0.99 | pass |" in text


def test_latency_gate_against_another_phase():
    records = [rec("t", "restart", 512, 0.30), rec("t", "repeat", 512, 0.25),
               rec("t", "cold", 512, 3.0)]
    s = summarise(records)
    near = Gate(metric="ttft_s", phase="restart", server="t", baseline="t",
                baseline_phase="repeat", prompt_tokens=512, max_ratio=1.3)
    faster = Gate(metric="ttft_s", phase="restart", server="t", baseline="t",
                  baseline_phase="cold", prompt_tokens=512, max_ratio=0.05)
    v_near, v_faster = check_gates([near, faster], s)
    assert v_near["passed"] and abs(v_near["value"] - 1.2) < 1e-9
    assert not v_faster["passed"] and abs(v_faster["value"] - 0.1) < 1e-9
    assert "ttft_s restart @512: t / t repeat" in markdown("t", s, [v_near], TAGS, True)


REPORT_SPEC = """name: again
model: smollm2
servers:
  - {name: a, args: [--enable-kvtier], kvtier: {}}
  - {name: b, host: a, request_params: {kvtier_sparse: false}}
workloads:
  - {kind: ruler, reference: a, tasks: [vt], lengths: [512], num_samples: 2}
gates:
  - {metric: score, server: b, baseline: a, task: vt, length: 512, max_drop: 10}
"""


def _folder(tmp_path, complete: bool):
    import json

    folder = tmp_path / ("done" if complete else "partial")
    folder.mkdir()
    (folder / "spec.yaml").write_text(REPORT_SPEC)
    tags = {"run": "again", "config_hash": "c0ffee", "git_commit": "abc",
            "sglang_version": "0.5.23", "hardware": "cpu x2"}
    records = [{"workload": "ruler", "server": s, "task": t, "length": 512, "index": i,
                "score": score, **tags}
               for s, t, i, score in [("a", "vt", 0, 100.0), ("b", "vt", 0, 0.0),
                                      ("a", "vt:decode", 0, 100.0), ("b", "vt:decode", 0, 100.0)]]
    (folder / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records)
                                          + '{"cut sh')  # a killed run's last line
    if complete:
        (folder / "COMPLETE").write_text("c0ffee\n")
    return folder


def test_report_rewrites_a_folder_from_its_records(tmp_path, capsys):
    """``report FOLDER``: today's tables from the records, nothing added, gates judged only
    for a complete run."""
    from sgl_kvtier.eval.__main__ import main

    done = _folder(tmp_path, complete=True)
    before = (done / "records.jsonl").read_text()
    assert main(["report", str(done)]) == 1  # the score gate fails: b is 100 points below a
    summary = (done / "summary.md").read_text()
    assert "run file c0ffee" in summary and "FAIL" in summary
    assert "| mean:decode | +0.0, one pair, no interval (ref 100) |" in summary
    assert "| vt | -100.0, one pair, no interval (ref 100) |" in summary  # not **below**
    assert (done / "score.png").is_file() and (done / "records.jsonl").read_text() == before
    capsys.readouterr()
    partial = _folder(tmp_path, complete=False)
    assert main(["report", str(partial)]) == 0 and "FAIL" not in capsys.readouterr().out
    assert main(["report", str(tmp_path / "nowhere")]) == 1
    assert "not a run folder" in capsys.readouterr().err
