"""Ad-hoc meshing: one segment, now, as a ``trimesh.Trimesh`` in nm.

:func:`mesh_segment` meshes a single segment of any volume :func:`gpumesh.volume.open_volume`
reads, without writing anything.  It reads only what it needs:

1. **Find the segment.**  The search region (the whole volume, or ``bbox``) is read in blocks
   aligned to the storage chunks, several at a time (TensorStore decodes them in parallel),
   and a numba kernel finds the segment's bounding box in each block without allocating a
   mask (one vectorised ``any(row == id)`` per row; the rows that hit are then scanned for
   their first and last voxel).  The blocks where the segment occurs also keep the binary mask
   ``(labels == id)`` of their part of the box, so nothing is read twice.
2. **Mesh it.**  The masks are pasted into one ``uint8`` array of the tight box plus a
   one-voxel zero margin on every side, and the backend's multi-label marching cubes runs on it
   (a GPU takes it in one call; see below for the CPU).  Marching cubes emits a label's triangles from the case of that label's
   own indicator, so the surface of ``(labels == id)`` is exactly the surface of ``id`` in the
   labelled volume: the same triangles as the batch job's LOD 0 at quality ``high``.

Geometry (the pipeline's convention, see :mod:`gpumesh.pipeline`): voxel ``i`` covers
``[i, i + 1)`` plus the voxel offset, so the vertex between voxels ``i`` and ``i + 1`` lies at
``i + 1``, and a vertex's other coordinates are voxel centres ``i + 0.5``; model space is that
times the voxel size (nm).  Voxels outside the volume, and outside ``bbox`` when one is
given, are background, so the surface is closed there.

On the CPU only the 64-cube sub-blocks (:data:`SPARSE_BLOCK`) of the box that touch the
segment are marched (a long thin neurite's box is mostly empty); their shared border vertices
are welded by lattice position.

Latency (512^3 uint32 zarr, 128^3 zstd chunks, 2 CPU cores, numba warm): the scan of the whole
volume takes about 0.2 s, so a typical segment takes about 0.2 s in all (20 ms with ``bbox``),
a 700k-triangle one about 0.6 s.  Keep the :class:`~gpumesh.volume.Volume` open and pass it as
``source`` to skip reopening the source on every call.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import numba
import numpy as np

from .errors import InvalidVolumeError, SegmentCutWarning, SegmentNotFoundError, SourceReadError
from .lod import decimate, get_quality
from .volume import Volume, open_volume, warn_if_no_voxel_size, warn_if_voxel_size_overridden

__all__ = ["SegmentNotFoundError", "SegmentCutWarning", "mesh_segment", "find_segment_bbox", "open_source",
           "mask_to_mesh"]

#: Voxels per scan block (at least; blocks are whole storage chunks).
SCAN_BLOCK_VOXELS = 128 ** 3
#: Scan blocks read concurrently.
SCAN_THREADS = 8


# ----------------------------------------------------------------------------- kernels


@numba.njit(cache=True, nogil=True)
def _bbox_in_block(block, sid, out):
    """Inclusive bounding box of ``block == sid`` into ``out`` (x0, y0, z0, x1, y1, z1).

    Returns False when ``sid`` does not occur.  Rows are tested with a branch-free reduction
    (vectorised by LLVM); only rows that hit are scanned for their first and last voxel.
    """
    nx, ny, nz = block.shape
    found = False
    x0 = y0 = z0 = 0
    x1 = y1 = z1 = 0
    for i in range(nx):
        for j in range(ny):
            hit = False
            for k in range(nz):
                hit |= block[i, j, k] == sid
            if not hit:
                continue
            first = 0
            while block[i, j, first] != sid:
                first += 1
            last = nz - 1
            while block[i, j, last] != sid:
                last -= 1
            if not found:
                x0, y0, z0, x1, y1, z1 = i, j, first, i, j, last
                found = True
            else:
                y0 = min(y0, j)
                z0 = min(z0, first)
                x1 = i
                y1 = max(y1, j)
                z1 = max(z1, last)
    out[0], out[1], out[2], out[3], out[4], out[5] = x0, y0, z0, x1, y1, z1
    return found


@numba.njit(cache=True, nogil=True)
def _occupancy(mask, step, occ):
    """``occ[a, b, c]`` = any non-zero voxel in ``mask``'s block ``[a*step, (a+1)*step)`` (etc.)."""
    nx, ny, nz = mask.shape
    nbz = occ.shape[2]
    for i in range(nx):
        bi = i // step
        for j in range(ny):
            bj = j // step
            for kb in range(nbz):
                if occ[bi, bj, kb]:
                    continue
                hit = False
                for k in range(kb * step, min((kb + 1) * step, nz)):
                    hit |= mask[i, j, k] != 0
                if hit:
                    occ[bi, bj, kb] = True


