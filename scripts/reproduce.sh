#!/usr/bin/env bash
# The main job: sets up .venv, then reproduces the preprint's protocol on ../shared/data/cxr3 into runs/reproduce.
# Extra arguments go to `covidxr reproduce` (e.g. --models efficientnet_lite0 --epochs 20).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
DATA=${COVIDXR_DATA:-../shared/data/cxr3}
OUT=${COVIDXR_OUT:-runs/reproduce}
.venv/bin/covidxr reproduce --data "$DATA" --out "$OUT" "$@"
