#!/usr/bin/env bash
# Rebuilds the model that ships in src/covidxr/bundled: sets up .venv, runs the deconfounded design's
# chosen variant on ../shared/data/cxr3 + ../shared/data/adult-controls (train, evaluate, audit,
# leave-one-source-out) into runs/designs, then copies it into the package with its model card.
# The variant was chosen by leave-one-source-out, not internal accuracy: see the README.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VARIANT=${1:-${COVIDXR_BUNDLED_VARIANT:-zscore}}
OUT=${COVIDXR_OUT:-runs/designs}
.venv/bin/covidxr reproduce --design deconfounded --data ../shared/data/cxr3 --data ../shared/data/adult-controls \
    --out "$OUT" --variants "$VARIANT"
.venv/bin/covidxr bundle "$OUT/deconfounded-$VARIANT"
