"""The marching-cubes case table, generated (not typed in) with one consistent rule.

Corner ``c`` of a cube sits at offset ``(c & 1, (c >> 1) & 1, (c >> 2) & 1)``.  Edge ``e`` runs
along axis ``a = e // 4`` from corner ``base(e)`` to ``base(e) | (1 << a)``, where ``base(e)`` is
the ``e % 4``-th corner whose bit ``a`` is 0.  A case index has bit ``c`` set when corner ``c`` is
inside the segment.

Rule: on every cube face, the inside corners are kept apart (a face whose two inside corners
sit on a diagonal gets two segments, each cutting off one inside corner).  The rule depends
only on the face's four corners, so both cubes that share a face draw the same segments on it,
and every surface is a closed, oriented 2-manifold (inside is 6-connected, outside
18/26-connected).  The face segments of a cube chain into loops; each loop is triangulated
without a diagonal that lies in a cube face (such a diagonal could coincide with one drawn by
the neighbouring cube), and oriented so that normals point from inside to outside.

The table is built once and shared by the CPU kernel and the CUDA kernel, so both backends
emit the same triangles.  Building it takes about 0.17 s, which every process that meshes
paid at import (the CLI, the worker server, a spawned worker), so the result is kept on disk
beside this file (``__pycache__/mctable-<hash of this file>.npy``, as numba keeps its kernels)
and loaded from there when this file is unchanged; see :func:`load_table`.
"""

from __future__ import annotations

import functools
import hashlib
import os
import uuid
from pathlib import Path
from typing import Optional

import numpy as np

CORNERS = np.array([[c & 1, (c >> 1) & 1, (c >> 2) & 1] for c in range(8)], dtype=np.int64)


def _edges() -> list[tuple[int, int, int]]:
    """(axis, corner0, corner1) for the 12 cube edges, in edge-index order."""
    out = []
    for axis in range(3):
        bases = [c for c in range(8) if not (c >> axis) & 1]
        for c in bases:
            out.append((axis, c, c | (1 << axis)))
    return out


EDGES = _edges()
#: (12, 3) int64: for edge e, the offset of its base corner (doubled units add the axis unit).
EDGE_BASE = np.array([CORNERS[c0] for _, c0, _ in EDGES], dtype=np.int64)
#: (12,) int64: the axis of each edge.
EDGE_AXIS = np.array([a for a, _, _ in EDGES], dtype=np.int64)
#: (12, 3) int64: edge midpoints in doubled cube units (2 * base + axis unit).
EDGE_MID2 = 2 * EDGE_BASE + np.eye(3, dtype=np.int64)[EDGE_AXIS]


def _edge_index(c0: int, c1: int) -> int:
    lo, hi = min(c0, c1), max(c0, c1)
    for e, (_, a, b) in enumerate(EDGES):
        if (a, b) == (lo, hi):
            return e
    raise KeyError((c0, c1))


def _faces() -> list[list[int]]:
    """The 6 faces as corner cycles (each in a cyclic order around the face)."""
    faces = []
    for axis in range(3):
        u, v = [a for a in range(3) if a != axis]
        for side in (0, 1):
            cyc = []
            for du, dv in ((0, 0), (1, 0), (1, 1), (0, 1)):
                cyc.append((side << axis) | (du << u) | (dv << v))
            faces.append(cyc)
    return faces


FACES = _faces()
# Edges lying on each face; two edge midpoints share a face iff their edges do.
_FACE_EDGES = [
    {_edge_index(cyc[i], cyc[(i + 1) % 4]) for i in range(4)} for cyc in FACES
]


def _share_face(e0: int, e1: int) -> bool:
    return any(e0 in fe and e1 in fe for fe in _FACE_EDGES)


