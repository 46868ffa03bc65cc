"""Cold and cached time to first token, and decode time per token, for attention backends.

Starts one SGLang server per backend on the embedded model (CPU), one after the other, and
for each prompt length sends a cold prompt (after ``/flush_cache``), then the same prompt
again (served from the radix prefix cache). Prints a Markdown table; ``--json`` also writes
the raw measurements.

    python eval/ttft_compare.py --lengths 1024 2048 4096 --decode-tokens 32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

from sgl_kvtier.cuda_shim import cpu_engine_env
from sgl_kvtier.models import resolve_model
from sgl_kvtier.prompts import load_tokenizer, token_prompt
from sgl_kvtier.server import Server

BACKENDS = {
    "torch_native": ["--attention-backend", "torch_native"],
    "kvtier": ["--enable-kvtier"],
}


def measure(backend: str, model_dir: Path, lengths: list[int], decode_tokens: int,
            repeats: int, dtype: str, log_dir: Path) -> list[dict]:
    tokenizer = load_tokenizer(model_dir)
    args = [*BACKENDS[backend], "--device", "cpu", "--model-path", str(model_dir),
            "--dtype", dtype, "--max-total-tokens", "65536", "--sleep-on-idle"]
    rows = []
    with Server(args, log_dir / f"{backend}.log", env={**os.environ, **cpu_engine_env()}) as server:
        server.generate("warm up", max_new_tokens=2)
        for length in tqdm(lengths, desc=backend, unit="length"):
            cold, cached, decode = [], [], []
            for r in range(repeats):
                prompt = token_prompt(tokenizer, length, offset=r * 97)
                server.flush_cache()
                first = server.generate(prompt, max_new_tokens=decode_tokens)
                again = server.generate(prompt, max_new_tokens=decode_tokens)
                cold.append(first.ttft_s)
                cached.append(again.ttft_s)
                decode += [first.decode_s_per_token, again.decode_s_per_token]
            rows.append({"backend": backend, "prompt_tokens": length,
                         "cold_ttft_s": statistics.median(cold),
                         "cached_ttft_s": statistics.median(cached),
                         "cached_tokens": again.cached_tokens,
                         "decode_s_per_token": statistics.median(decode)})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| backend | prompt tokens | cold TTFT (s) | cached TTFT (s) | cold/cached | "
             "decode (s/token) |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['backend']} | {r['prompt_tokens']} | {r['cold_ttft_s']:.2f} | "
                     f"{r['cached_ttft_s']:.3f} | {r['cold_ttft_s'] / r['cached_ttft_s']:.1f}x | "
                     f"{r['decode_s_per_token']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="embedded model or directory")
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS),
                        help="attention backends to compare (default: all)")
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 4096],
                        help="prompt lengths in tokens (default: 1024 2048 4096)")
    parser.add_argument("--decode-tokens", type=int, default=32,
                        help="tokens generated per request, for the decode rate (default: 32)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="cold/cached pairs per length; medians are reported (default: 1)")
    parser.add_argument("--dtype", default="float32",
                        help="model dtype (default: float32; bfloat16 matmuls are ~100x slower "
                             "on CPUs without AVX512-BF16 or AMX)")
    parser.add_argument("--json", type=Path, default=None, help="also write rows to this file")
    args = parser.parse_args(argv)
    model_dir = resolve_model(args.model)
    log_dir = Path(tempfile.mkdtemp(prefix="sgl_kvtier-ttft-"))
    rows = []
    for backend in args.backends:
        rows += measure(backend, model_dir, args.lengths, args.decode_tokens, args.repeats,
                        args.dtype, log_dir)
    print(table(rows))
    print(f"\nserver logs: {log_dir}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
