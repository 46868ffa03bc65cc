#!/usr/bin/env bash
# The whole test suite (unit, patches, real servers over HTTP). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
