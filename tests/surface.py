"""Exact distances from points to a triangle mesh, and nearest vertices, for tests (no SciPy).

The closest point on a triangle is the textbook region test (vertex, edge or face region, by
barycentric signs).  Triangles are binned by their bounding boxes into a grid of cells, and a
point looks at rings of cells around its own, nearest first, until the next ring cannot hold
a nearer triangle or ``cap`` is passed (a distance past ``cap`` reads as ``cap``).  numba, so that meshes of a few hundred thousand triangles take seconds.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit
def _dot(u, v):
    """``u @ v`` of two 3-vectors, written out: numba's ``@`` calls BLAS, which it takes from SciPy."""
    return u[0] * v[0] + u[1] * v[1] + u[2] * v[2]


@numba.njit
def _closest_on_triangle(p, a, b, c):
    ab = b - a
    ac = c - a
    ap = p - a
    d1 = _dot(ab, ap)
    d2 = _dot(ac, ap)
    if d1 <= 0 and d2 <= 0:
        return a
    bp = p - b
    d3 = _dot(ab, bp)
    d4 = _dot(ac, bp)
    if d3 >= 0 and d4 <= d3:
        return b
    vc = d1 * d4 - d3 * d2
    if vc <= 0 and d1 >= 0 and d3 <= 0:
        return a + ab * (d1 / (d1 - d3))
    cp = p - c
    d5 = _dot(ab, cp)
    d6 = _dot(ac, cp)
    if d6 >= 0 and d5 <= d6:
        return c
    vb = d5 * d2 - d1 * d6
    if vb <= 0 and d2 >= 0 and d6 <= 0:
        return a + ac * (d2 / (d2 - d6))
    va = d3 * d6 - d5 * d4
    if va <= 0 and d4 - d3 >= 0 and d5 - d6 >= 0:
        return b + (c - b) * ((d4 - d3) / ((d4 - d3) + (d5 - d6)))
    denom = 1.0 / (va + vb + vc)
    return a + ab * (vb * denom) + ac * (vc * denom)


@numba.njit
def _bin_triangles(V, F, lo, cell, dims):
    """CSR of the triangles whose bounding box meets each cell."""
    n = dims[0] * dims[1] * dims[2]
    count = np.zeros(n, np.int64)
    start = np.zeros(n + 1, np.int64)
    items = np.empty(0, np.int64)
    a = np.empty(3, np.int64)
    b = np.empty(3, np.int64)
    for fill in range(2):
        if fill:
            for k in range(n):
                start[k + 1] = start[k] + count[k]
            count[:] = 0
            items = np.empty(start[n], np.int64)
        for t in range(len(F)):
            for ax in range(3):
                x0, x1, x2 = V[F[t, 0], ax], V[F[t, 1], ax], V[F[t, 2], ax]
                a[ax] = int(np.floor((min(x0, x1, x2) - lo[ax]) / cell[ax]))
                b[ax] = int(np.floor((max(x0, x1, x2) - lo[ax]) / cell[ax]))
            for x in range(a[0], b[0] + 1):
                for y in range(a[1], b[1] + 1):
                    for z in range(a[2], b[2] + 1):
                        k = (x * dims[1] + y) * dims[2] + z
                        if fill:
                            items[start[k] + count[k]] = t
                        count[k] += 1
    return start, items


@numba.njit
def _distances(points, V, F, lo, cell, dims, start, items, cap):
    out = np.empty(len(points))
    nearest = np.full(len(points), -1, np.int64)
    rings = int(np.ceil(cap / cell.min()))
    for i in range(len(points)):
        p = points[i]
        best = cap * cap
        c = np.floor((p - lo) / cell).astype(np.int64)
        # rings of cells around the point's own, nearest first: once ring s is done, every
        # triangle within s cells' edge of the point has been seen
        for s in range(rings + 1):
            for x in range(max(c[0] - s, 0), min(c[0] + s + 1, dims[0])):
                for y in range(max(c[1] - s, 0), min(c[1] + s + 1, dims[1])):
                    for z in range(max(c[2] - s, 0), min(c[2] + s + 1, dims[2])):
                        if max(abs(x - c[0]), abs(y - c[1]), abs(z - c[2])) != s:
                            continue
                        k = (x * dims[1] + y) * dims[2] + z
                        for j in range(start[k], start[k + 1]):
                            t = items[j]
                            q = _closest_on_triangle(p, V[F[t, 0]], V[F[t, 1]], V[F[t, 2]])
                            d = ((p - q) ** 2).sum()
                            if d < best:
                                best = d
                                nearest[i] = t
            if best <= (s * cell.min()) ** 2:
                break
        out[i] = np.sqrt(best)
    return out, nearest


