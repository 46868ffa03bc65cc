"""Device memory of sparse decode at a large model's shapes, from the implementation's own
buffers, against the dense KV it replaces (CPU; about a minute).

    .venv/bin/python eval/sparse_memory.py --out docs/results/sparse-memory

One layer's state is built for real at each context (random keys and values: sizes do not
depend on them) and its buffers' bytes are counted, times the layers. Default shapes are
Llama-3.1-8B's (32 layers, 8 KV heads x 128, bfloat16); the sparse settings are the
defaults of ``SparseConfig`` unless a kvtier YAML is given.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from sgl_kvtier.config import load_config
from sgl_kvtier.eval.records import provenance
from sgl_kvtier.sparse.memory import measure_memory

GIB = 2**30


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072],
                        help="prompt lengths in tokens (default: 32k and 128k)")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (default 32)")
    parser.add_argument("--kv-heads", type=int, default=8, help="KV heads (default 8)")
    parser.add_argument("--head-dim", type=int, default=128, help="head dimension (default 128)")
    parser.add_argument("--config", help="kvtier YAML whose sparse section to use "
                        "(default: the built-in defaults)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="the server device whose defaults apply where the sparse "
                             "section leaves keys and chunk_tokens to it (default: cuda: "
                             "low-rank keys, chunks of 8)")
    parser.add_argument("--out", type=Path, help="folder for table.md and memory.json")
    args = parser.parse_args(argv)
    config = load_config(args.config).sparse.resolved(args.device)
    reports = [measure_memory(config, n, args.layers, args.kv_heads, args.head_dim,
                              torch.bfloat16)
               for n in tqdm(args.contexts, desc="building one layer's state")]
    table = _table(reports, args)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "table.md").write_text(table + "\n")
        rows = [{"plan": asdict(r.plan), "device": r.device, "host": r.host, "dense": r.dense,
                 "saving": r.saving} for r in reports]
        (args.out / "memory.json").write_text(json.dumps(
            {"shapes": vars(args) | {"out": str(args.out)}, "sparse": config.model_dump(),
             "provenance": provenance(), "rows": rows}, indent=1, default=str))
    return 0


def _table(reports, args) -> str:
    names = list(reports[0].device)
    head = ["buffer"] + [f"{r.plan.context // 1024}k" for r in reports]
    lines = [f"Per request, {args.layers} layers x {args.kv_heads} KV heads x {args.head_dim}, "
             f"bfloat16, GiB", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    cell = lambda b: f"{b / GIB:.3f}"
    for name in names:
        lines.append(f"| {name} | " + " | ".join(cell(r.device[name]) for r in reports) + " |")
    rows = [("**device total**", lambda r: cell(r.device_total)),
            ("dense KV (device)", lambda r: cell(r.dense)),
            ("**dense / sparse device**", lambda r: f"{r.saving:.2f}x"),
            ("host memory (values; keys too when exact)", lambda r: cell(r.host)),
            ("rank / selected / outlier chunks",
             lambda r: f"{r.plan.rank} / {r.plan.selected} / {r.plan.outlier_chunks}")]
    for label, fn in rows:
        lines.append(f"| {label} | " + " | ".join(fn(r) for r in reports) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
