"""CupyRuntime's pinned, queued transfers, against a stand-in for CuPy with CUDA's semantics.

No GPU runs here.  The stand-in models what makes such transfers go wrong on a device: a copy
queued on a stream reads or writes its host memory only when the stream gets to it (here: at
``synchronize``), and CuPy's pinned memory pool hands a freed buffer to the next request at
once, with someone else's bytes in it.  A runtime that let a staging buffer go before its
upload ran, read a download before waiting, or queued work on another stream than the
current one gives wrong arrays or trips an assertion.  The real CuPy path runs in the `gpu`
tests on a device.
"""

from __future__ import annotations

import sys
import types
import warnings
import weakref

import numpy as np
import pytest

from gpumesh import gpu


class _Stream:
    def __init__(self):
        self.pending = []
        self.syncs = 0

    def synchronize(self):
        self.syncs += 1
        while self.pending:
            self.pending.pop(0)()


class _PinnedPool:
    """Buffers come back for reuse the moment their array is freed, filled with garbage."""

    def __init__(self, broken=False):
        self.free: dict[int, list] = {}
        self.ids: set[int] = set()  # ids of the live pinned arrays
        self.allocated = 0  # bytes of every buffer made (CuPy's pool keeps them all)
        self.at: dict = {}  # the live arrays' ids by the address of their buffer
        self.memory: dict[int, bytearray] = {}  # their memory, by id
        self.broken = broken

    def empty(self, shape, dtype):
        if self.broken:
            raise RuntimeError("cudaHostAlloc failed")
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        pool = self.free.setdefault(n, [])
        if not pool:
            self.allocated += n   # a cudaHostAlloc: page-locked until the pool frees its blocks
        slab = pool.pop() if pool else bytearray(max(n, 1))
        slab[:] = b"\xa5" * len(slab)
        # as cupyx.empty_pinned makes it: an array over a buffer object that is no array, so
        # that its views hold the array itself (NumPy's view bases stop there)
        arr = np.ndarray(shape, dtype=dtype, buffer=slab)
        self.ids.add(id(arr))
        self.memory[id(arr)] = slab
        self.at[arr.__array_interface__["data"][0]] = id(arr)
        weakref.finalize(arr, self._freed, id(arr), n, slab)
        return arr

    def root(self, arr) -> int:
        """The id of the pool's array whose buffer ``arr`` starts (the runtime hands out views
        of them), else ``arr``'s own."""
        if not isinstance(arr, np.ndarray):
            return id(arr)
        return self.at.get(arr.__array_interface__["data"][0], id(arr))

    def _freed(self, ident, n, slab):
        self.at = {p: i for p, i in self.at.items() if i != ident}
        self.ids.discard(ident)
        self.memory.pop(ident, None)
        self.free.setdefault(n, []).append(slab)

    def view(self, arr):
        """What a queued copy holds: the buffer's memory, not the array (like a pointer)."""
        slab, shape, dtype = self.memory[self.root(arr)], arr.shape, arr.dtype
        return lambda: np.frombuffer(slab, dtype=dtype, count=int(np.prod(shape))).reshape(shape)


class _Dev:
    """A device array: its bytes are reachable only through queued copies."""

    def __init__(self, fake, data):
        self.fake, self._data = fake, data

    shape = property(lambda self: self._data.shape)
    dtype = property(lambda self: self._data.dtype)
    size = property(lambda self: self._data.size)
    nbytes = property(lambda self: self._data.nbytes)

    def set(self, buf, stream=None):
        assert stream is self.fake.current, "upload queued on another stream than the current one"
        assert self.fake.pool.root(buf) in self.fake.pool.ids, "upload from pageable memory"
        assert buf.shape == self.shape and buf.dtype == self.dtype
        src = self.fake.pool.view(buf)
        stream.pending.append(lambda: self._data.__setitem__(Ellipsis, src()))

    def get(self, stream=None, out=None, blocking=True):
        if self.fake.no_blocking_arg and not blocking:
            raise TypeError("get() got an unexpected keyword argument 'blocking'")
        assert stream is self.fake.current, "download queued on another stream than the current one"
        assert self.fake.pool.root(out) in self.fake.pool.ids, "download into pageable memory"
        dst = self.fake.pool.view(out)
        stream.pending.append(lambda: dst().__setitem__(Ellipsis, self._data))
        if blocking:
            stream.synchronize()
        return out

    def __getitem__(self, key):
        return _Dev(self.fake, self._data[key])


