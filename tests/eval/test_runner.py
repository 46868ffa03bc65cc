"""The runner against real servers: a complete run folder, a server that cannot start, and
Ctrl-C in the middle — never a process left behind."""

import json
import signal
import subprocess
import sys
import time

import pytest

from sgl_kvtier.eval.__main__ import main
from sgl_kvtier.harness.server import group_alive

pytestmark = pytest.mark.integration

SMALL = """
name: small
model: smollm2
server_defaults: [--device, cpu, --dtype, float32, --max-total-tokens, "8192", --sleep-on-idle]
servers:
  - {name: kvtier, args: [--enable-kvtier], kvtier: {}}
workloads:
  - {kind: latency, lengths: [96, 192], shared_prefix_tokens: 32, decode_tokens: 4,
     restart: RESTART}
  - {kind: ruler, tasks: [niah_single_1, qa_1], lengths: [384], num_samples: 1,
     max_new_tokens: 8}
gates:
  - {metric: ttft_s, phase: repeat, server: kvtier, prompt_tokens: 192, max_value: 1000.0}
"""


def alive(pgid: int) -> bool:
    return group_alive(pgid)


def events(folder):
    return [json.loads(line) for line in (folder / "events.jsonl").read_text().splitlines()]


def test_complete_run_folder(tmp_path, capsys):
    (tmp_path / "small.yaml").write_text(SMALL.replace("RESTART", "true"))
    assert main(["run", str(tmp_path / "small.yaml"), "--out", str(tmp_path / "runs")]) == 0
    folder = next((tmp_path / "runs").iterdir())
    assert {p.name for p in folder.iterdir()} >= {"spec.yaml", "records.jsonl", "events.jsonl",
                                                  "summary.md", "ttft.png", "COMPLETE", "logs"}
    records = [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]
    scored = [r for r in records if r["workload"] == "ruler"]
    records = [r for r in records if r["workload"] == "latency"]
    assert [r["phase"] for r in records] == ["cold", "repeat", "shared"] * 2 + ["restart"] * 2
    assert [r["task"] for r in scored] == ["niah_single_1", "qa_1"]
    assert all(0 <= r["score"] <= 100 and 180 < r["prompt_tokens"] <= 384 - 8 for r in scored)
    assert (folder / "score.png").is_file()
    for r in records:
        assert r["git_commit"] and r["sglang_version"] == "0.5.23" and r["hardware"]
        assert r["config_hash"] == records[0]["config_hash"] and r["server"] == "kvtier"
    by_phase = {(r["phase"], r["target_tokens"]): r for r in records}
    assert by_phase[("repeat", 192)]["cached_tokens"] == 191
    assert by_phase[("shared", 192)]["cached_tokens"] >= 32
    assert by_phase[("restart", 192)]["cached_tokens"] == 0  # nothing survives a restart yet
    assert by_phase[("restart", 192)]["output_ids"] == by_phase[("cold", 192)]["output_ids"]
    pids = [e["pid"] for e in events(folder) if e["event"] == "stop"]
    assert len(pids) == 2 and not any(alive(p) for p in pids)
    out = capsys.readouterr().out
    assert "| kvtier | repeat | 192 | 191 |" in out and "| niah_single_1 |" in out


def test_server_that_cannot_start(tmp_path, capsys):
    spec = SMALL.replace("RESTART", "false").replace("args: [--enable-kvtier]",
                                                     "args: [--enable-kvtier, --no-such-flag]")
    (tmp_path / "bad.yaml").write_text(spec)
    assert main(["run", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "runs")]) == 1
    err = capsys.readouterr().err
    assert "server exited with status 2 during start-up" in err
    assert "unrecognized arguments: --no-such-flag" in err  # the log's last lines
    folder = next((tmp_path / "runs").iterdir())
    assert not (folder / "COMPLETE").exists()
    assert "INCOMPLETE" in (folder / "summary.md").read_text()


