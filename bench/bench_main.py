#!/usr/bin/env python3
"""Main benchmark: gpumesh against igneous, mesh-n-bone, zmesh and serra-mesh on one label volume.

One invocation runs, on the same input and machine, each tool in its own child process:

* ``gpumesh``: the full CLI job (``gpumesh mesh SOURCE DEST --voxel-size ... --overwrite
  --summary-json FILE``), which reads the volume, meshes every segment, builds the LOD
  pyramid, encodes and writes Neuroglancer multi-resolution meshes;
* ``zmesh``: load the volume with tensorstore, ``zmesh.Mesher(voxel_size).mesh(labels,
  close=True)``, then for every segment the unsimplified mesh (``reduction_factor=0``, to
  count triangles) and the simplified one with igneous' defaults (``reduction_factor=100``,
  ``max_error=40`` nm);
* ``serra``: the same with ``serra_mesh.Mesher(voxel_resolution=..., threads=0)`` (every
  core);
* ``igneous``: igneous's own two-step sharded multi-resolution job with its CLI defaults,
  one process per core (``LocalTaskQueue(parallel=N)``): ``create_meshing_tasks(...,
  sharded=True)`` (``igneous mesh forge --sharded``), then
  ``create_sharded_multires_mesh_tasks(...)`` (``igneous mesh merge-sharded``), on a
  precomputed copy of the volume made before the clock starts.  igneous runs under its own
  Python (``--igneous-python``, an environment with ``igneous-pipeline``): its dependencies
  do not mix with gpumesh's.  Its output is checked with ``gpumesh.validate``, which also
  gives its triangles and bytes per LOD;
* ``mesh-n-bone``: janelia-cellmap's Dask pipeline, its CLI ``mesh-n-bone meshify CONFIG -n
  N`` with its defaults (sharded multi-resolution Draco meshes, LODs meshed from downsampled
  labels, smoothed and decimated with pyfqmr) but ``num_lods`` (gpumesh's LOD count), on a
  z, y, x zarr copy of the volume made before the clock starts, N local Dask workers (one per
  core), under its own Python (``--mnb-python``); its output checked and counted like
  igneous's.

Wall time and peak RSS of each child are measured here: wall with ``time.perf_counter``
around spawn-to-reap, peak RSS from ``os.wait4(pid, 0)``, whose rusage is exactly that
child's (``ru_maxrss``: the largest resident set of the child or of any descendant it
waited for, not a sum).  gpumesh's workers are not the CLI process's children (its worker
server forks them, ``gpumesh.workerserver``), so its peak RSS is the larger of that figure and
its summary's, where every worker reports its own.  Because gpumesh may run worker
processes, the sum of the resident sets of the child's whole process tree is also sampled
from /proc (``tree RSS``).  On a GPU
machine the device memory in use (NVML or ``nvidia-smi``: every process's CUDA context and
allocations) is sampled during gpumesh's run too, and its peak printed (``gpu_peak_mb``).

Results are printed as a table and written to
``bench/results/main-<UTC timestamp>-<hostname>.json``.  See bench/README.md.

The same file is also the peer workers' entry point (hidden ``--_worker zmesh|serra|igneous``;
the igneous worker needs only the standard library and igneous; mesh-n-bone runs as its own
command).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import hashlib
import importlib.metadata
import itertools
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

REPO_ROOT = Path(__file__).resolve().parent.parent
# the benchmarks that import gpumesh run this checkout's, which the result JSON names (git_info),
# not whichever the Python has installed: an editable install of another clone ran that clone's
# code under this one's commit
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(1, str(REPO_ROOT))
# GPUMESH_DATA: a folder holding connectomics.zarr, where ../shared/data is not beside the
# checkout (a lent GPU machine, see bench/device/)
DEFAULT_SOURCE = Path(os.environ.get("GPUMESH_DATA", REPO_ROOT / ".." / "shared" / "data")) / "connectomics.zarr"
DEFAULT_RESULTS_DIR = REPO_ROOT / "bench" / "results"
RESULTS_PATH = "bench/results/"   # (in the checkout) what the benchmarks write: no change to the code
MNB = "mesh-n-bone"   # janelia-cellmap/mesh-n-bone: its name in TOOLS, --skip and the table
TOOLS = ("gpumesh", "zmesh", "serra", "igneous", MNB)

# igneous' MeshTask defaults (seung-lab/igneous, igneous/tasks/mesh/mesh.py):
#   'simplification_factor': 100, 'max_simplification_error': 40  (nm, physical units)
# passed to zmesh as mesher.get(obj_id, reduction_factor=..., max_error=..., ...).
IGNEOUS_REDUCTION_FACTOR = 100
IGNEOUS_MAX_ERROR_NM = 40.0
# igneous' CLI defaults (igneous_cli/cli.py): `igneous mesh forge --shape 448,448,448`,
# `igneous mesh merge-sharded --max-labels-per-shard 1000` (its --nlod default is 1; the
# benchmark asks for gpumesh's default LOD count instead, see --igneous-nlod)
IGNEOUS_FORGE_SHAPE = (448, 448, 448)
IGNEOUS_MAX_LABELS_PER_SHARD = 1000
IGNEOUS_NLOD = 2  # extra LODs: with LOD 0, gpumesh's default of 3 (MeshOptions.max_lods)
#: the packages whose versions the igneous worker records (in its own environment)
IGNEOUS_PACKAGES = ("igneous-pipeline", "cloud-volume", "zmesh", "DracoPy", "pyfqmr",
                    "task-queue", "numpy")

PACKAGES = (
    "numpy",
    "numba",
    "meshoptimizer",
    "DracoPy",
    "tensorstore",
    "zmesh",
    "serra-mesh",
    "gpumesh-ng",
    "cupy-cuda12x",
    "cupy-cuda13x",
    "scipy",   # not a dependency: where installed, numba imports its BLAS in every process (start-up)
)


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _parse_voxel_size(text: str) -> tuple[float, float, float]:
    parts = [p for p in text.replace("x", ",").split(",") if p.strip()]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"voxel size needs 3 numbers, got {text!r}")
    return tuple(float(p) for p in parts)  # type: ignore[return-value]


def _fmt_num(v: float | int | None, nd: int = 2) -> str:
    if v is None:
        return "?"
    if isinstance(v, int):
        return str(v)
    return f"{v:.{nd}f}"


def _fmt_count(v: int | float | None) -> str:
    if v is None:
        return "?"
    v = float(v)
    for div, suf in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.2f}{suf}"
    return f"{int(v)}"


def _vm_hwm_mb() -> float | None:
    """This process' peak resident set so far (VmHWM), MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


# --------------------------------------------------------------------------------------------
# Volume loading (peer workers)
# --------------------------------------------------------------------------------------------


def load_volume(source: Path):
    """Read the whole label volume as a numpy array indexed [x, y, z] (C order)."""
    import numpy as np

    if source.suffix == ".npy":
        return np.load(source)
    import tensorstore as ts

    last_err: Exception | None = None
    for driver in ("zarr3", "zarr", "n5", "neuroglancer_precomputed"):
        try:
            store = ts.open(
                {"driver": driver, "kvstore": {"driver": "file", "path": str(source)}},
                read=True,
            ).result()
            break
        except Exception as e:  # noqa: BLE001 - try the next format
            last_err = e
    else:
        raise RuntimeError(f"cannot open {source} with tensorstore: {last_err}")
    labels = tuple(store.domain.labels)
    if store.rank == 4:  # neuroglancer precomputed: x, y, z, channel
        store = store[..., 0]
        labels = labels[:3]
    arr = store.read().result()
    if labels == ("z", "y", "x"):
        arr = np.ascontiguousarray(arr.transpose(2, 1, 0))
    if arr.dtype.kind == "i":
        arr = arr.view(np.dtype(f"u{arr.dtype.itemsize}"))
    return arr


# --------------------------------------------------------------------------------------------
# Peer workers (run in a child process)
# --------------------------------------------------------------------------------------------


