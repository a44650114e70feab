#!/usr/bin/env bash
# One-command GPU validation of prefloss on a bare H100/H200 machine with this checkout.
# NEVER RUN ON A GPU YET (no GPU was lent while it was written): see scripts/gpu_check.py.
#
#   scripts/gpu_check.sh                      # writes $OUT/gpu_check.json (or ./gpu_check.json)
#   scripts/gpu_check.sh --json /tmp/g.json   # elsewhere
#   scripts/gpu_check.sh --dry-run            # the script's logic on a CPU (tiny shapes, interpreter)
#
# Uses $PYTHON, else python3: on a GPU machine that must be the python whose torch is a CUDA build
# (on this workplace's H200 image, the preinstalled /opt/torch/.venv python3). Nothing is
# downloaded unless something is missing; liger-kernel is taken from ./wheels/ when that exists.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
