#!/usr/bin/env bash
# Dry run of the `gpu` tests (tests/test_gpu.py, -m gpu) on a machine without a GPU: CuPy's
# runtime is replaced by the CPU emulation of the kernels, in this process and in the main
# job's worker processes (tests/cuda_emulation/emulated_gpu.py).  It checks the tests' own
# code before a lent device's short time is spent on them; it says nothing about a device.
# bench/device/prepare.sh runs it.  Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
HERE="$PWD/tests/cuda_emulation"
export GPUMESH_EMULATED_GPU=1
export PYTHONPATH="$HERE/site:$HERE${PYTHONPATH:+:$PYTHONPATH}"
unset GPUMESH_EMULATED_LIB
exec "$PY" -m pytest -q -p no:cacheprovider -p emulated_gpu -W ignore::pytest.PytestAssertRewriteWarning \
  -m gpu tests/test_gpu.py "$@"
