"""Validator for Neuroglancer precomputed mesh directories.

Checks what the Neuroglancer client needs, which is stricter than the spec text
(``neuroglancer-precomputed-meshes.md``):

Multi-resolution (``neuroglancer_multilod_draco``), per segment:

1. fragment positions of each LOD strictly increasing in Z-order (Morton order, x least
   significant), as ``zorder3LessThan`` in neuroglancer's ``src/mesh/draco``/``multiscale``;
2. every node of LOD ``k < num_lods - 1`` has its parent (``position >> 1``) at LOD ``k + 1``
   (the client's ``computeOctreeChildOffsets`` orphans it otherwise);
3. the sum of fragment sizes equals the length of the data file;
4. each non-empty fragment decodes with Draco as a triangle mesh whose positions are integers
   in ``[0, 2**vertex_quantization_bits)`` (the client reads Draco's quantized integers);
5. for LOD > 0 no triangle crosses the fragment's 2x2x2 grid (emulating
   ``neuroglancer_draco.cc``'s partition masks);
6. the manifest length is exact, ``num_lods >= 1``, ``lod_scales`` finite, positive and
   non-decreasing, ``chunk_shape`` finite and positive, offsets finite.

Sharded multi-resolution (``info`` ``sharding``, ``neuroglancer-sharded.md``), per shard file:
the name is ``<shard>.shard`` in ``ceil(shard_bits / 4)`` lowercase hex digits with
``shard < 2**shard_bits``; the file holds its ``2**minishard_bits * 16``-byte shard index; every
minishard index range is ordered, after the shard index and within the file, and decodes
(``minishard_index_encoding``) to ``24 * n`` bytes; every listed segment hashes to this shard
and minishard (else no reader finds it) and is listed once; its manifest range lies in the file
and decodes (``data_encoding``); its fragment data (the ``sum(fragment sizes)`` bytes before
the manifest) starts after the shard index.  Then the per-segment checks above.

Legacy (``neuroglancer_legacy_mesh`` or no info): each ``<id>:0`` manifest is JSON with a
``fragments`` list of existing files, each a valid legacy fragment (indices < num_vertices).

Segment properties (``info`` ``segment_properties``, ``neuroglancer-segment_properties.md``):
the ``info`` there is JSON of ``@type`` ``neuroglancer_segment_properties``; its inline ``ids``
are base-10 strings of uint64 IDs; each property has a unique ``id``, a known ``type`` (at most
one ``label``, ``description`` and ``tags``), one value per ID of its type (strings; numbers
within the range of the ``data_type`` a ``number`` needs; for ``tags``, increasing indices into
its ``tags``, which are strings without ``#`` or spaces, with ``tag_descriptions`` one per tag
and no ``description``); only ``tags`` properties have ``tags``.  IDs listed without a mesh
are a warning.

``info`` problems are reported and end validation. Bad meshes never raise: errors are collected.
"""

from __future__ import annotations

import json
import math
import posixpath
import re
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import Callable, Iterable, Optional

import numpy as np

from . import storage
from .errors import GpumeshError, InvalidMeshError, one_line
from .sharding import ShardFormatError
from .resources import usable_cores
from .reader import (
    LEGACY_TYPE,
    MULTIRES_TYPE,
    LegacySource,
    Manifest,
    ShardedMultiresSource,
    decode_fragment,
    is_placeholder,
    multires_info_problems,
    open_mesh,
    parse_legacy_fragment,
)

__all__ = ["ValidationReport", "validate", "zorder_less", "crossing_triangles", "missing_parents"]

MAX_STORED_ERRORS = 1000
#: Segments of a shard whose fragments decode while the one before them is recorded (validate's threads)
SEGMENTS_AHEAD = 8


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _new_lod_stats() -> dict:
    return {"fragments": 0, "empty_fragments": 0, "zero_byte_fragments": 0, "placeholders": 0, "triangles": 0,
            "bytes": 0, "segments_with_lod": 0}


@dataclass
class ValidationReport:
    """Result of :func:`validate`.

    Attributes
    ----------
    location : str
        What was validated.
    kind : str or None
        ``'multires'``, ``'legacy'`` or ``None`` when the info could not be read.
    num_segments : int
        Segments checked.
    errors : list of str
        The first ``max_errors`` violations, each naming segment / LOD / node.
    num_errors : int
        All violations found (may exceed ``len(errors)``).
    per_lod : list of dict
        Per LOD index: ``fragments`` (octree nodes), ``empty_fragments`` (nodes without
        surface: ``zero_byte_fragments`` plus, when decoded, ``placeholders``, the fragments
        that :func:`gpumesh.reader.is_placeholder` recognises), ``triangles`` (decoded, not
        counting placeholders; ``None`` with ``decode=False``), ``bytes`` (fragment bytes),
        ``segments_with_lod`` (segments whose manifest has this LOD). Legacy: one entry.
    warnings : list of str
        What the Neuroglancer client accepts but another reader does not, or what no reader
        uses (not violations): zero-byte multi-resolution fragments, which WEBKNOSSOS cannot
        decode; fragment files without a manifest; segments that the segment properties list
        but no manifest holds (a lost shard or manifest); shard bytes that nothing references
        (appended bytes; checked when the whole output is validated).
    decoded : bool
        Whether fragments were decoded (triangle counts and geometry checks).
    segments_total : int or None
        With ``sample``: the segments the directory holds, of which ``num_segments`` were
        checked; ``None`` otherwise.
    """

    location: str = ""
    kind: Optional[str] = None
    num_segments: int = 0
    errors: list = field(default_factory=list)
    num_errors: int = 0
    warnings: list = field(default_factory=list)
    per_lod: list = field(default_factory=list)
    decoded: bool = True
    max_errors: int = MAX_STORED_ERRORS
    segments_total: Optional[int] = None

    @property
    def ok(self) -> bool:
        """True when no violation was found."""
        return self.num_errors == 0

    def add_error(self, message: str) -> None:
        """Record one violation (stored only while fewer than ``max_errors`` are)."""
        self.num_errors += 1
        if len(self.errors) < self.max_errors:
            self.errors.append(message)

    def lod(self, index: int) -> dict:
        """Statistics dict of LOD ``index`` (created on demand)."""
        while len(self.per_lod) <= index:
            stats = _new_lod_stats()
            if not self.decoded:
                stats["triangles"] = None
            self.per_lod.append(stats)
        return self.per_lod[index]

    def format_table(self, errors: bool = True) -> str:
        """Plain-text summary: one row per LOD, totals, then ``OK`` or ``N violations`` (and
        the first 20 of them, unless ``errors`` is false).

        Returns
        -------
        str
        """
        header = ("LOD", "fragments", "empty", "triangles", "fragment bytes")   # Draco data, no manifests
        rows = []
        tot = [0, 0, 0, 0]
        for i, s in enumerate(self.per_lod):
            tri = s["triangles"]
            rows.append((str(i), str(s["fragments"]), str(s["empty_fragments"]), "-" if tri is None else str(tri), str(s["bytes"])))
            tot[0] += s["fragments"]
            tot[1] += s["empty_fragments"]
            tot[2] += tri or 0
            tot[3] += s["bytes"]
        rows.append(("total", str(tot[0]), str(tot[1]), str(tot[2]) if self.decoded else "-", str(tot[3])))
        widths = [max(len(r[c]) for r in rows + [header]) for c in range(len(header))]

        def line(r):
            return "  ".join(r[0].ljust(widths[0]) if c == 0 else r[c].rjust(widths[c]) for c in range(len(r)))

        checked = f"segments: {self.num_segments}"
        if self.segments_total is not None:
            checked += f" (a random sample of the {self.segments_total})"
        out = [f"kind: {self.kind or 'unknown'}   {checked}", line(header)]
        out.append("  ".join("-" * w for w in widths))
        out.extend(line(r) for r in rows[:-1])
        out.append("  ".join("-" * w for w in widths))
        out.append(line(rows[-1]))
        out.extend("warning: " + w for w in self.warnings)
        if self.ok:
            out.append("OK")
        else:
            out.append(f"{self.num_errors} violations")
            shown = self.errors[:20] if errors else []
            out.extend("  " + e for e in shown)
            if errors and self.num_errors > len(shown):
                out.append(f"  ... and {self.num_errors - len(shown)} more")
        return "\n".join(out)

    def __str__(self) -> str:  # pragma: no cover - convenience
        return self.format_table()

    def to_json(self) -> dict:
        """The report as JSON-ready values (``gpumesh validate --summary-json``): its attributes
        but ``max_errors``, and ``ok``.  ``errors`` holds the first ``max_errors`` violations;
        ``num_errors`` counts them all."""
        out = {"ok": self.ok}
        out.update((f.name, getattr(self, f.name)) for f in fields(self) if f.name != "max_errors")
        return json.loads(json.dumps(out, default=int))   # a copy; NumPy integers as ints


