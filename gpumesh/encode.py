"""Encoding fragments: vertex quantization, Draco, and the legacy binary format.

Quantization (multi-resolution format, spec "Multi-resolution mesh fragment data file format")
----------------------------------------------------------------------------------------------
A fragment covers one octree node, ``C`` LOD-voxels on a side.  A vertex at ``p`` LOD-voxels
from the node's origin (``0 <= p <= C``) is stored as ``q = round(p * 2**bits / C)``, clipped to
``2**bits - 1``.  With ``C`` a power of two, every marching-cubes vertex (``p`` a multiple of 1/2)
is an exact integer, and the mid-plane ``p = C/2`` maps to ``2**(bits-1)``, which is exactly the
partition point of Neuroglancer's client (``neuroglancer_draco.cc``), so vertices on the 2x2x2
sub-grid are assigned to both halves and no triangle crosses it.  A vertex on the node's far
face maps to ``2**bits - 1``, which decodes to exactly the near face of the next node: fragments
of one LOD meet without cracks.

Draco: we quantize ourselves and set Draco's quantizer to the identity on those integers
(``quantization_bits = bits``, origin 0, range ``2**bits - 1``), so Draco adds no rounding of its
own; the client (which skips Draco's dequantization) and DracoPy both see exactly ``q``.
"""

from __future__ import annotations

import struct

import DracoPy
import numba
import numpy as np

#: Draco compression level used for fragments (0 fastest .. 10 smallest).
DRACO_COMPRESSION_LEVEL = 7


def quantize(p_rel: np.ndarray, chunk: int, bits: int) -> np.ndarray:
    """Quantize node-relative positions.

    Parameters
    ----------
    p_rel : (n, 3) float64
        Positions in LOD-voxels relative to the node origin, within ``[0, chunk]``.
    chunk : int
        Node edge in LOD-voxels (``chunk_shape`` of the manifest).
    bits : {10, 16}
        ``vertex_quantization_bits``.

    Returns
    -------
    (n, 3) int64 in ``[0, 2**bits)``.
    """
    p_rel = np.ascontiguousarray(p_rel, dtype=np.float64).reshape(-1, 3)
    q = np.empty(p_rel.shape, dtype=np.int64)
    _quantize(p_rel, float(1 << bits) / chunk, (1 << bits) - 1, q)
    return q


@numba.njit(cache=True, nogil=True)
def _quantize(p, factor, top, out):
    for i in range(p.shape[0]):
        for a in range(3):
            v = np.int64(np.rint(p[i, a] * factor))
            out[i, a] = 0 if v < 0 else (top if v > top else v)


@numba.njit(cache=True, nogil=True)
def _weld_quantized(q, faces):
    n = q.shape[0]
    size = 16
    while size < 2 * n:
        size *= 2
    table_key = np.full(size, -1, dtype=np.int64)
    table_val = np.empty(size, dtype=np.int32)
    remap = np.empty(n, dtype=np.int32)
    kept = np.empty(n, dtype=np.int64)
    nu = 0
    for i in range(n):
        key = (q[i, 0] << 42) | (q[i, 1] << 21) | q[i, 2]
        h = (key * 0x9E3779B97F4A7C15) & (size - 1)
        while table_key[h] != -1 and table_key[h] != key:
            h = (h + 1) & (size - 1)
        if table_key[h] == -1:
            table_key[h] = key
            table_val[h] = nu
            kept[nu] = i
            nu += 1
        remap[i] = table_val[h]
    out = np.empty((faces.shape[0], 3), dtype=np.int32)
    m = 0
    for t in range(faces.shape[0]):
        a = remap[faces[t, 0]]
        b = remap[faces[t, 1]]
        c = remap[faces[t, 2]]
        if a != b and b != c and a != c:
            out[m, 0] = a
            out[m, 1] = b
            out[m, 2] = c
            m += 1
    return out[:m], kept[:nu]


def weld_quantized(q: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge vertices with equal quantized positions; drop triangles that collapse.

    Parameters
    ----------
    q : (n, 3) int64, values < 2**21
    faces : (m, 3) int

    Returns
    -------
    q : (n', 3) int64, unique rows, in order of first occurrence
    faces : (m', 3) int32, no triangle with a repeated vertex
    kept : (n',) int64
        Index of the input vertex each output vertex came from.
    """
    q = np.ascontiguousarray(q, dtype=np.int64)
    faces, kept = _weld_quantized(q, np.ascontiguousarray(faces))
    return q[kept], faces, kept


try:  # the Draco encoder extension (setup.py); optional, DracoPy.encode writes the same bytes
    from . import _dracoenc
except ImportError:  # pragma: no cover - depends on the build
    _dracoenc = None


def encode_draco(q: np.ndarray, faces: np.ndarray, bits: int) -> bytes:
    """Draco-encode a fragment of quantized positions.

    Parameters
    ----------
    q : (n, 3) int64 in ``[0, 2**bits)``
    faces : (m, 3) int
    bits : {10, 16}

    Returns
    -------
    bytes
        A Draco mesh whose position attribute decodes to exactly ``q`` (see module docs).
        Empty bytes when there is no triangle.

    Notes
    -----
    Encoded by ``gpumesh._dracoenc`` when it was built, else by ``DracoPy.encode``; both call
    Draco's encoder with the same settings and give the same bytes.  The extension skips
    DracoPy's triangle-soup rebuild of the mesh and, on Linux, codes Draco's symbol streams over
    large alphabets in time linear in the symbols (see ``_dracoenc.cpp``): at 16 bits it takes
    less than half of DracoPy's time (fragments of the real volume: 1.7-1.9 s against
    3.9-4.1 s; ``docs/STATUS.md``, eighteenth session).
    """
    if len(faces) == 0:
        return b""
    # float32 holds every q < 2**24 exactly (and DracoPy takes it ~30 % faster than float64)
    pos = np.ascontiguousarray(q, dtype=np.float32)
    tri = np.ascontiguousarray(faces, dtype=np.uint32)
    if _dracoenc is not None:
        return _dracoenc.encode(pos, tri, bits, 10 - DRACO_COMPRESSION_LEVEL)
    return DracoPy.encode(
        pos, tri, quantization_bits=bits, quantization_range=float((1 << bits) - 1),
        quantization_origin=[0.0, 0.0, 0.0], compression_level=DRACO_COMPRESSION_LEVEL,
    )


def encode_legacy(vertices_nm: np.ndarray, faces: np.ndarray) -> bytes:
    """Encode a legacy single-resolution fragment.

    Parameters
    ----------
    vertices_nm : (n, 3) float
        Model-space positions (nm).
    faces : (m, 3) int

    Returns
    -------
    bytes
        ``uint32le num_vertices``, ``float32le [n, 3]`` positions, ``uint32le [m, 3]`` indices
        (spec "Legacy single-resolution mesh format").
    """
    v = np.ascontiguousarray(vertices_nm, dtype="<f4")
    f = np.ascontiguousarray(faces, dtype="<u4")
    return struct.pack("<I", len(v)) + v.tobytes() + f.tobytes()
