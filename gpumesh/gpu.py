"""The GPU backend: marching cubes and label downsampling as CUDA kernels run through CuPy.

The kernels live in ``kernels/*.cu`` (``marching_cubes.cu``, ``downsample.cu``, ``weld.cu``) and mirror the
CPU kernels line for line (:func:`gpumesh.marching._march`, :func:`gpumesh.lod._downsample`),
with the same case table (:mod:`gpumesh.mctable`) uploaded as device arrays.  Marching cubes
runs in two passes so that the output order is the CPU's emission order:

1. ``mc_count_<dtype>``: one thread per cube writes how many triangles the cube emits;
2. ``cumsum`` (CuPy's scan) of the counts gives each cube its first output row;
3. ``mc_emit_<dtype>``: one thread per cube writes its triangles at that row, labels in corner
   order and triangles in table order, exactly as the CPU does.

The triangles are then welded on the device with sorts (:meth:`GPUBackend.weld_device`) and
only vertices and faces come back; a block too large for the memory budget is marched in
x-slabs and welded on the host by :func:`gpumesh.marching.weld`.  Either way
:meth:`GPUBackend.mesh` returns the same pieces as :meth:`gpumesh.backend.CPUBackend.mesh`,
array for array.

CuPy is imported only when a :class:`GPUBackend` is constructed; importing this module never
needs it.  The host-side logic talks to the device through a small *runtime* object (CuPy by
default); the tests swap in a CPU emulation of the same kernels (``tests/cuda_emulation``), so
this module's logic and the ``.cu`` files are checked without a GPU.
"""

from __future__ import annotations

import os
import pathlib
import threading
import warnings
from typing import Any, Optional, Sequence

import numpy as np

from . import lod, marching
from ._caches import ensure_cupy_cache_dir
from .mctable import EDGE_AXIS, EDGE_BASE, TRI_COUNTS, TRI_TABLE
from .volume import label_dtype

#: Kernel source files, in the order they are concatenated into one module.
KERNEL_FILES = ("marching_cubes.cu", "downsample.cu", "weld.cu")

#: Label dtype suffixes of the kernel entry points.
DTYPE_SUFFIX = {np.dtype(np.uint8): "u8", np.dtype(np.uint16): "u16",
                np.dtype(np.uint32): "u32", np.dtype(np.uint64): "u64"}

#: Every ``extern "C"`` entry point the backend launches.
KERNEL_NAMES = tuple(f"{kind}_{s}" for kind in ("mc_count", "mc_emit", "ds2")
                     for s in DTYPE_SUFFIX.values()) + ("weld_insert", "weld_lookup")

#: How :meth:`GPUBackend.weld_device` numbers the vertices: by sorting the corners' keys
#: (CuPy's sorts), or with the hash table of ``kernels/weld.cu``.  Same pieces either way.
WELD_METHODS = ("sort", "hash")

#: Environment variable naming a directory that holds the ``.cu`` files (overrides the search).
KERNEL_DIR_ENV = "GPUMESH_KERNEL_DIR"
#: Environment variable: ``0`` makes :class:`CupyRuntime` copy through pageable memory.
PINNED_ENV = "GPUMESH_PINNED"
#: Environment variable: the default ``weld`` of :class:`GPUBackend` (``sort`` or ``hash``).
WELD_ENV = "GPUMESH_WELD"

DEFAULT_BLOCK = 256
#: Cap on blocks per launch; the kernels loop (grid-stride) over whatever is left.
DEFAULT_MAX_BLOCKS = 1 << 20
#: Share of the device's free memory that the backends of all processes on it may use.
GPU_MEMORY_FRACTION = 0.8


#: Device memory a process takes for its CUDA context alone (a few hundred MB on current
#: drivers; counted high).
CONTEXT_BYTES = 512 << 20
#: Smallest memory pool worth giving a process: a default 256^3 block's labels, counts and
#: scan (about 270 MB) with room for its triangles.
MIN_POOL_BYTES = 1 << 30


def device_processes(free_bytes: int, workers: int) -> int:
    """How many of ``workers`` processes may share one device.

    Each process that uses the device holds a CUDA context (:data:`CONTEXT_BYTES`) and a
    memory pool, and the processes share :data:`GPU_MEMORY_FRACTION` of its free memory.  So
    many processes fit that each has at least :data:`MIN_POOL_BYTES` of pool beside its
    context; the main job runs the other workers on the CPU backend (same output), instead of
    failing to create contexts on a small device with many cores.

    Parameters
    ----------
    free_bytes : int
        Free device memory (bytes), as ``cudaMemGetInfo`` reports it.
    workers : int
        The main job's worker processes.

    Returns
    -------
    int
        Between 1 and ``workers``.
    """
    fit = int(free_bytes * GPU_MEMORY_FRACTION) // (CONTEXT_BYTES + MIN_POOL_BYTES)
    return max(1, min(int(workers), fit))


#: Most elements one scan, sort or launch covers: CuPy 13's scans take the count as a C
#: ``int`` (cupy/cupy#9867), so larger marching-cubes slabs and welds are split or done on the
#: CPU.
MAX_SCAN = 2**31 - 1

#: CuPy's memory pool hands out device memory in blocks of a multiple of this many bytes, and
#: its limit (:meth:`CupyRuntime.set_limit`, the budget) counts the blocks (``_round_size`` in
#: ``cupy/cuda/memory.pyx``).
POOL_UNIT = 512