# --------------------------------------------------------------------------------------------
# Vectorised client rules
# --------------------------------------------------------------------------------------------


def zorder_less(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise ``a < b`` in Z-order, as neuroglancer's ``zorder3LessThan``.

    Morton order with bits interleaved, x least significant at each level (so z decides first
    among equal most significant differing bits).

    Parameters
    ----------
    a, b : numpy.ndarray, shape (n, 3), unsigned integers (x, y, z)

    Returns
    -------
    numpy.ndarray, shape (n,), bool
    """
    a = np.asarray(a, dtype=np.uint64).reshape(-1, 3)
    b = np.asarray(b, dtype=np.uint64).reshape(-1, 3)
    d = a ^ b

    def less_msb(p, q):
        return (p < q) & (p < (p ^ q))

    sel = np.full(len(a), 2, dtype=np.intp)
    cur = d[:, 2]
    m = less_msb(cur, d[:, 1])
    sel[m] = 1
    cur = np.where(m, d[:, 1], cur)
    m = less_msb(cur, d[:, 0])
    sel[m] = 0
    rows = np.arange(len(a))
    return a[rows, sel] < b[rows, sel]


def _row_view(arr: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(arr, dtype="<u4").reshape(-1, 3)).view("V12").ravel()


def missing_parents(children: np.ndarray, parents: np.ndarray) -> np.ndarray:
    """Indices of ``children`` rows whose parent (``position >> 1``) is not in ``parents``.

    Parameters
    ----------
    children : numpy.ndarray, shape (m, 3), uint32
        Node positions at LOD k.
    parents : numpy.ndarray, shape (p, 3), uint32
        Node positions at LOD k + 1.

    Returns
    -------
    numpy.ndarray, int64
    """
    if len(children) == 0:
        return np.zeros(0, np.int64)
    want = _row_view(np.asarray(children, np.uint32) >> 1)
    have = _row_view(parents)
    return np.flatnonzero(~np.isin(want, have))


_AXIS_LO = (0b01010101, 0b00110011, 0b00001111)  # octants with bit a == 0
_AXIS_HI = (0b10101010, 0b11001100, 0b11110000)  # octants with bit a == 1


def crossing_triangles(positions_q: np.ndarray, faces: np.ndarray, bits: int) -> np.ndarray:
    """Which triangles cross the 2x2x2 partition grid of a LOD > 0 fragment.

    Emulates neuroglancer's ``neuroglancer_draco.cc``: ``partition_point =
    ((2**32 - 1) >> (32 - bits)) // 2 + 1``; each vertex gets an 8-bit mask of the octants
    (index ``x + 2y + 4z``) it may belong to (coordinate below the point: only octants with
    that bit 0; above: bit 1; equal: both); a triangle whose three masks AND to 0 crosses.

    Parameters
    ----------
    positions_q : numpy.ndarray, shape (n, 3), integer
        Quantized positions, in ``[0, 2**bits)``.
    faces : numpy.ndarray, shape (m, 3), integer
    bits : int
        ``vertex_quantization_bits``.

    Returns
    -------
    numpy.ndarray, shape (m,), bool
    """
    pp = ((2**32 - 1) >> (32 - bits)) // 2 + 1
    v = np.asarray(positions_q, dtype=np.int64).reshape(-1, 3)
    mask = np.full(len(v), 0xFF, dtype=np.uint8)
    for a in range(3):
        col = v[:, a]
        mask &= np.where(col < pp, _AXIS_LO[a], np.where(col > pp, _AXIS_HI[a], 0xFF)).astype(np.uint8)
    f = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    tri = mask[f[:, 0]] & mask[f[:, 1]] & mask[f[:, 2]]
    return tri == 0


# --------------------------------------------------------------------------------------------
# Segment checks
# --------------------------------------------------------------------------------------------


def _check_manifest_values(report: ValidationReport, seg: int, m: Manifest) -> bool:
    """Header value checks; returns False when the manifest is unusable."""
    ok = True
    if m.num_lods < 1:
        report.add_error(f"segment {seg}: num_lods is {m.num_lods}, must be >= 1")
        return False
    if not (np.all(np.isfinite(m.chunk_shape)) and np.all(m.chunk_shape > 0)):
        report.add_error(f"segment {seg}: chunk_shape {m.chunk_shape.tolist()} must be finite and positive")
        ok = False
    if not np.all(np.isfinite(m.grid_origin)):
        report.add_error(f"segment {seg}: grid_origin {m.grid_origin.tolist()} is not finite")
        ok = False
    if not np.all(np.isfinite(m.vertex_offsets)):
        report.add_error(f"segment {seg}: vertex_offsets are not finite")
        ok = False
    scales = m.lod_scales
    if not (np.all(np.isfinite(scales)) and np.all(scales > 0)):
        report.add_error(f"segment {seg}: lod_scales {scales.tolist()} must be finite and positive")
        ok = False
    elif np.any(np.diff(scales) < 0):
        report.add_error(f"segment {seg}: lod_scales {scales.tolist()} must be non-decreasing")
        ok = False
    return ok


def _check_octree(report: ValidationReport, seg: int, m: Manifest) -> None:
    for lod, pos in enumerate(m.fragment_positions):
        if len(pos) > 1:
            bad = np.flatnonzero(~zorder_less(pos[:-1], pos[1:]))
            for i in bad[:5].tolist():
                report.add_error(
                    f"segment {seg} lod {lod} node {i + 1}: position {pos[i + 1].tolist()} does not follow "
                    f"{pos[i].tolist()} in Z-order (must be strictly increasing)"
                )
            if len(bad) > 5:
                report.add_error(f"segment {seg} lod {lod}: {len(bad) - 5} more Z-order violations")
        if lod + 1 < m.num_lods:
            miss = missing_parents(pos, m.fragment_positions[lod + 1])
            for i in miss[:5].tolist():
                report.add_error(
                    f"segment {seg} lod {lod} node {i} {pos[i].tolist()}: parent {(pos[i] >> 1).tolist()} "
                    f"missing at lod {lod + 1}"
                )
            if len(miss) > 5:
                report.add_error(f"segment {seg} lod {lod}: {len(miss) - 5} more nodes without parent")


class _Held:
    """The errors of a segment's first checks, held until its fragments are checked (its LOD
    counts go to the report at once): the report then lists them in the same order whether or
    not the next segment's checks have begun."""

    def __init__(self, report: ValidationReport):
        self.report, self.errors = report, []

    def add_error(self, message: str) -> None:
        self.errors.append(message)

    def lod(self, index: int) -> dict:
        return self.report.lod(index)


