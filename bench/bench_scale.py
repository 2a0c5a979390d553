#!/usr/bin/env python3
"""What a job costs beside its meshes, at the task counts of a teravoxel volume: listing the
plan's tasks, and the run that writes the output after an array job's parts.

A sparse label volume is made in a temporary folder (zarr v2, 128x128x64 chunks, background
everywhere except a cutout of the real volume at the origin, so the job has real meshes), of
``--shape`` voxels (default 16384x16384x2048 at 8x8x40 nm: 0.55 teravoxels, 320,922 tasks).
Then, one after another:

1. **plan**: ``Plan.make`` and ``Plan.tasks()`` in this process (the list every run of the job
   makes: each part, each resume).
2. **part**: ``gpumesh mesh --part 0/N`` (N from ``--part-tasks``: a few hundred tasks), which
   meshes the cutout's blocks among its share.
3. The other parts' results are written straight into the scratch area (not timed), as the
   other N - 1 parts would have left them on a volume that holds only background there: each
   remaining task's name, with the job's stamp, in a record of tasks that found nothing per
   part (before such records, an empty task result each, part 0's bytes).
4. **resume**: ``gpumesh mesh --resume``, which lists the scratch area, reads every task
   result's header and writes the output (sharded).
5. With ``--dask-tasks N``: **Dask job**, ``gpumesh mesh --scheduler`` of a like sparse volume
   of about N tasks (narrower in x and y, the same cutout), on a Dask ``LocalCluster`` of
   ``--workers`` processes (1 thread each) started here, so that its scheduler lives in this
   process and the CLI's peak RSS is the Dask client's (the futures of the tasks in flight).

Wall times of the CLI runs include their start-up (imports, the worker processes). Peak RSS is
the summary's (the largest process). No peer runs here: igneous has no like step (its merge
task reads the fragments its forge tasks wrote, per shard); compare commits instead, by running
this script with ``PYTHONPATH`` set to another checkout (the CLI runs inherit it).

    .venv/bin/python bench/bench_scale.py                           # 0.55 teravoxels
    .venv/bin/python bench/bench_scale.py --shape 8192,8192,1024    # 43,470 tasks
    .venv/bin/python bench/bench_scale.py --dask-tasks 10000        # and a job of 10,000 on Dask

Needs ~1.5 GB of disk for the default shape's task results (TMPDIR). Prints a table and writes
``bench/results/scale-<UTC start>-<hostname>.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_main import DEFAULT_SOURCE, add_result_args, environment, mesh_with_cli, save_result  # noqa: E402


def make_sparse(path: Path, shape: tuple, source: Path, cutout: int) -> None:
    """A zarr v2 label volume of ``shape`` (x, y, z), uint32, background but for the first
    ``cutout`` voxels a side of ``source`` at the origin."""
    import tensorstore as ts

    vol = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(path)},
                   "metadata": {"shape": list(shape), "chunks": [128, 128, 64], "dtype": "<u4", "fill_value": 0,
                                "compressor": {"id": "gzip"}}, "create": True}).result()
    from gpumesh.volume import open_volume

    src = open_volume(str(source.resolve()))   # any format gpumesh reads, indexed x, y, z
    n = [min(cutout, s, t) for s, t in zip(src.shape, shape)]
    vol[:n[0], :n[1], :n[2]] = src.read((0, 0, 0), tuple(n)).astype("uint32")


def fill_other_parts(dest: Path, tasks: list, per_part: int) -> int:
    """Record each of ``tasks`` (the plan's) that part 0 did not run as finished with nothing
    found, with the job's stamp, as the other parts leave them on background: by name, in a
    record per ``per_part`` tasks (``empty/``, where part 0 wrote such records), else an empty
    task result each (part 0's bytes; gpumesh before records). Returns how many."""
    from gpumesh import pipeline, storage
    from gpumesh.pipeline import SCRATCH, task_name

    kv = storage.open_kvstore(str(dest))
    keys = [k for k in storage.list_keys(kv, SCRATCH) if k.startswith((SCRATCH + "blocks/", SCRATCH + "empty/"))]
    # a result's key also says its header's size (pipeline.block_key); a record's ends with the stamp
    stamp = (pipeline.parse_block_key(keys[0])[1] if keys[0].startswith(SCRATCH + "blocks/")
             else keys[0].partition("@")[2])
    if any(k.startswith(SCRATCH + "empty/") for k in keys):   # gpumesh's own reader and writer of records
        done = pipeline.scratch_tasks(kv, stamp, keys)[0]
        rest = [task_name(t) for t in tasks if task_name(t) not in done]
        for i in range(0, len(rest), per_part):   # a record per part, as each part's run writes it
            record = pipeline._EmptyTasks(kv, stamp)
            for name in rest[i:i + per_part]:
                record.add(name)
            record.flush()
        return len(rest)
    done = {pipeline.parse_block_key(k)[0] for k in keys}
    rest = [task_name(t) for t in tasks if task_name(t) not in done]
    empty = next(b for b in (storage.read(kv, k) for k in keys) if len(b) == 24)
    rest = [f"{SCRATCH}blocks/{name}@{stamp}" for name in rest]
    for i in range(0, len(rest), 10_000):
        storage.write_many(kv, ((k, empty) for k in rest[i:i + 10_000]), sync=False)
    return len(rest)


def dask_job(source: Path, dest: Path, voxel_size: str, workers: int) -> dict:
    """``gpumesh mesh SOURCE DEST`` on a Dask ``LocalCluster`` of ``workers`` processes started
    here: ``{"command", "wall_s", "client_peak_rss_mb", "tasks"}``, the peak
    RSS of the CLI process alone (the Dask client; the scheduler is in this process)."""
    import os

    from distributed import LocalCluster

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        summary_path = f"{dest}.summary.json"
        cmd = [str(Path(sys.executable).with_name("gpumesh")), "mesh", str(source), str(dest), "--voxel-size",
               voxel_size, "--scheduler", cluster.scheduler_address, "--quiet",
               "--summary-json", summary_path]
        with tempfile.TemporaryFile() as err:   # not a pipe: nothing reads it until the CLI ends
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
            _, status, usage = os.wait4(proc.pid, 0)   # the CLI's own rusage: its peak RSS
            wall = time.perf_counter() - t0
            proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode:
                err.seek(0)
                raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {err.read().decode()[-2000:]}")
    summary = json.loads(Path(summary_path).read_text())
    return {"command": cmd, "wall_s": wall, "client_peak_rss_mb": usage.ru_maxrss / 1024, "tasks": summary["tasks"],
            "workers": workers}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", default=str(DEFAULT_SOURCE), help="the real volume, for the cutout")
    p.add_argument("--shape", default="16384,16384,2048", help="voxels x,y,z of the sparse volume")
    p.add_argument("--voxel-size", default="8,8,40", help="nm, x,y,z")
    p.add_argument("--cutout", type=int, default=256, help="edge of the real cutout at the origin (voxels)")
    p.add_argument("--part-tasks", type=int, default=300, help="about this many tasks in the timed part")
    p.add_argument("--workers", type=int, default=None, help="workers of each CLI run (default: gpumesh's)")
    p.add_argument("--dask-tasks", type=int, default=0,
                   help="also run a job of about this many tasks on a Dask LocalCluster (default: none)")
    add_result_args(p)
    args = p.parse_args(argv)
    from gpumesh.pipeline import MeshOptions, Plan

    shape = tuple(int(v) for v in args.shape.split(","))
    voxel = tuple(float(v) for v in args.voxel_size.split(","))
    started = _dt.datetime.now(_dt.timezone.utc)
    t0 = time.perf_counter()
    plan = Plan.make(shape, MeshOptions(), voxel)
    tasks = plan.tasks()
    plan_s = time.perf_counter() - t0
    parts = max(1, len(tasks) // args.part_tasks)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_sparse(tmp / "sparse.zarr", shape, Path(args.source), args.cutout)
        dest = tmp / "mesh"
        part = mesh_with_cli(tmp / "sparse.zarr", str(dest), args.voxel_size, ["--part", f"0/{parts}"], args.workers)
        summary = json.loads(Path(f"{dest}.summary.json").read_text())
        if summary.get("tasks_all") != len(tasks):   # the CLI's defaults are not MeshOptions()'s
            raise SystemExit(f"the job has {summary.get('tasks_all')} tasks, the plan here {len(tasks)}")
        part.update({k: summary[k] for k in ("peak_rss_mb", "tasks")})
        filled = fill_other_parts(dest, tasks, len(tasks) // parts)
        last = mesh_with_cli(tmp / "sparse.zarr", str(dest), args.voxel_size, ["--resume"], args.workers)
        summary = json.loads(Path(f"{dest}.summary.json").read_text())
        last.update({k: summary[k] for k in ("peak_rss_mb", "seconds_meshing", "seconds_writing", "tasks_resumed")})
        on_dask = None
        if args.dask_tasks:
            f = min(1.0, (args.dask_tasks / len(tasks)) ** 0.5)   # tasks go with the area of x and y
            small = (max(1, round(shape[0] * f)), max(1, round(shape[1] * f)), shape[2])
            make_sparse(tmp / "small.zarr", small, Path(args.source), args.cutout)
            on_dask = dask_job(tmp / "small.zarr", tmp / "dask", args.voxel_size, args.workers or 2)
            on_dask["shape"] = small
    print(f"sparse volume {shape} at {voxel} nm, {len(tasks):,} tasks in {plan.grid[0] * plan.grid[1] * plan.grid[2]:,} "
          f"blocks; cutout {args.cutout}^3 of {args.source}; workers {args.workers or 'default'}; one run each")
    print(f"{'step':44s} | wall s | peak RSS MB")
    print(f"{'-' * 44}-+--------+------------")
    print(f"{'plan: Plan.make + tasks() (this process)':44s} | {plan_s:6.2f} |")
    print(f"{f'part 0/{parts} (CLI)':44s} | {part['wall_s']:6.1f} | {part['peak_rss_mb']:.0f}")
    print(f"{f'--resume after {filled:,} empty results (CLI)':44s} | {last['wall_s']:6.1f} | {last['peak_rss_mb']:.0f}")
    if on_dask:
        label = f"Dask job of {on_dask['tasks']:,} tasks, client (CLI)"
        print(f"{label:44s} | {on_dask['wall_s']:6.1f} | {on_dask['client_peak_rss_mb']:.0f}")
    record = {"benchmark": "scale", "started_utc": started.isoformat(),
              "finished_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(), **environment(),
              "options": {"source": args.source, "shape": shape, "voxel_size_nm": voxel, "cutout": args.cutout,
                          "parts": parts, "workers": args.workers},
              "tasks": len(tasks), "blocks": plan.grid[0] * plan.grid[1] * plan.grid[2], "plan_s": plan_s,
              "part": part, "results_written_for_other_parts": filled, "resume": last, "dask_job": on_dask}
    if not args.no_save:
        print(f"\nresults: {save_result(record, 'scale', started, args.results_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
