#!/usr/bin/env python3
"""``gpumesh validate`` on one thread and on several: wall time over a whole output.

Meshes the source once (``gpumesh mesh``, not timed here), then validates the output in this
process with ``gpumesh.validate(DEST, threads=T)`` for each thread count, the counts taking
turns run by run (so a drift of the machine's speed hits them alike), and checks that every
report is the same.  The fragments' Draco decoding is most of a validation, and the decoder
releases the GIL, so each segment's fragments are decoded on the threads side by side.

    .venv/bin/python bench/bench_validate.py                 # the real volume, 1 and every core

Prints a table (median and every run's seconds per thread count) and writes
``bench/results/validate-<UTC start>-<hostname>.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_main import (DEFAULT_SOURCE, add_result_args, environment, mesh_with_cli, save_result,  # noqa: E402
                        source_missing)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", default=str(DEFAULT_SOURCE))
    p.add_argument("--voxel-size", default="32,32,40", help="nm, x,y,z (default: the real volume's)")
    p.add_argument("--threads", default=None,
                   help="thread counts compared, comma-separated (default: 1 and every usable core)")
    p.add_argument("--repeat", type=int, default=3, help="validations per thread count; the median is reported")
    p.add_argument("--gpumesh-args", default="", help="more arguments for the gpumesh mesh run")
    add_result_args(p)
    args = p.parse_args(argv)
    if source_missing(args.source):
        return 2
    from gpumesh.resources import usable_cores
    from gpumesh.validate import validate

    cores = usable_cores()   # validate's default threads
    counts = ([int(t) for t in args.threads.split(",")] if args.threads else sorted({1, cores}))

    started = _dt.datetime.now(_dt.timezone.utc)
    seconds: dict = {t: [] for t in counts}
    with tempfile.TemporaryDirectory() as tmp:
        dest = f"{tmp}/mesh"
        meshed = mesh_with_cli(args.source, dest, args.voxel_size, args.gpumesh_args.split())
        first = None
        for _ in range(args.repeat):
            for t in counts:
                t0 = time.perf_counter()
                report = validate(dest, threads=t)
                seconds[t].append(time.perf_counter() - t0)
                seen = (report.num_segments, report.errors, report.per_lod, report.warnings)
                if first is None:
                    first = seen
                elif seen != first:
                    print(f"the report on {t} threads differs from the first one", file=sys.stderr)
                    return 1
    segments, errors, per_lod, _ = first
    print(f"source {args.source}; {segments} segments, {sum(s['fragments'] for s in per_lod)} fragments, "
          f"{sum(s['triangles'] for s in per_lod)} triangles, {len(errors)} errors; {cores} usable cores\n")
    print("threads | median s | runs s")
    print("--------+----------+-------------------------")
    base = statistics.median(seconds[counts[0]])
    for t in counts:
        med = statistics.median(seconds[t])
        runs = ", ".join(f"{s:.2f}" for s in seconds[t])
        print(f"{t:>7} | {med:>8.2f} | {runs}  (x{base / med:.2f} of {counts[0]} thread(s))")
    record = {"benchmark": "validate", "started": started.isoformat(), "source": args.source,
              "mesh": meshed, "segments": segments, "errors": len(errors), "per_lod": per_lod, "cores": cores,
              "seconds": {str(t): v for t, v in seconds.items()},
              "median_s": {str(t): statistics.median(v) for t, v in seconds.items()},
              "same_report": True, **environment()}
    if not args.no_save:
        print(f"\nresults: {save_result(record, 'validate', started, args.results_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