def _start_multires_segment(
    report: ValidationReport, seg: int, mbytes: Optional[bytes], data: Optional[bytes], bits: int,
    decode: Optional["_Decoder"], data_error: Optional[str] = None,
) -> Callable[[], None]:
    """Check a segment's manifest, octree and data size, and start decoding its fragments on
    ``decode``'s threads; returns the function that records all of it in ``report``, in order,
    once the fragments are decoded (so that the next segment's can begin meanwhile)."""
    held = _Held(report)
    checked = iter(())
    # reads that failed (UnshardedMultiresSource.fetch): the segment is not checked
    unread = [f"segment {seg}: its {what} cannot be read ({got})"
              for got, what in ((mbytes, f"manifest {seg}.index"), (data, f"fragment data file {seg}"))
              if isinstance(got, BaseException)]
    try:
        for message in unread:
            held.add_error(message)
        frags = [] if unread else _first_checks(held, seg, mbytes, data, decode, data_error)
        if frags:   # (only where decode is given)
            checked = decode([(blob, bits, lod) for lod, _, blob in frags if blob is not None])
    except Exception as exc:   # never raise on a bad mesh; in a shard, the segments after it are checked
        held.add_error(_unexpected(seg, exc))
        frags = []

    def finish() -> None:
        for message in held.errors:
            report.add_error(message)
        for lod, where, blob in frags:
            if blob is None:
                report.add_error(where)
                continue
            result = next(checked)
            if isinstance(result, str):
                report.add_error(f"{where}: {result}")
                continue
            placeholder, triangles, crossing = result
            st = report.lod(lod)
            if placeholder:
                st["placeholders"] += 1
                st["empty_fragments"] += 1
            else:
                st["triangles"] += triangles
            if crossing:
                report.add_error(f"{where}: {crossing} of {triangles} triangles cross the 2x2x2 partition grid")

    return finish


def _first_checks(report, seg: int, mbytes: Optional[bytes], data: Optional[bytes], decode: Optional["_Decoder"],
                  data_error: Optional[str]) -> list:
    """A segment's checks before its fragments are decoded, into ``report`` (a :class:`_Held`);
    returns its fragments to decode, ``(lod, where, bytes)`` in the manifest's order (bytes
    ``None``, and the error in ``where``, for one that lies past the end of the data)."""
    if mbytes is None:
        report.add_error(f"segment {seg}: manifest {seg}.index not found")
        return []
    try:
        m = Manifest.from_bytes(mbytes)
    except InvalidMeshError as exc:
        report.add_error(f"segment {seg}: {exc}")
        return []
    for lod in range(m.num_lods):
        st = report.lod(lod)
        st["segments_with_lod"] += 1
        st["fragments"] += len(m.fragment_sizes[lod])
        zero = int(np.count_nonzero(m.fragment_sizes[lod] == 0))
        st["empty_fragments"] += zero
        st["zero_byte_fragments"] += zero
        st["bytes"] += int(m.fragment_sizes[lod].sum())
    if not _check_manifest_values(report, seg, m):
        return []
    _check_octree(report, seg, m)

    total = m.total_bytes
    if data is None:
        if total:
            report.add_error(data_error or f"segment {seg}: fragment data file {seg} missing ({total} bytes expected)")
            if data_error:
                return []
        data = b""
    elif len(data) != total:
        report.add_error(f"segment {seg}: data file has {len(data)} bytes, fragment sizes sum to {total}")
    if not decode:
        return []
    frags = []
    for lod, ranges in enumerate(m.fragment_byte_ranges()):
        for i, (start, stop) in enumerate(ranges.tolist()):
            if stop == start:
                continue
            where = f"segment {seg} lod {lod} node {i} {m.fragment_positions[lod][i].tolist()}"
            if stop > len(data):
                frags.append((lod, f"{where}: fragment bytes [{start}, {stop}) beyond end of data file", None))
            else:
                frags.append((lod, where, data[start:stop]))
    return frags


def _check_fragment(job: tuple):
    """Decode one multi-resolution fragment ``(bytes, bits, lod)`` as the client does; returns
    ``(placeholder, triangles, triangles crossing the 2x2x2 grid)`` (crossings: LOD > 0), or
    the error (str) that says why it does not decode, an unexpected failure (a bug, memory
    running out) included: it is that fragment's error, not its segment's or shard's end."""
    blob, bits, lod = job
    try:
        q, f = decode_fragment(blob, bits, check_identity=True)
        crossing = int(np.count_nonzero(crossing_triangles(q, f, bits))) if lod > 0 and len(f) else 0
        return is_placeholder(q, f), len(f), crossing
    except InvalidMeshError as exc:
        return str(exc)
    except Exception as exc:   # never raise on a bad mesh
        return f"unexpected error while checking it: {exc!r}"


