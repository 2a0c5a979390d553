"""Loading the main job's numba kernels in the worker pool, each worker compiling its share.

The CPU stages are numba kernels compiled on first use and cached on disk (``cache=True``:
``__pycache__`` beside the sources, or ``NUMBA_CACHE_DIR``).  On a first run (a fresh clone,
a new container, a changed source file) every worker process used to compile every kernel as
its first task reached it: about 15 s of CPU per worker on the 2-core VM of
``docs/STATUS.md``, the same work in every worker, before any of them finished a task.

Here each worker, before its first task, walks the list of warm-up jobs (:data:`JOBS`, tiny
calls through the same functions the tasks use, so the kernels get exactly the tasks'
argument types) from its own starting point (:func:`start_index`): worker ``w`` of ``n``
begins near the point where ``w/n`` of the compile work lies behind.  numba looks in its
disk cache before compiling, so when a worker reaches a job that another worker has already
compiled it loads the result (tens of milliseconds) instead of compiling it again.  With
``n`` workers each compiles about ``1/n`` of the kernels, and the pool's first tasks start
that much sooner; on a warm cache the walk only loads what the tasks would load anyway.

Nothing here changes a result: the kernels are the same functions, and a job that fails for
any reason only leaves its kernels to be compiled on first use, as before.

:func:`precompile` (``gpumesh warmup``) walks the same jobs ahead of any job, for every label
dtype, with ad-hoc meshing's kernels and, with a GPU, the CUDA kernels too: run in a container
image's build, it leaves the image's jobs nothing to compile (``tests/test_kernel_caches.py``).
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np


def _tetrahedra() -> tuple[np.ndarray, np.ndarray]:
    """A small closed mesh in the dtypes of a welded piece: four disjoint tetrahedra (16
    triangles, enough to be decimated), vertices as doubled lattice coordinates (int32, one
    odd coordinate each) inside a 6^3 block."""
    base = np.array([[1, 2, 2], [3, 2, 2], [2, 3, 2], [2, 2, 3]], dtype=np.int32)
    tri = np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]], dtype=np.int32)
    v2 = np.concatenate([base + np.array([2 * j, 0, 0], dtype=np.int32) for j in range(4)])
    faces = np.concatenate([tri + 4 * j for j in range(4)])
    return np.ascontiguousarray(v2, dtype=np.int32), np.ascontiguousarray(faces)


def _relabel(dtype) -> None:
    from .marching import relabel_block

    labels = np.zeros((3, 3, 3), dtype=dtype)
    labels[1, 1, 1] = 7
    labels[2, 1, 1] = 3
    relabel_block(labels)


def _downsample(dtype) -> None:
    from .lod import downsample_labels

    # the coarse task downsamples the source's IDs, the octant tasks local IDs (uint32)
    for dt in {np.dtype(dtype), np.dtype(np.uint32)}:
        labels = np.zeros((3, 3, 3), dtype=dt)
        labels[1, 1, 1] = 1
        downsample_labels(labels)


def _march(dtype) -> None:
    from .marching import march_cubes

    labels = np.zeros((3, 3, 3), dtype=np.uint32)   # the tasks march local IDs (uint32)
    labels[1, 1, 1] = 1
    march_cubes(labels, 2)


def _weld(dtype) -> None:
    from .marching import weld

    # two triangles of segment 1 in piece 0, as marching cubes gives them for a 3^3 block
    tri_label = np.ones(2, dtype=np.uint32)
    tri_piece = np.zeros(2, dtype=np.int32)
    tri_edges = np.array([[39, 40, 42], [40, 45, 42]], dtype=np.int32)
    weld(tri_label, tri_piece, tri_edges, (3, 3, 3))


def _piece_kernels(dtype) -> None:
    from .marching import march_cubes, piece_in_node, thin_vertices, weld

    labels = np.zeros((6, 6, 6), dtype=np.uint32)
    labels[1:3, 1:3, 1:3] = 1
    piece = weld(*march_cubes(labels, 4), labels.shape)[0]   # thin_vertices checks its piece against labels
    piece_in_node(piece, np.zeros(3, np.int64), np.zeros(3, np.int64), 4)
    thin_vertices(labels, piece, 4)


def _decimate(dtype) -> None:
    from .lod import decimate

    v2, faces = _tetrahedra()
    n = len(v2)
    decimate(0.5 * v2.astype(np.float64), faces, 0.4, np.array([4.0, 4.0, 5.0]),
             frozen=np.arange(n) % 4 == 0, locked=np.arange(n) % 4 == 1)


def _encode(dtype) -> None:
    from .encode import quantize, weld_quantized

    v2, faces = _tetrahedra()
    weld_quantized(quantize(0.5 * v2.astype(np.float64), 4, 16), faces)


def _octree(dtype) -> None:
    from .octree import segment_nodes

    # a segment's manifest: its fragments' nodes and their parents (the output's writing)
    segment_nodes(np.array([[0, 0, 0], [1, 0, 1]], dtype=np.uint32), np.array([0, 0]), 2)


@dataclass(frozen=True)
class Job:
    """One warm-up job: ``run(label_dtype)`` compiles (or loads) some kernels.

    Attributes
    ----------
    name : str
    run : callable(numpy.dtype)
    seconds : float
        About how long its kernels take to compile on a fresh cache (2-core VM of
        ``docs/STATUS.md``, in a process that has compiled a kernel before; the forty-fourth
        session's figures), to start the workers at even shares of the work.
    cpu_backend : bool
        Only the CPU backend uses these kernels (the GPU backend runs them on the device).
    """

    name: str
    run: Callable[[np.dtype], None]
    seconds: float
    cpu_backend: bool = False


#: The warm-up jobs, in the order a worker starting at 0 runs them.  Between them they load
#: every numba kernel that a task of the main job calls (``tests/test_warmup.py`` checks this),
#: and those of the output's writing, which the workers share too (``octree``).
JOBS = (
    Job("decimate", _decimate, 6.0),   # the longest first: with two workers, one compiles it alone
    Job("weld", _weld, 1.7, cpu_backend=True),
    Job("relabel", _relabel, 1.1),
    Job("march", _march, 0.8, cpu_backend=True),
    Job("downsample", _downsample, 0.6, cpu_backend=True),
    Job("piece kernels", _piece_kernels, 0.75),
    Job("encode", _encode, 0.8),
    Job("octree", _octree, 1.4),
)


def jobs_for(backend: str) -> list[Job]:
    """The warm-up jobs a worker with backend ``backend`` (``cpu`` or ``gpu``) needs."""
    return [j for j in JOBS if backend == "cpu" or not j.cpu_backend]


def start_index(jobs: list[Job], worker: int, workers: int) -> int:
    """Where worker ``worker`` of ``workers`` starts: the job boundary nearest to
    ``worker/workers`` of the jobs' compile seconds (worker 0 starts at job 0)."""
    total = sum(j.seconds for j in jobs)
    target = total * (worker % max(1, workers)) / max(1, workers)
    bounds = np.cumsum([0.0] + [j.seconds for j in jobs[:-1]])
    return int(np.argmin(np.abs(bounds - target)))


def warm_up(label_dtype, backend: str = "cpu", worker: int = 0, workers: int = 1) -> list[str]:
    """Compile or load the numba kernels that the main job's tasks use, starting at this
    worker's share.

    Parameters
    ----------
    label_dtype : numpy dtype
        The volume's label dtype (:attr:`gpumesh.volume.Volume.dtype`): the tasks relabel and
        downsample labels of that dtype.
    backend : {"cpu", "gpu"}
        The worker's backend; the GPU backend needs no CPU marching cubes or downsampling.
    worker, workers : int
        This worker's number (0-based) and how many start together.

    Returns
    -------
    list of str
        The names of jobs that failed (their kernels are compiled on first use instead).
    """
    jobs = jobs_for(backend)
    if not jobs:
        return []
    s = start_index(jobs, worker, workers)
    failed = []
    for job in jobs[s:] + jobs[:s]:
        try:
            job.run(np.dtype(label_dtype))
        except Exception:  # noqa: BLE001 - the task compiles the kernel itself then
            failed.append(job.name)
    return failed


#: The label dtypes the kernels read.  Signed labels are read as the unsigned type of their width
#: (:func:`gpumesh.volume.label_dtype`), so these four cover every label dtype gpumesh reads.
KERNEL_DTYPES = ("uint8", "uint16", "uint32", "uint64")


def _adhoc(dtype) -> None:
    """Ad-hoc meshing of one segment (:func:`gpumesh.adhoc.mesh_segment`), exact and decimated:
    its scan for the segment, its sparse blocks and the marching cubes of its uint8 mask."""
    from .adhoc import SPARSE_BLOCK, mesh_segment

    labels = np.zeros((SPARSE_BLOCK + 8, 6, 6), dtype=dtype)
    labels[1:3, 1:3, 1:3] = 5
    labels[-4:-1, 1:4, 1:4] = 5
    for quality in (None, "medium"):
        mesh_segment(labels, 5, voxel_size=(1.0, 1.0, 1.0), device="cpu", quality=quality, threads=1)


@dataclass
class PrecompileReport:
    """What :func:`precompile` did.

    Attributes
    ----------
    seconds : dict of str to float
        Seconds per label dtype (its name), compiling or loading its kernels.
    failed : list of str
        ``"dtype: job"`` for each warm-up job that failed (its kernels compile on first use).
    numba_cache : str or None
        The directory numba cached the kernels in (None where it cannot be told).
    cpu_name : str
        The CPU the kernels were compiled for (numba's ``NUMBA_CPU_NAME``, else the host's):
        numba loads a cached kernel only on a CPU of that name.
    cuda : str
        ``"compiled"``, or why the CUDA kernels were not compiled.
    cupy_cache : str or None
        CuPy's kernel cache, where the CUDA kernels were compiled.
    """

    seconds: dict = field(default_factory=dict)
    failed: list = field(default_factory=list)
    numba_cache: Optional[str] = None
    cpu_name: str = ""
    cuda: str = "not asked for (device cpu)"
    cupy_cache: Optional[str] = None


def _numba_cache_of_kernels() -> Optional[str]:
    """The directory numba caches gpumesh's kernels in (one kernel's cache; all share it)."""
    from . import lod

    cache = getattr(lod._decimate, "_cache", None)
    return getattr(cache, "_cache_path", None)


def precompile(dtypes: Optional[Sequence] = None, device: str = "auto",
               progress: Optional[Callable[[str, float], None]] = None) -> PrecompileReport:
    """Compile every kernel of gpumesh into its disk cache now, so that later jobs compile none.

    A fresh install, or a new container started from an image without the kernels, compiles
    the numba kernels on its first job (about 30 s of CPU on the 2-core VM of ``docs/STATUS.md``;
    the main job's workers share it, see the module docs), and CuPy the CUDA kernels.  Run in an image's build (``gpumesh warmup``),
    this puts them in the image: numba's in the package's ``__pycache__`` (or
    ``NUMBA_CACHE_DIR``), CuPy's in its cache (``CUPY_CACHE_DIR``).  Where a container cannot
    write ``__pycache__`` (another user, a read-only root file system), gpumesh copies them to
    the cache it uses instead (:func:`gpumesh._caches.seed_numba_cache`).

    Parameters
    ----------
    dtypes : sequence of dtype-like, optional
        Label dtypes to compile the kernels for (uint8..uint64, int8..int64; a signed dtype
        shares its unsigned kernels).  Default: all of them (:data:`KERNEL_DTYPES`).
    device : {"auto", "cpu", "gpu"}
        ``auto`` and ``gpu`` also compile the CUDA kernels where CuPy sees a GPU (``auto``
        skips them without one; ``gpu`` raises).
    progress : callable(str, float), optional
        Called with each dtype's name and its seconds as it is done.

    Returns
    -------
    PrecompileReport

    Raises
    ------
    TypeError
        A dtype that is not a label dtype.
    ValueError
        Unknown device name.
    DeviceUnavailableError
        ``device="gpu"`` and no usable GPU backend.

    Notes
    -----
    numba keys each cached kernel by the CPU it was compiled for: a cache built on one CPU model
    is compiled again on another.  Build and run with ``NUMBA_CPU_NAME=generic`` for kernels
    that any x86-64 CPU loads (without that CPU's vector instructions).
    """
    from llvmlite import binding as llvm
    from numba.core import config

    from .backend import CPUFallbackNotice, check_device, closing, get_backend
    from .volume import label_dtype

    check_device(device)
    kinds = list(dict.fromkeys(label_dtype(d) for d in (KERNEL_DTYPES if dtypes is None else dtypes)))
    if not kinds:
        raise TypeError("no label dtype given")
    report = PrecompileReport(cpu_name=config.CPU_NAME or llvm.get_host_cpu_name())
    backend = None
    if device != "cpu":   # first: device "gpu" without a GPU fails before any compiling
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CPUFallbackNotice)
            backend = get_backend(device)   # the GPU backend compiles its CUDA modules as it starts
    for dt in kinds:
        t0 = time.perf_counter()
        report.failed += [f"{dt}: {name}" for name in warm_up(dt, "cpu")]
        try:
            _adhoc(dt)
        except Exception:  # noqa: BLE001 - reported; ad-hoc meshing compiles them on first use
            report.failed.append(f"{dt}: ad-hoc meshing")
        report.seconds[dt.name] = time.perf_counter() - t0
        if progress is not None:
            progress(dt.name, report.seconds[dt.name])
    report.numba_cache = _numba_cache_of_kernels()
    if backend is not None and backend.name != "gpu":
        report.cuda = "not compiled: no usable GPU (device auto)"
    elif backend is not None:
        from .adhoc import mask_to_mesh

        mask = np.zeros((6, 6, 6), dtype=np.uint8)   # ad-hoc meshing's uint8 mask, whatever the label dtype
        mask[1:4, 1:4, 1:4] = 1
        with closing(backend):   # the device memory and pool limit go back to this process
            try:   # CuPy's own kernels that the device path calls (sorts, scans)
                mask_to_mesh(mask, (0, 0, 0), (1.0, 1.0, 1.0), backend=backend)
                report.cuda = "compiled"
            except Exception as exc:  # noqa: BLE001 - reported
                report.cuda = f"compiled the modules; a trial mesh on the GPU failed: {exc}"
                report.failed.append("gpu: trial mesh")
        report.cupy_cache = os.environ.get("CUPY_CACHE_DIR") or os.path.expanduser("~/.cupy/kernel_cache")
    return report
