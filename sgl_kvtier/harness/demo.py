"""The README's main job: an SGLang server with ``--enable-kvtier`` on the embedded model.

Sends a few requests (one long prompt twice, to show the prefix-cache hit), prints a table
of prompt tokens, cached tokens, time to first token and output, and stops the server.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

from sgl_kvtier.harness.prompts import load_tokenizer, token_prompt
from sgl_kvtier.harness.resolve import resolve_model
from sgl_kvtier.harness.server import Server, ServerError

SHORT_PROMPTS = ["The capital of France is", "def fibonacci(n):"]
LONG_OFFSET = 20_000  # into the corpus: prose rather than its opening tables
# bfloat16 matmuls are ~100x slower than float32 on CPUs without AVX512-BF16 or AMX.
CPU_DTYPE = "float32"


def _table(rows: list[dict]) -> str:
    head = ("| request | prompt tokens | cached tokens | TTFT (s) | output |\n"
            "|---|---:|---:|---:|---|")
    lines = [f"| {r['name']} | {r['prompt_tokens']} | {r['cached_tokens']} | "
             f"{r['ttft_s']:.2f} | {r['output']!r} |" for r in rows]
    return "\n".join([head, *lines])


def run(model: str, long_tokens: int, max_new_tokens: int, log_dir: Path,
        extra_args: list[str]) -> list[dict]:
    model_dir = resolve_model(model)
    long_prompt = token_prompt(load_tokenizer(model_dir), long_tokens, offset=LONG_OFFSET)
    requests = [(f"short {i + 1}", p) for i, p in enumerate(SHORT_PROMPTS)]
    requests += [(f"long {long_tokens} tokens, cold", long_prompt),
                 (f"long {long_tokens} tokens, repeated", long_prompt)]
    args = ["--enable-kvtier", "--device", "cpu", "--model-path", str(model_dir),
            "--dtype", CPU_DTYPE, "--max-total-tokens", "32768", "--sleep-on-idle",
            *extra_args]
    rows = []
    print(f"starting SGLang with --enable-kvtier (log: {log_dir / 'server.log'}) ...",
          flush=True)
    with Server(args, log_dir / "server.log") as server:
        for name, prompt in tqdm(requests, desc="requests", unit="req"):
            gen = server.generate(prompt, max_new_tokens=max_new_tokens)
            rows.append({"name": name, "prompt_tokens": gen.prompt_tokens,
                         "cached_tokens": gen.cached_tokens, "ttft_s": gen.ttft_s,
                         "output": gen.text.strip()[:48]})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sgl_kvtier.harness.demo",
        description="Start SGLang with --enable-kvtier on the embedded model, send a few "
                    "requests (one long prompt twice) and print what the prefix cache saved.")
    parser.add_argument("--model", default="smollm2",
                        help="embedded model short name or a model directory (default: smollm2)")
    parser.add_argument("--long-tokens", type=int, default=2048,
                        help="length of the long prompt sent twice (default: 2048)")
    parser.add_argument("--max-new-tokens", type=int, default=12,
                        help="tokens generated per request (default: 12)")
    parser.add_argument("--log-dir", type=Path, default=None,
                        help="where the server log goes (default: a temporary folder)")
    parser.add_argument("server_args", nargs=argparse.REMAINDER,
                        help="after --, extra arguments passed verbatim to the server")
    args = parser.parse_args(argv)
    extra = [a for a in args.server_args if a != "--"]
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="sgl_kvtier-demo-"))
    try:
        rows = run(args.model, args.long_tokens, args.max_new_tokens, log_dir, extra)
    except (ServerError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(_table(rows))
    cold, warm = rows[-2]["ttft_s"], rows[-1]["ttft_s"]
    print(f"\nrepeated long prompt: {rows[-1]['cached_tokens']} of {rows[-1]['prompt_tokens']} "
          f"tokens from the prefix cache; time to first token {cold:.2f} s -> {warm:.2f} s "
          f"({cold / warm:.1f}x faster). Server stopped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
