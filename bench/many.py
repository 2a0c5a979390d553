#!/usr/bin/env python3
"""A synthetic label volume of many small segments, for the assembly's per-segment costs.

``many_segments(n, cube)`` fills an n^3 uint64 volume with one segment per ``cube``^3 block,
each with a distinct random 63-bit ID (seeded, so the same volume every time), and clears
every ``cube``-th x-plane so that neighbouring segments in x do not touch.  With the default
``cube`` 4 it holds (n / 4)^3 segments: 262,144 at n = 256, 2,097,152 at n = 512.  The real
volume has 2523 segments in 512^3, so this one shows every cost that follows the number of
segments (the segment table, manifests, shard indices, segment properties) rather than the
number of voxels.

Run as a script it writes the volume as zarr v3 (axes x, y, z, 64^3 chunks) for
``bench_assembly.py --source`` or ``bench_main.py --source``::

    python bench/many.py /tmp/many256.zarr                 # 256^3, 262,144 segments
    python bench/many.py /tmp/many512.zarr --size 512      # 2,097,152 segments
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def many_segments(n: int, cube: int = 4, seed: int = 0) -> np.ndarray:
    """An (n, n, n) uint64 label volume of (n / cube)^3 segments, as described above.

    Raises
    ------
    ValueError
        ``n`` is not a positive multiple of ``cube``, or ``cube < 2``.
    """
    if cube < 2 or n < cube or n % cube:
        raise ValueError(f"size must be a positive multiple of cube >= 2 (got size {n}, cube {cube})")
    g = n // cube
    rng = np.random.default_rng(seed)
    ids = np.unique(rng.integers(1, 2**63, size=2 * g**3, dtype=np.uint64))   # distinct, sorted
    ids = rng.permutation(ids)[:g**3]
    vol = ids.reshape(g, g, g)
    for axis in range(3):
        vol = np.repeat(vol, cube, axis=axis)
    vol[::cube, :, :] = 0
    return vol


def main(argv=None) -> int:
    from tiled import write_zarr

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dest", help="zarr v3 directory to write")
    p.add_argument("--size", type=int, default=256, help="voxels along each axis (default 256)")
    p.add_argument("--cube", type=int, default=4, help="edge of each segment's block (default 4)")
    p.add_argument("--voxel-size", default="8,8,8", help="nm, x,y,z (default 8,8,8)")
    args = p.parse_args(argv)
    labels = many_segments(args.size, args.cube)
    write_zarr(labels, Path(args.dest), voxel_size=[float(v) for v in args.voxel_size.split(",")], chunk=64)
    print(f"wrote {args.dest}: {labels.shape} {labels.dtype}, {(args.size // args.cube) ** 3} segments")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
