"""The CI-sized sparse accuracy run (``eval/configs/sparse_ruler_ci.yaml``): dense and sparse
decode (a CPU server's defaults: exact keys, chunks of 4; and ShadowKV's rank-32 keys with
chunks of 8) on the same niah prompts, asked as usual and with the question forced through
decode steps as its own tokens, compared sample by sample. Dense and a 3 % budget are
requests with their own custom_params on the exact-key server. The full run is
``sparse_ruler.yaml`` (hours).

What it claims: both passes really ran sparse on both sparse servers (their counters), the
dense entry really decoded densely and the 3 % entry reused the 6 % entry's prompt states
on the same server, the question really arrived as its own tokens (the runner fails the run
otherwise), exact keys really sit off the device beside the values, and on niah_single_1/2
sparse finds what dense finds, asked either way. Not claimed: niah_single_3 (a UUID) through
decode steps, where sparse still loses (docs/results/sparse-forced-needle)."""

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
    stats = {(r["server"], r["question_in_decode"]): r for r in records
             if r.get("workload") == "ruler_stats"}
    # Two servers started; dense and sparse_3 were requests on sparse_6's.
    started = [e["server"] for e in _events(folder) if e["event"] == "start"]
    assert started == ["sparse_6", "sparse_6_lowrank"], started
    assert stats[("sparse_6", False)]["variants"] == ["sparse_6", "dense", "sparse_3"]
    stats = {key: r["sparse"] for key, r in stats.items()}
    for server, entries in (("sparse_6", 2), ("sparse_6_lowrank", 1)):
        asked, forced = stats[(server, False)], stats[(server, True)]
        # Every 4k prompt of every sparse entry decoded sparsely, in both passes; dense's
        # did not (the comparison is not dense vs dense).
        assert asked["requests"] == 4 * entries and forced["requests"] == 8 * entries, (
            server, asked, forced)
        assert (forced["pool_tokens_released"] > asked["pool_tokens_released"]
                >= 4 * entries * 3800)
    # sparse_3 asked each prompt right after sparse_6: its state, not a second build.
    assert stats[("sparse_6", True)]["shared_state_hits"] >= 8
    # The same prompts' states: exact keys double the host bytes (keys beside the values;
    # not exactly: chunks of 4 end the selectable middle on a finer grid than chunks of 8).
    exact, lowrank = stats[("sparse_6", True)], stats[("sparse_6_lowrank", True)]
    assert exact["states"] == lowrank["states"] > 0
    assert 1.95 < exact["host_bytes"] / lowrank["host_bytes"] < 2.05, (exact, lowrank)
    scores = {}
    for r in records:
        if r.get("workload") == "ruler":
            scores.setdefault((r["server"], r["task"].endswith(":decode")), []).append(r["score"])
    assert len(scores[("sparse_3", True)]) == len(scores[("sparse_3", False)]) == 4
    for server in ("sparse_6", "sparse_6_lowrank"):
        assert len(scores[(server, True)]) == len(scores[("dense", True)]) == 4
        # Asked in the prompt or through decode steps (where the selection alone must find
        # the needle), sparse finds the needles dense finds, give or take one of the four
        # samples. Measured: equal sample for sample on these tasks (18-sample run).
        for in_decode in (False, True):
            assert (sum(scores[(server, in_decode)])
                    >= sum(scores[("dense", in_decode)]) - 100), scores
    assert sum(scores[("dense", True)]) >= 200, scores  # dense finds some: a real check
    assert "paired sample by sample" in out and "niah_single_1:decode" in out


def _events(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "events.jsonl").open()]