# ----------------------------------------------------------------------------- helpers


def open_source(source: Any, *, voxel_size=None, voxel_offset=None, mip: int = 0,
                axes: Optional[str] = None, bounds=None, fill_missing: bool = True) -> Volume:
    """A :class:`Volume` for ``source``: an open Volume (overrides applied) or anything
    :func:`gpumesh.volume.open_volume` accepts, cropped to ``bounds`` (:meth:`Volume.crop`)."""
    if bounds is not None:
        return open_source(source, voxel_size=voxel_size, voxel_offset=voxel_offset, mip=mip,
                           axes=axes, fill_missing=fill_missing).crop(bounds)
    if isinstance(source, Volume):
        if mip or axes is not None or not fill_missing:
            raise ValueError("mip, axes and fill_missing apply when opening a source, not to an open Volume")
        changes = {}
        if voxel_size is not None or voxel_offset is not None:
            # validate like open_volume does
            from .volume import _check_voxel_offset, _check_voxel_size

            if voxel_size is not None:
                changes["voxel_size"] = _check_voxel_size(voxel_size)
                changes["voxel_size_known"] = True
            if voxel_offset is not None:
                changes["voxel_offset"] = _check_voxel_offset(voxel_offset)
        return dataclasses.replace(source, **changes) if changes else source
    return open_volume(source, voxel_size=voxel_size, voxel_offset=voxel_offset, mip=mip, axes=axes,
                       fill_missing=fill_missing)


def _check_bbox(bbox, shape) -> tuple[np.ndarray, np.ndarray]:
    """``bbox`` as (start, stop) int64 arrays, clipped to ``[0, shape)``; ``ValueError`` when it is
    malformed or holds no voxel of the volume."""
    msg = f"bbox must be ((x0, y0, z0), (x1, y1, z1)) integers with stop > start, got {bbox!r}"
    try:
        lo, hi = (list(c) for c in bbox)
    except (TypeError, ValueError):
        raise ValueError(msg) from None
    if len(lo) != 3 or len(hi) != 3:
        raise ValueError(msg)
    for v in lo + hi:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or not -2**62 <= int(v) < 2**62:
            raise ValueError(msg)
    lo, hi = np.array(lo, np.int64), np.array(hi, np.int64)
    if np.any(hi <= lo):
        raise ValueError(msg)
    lo, hi = np.maximum(lo, 0), np.minimum(hi, np.array(shape, np.int64))
    if np.any(hi <= lo):   # said so, not taken for a segment that does not occur
        raise ValueError(f"bbox {bbox!r} holds no voxel of the volume, whose array indices span "
                         f"(0, 0, 0) to {tuple(int(n) for n in shape)} (end excluded)")
    return lo, hi


def _check_threads(threads) -> int:
    """``threads`` as an int of at least 1, else ``ValueError`` (0 or a negative number used to
    be taken as 1 without a word)."""
    try:
        n = operator.index(threads)
    except TypeError:
        n = None
    if n is None or isinstance(threads, bool) or n < 1:
        raise ValueError(f"threads must be a whole number of at least 1, got {threads!r}")
    return n


def _segment_scalar(segment_id, dtype: np.dtype):
    """``segment_id`` as a scalar of the label dtype, or None when it cannot occur."""
    if isinstance(segment_id, (bool, np.bool_)) or not isinstance(segment_id, (int, np.integer)):
        raise ValueError(f"segment ID must be an integer, got {segment_id!r}")
    sid = int(segment_id)
    if sid <= 0:
        raise ValueError(f"segment ID must be > 0 (0 is background), got {sid}")
    if sid > np.iinfo(dtype).max:
        return None
    return dtype.type(sid)


def _scan_block_shape(volume: Volume) -> tuple[int, int, int]:
    """Whole storage chunks, the shortest axis doubled first, until a block has enough voxels."""
    shape = [max(1, int(c)) for c in (volume.chunk_shape or (64, 64, 64))]
    while math.prod(shape) < SCAN_BLOCK_VOXELS:
        growable = [a for a in (2, 1, 0) if shape[a] < volume.shape[a]]
        if not growable:
            break
        a = min(growable, key=lambda k: shape[k])
        shape[a] *= 2
    return tuple(shape)


