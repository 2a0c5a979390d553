#!/usr/bin/env python3
"""A job split into parts (``gpumesh mesh --part K/N``), as an array job runs it, against one
whole run on the same machine.

Runs ``gpumesh mesh SOURCE DEST`` whole, then the N parts one after another into a second
DEST (each with the machine's workers, as each machine of an array job would have), then the
``--resume`` that writes the output; checks that both outputs hold the same bytes (a digest of
every file). On N machines the parts would run at once, so the job would take about the
slowest part plus the last run: the table gives that estimate beside the whole run's wall
time, and what the split costs in all (the parts' and last run's sum against the whole run:
each part starts its own processes, reads its blocks' halos, and the last run lists the task
results). One run each, after an untimed run on a small cutout that loads (or compiles) the
numba kernels.

No peer runs here: igneous splits a job through a task queue (SQS or a folder) that many
workers take tasks from, which ``bench_main.py`` times as one machine's job; this benchmark
measures gpumesh's split alone.

    .venv/bin/python bench/bench_parts.py --parts 2                 # the real 512^3 volume
    .venv/bin/python bench/bench_parts.py --parts 4 --size 256      # a cutout from the origin

Prints a table and writes ``bench/results/parts-<UTC start>-<hostname>.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import shlex
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_main import add_result_args, environment, mesh_with_cli, save_result, source_missing  # noqa: E402
from bench_startup import add_source_args, make_cutout, source_or_cutout  # noqa: E402


def tree_digest(root: Path) -> str:
    """SHA-256 over every file under ``root`` (relative path and bytes, in sorted order)."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_source_args(p)
    p.add_argument("--parts", type=int, default=2, help="N, the parts of the job")
    p.add_argument("--gpumesh-args", default="", help="more `gpumesh mesh` options for every run, "
                                                      "e.g. '--chunk-size 16'")
    add_result_args(p)
    args = p.parse_args(argv)
    if source_missing(args.source) or args.parts < 1:
        return 2
    started = _dt.datetime.now(_dt.timezone.utc)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = source_or_cutout(args, tmp)
        warm = tmp / "warm.zarr"
        make_cutout(Path(args.source), 64, warm)
        mesh_with_cli(warm, str(tmp / "warm"), args.voxel_size, ["--overwrite"], args.workers)   # kernels loaded
        more = shlex.split(args.gpumesh_args)
        whole = mesh_with_cli(source, str(tmp / "whole"), args.voxel_size, more, args.workers)
        parts = [mesh_with_cli(source, str(tmp / "parts"), args.voxel_size, more + ["--part", f"{k}/{args.parts}"],
                               args.workers) for k in range(args.parts)]
        last = mesh_with_cli(source, str(tmp / "parts"), args.voxel_size, more + ["--resume"], args.workers)
        same = tree_digest(tmp / "whole") == tree_digest(tmp / "parts")
    part_walls = [r["wall_s"] for r in parts]
    estimate = max(part_walls) + last["wall_s"]
    summed = sum(part_walls) + last["wall_s"]
    print(f"{'cutout ' + str(args.size) + '^3' if args.size else 'the whole volume'} of {args.source}, "
          f"{args.parts} parts, workers {args.workers or 'default'}, one run each")
    rows = [("whole", whole["wall_s"], "")]
    rows += [(f"part {k}/{args.parts}", w, "") for k, w in enumerate(part_walls)]
    rows += [("--resume (writes the output)", last["wall_s"], ""),
             (f"on {args.parts} machines: slowest part + last", estimate,
              f"{whole['wall_s'] / estimate:.2f}x the whole run's speed (estimate)"),
             ("every run in all", summed, f"{summed / whole['wall_s']:.2f}x the whole run's time")]
    print(f"{'run':40s} | wall s |")
    print(f"{'-' * 40}-+--------+-{'-' * 40}")
    for name, wall, note in rows:
        print(f"{name:40s} | {wall:6.1f} | {note}")
    print(f"same bytes: {same}")
    record = {"benchmark": "parts", "started_utc": started.isoformat(),
              "finished_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(), **environment(),
              "options": {"source": args.source, "size": args.size, "parts": args.parts, "workers": args.workers,
                          "voxel_size_nm": args.voxel_size, "gpumesh_args": args.gpumesh_args},
              "whole": whole, "parts": parts, "last": last, "same_bytes": same,
              "estimated_wall_on_n_machines_s": estimate, "sum_of_runs_s": summed}
    if not args.no_save:
        print(f"\nresults: {save_result(record, 'parts', started, args.results_dir)}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