def _get_every_segment(tag: str, mesher, args: argparse.Namespace, res: dict[str, Any],
                       raw_kwargs: dict[str, Any]) -> dict[str, Any]:
    """A peer's ``get()`` of every segment after its ``mesh()``, as igneous does; totals and times.

    ``raw_kwargs``: the peer's arguments for an unsimplified ``get`` (besides ``normals`` and
    ``reduction_factor=0``).  Each segment's state is erased after its gets, as igneous does.
    """
    raw, simp = not args.no_raw_count, not args.no_peer_simplify
    R, E = args.reduction_factor, args.max_error
    ids = [int(i) for i in mesher.ids()]
    extract_s = simplify_get_s = 0.0
    raw_tri = raw_vert = simp_tri = simp_vert = 0
    for n, label in enumerate(ids):
        if raw:
            t0 = time.perf_counter()
            m = mesher.get(label, normals=False, reduction_factor=0, **raw_kwargs)
            extract_s += time.perf_counter() - t0
            raw_tri += int(m.faces.shape[0])
            raw_vert += int(m.vertices.shape[0])
            del m
        if simp:
            t0 = time.perf_counter()
            m = mesher.get(label, normals=False, reduction_factor=R, max_error=E)
            simplify_get_s += time.perf_counter() - t0
            simp_tri += int(m.faces.shape[0])
            simp_vert += int(m.vertices.shape[0])
            del m
        mesher.erase(label)  # frees that segment's marching-cubes state
        if (n + 1) % 500 == 0:
            _log(f"[{tag}] {n + 1}/{len(ids)} segments")
    out: dict[str, Any] = {
        "segments": len(ids),
        "extract_s": extract_s if raw else None,
        "simplify_get_s": simplify_get_s if simp else None,
        "triangles_raw": raw_tri if raw else None,
        "vertices_raw": raw_vert if raw else None,
        "triangles_simplified": simp_tri if simp else None,
        "vertices_simplified": simp_vert if simp else None,
        # "marching cubes": mesh() plus turning each segment's surface into an indexed mesh
        "marching_cubes_s": res["mesh_s"] + (extract_s if raw else 0.0),
        # a simplified get() re-extracts the segment, then simplifies: subtract the plain
        # extraction to estimate the simplification proper
        "simplification_s": (simplify_get_s - extract_s) if (raw and simp) else None,
    }
    # igneous-equivalent pipeline: load + mesh() + simplified get() of every segment
    # (without simplification: load + mesh() + unsimplified get())
    out["pipeline_s"] = res["load_s"] + res["mesh_s"] + (simplify_get_s if simp else extract_s)
    return out


def worker_zmesh(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import zmesh

    res: dict[str, Any] = {"tool": "zmesh"}
    t_start = time.perf_counter()
    arr = load_volume(Path(args.source))
    t_read = time.perf_counter()
    res["read_s"] = t_read - t_start
    # zmesh wants x,y,z in Fortran order.  (With close=True it pads into a C-order copy anyway.)
    labels = np.asfortranarray(arr)
    del arr
    res["fortran_copy_s"] = time.perf_counter() - t_read
    res["shape"] = list(labels.shape)
    res["dtype"] = str(labels.dtype)
    t_loaded = time.perf_counter()
    res["load_s"] = t_loaded - t_start
    res["rss_hwm_after_load_mb"] = _vm_hwm_mb()
    _log(f"[zmesh] loaded {labels.shape} {labels.dtype} in {res['load_s']:.2f}s")

    mesher = zmesh.Mesher(tuple(args.voxel_size))
    mesher.mesh(labels, close=True)
    t_meshed = time.perf_counter()
    res["mesh_s"] = t_meshed - t_loaded
    res["rss_hwm_after_mesh_mb"] = _vm_hwm_mb()
    del labels
    _log(f"[zmesh] mesh() {res['mesh_s']:.2f}s, {len(mesher.ids())} segments")

    R, E = args.reduction_factor, args.max_error
    totals = _get_every_segment("zmesh", mesher, args, res, {"max_error": E})
    t_end = time.perf_counter()

    res.update(
        **totals,
        get_loop_s=t_end - t_meshed,
        total_in_process_s=t_end - t_start,
        rss_hwm_end_mb=_vm_hwm_mb(),
        api={
            "constructor": f"zmesh.Mesher({tuple(args.voxel_size)})",
            "mesh": "mesher.mesh(np.asfortranarray(labels_xyz), close=True)",
            "raw": "mesher.get(label, normals=False, reduction_factor=0, max_error=E)",
            "simplified": f"mesher.get(label, normals=False, reduction_factor={R}, max_error={E})",
            "after_each": "mesher.erase(label)",
        },
    )
    return res


def worker_serra(args: argparse.Namespace) -> dict[str, Any]:
    import serra_mesh

    res: dict[str, Any] = {"tool": "serra"}
    t_start = time.perf_counter()
    labels = load_volume(Path(args.source))  # [x, y, z], C order: serra takes either order
    res["read_s"] = time.perf_counter() - t_start
    res["shape"] = list(labels.shape)
    res["dtype"] = str(labels.dtype)
    t_loaded = time.perf_counter()
    res["load_s"] = t_loaded - t_start
    res["rss_hwm_after_load_mb"] = _vm_hwm_mb()
    _log(f"[serra] loaded {labels.shape} {labels.dtype} in {res['load_s']:.2f}s")

    mesher = serra_mesh.Mesher(
        voxel_resolution=list(args.voxel_size), axis_order="XYZ", threads=args.serra_threads
    )
    res["threads"] = int(mesher.effective_threads)
    mesher.mesh(labels, close=True)
    t_meshed = time.perf_counter()
    res["mesh_s"] = t_meshed - t_loaded
    res["rss_hwm_after_mesh_mb"] = _vm_hwm_mb()
    del labels
    _log(f"[serra] mesh() {res['mesh_s']:.2f}s on {res['threads']} threads, {len(mesher.ids())} segments")

    R, E = args.reduction_factor, args.max_error
    totals = _get_every_segment("serra", mesher, args, res, {})
    t_end = time.perf_counter()

    res.update(
        **totals,
        get_loop_s=t_end - t_meshed,
        total_in_process_s=t_end - t_start,
        rss_hwm_end_mb=_vm_hwm_mb(),
        api={
            "constructor": (
                f"serra_mesh.Mesher(voxel_resolution={list(args.voxel_size)}, axis_order='XYZ', "
                f"threads={args.serra_threads})"
            ),
            "mesh": "mesher.mesh(labels_xyz, close=True)",
            "raw": "mesher.get(label, normals=False, reduction_factor=0)",
            "simplified": f"mesher.get(label, normals=False, reduction_factor={R}, max_error={E})",
            "after_each": "mesher.erase(label)",
        },
    )
    return res


def worker_igneous(args: argparse.Namespace) -> dict[str, Any]:
    """igneous's sharded multi-resolution meshing of ``args.igneous_layer`` (runs under the
    igneous Python; stdlib + igneous only)."""
    import igneous.task_creation as tc
    from taskqueue import LocalTaskQueue

    layer = "file://" + str(Path(args.igneous_layer).resolve())
    shape = tuple(int(v) for v in args.igneous_shape.split(","))
    res: dict[str, Any] = {"tool": "igneous", "processes": args.igneous_workers}
    tq = LocalTaskQueue(parallel=args.igneous_workers, progress=False)
    t0 = time.perf_counter()
    # igneous mesh forge PATH --sharded (defaults: simplification on, max error 40 nm,
    # spatial index, closed dataset edges)
    res["forge_tasks"] = tq.insert(tc.create_meshing_tasks(
        layer, mip=0, shape=shape, simplification=True,
        max_simplification_error=args.max_error, sharded=True, spatial_index=True,
        progress=False))
    tq.execute(progress=False)
    t1 = time.perf_counter()
    res["forge_s"] = t1 - t0
    _log(f"[igneous] forge: {res['forge_tasks']} tasks in {res['forge_s']:.2f}s")
    # igneous mesh merge-sharded PATH --nlod N
    res["merge_tasks"] = tq.insert(tc.create_sharded_multires_mesh_tasks(
        layer, num_lod=args.igneous_nlod, max_labels_per_shard=IGNEOUS_MAX_LABELS_PER_SHARD,
        progress=False))
    tq.execute(progress=False)
    t2 = time.perf_counter()
    res["merge_s"] = t2 - t1
    res["pipeline_s"] = t2 - t0
    _log(f"[igneous] merge-sharded: {res['merge_tasks']} tasks in {res['merge_s']:.2f}s")
    info = json.loads((Path(args.igneous_layer) / "info").read_text())
    res["mesh_dir"] = str(Path(args.igneous_layer) / info["mesh"])
    res["igneous_packages"] = package_versions(IGNEOUS_PACKAGES)
    res["api"] = {
        "forge": f"create_meshing_tasks(layer, mip=0, shape={shape}, simplification=True, "
                 f"max_simplification_error={args.max_error}, sharded=True, spatial_index=True)",
        "merge": f"create_sharded_multires_mesh_tasks(layer, num_lod={args.igneous_nlod}, "
                 f"max_labels_per_shard={IGNEOUS_MAX_LABELS_PER_SHARD})",
        "queue": f"LocalTaskQueue(parallel={args.igneous_workers})",
    }
    return res


def run_worker(args: argparse.Namespace) -> int:
    fn = {"zmesh": worker_zmesh, "serra": worker_serra, "igneous": worker_igneous}[args._worker]
    res = fn(args)
    Path(args._result).write_text(json.dumps(res, indent=2))
    return 0


# --------------------------------------------------------------------------------------------
# Child-process measurement (parent side)
# --------------------------------------------------------------------------------------------


def _proc_tree_rss_bytes(root: int) -> int:
    """Sum of the resident sets of ``root`` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        rest = stat[stat.rfind(b")") + 2 :].split()
        try:
            ppid = int(rest[1])
        except (IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    page = os.sysconf("SC_PAGE_SIZE")
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * page
        except (OSError, IndexError, ValueError):
            pass
        stack.extend(children.get(pid, ()))
    return total


class _PeakSampler(threading.Thread):
    """Calls ``read()`` every ``interval`` seconds until stopped and keeps the largest value
    (best effort: a failing read is skipped)."""

    def __init__(self, read: Callable[[], int], interval: float):
        super().__init__(daemon=True)
        self.read, self.interval = read, interval
        self.peak = 0
        self.samples = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.peak = max(self.peak, int(self.read()))
                self.samples += 1
            except Exception:  # noqa: BLE001 - sampling is best effort
                pass
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def gpu_memory_reader() -> Callable[[], int] | None:
    """Bytes of device memory in use on the first visible GPU, as the driver counts them
    (every process's CUDA context and allocations): through NVML (``pynvml``, from
    nvidia-ml-py) when it imports, else ``nvidia-smi``; None without a GPU."""
    index = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0].strip() or "0"
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = (pynvml.nvmlDeviceGetHandleByIndex(int(index)) if index.isdigit()
                  else pynvml.nvmlDeviceGetHandleByUUID(index))
        pynvml.nvmlDeviceGetMemoryInfo(handle)
        return lambda: int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
    except Exception:  # noqa: BLE001 - no NVML: try nvidia-smi
        pass
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    cmd = [smi, "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", index]

    def read() -> int:  # MiB
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return int(out.stdout.split()[0]) << 20

    try:
        read()
    except Exception:  # noqa: BLE001 - nvidia-smi present but no usable GPU
        return None
    return read


@functools.lru_cache(maxsize=None)
def _gpu_reader() -> Callable[[], int] | None:
    return gpu_memory_reader()


def run_child(
    cmd: list[str],
    log_path: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float | None = None,
    sample_interval: float = 0.25,
    gpu_reader: Callable[[], int] | None = None,
) -> dict[str, Any]:
    """Run ``cmd``; return wall time, exact-child rusage (os.wait4), sampled tree RSS and,
    with ``gpu_reader`` (see :func:`gpu_memory_reader`), the device memory in use before the
    run and its sampled peak during it."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        log.write(("$ " + shlex.join(cmd) + "\n").encode())
        log.flush()
        gpu_before = None
        if gpu_reader:
            try:
                gpu_before = int(gpu_reader())
            except Exception:  # noqa: BLE001 - best effort, like the samples
                pass
        t0 = time.perf_counter()
        # Own session, so a timeout or Ctrl-C can end the child's whole process group.
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )
        sampler = _PeakSampler(lambda: _proc_tree_rss_bytes(proc.pid), sample_interval)
        sampler.start()
        gpu = _PeakSampler(gpu_reader, sample_interval) if gpu_reader else None
        if gpu:
            gpu.start()
        timed_out = threading.Event()

        def _kill_group() -> None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

        def _kill() -> None:
            timed_out.set()
            _kill_group()

        timer = threading.Timer(timeout, _kill) if timeout else None
        if timer:
            timer.start()
        try:
            _, status, ru = os.wait4(proc.pid, 0)
        except KeyboardInterrupt:
            _kill_group()
            os.waitpid(proc.pid, 0)
            proc.returncode = -signal.SIGKILL
            raise
        finally:
            wall = time.perf_counter() - t0
            if timer:
                timer.cancel()
            sampler.stop()
            if gpu:
                gpu.stop()
    rc = os.waitstatus_to_exitcode(status)
    proc.returncode = rc  # reaped by wait4; keep Popen from trying again
    return {
        "returncode": rc,
        "timed_out": timed_out.is_set(),
        "wall_s": wall,
        "peak_rss_mb": ru.ru_maxrss / 1024.0,  # Linux: KiB
        "tree_peak_rss_mb": sampler.peak / 2**20 if sampler.samples else None,
        "gpu_before_mb": gpu_before / 2**20 if gpu_before is not None else None,
        "gpu_peak_mb": gpu.peak / 2**20 if gpu and gpu.samples else None,
        "cpu_user_s": ru.ru_utime,
        "cpu_sys_s": ru.ru_stime,
        "log": str(log_path),
    }