class _Decoder:
    """Checks fragments (:func:`_check_fragment`, or legacy ones: :func:`_check_legacy_fragment`)
    on ``threads`` threads: Draco's decoder releases the GIL, so the cores decode a segment's
    fragments side by side.  Calling it with a list of jobs gives an iterator of their results
    in the same order, so the report is the same whatever the threads."""

    def __init__(self, threads: int):
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="gpumesh-validate") if threads > 1 else None

    def __call__(self, jobs: list, check: Optional[Callable] = None):
        check = check or _check_fragment
        if self.pool is None:
            return map(check, jobs)
        return self.pool.map(check, jobs)

    def close(self) -> None:
        """End the threads; what is queued is not decoded (after an interrupt: up to
        ``SEGMENTS_AHEAD`` segments' fragments that nobody will record)."""
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


class _InOrder:
    """A shard's errors in the order of its segments, while each segment's fragments decode
    during the checks of the next (:func:`_start_multires_segment`): the segment before is
    recorded before anything that comes after it."""

    def __init__(self, report: ValidationReport, ahead: int = 1):
        self.report, self.ahead, self.pending = report, ahead, deque()

    def flush(self, keep: int = 0) -> None:
        while len(self.pending) > keep:
            self.pending.popleft()()

    def then(self, finish: Callable[[], None]) -> None:
        self.pending.append(finish)
        self.flush(self.ahead)

    def add_error(self, message: str) -> None:
        self.flush()
        self.report.add_error(message)

    def __enter__(self) -> "_InOrder":
        return self

    def __exit__(self, kind, exc, tb) -> None:
        """Record the segments held, at the end or before an unexpected error is reported (not
        after an interrupt: they are not waited for)."""
        if kind is None or issubclass(kind, Exception):
            self.flush()


def _ahead(decode: Optional["_Decoder"]) -> int:
    """Segments whose fragments decode while the next ones are read and checked: none without
    threads (or decoding)."""
    return SEGMENTS_AHEAD if decode is not None and decode.pool is not None else 0


def _unexpected(seg: int, exc: BaseException) -> str:
    """The error of a segment whose checks failed unexpectedly (a bug, memory running out):
    that segment's, never the end of the validation."""
    return f"segment {seg}: unexpected error while checking: {exc!r}"


def _guarded(report: ValidationReport, seg: int, finish: Callable[[], None]) -> Callable[[], None]:
    """``finish`` (a segment's recording), where an unexpected failure is that segment's error."""
    def run() -> None:
        try:
            finish()
        except Exception as exc:  # never raise on a bad mesh
            report.add_error(_unexpected(seg, exc))
    return run


def _check_shard(report: ValidationReport, src: ShardedMultiresSource, shard: int, blob: bytes,
                 wanted: Optional[set], seen: set, decode: Optional["_Decoder"]) -> None:
    """Check one whole shard file and its segments, counting each in ``report.num_segments``
    as it is reached (so that an unexpected failure of the shard keeps the count of those
    before it: they are recorded, :class:`_InOrder`)."""
    spec = src.sharding
    name = spec.shard_key(shard)
    n, ib = len(blob), spec.shard_index_bytes
    if n < ib:
        report.add_error(f"shard {name}: {n} bytes, shorter than its shard index "
                         f"({ib} bytes = 16 * 2**minishard_bits)")
        return
    unsure = False
    # the segments before, their fragments decoding, recorded before what follows
    ordered = _InOrder(report, _ahead(decode))
    spans = [(0, ib)]   # the bytes that something references: index, minishard indices, segments
    with ordered:   # an unexpected error (_validate_sharded) after the segments before it
        for ms, (start, end) in enumerate(spec.decode_shard_index(blob).tolist()):
            where = f"shard {name} minishard {ms}"
            if end < start:
                ordered.add_error(f"{where}: minishard index range [{start}, {end}) is inverted")
                continue
            if end == start:
                continue
            if start < ib or end > n:
                ordered.add_error(f"{where}: minishard index range [{start}, {end}) outside [{ib}, {n}) "
                                  "(after the shard index, within the file)")
                continue
            spans.append((start, end))
            try:
                ids, starts, sizes = spec.decode_minishard_index(blob[start:end])
            except ShardFormatError as exc:
                ordered.add_error(f"{where}: {exc}")
                continue
            if not len(ids):
                ordered.add_error(f"{where}: empty minishard index under a non-empty range")
            shards, minishards = spec.locate(ids)
            for i, seg in enumerate(ids.tolist()):
                if shards[i] != shard or minishards[i] != ms:
                    ordered.add_error(
                        f"segment {seg}: stored in {where}, but its ID hashes to shard "
                        f"{spec.shard_key(int(shards[i]))} minishard {int(minishards[i])}, so readers cannot find it")
                    continue
                if seg in seen:
                    ordered.add_error(f"segment {seg}: listed more than once in {where}")
                    continue
                seen.add(seg)
                if wanted is not None and seg not in wanted:
                    continue
                report.num_segments += 1
                try:
                    finish = _start_shard_segment(ordered, src, name, blob, seg, int(starts[i]), int(sizes[i]), spans,
                                                  decode)
                except Exception as exc:  # never raise on a bad mesh: the shard's other segments are checked
                    ordered.add_error(_unexpected(seg, exc))
                    unsure = True   # its bytes (spans) may not be known
                    continue
                if finish is not None:   # its fragments decode while the one before is recorded
                    ordered.then(_guarded(report, seg, finish))
    if wanted is None and not unsure:
        loose = n - _covered(spans)
        if loose:
            report.warnings.append(f"shard {name}: {loose} of its {n} bytes are referenced by nothing (bytes "
                                   "appended, or left by another writer)")


def _start_shard_segment(ordered: _InOrder, src: ShardedMultiresSource, name: str, blob: bytes, seg: int,
                         c0: int, size: int, spans: list, decode: Optional["_Decoder"]) -> Optional[Callable[[], None]]:
    """Find a segment of the shard ``name`` (``blob``) whose encoded manifest is the ``size``
    bytes at ``c0``, add the bytes it references to ``spans`` and start its checks
    (:func:`_start_multires_segment`); returns the function that records them, or ``None``
    when its manifest cannot be found (the error is in ``ordered``)."""
    spec = src.sharding
    n, ib = len(blob), spec.shard_index_bytes
    c1 = c0 + size
    if c0 < ib or c1 > n:
        ordered.add_error(f"segment {seg}: manifest bytes [{c0}, {c1}) outside [{ib}, {n}) of shard {name}")
        return None
    try:
        mbytes = spec.decode_data(blob[c0:c1])
    except ShardFormatError as exc:
        ordered.add_error(f"segment {seg}: manifest in shard {name}: {exc}")
        return None
    try:
        total = Manifest.from_bytes(mbytes).total_bytes
    except InvalidMeshError:
        total = 0  # reported by the segment check
    spans.append((max(c0 - total, 0), c1))
    data, data_error = blob[c0 - total:c0], None
    if c0 - total < ib:
        data = None
        data_error = (f"segment {seg}: its {total} bytes of fragment data before the manifest at {c0} "
                      f"would start inside the shard index of {name} ({ib} bytes)")
    return _start_multires_segment(ordered.report, seg, mbytes, data, src.vertex_quantization_bits, decode, data_error)


