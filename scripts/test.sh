#!/usr/bin/env bash
# The test command: sets up .venv, checks style, runs the whole test suite on the real images in ../shared.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks
.venv/bin/ruff format --check src tests benchmarks
.venv/bin/python -m pytest "$@"
