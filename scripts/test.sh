#!/usr/bin/env bash
# Install and run the test suite. Tests on the real Omniglot data run when OMNIVAE_TEST_DATA
# names a folder with the zips (they fail, not skip, if it is set but missing).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
