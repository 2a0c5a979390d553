"""Levels of detail: label downsampling (CPU) and decimation (pyfqmr).

Downsampling rule
-----------------
LOD ``k`` is meshed from the labels downsampled by ``2**k``; each step maps a 2x2x2 block to
one voxel with the **mode of its non-zero labels** (ties: the smaller segment ID; background
only when all eight voxels are 0).  Background never wins over a segment, so a thin process
that is surrounded by extracellular space (label 0) does not vanish when it is coarsened; it
can only be absorbed by a neighbouring segment that covers more of the block.  Every voxel
labelled ``s`` at LOD ``k`` contains at least one voxel labelled ``s`` at LOD ``k - 1``, so the
coarse surface of ``s`` stays within ``2**k`` voxels of its LOD 0 surface.  A segment that
does vanish at some LOD gets fewer LODs (its coarsest LOD is the last one where it has
triangles).  The CUDA kernel applies the same rule.

Decimation
----------
Each LOD's pieces are decimated with pyfqmr (fast quadric mesh simplification) in nm, so the
error metric respects anisotropic voxels, with ``preserve_border=True``: the open borders
where neighbouring fragments (and the 2x2x2 sub-grid pieces of a LOD > 0 fragment) meet
keep their vertices, so fragments of one LOD still share border vertices exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import pyfqmr


@numba.njit(cache=True, nogil=True)
def _downsample2(labels, out):
    nx, ny, nz = out.shape
    sx, sy, sz = labels.shape
    v = np.empty(8, dtype=labels.dtype)
    for i in range(nx):
        for j in range(ny):
            for k in range(nz):
                n = 0
                for dx in range(2):
                    x = 2 * i + dx
                    for dy in range(2):
                        y = 2 * j + dy
                        for dz in range(2):
                            z = 2 * k + dz
                            if x < sx and y < sy and z < sz:
                                val = labels[x, y, z]
                                if val != 0:
                                    v[n] = val
                                    n += 1
                if n == 0:
                    out[i, j, k] = 0
                    continue
                best = v[0]
                best_count = 0
                for a in range(n):
                    c = 0
                    for b in range(n):
                        if v[b] == v[a]:
                            c += 1
                    if c > best_count or (c == best_count and v[a] < best):
                        best = v[a]
                        best_count = c
                out[i, j, k] = best


def downsample_labels(labels: np.ndarray) -> np.ndarray:
    """Downsample labels by 2 on each axis with the non-zero mode rule (see module docs).

    Parameters
    ----------
    labels : (nx, ny, nz) unsigned integer ndarray
        Axes x, y, z.  Odd sizes are allowed: the last, partial block uses the voxels it has.

    Returns
    -------
    (ceil(nx/2), ceil(ny/2), ceil(nz/2)) ndarray of the same dtype.
    """
    labels = np.ascontiguousarray(labels)
    out = np.empty(tuple((s + 1) // 2 for s in labels.shape), dtype=labels.dtype)
    _downsample2(labels, out)
    return out


@dataclass(frozen=True)
class Quality:
    """Decimation targets of a quality preset.

    Attributes
    ----------
    name : str
    lod0_keep : float
        Fraction of LOD 0 triangles kept (1.0: LOD 0 is the exact marching-cubes surface).
    lod_keep : float
        Fraction of triangles kept at each LOD > 0 (of that LOD's own marching-cubes surface,
        which is already about 4x smaller per LOD since it is meshed from coarser labels).
    """

    name: str
    lod0_keep: float
    lod_keep: float

    def keep(self, lod: int) -> float:
        """Fraction of triangles kept at ``lod``."""
        return self.lod0_keep if lod == 0 else self.lod_keep


#: The quality presets.  ``high`` leaves LOD 0 undecimated.
QUALITY_PRESETS = {
    "low": Quality("low", lod0_keep=0.25, lod_keep=0.2),
    "medium": Quality("medium", lod0_keep=0.4, lod_keep=0.3),
    "high": Quality("high", lod0_keep=1.0, lod_keep=0.5),
}

#: Pieces with fewer triangles than this are left as they are.
MIN_DECIMATE_TRIANGLES = 16


def get_quality(name: "str | Quality") -> Quality:
    """Look up a preset by name.

    Raises
    ------
    ValueError
        For an unknown preset name.
    """
    if isinstance(name, Quality):
        return name
    try:
        return QUALITY_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown quality preset {name!r}; choose one of {sorted(QUALITY_PRESETS)}") from None


def decimate(vertices: np.ndarray, faces: np.ndarray, keep: float, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Decimate a mesh piece with pyfqmr, keeping its open borders.

    Parameters
    ----------
    vertices : (n, 3) float64
        Positions in any unit; multiplied by ``scale`` for the error metric.
    faces : (m, 3) int
    keep : float
        Target fraction of triangles kept, in (0, 1].  1.0 returns the input unchanged.
    scale : (3,) float64
        Per-axis factor to nm (voxel size times ``2**lod``), so the quadric error is isotropic
        in physical space.

    Returns
    -------
    vertices : (n', 3) float64, in the input unit
    faces : (m', 3) int32
    """
    if keep >= 1.0 or len(faces) < MIN_DECIMATE_TRIANGLES:
        return vertices, faces.astype(np.int32, copy=False)
    target = max(4, int(round(len(faces) * keep)))
    simplifier = pyfqmr.Simplify()
    simplifier.setMesh(vertices * scale, faces)
    simplifier.simplify_mesh(target_count=target, aggressiveness=7, preserve_border=True, verbose=False)
    v, f, _ = simplifier.getMesh()
    return v / scale, f.astype(np.int32, copy=False)
