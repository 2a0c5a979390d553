"""Octree bookkeeping: Z-order, parent closure and manifests (multi-resolution format).

Spec: "Multi-resolution mesh manifest file format", plus the client's stricter rules:
fragments of each LOD in x, y, z Z-curve order, and every node of LOD ``k`` below the
segment's coarsest LOD has its parent (``position >> 1``) listed at LOD ``k + 1``, with a
zero-byte fragment when the parent holds no triangles.
"""

from __future__ import annotations

import struct

import numpy as np


def _spread3(v: np.ndarray) -> np.ndarray:
    """Move bit ``i`` of each value (< 2**21) to bit ``3 * i``."""
    v = v & np.uint64(0x1FFFFF)
    for shift, mask in ((32, 0x1F00000000FFFF), (16, 0x1F0000FF0000FF), (8, 0x100F00F00F00F00F),
                        (4, 0x10C30C30C30C30C3), (2, 0x1249249249249249)):
        v = (v | (v << np.uint64(shift))) & np.uint64(mask)
    return v


def morton_code(positions: np.ndarray) -> np.ndarray:
    """Z-curve code of node positions (x in the least significant bit of each triple).

    Parameters
    ----------
    positions : (n, 3) unsigned integer, each < 2**21

    Returns
    -------
    (n,) uint64
    """
    pos = np.asarray(positions, dtype=np.uint64).reshape(-1, 3)
    return _spread3(pos[:, 0]) | (_spread3(pos[:, 1]) << np.uint64(1)) | (_spread3(pos[:, 2]) << np.uint64(2))


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
        # the Z-curve code is one-to-one: its sorted distinct values are the nodes in Z-order
        _, first = np.unique(morton_code(allnodes), return_index=True)
        allnodes = allnodes[first]
        out.append(allnodes)
        carry = allnodes >> 1
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
