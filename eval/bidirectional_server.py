"""Bidirectional prefill inside the SGLang server, over a sweep of tier read bandwidths.

    .venv/bin/python eval/bidirectional_server.py eval/sweeps/bidirectional_cpu.yaml \
        --out runs/bidirectional-server

For each prefix length, one server per read bandwidth (``tier.read_bandwidth_limit``), all
sharing one tier folder. At each bandwidth, in the same server and run, the same disk hit
is served three ways, chosen per request (``custom_params.kvtier_prefill``): recomputed
(compute only), loaded whole (load only) and bidirectionally; the bound
T_c*T_l/(T_c+T_l) comes from the two single-method times just measured (plus the question,
which every method computes). Each is timed as time to first token, after ``/flush_cache``
(so the prefix is on disk only), ``repeats`` times; medians are reported. The caps aim at
load-all/compute-all ratios (``load_over_compute``) from a first uncapped measurement of
compute, and the measured read rate is what the load-only requests achieved. Every answer
must equal the cold one's. Table, JSON and a PNG plot go to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from sgl_kvtier.eval.prefill_sweep import HEADER, plot, row_text
from sgl_kvtier.eval.records import provenance
from sgl_kvtier.harness.models import model_path
from sgl_kvtier.harness.prompts import load_tokenizer, token_prompt
from sgl_kvtier.harness.server import Server

METHODS = ("compute", "load", "bidirectional")


class SweepSpec(BaseModel):
    """``eval/sweeps/bidirectional_*.yaml``."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: str
    description: str = ""
    model: str = "smollm2"
    server_args: list[str] = []
    prefix_tokens: list[int] = Field(min_length=1)
    question_tokens: int = Field(32, gt=0)
    load_over_compute: list[float] = Field(min_length=1)
    uncapped: bool = True
    repeats: int = Field(2, gt=0)
    prefill: dict = {}


def _server(spec: SweepSpec, folder: Path, tier: Path, limit: int | None, tag: str) -> Server:
    kvtier = {"tier": {"enabled": True, "path": str(tier), "admission": "always"},
              "prefill": {"enabled": True, **spec.prefill}}
    if limit is not None:
        kvtier["tier"]["read_bandwidth_limit"] = limit
    config = folder / f"kvtier-{tag}.yaml"
    config.write_text(yaml.safe_dump(kvtier))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SGL_KVTIER")}
    args = ["--enable-kvtier", "--kvtier-config", str(config), "--model-path",
            str(model_path(spec.model)), *spec.server_args]
    return Server(args, folder / f"server-{tag}.log", env=env).start()


def _tier(server: Server) -> dict:
    return server.server_info()["internal_states"][0]["kvtier"]["tier"]


def _served(server: Server, prompt: list[int], method: str) -> tuple[float, list[int], int]:
    """TTFT, output and split of one request; the split is 0 when the server chose to load
    the hit whole (computing beside the loads could not pay)."""
    server.flush_cache()  # the prefix is on disk only
    before = _tier(server)["prefill"]["prefills"]
    gen = server.generate(prompt, 4, custom_params={"kvtier_prefill": method})
    state = _tier(server)["prefill"]
    split = state["recent"][-1]["split"] if state["prefills"] > before else 0
    return gen.ttft_s, gen.output_ids, split


def _wait_written(server: Server, chunks: int) -> int:
    for _ in range(600):
        state = _tier(server)
        if state["chunks"] >= chunks and state["copies_pending"] == 0 \
                and state["writes_in_flight"] == 0:
            return state["used_bytes"]
        time.sleep(0.2)
    raise RuntimeError(f"the tier never held {chunks} chunks: {state}")


def measure_point(server: Server, prompt: list[int], expected: list[int], n: int,
                  repeats: int, bar) -> dict:
    times = {m: [] for m in METHODS}
    splits, correct = [], True
    for _ in range(repeats):
        for method in METHODS:
            ttft, out, split = _served(server, prompt, method)
            times[method].append(ttft)
            correct &= out == expected
            if method == "bidirectional":
                splits.append(split)
            bar.update()
    med = {m: statistics.median(v) for m, v in times.items()}
    return {"compute_s": med["compute"], "load_s": med["load"], "both_s": med["bidirectional"],
            "splits": splits, "split": splits[-1], "correct": correct, "times": times}


