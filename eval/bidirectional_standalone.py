"""Bidirectional prefill's core against real parts, outside SGLang: the embedded model
computes chunks from the front (Hugging Face transformers, CPU) while real chunk files are
read back from the tier (O_DIRECT, verified) from the back, through the planner and its
executor. A sweep of the tier's read bandwidth around the point where both methods tie.

    .venv/bin/python eval/bidirectional_standalone.py --tokens 4096 --out runs/bidir

At each bandwidth, in the same run: compute-only, load-only, bidirectional (its rates
primed from those two runs, as a server's rate book would be from earlier requests), and
the bound T_c*T_l/(T_c+T_l) from the two single-method times just measured. Every
bidirectional prefix is checked: its next token equals the full computation's.

On a CPU the two sides share the cores (loads verify checksums and copy), so the bound,
which assumes independent resources, is not reachable here: the ratio to it says how much
the sharing costs. The same sweep inside the SGLang server: eval/bidirectional_server.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from sgl_kvtier.eval.prefill_sweep import HEADER, plot, row_text
from sgl_kvtier.eval.records import provenance
from sgl_kvtier.harness.models import model_path
from sgl_kvtier.harness.prompts import load_tokenizer, token_prompt
from sgl_kvtier.prefill.executor import run_bidirectional
from sgl_kvtier.prefill.planner import MeetPlanner, Span
from sgl_kvtier.prefill.rates import Rate, RateBook
from sgl_kvtier.tier import ChunkStore, ModelFingerprint, StoreConfig
from sgl_kvtier.tier.kv_transfer import KVPool
from sgl_kvtier.tier.service import DiskHit, TierService

QUESTION = 32  # new tokens after the cached prefix (the same cost for every method)


class Setup:
    """The model, the prompt, its reference KV written to a tier folder."""

    def __init__(self, folder: Path, tokens: int, unit: int):
        self.dir, self.n, self.unit = folder, tokens, unit
        model_dir = model_path("smollm2")
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        ids = token_prompt(load_tokenizer(model_dir), tokens + QUESTION, offset=123_000)
        self.prefix, self.question = ids[:tokens], ids[tokens:]
        with torch.no_grad():
            out = self.model(torch.tensor([ids]), use_cache=True)
        self.expected = int(out.logits[0, -1].argmax())
        kv = out.past_key_values
        self.layers = len(kv.layers)
        src = KVPool([kv.layers[i].keys[0, :, :tokens].transpose(0, 1).contiguous()
                      for i in range(self.layers)],
                     [kv.layers[i].values[0, :, :tokens].transpose(0, 1).contiguous()
                      for i in range(self.layers)])
        _, self.heads, self.dim = src.k[0].shape
        self.fp = ModelFingerprint("bidirectional-standalone", "float32", self.layers,
                                   self.heads, self.dim)
        writer = self.service(src, None)
        writer.offer("", self.prefix, torch.arange(tokens), 0, "written")
        while "written" not in writer.drain_written():
            time.sleep(0.01)
        assert writer.store.flush(120)
        self.keys = writer.keys("", self.prefix)
        self.bytes = writer.layout.nbytes * len(self.keys)
        writer.close()
        self.bounds = list(range(0, tokens, unit)) + [tokens]

    def service(self, pool: KVPool, read_limit: int | None) -> TierService:
        store = ChunkStore(StoreConfig(self.dir / "tier", 1 << 40, admission="always",
                                       read_bandwidth_limit=read_limit))
        return TierService(store, self.fp, self.unit, pool)


def _empty_pool(s: Setup) -> KVPool:
    shape = (s.n, s.heads, s.dim)
    return KVPool([torch.zeros(shape) for _ in range(s.layers)],
                  [torch.zeros(shape) for _ in range(s.layers)])


def run_method(s: Setup, method: str, read_limit: int | None, rates: RateBook) -> dict:
    """One prefix produced by ``method`` ("compute", "load" or "both"), then the question;
    returns seconds, the split and whether the next token is right."""
    pool = _empty_pool(s)
    service = s.service(pool, read_limit)
    cache = DynamicCache()
    lock = threading.Lock()  # the model runs on one thread at a time

    def compute(span) -> None:
        with torch.no_grad(), lock:
            s.model(torch.tensor([s.prefix[span.start:span.end]]), past_key_values=cache,
                    use_cache=True)

    def load(j: int, cancel=None) -> bool:
        a, b = s.bounds[j], s.bounds[j + 1]
        hit = DiskHit([s.keys[j]], [s.prefix[a:b]], j, a, b)
        return service.submit_load(hit, torch.arange(a, b)).wait()

    start = time.perf_counter()
    if method == "both":
        planner = MeetPlanner(s.bounds, s.unit * 2, rates, start)
        report = run_bidirectional(planner, compute, load, time.perf_counter)
        split = report.split
    elif method == "compute":
        for a in range(0, s.n, 2 * s.unit):
            compute(Span(a, min(a + 2 * s.unit, s.n)))
        split = s.n
    else:
        assert all(load(j) for j in range(len(s.keys)))
        split = 0
    prefix_s = time.perf_counter() - start
    token = _answer(s, cache, pool, split)
    seconds = time.perf_counter() - start
    service.close()
    return {"seconds": seconds, "prefix_s": prefix_s, "answer_s": seconds - prefix_s,
            "split": split, "correct": token == s.expected}


def _answer(s: Setup, cache: DynamicCache, pool: KVPool, split: int) -> int:
    """The question over the assembled prefix: computed KV below ``split``, loaded above."""
    full = DynamicCache()
    for i in range(s.layers):
        k = [cache.layers[i].keys[:, :, :split]] if split else []
        v = [cache.layers[i].values[:, :, :split]] if split else []
        k.append(pool.k[i][split:].transpose(0, 1)[None])
        v.append(pool.v[i][split:].transpose(0, 1)[None])
        full.update(torch.cat(k, 2), torch.cat(v, 2), i)
    with torch.no_grad():
        out = s.model(torch.tensor([s.question]), past_key_values=full, use_cache=True)
    return int(out.logits[0, -1].argmax())


def sweep(s: Setup, ratios: list[float]) -> list[dict]:
    """One row per read bandwidth: load-all time ``ratio`` times compute-all, and none."""
    rates = RateBook.empty()
    t_c = run_method(s, "compute", None, rates)["prefix_s"]
    limits = [int(s.bytes / (r * t_c)) for r in ratios] + [None]
    rows = []
    for limit in limits:
        c = run_method(s, "compute", limit, rates)
        ld = run_method(s, "load", limit, rates)
        primed = RateBook(Rate(value=s.n / c["prefix_s"]), Rate(value=s.n / ld["prefix_s"]))
        b = run_method(s, "both", limit, primed)
        answer = (c["answer_s"] + ld["answer_s"] + b["answer_s"]) / 3
        bound = c["prefix_s"] * ld["prefix_s"] / (c["prefix_s"] + ld["prefix_s"]) + answer
        rows.append({"read_limit_mb_s": None if limit is None else limit / 1e6,
                     "measured_read_mb_s": s.bytes / ld["prefix_s"] / 1e6,
                     "compute_s": c["seconds"], "load_s": ld["seconds"],
                     "both_s": b["seconds"], "bound_s": bound, "split": b["split"],
                     "both_over_bound": b["seconds"] / bound,
                     "both_over_best": b["seconds"] / min(c["seconds"], ld["seconds"]),
                     "correct": c["correct"] and ld["correct"] and b["correct"]})
        print(row_text(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="eval/bidirectional_standalone.py",
        description="Compute-only, load-only and bidirectional prefill of a cached prefix "
                    "with the embedded model (transformers, CPU) and real tier reads, over a "
                    "sweep of read bandwidths; table, JSON and PNG plot.")
    parser.add_argument("--tokens", type=int, default=4096, help="cached prefix length")
    parser.add_argument("--unit", type=int, default=256,
                        help="tier chunk (load unit) in tokens; compute chunks are twice that")
    parser.add_argument("--ratios", type=float, nargs="+", default=[4, 2, 1, 0.5, 0.25],
                        help="load-all / compute-all times to aim the bandwidth caps at")
    parser.add_argument("--out", type=Path, default=Path("runs/bidirectional"),
                        help="folder for table.md, rows.json and sweep.png")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    bf16 = "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    title = (f"{args.tokens}-token prefix + {QUESTION}, SmolLM2-135M float32, "
             f"{provenance()['hardware']} (AVX512-BF16: {'yes' if bf16 else 'no'})")
    print(title)
    print(HEADER)
    with tempfile.TemporaryDirectory(prefix="kvtier-bidir-", dir="/var/tmp") as folder:
        rows = sweep(Setup(Path(folder), args.tokens, args.unit), args.ratios)
    (args.out / "rows.json").write_text(json.dumps(rows, indent=2))
    (args.out / "table.md").write_text(title + "\n\n" + HEADER + "\n" +
                                       "\n".join(row_text(r) for r in rows) + "\n")
    plot(rows, args.out / "sweep.png", title)
    print(f"wrote {args.out / 'table.md'} and {args.out / 'sweep.png'}")
    return 0 if all(r["correct"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
