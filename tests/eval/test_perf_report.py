"""The CI performance report: ratios against their bounds (the gate), the drift against a
saved baseline (reported, a gate only when asked), and a plain sentence for each."""

import json

from sgl_kvtier.eval.__main__ import main
from sgl_kvtier.eval.perf import machine_id, report


def bench(name, fastest, ratio=None, bound=None):
    extra = {} if ratio is None else {"ratio_name": f"{name} ratio", "ratio": ratio,
                                      "max_ratio": bound}
    return {"name": name, "fullname": f"tests/perf/t.py::{name}", "extra_info": extra,
            "stats": {"min": fastest, "median": fastest * 1.1}}


def write(path, benches):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmarks": benches}))
    return path


def test_everything_within_bounds(tmp_path):
    now = write(tmp_path / "now.json", [bench("a", 0.010, 0.02, 0.25), bench("b", 0.005)])
    write(tmp_path / "base" / machine_id() / "0001_cpu.json",
          [bench("a", 0.008), bench("b", 0.005)])
    table, failures, drifts = report(now, tmp_path / "base")
    assert failures == [] and drifts == []
    assert "| a | 0.020 (bound 0.25) | 10.00 | 1.25x |" in table
    assert "| b | — | 5.00 | 1.00x |" in table and "0001_cpu.json" in table


def test_a_ratio_above_its_bound_fails_and_is_named(tmp_path, capsys):
    now = write(tmp_path / "now.json", [bench("a", 0.010, 0.30, 0.25)])
    write(tmp_path / "base" / machine_id() / "0001_cpu.json", [bench("a", 0.010)])
    table, failures, drifts = report(now, tmp_path / "base")
    assert failures == ["a ratio: ratio 0.300 is above its bound 0.25 by 20%"] and drifts == []
    assert "| a **FAIL** |" in table
    assert main(["perf", str(now), "--baselines", str(tmp_path / "base")]) == 1
    assert "perf: FAILED: a ratio: ratio 0.300" in capsys.readouterr().err


def test_absolute_drift_is_reported_but_gates_only_when_asked(tmp_path, capsys):
    now = write(tmp_path / "now.json", [bench("a", 0.010, 0.20, 0.25), bench("b", 0.030)])
    base = tmp_path / "base" / machine_id()
    write(base / "0001_old.json", [bench("b", 0.001)])
    write(base / "0002_new.json", [bench("a", 0.010), bench("b", 0.010)])  # newest wins
    table, failures, drifts = report(now, tmp_path / "base")
    assert failures == []
    assert drifts == ["tests/perf/t.py::b: fastest round 3.00x the baseline's (tripwire 2.0x)"]
    assert "| b | — | 30.00 | 3.00x drift |" in table
    args = ["perf", str(now), "--baselines", str(tmp_path / "base")]
    assert main(args) == 0
    assert "perf: DRIFT (absolute time, not gated): tests/perf/t.py::b" in capsys.readouterr().err
    assert main(args + ["--fail-on-drift"]) == 1
    assert "perf: FAILED: tests/perf/t.py::b: fastest round 3.00x" in capsys.readouterr().err


def test_no_baseline_for_this_machine_skips_only_the_tripwire(tmp_path, capsys):
    now = write(tmp_path / "now.json", [bench("a", 0.010, 0.02, 0.25)])
    assert main(["perf", str(now), "--baselines", str(tmp_path / "none")]) == 0
    out = capsys.readouterr().out
    assert "no baseline for machine id" in out
    assert "baseline comparison SKIPPED for all 1 benchmarks" in out


def test_a_benchmark_missing_from_the_baseline_is_named_as_skipped(tmp_path):
    now = write(tmp_path / "now.json", [bench("a", 0.010), bench("new", 0.002)])
    write(tmp_path / "base" / machine_id() / "0001_cpu.json", [bench("a", 0.010)])
    table, failures, drifts = report(now, tmp_path / "base")
    assert failures == drifts == [] and "| new | — | 2.00 | no baseline |" in table
    assert "baseline comparison SKIPPED for 1 benchmark(s) absent from 0001_cpu.json" in table
    assert table.rstrip().endswith(": new")


def test_missing_results_file_is_one_clear_line(tmp_path, capsys):
    assert main(["perf", str(tmp_path / "absent.json")]) == 1
    assert "no benchmark results at" in capsys.readouterr().err
