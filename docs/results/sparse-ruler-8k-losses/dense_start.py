"""Would keeping a sparse request's first answer tokens dense change the 8k RULER samples
that sparse decode loses, and those it wins? An ad-hoc diagnostic (not a maintained tool).

One server with ``sparse_ruler.yaml``'s 6 % settings. Per sample (same prompts: seed 42):
dense's answer (``kvtier_sparse: false``, 48 tokens), sparse's, and for each N the first N
tokens of dense's answer appended to the prompt as token ids, then sparse for the remaining
48 - N (an extend over the cached prompt, so the prompt is prefilled once). A sparse request
already computes its first token in prefill and its second in a dense decode step (it
converts at its second decode step), so "N" adds N dense tokens to those two.

    .venv/bin/python docs/results/sparse-ruler-8k-losses/dense_start.py \\
        > docs/results/sparse-ruler-8k-losses/dense-start.txt
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import yaml

from sgl_kvtier.eval.ruler import generate
from sgl_kvtier.eval.ruler.scoring import score
from sgl_kvtier.harness.prompts import load_tokenizer
from sgl_kvtier.harness.resolve import resolve_model
from sgl_kvtier.harness.server import Server

SAMPLES = [("niah_multikey_1", 6), ("niah_multiquery", 4), ("niah_multivalue", 6),
           ("qa_1", 3), ("fwe", 5),  # lost at 6 %
           ("niah_single_1", 0), ("vt", 1), ("vt", 7), ("fwe", 9)]  # won at 6 %
DENSE_FIRST = (1, 2, 4)
NEW = 48
SPARSE = {"enabled": True, "budget_fraction": 0.06, "budget_min_tokens": 32,
          "host_memory": "2GiB", "exact_score_heads": [[7, 2], [17, 1], [18, 2]]}


def main() -> None:
    model = resolve_model("smollm2")
    tok = load_tokenizer(model)
    count = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])
    folder = Path(tempfile.mkdtemp(prefix="dense-start-"))
    config = folder / "kvtier.yaml"
    config.write_text(yaml.safe_dump({"sparse": SPARSE}))
    args = ["--device", "cpu", "--dtype", "float32", "--max-total-tokens", "65536",
            "--enable-kvtier", "--kvtier-config", str(config), "--model-path", str(model)]
    print("N: dense tokens added before sparse decode; score (first 40 characters)\n")
    with Server(args, folder / "server.log") as server:
        for task, index in SAMPLES:
            sample = generate(task, count, 8192, index + 1, 42, NEW)[index]
            ids = tok(sample.prompt, add_special_tokens=False)["input_ids"]
            dense = server.generate(ids, NEW, custom_params={"kvtier_sparse": False})
            rows = [("dense", dense.text), ("sparse", server.generate(ids, NEW).text)]
            for n in DENSE_FIRST:
                head = dense.output_ids[:n]
                tail = server.generate(ids + head, NEW - n)
                rows.append((f"N={n}", tok.decode(head) + tail.text))
            print(f"{task} #{index}:")
            for name, text in rows:
                print(f"  {name:7} {score(sample.metric, text, sample.answers):5.1f} "
                      f"{text[:40]!r}")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