def _covered(spans: list) -> int:
    """Bytes in the union of the ``[start, end)`` spans."""
    total, reach = 0, 0
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def _validate_sharded(report: ValidationReport, src: ShardedMultiresSource, segments: Optional[Iterable[int]],
                      decode: Optional["_Decoder"], absent: Optional[list] = None) -> Optional[set]:
    """Check every shard (or those of ``segments``, read by name: a store that cannot list its
    keys, such as plain HTTP, still serves them); return the IDs found in the shards read, or
    ``None`` when a shard failed unexpectedly (the IDs in the part not checked are unknown).  A
    segment of ``segments`` not found is an error, or goes into ``absent`` when given; one in
    a shard that failed unexpectedly before reaching it is named in that shard's error."""
    spec = src.sharding
    wanted = None
    if segments is not None:
        wanted = {int(s) for s in segments}
        keys = []
    else:
        try:
            keys = storage.list_keys(src.kv)
        except Exception as exc:
            report.add_error(f"cannot list keys: {exc}")
            return set()
    in_shard: dict = {}   # shard -> the wanted IDs that hash to it
    for s, shard in zip(sorted(wanted or ()), spec.locate(sorted(wanted))[0].tolist() if wanted else ()):
        in_shard.setdefault(shard, []).append(s)
    shards = sorted(in_shard)
    for key in keys:
        if key.endswith(".shard"):
            shard = spec.parse_shard_key(key)
            if shard is None:
                report.add_error(f"unexpected shard file {key!r}: with shard_bits {spec.shard_bits} shard files are "
                                 f"{spec.shard_key(0)!r} .. {spec.shard_key(spec.num_shards - 1)!r}")
            else:
                shards.append(shard)
    seen: set = set()
    unchecked: set = set()   # wanted IDs in shards that failed unexpectedly before reaching them
    failed = False
    for shard in shards:
        try:
            blob = storage.read(src.kv, spec.shard_key(shard))
        except Exception as exc:   # an I/O error, a permission refused: the other shards are checked
            failed = True
            unchecked.update(in_shard.get(shard, ()))
            report.add_error(f"shard {spec.shard_key(shard)} cannot be read ({exc}): its segments are not checked")
            continue
        if blob is None:
            if wanted is None:
                report.add_error(f"shard {spec.shard_key(shard)} vanished while validating")
            continue   # the wanted segments in it are "not found" below
        try:
            _check_shard(report, src, shard, blob, wanted, seen, decode)
        except Exception as exc:  # never raise on a bad mesh
            failed = True
            left = "its segments after that point are not checked"
            if wanted is not None:   # name those asked for (not "not found" below: they may be there)
                missed = [s for s in in_shard.get(shard, ()) if s not in seen]
                unchecked.update(missed)
                left = missed and (f"{len(missed)} of the segments asked for in it are not checked: "
                                   + ", ".join(map(str, missed[:5])) + (" ..." if len(missed) > 5 else ""))
            report.add_error(f"shard {spec.shard_key(shard)}: unexpected error while checking: {exc!r}"
                             + (f" ({left})" if left else ""))
    for s in sorted(wanted or ()):
        if s not in seen and s not in unchecked:
            _not_found(report, s, absent)
    return None if failed else seen


def _not_found(report: ValidationReport, segment: int, absent: Optional[list], error: str = "") -> None:
    """A segment that was asked for is not there: an error (``error``, or "segment N not
    found"), or noted in ``absent`` (segments that only the segment properties name, which may
    list segments without a mesh)."""
    if absent is None:
        report.add_error(error or f"segment {segment} not found")
    else:
        absent.append(segment)


def _validate_sharded_sample(report: ValidationReport, src: ShardedMultiresSource, ids: list,
                             decode: Optional["_Decoder"], absent: Optional[list] = None) -> None:
    """Check the segments ``ids`` (drawn from those the minishard indices list, or with
    ``absent`` from those the segment properties name) as a reader finds them: through the
    shard and minishard their ID hashes to, reading their manifest and fragment data by byte
    range, not their shards whole."""
    with _InOrder(report, _ahead(decode)) as ordered:   # a segment's fragments decode during the next one's reads
        for seg in ids:
            try:
                mbytes = src.manifest_bytes(seg)
                data = src.fragment_data(seg) if mbytes is not None else None
            except Exception as exc:  # never raise on a bad mesh
                ordered.add_error(f"segment {seg}: cannot be read from its shard: {exc}")
                continue
            if mbytes is None:
                _not_found(ordered, seg, absent, f"segment {seg}: listed in a minishard index, but not in the shard "
                                                 "and minishard its ID hashes to, so no reader finds it")
                continue
            ordered.then(_guarded(report, seg, _start_multires_segment(report, seg, mbytes, data,
                                                                       src.vertex_quantization_bits, decode)))
    report.num_segments = len(ids) - len(absent or ())


def _start_legacy_segment(report: ValidationReport, src: LegacySource, seg: int,
                          decode: Optional["_Decoder"], manifest) -> Callable[[], None]:
    """Check a legacy segment's ``manifest`` (as :meth:`LegacySource.manifests` gives it) and
    start reading and parsing its fragment files (on ``decode``'s threads, where given:
    :func:`_check_legacy_fragment`); returns the function that records all of it in
    ``report``, in order, as :func:`_start_multires_segment` does (so the next segments' can
    begin meanwhile).  Without ``decode`` the fragments are still parsed, but their triangles
    are not counted."""
    names, error, checked = None, None, iter(())
    try:
        if isinstance(manifest, BaseException):   # its read failed
            raise manifest
        names = src.fragment_names(seg, manifest)
    except InvalidMeshError as exc:
        error = str(exc)
    except Exception as exc:   # never raise on a bad mesh
        error = _unexpected(seg, exc)
    if names is not None:
        try:
            jobs = [(seg, name, src.kv.read(name)) for name in names]
            checked = decode(jobs, _check_legacy_fragment) if decode is not None else map(_check_legacy_fragment, jobs)
        except Exception as exc:   # never raise on a bad mesh
            error = _unexpected(seg, exc)

    def finish() -> None:
        if names is not None:
            st = report.lod(0)
            st["segments_with_lod"] += 1
        if error is not None:
            report.add_error(error)
            return
        for nbytes, faces, problem in checked:
            st["fragments"] += 1
            st["bytes"] += nbytes
            if isinstance(problem, Exception):   # the segment's other fragments are not checked
                report.add_error(_unexpected(seg, problem))
                return
            if problem is not None:
                report.add_error(problem)
                continue
            if faces == 0:
                st["empty_fragments"] += 1
            if decode:
                st["triangles"] += faces

    return finish


