#!/usr/bin/env bash
# One-step setup on a fresh Debian machine: the Fashion-MNIST package, a virtual environment in
# .venv with the CPU build of torch pinned, and ftikd installed editable with its test tools and
# Ray (the sweep's cluster executor, tested on a local instance).
set -euo pipefail
cd "$(dirname "$0")/.."

FMNIST=/usr/share/datasets/fashion-mnist
if [ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ]; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    echo "setup: installing Debian package dataset-fashion-mnist"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    "$PY" -m venv .venv
fi
# torch first and pinned: an unpinned install would pull a multi-GB CUDA build.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    echo "setup: installing torch==${FTIKD_TORCH:-2.13.0} (CPU build)"
    .venv/bin/pip install -q "torch==${FTIKD_TORCH:-2.13.0}"
fi
.venv/bin/pip install -q -e '.[test,ray,vrm,tensorboard]'
echo "setup: ready ($(.venv/bin/python -c 'import torch, ftikd; print("ftikd", ftikd.__version__, "torch", torch.__version__)'))"