def _child_failure(res: dict[str, Any], meas: dict[str, Any]) -> dict[str, Any]:
    """Mark ``res`` failed: the child's exit status (and timeout) and the end of its log."""
    res["error"] = f"exit status {meas['returncode']}" + (" (timed out)" if meas["timed_out"] else "")
    res["log_tail"] = _log_tail(meas["log"])
    return res


def _log_tail(path: str, n: int = 25) -> str:
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def _dir_size(path: Path) -> tuple[int, int]:
    total = files = 0
    if not path.exists():
        return 0, 0
    for root, _, names in os.walk(path):
        for name in names:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
                files += 1
            except OSError:
                pass
    return total, files


# --------------------------------------------------------------------------------------------
# The tools (parent side)
# --------------------------------------------------------------------------------------------


def gpumesh_command() -> tuple[list[str], str]:
    """The gpumesh CLI: the console script next to sys.executable, else the module."""
    exe = Path(sys.executable).parent / "gpumesh"
    if exe.exists() and os.access(exe, os.X_OK):
        return [str(exe)], str(exe)
    # Works whether or not gpumesh/cli.py has an ``if __name__ == "__main__"`` guard.
    tramp = "import sys; from gpumesh.cli import main; sys.exit(main())"
    return [sys.executable, "-c", tramp], f"{sys.executable} -c 'from gpumesh.cli import main'"


def variant_name(extra: str) -> str:
    """The table's row name of a ``--gpumesh-variant``."""
    return f"gpumesh {extra}"


