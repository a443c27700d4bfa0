#!/usr/bin/env bash
# The optional timm step: builds .venv-timm (torch + torchvision that import together, timm, ftikd
# editable with its test tools) and runs tests/test_timm.py there. The core .venv keeps the pinned
# CPU torch, beside which torchvision does not import, so timm never enters the default test run.
# Override the pair with FTIKD_TIMM_TORCH / FTIKD_TIMM_TORCHVISION; extra pytest args pass through.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv-timm
PY=${PYTHON:-python3}
TORCH=${FTIKD_TIMM_TORCH:-2.14.1}
TORCHVISION=${FTIKD_TIMM_TORCHVISION:-0.29.1}

if [ ! -x "$VENV/bin/python" ]; then
    echo "test-timm: creating $VENV"
    "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import timm, torchvision" 2>/dev/null; then
    # torch, torchvision and timm in one command, torch pinned with its torchvision: separately,
    # pip may pick a torchvision built against another torch, which then fails to import.
    echo "test-timm: installing torch==$TORCH torchvision==$TORCHVISION timm (large)"
    "$VENV/bin/pip" install -q "torch==$TORCH" "torchvision==$TORCHVISION" "timm>=1.0"
fi
"$VENV/bin/pip" install -q -e '.[test,timm]'
"$VENV/bin/python" -c 'import timm, torch, torchvision; print("test-timm: timm", timm.__version__, "torch", torch.__version__, "torchvision", torchvision.__version__)'
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_timm.py "$@"
