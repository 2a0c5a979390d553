"""The GPU backend (kernels/*.cu through gpumesh/gpu.py).

Two layers:

* **Emulation tests** (always run; need only g++): the unmodified ``.cu`` kernels are compiled
  for the CPU with ``tests/cuda_emulation`` and driven by ``GPUBackend`` itself through an
  emulated runtime, so the kernels *and* the host-side logic (launch arguments, scan, offsets,
  copies) must reproduce the CPU path exactly: the same triangle arrays in the same order and
  the same downsampled labels, for every label dtype, on random and real labels.
* **GPU tests** (``@pytest.mark.gpu``; skipped unless CuPy sees a GPU): the same parity with
  CuPy on a real device, and byte-identical ``run_mesh`` output for ``device="gpu"``/``"cpu"``.
"""

from __future__ import annotations

import importlib
import pathlib
import re
import signal
import sys
import warnings
import zlib

import numpy as np
import pytest

from gpumesh import gpu, lod, marching
from gpumesh.backend import CPUBackend

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "cuda_emulation"))
import cuda_emu  # noqa: E402
from conftest import tree_files, write_zarr  # noqa: E402

DTYPES = [np.uint8, np.uint16, np.uint32, np.uint64]
BIG = np.uint64(2**63 + 5)  # an ID beyond 2**63 (sign bit set)
# the LOD steps of anisotropic voxels (lod.lod_factors), besides the 2x2x2 ones
ANISOTROPIC_STEPS = [(2, 2, 1), (1, 2, 2), (2, 1, 1), (1, 1, 1)]


# --------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="session")
def emu_lib(tmp_path_factory):
    """The kernels compiled for the CPU, once per session."""
    if cuda_emu.compiler() is None:
        pytest.skip("g++ not found: cannot build the CUDA emulation")
    d = tmp_path_factory.mktemp("cuda_emu")
    files = [gpu.kernel_dir() / f for f in gpu.KERNEL_FILES]
    return cuda_emu.build(d, files, gpu.KERNEL_NAMES)


@pytest.fixture(params=[0, 12345], ids=["launch-order", "shuffled"])
def emu_backend(request, emu_lib):
    """GPUBackend over the emulation, threads run in launch order or shuffled; small blocks
    and a capped grid so that the grid-stride loops take many turns."""
    return gpu.GPUBackend(runtime=cuda_emu.EmulatedRuntime(emu_lib, seed=request.param),
                          block=64, max_blocks=5)


def _random_labels(shape, dtype, rng, nlab=5, p_zero=0.3):
    ids = rng.integers(1, np.iinfo(np.uint8).max, size=nlab).astype(np.uint64)
    if np.dtype(dtype) == np.uint64:
        ids[-1] = BIG
        ids[-2] = BIG + np.uint64(1)
    elif np.dtype(dtype) != np.uint8:
        ids[-1] = np.iinfo(dtype).max  # the largest ID of the dtype
    lab = ids[rng.integers(0, nlab, size=shape)]
    lab[rng.random(shape) < p_zero] = 0
    return lab.astype(dtype)


def _blobby_labels(shape, dtype, rng):
    """Piecewise-constant labels (blocks of 3 voxels) so cubes see few labels, as in real data."""
    coarse = _random_labels(tuple(-(-s // 3) for s in shape), dtype, rng, nlab=4, p_zero=0.2)
    return np.repeat(np.repeat(np.repeat(coarse, 3, 0), 3, 1), 3, 2)[:shape[0], :shape[1], :shape[2]]


def _read_real(real_zarr, start, shape):
    import tensorstore as ts

    t = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(real_zarr)}}).result()
    sl = tuple(slice(s, s + n) for s, n in zip(start, shape))
    return np.ascontiguousarray(t[sl].read().result())


@pytest.fixture(scope="module")
def real_crops(real_zarr):
    """A 40^3 crop of the real volume and an odd-shaped one (37, 29, 23)."""
    return {"40^3": _read_real(real_zarr, (200, 210, 220), (40, 40, 40)),
            "37x29x23": _read_real(real_zarr, (301, 157, 263), (37, 29, 23))}


def _as_dtype(labels, dtype):
    """Real labels in ``dtype``: renumbered (0 kept as background) for narrow dtypes, and moved
    beyond 2**63 for uint64."""
    if np.dtype(dtype).itemsize < labels.dtype.itemsize:
        uniq, inv = np.unique(labels, return_inverse=True)
        return (inv.reshape(labels.shape) + int(uniq[0] != 0)).astype(dtype)
    out = labels.astype(dtype)
    if np.dtype(dtype) == np.uint64:
        out[out != 0] |= np.uint64(2**63)
    return out


def _assert_same_triangles(got, want):
    for g, w, what in zip(got, want, ("tri_label", "tri_piece", "tri_edges")):
        assert g.dtype == w.dtype, what
        assert g.shape == w.shape, what
        assert np.array_equal(g, w), what


def _assert_same_pieces(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g.label, g.piece) == (w.label, w.piece)
        assert g.vertices2.dtype == w.vertices2.dtype and g.faces.dtype == w.faces.dtype
        assert np.array_equal(g.vertices2, w.vertices2)
        assert np.array_equal(g.faces, w.faces)


def _check_backend(backend, labels, piece_sizes=(1000, 4, 3), device_weld=True):
    """Triangles, welded pieces and downsampled labels of ``backend`` equal the CPU's; with
    ``device_weld``, the pieces must have been welded on the device (a budget with room)."""
    for ps in piece_sizes:
        want = marching.march_cubes(labels, ps)
        _assert_same_triangles(backend.march(labels, ps), want)
    welds = backend.stats["device_welds"]
    want = CPUBackend().mesh(labels, piece_sizes[-1])
    _assert_same_pieces(backend.mesh(labels, piece_sizes[-1]), want)
    if want and device_weld:
        assert backend.stats["device_welds"] == welds + 1
    level_b = level_c = labels
    for _ in range(2):  # two LOD steps: the second works on the first's (odd-sized) output
        level_b, level_c = backend.downsample(level_b), lod.downsample_labels(level_c)
        assert level_b.dtype == level_c.dtype and level_b.shape == level_c.shape
        assert np.array_equal(level_b, level_c)
    # on the device: an emulated runtime lists its launches (a backend that handed these to the
    # CPU's function compared the CPU with itself)
    launches, fallbacks = getattr(backend.rt, "launches", None), backend.stats["cpu_fallbacks"]
    for factor in ANISOTROPIC_STEPS:
        before = len(launches) if launches is not None else 0
        got, want = backend.downsample(labels, factor), lod.downsample_labels(labels, factor)
        assert got.dtype == want.dtype and np.array_equal(got, want), factor
        if launches is not None and want.size:
            assert any(name.startswith("ds2_") for name, *_ in launches[before:]), factor
    assert backend.stats["cpu_fallbacks"] == fallbacks


# --------------------------------------------------------------------------------------
# the module itself (no CuPy needed)


def test_a_run_that_requires_a_gpu_fails_where_the_gpu_tests_would_skip():
    # the device kit sets GPUMESH_REQUIRE_GPU=1: a CuPy that sees no device (a driver
    # mismatch) skipped every gpu test, and the run passed
    import os
    import subprocess

    from conftest import REQUIRE_GPU_ENV, gpu_present

    if gpu_present():
        pytest.skip("a GPU is here")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--co", __file__],
                       capture_output=True, text=True, timeout=300, cwd=pathlib.Path(__file__).parent.parent,
                       env=dict(os.environ, **{REQUIRE_GPU_ENV: "1"}))
    assert r.returncode != 0, r.stdout[-2000:]
    assert "cupy" in (r.stdout + r.stderr).lower()


def test_import_needs_no_cupy_and_kernels_are_found():
    assert gpu.GPUBackend.name == "gpu"
    assert all((gpu.kernel_dir() / f).is_file() for f in gpu.KERNEL_FILES)
    src = gpu.kernel_source()
    # NVRTC compiles the sources as they are: no host headers.
    assert not re.search(r"^\s*#\s*include", src, flags=re.M)


def test_constructing_without_cupy_raises_importerror():
    try:
        importlib.import_module("cupy")
    except ImportError:
        with pytest.raises(ImportError, match="CuPy"):
            gpu.GPUBackend()
    else:
        pytest.skip("CuPy is installed")