def run_gpumesh(args: argparse.Namespace, out_dir: Path, rep: int, variant: int = 0) -> dict[str, Any]:
    """One run of the gpumesh CLI; ``variant`` ``i > 0``: with ``args.gpumesh_variant[i - 1]``."""
    base, how = gpumesh_command()
    tag = "gpumesh" if variant == 0 else f"gpumesh-v{variant}"
    dest = out_dir / f"{tag}-out"
    summary_path = out_dir / f"{tag}-summary-{rep}.json"
    summary_path.unlink(missing_ok=True)
    vs = ",".join(f"{v:g}" for v in args.voxel_size)
    cmd = base + [
        "mesh",
        str(args.source),
        str(dest),
        "--voxel-size",
        vs,
        "--overwrite",
        "--summary-json",
        str(summary_path),
    ]
    extra = shlex.split(args.gpumesh_variant[variant - 1]) if variant else []
    if args.workers is not None and "--scheduler" not in extra:   # a cluster's workers run the tasks
        cmd += ["--workers", str(args.workers)]
    if args.quality is not None:
        cmd += ["--quality", args.quality]
    if args.gpumesh_args:
        cmd += shlex.split(args.gpumesh_args)
    cmd += extra
    env = dict(os.environ)
    if not Path(base[0]).name.startswith("gpumesh"):
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
    name = "gpumesh" if variant == 0 else variant_name(args.gpumesh_variant[variant - 1])
    _log(f"[{name}] run {rep + 1}: {shlex.join(cmd)}")
    meas = run_child(cmd, out_dir / "logs" / f"{tag}-{rep}.log", env=env, timeout=args.timeout,
                     gpu_reader=_gpu_reader())
    res: dict[str, Any] = {"tool": name, "command": cmd, "invoked_as": how, **meas}

    summary: dict[str, Any] | None = None
    if summary_path.exists():
        try:
            summary = json.loads(summary_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            res["summary_error"] = f"unreadable summary JSON: {e}"
    else:
        res["summary_error"] = "no summary JSON written"
    res["summary"] = summary
    s = summary if isinstance(summary, dict) else {}
    res["segments"] = s.get("segments")
    tpl = s.get("triangles_per_lod")
    res["triangles_per_lod"] = list(tpl) if isinstance(tpl, (list, tuple)) else None
    res["bytes"] = s.get("bytes")
    res["summary_seconds"] = s.get("seconds")
    res["summary_peak_rss_mb"] = s.get("peak_rss_mb")
    # gpumesh's workers are forked by its worker server (gpumesh.workerserver), which the CLI
    # waits for at the end, so wait4's figures cover them; the summary's peak is the largest of
    # the CLI process and every worker (each reports its own), a floor where that wait is missing
    if isinstance(res["summary_peak_rss_mb"], (int, float)) and isinstance(res.get("peak_rss_mb"), (int, float)):
        res["peak_rss_mb"] = max(res["peak_rss_mb"], float(res["summary_peak_rss_mb"]))
    res["summary_device"] = s.get("device")
    missing = [
        k
        for k in ("segments", "triangles_per_lod", "bytes", "seconds", "peak_rss_mb")
        if k not in s
    ]
    if summary is not None and missing:
        res["summary_missing_keys"] = missing
    res["dest_bytes_on_disk"], res["dest_files"] = _dir_size(dest)
    if meas["returncode"] != 0:
        _child_failure(res, meas)
    return res


def run_peer(tool: str, args: argparse.Namespace, out_dir: Path, rep: int) -> dict[str, Any]:
    result_path = out_dir / f"{tool}-result-{rep}.json"
    result_path.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--_worker",
        tool,
        "--_result",
        str(result_path),
        "--source",
        str(args.source),
        "--voxel-size",
        ",".join(f"{v:g}" for v in args.voxel_size),
        "--reduction-factor",
        str(args.reduction_factor),
        "--max-error",
        str(args.max_error),
        "--serra-threads",
        str(args.serra_threads),
    ]
    if args.no_raw_count:
        cmd.append("--no-raw-count")
    if args.no_peer_simplify:
        cmd.append("--no-peer-simplify")
    _log(f"[{tool}] run {rep + 1}")
    meas = run_child(cmd, out_dir / "logs" / f"{tool}-{rep}.log", timeout=args.timeout)
    res: dict[str, Any] = {"tool": tool, **meas}
    if result_path.exists():
        try:
            worker = json.loads(result_path.read_text())
            res.update({k: v for k, v in worker.items() if k != "tool"})
        except (OSError, json.JSONDecodeError) as e:
            res["error"] = f"unreadable worker result: {e}"
    if meas["returncode"] != 0 or not result_path.exists():
        _child_failure(res, meas)
    return res


def _does_not_import(python: str, modules: str, tool: str) -> str | None:
    """Why ``import MODULES`` fails under ``python`` (for the peer ``tool``), or None when it works."""
    try:
        r = subprocess.run([python, "-c", f"import {modules}"], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as e:
        return f"cannot run {python}: {e}"
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        return f"{tool} does not import under {python} ({last}); see bench/README.md"
    return None


def igneous_unavailable(python: str) -> str | None:
    """Why igneous cannot run under ``python``, or None when it can."""
    return _does_not_import(python, "igneous.task_creation, taskqueue", "igneous")


#: how the volume is stored for igneous (precomputed segmentation layer)
IGNEOUS_SOURCE_FORMAT = {"encoding": "raw", "chunk_size": [64, 64, 64]}


def prepare_igneous_source(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """The volume as a precomputed segmentation layer (:data:`IGNEOUS_SOURCE_FORMAT`) for
    igneous, written once with tensorstore before any clock starts; returns its ``layer``
    path, the ``seconds`` it took and its format."""
    import numpy as np
    import tensorstore as ts

    t0 = time.perf_counter()
    layer = out_dir / "igneous-source"
    arr = load_volume(Path(args.source))
    store = ts.open({
        "driver": "neuroglancer_precomputed",
        "kvstore": {"driver": "file", "path": str(layer)},
        "multiscale_metadata": {"type": "segmentation", "data_type": str(arr.dtype),
                                "num_channels": 1},
        "scale_metadata": {"size": list(arr.shape), "resolution": list(args.voxel_size),
                           **IGNEOUS_SOURCE_FORMAT},
    }, create=True, delete_existing=True).result()
    store[..., 0].write(np.ascontiguousarray(arr)).result()
    return {"layer": str(layer), "seconds": time.perf_counter() - t0, **IGNEOUS_SOURCE_FORMAT}


def _fresh_igneous_layer(source_layer: Path, out_dir: Path, rep: int) -> Path:
    """A layer for one igneous run: its own info (igneous adds its mesh entry there), the
    source's chunks linked, no meshes."""
    layer = out_dir / f"igneous-{rep}"
    shutil.rmtree(layer, ignore_errors=True)
    layer.mkdir(parents=True)
    shutil.copy(source_layer / "info", layer / "info")
    for scale in json.loads((source_layer / "info").read_text())["scales"]:
        (layer / scale["key"]).symlink_to((source_layer / scale["key"]).resolve())
    return layer


def _validated(res: dict[str, Any], mesh_dir: Path) -> dict[str, Any]:
    """``res`` with a peer's output counted and checked by ``gpumesh.validate``: its segments,
    triangles and bytes per LOD, and its violations of the spec and the client's rules."""
    try:
        from gpumesh.validate import validate

        report = validate(str(mesh_dir))
        res["segments"] = int(report.num_segments)
        res["triangles_per_lod"] = [int(s["triangles"]) for s in report.per_lod]
        res["bytes_per_lod"] = [int(s["bytes"]) for s in report.per_lod]
        res["validate_errors"] = int(report.num_errors)
        res["validate_first_errors"] = list(report.errors[:5])
    except Exception as e:  # noqa: BLE001 - the timing stands without the check
        res["validate_error"] = f"{type(e).__name__}: {e}"
    return res


def run_igneous(args: argparse.Namespace, out_dir: Path, rep: int,
                source_layer: Path) -> dict[str, Any]:
    layer = _fresh_igneous_layer(source_layer, out_dir, rep)
    result_path = out_dir / f"igneous-result-{rep}.json"
    result_path.unlink(missing_ok=True)
    cmd = [args.igneous_python, str(Path(__file__).resolve()), "--_worker", "igneous",
           "--_result", str(result_path), "--igneous-layer", str(layer),
           "--igneous-workers", str(args.igneous_workers), "--igneous-shape", args.igneous_shape,
           "--igneous-nlod", str(args.igneous_nlod), "--max-error", str(args.max_error)]
    _log(f"[igneous] run {rep + 1}: {args.igneous_workers} processes")
    meas = run_child(cmd, out_dir / "logs" / f"igneous-{rep}.log", timeout=args.timeout)
    res: dict[str, Any] = {"tool": "igneous", "command": cmd, **meas}
    if meas["returncode"] != 0 or not result_path.exists():
        return _child_failure(res, meas)
    res.update({k: v for k, v in json.loads(result_path.read_text()).items() if k != "tool"})
    mesh_dir = Path(res["mesh_dir"])
    res["dest_bytes_on_disk"], res["dest_files"] = _dir_size(mesh_dir)
    # igneous leaves its forge fragments (*.frags) and label lists beside the shards
    res["bytes"] = sum(p.stat().st_size for p in mesh_dir.glob("*.shard"))
    return _validated(res, mesh_dir)


# --------------------------------------------------------------------------------------------
# mesh-n-bone (janelia-cellmap/mesh-n-bone): its own CLI, under its own Python
# --------------------------------------------------------------------------------------------

#: the packages whose versions are recorded from mesh-n-bone's environment
MNB_PACKAGES = ("mesh-n-bone", "zmesh", "pyfqmr", "DracoPy", "pymeshlab", "trimesh", "dask",
                "worldarray", "tensorstore", "numpy")
#: mesh-n-bone's local Dask configuration as its examples give it
#: (examples/meshify-config/dask-config.yaml), but for the worker memory thresholds: ``false``
#: (off) where the example has ``0.0``, which dask 2025.5.1 (its pin) takes as 0 % and restarts
#: every worker at once.  No ``memory`` key: with one, mesh-n-bone sizes its blocks from it
#: (``memory / 6``), and a 512³ volume becomes a single block on one worker.
MNB_DASK_CONFIG = """\
jobqueue:
  local:
    ncpus: 1
    processes: 1
    cores: 1
    log-directory: job-logs
    name: dask-worker
distributed:
  scheduler:
    work-stealing: true
  worker:
    memory:
      target: false
      spill: false
      pause: false
      terminate: false
"""


def mnb_unavailable(python: str) -> str | None:
    """Why mesh-n-bone cannot run under ``python``, or None when it can."""
    if not Path(python).with_name(MNB).exists():
        return f"no {MNB} command beside {python}; see bench/README.md"
    return _does_not_import(python, "mesh_n_bone.meshify.meshify", MNB)


def mnb_packages(python: str) -> dict[str, str | None]:
    """:data:`MNB_PACKAGES`' versions in mesh-n-bone's environment (:func:`package_versions`
    run there: this file imports only the standard library at its top)."""
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); "
            "from bench_main import MNB_PACKAGES, package_versions; print(json.dumps(package_versions(MNB_PACKAGES)))")
    r = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300)
    return json.loads(r.stdout) if r.returncode == 0 else {"error": r.stderr.strip()[-300:]}


