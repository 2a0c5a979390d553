"""The main job: plan the blocks, mesh each block (all LODs, in tasks), then assemble and write.

Stages follow the data: :mod:`gpumesh.volume` reads a block, the backend meshes it
(:mod:`gpumesh.marching`) and downsamples it (:mod:`gpumesh.lod`), pieces are decimated
(:mod:`gpumesh.lod`), quantized and encoded (:mod:`gpumesh.encode`), and the writer
(:mod:`gpumesh.writer`) emits manifests and fragments (:mod:`gpumesh.octree`).

Geometry (stored-model space is LOD 0 voxel units, the ``info`` transform scales to nm)
-----------------------------------------------------------------------------------------
* Voxel ``i`` covers ``[i, i + 1)`` plus the voxel offset (Neuroglancer's convention), so the
  surface between voxels ``i`` and ``i + 1`` lies at ``i + 1``.
* A LOD ``k`` voxel is ``F = 2**shift`` LOD 0 voxels along each axis (:meth:`Plan.shift`,
  :func:`gpumesh.lod.lod_factors`: ``F = 2**k`` on every axis for near-isotropic voxels, less
  on the coarser axes of anisotropic ones).  At LOD ``k``, cube ``j`` lies between LOD-``k``
  voxels ``j - 1`` and ``j``; cubes ``0 .. ceil(N / F)`` close every surface at the volume
  border.
* Octree node ``n`` of LOD ``k`` is ``C * 2**k`` LOD 0 voxels a side, ``E = C * 2**k / F`` LOD
  ``k`` cubes (:meth:`Plan.node_voxels`; ``C`` where ``F = 2**k``), and holds the triangles
  of cubes ``[n*E, (n+1)*E)``; its box is ``grid_origin + n * C * 2**k`` with ``grid_origin``
  = voxel offset, and ``vertex_offsets[k] = -F/2`` shifts the cubes' half-voxel lattice onto
  it (:meth:`Plan.vertex_offsets`).  Its fragment's positions are quantized in ``2**bits``
  steps across the node, and the far face's ``2**bits`` is clipped to ``2**bits - 1``: so
  ``E <= 2**(bits - 2)`` (a half voxel at least two steps) keeps the lattice's points apart,
  the last half voxel's from the far face's included (:func:`gpumesh.lod.lod_factors`'s
  ``max_ratio``; at ``2**(bits - 1)`` two of them become one and the surface pinches).
* A block is one node of the coarsest LOD ``L - 1``: ``B = C * 2**(L-1)`` LOD 0 cubes a side, read
  with a halo of ``2**(L-1)`` voxels on its low side.  Every node of every LOD lies in exactly
  one block, so a block's fragments are final and blocks are independent.
* The job runs each block as independent tasks (:meth:`Plan.tasks`): the coarsest LOD's node
  in one, and for each octant of the block its nodes of LODs 0 .. L - 2 in another (an octant
  is one node at LOD L - 2), so that no single heavy block runs alone at the end.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import hashlib
import itertools
import json
import os
import queue
import resource
import secrets
import shutil
import signal
import socket
import struct
import tempfile
import threading
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np

from . import encode, storage, workerserver
from .backend import Backend, check_device, close_backend, get_backend
from .errors import (DestinationError, DestinationExistsError, DestinationTakenError, EmptyVolumeWarning,
                     GpumeshError, InvalidVolumeError, SegmentsNotFoundWarning, SourceReadError, TaskFailedError,
                     WorkerFailedError, one_line)
from .lod import DOWNSAMPLING, decimate, decimates, get_quality, lod_factors
from .marching import piece_in_node, relabel_block, thin_vertices
from .sharding import ShardingOptions
from .volume import Volume, open_volume, portable_source, warn_if_no_voxel_size, warn_if_voxel_size_overridden

SCRATCH = storage.SCRATCH
#: The scratch key that names the run writing the destination (see :func:`run_mesh`).
OWNER_KEY = SCRATCH + "owner"
COARSE = "coarse"     # the task of a block that meshes its coarsest LOD (see Plan.tasks)


@dataclass(frozen=True)
class MeshOptions:
    """Options of the main job.

    Attributes
    ----------
    chunk_size : int
        Edge of a LOD 0 octree node (``chunk_shape``), in voxels; a power of two >= 4.
    max_lods : int
        LODs computed per block; the block edge is ``chunk_size * 2**(max_lods - 1)`` voxels and
        sets peak memory per worker (measured: about 370, 770 and 1,950 MiB for blocks of 128,
        256 and 512 voxels a side, read cache included; see :mod:`gpumesh.resources`).  A
        volume that one node of a coarser LOD already spans gets fewer (:class:`Plan`).
    num_lods : int or None
        Give every segment this many LODs (capped where a segment vanishes).  ``None``: by size,
        enough LODs that the segment's coarsest LOD spans one node per axis.
    quality : str
        Decimation preset: ``low``, ``medium`` (default) or ``high`` (LOD 0 undecimated).
    vertex_quantization_bits : int
        10 or 16; multires only (legacy meshes store float32 positions, so 10 with
        ``format="legacy"`` is refused).
    format : str
        ``multires`` (``neuroglancer_multilod_draco``) or ``legacy`` (single resolution).
    segment_properties : bool or None
        Also write segment properties (voxel count of each segment): ``True`` always, ``False``
        never, ``None`` (default) when the job has at most
        :data:`gpumesh.writer.SEGMENT_PROPERTIES_MAX` segments.  They are one JSON file that
        the client loads whole before it shows any mesh of the source; past that many segments
        it would be over ~20 MB (and past ~24 M segments longer than a browser's longest
        string), so they are left out with a :class:`gpumesh.writer.SegmentPropertiesNotice`.
    sharding : ShardingOptions or None
        Multi-resolution only: store the meshes in the sharded format
        (``neuroglancer_uint64_sharded_v1``, see :mod:`gpumesh.sharding`); ``None`` writes one
        manifest and one data file per segment.  ``gpumesh mesh`` shards by default.
    dust_threshold : int
        Segments with fewer voxels than this in the whole volume (voxels of the scale meshed,
        ``mip``'s, as igneous's ``dust_threshold`` counts them) get no mesh and
        no segment properties entry; 0 keeps every segment.  Counted over the whole volume
        when the job is written, so a segment is kept or dropped whole (igneous's
        ``MeshTask`` counts each task's cutout alone).
    downsampling : str
        How each LOD's labels are downsampled from the previous LOD's
        (:func:`gpumesh.lod.lod_factors`): ``auto`` (default) by 2 along the finer axes only
        while the voxel is anisotropic (4x4x40 nm: 8x8x40, 16x16x40, 32x32x40, then every
        axis), ``all`` by 2 along every axis.  The same for near-isotropic voxels, such as the
        real volume's 32x32x40 nm.
    segments : tuple of int or None
        Mesh only these segment IDs (igneous's ``object_ids``); ``None`` meshes every segment.
        Each selected segment gets the bytes the full job gives it: the labels are downsampled
        with every segment present, and marching cubes sees the other segments as background
        (see :func:`_mesh_lod`).  The segment properties list the selected segments found in
        the volume; the others give a ``SegmentsNotFoundWarning``.  A list or array is stored
        as a tuple.
    exclude_segments : tuple of int or None
        Mesh every segment but these (igneous's ``exclude_object_ids``, its CLI's
        ``--exclude-labels``): a large glia or extracellular-space label, say.  As with
        :attr:`segments`, the others keep the bytes of the full job (igneous instead masks the
        excluded labels to background, which moves its neighbours' surfaces), and the excluded
        segments get no files and no segment properties entry.  With :attr:`segments` too, the
        job meshes the selected segments that are not excluded.  A list or array is stored as
        a tuple.
    """

    chunk_size: int = 64
    max_lods: int = 3
    num_lods: Optional[int] = None
    quality: str = "medium"
    vertex_quantization_bits: int = 16
    format: str = "multires"
    segment_properties: Optional[bool] = None
    sharding: Optional[ShardingOptions] = None
    dust_threshold: int = 0
    segments: Optional[tuple] = None
    downsampling: str = "auto"
    exclude_segments: Optional[tuple] = None

    def __post_init__(self):
        for name in ("segments", "exclude_segments"):
            ids = getattr(self, name)
            if ids is not None and not isinstance(ids, (tuple, str, bytes)):
                try:   # a list, an array (its values as Python ints), any iterable
                    object.__setattr__(self, name, tuple(ids.ravel().tolist() if isinstance(ids, np.ndarray)
                                                         else ids))
                except TypeError:
                    pass   # not iterable: validate() says what is wrong

    def validate(self) -> None:
        """Raise ``ValueError`` on inconsistent options."""
        for name in ("chunk_size", "max_lods", "num_lods", "vertex_quantization_bits"):
            value = getattr(self, name)
            if not (value is None and name == "num_lods") and (isinstance(value, bool)
                                                               or not isinstance(value, (int, np.integer))):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        c = self.chunk_size
        if c < 4 or c & (c - 1):
            raise ValueError(f"chunk size must be a power of two >= 4, got {c}")
        if not 1 <= self.max_lods <= 10:
            raise ValueError(f"max LODs must be in 1..10, got {self.max_lods}")
        if self.num_lods is not None and not 1 <= self.num_lods <= self.max_lods:
            raise ValueError(f"--lods must be in 1..{self.max_lods} (max LODs), got {self.num_lods}")
        if self.vertex_quantization_bits not in (10, 16):
            raise ValueError("vertex quantization bits must be 10 or 16")
        if 4 * c > (1 << self.vertex_quantization_bits):   # E <= 2**(bits - 2): see the module docs
            raise ValueError(f"chunk size {c} too large for {self.vertex_quantization_bits}-bit vertex quantization: "
                             f"at most {1 << (self.vertex_quantization_bits - 2)} (a half voxel must stay two "
                             f"quantization steps)")
        if self.format not in ("multires", "legacy"):
            raise ValueError(f"format must be multires or legacy, got {self.format!r}")
        if self.format == "legacy" and self.vertex_quantization_bits != 16:
            raise ValueError("vertex quantization bits only apply to multires output "
                             "(legacy meshes store float32 positions); leave them at 16")
        get_quality(self.quality)
        if self.downsampling not in DOWNSAMPLING:
            raise ValueError(f"downsampling must be one of {', '.join(DOWNSAMPLING)}, got {self.downsampling!r}")
        if isinstance(self.dust_threshold, bool) or not isinstance(self.dust_threshold, (int, np.integer)) \
                or self.dust_threshold < 0:
            raise ValueError(f"dust threshold must be an integer >= 0 (voxels), got {self.dust_threshold!r}")
        for name in ("segments", "exclude_segments"):
            ids = getattr(self, name)
            if ids is None:
                continue
            if not isinstance(ids, tuple) or not ids:
                raise ValueError(f"{name} must be a non-empty sequence of segment IDs, got {ids!r}")
            bad = [s for s in ids if isinstance(s, bool) or not isinstance(s, (int, np.integer))
                   or not 0 < int(s) < 1 << 64]
            if bad:
                raise ValueError(f"segment IDs must be integers in 1..2**64-1, got {bad[0]!r}"
                                 f"{' (exclude_segments)' if name == 'exclude_segments' else ''}")
        if self.segments is not None and self.exclude_segments is not None and not len(self.selected_ids()):
            raise ValueError("every selected segment is excluded (segments, exclude_segments): nothing to mesh")
        if self.sharding is not None:
            if not isinstance(self.sharding, ShardingOptions):
                raise ValueError(f"sharding must be a ShardingOptions or None, got {self.sharding!r}")
            if self.format == "legacy":
                raise ValueError("legacy meshes have no sharded form; use the multires format or no sharding")
            self.sharding.validate()

    def selected_ids(self) -> Optional[np.ndarray]:
        """:attr:`segments` less :attr:`exclude_segments`, as a sorted uint64 array without
        repeats (``None`` when :attr:`segments` is unset)."""
        if self.segments is None:
            return None
        return _selection_array(self.segments, self.exclude_segments)

    def excluded_ids(self) -> Optional[np.ndarray]:
        """:attr:`exclude_segments` as a sorted uint64 array without repeats (``None`` when unset)."""
        return None if self.exclude_segments is None else _segment_array(self.exclude_segments)

    def selected(self, ids: np.ndarray) -> np.ndarray:
        """Which of the segment IDs ``ids`` (uint64 array) the job meshes: a bool array of
        ``ids``' shape, all true when neither :attr:`segments` nor :attr:`exclude_segments` is
        set."""
        ids = np.asarray(ids, dtype=np.uint64)
        if self.segments is not None:
            return in_sorted(self.selected_ids(), ids)
        if self.exclude_segments is not None:
            return ~in_sorted(self.excluded_ids(), ids)
        return np.ones(np.shape(ids), dtype=bool)


def in_sorted(table: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Which of ``values`` are in ``table`` (sorted ascending): a bool array of ``values``'
    shape, by binary search (``np.isin`` took 0.7 s for a table of 10**6 segment IDs)."""
    if len(table) == 0:
        return np.zeros(np.shape(values), dtype=bool)
    return table[np.searchsorted(table, values).clip(max=len(table) - 1)] == values


@functools.lru_cache(maxsize=4)
def _segment_array(segments: tuple) -> np.ndarray:
    """``MeshOptions.segments`` as a sorted uint64 array without repeats (kept for the next task)."""
    return np.unique(np.array([int(s) for s in segments], dtype=np.uint64))


@functools.lru_cache(maxsize=4)
def _selection_array(segments: tuple, exclude: Optional[tuple]) -> np.ndarray:
    """``segments`` less ``exclude`` (``MeshOptions``' lists), sorted uint64 without repeats
    (kept for the next task)."""
    ids = _segment_array(segments)
    return ids if exclude is None else ids[~in_sorted(_segment_array(exclude), ids)]


@dataclass(frozen=True)
class Plan:
    """Block decomposition of one volume for one set of options.

    Attributes
    ----------
    shape : (3,) int
        Volume shape (voxels).
    chunk : int
        LOD 0 node edge C (voxels).
    lods : int
        LODs per block L: ``max_lods``, or fewer where the volume has no use for them (LOD
        ``L - 1`` then has one node spanning the whole volume; at least ``num_lods``).
    block : int
        Block edge B = C * 2**(L-1) (LOD 0 voxels).
    grid : (3,) int
        Blocks per axis.
    shifts : tuple of L (3,) tuples of int
        LOD ``k``'s labels are downsampled by ``2**shifts[k][a]`` along axis ``a`` from LOD 0's
        (:func:`gpumesh.lod.lod_factors`; ``k`` on every axis for near-isotropic voxels).
    stamp : str
        A digest of the job's source, options and plan (:func:`run_mesh` sets it; empty from
        :meth:`make`), in the names of its task results: a run of other options writing into
        the same destination at the same time never takes them for its own (:func:`block_key`).
    """

    shape: tuple
    chunk: int
    lods: int
    block: int
    grid: tuple
    shifts: tuple
    stamp: str = ""

    @classmethod
    def make(cls, shape, options: MeshOptions, voxel_size=(1.0, 1.0, 1.0)) -> "Plan":
        """The plan of a volume of ``shape`` voxels (x, y, z) of ``voxel_size`` (nm, x, y, z)."""
        lods = 1 if options.format == "legacy" else options.max_lods
        # LOD 0 nodes are 0 .. n // chunk along an axis of n voxels: past the LOD whose one node
        # spans them all, no segment gets another LOD (writer.segment_num_lods) and the fragments
        # stay the same, but the block, and the background read to fill it, doubles per LOD
        # (--max-lods 10 on 512^3 read 1024^3 voxels per task and ran out of memory)
        enough = max(int(n) // options.chunk_size for n in shape).bit_length() + 1
        lods = min(lods, max(enough, options.num_lods or 1))
        block = options.chunk_size << (lods - 1)
        # a node of LOD k spans 2**(k - shift) * C of its voxels per axis, at most
        # 2**(bits - 2) so that quantization keeps its half-voxel lattice points apart
        shifts = lod_factors(voxel_size, lods, options.downsampling,
                             max_ratio=(1 << (options.vertex_quantization_bits - 2)) // options.chunk_size)
        grid = []
        for a, n in enumerate(shape):
            # cubes 0..ceil(n/F) of every LOD k (F = 2**shift), in LOD 0 units
            need = max((-(-int(n) >> int(sh)) + 1) << int(sh) for sh in shifts[:, a])
            grid.append(-(-need // block))
        return cls(tuple(int(s) for s in shape), options.chunk_size, lods, block, tuple(grid),
                   tuple(tuple(int(v) for v in row) for row in shifts))

    def shift(self, k: int) -> np.ndarray:
        """:attr:`shifts` of LOD ``k``: (3,) int64."""
        return np.asarray(self.shifts[k], dtype=np.int64)

    @functools.lru_cache(maxsize=64)
    def vertex_offsets(self, num_lods: int) -> tuple:
        """The manifests' ``vertex_offsets`` of LODs ``0 .. num_lods - 1``: ``num_lods`` tuples of
        3 floats, ``-2**shift / 2``, which moves the cubes' half-voxel lattice of each LOD onto
        its voxels (stored-model units; see the module docs).  Cached: the writer asks for them
        per segment."""
        return tuple(tuple(-0.5 * 2.0 ** s for s in self.shifts[k]) for k in range(num_lods))

    def voxel_nm(self, k: int, voxel_size) -> np.ndarray:
        """Size of a LOD ``k`` voxel (3,) float64, in the unit of ``voxel_size`` (LOD 0's, nm)."""
        return np.asarray(voxel_size, dtype=np.float64) * 2.0 ** self.shift(k)

    def node_voxels(self, k: int) -> np.ndarray:
        """Edge of a LOD ``k`` octree node in LOD ``k`` voxels per axis, ``C * 2**(k - shift)``:
        (3,) int64 (``C`` on the axes downsampled at every LOD)."""
        return self.chunk << (k - self.shift(k))

    def blocks(self) -> list[tuple[int, int, int]]:
        """All block indices, x fastest last (row order)."""
        gx, gy, gz = self.grid
        return [(x, y, z) for x in range(gx) for y in range(gy) for z in range(gz)]

    def block_array(self) -> np.ndarray:
        """:meth:`blocks` as an (n, 3) int64 array, in the same order."""
        return np.indices(self.grid, dtype=np.int64).reshape(3, -1).T

    def voxels_in_volume(self, b) -> np.ndarray:
        """Voxels of block ``b`` inside the volume (its share of the work): int64, of every
        block at once where ``b`` is (n, 3) (as :meth:`block_array`)."""
        b = np.asarray(b, dtype=np.int64)
        inside = np.minimum((b + 1) * self.block, np.asarray(self.shape, dtype=np.int64)) - b * self.block
        return np.prod(np.clip(inside, 0, None), axis=-1)

    def block_bounds(self, b) -> tuple[np.ndarray, np.ndarray]:
        """Voxel range ``[start, stop)`` that block ``b`` reads (halo included, border cut):
        (3,) int64 each, or (n, 3) for an (n, 3) ``b`` (as :meth:`block_array`).

        The halo is ``2**(L-1)`` voxels on the low side.  Beyond the volume every voxel is
        background, so past the coarsest LOD's first voxel outside it there is no surface: a
        border block stops there (a slab, not a full block).  The cut is a multiple of
        ``2**(L-1)`` from ``start``, so every LOD's voxels stay whole.
        """
        halo = 1 << (self.lods - 1)
        start = np.asarray(b, dtype=np.int64) * self.block - halo
        limit = (-(-np.asarray(self.shape, dtype=np.int64) // halo) + 1) * halo
        return start, np.minimum(start + self.block + halo, limit)

    def octant_bounds(self, b, octant: int) -> tuple[np.ndarray, np.ndarray]:
        """Voxel range ``[g0, g1)`` that LOD 0 marching cubes reads for one octant of block ``b``.

        The block's LOD 0 cubes ``j`` (between voxels ``origin - 1 + j`` and ``origin + j``)
        split into 2x2x2 octants of ``B/2`` cubes a side, each ``2**(L-2)`` LOD 0 nodes wide.
        ``octant`` is ``4*ox + 2*oy + oz``.  An octant of a cut border block may be thinner
        than ``B/2``, or hold no cube (``g1 - g0 < 2`` on some axis).
        """
        _, stop = self.block_bounds(b)
        g0 = self.octant_origin(b, octant) - 1
        return g0, np.minimum(g0 + self.block // 2 + 1, stop)

    def octant_origin(self, b, octant: int) -> np.ndarray:
        """First LOD 0 voxel of octant ``octant`` (``4*ox + 2*oy + oz``) of block ``b``."""
        o = np.array([(octant >> 2) & 1, (octant >> 1) & 1, octant & 1], dtype=np.int64)
        return (np.asarray(b, dtype=np.int64) * 2 + o) * (self.block // 2)

    def tasks(self) -> list[tuple]:
        """The main job's independent tasks, as ``(block, part)``.

        With one LOD, ``part`` is ``None``: the whole block.  Otherwise a block is split so
        that no task is much longer than the others (a whole block's LODs 1 and up used to be
        one task, the longest of the job by far: 3-4 s of CPU on the real volume against at
        most 2 s for any other, which many cores wait for): ``COARSE`` meshes the block's one
        node of LOD L - 1; octant ``0..7`` meshes the nodes of LODs 0 .. L - 2 inside one
        octant and counts its voxels (skipped when none of its cubes, at any of those LODs,
        touches the volume).  Every node of every LOD, and every voxel, is in exactly one
        task.  The list is in the order to run them: first the octants, blocks with the most
        voxels inside the volume first, each block's octants together (a worker's read cache
        may still hold the storage chunks its next octant reads); then the coarse tasks in the
        same block order.  The coarse tasks are the short ones (0.4 s of CPU on average on the
        real volume, against 1-3.5 s for a full octant), so that many workers end the job on
        them instead of waiting on the last long octants (``docs/STATUS.md``, eighth session).
        """
        # in arrays, not block by block: 620,978 tasks of a 1.1-teravoxel volume took 10.6 s to
        # list one octant at a time, which every run (part, resume) of the job pays again
        blocks = self.block_array()
        # most voxels first, ties in row order
        blocks = blocks[np.argsort(-self.voxels_in_volume(blocks), kind="stable")]
        names = [tuple(b) for b in blocks.tolist()]
        if self.lods == 1:
            return [(b, None) for b in names]
        # octant o of block b: LOD 0 cubes from g0 = (2b + o) * B/2 - 1 to g1 (octant_bounds)
        half = self.block // 2
        o = np.array([[(k >> 2) & 1, (k >> 1) & 1, k & 1] for k in range(8)], dtype=np.int64)
        g0 = (blocks[:, None, :] * 2 + o) * half - 1
        g1 = np.minimum(g0 + half + 1, self.block_bounds(blocks)[1][:, None, :])
        shape = np.asarray(self.shape, dtype=np.int64)
        # an octant's first cube at LOD k starts at LOD 0 voxel g0 + 1 - 2**k: inside the
        # volume for some k <= L - 2 when it is for k = L - 2
        reach = 1 << max(self.lods - 2, 0)
        keep = np.all(g1 - g0 >= 2, axis=2) & np.all(g0 + 1 - reach < shape, axis=2)
        rows, octants = np.nonzero(keep)   # by block in run order, then by octant
        return [(names[r], k) for r, k in zip(rows.tolist(), octants.tolist())] + [(b, COARSE) for b in names]


# --------------------------------------------------------------------------------------
# Block results: a small binary blob per block in the scratch area of the destination.

FRAG_DTYPE = np.dtype([
    ("label", "<u8"), ("lod", "<u4"), ("x", "<u4"), ("y", "<u4"), ("z", "<u4"),
    ("offset", "<u8"), ("size", "<u8"), ("triangles", "<u8"),
])
_MAGIC = b"GPMBLK01"


def task_name(task) -> str:
    """Name of a task's result in the scratch area: ``x_y_z`` (whole block), ``x_y_z.coarse``
    or ``x_y_z.o<octant>``."""
    b, part = task
    name = f"{b[0]}_{b[1]}_{b[2]}"
    if part is None:
        return name
    return f"{name}.{part}" if part == COARSE else f"{name}.o{part}"


def block_key(task, stamp: str = "", header: int = 0) -> str:
    """Scratch key of a task's result: ``blocks/NAME@STAMP.hBYTES`` (``stamp``: :attr:`Plan.stamp`;
    ``header``: the bytes of the result's header, :func:`block_header_size`, left out where 0).
    A run that reads the result again (resumed, or after an array job's parts) then reads its
    header in one byte-range read, not two (its prefix first, for its size)."""
    return (f"{SCRATCH}blocks/{task_name(task)}" + (f"@{stamp}" if stamp else "")
            + (f".h{int(header)}" if header else ""))


def parse_block_key(key: str) -> tuple[str, str, int]:
    """``(name, stamp, header bytes)`` of a task result's key :func:`block_key` (the part after
    ``blocks/``, or the whole key); header 0 where the key does not say (gpumesh before it did).
    A task's name never holds ``@`` nor ends in ``.h`` and digits, and a stamp is hex digits."""
    name, at, stamp = key.rpartition("blocks/")[2].partition("@")
    tail = stamp if at else name   # (split by hand: a regular expression took 4x as long)
    head, dot, digits = tail.rpartition(".h")
    header = 0
    if dot and digits.isdigit() and digits.isascii():
        tail, header = head, int(digits)
    return (name, tail, header) if at else (tail, "", header)


def empty_key(run: str, seq: int, stamp: str = "") -> str:
    """Scratch key of a record of tasks that found nothing (:class:`_EmptyTasks`):
    ``empty/RUN-SEQ@STAMP``, ``RUN`` naming the run that wrote it.  The record holds their
    names (:func:`task_name`), each followed by a newline (ASCII)."""
    return f"{SCRATCH}empty/{run}-{seq}" + (f"@{stamp}" if stamp else "")


def scratch_results(kv, stamp: str = "", keys: Optional[list] = None,
                    records: Optional[dict] = None) -> tuple[dict, set]:
    """The task results in the scratch area of ``kv`` with ``stamp`` (those of this job's plan
    and options: a resumed run skips their tasks), and the tasks that found nothing (named in a
    record of :class:`_EmptyTasks`, with no result of their own).  ``keys``: a listing of ``kv``
    made already (all its keys, or those under the scratch area), read instead of listing it
    again (a scratch area of hundreds of thousands of results takes a second to list on a local
    disk, and many requests on a cloud store).  ``records``: record key -> the names it holds,
    of records read (or written) already, which are not read again; those read here are added
    (a part that counts the job's finished tasks again, for its summary, reads only the
    records written since).

    Returns
    -------
    results : dict
        Task name (:func:`task_name`) -> its result's header bytes, as its key says
        (:func:`block_key`; 0 where it does not).
    found_nothing : set
        Names of the tasks that found nothing.

    Raises
    ------
    DestinationError
        A record cannot be read, or is not one (one deleted since the listing is passed over).
    """
    blocks, empty = SCRATCH + "blocks/", SCRATCH + "empty/"
    if keys is None:
        keys = storage.list_keys(kv, SCRATCH)
    finished, listed = {}, []
    for k in keys:
        if k.startswith(blocks):
            name, got, header = parse_block_key(k[len(blocks):])
            if got == stamp:
                finished[name] = max(header, finished.get(name, 0))
        elif k.startswith(empty) and k[len(empty):].partition("@")[2] == stamp:
            listed.append(k)
    seen = {} if records is None else records
    found: set = set()
    for k in listed:
        if k in seen:
            found.update(seen[k])
    for k, fut in [(k, kv.read(k)) for k in listed if k not in seen]:   # all at once
        try:
            text = storage.read_result(fut)
            if text is None:   # deleted since the listing
                continue
            if not text.endswith(b"\n"):   # each name ends with one: a record cut short would cut a name
                raise ValueError(f"{len(text)} bytes that do not end a name")
            seen[k] = text[:-1].decode().split("\n")
            found.update(seen[k])
        except ValueError as exc:   # TensorStore's errors (I/O, permission); bytes that are not text
            raise DestinationError(f"cannot read {storage.kvstore_url(kv.spec().to_json())}{k}, a record of tasks "
                                   f"that found nothing ({one_line(exc)}); deleting it only makes a resumed "
                                   f"run mesh them again") from exc
    return finished, found


def scratch_tasks(kv, stamp: str = "", keys: Optional[list] = None,
                  records: Optional[dict] = None) -> tuple[set, set]:
    """Names (:func:`task_name`) of the tasks finished in the scratch area of ``kv`` with
    ``stamp``, a result each or named in a record of tasks that found nothing, and those of them
    that found nothing (:func:`scratch_results`, whose arguments and errors these are)."""
    results, found = scratch_results(kv, stamp, keys, records)
    return set(results) | found, found


def finished_tasks(kv, stamp: str = "", keys: Optional[list] = None, records: Optional[dict] = None) -> set:
    """The first set of :func:`scratch_tasks`: every finished task of the job."""
    return scratch_tasks(kv, stamp, keys, records)[0]


#: Names of tasks that found nothing per record in the scratch area (:class:`_EmptyTasks`).
EMPTY_BATCH = 4096
#: The most seconds (give or take :data:`REFILL_S`) a finished task that found nothing waits
#: unrecorded (a run killed meanwhile loses it: a resumed run runs it again).
EMPTY_FLUSH_S = 30.0


class _EmptyTasks:
    """The tasks of a run that found nothing, recorded in the scratch area by name, many to a
    record (:func:`empty_key`), instead of a task result each.

    Most tasks of a large volume find only background (its margins, outside the tissue): a
    result each was a file to write, list, read (its header, by the run that writes the output
    after an array job's parts) and delete per task; hundreds of thousands of requests on a
    cloud store.  A record is written (atomically) once it holds :data:`EMPTY_BATCH` names, or
    :data:`EMPTY_FLUSH_S` after its first, and when the run's tasks end, stopped or not.

    Parameters
    ----------
    kv : tensorstore.KvStore
        The destination.
    stamp : str
        :attr:`Plan.stamp` of the job.
    owner : (str, bytes), optional
        The run's mark (:func:`gpumesh.writer.taken_over`): on the way out of a run that another
        has taken over, nothing is written (the scratch area is that run's, or gone).
    records : dict, optional
        Each record written is added to it (its key -> its names), so that
        :func:`scratch_results` given it does not read the run's own records back.

    Attributes
    ----------
    names : set of str
        Every task of this run that found nothing, recorded or not yet.
    """

    def __init__(self, kv, stamp: str, owner: Optional[tuple] = None, records: Optional[dict] = None):
        self.kv, self.stamp, self.owner = kv, stamp, owner
        self.records = {} if records is None else records
        self.run = secrets.token_hex(8)
        self.seq = 0
        self.names: set = set()
        self._pending: list = []
        self._since = 0.0

    def add(self, name: str) -> None:
        """Count task ``name`` as finished with nothing found."""
        if not self._pending:
            self._since = time.monotonic()
        self._pending.append(name)
        self.names.add(name)

    def tick(self) -> None:
        """Write the names not yet recorded once they are :data:`EMPTY_BATCH`, or the first
        has waited :data:`EMPTY_FLUSH_S`."""
        if len(self._pending) >= EMPTY_BATCH or (self._pending and time.monotonic() - self._since >= EMPTY_FLUSH_S):
            self.flush()

    def flush(self, quiet: bool = False) -> None:
        """Write the names not yet recorded (:class:`DestinationError` where that fails, unless
        ``quiet``: on the way out of a run already failing, its tasks are then run again by a
        resumed run; nor is anything written then where another run has taken the
        destination over: a record left in its finished output, or in a scratch area deleted by
        hand, would be no run's)."""
        if not self._pending:
            return
        if quiet and self.owner is not None:
            from .writer import taken_over

            if taken_over(self.kv, self.owner):   # (False where the mark cannot be read)
                return
        try:
            # a line per name, each ended: a record cut short is told from a whole one
            key = empty_key(self.run, self.seq, self.stamp)
            storage.write(self.kv, key, "".join(n + "\n" for n in self._pending).encode())
        except Exception:
            if not quiet:
                raise
            return
        self.records[key] = self._pending
        self.seq += 1
        self._pending = []


def pack_block(index: np.ndarray, count_labels: np.ndarray, counts: np.ndarray, data: bytes) -> bytes:
    """Serialize a block result (fragment index, voxel counts, fragment bytes)."""
    header = _MAGIC + struct.pack("<QQ", len(index), len(count_labels))
    return b"".join([header, index.tobytes(), count_labels.astype("<u8").tobytes(),
                     counts.astype("<u8").tobytes(), data])


#: Bytes at the start of a block result that give its header's size (magic and two counts).
BLOCK_PREFIX = 24


def block_header_size(prefix: bytes) -> int:
    """Bytes of a block result before its fragment data, from its first :data:`BLOCK_PREFIX`
    bytes (the fragment index and voxel counts follow the prefix, see :func:`pack_block`)."""
    nfrag, ncount = struct.unpack_from("<QQ", prefix, 8)
    return BLOCK_PREFIX + nfrag * FRAG_DTYPE.itemsize + 16 * ncount


def block_is_empty(head: bytes) -> bool:
    """Whether a block result (or its first :data:`BLOCK_PREFIX` bytes) is well formed and holds
    no fragment and no voxel count: a task that found only background, as most of a large,
    sparse volume's are.  ``False`` for a corrupt one (:func:`unpack_block_header` says why)."""
    return len(head) >= BLOCK_PREFIX and head[:8] == _MAGIC and block_header_size(head) == BLOCK_PREFIX


def unpack_block_header(blob: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Parse a block result (whole, or its header: :func:`block_header_size` bytes); returns
    index, voxel-count labels, counts, data start offset.  :class:`GpumeshError` where it is not
    one, or is cut short (not a bare ``struct.error`` or NumPy's "buffer is smaller")."""
    if len(blob) < BLOCK_PREFIX or blob[:8] != _MAGIC or len(blob) < block_header_size(blob[:BLOCK_PREFIX]):
        raise GpumeshError("corrupt block result in scratch area; rerun with --overwrite")
    nfrag, ncount = struct.unpack_from("<QQ", blob, 8)
    pos = BLOCK_PREFIX
    index = np.frombuffer(blob, FRAG_DTYPE, nfrag, pos).copy()
    pos += nfrag * FRAG_DTYPE.itemsize
    labels = np.frombuffer(blob, "<u8", ncount, pos).copy()
    pos += 8 * ncount
    counts = np.frombuffer(blob, "<u8", ncount, pos).copy()
    pos += 8 * ncount
    return index, labels, counts, pos


def mesh_block(volume: Volume, plan: Plan, options: MeshOptions, b, backend: Backend,
               part=None) -> bytes:
    """Mesh one block (or one task of it, see :meth:`Plan.tasks`) and encode its fragments.

    Parameters
    ----------
    volume : Volume
    plan : Plan
    options : MeshOptions
    b : (3,) int
        Block index.
    backend : Backend
    part : None, ``COARSE`` or int
        ``None``: every LOD and the voxel counts of the block.  ``COARSE``: LOD ``L - 1``.
        ``0..7``: LODs ``0 .. L - 2`` and the voxel counts of that octant.  The parts of a
        block give exactly the fragments and voxel counts of the whole block, byte for byte.

    Returns
    -------
    bytes
        The packed block result (see :func:`pack_block`): one entry per (segment, LOD, node)
        with triangles, ordered so, with its bytes in that order; Draco fragments (multires) or
        legacy fragment files (legacy).
    """
    L = plan.lods
    halo = 1 << (L - 1)
    origin = np.asarray(b, dtype=np.int64) * plan.block
    out: list = []
    count_labels = counts = np.zeros(0, dtype=np.uint64)
    keep = np.ones(1, dtype=bool)   # which local IDs are meshed (MeshOptions.segments)
    start, stop = plan.block_bounds(b)
    if part is None or part == COARSE:
        level = volume.read(tuple(start), tuple(stop))
        if not level.any():
            # all background (outside the tissue, or past the data): nothing to count, mesh
            # or downsample (an empty coarse task took 53-62 ms, now 45, nearly all the read)
            keep = np.zeros(0, dtype=bool)
        elif part is None:
            # local IDs (order-preserving) for meshing and downsampling; ids[local - 1] is the
            # segment ID.  Both only compare IDs, so the coarse task relabels after its first
            # downsampling (8x fewer voxels) and gets the same meshes.
            level, ids = relabel_block(level)
            keep = options.selected(ids)
            count_labels, counts = _voxel_counts(level[halo:, halo:, halo:], ids, keep)
        for k in range(L):
            if not keep.any():
                break   # no selected segment here (MeshOptions.segments)
            sh = plan.shift(k)   # LOD k voxels are 2**sh LOD 0 voxels
            if k > 0:
                level = backend.downsample(level, _step(plan, k))
                if k == 1 and part == COARSE:
                    level, ids = relabel_block(level)
                    keep = options.selected(ids)
            if (k < L - 1 and part == COARSE) or not level.any():
                continue
            hk = halo >> sh
            mc_in = np.ascontiguousarray(level[hk[0] - 1:, hk[1] - 1:, hk[2] - 1:])
            out += _mesh_lod(volume, plan, options, backend, k, mc_in, origin >> sh, ids, keep)
    else:
        # LODs 0 .. L-2 of one octant, whose LOD 0 voxels start at O.  At LOD k its cubes
        # need LOD k voxels (O >> k) - 1 .. its last cube's high voxel, as far as the whole
        # block's labels reach: the octant is read from 2**(L-1) voxels before it to its end
        # (clipped to the block's read), which keeps every 2x2x2 group of the downsampling the
        # block's own (both are aligned to 2**(L-1)).  Nothing past the octant is needed: the
        # thin-spot test looks at the piece's own voxels only.
        h = plan.block // 2
        O = plan.octant_origin(b, part)
        r0, r1 = O - halo, np.minimum(O + h, stop)
        level = volume.read(tuple(r0), tuple(r1))
        if level.any():
            level, ids = relabel_block(level)
            keep = options.selected(ids)
            # the block's voxel counts, octant by octant: its voxels from O on (past the volume
            # every voxel is background)
            count_labels, counts = _voxel_counts(level[halo:halo + h, halo:halo + h, halo:halo + h], ids, keep)
        else:
            keep = np.zeros(0, dtype=bool)   # all background
        for k in range(L - 1 if keep.any() else 0):
            sh = plan.shift(k)
            if k > 0:
                level = backend.downsample(level, _step(plan, k))
            base, ok, top = r0 >> sh, O >> sh, stop >> sh    # LOD k voxels: level[i] is base + i
            m0 = ok - 1 - base
            m1 = np.minimum(ok + (h >> sh), top) - base
            if np.any(m1 - m0 < 2):
                continue  # no cube of this octant at LOD k (a cut border block)
            mc_in = np.ascontiguousarray(level[m0[0]:m1[0], m0[1]:m1[1], m0[2]:m1[2]])
            if mc_in.any():
                out += _mesh_lod(volume, plan, options, backend, k, mc_in, ok, ids, keep)
    # each segment's fragments side by side, all its LODs (by segment ID, LOD, node; each LOD
    # came in ID order): the assembly reads what a shard or a run of segments needs from a
    # result in fewer byte ranges (one per segment, where LOD by LOD it was one per LOD)
    out.sort(key=lambda e: (int(e[0][0]), e[0][1], e[0][2]))
    entries, offset = [], 0
    for (label, k, node, ntri), data in out:
        entries.append((label, k, node[0], node[1], node[2], offset, len(data), ntri))
        offset += len(data)
    index = np.array(entries, dtype=FRAG_DTYPE)
    return pack_block(index, count_labels, counts, b"".join(data for _, data in out))


def _step(plan: Plan, k: int) -> tuple:
    """Downsampling factor from LOD ``k - 1`` to LOD ``k``: 1 or 2 per axis."""
    return tuple(int(v) for v in 1 << (plan.shift(k) - plan.shift(k - 1)))


def _voxel_counts(local: np.ndarray, ids: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Segment IDs present in ``local`` (local IDs, see ``relabel_block``) among those that
    ``keep`` (bool, one per ID) selects, and their voxels."""
    counts = np.bincount(np.ascontiguousarray(local).ravel(), minlength=len(ids) + 1)[1:]
    found = (counts > 0) & keep
    return ids[found], counts[found].astype(np.uint64)


def _mesh_lod(volume: Volume, plan: Plan, options: MeshOptions, backend: Backend, k: int,
              mc_in: np.ndarray, cube0, ids: np.ndarray, keep: np.ndarray) -> list:
    """Mesh, decimate and encode the nodes of one LOD of a block (or of an octant).

    ``mc_in`` holds LOD ``k`` local labels whose cube ``j`` is the volume's LOD ``k`` cube
    ``cube0 + j`` (``cube0``: (3,) int, a multiple of the node edge :meth:`Plan.node_voxels`).
    Only the local IDs that ``keep`` (bool, one per ID) selects are
    meshed: the others are background to marching cubes, which meshes each segment from where
    its own label is alone (so a selected segment's triangles are those of the full job; the
    thin-spot test likewise looks at its own label only).
    Returns ``[((segment ID, k, node, triangles), bytes), ...]`` sorted by (ID, node).
    """
    quality = get_quality(options.quality)
    bits = options.vertex_quantization_bits
    C = plan.chunk
    E = plan.node_voxels(k)                  # node edge in LOD k voxels per axis (C where fully downsampled)
    to_node = (C / E).astype(np.float64)     # LOD k voxels -> the node's frame of C units (powers of two: exact)
    piece_size = C if k == 0 else C // 2     # divides every axis's half node edge
    sub_per_node = (E // piece_size).tolist()
    # pieces per axis, as marching cubes numbers them (a cut border block has fewer)
    _, py, pz = (-(-(n - 1) // piece_size) for n in mc_in.shape)
    node0 = (np.asarray(cube0, dtype=np.int64) // E).tolist()
    scale = plan.voxel_nm(k, volume.voxel_size)
    if not keep.all():   # MeshOptions.segments
        mc_in = np.where(np.r_[False, keep][mc_in], mc_in, 0)
    E = E.tolist()
    aniso = any(e != C for e in E)
    frags: dict[tuple, list] = {}
    for piece in backend.mesh(mc_in, piece_size):   # Python ints here: a block has many small pieces
        pidx = piece.piece
        pc = (pidx // (py * pz), (pidx // pz) % py, pidx % pz)
        ln = (pc[0] // sub_per_node[0], pc[1] // sub_per_node[1], pc[2] // sub_per_node[2])
        p_rel, on_plane = piece_in_node(piece, [c * e for c, e in zip(ln, E)],
                                        [(c % n) * piece_size for c, n in zip(pc, sub_per_node)], piece_size)
        if decimates(quality.keep(k), len(piece.faces)):
            # decimated vertices are a subset of the piece's: still inside its box
            v, f = decimate(p_rel, piece.faces, quality.keep(k), scale, frozen=on_plane,
                            locked=thin_vertices(mc_in, piece, piece_size))
        else:
            v, f = p_rel, piece.faces
        frags.setdefault((piece.label, (node0[0] + ln[0], node0[1] + ln[1], node0[2] + ln[2])), []).append((v, f))
    out = []
    for (label, node), parts in sorted(frags.items()):
        if len(parts) == 1:
            v, f = parts[0]
        else:
            verts, faces, base = [], [], 0
            for v, f in parts:
                verts.append(v)
                faces.append(f + base)
                base += len(v)
            v = np.concatenate(verts)
            f = np.concatenate(faces)
        q = encode.quantize(v * to_node if aniso else v, C, bits)
        if len(parts) > 1:   # join the pieces' shared border vertices
            q, f, kept = encode.weld_quantized(q, f)
        else:
            # one piece: its vertices are distinct half-voxel points in [0, E], which stay
            # distinct as a half voxel is at least two quantization steps (E <= 2**(bits - 2),
            # the far face's 2**bits clipped to 2**bits - 1): a weld would change nothing
            # (LOD 0's fragments, 3.6 % of the task CPU)
            f, kept = np.ascontiguousarray(f, dtype=np.int32), slice(None)
        if len(f) == 0:
            continue
        if options.format == "legacy":
            corner = volume.voxel_offset + np.array(node) * C - 0.5
            nm = (corner + v[kept]) * volume.voxel_size
            data = encode.encode_legacy(nm, f)
        else:
            data = encode.encode_draco(q, f, bits)
        out.append(((ids[label - 1], k, node, len(f)), data))
    return out


# --------------------------------------------------------------------------------------
# Worker pool plumbing (processes forked by the worker server, or spawned; each opens the volume once).

_WORKER: dict[str, Any] = {}


#: glibc's ``mallopt`` parameters that :func:`_keep_freed_memory` sets: (parameter, the
#: environment variable that sets it when a process starts, glibc's default (``mallopt(3)``),
#: the value set)
_MALLOC_SETTINGS = ((-4, "MALLOC_MMAP_MAX_", 65536, 0),              # M_MMAP_MAX
                    (-1, "MALLOC_TRIM_THRESHOLD_", 128 << 10, 2**31 - 1),  # M_TRIM_THRESHOLD
                    (-2, "MALLOC_TOP_PAD_", 128 << 10, 256 << 20))   # M_TOP_PAD

#: What :func:`_keep_freed_memory` set, for :func:`_restore_memory`: ``"malloc"`` (glibc's
#: parameters) and ``"hugepage"`` (NumPy's setting before)
_KEPT_MEMORY: dict = {}


def _keep_freed_memory(own_process: bool = True) -> None:
    """Make a worker reuse its memory instead of faulting fresh pages for every block.

    A block allocates a few hundred MB of short-lived arrays.  Two things made each block
    fault them in again, which cost more system time than the meshing on some VMs:

    * glibc served them by mmap and returned them on free.  Workers serve every allocation
      from the heap (``M_MMAP_MAX = 0``) and do not trim it (``M_TRIM_THRESHOLD``): after the
      first block the heap holds the peak.
    * NumPy asks for transparent huge pages on every large array (``madvise(MADV_HUGEPAGE)``).
      Where the kernel's THP ``defrag`` setting is ``madvise`` (a common default), each such
      fault compacts memory synchronously: on the 2-core VM of ``docs/STATUS.md`` touching
      400 MB cost 2-5 s of system time with huge pages and 0.24 s without.  Workers turn it
      off (``NUMPY_MADVISE_HUGEPAGE=0`` does the same for a whole process).

    ``own_process``: a process of the job's own pool, which ends with the job: its threads
    (TensorStore's) also share one malloc arena (``M_ARENA_MAX``, which glibc cannot undo).
    Else (a Dask worker, which outlives the job) only what :func:`_restore_memory` undoes is
    set.  No-op where glibc is not the allocator or NumPy lacks the switch.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        for param, _, _, value in _MALLOC_SETTINGS:
            libc.mallopt(param, value)
        if own_process:
            libc.mallopt(-8, 1)            # M_ARENA_MAX
        _KEPT_MEMORY.setdefault("malloc", True)
    except (OSError, AttributeError):
        pass
    switch = _madvise_switch()
    if switch is not None:
        before = switch(False)
        _KEPT_MEMORY.setdefault("hugepage", before)


def _madvise_switch():
    """NumPy's ``_set_madvise_hugepage`` (returns the setting before), or ``None``."""
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            return __import__(mod, fromlist=["_set_madvise_hugepage"])._set_madvise_hugepage
        except (ImportError, AttributeError):
            continue
    return None


def _malloc_environ(env: str, default: int) -> int:
    """The value of a glibc malloc parameter that the environment set at start-up, as glibc reads
    it: ``GLIBC_TUNABLES``'s ``glibc.malloc.<name>`` (which wins), else ``env``
    (``MALLOC_TOP_PAD_``: ``top_pad``), each a number in decimal, hex (``0x``) or octal (``0``);
    ``default`` where neither says one."""
    tunable = f"glibc.malloc.{env[len('MALLOC_'):-1].lower()}"
    values = [v for n, _, v in (t.partition("=") for t in os.environ.get("GLIBC_TUNABLES", "").split(":"))
              if n == tunable]
    for value in (values[-1:] + [os.environ.get(env)]):
        if value is None:
            continue
        value = value.strip()
        try:
            if value[:2].lower() == "0x":
                return int(value[2:], 16)
            return int(value, 8 if len(value) > 1 and value[0] == "0" else 10)
        except ValueError:
            continue
    return default


def _restore_memory() -> None:
    """Undo :func:`_keep_freed_memory` (all but ``M_ARENA_MAX``): glibc's parameters go back to
    what the environment set at start-up (``MALLOC_TRIM_THRESHOLD_``, which Dask's nanny sets,
    and the others), else glibc's defaults; NumPy's huge pages to what they were; and the heap's
    free memory is handed back to the system (``malloc_trim``).  For a process that outlives
    the job (a Dask worker: :func:`end_worker_job`); no-op where nothing was set."""
    if _KEPT_MEMORY.pop("malloc", False):
        try:
            libc = ctypes.CDLL("libc.so.6")
            for param, env, default, _ in _MALLOC_SETTINGS:
                libc.mallopt(param, _malloc_environ(env, default))
            libc.malloc_trim(0)
        except (OSError, AttributeError):
            pass
    if "hugepage" in _KEPT_MEMORY:
        switch = _madvise_switch()
        if switch is not None:
            switch(bool(_KEPT_MEMORY.pop("hugepage")))


#: Most memory a worker's read cache may hold.
MAX_READ_CACHE = 1 << 30


def read_cache_bytes(volume: Volume, plan: Plan) -> int:
    """Size of a worker's cache of decoded storage chunks (bytes).

    A block's tasks read overlapping boxes (each octant with a margin of ``2**(L-1)`` voxels,
    the coarse task the whole block), so without a cache a worker decodes the same chunks once
    per task.  The cache holds the chunks that the reads of any one block touch (tasks run block by
    block), at most :data:`MAX_READ_CACHE`; 0 when the source has no chunk shape (an
    in-memory array).
    """
    chunk = volume.chunk_shape
    if not chunk:
        return 0
    chunk = np.asarray(chunk, dtype=np.int64)
    shape = np.asarray(volume.shape, dtype=np.int64)
    start, stop = plan.block_bounds(plan.block_array())
    lo, hi = np.maximum(start, 0), np.minimum(stop, shape)   # every task reads within these
    touched = np.prod((hi - 1) // chunk - lo // chunk + 1, axis=1)
    most = int(touched[np.all(hi > lo, axis=1)].max(initial=0))
    return int(min(most * int(np.prod(chunk)) * np.dtype(volume.dtype).itemsize, MAX_READ_CACHE))


def end_worker_job() -> None:
    """Let go of the job in a worker process that outlives it (a Dask worker): its source and
    read cache, destination, the task results it holds, and its backend's device memory
    (``close``: :meth:`gpumesh.gpu.GPUBackend.close`), then the memory settings
    (:func:`_restore_memory`), so that a finished job leaves the worker as it found it."""
    import gc

    backend = _WORKER.get("backend")
    _WORKER.clear()
    try:
        close_backend(backend)
    finally:   # a device in an error state fails close: the memory settings go back all the same
        del backend
        gc.collect()
        _restore_memory()


def _exit_with_parent() -> None:
    """End this worker as soon as the process that started the pool is gone.

    A pool worker otherwise waits forever for its next task when the main process is killed
    (SIGKILL by a batch scheduler or the OOM killer): its task queue holds a write end of its own
    pipe, so it never sees end-of-file, and it would keep its memory (and its CUDA context) for
    good.  ``parent_process().sentinel`` is closed exactly when the pool's process exits, whether
    the worker was spawned or forked by the worker server.
    """
    import multiprocessing
    from multiprocessing.connection import wait

    parent = multiprocessing.parent_process()
    if parent is None or parent.sentinel is None:
        return

    def watch():
        wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="gpumesh-exit-with-parent", daemon=True).start()


#: Largest voxel offset (per axis, either sign) that a multi-resolution manifest's float32
#: ``grid_origin`` holds exactly.
MAX_GRID_ORIGIN = 2**24

#: Array sources of at least this many bytes reach the local workers through a temporary
#: ``.npy`` file that each maps (the page cache holds one copy), not a pickled copy each.
SPILL_ARRAY_BYTES = 64 << 20


@dataclass(frozen=True)
class _ArrayFile:
    """An array source written to a temporary ``.npy`` file for the workers to map."""

    path: str

    def load(self) -> np.ndarray:
        return np.load(self.path, mmap_mode="r")

    def remove(self) -> None:
        shutil.rmtree(os.path.dirname(self.path), ignore_errors=True)


def _spill_array(arr: np.ndarray) -> Optional[_ArrayFile]:
    """``arr`` written to a new temporary directory (``$TMPDIR/gpumesh-array-*``), when it is
    large enough to be worth it; ``None`` (the workers get a copy) when it is small or cannot
    be written (with a warning)."""
    if arr.nbytes < SPILL_ARRAY_BYTES:
        return None
    folder = tempfile.mkdtemp(prefix="gpumesh-array-")
    try:
        path = os.path.join(folder, "labels.npy")
        np.save(path, arr, allow_pickle=False)
        return _ArrayFile(path)
    except BaseException as exc:   # Ctrl-C included: no copy left behind
        shutil.rmtree(folder, ignore_errors=True)
        if not isinstance(exc, OSError):
            raise
        warnings.warn(f"could not write the array source to a temporary file for the workers to share "
                      f"({one_line(exc)}); each worker gets a copy of it", stacklevel=3)
        return None


def _init_worker(source, open_kwargs, plan, options, dest_spec, device, nworkers, started=None,
                 device_workers=None):
    import gc

    import tensorstore as ts  # noqa: F401

    # Ctrl-C reaches the whole process group, and so does a closed terminal's SIGHUP: the main
    # process stops the workers, whose own KeyboardInterrupt tracebacks would bury its one line
    # (and a worker ended by SIGHUP, the failed job's)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _exit_with_parent()
    _keep_freed_memory()
    # a task allocates many short-lived objects but makes no reference cycles worth a full
    # collection every few thousand allocations
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)

    # this worker's number among those starting together: for its share of the kernel
    # compiles, and whether it is one of the device_workers that use the GPU
    worker = 0
    if started is not None:
        with started.get_lock():
            worker = started.value
            started.value += 1
    set_up_worker(source, open_kwargs, plan, options, dest_spec, device, worker, nworkers, device_workers)


def set_up_worker(source, open_kwargs, plan, options, dest_spec, device, worker=0, nworkers=1,
                  device_workers=None) -> None:
    """Open the job's source, destination and backend in this worker process, for the task
    functions (``_run_task`` and the writing tasks); ``worker`` of ``nworkers`` says which share
    of the kernel compiles it starts with, and whether it is one of the ``device_workers``
    (default: all) that use the GPU."""
    from .warmup import warm_up

    if isinstance(source, _ArrayFile):
        source = source.load()
    _WORKER["volume"] = open_volume(source, **open_kwargs)
    _WORKER["plan"] = plan
    _WORKER["options"] = options
    _WORKER["kv"] = storage.open_kvstore(dest_spec, check=False)
    _WORKER["held_results"] = _HeldResults()   # the task results a worker writing the output holds
    if device_workers is None:
        device_workers = nworkers
    if device != "cpu" and worker >= device_workers:
        device = "cpu"   # the device has no room for more processes (gpu.device_processes)
    _WORKER["backend"] = get_backend(device, processes=device_workers)
    warm_up(_WORKER["volume"].dtype, _WORKER["backend"].name, worker, nworkers)


def _how_workers_ended(procs: list) -> str:
    """``" (killed by SIGKILL ...)"`` from the exit codes of a broken pool's processes, where known.

    The pool stops its other workers with SIGTERM once one has died, so other signals and
    non-zero exit codes tell which one ended first and how.
    """
    codes = [p.exitcode for p in procs if p.exitcode not in (None, 0, -signal.SIGTERM)]
    if not codes:
        return ""
    code = codes[0]
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = ": the out-of-memory killer?" if -code == signal.SIGKILL else ""
        return f" (killed by {name}{hint})"
    return f" (exit status {code})"


def _load_writer_kernels() -> None:
    from .octree import segment_nodes

    segment_nodes(np.zeros((1, 3), np.uint32), np.zeros(1, np.int64), 1)


#: What a Dask future raises when the cluster lost what it needed (its scheduler; the only
#: workers holding scattered data, which cannot be computed again; the connection).
_CLUSTER_LOST = ("CancelledError", "FutureCancelledError", "CommClosedError")


def _run_task(task) -> tuple[tuple, bytes, float, str, str]:
    """Run one task in a worker and write its result, unless it found nothing (the caller
    records that, :class:`_EmptyTasks`); returns the task, its result's header (its start up to
    the fragment data, so that the assembly need not read it), the worker's peak RSS so far (MiB:
    a forked worker is not this process's child, so its own figure is reported), its
    backend's name and the worker process (``host:pid``, to count a cluster's workers on a GPU)."""
    blob = mesh_block(_WORKER["volume"], _WORKER["plan"], _WORKER["options"], task[0],
                      _WORKER["backend"], task[1])
    head = blob[:block_header_size(blob)]
    if not block_is_empty(blob):   # one that found nothing: the main process records it (_EmptyTasks)
        storage.write(_WORKER["kv"], block_key(task, _WORKER["plan"].stamp, len(head)), blob)
    return (task, head, peak_rss_mb(), _WORKER["backend"].name,
            f"{socket.gethostname()}:{os.getpid()}")


def _worker_results(keys, whole, cache_bytes, rows, hold=False):
    """The task results as a worker writing the fragments ``rows`` reads them
    (:class:`gpumesh.writer.TaskResults`): results ``whole`` read whole (within
    ``cache_bytes``), the others' fragments in spans (:meth:`~gpumesh.writer.TaskResults.prefetch`;
    one by one past the cap).  The results kept whole leave room for the spans the fragments of
    the others are read in (:func:`~gpumesh.writer.fragment_spans`: with the bytes between
    them), up to 1 / :data:`~gpumesh.writer.SPAN_ROOM_SHARE` of the cap.

    ``hold`` (:class:`gpumesh.writer.WorkerReads`: all the results fit in ``cache_bytes``): the
    results read whole are held by this worker for its next parts of the output, within
    ``cache_bytes``, and those it holds are not read again."""
    from .writer import SPAN_ROOM_SHARE, TaskResults, fragment_spans

    results = TaskResults(_WORKER["kv"], keys, cache_bytes=cache_bytes)
    held = _WORKER.setdefault("held_results", _HeldResults()) if hold else None
    if held is not None:
        results.adopt(held.get(keys, np.unique(rows["block"]).tolist()))
    _, start, end = fragment_spans(rows[~np.isin(rows["block"], whole)])
    spanned = int((end - start).sum())
    results.keep(whole, leave=min(spanned, cache_bytes // SPAN_ROOM_SHARE))
    if held is not None:
        held.add({keys[b]: blob for b, blob in results.kept.items()}, cache_bytes)
    results.prefetch(rows)
    return results


class _HeldResults:
    """Task results that a worker writing the output holds for all its parts of it
    (:func:`_worker_results` with ``hold``), by key, for one job (:func:`set_up_worker`); a
    Dask worker's threads share them."""

    def __init__(self):
        self.blobs: dict[str, bytes] = {}
        self.bytes = 0
        self.lock = threading.Lock()

    def get(self, keys: list, blocks: list) -> dict:
        """Result number -> bytes, of the results ``blocks`` (numbers in ``keys``) held."""
        with self.lock:
            return {b: self.blobs[keys[b]] for b in blocks if keys[b] in self.blobs}

    def add(self, blobs: dict, cap: int) -> None:
        """Hold ``blobs`` (key -> bytes) not yet held while all held stay within ``cap`` bytes."""
        with self.lock:
            for key, blob in blobs.items():
                if key not in self.blobs and self.bytes + len(blob) <= cap:
                    self.blobs[key] = blob
                    self.bytes += len(blob)


def _run_shard_task(keys, rows, shard, spec, num_lods, grid_origin, whole, cache_bytes,
                    hold=False) -> tuple[dict, float]:
    """Build and write one shard in a worker (:func:`gpumesh.writer.write_shard`), reading the
    task results as :func:`_worker_results` says.  Returns the shard's statistics and the
    worker's peak RSS (MiB)."""
    from .writer import write_shard

    results = _worker_results(keys, whole, cache_bytes, rows, hold)
    part = write_shard(_WORKER["kv"], results, rows, shard, spec, _WORKER["plan"], _WORKER["options"], num_lods,
                       grid_origin)
    return part, peak_rss_mb()


def _run_segments_task(keys, rows, num_lods, grid_origin, whole, cache_bytes, hold=False) -> tuple[list, dict, float]:
    """Build some segments of a shard in a worker (:func:`gpumesh.writer.build_segments`),
    reading the task results as :func:`_worker_results` says.  Returns their items, their
    statistics and the worker's peak RSS (MiB)."""
    from .writer import build_segments

    results = _worker_results(keys, whole, cache_bytes, rows, hold)
    items, part = build_segments(results, rows, _WORKER["plan"], _WORKER["options"], num_lods, grid_origin)
    return items, part, peak_rss_mb()


def _run_write_task(keys, rows, num_lods, grid_origin, whole, cache_bytes, hold=False) -> tuple[dict, float]:
    """Write the files of some segments (unsharded multires or legacy) in a worker
    (:func:`gpumesh.writer.write_all_segments`), reading the task results as
    :func:`_worker_results` says.  Returns their statistics and the worker's peak RSS (MiB)."""
    from .writer import _new_stats, write_all_segments

    results = _worker_results(keys, whole, cache_bytes, rows, hold)
    part = _new_stats(_WORKER["plan"].lods)
    write_all_segments(_WORKER["kv"], results, rows, _WORKER["plan"], _WORKER["options"], part, grid_origin,
                       num_lods)
    return part, peak_rss_mb()


# --------------------------------------------------------------------------------------


@dataclass
class Summary:
    """What the main job did (printed by the CLI, written by ``--summary-json``).

    Attributes
    ----------
    segments : int
        Segments meshed (with a manifest in the output).
    triangles_per_lod, fragments_per_lod : list of int
        Triangles and non-empty fragments of all segments at each LOD (LOD 0 first).
    voxel_size_per_lod : list of [float, float, float]
        nm per voxel (x, y, z) of the labels each LOD was meshed from.
    bytes : int
        Bytes of the mesh files written: the shards, or the manifests and fragment files
        (``info`` and segment properties excluded).
    seconds, seconds_meshing, seconds_writing : float
        Wall time of the job (from the call), of the tasks (meshing, decimation, encoding) and
        of the assembly that writes the output.
    peak_rss_mb : float
        Largest peak resident memory (MiB) of this process or any worker.
    blocks, tasks, tasks_resumed : int
        The plan's blocks, its tasks (a block or one of its octants), and the tasks an
        interrupted run had finished (``resume``).
    workers, device_workers : int
        Worker processes (or Dask workers), and how many of them meshed on the GPU.
    device : str
        ``"cpu"`` or ``"gpu"`` (``"cpu+gpu"`` on a cluster with both).
    format : str
        ``"multires"`` or ``"legacy"``.
    dust_segments, missing_segments : int
        Segments below ``MeshOptions.dust_threshold`` (not meshed), and selected segments
        (``MeshOptions.segments``) not in the volume.
    index_waves : int
        Passes of the assembly over the tasks' fragment index past the first (0: it held the
        whole index at once, :data:`gpumesh.writer.ASSEMBLY_INDEX_BYTES`).
    index_spilled : bool
        Those passes read the index from a temporary file (:class:`gpumesh.writer.IndexSpill`),
        not from the task results' headers again.
    index_grouped : bool
        The temporary file was written again wave by wave (:meth:`gpumesh.writer.IndexSpill.group`),
        so that each wave read its own entries alone.
    index_bytes_read : int
        Bytes of the temporary file read back (0 without one).
    part : str or None
        ``"K/N"`` for a part of a job (``run_mesh``'s ``part``), which writes no output (no
        segments, triangles or bytes here): ``blocks``, ``tasks`` and ``tasks_resumed`` are
        then the part's, ``tasks_all`` the whole job's tasks and ``tasks_done_all`` how many of them had
        finished (by any part) when this one ended.
    tasks_all, tasks_done_all : int
        See ``part`` (0 for a whole job).
    """

    segments: int = 0
    triangles_per_lod: list = field(default_factory=list)
    fragments_per_lod: list = field(default_factory=list)
    voxel_size_per_lod: list = field(default_factory=list)   # nm, [x, y, z] of each LOD's voxels
    bytes: int = 0   # of the mesh files written (shards, or manifests and fragment files), info excluded
    seconds: float = 0.0
    seconds_meshing: float = 0.0
    seconds_writing: float = 0.0
    peak_rss_mb: float = 0.0
    blocks: int = 0
    tasks: int = 0
    tasks_resumed: int = 0
    workers: int = 1
    device: str = "cpu"
    device_workers: int = 0     # workers meshing on the GPU (the others on the CPU backend)
    format: str = "multires"
    dust_segments: int = 0      # segments below MeshOptions.dust_threshold, not meshed
    missing_segments: int = 0   # segments of MeshOptions.segments not in the volume (or the bounds)
    index_waves: int = 0        # passes of the assembly over the fragment index past the first
                                # (0: it held the whole fragment index, gpumesh.writer.ASSEMBLY_INDEX_BYTES)
    index_spilled: bool = False  # those passes read it from a temporary file, not from the headers again
    index_grouped: bool = False  # which was written again wave by wave (each wave read its own entries)
    index_bytes_read: int = 0   # bytes of that file read back
    part: Optional[str] = None  # "K/N" of a part (run_mesh's part), which writes no output
    tasks_all: int = 0          # a part's: the whole job's tasks,
    tasks_done_all: int = 0     # and how many of them had finished when the part ended

    def to_json(self) -> dict:
        """The summary as a JSON-serialisable dict, one key per field (the CLI's
        ``--summary-json``)."""
        return dataclasses.asdict(self)


def peak_rss_mb() -> float:
    """Largest resident set (MiB) of this process and of any finished child process."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) / 1024.0


def _plan_fingerprint(volume: Volume, plan: Plan, options: MeshOptions, axes: Optional[str], mip: int,
                      fill_missing: bool, contents: Optional[str] = None) -> dict:
    """What a resumed run must share with the interrupted one (``.gpumesh-work/plan.json``):
    the source's location, or an in-memory source's ``contents`` (:func:`_array_digest`,
    :func:`_volume_digest`; a stored source's contents are not compared), how it was read
    (``fill_missing`` included: a chunk not stored is background or an error), the plan and
    options."""
    opts = dataclasses.asdict(options)
    for name in ("segments", "exclude_segments"):   # a digest of the selection, which may be long
        if getattr(options, name) is not None:
            ids = _segment_array(getattr(options, name))
            opts[name] = {"count": len(ids), "sha256": hashlib.sha256(ids.astype("<u8").tobytes()).hexdigest()}
    if options.exclude_segments is None:   # the stamps of earlier versions' jobs stand
        del opts["exclude_segments"]
    return {
        "source": None if volume.location is None else storage.kvstore_url(volume.location),
        "axes": axes,
        "mip": int(mip),
        "fill_missing": bool(fill_missing),
        "plan": {k: v for k, v in dataclasses.asdict(plan).items() if k != "stamp"},
        "options": opts,
        "voxel_size": [float(v) for v in volume.voxel_size],
        "voxel_offset": [int(v) for v in volume.voxel_offset],
        "dtype": str(np.dtype(volume.dtype)),
        **({} if contents is None else {"contents": contents}),
    }


def _stamp(fingerprint: dict) -> str:
    """:attr:`Plan.stamp` of a job: 16 hex digits of the SHA-256 of its fingerprint
    (:func:`_plan_fingerprint`) as JSON with sorted keys."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def _fingerprint_changes(old: dict, new: dict, most: int = 4) -> str:
    """What differs between two plan fingerprints (:func:`_plan_fingerprint`), for a refused
    ``--resume``: ``key: old -> new`` (``options.quality: "medium" -> "high"``), options first
    and the plan (which follows from them and the volume) last, at most ``most`` of them; a key
    the old one lacks shows as the key alone."""
    def shown(value) -> str:
        text = json.dumps(value)
        return text if len(text) <= 40 else text[:37] + "..."

    changes = []
    for key in sorted(set(old) | set(new), key=lambda k: (k == "plan", k != "options", k)):
        a, b = old.get(key), new.get(key)
        if key not in old:
            changes.append(key)
        elif isinstance(a, dict) and isinstance(b, dict):
            changes += [f"{key}.{k}: {shown(a.get(k))} -> {shown(b.get(k))}"
                        for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            changes.append(f"{key}: {shown(a)} -> {shown(b)}")
    return "; ".join(changes[:most] + (["..."] if len(changes) > most else []))


#: The signals that stop the main job (the CLI's handlers, or Ctrl-C's KeyboardInterrupt).
_STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextlib.contextmanager
def _signals_deferred():
    """Hold SIGINT, SIGTERM and SIGHUP back while the pool starts its worker processes, then
    deliver the first that came.  Interrupted while a worker is forked but not yet registered
    with the pool, the pool could not stop that worker, and waiting for the workers' server
    would hang (it waits for its children).  Outside the main thread, where no handler can be
    set, a no-op; a signal whose handler was not set from Python is left as it is, and so is an
    ignored one (SIGHUP under ``nohup``): held, it would be the first that came, and a stop
    signal after it would be dropped."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list = []
    held = {sig: signal.signal(sig, lambda num, frame: caught.append((num, frame)))
            for sig in _STOP_SIGNALS if signal.getsignal(sig) not in (None, signal.SIG_IGN)}
    try:
        yield
    finally:
        for sig, handler in held.items():
            signal.signal(sig, handler)
        if caught:
            num, frame = caught[0]
            handler = held[num]
            if callable(handler):
                handler(num, frame)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), num)


#: Voxels below which the main job runs in its own process unless given its workers: each
#: worker process loads its kernels (about half a second) before its first task, and a job
#: this small is done about as soon.  On the real volume (2-core VM shared with other tests,
#: bench_startup.py): a 128^3 cutout took 1.17 s on one worker against 1.92 s on two (median
#: of 5), a 256^3 one 5.0 s against 5.8 s, a 384^3 one 26.3 s against 25.5 s (median of 3).
SMALL_JOB_VOXELS = 192 ** 3

#: Bytes of the slabs in which run_mesh reads an in-memory array source before the job: for
#: negative labels where it is signed, and for its digest (:func:`_array_digest`).
NEGATIVE_CHECK_BYTES = 64 << 20


def _array_digest(arr: np.ndarray) -> str:
    """SHA-256 (hex) of an in-memory array source: its dtype, shape, memory order and bytes.

    An array has no location: its contents go into the job's fingerprint
    (:func:`_plan_fingerprint`) instead, so that a ``resume`` after the array changed is
    refused rather than keeping the task results of the old contents.  The whole array counts,
    ``bounds`` or not.  A C- or Fortran-ordered array is hashed as it lies in memory, without
    a copy (the same values in the other order give another digest); any other view as its C
    copy would be, in slabs of about :data:`NEGATIVE_CHECK_BYTES`.  The slabs are hashed on up to 8 threads
    (hashlib releases the GIL): 0.28 s for a 512^3 uint32 array on the 2-core VM."""
    from .resources import usable_cores

    order = "F" if arr.flags.f_contiguous and not arr.flags.c_contiguous else "C"
    flat = arr.T if order == "F" else arr   # C-ordered either way; a view's slabs are copied
    if flat.ndim == 0 or flat.size == 0:
        flat = flat.reshape(1, -1)
    step = max(1, NEGATIVE_CHECK_BYTES // max(1, flat[0].nbytes))

    def slab(i: int) -> bytes:
        return hashlib.sha256(np.ascontiguousarray(flat[i:i + step])).digest()

    starts = range(0, flat.shape[0], step)
    threads = min(8, usable_cores(), len(starts))
    if threads <= 1:
        digests = [slab(i) for i in starts]
    else:
        with ThreadPoolExecutor(threads) as pool:
            digests = list(pool.map(slab, starts))
    head = f"{arr.dtype.str} {arr.shape} {order}".encode()
    return hashlib.sha256(head + b"".join(digests)).hexdigest()


def _slabs(volume: Volume):
    """The labels of ``volume`` (the box, with ``bounds``), read as the tasks read them, in x
    slabs of about :data:`NEGATIVE_CHECK_BYTES` (a read copies: one read of the whole doubled
    the job's memory); each read refuses negative labels (InvalidVolumeError)."""
    nx, ny, nz = volume.shape
    step = max(1, NEGATIVE_CHECK_BYTES // max(1, ny * nz * np.dtype(volume.dtype).itemsize))
    for x in range(0, nx, step):
        yield volume.read((x, 0, 0), (min(x + step, nx), ny, nz))


def _volume_digest(volume: Volume) -> str:
    """SHA-256 (hex) of the labels of a source that has no location and is no NumPy array (a
    TensorStore of the in-memory ``array`` driver): its fingerprint has nothing else of the
    source, as an array's would not without :func:`_array_digest`.  Read in :func:`_slabs`."""
    digest = hashlib.sha256(f"{np.dtype(volume.dtype).str} {tuple(volume.shape)} xyz".encode())
    for slab in _slabs(volume):
        digest.update(slab)
    return digest.hexdigest()


def _interrupt_of(exc: BaseException) -> Optional[KeyboardInterrupt]:
    """The Ctrl-C (or the CLI's SIGTERM, a ``KeyboardInterrupt`` too) behind ``exc``, else ``None``.

    A ``KeyboardInterrupt`` raised while a numba-compiled function runs (the signal handler
    runs at the dispatcher's next Python call) comes out of it as ``SystemError: CPUDispatcher(...)
    returned a result with an exception set``, caused by the ``KeyboardInterrupt``: the job in this
    process (one worker) and the writing would end with that traceback instead of the interrupt."""
    seen = 0
    while isinstance(exc, SystemError) and seen < 8:   # the SystemErrors of nested dispatchers
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return exc if isinstance(exc, KeyboardInterrupt) else None


#: Meshing tasks per worker thread that the main job keeps submitted and unfinished at once
#: (:class:`_InFlight`): enough that a worker finds its next task queued, whatever the others'
#: tasks take.  On a Dask cluster, per worker thread it has now: workers may join it later.
TASKS_AHEAD = 4

#: Seconds between two looks at a Dask cluster's size while no task finishes (:class:`_InFlight`):
#: the workers that joined since get tasks without waiting for one to finish; and between two
#: looks at the names of tasks that found nothing waiting to be recorded (:class:`_EmptyTasks`).
REFILL_S = 1.0


class _InFlight:
    """Submit a job's tasks a few at a time, at most ``ahead`` of them unfinished at once, and
    hand on each future as it finishes (in the order they finish).

    Submitted all at once, every task held a future and the pool's work item in this process
    until it finished: about 2 KB each, 0.7 GB for the 320,922 tasks of a 0.55-teravoxel volume
    (the pool's queue alone, measured); on a Dask cluster ~6 KB each in the client (a job of
    19,844 tasks peaked at 418 MB, against 303 MB this way: ``bench/bench_scale.py
    --dask-tasks``) and ~2.4 KB in the scheduler (20,000 trivial tasks), 3.6 GB and 1.5 GB for
    the 620,978 tasks of a teravoxel.  The tasks are submitted in the order given, so they still
    run in the plan's order.

    Parameters
    ----------
    submit : callable(item) -> concurrent.futures.Future
        Submits one task.
    items : iterable
        The tasks, in the order to submit them.
    ahead : int or callable() -> int
        The most tasks submitted and not yet handed on at a time (at least 1).  A callable is
        asked again as each task finishes and every :data:`REFILL_S` seconds between: the tasks
        in flight follow a cluster that grows (dask-jobqueue, adaptive scaling) or shrinks
        (none is cancelled; fewer are submitted until they finish).
    idle : callable(), optional
        Called in the iterating thread every :data:`REFILL_S` seconds while no task finishes
        (the records of tasks that found nothing keep their time bound while a long task runs).

    Attributes
    ----------
    pending : set
        The futures submitted and not yet handed on: those to cancel where the caller stops
        early (the items not yet submitted never are).
    """

    def __init__(self, submit: Callable, items: Iterable, ahead, idle: Optional[Callable[[], None]] = None):
        self._submit, self._items = submit, iter(items)
        self._ahead = ahead if callable(ahead) else (lambda: ahead)
        self._idle = idle
        # a fixed number and nothing to do meanwhile need no second look
        self._timeout = REFILL_S if callable(ahead) or idle is not None else None
        self._finished: queue.SimpleQueue = queue.SimpleQueue()   # filled by the pool's thread
        self.pending: set = set()
        self._fill()   # now: a local pool starts its processes on these

    def _fill(self) -> None:
        """Submit the next items until ``ahead`` (at least 1) are pending, or none is left."""
        for item in itertools.islice(self._items, max(0, max(1, int(self._ahead())) - len(self.pending))):
            fut = self._submit(item)
            self.pending.add(fut)
            fut.add_done_callback(self._finished.put)

    def __iter__(self) -> Iterator:
        while self.pending:
            try:
                fut = self._finished.get(timeout=self._timeout)
            except queue.Empty:   # none finished for a while: workers may have joined
                self._fill()
                if self._idle is not None:
                    self._idle()
                continue
            self.pending.discard(fut)
            self._fill()   # before the caller takes its result: a worker never waits on this process
            yield fut


def _stop_workers(pool) -> None:
    """Stop a local pool's worker processes now (on Ctrl-C), without waiting for their tasks:
    a task result is written whole or not at all, so the finished tasks are kept and a
    resumed run reruns the others.  A Dask executor cancels its job on exit instead."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    if not processes:
        return
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in processes:
        if proc.is_alive():
            proc.terminate()
    for proc in processes:
        proc.join(5)


def _when(finished: int, total: int) -> str:
    """When the job failed: ``after N of M tasks`` or ``while writing the output``."""
    return f"after {finished} of {total} tasks" if finished < total else "while writing the output"


def _again(part: Optional[tuple] = None) -> str:
    """How a stopped job is run again: with ``--resume``, or a part (``--part K/N``) as it was."""
    if part is None:
        return "with --resume (Python: resume=True)"
    return f"with the same --part {part[0]}/{part[1]} (Python: part=({part[0]}, {part[1]}))"


def _check_part(part) -> tuple[int, int]:
    """``run_mesh``'s ``part`` as ``(K, N)``, integers with ``0 <= K < N``; ``ValueError`` else."""
    try:
        k, n = part
    except (TypeError, ValueError):
        raise ValueError(f"part must be (K, N), part K (0-based) of N, got {part!r}") from None
    if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in (k, n)) or not 0 <= k < n:
        raise ValueError(f"part must be (K, N) with integers 0 <= K < N, got {part!r}")
    return int(k), int(n)


def _clear_finished(kv, own_plan: bool = False) -> bool:
    """Delete the scratch area of a finished mesh (its ``info`` there, and neither a plan nor a
    whole run's mark): what a part wrote there after the run that wrote the output had deleted
    its own (its plan, the task results it finished meanwhile, a record), which no run would
    read or delete.  ``own_plan``: the plan there is the calling part's own, just written.
    Returns whether it was deleted (not where the store cannot say)."""
    try:
        if (storage.read(kv, "info") is not None and storage.read(kv, OWNER_KEY) is None
                and (own_plan or storage.read(kv, SCRATCH + "plan.json") is None)):
            storage.delete_prefix(kv, SCRATCH)
            return True
    except Exception:   # the store no longer answers: the error to raise says more
        pass
    return False


def _part_finished(shown: str, k: int, n: int, plan_left: bool) -> DestinationExistsError:
    """The error of part ``k`` of ``n`` started into DEST (``shown``) that holds the job's
    finished output; ``plan_left``: with the job's plan still beside it."""
    return DestinationExistsError(
        f"{shown}: holds a finished mesh (a run without --part has written the job's output there): part {k}/{n} "
        "has nothing left to do; "
        + ("its scratch area is still there (the run that wrote the output is deleting it, or was stopped while it "
           "did: run it again with --resume to finish that); " if plan_left else "")
        + f"to mesh the job again, empty {shown} first (a part does not --overwrite), or run it whole with --overwrite")


def _part_mismatch(shown: str, old: dict, new: dict) -> DestinationExistsError:
    """The refusal of a part (``run_mesh``'s ``part``) whose fingerprint ``new`` is not that of
    the job in ``dest`` (``old``, its ``plan.json``): the parts of one job share its options."""
    return DestinationExistsError(
        f"{shown}: holds the scratch area of a job with different options or source than this part's "
        f"({_fingerprint_changes(old, new) or 'plan.json'}): give every part, and the --resume that writes "
        f"the output, the same SOURCE and options, or give this job another DEST")


def part_tasks(tasks: list, k: int, n: int) -> list:
    """The tasks of part ``k`` of ``n`` (``run_mesh``'s ``part``): those of every ``n``-th block,
    from the ``k``-th, in the order blocks first appear in ``tasks`` (:meth:`Plan.tasks`: the
    blocks with the most voxels first, so each part gets a like share of full and border
    blocks), each block's tasks (its octants and coarse task) in one part, in ``tasks``' order."""
    order: dict = {}
    for t in tasks:
        order.setdefault(t[0], len(order))
    return [t for t in tasks if order[t[0]] % n == k]


def _task_failed(errors: list, finished: int, total: int, dest, part: Optional[tuple] = None) -> TaskFailedError:
    """The :class:`TaskFailedError` of tasks that raised ``errors`` (the first is its cause)."""
    what = one_line(errors[0])
    if len(errors) > 1:
        what = f"{len(errors)} tasks failed, the first: {what}"
    exc = TaskFailedError(f"{what} ({_when(finished, total)}); the finished tasks are kept in {dest}: run it again "
                          f"{_again(part)} once the cause is fixed")
    exc.__cause__ = errors[0]
    return exc


def run_mesh(source, dest, *, options: MeshOptions = MeshOptions(), voxel_size=None, voxel_offset=None,
             mip: int = 0, axes: Optional[str] = None, overwrite: bool = False, resume: bool = False,
             workers: Optional[int] = None, device: str = "auto", link_source: bool = False,
             progress: Optional[Callable[[int, int], None]] = None,
             write_progress: Optional[Callable[[int, int], None]] = None, client=None,
             bounds: Optional[tuple] = None, fill_missing: bool = True, part: Optional[tuple] = None) -> Summary:
    """Mesh every segment of a label volume into a Neuroglancer precomputed mesh directory.

    Parameters
    ----------
    source : str, dict, numpy.ndarray or tensorstore.TensorStore
        The label volume (see :func:`gpumesh.volume.open_volume`): zarr v2/v3, N5,
        precomputed, OME-Zarr, or an in-memory array with axes x, y, z.
    dest : str or dict
        Destination directory: a path or a kvstore URL/spec (``file://``, ``memory://``,
        ``gs://``, ``s3://``).  It may lie inside the source's directory but may not be it
        or hold it.  A ``memory://`` source or destination keeps the job in this process
        (one worker).
    options : MeshOptions
    voxel_size : sequence of 3 float, optional
        nm per voxel (x, y, z); overrides the source metadata.
    voxel_offset : sequence of 3 int, optional
        Voxels; overrides the source metadata.
    mip : int
        Scale of a multiscale source.
    axes : str, optional
        Axis order of a source without dimension names (e.g. ``"zyx"``).
    overwrite, resume : bool
        What to do when ``dest`` is not empty: delete everything first (only when it holds
        nothing but files gpumesh writes: a mesh directory, a scratch area), or keep finished
        blocks and continue (``dest`` must hold an interrupted run, or nothing; the source's
        location, ``axes``, ``mip`` and options must be the interrupted run's; an array (or
        in-memory TensorStore) source's contents too, by their SHA-256, :func:`_array_digest`).
        Without either, a non-empty ``dest`` is an error.
    workers : int, optional
        Processes meshing blocks in parallel (1 runs in this process).  Default: the usable
        cores (CPU affinity and the container's CPU quota), fewer where their estimated
        memory would not fit in the available memory, with a ``FewerWorkersNotice`` (see
        :mod:`gpumesh.resources`); 1 for a volume (or ``bounds``) of fewer than
        :data:`SMALL_JOB_VOXELS` voxels, which is done before workers would have started.
    device : {"auto", "cpu", "gpu"}
    link_source : bool
        Also set ``mesh`` (and ``segment_properties``) in the ``info`` of the source, which
        must be a precomputed volume (the source is never changed otherwise; a ready copy is
        written as ``source_info.json`` for any precomputed source).
    progress : callable(done, total), optional
        Called with the tasks finished (resumed ones included) and all tasks: at the start and
        as each task finishes.
    write_progress : callable(done, total), optional
        Called as the output is written, with the segments written and all to write
        (:func:`gpumesh.writer.assemble`).
    bounds : sequence of 6 int, optional
        Mesh only this box, ``(x0, y0, z0, x1, y1, z1)`` in global voxel coordinates (voxel
        offset included), clipped to the volume (:meth:`gpumesh.volume.Volume.crop`): the
        output is that of a volume holding just the box, at its place, segments cut by the
        box closed at its faces.
    fill_missing : bool
        ``True`` (default): storage chunks of the source that are not stored are background,
        as their readers take them (zarr, N5, precomputed; writers leave out chunks of fill
        value only).  ``False``: a task that needs such a chunk fails (igneous's default, where
        a missing chunk means a failed upload): the others finish and the job ends with a
        :class:`TaskFailedError` naming the chunk; ``resume=True`` continues once it is there.
    part : (int, int), optional
        ``(K, N)``: run only part K (0-based) of N of the job's meshing tasks, and write no
        output: N machines (a batch system's array job, each given its index) mesh one part
        each into the same ``dest``; then one run with ``resume=True`` (and the same source
        and options) writes the output, meshing itself any task no part finished.  Each block's
        tasks go to one part, every N-th block in the plan's order (which puts the blocks with
        the most voxels first), so the parts get similar work.  A part acts as ``resume=True``
        (a part run again skips its finished tasks; ``dest`` must be empty or hold this job's
        scratch area), stops when the scratch area is deleted or replaced (another run has
        finished or started over there), and refuses ``overwrite``, ``client`` and
        ``link_source``.  The :class:`Summary` then counts the part's tasks
        (:attr:`Summary.part`, :attr:`Summary.tasks_done_all`).
    client : distributed.Client, optional
        Run the tasks on this Dask cluster's workers instead of local processes (``workers``
        is then ignored; see :mod:`gpumesh.cluster`).  The source and ``dest`` must be
        reachable from every worker; ``device`` is resolved on each worker.

    Returns
    -------
    Summary

    Raises
    ------
    InvalidVolumeError, InvalidVoxelSizeError, SourceReadError
        Bad source (raised before anything is written), a voxel offset past
        :data:`MAX_GRID_ORIGIN` for multi-resolution output included.
    DestinationExistsError
        ``dest`` holds data and neither ``overwrite`` nor ``resume`` was given;
        ``overwrite`` was given and it holds files gpumesh does not write; ``resume`` was
        given and it holds a finished mesh, no interrupted run (no plan, yet files), or an
        interrupted run of other options or another source.
    DestinationError
        ``dest`` is a file or lies under one, is the source's directory or holds it, or cannot
        be listed or written (checked by the job's first write).
    ValueError
        Inconsistent options (``options`` not a :class:`MeshOptions`, ``workers`` < 1 included),
        ``link_source`` with a source that is not a precomputed volume, or a ``memory://``
        destination with ``client``, or a cluster without workers.
    WorkerFailedError
        A worker process ended abruptly (killed, e.g. by the out-of-memory killer, or crashed).
        The tasks that finished are kept: ``resume=True`` continues the run.
    TaskFailedError
        Tasks failed (a source chunk that cannot be read, or is not stored with
        ``fill_missing=False``, or a signed source's box holding negative labels); the others
        are kept: ``resume=True`` continues the run once the cause is fixed.
    KeyboardInterrupt
        Ctrl-C (the workers are stopped): the tasks that finished are kept, and ``resume=True``
        continues the run.  Its ``tasks_kept`` attribute, once the tasks were planned, is
        ``(finished, all)``: the tasks a resumed run skips, of all.
    """
    t0 = time.perf_counter()
    if not isinstance(options, MeshOptions):
        raise ValueError(f"options must be a MeshOptions, got {type(options).__name__}")
    options.validate()
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, (int, np.integer))
                                or workers < 1):
        raise ValueError(f"workers must be an integer >= 1 (or None: every core), got {workers!r}")
    if part is not None:
        k_part, n_parts = _check_part(part)
        if overwrite:
            raise ValueError("a part (--part) cannot overwrite DEST: the other parts mesh into it too; empty it "
                             "first, or give --overwrite to a whole run")
        if client is not None:
            raise ValueError("give --part or a Dask cluster (--scheduler), not both: each splits the job")
        if link_source:
            raise ValueError("link_source (--link-source) belongs to the run that writes the output (--resume "
                             "once every part has finished), not to a part")
        resume = True   # a part run again (preempted) skips its finished tasks, as the other parts' are kept
    open_kwargs = dict(voxel_size=voxel_size, voxel_offset=voxel_offset, mip=mip, axes=axes, bounds=bounds,
                       fill_missing=fill_missing)
    volume = open_volume(source, **open_kwargs)
    contents = None
    if isinstance(source, np.ndarray):   # in memory: its digest stands for its location
        contents = _array_digest(source)
    elif volume.location is None:   # an in-memory TensorStore: no location either
        contents = _volume_digest(volume)
    if isinstance(source, np.ndarray) and source.dtype.kind == "i":
        # in memory: its negative labels are bad input, found now (InvalidVolumeError), not by
        # the tasks that read them once the destination is touched (as a stored source's are)
        for _ in _slabs(volume):
            pass
    if link_source and volume.precomputed is None:
        raise ValueError(f"link_source (--link-source) names the meshes in a precomputed source's info; "
                         f"{volume.description} is not a precomputed volume")
    warn_if_no_voxel_size(volume)
    warn_if_voxel_size_overridden(source, volume, voxel_size, mip=mip, axes=axes)
    if options.format == "multires" and np.any(np.abs(volume.voxel_offset) > MAX_GRID_ORIGIN):
        # the manifests' grid_origin is float32: past 2**24 it would silently move the meshes
        raise InvalidVolumeError(
            f"voxel offset {tuple(volume.voxel_offset.tolist())} of {volume.description}: the multi-resolution "
            f"manifest stores it as float32 (grid_origin), exact only up to 2**24 = {MAX_GRID_ORIGIN:,} voxels "
            f"per axis; give a smaller --voxel-offset (Python: voxel_offset=)")
    dest_spec = storage.kvstore_spec(dest)   # a relative file path made absolute: workers may run elsewhere
    shown = storage.display(dest)   # DEST in messages, as given
    if volume.location is not None and storage.within(volume.location, dest_spec):
        raise DestinationError(f"{shown} holds the source volume ({volume.description}); writing the meshes there "
                               f"would overwrite it: choose another destination (a folder inside the source, "
                               f"such as SOURCE/mesh, is fine)")
    # a memory:// store lives in this process: workers would see it empty
    in_process = storage.in_memory(dest_spec) or (volume.location is not None and storage.in_memory(volume.location))
    if client is None:
        backend = get_backend(device, stacklevel=3)   # the notice names the caller's line
        if in_process and workers is not None and workers > 1:
            warnings.warn(f"a memory:// source or destination is only seen by this process: the job runs in it "
                          f"(1 worker, not {workers})", stacklevel=2)
    else:   # each worker picks its backend
        from .cluster import DaskExecutor, check_destination

        check_device(device)
        check_destination(dest_spec)
        if in_process:
            raise ValueError("a Dask cluster's workers cannot reach a memory:// source; use a path on a shared "
                             "file system or a gs:// or s3:// URL")
        backend = None
    kv = storage.open_kvstore(dest)
    if overwrite and resume:
        raise ValueError("give either overwrite or resume, not both")
    plan = Plan.make(volume.shape, options, volume.voxel_size)
    fingerprint = _plan_fingerprint(volume, plan, options, axes, mip, fill_missing, contents)
    plan = dataclasses.replace(plan, stamp=_stamp(fingerprint))
    stored = json.loads(json.dumps(fingerprint))   # the fingerprint as plan.json holds it (lists)
    cache = read_cache_bytes(volume, plan)   # each worker's cache of storage chunks
    cluster = None
    if client is not None:   # before the destination is touched: the cluster may have no workers
        cluster = DaskExecutor(client)
        source = portable_source(source)   # the workers' working directory may be another
    existing = storage.destination_keys(dest, kv)
    if existing:
        if overwrite:
            from .writer import check_overwrite

            check_overwrite(shown, existing)
            storage.delete_all(kv)
        elif resume:
            if "info" in existing and part is not None:
                # the job's output is written (a run writes its info last, then deletes its
                # scratch area): with the plan still there, that run is deleting it, or was
                # stopped while it did (a --resume ends it); a part would mesh into a finished mesh
                raise _part_finished(shown, k_part, n_parts, SCRATCH + "plan.json" in existing)
            old = storage.read_json(kv, SCRATCH + "plan.json")
            if old is not None and old != stored:
                was = old if isinstance(old, dict) else {}
                if part is not None:   # no --resume was given, and a part cannot --overwrite
                    raise _part_mismatch(shown, was, stored)
                raise DestinationExistsError(
                    f"{shown}: --resume with different options or source than the interrupted run "
                    f"({_fingerprint_changes(was, stored) or 'plan.json'}"
                    + ("; it was started by a gpumesh that did not record that: rerun with --overwrite"
                       if any(k not in was for k in stored) else "") + ")")
            if old is None and any(not k.endswith(".__lock") for k in existing):
                if "info" in existing:
                    raise DestinationExistsError(f"{shown}: holds a finished mesh; use --overwrite to redo it")
                # A run writes its plan first and deletes it last, so no run was interrupted
                # here: these are another program's files, or what an interrupted --overwrite
                # left (its blocks, matched by name only, would be taken as this run's).
                raise DestinationExistsError(f"{shown}: holds no interrupted run to resume ({SCRATCH}plan.json is "
                                             f"missing); choose another destination, or --overwrite a mesh")
        else:
            from .writer import nonempty_error

            raise nonempty_error(shown, existing, resumable=True)
    tasks = plan.tasks()
    mine = tasks if part is None else part_tasks(tasks, k_part, n_parts)   # the tasks this run meshes
    if cluster is not None:
        requested = cluster.workers
    elif in_process:
        requested = 1
    elif workers is None and int(np.prod(plan.shape, dtype=np.int64)) < SMALL_JOB_VOXELS:
        requested = 1   # a small job: done in this process sooner than workers would have started
    elif workers is None:   # the usable cores, as many as fit in memory (gpumesh.resources)
        from .resources import FewerWorkersNotice, default_workers, worker_bytes

        requested, why = default_workers(worker_bytes(plan.block, np.dtype(volume.dtype).itemsize, cache))
        if why:
            warnings.warn(why, FewerWorkersNotice, stacklevel=2)
    else:
        requested = workers
        # said before the job, not by the out-of-memory killer; no more workers than tasks run
        from .resources import WorkersMemoryWarning, worker_bytes, workers_memory

        why = workers_memory(min(workers, len(mine)), worker_bytes(plan.block, np.dtype(volume.dtype).itemsize, cache),
                             asked=workers)
        if why:
            warnings.warn(why, WorkersMemoryWarning, stacklevel=2)
    storage.write_json(kv, SCRATCH + "plan.json", fingerprint)   # the job's first write (DestinationError)
    if part is None:
        # this run's mark: another run started into DEST since (--overwrite, --resume) has replaced
        # it by the time this one would write its info, which it then does not (writer.assemble)
        owner = (OWNER_KEY, secrets.token_hex(16).encode())
        storage.write(kv, *owner)
    else:
        # the parts run at once, each writing the same plan: a part's mark is the plan, which
        # the run that writes the output deletes last, and an --overwrite replaces
        owner = (SCRATCH + "plan.json", storage.read(kv, SCRATCH + "plan.json"))
        try:
            there = None if owner[1] is None else json.loads(owner[1])
        except ValueError:
            there = {}
        if there is None:   # deleted since it was written: the job has ended there
            from .writer import taken_error

            raise taken_error(kv, owner, dest, part)
        if storage.read(kv, "info") is not None:
            # the output was written between this part's listing and its plan.  With a whole
            # run's mark there, the scratch area is that run's (deleting it, stopped while it did,
            # or a --resume ending it), this plan the same bytes as its own: left to it, as deleted
            # it stopped that run ("taken over").  Else that run had deleted its own plan: the
            # scratch area is deleted again, so that no part's plan is left in a finished mesh
            raise _part_finished(shown, k_part, n_parts, not _clear_finished(kv, own_plan=True))
        if there != stored:
            # a part of other options, started at once into the empty DEST, wrote its plan after
            # this one's: not this part's mark, and its tasks (stamped with its own plan) unused
            raise _part_mismatch(shown, there if isinstance(there, dict) else {}, stored)
    from . import writer

    # read again at the progress reports while the tasks run (at most every writer.OWNER_CHECK_S):
    # a run taken over stops meshing then, not after every task, whose results it would go on
    # writing into the other run's scratch area, or into its finished output
    progress = writer._checking_owner(kv, owner, progress)

    # from the listing made before the plan was written (emptied by --overwrite): a task another
    # run finished since is only run again (the same bytes), and no listing is made twice
    # the records of tasks that found nothing, read or written by this run: a part's summary
    # reads only those written since by the other parts
    records: dict = {}
    sizes, found_nothing = scratch_results(kv, plan.stamp, [] if overwrite else existing, records)
    done = sizes.keys() | found_nothing
    empties = _EmptyTasks(kv, plan.stamp, owner, records)   # this run's tasks that find nothing
    todo = [t for t in mine if task_name(t) not in done]
    # a part's blocks are its own, as its tasks are (every block has a task: its coarse one, or the whole)
    summary = Summary(blocks=len(plan.blocks()) if part is None else len({t[0] for t in mine}),
                      tasks=len(mine), tasks_resumed=len(mine) - len(todo),
                      device=backend.name if backend else device, format=options.format)
    # no more workers than tasks, but all of them for the output alone (a run resumed while
    # writing: the workers build the shards or write the segments' files); a part writes none
    nworkers = max(1, min(requested, len(todo) or (requested if part is None else 1)))
    summary.workers = nworkers
    if cluster is None and nworkers > 1:
        # once the input is known good and there is work for more than one worker: the server
        # imports gpumesh for the workers while this process goes on (the CLI has started it
        # already)
        workerserver.start_server()
    finished = len(mine) - len(todo)
    workers_rss = 0.0   # largest peak RSS that a worker reported (MiB)
    if progress:
        progress(finished, len(mine))
    # workers past what the device has room for mesh on the CPU backend (same bytes)
    device_workers = nworkers if todo else 0   # writing alone needs no device
    on_gpu = backend is not None and backend.name == "gpu"   # None: each Dask worker picks its own
    if on_gpu and nworkers > 1 and todo:
        from .gpu import device_processes

        device_workers = device_processes(backend.rt.mem_info()[0], nworkers)
    summary.device_workers = device_workers if on_gpu else 0

    stats = None
    spilled = None       # an array source's temporary file (_spill_array)
    unread: list = []   # the errors of tasks that could not read their part of the volume (or found bad labels)
    headers: dict = {}   # task name -> its result's header, as its worker returned it
    held = 0             # their bytes
    backends = set()   # the workers' backends
    on_device = set()  # the workers (host:pid) that meshed on a GPU
    try:
        if cluster is None and nworkers == 1:
            reading = open_volume(source, **open_kwargs, cache_bytes=cache) if cache and todo else volume
            try:
                for t in todo:
                    try:
                        blob = mesh_block(reading, plan, options, t[0], backend, t[1])
                    except (SourceReadError, InvalidVolumeError) as exc:
                        unread.append(exc)   # the other tasks go on; a resumed run reruns this one
                        continue
                    if block_is_empty(blob):
                        empties.add(task_name(t))
                    else:
                        sizes[task_name(t)] = block_header_size(blob)
                        storage.write(kv, block_key(t, plan.stamp, sizes[task_name(t)]), blob)
                    empties.tick()
                    finished += 1
                    if progress:
                        progress(finished, len(mine))
            except BaseException:
                empties.flush(quiet=True)   # what it found so far is kept for a resumed run
                raise
            empties.flush()
        else:
            # The writer's numba kernel compiles (on a first run) or loads from its cache here while
            # the workers mesh, instead of after them.
            threading.Thread(target=_load_writer_kernels, daemon=True).start()
            if cluster is not None:
                pool = cluster
                # only writing: no device to set up
                pool.start((source, dict(open_kwargs, cache_bytes=cache), plan, options, dest_spec,
                            device if todo else "cpu"))
            else:
                ctx = workerserver.context()   # forked from a server with gpumesh loaded, or spawned
                # workers number themselves from it to split the numba compiles of a first run
                # (gpumesh.warmup), and the first device_workers of them use the GPU
                started = ctx.Value("i", 0)
                # a large array source: mapped by the workers from one file, not a copy each
                spilled = _spill_array(source) if isinstance(source, np.ndarray) else None
                try:
                    pool = ProcessPoolExecutor(nworkers, mp_context=ctx, initializer=_init_worker,
                                               initargs=(spilled or source, dict(open_kwargs, cache_bytes=cache),
                                                         plan, options, dest_spec,
                                                         # only writing: no device context to make
                                                         backend.name if todo else "cpu", nworkers, started,
                                                         device_workers))
                except BaseException:
                    if spilled is not None:
                        spilled.remove()
                    raise
            procs: list = []
            futures: set = set()   # the tasks not yet done with: each is dropped, its result with it, once taken
            try:
                # the pool starts its processes as tasks are submitted, the assembly's too
                with pool, workerserver.without_main_script():
                    try:
                        # a few tasks per worker thread at a time; on a Dask cluster, per thread it has
                        # now: its workers may join after the job starts (dask-jobqueue, adaptive scaling)
                        ahead = (TASKS_AHEAD * nworkers if cluster is None
                                 else lambda: TASKS_AHEAD * max(1, cluster.threads))
                        with _signals_deferred():   # the pool starts its processes here
                            flight = _InFlight(functools.partial(pool.submit, _run_task), todo, ahead,
                                               idle=empties.tick)
                        futures = flight.pending   # kept up to date as tasks are submitted and taken
                        # the worker processes (private; only to say how a dead one ended)
                        procs = list((getattr(pool, "_processes", None) or {}).values())
                        for fut in flight:
                            try:
                                task, head, rss, name, who = fut.result()
                            except (SourceReadError, InvalidVolumeError) as exc:
                                unread.append(exc)   # the other tasks go on; a resumed run reruns this one
                                continue
                            if block_is_empty(head):   # no result written: recorded by name
                                empties.add(task_name(task))
                            else:
                                sizes[task_name(task)] = len(head)
                                held += len(head)
                                if held <= writer.ASSEMBLY_INDEX_BYTES:   # past it, the assembly reads them
                                    headers[task_name(task)] = head
                            del head
                            empties.tick()
                            workers_rss = max(workers_rss, rss)
                            backends.add(name)
                            if name == "gpu":
                                on_device.add(who)
                            finished += 1
                            if progress:
                                progress(finished, len(mine))
                        empties.flush()
                        if unread:
                            raise _task_failed(unread, finished, len(mine), shown, part)
                        t_mesh = time.perf_counter()
                        if part is None:   # the workers also build the segments and write the output
                            stats = writer.assemble(kv, volume, plan, options, tasks, link_source=link_source,
                                                    executor=pool, workers=nworkers, headers=headers,
                                                    sizes=sizes, empty=found_nothing | empties.names,
                                                    progress=write_progress, owner=owner)
                    except BaseException as exc:
                        empties.flush(quiet=True)   # what the tasks found so far is kept for a resumed run
                        stop = _interrupt_of(exc)   # also when it came out of a numba kernel of the writer
                        if not isinstance(exc, Exception) or stop is not None:   # Ctrl-C: stop now
                            _stop_workers(pool)   # (its shutdown cancels the futures)
                            if stop is not None and stop is not exc:
                                raise stop from None
                        else:
                            for fut in futures:   # before the pool's exit would wait for them: not run
                                fut.cancel()
                        raise
            except Exception as exc:
                if isinstance(exc, BrokenProcessPool):
                    how = f"a worker process ended abruptly{_how_workers_ended(procs)}"
                elif type(exc).__name__ == "KilledWorker":   # distributed: a task's workers kept dying
                    how = f"Dask workers died running a task ({one_line(exc)})"
                elif cluster is not None and type(exc).__name__ in _CLUSTER_LOST:
                    how = (f"the Dask cluster lost its scheduler, or the workers holding the job's data "
                           f"({type(exc).__name__}{': ' + one_line(exc) if str(exc) else ''})")
                else:
                    raise
                raise WorkerFailedError(
                    f"{how} {_when(finished, len(mine))}; the finished ones are kept in {shown}: run it again "
                    f"{_again(part)}, with fewer workers if memory ran out") from exc
            finally:
                if spilled is not None:   # the pool has ended: no worker maps it any more
                    spilled.remove()
            if cluster is not None and backends:
                summary.device = "+".join(sorted(backends))
                summary.device_workers = len(on_device)   # each Dask worker picked its own
        if unread:
            raise _task_failed(unread, finished, len(mine), shown, part)
        if stats is None:
            t_mesh = time.perf_counter()
            if part is None:
                stats = writer.assemble(kv, volume, plan, options, tasks, link_source=link_source, sizes=sizes,
                                        empty=found_nothing | empties.names, progress=write_progress, owner=owner)
    except GpumeshError as exc:
        if isinstance(exc, DestinationTakenError) or writer.taken_over(kv, owner):
            # another run (--overwrite) deleted or replaced what this one needed: say that,
            # not what it broke (a task result missing from the scratch area, a write refused),
            # naming DEST as given
            if part is not None:
                _clear_finished(kv)
            raise writer.taken_error(kv, owner, dest, part) from exc
        if isinstance(exc, (SourceReadError, DestinationError)):   # a write, or the volume's first read
            raise _task_failed([exc], finished, len(mine), shown, part) from exc
        raise
    except (KeyboardInterrupt, SystemError) as exc:   # Ctrl-C, also out of a numba kernel in this process
        stop = _interrupt_of(exc)
        if stop is None:
            raise
        try:   # the workers have stopped: the tasks a resumed run skips, for the CLI's line
            kept = finished_tasks(kv, plan.stamp, records=records)
            stop.tasks_kept = (sum(task_name(t) in kept for t in mine), len(mine))
        except Exception:   # a store that no longer answers: the line says less
            pass
        if stop is exc:
            raise
        raise stop from None
    summary.seconds_meshing = t_mesh - t0
    if part is not None:   # no output: what the part did, and how far the whole job is
        if writer.taken_over(kv, owner):   # finished tasks written into a scratch area deleted since
            _clear_finished(kv)
            raise writer.taken_error(kv, owner, dest, part)
        names = finished_tasks(kv, plan.stamp, records=records)
        summary.part = f"{k_part}/{n_parts}"
        summary.tasks_all = len(tasks)
        summary.tasks_done_all = sum(task_name(t) in names for t in tasks)
        summary.seconds = time.perf_counter() - t0
        summary.peak_rss_mb = max(peak_rss_mb(), workers_rss)
        return summary
    # the task results first and the plan last (a deletion goes in no set order): a run stopped
    # in between leaves its plan, so --resume finishes it rather than refusing "a finished mesh"
    # with task results left in it.  Each part only while the mark is still this run's: a run
    # started into DEST since this one wrote its info (--overwrite, --resume) owns the scratch
    # area now, and deleting its plan, mark and task results would stop it as "taken over"
    for prefix in ("blocks/", "empty/", "shards/", ""):   # the task results, the shards' resume records, the plan
        if writer.taken_over(kv, owner):
            break
        storage.delete_prefix(kv, SCRATCH + prefix)
    summary.segments = stats["segments"]
    summary.triangles_per_lod = stats["triangles_per_lod"]
    summary.fragments_per_lod = stats["fragments_per_lod"]
    summary.voxel_size_per_lod = [plan.voxel_nm(k, volume.voxel_size).tolist()
                                  for k in range(len(summary.triangles_per_lod))]
    summary.bytes = stats["bytes"]
    summary.dust_segments = stats.get("dust_segments", 0)
    summary.missing_segments = stats.get("missing_segments", 0)
    summary.index_waves = stats.get("index_waves", 0)
    summary.index_spilled = bool(stats.get("index_spilled", False))
    summary.index_grouped = bool(stats.get("index_grouped", False))
    summary.index_bytes_read = int(stats.get("index_bytes_read", 0))
    if summary.missing_segments:
        some = ", ".join(map(str, stats["missing_examples"]))
        more = ", ..." if summary.missing_segments > len(stats["missing_examples"]) else ""
        warnings.warn(f"{summary.missing_segments} of the {len(options.selected_ids())} selected segments are not "
                      f"in the volume{' (within the bounds)' if bounds is not None else ''}: {some}{more}",
                      SegmentsNotFoundWarning, stacklevel=2)
    if summary.segments == 0 and summary.dust_segments:
        warnings.warn(f"all {summary.dust_segments} segments have fewer voxels than the dust threshold "
                      f"({options.dust_threshold}): wrote an empty mesh to {shown}", EmptyVolumeWarning, stacklevel=2)
    elif summary.segments == 0 and options.segments is not None:
        warnings.warn(f"none of the selected segments is in the volume: wrote an empty mesh to {shown}",
                      EmptyVolumeWarning, stacklevel=2)
    elif summary.segments == 0 and options.exclude_segments is not None:
        warnings.warn(f"the volume holds only background (label 0) and excluded segments: wrote an empty mesh to "
                      f"{shown}", EmptyVolumeWarning, stacklevel=2)
    elif summary.segments == 0:
        warnings.warn(f"the volume holds only background (label 0): wrote an empty mesh to {shown}",
                      EmptyVolumeWarning, stacklevel=2)
    summary.seconds = time.perf_counter() - t0
    summary.seconds_writing = summary.seconds - summary.seconds_meshing
    summary.peak_rss_mb = max(peak_rss_mb(), workers_rss, stats.get("workers_peak_rss_mb", 0.0))
    return summary
