"""Writers: assemble block results into Neuroglancer precomputed mesh directories.

Formats (``../shared/specs/neuroglancer-precomputed-meshes.md``):

* multi-resolution, unsharded: ``info`` (``neuroglancer_multilod_draco``), ``<id>.index``
  (manifest) and ``<id>`` (fragment data) per segment;
* legacy single-resolution: ``info`` (``neuroglancer_legacy_mesh``), ``<id>:0`` (JSON
  manifest) and ``<id>:0:<x>_<y>_<z>`` fragment files per segment and LOD 0 node.

Every byte goes through TensorStore's kvstore (:mod:`gpumesh.storage`); each key is written
atomically.  A segment's fragment data is written before its manifest, and ``info`` last, so a
reader never finds a manifest whose data is missing, and a directory with ``info`` is finished.
The sharded layout plugs in at :func:`write_segments` (one function of the segments of a shard).
"""

from __future__ import annotations

import json
import os
from typing import Iterator, Optional

import numpy as np

from . import storage
from .octree import close_parents, encode_manifest
from .pipeline import FRAG_DTYPE, MeshOptions, Plan, block_key, unpack_block_header
from .volume import Volume

#: Segments whose files are written concurrently.
WRITE_BATCH = 64


def segment_num_lods(lod0_nodes: np.ndarray, lods_present: set, plan_lods: int,
                     requested: Optional[int]) -> int:
    """Number of LODs for one segment.

    By size (``requested`` is None): the fewest LODs such that the coarsest one spans a single
    octree node per axis, so small segments get few LODs and large ones up to ``plan_lods``.
    Always capped at the last LOD (from 0, without a gap) where the segment has triangles, so
    every segment has triangles at its coarsest LOD.  Returns 0 for a segment without LOD 0
    triangles (it is not written).
    """
    if len(lod0_nodes) == 0:
        return 0
    n = 1
    lo = lod0_nodes.min(axis=0)
    hi = lod0_nodes.max(axis=0)
    while n < plan_lods and np.any((lo >> (n - 1)) != (hi >> (n - 1))):
        n += 1
    if requested is not None:
        n = requested
    avail = 0
    while avail < plan_lods and avail in lods_present:
        avail += 1
    return max(1, min(n, avail))


def _iter_segments(index: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    if len(index) == 0:
        return
    order = np.argsort(index["label"], kind="stable")
    index = index[order]
    labels = index["label"]
    starts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]])
    stops = np.r_[starts[1:], len(labels)]
    for s0, s1 in zip(starts, stops):
        yield int(labels[s0]), index[s0:s1]


def mesh_info(volume: Volume, options: MeshOptions, with_properties: bool) -> dict:
    """The ``info`` JSON of the mesh directory (spec "info JSON file format")."""
    vx, vy, vz = (float(v) for v in volume.voxel_size)
    if options.format == "legacy":
        info = {"@type": "neuroglancer_legacy_mesh"}
    else:
        info = {
            "@type": "neuroglancer_multilod_draco",
            "vertex_quantization_bits": options.vertex_quantization_bits,
            # stored model = LOD 0 voxel units (voxel offset included); model = nm
            "transform": [vx, 0.0, 0.0, 0.0, 0.0, vy, 0.0, 0.0, 0.0, 0.0, vz, 0.0],
            "lod_scale_multiplier": 1.0,
        }
    if with_properties:
        info["segment_properties"] = "segment_properties"
    return info


