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
    q = np.rint(p_rel * (float(1 << bits) / chunk)).astype(np.int64)
    np.clip(q, 0, (1 << bits) - 1, out=q)
    return q


def weld_quantized(q: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge vertices with equal quantized positions; drop triangles that collapse.

    Parameters
    ----------
    q : (n, 3) int64, values < 2**21
    faces : (m, 3) int

    Returns
    -------
    q : (n', 3) int64, unique rows
    faces : (m', 3) int32, no triangle with a repeated vertex
    kept : (n',) int64
        Index of the input vertex each output vertex came from.
    """
    key = (q[:, 0] << 42) | (q[:, 1] << 21) | q[:, 2]
    uniq, first, inv = np.unique(key, return_index=True, return_inverse=True)
    faces = inv[faces]
    good = (faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])
    return q[first], faces[good].astype(np.int32), first


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
    """
    if len(faces) == 0:
        return b""
    # float32 holds every q < 2**24 exactly, and DracoPy takes it about 30 % faster than float64
    return DracoPy.encode(
        q.astype(np.float32), faces.astype(np.uint32),
        quantization_bits=bits, quantization_range=float((1 << bits) - 1),
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