def _check_legacy_fragment(job: tuple):
    """Read and parse one legacy fragment ``(segment, name, read future)``; returns ``(bytes
    read, triangles, problem)``: ``problem`` is ``None``, the error (str) that says why the
    fragment is unreadable, missing or invalid, or an unexpected exception (a bug), which
    ends its segment's checks (:func:`_start_legacy_segment`)."""
    seg, name, future = job
    try:
        data = storage.read_result(future)
    except Exception as exc:  # bad key names
        return 0, 0, f"segment {seg}: fragment {name!r} unreadable: {exc}"
    if data is None:
        return 0, 0, f"segment {seg}: fragment file {name!r} missing"
    try:
        _, faces = parse_legacy_fragment(data)
    except InvalidMeshError as exc:
        return len(data), 0, f"segment {seg}: fragment {name!r}: {exc}"
    except Exception as exc:  # never raise on a bad mesh
        return len(data), 0, exc
    return len(data), len(faces), None


def _check_orphans(report: ValidationReport, src, keys: list, ids: set) -> None:
    """Warn about fragment files that no manifest can reach: ``<id>`` data files without
    ``<id>.index`` (multi-resolution) or ``<id>:0:...`` fragments without ``<id>:0`` (legacy),
    e.g. left behind by a deleted or lost manifest."""
    pattern = re.compile(r"^(\d+)$" if src.kind == "multires" else r"^(\d+):0:.+$")
    orphans = sorted({int(m.group(1)) for m in map(pattern.match, keys) if m} - ids)
    if orphans:
        what = "fragment data files" if src.kind == "multires" else "segments' fragment files"
        manifest = "<id>.index" if src.kind == "multires" else "<id>:0"
        shown = ", ".join(str(i) for i in orphans[:5]) + (" ..." if len(orphans) > 5 else "")
        report.warnings.append(f"{len(orphans)} {what} without a manifest ({manifest}): segments {shown}")


_UINT64_DECIMAL = re.compile(r"[0-9]+")

#: ``data_type`` of a ``number`` property (spec segment_properties) -> its integer range
#: (None: float32, any finite number).
_NUMBER_TYPES = {"uint8": (0, 2**8 - 1), "int8": (-2**7, 2**7 - 1), "uint16": (0, 2**16 - 1),
                 "int16": (-2**15, 2**15 - 1), "uint32": (0, 2**32 - 1), "int32": (-2**31, 2**31 - 1),
                 "float32": None}


def _property_problems(p: dict, num_ids: int) -> list[str]:
    """What breaks the spec (segment_properties, inline properties) in one property object,
    each as the end of a sentence; only a value's first offence is named."""
    ptype, values = p.get("type"), p.get("values")
    if ptype not in ("label", "description", "string", "tags", "number"):
        return [f"has bad type {ptype!r}"]
    out = []
    if "description" in p and (ptype == "tags" or not isinstance(p["description"], str)):
        out.append("has a description, which must be a string and is not allowed on a 'tags' property")
    tags = p.get("tags")
    if ptype == "tags":
        if not (isinstance(tags, list) and all(isinstance(t, str) and t and not t.startswith("#") and " " not in t
                                               for t in tags)):
            out.append("needs 'tags', a list of tag strings without a leading '#' or spaces")
            tags = None
        descriptions = p.get("tag_descriptions")
        if descriptions is not None and tags is not None and not (
                isinstance(descriptions, list) and len(descriptions) == len(tags)
                and all(isinstance(d, str) for d in descriptions)):
            out.append("has tag_descriptions that are not one string per tag")
    elif "tags" in p or "tag_descriptions" in p:
        out.append("has tags or tag_descriptions, which only a 'tags' property may have")
    if ptype == "number" and p.get("data_type") not in _NUMBER_TYPES:
        out.append("needs a valid data_type")
        return out
    if not isinstance(values, list) or len(values) != num_ids:
        out.append(f"needs {num_ids} values")
        return out
    for i, v in enumerate(values):
        if ptype == "number":
            span = _NUMBER_TYPES[p["data_type"]]
            if isinstance(v, bool) or not isinstance(v, (int, float)) \
                    or (isinstance(v, float) and not math.isfinite(v)):   # a JSON integer may be huge
                bad = "is not a finite number"
            elif span is not None and not span[0] <= v <= span[1]:
                bad = f"is outside {p['data_type']}'s range"
            elif span is None and abs(v) > float(np.finfo(np.float32).max):
                bad = "is beyond float32's range"
            else:
                continue
        elif ptype == "tags":
            if (isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)
                    and all(a < b for a, b in zip(v, v[1:]))
                    and (tags is None or all(0 <= t < len(tags) for t in v))):
                continue
            bad = "is not a list of increasing indices into tags"
        elif isinstance(v, str):
            continue
        else:
            bad = "is not a string"
        shown = repr(v)
        out.append(f"value {i} ({shown if len(shown) <= 40 else shown[:37] + '...'}) {bad}")
        break
    return out


def _check_segment_properties(report: ValidationReport, kv, info: dict, meshed: Optional[set] = None,
                              raw: Optional[bytes] = None) -> None:
    """Check the segment properties the info names (spec segment_properties); with ``meshed``
    (every segment ID that has a mesh), warn about listed IDs without one.  ``raw``: their
    ``info`` as already read (:func:`_segment_property_ids`), else it is read here."""
    try:
        _check_segment_properties_file(report, kv, info, meshed, raw)
    except Exception as exc:  # never raise on a bad mesh
        report.add_error(f"segment properties: unexpected error while checking: {exc!r}")


def _resolve(kv, rel: str):
    """The kvstore of the directory ``rel`` names relative to ``kv``'s, as the client resolves
    it (``..`` steps up; a URL stands alone)."""
    if "://" in rel:
        return storage.open_kvstore(rel)
    spec = storage.kvstore_spec(kv)
    base = spec.get("path", "")
    path = posixpath.normpath(posixpath.join(base or ".", rel.strip("/")))
    if path == ".":
        path = ""
    return storage.open_kvstore(dict(spec, path=path), check=False)