def test_backend_seam_picks_gpu_backend(emu_lib, monkeypatch):
    """gpumesh.backend.get_backend builds GPUBackend() when CuPy sees a GPU (runtime emulated)."""
    from gpumesh import backend

    monkeypatch.setattr(backend, "gpu_available", lambda: True)
    monkeypatch.setattr(gpu, "CupyRuntime", lambda: cuda_emu.EmulatedRuntime(emu_lib))
    for device in ("gpu", "auto"):
        b = backend.get_backend(device)
        assert isinstance(b, gpu.GPUBackend) and b.name == "gpu"
    assert backend.get_backend("cpu").name == "cpu"
    # processes sharing the device each take their share of its free memory
    one, three = backend.get_backend("gpu"), backend.get_backend("gpu", processes=3)
    share = int(one.rt.mem_info()[0] * gpu.GPU_MEMORY_FRACTION)
    assert three.memory_budget == max(share - 2 * gpu.CONTEXT_BYTES, share // 2) // 3


def test_main_job_workers_share_the_device(monkeypatch, tmp_path):
    """Each worker of the main job asks for a backend sized for the workers on the device; the
    workers numbered past what the device holds take the CPU backend."""
    import gc
    import multiprocessing
    import types

    from gpumesh import pipeline, warmup

    calls, warmed = [], []
    monkeypatch.setattr(pipeline, "get_backend", lambda device, processes=1, **_:
                        calls.append((device, processes)) or types.SimpleNamespace(name=device))
    monkeypatch.setattr(warmup, "warm_up", lambda dtype, backend, worker, workers:
                        warmed.append((backend, worker, workers)))
    # keep the worker's process-wide settings out of the test process
    monkeypatch.setattr(pipeline, "_WORKER", {})
    monkeypatch.setattr(pipeline, "_keep_freed_memory", lambda: None)
    monkeypatch.setattr(gc, "freeze", lambda: None)
    monkeypatch.setattr(gc, "set_threshold", lambda *a: None)
    # and its signal settings (a worker ignores SIGINT and SIGHUP: left so, the processes that
    # later tests start inherit them: a test of SIGHUP saw its job ignore it)
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGHUP)}
    try:
        plan = pipeline.Plan.make((8, 8, 8), pipeline.MeshOptions(chunk_size=8))
        args = (np.ones((8, 8, 8), np.uint32), {}, plan, pipeline.MeshOptions(), str(tmp_path / "out"))
        pipeline._init_worker(*args, "gpu", 5)
        assert calls == [("gpu", 5)] and warmed == [("gpu", 0, 5)]
        calls.clear(), warmed.clear()
        started = multiprocessing.get_context("spawn").Value("i", 0)
        for _ in range(5):
            pipeline._init_worker(*args, "gpu", 5, started, 2)
        assert calls == [("gpu", 2)] * 2 + [("cpu", 2)] * 3
        assert warmed == [("gpu", 0, 5), ("gpu", 1, 5), ("cpu", 2, 5), ("cpu", 3, 5), ("cpu", 4, 5)]
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_device_processes_leave_each_a_context_and_a_pool():
    gib = 1 << 30
    per = gpu.CONTEXT_BYTES + gpu.MIN_POOL_BYTES
    assert gpu.device_processes(140 * gib, 16) == 16          # an H200: every worker
    assert gpu.device_processes(24 * gib, 64) == int(24 * gib * gpu.GPU_MEMORY_FRACTION) // per
    assert gpu.device_processes(24 * gib, 64) < 64
    assert gpu.device_processes(gib // 4, 8) == 1              # at least one
    assert gpu.device_processes(140 * gib, 1) == 1
    for free in (3 * gib, 24 * gib, 80 * gib):
        n = gpu.device_processes(free, 1000)
        assert n * per <= max(per, free * gpu.GPU_MEMORY_FRACTION) < (n + 1) * per


@pytest.mark.parametrize("count, want", [(0, False), (1, True), (None, False)])
def test_gpu_available_needs_a_device(monkeypatch, count, want):
    """CuPy installed but no CUDA device (a CI runner with the [gpu] extra), or a CUDA error
    asking: no GPU, so ``auto`` meshes on the CPU instead of failing to build the backend."""
    import types

    from gpumesh import backend

    def device_count():
        if count is None:
            raise RuntimeError("cudaErrorInsufficientDriver")
        return count

    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=device_count)))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    assert backend.gpu_available() is want


def test_backend_seam_raises_what_is_not_a_missing_gpu(monkeypatch):
    """Only a GPU backend that cannot start (ImportError: no CuPy, kernels that do not compile)
    makes ``auto`` fall back to the CPU; another error (here a worker count of 0, refused
    before any device is touched) is raised."""
    from gpumesh import backend

    monkeypatch.setattr(backend, "gpu_available", lambda: True)
    for device in ("gpu", "auto"):
        with pytest.raises(ValueError, match="processes"):
            backend.get_backend(device, processes=0)


def test_backend_seam_without_cupy(monkeypatch):
    """A GPU but no CuPy: device="gpu" is a clear error, "auto" falls back to the CPU."""
    from gpumesh import backend

    try:
        importlib.import_module("cupy")
        pytest.skip("CuPy is installed")
    except ImportError:
        pass
    monkeypatch.setattr(backend, "gpu_available", lambda: True)
    with pytest.raises(backend.DeviceUnavailableError, match="CuPy"):
        backend.get_backend("gpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert backend.get_backend("auto").name == "cpu"


def test_kernel_dir_env_override(tmp_path, monkeypatch):
    for f in gpu.KERNEL_FILES:
        (tmp_path / f).write_text("// test copy\n")
    monkeypatch.setenv(gpu.KERNEL_DIR_ENV, str(tmp_path))
    assert gpu.kernel_dir() == tmp_path


def test_nvrtc_compiles_every_entry_point():
    """NVRTC (what CuPy compiles with) accepts the kernels as they are; needs libnvrtc, no GPU."""
    import nvrtc_check

    lib = nvrtc_check.find_nvrtc()
    if lib is None:
        pytest.skip("libnvrtc not found (pip install nvidia-cuda-nvrtc-cu12, or set GPUMESH_NVRTC)")
    # The flags CuPy's RawModule adds to an NVRTC compile (CuPy 14.2, cupy/cuda/compiler.py:
    # the jitify path's), and the C++ standards CuPy may ask for (``--std=c++11`` unless another
    # is given, cupy/_core/core.pyx's compiler options), so the source is checked as CuPy will
    # compile it, whichever of its paths and releases does.
    cupy_flags = ["--device-as-default-execution-space", "-ftz=true"]
    for arch in ("compute_75", "compute_90"):
        for flags in ([], cupy_flags, ["--std=c++11", "-ftz=true"], ["--std=c++17", "-ftz=true"]):
            ptx, log = nvrtc_check.compile_ptx(gpu.kernel_source(),
                                               [f"--gpu-architecture={arch}", *flags], lib)
            assert "warning" not in log.lower(), log
            assert set(gpu.KERNEL_NAMES) <= set(nvrtc_check.entry_points(ptx))


# --------------------------------------------------------------------------------------
# the emulation itself catches the bugs it is meant to catch


def test_emulator_runs_a_correct_kernel(emu_lib):
    rt = cuda_emu.EmulatedRuntime(emu_lib, seed=7)
    x = rt.to_device(np.arange(100, dtype=np.int64))
    y = rt.empty(100, np.int64)
    rt.launch("st_double", 4, 32, (x, y, np.int64(100)))
    assert np.array_equal(rt.to_host(y), 2 * np.arange(100))


def test_emulator_catches_out_of_bounds_write(emu_lib):
    rt = cuda_emu.EmulatedRuntime(emu_lib)
    y = rt.empty(100, np.int64)
    with pytest.raises(cuda_emu.EmulationError, match="out-of-bounds"):
        rt.launch("st_oob", 4, 32, (y, np.int64(100)))


def test_emulator_exposes_thread_order_races(emu_lib):
    results = set()
    for seed in (0, 1, 2, 3):
        rt = cuda_emu.EmulatedRuntime(emu_lib, seed=seed)
        y = rt.empty(1, np.int64)
        rt.launch("st_race", 4, 32, (y, np.int64(128)))
        results.add(int(rt.to_host(y)[0]))
    assert len(results) > 1
    sums = set()
    for seed in (0, 1, 2):  # atomics: same result in any order
        rt = cuda_emu.EmulatedRuntime(emu_lib, seed=seed)
        y = rt.to_device(np.zeros(1, np.uint64))
        rt.launch("st_atomic", 4, 32, (y, np.int64(128)))
        sums.add(int(rt.to_host(y)[0]))
    assert sums == {128 * 127 // 2}


def test_emulator_catches_undefined_behaviour(emu_lib):
    if not emu_lib.ubsan:
        pytest.skip("the compiler has no UBSan")
    rt = cuda_emu.EmulatedRuntime(emu_lib)
    y = rt.empty(1, np.int64)
    rt.launch("st_ub", 1, 32, (y, np.int64(3)))
    assert rt.to_host(y)[0] == 4
    with pytest.raises(cuda_emu.EmulationError, match="out of bounds"):
        rt.launch("st_ub", 1, 32, (y, np.int64(4)))


def test_emulator_checks_arguments(emu_lib):
    rt = cuda_emu.EmulatedRuntime(emu_lib)
    x = rt.to_device(np.arange(10, dtype=np.int64))
    y = rt.empty(10, np.int64)
    with pytest.raises(cuda_emu.EmulationError, match="i64"):
        rt.launch("st_double", 1, 32, (x, y, np.int32(10)))        # 4-byte scalar for long long
    with pytest.raises(cuda_emu.EmulationError, match="dtype"):
        rt.launch("st_double", 1, 32, (x, rt.empty(10, np.int32), np.int64(10)))
    with pytest.raises(cuda_emu.EmulationError, match="not a device array"):
        rt.launch("st_double", 1, 32, (np.arange(10), y, np.int64(10)))
    with pytest.raises(cuda_emu.EmulationError, match="arguments"):
        rt.launch("st_double", 1, 32, (x, y))
    with pytest.raises(cuda_emu.EmulationError, match="launch configuration"):
        rt.launch("st_double", 1, 2048, (x, y, np.int64(10)))
    rt.launch("st_double", 1, 32, (x, y, 10))  # a Python int is an int64, as in CuPy


def test_emulated_kernel_signatures(emu_lib):
    for sfx, t in (("u8", "u8"), ("u16", "u16"), ("u32", "u32"), ("u64", "u64")):
        assert emu_lib.signatures[f"mc_count_{sfx}"][:2] == (f"const {t}*", "i32*")
        assert emu_lib.signatures[f"mc_emit_{sfx}"][-3:] == (f"{t}*", "i64*", "i64*")
        assert emu_lib.signatures[f"ds2_{sfx}"][:2] == (f"const {t}*", f"{t}*")


# --------------------------------------------------------------------------------------
# emulated kernels == CPU path


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(13, 11, 9), (7, 17, 5), (2, 2, 2)])
def test_emulated_random_labels_match_cpu(emu_backend, dtype, shape):
    rng = np.random.default_rng(zlib.crc32(f"{np.dtype(dtype).name}{shape}".encode()))
    labels = _random_labels(shape, dtype, rng)
    _check_backend(emu_backend, labels)
    blobs = _blobby_labels((19, 14, 11), dtype, rng)
    _check_backend(emu_backend, blobs, piece_sizes=(5, 1000))


