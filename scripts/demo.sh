#!/usr/bin/env bash
# The main job: SGLang with --enable-kvtier on the embedded model, a few requests, a table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m sgl_kvtier.harness.demo "$@"
