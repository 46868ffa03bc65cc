"""Sparse decode against dense decode on one CPU server: time per decode step, and how many
8k-token requests decode at once in one KV pool (8000 prompt tokens: the model reads 8192).

    .venv/bin/python eval/sparse_decode_perf.py            # about 30 min on 2 cores

One server, sparse decode on (the default ``sparse`` settings); dense runs are the same
requests with ``custom_params.kvtier_sparse: false``, interleaved with the sparse ones, so
every ratio comes from one server in one run.

- **Step time**: for each context (4k, 8k) and batch (1, 8), the batch's prompts are
  prefilled once (cached), then decoded ``--decode-tokens`` tokens, dense then sparse, the
  requests sent together; a step's time is the median gap between a stream's tokens after
  its dense answer tokens and the step that switches it to sparse
  (``sparse.dense_answer_tokens`` + 1 tokens left out).
- **Capacity**: a second server with ``--max-total-tokens --pool-tokens`` gets
  ``--dense-requests`` distinct 8k prompts at once, dense, then ``--requests`` others,
  sparse; each request's decode interval is taken from its stream, and the most that
  overlap is the capacity. A dense request holds its prompt's slots until it ends; a sparse
  one lets go of them once it converts (after its ``sparse.dense_answer_tokens``), so the next
  queued prompt is admitted while it decodes. The pool tokens a sparse request releases and
  the host bytes of its state come from ``/get_server_info``.

Either part alone: ``--skip-capacity`` or ``--skip-steps`` (then point ``--out`` elsewhere,
e.g. ``docs/results/sparse-capacity``).

Writes ``table.md`` and ``perf.json`` under ``--out`` (default
``docs/results/sparse-perf``), tagged with the CPU and whether it has AVX512-BF16.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import yaml
from serverlib import SERVER_BASE

from sgl_kvtier.config import ConfigError, config_from_dict
from sgl_kvtier.eval.records import provenance
from sgl_kvtier.harness.models import model_path
from sgl_kvtier.harness.prompts import load_tokenizer, token_prompt
from sgl_kvtier.harness.server import Server

DENSE = {"custom_params": {"kvtier_sparse": False}}


def _sparse_settings(pairs: list[str]) -> tuple[dict, int]:
    """``["chunk_tokens=4", ...]`` as a validated ``sparse`` section (enabled), and the
    dense answer tokens it gives a request."""
    settings: dict = {"enabled": True}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--sparse {pair!r}: expected KEY=VALUE")
        settings[key] = yaml.safe_load(value)
    try:
        config = config_from_dict({"sparse": settings}, where="--sparse")
    except ConfigError as e:
        raise SystemExit(str(e)) from None
    return settings, config.sparse.dense_answer_tokens


def _server(folder: Path, name: str, extra: list[str], sparse: dict) -> Server:
    config = folder / f"{name}.yaml"
    config.write_text(yaml.safe_dump({"sparse": sparse}))
    base = list(SERVER_BASE)
    if "--max-total-tokens" in extra:  # ours replaces the shared default
        i = base.index("--max-total-tokens")
        del base[i:i + 2]
    args = ["--enable-kvtier", "--kvtier-config", str(config), "--model-path",
            str(model_path("smollm2")), *base, *extra]
    return Server(args, folder / f"{name}.log")


def _together(server: Server, prompts: list[list[int]], tokens: int, sampling: dict) -> list:
    """Send every prompt at once; per request ``(absolute start, Generation)``."""
    out: list = [None] * len(prompts)

    def one(i: int) -> None:
        start = time.perf_counter()
        try:
            out[i] = (start, server.generate(prompts[i], tokens, ignore_eos=True, **sampling))
        except Exception as e:  # reported below, for the whole batch
            out[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failed := [r for r in out if isinstance(r, Exception)]:
        raise RuntimeError(f"{len(failed)} of {len(out)} requests failed: {failed[0]}")
    return out


def _step_seconds(results: list, skip: int) -> float:
    """Median gap between a stream's tokens, its first ``skip`` tokens left out."""
    gaps = []
    for _, gen in results:
        times = gen.token_times[skip:]
        gaps += [b - a for a, b in zip(times, times[1:])]
    return statistics.median(gaps)


def step_times(server: Server, tok, contexts: list[int], batches: list[int],
               tokens: int, skip: int) -> list[dict]:
    rows = []
    for context in contexts:
        for batch in batches:
            prompts = [token_prompt(tok, context, offset=7_919 * (i + 1) + context)
                       for i in range(batch)]
            _together(server, prompts, 1, DENSE)  # prefill once; both runs hit the cache
            dense = _step_seconds(_together(server, prompts, tokens, DENSE), skip)
            sparse = _step_seconds(_together(server, prompts, tokens, {}), skip)
            rows.append({"context": context, "batch": batch, "dense_step_s": dense,
                         "sparse_step_s": sparse, "speedup": dense / sparse})
            print(f"  {context} tokens, batch {batch}: dense {dense * 1000:.0f} ms/step, "
                  f"sparse {sparse * 1000:.0f} ms/step ({dense / sparse:.2f}x)", flush=True)
    return rows


def _most_overlapping(results: list) -> int:
    """Most requests decoding at one moment (decode: first token to last)."""
    events = []
    for start, gen in results:
        events += [(start + gen.token_times[0], 1), (start + gen.token_times[-1], -1)]
    now = best = 0
    for _, delta in sorted(events):
        now += delta
        best = max(best, now)
    return best