def test_emulated_many_labels_per_cube(emu_backend):
    # 8 distinct labels in every cube (a checkerboard of 2x2x2 patterns): the largest per-cube
    # triangle count and every first-corner test.
    i, j, k = np.indices((9, 8, 7))
    code = ((i % 2) + 2 * (j % 2) + 4 * (k % 2)).astype(np.uint64)
    labels = np.where(code % 2 == 0, code + np.uint64(1), BIG + code)  # small and >= 2**63 IDs
    _check_backend(emu_backend, labels, piece_sizes=(3,))
    labels[::3] = 0
    _check_backend(emu_backend, labels, piece_sizes=(2,))


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 6, 5), (6, 1, 5), (4, 5, 1), (0, 3, 3), (2, 3, 4)])
def test_emulated_degenerate_shapes(emu_backend, shape):
    rng = np.random.default_rng(5)
    labels = _random_labels(shape, np.uint32, rng) if 0 not in shape else np.zeros(shape, np.uint32)
    _check_backend(emu_backend, labels, piece_sizes=(1, 2))


def test_emulated_uniform_blocks(emu_backend):
    for v in (0, 7):
        labels = np.full((6, 5, 4), v, np.uint16)
        assert emu_backend.march(labels, 2)[0].size == 0
        assert emu_backend.mesh(labels, 2) == []
        assert np.array_equal(emu_backend.downsample(labels), lod.downsample_labels(labels))


def test_emulated_downsample_ties_and_background(emu_backend):
    # 2x2x2 blocks with ties (smaller ID wins), background majority (non-zero still wins),
    # all-background, and partial blocks on odd edges.
    labels = np.zeros((5, 3, 3), np.uint64)
    labels[0:2, 0:2, 0:2] = np.array([[[BIG, 3], [BIG, 3]], [[3, BIG], [0, 0]]], dtype=np.uint64)
    labels[2:4, 0:2, 0:2] = 0
    labels[3, 1, 1] = 9
    labels[4, 2, 2] = 4
    labels[4, 0, 2] = 6
    out = emu_backend.downsample(labels)
    assert np.array_equal(out, lod.downsample_labels(labels))
    assert out[0, 0, 0] == 3 and out[1, 0, 0] == 9 and out[2, 1, 1] == 4 and out[2, 0, 1] == 6
    for factor in ANISOTROPIC_STEPS:
        before = len(emu_backend.rt.launches)
        assert np.array_equal(emu_backend.downsample(labels, factor), lod.downsample_labels(labels, factor))
        assert any(name.startswith("ds2_") for name, *_ in emu_backend.rt.launches[before:]), factor
    out = emu_backend.downsample(labels, (2, 2, 1))
    assert out[0, 0, 0] == BIG and out[0, 0, 1] == 3    # z = 0: BIG twice, 3 once; z = 1: 3 twice


def test_emulated_signed_labels_viewed_as_unsigned(emu_backend):
    rng = np.random.default_rng(11)
    labels = _random_labels((8, 7, 6), np.uint16, rng).astype(np.int32)  # non-negative, as volumes hold
    got = emu_backend.march(labels, 3)
    _assert_same_triangles(got, marching.march_cubes(labels, 3))
    assert np.array_equal(emu_backend.downsample(labels), lod.downsample_labels(labels))


@pytest.mark.parametrize("dtype, values", [(np.int32, [-5, 3, 7]), (np.int64, [-(2**62), 2**62, 9])])
def test_emulated_negative_labels_mesh_and_downsample_as_on_the_cpu(emu_backend, dtype, values):
    # the GPU backend views signed labels as unsigned; the CPU backend compared them signed
    # (other piece order, other downsampling ties) and its dense label table indexed with
    # the negative ones.  Both now mesh the unsigned view.
    rng = np.random.default_rng(4)
    labels = rng.choice(np.array([0] + values, dtype=dtype), size=(9, 8, 7))
    want = CPUBackend().mesh(labels, 4)
    assert {p.label for p in want} == {int(v) % 2**(8 * labels.itemsize) for v in values}
    _assert_same_pieces(emu_backend.mesh(labels, 4), want)
    down = emu_backend.downsample(labels)
    assert down.dtype == labels.dtype
    assert np.array_equal(down, CPUBackend().downsample(labels))
    unsigned = labels.view(f"u{labels.itemsize}")
    assert np.array_equal(down.view(unsigned.dtype), lod.downsample_labels(unsigned))


@pytest.mark.parametrize("dtype", [">u4", ">i8"])
def test_emulated_big_endian_labels_mesh_and_downsample_as_native_ones(emu_backend, dtype):
    # an N5 block as stored: the GPU backend viewed its bytes as native labels (other numbers)
    rng = np.random.default_rng(6)
    native = np.dtype(dtype).newbyteorder("=")
    labels = rng.choice(np.array([0, 3, 258, 65539], native), size=(9, 8, 7))
    big = labels.astype(dtype)
    _assert_same_pieces(emu_backend.mesh(big, 4), CPUBackend().mesh(labels, 4))
    down = emu_backend.downsample(big)
    assert down.dtype == native and np.array_equal(down, lod.downsample_labels(labels))


def _triangle_set(vertices, faces) -> np.ndarray:
    """A mesh's triangles as rows of 9 coordinates, each rotated to start at its smallest
    corner (orientation kept), rows sorted: equal for the same surface in any order."""
    rows = []
    for t in np.asarray(vertices)[np.asarray(faces)].tolist():   # (m, 3, 3)
        t = [tuple(c) for c in t]
        k = min(range(3), key=lambda i: t[i])
        rows.append(t[k] + t[(k + 1) % 3] + t[(k + 2) % 3])
    return np.array(sorted(rows))


def test_emulated_adhoc_mesh_is_the_cpus_surface(emu_backend, real_crops):
    # ad-hoc meshing marches the whole box on a GPU and 64-cube sub-blocks on the CPU: the
    # arrays' order differs, the triangles must not
    from gpumesh.adhoc import mask_to_mesh

    labels = real_crops["37x29x23"]
    ids, counts = np.unique(labels[labels != 0], return_counts=True)
    mask = labels == ids[counts.argmax()]
    origin, voxel = (5, 6, 7), (32.0, 32.0, 40.0)
    gv, gf = mask_to_mesh(mask, origin, voxel, backend=emu_backend)
    cv, cf = mask_to_mesh(mask, origin, voxel, backend=CPUBackend(), sparse_block=8)   # several sub-blocks
    assert len(gf) == len(cf) > 100 and len(gv) == len(cv)
    assert np.array_equal(_triangle_set(gv, gf), _triangle_set(cv, cf))


def test_emulated_non_contiguous_input(emu_backend):
    rng = np.random.default_rng(2)
    base = _random_labels((12, 10, 8), np.uint32, rng)
    view = base[::2, 1:, ::-1]
    _assert_same_triangles(emu_backend.march(view, 2), marching.march_cubes(np.ascontiguousarray(view), 2))
    assert np.array_equal(emu_backend.downsample(view), lod.downsample_labels(view))


# --------------------------------------------------------------------------------------
# bounded device memory: x-slabs, out-of-memory retries, CPU fallback


def _plane_bytes(labels):
    """Device bytes the backend plans per x-plane of cubes (labels, counts, scan, temporary)."""
    nx, ny, nz = labels.shape
    return ny * nz * labels.dtype.itemsize + (ny - 1) * (nz - 1) * 20


def _table_bytes(emu_lib):
    """Device bytes of the case table a backend keeps (outside its slabs' budget), in the
    memory pool's blocks of 512 bytes, as the emulation counts them."""
    rt = cuda_emu.EmulatedRuntime(emu_lib)
    b = gpu.GPUBackend(runtime=rt, memory_budget=1 << 30)
    tables = sum(gpu._pool_bytes(a.nbytes) for a in (b._tri_counts, b._tri_table, b._edge_base, b._edge_axis))
    assert tables == rt.live and gpu.POOL_UNIT == cuda_emu.ALLOCATION_UNIT
    return tables


def test_closing_a_backend_never_hides_the_error_of_its_block():
    """backend.closing (ad-hoc meshing): the backend is closed after the block, also when it
    fails, and a failing close then does not replace the block's own error."""
    from gpumesh.backend import closing

    class Failing:
        name = "gpu"
        closed = 0

        def close(self):
            self.closed += 1
            raise RuntimeError("device error")

    b = Failing()
    with pytest.raises(KeyError, match="the block's"):
        with closing(b):
            raise KeyError("the block's")
    assert b.closed == 1
    with pytest.raises(RuntimeError, match="device error"):   # alone, its error is said
        with closing(b):
            pass
    with closing(b, close=False):
        pass
    assert b.closed == 2