def prepare_mnb_source(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """The volume as mesh-n-bone reads it (worldarray takes every array as z, y, x): a zarr v3
    copy in z, y, x order, 128³ chunks (the source's), zstd, written once with tensorstore
    before any clock starts (its voxel size is given in the run configuration).  Returns its
    ``path``, the ``seconds`` it took and its format."""
    import numpy as np
    import tensorstore as ts

    t0 = time.perf_counter()
    path = out_dir / "mnb-source.zarr"
    zyx = np.ascontiguousarray(load_volume(Path(args.source)).transpose(2, 1, 0))
    chunk = [min(128, s) for s in zyx.shape]
    store = ts.open({
        "driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)},
        "metadata": {"shape": list(zyx.shape), "data_type": str(zyx.dtype),
                     "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunk}},
                     "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                                {"name": "zstd", "configuration": {"level": 9}}],
                     "dimension_names": ["z", "y", "x"]},
    }, create=True, delete_existing=True).result()
    store.write(zyx).result()
    return {"path": str(path), "seconds": time.perf_counter() - t0, "axes": "zyx", "chunk_shape": chunk,
            "codec": "zstd"}


def run_mnb(args: argparse.Namespace, out_dir: Path, rep: int, source: Path) -> dict[str, Any]:
    """One ``mesh-n-bone meshify CONFIG -n WORKERS`` run: its defaults (multi-resolution,
    sharded, LODs meshed from downsampled labels), ``num_lods`` as gpumesh's default, the
    voxel size z, y, x; its output checked and counted with ``gpumesh.validate``."""
    cfg = out_dir / f"mnb-config-{rep}"
    dest = out_dir / f"mnb-{rep}"
    for p in (cfg, dest):
        shutil.rmtree(p, ignore_errors=True)
    for p in out_dir.glob(f"mnb-config-{rep}-*"):   # its execution directories of earlier runs
        shutil.rmtree(p, ignore_errors=True)
    cfg.mkdir(parents=True)
    vs = ", ".join(f"{v:g}" for v in reversed(args.voxel_size))
    (cfg / "run-config.yaml").write_text(
        f"input_path: {source}\noutput_directory: {dest}\nnum_lods: {args.mnb_nlod}\nvoxel_size_nm: [{vs}]\n")
    (cfg / "dask-config.yaml").write_text(MNB_DASK_CONFIG)
    cmd = [str(Path(args.mnb_python).with_name(MNB)), "meshify", str(cfg), "-n", str(args.mnb_workers)]
    _log(f"[{MNB}] run {rep + 1}: {args.mnb_workers} workers")
    meas = run_child(cmd, out_dir / "logs" / f"mnb-{rep}.log", cwd=out_dir, timeout=args.timeout)
    res: dict[str, Any] = {"tool": MNB, "command": cmd, "processes": args.mnb_workers, **meas}
    mesh_dir = dest / "multires"
    if meas["returncode"] != 0 or not (mesh_dir / "info").exists():
        return _child_failure(res, meas)
    res["mesh_dir"] = str(mesh_dir)
    res["dest_bytes_on_disk"], res["dest_files"] = _dir_size(mesh_dir)
    shards = list(mesh_dir.glob("*.shard"))
    res["bytes"] = (sum(p.stat().st_size for p in shards) if shards else
                    sum(p.stat().st_size for p in mesh_dir.iterdir() if p.is_file() and p.name != "info"))
    return _validated(res, mesh_dir)


# --------------------------------------------------------------------------------------------
# Aggregation and report
# --------------------------------------------------------------------------------------------

_MEDIAN_KEYS = (
    "wall_s",
    "peak_rss_mb",
    "tree_peak_rss_mb",
    "cpu_user_s",
    "cpu_sys_s",
    "summary_seconds",
    "summary_peak_rss_mb",
    "gpu_before_mb",
    "gpu_peak_mb",
    "load_s",
    "read_s",
    "fortran_copy_s",
    "mesh_s",
    "extract_s",
    "simplify_get_s",
    "get_loop_s",
    "pipeline_s",
    "marching_cubes_s",
    "simplification_s",
    "total_in_process_s",
    "rss_hwm_after_load_mb",
    "rss_hwm_after_mesh_mb",
    "rss_hwm_end_mb",
    "forge_s",
    "merge_s",
)
_COUNT_KEYS = (
    "segments",
    "triangles_per_lod",
    "bytes",
    "dest_bytes_on_disk",
    "dest_files",
    "triangles_raw",
    "vertices_raw",
    "triangles_simplified",
    "vertices_simplified",
    "threads",
    "shape",
    "processes",
    "bytes_per_lod",
    "validate_errors",
)


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if "error" not in r]
    agg: dict[str, Any] = {"runs_ok": len(ok), "runs_total": len(runs)}
    if not ok:
        agg["error"] = runs[-1].get("error") if runs else "not run"
        if runs:  # still report what was measured on the failed run
            for k in ("wall_s", "peak_rss_mb", "tree_peak_rss_mb", "returncode", "timed_out", "log"):
                agg[f"failed_run_{k}"] = runs[-1].get(k)
        return agg
    for k in _MEDIAN_KEYS:
        vals = [r[k] for r in ok if isinstance(r.get(k), (int, float))]
        if vals:
            agg[k] = statistics.median(vals)
    for k in _COUNT_KEYS:
        vals = [r.get(k) for r in ok if r.get(k) is not None]
        if vals:
            agg[k] = vals[0]
            if any(v != vals[0] for v in vals[1:]):
                agg.setdefault("inconsistent_across_runs", []).append(k)
    for k in ("api", "summary_missing_keys", "summary_device", "invoked_as", "igneous_packages",
              "validate_first_errors"):
        if ok[-1].get(k) is not None:
            agg[k] = ok[-1][k]
    return agg


def ratio_at_least(a: dict[str, Any], g_wall: float | None) -> float | None:
    """For a peer whose every run was stopped at ``--timeout``: its wall time when stopped over
    gpumesh's, a lower bound of the ratio; ``None`` for any other peer."""
    if "error" in a and a.get("failed_run_timed_out") and a.get("failed_run_wall_s") and g_wall:
        return a["failed_run_wall_s"] / g_wall
    return None


