"""Agreement metrics against distributions whose KL is known in closed form."""

import numpy as np
import pytest

from sgl_kvtier.eval.agreement import compare, greedy_metrics, summarise_agreement, teacher_metrics
from sgl_kvtier.eval.spec import AgreementWorkload


def scoring(probs: np.ndarray, k: int, token_ids: np.ndarray | None = None) -> dict:
    """Top-k of full next-token distributions ``probs`` (T, V), as SGLang reports them."""
    order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    top_lp = np.log(np.take_along_axis(probs, order, -1))
    tokens = order[:, 0] if token_ids is None else token_ids
    return {"top_ids": order.astype(np.int32), "top_logprobs": top_lp.astype(np.float32),
            "token_logprobs": np.log(probs[np.arange(len(probs)), tokens]).astype(np.float32)}


def random_probs(rng, t=50, v=30, sharp=3.0):
    logits = rng.normal(size=(t, v)) * sharp
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def test_identical_scorings_agree_fully():
    p = random_probs(np.random.default_rng(0))
    m = teacher_metrics(scoring(p, 10), scoring(p, 10))
    assert m["top1_agreement"] == 1.0 and m["kl_mean"] < 1e-6 and m["positions"] == 50
    assert m["nll_ref"] == pytest.approx(m["nll_other"])


def test_kl_matches_the_exact_value_when_top_k_covers_the_vocabulary():
    rng = np.random.default_rng(1)
    p, q = random_probs(rng, v=12), random_probs(rng, v=12)
    exact = (p * np.log(p / q)).sum(-1)
    m = teacher_metrics(scoring(p, 12), scoring(q, 12))
    assert m["kl_mean"] == pytest.approx(exact.mean(), rel=1e-4)
    assert m["kl_max"] == pytest.approx(exact.max(), rel=1e-4)
    assert m["top1_agreement"] == pytest.approx(np.mean(p.argmax(-1) == q.argmax(-1)))


def test_truncated_top_k_stays_close_and_never_negative():
    rng = np.random.default_rng(2)
    p = random_probs(rng, v=200, sharp=4.0)
    q = p * np.exp(rng.normal(scale=0.05, size=p.shape))
    q /= q.sum(-1, keepdims=True)
    exact = (p * np.log(p / q)).sum(-1).mean()
    m = teacher_metrics(scoring(p, 20), scoring(q, 20))
    assert m["kl_mean"] >= 0 and m["kl_mean"] == pytest.approx(exact, rel=0.5)
    # A clearly different distribution scores far higher.
    far = teacher_metrics(scoring(p, 20), scoring(random_probs(rng, v=200, sharp=4.0), 20))
    assert far["kl_mean"] > 20 * m["kl_mean"] and far["top1_agreement"] < 0.5


def test_greedy_metrics():
    assert greedy_metrics([1, 2, 3, 4], [1, 2, 3, 4]) == {"exact": True, "prefix_fraction": 1.0}
    assert greedy_metrics([1, 2, 3, 4], [1, 2, 9, 4]) == {"exact": False, "prefix_fraction": 0.5}


def test_compare_and_summary_from_saved_scorings(tmp_path):
    rng = np.random.default_rng(3)
    p, q = random_probs(rng), random_probs(rng)
    (tmp_path / "raw").mkdir()
    records = []
    for server, probs in (("ref", p), ("same", p), ("other", q)):
        np.savez(tmp_path / "raw" / f"{server}.npz", **scoring(probs, 10))
        records.append({"workload": "agreement", "kind": "teacher", "server": server,
                        "length": 51, "text": 0, "raw": f"raw/{server}.npz"})
        records.append({"workload": "agreement", "kind": "greedy", "server": server,
                        "prompt": 0, "output_ids": [1, 2, 3] if server != "other" else [1, 5, 3]})
    work = AgreementWorkload(kind="agreement", reference="ref", lengths=[51])
    compared = list(compare(records, tmp_path, work))
    assert {(c["server"], c["kind"]) for c in compared} == {
        ("same", "teacher_compare"), ("same", "greedy_compare"),
        ("other", "teacher_compare"), ("other", "greedy_compare")}
    summary = summarise_agreement(compared)
    assert summary["same"]["top1_agreement"] == 1.0 and summary["same"]["greedy_match"] == 1.0
    assert summary["other"]["kl"] > 0.1 and summary["other"]["greedy_match"] == 0.0
    assert summary["other"]["greedy_prefix"] == pytest.approx(1 / 3)
