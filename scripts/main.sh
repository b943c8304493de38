#!/usr/bin/env bash
# The main job on a fresh machine: install, get the data, train the default preset,
# evaluate it, write the report. Extra arguments go to `omnivae run` (e.g. --preset quick
# or --config FILE; without them the default preset).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/omnivae run --out "${RUN_DIR:-runs/default}" "$@"
