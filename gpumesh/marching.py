"""Multi-label marching cubes on the CPU (numba), and welding into indexed meshes.

Geometry convention (shared with the CUDA kernel in ``kernels/marching_cubes.cu``):

* ``labels`` is a block of one LOD's labels, axes x, y, z, with a one-voxel halo on the
  *low* side: array index ``a`` holds voxel ``origin - 1 + a`` of that LOD.
* Cube ``c`` (local) lies between array indices ``c`` and ``c + 1`` on each axis, so a block of
  ``n + 1`` voxels has ``n`` cubes.  Globally, cube ``j`` lies between voxels ``j - 1`` and ``j``.
* For every distinct non-zero label among a cube's 8 corners, the case of that label's
  indicator is looked up in :mod:`gpumesh.mctable` and its triangles are emitted.  Every vertex
  is the exact midpoint of a lattice edge whose two voxels differ in that label, so two
  neighbouring segments share the same surface where they touch.
* A vertex is named by its lattice edge: ``edge_id = ((bx * ny + by) * nz + bz) * 3 + axis``
  with ``(bx, by, bz)`` the edge's lower lattice point (array index).  Welding by edge id, not
  by floating-point position, is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from .mctable import EDGE_AXIS, EDGE_BASE, TRI_COUNTS, TRI_TABLE

_EDGE_BASE = np.ascontiguousarray(EDGE_BASE.astype(np.int64))
_EDGE_AXIS = np.ascontiguousarray(EDGE_AXIS.astype(np.int64))
_TRI_COUNTS = np.ascontiguousarray(TRI_COUNTS.astype(np.int64))
_TRI_TABLE = np.ascontiguousarray(TRI_TABLE.astype(np.int64))


@numba.njit(cache=True, nogil=True)
def _march(labels, piece_size, emit, tri_counts, tri_table, edge_base, edge_axis,
           out_label, out_piece, out_edges):
    nx, ny, nz = labels.shape
    cx, cy, cz = nx - 1, ny - 1, nz - 1
    py = (cy + piece_size - 1) // piece_size
    pz = (cz + piece_size - 1) // piece_size
    v = np.empty(8, dtype=labels.dtype)
    n = 0
    for i in range(cx):
        for j in range(cy):
            for k in range(cz):
                v[0] = labels[i, j, k]
                v[1] = labels[i + 1, j, k]
                v[2] = labels[i, j + 1, k]
                v[3] = labels[i + 1, j + 1, k]
                v[4] = labels[i, j, k + 1]
                v[5] = labels[i + 1, j, k + 1]
                v[6] = labels[i, j + 1, k + 1]
                v[7] = labels[i + 1, j + 1, k + 1]
                first = v[0]
                uniform = True
                for m in range(1, 8):
                    if v[m] != first:
                        uniform = False
                        break
                if uniform:
                    continue
                piece = ((i // piece_size) * py + (j // piece_size)) * pz + (k // piece_size)
                for m in range(8):
                    lab = v[m]
                    if lab == 0:
                        continue
                    seen = False
                    for q in range(m):
                        if v[q] == lab:
                            seen = True
                            break
                    if seen:
                        continue
                    case = 0
                    for q in range(8):
                        if v[q] == lab:
                            case |= 1 << q
                    nt = tri_counts[case]
                    if emit:
                        for t in range(nt):
                            out_label[n + t] = lab
                            out_piece[n + t] = piece
                            for s in range(3):
                                e = tri_table[case, t, s]
                                bx = i + edge_base[e, 0]
                                by = j + edge_base[e, 1]
                                bz = k + edge_base[e, 2]
                                out_edges[n + t, s] = ((bx * ny + by) * nz + bz) * 3 + edge_axis[e]
                    n += nt
    return n


def index_dtype(shape) -> type:
    """dtype of the piece and edge ids of a block: int32 while edge ids fit (blocks up to about
    800^3 voxels, half the memory traffic), else int64."""
    n = 3
    for s in shape:
        n *= int(s)
    return np.int32 if n < 2**31 else np.int64


def march_cubes(labels: np.ndarray, piece_size: int):
    """Multi-label marching cubes over one block (CPU).

    Parameters
    ----------
    labels : (nx, ny, nz) ndarray of uint8/16/32/64
        One LOD's labels with a one-voxel halo on the low side (see module docs); 0 is
        background.  Must be C-contiguous.
    piece_size : int
        Edge of the cubic pieces (in cubes) triangles are bucketed into.

    Returns
    -------
    tri_label : (T,) ndarray, same dtype as ``labels``
        Segment ID of each triangle.
    tri_piece : (T,) int32 (int64 for blocks of 2**31 / 3 voxels or more)
        Piece index ``(pi * py + pj) * pz + pk`` of each triangle.
    tri_edges : (T, 3) int32 (int64 likewise)
        Edge ids of the triangle's vertices, counter-clockwise seen from outside the segment.
    """
    labels = np.ascontiguousarray(native_order(labels))
    idt = index_dtype(labels.shape)
    dummy_l = np.empty(0, dtype=labels.dtype)
    dummy_p = np.empty(0, dtype=idt)
    dummy_e = np.empty((0, 3), dtype=idt)
    t = _march(labels, piece_size, False, _TRI_COUNTS, _TRI_TABLE, _EDGE_BASE, _EDGE_AXIS,
               dummy_l, dummy_p, dummy_e)
    tri_label = np.empty(t, dtype=labels.dtype)
    tri_piece = np.empty(t, dtype=idt)
    tri_edges = np.empty((t, 3), dtype=idt)
    _march(labels, piece_size, True, _TRI_COUNTS, _TRI_TABLE, _EDGE_BASE, _EDGE_AXIS,
           tri_label, tri_piece, tri_edges)
    return tri_label, tri_piece, tri_edges


def native_order(labels: np.ndarray) -> np.ndarray:
    """``labels`` in the machine's byte order: a big-endian array (an N5 block read as it is
    stored) converted, others as they are.  The kernels read native integers: viewed as they
    were, a big-endian array's labels were other numbers (numba refused a big-endian unsigned
    one with a TypingError)."""
    return labels if labels.dtype.isnative else labels.astype(labels.dtype.newbyteorder("="))


def unsigned_view(labels: np.ndarray) -> np.ndarray:
    """``labels`` in the machine's byte order (:func:`native_order`), viewed as the unsigned
    dtype of its width when signed (the kernels, CPU and GPU, compare labels unsigned)."""
    labels = native_order(labels)
    return labels.view(f"u{labels.dtype.itemsize}") if labels.dtype.kind == "i" else labels


@dataclass
class Piece:
    """The welded surface of one segment inside one piece of a block.

    Attributes
    ----------
    label : int
        Segment ID.
    piece : int
        Piece index in the block (see :func:`march_cubes`).
    vertices2 : (n, 3) int32
        Vertex positions in doubled local lattice units: ``2 * array_index`` of the lower
        lattice point plus the unit vector of the edge axis.
    faces : (m, 3) int32
        Triangles, indices into ``vertices2``.
    """

    label: int
    piece: int
    vertices2: np.ndarray
    faces: np.ndarray


def compact_labels(tri_label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct labels and each element's index into them (like ``np.unique``).

    Parameters
    ----------
    tri_label : (T,) unsigned integer ndarray, T > 0

    Returns
    -------
    uniq : (U,) sorted distinct labels
    inverse : (T,) int64
    """
    local = np.empty(tri_label.shape[0], dtype=np.uint32)
    first = _relabel_first_seen(np.ascontiguousarray(tri_label), local)
    order = np.argsort(first, kind="stable")
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return first[order], rank[local.astype(np.int64) - 1]