def _triangles_cell(tool: str, a: dict[str, Any]) -> str:
    if tool in ("gpumesh", "igneous", MNB) or tool.startswith("gpumesh "):
        tpl = a.get("triangles_per_lod")
        if not tpl:
            return "?"
        return "LOD " + " / ".join(_fmt_count(t) for t in tpl)
    raw, simp = a.get("triangles_raw"), a.get("triangles_simplified")
    simp_txt = _fmt_count(simp) if simp is not None else "(not simplified)"
    return f"{_fmt_count(raw)} -> {simp_txt}"


def _cpu_s(a: dict[str, Any]) -> float | None:
    u, s_ = a.get("cpu_user_s"), a.get("cpu_sys_s")
    return u + s_ if u is not None and s_ is not None else None


def print_table(aggs: dict[str, dict[str, Any]]) -> None:
    g = aggs.get("gpumesh", {})
    g_wall = g.get("wall_s") if "error" not in g else None
    header = ["tool", "wall s", "cpu s", "peak RSS MB", "tree RSS MB", "triangles", "x gpumesh"]
    rows = []
    for tool, a in aggs.items():
        if "error" in a:
            at_least = ratio_at_least(a, g_wall)
            rows.append(
                [
                    tool,
                    _fmt_num(a.get("failed_run_wall_s")),
                    "",
                    _fmt_num(a.get("failed_run_peak_rss_mb"), 0),
                    _fmt_num(a.get("failed_run_tree_peak_rss_mb"), 0),
                    f"FAILED: {a['error']}",
                    f"> {at_least:.2f}" if at_least is not None else "n/a",
                ]
            )
            continue
        ratio = (
            f"{a['wall_s'] / g_wall:.2f}"
            if g_wall and a.get("wall_s") is not None
            else "n/a"
        )
        rows.append(
            [
                tool,
                _fmt_num(a.get("wall_s")),
                _fmt_num(_cpu_s(a)),
                _fmt_num(a.get("peak_rss_mb"), 0),
                _fmt_num(a.get("tree_peak_rss_mb"), 0),
                _triangles_cell(tool, a),
                ratio,
            ]
        )
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = " | ".join(h.ljust(w) for h, w in zip(header, widths))
    print(line)
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths)))
    print()
    print(
        "cpu s = user + system CPU time of the child and its waited-for descendants. "
        "triangles: gpumesh, igneous and mesh-n-bone per LOD (finest first); zmesh and serra "
        "unsimplified -> simplified. "
        "x gpumesh = the row's wall / gpumesh's wall (> : the peer was stopped at --timeout)."
    )
    # Details under the table.
    for tool, a in aggs.items():   # gpumesh, and each --gpumesh-variant
        if not (tool == "gpumesh" or tool.startswith("gpumesh ")) or "error" in a:
            continue
        bits = [f"segments {a.get('segments', '?')}"]
        bits.append(f"summary seconds {_fmt_num(a.get('summary_seconds'))}")
        bits.append(f"summary peak RSS {_fmt_num(a.get('summary_peak_rss_mb'), 0)} MB")
        if a.get("gpu_peak_mb") is not None:
            bits.append(f"peak GPU memory {_fmt_num(a['gpu_peak_mb'], 0)} MB in use on the device "
                        f"(sampled; {_fmt_num(a.get('gpu_before_mb'), 0)} MB before the run)")
        bits.append(
            f"bytes {_fmt_count(a.get('bytes'))} "
            f"(on disk {_fmt_count(a.get('dest_bytes_on_disk'))})"
        )
        if a.get("summary_missing_keys"):
            bits.append(f"summary lacks {','.join(a['summary_missing_keys'])}")
        print(f"{tool}: " + ", ".join(bits))
    a = aggs.get("igneous")
    if a and "error" not in a:
        txt = (f"igneous: {a.get('processes')} processes, forge {_fmt_num(a.get('forge_s'))} s "
               f"+ merge-sharded {_fmt_num(a.get('merge_s'))} s, segments {a.get('segments', '?')}, "
               f"shard bytes {_fmt_count(a.get('bytes'))}")
        if a.get("validate_errors") is not None:
            txt += f", gpumesh validate: {a['validate_errors']} errors"
        print(txt)
    a = aggs.get(MNB)
    if a and "error" not in a:
        txt = (f"{MNB}: {a.get('processes')} Dask workers, segments {a.get('segments', '?')}, "
               f"bytes {_fmt_count(a.get('bytes'))}")
        if a.get("validate_errors") is not None:
            txt += f", gpumesh validate: {a['validate_errors']} errors"
        print(txt)
    for tool in ("zmesh", "serra"):
        a = aggs.get(tool)
        if not a or "error" in a:
            continue
        load = f"load {_fmt_num(a.get('load_s'))} s"
        if a.get("fortran_copy_s") is not None:
            load += (
                f" (read {_fmt_num(a.get('read_s'))} + Fortran copy "
                f"{_fmt_num(a.get('fortran_copy_s'))})"
            )
        txt = (
            f"{tool}: segments {a.get('segments', '?')}, {load}, "
            f"marching cubes {_fmt_num(a.get('marching_cubes_s'))} s "
            f"(mesh() {_fmt_num(a.get('mesh_s'))} + extract {_fmt_num(a.get('extract_s'))}), "
            f"simplification {_fmt_num(a.get('simplification_s'))} s "
            f"(simplified get {_fmt_num(a.get('simplify_get_s'))} - extract), "
            f"pipeline {_fmt_num(a.get('pipeline_s'))} s"
        )
        if tool == "serra" and a.get("threads") is not None:
            txt += f", {a['threads']} threads"
        if g_wall and g.get("summary_seconds") and a.get("pipeline_s"):
            ratio = a["pipeline_s"] / g["summary_seconds"]
            txt += f"; pipeline / gpumesh summary seconds = {ratio:.2f}"
        print(txt)


# --------------------------------------------------------------------------------------------
# Environment record
# --------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 2**20, 2)
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": cpu or platform.processor() or None,
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "memory_gib": mem_gib,
    }


def device_info() -> str:
    """Each GPU that ``nvidia-smi`` lists, with its driver (``NAME (driver V)``), else ``cpu``."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=name,driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            rows = [l.strip().rsplit(",", 1) for l in out.stdout.splitlines() if l.strip()]
            if out.returncode == 0 and rows:
                return ", ".join(f"{r[0].strip()} (driver {r[1].strip()})" if len(r) == 2 else r[0]
                                 for r in rows)
        except (OSError, subprocess.SubprocessError):
            pass
    return "cpu"


#: Written by bench/device/prepare.sh: the commit, then ``git ls-tree -r -z`` of it, for a
#: device machine, which gets the working tree without ``.git``
PREPARED_COMMIT = REPO_ROOT / ".devdata" / "COMMIT"


def prepared_commit(path: Path = PREPARED_COMMIT) -> dict[str, Any] | None:
    """The commit in ``path``, and whether the files here are still that commit's (git's blob
    hash of each file it lists, but those in ``bench/results/``, as :func:`git_info`):
    ``{"commit", "commit_from", "dirty", "changed_files"}``; None without the file."""
    try:
        commit, listing = path.read_text().split("\n", 1)
    except (OSError, ValueError):
        return None
    changed = []
    for entry in filter(None, listing.split("\0")):
        meta, name = entry.split("\t", 1)
        mode, _, blob = meta.split()
        if mode == "160000" or name.startswith(RESULTS_PATH):   # a submodule (no blob here), or a result
            continue
        try:
            p = REPO_ROOT / name
            data = os.fsencode(os.readlink(p)) if mode == "120000" else p.read_bytes()
        except OSError:
            changed.append(name)
            continue
        if hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() != blob:
            changed.append(name)
    return {"commit": commit.strip(), "commit_from": str(path), "dirty": bool(changed),
            "changed_files": changed[:20]}


def git_info() -> dict[str, Any]:
    """The commit and whether the tree differs from it (leaving out ``bench/results/``, where
    the benchmarks write: a second benchmark run from a clean clone was "dirty" by the first's
    result); where git cannot say (no ``.git``: a device machine), :func:`prepared_commit`'s,
    with git's error kept."""
    def _git(*a: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *a], cwd=REPO_ROOT, capture_output=True, text=True)

    info: dict[str, Any] = {"commit": None, "dirty": None}
    try:
        r = _git("rev-parse", "HEAD")
        if r.returncode == 0:
            info["commit"] = r.stdout.strip()
        else:
            info["commit_error"] = r.stderr.strip() or "git rev-parse HEAD failed"
        s = _git("status", "--porcelain", "--", ".", f":(exclude){RESULTS_PATH}")
        if s.returncode == 0:
            info["dirty"] = bool(s.stdout.strip())
    except OSError as e:
        info["commit_error"] = str(e)
    if info["commit"] is None:
        info.update(prepared_commit(PREPARED_COMMIT) or {})
    return info


