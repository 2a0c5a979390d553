"""Run the ``gpu`` tests without a GPU, over the CPU emulation of the kernels (a dry run).

A pytest plugin (``-p emulated_gpu``), used by ``dry_run_gpu_tests.sh``: on import it replaces
:class:`gpumesh.gpu.CupyRuntime` with :class:`cuda_emu.EmulatedRuntime` (the kernels compiled
for the CPU, NumPy standing for CuPy, an emulated 8 GiB device) and makes
:func:`gpumesh.backend.gpu_available` say yes; its collection hook lifts the skip that
``conftest.py`` puts on the ``gpu`` tests.  The main job's worker processes import it too, through
``site/sitecustomize.py`` when ``GPUMESH_EMULATED_GPU=1`` (run by the worker server, or by each
spawned worker), and load the emulation library that the first process built
(``GPUMESH_EMULATED_LIB``).

What a dry run shows: that the ``gpu`` tests' own code (fixtures, budgets, the statistics they
expect, the paths they take through :class:`gpumesh.gpu.GPUBackend` and ``run_mesh``) holds,
so a lent device's few minutes are not spent finding a bug in a test.  It shows nothing about
CUDA, CuPy or a device: the other tests of ``tests/test_gpu.py`` already run these kernels
over the emulation.
"""

from __future__ import annotations

import os
import pathlib
import tempfile

import pytest

import cuda_emu
from gpumesh import backend, gpu

LIB_ENV = "GPUMESH_EMULATED_LIB"
#: bytes of the emulated device
CAPACITY = 8 << 30

_LIB: list = []


def _library() -> cuda_emu.EmulatedLibrary:
    if not _LIB:
        saved = os.environ.get(LIB_ENV, "")
        if saved:
            path, ubsan = saved.rsplit("|", 1)
            _LIB.append(cuda_emu.load(pathlib.Path(path), gpu.KERNEL_NAMES, ubsan == "1"))
        else:
            lib = cuda_emu.build(pathlib.Path(tempfile.mkdtemp(prefix="gpumesh-emu-")),
                                 [gpu.kernel_dir() / f for f in gpu.KERNEL_FILES], gpu.KERNEL_NAMES)
            os.environ[LIB_ENV] = f"{lib.path}|{int(lib.ubsan)}"  # for the workers (gpumesh.workerserver)
            _LIB.append(lib)
    return _LIB[0]


class EmulatedCupyRuntime(cuda_emu.EmulatedRuntime):
    """Stands for :class:`gpumesh.gpu.CupyRuntime` (same constructor)."""

    def __init__(self, source=None, pinned=None):
        super().__init__(_library(), seed=5, capacity=CAPACITY)
        #: the emulation has no pinned memory; it reports what was asked for
        self.pinned = True if pinned is None else bool(pinned)


gpu.CupyRuntime = EmulatedCupyRuntime
backend.gpu_available = lambda: True


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Lift conftest.py's skip of the ``gpu`` tests (it sees no GPU)."""
    for item in items:
        item.own_markers = [m for m in item.own_markers
                            if not (m.name == "skip" and "CUDA GPU" in str(m.kwargs.get("reason", "")))]