def _face_segments(case: int) -> list[tuple[int, int]]:
    """Segments (edge, edge) drawn on the six faces for a case, inside corners kept apart."""
    segs = []
    for cyc in FACES:
        inside = [(case >> c) & 1 for c in cyc]
        if all(inside) or not any(inside):
            continue
        # Walk the face boundary; each maximal run of inside corners is cut off by one segment
        # from the crossing edge where the run starts to the crossing edge where it ends.
        start = next(i for i in range(4) if not inside[i])  # begin on an outside corner
        i = 0
        while i < 4:
            k = (start + i) % 4
            if inside[k]:
                enter = _edge_index(cyc[(k - 1) % 4], cyc[k])
                j = i
                while inside[(start + j) % 4]:
                    j += 1
                last = (start + j - 1) % 4
                leave = _edge_index(cyc[last], cyc[(last + 1) % 4])
                segs.append((enter, leave))
                i = j
            else:
                i += 1
    return segs


def _loops(segs: list[tuple[int, int]]) -> list[list[int]]:
    adj: dict[int, list[int]] = {}
    for a, b in segs:
        adj.setdefault(a, []).append(b)
        adj.setdefault(b, []).append(a)
    assert all(len(v) == 2 for v in adj.values()), "each crossing point must have degree 2"
    seen: set[int] = set()
    loops = []
    for startv in sorted(adj):
        if startv in seen:
            continue
        loop = [startv]
        seen.add(startv)
        prev, cur = None, startv
        while True:
            nxts = [n for n in adj[cur] if n != prev] if prev is not None else [adj[cur][0]]
            nxt = nxts[0]
            if nxt == startv:
                break
            loop.append(nxt)
            seen.add(nxt)
            prev, cur = cur, nxt
        loops.append(loop)
    return loops


@functools.lru_cache(maxsize=None)
def _triangulations(n: int) -> tuple[tuple[tuple[int, int, int], ...], ...]:
    """All triangulations of a convex n-gon with vertices 0..n-1 (as index triples)."""

    def rec(i: int, j: int) -> list[list[tuple[int, int, int]]]:
        if j - i < 2:
            return [[]]
        out = []
        for k in range(i + 1, j):
            for left in rec(i, k):
                for right in rec(k, j):
                    out.append(left + [(i, k, j)] + right)
        return out

    return tuple(tuple(t) for t in rec(0, n - 1))


def _triangulate(loop: list[int]) -> list[tuple[int, int, int]]:
    return [tuple(t) for t in _triangulate_loop(tuple(loop))]


@functools.lru_cache(maxsize=None)
def _triangulate_loop(loop: tuple) -> tuple:
    n = len(loop)
    pts = EDGE_MID2[list(loop)].astype(float)

    @functools.lru_cache(maxsize=None)
    def triangle_score(a: int, b: int, c: int) -> tuple[int, float]:
        # (diagonals lying in a cube face, smallest angle) of one triangle of the loop
        bad = 0
        min_angle = np.pi
        for p, q in ((a, b), (b, c), (a, c)):
            if (q - p) % n not in (1, n - 1) and _share_face(loop[p], loop[q]):
                bad += 1
        for p, q, r in ((a, b, c), (b, c, a), (c, a, b)):
            u, v = pts[q] - pts[p], pts[r] - pts[p]
            cosang = np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v))
            min_angle = min(min_angle, float(np.arccos(np.clip(cosang, -1, 1))))
        return bad, min_angle

    best, best_score = None, None
    for tri in _triangulations(n):
        bad = 0
        min_angle = np.pi
        for a, b, c in tri:
            tbad, tmin = triangle_score(a, b, c)
            bad += tbad
            min_angle = min(min_angle, tmin)
        score = (bad, -round(min_angle, 9))
        if best_score is None or score < best_score:
            best, best_score = tri, score
    assert best_score[0] == 0, f"no face-safe triangulation for loop {list(loop)}"
    return tuple((loop[a], loop[b], loop[c]) for a, b, c in best)


