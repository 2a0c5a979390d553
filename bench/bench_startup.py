#!/usr/bin/env python3
"""The main job's fixed cost: the CLI on a small cutout, where start-up is most of the time.

Runs ``python -m gpumesh.cli mesh CUTOUT DEST --workers N`` on a cutout of the real volume
(``--size`` voxels a side from the origin, written to a temporary zarr before any timing) and
reports the median wall time (spawn to exit) and the summary's own seconds.  With
``--baseline DIR`` it also runs the gpumesh package of another checkout ``DIR`` (put first on
``PYTHONPATH``; its ``gpumesh/`` needs the Draco extension built or copied beside it, else it
encodes with DracoPy), alternating the two run by run so that both see the same machine, and
prints their ratio.  One untimed run of each comes first (it loads or compiles the numba
kernels into that checkout's cache).  With ``--cold`` every run is a fresh install's first:
each runs a copy of the checkout's ``gpumesh/`` made for it without ``__pycache__`` (and
without ``NUMBA_CACHE_DIR``), so its workers compile every kernel (:func:`fresh_copy`), and no
untimed run comes first.

    .venv/bin/python bench/bench_startup.py                          # this checkout
    .venv/bin/python bench/bench_startup.py --baseline /tmp/old      # against another one
    .venv/bin/python bench/bench_startup.py --cold --size 0 --reps 2 --baseline /tmp/old   # first runs, whole volume

Prints a table and writes ``bench/results/startup-<UTC start>-<hostname>.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_main import (DEFAULT_SOURCE, REPO_ROOT, add_result_args, environment, mesh_with_cli,  # noqa: E402
                        save_result, source_missing)


def make_cutout(source: Path, size: int, path: Path) -> None:
    """Write voxels ``[0, size)^3`` of ``source`` (zarr v3, axes x, y, z) as a zarr v3 at ``path``."""
    import tensorstore as ts

    src = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(source.resolve())}}).result()
    arr = src[:size, :size, :size].read().result()
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)},
            "metadata": {"shape": list(arr.shape), "data_type": str(arr.dtype), "dimension_names": ["x", "y", "z"],
                         "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [64, 64, 64]}}}}
    ts.open(spec, create=True, delete_existing=True).result().write(arr).result()


def add_source_args(p: argparse.ArgumentParser, size: Optional[int] = None, workers: Optional[int] = None) -> None:
    """The options of a benchmark that runs the CLI on the real volume or a cutout of it:
    ``--source``, ``--voxel-size``, ``--size`` (the cutout's edge; default ``size``, ``None``:
    the whole volume) and ``--workers`` (default ``workers``, ``None``: gpumesh's)."""
    p.add_argument("--source", default=str(DEFAULT_SOURCE))
    p.add_argument("--voxel-size", default="32,32,40", help="nm, x,y,z")
    p.add_argument("--size", type=int, default=size,
                   help="mesh a cutout of this edge (voxels) from the origin" + ("" if size else " (default: all)"))
    p.add_argument("--workers", type=int, default=workers, help="workers of each run" + ("" if workers else
                                                                                           " (default: gpumesh's)"))


def source_or_cutout(args: argparse.Namespace, tmp: Path) -> Path:
    """``args.source``, or a cutout of ``args.size`` voxels of it written under ``tmp``."""
    if not args.size:
        return Path(args.source)
    make_cutout(Path(args.source), args.size, tmp / "cutout.zarr")
    return tmp / "cutout.zarr"


def fresh_copy(checkout: Path, where: Path) -> Path:
    """A copy of ``checkout``'s ``gpumesh/`` package in ``where/gpumesh`` without any
    ``__pycache__`` (the Draco extension included): a fresh install, whose numba kernels are
    not compiled yet.  Returns ``where``, to run as a checkout."""
    shutil.copytree(checkout / "gpumesh", where / "gpumesh", ignore=shutil.ignore_patterns("__pycache__"))
    return where


def run_once(checkout: Path, cutout: Path, dest, workers: Optional[int], voxel_size: str, extra=(),
             env: Optional[dict] = None, summary: Optional[Path] = None, overwrite: bool = True) -> dict:
    """One CLI run (``gpumesh mesh --overwrite --quiet``, and ``extra``; without ``--overwrite``
    where not ``overwrite``: an array job's part or ``--resume``) with ``checkout``'s gpumesh
    first on the path, in ``env`` (default: this process's): :func:`bench_main.mesh_with_cli`.
    ``dest``: a folder, or a URL with ``summary`` (the summary file's path) given."""
    summary = Path(dest).with_suffix(".json") if summary is None else Path(summary)
    return mesh_with_cli(cutout, dest, voxel_size, [*(["--overwrite"] if overwrite else []), *extra], workers,
                         checkout=checkout, env=env, summary=summary)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_source_args(p, size=64, workers=2)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--baseline", default=None, help="another checkout to compare with")
    p.add_argument("--cold", action="store_true", help="each run in a fresh copy of the package, without numba's cache")
    add_result_args(p)
    args = p.parse_args(argv)
    if source_missing(args.source):
        return 2
    started = _dt.datetime.now(_dt.timezone.utc)
    variants = {"this": REPO_ROOT}
    if args.baseline:
        variants["baseline"] = Path(args.baseline).resolve()
    runs: dict[str, list] = {k: [] for k in variants}
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"} if args.cold else None
    with tempfile.TemporaryDirectory() as tmp:
        cutout = source_or_cutout(args, Path(tmp))
        if not args.cold:
            for name, checkout in variants.items():   # untimed: loads (or compiles) the kernels
                run_once(checkout, cutout, Path(tmp) / name, args.workers, args.voxel_size)
        for rep in range(args.reps):
            for name, checkout in variants.items():
                run_as = fresh_copy(checkout, Path(tmp) / f"copy-{name}-{rep}") if args.cold else checkout
                runs[name].append(run_once(run_as, cutout, Path(tmp) / name, args.workers, args.voxel_size, env=env))
    rows = {}
    what = f"a {args.size}^3 cutout" if args.size else "the whole volume"
    print(f"CLI on {what}, {args.workers} workers, median of {args.reps} runs"
          + (", each a fresh copy's first (numba compiles every kernel)" if args.cold else ""))
    print("variant  | wall s | summary s | bytes")
    print("---------+--------+-----------+--------")
    for name, rs in runs.items():
        commit = subprocess.run(["git", "-C", str(variants[name]), "rev-parse", "HEAD"], capture_output=True,
                                text=True).stdout.strip() or None
        rows[name] = {"checkout": str(variants[name]), "commit": commit,
                      "median_wall_s": statistics.median(r["wall_s"] for r in rs),
                      "median_summary_s": statistics.median(r["summary_seconds"] for r in rs),
                      "bytes": sorted({r["bytes"] for r in rs}), "runs": rs}
        print(f"{name:8s} | {rows[name]['median_wall_s']:6.2f} | {rows[name]['median_summary_s']:9.2f} | "
              f"{','.join(map(str, rows[name]['bytes']))}")
    if "baseline" in rows:
        ratio = rows["baseline"]["median_wall_s"] / rows["this"]["median_wall_s"]
        print(f"baseline / this (wall): {ratio:.2f}x")
    record = {"benchmark": "startup", "started_utc": started.isoformat(),
              "finished_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(), **environment(),
              "options": {"source": args.source, "size": args.size, "workers": args.workers, "reps": args.reps,
                          "voxel_size_nm": args.voxel_size, "cold": args.cold},
              "variants": rows}
    if not args.no_save:
        print(f"\nresults: {save_result(record, 'startup', started, args.results_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