def interrupt_after_first_record(spec_path, runs):
    """Start a run, Ctrl-C it once its first record is written; returns (returncode,
    stderr, run folder)."""
    # A shell that starts a job in the background (`cmd &` without job control) has it
    # ignore SIGINT, and the runner would inherit that: give it the default disposition, as
    # a terminal does, so the Ctrl-C below lands however the tests were started.
    proc = subprocess.Popen([sys.executable, "-m", "sgl_kvtier.eval", "run", str(spec_path),
                             "--out", str(runs)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    records = None
    while time.monotonic() < deadline and proc.poll() is None:
        found = list(runs.glob("*/records.jsonl"))
        if found and found[0].read_text().strip():
            records = found[0]
            break
        time.sleep(0.2)
    assert records is not None, proc.stderr.read() if proc.poll() is not None else "timeout"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err, records.parent


def test_ctrl_c_stops_the_server_and_marks_the_run_incomplete(tmp_path):
    (tmp_path / "small.yaml").write_text(SMALL.replace("RESTART", "false"))
    returncode, err, folder = interrupt_after_first_record(tmp_path / "small.yaml",
                                                           tmp_path / "runs")
    assert returncode == 130, err[-2000:]
    assert "interrupted: servers stopped" in err
    assert not (folder / "COMPLETE").exists()
    assert "INCOMPLETE" in (folder / "summary.md").read_text()
    ready = [e["pid"] for e in events(folder) if e["event"] == "ready"]
    assert ready and not any(alive(p) for p in ready)


RULER_ONLY = """
name: ruler_only
model: smollm2
server_defaults: [--device, cpu, --dtype, float32, --max-total-tokens, "8192", --sleep-on-idle]
servers:
  - {name: first, args: [--enable-kvtier], kvtier: {}}
  - {name: second, args: [--enable-kvtier], kvtier: {}}
workloads:
  - {kind: ruler, tasks: [niah_single_1], lengths: [384], num_samples: 8, max_new_tokens: 8}
"""


def test_an_interrupted_run_resumes_where_it_stopped(tmp_path, capsys):
    spec = tmp_path / "ruler_only.yaml"
    spec.write_text(RULER_ONLY)
    returncode, err, folder = interrupt_after_first_record(spec, tmp_path / "runs")
    assert returncode == 130, err[-2000:]
    before = [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]
    before = [r for r in before if r["workload"] == "ruler"]
    assert 1 <= len(before) < 8 and {r["server"] for r in before} == {"first"}  # it stopped
    # A process killed mid-write leaves half a line: the resumed run drops it.
    with open(folder / "records.jsonl", "a") as f:
        f.write('{"workload": "ruler", "server": "fi')
    other = tmp_path / "other.yaml"
    other.write_text(RULER_ONLY.replace("num_samples: 8", "num_samples: 9"))
    assert main(["run", str(other), "--resume", str(folder)]) == 1
    assert "a resumed run must use the same file" in capsys.readouterr().err

    assert main(["run", str(spec), "--resume", str(folder)]) == 0
    records = [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]
    scored = [(r["server"], r["index"]) for r in records if r["workload"] == "ruler"]
    assert sorted(scored) == [(s, i) for s in ("first", "second") for i in range(8)]
    assert scored[:len(before)] == [("first", r["index"]) for r in before]  # kept, not redone
    resumed = [e for e in events(folder) if e["event"] == "resume"]
    assert len(resumed) == 1 and resumed[0]["records"] == len(before)
    assert (folder / "COMPLETE").exists() and "| niah_single_1 |" in capsys.readouterr().out
    assert main(["run", str(spec), "--resume", str(folder)]) == 1
    assert "already complete" in capsys.readouterr().err


def test_dummy_weights_shape_runs_with_a_borrowed_tokenizer(tmp_path):
    # The mechanism of gpu_llama8b.yaml (a published shape, random weights, a tokenizer
    # smaller than the model's vocabulary), at a size a CPU runs in seconds.
    spec = """
name: dummy
model: tiny-llama-test
server_defaults: [--device, cpu, --dtype, float32, --max-total-tokens, "8192",
                  --sleep-on-idle, --load-format, dummy]
servers:
  - {name: kvtier, args: [--enable-kvtier], kvtier: {}}
workloads:
  - {kind: latency, lengths: [256], decode_tokens: 8, restart: false}
"""
    (tmp_path / "dummy.yaml").write_text(spec)
    assert main(["run", str(tmp_path / "dummy.yaml"), "--out", str(tmp_path / "runs")]) == 0
    folder = next((tmp_path / "runs").iterdir())
    records = [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in records] == ["cold", "repeat"]
    assert records[1]["cached_tokens"] == 255 and len(records[0]["output_ids"]) == 8
    assert records[0]["output_ids"] == records[1]["output_ids"]