def assemble(kv, volume: Volume, plan: Plan, options: MeshOptions, blocks, *, link_source: bool = False) -> dict:
    """Read every block result from the scratch area and write the final mesh directory.

    Parameters
    ----------
    kv : tensorstore.KvStore
        The destination.
    volume, plan, options
        As used for the blocks.
    blocks : list of (3,) int
        All block indices (their results must be in the scratch area).
    link_source : bool
        Also set ``mesh`` in a precomputed source's ``info``.

    Returns
    -------
    dict
        ``segments``, ``triangles_per_lod``, ``fragments_per_lod``, ``bytes``.
    """
    indices = []
    count_labels, counts = [], []
    for bi, b in enumerate(blocks):
        blob = storage.read(kv, block_key(b))
        index, cl, cc, data_start = unpack_block_header(blob)
        ext = np.empty(len(index), dtype=FRAG_DTYPE.descr + [("block", "<u4")])
        for name in FRAG_DTYPE.names:
            ext[name] = index[name]
        ext["offset"] += data_start
        ext["block"] = bi
        indices.append(ext)
        count_labels.append(cl)
        counts.append(cc)
    index = np.concatenate(indices) if indices else np.zeros(0, dtype=FRAG_DTYPE)
    keys = [block_key(b) for b in blocks]

    stats = {"segments": 0, "triangles_per_lod": [0] * plan.lods, "fragments_per_lod": [0] * plan.lods,
             "bytes": 0}
    batch = []
    for label, entries in _iter_segments(index):
        batch.append((label, entries))
        if len(batch) >= WRITE_BATCH:
            write_segments(kv, keys, batch, plan, options, stats, volume.voxel_offset)
            batch = []
    if batch:
        write_segments(kv, keys, batch, plan, options, stats, volume.voxel_offset)

    with_props = options.segment_properties and stats["segments"] > 0
    if with_props:
        write_segment_properties(kv, np.concatenate(count_labels), np.concatenate(counts))
    storage.write_json(kv, "info", mesh_info(volume, options, with_props))
    if volume.precomputed is not None:
        write_source_link(kv, volume, link_source)
    return stats


def write_segments(kv, keys: list, batch: list, plan: Plan, options: MeshOptions, stats: dict,
                   grid_origin) -> None:
    """Write the files of a batch of segments (fragment data first, then manifests).

    Parameters
    ----------
    kv : tensorstore.KvStore
    keys : list of str
        Scratch keys of the block results, indexed by the ``block`` field of the entries.
    batch : list of (segment ID, entries)
        Entries: structured array rows (label, lod, x, y, z, offset, size, triangles, block).
    plan, options, stats
    grid_origin : (3,) int
        The volume's voxel offset.
    """
    # Read every fragment of the batch concurrently.
    reads = []
    for label, entries in batch:
        futs = [kv.read(keys[e["block"]], byte_range=slice(int(e["offset"]), int(e["offset"] + e["size"])))
                for e in entries]
        reads.append(futs)
    data_writes, manifest_writes = [], []
    for (label, entries), futs in zip(batch, reads):
        blobs = [bytes(f.result().value) for f in futs]
        if options.format == "legacy":
            names = []
            for e, blob in zip(entries, blobs):
                name = f"{label}:0:{e['x']}_{e['y']}_{e['z']}"
                names.append(name)
                data_writes.append((name, blob))
                stats["bytes"] += len(blob)
                stats["triangles_per_lod"][0] += int(e["triangles"])
                stats["fragments_per_lod"][0] += 1
            manifest_writes.append((f"{label}:0", json.dumps({"fragments": sorted(names)}).encode()))
        else:
            built = build_multires(label, entries, blobs, plan, options, stats, grid_origin)
            if built is None:
                continue
            data, manifest = built
            data_writes.append((str(label), data))
            manifest_writes.append((f"{label}.index", manifest))
            stats["bytes"] += len(data) + len(manifest)
        stats["segments"] += 1
    storage.write_many(kv, data_writes)
    storage.write_many(kv, manifest_writes)


