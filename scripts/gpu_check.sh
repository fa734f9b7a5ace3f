#!/usr/bin/env bash
# The device check (scripts/gpu_check.py): every engine path on every GPU present, in under 9 minutes. Prints one
# JSON line per check and a summary line; the same lines go to <out>/gpu_check.jsonl, each run's output to
# <out>/logs/. Exit code 0 when no check failed.
#
#   scripts/gpu_check.sh [--out DIR] [--checks step1_loss,finite,overflow,resume,packing,reload,mfu] [--nproc N]
#   PY=/path/to/python scripts/gpu_check.sh    # a Python with torch, colossalai 0.5.0 and this repo's requirements
#
# A machine whose Python lacks colossalai and has no package registry takes the wheels of `make gpu-wheels`
# (carried in .whl/), installed beside its own torch:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site PY=python3 scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-python3}
export PYTHONUNBUFFERED=1
exec "$PY" scripts/gpu_check.py --python "$PY" "$@"
