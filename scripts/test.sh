#!/usr/bin/env bash
# README command 2: set up the venv if needed, then run the test suite (pytest args pass through).
#   bash scripts/test.sh              # everything, slow tests (real vLLM on CPU) included
#   bash scripts/test.sh -m "not slow"
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$repo/scripts/setup.sh"
venv=${EMQ_VENV:-$repo/.venv}
cd "$repo"
exec "$venv/bin/python" -m pytest "$@"