def _segment_property_ids(kv, info: dict) -> tuple[list, Optional[bytes]]:
    """The segment IDs of the inline segment properties the info names (sorted), or ``[]``
    when there are none or they cannot be read (:func:`_check_segment_properties` says why),
    and their ``info`` as read (``None`` when it was not)."""
    raw = None
    try:
        raw = storage.read(_resolve(kv, info.get("segment_properties")), "info")
        ids = json.loads(raw)["inline"]["ids"]
        return sorted({int(i) for i in ids if isinstance(i, str) and _UINT64_DECIMAL.fullmatch(i) and int(i) < 2**64}), raw
    except Exception:   # none named, unreadable or malformed
        return [], raw


def _check_segment_properties_file(report: ValidationReport, kv, info: dict, meshed: Optional[set],
                                   raw: Optional[bytes] = None) -> None:
    rel = info.get("segment_properties")
    if not isinstance(rel, str):
        return
    key = rel.strip("/") + "/info"
    if raw is None:
        try:
            raw = storage.read(_resolve(kv, rel), "info")
        except (ValueError, OSError) as exc:   # TensorStore's errors are ValueErrors
            report.add_error(f"segment properties {key}: cannot read it: {exc}")
            return
    if raw is None:
        report.add_error(f"segment properties {key} not found")
        return
    try:
        sp = json.loads(raw)
    except ValueError as exc:
        report.add_error(f"segment properties {key}: not valid JSON: {exc}")
        return
    if not isinstance(sp, dict) or sp.get("@type") != "neuroglancer_segment_properties":
        report.add_error(f"segment properties {key}: @type must be 'neuroglancer_segment_properties'")
        return
    inline = sp.get("inline")
    if inline is None:
        return
    ids = inline.get("ids") if isinstance(inline, dict) else None
    if not isinstance(ids, list) or not all(isinstance(i, str) and _UINT64_DECIMAL.fullmatch(i) and int(i) < 2**64
                                            for i in ids):
        report.add_error(f"segment properties {key}: inline.ids must be a list of base-10 strings of uint64 IDs")
        return
    props = inline.get("properties")
    if not isinstance(props, list):
        report.add_error(f"segment properties {key}: inline.properties must be a list")
        return
    seen = set()
    for p in props:
        if not isinstance(p, dict):
            report.add_error(f"segment properties {key}: a property is not an object")
            continue
        pid = p.get("id")
        if not isinstance(pid, str) or pid in seen:
            report.add_error(f"segment properties {key}: property id {pid!r} missing or not unique")
        seen.add(pid)
        for problem in _property_problems(p, len(ids)):
            report.add_error(f"segment properties {key}: property {pid!r} {problem}")
    types = [p.get("type") for p in props if isinstance(p, dict)]
    for t in ("label", "description", "tags"):
        if types.count(t) > 1:
            report.add_error(f"segment properties {key}: more than one {t!r} property")
    if meshed is not None:
        # Not a violation (properties may list segments without meshes), but gpumesh meshes
        # every segment it lists: a lost shard or manifest shows here.
        missing = sorted({int(i) for i in ids} - meshed)
        if missing:
            shown = ", ".join(str(i) for i in missing[:5]) + (" ..." if len(missing) > 5 else "")
            report.warnings.append(f"{len(missing)} segments listed in {key} have no mesh (a lost shard or "
                                   f"manifest?): segments {shown}")


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def validate(
    location,
    *,
    segments: Optional[Iterable[int]] = None,
    sample: Optional[int] = None,
    seed: int = 0,
    decode: bool = True,
    max_errors: int = MAX_STORED_ERRORS,
    threads: Optional[int] = None,
) -> ValidationReport:
    """Validate a precomputed mesh directory against the Neuroglancer client's rules.

    Parameters
    ----------
    location : str, os.PathLike, dict or tensorstore.KvStore
        The mesh directory (holding ``info``): path, kvstore URL or spec.
    segments : iterable of int, optional
        Only these segments (each must exist); default all.  They are read by name, so a
        store that cannot list its keys (plain HTTP) can be checked this way.
    sample : int, optional
        Only this many segments, drawn at random (``seed``) from those the directory holds
        (all of them when it holds fewer): a spot check of a large output.  Listing the
        segments reads the manifests' names (unsharded, legacy) or every shard's index and
        minishard indices (sharded); then only the sample's manifests and fragments are read
        (sharded: by byte range, through the shard and minishard each ID hashes to, as a
        reader finds them; the shards' own layout is not checked).  As with ``segments``, the
        checks that need every segment (fragment files no manifest reaches, segment
        properties without a mesh, unreferenced shard bytes) are left out.
    seed : int, default 0
        Seed of the sample.
    decode : bool, default True
        Decode fragments (Draco or legacy) to check geometry and count triangles. Without it
        only manifests, octrees and sizes are checked.
    max_errors : int, default 1000
        Store at most this many error messages (all are counted in ``num_errors``).
    threads : int, optional
        Threads that decode fragments (legacy ones: read and parse; default: one per core this
        process may use); the report is the same whatever their number.

    Returns
    -------
    ValidationReport
        Never raises on a bad mesh; problems are in ``report.errors``. An unreadable or
        invalid ``info`` (a bad ``sharding`` spec included) is reported and ends validation.
    """
    if sample is not None and segments is not None:
        raise ValueError("give segments or sample, not both")
    if sample is not None and (isinstance(sample, bool) or int(sample) < 1):
        raise ValueError(f"sample must be a number of segments >= 1, got {sample!r}")
    if threads is None:
        threads = usable_cores()
    elif isinstance(threads, bool) or int(threads) < 1:
        raise ValueError(f"threads must be >= 1, got {threads!r}")
    report = ValidationReport(location=str(location), decoded=decode, max_errors=max_errors)
    decoder = _Decoder(int(threads)) if decode else None
    try:
        _validate(report, location, segments, decoder, None if sample is None else (int(sample), int(seed)))
    finally:
        if decoder is not None:
            decoder.close()
    zero = sum(s["zero_byte_fragments"] for s in report.per_lod)
    if report.kind == "multires" and zero:
        report.warnings.append(
            f"{zero} zero-byte fragments: Neuroglancer reads them, but WEBKNOSSOS cannot decode them and "
            "warns that some mesh chunks could not be loaded (docs/webknossos.md); gpumesh writes a "
            "placeholder fragment instead")
    return report


