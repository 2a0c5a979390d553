"""The workers' warm-up (gpumesh.warmup): it loads every numba kernel the main job's tasks call,
with the tasks' own argument types, so a task after it compiles nothing; and the workers start
at different points of it, so that on a first run each compiles only its share.

numba keeps what a process has loaded, so the coverage check runs in a fresh interpreter and
lists the kernels' overloads (compiled, or loaded from the disk cache) that the tasks added
after the warm-up.  ``gpumesh warmup`` runs in a copy of the package with no cache at all, and a
later process then compiles nothing (numba's compile events).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from gpumesh import warmup

REPO = pathlib.Path(__file__).resolve().parents[1]

# In a fresh process: warm up, then run every task of a small plan over a crop of the real
# volume and print the overloads of gpumesh's kernels that the tasks added (compiled, or loaded
# from numba's cache): those the warm-up did not load.
_SCRIPT = r"""
import json, pathlib, sys
import numpy as np
from numba.core.dispatcher import Dispatcher
from gpumesh import warmup
from gpumesh.backend import CPUBackend
from gpumesh.pipeline import MeshOptions, Plan, mesh_block
from gpumesh.volume import open_volume

labels = np.load(sys.argv[1])
backend_name = sys.argv[2]
volume = open_volume(labels, voxel_size=(32, 32, 40))
if backend_name == "gpu":   # the GPU backend over the CPU emulation of its kernels
    sys.path.insert(0, sys.argv[3])
    import cuda_emu
    from gpumesh import gpu
    lib = cuda_emu.build(pathlib.Path(sys.argv[4]), [gpu.kernel_dir() / f for f in gpu.KERNEL_FILES],
                         gpu.KERNEL_NAMES, ubsan=False)
    backend = gpu.GPUBackend(runtime=cuda_emu.EmulatedRuntime(lib))
else:
    backend = CPUBackend()


def overloads():
    return {f"{fn.py_func.__module__}.{fn.py_func.__qualname__}{sig}"
            for name, mod in list(sys.modules.items()) if name.startswith("gpumesh.")
            for fn in vars(mod).values() if isinstance(fn, Dispatcher) for sig in fn.overloads}


failed = warmup.warm_up(volume.dtype, backend.name)
options = MeshOptions(chunk_size=16, max_lods=3)
plan = Plan.make(volume.shape, options)
before = overloads()
for block, part in plan.tasks():
    mesh_block(volume, plan, options, block, backend, part)
added = sorted(overloads() - before)
print(json.dumps({"failed": failed, "compiled": added, "tasks": len(plan.tasks()),
                  "loaded": sorted({k.split("(")[0] for k in before})}))