def capacity(server: Server, tok, requests: dict[str, int], context: int,
             tokens: int) -> dict:
    """Most requests decoding together, dense then sparse (``requests``: how many each)."""
    info = lambda: server.server_info()["internal_states"][0]["kvtier"]["sparse"]
    out = {}
    for name, sampling, base in (("dense", DENSE, 200_000), ("sparse", {}, 400_000)):
        prompts = [token_prompt(tok, context, offset=base + 6_007 * i)
                   for i in range(requests[name])]
        before = info()
        results = _together(server, prompts, tokens, sampling)
        after = info()
        out[name] = _most_overlapping(results)
        print(f"  {name}: at most {out[name]} of {len(prompts)} requests decoding together",
              flush=True)
        server.flush_cache()
    released = after["pool_tokens_released"] - before["pool_tokens_released"]
    out["sparse_pool_tokens_released_per_request"] = released / max(after["requests"]
                                                                    - before["requests"], 1)
    out["sparse_host_bytes_per_state"] = after["host_bytes"] / max(after["states"], 1)
    return out


def _settings_text(args) -> str:
    return ("default sparse settings" if not args.sparse
            else "sparse settings: defaults but " + ", ".join(args.sparse))


def _step_lines(rows: list[dict], args) -> list[str]:
    lines = ["Median time per decode step of the whole batch (float32, embedded SmolLM2-135M,"
             f" {_settings_text(args)}, {args.decode_tokens} tokens per request).", "",
             "| context | batch | dense ms/step | sparse ms/step | sparse speed-up |",
             "|---:|---:|---:|---:|---:|"]
    return lines + [f"| {r['context']} | {r['batch']} | {r['dense_step_s'] * 1000:.0f} | "
                    f"{r['sparse_step_s'] * 1000:.0f} | {r['speedup']:.2f}x |" for r in rows]


def _capacity_lines(cap: dict, args) -> list[str]:
    ratio = cap["sparse"] / max(cap["dense"], 1)
    return [f"Capacity: distinct {args.context}-token prompts sent at once to a server with "
            f"--max-total-tokens {args.pool_tokens}, {args.capacity_tokens} tokens each "
            f"({args.dense_requests} dense, then {args.requests} sparse, "
            f"{_settings_text(args)}); a request decodes "
            "from its first token to its last.", "",
            "| decode | requests sent | most decoding together |", "|---|---:|---:|",
            f"| dense | {args.dense_requests} | {cap['dense']} |",
            f"| sparse | {args.requests} | {cap['sparse']} ({ratio:.1f}x dense) |", "",
            f"Pool tokens released per sparse request: "
            f"{cap['sparse_pool_tokens_released_per_request']:.0f} of {args.context} (it keeps "
            f"only its decode tokens in the pool); host bytes per prompt state: "
            f"{cap['sparse_host_bytes_per_state'] / 2**20:.1f} MiB."]


def _table(rows: list[dict], cap: dict | None, args, machine: str) -> str:
    lines = [f"# Sparse decode on CPU: {machine}", ""]
    if rows:
        lines += _step_lines(rows, args) + [""]
    if cap is not None:
        lines += _capacity_lines(cap, args) + [""]
    command = " ".join([".venv/bin/python eval/sparse_decode_perf.py", *sys.argv[1:]])
    lines += [f"Command: `{command}`"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Sparse vs dense decode on one CPU server: step time and capacity.")
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 8000],
                        help="prompt lengths for the step-time runs")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8],
                        help="requests decoding together in the step-time runs")
    parser.add_argument("--decode-tokens", type=int, default=24,
                        help="tokens per request in the step-time runs")
    parser.add_argument("--context", type=int, default=8000,
                        help="prompt length of the capacity runs")
    parser.add_argument("--requests", type=int, default=10,
                        help="requests sent at once in the sparse capacity run")
    parser.add_argument("--dense-requests", type=int, default=4,
                        help="requests sent at once in the dense capacity run (more than fit)")
    parser.add_argument("--pool-tokens", type=int, default=20_000,
                        help="--max-total-tokens of the capacity server")
    parser.add_argument("--capacity-tokens", type=int, default=96,
                        help="tokens per request in the capacity runs")
    parser.add_argument("--skip-capacity", action="store_true", help="step times only")
    parser.add_argument("--skip-steps", action="store_true", help="capacity only")
    parser.add_argument("--sparse", action="append", default=[], metavar="KEY=VALUE",
                        help="a sparse setting for both servers, e.g. --sparse chunk_tokens=4 "
                             "--sparse keys=exact (repeat it; default: the defaults)")
    parser.add_argument("--out", type=Path, default=Path("docs/results/sparse-perf"),
                        help="folder for table.md and perf.json")
    args = parser.parse_args()
    sparse, dense_tokens = _sparse_settings(args.sparse)
    bf16 = "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    machine = f"{provenance()['hardware']}, AVX512-BF16: {'yes' if bf16 else 'no'}"
    print(machine, flush=True)
    tok = load_tokenizer(model_path("smollm2"))
    pool = max(args.contexts) * max(args.batches) + 8192  # the batch, cached once
    rows, cap = [], None
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if not args.skip_steps:
            with _server(folder, "steps", ["--max-total-tokens", str(pool)], sparse) as server:
                rows = step_times(server, tok, args.contexts, args.batches, args.decode_tokens,
                                  skip=dense_tokens + 1)
        if not args.skip_capacity:
            pool_args = ["--max-total-tokens", str(args.pool_tokens)]
            with _server(folder, "capacity", pool_args, sparse) as s:
                cap = capacity(s, tok, {"dense": args.dense_requests, "sparse": args.requests},
                               args.context, args.capacity_tokens)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "perf.json").write_text(json.dumps(
        {"machine": machine, **provenance(), "steps": rows, "capacity": cap,
         "args": {k: str(v) for k, v in vars(args).items()}}, indent=2))
    (args.out / "table.md").write_text(_table(rows, cap, args, machine))
    print((args.out / "table.md").read_text())


if __name__ == "__main__":
    main()
