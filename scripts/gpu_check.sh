#!/usr/bin/env bash
# One-command GPU validation of prefloss on a bare H100/H200 machine with this checkout, or
# unchanged on an AMD Instinct one (MI300X/MI325X/MI250X) with a ROCm build of PyTorch (no nvidia-smi
# or rocm-smi needed: it asks torch). NEVER RUN ON A GPU YET (none was lent while it was written),
# NVIDIA or AMD: see scripts/gpu_check.py.
#
#   scripts/gpu_check.sh                      # writes $OUT/gpu_check.json (or ./gpu_check.json)
#   scripts/gpu_check.sh --json /tmp/g.json   # elsewhere
#   scripts/gpu_check.sh --dry-run            # the script's logic on a CPU (tiny shapes, interpreter)
#
# Uses $PYTHON, else python3: on a GPU machine that must be the python whose torch is a CUDA (or ROCm) build
# (on this workplace's H200 image, the preinstalled /opt/torch/.venv python3). Nothing is
# downloaded unless something is missing; liger-kernel is taken from ./wheels/ when that exists.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