"""


def _run_fresh(tmp_path, labels, backend):
    np.save(tmp_path / "labels.npy", labels)
    (tmp_path / "emu").mkdir()
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"))
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(tmp_path / "labels.npy"), backend,
         str(REPO / "tests" / "cuda_emulation"), str(tmp_path / "emu")],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def crop64(crop):
    """64^3 of the real crop as uint64 labels (the tasks relabel and downsample the source
    dtype; the job's tasks over it include coarse and octant tasks of several blocks)."""
    return np.ascontiguousarray(crop[32:96, 32:96, 32:96]).astype(np.uint64)


def test_after_the_warm_up_no_task_compiles_a_kernel(crop64, tmp_path):
    out = _run_fresh(tmp_path, crop64, "cpu")
    assert out["failed"] == []
    assert out["tasks"] > 9
    # the listing sees the kernels (the simplifier's, the weld's), so an empty difference means something
    assert {"gpumesh.lod._decimate", "gpumesh.marching._group_and_weld"} <= set(out["loaded"])
    assert out["compiled"] == []


def test_gpu_backend_warm_up_covers_its_cpu_kernels(crop64, tmp_path):
    sys.path.insert(0, str(REPO / "tests" / "cuda_emulation"))
    import cuda_emu

    if cuda_emu.compiler() is None:
        pytest.skip("g++ not found: cannot build the CUDA emulation")
    out = _run_fresh(tmp_path, crop64, "gpu")
    assert out["failed"] == []
    assert out["compiled"] == []


def test_gpu_backend_skips_the_cpu_marching_kernels():
    names = {j.name for j in warmup.jobs_for("gpu")}
    assert names == {j.name for j in warmup.JOBS if not j.cpu_backend}
    assert {"weld", "march", "downsample"}.isdisjoint(names)


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
@pytest.mark.parametrize("workers", [1, 2, 3, 16, 64])
def test_workers_start_at_even_shares(backend, workers):
    jobs = warmup.jobs_for(backend)
    total = sum(j.seconds for j in jobs)
    bounds = np.cumsum([0.0] + [j.seconds for j in jobs[:-1]])
    starts = [warmup.start_index(jobs, w, workers) for w in range(workers)]
    assert starts[0] == 0
    assert starts == sorted(starts)
    for w, s in enumerate(starts):
        assert 0 <= s < len(jobs)   # a job to start at (on many workers too)
        # the job boundary nearest to w/workers of the compile work
        target = total * w / workers
        assert abs(bounds[s] - target) == pytest.approx(np.abs(bounds - target).min())
    if workers > 1:
        assert starts[-1] > 0


def test_a_failing_job_is_reported_not_raised(monkeypatch):
    def boom(dtype):
        raise RuntimeError("no compiler")

    jobs = (warmup.Job("boom", boom, 1.0), *warmup.JOBS)
    monkeypatch.setattr(warmup, "JOBS", jobs)
    assert warmup.warm_up(np.uint32, "cpu") == ["boom"]


@pytest.mark.parametrize("workers", [1, 2, 3, 5])
def test_every_worker_runs_every_job_once_from_its_own_start(monkeypatch, workers):
    """Each worker walks all the jobs, once each, beginning at its start and wrapping around:
    a worker that starts later still loads the kernels of the jobs before its start (they are
    loaded from the cache the others filled), so its tasks compile none."""
    ran = []
    jobs = tuple(warmup.Job(f"j{i}", lambda dtype, i=i: ran.append(i), s) for i, s in enumerate([3.0, 1.0, 2.0, 2.5]))
    monkeypatch.setattr(warmup, "JOBS", jobs)
    for w in range(workers):
        ran.clear()
        assert warmup.warm_up(np.uint32, "cpu", w, workers) == []
        s = warmup.start_index(list(jobs), w, workers)
        assert ran == [(s + k) % len(jobs) for k in range(len(jobs))], (w, ran)


def test_the_warmup_command_says_what_failed_and_refuses_bad_input(monkeypatch):
    """``gpumesh warmup``: status 1 naming each job that failed (its kernels compile on first
    use then), status 2 with one line for a dtype that is no label dtype, or for ``--device
    gpu`` where no GPU is (before any compiling)."""
    from click.testing import CliRunner

    from gpumesh import backend
    from gpumesh.cli import main

    def boom(dtype):
        raise RuntimeError("no compiler")

    ran = []
    monkeypatch.setattr(warmup, "JOBS", (warmup.Job("boom", boom, 1.0), warmup.Job("ok", ran.append, 1.0)))
    monkeypatch.setattr(warmup, "_adhoc", ran.append)
    res = CliRunner().invoke(main, ["warmup", "--dtype", "int16,uint16,uint8", "--device", "cpu"])
    assert res.exit_code == 1
    assert [line.split()[0] for line in res.output.splitlines()[:2]] == ["uint16:", "uint8:"]
    assert "not compiled (compiled on first use instead): uint16: boom, uint8: boom" in res.output
    assert ran == [np.dtype("uint16")] * 2 + [np.dtype("uint8")] * 2   # a signed dtype: its unsigned kernels
    for args, why in [(["--dtype", "float32"], "labels must be uint8..uint64 or int8..int64 (got float32)"),
                      (["--dtype", "u9"], "--dtype: ")]:
        res = CliRunner().invoke(main, ["warmup", *args])
        assert res.exit_code == 2 and res.output.startswith("gpumesh: error: " + why), res.output
    if not backend.gpu_available():
        ran.clear()
        res = CliRunner().invoke(main, ["warmup", "--device", "gpu"])
        assert res.exit_code == 2 and res.output.startswith("gpumesh: error: ") and ran == []


def test_precompile_meshes_once_on_the_gpu_backend_it_built_and_closes_it(monkeypatch, tmp_path):
    """The GPU part of ``gpumesh warmup``, over the CPU emulation of the kernels: one trial mesh
    on the backend built first (its CUDA modules compiled), which is then closed; a trial that
    fails is reported, not raised."""
    sys.path.insert(0, str(REPO / "tests" / "cuda_emulation"))
    import cuda_emu

    from gpumesh import adhoc, backend, gpu

    if cuda_emu.compiler() is None:
        pytest.skip("g++ not found: cannot build the CUDA emulation")
    lib = cuda_emu.build(tmp_path, [gpu.kernel_dir() / f for f in gpu.KERNEL_FILES], gpu.KERNEL_NAMES, ubsan=False)
    built, closed, trials = [], [], []
    cpu_backend = backend.get_backend

    def get_backend(device, *args, **kwargs):
        if device == "cpu":   # the CPU kernels' warm-up (ad-hoc meshing's)
            return cpu_backend(device, *args, **kwargs)
        b = gpu.GPUBackend(runtime=cuda_emu.EmulatedRuntime(lib))
        monkeypatch.setattr(b, "close", lambda: closed.append(b))
        built.append(b)
        return b

    real = adhoc.mask_to_mesh

    def trial(mask, origin, voxel_size, **kw):
        trials.append(kw["backend"])
        return real(mask, origin, voxel_size, **kw)

    monkeypatch.setattr(backend, "get_backend", get_backend)
    monkeypatch.setattr(adhoc, "mask_to_mesh", trial)
    report = warmup.precompile(["uint8", "uint64"], "gpu")
    assert report.cuda == "compiled" and report.failed == [] and report.cupy_cache
    assert len(built) == 1 and trials == built and closed == built

    def broken(*args, **kw):
        raise RuntimeError("no device memory")

    monkeypatch.setattr(adhoc, "mask_to_mesh", broken)
    report = warmup.precompile(["uint8"], "gpu")
    assert report.failed == ["gpu: trial mesh"] and "no device memory" in report.cuda and len(closed) == 2
