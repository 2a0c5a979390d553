"""Octree bookkeeping: Z-order, parent closure and manifests (multi-resolution format).

Spec: "Multi-resolution mesh manifest file format", plus the client's stricter rules:
fragments of each LOD in x, y, z Z-curve order, and every node of LOD ``k`` below the
segment's coarsest LOD has its parent (``position >> 1``) listed at LOD ``k + 1``.
Where such a parent holds no triangles, the writer lists it with a placeholder fragment
(:func:`gpumesh.writer.placeholder_fragments`).
"""

from __future__ import annotations

import struct

import numba
import numpy as np


def segment_nodes(pos: np.ndarray, lods: np.ndarray, num_lods: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The manifest's nodes of one segment, from its fragments.

    Parameters
    ----------
    pos : (n, 3) uint32
        Node position of each fragment (each < 2**21).
    lods : (n,) int
        LOD of each fragment; fragments at LODs >= ``num_lods`` are ignored.
    num_lods : int

    Returns
    -------
    nodes : (m, 3) uint32
        Every fragment's node and every missing parent (so LOD ``k + 1`` lists the parents
        of LOD ``k``'s nodes), LOD 0 first, Z-curve order within a LOD.
    node_lod : (m,) int64
    source : (m,) int64
        The fragment (row of ``pos``) at each node, -1 where the node is an added parent.
    """
    return _segment_nodes(np.ascontiguousarray(pos, dtype=np.uint32),
                          np.ascontiguousarray(lods, dtype=np.int64), int(num_lods))


@numba.njit(cache=True, nogil=True)
def _spread1(v):
    v = np.uint64(v) & np.uint64(0x1FFFFF)
    v = (v | (v << np.uint64(32))) & np.uint64(0x1F00000000FFFF)
    v = (v | (v << np.uint64(16))) & np.uint64(0x1F0000FF0000FF)
    v = (v | (v << np.uint64(8))) & np.uint64(0x100F00F00F00F00F)
    v = (v | (v << np.uint64(4))) & np.uint64(0x10C30C30C30C30C3)
    v = (v | (v << np.uint64(2))) & np.uint64(0x1249249249249249)
    return v


@numba.njit(cache=True, nogil=True)
def _stable_argsort(code):
    """``np.argsort(code, kind="stable")`` of a uint64 array, by a least-significant-digit radix
    sort (8-bit digits, as many as the largest code has).  numba's own ``np.argsort`` took 2-3 s
    to compile cold (in the first writing worker of a fresh install); this, a fraction of one."""
    n = code.shape[0]
    order = np.empty(n, dtype=np.int64)
    for i in range(n):
        order[i] = i
    if n < 2:
        return order
    top = code[0]
    for i in range(n):   # (loops rather than numpy's calls, which numba compiles slower)
        if code[i] > top:
            top = code[i]
    other = np.empty(n, dtype=np.int64)
    count = np.empty(257, dtype=np.int64)
    shift = np.uint64(0)
    while shift < np.uint64(64) and (top >> shift) != np.uint64(0):
        for d in range(257):
            count[d] = 0
        for i in range(n):
            count[((code[i] >> shift) & np.uint64(0xFF)) + np.uint64(1)] += 1
        for d in range(256):
            count[d + 1] += count[d]
        for i in range(n):   # in the order of the lower digits: equal digits keep it (stable)
            o = order[i]
            d = (code[o] >> shift) & np.uint64(0xFF)
            other[count[d]] = o
            count[d] += 1
        order, other = other, order
        shift += np.uint64(8)
    return order


@numba.njit(cache=True, nogil=True)
def _segment_nodes(pos, lods, num_lods):
    n = pos.shape[0]
    cap = n * max(num_lods, 1)
    out_pos = np.empty((cap, 3), dtype=np.uint32)
    out_lod = np.empty(cap, dtype=np.int64)
    out_src = np.empty(cap, dtype=np.int64)
    m = 0
    prev0 = 0
    for k in range(num_lods):
        cnt = 0
        for i in range(n):
            if lods[i] == k:
                cnt += 1
        total = cnt + (m - prev0)
        cpos = np.empty((total, 3), dtype=np.uint32)
        csrc = np.empty(total, dtype=np.int64)
        code = np.empty(total, dtype=np.uint64)
        j = 0
        for i in range(n):   # this LOD's fragments first: they win over an equal parent
            if lods[i] == k:
                for a in range(3):   # element by element: a row copy compiles numba's shape-check error (seconds)
                    cpos[j, a] = pos[i, a]
                csrc[j] = i
                j += 1
        for i in range(prev0, m):
            for a in range(3):
                cpos[j, a] = out_pos[i, a] >> 1
            csrc[j] = -1
            j += 1
        for j in range(total):
            code[j] = _spread1(cpos[j, 0]) | (_spread1(cpos[j, 1]) << np.uint64(1)) | \
                (_spread1(cpos[j, 2]) << np.uint64(2))
        order = _stable_argsort(code)
        start = m
        for t in range(total):
            o = order[t]
            if t > 0 and code[o] == code[order[t - 1]]:
                continue
            for a in range(3):
                out_pos[m, a] = cpos[o, a]
            out_lod[m] = k
            out_src[m] = csrc[o]
            m += 1
        prev0 = start
    return out_pos[:m], out_lod[:m], out_src[:m]


def manifest_head(chunk_shape, grid_origin, lod_scales, vertex_offsets) -> bytes:
    """The start of a binary manifest (``<segment-id>.index``; spec "Multi-resolution mesh
    manifest file format"), up to ``num_fragments_per_lod``: the same for every segment of a
    job with as many LODs.  The manifest is this followed by :func:`manifest_body`.

    Parameters
    ----------
    chunk_shape : (3,) float
        Finest octree node extent in stored-model units.
    grid_origin : (3,) float
        Octree origin in stored-model units.
    lod_scales : (num_lods,) float
    vertex_offsets : (num_lods, 3) float
        Stored-model offset added to each LOD's vertices.

    Returns
    -------
    bytes
        ``24 + 4 + 16 * num_lods`` bytes.
    """
    num_lods = len(lod_scales)
    return b"".join([
        struct.pack("<3f", *map(float, chunk_shape)),
        struct.pack("<3f", *map(float, grid_origin)),
        struct.pack("<I", num_lods),
        np.asarray(lod_scales, dtype="<f4").tobytes(),
        np.asarray(vertex_offsets, dtype="<f4").reshape(num_lods, 3).tobytes(),
    ])


def manifest_body(positions: list[np.ndarray], sizes: list[np.ndarray]) -> bytes:
    """The rest of a manifest after :func:`manifest_head`: ``num_fragments_per_lod``, then each
    LOD's fragment positions (as a (3, n_k) uint32 array) and fragment sizes.

    Parameters
    ----------
    positions : list of (n_k, 3) uint32
        Node positions of each LOD, in Z-curve order.
    sizes : list of (n_k,) int
        Byte size of each node's fragment.

    Returns
    -------
    bytes
    """
    parts = [np.asarray([len(p) for p in positions], dtype="<u4").tobytes()]
    for pos, size in zip(positions, sizes):
        parts.append(np.ascontiguousarray(np.asarray(pos, dtype="<u4").reshape(-1, 3).T).tobytes())
        parts.append(np.asarray(size, dtype="<u4").tobytes())
    return b"".join(parts)
