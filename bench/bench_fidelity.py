#!/usr/bin/env python3
"""How far decimation moves LOD 0 from the exact marching-cubes surface, per quality preset.

Meshes the source with ``--quality high`` (LOD 0 undecimated: the exact surface) and with
each preset compared, in a fresh ``gpumesh mesh`` process each, then, for a random sample of
segments, the largest distance from the exact LOD 0 to the preset's LOD 0 and back (exact
point-to-triangle distances from each surface's vertices and triangle centroids;
``tests/surface.py``), in voxels of the smallest voxel axis: median, 90th and 99th
percentile and largest over the segments.  meshoptimizer's error bound, half a voxel, is its
quadric measure, so these distances are what a viewer sees.  Also the wall time, triangles
and bytes of each run.

    .venv/bin/python bench/bench_fidelity.py                       # the real volume, 32x32x40 nm

Prints a table and writes ``bench/results/fidelity-<UTC start>-<hostname>.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from bench_main import (DEFAULT_SOURCE, add_result_args, environment, mesh_with_cli, sample_segments,  # noqa: E402
                        save_result, source_missing)
from surface import hausdorff  # noqa: E402

#: Distances past this many voxels read as it.
CAP_VOXELS = 8.0


def distances(exact_dest: str, dest: str, segments: list, voxel_size: np.ndarray) -> dict:
    """Per segment, the largest distance each way between the two LOD 0 surfaces (voxels)."""
    from gpumesh import load_mesh, open_mesh

    exact_src, src = open_mesh(exact_dest), open_mesh(dest)
    unit = float(voxel_size.min())
    there, back = [], []
    for s in segments:
        a, b = load_mesh(exact_src, int(s), lod=0), load_mesh(src, int(s), lod=0)
        d1, d2 = hausdorff(a.vertices, a.faces, b.vertices, b.faces, cell=voxel_size / 2,
                           cap=CAP_VOXELS * unit)
        there.append(d1 / unit)
        back.append(d2 / unit)
    both = np.maximum(there, back)

    def stats(x):
        return {"median": float(np.median(x)), "p90": float(np.percentile(x, 90)),
                "p99": float(np.percentile(x, 99)), "max": float(np.max(x))}

    return {"exact_to_preset": stats(there), "preset_to_exact": stats(back), "either": stats(both),
            "worst_segment": int(segments[int(np.argmax(both))]),
            "note": f"voxels of {unit:g} nm; distances past {CAP_VOXELS:g} read as it"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", default=str(DEFAULT_SOURCE))
    p.add_argument("--voxel-size", default="32,32,40", help="nm, x,y,z (default: the real volume's)")
    p.add_argument("--presets", default="medium,low", help="presets compared with high (comma-separated)")
    p.add_argument("--sample", type=int, default=200, help="segments compared (drawn at random, seed 0)")
    p.add_argument("--workers", type=int, default=None, help="passed to gpumesh --workers")
    p.add_argument("--gpumesh-args", default="", help="more arguments for every run")
    add_result_args(p)
    args = p.parse_args(argv)
    if source_missing(args.source):
        return 2
    voxel_size = np.asarray([float(x) for x in args.voxel_size.split(",")])
    started = _dt.datetime.now(_dt.timezone.utc)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for preset in ["high", *args.presets.split(",")]:
            dest = f"{tmp}/{preset}"
            rows[preset] = mesh_with_cli(args.source, dest, args.voxel_size,
                                         ["--quality", preset, *args.gpumesh_args.split()], args.workers)
            if preset == "high":
                sample = sample_segments(dest, args.sample)
            else:
                rows[preset]["lod0_distance_voxels"] = distances(f"{tmp}/high", dest, sample, voxel_size)
    print(f"source {args.source}; voxel size {args.voxel_size} nm; {len(sample)} segments compared; "
          f"LOD 0 against the exact surface (high), per segment the largest distance, in "
          f"{voxel_size.min():g} nm voxels\n")
    print("preset | wall s | bytes    | LOD 0 triangles (M) | exact->preset median / p90 / p99 / max "
          "| preset->exact median / p90 / p99 / max")
    print("-------+--------+----------+---------------------+----------------------------------------"
          "+---------------------------------------")
    for preset, r in rows.items():
        d = r.get("lod0_distance_voxels")
        cols = ["", ""] if d is None else [
            " / ".join(f"{d[w][q]:.2f}" for q in ("median", "p90", "p99", "max")) for w in ("exact_to_preset",
                                                                                            "preset_to_exact")]
        print(f"{preset:<6} | {r['wall_s']:>6.1f} | {r['bytes'] / 1e6:>6.2f}MB | {r['triangles_per_lod'][0] / 1e6:>19.2f} "
              f"| {cols[0]:<38} | {cols[1]}")
    record = {"benchmark": "fidelity", "started": started.isoformat(), "source": args.source,
              "voxel_size": args.voxel_size, "sample": sample, "rows": rows, **environment()}
    if not args.no_save:
        print(f"\nresults: {save_result(record, 'fidelity', started, args.results_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