def test_an_ad_hoc_mesh_gives_the_process_back_its_pool_limit(emu_lib, real_crops, monkeypatch):
    """mesh_segment and mask_to_mesh on the GPU in a notebook's process: the backend they made
    is closed when they return or fail, so the pool limit is the caller's again (a backend
    the caller gave is left to it)."""
    from gpumesh import backend, mesh_segment
    from gpumesh.adhoc import mask_to_mesh
    from gpumesh.errors import SegmentNotFoundError

    made = []

    def runtime():
        rt = cuda_emu.EmulatedRuntime(emu_lib)
        rt.limit = 7 << 30
        made.append(rt)
        return rt

    monkeypatch.setattr(backend, "gpu_available", lambda: True)
    monkeypatch.setattr(gpu, "CupyRuntime", runtime)
    labels = real_crops["40^3"]
    ids, counts = np.unique(labels[labels != 0], return_counts=True)
    segment = int(ids[np.argmax(counts)])
    mesh = mesh_segment(labels, segment, voxel_size=(1, 1, 1), device="gpu")
    assert len(made) == 1 and made[0].limit == 7 << 30 and len(mesh.faces) > 0
    with pytest.raises(SegmentNotFoundError):
        mesh_segment(labels, int(labels.max()) + 1, voxel_size=(1, 1, 1), device="gpu")
    assert len(made) == 2 and made[1].limit == 7 << 30
    _, faces = mask_to_mesh(labels == segment, (0, 0, 0), (1, 1, 1), device="gpu")
    assert len(made) == 3 and made[2].limit == 7 << 30 and len(faces) == len(mesh.faces)
    given = gpu.GPUBackend(runtime=runtime(), memory_budget=1 << 30)
    mask_to_mesh(labels == segment, (0, 0, 0), (1, 1, 1), backend=given)
    assert made[3].limit == 1 << 30   # the caller's backend: still its budget


def test_a_closed_backend_hands_back_the_pool_limit_and_still_meshes(emu_lib, real_crops):
    """close (a Dask worker's job ending): the pools' unused blocks go back and the pool limit
    is what it was before the backend (a user's, CUPY_GPU_MEMORY_LIMIT's); meshing after it
    still gives the CPU's pieces."""
    rt = cuda_emu.EmulatedRuntime(emu_lib)
    rt.limit = 7 << 30
    released = []
    rt.release = lambda: released.append(True)
    backend = gpu.GPUBackend(runtime=rt, memory_budget=1 << 30)
    assert rt.limit == 1 << 30
    backend.close()
    assert rt.limit == 7 << 30 and released
    backend.close()
    assert rt.limit == 7 << 30
    labels = real_crops["40^3"]
    _assert_same_pieces(backend.mesh(labels, 16), CPUBackend().mesh(labels, 16))


def test_a_backend_whose_release_fails_still_hands_back_the_pool_limit(emu_lib):
    """close with a device error in release (the runtime waits for its queued work first): the
    error is raised, and the pool limit is what it was before the backend all the same."""
    rt = cuda_emu.EmulatedRuntime(emu_lib)
    rt.limit = 7 << 30

    def release():
        raise RuntimeError("device error")

    rt.release = release
    backend = gpu.GPUBackend(runtime=rt, memory_budget=1 << 30)
    assert rt.limit == 1 << 30
    with pytest.raises(RuntimeError, match="device error"):
        backend.close()
    assert rt.limit == 7 << 30


@pytest.mark.parametrize("dtype", [np.uint16, np.uint64])
def test_emulated_memory_budget_slabs_match_cpu(emu_lib, real_crops, dtype):
    """A budget of a few planes meshes and downsamples in many x-slabs, never allocates past
    the budget (the emulated pool raises there) and gives the CPU's arrays."""
    labels = _as_dtype(real_crops["40^3"], dtype)
    budget = 6 * _plane_bytes(labels)  # first slabs of 3 planes, then what the triangles allow
    rt = cuda_emu.EmulatedRuntime(emu_lib, seed=7)
    backend = gpu.GPUBackend(runtime=rt, memory_budget=budget, block=64, max_blocks=7)
    assert rt.limit == budget
    want = marching.march_cubes(labels, 7)
    _assert_same_triangles(backend.march(labels, 7), want)
    assert backend.stats["slabs"] > 13, backend.stats  # more than 39 planes / 3
    # the first slab's planes take half the budget and their triangles fit the other half
    # here: no slab is counted twice (marched, found too big, redone)
    counted = sum(name.startswith("mc_count") for name, *_ in rt.launches)
    assert counted == backend.stats["slabs"], (counted, backend.stats)
    assert backend.stats["oom_retries"] == 0 and rt.oom_raised == 0
    assert rt.peak <= budget
    # slabs meet piece boundaries anywhere: a piece size that no slab width divides
    _assert_same_triangles(backend.march(labels, 5), marching.march_cubes(labels, 5))
    _assert_same_pieces(backend.mesh(labels, 16), CPUBackend().mesh(labels, 16))
    # downsampling an odd-sized block: 3 output planes (2 input planes each) per slab, the
    # last slab with one input plane; the second step's smaller planes fit in one slab
    labels = _as_dtype(real_crops["37x29x23"], dtype)
    nx, ny, nz = labels.shape
    isz = labels.dtype.itemsize
    budget = gpu._pool_bytes(3 * 2 * ny * nz * isz) + gpu._pool_bytes(3 * 15 * 12 * isz) + rt.live
    rt = cuda_emu.EmulatedRuntime(emu_lib, seed=8)
    backend = gpu.GPUBackend(runtime=rt, memory_budget=budget, block=64, max_blocks=7)
    level_b = level_c = labels
    for _ in range(2):
        level_b, level_c = backend.downsample(level_b), lod.downsample_labels(level_c)
        assert np.array_equal(level_b, level_c) and level_b.dtype == level_c.dtype
    assert backend.stats["slabs"] == 7 + 1  # 19 output planes by 3, then 10 in one
    assert backend.stats["oom_retries"] == 0 and rt.peak <= budget


@pytest.mark.parametrize("dtype", [np.uint8, np.uint64])
def test_emulated_slabs_whose_triangles_do_not_fit_are_redone_at_the_planes_that_fit(emu_lib, dtype):
    """Labels with many triangles per cube: the first slab's triangles do not fit the half of
    the budget left to them, so the slab is redone with the most planes whose labels, counts,
    scan and triangles fit (read off the scan); never past the budget, no out-of-memory error,
    the CPU's arrays."""
    rng = np.random.default_rng(np.dtype(dtype).itemsize)
    labels = _random_labels((26, 13, 11), dtype, rng)
    nx, ny, nz = labels.shape
    isz = labels.dtype.itemsize
    want = marching.march_cubes(labels, 5)
    # triangles of each plane of cubes, and the device bytes of marching planes i0 .. i0 + q - 1:
    # q + 1 label planes, counts (int32) and scan (int64) per cube, a label and 4 int64 ids
    # (piece, 3 edges) per triangle; each array in the memory pool's blocks of 512 bytes
    tris = np.array([len(marching.march_cubes(labels[i:i + 2], 5)[0]) for i in range(nx - 1)])

    def need(i0, q):
        t, cubes = int(tris[i0:i0 + q].sum()), q * (ny - 1) * (nz - 1)
        return sum(gpu._pool_bytes(n) for n in ((q + 1) * ny * nz * isz, cubes * 4, cubes * 8,
                                                 t * isz, t * 8, t * 24))

    tables = _table_bytes(emu_lib)
    redone = 0
    for planes in (2, 3, 5, 8):   # one byte short of room for planes + 1 from the first plane on
        rt = cuda_emu.EmulatedRuntime(emu_lib, seed=planes)
        budget = tables + need(0, planes + 1) - 1
        backend = gpu.GPUBackend(runtime=rt, memory_budget=budget, block=64, max_blocks=7)
        runs, march_slab = [], backend._march_slab

        def recorded(ulabels, i0, w, ps):
            try:
                out = march_slab(ulabels, i0, w, ps)
            except gpu._SlabTooBig:
                runs.append((i0, w, False))
                raise
            runs.append((i0, w, True))
            return out

        backend._march_slab = recorded
        _assert_same_triangles(backend.march(labels, 5), want)
        assert backend.stats["oom_retries"] == 0 and rt.oom_raised == 0
        assert rt.peak <= budget
        assert sum(w for _, w, ok in runs if ok) == nx - 1
        for (i0, w, ok), nxt in zip(runs, runs[1:] + [None]):
            if ok:
                assert need(i0, w) <= budget - tables, (i0, w)
            else:   # redone at the same plane, with the most planes that fit
                redone += 1
                j0, q, _ = nxt
                assert j0 == i0 and q < w and need(i0, q) <= budget - tables < need(i0, q + 1), (i0, w, q)
    assert redone > 0


