#!/usr/bin/env bash
# Rebuilds the lung segmenter that ships in src/covidxr/bundled (lungs.onnx, lungs.json,
# lungs.safetensors): sets up .venv, trains on ../shared/data/lung-masks into runs/segmenter (patients
# split by seed, held-out Dice per group in metrics.json), then copies the graph into the package.
# Rerunning after an interruption resumes from runs/segmenter/checkpoint.pt. Extra arguments go to
# `covidxr train-segmenter` (e.g. --epochs 30 --seed 1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=${COVIDXR_OUT:-runs/segmenter}
.venv/bin/covidxr train-segmenter --masks ../shared/data/lung-masks --out "$OUT" --bundle "$@"