def _scan(volume: Volume, sid, lo: np.ndarray, hi: np.ndarray, threads: int):
    """Blocks of ``[lo, hi)`` where ``sid`` occurs: list of (start, stop, mask) of the part of
    each block's box ``[start, stop)`` that holds the segment, ``mask`` = ``labels == sid`` there."""
    bs = np.array(_scan_block_shape(volume), np.int64)
    # blocks aligned to the storage chunk grid, clipped to [lo, hi)
    first = lo // bs
    last = (hi - 1) // bs
    starts = [np.maximum(np.array((i, j, k)) * bs, lo)
              for i in range(first[0], last[0] + 1)
              for j in range(first[1], last[1] + 1)
              for k in range(first[2], last[2] + 1)]

    def one(start):
        stop = np.minimum((start // bs + 1) * bs, hi)
        block = volume.read(tuple(start), tuple(stop))
        box = np.empty(6, np.int64)
        if not _bbox_in_block(block, sid, box):
            return None
        a, b = box[:3], box[3:] + 1
        mask = block[a[0]:b[0], a[1]:b[1], a[2]:b[2]] == sid
        return start + a, start + b, mask.view(np.uint8)

    if threads <= 1 or len(starts) == 1:
        found = [r for r in map(one, starts) if r is not None]
    else:
        # a bounded window of reads in flight keeps memory at a few blocks per thread
        found = []
        with ThreadPoolExecutor(threads) as pool:
            window = 2 * threads
            futures = [pool.submit(one, s) for s in starts[:window]]
            nxt = window
            while futures:
                r = futures.pop(0).result()
                if nxt < len(starts):
                    futures.append(pool.submit(one, starts[nxt]))
                    nxt += 1
                if r is not None:
                    found.append(r)
    return found


def find_segment_bbox(source: Any, segment_id: int, *, bbox=None, threads: int = SCAN_THREADS, **open_kwargs):
    """Bounding box of a segment, in array index coordinates.

    Parameters
    ----------
    source : Volume or anything :func:`gpumesh.volume.open_volume` accepts
    segment_id : int
    bbox : ((x0, y0, z0), (x1, y1, z1)), optional
        Only look inside this box (array index coordinates, stop exclusive).
    threads : int
        Blocks read concurrently (at least 1).
    **open_kwargs
        ``voxel_size``, ``voxel_offset``, ``mip``, ``axes`` for opening ``source``.

    Returns
    -------
    ((x0, y0, z0), (x1, y1, z1)) or None
        Tight box ``[start, stop)`` of the segment's voxels, ``None`` when it does not occur.
    """
    threads = _check_threads(threads)
    volume = open_source(source, **open_kwargs)
    found = _locate(volume, segment_id, bbox, threads)
    if not found:
        return None
    a = np.min([f[0] for f in found], axis=0)
    b = np.max([f[1] for f in found], axis=0)
    return tuple(int(v) for v in a), tuple(int(v) for v in b)


def _locate(volume: Volume, segment_id, bbox, threads: int) -> list:
    """:func:`_scan` of ``bbox`` (default: the whole volume); [] when the segment cannot occur."""
    sid = _segment_scalar(segment_id, np.dtype(volume.dtype))
    lo, hi = (np.zeros(3, np.int64), np.array(volume.shape, np.int64)) if bbox is None \
        else _check_bbox(bbox, volume.shape)
    if sid is None or not np.all(hi > lo):
        return []
    return _scan(volume, sid, lo, hi, threads)


#: Edge (cubes) of the sub-blocks the CPU marches; sub-blocks with no voxel of the segment are skipped.
#: 64 rather than 32 since the sub-blocks run on threads: on the real volume's largest segment
#: 1.16 s against 1.99 s at 32 (2-core VM, median of 7; both threaded), no slower on small ones.
SPARSE_BLOCK = 64


def _march_mask(m: np.ndarray, backend, block: int, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Marching cubes of a zero-bordered uint8 mask: doubled lattice vertices and faces.

    ``block > 0`` marches only the ``block``-cube sub-blocks whose voxels (those of the cubes'
    corners) hold part of the mask; every cube belongs to exactly one sub-block and skipped
    sub-blocks have no triangles, so the triangles are those of one pass over the whole array.
    ``threads > 1`` marches the sub-blocks on that many threads (the kernels release the GIL);
    their results are joined in sub-block order, so the output does not depend on it.
    Vertices are welded by their doubled lattice coordinates (exact integers).
    """
    cubes = np.array(m.shape, np.int64) - 1
    if block <= 0 or np.all(cubes <= block):
        subs = [np.zeros(3, np.int64)]
        block = int(cubes.max())
    else:
        nvox = -(-np.array(m.shape) // block)
        occ = np.zeros(tuple(int(n) for n in nvox), np.bool_)
        _occupancy(m, block, occ)
        # cube block b spans voxels b*block .. (b+1)*block: voxel blocks b and b + 1
        pad = np.pad(occ, ((0, 1), (0, 1), (0, 1)))
        ncube = -(-cubes // block)
        act = np.zeros(tuple(int(n) for n in ncube), np.bool_)
        for dx in (0, 1):
            for dy in (0, 1):
                for dz in (0, 1):
                    act |= pad[dx:dx + ncube[0], dy:dy + ncube[1], dz:dz + ncube[2]]
        subs = list(np.argwhere(act) * block)

    def one(c0):
        c1 = np.minimum(c0 + block, cubes)
        sub = np.ascontiguousarray(m[c0[0]:c1[0] + 1, c0[1]:c1[1] + 1, c0[2]:c1[2] + 1])
        return [(p.vertices2 + 2 * c0, p.faces) for p in backend.mesh(sub, block)]

    if threads > 1 and len(subs) > 1:
        with ThreadPoolExecutor(min(threads, len(subs))) as pool:
            parts = list(pool.map(one, subs))
    else:
        parts = [one(c0) for c0 in subs]
    verts, faces, base = [], [], 0
    for pieces in parts:
        for v2, f in pieces:
            verts.append(v2)
            faces.append(f.astype(np.int64) + base)
            base += len(v2)
    if not verts:
        return np.zeros((0, 3), np.int64), np.zeros((0, 3), np.int64)
    v2, f = np.concatenate(verts), np.concatenate(faces)
    if len(verts) > 1:  # weld the sub-blocks' shared border vertices
        dims = 2 * np.array(m.shape, np.int64)
        key = (v2[:, 0] * dims[1] + v2[:, 1]) * dims[2] + v2[:, 2]
        key, first, inv = np.unique(key, return_index=True, return_inverse=True)
        v2, f = v2[first], inv.reshape(-1)[f]
    return v2, f


def mask_to_mesh(mask: np.ndarray, origin, voxel_size, *, backend=None, device: str = "auto",
                 sparse_block: Optional[int] = None, threads: int = SCAN_THREADS):
    """Closed marching-cubes surface of a binary mask, in model space (nm).

    Parameters
    ----------
    mask : (nx, ny, nz) array
        Non-zero is inside.  Whatever lies outside the array is outside.
    origin : (3,) int
        Global voxel coordinate (voxel offset included) of ``mask[0, 0, 0]``.
    voxel_size : (3,) float
        nm per voxel.
    backend : Backend, optional
        Default: ``gpumesh.backend.get_backend(device)``.
    sparse_block : int, optional
        March only sub-blocks of this many cubes that touch the mask (0: the whole array in
        one call).  Default: :data:`SPARSE_BLOCK` on the CPU, 0 on a GPU.
    threads : int
        Sub-blocks marched concurrently (at least 1; the same output for any number).

    Returns
    -------
    vertices : (n, 3) float64
        nm; voxel ``i`` covers ``[i, i + 1)`` (see the module docs).
    faces : (m, 3) int64
        Counter-clockwise seen from outside.
    """
    from .backend import closing, get_backend

    threads = _check_threads(threads)
    made = backend is None
    if made:
        backend = get_backend(device, stacklevel=3)
    if sparse_block is None:
        sparse_block = SPARSE_BLOCK if backend.name == "cpu" else 0
    m = np.zeros(tuple(s + 2 for s in mask.shape), np.uint8)
    m[1:-1, 1:-1, 1:-1] = mask != 0
    with closing(backend, close=made):   # the device memory and pool limit go back to the caller's process
        v2, f = _march_mask(m, backend, int(sparse_block), threads)
    return _to_nm(v2, origin, voxel_size), f


def _to_nm(v2: np.ndarray, origin, voxel_size) -> np.ndarray:
    """nm positions of doubled lattice vertices of a mask padded by one voxel.

    Padded index ``p`` holds voxel ``origin - 1 + p``; a vertex's doubled coordinate is ``2p``
    (``+1`` along its edge's axis), so it lies at ``origin - 1 + (v2 + 1) / 2 = origin + (v2 - 1)
    / 2``: the face between voxels ``i`` and ``i + 1`` at ``i + 1``, voxel centres at ``i + 0.5``.
    """
    vox = (v2.astype(np.float64) - 1.0) * 0.5 + np.asarray(origin, np.float64)
    return vox * np.asarray(voxel_size, np.float64)


def _warn_if_cut(whole: Volume, volume: Volume, bbox, a: np.ndarray, b: np.ndarray, segment_id) -> None:
    """A :class:`SegmentCutWarning` when the segment, whose box is ``[a, b)`` (``volume``'s array
    indices), goes on past a face of the searched region (``bbox`` of ``volume``, itself
    ``whole`` cropped to ``bounds``): the voxels just past the face, read from ``whole``
    across the segment's box, hold the segment.  Its mesh is closed there, the segment not.  A
    face of ``volume`` is named the bounds' (a bbox that reaches it or past it is clipped
    there: widening it would not help).  A face past which the labels cannot be read (a chunk
    not stored with ``fill_missing=False``, negative labels of a signed source) is passed
    over: only the box must be readable."""
    lo, hi = (np.zeros(3, np.int64), np.array(volume.shape, np.int64)) if bbox is None \
        else _check_bbox(bbox, volume.shape)
    shift = volume.voxel_offset - whole.voxel_offset   # volume's index 0 in whole's indices
    sid = _segment_scalar(segment_id, np.dtype(whole.dtype))
    faces = {"bbox": [], "bounds": []}
    for k in range(3):
        for side, touches, past in (("low", a[k] == lo[k], lo[k] - 1), ("high", b[k] == hi[k], hi[k])):
            if not touches or not 0 <= past + shift[k] < whole.shape[k]:
                continue
            start, stop = a + shift, b + shift   # the slab past the face, across the segment's box
            start[k], stop[k] = past + shift[k], past + shift[k] + 1
            try:
                past_face = whole.read(tuple(start), tuple(stop))
            except (SourceReadError, InvalidVolumeError):
                # past the box: a chunk not stored (fill_missing=False) or negative labels,
                # which the box may be there to leave out: no error of the mesh, and no warning
                continue
            if np.any(past_face == sid):
                # a bbox face on (or clipped to) a face of the cropped volume is the bounds': widening
                # the bbox would not reach past it
                on_bounds = volume is not whole and (lo[k] == 0 if side == "low" else hi[k] == volume.shape[k])
                faces["bounds" if bbox is None or on_bounds else "bbox"].append(
                    f"{'xyz'[k]} = {int(past + (side == 'low') + volume.voxel_offset[k])}")
    boxes = [box for box in ("bbox", "bounds") if faces[box]]
    if boxes:
        where = " and ".join(f"the {box} ({', '.join(faces[box])}, global voxels)" for box in boxes)
        warnings.warn(f"segment {int(segment_id)} goes on past {where}: its mesh is closed there; widen the "
                      f"{' and the '.join(boxes)} for the whole segment", SegmentCutWarning, stacklevel=3)


def mesh_segment(source: Any, segment_id: int, *, bbox=None, mip: int = 0, voxel_size=None,
                 voxel_offset=None, axes: Optional[str] = None, quality: Optional[str] = None,
                 device: str = "auto", threads: int = SCAN_THREADS, bounds=None, fill_missing: bool = True):
    """Mesh one segment ad hoc, as a ``trimesh.Trimesh`` in model space (nm).

    Parameters
    ----------
    source : Volume, numpy.ndarray, tensorstore.TensorStore, dict, str or os.PathLike
        An open :class:`~gpumesh.volume.Volume` or anything :func:`gpumesh.volume.open_volume`
        reads (zarr v2/v3, N5, OME-Zarr, precomputed, arrays with axes x, y, z).
    segment_id : int
        The segment (> 0).
    bbox : ((x0, y0, z0), (x1, y1, z1)), optional
        Voxel index box in array coordinates (the voxel offset NOT applied), stop exclusive.
        Only this box is meshed (and read, but for the voxels just past a face the segment
        reaches, read for the :class:`SegmentCutWarning` where they can be); voxels outside it
        count as background, so the surface is closed at the box faces (as when meshing a
        crop).  Without it the volume is scanned for the segment's bounding box.
    bounds : sequence of 6 int, optional
        The same in global voxel coordinates (voxel offset included), ``(x0, y0, z0, x1, y1,
        z1)``, clipped to the volume, as the main job's ``bounds`` (:meth:`Volume.crop`); with
        ``bbox`` too, ``bbox`` is in the cropped volume's array coordinates.
    mip : int
        Scale of a multiscale source; ``bbox`` is in that scale's voxels.
    voxel_size : sequence of 3 float, optional
        nm per voxel, overriding the metadata.
    voxel_offset : sequence of 3 int, optional
        Global voxel coordinate of array index 0, overriding the metadata.
    axes : str, optional
        Axis order of a source without dimension names (e.g. ``"zyx"``).
    quality : {None, "exact", "low", "medium", "high"}
        ``None`` (default) or ``"exact"`` (as ``gpumesh segment --quality exact`` says it): the
        exact marching-cubes surface.  A preset decimates the surface
        with :func:`gpumesh.lod.decimate` to the preset's LOD 0 keep fraction (``high`` keeps
        everything, like the batch job's LOD 0).
    device : {"auto", "cpu", "gpu"}
        Backend of the marching cubes (:func:`gpumesh.backend.get_backend`).
    threads : int
        Blocks read concurrently while scanning, and sub-blocks marched concurrently on the CPU
        (at least 1).
    fill_missing : bool
        ``False``: a storage chunk of the source that is not stored is an error instead of
        background (see :func:`gpumesh.volume.open_volume`).

    Returns
    -------
    trimesh.Trimesh
        ``process=False``; vertices float64 in nm, each vertex once (welded by lattice edge),
        a closed, outward-oriented 2-manifold.  Undecimated, it has the same triangles as the
        batch job's LOD 0 at quality ``high``.

    Warns
    -----
    SegmentCutWarning
        The segment reaches a face of ``bbox`` or ``bounds`` that lies inside the volume.

    Raises
    ------
    SegmentNotFoundError
        The segment does not occur (in ``bbox``).
    ValueError
        A bad segment ID, bbox, quality or number of threads.
    InvalidVolumeError, InvalidVoxelSizeError, SourceReadError
        Bad source (see :func:`gpumesh.volume.open_volume`), or with ``fill_missing=False`` a
        chunk that is not stored.
    """
    import trimesh

    from .backend import closing, get_backend

    threads = _check_threads(threads)
    keep = None if quality is None or quality == "exact" else get_quality(quality).lod0_keep
    whole = open_source(source, voxel_size=voxel_size, voxel_offset=voxel_offset, mip=mip, axes=axes,
                        fill_missing=fill_missing)
    volume = whole if bounds is None else whole.crop(bounds)
    warn_if_no_voxel_size(volume)
    warn_if_voxel_size_overridden(source, volume, voxel_size, mip=mip, axes=axes)
    backend = get_backend(device, stacklevel=3)   # the notice names the caller's line
    with closing(backend):   # the device memory and pool limit go back to the caller's process
        found = _locate(volume, segment_id, bbox, threads)
        if not found:
            where = volume.description + ("" if bbox is None else f" within bbox {bbox}")
            raise SegmentNotFoundError(f"segment {int(segment_id)} does not occur in {where}")
        a = np.min([f[0] for f in found], axis=0)
        b = np.max([f[1] for f in found], axis=0)
        _warn_if_cut(whole, volume, bbox, a, b, segment_id)
        # the segment's box plus a one-voxel zero margin: padded index p holds voxel a - 1 + p
        m = np.zeros(tuple(b - a + 2), np.uint8)
        for start, stop, part in found:
            s, e = start - a + 1, stop - a + 1
            m[s[0]:e[0], s[1]:e[1], s[2]:e[2]] = part
        v2, faces = _march_mask(m, backend, SPARSE_BLOCK if backend.name == "cpu" else 0, threads)
    origin = a + volume.voxel_offset
    if keep is not None and keep < 1.0 and len(faces):
        # decimate in voxels relative to the box (small numbers) with the error metric in nm, as
        # the batch job does; a closed surface has no border to keep
        rel, f = decimate((v2 - 1) * 0.5, faces.astype(np.int32), keep, np.asarray(volume.voxel_size, np.float64))
        vertices, faces = (rel + origin) * np.asarray(volume.voxel_size, np.float64), f.astype(np.int64)
    else:
        vertices = _to_nm(v2, origin, volume.voxel_size)
    return trimesh.Trimesh(vertices=vertices, faces=faces, process=False)