def distance_to_mesh(points, vertices, faces, cell, cap: float, return_index: bool = False):
    """Distance of each point to the surface ``(vertices, faces)``, and with ``return_index``
    the nearest triangle's row (-1 past ``cap``); triangles ``(i, i, i)`` make it the nearest
    vertex.

    Parameters
    ----------
    points : (p, 3) float
    vertices : (n, 3) float
    faces : (m, 3) int
    cell : (3,) float
        Edge of the grid's cells per axis, in the points' unit (about the triangles' size).
    cap : float
        Distances past it read as ``cap``.

    Returns
    -------
    (p,) float64, and with ``return_index`` (p,) int64
    """
    points = np.ascontiguousarray(points, np.float64).reshape(-1, 3)
    V = np.ascontiguousarray(vertices, np.float64)
    F = np.ascontiguousarray(faces, np.int64).reshape(-1, 3)
    cell = np.asarray(cell, np.float64)
    if len(F) == 0:
        d = np.full(len(points), float(cap))
        return (d, np.full(len(points), -1, np.int64)) if return_index else d
    lo = np.minimum(points.min(axis=0), V.min(axis=0)) - cell
    hi = np.maximum(points.max(axis=0), V.max(axis=0)) + cell
    dims = np.floor((hi - lo) / cell).astype(np.int64) + 1
    start, items = _bin_triangles(V, F, lo, cell, dims)
    d, nearest = _distances(points, V, F, lo, cell, dims, start, items, float(cap))
    return (d, nearest) if return_index else d


def nearest_vertex(points, vertices, cell, cap: float):
    """Distance of each point to the nearest of ``vertices`` and that vertex's row (-1 past
    ``cap``): a k-d tree's query, for tests, without SciPy."""
    i = np.arange(len(vertices), dtype=np.int64)
    return distance_to_mesh(points, vertices, np.stack([i, i, i], axis=1), cell, cap, return_index=True)


def square_faces(centers, axes):
    """Unit squares (voxel faces) as triangles: ``centers`` (F, 3), ``axes`` (F,) the axis each
    is normal to; returns vertices (4F, 3) and faces (2F, 3)."""
    centers = np.asarray(centers, np.float64)
    axes = np.asarray(axes, np.int64)
    u, w = (axes + 1) % 3, (axes + 2) % 3
    rows = np.arange(len(centers))
    corners = []
    for su, sw in ((-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5)):
        c = centers.copy()
        c[rows, u] += su
        c[rows, w] += sw
        corners.append(c)
    V = np.stack(corners, axis=1).reshape(-1, 3)
    b = 4 * rows[:, None]
    F = np.concatenate([b + np.array([0, 1, 2]), b + np.array([0, 2, 3])])
    return V, F


def surface_samples(vertices, faces) -> np.ndarray:
    """Points of a surface: its vertices and its triangles' centroids."""
    tri = np.asarray(vertices, np.float64)[np.asarray(faces, np.int64)]
    return np.concatenate([np.asarray(vertices, np.float64), tri.mean(axis=1)])


def hausdorff(v_a, f_a, v_b, f_b, cell, cap: float) -> tuple[float, float]:
    """Largest distance from surface A's samples to surface B, and from B's to A (capped)."""
    ab = distance_to_mesh(surface_samples(v_a, f_a), v_b, f_b, cell, cap)
    ba = distance_to_mesh(surface_samples(v_b, f_b), v_a, f_a, cell, cap)
    return float(ab.max(initial=0.0)), float(ba.max(initial=0.0))
