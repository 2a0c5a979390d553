#!/usr/bin/env python3
"""Ad-hoc meshing of one segment: gpumesh's ``mesh_segment`` against zmesh, on the real volume.

Issue 4 asks for one segment of the 512³ real volume "within about a second on the CPU
path". This measures it for segments of several sizes (the 10th, 50th, 90th and 99th
percentile of the voxel counts, and the largest), each timed ``--repeat`` times after one
warm-up call (median; the first call of the process, numba's kernels loading, is reported on
its own):

* ``gpumesh scan``: ``mesh_segment(volume, id)``: finds the segment's bounding box by
  scanning the volume, reads it and meshes it (what a user calls);
* ``gpumesh bbox``: ``mesh_segment(volume, id, bbox=box)``: the box given;
* ``zmesh bbox``: the peer with the same box given: read it with TensorStore,
  ``zmesh.Mesher(voxel_size).mesh(box == id, close=True)`` and ``get(1, normals=False)``
  (unsimplified; the exact marching-cubes surface, as ``mesh_segment`` returns by default).

The box is found once with :func:`gpumesh.adhoc.find_segment_bbox`, before the clock.
Both meshes are checked to be closed and have their triangle counts recorded.

    .venv/bin/python bench/bench_adhoc.py                 # the real volume, 5 repeats
    .venv/bin/python bench/bench_adhoc.py --device gpu    # gpumesh on the GPU

Prints a table and writes ``bench/results/adhoc-<UTC start>-<host>.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_main import (DEFAULT_SOURCE, REPO_ROOT, add_result_args, device_info, environment,  # noqa: E402
                        save_result, source_missing)

sys.path.insert(0, str(REPO_ROOT))

PERCENTILES = (10, 50, 90, 99, 100)


def pick_segments(volume, percentiles=PERCENTILES) -> list[tuple[int, int]]:
    """``(segment ID, voxels)`` at the given percentiles of the voxel counts (100: the largest)."""
    labels = volume.read((0, 0, 0), tuple(volume.shape))
    ids, counts = np.unique(labels[labels != 0], return_counts=True)
    order = np.argsort(counts, kind="stable")
    out = []
    for p in percentiles:
        i = order[min(len(order) - 1, int(round(p / 100 * (len(order) - 1))))]
        out.append((int(ids[i]), int(counts[i])))
    return out


def closed(faces: np.ndarray) -> bool:
    """Every undirected edge in exactly two triangles."""
    f = np.asarray(faces, dtype=np.int64)
    e = np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), axis=1)
    _, n = np.unique(e, axis=0, return_counts=True)
    return bool(len(f)) and bool((n == 2).all())


def timed(fn, repeat: int) -> tuple[float, object]:
    """Median seconds of ``repeat`` calls of ``fn`` after one warm-up call, and its result."""
    result = fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def main(argv=None) -> int:
    from gpumesh.adhoc import find_segment_bbox, mesh_segment
    from gpumesh.volume import open_volume

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", default=str(DEFAULT_SOURCE))
    p.add_argument("--repeat", type=int, default=5, help="timed calls per segment and tool (median)")
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu", "auto"], help="gpumesh's backend")
    p.add_argument("--segments", default=",".join(map(str, PERCENTILES)),
                   help="percentiles of the voxel counts to pick segments at (100: the largest)")
    p.add_argument("--ids", default="", help="segment IDs to time instead (comma-separated)")
    p.add_argument("--skip-zmesh", action="store_true")
    add_result_args(p)
    args = p.parse_args(argv)
    if source_missing(args.source):
        return 2
    started = _dt.datetime.now(_dt.timezone.utc)
    volume = open_volume(args.source)
    voxel_size = tuple(float(v) for v in volume.voxel_size)
    if args.ids:
        segments = [(int(s), None) for s in args.ids.split(",")]
    else:
        segments = pick_segments(volume, [float(s) for s in args.segments.split(",")])

    first_seg = segments[0][0]
    t0 = time.perf_counter()
    mesh_segment(volume, first_seg, device=args.device)
    first_call = time.perf_counter() - t0

    zmesh = None
    if not args.skip_zmesh:
        try:
            import zmesh
        except ImportError:
            print("zmesh not installed: its column is left out", file=sys.stderr)
            zmesh = None

    rows = []
    for seg, voxels in segments:
        box = find_segment_bbox(volume, seg)
        if box is None:
            raise SystemExit(f"segment {seg} does not occur in {args.source}")
        if voxels is None:
            voxels = int((volume.read(box[0], box[1]) == np.asarray(seg).astype(volume.dtype)).sum())
        row = {"segment": seg, "voxels": voxels, "bbox": box,
               "bbox_voxels": int(np.prod(np.subtract(box[1], box[0])))}
        s, mesh = timed(lambda: mesh_segment(volume, seg, device=args.device), args.repeat)
        row["gpumesh_scan_s"] = s
        s, mesh = timed(lambda: mesh_segment(volume, seg, bbox=box, device=args.device), args.repeat)
        row["gpumesh_bbox_s"] = s
        row["gpumesh_triangles"] = len(mesh.faces)
        row["gpumesh_closed"] = closed(mesh.faces)
        if zmesh is not None:
            def zmesh_one():
                cut = volume.read(box[0], box[1]) == np.asarray(seg).astype(volume.dtype)
                mesher = zmesh.Mesher(voxel_size)
                mesher.mesh(np.asfortranarray(cut.astype(np.uint8)), close=True)
                return mesher.get(1, normals=False)
            s, zm = timed(zmesh_one, args.repeat)
            row["zmesh_bbox_s"] = s
            row["zmesh_triangles"] = len(zm.faces)
            row["zmesh_closed"] = closed(zm.faces)
            row["zmesh_over_gpumesh_bbox"] = s / row["gpumesh_bbox_s"]
        rows.append(row)

    print(f"\nad-hoc meshing, {args.source} ({volume.shape[0]}x{volume.shape[1]}x{volume.shape[2]} "
          f"{np.dtype(volume.dtype).name}), gpumesh on {args.device}, median of {args.repeat}; "
          f"first call of the process {first_call:.2f} s")
    head = f"{'segment':>12} {'voxels':>10} {'box voxels':>11} {'scan s':>7} {'bbox s':>7} {'triangles':>10}"
    if zmesh is not None:
        head += f" {'zmesh s':>8} {'zmesh tri':>10} {'zmesh/gpumesh':>14}"
    print(head)
    for r in rows:
        line = (f"{r['segment']:>12} {r['voxels']:>10,} {r['bbox_voxels']:>11,} {r['gpumesh_scan_s']:>7.3f} "
                f"{r['gpumesh_bbox_s']:>7.3f} {r['gpumesh_triangles']:>10,}")
        if zmesh is not None:
            line += f" {r['zmesh_bbox_s']:>8.3f} {r['zmesh_triangles']:>10,} {r['zmesh_over_gpumesh_bbox']:>13.2f}x"
        print(line)
    record = {
        "benchmark": "adhoc",
        "started_utc": started.isoformat(),
        "device": device_info() if args.device != "cpu" else "cpu",
        **environment(),
        "options": {"source": args.source, "repeat": args.repeat, "device": args.device,
                    "voxel_size_nm": voxel_size, "percentiles": None if args.ids else args.segments,
                    "ids": args.ids or None},
        "first_call_s": first_call,
        "rows": rows,
    }
    if not args.no_save:
        print(f"wrote {save_result(record, 'adhoc', started, args.results_dir)}")
    return 0 if all(r["gpumesh_closed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
