"""The CI-sized sparse accuracy run (``eval/configs/sparse_ruler_ci.yaml``): dense and sparse
decode on the same niah prompts, asked as usual and with the question forced through decode
steps, compared sample by sample. The full run is ``sparse_ruler.yaml`` (hours)."""

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
    # The needle found through decode steps as often as dense finds it, give or take one of
    # the four samples (the full run's intervals say more).
    for forced_question in (False, True):
        assert (sum(scores[("sparse_6", forced_question)])
                >= sum(scores[("dense", forced_question)]) - 100), scores
    assert "paired sample by sample" in out and "niah_single_1:decode" in out
