"""The backend seam: where the hot stages (marching cubes, label downsampling) run.

A backend turns one block of labels into welded mesh pieces and downsamples labels.  The CPU
backend (numba) is always present; a GPU backend (CuPy kernels from ``kernels/*.cu``) plugs in
behind the same two methods, so the rest of the pipeline does not change.
"""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import warnings
from typing import Iterator, Protocol

import numpy as np

from . import lod, marching
from .errors import DeviceUnavailableError


class Backend(Protocol):
    """Interface of a meshing backend."""

    name: str

    def mesh(self, labels: np.ndarray, piece_size: int) -> list[marching.Piece]:
        """Welded pieces of every segment in a block (see :func:`gpumesh.marching.march_cubes`).
        Signed labels are meshed as their unsigned view: a piece's ``label`` is that value."""

    def downsample(self, labels: np.ndarray, factor=(2, 2, 2)) -> np.ndarray:
        """Labels downsampled by ``factor``, 1 or 2 per axis (see
        :func:`gpumesh.lod.downsample_labels`)."""


class CPUBackend:
    """numba implementation of the hot stages."""

    name = "cpu"

    def mesh(self, labels: np.ndarray, piece_size: int) -> list[marching.Piece]:
        """Welded pieces of every segment in a block: :func:`gpumesh.marching.march_cubes`
        then :func:`gpumesh.marching.weld` (signed labels as their unsigned view)."""
        labels = marching.unsigned_view(np.ascontiguousarray(labels))   # as the GPU backend's
        tri_label, tri_piece, tri_edges = marching.march_cubes(labels, piece_size)
        return marching.weld(tri_label, tri_piece, tri_edges, labels.shape)

    def downsample(self, labels: np.ndarray, factor=(2, 2, 2)) -> np.ndarray:
        """Labels downsampled by ``factor``: :func:`gpumesh.lod.downsample_labels`."""
        return lod.downsample_labels(labels, factor)


def close_backend(backend) -> None:
    """Hand back what ``backend`` holds of the process where it has anything to hand back
    (:meth:`gpumesh.gpu.GPUBackend.close`: the device memory pools' unused blocks and the pool
    limit it set); no-op for the CPU backend.  For a process that goes on after the work: a
    notebook's after an ad-hoc mesh, a Dask worker's after a job."""
    close = getattr(backend, "close", None)
    if close is not None:
        close()


@contextlib.contextmanager
def closing(backend, close: bool = True) -> Iterator:
    """``with closing(backend):`` closes ``backend`` (:func:`close_backend`) at the end of the
    block, where ``close``; an error of the block is not hidden by one of the closing (that one
    is then dropped: the device the block failed on may fail again)."""
    try:
        yield backend
    except BaseException:
        if close:
            with contextlib.suppress(Exception):
                close_backend(backend)
        raise
    if close:
        close_backend(backend)


class CPUFallbackNotice(UserWarning):
    """``device="auto"`` found no usable GPU and meshes on the CPU (the one-line notice)."""


def gpu_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        import cupy  # noqa: F401

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def check_device(device: str) -> None:
    """Raise ``ValueError`` unless ``device`` is ``"auto"``, ``"cpu"`` or ``"gpu"``."""
    if device not in ("auto", "cpu", "gpu"):
        raise ValueError(f"unknown device {device!r}; choose auto, cpu or gpu")


def get_backend(device: str = "auto", processes: int = 1, *, stacklevel: int = 2) -> Backend:
    """Pick the backend for ``device``.

    Parameters
    ----------
    device : {"auto", "cpu", "gpu"}
        ``auto`` uses the GPU when CuPy sees one, else the CPU with a one-line notice.
    processes : int
        Processes that will share the GPU (the main job's workers): each GPU backend takes
        its share of the device's free memory (see :class:`gpumesh.gpu.GPUBackend`).
    stacklevel : int
        Of the notice, as :func:`warnings.warn`'s: 2 names the caller's line; a public function
        that calls this one passes 3, so that its caller's line is named, not gpumesh's.

    Returns
    -------
    Backend

    Raises
    ------
    DeviceUnavailableError
        ``device="gpu"`` and no usable GPU backend.
    ValueError
        Unknown device name.
    """
    check_device(device)
    if device == "cpu":
        return CPUBackend()
    if gpu_available():
        try:
            from .gpu import GPUBackend  # noqa: F401  (added by the GPU backend)

            return GPUBackend(processes=processes)
        except ImportError as exc:
            if device == "gpu":
                raise DeviceUnavailableError(f"GPU backend not available: {exc}") from exc
            why = f"the GPU backend cannot start ({exc})"
    elif device == "gpu":
        raise DeviceUnavailableError("no CUDA GPU visible to CuPy (on a GPU machine, install the [gpu] extra: "
                                     "pip install -e '.[gpu]' in a gpumesh clone)")
    elif importlib.util.find_spec("cupy") is None:
        why = "CuPy is not installed" + (" but a GPU seems present (pip install -e '.[gpu]' in a gpumesh clone)"
                                         if shutil.which("nvidia-smi") else "")
    else:
        why = "CuPy sees no usable CUDA GPU"
    warnings.warn(f"{why}; meshing on the CPU", CPUFallbackNotice, stacklevel=stacklevel)
    return CPUBackend()