def _orient(tris: list[tuple[int, int, int]], case: int) -> list[tuple[int, int, int]]:
    """Orient a loop's triangles so normals point from the inside corners to the outside."""
    edges = {e for t in tris for e in t}
    direction = np.zeros(3)
    for e in edges:
        _, c0, c1 = EDGES[e]
        # vector from the inside corner to the outside corner of the crossing edge
        inside0 = (case >> c0) & 1
        v = CORNERS[c1] - CORNERS[c0]
        direction += v if inside0 else -v
    normal = np.zeros(3)
    for a, b, c in tris:
        pa, pb, pc = EDGE_MID2[a], EDGE_MID2[b], EDGE_MID2[c]
        normal += np.cross(pb - pa, pc - pa)
    if np.dot(normal, direction) < 0:
        tris = [(a, c, b) for a, b, c in tris]
    return tris


def build_table() -> tuple[np.ndarray, np.ndarray]:
    """Build the case table.

    Returns
    -------
    counts : (256,) int32
        Number of triangles for each case.
    tris : (256, MAX_TRIS, 3) int8
        Edge indices of each triangle (unused rows are -1).
    """
    per_case = []
    for case in range(256):
        tris: list[tuple[int, int, int]] = []
        for loop in _loops(_face_segments(case)):
            tris.extend(_orient(_triangulate(loop), case))
        per_case.append(tris)
    max_tris = max(len(t) for t in per_case)
    counts = np.array([len(t) for t in per_case], dtype=np.int32)
    table = np.full((256, max_tris, 3), -1, dtype=np.int8)
    for case, tris in enumerate(per_case):
        for i, t in enumerate(tris):
            table[case, i] = t
    return counts, table


def _pack(counts: np.ndarray, table: np.ndarray) -> np.ndarray:
    """One (256, 1 + 3 * max_tris) int8 array: each case's count, then its triangles."""
    return np.concatenate([counts.astype(np.int8)[:, None], table.reshape(256, -1)], axis=1)


def _unpack(packed: np.ndarray) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """The (counts, table) of :func:`_pack`'s array, or None when it is not a well-formed
    table (wrong shape or dtype, a count that disagrees with its rows, rows cut short)."""
    if packed.dtype != np.int8 or packed.ndim != 2 or packed.shape[0] != 256 or (packed.shape[1] - 1) % 3:
        return None
    counts = packed[:, 0].astype(np.int32)
    table = np.ascontiguousarray(packed[:, 1:].reshape(256, -1, 3))
    rows = np.arange(table.shape[1])[None, :] < counts[:, None]
    if table.shape[1] != counts.max() or not (np.all((table >= 0) == rows[:, :, None]) and table.max() < 12):
        return None
    return counts, table


def table_cache_path() -> Path:
    """Where :func:`load_table` keeps the built table: named by a hash of this file."""
    here = Path(__file__)
    digest = hashlib.sha256(here.read_bytes()).hexdigest()[:16]
    return here.parent / "__pycache__" / f"mctable-{digest}.npy"


def load_table() -> tuple[np.ndarray, np.ndarray]:
    """:func:`build_table`'s result, from the on-disk copy when this file is unchanged.

    The copy is named by a hash of this file, so any change to the rule builds the table
    anew; it is written atomically (a temporary file renamed), and one that cannot be read or
    is not a well-formed table is ignored.  Where the directory is not writable the table is
    built at every import, as before.

    Returns
    -------
    counts : (256,) int32
    tris : (256, MAX_TRIS, 3) int8
        As :func:`build_table`.
    """
    try:
        path = table_cache_path()
    except OSError:
        return build_table()
    try:
        got = _unpack(np.load(path, allow_pickle=False))
        if got is not None:
            return got
    except (OSError, ValueError, EOFError):
        pass
    counts, table = build_table()
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        path.parent.mkdir(exist_ok=True)
        with open(tmp, "wb") as f:
            np.save(f, _pack(counts, table), allow_pickle=False)
        os.replace(tmp, path)
    except OSError:
        try:
            tmp.unlink()
        except OSError:
            pass
    return counts, table


TRI_COUNTS, TRI_TABLE = load_table()
