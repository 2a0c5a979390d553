"""Deliberate corruptions of a gpumesh output directory (in place: work on a copy).

Each returns a short description of what it broke, for messages.
"""

from __future__ import annotations

import os
import struct

import numpy as np

from gpumesh.reader import Manifest, open_mesh


def _manifest(dest, seg: int) -> Manifest:
    with open(os.path.join(dest, f"{seg}.index"), "rb") as fh:
        return Manifest.from_bytes(fh.read())


def truncate_last_fragment(dest, seg: int) -> str:
    """Cut the fragment data file of ``seg`` (unsharded) in the middle of its last fragment.

    The last fragment is a node of the coarsest LOD: the file is shorter than the manifest says,
    as after an interrupted write.
    """
    m = _manifest(dest, seg)
    lod = max(i for i, s in enumerate(m.fragment_sizes) if len(s) and s[-1] > 0)
    last = int(m.fragment_sizes[lod][-1])
    path = os.path.join(dest, str(seg))
    size = os.path.getsize(path)
    if lod != m.num_lods - 1 or size != m.total_bytes:
        raise AssertionError(f"unexpected layout of segment {seg}: last fragment in LOD {lod}, {size} bytes")
    os.truncate(path, size - last // 2)
    return f"segment {seg}: LOD {lod} fragment {len(m.fragment_sizes[lod]) - 1} cut from {last} to {last - last // 2} bytes"


def shift_manifest_offset(dest, seg: int, delta: int = 16) -> str:
    """Make the manifest of ``seg`` (unsharded) give wrong fragment offsets.

    The size of its first non-empty LOD 0 fragment grows by ``delta`` and the next one's shrinks
    by as much: the total (and the data file) is unchanged, but the second fragment is now read
    from ``delta`` bytes past its start.
    """
    m = _manifest(dest, seg)
    sizes = m.fragment_sizes[0]
    i = next(i for i in range(len(sizes) - 1) if sizes[i] > 0 and sizes[i + 1] > 2 * delta)
    sizes[i] += delta
    sizes[i + 1] -= delta
    with open(os.path.join(dest, f"{seg}.index"), "wb") as fh:
        fh.write(m.to_bytes())
    return f"segment {seg}: LOD 0 fragments {i} and {i + 1} shifted by {delta} bytes"


def orphan_children(dest, seg: int) -> str:
    """Remove from ``seg`` (unsharded) one LOD 1 node that has non-empty LOD 0 children.

    Its fragment bytes go too, so every other offset stays right: the manifest is consistent
    except that those children have no parent.
    """
    m = _manifest(dest, seg)
    if m.num_lods < 2:
        raise AssertionError(f"segment {seg} has one LOD")
    pos0, size0 = m.fragment_positions[0], m.fragment_sizes[0]
    pos1, size1 = m.fragment_positions[1], m.fragment_sizes[1]
    # The LOD 1 node with the most non-empty children.
    kids = [int(np.count_nonzero(np.all(pos0 // 2 == p, axis=1) & (size0 > 0))) for p in pos1]
    j = int(np.argmax(kids))
    if kids[j] == 0:
        raise AssertionError(f"segment {seg}: no LOD 1 node has non-empty children")
    spans = m.fragment_byte_ranges()
    a, b = (int(v) for v in spans[1][j])
    path = os.path.join(dest, str(seg))
    with open(path, "rb") as fh:
        data = fh.read()
    with open(path, "wb") as fh:
        fh.write(data[:a] + data[b:])
    m.fragment_positions[1] = np.delete(pos1, j, axis=0)
    m.fragment_sizes[1] = np.delete(size1, j)
    with open(os.path.join(dest, f"{seg}.index"), "wb") as fh:
        fh.write(m.to_bytes())
    return f"segment {seg}: LOD 1 node {pos1[j].tolist()} removed, {kids[j]} LOD 0 children left without parent"


def shift_sharded_manifest(dest, seg: int, delta: int = -16) -> str:
    """In a sharded output, move the minishard index entry of ``seg``'s manifest by ``delta`` bytes.

    The changed minishard index is appended to the shard and the shard index points at it; every
    other entry is unchanged.
    """
    src = open_mesh(str(dest))
    spec = src.sharding
    shard, minishard = (int(v[0]) for v in spec.locate([seg]))
    ids, starts, sizes = src.minishard_index(shard, minishard)
    k = int(np.flatnonzero(ids == np.uint64(seg))[0])
    starts = starts.astype(np.int64)
    starts[k] += delta
    enc = spec.encode_minishard_index(ids, starts.astype(np.uint64), sizes)
    path = os.path.join(dest, spec.shard_key(shard))
    end = os.path.getsize(path)
    base = spec.shard_index_bytes
    with open(path, "r+b") as fh:
        fh.seek(end)
        fh.write(enc)
        fh.seek(16 * minishard)
        fh.write(struct.pack("<QQ", end - base, end + len(enc) - base))
    return f"segment {seg}: manifest offset in {spec.shard_key(shard)} minishard {minishard} moved by {delta} bytes"
