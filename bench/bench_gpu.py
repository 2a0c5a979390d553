#!/usr/bin/env python3
"""Kernel benchmark: marching cubes and label downsampling, GPU against CPU and the peers.

On each volume (the real 512^3 one, and 1024^3 tiled from it with ``bench/tiled.py``'s
relabelling) and in one run on one machine:

* ``gpu mc kernels``: :meth:`gpumesh.gpu.GPUBackend.march_device` on labels already on the
  device (count, scan, emit; the scan's total is the only transfer), timed with CUDA events:
  ``--warmup`` untimed calls, then the median of ``--repeat``;
* ``gpu mc + weld kernels (sort|hash)``: :meth:`GPUBackend.march_device` then
  :meth:`GPUBackend.weld_arrays`, labels on the device to welded arrays on the device, events,
  for each way of numbering the vertices (``GPUBackend(weld=...)``): the issue's "marching
  cubes + welding" figure (one warm-up, median of ``--host-repeat``); skipped where the weld
  does not fit the memory budget;
* ``gpu mc + transfers``: :meth:`GPUBackend.march` from host labels to host triangle arrays
  (upload, kernels, download), wall clock, median of ``--host-repeat``;
* ``gpu mc + weld (device)``: :meth:`GPUBackend.mesh`, host labels to host pieces with the
  weld on the device (:meth:`GPUBackend.weld_device`), wall clock;
* ``gpu downsample kernel`` (2x2x2) and ``... 2x2x1`` (a step of anisotropic voxels):
  :meth:`GPUBackend.downsample_device`, events, median, with the
  bandwidth it reaches (bytes read once + written once over the time);
* ``cpu mc`` / ``cpu downsample``: the CPU path (:func:`gpumesh.marching.march_cubes`,
  :func:`gpumesh.lod.downsample_labels`; numba, one thread), wall clock, after a warm-up
  on a crop so compilation is left out;
* ``weld``: :func:`gpumesh.marching.weld` (CPU; the GPU path welds there too);
* ``zmesh`` / ``serra``: the peers' multi-label marching cubes with their own welding
  (``Mesher.mesh(labels, close=True)`` then ``get(id, reduction_factor=0)`` for every
  segment; serra on every core), wall clock.

Throughput is voxels over time (Gvox/s).  On the real volume the GPU's triangle arrays are
compared with the CPU's (``parity``) and the device-welded pieces with the CPU weld's
(``parity_pieces``).  Peak device memory is the CuPy pool's size after the
runs.  The CPU-only and peer rows of the tiled volume are skipped unless ``--cpu-tiled``
(they take minutes and ~40 GB of memory).

Prints a table and writes ``bench/results/kernels-<UTC timestamp>-<hostname>.json`` with the
machine, the device (name, driver, CUDA version), the commit and every figure.  Without a GPU
(``--device cpu``, or ``auto`` on a machine without one) only the CPU and peer rows run.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_main  # noqa: E402
from tiled import tile_volume  # noqa: E402

PIECE_SIZE = 64  # the main job's LOD 0 piece (node) size at the default chunk size


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _wall(fn: Callable[[], Any], repeat: int) -> tuple[list[float], Any]:
    times, out = [], None
    for _ in range(repeat):
        out = None
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def _events(cp, fn: Callable[[], Any], warmup: int, repeat: int) -> list[float]:
    """Seconds per call, timed with CUDA events around each call."""
    for _ in range(warmup):
        fn()
    cp.cuda.Device().synchronize()
    times = []
    for _ in range(repeat):
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end) / 1e3)
    return times


def gpu_info(cp) -> dict[str, Any]:
    rt = cp.cuda.runtime
    props = rt.getDeviceProperties(cp.cuda.Device().id)
    name = props["name"]
    free, total = rt.memGetInfo()
    return {
        "name": name.decode() if isinstance(name, bytes) else str(name),
        "compute_capability": f"{props['major']}.{props['minor']}",
        "multiprocessors": int(props["multiProcessorCount"]),
        "memory_gib": round(total / 2**30, 1),
        "driver_version": rt.driverGetVersion(),
        "cuda_runtime_version": rt.runtimeGetVersion(),
        "cupy": cp.__version__,
    }


def _row(rows, volume, what, stage, seconds, voxels, **extra):
    """One figure; ``stage`` (mc, mc+weld, weld, downsample) says which rows compare."""
    med = statistics.median(seconds)
    rows.append(dict(volume=volume, what=what, stage=stage, median_s=med, runs_s=seconds,
                     gvox_per_s=voxels / med / 1e9, **extra))
    _log(f"[{volume}] {what}: {med * 1e3:.1f} ms ({voxels / med / 1e9:.3g} Gvox/s)")


def _find(rows, volume, what):
    return next((r for r in rows if r["volume"] == volume and r["what"] == what), None)


def _same_pieces(a, b) -> bool:
    return len(a) == len(b) and all(
        (p.label, p.piece) == (q.label, q.piece) and np.array_equal(p.vertices2, q.vertices2)
        and np.array_equal(p.faces, q.faces) for p, q in zip(a, b))


def bench_gpu(rows, name, labels, args, cpu, backend=None, cp=None, pageable=None) -> dict[str, Any]:
    """The GPU rows of one volume; ``cpu``: :func:`bench_cpu`'s (triangles, pieces) for the
    parity checks, or None (``backend``, ``cp``, ``pageable``: GPUBackends and CuPy, for tests)."""
    if cp is None:
        import cupy as cp
    if backend is None:
        from gpumesh.gpu import CupyRuntime, GPUBackend

        backend = GPUBackend()
        if backend.rt.pinned:  # the same through pageable memory, for comparison
            pageable = GPUBackend(runtime=CupyRuntime(pinned=False))
    nvox = labels.size
    backend.rt.to_device(labels)   # a warm-up: the pinned staging buffer is allocated once
    cp.cuda.Device().synchronize()
    t0 = time.perf_counter()
    d_labels = backend.rt.to_device(labels)
    cp.cuda.Device().synchronize()
    up = time.perf_counter() - t0
    peak = 0
    info: dict[str, Any] = {"upload_s": up, "upload_gb_per_s": labels.nbytes / up / 1e9,
                            "pinned": bool(getattr(backend.rt, "pinned", False))}
    out = backend.march_device(d_labels, PIECE_SIZE)
    tris = int(out[0].shape[0])
    del out
    t = _events(cp, lambda: backend.march_device(d_labels, PIECE_SIZE), args.warmup, args.repeat)
    _row(rows, name, "gpu mc kernels", "mc", t, nvox, triangles=tris)
    # marching cubes and the weld, all on the device (no pieces brought back): the figure of
    # the "mc + weld" target, for each way of numbering the vertices
    from gpumesh.gpu import WELD_BYTES_PER_TRIANGLE, WELD_METHODS

    method = backend.weld
    for weld in WELD_METHODS:
        backend.weld = weld
        if tris * WELD_BYTES_PER_TRIANGLE > backend._avail:
            _log(f"[{name}] gpu mc + weld kernels ({backend.weld}): skipped, the weld does not "
                 f"fit the memory budget ({tris} triangles)")
            continue
        # a weld of the whole volume takes far longer than the kernels: one warm-up, then as
        # many runs as the host-to-host rows
        t = _events(cp, lambda: backend.weld_arrays(*backend.march_device(d_labels, PIECE_SIZE),
                                                    labels.shape), 1, args.host_repeat)
        _row(rows, name, f"gpu mc + weld kernels ({backend.weld})", "mc+weld", t, nvox)
    backend.weld = method
    ds_bytes = labels.nbytes + labels.nbytes // 8
    t = _events(cp, lambda: backend.downsample_device(d_labels), args.warmup, args.repeat)
    _row(rows, name, "gpu downsample kernel", "downsample", t, nvox,
         gb_per_s=ds_bytes / statistics.median(t) / 1e9)
    # an anisotropic voxel's step (--downsampling auto on 4x4x40 nm: x and y only)
    t = _events(cp, lambda: backend.downsample_device(d_labels, (2, 2, 1)), args.warmup, args.repeat)
    _row(rows, name, "gpu downsample kernel 2x2x1", "downsample 2x2x1", t, nvox,
         gb_per_s=(labels.nbytes + labels.nbytes // 4) / statistics.median(t) / 1e9)
    del d_labels
    if name == "real" or args.cpu_tiled:
        t, got = _wall(lambda: backend.march(labels, PIECE_SIZE), args.host_repeat)
        _row(rows, name, "gpu mc + transfers", "mc", t, nvox, triangles=int(got[0].shape[0]),
             slabs=backend.stats["slabs"])
        weld = _find(rows, name, "weld (cpu)")
        if weld:
            _row(rows, name, "gpu mc + transfers + weld (cpu)", "mc+weld",
                 [statistics.median(t) + weld["median_s"]], nvox)
        if cpu is not None:
            info["parity"] = all(np.array_equal(a, b) for a, b in zip(got, cpu[0]))
            _log(f"[{name}] GPU triangles == CPU triangles: {info['parity']}")
        del got
        welds = backend.stats["device_welds"]
        t, got = _wall(lambda: backend.mesh(labels, PIECE_SIZE), args.host_repeat)
        _row(rows, name, "gpu mc + weld (device)", "mc+weld", t, nvox,
             welded_on_device=backend.stats["device_welds"] > welds)
        if cpu is not None:
            info["parity_pieces"] = _same_pieces(got, cpu[1])
            _log(f"[{name}] GPU pieces == CPU pieces: {info['parity_pieces']}")
        del got
        if pageable is not None:
            # the pool's size before the release below: both runtimes use CuPy's default pool,
            # whose total_bytes() counts only the blocks in use after it
            peak = backend.rt.pool_bytes()
            t, got = _wall(lambda: pageable.mesh(labels, PIECE_SIZE), args.host_repeat)
            _row(rows, name, "gpu mc + weld (device), pageable copies", "mc+weld", t, nvox)
            if cpu is not None:
                info["parity_pieces_pageable"] = _same_pieces(got, cpu[1])
            del got
            peak = max(peak, pageable.rt.pool_bytes())
            pageable.rt.release()
    info["pool_peak_bytes"] = max(peak, backend.rt.pool_bytes())
    info["stats"] = dict(backend.stats)
    backend.rt.release()
    return info


def bench_cpu(rows, name, labels, args):
    from gpumesh import lod, marching

    nvox = labels.size
    warm = np.ascontiguousarray(labels[:40, :40, :40])
    marching.weld(*marching.march_cubes(warm, PIECE_SIZE), warm.shape)
    lod.downsample_labels(warm)
    t, tris = _wall(lambda: marching.march_cubes(labels, PIECE_SIZE), args.cpu_repeat)
    _row(rows, name, "cpu mc", "mc", t, nvox, triangles=int(tris[0].shape[0]))
    t, pieces = _wall(lambda: marching.weld(*tris, labels.shape), 1)
    _row(rows, name, "weld (cpu)", "weld", t, nvox, pieces=len(pieces))
    _row(rows, name, "cpu mc + weld", "mc+weld",
         [_find(rows, name, "cpu mc")["median_s"] + t[0]], nvox)
    t, _ = _wall(lambda: lod.downsample_labels(labels), args.cpu_repeat)
    _row(rows, name, "cpu downsample", "downsample", t, nvox)
    return tris, pieces


def bench_peer(rows, name, labels, tool, voxel_size):
    nvox = labels.size
    if tool == "zmesh":
        import zmesh

        mesher = zmesh.Mesher(voxel_size)
        arr = np.asfortranarray(labels)
        call = "zmesh.Mesher(voxel_size).mesh(fortran labels, close=True)"
    else:
        import serra_mesh

        mesher = serra_mesh.Mesher(voxel_resolution=list(voxel_size), axis_order="XYZ", threads=0)
        arr = labels
        call = "serra_mesh.Mesher(voxel_resolution, axis_order='XYZ', threads=0).mesh(labels, close=True)"
    t0 = time.perf_counter()
    mesher.mesh(arr, close=True)
    t1 = time.perf_counter()
    tris = 0
    for label in mesher.ids():
        tris += int(mesher.get(int(label), normals=False, reduction_factor=0).faces.shape[0])
        mesher.erase(int(label))
    t2 = time.perf_counter()
    _row(rows, name, f"{tool} mc + weld", "mc+weld", [t2 - t0], nvox, mesh_s=t1 - t0, get_s=t2 - t1,
         triangles=tris, call=call)


def speedups(rows) -> list[dict[str, Any]]:
    """Each row's speed-up over gpumesh's CPU path and over zmesh at the same stage
    (``x_cpu``, ``x_zmesh``: their median over the row's; None where there is none)."""
    def ref(r, what):
        other = _find(rows, r["volume"], what)
        return other["median_s"] / r["median_s"] if other and other["stage"] == r["stage"] else None

    out = []
    for r in rows:
        cpu = {"mc": "cpu mc", "mc+weld": "cpu mc + weld", "downsample": "cpu downsample"}.get(r["stage"])
        out.append({"volume": r["volume"], "what": r["what"], "x_cpu": ref(r, cpu) if cpu else None,
                    "x_zmesh": ref(r, "zmesh mc + weld")})
    return out


def print_table(rows) -> None:
    """Rows with their speed-up over gpumesh's CPU path and over zmesh at the same stage."""
    def cell(x):
        return "" if x is None else f"{x:.1f}"

    print(f"\n{'volume':7} {'what':32} {'median':>11} {'Gvox/s':>8} {'x cpu':>6} {'x zmesh':>7}  note")
    for r, x in zip(rows, speedups(rows)):
        note = ", ".join(f"{k} {r[k]:,}" if isinstance(r[k], int) else f"{k} {r[k]:.0f}"
                         for k in ("triangles", "gb_per_s") if k in r)
        print(f"{r['volume']:7} {r['what']:32} {r['median_s'] * 1e3:9.1f}ms {r['gvox_per_s']:8.3g} "
              f"{cell(x['x_cpu']):>6} {cell(x['x_zmesh']):>7}  {note}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Benchmark the GPU kernels against the CPU path and the peers.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--source", default=None, help="label volume (default: the real volume)")
    p.add_argument("--device", choices=("auto", "gpu", "cpu"), default="auto")
    p.add_argument("--volumes", default="real,tiled", help="real (the source), tiled (2x2x2 tiles of it)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=20, help="timed kernel runs (CUDA events)")
    p.add_argument("--host-repeat", type=int, default=3, help="timed runs of the host-to-host GPU march")
    p.add_argument("--cpu-repeat", type=int, default=1)
    p.add_argument("--peers", default="zmesh,serra", help="peers to run on the real volume ('' for none)")
    p.add_argument("--cpu-tiled", action="store_true", help="also run the CPU and peers on the tiled volume")
    p.add_argument("--voxel-size", type=bench_main._parse_voxel_size, default=(32.0, 32.0, 40.0))
    bench_main.add_result_args(p)
    args = p.parse_args(argv)

    from gpumesh.backend import gpu_available

    use_gpu = args.device == "gpu" or (args.device == "auto" and gpu_available())
    if args.device == "gpu" and not gpu_available():
        print("--device gpu: no CUDA GPU visible to CuPy", file=sys.stderr)
        return 2
    if not use_gpu and args.device == "auto":
        _log("no CUDA GPU visible to CuPy: the CPU and peer rows only")
    source = bench_main.resolve_source(args.source)
    real = bench_main.load_volume(source)
    volumes = [v.strip() for v in args.volumes.split(",") if v.strip()]
    peers = [t.strip() for t in args.peers.split(",") if t.strip()]
    started = _dt.datetime.now(_dt.timezone.utc)
    rows: list[dict[str, Any]] = []
    gpu_runs: dict[str, Any] = {}
    device: dict[str, Any] = {"name": "cpu"}
    if use_gpu:
        import cupy as cp

        device = gpu_info(cp)
        _log(f"device: {device}")
    env = bench_main.environment()
    path = None

    def save(complete: bool) -> None:
        """The result so far, rewritten after each part, so a run stopped by a time limit (the
        device kit's) keeps what it measured (``complete`` False until the end)."""
        nonlocal path
        if args.no_save:
            return
        result = {
            "benchmark": "kernels",
            "started_utc": started.isoformat(timespec="seconds"),
            "source": str(source),
            "piece_size": PIECE_SIZE,
            **env,
            "device": device,
            "settings": {k: v for k, v in vars(args).items() if k not in ("results_dir",)},
            "complete": complete,
            "rows": rows,
            "speedups": speedups(rows),
            "gpu": gpu_runs,
        }
        if path is None:
            path = bench_main.save_result(result, "kernels", started, args.results_dir)
        else:
            bench_main.rewrite_result(result, path)

    for name in volumes:
        labels = real if name == "real" else tile_volume(real, 2)
        _log(f"[{name}] {labels.shape} {labels.dtype}, {labels.nbytes / 2**30:.2f} GiB")
        full = name == "real" or args.cpu_tiled
        cpu = bench_cpu(rows, name, labels, args) if full else None
        save(False)
        if use_gpu:
            gpu_runs[name] = bench_gpu(rows, name, labels, args, cpu)
            save(False)
        del cpu
        if full:
            for tool in peers:
                bench_peer(rows, name, labels, tool, args.voxel_size)
                save(False)
        del labels
    print_table(rows)
    save(True)
    if path is not None:
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
