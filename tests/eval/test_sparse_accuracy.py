"""The CI-sized sparse accuracy run (``eval/configs/sparse_ruler_ci.yaml``): dense and sparse
decode on the same niah prompts, asked as usual and with the question forced through decode
steps, compared sample by sample. The full run is ``sparse_ruler.yaml`` (hours).

What it claims: both passes really ran sparse on the sparse server (its counters), and with
the question in the prompt sparse finds what dense finds. It does not claim the forced-question
parity (not met yet; see the test's comment)."""

import json
from pathlib import Path

import pytest

from sgl_kvtier.eval.__main__ import main

pytestmark = pytest.mark.integration
RUN_FILE = Path(__file__).resolve().parents[2] / "eval" / "configs" / "sparse_ruler_ci.yaml"


def test_sparse_finds_the_needles_dense_finds(tmp_path, capsys):
    assert main(["run", str(RUN_FILE), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    folder = next(tmp_path.iterdir())
    records = [json.loads(line) for line in (folder / "records.jsonl").open()]
    stats = {(r["server"], r["question_in_decode"]): r["sparse"] for r in records
             if r.get("workload") == "ruler_stats"}
    assert stats[("dense", False)] is None  # sparse decode off there
    asked, forced = stats[("sparse_6", False)], stats[("sparse_6", True)]
    # Every 4k prompt decoded sparsely, in both passes (the comparison is not dense vs dense).
    assert asked["requests"] == 4 and forced["requests"] == 8, (asked, forced)
    assert forced["pool_tokens_released"] > asked["pool_tokens_released"] >= 4 * 3800
    scores = {}
    for r in records:
        if r.get("workload") == "ruler":
            scores.setdefault((r["server"], r["task"].endswith(":decode")), []).append(r["score"])
    assert len(scores[("sparse_6", True)]) == len(scores[("dense", True)]) == 4
    # Asked in the prompt, sparse finds the needles dense finds, give or take one of the four
    # samples (the full run's intervals say more).
    assert sum(scores[("sparse_6", False)]) >= sum(scores[("dense", False)]) - 100, scores
    # Asked through decode steps, the selection alone must find the needle. Not claimed yet:
    # at this budget and the default rank sparse found 1 of the 4 that dense found 3 of
    # (issue 11's note); the run reports both, paired, and this test checks they were scored.
    assert all(len(scores[(s, True)]) == 4 for s in ("dense", "sparse_6"))
    assert "paired sample by sample" in out and "niah_single_1:decode" in out