@numba.njit(cache=True, nogil=True)
def _slot(lab, size):
    """Home slot of ``lab`` in an open-addressing table of ``size`` (a power of two) slots."""
    return np.int64(((np.uint64(lab) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(20)) & np.uint64(size - 1))


@numba.njit(cache=True, nogil=True)
def _relabel_first_seen(flat, out):
    """Number the distinct non-zero labels of ``flat`` 1, 2, ... in order of first occurrence."""
    size = 1024
    keys = np.zeros(size, dtype=flat.dtype)
    vals = np.zeros(size, dtype=np.uint32)  # 0: empty slot
    uniq = np.empty(16, dtype=flat.dtype)
    nu = 0
    last_lab = flat[0]
    last_id = np.uint32(0)
    for i in range(flat.shape[0]):
        lab = flat[i]
        if lab == 0:
            out[i] = 0
            continue
        if last_id != 0 and lab == last_lab:
            out[i] = last_id
            continue
        h = _slot(lab, size)
        while vals[h] != 0 and keys[h] != lab:
            h = (h + 1) & (size - 1)
        if vals[h] == 0:
            if nu == uniq.shape[0]:
                bigger = np.empty(2 * nu, dtype=uniq.dtype)
                for j in range(nu):   # (not a slice copy: its shape check takes numba seconds to compile)
                    bigger[j] = uniq[j]
                uniq = bigger
            uniq[nu] = lab
            nu += 1
            keys[h] = lab
            vals[h] = nu
            if 2 * nu > size:  # grow and rehash
                size *= 2
                keys = np.zeros(size, dtype=flat.dtype)
                vals = np.zeros(size, dtype=np.uint32)
                for u in range(nu):
                    hh = _slot(uniq[u], size)
                    while vals[hh] != 0:
                        hh = (hh + 1) & (size - 1)
                    keys[hh] = uniq[u]
                    vals[hh] = u + 1
                h = _slot(lab, size)
                while keys[h] != lab or vals[h] == 0:
                    h = (h + 1) & (size - 1)
        out[i] = vals[h]
        last_lab = lab
        last_id = vals[h]
    return uniq[:nu]


@numba.njit(cache=True, nogil=True)
def _apply_lut(a, lut):
    for i in range(a.shape[0]):
        a[i] = lut[a[i]]


def relabel_block(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Replace a block's segment IDs by small local IDs that keep their order.

    Meshing and downsampling only compare labels for equality and order (ties of the mode
    rule go to the smaller ID), so they give the same result on the local IDs, in a smaller
    dtype, and the triangles' labels index ``ids`` directly.

    Parameters
    ----------
    labels : (nx, ny, nz) unsigned integer ndarray

    Returns
    -------
    local : (nx, ny, nz) uint32
        0 where ``labels`` is 0, else ``1 + rank`` of the voxel's ID among the block's IDs.
    ids : (U,) uint64
        The block's distinct non-zero IDs, sorted: ``ids[local - 1]`` is the original ID.
    """
    flat = np.ascontiguousarray(labels).ravel()
    local = np.empty(flat.shape[0], dtype=np.uint32)
    if flat.shape[0] == 0:
        return local.reshape(labels.shape), np.zeros(0, np.uint64)
    first = _relabel_first_seen(flat, local)
    order = np.argsort(first, kind="stable")
    lut = np.zeros(len(first) + 1, dtype=np.uint32)
    lut[order + 1] = np.arange(1, len(first) + 1, dtype=np.uint32)
    _apply_lut(local, lut)
    return local.reshape(labels.shape), first[order].astype(np.uint64)


@numba.njit(cache=True, nogil=True)
def _group_and_weld(tri_label, lut, tri_piece, npieces, ngroups, edges, ny, nz):
    """Counting-sort triangles by group ``lut[label] * npieces + piece``, then weld each group's
    vertices by edge id; vertices come out as doubled lattice coordinates (int32)."""
    t = tri_label.shape[0]
    counts = np.zeros(ngroups + 1, dtype=np.int64)
    for i in range(t):
        counts[np.int64(lut[tri_label[i]]) * npieces + tri_piece[i] + 1] += 1
    for g in range(ngroups):
        counts[g + 1] += counts[g]
    tstart = counts.copy()
    order = np.empty(t, dtype=np.int32)
    fill = counts[:-1].copy()
    for i in range(t):
        g = np.int64(lut[tri_label[i]]) * npieces + tri_piece[i]
        order[fill[g]] = i
        fill[g] += 1
    faces = np.empty((t, 3), dtype=np.int32)
    verts = np.empty((t * 9 // 16 + 1024, 3), dtype=np.int32)  # V is about T / 2; grown on demand
    vstart = np.zeros(ngroups + 1, dtype=np.int64)
    maxt = 0
    for g in range(ngroups):
        maxt = max(maxt, tstart[g + 1] - tstart[g])
    size = 16
    while size < 6 * maxt:
        size *= 2
    mask = size - 1
    table_key = np.full(size, -1, dtype=edges.dtype)
    table_val = np.empty(size, dtype=np.int32)
    used = np.empty(3 * maxt + 1, dtype=np.int64)
    nv_total = 0
    for g in range(ngroups):
        nused = 0
        nv = 0
        for r in range(tstart[g], tstart[g + 1]):
            tri = order[r]
            for s in range(3):
                e = edges[tri, s]
                h = (np.int64(e) * 0x9E3779B97F4A7C15) & mask
                while True:
                    k = table_key[h]
                    if k == e:
                        faces[r, s] = table_val[h]
                        break
                    if k == -1:
                        table_key[h] = e
                        table_val[h] = nv
                        used[nused] = h
                        nused += 1
                        if nv_total + nv == verts.shape[0]:
                            bigger = np.empty((2 * verts.shape[0], 3), dtype=np.int32)
                            for j in range(verts.shape[0]):   # (element by element: as above)
                                for a in range(3):
                                    bigger[j, a] = verts[j, a]
                            verts = bigger
                        # edge id -> 2 * lower lattice point + unit vector of the edge's axis
                        p = np.int64(e) // 3
                        row = nv_total + nv
                        verts[row, 0] = 2 * (p // (ny * nz))
                        verts[row, 1] = 2 * ((p // nz) % ny)
                        verts[row, 2] = 2 * (p % nz)
                        verts[row, np.int64(e) % 3] += 1
                        faces[r, s] = nv
                        nv += 1
                        break
                    h = (h + 1) & mask
        for u in range(nused):
            table_key[used[u]] = -1
        nv_total += nv
        vstart[g + 1] = nv_total
    return tstart, faces, verts[:nv_total], vstart


def weld(tri_label: np.ndarray, tri_piece: np.ndarray, tri_edges: np.ndarray,
         shape: tuple[int, int, int]) -> list[Piece]:
    """Group triangles by (segment, piece) and weld their vertices by edge id.

    Parameters
    ----------
    tri_label, tri_piece, tri_edges
        Output of :func:`march_cubes`.
    shape : (nx, ny, nz)
        Shape of the labels block.

    Returns
    -------
    list of Piece
        Sorted by segment ID, then piece index; each an indexed mesh with no duplicate vertex,
        triangles in emission order.
    """
    if len(tri_label) == 0:
        return []
    top = int(tri_label.max())
    if top < 4 * len(tri_label) + 1024:  # small labels (local IDs): a dense table
        present = np.zeros(top + 1, dtype=bool)
        present[tri_label] = True
        uniq = np.flatnonzero(present).astype(tri_label.dtype)
        lut = (np.cumsum(present) - 1).astype(np.int32)
        key = tri_label
    else:
        uniq, key = compact_labels(tri_label)
        lut = np.arange(len(uniq), dtype=np.int32)
    npieces = int(tri_piece.max()) + 1
    ngroups = len(uniq) * npieces
    tstart, faces, verts_all, vstart = _group_and_weld(
        key, lut, tri_piece, npieces, ngroups, tri_edges, int(shape[1]), int(shape[2]))
    out = []
    nonempty = np.flatnonzero(tstart[1:] > tstart[:-1])
    for g in nonempty:
        out.append(Piece(
            label=int(uniq[g // npieces]),
            piece=int(g % npieces),
            vertices2=verts_all[vstart[g]:vstart[g + 1]],
            faces=faces[tstart[g]:tstart[g + 1]],
        ))
    return out


@numba.njit(cache=True, nogil=True)
def _thin(labels, v2, lo, hi, label, out):
    """Fill ``out``; -1, or the first vertex that is not the midpoint of a lattice edge of the
    piece's cubes (voxels ``lo .. hi``) from a voxel of ``label`` to one of another label."""
    for i in range(v2.shape[0]):
        odd = 0
        for a in range(3):   # checked before any read: the reads below stay in lo .. hi
            if v2[i, a] < 2 * lo[a] or v2[i, a] > 2 * hi[a]:
                return i        # outside the piece's cubes
            odd += v2[i, a] & 1
        if odd != 1:
            return i            # not an edge's midpoint: its "high end" could lie past hi
        axis = 0 if v2[i, 0] & 1 else (1 if v2[i, 1] & 1 else 2)
        x = v2[i, 0] >> 1
        y = v2[i, 1] >> 1
        z = v2[i, 2] >> 1
        step = 1
        if labels[x, y, z] == label:
            step = -1           # inside voxel is the low end: look one further down
            if labels[x + (axis == 0), y + (axis == 1), z + (axis == 2)] == label:
                return i        # both ends: not the array the piece was meshed from
        else:
            if axis == 0:       # inside voxel is the high end: look one further up
                x += 1
            elif axis == 1:
                y += 1
            else:
                z += 1
            if labels[x, y, z] != label:   # neither end: not the array the piece was meshed from
                return i
        if axis == 0:
            x += step
            far = x
        elif axis == 1:
            y += step
            far = y
        else:
            z += step
            far = z
        if far < lo[axis] or far > hi[axis]:
            out[i] = False      # past the piece's cubes: the far surface is another piece's
        else:
            out[i] = labels[x, y, z] != label
    return -1


def thin_vertices(labels: np.ndarray, piece: Piece, piece_size: int) -> np.ndarray:
    """Vertices where the segment is one voxel thick along the vertex's lattice edge, within
    the vertex's piece.

    A vertex is the midpoint of a lattice edge from a voxel of the segment to a voxel outside
    it; it is *thin* when the voxel on the far side of the inside voxel, along the same axis,
    is outside the segment too and is still a voxel of the piece's cubes.  Decimation locks
    these vertices: collapses there would pinch thin processes (spine necks, thin axons) and
    are where meshoptimizer's collapses break the link condition (see :mod:`gpumesh.lod`).
    Where the far voxel lies past the piece's cubes, the surface on its far side belongs to a
    neighbouring piece, which the frozen box planes keep apart from this one: the vertex is
    not thin.  So the answer depends on the piece's own voxels only, not on where a block
    begins or how much is read around it (a piece's fragment is the same whatever the
    blocks, i.e. whatever ``--max-lods``).

    Parameters
    ----------
    labels : (nx, ny, nz) ndarray
        The block of labels the piece was meshed from (see :func:`march_cubes`).
    piece : Piece
        One of :func:`weld`'s pieces of ``labels``.
    piece_size : int
        The edge of the pieces, in cubes, as given to :func:`march_cubes`.

    Returns
    -------
    (n,) bool, one per ``piece.vertices2`` row.

    Raises
    ------
    ValueError
        The piece does not fit ``labels``: its vertices lie outside its cubes or are not
        lattice edges' midpoints, or one's lattice edge does not run from a voxel of the
        piece's label to one of another (another array, or another ``piece_size``, than the
        piece was meshed from).
    """
    out = np.empty(len(piece.vertices2), dtype=np.bool_)
    nx, ny, nz = labels.shape
    py, pz = -(-(ny - 1) // piece_size), -(-(nz - 1) // piece_size)
    p = int(piece.piece)
    # an array with no cubes (an axis of one voxel) has no pieces: every vertex is refused
    lo = np.array([p // (py * pz), (p // pz) % py, p % pz] if py * pz > 0 else [nx, ny, nz],
                  dtype=np.int64) * piece_size
    # voxels of the piece's cubes: lo .. lo + piece_size (fewer in a cut last piece)
    hi = np.minimum(lo + piece_size, np.array(labels.shape, dtype=np.int64) - 1)
    # the kernel checks each vertex before reading (in the piece's cubes, an edge's midpoint),
    # then that its edge runs from the segment to another label: in one pass (a NumPy min and
    # max over the vertices cost as much as the whole kernel)
    # signed labels as the backends mesh them (their unsigned view, unsigned_view): a piece's
    # label is that value (the CPU's) or, from the GPU's weld, the signed one: the same bits
    labels = unsigned_view(labels)
    label = labels.dtype.type(int(piece.label) % (1 << (8 * labels.dtype.itemsize)))
    if _thin(labels, piece.vertices2, lo, hi, label, out) >= 0:
        raise ValueError(f"piece {p} of label {piece.label} does not fit an array of shape {labels.shape} with "
                         f"pieces of {piece_size}: pass the labels and piece_size it was meshed from")
    return out


@numba.njit(cache=True, nogil=True)
def _in_node(v2, ox, oy, oz, lo2, hi2, p_rel, on_plane):
    o = (ox, oy, oz)
    for i in range(v2.shape[0]):
        plane = False
        for a in range(3):
            p_rel[i, a] = 0.5 * v2[i, a] - o[a]
            if v2[i, a] == lo2[a] or v2[i, a] == hi2[a]:
                plane = True
        on_plane[i] = plane


def piece_in_node(piece: Piece, node_origin, lo, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A piece's vertices relative to its octree node, and those on the piece's box planes.

    Parameters
    ----------
    piece : Piece
    node_origin : (3,) int
        The node's origin in the meshed block (voxels of the piece's LOD).
    lo : (3,) int
        The piece's box origin relative to the node (voxels).
    size : int
        The piece's box edge (voxels).

    Returns
    -------
    p_rel : (n, 3) float64
        ``piece.vertices2 / 2 - node_origin`` (half-voxel lattice, voxels of the LOD).
    on_plane : (n,) bool
        Vertices with a coordinate on the box's planes ``lo`` or ``lo + size``.
    """
    n = len(piece.vertices2)
    p_rel = np.empty((n, 3), dtype=np.float64)
    on_plane = np.empty(n, dtype=np.bool_)
    o = np.asarray(node_origin, dtype=np.int64)
    lo2 = 2 * (o + np.asarray(lo, dtype=np.int64))
    _in_node(piece.vertices2, int(o[0]), int(o[1]), int(o[2]), lo2, lo2 + 2 * int(size), p_rel, on_plane)
    return p_rel, on_plane
