#!/usr/bin/env python3
"""A worker's peak memory by block size, against the model that sets the default worker count.

For each ``--max-lods`` (block edge ``chunk · 2^(max-lods − 1)``), a fresh process sets itself
up as a worker of the main job does (``gpumesh.pipeline.set_up_worker``, with the job's read
cache of storage chunks) and runs every task of the job on the real volume, in the job's
order, writing the results to a scratch directory; its peak RSS (``ru_maxrss``) is what one
worker needs at most.  Beside it: the model's estimate (``gpumesh.resources.worker_bytes``),
which must not fall below the measurement, as the default worker count relies on it.

    .venv/bin/python bench/bench_memory.py                  # max LODs 2, 3, 4
    .venv/bin/python bench/bench_memory.py --max-lods 3

Prints a table and writes ``bench/results/memory-<UTC start>-<hostname>.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_main import (DEFAULT_SOURCE, add_result_args, environment, save_result,  # noqa: E402
                        source_missing)

MIB = 1 << 20


def worker_peak(source: str, voxel_size, max_lods: int, chunk: int, device: str, scratch: str) -> dict:
    """Run every task as one worker, in this process; returns the figures (MiB, seconds)."""
    import resource
    import time

    import numpy as np

    from gpumesh import pipeline
    from gpumesh.pipeline import MeshOptions, Plan, read_cache_bytes
    from gpumesh.resources import worker_bytes
    from gpumesh.volume import open_volume

    volume = open_volume(source, voxel_size=voxel_size)
    options = MeshOptions(chunk_size=chunk, max_lods=max_lods)
    plan = Plan.make(volume.shape, options, volume.voxel_size)
    cache = read_cache_bytes(volume, plan)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    pipeline.set_up_worker(source, dict(voxel_size=voxel_size, cache_bytes=cache), plan, options,
                           {"driver": "file", "path": scratch + "/"}, device)
    t0 = time.perf_counter()
    tasks = plan.tasks()
    for task in tasks:
        pipeline._run_task(task)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model = worker_bytes(plan.block, np.dtype(volume.dtype).itemsize, cache) / MIB
    return {"max_lods": max_lods, "block": plan.block, "tasks": len(tasks), "read_cache_mib": cache / MIB,
            "rss_before_mib": before, "peak_rss_mib": peak, "model_mib": model, "seconds": time.perf_counter() - t0,
            "backend": pipeline._WORKER["backend"].name}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", default=str(DEFAULT_SOURCE))
    p.add_argument("--voxel-size", default="32,32,40", help="nm, x,y,z")
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--max-lods", type=int, action="append", help="repeatable (default: 2, 3 and 4)")
    p.add_argument("--device", default="cpu", choices=("cpu", "gpu", "auto"))
    p.add_argument("--one", help=argparse.SUPPRESS)   # internal: run one configuration, print JSON
    add_result_args(p)
    args = p.parse_args(argv)
    voxel_size = [float(v) for v in args.voxel_size.split(",")]
    if args.one:
        with tempfile.TemporaryDirectory() as scratch:
            print(json.dumps(worker_peak(args.source, voxel_size, int(args.one), args.chunk_size, args.device,
                                         scratch)))
        return 0
    if source_missing(args.source):
        return 2
    started = _dt.datetime.now(_dt.timezone.utc)
    rows = []
    for lods in args.max_lods or [2, 3, 4]:
        out = subprocess.run([sys.executable, __file__, "--one", str(lods), "--source", args.source,
                              "--voxel-size", args.voxel_size, "--chunk-size", str(args.chunk_size),
                              "--device", args.device], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"source {args.source}; chunk {args.chunk_size}; device {args.device}\n")
    print("max LODs | block | tasks | read cache MiB | peak RSS MiB | model MiB | model / peak | s")
    print("---------+-------+-------+----------------+--------------+-----------+--------------+------")
    for r in rows:
        print(f"{r['max_lods']:>8} | {r['block']:>5} | {r['tasks']:>5} | {r['read_cache_mib']:>14.0f} | "
              f"{r['peak_rss_mib']:>12.0f} | {r['model_mib']:>9.0f} | {r['model_mib'] / r['peak_rss_mib']:>12.2f} | "
              f"{r['seconds']:.1f}")
    record = {"benchmark": "memory", "started": started.isoformat(), "source": args.source,
              "chunk_size": args.chunk_size, "device": args.device, "rows": rows, **environment()}
    if not args.no_save:
        print(f"\nresults: {save_result(record, 'memory', started, args.results_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