def _fake_cupy(pool, no_blocking_arg=False):
    # cached: bytes of unused blocks that the device memory pool holds (cudaMemGetInfo counts
    # them as taken) until its free_all_blocks hands them back
    fake = types.SimpleNamespace(pool=pool, current=_Stream(), no_blocking_arg=no_blocking_arg,
                                 freed_blocks=0, freed_pinned=0, cached=0, capacity=1 << 31, limit=0)

    class OutOfMemoryError(Exception):
        pass

    def asarray(a):
        fake.current.synchronize()  # pageable copies are synchronous
        return _Dev(fake, np.array(a, copy=True))

    def asnumpy(d):
        fake.current.synchronize()
        return np.array(d._data, copy=True)

    def empty(shape, dtype):
        a = np.empty(shape, dtype=dtype)
        a.view(np.uint8)[...] = 0x5A  # garbage until something is copied in
        return _Dev(fake, a)

    def ascontiguousarray(d):
        return _Dev(fake, np.ascontiguousarray(d._data))  # a new device array (queued order kept)

    class _MemPool:
        def free_all_blocks(self):
            fake.freed_blocks += 1
            fake.freed_with_work_queued = bool(fake.current.pending)
            fake.cached = 0

        def set_limit(self, size):
            fake.limit = size

        def get_limit(self):
            return fake.limit

        def total_bytes(self):
            return 0

    mempool = _MemPool()   # the process's, as CuPy's default pool

    class _PinnedPoolHandle:
        def free_all_blocks(self):
            fake.freed_pinned += 1

    class RawModule:
        def __init__(self, code):
            pass

        def get_function(self, name):
            return lambda *a: None

    cuda = types.SimpleNamespace(get_current_stream=lambda: fake.current,
                                 memory=types.SimpleNamespace(OutOfMemoryError=OutOfMemoryError),
                                 runtime=types.SimpleNamespace(
                                     memGetInfo=lambda: (fake.capacity // 2 - fake.cached, fake.capacity)))
    cupy = types.SimpleNamespace(cuda=cuda, asarray=asarray, asnumpy=asnumpy, empty=empty,
                                 ascontiguousarray=ascontiguousarray, RawModule=RawModule,
                                 get_default_memory_pool=lambda: mempool,
                                 get_default_pinned_memory_pool=lambda: _PinnedPoolHandle())
    cupyx = types.SimpleNamespace(empty_pinned=pool.empty)
    return fake, cupy, cupyx


@pytest.fixture
def runtime(monkeypatch):
    def make(pool=None, no_blocking_arg=False, pinned=None):
        pool = pool or _PinnedPool()
        fake, cupy, cupyx = _fake_cupy(pool, no_blocking_arg)
        monkeypatch.setitem(sys.modules, "cupy", cupy)
        monkeypatch.setitem(sys.modules, "cupyx", cupyx)
        return fake, gpu.CupyRuntime(source="", pinned=pinned)
    return make


def _arrays():
    rng = np.random.default_rng(3)
    return [rng.integers(0, 2**63, size=(64, 33), dtype=np.uint64),
            rng.integers(0, 255, size=(5, 7, 9), dtype=np.uint8),
            np.arange(10, dtype=np.int32),
            np.zeros((0, 3), dtype=np.int64),
            rng.integers(-9, 9, size=(40, 12)).astype(np.int32)[:, ::5]]  # not contiguous


def test_uploads_and_downloads_are_pinned_queued_and_exact(runtime, monkeypatch):
    monkeypatch.delenv(gpu.PINNED_ENV, raising=False)
    fake, rt = runtime()
    assert rt.pinned
    hosts = _arrays()
    syncs = fake.current.syncs
    devs = [rt.to_device(a.copy()) for a in hosts]  # the host copies die at once
    # queued, not waited for: the host goes on launching work behind them
    assert fake.current.syncs == syncs and len(fake.current.pending) == sum(a.size > 0 for a in hosts)
    # more uploads of the same sizes before anything waits: a staging buffer given back
    # too early would be reused here and the first uploads would read these bytes
    noise = [rt.to_device(np.full_like(a, 3)) for a in hosts]
    syncs = fake.current.syncs
    back = rt.to_host_many(devs + noise)
    assert fake.current.syncs == syncs + 1  # one wait for all of them
    for a, b in zip(hosts, back[:len(hosts)]):
        assert b.dtype == a.dtype and np.array_equal(b, a)
    assert all(np.all(b == 3) for b in back[len(hosts):])
    # downloaded into pinned memory (the stand-in's get asserts it), handed back in ordinary
    # memory: no pinned array outlives the call
    assert not fake.pool.ids
    single = rt.to_host(devs[0][3:9])  # a device view
    assert np.array_equal(single, hosts[0][3:9])


def test_pinned_memory_stays_bounded_over_transfers_of_many_sizes(runtime):
    # CuPy's pinned pool reuses a freed buffer only for a request of the same size and keeps
    # every buffer it made: with each block's arrays of their own sizes, nearly every transfer
    # was a new page-locked buffer that stayed (about one block's downloads per block)
    fake, rt = runtime()
    rng = np.random.default_rng(5)
    sizes = rng.integers(1, 200_000, size=300)
    for n in sizes:
        a = rng.integers(0, 1000, size=int(n), dtype=np.int32)
        back = rt.to_host_many([rt.to_device(a), rt.to_device(a[: n // 2])])
        assert np.array_equal(back[0], a) and np.array_equal(back[1], a[: n // 2])
    most = int(sizes.max()) * 4   # the largest array's bytes
    assert fake.pool.allocated < 8 * most   # each size class a few times (it was ~1.5 GB here: 300 of each)


def test_pinned_buffers_are_the_smallest_power_of_two_that_holds_the_array(runtime):
    # the size classes must not waste: a block of 256**3 uint32 labels (64 MiB, a power of
    # two) takes a buffer of its own size, not twice it
    fake, rt = runtime()
    asked = []
    real = rt._empty_pinned
    rt._empty_pinned = lambda shape, dtype: asked.append(int(np.prod(shape)) * np.dtype(dtype).itemsize) \
        or real(shape, dtype)
    for nbytes in (1, 8, 504, 512, 520, 4096, 4100, 1 << 16, (1 << 16) + 8, 3 << 14):
        a = (np.arange(nbytes) % 251).astype(np.uint8)
        asked.clear()
        back = rt.to_host(rt.to_device(a))
        assert np.array_equal(back, a)
        assert len(asked) == 2   # the staging buffer and the download's
        for size in asked:
            assert size & (size - 1) == 0 and size >= max(nbytes, 512)   # a power of two that holds it
            assert size < 2 * max(nbytes, 512)                            # and the smallest


def test_free_memory_counts_the_blocks_the_pool_holds_unused(runtime):
    """cudaMemGetInfo counts the blocks that CuPy's pool keeps for reuse as taken: a second
    backend in one process (the next ad-hoc call, the next job) measured what the first had
    left, and its budget, the process's pool limit, shrank.  The queued work is waited for,
    the pool emptied, then free memory measured."""
    fake, rt = runtime()
    first = gpu.GPUBackend(runtime=rt)
    fake.cached = 3 << 28   # the first backend's work left 768 MiB of blocks in the pool
    fake.current.pending.append(lambda: None)   # and a copy still queued
    assert rt.mem_info() == (1 << 30, 1 << 31)
    assert fake.freed_with_work_queued is False and not fake.current.pending
    fake.cached = 3 << 28
    assert gpu.GPUBackend(runtime=rt).memory_budget == first.memory_budget


def test_release_waits_for_queued_uploads(runtime):
    fake, rt = runtime()
    d = rt.to_device(np.arange(1000, dtype=np.int64))
    rt.release()
    # the pinned pool's idle buffers go back to the host too (page-locked memory only grows)
    assert not fake.current.pending and fake.freed_blocks == 1 and fake.freed_pinned == 1
    assert np.array_equal(d._data, np.arange(1000))
    # and the staging buffer is let go before the pinned pool frees its idle blocks: one still
    # held would stay page-locked
    assert not fake.pool.ids


def test_a_download_that_fails_midway_waits_for_the_queued_ones(runtime):
    """When pinning a later download's buffer fails, the downloads already queued are waited
    for before the error leaves: their buffers, freed with it, must not go back to the pool
    while a copy still writes into them."""
    fake, rt = runtime()
    devs = [rt.to_device(np.arange(100, dtype=np.int64)), rt.to_device(np.arange(50, dtype=np.int32))]
    rt.to_host_many(devs)   # the uploads are done
    calls = []
    real = rt._empty_pinned

    def empty(shape, dtype):
        calls.append(shape)
        if len(calls) == 2:
            raise RuntimeError("cudaHostAlloc failed")
        return real(shape, dtype)

    rt._empty_pinned = empty
    with pytest.raises(RuntimeError, match="cudaHostAlloc"):
        rt.to_host_many(devs)
    assert len(calls) == 2 and not fake.current.pending


@pytest.mark.parametrize("problem", ["no pinned memory", "get() without blocking="])
def test_pinned_memory_unusable_falls_back_to_pageable_copies(runtime, problem):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if problem == "no pinned memory":
            fake, rt = runtime(pool=_PinnedPool(broken=True))
        else:
            fake, rt = runtime(no_blocking_arg=True)
    assert not rt.pinned
    # the start-up round trip's pinned buffers are let go (they would stay page-locked)
    assert not fake.pool.ids and not rt._staged
    assert [w.category for w in caught] == [RuntimeWarning]
    assert "pageable" in str(caught[0].message)
    for a in _arrays():
        assert np.array_equal(rt.to_host_many([rt.to_device(a)])[0], a)


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_pinned_can_be_turned_off(runtime, monkeypatch, how):
    if how == "environment":
        monkeypatch.setenv(gpu.PINNED_ENV, "0")
    fake, rt = runtime(pinned=False if how == "argument" else None)
    assert not rt.pinned and not fake.pool.ids
    a = np.arange(12, dtype=np.uint16).reshape(3, 4)
    assert np.array_equal(rt.to_host(rt.to_device(a)), a)


def test_downloads_are_ordinary_memory_and_their_pinned_buffers_are_reused(runtime):
    """What ``to_host_many`` hands back outlives the call: a slab's triangles until the block
    is welded, a weld's pieces until their LOD is encoded.  Handed back in their pinned
    buffers, each kept its buffer page-locked and out of the pool, so the next downloads took
    new ones and the pool grew with what the callers held.  They are ordinary copies now, and
    the pinned buffers go back to the pool (the stream has passed them) as the call returns."""
    fake, rt = runtime()
    start = fake.pool.allocated
    kept = []
    for i in range(20):
        a = np.full(1000, i, dtype=np.int64)
        kept.append(rt.to_host_many([rt.to_device(a), rt.to_device(a[:300])]))
        assert not fake.pool.ids   # no pinned array outlives the call
    for i, (b, c) in enumerate(kept):
        assert np.array_equal(b, np.full(1000, i)) and np.array_equal(c, np.full(300, i))
        assert b.flags.c_contiguous and b.flags.writeable and b.dtype == np.int64
    # a staging and a download buffer of each size (8000 and 2400 bytes) for the first call,
    # reused by every later one (20 of each when the results held their buffers)
    assert fake.pool.allocated - start == 2 * (8192 + 4096)


def _weld_outputs(pieces, npieces):
    """What ``GPUBackend.weld_arrays`` gives (host arrays) for the pieces of a weld."""
    uniq = np.unique(np.array([p.label for p in pieces], dtype=np.uint64)).astype(np.uint16)
    counts = np.array([[len(p.faces), len(p.vertices2)] for p in pieces], dtype=np.int64)
    starts = np.cumsum(counts, axis=0) - counts
    gkeys = np.array([int(np.searchsorted(uniq, p.label)) * npieces + p.piece for p in pieces], np.int64)
    return (np.concatenate([p.faces for p in pieces]).astype(np.int32),
            np.concatenate([p.vertices2 for p in pieces]).astype(np.int32),
            starts[:, 0].copy(), starts[:, 1].copy(), gkeys, uniq)


def test_the_pieces_of_a_device_weld_hold_no_pinned_memory(runtime):
    """The pieces of a device weld were views of the weld's pinned downloads (its faces and
    vertices), which stayed page-locked and out of the pool while any piece lived: through
    the decimation and encoding of their LOD, and for as long as a caller kept them.  The
    pieces are the same; no pinned buffer is held once ``weld_device`` returns, and a second
    weld of the same size reuses the first one's buffers."""
    from gpumesh import marching

    fake, rt = runtime()
    backend = gpu.GPUBackend(runtime=rt, memory_budget=1 << 30)
    rng = np.random.default_rng(11)
    labels = rng.choice(np.array([0, 7, 300, 65535], dtype=np.uint16), size=(12, 10, 9))
    tri = marching.march_cubes(labels, 4)
    want = marching.weld(*tri, labels.shape)
    npieces = int(tri[1].max()) + 1
    host = _weld_outputs(want, npieces)
    backend.weld_arrays = lambda *args: tuple(rt.to_device(a) for a in host) + (npieces,)
    d_tri = [rt.to_device(a) for a in tri]
    held, allocated = [], None
    for _ in range(3):
        got = backend.weld_device(*d_tri, labels.shape, labels.dtype)
        assert not fake.pool.ids   # no pinned array is alive while the pieces are
        assert [(p.label, p.piece) for p in got] == [(p.label, p.piece) for p in want]
        for g, w in zip(got, want):
            assert g.faces.dtype == w.faces.dtype and np.array_equal(g.faces, w.faces)
            assert np.array_equal(g.vertices2, w.vertices2)
        held.append(got)
        if allocated is None:
            allocated = fake.pool.allocated
    assert fake.pool.allocated == allocated   # the later welds took no new page-locked memory
    assert backend.stats["device_welds"] == 3

def test_a_threads_download_keeps_the_staging_buffers_of_another_threads_uploads(runtime):
    """Each thread stages its own uploads: a download on another thread waits for that
    thread's stream only (a per-thread default stream), so it must not let go of this
    thread's staging buffers (the pool would hand them out again while their copies may still
    be queued); this thread's own wait does."""
    import threading

    fake, rt = runtime()
    a = np.arange(1000, dtype=np.int64)
    dev = rt.to_device(a)
    assert len(rt._staged) == 1
    got = []
    other = threading.Thread(target=lambda: got.append((rt.to_host_many([rt.to_device(a * 2)])[0], list(rt._staged))))
    other.start()
    other.join()
    assert np.array_equal(got[0][0], a * 2) and got[0][1] == []   # the other thread's own: let go
    assert len(rt._staged) == 1   # this thread's upload: still held
    assert np.array_equal(rt.to_host(dev), a) and rt._staged == []



@pytest.mark.parametrize("budget", [None, 1 << 30])
def test_a_backend_waits_for_its_table_uploads_whatever_the_budget(runtime, budget):
    """``GPUBackend.__init__`` queues the case table's uploads; only measuring free memory (no
    budget given) waited for them.  With a per-thread default stream, a thread that meshes
    later queues its kernels on a stream of its own, not ordered after those copies, and its
    ``to_host_many`` would let go of their staging buffers having waited for its own stream
    only.  Nothing is left queued or staged when the backend is made."""
    fake, rt = runtime()
    backend = gpu.GPUBackend(runtime=rt, memory_budget=budget)
    assert not fake.current.pending and not rt._staged and not fake.pool.ids
    for dev, table in ((backend._tri_counts, gpu.TRI_COUNTS), (backend._tri_table, gpu.TRI_TABLE),
                       (backend._edge_base, gpu.EDGE_BASE), (backend._edge_axis, gpu.EDGE_AXIS)):
        assert np.array_equal(dev._data, table)


def test_the_pool_limit_goes_back_once_every_runtime_that_set_one_has_restored_it(runtime, monkeypatch):
    """The memory pool is the process's: its limit (CUPY_GPU_MEMORY_LIMIT's, or a user's) comes
    back when the last runtime that set one restores it, not before (another still meshes
    within its budget), once per runtime."""
    monkeypatch.setattr(gpu.CupyRuntime, "_limit_users", 0)
    monkeypatch.setattr(gpu.CupyRuntime, "_limit_before", None)
    fake, a = runtime()
    fake.limit = 5 << 30
    b = gpu.CupyRuntime(source="")
    gpu.CupyRuntime(source="").restore_limit()   # one that set none
    assert fake.limit == 5 << 30
    a.set_limit(1 << 30)
    b.set_limit(2 << 30)
    a.set_limit(3 << 30)
    assert fake.limit == 3 << 30
    a.restore_limit()
    a.restore_limit()
    assert fake.limit == 3 << 30   # b has not restored it
    b.restore_limit()
    assert fake.limit == 5 << 30 and gpu.CupyRuntime._limit_users == 0
    b.restore_limit()
    assert fake.limit == 5 << 30 and gpu.CupyRuntime._limit_users == 0
    fake.limit = 6 << 30
    b.set_limit(1 << 30)   # again: the limit it has now is the one to restore
    b.restore_limit()
    assert fake.limit == 6 << 30


def test_a_runtime_let_go_of_restores_the_pool_limit(runtime, monkeypatch):
    """A job's backend in this process (run_mesh's, with one worker) is dropped, not closed,
    when the job returns or fails: the limit it set goes back with it."""
    import gc

    monkeypatch.setattr(gpu.CupyRuntime, "_limit_users", 0)
    monkeypatch.setattr(gpu.CupyRuntime, "_limit_before", None)
    fake, rt = runtime()
    rt.set_limit(1 << 30)
    assert fake.limit == 1 << 30
    del rt
    gc.collect()
    assert fake.limit == 0 and gpu.CupyRuntime._limit_users == 0


def test_a_runtime_dropped_while_its_thread_holds_the_limit_lock_restores_the_limit(runtime, monkeypatch):
    """A collection may run a runtime's __del__ in a thread inside set_limit or restore_limit
    (which hold the pool limit's lock): it restores the limit there, with no deadlock."""
    import threading

    monkeypatch.setattr(gpu.CupyRuntime, "_limit_users", 0)
    monkeypatch.setattr(gpu.CupyRuntime, "_limit_before", None)
    fake, rt = runtime()
    rt.set_limit(1 << 30)
    held = [rt]
    del rt

    def drop():
        with gpu.CupyRuntime._limit_lock:
            held.clear()   # the last reference: __del__ runs here

    thread = threading.Thread(target=drop, daemon=True)
    thread.start()
    thread.join(30)   # a deadlock detector: it ends at once, or waits on the lock for good
    assert not thread.is_alive() and fake.limit == 0 and gpu.CupyRuntime._limit_users == 0