def _pool_bytes(nbytes):
    """Bytes of the pool block that holds an array of ``nbytes`` (int or integer ndarray; 0
    takes no block)."""
    return -(-nbytes // POOL_UNIT) * POOL_UNIT


#: Device bytes per triangle that :meth:`GPUBackend.weld_device` may need at its peak (its
#: sort keys, permutations and corner arrays, with CuPy's sort temporaries), on top of the
#: 40 bytes of the triangle arrays.
WELD_BYTES_PER_TRIANGLE = 320


class GPUMemoryWarning(UserWarning):
    """Part of a block did not fit in device memory even as one x-plane; it ran on the CPU."""


class _SortFailed(MemoryError):
    """A device sort returned a wrong result: CuPy up to 13.6 does so, with no error, when
    thrust cannot get its workspace from the memory pool (cupy/cupy#9894); also a hash weld
    whose table lost a key.  Taken as an out-of-memory error: the pool is freed and the block
    is done another way."""


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


class CupyRuntime:
    """Device access through CuPy: the default runtime of :class:`GPUBackend`.

    Transfers go through pinned (page-locked) host memory from CuPy's pinned memory pool, on
    the thread's current CUDA stream, the one every kernel and CuPy call here runs on: an
    upload is copied into a pinned staging buffer and queued (the host goes on launching
    kernels behind it); downloads are queued into pinned arrays, several at once
    (:meth:`to_host_many`), and the host waits once for all of them.  Pinned memory is what
    lets the DMA engine run at full speed and asynchronously to the host.  The arrays handed
    back are copies in ordinary memory, and the pinned buffers go back to the pool once the
    stream has passed them: pinned memory is held only for transfers in flight, not for as
    long as the caller keeps the results (CuPy's pool reuses a freed buffer at once, with no
    regard to streams, so none goes back while a copy is queued on it).  A
    small round trip at start-up checks it; where it fails (no pinned memory, an older CuPy)
    the runtime warns once and copies through pageable memory.

    Parameters
    ----------
    source : str, optional
        CUDA source of every kernel; default :func:`kernel_source`.
    pinned : bool, optional
        Use pinned host memory for transfers.  Default: yes, unless the environment variable
        ``GPUMESH_PINNED`` is ``0``.

    Raises
    ------
    ImportError
        CuPy is missing or cannot compile the kernels.
    """

    def __init__(self, source: Optional[str] = None, pinned: Optional[bool] = None):
        try:
            import cupy
        except ImportError as exc:
            raise ImportError(
                "the GPU backend needs CuPy: pip install -e '.[gpu]' in a gpumesh clone (cupy-cuda12x) "
                "on a machine with a CUDA GPU") from exc
        self.cp = cupy
        ensure_cupy_cache_dir()  # CuPy raises where it cannot write its kernel cache
        #: what an allocation raises when the device (or the pool's limit) has no room: CuPy's
        #: OutOfMemoryError is a MemoryError, and so is what thrust's failed workspace
        #: allocation raises in the CuPy releases that surface it (cupy/cupy#9899)
        self.oom_errors = (cupy.cuda.memory.OutOfMemoryError, MemoryError)
        #: CUDA errors that are out of memory when their ``status`` is 2 (cudaErrorMemoryAllocation,
        #: CUDA_ERROR_OUT_OF_MEMORY): what loading a module (CUDA 12 loads lazily, on the first
        #: launch: CuPy's own kernels mid-block) or a library's workspace raises on a full device
        self.oom_status_errors = tuple(
            e for e in (getattr(getattr(cupy.cuda, "runtime", None), "CUDARuntimeError", None),
                        getattr(getattr(cupy.cuda, "driver", None), "CUDADriverError", None))
            if isinstance(e, type) and issubclass(e, BaseException))
        src = kernel_source() if source is None else source
        try:
            self.module = cupy.RawModule(code=src)
            self.functions = {name: self.module.get_function(name) for name in KERNEL_NAMES}
        except Exception as exc:  # NVRTC errors, driver errors: the backend is unusable
            raise ImportError(f"the GPU kernels could not be compiled or loaded: {exc}") from exc
        #: each thread's pinned staging buffers of its queued uploads (:attr:`_staged`)
        self._local = threading.local()
        self.pinned = False
        if pinned is None:
            pinned = os.environ.get(PINNED_ENV, "1") != "0"
        if pinned:
            try:
                import cupyx

                self._empty_pinned = cupyx.empty_pinned
                self.pinned = True
                probe = np.arange(17 * 241, dtype=np.int64).reshape(17, 241) * 7919
                back = self.to_host_many([self.to_device(probe), self.to_device(probe[:, ::3])])
                if not (np.array_equal(back[0], probe) and np.array_equal(back[1], probe[:, ::3])):
                    raise RuntimeError("a round trip through pinned memory changed the data")
            except Exception as exc:  # noqa: BLE001 - pageable copies still work
                self.pinned = False
                self._staged.clear()
                warnings.warn(f"pinned host memory is not usable ({exc}); GPU transfers go "
                              "through pageable memory", RuntimeWarning, stacklevel=2)

    @property
    def xp(self):
        """The array module of device arrays (CuPy)."""
        return self.cp

    @property
    def _staged(self) -> list:
        """The pinned staging buffers of this thread's queued uploads, kept until its stream
        has passed them.  Each thread its own: under a per-thread default stream
        (``CUPY_CUDA_PER_THREAD_DEFAULT_STREAM=1``) a thread that waits for its stream has not
        waited for another thread's uploads, whose buffers must stay out of the pool (which
        hands a freed buffer out again at once) until that thread waits for its own."""
        staged = getattr(self._local, "staged", None)
        if staged is None:
            staged = self._local.staged = []
        return staged

    def _stream(self):
        return self.cp.cuda.get_current_stream()

    def _pinned_array(self, shape, dtype) -> np.ndarray:
        """An empty pinned host array from CuPy's pinned memory pool, in a buffer of a power of
        two bytes (at least 512).

        The pool gives a freed buffer again only to a request of the same size, and keeps it
        page-locked until :meth:`release`: with each block's transfers of their own sizes,
        nearly every one was a new ``cudaHostAlloc`` that then stayed in the pool (about one
        block's downloads for every block, so a long job's page-locked memory grew without
        end).  In powers of two the sizes are a few dozen, and their buffers are reused.
        """
        dtype = np.dtype(dtype)
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        raw = self._empty_pinned((1 << max(n - 1, 511).bit_length(),), np.uint8)
        return raw[:n].view(dtype).reshape(shape)

    def to_device(self, a: np.ndarray) -> Any:
        """A device copy of host array ``a``, queued on the current stream."""
        if not self.pinned:
            return self.cp.asarray(a)
        a = np.asarray(a)
        buf = self._pinned_array(a.shape, a.dtype)
        np.copyto(buf, a)
        d = self.cp.empty(a.shape, a.dtype)
        if a.size:
            d.set(buf, stream=self._stream())
            self._staged.append(buf)  # the copy reads it after this returns
        return d

    def to_host(self, a: Any) -> np.ndarray:
        """Host copy of device array ``a`` (waits for it)."""
        return self.to_host_many([a])[0]

    def to_host_many(self, arrays: Sequence[Any]) -> list[np.ndarray]:
        """Host copies of device arrays, queued together; waits once, for all of them.

        The copies land in pinned buffers and are copied once more into ordinary memory, so
        that no pinned buffer outlives the call (see the class)."""
        if not self.pinned:
            return [self.cp.asnumpy(a) for a in arrays]
        stream = self._stream()
        out = []
        try:
            for a in arrays:
                h = self._pinned_array(a.shape, a.dtype)
                if a.size:
                    self.cp.ascontiguousarray(a).get(stream=stream, out=h, blocking=False)
                out.append(h)
        finally:   # also when a later allocation fails: no buffer goes back to the pool mid-copy
            stream.synchronize()
        self._staged.clear()  # every queued upload is done too
        # the stream has passed every copy: the caller gets ordinary copies and the pinned
        # buffers go back to the pool now, for the next transfers.  Handed back as they were,
        # the callers' arrays (a slab's triangles until the block is welded, a weld's pieces
        # until their LOD is encoded) kept them page-locked and out of the pool, which then
        # made new ones for the next downloads
        return [np.array(h, copy=True) for h in out]

    def synchronize(self) -> None:
        """Wait for the work queued on the current stream; the staging buffers of the uploads
        it held go back to the pool."""
        self._stream().synchronize()
        self._staged.clear()

    def empty(self, shape, dtype) -> Any:
        """An uninitialised device array (``cupy.empty``)."""
        return self.cp.empty(shape, dtype=dtype)

    def cumsum(self, a: Any) -> Any:
        """Inclusive prefix sum of device array ``a`` as int64 (``cupy.cumsum``)."""
        return self.cp.cumsum(a, dtype=np.int64)

    def launch(self, name: str, grid: int, block: int, args: Sequence[Any]) -> None:
        """Launch kernel ``name`` of ``kernels/*.cu`` on ``grid`` blocks of ``block`` threads
        (1-D) with ``args``, on the current stream (asynchronous)."""
        self.functions[name]((grid,), (block,), tuple(args))

    def mem_info(self) -> tuple[int, int]:
        """(free, total) bytes of the current device, this process's memory pool emptied first.

        ``cudaMemGetInfo`` counts the blocks that CuPy's pool holds unused (an earlier
        backend's or call's) as taken: a second backend made in one process (an ad-hoc call in
        a notebook, the next job) measured only what the first had left free, and set the
        process's pool limit to a share of that.  The queued work is waited for, then those
        blocks go back to the device, and what is free is measured."""
        self.synchronize()
        self.cp.get_default_memory_pool().free_all_blocks()
        free, total = self.cp.cuda.runtime.memGetInfo()
        return int(free), int(total)

    #: the process's memory pool limit before the first runtime still open set one, and how
    #: many runtimes have set one and not yet restored it (the pool is the process's)
    _limit_before: Optional[int] = None
    _limit_users = 0
    _limit_lock = threading.RLock()   # re-entrant: __del__ may run in a collection inside it

    def set_limit(self, nbytes: int) -> None:
        """Cap the bytes this process's memory pool may hold (allocations past it raise);
        :meth:`restore_limit` undoes it."""
        pool = self.cp.get_default_memory_pool()
        with CupyRuntime._limit_lock:
            if not getattr(self, "_limit_set", False):
                if CupyRuntime._limit_users == 0:
                    CupyRuntime._limit_before = int(pool.get_limit())
                CupyRuntime._limit_users += 1
                self._limit_set = True
            pool.set_limit(size=int(nbytes))

    def restore_limit(self) -> None:
        """Give the memory pool back the limit it had before the first runtime still open set
        one (0: none, or ``CUPY_GPU_MEMORY_LIMIT``'s), once every runtime that set one has
        restored it; no-op for a runtime that set none."""
        with CupyRuntime._limit_lock:
            if not getattr(self, "_limit_set", False):
                return
            self._limit_set = False
            CupyRuntime._limit_users -= 1
            if CupyRuntime._limit_users == 0:
                self.cp.get_default_memory_pool().set_limit(size=int(CupyRuntime._limit_before or 0))

    def __del__(self):
        # a runtime let go of without restore_limit (a job's backend in this process, dropped
        # when run_mesh returns or fails) counts no more among those that set the limit
        try:
            self.restore_limit()
        except Exception:   # at interpreter exit, CuPy may be gone before us
            pass

    def release(self) -> None:
        """Wait for the queued work, then hand the pools' unused blocks back: the device
        pool's to the device, the pinned pool's (page-locked host memory) to the host."""
        self.synchronize()
        self.cp.get_default_memory_pool().free_all_blocks()
        self.cp.get_default_pinned_memory_pool().free_all_blocks()

    def pool_bytes(self) -> int:
        """Bytes the memory pool holds (in use or cached): the most this process has taken."""
        return int(self.cp.get_default_memory_pool().total_bytes())


def _cpu_triangles(tri, dtype, shape) -> tuple:
    """Host triangle arrays (label, piece, edges) as the CPU kernel gives them for a block of
    ``shape``: labels in ``dtype``, ids in :func:`gpumesh.marching.index_dtype`."""
    idt = marching.index_dtype(shape)
    return tri[0].view(dtype), tri[1].astype(idt, copy=False), tri[2].astype(idt, copy=False)


def _hash_table_size(corners: int) -> int:
    """Slots of the hash weld's table (``kernels/weld.cu``) for ``corners`` corners: a power of
    two, at least 16 and at least twice the corners (a load factor of at most one half)."""
    return 1 << max(4, (2 * corners - 1).bit_length())


class _SlabTooBig(Exception):
    """A slab's triangles would not fit the memory budget; ``planes`` fit."""

    def __init__(self, planes: int):
        super().__init__(planes)
        self.planes = planes


class GPUBackend:
    """CUDA implementation of the hot stages (same interface as ``CPUBackend``).

    :meth:`mesh` marches and welds a block on the device when its triangles and the weld fit
    ``memory_budget`` (which also caps the process's CuPy memory pool).  Otherwise the block is
    marched (or downsampled) in x-slabs small enough for the budget and welded on the CPU.  An
    out-of-memory error all the same (another process, fragmentation) frees the pool and
    retries at half the slab width; a single plane that still does not fit is done on the CPU
    for that block, with a warning.  None of this changes the result: the slabs' outputs, in
    order, are the whole block's, and both welds give the CPU's pieces.

    Parameters
    ----------
    runtime : optional
        Device runtime (default :class:`CupyRuntime`); the tests pass a CPU emulation.
    block : int
        Threads per block.
    max_blocks : int
        Most blocks per launch; larger problems are covered by the kernels' grid-stride loops.
    memory_budget : int, optional
        Bytes of device memory this backend may use.  Default: :data:`GPU_MEMORY_FRACTION` of
        the device's free memory when the backend is made, less the other processes' CUDA
        contexts (:data:`CONTEXT_BYTES` each; at most half of it), divided by ``processes``.
    processes : int
        Processes sharing the device (the main job's workers), for the default budget.
    weld : {"sort", "hash"}, optional
        How :meth:`weld_device` numbers the vertices: CuPy's stable sorts of the corners'
        keys, or the hash-table kernels of ``kernels/weld.cu``, which skip the largest sort
        (same pieces; which is faster is for a GPU run to show).  Default: ``$GPUMESH_WELD``,
        else ``sort``.

    Raises
    ------
    ImportError
        No CuPy, or the kernels do not compile (``gpumesh.backend.get_backend`` then falls
        back to the CPU for ``device="auto"``).
    ValueError
        ``memory_budget`` or ``processes`` is not positive.
    """

    name = "gpu"

    def __init__(self, runtime: Any = None, block: int = DEFAULT_BLOCK,
                 max_blocks: int = DEFAULT_MAX_BLOCKS, memory_budget: Optional[int] = None,
                 processes: int = 1, weld: Optional[str] = None):
        if int(processes) < 1:
            raise ValueError(f"processes must be >= 1 (got {processes})")
        if weld is None:
            weld = os.environ.get(WELD_ENV) or "sort"
        if weld not in WELD_METHODS:
            raise ValueError(f"weld must be one of {WELD_METHODS} (got {weld!r})")
        #: how weld_device numbers the vertices (WELD_METHODS)
        self.weld = weld
        self.rt = CupyRuntime() if runtime is None else runtime
        self.block = int(block)
        self.max_blocks = int(max_blocks)
        rt = self.rt
        self._oom_status = tuple(getattr(rt, "oom_status_errors", ()))
        self._oom = (tuple(getattr(rt, "oom_errors", ())) or (MemoryError,)) + (_SortFailed,) + self._oom_status
        #: one block at a time: the runtime's stream and staging buffers are shared, and
        #: threads (ad-hoc meshing's sub-blocks) would free each other's buffers mid-copy
        self._lock = threading.RLock()
        self._tri_counts = rt.to_device(np.ascontiguousarray(TRI_COUNTS, dtype=np.int32))
        self._tri_table = rt.to_device(np.ascontiguousarray(TRI_TABLE, dtype=np.int8))
        self._max_tris = np.int64(TRI_TABLE.shape[1])
        self._edge_base = rt.to_device(np.ascontiguousarray(EDGE_BASE, dtype=np.int32))
        self._edge_axis = rt.to_device(np.ascontiguousarray(EDGE_AXIS, dtype=np.int32))
        tables = sum(_pool_bytes(int(a.nbytes)) for a in (self._tri_counts, self._tri_table,
                                                          self._edge_base, self._edge_axis))
        # waited for here, whatever the budget (mem_info below waits only when none is given):
        # with a per-thread default stream (CUPY_CUDA_PER_THREAD_DEFAULT_STREAM=1) a thread that
        # meshes later (ad-hoc meshing's threads) queues its kernels on a stream of its own, not
        # ordered after these copies, and its to_host_many lets go of their staging buffers
        # after waiting for its own stream only
        rt.synchronize()
        if memory_budget is None:
            # this process's context is made (free counts it); the others' may not be yet, and
            # each takes CONTEXT_BYTES beside its pool: without them, processes that measured
            # first took GPU_MEMORY_FRACTION of the memory in pools alone, and the contexts
            # came on top (past what was free on a 24 GB card with 11 workers)
            # (never less than half the share: free may count the others' contexts already)
            free, _ = rt.mem_info()
            share = int(free * GPU_MEMORY_FRACTION)
            memory_budget = max(share - (int(processes) - 1) * CONTEXT_BYTES, share // 2) // int(processes)
        if int(memory_budget) < 1:
            raise ValueError(f"memory_budget must be positive (got {memory_budget})")
        self.memory_budget = int(memory_budget)
        rt.set_limit(self.memory_budget)
        self._avail = max(1, self.memory_budget - tables)  # for the slabs
        #: weld on the device when the block fits (see :meth:`mesh`)
        self.device_weld = True
        #: slabs run, out-of-memory retries, blocks done on the CPU instead, device welds
        self.stats = {"slabs": 0, "oom_retries": 0, "cpu_fallbacks": 0, "device_welds": 0}

    def close(self) -> None:
        """Hand back what this backend holds of the process: the memory pools' unused blocks
        (:meth:`CupyRuntime.release`) and the pool limit it set (restored as the runtime says:
        :meth:`CupyRuntime.restore_limit`).  For a process that outlives the job (a Dask
        worker, :func:`gpumesh.pipeline.end_worker_job`); the backend still meshes after it, as
        one made with no budget of its own."""
        with self._lock:
            try:
                self.rt.release()
            finally:   # a failed release (a device error) leaves the pool's limit no less the caller's
                restore = getattr(self.rt, "restore_limit", None)
                if restore is not None:
                    restore()

    def _raise_unless_oom(self, exc: BaseException) -> None:
        """Re-raise a CUDA error caught with the out-of-memory ones unless its status is 2
        (out of memory; see ``CupyRuntime.oom_status_errors``)."""
        if isinstance(exc, self._oom_status) and getattr(exc, "status", None) != 2:
            raise exc

    def _grid(self, n: int) -> int:
        return max(1, min(self.max_blocks, -(-n // self.block)))

    def _fallback(self, what: str) -> None:
        self.stats["cpu_fallbacks"] += 1
        warnings.warn(f"GPU out of memory for one x-plane of a block's {what}; that block is done "
                      "on the CPU (same result)", GPUMemoryWarning, stacklevel=3)

    def march(self, labels: np.ndarray, piece_size: int):
        """Triangles of every segment in a block, like :func:`gpumesh.marching.march_cubes`.

        Parameters
        ----------
        labels : (nx, ny, nz) ndarray of (u)int8/16/32/64
            Labels, axes x, y, z (made C-contiguous; signed IDs are viewed as unsigned).
        piece_size : int
            Edge of the pieces triangles are bucketed into, in cubes.

        Returns
        -------
        tri_label : (T,) ndarray, dtype of ``labels``
        tri_piece : (T,) int32 or int64
        tri_edges : (T, 3) int32 or int64
            The same arrays (dtypes from :func:`gpumesh.marching.index_dtype`), in the same
            order, as the CPU kernel.

        Raises
        ------
        ValueError
            ``labels`` is not 3-D or ``piece_size < 1``.
        TypeError
            Not an integer label dtype of 1, 2, 4 or 8 bytes.
        """
        labels = np.ascontiguousarray(labels)
        if labels.ndim != 3:
            raise ValueError(f"labels must be 3-D (got shape {labels.shape})")
        if int(piece_size) < 1:
            raise ValueError(f"piece_size must be >= 1 (got {piece_size})")
        udt = label_dtype(labels.dtype)
        nx, ny, nz = (int(s) for s in labels.shape)
        cx, cy, cz = max(nx - 1, 0), max(ny - 1, 0), max(nz - 1, 0)
        idt = marching.index_dtype(labels.shape)  # the CPU kernel's id dtype
        if cx * cy * cz == 0:
            return (np.empty(0, labels.dtype), np.empty(0, idt), np.empty((0, 3), idt))
        ulabels = labels.view(udt)
        # device bytes per x-plane of cubes before any triangle: labels, counts, scan (+ room
        # for a temporary of the scan); the first slab takes half the budget, leaving the rest
        # for its triangles
        plane = ny * nz * udt.itemsize + cy * cz * (4 + 8 + 8)
        width = min(self._avail // (2 * plane), MAX_SCAN // (cy * cz))   # one scan per slab
        with self._lock:
            parts = self._in_slabs(cx, width, "marching cubes",
                                   lambda i0, w: self._march_slab(ulabels, i0, w, int(piece_size)))
        if parts is None:
            return marching.march_cubes(labels, int(piece_size))
        return _cpu_triangles([np.concatenate(a) if len(parts) > 1 else a[0] for a in zip(*parts)],
                              labels.dtype, labels.shape)

    def _in_slabs(self, n: int, width: int, what: str, run) -> Optional[list]:
        """``run(start, w)`` over x-planes ``0 .. n - 1`` in slabs of at most ``width``.

        A slab that raises ``_SlabTooBig`` is redone at the width it names; one that runs out
        of memory frees the pool and is redone at half the width.  Returns the slabs' results
        in order, or None (after a ``GPUMemoryWarning``) when a single plane ran out of memory:
        the caller then does the work on the CPU.
        """
        width = max(1, min(n, width))
        parts, i0 = [], 0
        while i0 < n:
            w = min(width, n - i0)
            oom = False
            try:
                part = run(i0, w)
            except _SlabTooBig as exc:
                width = exc.planes
                continue
            except self._oom as exc:
                self._raise_unless_oom(exc)
                oom = True  # handled below, once the failed slab's device arrays are gone
            if oom:
                self.rt.release()
                self.stats["oom_retries"] += 1
                if w == 1:
                    self._fallback(what)
                    return None
                width = max(1, w // 2)
                continue
            parts.append(part)
            self.stats["slabs"] += 1
            i0 += w
        return parts

    def _march_slab(self, ulabels: np.ndarray, i0: int, w: int, piece_size: int):
        """Triangles of cube planes ``i0 .. i0 + w - 1`` (block ids), as host arrays.

        Raises ``_SlabTooBig`` when emitting them would pass the budget (and ``w > 1``)."""
        rt = self.rt
        d_out = self.march_device(rt.to_device(ulabels[i0:i0 + w + 1]), piece_size, x0=i0,
                                  check_budget=w > 1)
        return tuple(rt.to_host_many(d_out))

    def march_device(self, d_labels: Any, piece_size: int, x0: int = 0,
                     check_budget: bool = False):
        """Marching cubes on labels already on the device; the outputs stay there.

        The kernels alone (count, scan, emit), with no transfer but the scan's total: what
        :meth:`march` runs per x-slab, and what ``bench/bench_gpu.py`` times.

        Parameters
        ----------
        d_labels : (w + 1, ny, nz) device array of uint8/16/32/64, C-contiguous
            x-planes ``x0 .. x0 + w`` of a block's labels (the whole block when ``x0 = 0``
            and ``w + 1`` is its size).
        piece_size : int
            Edge of the pieces, in cubes.
        x0 : int
            The first plane's x in the block: the piece and edge ids are the block's.
        check_budget : bool
            Raise ``_SlabTooBig`` when the outputs would pass the memory budget.

        Returns
        -------
        tri_label : (T,) device array, the labels' unsigned dtype
        tri_piece : (T,) device array of int64
        tri_edges : (T, 3) device array of int64
        """
        rt = self.rt
        udt = np.dtype(d_labels.dtype)
        sfx = DTYPE_SUFFIX[udt]
        nxs, ny, nz = (int(v) for v in d_labels.shape)
        w, cy, cz = nxs - 1, ny - 1, nz - 1
        dims = (np.int64(nxs), np.int64(ny), np.int64(nz))
        ncubes = w * cy * cz
        counts = rt.empty(ncubes, np.int32)
        grid = self._grid(ncubes)
        rt.launch(f"mc_count_{sfx}", grid, self.block, (d_labels, counts, *dims, self._tri_counts))
        scan = rt.cumsum(counts)
        total = int(rt.to_host(scan[ncubes - 1:])[0])
        if check_budget:
            isz = udt.itemsize

            def need(q, tris):  # device bytes of emitting q planes: labels, counts, scan, output
                return (_pool_bytes((q + 1) * ny * nz * isz) + _pool_bytes(q * cy * cz * 4)
                        + _pool_bytes(q * cy * cz * 8) + _pool_bytes(tris * isz)
                        + _pool_bytes(tris * 8) + _pool_bytes(tris * 24))   # label, piece, 3 edge ids

            if need(w, total) > self._avail:
                # the triangles of the first q planes, from the scan at each plane's last cube
                upto = rt.to_host(scan[cy * cz - 1::cy * cz])
                fits = need(np.arange(1, w + 1), upto) <= self._avail
                raise _SlabTooBig(max(1, int(np.count_nonzero(fits))))
        out_label = rt.empty(total, udt)
        out_piece = rt.empty(total, np.int64)
        out_edges = rt.empty((total, 3), np.int64)
        if total > 0:
            rt.launch(f"mc_emit_{sfx}", grid, self.block,
                      (d_labels, counts, scan, *dims, np.int64(x0), np.int64(piece_size),
                       self._tri_counts, self._tri_table, self._max_tris,
                       self._edge_base, self._edge_axis, out_label, out_piece, out_edges))
        return out_label, out_piece, out_edges

    def mesh(self, labels: np.ndarray, piece_size: int) -> list[marching.Piece]:
        """Welded pieces of every segment in a block (see ``CPUBackend.mesh``).

        When the block's triangles and the weld fit the memory budget, marching cubes and
        welding both run on the device (:meth:`weld_device`) and only the vertices and faces
        come back; otherwise the block is marched in slabs (:meth:`march`) and welded on the
        CPU.  Either way the pieces are the CPU path's, array for array.

        Parameters
        ----------
        labels : (nx, ny, nz) ndarray of (u)int8/16/32/64
        piece_size : int
            Edge of the pieces, in cubes.

        Returns
        -------
        list of :class:`gpumesh.marching.Piece`, sorted by segment ID, then piece index.
        """
        labels = np.ascontiguousarray(marching.native_order(labels))
        if labels.ndim != 3:
            raise ValueError(f"labels must be 3-D (got shape {labels.shape})")
        labels = labels.view(label_dtype(labels.dtype))   # signed: as unsigned, as the CPU backend
        cubes = int(np.prod([max(n - 1, 0) for n in labels.shape]))
        if self.device_weld and min(labels.shape) >= 2 and int(piece_size) >= 1 and cubes <= MAX_SCAN:
            with self._lock:
                pieces = self._mesh_on_device(labels, int(piece_size))
            if pieces is not None:
                return pieces
        tri_label, tri_piece, tri_edges = self.march(labels, piece_size)
        return marching.weld(tri_label, tri_piece, tri_edges, labels.shape)

    def _mesh_on_device(self, labels: np.ndarray, piece_size: int):
        """Marching cubes of a whole block on the device, welded there when that fits the
        budget, else on the CPU; None when the block's triangles do not fit (the caller then
        marches in slabs)."""
        rt = self.rt
        ulabels = labels.view(label_dtype(labels.dtype))
        pieces, oom = None, False
        try:
            d_out = self.march_device(rt.to_device(ulabels), piece_size, check_budget=True)
            if d_out[0].shape[0] * WELD_BYTES_PER_TRIANGLE <= self._avail:
                pieces = self.weld_device(*d_out, labels.shape, labels.dtype)
            else:
                tri = _cpu_triangles(rt.to_host_many(d_out), labels.dtype, labels.shape)
                del d_out
                self.stats["slabs"] += 1
                return marching.weld(*tri, labels.shape)
            del d_out
        except _SlabTooBig:
            pass
        except self._oom as exc:
            self._raise_unless_oom(exc)
            oom = True
        if oom:
            rt.release()
            self.stats["oom_retries"] += 1
        return pieces

    def weld_device(self, d_label: Any, d_piece: Any, d_edges: Any, shape: tuple,
                    dtype=None) -> list[marching.Piece]:
        """Group triangles by (segment, piece) and weld their vertices, on the device.

        The same pieces as :func:`gpumesh.marching.weld` (groups by segment ID then piece,
        triangles in emission order, vertices numbered by first appearance), computed with
        sorts instead of the CPU's counting sort and hash table:

        1. group key ``rank(label) * pieces + piece``; a stable sort of the triangles by key
           keeps emission order within a group;
        2. the 3T corners in that order (triangle, then corner) get the key
           ``group * E + edge id`` (``E`` = 3 · voxels of the block); each key is one vertex,
           and its first corner is the vertex's first appearance: found by a stable sort of
           the keys (``weld="sort"``) or by the hash table of ``kernels/weld.cu``
           (``weld="hash"``);
        3. numbering the vertices by first appearance numbers each group's vertices as the
           CPU does (groups are contiguous in corner order), and each corner gets its
           vertex's number, less its group's first vertex.

        Parameters
        ----------
        d_label, d_piece, d_edges : device arrays, (T,), (T,), (T, 3)
            :meth:`march_device`'s output for the whole block.
        shape : (nx, ny, nz)
            The block's shape (for the edge ids).
        dtype : optional
            The labels' dtype (the device labels are its unsigned view).

        Returns
        -------
        list of :class:`gpumesh.marching.Piece`
        """
        rt = self.rt
        if int(d_label.shape[0]) == 0:
            return []
        arrays = self.weld_arrays(d_label, d_piece, d_edges, shape)
        if arrays is None:  # keys would overflow int64: weld on the CPU
            tri = _cpu_triangles(rt.to_host_many((d_label, d_piece, d_edges)),
                                 dtype or d_label.dtype, shape)
            return marching.weld(*tri, shape)
        faces, verts, tstart, vstart, gkeys, uniq, npieces = arrays
        t, nvert = int(faces.shape[0]), int(verts.shape[0])
        h_faces, h_verts, h_tstart, h_vstart, h_keys, h_uniq = rt.to_host_many(
            (faces, verts, tstart, vstart, gkeys, uniq))
        del arrays, faces, verts, tstart, vstart, gkeys, uniq
        h_tstart, h_vstart = np.append(h_tstart, t), np.append(h_vstart, nvert)
        h_uniq = h_uniq.view(dtype or h_uniq.dtype)
        self.stats["device_welds"] += 1
        return [marching.Piece(label=int(h_uniq[k // npieces]), piece=int(k % npieces),
                               vertices2=h_verts[h_vstart[g]:h_vstart[g + 1]],
                               faces=h_faces[h_tstart[g]:h_tstart[g + 1]])
                for g, k in enumerate(h_keys.tolist())]

    def weld_arrays(self, d_label: Any, d_piece: Any, d_edges: Any, shape: tuple):
        """The device part of :meth:`weld_device`: its arrays, still on the device.

        Parameters
        ----------
        d_label, d_piece, d_edges, shape
            As for :meth:`weld_device` (at least one triangle).

        Returns
        -------
        tuple or None
            ``faces`` (T, 3) int32 (per group, into its vertices), ``verts`` (V, 3) int32
            (doubled lattice coordinates), ``tstart``, ``vstart`` (G,) (each group's first
            triangle and vertex), ``gkeys`` (G,) (group keys ``rank * npieces + piece``),
            ``uniq`` (U,) (the sorted labels) and ``npieces`` (int); None when the corner keys
            would not fit in int64 (then only the CPU welds).
        """
        xp = self.rt.xp
        t = int(d_label.shape[0])
        if 3 * t > MAX_SCAN:   # the corners' scans
            return None
        nx, ny, nz = (int(v) for v in shape)
        uniq = xp.unique(d_label)
        npieces = int(d_piece.max()) + 1
        nedge = 3 * nx * ny * nz
        if len(uniq) * npieces * nedge >= 2**62:
            return None
        rank = xp.searchsorted(uniq, d_label)
        # unique sorts with thrust too: its result must hold every label, in increasing order
        if len(uniq) == 0 or int(rank.max()) >= len(uniq) or not bool((uniq[rank] == d_label).all()) \
                or not bool((uniq[1:] > uniq[:-1]).all()):
            raise _SortFailed("unique")
        key = rank * npieces + d_piece
        del rank
        # the same stable order from 32-bit keys where they fit: half a radix sort's passes
        order, skey = self._argsort(key.astype(np.int32) if len(uniq) * npieces < 2**31 else key, key)
        del key
        cedge = d_edges[order].reshape(-1)
        del order
        if self.weld == "hash":
            corner_vid, vfirst = self._number_vertices_hash(skey, cedge, nedge)
        else:
            corner_vid, vfirst = self._number_vertices_sort(skey, cedge, nedge)
        nvert = int(vfirst.shape[0])
        # groups: where the sorted key changes; each group's first triangle and vertex
        tflag = xp.empty(t, dtype=bool)
        tflag[0] = True
        tflag[1:] = skey[1:] != skey[:-1]
        tstart = xp.flatnonzero(tflag)
        gkeys = skey[tstart]
        vstart = xp.searchsorted(skey[vfirst // 3], gkeys)
        tgroup = xp.cumsum(tflag, dtype=np.int64) - 1  # group of each sorted triangle
        del tflag, skey
        faces = (corner_vid.reshape(t, 3) - vstart[tgroup][:, None]).astype(np.int32)
        del corner_vid, tgroup
        e = cedge[vfirst]
        del cedge, vfirst
        pnt = e // 3
        verts = xp.empty((nvert, 3), dtype=np.int32)
        verts[:, 0] = 2 * (pnt // (ny * nz))
        verts[:, 1] = 2 * ((pnt // nz) % ny)
        verts[:, 2] = 2 * (pnt % nz)
        axis = e % 3
        for a in range(3):
            verts[:, a] += (axis == a).astype(np.int32)
        del e, pnt, axis
        return faces, verts, tstart, vstart, gkeys, uniq, npieces

    def _number_vertices_sort(self, skey, cedge, nedge: int):
        """Vertex numbers by first appearance, with sorts: the corners' keys ``group * nedge +
        edge id`` sorted stably make runs of one vertex whose first element is its first
        appearance; the runs, ordered by that, are the vertices.

        Returns each corner's vertex number and each vertex's first corner (device, int64).
        """
        xp = self.rt.xp
        nc = int(cedge.shape[0])
        ckey = xp.repeat(skey, 3) * nedge + cedge
        corder, sck = self._argsort(ckey, ckey)
        del ckey
        head = xp.empty(nc, dtype=bool)
        head[0] = True
        head[1:] = sck[1:] != sck[:-1]
        del sck
        run = xp.cumsum(head, dtype=np.int64) - 1  # run of each sorted corner
        first = corder[head]                   # first corner of each run (= its vertex)
        del head
        nvert = int(first.shape[0])
        vorder, _ = self._argsort(first, first)
        vid = xp.empty(nvert, dtype=np.int64)  # vertex number of each run
        vid[vorder] = xp.arange(nvert, dtype=np.int64)
        corner_vid = xp.empty(nc, dtype=np.int64)
        corner_vid[corder] = vid[run]
        del run, vid, corder
        return corner_vid, first[vorder]

    def _argsort(self, keys, check):
        """A stable argsort of device ``keys``, checked, and ``check`` (keys of the same order,
        e.g. ``keys`` before a narrowing cast) in that order.

        CuPy up to 13.6 returns a wrong order with no error when thrust cannot get its
        workspace (cupy/cupy#9894).  The order is right exactly when every index is in range
        and the checked keys are sorted with ties in increasing index (which also makes it a
        permutation); else :class:`_SortFailed`.
        """
        xp = self.rt.xp
        n = int(keys.shape[0])
        order = xp.argsort(keys, kind="stable")
        if n == 0:
            return order, check[order]
        if int(order.min()) < 0 or int(order.max()) >= n:
            raise _SortFailed("argsort")
        ks = check[order]
        if n > 1 and bool(((ks[1:] < ks[:-1]) | ((ks[1:] == ks[:-1]) & (order[1:] <= order[:-1]))).any()):
            raise _SortFailed("argsort")
        return order, ks

    def _number_vertices_hash(self, skey, cedge, nedge: int):
        """:meth:`_number_vertices_sort`'s result without the corner sort: the kernels of
        ``kernels/weld.cu`` give every corner its key's first corner (an ``atomicMin`` per key,
        so the same in any thread order), and a scan of the corners that are their own first
        numbers the vertices by first appearance.

        Raises :class:`_SortFailed` (then the block is welded on the CPU) when a corner's first
        corner is not in ``[0, c]``: the kernels' bounded probes write -1 for a key that found
        no room (a table too small, which :func:`_hash_table_size` rules out) instead of
        hanging."""
        rt, xp = self.rt, self.rt.xp
        nc = int(cedge.shape[0])
        size = _hash_table_size(nc)
        keys = xp.full(size, np.uint64(0xFFFFFFFFFFFFFFFF), dtype=np.uint64)
        first = xp.full(size, np.iinfo(np.int64).max, dtype=np.int64)
        args = (skey, cedge, np.int64(nc), np.int64(nedge), keys, first, np.uint64(size - 1))
        grid = self._grid(nc)
        rt.launch("weld_insert", grid, self.block, args)
        cfirst = rt.empty(nc, np.int64)
        rt.launch("weld_lookup", grid, self.block, args + (cfirst,))
        del keys, first
        corner = xp.arange(nc, dtype=np.int64)
        if bool(((cfirst < 0) | (cfirst > corner)).any()):
            raise _SortFailed("hash weld")
        head = cfirst == corner
        del corner
        number = xp.cumsum(head, dtype=np.int64) - 1  # of the vertex first seen at each corner
        corner_vid = number[cfirst]
        del number, cfirst
        return corner_vid, xp.flatnonzero(head)

    def downsample(self, labels: np.ndarray, factor=(2, 2, 2)) -> np.ndarray:
        """Labels downsampled by ``factor`` with the non-zero mode rule (see
        ``lod.downsample_labels``).

        Parameters
        ----------
        labels : (sx, sy, sz) ndarray of (u)int8/16/32/64
        factor : (3,) int
            1 or 2 per axis.

        Returns
        -------
        (ceil(sx/fx), ceil(sy/fy), ceil(sz/fz)) ndarray, dtype of ``labels``

        Raises
        ------
        ValueError
            ``labels`` is not 3-D, or a factor is not 1 or 2.
        TypeError
            Not an integer label dtype of 1, 2, 4 or 8 bytes.
        """
        labels = np.ascontiguousarray(marching.native_order(labels))
        if labels.ndim != 3:
            raise ValueError(f"labels must be 3-D (got shape {labels.shape})")
        fx, fy, fz = lod._check_factor(factor)
        udt = label_dtype(labels.dtype)
        _, sy, sz = (int(s) for s in labels.shape)
        shape = lod.downsampled_shape(labels.shape, (fx, fy, fz))
        if shape[0] * shape[1] * shape[2] == 0:
            return np.empty(shape, labels.dtype)
        ulabels = labels.view(udt)
        # device bytes per output x-plane: its fx input planes and the output plane; a slab's
        # two arrays take pool blocks of up to POOL_UNIT - 1 bytes more
        plane = (fx * sy * sz + shape[1] * shape[2]) * udt.itemsize
        width = min(self._avail // plane, shape[0])
        while width > 1 and (_pool_bytes(fx * width * sy * sz * udt.itemsize)
                             + _pool_bytes(width * shape[1] * shape[2] * udt.itemsize)) > self._avail:
            width -= 1
        with self._lock:
            parts = self._in_slabs(shape[0], width, "downsampling",
                                   lambda o0, w: self._downsample_slab(ulabels[fx * o0:fx * (o0 + w)],
                                                                       (fx, fy, fz)))
        if parts is None:
            return lod.downsample_labels(labels, (fx, fy, fz))
        out = np.concatenate(parts) if len(parts) > 1 else parts[0]
        return out.view(labels.dtype)

    def _downsample_slab(self, ulabels: np.ndarray, factor) -> np.ndarray:
        """Downsampled labels of input x-planes ``ulabels`` (a multiple of ``factor[0]`` but at
        the end)."""
        return self.rt.to_host(self.downsample_device(self.rt.to_device(ulabels), factor))

    def downsample_device(self, d_labels: Any, factor=(2, 2, 2)) -> Any:
        """Downsampling by ``factor`` (1 or 2 per axis) of labels already on the device; the
        output stays there.

        Parameters
        ----------
        d_labels : (sx, sy, sz) device array of uint8/16/32/64, C-contiguous
        factor : (3,) int

        Returns
        -------
        (ceil(sx/fx), ceil(sy/fy), ceil(sz/fz)) device array, same dtype
        """
        fx, fy, fz = lod._check_factor(factor)
        sx, sy, sz = (int(v) for v in d_labels.shape)
        shape = lod.downsampled_shape(d_labels.shape, (fx, fy, fz))
        out = self.rt.empty(shape, d_labels.dtype)
        n = shape[0] * shape[1] * shape[2]
        if n:
            self.rt.launch(f"ds2_{DTYPE_SUFFIX[np.dtype(d_labels.dtype)]}", self._grid(n), self.block,
                           (d_labels, out, np.int64(sx), np.int64(sy), np.int64(sz),
                            np.int64(shape[0]), np.int64(shape[1]), np.int64(shape[2]),
                            np.int32(fx), np.int32(fy), np.int32(fz)))
        return out