def _warn_scratch(report: ValidationReport, kv, info) -> None:
    """A warning when the directory holds gpumesh's scratch area: a run that has not finished
    there (stopped, or running now), whose files a reader does not need."""
    try:
        scratch = storage.list_keys(kv, storage.SCRATCH)
    except Exception:   # a store that cannot list (plain HTTP): nothing to say
        return
    if scratch and info and storage.SCRATCH + "plan.json" not in scratch:
        # no run to resume (--resume refuses a finished mesh without a plan): task results that
        # a part (--part) wrote after the job's output was written and its scratch area deleted
        report.warnings.append(f"{storage.SCRATCH} holds {len(scratch):,} file(s) left by a gpumesh run after the mesh "
                               f"was finished (a --part that ran on past the --resume that wrote the output; no "
                               f"plan.json: nothing resumes them): the mesh does not need them, delete "
                               f"{storage.SCRATCH}")
    elif scratch:
        state = ("the mesh's info is there: the run was stopped while removing them" if info else
                 "no info: the mesh is not finished")
        report.warnings.append(f"{storage.SCRATCH} holds {len(scratch):,} file(s) of a gpumesh run that has not finished "
                               f"(stopped, or running now; {state}): gpumesh mesh --resume with that run's "
                               f"options finishes it")


def _validate(report: ValidationReport, location, segments, decode: Optional["_Decoder"],
              sample=None) -> ValidationReport:
    try:
        kv = storage.open_kvstore(location)
        raw_info = storage.read(kv, "info")
    except Exception as exc:
        report.add_error(f"cannot open {location!r}: {exc}")
        return report
    info = None
    if raw_info is not None:
        try:
            info = json.loads(raw_info)
        except ValueError as exc:
            report.add_error(f"info is not valid JSON: {exc}")
            return report
        if isinstance(info, dict) and info.get("@type") == MULTIRES_TYPE:
            problems = multires_info_problems(info)
            if problems:
                for p in problems:
                    report.add_error(p)
                return report
        elif not (isinstance(info, dict) and info.get("@type") == LEGACY_TYPE):
            t = info.get("@type") if isinstance(info, dict) else None
            report.add_error(f"info @type is {t!r}: expected {MULTIRES_TYPE!r} or {LEGACY_TYPE!r}")
            return report
    try:
        src = open_mesh(kv)
    except GpumeshError as exc:
        report.add_error(str(exc))
        return report
    report.kind = src.kind
    _warn_scratch(report, kv, info)
    listed = None   # every segment ID, when the sample needed them listed
    absent = None   # segments the segment properties name that have no mesh, when they stand in for a listing
    props = None    # the segment properties' info, when read for that
    if segments is None and info:
        try:
            storage.list_keys(kv, "info")
        except Exception as exc:   # plain HTTP: the segments the segment properties name, by name
            listed, props = _segment_property_ids(kv, info)
            if not listed:
                report.add_error(f"cannot list the keys of {location!r} ({one_line(exc)}): give the segments to check "
                                 f"(--segments; Python: segments=)")
                return report
            what = (f"sampled {min(sample[0], len(listed))} of the {len(listed)}" if sample is not None
                    else f"checked the {len(listed)}")
            report.warnings.append(
                f"{location!r} cannot list its keys ({one_line(exc)}): {what} segments that its segment properties "
                f"name, read by name; files that no manifest reaches, and shards' own layout, are not checked")
            absent = []
            if sample is None:
                segments = listed
    if sample is not None:
        try:
            listed = src.segment_ids() if listed is None else listed
        except Exception as exc:
            report.add_error(f"cannot list the segments: {exc}")
            return report
        count, seed = sample
        rng = np.random.default_rng(seed)
        segments = sorted(int(v) for v in rng.choice(np.asarray(listed, dtype=np.uint64), min(count, len(listed)),
                                                      replace=False)) if listed else []
        report.segments_total = len(listed)
    if isinstance(src, ShardedMultiresSource) and sample is not None:   # the sample's bytes, not whole shards
        _validate_sharded_sample(report, src, segments, decode, absent)
        return _warn_absent(report, absent)
    if isinstance(src, ShardedMultiresSource):
        found = _validate_sharded(report, src, segments, decode, absent)
        if info:
            _check_segment_properties(report, kv, info, found if segments is None else None, props)
        return _warn_absent(report, absent)

    if segments is not None and raw_info is not None:   # by name, no listing (plain HTTP cannot list)
        all_ids = [int(s) for s in segments if src.has_segment(int(s))]
    else:
        try:
            all_ids = src.segment_ids() if listed is None else listed
        except Exception as exc:
            report.add_error(f"cannot list keys: {exc}")
            return report
    keys = None
    if raw_info is None and not all_ids:
        report.kind = None   # no info and no legacy manifest: not a mesh of either kind
        keys = storage.list_keys(kv)
        if any(k.endswith(".index") for k in keys):
            report.add_error("no info file, but .index manifests present (multi-resolution meshes need an info)")
        elif any(k.endswith(".shard") for k in keys):
            report.add_error("no info file, but .shard files present (sharded meshes need an info with their sharding)")
        else:
            report.add_error(f"no precomputed mesh at {location!r}: no info file and no legacy manifest (<id>:0)")
        return report
    if segments is None:
        _check_orphans(report, src, storage.list_keys(kv) if keys is None else keys, set(all_ids))
        ids = all_ids
    else:
        present = set(all_ids)
        ids = []
        for s in segments:
            if int(s) in present:
                ids.append(int(s))
            else:
                _not_found(report, int(s), absent)
    report.num_segments = len(ids)

    if src.kind == "multires":
        bits = src.vertex_quantization_bits
        with _InOrder(report, _ahead(decode)) as ordered:   # a segment's fragments decode during the next one's
            for seg, mbytes, data in src.fetch(ids, failures=True):   # (unsharded: sharded returned above)
                ordered.then(_guarded(report, seg, _start_multires_segment(report, seg, mbytes, data, bits, decode)))
    else:
        with _InOrder(report, _ahead(decode)) as ordered:   # as multires: fragments parse during the next reads
            for seg, manifest in src.manifests(ids):   # read in batches
                ordered.then(_guarded(report, seg, _start_legacy_segment(report, src, seg, decode, manifest)))
    if info:
        _check_segment_properties(report, kv, info, set(all_ids) if segments is None else None, props)
    return _warn_absent(report, absent)


def _warn_absent(report: ValidationReport, absent: Optional[list]) -> ValidationReport:
    """Warn about the segments that the segment properties name but that have no mesh (where
    those stood in for a listing of the store: :func:`_validate`), as a listing store's
    :func:`_check_segment_properties_file` does; return ``report``."""
    if absent:
        shown = ", ".join(str(i) for i in sorted(absent)[:5]) + (" ..." if len(absent) > 5 else "")
        report.warnings.append(f"{len(absent)} segments listed in the segment properties have no mesh (a lost shard "
                               f"or manifest?): segments {shown}")
    return report
