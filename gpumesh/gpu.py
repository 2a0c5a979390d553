"""The GPU backend: marching cubes and label downsampling as CUDA kernels run through CuPy.

The kernels live in ``kernels/*.cu`` (``marching_cubes.cu``, ``downsample.cu``) and mirror the
CPU kernels line for line (:func:`gpumesh.marching._march`, :func:`gpumesh.lod._downsample2`),
with the same case table (:mod:`gpumesh.mctable`) uploaded as device arrays.  Marching cubes
runs in two passes so that the output order is the CPU's emission order:

1. ``mc_count_<dtype>``: one thread per cube writes how many triangles the cube emits;
2. ``cumsum`` (CuPy's scan) of the counts gives each cube its first output row;
3. ``mc_emit_<dtype>``: one thread per cube writes its triangles at that row, labels in corner
   order and triangles in table order, exactly as the CPU does.

The triangle arrays (label, piece, edge ids) are then copied to the host and welded by
:func:`gpumesh.marching.weld`, so :meth:`GPUBackend.mesh` returns the same pieces as
:meth:`gpumesh.backend.CPUBackend.mesh`, array for array.

CuPy is imported only when a :class:`GPUBackend` is constructed; importing this module never
needs it.  The host-side logic talks to the device through a small *runtime* object (CuPy by
default); the tests swap in a CPU emulation of the same kernels (``tests/cuda_emulation``), so
this module's logic and the ``.cu`` files are checked without a GPU.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Optional, Sequence

import numpy as np

from . import marching
from .mctable import EDGE_AXIS, EDGE_BASE, TRI_COUNTS, TRI_TABLE

#: Kernel source files, in the order they are concatenated into one module.
KERNEL_FILES = ("marching_cubes.cu", "downsample.cu")

#: Label dtype suffixes of the kernel entry points.
DTYPE_SUFFIX = {np.dtype(np.uint8): "u8", np.dtype(np.uint16): "u16",
                np.dtype(np.uint32): "u32", np.dtype(np.uint64): "u64"}

#: Every ``extern "C"`` entry point the backend launches.
KERNEL_NAMES = tuple(f"{kind}_{s}" for kind in ("mc_count", "mc_emit", "ds2")
                     for s in DTYPE_SUFFIX.values())

#: Environment variable naming a directory that holds the ``.cu`` files (overrides the search).
KERNEL_DIR_ENV = "GPUMESH_KERNEL_DIR"

DEFAULT_BLOCK = 256
#: Cap on blocks per launch; the kernels loop (grid-stride) over whatever is left.
DEFAULT_MAX_BLOCKS = 1 << 20


def kernel_dir() -> pathlib.Path:
    """Directory holding the kernel sources.

    Searched in order: ``$GPUMESH_KERNEL_DIR``; ``gpumesh/kernels`` (kernels shipped inside the
    package); ``kernels/`` beside the package (a source checkout or editable install).

    Raises
    ------
    FileNotFoundError
        No candidate holds every file of :data:`KERNEL_FILES`.
    """
    here = pathlib.Path(__file__).resolve().parent
    candidates = []
    if os.environ.get(KERNEL_DIR_ENV):
        candidates.append(pathlib.Path(os.environ[KERNEL_DIR_ENV]))
    candidates += [here / "kernels", here.parent / "kernels"]
    for d in candidates:
        if all((d / f).is_file() for f in KERNEL_FILES):
            return d
    raise FileNotFoundError(
        f"CUDA kernel sources {KERNEL_FILES} not found in any of {[str(c) for c in candidates]}")


def kernel_source() -> str:
    """The concatenated source of every kernel file (one CUDA module)."""
    d = kernel_dir()
    return "\n".join((d / f).read_text() for f in KERNEL_FILES)


def label_dtype(dtype: np.dtype) -> np.dtype:
    """The unsigned kernel dtype for a label dtype (signed labels are viewed as unsigned).

    Raises
    ------
    TypeError
        Not an integer dtype of 1, 2, 4 or 8 bytes.
    """
    dt = np.dtype(dtype)
    if dt.kind not in "ui" or dt.itemsize not in (1, 2, 4, 8):
        raise TypeError(f"labels must be uint8/16/32/64 (got {dt})")
    return np.dtype(f"uint{dt.itemsize * 8}")


class CupyRuntime:
    """Device access through CuPy: the default runtime of :class:`GPUBackend`.

    Parameters
    ----------
    source : str, optional
        CUDA source of every kernel; default :func:`kernel_source`.

    Raises
    ------
    ImportError
        CuPy is missing or cannot compile the kernels.
    """

    def __init__(self, source: Optional[str] = None):
        try:
            import cupy
        except ImportError as exc:
            raise ImportError(
                "the GPU backend needs CuPy: pip install 'gpumesh-ng[gpu]' (cupy-cuda12x) "
                "on a machine with a CUDA GPU") from exc
        self.cp = cupy
        src = kernel_source() if source is None else source
        try:
            self.module = cupy.RawModule(code=src)
            self.functions = {name: self.module.get_function(name) for name in KERNEL_NAMES}
        except Exception as exc:  # NVRTC errors, driver errors: the backend is unusable
            raise ImportError(f"the GPU kernels could not be compiled or loaded: {exc}") from exc

    def to_device(self, a: np.ndarray) -> Any:
        return self.cp.asarray(a)

    def to_host(self, a: Any) -> np.ndarray:
        return self.cp.asnumpy(a)

    def empty(self, shape, dtype) -> Any:
        return self.cp.empty(shape, dtype=dtype)

    def cumsum(self, a: Any) -> Any:
        return self.cp.cumsum(a, dtype=np.int64)

    def launch(self, name: str, grid: int, block: int, args: Sequence[Any]) -> None:
        self.functions[name]((grid,), (block,), tuple(args))


class GPUBackend:
    """CUDA implementation of the hot stages (same interface as ``CPUBackend``).

    Parameters
    ----------
    runtime : optional
        Device runtime (default :class:`CupyRuntime`); the tests pass a CPU emulation.
    block : int
        Threads per block.
    max_blocks : int
        Most blocks per launch; larger problems are covered by the kernels' grid-stride loops.

    Raises
    ------
    ImportError
        No CuPy, or the kernels do not compile (``gpumesh.backend.get_backend`` then falls
        back to the CPU for ``device="auto"``).
    """

    name = "gpu"

    def __init__(self, runtime: Any = None, block: int = DEFAULT_BLOCK,
                 max_blocks: int = DEFAULT_MAX_BLOCKS):
        self.rt = CupyRuntime() if runtime is None else runtime
        self.block = int(block)
        self.max_blocks = int(max_blocks)
        rt = self.rt
        self._tri_counts = rt.to_device(np.ascontiguousarray(TRI_COUNTS, dtype=np.int32))
        self._tri_table = rt.to_device(np.ascontiguousarray(TRI_TABLE, dtype=np.int8))
        self._max_tris = np.int64(TRI_TABLE.shape[1])
        self._edge_base = rt.to_device(np.ascontiguousarray(EDGE_BASE, dtype=np.int32))
        self._edge_axis = rt.to_device(np.ascontiguousarray(EDGE_AXIS, dtype=np.int32))

    def _grid(self, n: int) -> int:
        return max(1, min(self.max_blocks, -(-n // self.block)))

    def march(self, labels: np.ndarray, piece_size: int):
        """Triangles of every segment in a block, like :func:`gpumesh.marching.march_cubes`.

        Returns
        -------
        tri_label : (T,) ndarray, dtype of ``labels``
        tri_piece : (T,) int32 or int64
        tri_edges : (T, 3) int32 or int64
            The same arrays (dtypes from :func:`gpumesh.marching.index_dtype`), in the same
            order, as the CPU kernel.
        """
        labels = np.ascontiguousarray(labels)
        if labels.ndim != 3:
            raise ValueError(f"labels must be 3-D (got shape {labels.shape})")
        if int(piece_size) < 1:
            raise ValueError(f"piece_size must be >= 1 (got {piece_size})")
        udt = label_dtype(labels.dtype)
        nx, ny, nz = (int(s) for s in labels.shape)
        ncubes = max(nx - 1, 0) * max(ny - 1, 0) * max(nz - 1, 0)
        if ncubes == 0:
            idt = marching.index_dtype(labels.shape)
            return (np.empty(0, labels.dtype), np.empty(0, idt), np.empty((0, 3), idt))
        rt, sfx = self.rt, DTYPE_SUFFIX[udt]
        d_labels = rt.to_device(labels.view(udt))
        dims = (np.int64(nx), np.int64(ny), np.int64(nz))
        counts = rt.empty(ncubes, np.int32)
        grid = self._grid(ncubes)
        rt.launch(f"mc_count_{sfx}", grid, self.block, (d_labels, counts, *dims, self._tri_counts))
        scan = rt.cumsum(counts)
        total = int(rt.to_host(scan[ncubes - 1:])[0])
        out_label = rt.empty(total, udt)
        out_piece = rt.empty(total, np.int64)
        out_edges = rt.empty((total, 3), np.int64)
        if total > 0:
            rt.launch(f"mc_emit_{sfx}", grid, self.block,
                      (d_labels, counts, scan, *dims, np.int64(piece_size),
                       self._tri_counts, self._tri_table, self._max_tris,
                       self._edge_base, self._edge_axis, out_label, out_piece, out_edges))
        idt = marching.index_dtype(labels.shape)  # the CPU kernel's id dtype
        return (rt.to_host(out_label).view(labels.dtype), rt.to_host(out_piece).astype(idt, copy=False),
                rt.to_host(out_edges).astype(idt, copy=False))

    def mesh(self, labels: np.ndarray, piece_size: int) -> list[marching.Piece]:
        """Welded pieces of every segment in a block (see ``CPUBackend.mesh``)."""
        labels = np.ascontiguousarray(labels)
        tri_label, tri_piece, tri_edges = self.march(labels, piece_size)
        return marching.weld(tri_label, tri_piece, tri_edges, labels.shape)

    def downsample(self, labels: np.ndarray) -> np.ndarray:
        """Labels downsampled by 2 with the non-zero mode rule (see ``lod.downsample_labels``)."""
        labels = np.ascontiguousarray(labels)
        if labels.ndim != 3:
            raise ValueError(f"labels must be 3-D (got shape {labels.shape})")
        udt = label_dtype(labels.dtype)
        sx, sy, sz = (int(s) for s in labels.shape)
        shape = ((sx + 1) // 2, (sy + 1) // 2, (sz + 1) // 2)
        n = shape[0] * shape[1] * shape[2]
        if n == 0:
            return np.empty(shape, labels.dtype)
        rt = self.rt
        d_labels = rt.to_device(labels.view(udt))
        out = rt.empty(shape, udt)
        rt.launch(f"ds2_{DTYPE_SUFFIX[udt]}", self._grid(n), self.block,
                  (d_labels, out, np.int64(sx), np.int64(sy), np.int64(sz),
                   np.int64(shape[0]), np.int64(shape[1]), np.int64(shape[2])))
        return rt.to_host(out).view(labels.dtype)
