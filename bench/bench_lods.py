#!/usr/bin/env python3
"""How closely the coarse LODs follow LOD 0, with each ``--downsampling`` rule.

Meshes the source once per rule (``auto``: the finer axes only while the voxel is anisotropic;
``all``: every axis at every LOD), in a fresh ``gpumesh mesh`` process each, then compares
every LOD of a random sample of segments with its LOD 0: the relative difference of the
enclosed volume, ``|V_k - V_0| / V_0`` (every LOD is a closed surface, so its volume is
defined), as median and 90th percentile, and how many segments have each number of LODs.
Also the wall time, triangles and bytes of each run.  Volume differences measure what a
coarse LOD merges or loses across the coarse axis: a process one section thick that a 2x2x2
step merges with its neighbour's section grows or vanishes there.

    .venv/bin/python bench/bench_lods.py --voxel-size 8,8,40        # the real volume as 8x8x40 nm

Prints a table and writes ``bench/results/lods-<UTC start>-<hostname>.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_main import (DEFAULT_SOURCE, add_result_args, environment, mesh_with_cli, sample_segments,  # noqa: E402
                        save_result, source_missing)

RULES = ("auto", "all")


def fidelity(dest: str, segments: list) -> dict:
    """Per LOD k >= 1: the segments that have it and the median and 90th percentile of
    ``|V_k - V_0| / V_0``; and the count of segments per number of LODs."""
    from gpumesh import load_mesh, open_mesh

    src = open_mesh(dest)
    errors: dict = {}
    lods = []
    for s in segments:
        n = src.manifest(int(s)).num_lods
        lods.append(n)
        v0 = load_mesh(src, int(s), lod=0).volume
        for k in range(1, n):
            errors.setdefault(k, []).append(abs(load_mesh(src, int(s), lod=k).volume - v0) / v0)
    return {"segments_per_num_lods": {int(n): int(c) for n, c in zip(*np.unique(lods, return_counts=True))},
            "volume_error": {int(k): {"segments": len(e), "median": float(np.median(e)),
                                      "p90": float(np.percentile(e, 90))} for k, e in sorted(errors.items())}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", default=str(DEFAULT_SOURCE))
    p.add_argument("--voxel-size", default="8,8,40", help="nm, x,y,z (default: 8,8,40, anisotropic)")
    p.add_argument("--sample", type=int, default=300, help="segments compared (drawn at random, seed 0)")
    p.add_argument("--workers", type=int, default=None, help="passed to gpumesh --workers")
    p.add_argument("--gpumesh-args", default="", help="more arguments for both runs")
    add_result_args(p)
    args = p.parse_args(argv)
    if source_missing(args.source):
        return 2
    started = _dt.datetime.now(_dt.timezone.utc)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rule in RULES:
            dest = f"{tmp}/{rule}"
            run = mesh_with_cli(args.source, dest, args.voxel_size, ["--downsampling", rule, *args.gpumesh_args.split()],
                                args.workers)
            if rule == RULES[0]:
                sample = sample_segments(dest, args.sample)
            rows[rule] = {**run, **fidelity(dest, sample)}
    print(f"source {args.source}; voxel size {args.voxel_size} nm; {len(sample)} segments compared\n")
    print("downsampling | wall s | bytes    | triangles per LOD (M)      | LOD | segments "
          "| |V_k-V_0|/V_0 median | p90")
    print("-------------+--------+----------+----------------------------+-----+----------"
          "+----------------------+------")
    for rule, r in rows.items():
        tri = " / ".join(f"{t / 1e6:.2f}" for t in r["triangles_per_lod"])
        for i, (k, e) in enumerate(r["volume_error"].items()):
            head = f"{rule:<12} | {r['wall_s']:>6.1f} | {r['bytes'] / 1e6:>6.2f}MB | {tri:<26}" if i == 0 else \
                f"{'':<12} | {'':>6} | {'':>8} | {'':<26}"
            print(f"{head} | {k:>3} | {e['segments']:>8} | {e['median']:>20.4f} | {e['p90']:.4f}")
    for rule, r in rows.items():
        print(f"{rule}: segments per number of LODs {r['segments_per_num_lods']}")
    record = {"benchmark": "lods", "started": started.isoformat(), "source": args.source,
              "voxel_size": args.voxel_size, "sample": sample, "rows": rows, **environment()}
    if not args.no_save:
        print(f"\nresults: {save_result(record, 'lods', started, args.results_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
