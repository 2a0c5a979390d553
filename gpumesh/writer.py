"""Writers: assemble block results into Neuroglancer precomputed mesh directories.

Formats (``../shared/specs/neuroglancer-precomputed-meshes.md``):

* multi-resolution, unsharded: ``info`` (``neuroglancer_multilod_draco``), ``<id>.index``
  (manifest) and ``<id>`` (fragment data) per segment;
* multi-resolution, sharded (``neuroglancer_uint64_sharded_v1``, :mod:`gpumesh.sharding`):
  ``info`` with ``sharding`` and ``<shard>.shard`` files; in a shard each segment's fragment
  data lies immediately before its manifest, which the minishard index points at;
* legacy single-resolution: ``info`` (``neuroglancer_legacy_mesh``), ``<id>:0`` (JSON
  manifest) and ``<id>:0:<x>_<y>_<z>`` fragment files per segment and LOD 0 node.

Every byte goes through TensorStore's kvstore (:mod:`gpumesh.storage`); each key is written
atomically.  A segment's fragment data is written before its manifest, and ``info`` last, so a
reader never finds a manifest whose data is missing, and a directory with ``info`` is finished.

Sharded output is built shard by shard (:func:`write_shards`, :func:`write_shard`): each
segment's shard follows from its ID alone, so the block results' fragment index (no fragment
bytes) is grouped by shard, and only the fragments of the shard being built are needed at a
time.  The index itself is held whole only while it fits in :data:`ASSEMBLY_INDEX_BYTES`
(1 GiB, ~20 million fragments): past that the assembly keeps a row per segment
(:class:`SegmentTable`, from which come each segment's LODs and the sharding's bits) and writes
the shards (unsharded: runs of segments) in waves whose entries fit, so that the main process's
memory follows the number of segments, not of fragments.  The entries past the cap go to a
temporary file (:class:`IndexSpill`), which is written again wave by wave once the waves are
known, so that each wave reads back its own entries alone; where it cannot be written, each
wave reads the results' headers again.  In the main job with several workers, the workers
build the segments (a segment is a function of its index rows and the task results): each
writes whole shards when there are at least as many as workers, else a part of each shard's
segments, which this process joins into the shard; unsharded and legacy files are written by
the workers, a run of segments each. Task results are read once and kept in memory while they
hold at most :data:`ASSEMBLY_CACHE_BYTES` (most jobs' whole output); past that only their
headers are read, and fragments by byte range as their shard is built (:class:`TaskResults`),
so memory follows a shard, not the whole output.  Workers writing the output share that cap;
where every result fits in a worker's share (and there are at most :data:`HOLD_WORKERS`),
each reads the results it needs whole, once, and holds them for all its shards
(:class:`WorkerReads`).  Each shard is one atomic write, after which
``.gpumesh-work/shards/<shard>.json`` records it (with its statistics), so a resumed run skips
finished shards.  :func:`convert_mesh` rewrites a multi-resolution directory between the two
layouts.

Placeholder fragments
---------------------
A parent that holds no triangles of the segment (the segment is locally too thin for the
coarser labels) is listed with a **placeholder**: a degenerate tetrahedron whose four vertices
lie on one line, one quantization step apart (:func:`placeholder_positions`,
:data:`gpumesh.reader.PLACEHOLDER_FACES`), at a vertex of one of the node's children, so it sits on the
segment's finer surface, inside the node and inside one cell of its 2x2x2 grid.  It has no
area and no volume, so it draws nothing, and it is a closed surface (every edge has both
directions), so the LOD's mesh stays closed.  The spec allows a zero-byte fragment there, and
Neuroglancer reads one, but WEBKNOSSOS Draco-decodes every fragment its manifest lists and
cannot decode zero bytes (``docs/webknossos.md``).  Readers skip placeholders
(:func:`gpumesh.reader.is_placeholder`).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import os
import re
import shutil
import tempfile
import time
import warnings
from typing import Callable, Iterator, Optional

import numpy as np

from . import storage
from .errors import (DestinationExistsError, DestinationTakenError, GpumeshError, IndexInMemoryWarning,
                     InvalidMeshError)
from .encode import encode_draco
from .octree import manifest_body, manifest_head, segment_nodes
from .pipeline import (BLOCK_PREFIX, FRAG_DTYPE, SCRATCH, MeshOptions, Plan, block_header_size, block_is_empty,
                       block_key, in_sorted, pack_block, task_name, unpack_block_header)
from .reader import PLACEHOLDER_FACES, Manifest, ShardedMultiresSource, decode_fragment, open_mesh
from .sharding import ShardingOptions, ShardingSpec, build_shard
from .volume import Volume

#: Segments whose files are written concurrently.
WRITE_BATCH = 64

#: Task results kept in memory for assembly, in bytes: results are read whole, once, until
#: this much is held; past it only their headers are read, and their fragments by byte range
#: when a segment needs them (memory then follows a shard, not the whole output).
ASSEMBLY_CACHE_BYTES = 1 << 30
HEADER_READS = 64   # task result headers read at once by the assembly

#: Fragments of one task result that a worker needs are read in one byte range where the
#: bytes between them are at most this many (:meth:`TaskResults.prefetch`): a read of a cloud
#: store costs a round trip, and the unused bytes between fragments cost less than one.
SPAN_GAP_BYTES = 64 << 10

#: Where the task results do not all fit in the assembly's cap, the results kept whole leave at
#: least this share of it (1/4) to the spans of the others (:meth:`TaskResults.prefetch`): kept
#: up to the cap, they left a shard's spans little room or none, and its fragments were read
#: one by one.
SPAN_ROOM_SHARE = 4

#: Workers up to which each worker writing the output reads every task result it needs whole
#: and holds it for all its parts, where all of them fit in its share of the cap
#: (:class:`WorkerReads`): each then reads ``workers`` times the bytes that its parts need, at
#: most 8 times, as a part reads a result whole when it needs 1/8 of it.
HOLD_WORKERS = 8

#: Rows (fragment entries and voxel counts) of task results that the assembly parses before it
#: adds them to its tables at once (:func:`_header_batches`): a job of hundreds of thousands of
#: tasks, most of them with few rows or none, paid ~70 us of NumPy calls per result.
HEADER_BATCH_ROWS = 1 << 16


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


def _run_starts(values: np.ndarray) -> np.ndarray:
    """First index of each run of equal values of a 1-D array (empty for an empty array);
    on fragment entries sorted by segment ID, ``_run_starts(index["label"])`` is each segment's
    first row."""
    if len(values) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.r_[True, values[1:] != values[:-1]])


def _iter_segments(index: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """``(segment ID, its rows)`` of fragment entries already sorted by segment ID."""
    labels = index["label"]
    starts = _run_starts(labels)
    stops = np.r_[starts[1:], len(labels)]
    for s0, s1 in zip(starts, stops):
        yield int(labels[s0]), index[s0:s1]


#: Fragment entries of the assembly's index: :data:`gpumesh.pipeline.FRAG_DTYPE` (``offset``
#: from the start of the task result) and ``block``, the number of the task result.
INDEX_DTYPE = np.dtype(FRAG_DTYPE.descr + [("block", "<u4")])

#: Bytes of fragment entries (:data:`INDEX_DTYPE`, 52 bytes each) that the assembly holds at
#: once: about 20 million fragments, the whole index of a job of a few hundred gigavoxels at the
#: real volume's density.  Past it the index is not held whole (:func:`assemble`): the assembly
#: keeps about 80 bytes per segment (:class:`SegmentTable` and the voxel counts, at 3 LODs), and
#: reads the task results' headers again for each *wave* of shards (unsharded: of segments)
#: whose entries fit, so that its memory follows this cap and the number of segments, not of
#: fragments.
#: Writing a wave holds its entries and one sorted copy of them: about twice this at the peak.
ASSEMBLY_INDEX_BYTES = 1 << 30

#: Past :data:`ASSEMBLY_INDEX_BYTES`, the fragment entries are written to a temporary file
#: (:class:`IndexSpill`) that each wave reads back, rather than every task result's header
#: read again per wave (on a cloud store, a request per result and wave).  ``False``: the
#: headers are read again (also where the file cannot be written).
INDEX_SPILL = True

#: Bytes of the :class:`IndexSpill` read at a time by a wave (at most 1/16 of
#: :data:`ASSEMBLY_INDEX_BYTES`).
SPILL_READ_BYTES = 64 << 20

#: Waves from which the :class:`IndexSpill` is written again wave by wave
#: (:meth:`IndexSpill.group`), so that each wave reads its own entries alone: at ``W`` waves
#: the file is then read about twice and written once more, instead of read ``W`` times.
SPILL_GROUP_WAVES = 3

#: Bytes that :meth:`IndexSpill.group` leaves free in the temporary folder: it does not start
#: where its file would leave less.
SPILL_GROUP_ROOM = 1 << 30

#: Seconds between the assembly's reads of its run's mark (``owner``, see :func:`assemble`), at
#: its progress reports: a run taken over while it writes stops within about this (and the
#: shards or segment runs its workers have in hand).
OWNER_CHECK_S = 1.0


class LabelTable:
    """Per-segment columns merged from many tasks' rows: one row per segment ID.

    Rows are added task by task (:meth:`add_rows`) and merged (sorted by ID, equal IDs reduced
    by each column's ufunc) whenever the rows waiting outnumber the merged ones, so the table
    holds about a row per segment, however many tasks each segment spans.  ``labels`` (the
    distinct IDs, ascending) and ``columns`` (name -> array, a row per ID) merge what waits
    first.

    Parameters
    ----------
    columns : dict
        Column name -> an empty array of its dtype and trailing shape.
    ops : dict
        Column name -> the ufunc that combines two rows of one segment (``np.add``,
        ``np.minimum``...).
    """

    #: Rows waiting (beyond the merged rows' count) that set off a merge.
    MERGE_ROWS = 1 << 16

    def __init__(self, columns: dict, ops: dict):
        self.ops = ops
        self._labels = np.zeros(0, np.uint64)
        self._columns = columns
        self._parts: list = []
        self._pending = 0

    @property
    def labels(self) -> np.ndarray:
        """The table's segment IDs, merged and ascending: (s,) uint64."""
        self._merge()
        return self._labels

    @property
    def columns(self) -> dict:
        """Column name -> (s, ...) values, a row per segment of :attr:`labels`."""
        self._merge()
        return self._columns

    def add_rows(self, labels: np.ndarray, columns: dict) -> None:
        """Add rows: segment IDs (n,) and each column's (n, ...) values (a dict that the table
        may empty: it drops each column once merged)."""
        if not len(labels):
            return
        # a copy where ``labels`` is a field of a larger array, which it would keep alive
        self._parts.append((np.ascontiguousarray(labels, np.uint64), columns))
        self._pending += len(labels)
        if self._pending > max(self.MERGE_ROWS, len(self._labels)):
            self._merge()

    def _merge(self) -> None:
        """Sort the merged and waiting rows by ID and combine equal IDs, a column at a time,
        dropping each column's inputs as it goes: at the peak the table holds about its
        inputs once, the sort order and one column three times."""
        if not self._parts:
            return
        labels = np.concatenate([self._labels] + [p[0] for p in self._parts])
        order = np.argsort(labels, kind="stable")
        labels = labels[order]
        starts = _run_starts(labels)
        self._labels = labels[starts]
        for name in list(self._columns):
            col = np.concatenate([self._columns.pop(name)] + [p[1].pop(name) for p in self._parts])
            # never empty: a part has at least one row (add_rows)
            self._columns[name] = self.ops[name].reduceat(col[order], starts, axis=0, dtype=col.dtype)
            del col
        self._parts, self._pending = [], 0

    def keep(self, mask: np.ndarray) -> None:
        """Keep only the rows where ``mask`` (a bool per row of ``labels``) is true."""
        self._merge()
        self._labels = self._labels[mask]
        self._columns = {name: col[mask] for name, col in self._columns.items()}


class SegmentTable(LabelTable):
    """What the assembly needs to know of each segment before it writes any.

    Per segment ID: the lowest and highest LOD 0 octree node (``lo``, ``hi``, (3,) int32, as
    node positions are below ``2**21``; a segment without LOD 0 fragments has
    :data:`NO_NODE` and ``-1``), the LODs it has fragments at (``present``, a uint32 bit mask,
    LODs past 31 counted as 31), its fragment bytes per LOD (``size``, (lods,) int64) and its
    fragment entries (``entries``, uint32).  That is all that the LOD rule (:meth:`num_lods`)
    and the sharding's bits (:meth:`gpumesh.sharding.ShardingOptions.resolve`) need, in 32 +
    8 · lods bytes per segment and 8 for its ID: 64 bytes at 3 LODs.

    Parameters
    ----------
    lods : int
        The plan's LODs (:attr:`gpumesh.pipeline.Plan.lods`); fragments at a LOD past them
        count in ``present`` and ``entries`` only.
    """

    #: ``lo`` of a segment without LOD 0 fragments.
    NO_NODE = np.iinfo(np.int32).max

    def __init__(self, lods: int):
        self.lods = lods
        super().__init__(
            {"lo": np.zeros((0, 3), np.int32), "hi": np.zeros((0, 3), np.int32), "present": np.zeros(0, np.uint32),
             "size": np.zeros((0, lods), np.int64), "entries": np.zeros(0, np.uint32)},
            {"lo": np.minimum, "hi": np.maximum, "present": np.bitwise_or, "size": np.add, "entries": np.add})

    def add(self, index: np.ndarray) -> None:
        """Add fragment entries (fields ``label``, ``lod``, ``x``, ``y``, ``z``, ``size``), such
        as one task result's."""
        lod = index["lod"].astype(np.int64)
        at0 = (lod == 0)[:, None]
        pos = np.stack([index["x"], index["y"], index["z"]], axis=1).astype(np.int32)
        size = np.zeros((len(index), self.lods), np.int64)
        ok = np.flatnonzero(lod < self.lods)
        size[ok, lod[ok]] = index["size"][ok].astype(np.int64)
        self.add_rows(index["label"], {
            "lo": np.where(at0, pos, np.int32(self.NO_NODE)), "hi": np.where(at0, pos, np.int32(-1)),
            "present": np.left_shift(np.uint32(1), np.minimum(lod, 31).astype(np.uint32)), "size": size,
            "entries": np.ones(len(index), np.uint32)})

    def num_lods(self, requested: Optional[int]) -> np.ndarray:
        """:func:`segment_num_lods` of every segment (merged, by ascending ID): (s,) int64, 0 for
        a segment without LOD 0 fragments (not written)."""
        lo, hi, present = self.columns["lo"], self.columns["hi"], self.columns["present"]
        n = np.ones(len(self.labels), dtype=np.int64)
        for m in range(1, self.lods):   # grow while the LOD 0 nodes span several LOD m - 1 nodes
            n[(n == m) & np.any((lo >> (m - 1)) != (hi >> (m - 1)), axis=1)] = m + 1
        if requested is not None:
            n[:] = requested
        avail = np.zeros(len(self.labels), dtype=np.int64)
        for a in range(self.lods):      # LODs from 0 without a gap
            avail[(avail == a) & ((present >> a) & 1 == 1)] = a + 1
        return np.where(present & 1 == 1, np.maximum(1, np.minimum(n, avail)), 0)

    def kept_bytes(self, num_lods: np.ndarray) -> int:
        """Fragment bytes of every segment at the LODs it keeps (below its ``num_lods``)."""
        return int((self.columns["size"] * (np.arange(self.lods)[None, :] < num_lods[:, None])).sum())


class SegmentLods:
    """Segment ID -> its LODs (:meth:`SegmentTable.num_lods`), looked up by :meth:`many`.

    Held as two arrays, 16 bytes a segment, where a dict took about 70 (0.7 GB for 10^7
    segments, built whole before the first shard).

    Parameters
    ----------
    labels : (s,) uint64
        Segment IDs, ascending.
    lods : (s,) int
        Each one's LODs.
    """

    def __init__(self, labels: np.ndarray, lods: np.ndarray):
        self.labels = np.asarray(labels, dtype=np.uint64)
        self.lods = np.asarray(lods, dtype=np.int64)

    def many(self, labels) -> list:
        """The LODs of each of ``labels`` (segment IDs, any order), as a list of ints.

        Raises
        ------
        KeyError
            A label that is not here (the first).
        """
        labels = np.asarray(labels, dtype=np.uint64).reshape(-1)
        i, found = _find_sorted(self.labels, labels)
        if not found.all():
            raise KeyError(int(labels[np.argmin(found)]))
        return self.lods[i].tolist()

    def of(self, rows: np.ndarray) -> "SegmentLods":
        """Those of the segments of fragment entries ``rows`` only (what a worker writing them
        is sent); each must be here."""
        labels = np.unique(rows["label"])
        return SegmentLods(labels, self.lods[np.searchsorted(self.labels, labels)])


def mesh_info(volume: Volume, options: MeshOptions, with_properties: bool,
              sharding: Optional[ShardingSpec] = None) -> dict:
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
        if sharding is not None:
            info["sharding"] = sharding.to_json()
    if with_properties:
        info["segment_properties"] = "segment_properties"
    return info


def taken_over(kv, owner: tuple[str, bytes]) -> bool:
    """True when ``owner``'s key no longer holds its value: another run has started writing into
    the destination (``--overwrite``, ``--resume``) since the run that wrote it (False where it
    cannot be read: the store's own error says more)."""
    try:
        return storage.read(kv, owner[0]) != owner[1]
    except Exception:
        return False


def taken_error(kv, owner: tuple[str, bytes], where=None, part: Optional[tuple] = None) -> DestinationTakenError:
    """The :class:`DestinationTakenError` of a run whose ``owner`` mark was replaced in the
    destination's kvstore ``kv`` (named as ``where``, the destination as the user gave it, or
    ``kv``'s own name), or is gone from it: another run has finished there (an ``info`` is
    there), or the scratch area was deleted while the run ran.  ``part``: the ``(K, N)`` of a
    part (``run_mesh``'s ``part``), whose mark is the job's plan and which writes no info."""
    name = storage.display(kv if where is None else where)
    try:
        gone = storage.read(kv, owner[0]) is None
        # this run has written no info yet (nor left one: --overwrite deleted it, --resume
        # refuses a finished mesh): an info there is another run's, finished since
        finished = gone and storage.read(kv, "info") is not None
    except Exception:
        gone = finished = False
    if part is not None:
        this = f"part {part[0]}/{part[1]}"
        if finished:
            return DestinationTakenError(
                f"{name}: a run has written the job's output there while {this} ran (its info is written; "
                f"{owner[0]} is gone): {this} stops, and its tasks left are not needed (start the run that writes "
                f"the output only once every part has ended)")
        if gone:
            return DestinationTakenError(
                f"{name}: the job's scratch area was deleted while {this} ran ({owner[0]} is gone: by hand, or by "
                f"another gpumesh run there): {this} stops")
        return DestinationTakenError(
            f"{name}: another gpumesh run has started a job of other options there (--overwrite; {owner[0]} is "
            f"not this job's any more): {this} stops, and leaves the destination to that run")
    if finished:
        return DestinationTakenError(
            f"{name}: another gpumesh run has started writing there since this one began, and has finished "
            f"(its info is written; {owner[0]} is gone): this run stops without writing info, and leaves "
            f"the destination to that run")
    if gone:
        return DestinationTakenError(
            f"{name}: this run's scratch area was deleted while it ran ({owner[0]} is gone: by hand, or by "
            f"another gpumesh run there): this run stops without writing info")
    return DestinationTakenError(
        f"{name}: another gpumesh run has started writing there since this one began "
        f"(--overwrite or --resume; {owner[0]} is no longer this run's): this run stops without "
        f"writing info, and leaves the destination to that run")


def _checking_owner(kv, owner: tuple[str, bytes], progress: Optional[Callable[[int, int], None]]):
    """``progress``, made to read the run's mark first, at most every :data:`OWNER_CHECK_S`
    (:func:`taken_error` where another run has replaced it)."""
    last = [time.monotonic()]

    def checked(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= OWNER_CHECK_S:
            last[0] = now
            if taken_over(kv, owner):
                raise taken_error(kv, owner)
        if progress is not None:
            progress(done, total)

    return checked


def assemble(kv, volume: Volume, plan: Plan, options: MeshOptions, tasks, *, link_source: bool = False,
             executor=None, workers: int = 1, headers: Optional[dict] = None, sizes: Optional[dict] = None,
             empty: Optional[set] = None, progress: Optional[Callable[[int, int], None]] = None,
             owner: Optional[tuple[str, bytes]] = None) -> dict:
    """Read every task's result from the scratch area and write the final mesh directory.

    The task results' headers (their fragment entries and voxel counts) are read once, in task
    order, into a :class:`SegmentTable` (a row per segment) and the voxel counts; the entries
    themselves are kept while they hold at most :data:`ASSEMBLY_INDEX_BYTES`.  From the table
    come each segment's LODs, the dust filter and the sharding's bits.  Then the segments are
    written, shard by shard (sharded) or in runs of segments: from the kept entries, or, where
    they did not fit, in *waves* of shards (or segments) whose entries fit, each wave reading
    them from a temporary file (:class:`IndexSpill`), or from the headers again where that
    could not be written, and keeping its own segments' entries.  Either way every file gets
    the same bytes.

    Parameters
    ----------
    kv : tensorstore.KvStore
        The destination.
    volume, plan, options
        As used for the blocks.
    tasks : list of (block, part)
        All tasks of the job (:meth:`gpumesh.pipeline.Plan.tasks`; their results must be in the
        scratch area).
    link_source : bool
        Also set ``mesh`` in a precomputed source's ``info``.
    executor, workers
        The main job's worker pool and its size: the workers then build the segments and
        write their files (runs of segments of about equal bytes, :func:`split_segments`) or
        shards (see :func:`write_shards`); this process writes segment properties and ``info``.
    headers : dict, optional
        Task name (:func:`gpumesh.pipeline.task_name`) -> the header of its result, as the
        worker that ran it returned it; the others are read from the scratch area.  Emptied
        here, so that each header is freed once its entries are in the index.
    sizes : dict, optional
        Task name -> the header bytes of its result, in its key (:func:`gpumesh.pipeline.block_key`;
        0 or missing: a key without, as gpumesh wrote them before).
    empty : set of str, optional
        Names of the tasks that found nothing and have no result in the scratch area (recorded
        by name instead, :class:`gpumesh.pipeline._EmptyTasks`): never read.
    progress : callable(done, total), optional
        Called as the segments are written, with the segments written so far (those of the
        shards that an interrupted run wrote included) and all to write: once before the
        first, then after each shard, run of segments or batch (never when there is none).
    owner : (key, value), optional
        The run's mark in the scratch area (:func:`gpumesh.pipeline.run_mesh`), checked before
        the results are read (a run taken over while it meshed writes no file into the other's
        output, whose ``--overwrite`` may have deleted its results) and again before ``info``:
        where ``key`` no longer holds ``value``, nothing more is written; also at most every
        :data:`OWNER_CHECK_S` while it writes (at its progress reports).

    Returns
    -------
    dict
        ``segments``, ``triangles_per_lod``, ``fragments_per_lod``, ``bytes``; ``index_waves``,
        the waves that read the entries again (0 when the index was held whole), and
        ``index_spilled``, whether they read them from an :class:`IndexSpill`.

    Raises
    ------
    DestinationTakenError
        ``owner`` was given and another run has replaced it.
    """
    if owner is not None:
        if taken_over(kv, owner):   # before the results are read or any file written
            raise taken_error(kv, owner)
        progress = _checking_owner(kv, owner, progress)   # and while it writes
    names = {task_name(t): i for i, t in enumerate(tasks)}
    nothing = np.zeros(len(tasks), dtype=bool)
    nothing[[names[n] for n in (empty or ()) if n in names]] = True
    sizes = {} if sizes is None else sizes
    heads = np.array([sizes.get(n, 0) for n in names], dtype=np.int64)   # (names: in task order)
    results = TaskResults(kv, [block_key(t, plan.stamp, h) for t, h in zip(tasks, heads.tolist())], empty=nothing)
    results.header_bytes[:] = heads
    known = {names[n]: headers.pop(n) for n in list(headers or {})}   # the only reference: freed as parsed
    # with workers writing the output, this process needs the headers alone
    index, table, voxels, block_bytes = _read_index(results, known, plan.lods,
                                                    whole=executor is None or workers <= 1)
    del known
    try:
        return _assemble(kv, volume, plan, options, results, index, table, voxels, block_bytes, link_source,
                         executor, workers, progress, owner)
    finally:
        if isinstance(index, IndexSpill):
            index.close()


def _assemble(kv, volume: Volume, plan: Plan, options: MeshOptions, results: "TaskResults", index, table, voxels,
              block_bytes, link_source: bool, executor, workers: int, progress, owner) -> dict:
    """:func:`assemble` once the task results' headers are read (:func:`_read_index`)."""
    ids, voxels = voxels.labels, voxels.columns["voxels"]

    stats = _new_stats(plan.lods)
    stats["index_waves"] = 0
    stats["index_spilled"] = isinstance(index, IndexSpill)
    wanted = options.selected_ids()
    if wanted is not None:   # the tasks counted only these; the others are not in the volume
        missing = wanted[~in_sorted(ids, wanted)]
        stats["missing_segments"], stats["missing_examples"] = len(missing), missing[:5].tolist()
    if options.dust_threshold:
        dust = voxels < options.dust_threshold
        stats["dust_segments"] = int(dust.sum())
        if dust.any():
            table.keep(~in_sorted(ids[dust], table.labels))
            if isinstance(index, np.ndarray):   # (the waves take only the table's segments)
                index = index[~in_sorted(ids[dust], index["label"])]
            ids, voxels = ids[~dust], voxels[~dust]
    pool = executor is not None and workers > 1
    worker_reads: list = []

    def reads() -> WorkerReads:   # made when the workers first write: it drops this process's kept results
        if not worker_reads:
            worker_reads.append(WorkerReads(results, block_bytes, workers))
        return worker_reads[0]

    spec = None
    if options.sharding is not None and options.format == "multires":
        spec = write_shards(kv, results, index, table, plan, options, stats, volume.voxel_offset, executor,
                            workers, reads, progress)
    else:
        num_lods = table.num_lods(options.num_lods) if options.format == "multires" else None
        total = len(table.labels) if num_lods is None else int((num_lods > 0).sum())

        def report() -> None:
            if progress and total:   # nothing to write, nothing to say
                progress(stats["segments"], total)

        report()
        waves = _waves(table.columns["entries"], workers if pool else 1)
        _group_spill(index, [table.labels[w] for w in waves], [int(table.columns["entries"][w].sum()) for w in waves])
        for wave in waves:
            labels = table.labels[wave]
            rows = _wave_rows(results, index, labels, stats)
            rows = rows[np.argsort(rows["label"], kind="stable")]
            lods_of = None if num_lods is None else SegmentLods(labels, num_lods[wave])   # multires
            if pool and len(rows):
                # the workers write the segments' files, each a run of segments of about equal bytes:
                # WRITE_PARTS per worker, at most SHARDS_AHEAD of them per worker submitted at once,
                # so that a report (and its check of the mark) comes while most are yet to start
                from .pipeline import _run_write_task

                _in_turn(executor, workers,
                         (functools.partial(_submit_part, executor, reads(), _run_write_task, part, num_lods=lods_of,
                                            grid_origin=volume.voxel_offset)
                          for part in split_segments(rows, workers * WRITE_PARTS)),
                         lambda got: (_add_worker_part(stats, *got), report()))
            else:
                with results.prefetched(rows):   # what the kept results do not hold, for this wave only
                    write_all_segments(kv, results, rows, plan, options, stats, volume.voxel_offset, lods_of, report)

    if isinstance(index, IndexSpill):
        stats["index_grouped"], stats["index_bytes_read"] = index.grouped, index.bytes_read
    with_props = segment_properties_wanted(options.segment_properties, stats["segments"])
    if with_props:
        write_segment_properties(kv, ids, voxels, volume.voxel_size if volume.voxel_size_known else None)
    if owner is not None and taken_over(kv, owner):
        raise taken_error(kv, owner)
    storage.write_json(kv, "info", mesh_info(volume, options, with_props, spec))
    if volume.precomputed is not None:
        write_source_link(kv, volume, link_source, with_props)
    return stats


def _joined_entries(parsed: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Task results' fragment entries as :data:`INDEX_DTYPE` rows (``offset`` from the start of
    each result, ``block`` its number), and their voxel counts (IDs, counts), joined in the order
    given: ``parsed`` holds ``(block, *unpack_block_header(head))`` of each result."""
    index = np.concatenate([p[1] for p in parsed])
    ext = np.empty(len(index), dtype=INDEX_DTYPE)
    for name in FRAG_DTYPE.names:
        ext[name] = index[name]
    rows = [len(p[1]) for p in parsed]
    ext["offset"] += np.repeat(np.array([p[4] for p in parsed], dtype=np.uint64), rows)
    ext["block"] = np.repeat(np.array([p[0] for p in parsed], dtype=np.uint32), rows)
    return ext, np.concatenate([p[2] for p in parsed]), np.concatenate([p[3] for p in parsed])


def _header_batches(results: "TaskResults", known: Optional[dict], whole: bool) -> Iterator[tuple]:
    """:func:`_joined_entries` of every task result (:meth:`TaskResults.iter_headers`), in
    batches of about :data:`HEADER_BATCH_ROWS` rows, in task order; the results that hold
    nothing (:func:`gpumesh.pipeline.block_is_empty`) are passed over.  Per result, the NumPy
    calls that parsing and adding its rows take cost more than the rows themselves when they
    are few, as they are in most tasks of a large volume (mostly background at its borders)."""
    parsed, rows = [], 0
    for b, head in results.iter_headers(known, whole):
        if block_is_empty(head):
            continue
        parsed.append((b, *unpack_block_header(head)))
        del head
        rows += len(parsed[-1][1]) + len(parsed[-1][2])
        if rows >= HEADER_BATCH_ROWS:
            yield _joined_entries(parsed)
            parsed, rows = [], 0
    if parsed:
        yield _joined_entries(parsed)


def _read_index(results: "TaskResults", known: dict, lods: int, whole: bool):
    """Read every task result's header once, in task order (:meth:`TaskResults.iter_headers`).

    Returns
    -------
    index : structured array, IndexSpill or None
        Every fragment entry (:data:`INDEX_DTYPE`), in task order; where they hold more than
        :data:`ASSEMBLY_INDEX_BYTES`, the :class:`IndexSpill` that holds them (the caller closes
        it), or ``None`` where none could be written: they are then read again by wave
        (:func:`_wave_rows`).
    table : SegmentTable
        Every segment with fragments.
    voxels : LabelTable
        Every counted segment's voxels (column ``voxels``).
    block_bytes : (tasks,) float64
        Each result's fragment bytes.
    """
    table = SegmentTable(lods)
    voxels = LabelTable({"voxels": np.zeros(0, np.uint64)}, {"voxels": np.add})
    block_bytes = np.zeros(len(results.keys))
    kept: Optional[list] = []
    spill: Optional[IndexSpill] = None
    held = 0
    try:
        for ext, count_labels, counts in _header_batches(results, known, whole):
            table.add(ext)
            voxels.add_rows(count_labels, {"voxels": counts})
            block_bytes += np.bincount(ext["block"], weights=ext["size"], minlength=len(block_bytes))
            if kept is not None:
                held += ext.nbytes
                if held <= ASSEMBLY_INDEX_BYTES:
                    kept.append(ext)
                    continue
                # past the cap: none held, all written to the spill (where it can be)
                batches, kept = kept + [ext], None
                spill = IndexSpill.start() if INDEX_SPILL else None
            else:
                batches = [ext]
            if spill is not None and not spill.add(batches):
                spill = None   # (closed) the waves read the headers again
    except BaseException:   # a result that cannot be read, Ctrl-C: its file goes now, not at exit
        if spill is not None:
            spill.close()
        raise
    if kept is not None:
        return np.concatenate(kept) if kept else np.zeros(0, dtype=INDEX_DTYPE), table, voxels, block_bytes
    return spill, table, voxels, block_bytes


def _waves(entries: np.ndarray, at_least: int = 1) -> list:
    """Consecutive runs of segments (or shards) whose ``entries`` (fragment entries of each)
    add up to at most :data:`ASSEMBLY_INDEX_BYTES` worth of :data:`INDEX_DTYPE` rows, but of at
    least ``at_least`` each (the workers, so that each has whole shards to write rather than
    parts that this process joins): slices of ``entries``; one slice for all when they fit (and
    for none)."""
    cap = max(1, ASSEMBLY_INDEX_BYTES // INDEX_DTYPE.itemsize)
    if int(entries.sum()) <= cap:
        return [slice(0, len(entries))]
    out, start, total = [], 0, 0
    for i, e in enumerate(entries.tolist()):
        if i - start >= at_least and total + e > cap:
            out.append(slice(start, i))
            start, total = i, 0
        total += e
    out.append(slice(start, len(entries)))
    return out


#: The file systems whose files are held in memory.
MEMORY_FILESYSTEMS = ("tmpfs", "ramfs")

#: Linux's table of the mounted file systems (:func:`memory_filesystem`).
MOUNTS = "/proc/self/mounts"


def memory_filesystem(path: str, mounts: Optional[str] = None) -> Optional[str]:
    """The type of the file system that holds ``path`` where it keeps its files in memory
    (:data:`MEMORY_FILESYSTEMS`), else ``None`` (also where ``mounts``, the table of mounted
    file systems, default :data:`MOUNTS`, cannot be read)."""
    mounts = MOUNTS if mounts is None else mounts
    try:
        with open(mounts) as fh:
            table = [fields[1:3] for fields in map(str.split, fh) if len(fields) >= 3]
    except OSError:
        return None
    real = os.path.realpath(path)
    best, kind = "", None
    for point, fstype in table:
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), point)   # \040: a space
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fstype
    return kind if kind in MEMORY_FILESYSTEMS else None


def _find_sorted(table: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each of ``values`` is in ``table`` (sorted ascending) and whether it is there: its
    position (clipped to the last; 0 in an empty table) and a bool, each of ``values``' length
    (:func:`gpumesh.pipeline.in_sorted` gives the bools alone)."""
    if len(table) == 0:
        return np.zeros(len(values), dtype=np.int64), np.zeros(len(values), dtype=bool)
    at = np.searchsorted(table, values).clip(max=len(table) - 1)
    return at, table[at] == values


class IndexSpill:
    """The fragment index of an assembly past :data:`ASSEMBLY_INDEX_BYTES`, in an unnamed
    temporary file (in ``TMPDIR``; the system deletes it when it is closed, or when the process
    ends however it ends), so that each wave of the assembly reads its segments' entries from
    local disk, :data:`SPILL_READ_BYTES` at a time, instead of every task result's header again
    from the scratch area (:func:`_wave_rows`).  It takes about 52 bytes per fragment: 15 GB for
    the ~2.8e8 fragments of a teravoxel at the real volume's density.

    The entries are written in task order, as the headers are read, before the waves are known.
    Once they are (at least :data:`SPILL_GROUP_WAVES` of them), :meth:`group` writes them again
    wave by wave, so that each wave reads its own entries alone, not the whole file.

    Attributes
    ----------
    rows : int
        Entries in the file.
    bytes_read : int
        Bytes read back from the file so far (by :meth:`group` and :meth:`rows_of`).
    grouped : bool
        The entries are grouped by wave (:meth:`group`).
    in_memory : str or None
        ``"tmpfs"`` (or ``"ramfs"``) where ``TMPDIR`` keeps its files in memory
        (:func:`memory_filesystem`, set by :meth:`start`).
    """

    def __init__(self, file):
        self.file, self.rows, self.bytes_read = file, 0, 0
        self.grouped = False
        self.in_memory: Optional[str] = None   # the tmpfs (or ramfs) that holds the file, if one does
        self._labels = self._wave_of = self._starts = self._counts = None   # of the waves, once grouped

    @classmethod
    def start(cls) -> "Optional[IndexSpill]":
        """A new, empty spill; ``None`` where no temporary file can be made.  An
        :class:`IndexInMemoryWarning` where ``TMPDIR`` keeps its files in memory."""
        try:
            spill = cls(tempfile.TemporaryFile(prefix="gpumesh-index-"))
        except OSError:
            return None
        spill.in_memory = memory_filesystem(tempfile.gettempdir())
        if spill.in_memory:
            warnings.warn(f"the fragment index of this job passes {ASSEMBLY_INDEX_BYTES / 2**30:g} GiB and goes to a "
                          f"temporary file in {tempfile.gettempdir()}, a {spill.in_memory} that holds it in memory "
                          f"(52 bytes per fragment): set TMPDIR to a folder on disk for a job this large",
                          IndexInMemoryWarning, stacklevel=2)
        return spill

    def add(self, batches: list) -> bool:
        """Append ``batches`` (:data:`INDEX_DTYPE` rows); ``False``, the spill closed, where
        they cannot be written (the temporary folder is full).  They are flushed at once: the
        file is buffered, and a full folder must show here, not at a wave's read."""
        try:
            for ext in batches:
                self.file.write(np.ascontiguousarray(ext).tobytes())
                self.rows += len(ext)
            self.file.flush()
            return True
        except OSError:
            self.close()
            return False

    def _read(self, start: int, rows: int) -> Iterator[np.ndarray]:
        """Entries ``start`` to ``start + rows`` of the file, :data:`SPILL_READ_BYTES` at a time,
        or 1/16 of :data:`ASSEMBLY_INDEX_BYTES` where that is less (a row at least), so that a
        step's memory follows the cap.

        Raises
        ------
        GpumeshError
            The file holds fewer (read back cut short)."""
        size = INDEX_DTYPE.itemsize
        self.file.flush()
        self.file.seek(start * size)
        step, left = max(1, min(SPILL_READ_BYTES, ASSEMBLY_INDEX_BYTES // 16) // size), rows
        while left:
            n = min(step, left)
            data = self.file.read(n * size)
            self.bytes_read += len(data)
            if len(data) != n * size:
                raise GpumeshError(f"the assembly's temporary file of fragment entries ended early ({len(data)} of "
                                   f"{n * size} bytes read at entry {start + rows - left})")
            yield np.frombuffer(data, INDEX_DTYPE)
            left -= n

    def rows_of(self, labels: np.ndarray) -> np.ndarray:
        """The entries of segments ``labels`` (ascending), in the order written (task order).
        Once :meth:`group`\\ ed, only the waves that hold any of ``labels`` are read, one after
        the other (each in task order), and only their segments' entries are held.

        Raises
        ------
        GpumeshError
            The file holds fewer entries than were written (read back cut short)."""
        if self.grouped:
            at, hit = _find_sorted(self._labels, labels)
            runs = [(int(self._starts[k]), int(self._counts[k])) for k in np.unique(self._wave_of[at[hit]]).tolist()]
        else:
            runs = [(0, self.rows)]
        parts = [ext[in_sorted(labels, ext["label"])] for start, rows in runs for ext in self._read(start, rows)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=INDEX_DTYPE)

    def group(self, waves: list, entries) -> bool:
        """Write the entries again into a new temporary file, those of each wave in one run (in
        task order), and drop the old file: then :meth:`rows_of` a wave reads its own run alone.
        A job of ``W`` waves reads the file about twice (this and the runs) instead of ``W``
        times, and writes it twice; the folder holds both files for the while.

        Parameters
        ----------
        waves : list of (s,) uint64
            Each wave's segment IDs, ascending (no ID in two waves).  Entries of other segments
            (below the dust threshold, or without a LOD to write) are dropped.
        entries : sequence of int
            Each wave's entries (the :class:`SegmentTable`'s ``entries`` of its segments).

        Returns
        -------
        bool
            ``False``, the file as it was, where the new one cannot be made or filled (the
            temporary folder is full), or would leave less than :data:`SPILL_GROUP_ROOM` free
            there, or the folder keeps its files in memory (:attr:`in_memory`: then not
            tried): the waves then read the whole file each.

        Raises
        ------
        GpumeshError
            The file holds fewer entries of a wave, or more, than ``entries`` says, or fewer
            than were written.
        """
        if self.in_memory:   # reading it whole costs little, and a second copy would take as much memory again
            return False
        labels = np.concatenate(waves) if waves else np.zeros(0, dtype=np.uint64)
        wave_of = np.repeat(np.arange(len(waves)), [len(w) for w in waves])
        order = np.argsort(labels, kind="stable")
        labels, wave_of = labels[order], wave_of[order]
        counts = np.asarray(entries, dtype=np.int64).reshape(len(waves))
        starts = np.cumsum(counts) - counts
        filled = starts.copy()
        size = INDEX_DTYPE.itemsize
        try:   # not where the folder would be all but full (other processes may write there)
            if shutil.disk_usage(tempfile.gettempdir()).free < int(counts.sum()) * size + SPILL_GROUP_ROOM:
                return False
            out = tempfile.TemporaryFile(prefix="gpumesh-index-")
        except OSError:
            return False
        try:
            for ext in self._read(0, self.rows):
                at, found = _find_sorted(labels, ext["label"])
                hit = np.flatnonzero(found)
                wave = wave_of[at[hit]]
                by_wave = np.argsort(wave, kind="stable")   # task order kept within each wave
                take, wave = hit[by_wave], wave[by_wave]
                del at, found, hit, by_wave
                starts_here = _run_starts(wave)
                for s0, s1 in zip(starts_here.tolist(), np.r_[starts_here[1:], len(wave)].tolist()):
                    k = int(wave[s0])
                    if filled[k] + (s1 - s0) > starts[k] + counts[k]:
                        raise GpumeshError(f"the assembly's temporary file of fragment entries holds more entries of "
                                           f"wave {k} than its segments have ({int(counts[k])})")
                    out.seek(int(filled[k]) * size)
                    out.write(ext[take[s0:s1]].tobytes())   # a wave's copy at a time, not the step's
                    filled[k] += s1 - s0
            short = np.flatnonzero(filled != starts + counts)
            if len(short):
                k = int(short[0])
                raise GpumeshError(f"the assembly's temporary file of fragment entries holds "
                                   f"{int(filled[k] - starts[k])} entries of wave {k}, whose segments have "
                                   f"{int(counts[k])}")
            out.flush()
        except OSError:
            _close_quietly(out)
            return False
        except BaseException:
            _close_quietly(out)
            raise
        _close_quietly(self.file)
        self.file, self.rows, self.grouped = out, int(counts.sum()), True
        self._labels, self._wave_of, self._starts, self._counts = labels, wave_of, starts, counts
        return True

    def close(self) -> None:
        """Close the file, which deletes it; the bytes a full folder left in its buffer, which
        its close writes again, are dropped with it (no error)."""
        _close_quietly(self.file)


def _close_quietly(file) -> None:
    """Close a temporary file, which deletes it; an ``OSError`` (the bytes a full folder left
    in its buffer, written again at the close) is dropped with it."""
    try:
        file.close()
    except OSError:
        pass


def _group_spill(index, waves: list, entries) -> None:
    """:meth:`IndexSpill.group` ``index`` by ``waves`` (each wave's segment IDs, ascending) and
    their ``entries``, where it is a spill and they are at least :data:`SPILL_GROUP_WAVES`."""
    if isinstance(index, IndexSpill) and len(waves) >= SPILL_GROUP_WAVES:
        index.group(waves, entries)


def _wave_rows(results: "TaskResults", index, labels: np.ndarray, stats: dict) -> np.ndarray:
    """The fragment entries of segments ``labels`` (ascending), in task order: ``index``
    itself when it was held whole (an array: then there is one wave, of every segment,
    :func:`_waves`); read from ``index`` where it is an :class:`IndexSpill`; else (``None``)
    read again from every task result's header."""
    if isinstance(index, np.ndarray):
        return index
    stats["index_waves"] += 1
    if index is not None:
        return index.rows_of(labels)
    parts = []
    for ext, _, _ in _header_batches(results, None, whole=False):
        parts.append(ext[in_sorted(labels, ext["label"])])
    return np.concatenate(parts) if parts else np.zeros(0, dtype=INDEX_DTYPE)


def write_all_segments(kv, results: "TaskResults", rows: np.ndarray, plan: Plan, options: MeshOptions,
                       stats: dict, grid_origin, num_lods: Optional[SegmentLods] = None,
                       after_batch: Optional[Callable[[], None]] = None) -> None:
    """:func:`write_segments` for every segment of ``rows`` (fragment entries), in batches of
    :data:`WRITE_BATCH` segments; ``after_batch()`` is called after each.  Then the files,
    written without an fsync each, are flushed (:func:`gpumesh.storage.flush`), by the process
    that wrote them (a worker on another node of a Dask cluster flushes its own file system):
    they are on disk when this returns, before :func:`assemble` writes ``info``."""
    batch = []
    for label, entries in _iter_segments(rows):
        batch.append((label, entries))
        if len(batch) >= WRITE_BATCH:
            write_segments(kv, results, batch, plan, options, stats, grid_origin, num_lods)
            batch = []
            if after_batch:
                after_batch()
    if batch:
        write_segments(kv, results, batch, plan, options, stats, grid_origin, num_lods)
        if after_batch:
            after_batch()
    storage.flush(kv)


class WorkerReads:
    """How the workers read task results when they write part of the output.

    Each worker keeps at most ``1 / workers`` of this process's assembly cache (``cap``).
    Where every result fits in that and there are at most :data:`HOLD_WORKERS` workers, each
    worker reads every result it needs whole, once, and holds it for all its parts of the
    output (``hold``): its parts (shards, runs of segments) need about ``1 / workers`` of each
    result between them, but one read each instead of one per part and result.  Else a worker
    reads a result whole for a part that needs at least 1/8 of the result's fragment bytes,
    else in spans (:meth:`TaskResults.prefetch`).  Making one drops this process's kept
    results: the workers read them.

    Parameters
    ----------
    results : TaskResults
    block_bytes : (results,) float
        Each result's fragment bytes.
    workers : int
    """

    def __init__(self, results: "TaskResults", block_bytes: np.ndarray, workers: int):
        self.keys = results.keys
        self.block_bytes = np.asarray(block_bytes, dtype=np.float64)
        self.cap = max(1, results.cache_bytes // max(1, workers))
        # the results' bytes (their headers' where known; a result's prefix at least)
        whole_bytes = self.block_bytes.sum() + np.maximum(results.header_bytes, BLOCK_PREFIX)[~results.empty].sum()
        self.hold = workers <= HOLD_WORKERS and whole_bytes <= self.cap
        results.kept.clear()
        results.kept_bytes = 0

    def whole(self, rows: np.ndarray) -> np.ndarray:
        """The results that a worker writing ``rows`` reads whole."""
        need = np.bincount(rows["block"], weights=rows["size"], minlength=len(self.block_bytes))
        if self.hold:
            return np.flatnonzero(need > 0)
        return np.flatnonzero((need > 0) & (8 * need >= self.block_bytes))

    def part(self, rows: np.ndarray) -> tuple[list, np.ndarray, np.ndarray]:
        """What a worker writing ``rows`` is sent: the keys of just the results they use, the
        rows with ``block`` numbering those keys, and which of them it reads whole (the task
        functions' ``keys``, ``rows`` and ``whole``), so that a task does not carry the key of
        every result of the job."""
        used = np.unique(rows["block"])
        local = rows.copy()
        local["block"] = np.searchsorted(used, rows["block"])
        return ([self.keys[b] for b in used.tolist()], local,
                np.searchsorted(used, self.whole(rows)))


def _submit_part(executor, reads: WorkerReads, fn, rows: np.ndarray, *args, num_lods: Optional[SegmentLods],
                 grid_origin):
    """Submit the worker task ``fn(keys, rows, *args, num_lods, grid_origin, whole, cap, hold)``
    of ``gpumesh.pipeline`` for the fragment entries ``rows``, sent with only the task results
    (:meth:`WorkerReads.part`) and the segments' LODs (``None`` for legacy) that they use."""
    keys, local, whole = reads.part(rows)
    return executor.submit(fn, keys, local, *args, None if num_lods is None else num_lods.of(rows),
                           np.asarray(grid_origin), whole, reads.cap, reads.hold)


def write_segments(kv, results: "TaskResults", batch: list, plan: Plan, options: MeshOptions, stats: dict,
                   grid_origin, num_lods: Optional[SegmentLods] = None) -> None:
    """Write the files of a batch of segments (fragment data first, then manifests).

    Parameters
    ----------
    kv : tensorstore.KvStore
    results : TaskResults
        The task results, indexed by the ``block`` field of the entries.
    batch : list of (segment ID, entries)
        Entries: structured array rows (label, lod, x, y, z, offset, size, triangles, block).
    plan, options, stats
    grid_origin : (3,) int
        The volume's voxel offset.
    num_lods : SegmentLods, optional
        Segment ID -> its LODs (:meth:`SegmentTable.num_lods`); needed for the multi-resolution
        format, ``None`` for legacy.
    """
    data_writes, manifest_writes = [], []
    lods = num_lods.many([label for label, _ in batch]) if options.format != "legacy" else [0] * len(batch)
    for (label, entries), blobs, segment_lods in zip(batch, _read_fragments(results, batch), lods):
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
            built = build_multires(label, entries, blobs, plan, options, stats, grid_origin, segment_lods)
            if built is None:
                continue
            data, manifest = built
            data_writes.append((str(label), data))
            manifest_writes.append((f"{label}.index", manifest))
            stats["bytes"] += len(data) + len(manifest)
        stats["segments"] += 1
    storage.write_many(kv, data_writes, sync=False)   # flushed by write_all_segments
    storage.write_many(kv, manifest_writes, sync=False)


def build_multires(label: int, entries: np.ndarray, blobs: list, plan: Plan, options: MeshOptions,
                   stats: dict, grid_origin, num_lods: int) -> Optional[tuple[bytes, bytes]]:
    """Manifest and fragment data of one segment (multi-resolution format).

    ``grid_origin`` is the voxel offset (stored-model units); ``vertex_offsets[k] = -F_k / 2``
    (``F_k = 2**k`` on the axes downsampled at every LOD: :meth:`Plan.vertex_offsets`) and
    ``lod_scales[k] = 2**k`` (see :mod:`gpumesh.pipeline` for the geometry).
    ``num_lods``: the segment's LODs (:meth:`SegmentTable.num_lods`).

    Returns
    -------
    data : bytes
        Fragments concatenated in manifest order (LOD 0 first, Z-order within a LOD).
    manifest : bytes
        ``None`` instead of both when ``num_lods`` is 0 (the segment is not written).
    """
    C = plan.chunk
    if num_lods == 0:
        return None
    offsets = plan.vertex_offsets(num_lods)
    head = _manifest_head(C, tuple(float(v) for v in grid_origin), offsets)
    if num_lods == 1 and len(entries) == 1:
        # one LOD 0 fragment (most segments of a volume of many small ones): its node alone,
        # no parents, no placeholders
        x, y, z, triangles = (int(entries[0][name]) for name in ("x", "y", "z", "triangles"))
        stats["triangles_per_lod"][0] += triangles
        stats["fragments_per_lod"][0] += 1
        return blobs[0], head + manifest_body([np.array([[x, y, z]])], [[len(blobs[0])]])
    pos = np.stack([entries["x"], entries["y"], entries["z"]], axis=1).astype(np.uint32)
    nodes, node_lod, src = segment_nodes(pos, entries["lod"], num_lods)
    have = src >= 0
    filler = placeholder_fragments(nodes, node_lod, src, blobs, C, options.vertex_quantization_bits, offsets)
    parts = [blobs[i] if i >= 0 else filler[r] for r, i in enumerate(src.tolist())]
    node_size = np.array([len(p) for p in parts], dtype=np.int64)
    tri = np.bincount(node_lod[have], weights=entries["triangles"][src[have]].astype(np.float64),
                      minlength=num_lods)
    frags = np.bincount(node_lod, minlength=num_lods)
    nodes_per_lod, sizes = [], []
    for k in range(num_lods):
        stats["triangles_per_lod"][k] += int(tri[k])
        stats["fragments_per_lod"][k] += int(frags[k])
        sel = node_lod == k
        nodes_per_lod.append(nodes[sel])
        sizes.append(node_size[sel])
    return b"".join(parts), head + manifest_body(nodes_per_lod, sizes)


@functools.lru_cache(maxsize=64)
def _manifest_head(chunk: int, grid_origin: tuple, vertex_offsets: tuple) -> bytes:
    """:func:`gpumesh.octree.manifest_head` of a segment with ``len(vertex_offsets)`` LODs: LOD 0
    nodes of ``chunk`` voxels from ``grid_origin``, ``lod_scales[k] = 2**k`` (the same for every
    segment of a job with that many LODs)."""
    return manifest_head([chunk] * 3, grid_origin, [float(1 << k) for k in range(len(vertex_offsets))],
                         vertex_offsets)


def placeholder_positions(point, bits: int) -> np.ndarray:
    """Quantized vertices of a placeholder fragment at ``point`` (see module docs).

    Parameters
    ----------
    point : (3,) int
        Quantized position inside the node, in ``[0, 2**bits)``.
    bits : int
        ``vertex_quantization_bits``.

    Returns
    -------
    (4, 3) int64
        ``point`` and three more steps along x, away from the node's mid-plane where
        ``point`` is next to it, so no two vertices lie on opposite sides of the client's
        partition point ``2**(bits - 1)`` and all stay in ``[0, 2**bits)``.
    """
    p = np.clip(np.asarray(point, dtype=np.int64).reshape(3), 0, (1 << bits) - 1)
    mid, top = 1 << (bits - 1), (1 << bits) - 1
    x = int(p[0])
    up = x + 3 <= top and (x >= mid or x + 3 <= mid)
    out = np.repeat(p[None, :], 4, axis=0)
    out[:, 0] = x + np.arange(4) if up else x - np.arange(4)
    return out


def placeholder_fragments(nodes: np.ndarray, node_lod: np.ndarray, src: np.ndarray, blobs: list, chunk: int,
                          bits: int, vertex_offsets: np.ndarray) -> dict:
    """Placeholder fragments (:mod:`gpumesh.octree`) for the parents that hold no triangles.

    Parameters
    ----------
    nodes, node_lod, src
        One segment's octree nodes, as :func:`gpumesh.octree.segment_nodes` returns them
        (``src < 0``: a parent added without a fragment).
    blobs : list of bytes
        The segment's Draco fragments, indexed by ``src``.
    chunk : int
        LOD 0 node edge (voxels).
    bits : int
        ``vertex_quantization_bits``.
    vertex_offsets : (L, 3) float (array or nested sequence)
        The manifest's ``vertex_offsets`` (:meth:`gpumesh.pipeline.Plan.vertex_offsets`).

    Returns
    -------
    dict
        Row of ``nodes`` -> Draco bytes of its placeholder, for every row with ``src < 0``.
        Each lies at a vertex of one of the node's children (the first, in Z-order, inside
        the node: for a child that is a placeholder itself, that placeholder's point), in the
        node's quantized frame: in stored-model units a LOD ``k`` vertex is at
        ``vertex_offsets[k] + chunk * 2**k * (position + q / (2**bits - 1))``.  A child's box
        reaches up to half a voxel of its LOD past its parent's (``vertex_offsets[k] = -F_k /
        2``); where no child has a vertex inside the node, the nearest one is moved onto its box.
    """
    rows = np.flatnonzero(src < 0)
    if not len(rows):
        return {}
    steps = float((1 << bits) - 1)
    offsets = np.asarray(vertex_offsets, dtype=np.float64)
    at: dict[int, np.ndarray] = {}   # row -> its point, stored-model units from grid_origin
    out = {}
    for r in rows.tolist():            # LOD by LOD (the rows are in LOD order)
        k = int(node_lod[r])
        best, best_off = None, np.inf
        for child in np.flatnonzero((node_lod == k - 1) & np.all((nodes >> 1) == nodes[r], axis=1)).tolist():
            if src[child] >= 0:
                q, _ = decode_fragment(blobs[int(src[child])], bits)
                points = offsets[k - 1] + chunk * (1 << (k - 1)) * (nodes[child] + q / steps)
            else:
                points = at[child][None, :]
            # in this node's frame; a child's box reaches half a finer voxel past its parent's
            frac = (points - offsets[k]) / (chunk * (1 << k)) - nodes[r]
            off = np.abs(frac - np.clip(frac, 0.0, 1.0)).sum(axis=1)
            i = int(np.argmin(off))
            if off[i] < best_off:
                best, best_off = (points[i], frac[i]), off[i]
            if best_off == 0:
                break
        at[r] = best[0]
        qp = placeholder_positions(np.rint(np.clip(best[1], 0.0, 1.0) * steps).astype(np.int64), bits)
        out[r] = encode_draco(qp, PLACEHOLDER_FACES, bits)
    return out


#: The whole result of a task that found nothing (:func:`gpumesh.pipeline.pack_block` of no
#: fragment and no voxel count), header and all.
EMPTY_HEADER = pack_block(np.zeros(0, dtype=FRAG_DTYPE), np.zeros(0, np.uint64), np.zeros(0, np.uint64), b"")


def fragment_spans(rows: np.ndarray, gap: int = SPAN_GAP_BYTES) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The byte ranges :meth:`TaskResults.prefetch` reads the fragments of ``rows`` (entries with
    block, offset, size) in: those of a result at most ``gap`` bytes apart share one.

    Returns
    -------
    block, start, end : (spans,) int64
        Each span's result and bytes, by result, then start.
    """
    order = np.lexsort((rows["offset"], rows["block"]))
    block = rows["block"][order].astype(np.int64)
    start = rows["offset"][order].astype(np.int64)
    end = start + rows["size"][order].astype(np.int64)
    if len(block) == 0:
        return block, start, end
    # a span ends where the result changes or the next fragment starts past the gap
    # (fragments of one result do not overlap: each one's end bounds the next start)
    new = np.r_[True, (block[1:] != block[:-1]) | (start[1:] - end[:-1] > gap)]
    first = np.flatnonzero(new)
    return block[first], start[first], np.maximum.reduceat(end, first)


class TaskResults:
    """The task results of the scratch area, as assembly reads them.

    A result is read whole, once, and kept while the kept results hold at most
    :data:`ASSEMBLY_CACHE_BYTES`; then fragments are slices of it.  Past that, only a result's
    header is read (one byte-range read where its key gives its size, else two) and its
    fragments by byte range: those that a worker's part of the output needs in a few spans of
    each result (:meth:`prefetch`), else each alone.  Where the results do not all fit, the
    last kept are let go until the kept ones leave the spans 1 / :data:`SPAN_ROOM_SHARE` of
    the cap.

    Parameters
    ----------
    kv : tensorstore.KvStore
    keys : list of str
        Scratch keys of the results; ``block`` numbers of the fragment entries index it.
    cache_bytes : int, optional
        The cap on kept results (default :data:`ASSEMBLY_CACHE_BYTES`).
    empty : (results,) bool, optional
        The results known to hold nothing, with no key of their own (a task that found nothing,
        recorded by name: :class:`gpumesh.pipeline._EmptyTasks`): never read; their header is
        :data:`EMPTY_HEADER`.
    """

    def __init__(self, kv, keys: list, cache_bytes: Optional[int] = None, empty: Optional[np.ndarray] = None):
        self.kv, self.keys = kv, list(keys)
        self.empty = np.zeros(len(self.keys), dtype=bool) if empty is None else np.asarray(empty, dtype=bool)
        self.kept: dict[int, bytes] = {}
        self.kept_bytes = 0   # the bytes of kept results and of prefetched spans
        self.cache_bytes = ASSEMBLY_CACHE_BYTES if cache_bytes is None else int(cache_bytes)
        #: a result read whole did not fit, or those kept filled the cap with results left to read
        #: (:meth:`iter_headers`): no more are kept, and the room left in the cap is the spans'
        #: (:meth:`prefetch`)
        self.full = False
        #: each result's header size where its key gave it (set by the caller) or once its header
        #: was seen (0: not yet), so that reading it (again, in a wave of the assembly) takes one
        #: byte-range read, not two
        self.header_bytes = np.zeros(len(self.keys), dtype=np.int64)
        #: result number -> (span starts, span ends, each span's read future or bytes)
        self.spans: dict[int, tuple[np.ndarray, np.ndarray, list]] = {}
        self.span_bytes = 0   # theirs, counted in kept_bytes too

    def drop_spans(self) -> None:
        """Forget the spans that :meth:`prefetch` read (their bytes leave the cap's count)."""
        self.spans.clear()
        self.kept_bytes -= self.span_bytes
        self.span_bytes = 0

    @contextlib.contextmanager
    def prefetched(self, rows: np.ndarray):
        """:meth:`prefetch` ``rows`` for the ``with`` block, then :meth:`drop_spans` (one
        process writing a shard or a wave of segments, whose spans are not needed after it)."""
        self.prefetch(rows)
        try:
            yield self
        finally:
            self.drop_spans()

    def prefetch(self, rows: np.ndarray, gap: int = SPAN_GAP_BYTES) -> None:
        """Start reading the fragments of ``rows`` (entries with block, offset, size) that are
        in no kept result, each result's in spans: fragments at most ``gap`` bytes apart share
        one byte-range read.  :meth:`read` then slices them from the spans.

        The spans are held in memory with the kept results, within the same cap (the fragments
        past it are read one by one, as without this).  Fragments that a shard needs are spread
        over the task results (a shard's segments are drawn by the hash of their IDs), so each
        result gave a worker many small reads: on a cloud store, a round trip each.
        """
        if len(rows) == 0:
            return
        kept = np.fromiter(self.kept, dtype=np.int64, count=len(self.kept))
        s_block, s_start, s_end = fragment_spans(rows[~np.isin(rows["block"], kept)], gap)
        if len(s_block) == 0:
            return
        # the spans that fit in the cap: a prefix, so still in order of their result
        fits = np.cumsum(s_end - s_start) <= max(0, self.cache_bytes - self.kept_bytes)
        s_block, s_start, s_end = s_block[fits], s_start[fits], s_end[fits]
        self.span_bytes += int((s_end - s_start).sum())
        self.kept_bytes += int((s_end - s_start).sum())
        blocks, firsts, counts = np.unique(s_block, return_index=True, return_counts=True)
        for b, i, c in zip(blocks.tolist(), firsts.tolist(), counts.tolist()):
            lo, hi = s_start[i:i + c], s_end[i:i + c]
            self.spans[b] = (lo, hi, [self.kv.read(self.keys[b], byte_range=slice(x, y))
                                      for x, y in zip(lo.tolist(), hi.tolist())])

    def adopt(self, blobs: dict) -> None:
        """Keep results already read whole (result number -> bytes: those a worker holds,
        ``gpumesh.pipeline._HeldResults``), counted in the cap as those read here are."""
        for b, blob in blobs.items():
            self.kept[b] = blob
            self.kept_bytes += len(blob)

    def keep(self, blocks, leave: int = 0) -> None:
        """Read results ``blocks`` whole (a few at a time, concurrently) and keep them, while
        the kept results stay within the cap less ``leave`` bytes (room for the spans of the
        results not kept, :meth:`prefetch`); the others are then read by byte range.

        Raises
        ------
        GpumeshError
            A result is missing from the scratch area (rerun with --overwrite).
        """
        want = [int(b) for b in blocks if int(b) not in self.kept]
        for g in range(0, len(want), 16):
            for b, blob in self._values([(b, self.kv.read(self.keys[b])) for b in want[g:g + 16]]):
                if self.kept_bytes + len(blob) > self.cache_bytes - leave:
                    return
                self.kept[b] = blob
                self.kept_bytes += len(blob)

    def iter_headers(self, known: Optional[dict] = None, whole: bool = True) -> Iterator[tuple[int, bytes]]:
        """``(result number, header)`` of every result, in order: the start of the result up to
        its fragment data (for ``unpack_block_header``), or the whole result where it is kept.

        Reads go out :data:`HEADER_READS` at a time, so that a network destination pays a
        round trip per batch, not per result.

        Parameters
        ----------
        known : dict, optional
            Result number -> its header, as the worker that wrote it returned it (not read;
            popped as it is handed on).
        whole : bool
            Read the other results whole and keep them while the kept results stay within the
            cap (this process then reads their fragments; once one does not fit, or they fill
            the cap with results left, the last kept are let go down to the cap less
            1 / :data:`SPAN_ROOM_SHARE`, the spans' room); else read only their headers: one
            byte-range read each where :attr:`header_bytes` gives its size (its key said it, or
            it was read before), else two (its first :data:`~gpumesh.pipeline.BLOCK_PREFIX`
            bytes give the size; one read for a result that holds nothing, whose header they are).

        Raises
        ------
        GpumeshError
            A result is missing from the scratch area (rerun with --overwrite).
        """
        known = {} if known is None else known
        for g in range(0, len(self.keys), HEADER_READS):
            group = range(g, min(g + HEADER_READS, len(self.keys)))
            todo = [b for b in group if b not in known and b not in self.kept and not self.empty[b]]
            got: dict = {}
            if whole and not self.full and self.kept_bytes >= self.cache_bytes and todo:
                # the kept results fill the cap to the byte, none went past it: these are read by
                # header, and the spans of their fragments need the room as well
                self._keep_no_more()
            if whole and not self.full and self.kept_bytes < self.cache_bytes:
                for b, blob in self._values([(b, self.kv.read(self.keys[b])) for b in todo]):
                    if not self.full and self.kept_bytes + len(blob) <= self.cache_bytes:
                        self.kept[b] = blob
                        self.kept_bytes += len(blob)
                    elif not self.full:
                        # keep no more; kept_bytes stays what the kept results hold: the room left
                        # is the spans' (set to the cap here, it left one process none), at least
                        # 1 / SPAN_ROOM_SHARE of the cap: the last results kept are let go for it
                        self._keep_no_more()
                    got[b] = blob
            else:
                sized = [b for b in todo if self.header_bytes[b]]
                heads = self._values([(b, self.kv.read(self.keys[b], byte_range=slice(0, BLOCK_PREFIX)))
                                      for b in todo if not self.header_bytes[b]])
                reads = [(b, self.kv.read(self.keys[b], byte_range=slice(0, int(self.header_bytes[b]))))
                         for b in sized]
                # a prefix too short is left as it is: unpack_block_header says it is corrupt; and
                # so is one that is the whole header (a task that found only background): read
                # again, it made the assembly read most results of a sparse volume twice
                reads += [(b, self.kv.read(self.keys[b], byte_range=slice(0, block_header_size(head))))
                          if len(head) == BLOCK_PREFIX and block_header_size(head) > BLOCK_PREFIX else (b, head)
                          for b, head in heads]
                got = dict(self._values(reads))
            for b in group:
                head = (known.pop(b) if b in known else self.kept[b] if b in self.kept else
                        EMPTY_HEADER if self.empty[b] else got.pop(b))
                if len(head) >= BLOCK_PREFIX:
                    self.header_bytes[b] = block_header_size(head[:BLOCK_PREFIX])
                yield b, head

    def _keep_no_more(self) -> None:
        """Set :attr:`full` and drop the results kept last until the kept results leave the
        spans 1 / :data:`SPAN_ROOM_SHARE` of the cap (their fragments are then read by byte
        range, as those of results never kept)."""
        self.full = True
        limit = self.cache_bytes - self.cache_bytes // SPAN_ROOM_SHARE
        while self.kept and self.kept_bytes - self.span_bytes > limit:
            _, blob = self.kept.popitem()
            self.kept_bytes -= len(blob)

    def _values(self, reads: list) -> Iterator[tuple[int, bytes]]:
        """``(result number, bytes)`` of ``(result number, read future or bytes)`` pairs."""
        for b, fut in reads:
            yield b, fut if isinstance(fut, bytes) else self.value(b, fut)

    def value(self, b: int, fut) -> bytes:
        """The bytes of a read (future) of result ``b``, whole or a byte range.

        Raises
        ------
        GpumeshError
            The result is missing from the scratch area, or cannot be read there (a byte range
            past its end: a result cut short); never empty bytes in their place.
        """
        try:
            res = fut.result()
        except ValueError as exc:   # TensorStore's errors: OUT_OF_RANGE past the end, I/O errors
            raise GpumeshError(f"task result {self.keys[b]} cannot be read from the scratch area ({exc}); "
                               f"rerun with --overwrite") from exc
        if res.state != "value":
            raise GpumeshError(f"task result {self.keys[b]} is missing from the scratch area; rerun with --overwrite")
        return bytes(res.value)

    def read(self, entries) -> list:
        """Start reading the fragments of ``entries`` (rows with block, offset, size): the
        bytes of kept results and prefetched spans, else the kvstore's read futures.
        :class:`GpumeshError` where a kept result ends before a fragment does (a result cut
        short), as a byte range past the end of one read from the store is (:meth:`value`):
        never fewer bytes in its place."""
        out = []
        for b, o, n in zip(entries["block"].tolist(), entries["offset"].tolist(), entries["size"].tolist()):
            if b in self.kept:
                out.append(self.kept[b][o:o + n])
                if len(out[-1]) != n:
                    raise GpumeshError(f"task result {self.keys[b]} in the scratch area is cut short (a fragment "
                                       f"ends at byte {o + n} of {len(self.kept[b])}); rerun with --overwrite")
            elif b in self.spans and (span := self._span(b, o, n)) is not None:
                out.append(span)
            else:
                out.append(self.kv.read(self.keys[b], byte_range=slice(o, o + n)))
        return out

    def _span(self, b: int, o: int, n: int) -> Optional[bytes]:
        """Bytes ``[o, o + n)`` of result ``b`` from its prefetched spans, or ``None`` where no
        span holds them (waits for the span's read)."""
        lo, hi, got = self.spans[b]
        i = int(np.searchsorted(lo, o, side="right")) - 1
        if i < 0 or o + n > int(hi[i]):
            return None
        if not isinstance(got[i], bytes):
            got[i] = self.value(b, got[i])
        return got[i][o - int(lo[i]):o - int(lo[i]) + n]


def _read_fragments(results: TaskResults, batch: list) -> Iterator[list]:
    """Fragment bytes of each segment of ``batch`` (all reads issued at once)."""
    reads = [(entries["block"].tolist(), results.read(entries)) for _, entries in batch]
    for blocks, r in reads:
        yield [f if isinstance(f, bytes) else results.value(b, f) for b, f in zip(blocks, r)]


def _new_stats(lods: int) -> dict:
    return {"segments": 0, "triangles_per_lod": [0] * lods, "fragments_per_lod": [0] * lods, "bytes": 0}


def _add_worker_part(total: dict, part: dict, rss: float) -> None:
    """Add a worker's statistics, and keep the largest peak RSS (MiB) the workers reported."""
    _add_stats(total, part)
    total["workers_peak_rss_mb"] = max(total.get("workers_peak_rss_mb", 0.0), rss)


def _add_stats(total: dict, part: dict) -> None:
    total["segments"] += part["segments"]
    total["bytes"] += part["bytes"]
    for name in ("triangles_per_lod", "fragments_per_lod"):
        for k, v in enumerate(part[name]):
            total[name][k] += v


def shard_marker_key(spec: ShardingSpec, shard: int) -> str:
    """Scratch key recording that a shard is written (JSON: the sharding spec, the run's
    :attr:`~gpumesh.pipeline.Plan.stamp` and the shard's statistics)."""
    return f"{SCRATCH}shards/{spec.shard_key(shard)}.json"


def write_shards(kv, results: "TaskResults", index: Optional[np.ndarray], table: SegmentTable, plan: Plan,
                 options: MeshOptions, stats: dict, grid_origin, executor=None, workers: int = 1,
                 reads=None, progress: Optional[Callable[[int, int], None]] = None) -> ShardingSpec:
    """Write the sharded multi-resolution meshes of all segments, shard by shard.

    Parameters
    ----------
    kv : tensorstore.KvStore
    results : TaskResults
        The task results, indexed by the ``block`` field of the entries.
    index : structured array, IndexSpill or None
        Every fragment of every block (:data:`INDEX_DTYPE`), in task order, or, when it was too
        large to hold (:func:`assemble`), the :class:`IndexSpill` that holds it or ``None``:
        then the shards are written in waves whose entries fit, each reading them from the spill
        or from the results' headers again (:func:`_wave_rows`).
    table : SegmentTable
        Every segment to write (merged).
    plan, options, stats, grid_origin
        As for :func:`write_segments`; ``options.sharding`` is set.
    executor : concurrent.futures.Executor, optional
        The main job's worker pool (its workers set up by ``gpumesh.pipeline``): when given
        the workers build the segments: with at least as many shards to write as ``workers``,
        a worker builds and writes each shard (:func:`write_shard`, through
        ``gpumesh.pipeline._run_shard_task``); with fewer, each shard's segments are split into
        parts of about equal bytes (:func:`split_segments`), so that every worker has one, the
        workers build them (:func:`build_segments`) and this process writes the shard.  Each
        worker keeps at most ``1 / workers`` of the assembly cache of task results.
    reads : callable, optional
        Gives the :class:`WorkerReads` of the workers (with ``executor``), made on the first
        call.
    progress : callable(done, total), optional
        As for :func:`assemble`: segments written (after each shard) and all to write.

    Returns
    -------
    ShardingSpec
        The spec used (bits chosen from the segments and their fragment bytes, see
        :func:`gpumesh.sharding.choose_bits`, unless given).

    Fragment bytes are read for one shard at a time (per worker).  Shards recorded in the
    scratch area by an interrupted run with the same spec and stamp (``plan.stamp``: of the
    same options, not those of another run writing there at the same time) are skipped (their
    statistics are taken from the record).
    """
    # What each segment will store, from the table alone: its LODs and their fragment bytes.
    n = table.num_lods(options.num_lods)
    spec = options.sharding.resolve(int((n > 0).sum()), table.kept_bytes(n))
    spec_json = spec.to_json()
    have = n > 0   # the segments with n = 0 are not written
    labels, n, entries = table.labels[have], n[have], table.columns["entries"][have]
    if not len(labels):
        return spec
    seg_shard, _ = spec.locate(labels)

    recorded = set(storage.list_keys(kv, SCRATCH + "shards/"))
    shards, per_shard = np.unique(seg_shard, return_inverse=True)
    done = np.zeros(len(shards), dtype=bool)
    for i, shard in enumerate(shards.tolist()):
        marker = shard_marker_key(spec, shard)
        if marker in recorded:
            record = storage.read_json(kv, marker)
            if record is not None and record.get("sharding") == spec_json and record.get("stamp", "") == plan.stamp:
                _add_stats(stats, record["stats"])
                done[i] = True
    todo_shards = np.flatnonzero(~done)

    def report() -> None:
        if progress:
            progress(stats["segments"], len(labels))

    report()
    if not len(todo_shards):   # all written by an interrupted run: no wave (it read the entries for none)
        return spec
    per_wave = workers if executor is not None else 1
    waves = []   # each wave's shards (a mask of shards), segment IDs and fragment entries
    for wave in _waves(np.bincount(per_shard, weights=entries, minlength=len(shards))[todo_shards].astype(np.int64),
                       per_wave):
        in_wave = np.zeros(len(shards), dtype=bool)
        in_wave[todo_shards[wave]] = True
        segments = in_wave[per_shard]
        waves.append((in_wave, labels[segments], int(entries[segments].sum())))
    _group_spill(index, [w[1] for w in waves], [w[2] for w in waves])
    for in_wave, wave_labels, _ in waves:
        rows = _wave_rows(results, index, wave_labels, stats)
        # the wave's entries at the LODs their segments keep, by shard, then segment ID, task
        # order within: one copy of them, taken at once (the index itself stays as it is)
        at, found = _find_sorted(labels, rows["label"])
        take = np.flatnonzero(found & in_wave[per_shard[at]] & (rows["lod"] < n[at]))
        at = at[take]
        order = np.lexsort((at, per_shard[at]))
        rows, row_shard = rows[take[order]], seg_shard[at[order]]
        del at, found, take, order
        starts = _run_starts(row_shard)
        stops = np.r_[starts[1:], len(rows)]
        todo = [(int(row_shard[s0]), rows[s0:s1]) for s0, s1 in zip(starts.tolist(), stops.tolist())]
        _write_shard_rows(kv, results, todo, spec, plan, options, stats, grid_origin, SegmentLods(labels, n),
                          executor, workers, reads, report)
    return spec


#: Shard tasks (or runs of segments) per worker that :func:`_write_shard_rows` (and
#: :func:`assemble`) keeps submitted ahead.
SHARDS_AHEAD = 2

#: Runs of segments per worker that the workers write an unsharded output in (:func:`assemble`):
#: more than one, so that a run taken over while it writes (its mark checked at each report)
#: stops with most of them not started.
WRITE_PARTS = 4


def _in_turn(executor, workers: int, submits, done: Callable) -> None:
    """Call each of ``submits`` (each submits one task to ``executor`` and returns its future),
    keeping at most :data:`SHARDS_AHEAD` tasks per worker submitted, and ``done(result)`` for each
    in turn.  Where ``done`` (or a task) raises, the tasks not started are cancelled: a run
    taken over stops writing after those its workers have in hand."""
    waiting: collections.deque = collections.deque()
    try:
        for submit in submits:
            waiting.append(submit())
            while len(waiting) >= SHARDS_AHEAD * workers:
                done(waiting.popleft().result())
        while waiting:
            done(waiting.popleft().result())
    except BaseException:
        for fut in waiting:
            fut.cancel()
        raise


def _write_shard_rows(kv, results: "TaskResults", todo: list, spec: ShardingSpec, plan: Plan, options: MeshOptions,
                      stats: dict, grid_origin, num_lods: SegmentLods, executor, workers: int,
                      reads, report: Callable[[], None]) -> None:
    """Write the shards ``todo`` (``(shard, its fragment entries)``, as :func:`write_shard` takes
    them), in the workers where there is a pool (see :func:`write_shards`), else here;
    ``report()`` after each shard.  At most :data:`SHARDS_AHEAD` shard tasks per worker wait in
    the pool at once: each holds a copy of its shard's entries until it ends."""
    if executor is not None and todo and (len(todo) > 1 or workers > 1):
        from .pipeline import _run_segments_task, _run_shard_task

        def submit(fn, rows, *args):
            return _submit_part(executor, reads(), fn, rows, *args, num_lods=num_lods, grid_origin=grid_origin)

        split = -(-workers // len(todo))   # parts per shard, so that every worker has one
        if split == 1:                     # many shards: a worker builds and writes each
            _in_turn(executor, workers, (functools.partial(submit, _run_shard_task, rows, shard, spec)
                                         for shard, rows in todo),
                     lambda got: (_add_worker_part(stats, *got), report()))
        else:                              # few shards: workers build parts of each, this process joins them
            pending = [(shard, [submit(_run_segments_task, part_rows) for part_rows in split_segments(rows, split)])
                       for shard, rows in todo]
            for shard, futures in pending:
                items, part, peak = [], _new_stats(plan.lods), 0.0
                for fut in futures:
                    got, got_part, rss = fut.result()
                    items += got
                    _add_stats(part, got_part)
                    peak = max(peak, rss)
                _add_worker_part(stats, _write_built_shard(kv, spec, shard, items, part, plan.stamp), peak)
                report()
    else:
        for shard, rows in todo:
            with results.prefetched(rows):   # what the kept results do not hold, for this shard only
                _add_stats(stats, write_shard(kv, results, rows, shard, spec, plan, options, num_lods, grid_origin))
            report()


def write_shard(kv, results: "TaskResults", rows: np.ndarray, shard: int, spec: ShardingSpec, plan: Plan,
                options: MeshOptions, num_lods: SegmentLods, grid_origin) -> dict:
    """Build and write one shard, then its record in the scratch area.

    Parameters
    ----------
    kv : tensorstore.KvStore
    results : TaskResults
    rows : structured array
        The fragment entries of the shard's segments (as in :func:`write_shards`), each
        segment's at LODs below its ``num_lods``.
    shard : int
    spec : ShardingSpec
    plan, options, grid_origin
        As for :func:`write_segments`.
    num_lods : SegmentLods
        Segment ID -> its LODs, for every segment of ``rows``.

    Returns
    -------
    dict
        The shard's statistics (``segments``, ``triangles_per_lod``, ``fragments_per_lod``,
        ``bytes``).
    """
    items, part = build_segments(results, rows, plan, options, num_lods, grid_origin)
    return _write_built_shard(kv, spec, shard, items, part, plan.stamp)


def build_segments(results: "TaskResults", rows: np.ndarray, plan: Plan, options: MeshOptions, num_lods: SegmentLods,
                   grid_origin) -> tuple[list, dict]:
    """Manifests and fragment data of some segments of a shard (sharded multi-resolution).

    Parameters
    ----------
    results, rows, plan, options, num_lods, grid_origin
        As for :func:`write_shard`; ``rows`` holds whole segments.

    Returns
    -------
    items : list of (segment ID, fragment data, manifest)
        For :func:`gpumesh.sharding.build_shard`.
    stats : dict
        Their statistics (``segments``, ``triangles_per_lod``, ``fragments_per_lod``; ``bytes`` 0).
    """
    part = _new_stats(plan.lods)
    items = []
    segments = list(_iter_segments(rows))
    for b0 in range(0, len(segments), WRITE_BATCH):
        batch = segments[b0:b0 + WRITE_BATCH]
        lods = num_lods.many([label for label, _ in batch])
        for (label, entries), blobs, segment_lods in zip(batch, _read_fragments(results, batch), lods):
            data, manifest = build_multires(label, entries, blobs, plan, options, part, grid_origin, segment_lods)
            items.append((label, data, manifest))
            part["segments"] += 1
    return items, part


def _write_built_shard(kv, spec: ShardingSpec, shard: int, items: list, part: dict, stamp: str = "") -> dict:
    """Write one shard from its items, then its record (with ``stamp``, the run's
    :attr:`~gpumesh.pipeline.Plan.stamp`); returns ``part`` with the shard's bytes."""
    blob = build_shard(spec, items)
    del items[:]
    part["bytes"] += len(blob)
    storage.write(kv, spec.shard_key(shard), blob)
    storage.write_json(kv, shard_marker_key(spec, shard), {"sharding": spec.to_json(), "stamp": stamp,
                                                           "stats": part})
    return part


def split_segments(rows: np.ndarray, parts: int) -> list:
    """Split fragment rows sorted by segment ID into at most ``parts`` runs of whole segments,
    of about equal fragment bytes (none empty)."""
    starts = _run_starts(rows["label"])
    before = np.r_[0, np.cumsum(rows["size"], dtype=np.int64)][starts]   # bytes before each segment
    total = int(rows["size"].sum())
    cuts = np.unique(np.r_[0, starts[np.searchsorted(before, [total * k / parts for k in range(1, parts)])
                                     .clip(0, len(starts) - 1)], len(rows)])
    return [rows[a:b] for a, b in zip(cuts[:-1].tolist(), cuts[1:].tolist()) if b > a]


# --------------------------------------------------------------------------------------
# Conversion between the unsharded and the sharded layout.

_UNSHARDED_FILE = re.compile(r"^\d+(\.index)?$")

#: Every key gpumesh writes in a mesh directory, whatever its layout (``info``,
#: ``source_info.json``, segment properties, manifests, fragment data, legacy ``<id>:0`` and
#: its fragments, shards, the scratch area), and TensorStore's write locks.
_OWN_KEY = re.compile(r"(info|source_info\.json|segment_properties/info|\d+(\.index)?|\d+:0(:-?\d+_-?\d+_-?\d+)?"
                      r"|[0-9a-f]+\.shard|\.gpumesh-work/.*|.*\.__lock)\Z", re.S)


def foreign_keys(keys) -> list[str]:
    """The keys among ``keys`` (a destination's) that gpumesh does not write: ``--overwrite``
    deletes a mesh directory, never a folder that holds anything else (a volume, a home
    directory given by mistake)."""
    return [k for k in keys if not _OWN_KEY.match(k)]


def nonempty_error(dest, keys, resumable: bool) -> DestinationExistsError:
    """The refusal of a non-empty destination ``dest`` holding ``keys``, given neither
    ``--overwrite`` nor ``--resume``, naming the way out that applies: ``--resume`` for an
    interrupted run (where ``resumable``: the main job), another destination for files gpumesh
    did not write (which ``--overwrite`` refuses to delete), else ``--overwrite``."""
    foreign = foreign_keys(keys)
    if resumable and SCRATCH + "plan.json" in keys:
        return DestinationExistsError(f"{dest} is not empty: it holds an interrupted run; pass --resume to finish "
                                      f"it" + ("" if foreign else ", or --overwrite to start again"))
    if foreign:   # neither flag would do: --overwrite and --resume refuse such a folder
        return DestinationExistsError(f"{dest} is not empty and holds {len(foreign):,} file(s) that gpumesh did "
                                      f"not write (e.g. {foreign[0]!r}); choose another destination")
    return DestinationExistsError(f"{dest} is not empty; pass --overwrite to replace the mesh there")


def check_overwrite(dest, keys) -> None:
    """Raise :class:`DestinationExistsError` when ``--overwrite`` would delete files of
    ``dest`` that gpumesh did not write (:func:`foreign_keys`)."""
    foreign = foreign_keys(keys)
    if foreign:
        raise DestinationExistsError(
            f"{dest} holds {len(foreign):,} file(s) that gpumesh did not write (e.g. {foreign[0]!r}); --overwrite "
            f"replaces a mesh directory only: empty it yourself, or choose another destination")


def info_with_sharding(info: dict, spec: Optional[ShardingSpec]) -> dict:
    """``info`` with ``sharding`` set to ``spec`` (placed as :func:`mesh_info` does) or removed."""
    out = {}
    for key, value in info.items():
        if key == "sharding":
            continue
        if key == "segment_properties" and spec is not None:
            out["sharding"] = spec.to_json()
        out[key] = value
    if spec is not None and "sharding" not in out:
        out["sharding"] = spec.to_json()
    return out


def convert_mesh(src, dest, *, sharding: Optional[ShardingOptions] = ShardingOptions(),
                 overwrite: bool = False) -> dict:
    """Rewrite a multi-resolution mesh directory in the sharded or the unsharded layout.

    Manifests and fragment data are copied byte for byte; ``info`` gets (or loses) its
    ``sharding``; every other file (segment properties, ``source_info.json``) is copied as is.
    Sharded output is built one shard at a time, so memory follows the largest shard.

    Parameters
    ----------
    src : location or MeshSource
        A multi-resolution mesh directory, sharded or not (see :func:`gpumesh.reader.open_mesh`).
    dest : str or dict
        Destination path or kvstore URL/spec; must be empty unless ``overwrite``.
    sharding : ShardingOptions or None
        Write sharded with these options (bits chosen as :func:`gpumesh.sharding.choose_bits`
        unless given), or unsharded (``None``).
    overwrite : bool
        Delete what ``dest`` holds first.

    Returns
    -------
    dict
        ``segments``, ``bytes`` (of manifests and fragment data, or of shard files), ``shards``
        (files written; 0 when unsharded) and ``sharding`` (the spec JSON or ``None``).

    Raises
    ------
    InvalidMeshError
        ``src`` is not a valid multi-resolution mesh directory, or a segment's data is missing,
        or ``src`` cannot list its files (a plain HTTP server).
    DestinationExistsError
        ``dest`` holds data and ``overwrite`` is not set, or holds files gpumesh did not write.
    DestinationError
        ``dest`` is a file or lies under one, or cannot be listed.
    ValueError
        ``dest`` is ``src`` or lies inside it (or the reverse), or bad sharding options.
    """
    if sharding is not None:
        sharding.validate()
    source = open_mesh(src)
    if source.kind != "multires":
        if storage.read(source.kv, "info") is None:   # a legacy mesh has one; a volume's folder, a typo not
            raise InvalidMeshError(f"{storage.display(source.kv)}: no info file there: not a mesh directory?")
        raise InvalidMeshError("only multi-resolution meshes can be converted (legacy meshes have no sharded form)")
    try:   # before the destination is touched: a plain HTTP server cannot list its files
        source_keys = storage.list_keys(source.kv)
    except NotImplementedError as exc:
        raise InvalidMeshError(f"{storage.display(source.kv)}: cannot list its files ({exc}); convert needs a "
                               "source that can (a local folder, gs://, s3://), not a plain HTTP server") from exc
    kv = storage.open_kvstore(dest)
    src_spec, dest_spec = storage.kvstore_spec(source.kv), storage.kvstore_spec(kv)
    if storage.within(src_spec, dest_spec) or storage.within(dest_spec, src_spec):
        raise ValueError("the destination must not be the source or lie inside it (or the reverse)")
    existing = storage.destination_keys(dest, kv)
    if existing:
        shown = storage.display(dest)
        if not overwrite:
            raise nonempty_error(shown, existing, resumable=False)
        check_overwrite(shown, existing)
        storage.delete_all(kv)

    if isinstance(source, ShardedMultiresSource):
        own = lambda key: source.sharding.parse_shard_key(key) is not None  # noqa: E731
    else:
        own = _UNSHARDED_FILE.match
    others = [k for k in source_keys if k != "info" and not k.startswith(SCRATCH) and not own(k)]
    ids = source.segment_ids()
    result = {"segments": len(ids), "bytes": 0, "shards": 0, "sharding": None}

    def checked(fetched):
        for seg, mbytes, data in fetched:
            if mbytes is None:
                raise InvalidMeshError(f"segment {seg}: manifest missing")
            if data is None:
                data = b""
            if len(data) != Manifest.from_bytes(mbytes).total_bytes:
                raise InvalidMeshError(f"segment {seg}: fragment data has {len(data)} bytes, the manifest "
                                       f"needs {Manifest.from_bytes(mbytes).total_bytes}")
            yield seg, mbytes, data

    def write_batch(batch: list) -> None:   # fragment data first, then manifests; flushed below
        storage.write_many(kv, [(str(s), d) for s, _, d in batch], sync=False)
        storage.write_many(kv, [(f"{s}.index", m) for s, m, _ in batch], sync=False)

    spec = None
    if sharding is None:
        batch = []
        for seg, mbytes, data in checked(source.fetch(ids)):
            batch.append((seg, mbytes, data))
            result["bytes"] += len(mbytes) + len(data)
            if len(batch) >= WRITE_BATCH:
                write_batch(batch)
                batch = []
        write_batch(batch)
        storage.flush(kv)   # the segments' files on disk before info
    else:
        data_bytes = 0
        for seg, mbytes in source.manifests(ids):
            if mbytes is None:
                raise InvalidMeshError(f"segment {seg}: manifest missing")
            data_bytes += Manifest.from_bytes(mbytes).total_bytes
        spec = sharding.resolve(len(ids), data_bytes)
        result["sharding"] = spec.to_json()
        id_arr = np.array(ids, dtype=np.uint64)
        shard_of, _ = spec.locate(id_arr) if len(ids) else (np.zeros(0, np.int64), None)
        for shard in np.unique(shard_of).tolist():
            members = id_arr[shard_of == shard].tolist()
            items = [(seg, data, mbytes) for seg, mbytes, data in checked(source.fetch(members))]
            blob = build_shard(spec, items)
            del items
            storage.write(kv, spec.shard_key(shard), blob)
            result["bytes"] += len(blob)
            result["shards"] += 1
    for key in others:
        storage.write(kv, key, storage.read(source.kv, key))
    storage.write_json(kv, "info", info_with_sharding(source.info, spec))
    return result


#: Most segments whose segment properties a job writes unless asked to (``segment_properties=
#: True``, ``--segment-properties``).  Inline segment properties are one JSON file (about 22
#: bytes a segment) that Neuroglancer fetches and parses whole before it shows any mesh of the
#: source: 1 M segments make ~22 MB; 5 M took 5.5 s and 0.8 GB to write here (109 MB); past
#: ~24 M the file is longer than V8's longest string (2**29 - 24 characters), so a browser
#: that parses it as one string cannot (not tried).
SEGMENT_PROPERTIES_MAX = 1_000_000


class SegmentPropertiesNotice(UserWarning):
    """The job has more segments than :data:`SEGMENT_PROPERTIES_MAX`: its segment properties
    were left out (``segment_properties=True`` / ``--segment-properties`` writes them)."""


def segment_properties_wanted(option: Optional[bool], segments: int) -> bool:
    """Whether a job of ``segments`` segments writes segment properties, for the option
    ``MeshOptions.segment_properties`` (None: up to :data:`SEGMENT_PROPERTIES_MAX`, with a
    :class:`SegmentPropertiesNotice` past it)."""
    if segments <= 0 or option is False:
        return False
    if option is None and segments > SEGMENT_PROPERTIES_MAX:
        warnings.warn(SegmentPropertiesNotice(
            f"{segments:,} segments: segment properties left out (one JSON file of about "
            f"{segments * 22 / 1e6:,.0f} MB that a viewer loads whole before any mesh); "
            f"--segment-properties (Python: MeshOptions(segment_properties=True)) writes them"), stacklevel=3)
        return False
    return True


def write_segment_properties(kv, uniq: np.ndarray, total: np.ndarray, voxel_size=None) -> None:
    """Segment properties (inline, spec segment_properties): the voxel count ``total[i]`` of
    segment ``uniq[i]`` (the tasks' counts summed, in :func:`assemble`), voxels of the scale
    meshed (``voxel_size`` nm, named in the description when given: with ``--mip N`` they are
    that scale's voxels, not mip 0's)."""
    what = "number of voxels of the segment"
    if voxel_size is not None:
        what += " (" + "x".join(f"{float(v):g}" for v in voxel_size) + " nm voxels, the scale meshed)"
    dtype = "uint32" if len(total) == 0 or total.max() < 2**32 else "float32"
    info = {
        "@type": "neuroglancer_segment_properties",
        "inline": {
            "ids": [str(int(s)) for s in uniq],
            "properties": [{
                "id": "voxels", "type": "number", "data_type": dtype,
                "description": what,
                "values": [int(c) for c in total],
            }],
        },
    }
    # one line: indentation would nearly double a file that lists every segment
    storage.write_json(kv, "segment_properties/info", info, compact=True)


def write_source_link(kv, volume: Volume, link_source: bool, with_props: bool = False) -> None:
    """Offer the mesh to a precomputed source volume (volume spec, ``mesh`` and
    ``segment_properties``).

    Writes ``source_info.json`` into the mesh directory: the source's ``info`` with ``mesh``
    pointing here, ready to replace it.  With ``with_props`` (the mesh directory holds segment
    properties) its ``segment_properties`` points at them too, unless the source names its own:
    the client reads segment properties from the volume's ``info`` when the meshes are reached
    through its ``mesh`` (mesh spec, ``segment_properties``).  A ``segment_properties`` that
    points into the mesh directory the source named before (one an earlier link wrote) is
    replaced, or dropped when this mesh directory has none, so that it never names a
    directory that is gone or belongs to other meshes.  Only with ``link_source`` is the
    source's own ``info`` rewritten; the first link keeps the original as ``info.bak``, which
    later links leave as it is.
    """
    src = volume.precomputed
    info = dict(src["info"])
    dest_spec = kv.spec().to_json()
    src_spec = dict(src["kvstore"])
    mesh_ref = _relative_mesh_path(src_spec, dest_spec)
    linked = info.get("mesh")
    if isinstance(linked, str) and info.get("segment_properties") == linked.rstrip("/") + "/segment_properties":
        del info["segment_properties"]   # an earlier link's
    info["mesh"] = mesh_ref
    if with_props and "segment_properties" not in info:
        info["segment_properties"] = mesh_ref.rstrip("/") + "/segment_properties"
    storage.write_json(kv, "source_info.json", info)
    if link_source:
        src_kv = storage.open_kvstore(src_spec)
        old = storage.read(src_kv, "info")
        if old is not None and storage.read(src_kv, "info.bak") is None:
            storage.write(src_kv, "info.bak", old)
        storage.write_json(src_kv, "info", info)


def _relative_mesh_path(src_spec: dict, dest_spec: dict) -> str:
    """Path of the mesh directory relative to the source root when both share a driver."""
    same = {k: v for k, v in src_spec.items() if k != "path"} == {k: v for k, v in dest_spec.items() if k != "path"}
    if same:
        rel = os.path.relpath(dest_spec.get("path", "").rstrip("/") or "/", src_spec.get("path", "").rstrip("/") or "/")
        return rel
    return storage.kvstore_url(dest_spec)
