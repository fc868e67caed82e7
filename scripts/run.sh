#!/usr/bin/env bash
# README command 1: set up the venv if needed, then `python -m emq` with any Hydra overrides.
#   bash scripts/run.sh                       # the embedded demo (builds it once, ~3-5 min on 2 cores)
#   bash scripts/run.sh model=demo_lora16 quant=int8
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$repo/scripts/setup.sh"
venv=${EMQ_VENV:-$repo/.venv}
exec "$venv/bin/python" -m emq "$@"
