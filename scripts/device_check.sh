#!/usr/bin/env bash
# The prepared GPU check: every CUDA number of the project in one run of at most ~8 minutes (bevdeform/device_check.py
# says what each step measures). Keeps going past a failing step; writes device_check.{md,json,log} under $OUT.
#
#   on a lent GPU (the device tool; carry data/device_check, written here first):
#       .venv/bin/python -m bevdeform.device_check prepare-data         # here, once: the synthetic set (needs the devkit)
#       bash scripts/device_check.sh                                     # there, as the device tool's command
#   anywhere, on the CPU with tiny shapes (what tests/test_device_check.py runs):
#       bash scripts/device_check.sh --dry-run        (or DEVICE=cpu bash scripts/device_check.sh)
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
export PYTHONUNBUFFERED=1
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
# The GPU machine has torch, lightning, numpy, scipy, hypothesis and OpenCV but no registry and no devkit: install
# the package itself without dependencies (editable, no build isolation: nothing is fetched).
if ! "$PY" -c "import bevdeform._ops" 2>/dev/null; then
    echo "[device_check] installing bevdeform from $(pwd) (no dependencies)"
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . || echo "[device_check] pip install failed"
fi
exec "$PY" -m bevdeform.device_check run "$@"