def environment() -> dict[str, Any]:
    """What every result JSON records of where it ran: machine, git commit, Python, packages,
    and the ``GPUMESH_*`` environment variables that change how gpumesh runs (e.g.
    ``GPUMESH_WELD``, ``GPUMESH_PINNED``), and the ``NUMBA_*`` ones (``NUMBA_CPU_NAME=generic``
    compiles the kernels for any CPU of the architecture, see README)."""
    return {
        "machine": machine_info(),
        "git": git_info(),
        "python": {"version": platform.python_version(), "executable": sys.executable},
        "packages": package_versions(),
        "gpumesh_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("GPUMESH_")},
        "numba_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("NUMBA_")},
    }


def add_result_args(p: argparse.ArgumentParser) -> None:
    """``--results-dir`` and ``--no-save``, which every benchmark takes."""
    p.add_argument("--results-dir", default=str(DEFAULT_RESULTS_DIR), help="where the result JSON goes")
    p.add_argument("--no-save", action="store_true", help="do not write the result JSON")


def mesh_with_cli(source, dest, voxel_size: str, args=(), workers=None, *, checkout: Optional[Path] = None,
                  env: Optional[dict] = None, summary: Optional[Path] = None) -> dict[str, Any]:
    """Run ``gpumesh mesh SOURCE DEST --voxel-size V ARGS --quiet --summary-json FILE`` in a fresh
    process, timed: ``{"command", "wall_s", "summary_seconds", "meshing_s", "writing_s", "bytes",
    "triangles_per_lod", "workers", "peak_rss_mb"}`` (the rest from its summary).

    ``checkout``: the gpumesh source tree to run, first on the path (``python -m gpumesh.cli``,
    from the summary's folder: ``-m`` puts the working directory first on the path, which must
    be no checkout); default this one (:data:`REPO_ROOT`, whose commit the result names; the
    ``gpumesh`` that this Python has installed may be another checkout's).  ``env``: the process's
    environment (default this one's).  ``summary``: where the summary goes (default
    ``DEST.summary.json``; give it where ``dest`` is a URL).  A run that fails raises
    ``RuntimeError`` with its stderr."""
    env = dict(os.environ if env is None else env)
    summary = Path(f"{dest}.summary.json" if summary is None else summary)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(checkout or REPO_ROOT), env.get("PYTHONPATH")]))
    cmd, cwd = [sys.executable, "-m", "gpumesh.cli"], summary.parent
    cmd += ["mesh", str(source), str(dest), "--voxel-size", voxel_size, *args, "--quiet",
            "--summary-json", str(summary), *([] if workers is None else ["--workers", str(workers)])]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    s = json.loads(summary.read_text())
    return {"command": cmd, "wall_s": wall, "summary_seconds": s["seconds"], "meshing_s": s["seconds_meshing"],
            "writing_s": s["seconds_writing"], "bytes": s["bytes"], "triangles_per_lod": s["triangles_per_lod"],
            "workers": s["workers"], "peak_rss_mb": s["peak_rss_mb"]}


def sample_segments(dest: str, n: int, seed: int = 0) -> list[int]:
    """``n`` segment IDs of the mesh directory ``dest`` drawn at random (all if it has fewer), sorted."""
    import numpy as np

    from gpumesh import open_mesh

    ids = sorted(int(s) for s in open_mesh(dest).segment_ids())
    return sorted(np.random.default_rng(seed).choice(ids, min(n, len(ids)), replace=False).tolist())


def source_missing(source) -> bool:
    """``True`` (and a line on stderr) when the benchmark's source volume does not exist."""
    if Path(source).exists():
        return False
    print(f"source not found: {source}", file=sys.stderr)
    return True


def _result_text(record: dict[str, Any]) -> str:
    """A result record as its JSON file holds it."""
    return json.dumps(record, indent=2, default=str) + "\n"