@pytest.mark.parametrize("factor", [(2, 2, 2)] + ANISOTROPIC_STEPS)
def test_emulated_downsampling_slabs_fill_the_budget_and_stay_within_it(emu_lib, real_crops, factor):
    """Downsampling under a budget of k output planes (each with its fx input planes) runs in
    slabs of k output planes, whatever the factor: never past the budget, the CPU's labels."""
    labels = _as_dtype(real_crops["37x29x23"], np.uint32)
    fx = factor[0]
    _, sy, sz = labels.shape
    ox, oy, oz = lod.downsampled_shape(labels.shape, factor)
    want = lod.downsample_labels(labels, factor)
    tables = _table_bytes(emu_lib)
    for k in (3, 4, 9):
        # device bytes of a slab of k output planes: its input planes and its output, each in
        # the memory pool's blocks of 512 bytes
        slab = gpu._pool_bytes(fx * k * sy * sz * labels.itemsize) + gpu._pool_bytes(k * oy * oz * labels.itemsize)
        rt = cuda_emu.EmulatedRuntime(emu_lib, seed=k)
        backend = gpu.GPUBackend(runtime=rt, memory_budget=tables + slab, block=64, max_blocks=7)
        got = backend.downsample(labels, factor)
        assert got.dtype == want.dtype and np.array_equal(got, want), k
        assert backend.stats["oom_retries"] == 0 and rt.oom_raised == 0, k
        assert rt.peak <= tables + slab, k
        assert backend.stats["slabs"] == -(-ox // k), (k, backend.stats)


@pytest.mark.parametrize("factor", [(2, 2, 2)] + ANISOTROPIC_STEPS)
def test_emulated_downsampling_slabs_count_the_pool_blocks_of_their_arrays(emu_lib, real_crops, factor):
    """A budget of k output planes' bytes (each with its fx input planes), not a multiple of
    the memory pool's 512-byte blocks: a slab's two arrays take whole blocks, so k planes may
    not fit.  The slabs are as wide as fit in blocks, with no out-of-memory retry (which would
    halve the width), never past the budget, the CPU's labels."""
    labels = _as_dtype(real_crops["37x29x23"], np.uint32)
    fx, isz = factor[0], labels.itemsize
    _, sy, sz = labels.shape
    ox, oy, oz = lod.downsampled_shape(labels.shape, factor)
    want = lod.downsample_labels(labels, factor)
    tables = _table_bytes(emu_lib)
    narrower = 0
    for k in (3, 4, 9):
        budget = tables + k * (fx * sy * sz + oy * oz) * isz
        width = max(w for w in range(1, k + 1)
                    if gpu._pool_bytes(fx * w * sy * sz * isz) + gpu._pool_bytes(w * oy * oz * isz) <= budget - tables)
        narrower += width < k
        rt = cuda_emu.EmulatedRuntime(emu_lib, seed=k)
        backend = gpu.GPUBackend(runtime=rt, memory_budget=budget, block=64, max_blocks=7)
        got = backend.downsample(labels, factor)
        assert got.dtype == want.dtype and np.array_equal(got, want), k
        assert backend.stats["oom_retries"] == 0 and rt.oom_raised == 0, k
        assert rt.peak <= budget, k
        assert backend.stats["slabs"] == -(-ox // width), (k, width, backend.stats)
    assert narrower   # the blocks took a plane at least once


def test_emulated_out_of_memory_retries_in_smaller_slabs(emu_lib, real_crops):
    """A device smaller than the backend believes: allocations fail, the backend frees and
    retries at half the width, and the result is still the CPU's."""
    labels = real_crops["37x29x23"]
    rt = cuda_emu.EmulatedRuntime(emu_lib, seed=1, capacity=5 * _plane_bytes(labels))
    releases = []
    rt.release = lambda: releases.append(backend.stats["oom_retries"])   # frees the pool on a GPU
    backend = gpu.GPUBackend(runtime=rt, memory_budget=1 << 30)
    _assert_same_triangles(backend.march(labels, 6), marching.march_cubes(labels, 6))
    assert backend.stats["oom_retries"] > 0 and rt.oom_raised == backend.stats["oom_retries"]
    assert backend.stats["cpu_fallbacks"] == 0
    # each retry halves the width: at most log2(planes) + 1 of them
    assert backend.stats["oom_retries"] <= (labels.shape[0] - 1).bit_length()
    retries = backend.stats["oom_retries"]
    assert np.array_equal(backend.downsample(labels), lod.downsample_labels(labels))
    assert backend.stats["oom_retries"] > retries and backend.stats["cpu_fallbacks"] == 0
    assert backend.stats["oom_retries"] - retries <= (-(-labels.shape[0] // 2)).bit_length()
    # the pool was freed before each retry
    assert releases == list(range(backend.stats["oom_retries"]))
    assert rt.live == _table_bytes(emu_lib)   # the case table alone is left


class _CUDAError(RuntimeError):
    """What CuPy raises for a failed CUDA call (CUDARuntimeError, CUDADriverError)."""

    def __init__(self, status):
        super().__init__(f"CUDA error {status}")
        self.status = status


@pytest.mark.parametrize("status", [2, 700])
def test_a_cuda_error_of_out_of_memory_is_retried_and_others_are_raised(emu_lib, real_crops, monkeypatch, status):
    # a launch of a module CUDA 12 loads lazily fails with cudaErrorMemoryAllocation (status
    # 2), not CuPy's OutOfMemoryError, on a full device: a worker's task failed with it
    labels = real_crops["37x29x23"]
    rt = cuda_emu.EmulatedRuntime(emu_lib, seed=1)
    rt.oom_status_errors = (_CUDAError,)
    backend = gpu.GPUBackend(runtime=rt, memory_budget=1 << 30)
    launch, failed = rt.launch, []

    def once(name, *args):
        if name.startswith("mc_emit") and not failed:
            failed.append(name)
            raise _CUDAError(status)
        return launch(name, *args)

    monkeypatch.setattr(rt, "launch", once)
    if status != 2:   # an illegal address: no memory to free, a real failure
        with pytest.raises(_CUDAError):
            backend.march(labels, 6)
        failed.clear()
        with pytest.raises(_CUDAError):   # also from a block meshed whole on the device
            backend.mesh(labels, 6)
        assert backend.stats["oom_retries"] == 0
        return
    _assert_same_triangles(backend.march(labels, 6), marching.march_cubes(labels, 6))
    assert failed and backend.stats["oom_retries"] == 1
    failed.clear()
    _assert_same_pieces(backend.mesh(labels, 6), CPUBackend().mesh(labels, 6))
    assert failed and backend.stats["oom_retries"] == 2


def test_emulated_out_of_memory_falls_back_to_cpu(emu_lib, real_crops):
    """Not even one x-plane fits: that block runs on the CPU, with a warning, same result."""
    labels = real_crops["40^3"]
    rt = cuda_emu.EmulatedRuntime(emu_lib, capacity=8192)
    backend = gpu.GPUBackend(runtime=rt, memory_budget=1 << 30)
    with pytest.warns(gpu.GPUMemoryWarning, match="on the CPU"):
        got = backend.march(labels, 8)
    _assert_same_triangles(got, marching.march_cubes(labels, 8))
    with pytest.warns(gpu.GPUMemoryWarning):
        assert np.array_equal(backend.downsample(labels), lod.downsample_labels(labels))
    assert backend.stats["cpu_fallbacks"] == 2


@pytest.mark.parametrize("dtype", [np.uint8, np.uint64, np.int32])
@pytest.mark.parametrize("weld", gpu.WELD_METHODS)
def test_emulated_device_weld_matches_cpu_weld(emu_lib, dtype, weld):
    """weld_device on march_device's output == marching.weld: groups, triangle order, vertex
    numbering by first appearance, many pieces and labels (IDs >= 2**63 for uint64); both
    ways of numbering the vertices (the hash kernels' threads shuffled)."""
    rng = np.random.default_rng(np.dtype(dtype).itemsize)
    backend = gpu.GPUBackend(runtime=cuda_emu.EmulatedRuntime(emu_lib, seed=5), weld=weld)
    for labels in (_blobby_labels((23, 17, 19), np.dtype(dtype).type, rng),
                   _random_labels((9, 11, 10), np.uint64 if dtype == np.uint64 else np.uint16, rng)):
        labels = labels.astype(dtype)
        for ps in (4, 7, 1000):
            d_lab = backend.rt.to_device(labels.view(gpu.label_dtype(labels.dtype)))
            got = backend.weld_device(*backend.march_device(d_lab, ps), labels.shape, labels.dtype)
            want = marching.weld(*marching.march_cubes(labels, ps), labels.shape)
            assert len(want) > 3
            _assert_same_pieces(got, want)
            assert {type(p.label) for p in got} == {int}


@pytest.mark.parametrize("weld", gpu.WELD_METHODS)
def test_emulated_device_weld_of_group_keys_past_int32(emu_lib, weld):
    """Group keys (label rank * pieces + piece) of 2**31 or more: the sort takes them as int64
    (32-bit keys would wrap) and the weld stays on the device, with marching.weld's pieces."""
    rng = np.random.default_rng(9)
    labels = _blobby_labels((14, 12, 11), np.uint32, rng)
    lab, piece, edges = marching.march_cubes(labels, 4)
    want = marching.weld(lab, piece, edges, labels.shape)
    nlab, top = len(np.unique(lab)), int(piece.max())
    for keys in (2**31, 3 * 2**30):   # labels x pieces from int32's limit on
        scale = -(-(keys - nlab) // (nlab * top))   # piece ids spread apart: labels x pieces >= keys
        assert keys <= nlab * (top * scale + 1) < 2**32
        rt = cuda_emu.EmulatedRuntime(emu_lib, seed=2)
        backend = gpu.GPUBackend(runtime=rt, weld=weld)
        got = backend.weld_device(rt.to_device(lab), rt.to_device(piece.astype(np.int64) * scale),
                                  rt.to_device(edges.astype(np.int64)), labels.shape, labels.dtype)
        assert backend.stats["device_welds"] == 1
        assert [(p.label, p.piece) for p in got] == [(w.label, w.piece * scale) for w in want]
        for g, w in zip(got, want):
            assert np.array_equal(g.vertices2, w.vertices2) and np.array_equal(g.faces, w.faces)


def test_emulated_mesh_welds_on_the_cpu_when_the_weld_does_not_fit(emu_lib, real_crops):
    labels = real_crops["40^3"]
    tris = len(marching.march_cubes(labels, 16)[0])
    want = CPUBackend().mesh(labels, 16)
    # room for the block's triangles, not for the weld's sort arrays
    budget = 41 * _plane_bytes(labels) + tris * 40 + 10_000
    assert budget < tris * gpu.WELD_BYTES_PER_TRIANGLE
    rt = cuda_emu.EmulatedRuntime(emu_lib)
    backend = gpu.GPUBackend(runtime=rt, memory_budget=budget)
    _assert_same_pieces(backend.mesh(labels, 16), want)
    assert backend.stats["device_welds"] == 0 and backend.stats["oom_retries"] == 0
    assert rt.peak <= budget
    # out of memory in the middle of the weld: freed, then slabs and the CPU weld
    rt = cuda_emu.EmulatedRuntime(emu_lib)
    backend = gpu.GPUBackend(runtime=rt, memory_budget=1 << 30)
    rt.oom_in.add("argsort")
    releases = []
    rt.release = lambda: releases.append(backend.stats["oom_retries"])   # frees the pool on a GPU
    _assert_same_pieces(backend.mesh(labels, 16), want)
    assert rt.oom_raised == 1 and not rt.oom_in
    assert backend.stats["device_welds"] == 0 and backend.stats["oom_retries"] == 1
    assert releases == [0]   # the pool was freed before the block was redone
    assert backend.stats["cpu_fallbacks"] == 0
    _assert_same_pieces(backend.mesh(labels, 16), want)  # and the next block welds there again
    assert backend.stats["device_welds"] == 1
    # room for the whole block's labels, counts and scan, not for its triangles: found from
    # the scan before they are allocated, then marched in slabs, never past the budget
    tables = _table_bytes(emu_lib)
    cubes = int(np.prod([n - 1 for n in labels.shape]))
    budget = tables + labels.nbytes + cubes * 12 + tris * (labels.itemsize + 32) // 2
    rt = cuda_emu.EmulatedRuntime(emu_lib)
    backend = gpu.GPUBackend(runtime=rt, memory_budget=budget)
    _assert_same_pieces(backend.mesh(labels, 16), want)
    assert backend.stats["device_welds"] == 0 and backend.stats["slabs"] > 1
    assert backend.stats["oom_retries"] == 0 and rt.oom_raised == 0 and rt.peak <= budget


@pytest.mark.parametrize("weld", gpu.WELD_METHODS)
@pytest.mark.parametrize("where, how", [("argsort", "reverse"), ("argsort", "garbage"), ("argsort", "unstable"),
                                        ("unique", "reverse"), ("unique", "garbage")])
def test_emulated_wrong_sort_results_are_caught(emu_lib, real_crops, weld, where, how):
    """CuPy up to 13.6 returns a wrong sort, with no error, when thrust cannot get its
    workspace (cupy/cupy#9894): every sort of the weld is checked, and a wrong one is taken as
    out of memory (the block is then welded on the CPU: the same pieces)."""
    labels = real_crops["40^3"]
    want = CPUBackend().mesh(labels, 16)
    rt = cuda_emu.EmulatedRuntime(emu_lib)
    backend = gpu.GPUBackend(runtime=rt, memory_budget=1 << 30, weld=weld)
    rt.corrupt_in[where] = how
    _assert_same_pieces(backend.mesh(labels, 16), want)
    assert rt.corrupted == 1 and not rt.corrupt_in
    assert backend.stats["device_welds"] == 0 and backend.stats["oom_retries"] == 1
    _assert_same_pieces(backend.mesh(labels, 16), want)  # the next block welds on the device
    assert backend.stats["device_welds"] == 1


def test_emulated_scans_stay_below_two_to_the_31(emu_lib, monkeypatch):
    """CuPy 13's scans take their length as a C int (cupy/cupy#9867): no slab of marching
    cubes covers more than ``MAX_SCAN`` cubes, a larger block is not meshed whole on the
    device, and a weld of more than ``MAX_SCAN`` corners is done on the CPU (lowered here)."""
    rng = np.random.default_rng(5)
    labels = _blobby_labels((30, 20, 18), np.uint32, rng)
    want = CPUBackend().mesh(labels, 8)
    rt = cuda_emu.EmulatedRuntime(emu_lib)
    backend = gpu.GPUBackend(runtime=rt, memory_budget=1 << 30)
    cubes_per_plane = 19 * 17
    monkeypatch.setattr(gpu, "MAX_SCAN", 4 * cubes_per_plane)
    _assert_same_pieces(backend.mesh(labels, 8), want)
    assert backend.stats["device_welds"] == 0 and backend.stats["slabs"] == -(-29 // 4)
    small = labels[:5]   # 4 planes of cubes: whole on the device, but its corners are too many
    tris = len(marching.march_cubes(small, 8)[0])
    assert 3 * tris > 4 * cubes_per_plane
    monkeypatch.setattr(gpu, "MAX_SCAN", 3 * tris - 1)
    _assert_same_pieces(backend.mesh(small, 8), CPUBackend().mesh(small, 8))
    assert backend.stats["device_welds"] == 0
    monkeypatch.setattr(gpu, "MAX_SCAN", 3 * tris)
    _assert_same_pieces(backend.mesh(small, 8), CPUBackend().mesh(small, 8))
    assert backend.stats["device_welds"] == 1
    # a block of exactly MAX_SCAN cubes (and few corners) is one scan: meshed whole on the device
    dot = np.zeros((6, 9, 8), np.uint32)
    dot[2, 4, 3] = 7
    monkeypatch.setattr(gpu, "MAX_SCAN", 5 * 8 * 7)
    slabs = backend.stats["slabs"]
    _assert_same_pieces(backend.mesh(dot, 8), CPUBackend().mesh(dot, 8))
    assert backend.stats["device_welds"] == 2 and backend.stats["slabs"] == slabs


@pytest.mark.parametrize("seed", [0, 12345, 777])
def test_emulated_hash_weld_on_real_labels_in_any_thread_order(emu_lib, real_crops, seed):
    """The hash-table weld (kernels/weld.cu) in launch order and shuffled, with a capped grid so
    that each thread inserts many corners: the CPU's pieces; and mesh() uses it."""
    rt = cuda_emu.EmulatedRuntime(emu_lib, seed=seed)
    backend = gpu.GPUBackend(runtime=rt, weld="hash", block=64, max_blocks=3)
    launched = []
    real_launch = rt.launch
    rt.launch = lambda name, *a: launched.append(name) or real_launch(name, *a)
    for labels in real_crops.values():
        for ps in (16, 5):
            _assert_same_pieces(backend.mesh(labels, ps), CPUBackend().mesh(labels, ps))
    assert {"weld_insert", "weld_lookup"} <= set(launched)
    assert backend.stats["device_welds"] == 4
    with pytest.raises(ValueError, match="weld"):
        gpu.GPUBackend(runtime=rt, weld="radix")


def test_weld_method_from_the_environment(emu_lib, monkeypatch):
    rt = cuda_emu.EmulatedRuntime(emu_lib)
    monkeypatch.delenv(gpu.WELD_ENV, raising=False)
    assert gpu.GPUBackend(runtime=rt).weld == "sort"
    monkeypatch.setenv(gpu.WELD_ENV, "hash")
    assert gpu.GPUBackend(runtime=rt).weld == "hash"
    assert gpu.GPUBackend(runtime=rt, weld="sort").weld == "sort"
    monkeypatch.setenv(gpu.WELD_ENV, "radix")
    with pytest.raises(ValueError, match="weld"):
        gpu.GPUBackend(runtime=rt)


#: 4 triangles (12 corners) in two groups, most keys repeated: 8 distinct keys
_WELD_GROUP = np.array([0, 0, 1, 1], dtype=np.int64)
_WELD_EDGE = np.array([5, 6, 7, 6, 5, 8, 5, 6, 7, 9, 5, 6], dtype=np.int64)
_WELD_KEY = _WELD_GROUP[np.arange(12) // 3] * 100 + _WELD_EDGE


def _hash_weld_kernels(rt, slots: int) -> tuple:
    """``weld_insert`` then ``weld_lookup`` of the corners above into a table of ``slots``
    slots (2 blocks of 4 threads): the table's keys and every corner's ``cfirst``."""
    keys = rt.to_device(np.full(slots, np.uint64(0xFFFFFFFFFFFFFFFF), dtype=np.uint64))
    first = rt.to_device(np.full(slots, np.iinfo(np.int64).max, dtype=np.int64))
    cfirst = rt.empty(12, np.int64)
    args = (rt.to_device(_WELD_GROUP), rt.to_device(_WELD_EDGE), np.int64(12), np.int64(100), keys, first,
            np.uint64(slots - 1))
    rt.launch("weld_insert", 2, 4, args)
    rt.launch("weld_lookup", 2, 4, args + (cfirst,))
    return rt.to_host(keys), rt.to_host(cfirst)


def test_hash_weld_kernels_find_first_appearances_on_collisions(emu_lib):
    """Keys that share home slots (a table of 16 slots for 12 corners, most keys repeated):
    every corner gets its key's first corner, in any thread order."""
    want = np.array([int(np.flatnonzero(_WELD_KEY == k)[0]) for k in _WELD_KEY])
    for seed in (0, 1, 2, 3):
        _, cfirst = _hash_weld_kernels(cuda_emu.EmulatedRuntime(emu_lib, seed=seed), 16)
        assert np.array_equal(cfirst, want)


def test_hash_weld_kernels_end_when_the_table_is_full(emu_lib):
    """A table of 4 slots for 8 keys (which the host never makes): the probes stop after the
    whole table instead of looping for ever; the keys that found a slot get their first
    corner, the corners of the four that did not get -1, in any thread order."""
    assert len(np.unique(_WELD_KEY)) == 8
    for seed in (0, 1, 2, 3):
        keys, cfirst = _hash_weld_kernels(cuda_emu.EmulatedRuntime(emu_lib, seed=seed), 4)
        stored = set(keys.astype(np.int64).tolist())
        assert len(stored) == 4 and stored <= set(_WELD_KEY.tolist())
        want = np.array([int(np.flatnonzero(_WELD_KEY == k)[0]) if k in stored else -1 for k in _WELD_KEY])
        assert np.array_equal(cfirst, want)


def test_hash_weld_with_a_table_too_small_welds_on_the_cpu(emu_lib, real_crops, monkeypatch):
    """Should the host size the hash table too small, the lost keys' -1 fails its check and
    the block is welded on the CPU (the CPU's pieces), rather than the kernel hanging or a
    corner taking another vertex."""
    rt = cuda_emu.EmulatedRuntime(emu_lib)
    backend = gpu.GPUBackend(runtime=rt, weld="hash")
    labels = real_crops["37x29x23"]
    want = CPUBackend().mesh(labels, 16)
    monkeypatch.setattr(gpu, "_hash_table_size", lambda corners: 64)
    _assert_same_pieces(backend.mesh(labels, 16), want)
    assert backend.stats["device_welds"] == 0 and backend.stats["oom_retries"] == 1
    monkeypatch.undo()
    _assert_same_pieces(backend.mesh(labels, 16), want)
    assert backend.stats["device_welds"] == 1
    assert gpu._hash_table_size(12) == 32 and gpu._hash_table_size(16) == 32
    assert gpu._hash_table_size(17) == 64 and gpu._hash_table_size(1) == 16


def test_default_memory_budget_is_a_share_of_free_memory(emu_lib):
    # the share of the free memory, less the other processes' CUDA contexts (which came on
    # top of the pools: past the free memory on a 24 GB card), at least half the share
    for cap, n in [(10_000_000, 4), (22 << 30, 11), (80 << 30, 16)]:
        rt = cuda_emu.EmulatedRuntime(emu_lib, capacity=cap)
        backend = gpu.GPUBackend(runtime=rt, processes=n)
        tables = rt.live
        assert tables > 0
        share = int((cap - tables) * gpu.GPU_MEMORY_FRACTION)
        if cap > 1 << 30:
            assert backend.memory_budget == (share - (n - 1) * gpu.CONTEXT_BYTES) // n
            # with their contexts, the processes stay within the free memory
            assert n * (backend.memory_budget + gpu.CONTEXT_BYTES) <= cap - tables
        else:
            assert backend.memory_budget == share // 2 // n
        assert rt.limit == backend.memory_budget
    with pytest.raises(ValueError, match="processes"):
        gpu.GPUBackend(runtime=rt, processes=0)
    with pytest.raises(ValueError, match="memory_budget"):
        gpu.GPUBackend(runtime=rt, memory_budget=0)


@pytest.mark.parametrize("name", ["40^3", "37x29x23"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_real_crop_matches_cpu(emu_lib, real_crops, name, dtype):
    labels = _as_dtype(real_crops[name], dtype)
    backend = gpu.GPUBackend(runtime=cuda_emu.EmulatedRuntime(emu_lib, seed=99))
    _check_backend(backend, labels, piece_sizes=(16, 7))


@pytest.mark.parametrize("name,quality,some,voxel", [("37x29x23", "high", False, (32.0, 32.0, 40.0)),
                                                     ("40^3", "medium", False, (32.0, 32.0, 40.0)),
                                                     ("40^3", "medium", True, (32.0, 32.0, 40.0)),
                                                     ("40^3", "medium", False, (4.0, 4.0, 40.0))])
def test_emulated_run_mesh_is_byte_identical(emu_lib, real_crops, tmp_path, monkeypatch, name, quality, some,
                                             voxel):
    """The whole pipeline with the emulated GPU backend writes exactly the CPU's bytes (also
    for a selection of the segments, ``some``, and with anisotropic voxels, whose LODs are
    downsampled along x and y only)."""
    from gpumesh import pipeline
    from gpumesh.pipeline import MeshOptions, run_mesh

    labels = real_crops[name]
    segments = np.unique(labels[labels != 0])[::3] if some else None
    kw = dict(options=MeshOptions(chunk_size=8, max_lods=2 if voxel[0] == 32 else 3, quality=quality,
                                  segments=segments), voxel_size=voxel, workers=1)
    run_mesh(labels, str(tmp_path / "cpu"), device="cpu", **kw)
    emu = gpu.GPUBackend(runtime=cuda_emu.EmulatedRuntime(emu_lib, seed=3))
    monkeypatch.setattr(pipeline, "get_backend", lambda device="auto", **_: emu)
    summary = run_mesh(labels, str(tmp_path / "gpu"), device="gpu", **kw)
    assert summary.device == "gpu"
    assert any(n.startswith("mc_emit") for n, _, _ in emu.rt.launches)
    assert any(n.startswith("ds2") for n, _, _ in emu.rt.launches)
    _assert_same_tree(tmp_path / "cpu", tmp_path / "gpu")


def _random_case(seed: int) -> tuple:
    """tests/test_random_volumes.py's random volume and options of ``seed`` (skipped when it is
    empty), and run_mesh's keywords: odd seeds have anisotropic voxels, whose LODs are
    downsampled along x and y only at first."""
    from test_random_volumes import random_labels, random_options

    rng = np.random.default_rng(seed)
    labels = random_labels(rng)
    options = random_options(rng)
    if not labels.any():
        pytest.skip("an empty volume")
    return labels, dict(options=options, voxel_size=(4.0, 4.0, 40.0) if seed % 2 else (4.0, 5.0, 6.0), workers=1)


@pytest.mark.parametrize("seed", range(8))
def test_emulated_run_mesh_on_random_volumes_is_byte_identical(emu_lib, seed, tmp_path, monkeypatch):
    """The emulated counterpart of :func:`test_gpu_run_mesh_on_random_volumes_is_byte_identical`
    (every dtype, shapes that are not multiples of the chunk, 1-4 LODs, legacy and sharded),
    which only runs on a device."""
    from gpumesh import pipeline
    from gpumesh.pipeline import run_mesh

    labels, kw = _random_case(seed)
    run_mesh(labels, str(tmp_path / "cpu"), device="cpu", **kw)
    emu = gpu.GPUBackend(runtime=cuda_emu.EmulatedRuntime(emu_lib, seed=seed))
    monkeypatch.setattr(pipeline, "get_backend", lambda device="auto", **_: emu)
    assert run_mesh(labels, str(tmp_path / "gpu"), device="gpu", **kw).device == "gpu"
    assert any(n.startswith("mc_emit") for n, _, _ in emu.rt.launches)
    _assert_same_tree(tmp_path / "cpu", tmp_path / "gpu")


def _assert_same_tree(a: pathlib.Path, b: pathlib.Path):
    """The same files under ``a`` and ``b``, byte for byte; a failure names the first file that differs."""
    ta, tb = tree_files(a), tree_files(b)
    assert sorted(ta) == sorted(tb) and len(ta) > 2
    for rel, data in ta.items():
        assert data == tb[rel], rel


# --------------------------------------------------------------------------------------
# on a real GPU (lent device): pytest -m gpu


@pytest.fixture(scope="module")
def gpu_backend():
    return gpu.GPUBackend()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_random_labels_match_cpu(gpu_backend, dtype):
    rng = np.random.default_rng(np.dtype(dtype).itemsize)
    for shape in [(13, 11, 9), (7, 17, 5), (2, 2, 2), (1, 5, 5), (33, 65, 31)]:
        _check_backend(gpu_backend, _random_labels(shape, dtype, rng))
    _check_backend(gpu_backend, _blobby_labels((70, 45, 51), dtype, rng), piece_sizes=(16, 1000))


@pytest.mark.gpu
def test_gpu_grid_stride_matches_cpu():
    rng = np.random.default_rng(1)
    small = gpu.GPUBackend(block=64, max_blocks=3)
    _check_backend(small, _blobby_labels((40, 33, 29), np.uint64, rng))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_real_crop_matches_cpu(gpu_backend, real_crops, crop, dtype):
    for labels in list(real_crops.values()) + [crop]:
        _check_backend(gpu_backend, _as_dtype(labels, dtype), piece_sizes=(32, 16))


@pytest.mark.gpu
def test_gpu_run_mesh_is_byte_identical(crop, tmp_path):
    """The main job on the real crop: the GPU writes the CPU's bytes, at both presets and for
    a selection of the segments."""
    from gpumesh.pipeline import MeshOptions, run_mesh

    some = np.unique(crop[crop != 0])[::3]
    for name, options in [("high", MeshOptions(chunk_size=32, max_lods=3, quality="high")),
                          ("medium", MeshOptions(chunk_size=32, max_lods=3)),
                          ("some", MeshOptions(chunk_size=32, max_lods=3, segments=some))]:
        kw = dict(options=options, voxel_size=(32.0, 32.0, 40.0), voxel_offset=(192, 192, 192), workers=1)
        assert run_mesh(crop, str(tmp_path / name / "cpu"), device="cpu", **kw).device == "cpu"
        assert run_mesh(crop, str(tmp_path / name / "gpu"), device="gpu", **kw).device == "gpu"
        _assert_same_tree(tmp_path / name / "cpu", tmp_path / name / "gpu")


@pytest.mark.gpu
@pytest.mark.parametrize("seed", range(8))
def test_gpu_run_mesh_on_random_volumes_is_byte_identical(seed, tmp_path):
    """The main job on tests/test_random_volumes.py's random volumes and options (every dtype,
    shapes that are not multiples of the chunk, 1-4 LODs, legacy and sharded): the GPU writes
    the CPU's bytes."""
    from gpumesh.pipeline import run_mesh

    labels, kw = _random_case(seed)
    assert run_mesh(labels, str(tmp_path / "cpu"), device="cpu", **kw).device == "cpu"
    assert run_mesh(labels, str(tmp_path / "gpu"), device="gpu", **kw).device == "gpu"
    _assert_same_tree(tmp_path / "cpu", tmp_path / "gpu")


@pytest.mark.gpu
def test_gpu_memory_budget_slabs_match_cpu(crop):
    """On the device: a budget of a few planes gives many slabs and the CPU's arrays."""
    labels = crop
    backend = gpu.GPUBackend(memory_budget=6 * _plane_bytes(labels))
    # no room for the weld in such a budget: the slabs' triangles are welded on the CPU
    _check_backend(backend, labels, piece_sizes=(32, 7), device_weld=False)
    assert backend.stats["slabs"] > 2 * labels.shape[0] // 3
    assert backend.stats["cpu_fallbacks"] == 0


@pytest.mark.gpu
def test_gpu_weld_on_device_and_on_the_cpu_give_the_same_pieces(crop):
    labels = crop
    want = CPUBackend().mesh(labels, 32)
    backend = gpu.GPUBackend()
    _assert_same_pieces(backend.mesh(labels, 32), want)
    assert backend.stats["device_welds"] == 1
    tris = len(marching.march_cubes(labels, 32)[0])
    # room for the triangles, not for the weld: welded on the CPU
    small = gpu.GPUBackend(memory_budget=labels.shape[0] * _plane_bytes(labels) + tris * 48)
    _assert_same_pieces(small.mesh(labels, 32), want)
    assert small.stats["device_welds"] == 0 and small.stats["cpu_fallbacks"] == 0


@pytest.mark.gpu
def test_gpu_hash_weld_gives_the_same_pieces(crop):
    want = CPUBackend().mesh(crop, 32)
    backend = gpu.GPUBackend(weld="hash")
    _assert_same_pieces(backend.mesh(crop, 32), want)
    assert backend.stats["device_welds"] == 1


@pytest.mark.gpu
def test_gpu_run_mesh_with_workers_sharing_the_device(crop, tmp_path):
    """Two worker processes, each with its share of the device, write the CPU's bytes."""
    from gpumesh.pipeline import MeshOptions, run_mesh

    kw = dict(options=MeshOptions(chunk_size=32, max_lods=3), voxel_size=(32.0, 32.0, 40.0),
              voxel_offset=(192, 192, 192))
    run_mesh(crop, str(tmp_path / "cpu"), device="cpu", workers=1, **kw)
    assert run_mesh(crop, str(tmp_path / "gpu"), device="gpu", workers=2, **kw).device == "gpu"
    _assert_same_tree(tmp_path / "cpu", tmp_path / "gpu")


@pytest.mark.gpu
@pytest.mark.parametrize("workers", [2, 6])
def test_gpu_on_a_dask_cluster_writes_the_cpus_bytes(crop, tmp_path, workers):
    """Dask workers on one host share the device (gpumesh.cluster): as many use it as
    ``gpu.device_processes`` allows (all 2; of 6, 4 on the emulation's 8 GiB device), each with
    its share of the budget, and they write the bytes of one CPU process.  Skipped where
    ``distributed`` is not installed (the device kit's image)."""
    pytest.importorskip("distributed")
    from distributed import Client, LocalCluster

    from gpumesh.pipeline import MeshOptions, run_mesh

    kw = dict(options=MeshOptions(chunk_size=32, max_lods=3), voxel_size=(32.0, 32.0, 40.0),
              voxel_offset=(192, 192, 192))
    run_mesh(crop, str(tmp_path / "cpu"), device="cpu", workers=1, **kw)
    free, total = gpu.GPUBackend().rt.mem_info()
    fit = gpu.device_processes(free, workers)

    def backend():   # (name, budget) of this worker's backend; None if it ran no task
        b = __import__("gpumesh.pipeline").pipeline._WORKER.get("backend")
        return None if b is None else (b.name, getattr(b, "memory_budget", None))

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        summary = run_mesh(crop, str(tmp_path / "gpu"), device="gpu", client=client, **kw)
        backends = client.run(backend)
    _assert_same_tree(tmp_path / "cpu", tmp_path / "gpu")
    assert "gpu" in summary.device
    # by address, the first `fit` workers of the host use the device, each with its share
    for rank, address in enumerate(sorted(backends)):
        if backends[address] is None:
            continue
        name, budget = backends[address]
        assert name == ("gpu" if rank < fit else "cpu"), (rank, fit, backends)
        if name == "gpu":
            assert budget <= total * gpu.GPU_MEMORY_FRACTION / fit, (budget, total, fit)


def test_gpu_without_a_gpu_is_one_error_line(monkeypatch, tmp_path):
    """--device gpu where no GPU backend can run: one line, status 2, nothing written."""
    from click.testing import CliRunner

    from gpumesh import backend
    from gpumesh.cli import main

    monkeypatch.setattr(backend, "gpu_available", lambda: False)
    labels = np.zeros((12, 12, 12), np.uint32)
    labels[3:9, 3:9, 3:9] = 7
    write_zarr(tmp_path / "l.zarr", labels, chunk=32)
    res = CliRunner().invoke(main, ["mesh", str(tmp_path / "l.zarr"), str(tmp_path / "out"), "--device", "gpu",
                                    "--workers", "1", "--voxel-size", "1,1,1"])
    assert res.exit_code == 2, res.output
    assert res.output.strip().splitlines() == [
        "gpumesh: error: no CUDA GPU visible to CuPy (on a GPU machine, install the "
        "[gpu] extra: pip install -e '.[gpu]' in a gpumesh clone)"], res.output
    assert not (tmp_path / "out").exists()


def test_auto_without_a_gpu_says_so_in_one_line(monkeypatch, tmp_path):
    """device="auto" on a machine without a usable GPU meshes on the CPU with a one-line
    notice; the CLI prints it before meshing."""
    from click.testing import CliRunner

    from gpumesh import backend
    from gpumesh.cli import main

    monkeypatch.setattr(backend, "gpu_available", lambda: False)
    with pytest.warns(backend.CPUFallbackNotice, match="meshing on the CPU"):
        assert backend.get_backend("auto").name == "cpu"
    labels = np.zeros((12, 12, 12), np.uint32)
    labels[3:9, 3:9, 3:9] = 7
    write_zarr(tmp_path / "l.zarr", labels, chunk=32)
    res = CliRunner().invoke(main, ["mesh", str(tmp_path / "l.zarr"), str(tmp_path / "out"),
                                    "--voxel-size", "1,1,1", "--workers", "1"])
    assert res.exit_code == 0, res.output
    notices = [line for line in res.output.splitlines() if "meshing on the CPU" in line]
    assert len(notices) == 1 and notices[0].startswith("gpumesh: ")
    assert "device cpu" in res.output


def test_the_cpu_notice_names_the_callers_line(monkeypatch, tmp_path):
    """From Python, the notice of device="auto" names the line that called run_mesh or
    mesh_segment, as their other warnings do (it named gpumesh/pipeline.py and adhoc.py:
    ``backend = get_backend(device)``, in a notebook too)."""
    from gpumesh import backend, mesh_segment, run_mesh

    monkeypatch.setattr(backend, "gpu_available", lambda: False)
    labels = np.zeros((12, 12, 12), np.uint32)
    labels[3:9, 3:9, 3:9] = 7
    for call in (lambda: run_mesh(labels, str(tmp_path / "out"), voxel_size=(1, 1, 1), workers=1),
                 lambda: mesh_segment(labels, 7, voxel_size=(1, 1, 1))):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
        notices = [w for w in caught if issubclass(w.category, backend.CPUFallbackNotice)]
        assert len(notices) == 1 and notices[0].filename == __file__, [(w.filename, w.lineno) for w in notices]


@pytest.mark.gpu
def test_gpu_pinned_and_pageable_transfers_give_the_cpus_pieces(crop):
    """On the device: the pinned, queued transfers (the default) and pageable ones agree."""
    want = CPUBackend().mesh(crop, 32)
    pinned = gpu.GPUBackend()
    assert pinned.rt.pinned  # the start-up round trip worked on this device
    pageable = gpu.GPUBackend(runtime=gpu.CupyRuntime(pinned=False))
    for backend in (pinned, pageable):
        _assert_same_pieces(backend.mesh(crop, 32), want)
        assert np.array_equal(backend.downsample(crop), CPUBackend().downsample(crop))
        _check_backend(backend, crop, piece_sizes=(16,))


@pytest.mark.parametrize("stage", ["_mesh_on_device", "_march_slab", "_downsample_slab"])
def test_emulated_threads_sharing_a_backend_take_turns(emu_lib, real_crops, stage):
    """Threads that share a backend (ad-hoc meshing's sub-blocks) take turns, a whole block or
    one slab at a time (a block that does not fit is marched in slabs, then welded on the CPU;
    downsampling too): the runtime's stream and pinned staging buffers are shared, and a
    thread's wait that let another thread queue its upload then freed that upload's buffer
    mid-copy (with CupyRuntime)."""
    import threading
    import time

    labels = real_crops["40^3"]
    whole = stage == "_mesh_on_device"
    backend = gpu.GPUBackend(runtime=cuda_emu.EmulatedRuntime(emu_lib),
                             memory_budget=(1 << 30) if whole else 4 * _plane_bytes(labels))
    inside, most, real = [0], [0], getattr(backend, stage)

    def counted(*args):
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        time.sleep(0.02)
        try:
            return real(*args)
        finally:
            inside[0] -= 1

    setattr(backend, stage, counted)
    if stage == "_downsample_slab":
        want, run = lod.downsample_labels(labels), lambda: backend.downsample(labels)
    else:
        want, run = CPUBackend().mesh(labels, 16), lambda: backend.mesh(labels, 16)
    results = [None] * 3

    def one(i):
        results[i] = run()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1 and (whole or backend.stats["slabs"] >= 2 * len(threads))   # slabs: several a call
    for got in results:
        if stage == "_downsample_slab":
            assert np.array_equal(got, want)
        else:
            _assert_same_pieces(got, want)