def build_multires(label: int, entries: np.ndarray, blobs: list, plan: Plan, options: MeshOptions,
                   stats: dict, grid_origin) -> tuple[bytes, bytes]:
    """Manifest and fragment data of one segment (multi-resolution format).

    ``grid_origin`` is the voxel offset (stored-model units); ``vertex_offsets[k] = -2**(k-1)``
    and ``lod_scales[k] = 2**k`` (see :mod:`gpumesh.pipeline` for the geometry).

    Returns
    -------
    data : bytes
        Fragments concatenated in manifest order (LOD 0 first, Z-order within a LOD).
    manifest : bytes
    """
    C = plan.chunk
    pos = np.stack([entries["x"], entries["y"], entries["z"]], axis=1).astype(np.uint32)
    lods = entries["lod"].astype(np.int64)
    present = set(int(k) for k in np.unique(lods))
    num_lods = segment_num_lods(pos[lods == 0], present, plan.lods, options.num_lods)
    if num_lods == 0:
        return None
    lookup = {(int(k), int(p[0]), int(p[1]), int(p[2])): i for i, (k, p) in enumerate(zip(lods, pos))}
    nodes = close_parents([pos[lods == k] for k in range(num_lods)])
    parts, sizes = [], []
    for k, lod_nodes in enumerate(nodes):
        lod_sizes = np.zeros(len(lod_nodes), dtype=np.int64)
        for j, p in enumerate(lod_nodes):
            i = lookup.get((k, int(p[0]), int(p[1]), int(p[2])))
            if i is not None:
                parts.append(blobs[i])
                lod_sizes[j] = len(blobs[i])
                stats["triangles_per_lod"][k] += int(entries["triangles"][i])
        stats["fragments_per_lod"][k] += len(lod_nodes)
        sizes.append(lod_sizes)
    manifest = encode_manifest(
        chunk_shape=[C, C, C],
        grid_origin=[float(v) for v in grid_origin],
        lod_scales=[float(1 << k) for k in range(num_lods)],
        vertex_offsets=[[-0.5 * (1 << k)] * 3 for k in range(num_lods)],
        positions=nodes, sizes=sizes,
    )
    return b"".join(parts), manifest



def write_segment_properties(kv, labels: np.ndarray, counts: np.ndarray) -> None:
    """Segment properties (inline): the voxel count of every segment (spec segment_properties)."""
    order = np.argsort(labels, kind="stable")
    labels, counts = labels[order], counts[order]
    uniq, start = np.unique(labels, return_index=True)
    total = np.add.reduceat(counts, start) if len(counts) else counts
    dtype = "uint32" if len(total) == 0 or total.max() < 2**32 else "float32"
    info = {
        "@type": "neuroglancer_segment_properties",
        "inline": {
            "ids": [str(int(s)) for s in uniq],
            "properties": [{
                "id": "voxels", "type": "number", "data_type": dtype,
                "description": "number of voxels of the segment at mip 0",
                "values": [int(c) for c in total],
            }],
        },
    }
    storage.write_json(kv, "segment_properties/info", info)


def write_source_link(kv, volume: Volume, link_source: bool) -> None:
    """Offer the mesh to a precomputed source volume.

    Writes ``source_info.json`` into the mesh directory: the source's ``info`` with ``mesh``
    pointing here, ready to replace it.  Only with ``link_source`` is the source's own
    ``info`` rewritten (its previous version is kept as ``info.bak``).
    """
    src = volume.precomputed
    info = dict(src["info"])
    dest_spec = kv.spec().to_json()
    src_spec = dict(src["kvstore"])
    mesh_ref = _relative_mesh_path(src_spec, dest_spec)
    info["mesh"] = mesh_ref
    storage.write_json(kv, "source_info.json", info)
    if link_source:
        src_kv = storage.open_kvstore(src_spec)
        old = storage.read(src_kv, "info")
        if old is not None:
            storage.write(src_kv, "info.bak", old)
        storage.write_json(src_kv, "info", info)


def _relative_mesh_path(src_spec: dict, dest_spec: dict) -> str:
    """Path of the mesh directory relative to the source root when both share a driver."""
    same = {k: v for k, v in src_spec.items() if k != "path"} == {k: v for k, v in dest_spec.items() if k != "path"}
    if same:
        rel = os.path.relpath(dest_spec.get("path", "").rstrip("/") or "/", src_spec.get("path", "").rstrip("/") or "/")
        return rel
    return storage.kvstore_url(dest_spec)