def rewrite_result(record: dict[str, Any], path: Path) -> None:
    """Replace the result file ``path`` (:func:`save_result`'s) with ``record``, atomically: a
    run killed meanwhile (a time limit) leaves the last whole one."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(_result_text(record))
    os.replace(tmp, path)


def save_result(record: dict[str, Any], kind: str, started: _dt.datetime, results_dir) -> Path:
    """Write ``record`` as ``<results_dir>/<kind>-<UTC start>-<hostname>.json``.

    Never over an existing file: a second result of the same kind started in the same second
    (two benchmarks run side by side) gets ``-2``, ``-3``, ... after the hostname.
    """
    res_dir = Path(results_dir)
    res_dir.mkdir(parents=True, exist_ok=True)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    text = _result_text(record)
    for n in itertools.count(1):
        path = res_dir / f"{kind}-{stamp}-{socket.gethostname()}{'' if n == 1 else f'-{n}'}.json"
        try:
            with open(path, "x") as fh:
                fh.write(text)
            return path
        except FileExistsError:
            continue


def package_versions(names=PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution in ``names`` (None where it is missing)."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Benchmark gpumesh against igneous, mesh-n-bone, zmesh and serra-mesh on one label volume.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--source",
        default=None,
        help=f"label volume (zarr/zarr3/n5/precomputed via tensorstore, or .npy); "
        f"default {DEFAULT_SOURCE.resolve()}",
    )
    p.add_argument("--voxel-size", type=_parse_voxel_size, default=(32.0, 32.0, 40.0),
                   help="voxel size in nm, x,y,z")
    p.add_argument("--quality", default=None, help="passed to gpumesh --quality (omitted if unset)")
    p.add_argument("--workers", type=int, default=None,
                   help="passed to gpumesh --workers (omitted if unset)")
    p.add_argument("--gpumesh-args", default="",
                   help="extra arguments appended to the gpumesh command")
    p.add_argument("--gpumesh-variant", action="append", default=[], metavar="ARGS",
                   help="one more gpumesh row, 'gpumesh ARGS': the gpumesh command with ARGS "
                   "appended too, run right after gpumesh in each repeat (repeatable), for "
                   "comparing options in one run")
    p.add_argument("--skip", default="",
                   help="comma-separated tools to skip: gpumesh,zmesh,serra,igneous,mesh-n-bone")
    p.add_argument("--out-dir", default=None,
                   help="where gpumesh writes its output, summaries and logs "
                   "(default: a fresh temp dir under /tmp, removed at the end unless --keep)")
    p.add_argument("--keep", action="store_true", help="keep the temp --out-dir")
    p.add_argument("--repeat", type=int, default=1, help="runs per tool; the median is reported")
    add_result_args(p)
    p.add_argument("--timeout", type=float, default=None,
                   help="kill a tool's run (its process group) after this many seconds")
    p.add_argument("--reduction-factor", type=int, default=IGNEOUS_REDUCTION_FACTOR,
                   help="peers' simplification target (igneous default)")
    p.add_argument("--max-error", type=float, default=IGNEOUS_MAX_ERROR_NM,
                   help="peers' simplification max error, nm (igneous default)")
    p.add_argument("--serra-threads", type=int, default=0, help="serra threads (0 = every core)")
    p.add_argument("--no-raw-count", action="store_true",
                   help="peers: skip the unsimplified get() pass (no raw triangle count, "
                   "no marching-cubes/simplification split)")
    p.add_argument("--no-peer-simplify", action="store_true",
                   help="peers: skip the simplified get() pass (fast; then only the "
                   "unsimplified meshes are timed, which gpumesh does not stop at)")
    p.add_argument("--igneous-python",
                   default=os.environ.get("GPUMESH_IGNEOUS_PYTHON", sys.executable),
                   help="Python of an environment with igneous-pipeline (env "
                   "GPUMESH_IGNEOUS_PYTHON); igneous is skipped, with the reason, when it "
                   "does not import there")
    p.add_argument("--igneous-workers", type=int, default=os.cpu_count() or 1,
                   help="igneous processes (LocalTaskQueue parallel); default one per core")
    p.add_argument("--igneous-shape", default=",".join(map(str, IGNEOUS_FORGE_SHAPE)),
                   help="igneous forge task shape, voxels (igneous default)")
    p.add_argument("--igneous-nlod", type=int, default=IGNEOUS_NLOD,
                   help="igneous merge-sharded extra LODs (default: as many LODs as "
                   "gpumesh's default; igneous's own default is 1)")
    p.add_argument("--mnb-python", default=os.environ.get("GPUMESH_MNB_PYTHON", sys.executable),
                   help="Python of an environment with mesh-n-bone, its mesh-n-bone command beside it "
                   "(env GPUMESH_MNB_PYTHON); mesh-n-bone is skipped, with the reason, when it does "
                   "not import there")
    p.add_argument("--mnb-workers", type=int, default=os.cpu_count() or 1,
                   help="mesh-n-bone's Dask workers (-n), one thread each; default one per core")
    p.add_argument("--mnb-nlod", type=int, default=IGNEOUS_NLOD + 1,
                   help="mesh-n-bone's num_lods (LOD 0 included; default gpumesh's default LOD "
                   "count; its own default is 4)")
    p.add_argument("--igneous-layer", help=argparse.SUPPRESS)
    p.add_argument("--_worker", choices=("zmesh", "serra", "igneous"), help=argparse.SUPPRESS)
    p.add_argument("--_result", help=argparse.SUPPRESS)
    return p


def resolve_source(text: str | None) -> Path:
    if text is None:
        return DEFAULT_SOURCE.resolve()
    p = Path(text).expanduser()
    if p.is_absolute() or p.exists():
        return p.resolve()
    alt = REPO_ROOT / p
    return alt.resolve() if alt.exists() else p.resolve()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args._worker:
        return run_worker(args)

    args.source = resolve_source(args.source)
    if source_missing(args.source):
        return 2
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = skip - set(TOOLS)
    if unknown:
        print(f"--skip: unknown tool(s) {sorted(unknown)}; choose from {TOOLS}", file=sys.stderr)
        return 2
    tools = [t for t in TOOLS if t not in skip]
    variants = {variant_name(v): i + 1 for i, v in enumerate(args.gpumesh_variant)}
    tools[1 if "gpumesh" in tools else 0:0] = list(variants)
    skipped: dict[str, str] = {t: "--skip" for t in sorted(skip)}
    if "igneous" in tools:
        why = igneous_unavailable(args.igneous_python)
        if why:
            _log(f"[igneous] skipped: {why}")
            skipped["igneous"] = why
            tools.remove("igneous")
    if MNB in tools:
        why = mnb_unavailable(args.mnb_python)
        if why:
            _log(f"[{MNB}] skipped: {why}")
            skipped[MNB] = why
            tools.remove(MNB)
    if args.repeat < 1:
        print("--repeat must be >= 1", file=sys.stderr)
        return 2
    if args.no_raw_count and args.no_peer_simplify:
        print("--no-raw-count with --no-peer-simplify leaves the peers nothing to do",
              file=sys.stderr)
        return 2

    own_tmp = args.out_dir is None
    if own_tmp:
        out_dir = Path(tempfile.mkdtemp(prefix="gpumesh-bench-", dir="/tmp"))
    else:
        out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_dir = out_dir.resolve()
    _log(f"source {args.source}; out-dir {out_dir}; tools {tools}; repeat {args.repeat}")

    started = _dt.datetime.now(_dt.timezone.utc)
    load_start = os.getloadavg()
    runs: dict[str, list[dict[str, Any]]] = {t: [] for t in tools}
    igneous_setup: dict[str, Any] = {}
    if "igneous" in tools:
        _log("[igneous] writing a precomputed copy of the volume (not timed)")
        igneous_setup = prepare_igneous_source(args, out_dir)
    mnb_setup: dict[str, Any] = {}
    if MNB in tools:
        _log(f"[{MNB}] writing a z, y, x copy of the volume (not timed)")
        mnb_setup = prepare_mnb_source(args, out_dir)
        mnb_setup["packages"] = mnb_packages(args.mnb_python)
    for rep in range(args.repeat):  # interleave the tools so drift hits all of them alike
        for tool in tools:
            if tool == "gpumesh" or tool in variants:
                r = run_gpumesh(args, out_dir, rep, variants.get(tool, 0))
            elif tool == "igneous":
                r = run_igneous(args, out_dir, rep, Path(igneous_setup["layer"]))
            elif tool == MNB:
                r = run_mnb(args, out_dir, rep, Path(mnb_setup["path"]))
            else:
                r = run_peer(tool, args, out_dir, rep)
            runs[tool].append(r)
            if "error" in r:
                _log(f"[{tool}] run {rep + 1} FAILED: {r['error']}\n{r.get('log_tail', '')}")
            else:
                _log(
                    f"[{tool}] run {rep + 1}: wall {r['wall_s']:.2f}s, "
                    f"peak RSS {r['peak_rss_mb']:.0f} MB"
                )
    aggs = {t: aggregate(runs[t]) for t in tools}

    print()
    print_table(aggs)

    g = aggs.get("gpumesh", {})
    ratios = {}
    if "gpumesh" in aggs and "error" not in g and g.get("wall_s"):
        for t in tools:
            a = aggs[t]
            at_least = ratio_at_least(a, g["wall_s"])
            if t != "gpumesh" and at_least is not None:
                ratios[t] = {"wall_vs_gpumesh_at_least": at_least, "stopped_after_s": a["failed_run_wall_s"]}
            if t != "gpumesh" and "error" not in a and a.get("wall_s"):
                ratios[t] = {"wall_vs_gpumesh": a["wall_s"] / g["wall_s"]}
                if a.get("pipeline_s") and g.get("summary_seconds"):
                    ratios[t]["pipeline_vs_gpumesh_summary_seconds"] = (
                        a["pipeline_s"] / g["summary_seconds"]
                    )

    record = {
        "benchmark": "main",
        "started_utc": started.isoformat(),
        "finished_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        **environment(),
        # other work on the machine skews wall times; compare with machine.cores_usable
        "load_average_1_5_15": {"start": list(load_start), "end": list(os.getloadavg())},
        "device": device_info(),
        "options": {
            "source": str(args.source),
            "voxel_size_nm": list(args.voxel_size),
            "quality": args.quality,
            "workers": args.workers,
            "gpumesh_args": args.gpumesh_args,
            "gpumesh_variants": args.gpumesh_variant,
            "skip": sorted(skip),
            "skipped": skipped,
            "igneous_python": args.igneous_python if "igneous" in tools else None,
            "igneous_workers": args.igneous_workers,
            "igneous_forge_shape": args.igneous_shape,
            "igneous_nlod": args.igneous_nlod,
            "igneous_max_labels_per_shard": IGNEOUS_MAX_LABELS_PER_SHARD,
            "igneous_setup": igneous_setup,
            "mnb_python": args.mnb_python if MNB in tools else None,
            "mnb_workers": args.mnb_workers,
            "mnb_num_lods": args.mnb_nlod,
            "mnb_dask_config": MNB_DASK_CONFIG,
            "mnb_setup": mnb_setup,
            "repeat": args.repeat,
            "out_dir": str(out_dir),
            "timeout_s": args.timeout,
            "peer_reduction_factor": args.reduction_factor,
            "peer_max_error_nm": args.max_error,
            "peer_params_origin": "igneous MeshTask defaults: simplification_factor=100, "
            "max_simplification_error=40 (nm)",
            "peer_close": True,
            "serra_threads": args.serra_threads,
            "raw_count": not args.no_raw_count,
            "peer_simplify": not args.no_peer_simplify,
        },
        "results": aggs,
        "ratios": ratios,
        "runs": runs,
    }
    if not args.no_save:
        print(f"\nresults: {save_result(record, 'main', started, args.results_dir)}")

    failed = [t for t in tools if "error" in aggs[t]]
    if own_tmp and not args.keep and not failed:
        shutil.rmtree(out_dir, ignore_errors=True)
    else:
        print(f"out-dir kept (logs under logs/): {out_dir}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
