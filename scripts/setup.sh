#!/usr/bin/env bash
# Creates .venv (if missing) and installs covidxr with training, DICOM output and Ray (the [train,pacs,ray] extras)
# and its test tools, and with apt Chromium (browser tests), Orthanc and dcmtk (PACS tests). Safe to run again. The
# runtime alone (predict, serve) is `pip install .` from the checkout: see docs/deployment.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned: this release is served from local disk on the project's machines.
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[train,dev,pacs,ray]"
# Headless Chromium and its driver, for the test that opens report.html in a real browser.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
fi
# Orthanc (a real PACS the DICOM node's tests start and stop) and dcmtk (dsrdump, an independent SR reader).
if ! command -v Orthanc >/dev/null && [ ! -x /usr/sbin/Orthanc ] || ! command -v dsrdump >/dev/null; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq orthanc dcmtk >/dev/null
fi