def sweep_length(spec: SweepSpec, folder: Path, n: int, bar) -> list[dict]:
    tokenizer = load_tokenizer(model_path(spec.model))
    prompt = token_prompt(tokenizer, n + spec.question_tokens, offset=123_000)
    tier = folder / f"tier-{n}"
    rows, limits = [], []
    server = _server(spec, folder, tier, None, f"{n}-first")
    try:
        expected = server.generate(prompt, 4).output_ids  # cold: computed and written
        prefix_bytes = _wait_written(server, n // 256)  # tier.chunk_tokens: 256
        t_c = statistics.median(_served(server, prompt, "compute")[0] for _ in range(2))
    finally:
        server.stop()
    limits = [int(prefix_bytes / (r * t_c)) for r in spec.load_over_compute]
    limits += [None] if spec.uncapped else []
    for limit in limits:
        tag = f"{n}-{'none' if limit is None else limit // 10**6}"
        server = _server(spec, folder, tier, limit, tag)
        try:
            point = measure_point(server, prompt, expected, n, spec.repeats, bar)
        finally:
            server.stop()
        # From the single methods' whole TTFTs, question included: slightly below the bound
        # that would count the question once, so the ratio to it is conservative.
        t_cc, t_l = point["compute_s"], point["load_s"]
        bound = t_cc * t_l / (t_cc + t_l)
        rows.append({"prefix_tokens": n, "read_limit_mb_s": None if limit is None else limit / 1e6,
                     "measured_read_mb_s": prefix_bytes / t_l / 1e6, **point,
                     "bound_s": bound, "both_over_bound": point["both_s"] / bound,
                     "both_over_best": point["both_s"] / min(t_cc, t_l)})
        tqdm.write(row_text(rows[-1]))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="eval/bidirectional_server.py",
        description="Compute-only, load-only and bidirectional prefill of a disk hit inside "
                    "the SGLang server (the embedded model on CPU), over a sweep of tier "
                    "read bandwidths; table, JSON and PNG plot per prefix length.")
    parser.add_argument("config", type=Path, help="sweep YAML (eval/sweeps/bidirectional_*)")
    parser.add_argument("--out", type=Path, default=Path("runs/bidirectional-server"),
                        help="folder for table.md, rows.json and sweep-<tokens>.png")
    args = parser.parse_args(argv)
    spec = SweepSpec.model_validate(yaml.safe_load(args.config.read_text()))
    args.out.mkdir(parents=True, exist_ok=True)
    bf16 = "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    dtype = spec.server_args[spec.server_args.index("--dtype") + 1] \
        if "--dtype" in spec.server_args else "auto"
    points = len(spec.load_over_compute) + spec.uncapped
    total = len(spec.prefix_tokens) * points * spec.repeats * len(METHODS)
    text, all_rows = [], []
    with tempfile.TemporaryDirectory(prefix="kvtier-bidir-", dir="/var/tmp") as folder, \
            tqdm(total=total, desc="requests", unit="req") as bar:
        for n in spec.prefix_tokens:
            title = (f"SGLang server, {n}-token prefix on disk + {spec.question_tokens}-token "
                     f"question, SmolLM2-135M {dtype}, {provenance()['hardware']} "
                     f"(AVX512-BF16: {'yes' if bf16 else 'no'})")
            tqdm.write(title + "\n" + HEADER)
            rows = sweep_length(spec, Path(folder), n, bar)
            all_rows += rows
            plot(rows, args.out / f"sweep-{n}.png", title)
            text += [title, "", HEADER, *(row_text(r) for r in rows), ""]
    (args.out / "rows.json").write_text(json.dumps(all_rows, indent=2))
    (args.out / "table.md").write_text("\n".join(text))
    print(f"wrote {args.out / 'table.md'} and the plots in {args.out}")
    return 0 if all(r["correct"] for r in all_rows) else 1


if __name__ == "__main__":
    sys.exit(main())
