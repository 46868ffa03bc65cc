"""``eval/sparse_gpu_bench.py`` runs end to end on a CPU at tiny shapes (``--smoke``), so the
script a lent GPU runs is known to work before device time is spent on it: every stage
finishes, each kernel agrees with its reference (Triton's interpreter here), and the step
rows carry the measures the results README quotes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[3]


def test_smoke_run_writes_every_stage(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "eval" / "sparse_gpu_bench.py"), "--smoke",
                          "--steps", "2", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert "errors" not in report
    assert report["ceilings"]["copy_gbs"] > 0
    kernels = {row["kernel"]: row for row in report["kernels"]}
    assert set(kernels) == {"chunk_scores", "rebuild_keys", "gather_values (pinned host)",
                            "paged_decode (triton)"}  # no FlashInfer without a GPU
    assert all(row["rel_error"] < 1e-2 for row in kernels.values()), kernels
    steps = report["steps_2048"]
    assert {(r["mode"], r.get("regime")) for r in steps} == {
        ("dense", None), ("sparse", "steady"), ("sparse", "cold")}
    steady = [r for r in steps if r.get("regime") == "steady"]
    assert all(r["hit_rate"] == 1.0 and r["tokens_per_s"] > 0 for r in steady)
    cold = [r for r in steps if r.get("regime") == "cold"]
    assert all(r["hit_rate"] < 0.5 and r["gathered_mib_per_step"] > 0 for r in cold)
    assert "| 2048 | sparse | torch+torch | steady |" in (tmp_path / "table.md").read_text()
