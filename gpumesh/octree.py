"""Octree bookkeeping: Z-order, parent closure and manifests (multi-resolution format).

Spec: "Multi-resolution mesh manifest file format", plus the client's stricter rules:
fragments of each LOD in x, y, z Z-curve order, and every node of LOD ``k`` below the
segment's coarsest LOD has its parent (``position >> 1``) listed at LOD ``k + 1``, with a
zero-byte fragment when the parent holds no triangles.
"""

from __future__ import annotations

import struct

import numpy as np


def morton_code(positions: np.ndarray) -> np.ndarray:
    """Z-curve code of node positions (x in the least significant bit of each triple).

    Parameters
    ----------
    positions : (n, 3) unsigned integer, each < 2**21

    Returns
    -------
    (n,) uint64
    """
    pos = np.asarray(positions, dtype=np.uint64)
    code = np.zeros(len(pos), dtype=np.uint64)
    for bit in range(21):
        for axis in range(3):
            code |= ((pos[:, axis] >> np.uint64(bit)) & np.uint64(1)) << np.uint64(3 * bit + axis)
    return code


def zorder(positions: np.ndarray) -> np.ndarray:
    """Indices that sort node positions in Z-curve order."""
    return np.argsort(morton_code(positions), kind="stable")


def close_parents(nodes_per_lod: list[np.ndarray]) -> list[np.ndarray]:
    """Add every missing parent so LOD ``k + 1`` lists the parents of LOD ``k``'s nodes.

    Parameters
    ----------
    nodes_per_lod : list of (n_k, 3) uint32
        Non-empty nodes of each LOD of one segment.

    Returns
    -------
    list of (n_k', 3) uint32
        Unique nodes of each LOD, parents included, in Z-curve order.
    """
    out = []
    carry = np.zeros((0, 3), dtype=np.uint32)
    for nodes in nodes_per_lod:
        allnodes = np.concatenate([np.asarray(nodes, dtype=np.uint32).reshape(-1, 3), carry])
        allnodes = np.unique(allnodes, axis=0)
        allnodes = allnodes[zorder(allnodes)]
        out.append(allnodes)
        carry = np.unique(allnodes >> 1, axis=0).astype(np.uint32)
    return out


def encode_manifest(chunk_shape, grid_origin, lod_scales, vertex_offsets,
                    positions: list[np.ndarray], sizes: list[np.ndarray]) -> bytes:
    """Binary manifest (``<segment-id>.index``).

    Parameters
    ----------
    chunk_shape : (3,) float
        Finest octree node extent in stored-model units.
    grid_origin : (3,) float
        Octree origin in stored-model units.
    lod_scales : (num_lods,) float
    vertex_offsets : (num_lods, 3) float
        Stored-model offset added to each LOD's vertices.
    positions : list of (n_k, 3) uint32
        Node positions of each LOD, in Z-curve order.
    sizes : list of (n_k,) int
        Byte size of each node's fragment.

    Returns
    -------
    bytes
    """
    num_lods = len(positions)
    parts = [
        struct.pack("<3f", *map(float, chunk_shape)),
        struct.pack("<3f", *map(float, grid_origin)),
        struct.pack("<I", num_lods),
        np.asarray(lod_scales, dtype="<f4").tobytes(),
        np.asarray(vertex_offsets, dtype="<f4").reshape(num_lods, 3).tobytes(),
        np.asarray([len(p) for p in positions], dtype="<u4").tobytes(),
    ]
    for pos, size in zip(positions, sizes):
        parts.append(np.ascontiguousarray(np.asarray(pos, dtype="<u4").reshape(-1, 3).T).tobytes())
        parts.append(np.asarray(size, dtype="<u4").tobytes())
    return b"".join(parts)
