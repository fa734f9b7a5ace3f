#!/usr/bin/env bash
# The device check (scripts/gpu_check.py): every engine path on the GPUs present, in one run of at most 420 s with
# the wheel install (docs/device_check.md). Prints a plan line, one JSON line per check and a summary line; the same
# lines go to <out>/gpu_check.jsonl, each run's output to <out>/logs/. Exit code 0 when no check failed and every
# skip was stated in the plan.
#
#   scripts/gpu_check.sh [--wheels DIR] [--setup-only] [--out DIR] [--checks ...] [--nproc N] [--budget-s S]
#   scripts/gpu_check.sh --rehearse [--out DIR]     # the whole check on CPU under the ZeRO-on-CPU stand-ins
#   PY=/path/to/python scripts/gpu_check.sh         # a Python with torch, colossalai 0.5.0 and this repo's requirements
#
# --wheels DIR: a machine whose Python has its own torch but no colossalai and no package registry takes the wheels
# of `make gpu-wheels` (carried in DIR, e.g. .whl/), installed beside its torch into $GPU_CHECK_SITE
# (default /tmp/gpu_check_site), with their executables (ninja) on PATH:
#   scripts/gpu_check.sh --wheels .whl
# --setup-only: after the install, only the `facts` and `imports` steps (what `make gpu-rehearsal` runs).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-python3}
export PYTHONUNBUFFERED=1
wheels="" setup_only=0 rest=()
while (($#)); do
  case "$1" in
    --wheels) wheels=${2:?--wheels needs a directory}; shift 2 ;;
    --setup-only) setup_only=1; shift ;;
    *) rest+=("$1"); shift ;;
  esac
done
if [[ -n "$wheels" ]]; then
  compgen -G "$wheels/*.whl" >/dev/null || { echo "error: --wheels $wheels: no .whl files there" >&2; exit 2; }
  site=${GPU_CHECK_SITE:-/tmp/gpu_check_site}
  start=$SECONDS
  # numpy is carried for an image without one; over the image's own (2.x on some CUDA images) the set's 1.26 would
  # shadow it, and the image's packages would fail on import ("module 'numpy' has no attribute 'long'").
  # The site is rebuilt each time: pip --target leaves an earlier install's packages in place.
  to_install=("$wheels"/*.whl)
  if "$PY" -c "import numpy" 2>/dev/null; then
    to_install=($(printf '%s\n' "${to_install[@]}" | grep -v '/numpy-'))
  fi
  rm -rf "$site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" "${to_install[@]}"
  echo "{\"wheels\": \"$wheels\", \"site\": \"$site\", \"install_seconds\": $((SECONDS - start))}"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PATH="$site/bin:$PATH"
fi
# HybridAdam's kernel build reads CUDA_HOME. Unset, torch takes nvcc's directory's parent, /usr/local for an nvcc
# wrapper in /usr/local/bin: take the toolkit nvcc itself runs from instead (its --dryrun names it). A toolkit
# without cuBLAS (nvcc and cudart only) takes cuBLAS's header and library from torch's own CUDA wheels
# (site-packages/nvidia/cu13), through the compiler's and linker's search paths; training.optimizer's toolchain
# check looks there too.
if [[ -z "${CUDA_HOME:-}" ]] && command -v nvcc >/dev/null; then
  here=$(nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -n 1 || true)
  [[ -n "$here" && -d "$here/.." ]] && export CUDA_HOME=$(cd "$here/.." && pwd)
fi
if [[ -n "${CUDA_HOME:-}" && ! -f "$CUDA_HOME/include/cublas_v2.h" ]]; then
  cublas=$("$PY" - <<'PY' 2>/dev/null || true
import glob, os
try:
    import nvidia
    for root in nvidia.__path__:
        for header in glob.glob(os.path.join(root, "*", "include", "cublas_v2.h")):
            print(os.path.dirname(os.path.dirname(header)))
            raise SystemExit
except ImportError:
    pass
PY
)
  if [[ -n "$cublas" ]]; then
    export CPATH="$cublas/include${CPATH:+:$CPATH}" LIBRARY_PATH="$cublas/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
  fi
fi
if ((setup_only)); then
  "$PY" scripts/gpu_check_device.py facts
  exec "$PY" scripts/gpu_check_device.py imports
fi
exec "$PY" scripts/gpu_check.py --python "$PY" ${rest[@]+"${rest[@]}"}
