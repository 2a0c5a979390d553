#!/usr/bin/env python3
"""A larger label volume tiled from the real one, for the benchmarks (issue 5: 1024^3).

``tile_volume(labels, n)`` repeats an (sx, sy, sz) label volume n times along each axis and
relabels each tile so that segment IDs stay distinct: tile ``t`` (0 .. n^3 - 1, x slowest)
maps every non-zero ID ``v`` to ``v + t * (max ID + 1)``; background stays 0.  The dtype is
the source's when the largest new ID fits, else uint64.

Run as a script it writes the tiled volume as zarr v3 (axes x, y, z, 128^3 chunks, the
source's voxel size) for ``bench_main.py --source``::

    python bench/tiled.py /tmp/tiled1024.zarr            # 2x2x2 tiles of the real volume
    python bench/tiled.py DEST --tiles 2 --source SRC
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def tile_volume(labels: np.ndarray, n: int) -> np.ndarray:
    """Tile ``labels`` (sx, sy, sz) into (n*sx, n*sy, n*sz), one ID range per tile.

    Raises
    ------
    ValueError
        ``labels`` is not a 3-D unsigned integer array, or ``n < 1``.
    """
    if labels.ndim != 3 or labels.dtype.kind != "u":
        raise ValueError(f"need 3-D unsigned labels (got {labels.dtype}, shape {labels.shape})")
    if n < 1:
        raise ValueError(f"tiles must be >= 1 (got {n})")
    step = int(labels.max()) + 1
    top = step * n**3
    dtype = labels.dtype if top <= np.iinfo(labels.dtype).max else np.dtype(np.uint64)
    sx, sy, sz = labels.shape
    out = np.empty((n * sx, n * sy, n * sz), dtype)
    src = labels.astype(dtype, copy=False)
    nz = src != 0
    for t in range(n**3):
        a, b, c = t // (n * n), (t // n) % n, t % n
        tile = out[a * sx:(a + 1) * sx, b * sy:(b + 1) * sy, c * sz:(c + 1) * sz]
        np.copyto(tile, src)
        if t:
            tile[nz] += dtype.type(t * step)
    return out


def write_zarr(labels: np.ndarray, path: Path, voxel_size=(32.0, 32.0, 40.0), chunk: int = 128) -> None:
    """Write labels (axes x, y, z) as a zarr v3 array with gpumesh's voxel-size attributes."""
    import tensorstore as ts

    spec = {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": str(path)},
        "metadata": {
            "shape": list(labels.shape),
            "data_type": str(labels.dtype),
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [chunk] * 3}},
            "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                       {"name": "zstd", "configuration": {"level": 3, "checksum": False}}],
            "dimension_names": ["x", "y", "z"],
            "attributes": {"voxel_size_nm": list(voxel_size)},  # as the real volume has it
        },
        "create": True,
        "delete_existing": True,
    }
    store = ts.open(spec).result()
    store.write(labels).result()


def main(argv=None) -> int:
    import bench_main

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dest", help="zarr v3 directory to write")
    p.add_argument("--source", default=None, help="label volume (default: the real volume)")
    p.add_argument("--tiles", type=int, default=2, help="tiles along each axis")
    args = p.parse_args(argv)
    labels = bench_main.load_volume(bench_main.resolve_source(args.source))
    out = tile_volume(labels, args.tiles)
    write_zarr(out, Path(args.dest))
    print(f"wrote {args.dest}: {out.shape} {out.dtype}, {len(np.unique(out)) - 1} segments")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
