#!/usr/bin/env python3
"""The main job's tasks one by one: CPU seconds of each, and what they imply for many cores.

Runs every task of the main job (``gpumesh.pipeline.Plan.tasks``: a block's coarsest LOD, and
each octant's finer LODs) in this one process, in the job's order, with the chosen backend,
and records each task's CPU time (``time.process_time``: this process's threads, so the
figure does not depend on what else runs on the machine) and wall time.  A first, untimed
task loads the numba kernels (compiling them on a fresh checkout).

From these measured times it then computes, for several worker counts, the makespan of
handing the tasks to the workers in the job's order, each to the first worker free (what
the job's process pool does), of the same in longest-first order, and the ideal (total /
workers).  These three are a **model**, not a measurement: they leave out worker start-up,
contention for memory bandwidth and storage, and the serial assembly of the output.  The
longest task bounds the job's wall time on any number of cores.

    .venv/bin/python bench/bench_tasks.py                 # CPU backend, real volume
    .venv/bin/python bench/bench_tasks.py --device gpu    # on a GPU machine

Prints a table and writes ``bench/results/tasks-<UTC start>-<hostname>.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import heapq
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_main import (DEFAULT_SOURCE, add_result_args, device_info, environment,  # noqa: E402
                        save_result, source_missing)

WORKERS = (1, 2, 8, 16, 32, 64)


def makespan(costs, workers: int) -> float:
    """Finish time of ``costs`` (s) handed in order to the first of ``workers`` free."""
    free = [0.0] * workers
    for c in costs:
        heapq.heappush(free, heapq.heappop(free) + c)
    return max(free)


def measure(source, voxel_size, device: str, bits: int = 16) -> tuple[list[dict], str]:
    """Run every task of the main job on ``source`` once; per-task CPU and wall seconds.

    ``bits``: the vertex quantization bits (the main job's default options otherwise)."""
    from gpumesh.backend import get_backend
    from gpumesh.pipeline import MeshOptions, Plan, mesh_block, read_cache_bytes, task_name
    from gpumesh.volume import open_volume

    options = MeshOptions(vertex_quantization_bits=bits)
    volume = open_volume(source, voxel_size=voxel_size)
    plan = Plan.make(volume.shape, options, volume.voxel_size)
    volume = open_volume(source, voxel_size=voxel_size, cache_bytes=read_cache_bytes(volume, plan))
    backend = get_backend(device)
    tasks = plan.tasks()
    mesh_block(volume, plan, options, tasks[-1][0], backend, tasks[-1][1])  # load the kernels
    rows = []
    for t in tasks:
        c0, w0 = time.process_time(), time.perf_counter()
        blob = mesh_block(volume, plan, options, t[0], backend, t[1])
        rows.append({"task": task_name(t), "cpu_s": time.process_time() - c0,
                     "wall_s": time.perf_counter() - w0, "bytes": len(blob)})
    return rows, backend.name


def model(rows: list[dict]) -> list[dict]:
    costs = [r["cpu_s"] for r in rows]
    total = sum(costs)
    return [{"workers": n, "job_order_s": makespan(costs, n),
             "longest_first_s": makespan(sorted(costs, reverse=True), n),
             "ideal_s": total / n} for n in WORKERS]


def print_table(rows: list[dict], sched: list[dict], top: int = 5) -> None:
    costs = [r["cpu_s"] for r in rows]
    coarse = sum(r["cpu_s"] for r in rows if r["task"].endswith(".coarse"))
    print(f"{len(rows)} tasks, {sum(costs):.1f} CPU s in all ({coarse:.1f} in the coarse tasks); "
          f"longest {max(costs):.2f} s")
    print("longest tasks: " + ", ".join(
        f"{r['task']} {r['cpu_s']:.2f} s" for r in sorted(rows, key=lambda r: -r["cpu_s"])[:top]))
    print()
    print("workers | job order s | longest first s | ideal s   (model: measured task CPU times)")
    print("--------+-------------+-----------------+--------")
    for s in sched:
        print(f"{s['workers']:7d} | {s['job_order_s']:11.2f} | {s['longest_first_s']:15.2f} | "
              f"{s['ideal_s']:7.2f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", default=str(DEFAULT_SOURCE))
    p.add_argument("--voxel-size", default="32,32,40", help="nm, x,y,z")
    p.add_argument("--device", default="cpu", choices=("cpu", "gpu", "auto"))
    p.add_argument("--bits", type=int, default=16, choices=(10, 16), help="vertex quantization bits")
    add_result_args(p)
    args = p.parse_args(argv)
    if source_missing(args.source):
        return 2
    voxel_size = tuple(float(v) for v in args.voxel_size.split(","))
    started = _dt.datetime.now(_dt.timezone.utc)
    rows, backend = measure(args.source, voxel_size, args.device, args.bits)
    sched = model(rows)
    print_table(rows, sched)
    record = {
        "benchmark": "tasks",
        "started_utc": started.isoformat(),
        "finished_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        **environment(), "device": device_info(), "backend": backend,
        "options": {"source": args.source, "voxel_size_nm": list(voxel_size), "preset": "default",
                    "vertex_quantization_bits": args.bits},
        "model_note": "makespans are computed from the measured per-task CPU seconds (list "
                      "scheduling); they leave out worker start-up, contention and assembly",
        "tasks": rows,
        "model": sched,
    }
    if not args.no_save:
        print(f"\nresults: {save_result(record, 'tasks', started, args.results_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
