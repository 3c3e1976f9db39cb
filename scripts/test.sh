#!/usr/bin/env bash
# The test command: lint, then the whole suite on CPU (8 fake devices, see tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check .
ruff format --check .
python -m pytest -q -n 2 --dist loadgroup --durations=15 tests "$@"
