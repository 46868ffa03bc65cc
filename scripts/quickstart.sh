#!/usr/bin/env bash
# The main job: what sgl_kvtier does, measured from eval/configs/quickstart.yaml (stock SGLang
# versus --enable-kvtier on the embedded model; under 5 minutes on 2 CPU cores after setup).
# Extra arguments go to `python -m sgl_kvtier.eval run` (e.g. --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m sgl_kvtier.eval run eval/configs/quickstart.yaml "$@"
