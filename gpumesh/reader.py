"""Reading Neuroglancer precomputed mesh directories.

Two formats are read (spec: ``neuroglancer-precomputed-meshes.md``):

* the multi-resolution format (``info`` ``@type`` ``neuroglancer_multilod_draco``), unsharded:
  one binary manifest ``<id>.index`` and one fragment data file ``<id>`` (concatenated Draco
  meshes) per segment (:class:`UnshardedMultiresSource`);
* the same, sharded (``info`` has ``sharding``, ``neuroglancer-sharded.md``): ``<shard>.shard``
  files, where each segment's manifest is the chunk indexed under its ID and its fragment data
  lies immediately before it (:class:`ShardedMultiresSource`);
* the legacy single-resolution format (``info`` ``@type`` ``neuroglancer_legacy_mesh``, or no
  ``info`` at all): one JSON manifest ``<id>:0`` per segment listing fragment files.

Every byte is read through TensorStore's kvstore (:mod:`gpumesh.storage`), so a location can be a
local path, a ``file://``, ``memory://`` or ``gs://`` URL, a kvstore spec or an open kvstore.

Storage is abstracted by :class:`MeshSource` (``segment_ids``, ``manifest_bytes``,
``fragment_data``).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np

from . import storage
from .errors import InvalidMeshError
from .sharding import ShardFormatError, ShardingSpec, sharding_problems

__all__ = [
    "MULTIRES_TYPE",
    "LEGACY_TYPE",
    "Manifest",
    "MeshSource",
    "UnshardedMultiresSource",
    "ShardedMultiresSource",
    "LegacySource",
    "open_mesh",
    "multires_info_problems",
    "decode_fragment",
    "parse_legacy_fragment",
    "load_fragments",
    "is_placeholder",
    "load_mesh",
    "stored_to_model",
    "info_transform",
]

MULTIRES_TYPE = "neuroglancer_multilod_draco"
LEGACY_TYPE = "neuroglancer_legacy_mesh"

_MULTIRES_KEY = re.compile(r"^(\d+)\.index$")
_LEGACY_KEY = re.compile(r"^(\d+):0$")

# Header: chunk_shape (3 f32), grid_origin (3 f32), num_lods (u32).
_HEADER_BYTES = 28
# Per LOD: lod_scale (f32), vertex_offset (3 f32), num_fragments (u32).
_PER_LOD_BYTES = 20
# Per fragment: position (3 u32), size (u32).
_PER_FRAGMENT_BYTES = 16


# --------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Manifest:
    """A multi-resolution mesh manifest (``<segment-id>.index``).

    Spec: ``neuroglancer-precomputed-meshes.md``, "Multi-resolution mesh manifest file format".
    All values are in the "stored model" coordinate space.

    Attributes
    ----------
    chunk_shape : numpy.ndarray, shape (3,), float64
        x, y, z extent of a finest (LOD 0) octree node (stored as float32).
    grid_origin : numpy.ndarray, shape (3,), float64
        x, y, z origin of the octree grid (stored as float32).
    num_lods : int
        Number of levels of detail.
    lod_scales : numpy.ndarray, shape (num_lods,), float64
        Scale of each LOD (multiplied by the info's ``lod_scale_multiplier``).
    vertex_offsets : numpy.ndarray, shape (num_lods, 3), float64
        Offset added to vertex positions of each LOD.
    fragment_positions : list of numpy.ndarray, each shape (m_lod, 3), uint32
        Octree node grid positions per LOD, one row (x, y, z) per node, in file order.
    fragment_sizes : list of numpy.ndarray, each shape (m_lod,), int64
        Size in bytes of each node's Draco fragment (the spec's ``fragment_offsets``).
    """

    chunk_shape: np.ndarray
    grid_origin: np.ndarray
    num_lods: int
    lod_scales: np.ndarray
    vertex_offsets: np.ndarray
    fragment_positions: list = field(default_factory=list)
    fragment_sizes: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.chunk_shape = np.asarray(self.chunk_shape, dtype=np.float64).reshape(3)
        self.grid_origin = np.asarray(self.grid_origin, dtype=np.float64).reshape(3)
        self.num_lods = int(self.num_lods)
        self.lod_scales = np.asarray(self.lod_scales, dtype=np.float64).reshape(self.num_lods)
        self.vertex_offsets = np.asarray(self.vertex_offsets, dtype=np.float64).reshape(self.num_lods, 3)
        if len(self.fragment_positions) != self.num_lods or len(self.fragment_sizes) != self.num_lods:
            raise ValueError(
                f"Manifest needs one fragment_positions and fragment_sizes array per LOD "
                f"({self.num_lods}), got {len(self.fragment_positions)} and {len(self.fragment_sizes)}"
            )
        positions, sizes = [], []
        for lod, (pos, size) in enumerate(zip(self.fragment_positions, self.fragment_sizes)):
            pos = np.asarray(pos, dtype=np.uint32).reshape(-1, 3)
            size = np.asarray(size, dtype=np.int64).reshape(-1)
            if len(pos) != len(size):
                raise ValueError(f"LOD {lod}: {len(pos)} positions but {len(size)} sizes")
            positions.append(pos)
            sizes.append(size)
        self.fragment_positions = positions
        self.fragment_sizes = sizes

    # -- derived values ------------------------------------------------------------------

    @property
    def num_fragments_per_lod(self) -> list[int]:
        """Number of octree nodes of each LOD."""
        return [len(p) for p in self.fragment_positions]

    @property
    def total_bytes(self) -> int:
        """Sum of all fragment sizes: the expected length of the fragment data file."""
        return int(sum(int(s.sum()) for s in self.fragment_sizes))

    def fragment_byte_ranges(self) -> list[np.ndarray]:
        """Byte range of every fragment within the fragment data file.

        Fragments are concatenated in manifest order, LOD 0 first (spec: "Multi-resolution
        mesh fragment data file format").

        Returns
        -------
        list of numpy.ndarray, each shape (m_lod, 2), int64
            ``[start, stop)`` byte offsets per node, per LOD.
        """
        out = []
        base = 0
        for size in self.fragment_sizes:
            stop = base + np.cumsum(size, dtype=np.int64)
            start = stop - size
            out.append(np.stack([start, stop], axis=1) if len(size) else np.zeros((0, 2), np.int64))
            base = int(stop[-1]) if len(size) else base
        return out

    @staticmethod
    def expected_length(num_lods: int, total_fragments: int) -> int:
        """Exact byte length of a manifest with these counts."""
        return _HEADER_BYTES + _PER_LOD_BYTES * num_lods + _PER_FRAGMENT_BYTES * total_fragments

    # -- (de)serialisation ---------------------------------------------------------------

    @classmethod
    def from_bytes(cls, data: bytes) -> "Manifest":
        """Parse a binary manifest.

        Parameters
        ----------
        data : bytes
            Content of ``<segment-id>.index`` (little endian).

        Returns
        -------
        Manifest

        Raises
        ------
        InvalidMeshError
            If the length is not exactly the one the header implies (the Neuroglancer client
            rejects such a manifest: ``Invalid index file size``).
        """
        data = bytes(data)
        n = len(data)
        if n < _HEADER_BYTES or n % 4:
            raise InvalidMeshError(f"manifest of {n} bytes is too short or not a multiple of 4")
        chunk_shape = np.frombuffer(data, "<f4", 3, 0)
        grid_origin = np.frombuffer(data, "<f4", 3, 12)
        (num_lods,) = struct.unpack_from("<I", data, 24)
        header_end = _HEADER_BYTES + _PER_LOD_BYTES * num_lods
        if n < header_end:
            raise InvalidMeshError(f"manifest of {n} bytes is too short for {num_lods} LODs")
        off = _HEADER_BYTES
        lod_scales = np.frombuffer(data, "<f4", num_lods, off)
        off += 4 * num_lods
        vertex_offsets = np.frombuffer(data, "<f4", 3 * num_lods, off).reshape(num_lods, 3)
        off += 12 * num_lods
        counts = np.frombuffer(data, "<u4", num_lods, off).astype(np.int64)
        off += 4 * num_lods
        total = int(counts.sum())
        expected = header_end + _PER_FRAGMENT_BYTES * total
        if n != expected:
            raise InvalidMeshError(
                f"manifest has {n} bytes but {num_lods} LODs and {total} fragments need {expected}"
            )
        positions, sizes = [], []
        for m in counts.tolist():
            positions.append(np.frombuffer(data, "<u4", 3 * m, off).reshape(3, m).T.astype(np.uint32))
            off += 12 * m
            sizes.append(np.frombuffer(data, "<u4", m, off).astype(np.int64))
            off += 4 * m
        return cls(
            chunk_shape=chunk_shape,
            grid_origin=grid_origin,
            num_lods=num_lods,
            lod_scales=lod_scales,
            vertex_offsets=vertex_offsets,
            fragment_positions=positions,
            fragment_sizes=sizes,
        )

    def to_bytes(self) -> bytes:
        """Serialise to the binary manifest format (exact inverse of :meth:`from_bytes`).

        Returns
        -------
        bytes
            Little-endian manifest; floats are written as float32, sizes as uint32.

        Raises
        ------
        ValueError
            If a fragment size does not fit in uint32.
        """
        parts = [
            self.chunk_shape.astype("<f4").tobytes(),
            self.grid_origin.astype("<f4").tobytes(),
            struct.pack("<I", self.num_lods),
            self.lod_scales.astype("<f4").tobytes(),
            self.vertex_offsets.astype("<f4").tobytes(),
            np.asarray(self.num_fragments_per_lod, dtype="<u4").tobytes(),
        ]
        for pos, size in zip(self.fragment_positions, self.fragment_sizes):
            if len(size) and (size.min() < 0 or size.max() > 0xFFFFFFFF):
                raise ValueError("fragment sizes must fit in uint32")
            parts.append(np.ascontiguousarray(pos.T).astype("<u4").tobytes())
            parts.append(size.astype("<u4").tobytes())
        return b"".join(parts)


# --------------------------------------------------------------------------------------------
# info checks
# --------------------------------------------------------------------------------------------


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def multires_info_problems(info: Any) -> list[str]:
    """List what is wrong with a multi-resolution mesh ``info`` (empty when valid).

    Checks (spec: ``neuroglancer-multiresolution_mesh.yml``): ``@type`` is
    ``neuroglancer_multilod_draco``; ``vertex_quantization_bits`` is 10 or 16; ``transform`` is
    12 finite numbers; ``lod_scale_multiplier`` is a finite number; ``segment_properties``, if
    present, is a string; ``sharding``, if present and not null, is a valid sharding
    specification (``neuroglancer-sharding.yml``).

    Parameters
    ----------
    info : Any
        The parsed ``info`` JSON.

    Returns
    -------
    list of str
    """
    if not isinstance(info, dict):
        return [f"info is not a JSON object (got {type(info).__name__})"]
    problems = []
    if info.get("@type") != MULTIRES_TYPE:
        problems.append(f"info @type is {info.get('@type')!r}, expected {MULTIRES_TYPE!r}")
    bits = info.get("vertex_quantization_bits")
    if isinstance(bits, bool) or bits not in (10, 16):
        problems.append(f"info vertex_quantization_bits is {bits!r}, must be 10 or 16")
    transform = info.get("transform")
    if not (isinstance(transform, list) and len(transform) == 12 and all(_is_number(v) for v in transform)):
        problems.append(f"info transform must be 12 finite numbers, got {transform!r}")
    mult = info.get("lod_scale_multiplier")
    if not _is_number(mult) or mult <= 0:   # the client requires a finite number > 0
        problems.append(f"info lod_scale_multiplier must be a finite number > 0, got {mult!r}")
    if "segment_properties" in info and not isinstance(info["segment_properties"], str):
        problems.append("info segment_properties must be a string (relative path)")
    if "sharding" in info and info["sharding"] is None:   # the client takes it absent, or an object
        problems.append("info sharding is null: leave it out for unsharded meshes (the client fails on null)")
    elif info.get("sharding") is not None:
        problems.extend("info " + p for p in sharding_problems(info["sharding"]))
    return problems


def info_transform(info: dict) -> np.ndarray:
    """The info ``transform`` as a 3x4 float64 matrix (row-major), stored model → model (nm)."""
    return np.asarray(info["transform"], dtype=np.float64).reshape(3, 4)


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


class MeshSource(ABC):
    """A readable precomputed mesh directory.

    Subclasses implement the storage layout (unsharded multi-resolution, legacy; sharded later).

    Attributes
    ----------
    kv : tensorstore.KvStore
        The mesh directory.
    info : dict
        The parsed ``info`` (``{}`` for a legacy directory without one).
    kind : str
        ``'multires'`` or ``'legacy'``.
    """

    kind: str = ""

    def __init__(self, kv, info: dict) -> None:
        self.kv = kv
        self.info = info

    @abstractmethod
    def segment_ids(self) -> list[int]:
        """Sorted segment ids that have a mesh."""

    @abstractmethod
    def manifest_bytes(self, segment_id: int) -> Optional[bytes]:
        """Raw manifest of a segment, or ``None`` when it has none."""

    @abstractmethod
    def fragment_data(self, segment_id: int) -> bytes:
        """All fragment bytes of a segment (see subclasses)."""

    def has_segment(self, segment_id: int) -> bool:
        """Whether the directory holds a mesh of ``segment_id`` (its manifest is there)."""
        return self.manifest_bytes(int(segment_id)) is not None

    def _missing(self, segment_id: int) -> InvalidMeshError:
        where = storage.kvstore_url(self.kv.spec().to_json())
        hint = "" if self.info else " (no info file there: not a mesh directory?)"
        return InvalidMeshError(f"segment {segment_id} not found in {where}{hint}")


class _MultiresSource(MeshSource):
    kind = "multires"

    def __init__(self, kv, info: dict) -> None:
        super().__init__(kv, info)
        self.vertex_quantization_bits = int(info["vertex_quantization_bits"])
        self.transform = info_transform(info)

    def manifest(self, segment_id: int) -> Manifest:
        """Parsed manifest of a segment.

        Raises
        ------
        InvalidMeshError
            If the segment has no manifest or it is malformed.
        """
        data = self.manifest_bytes(int(segment_id))
        if data is None:
            raise self._missing(segment_id)
        try:
            return Manifest.from_bytes(data)
        except InvalidMeshError as exc:
            raise InvalidMeshError(f"segment {segment_id}: {exc}") from exc

    @abstractmethod
    def fetch(self, segment_ids: Sequence[int]) -> Iterator[tuple[int, Optional[bytes], Optional[bytes]]]:
        """Yield ``(segment_id, manifest_bytes or None, fragment_data or None)`` per segment,
        reading ahead in batches."""

    @abstractmethod
    def manifests(self, segment_ids: Sequence[int]) -> Iterator[tuple[int, Optional[bytes]]]:
        """Yield ``(segment_id, manifest_bytes or None)`` per segment (no fragment data read)."""


def _read_batched(kv, segment_ids: Sequence[int], keys: Callable[[int], list], batch: int,
                  failures: bool = False) -> Iterator[tuple[int, list]]:
    """``(segment ID, [bytes of each of keys(ID), or None where missing])`` per segment, in
    order, with the reads of ``batch`` segments issued at once (a round trip per batch on a
    network store).  With ``failures``, a read that fails (an I/O error, a permission refused)
    gives its exception in place of the bytes and the others go on; else it raises."""
    ids = [int(s) for s in segment_ids]
    for i in range(0, len(ids), batch):
        futures = [(s, [kv.read(k) for k in keys(s)]) for s in ids[i:i + batch]]
        for s, futs in futures:
            got = []
            for fut in futs:
                try:
                    got.append(storage.read_result(fut))
                except Exception as exc:   # TensorStore's errors
                    if not failures:
                        raise
                    got.append(exc)
            yield s, got


class UnshardedMultiresSource(_MultiresSource):
    """Unsharded multi-resolution meshes: ``<id>.index`` manifests and ``<id>`` data files."""

    def segment_ids(self) -> list[int]:
        ids = []
        for key in storage.list_keys(self.kv):
            m = _MULTIRES_KEY.match(key)
            if m:
                ids.append(int(m.group(1)))
        return sorted(ids)

    def manifest_bytes(self, segment_id: int) -> Optional[bytes]:
        return storage.read(self.kv, f"{int(segment_id)}.index")

    def fragment_data(self, segment_id: int) -> bytes:
        """The whole fragment data file ``<id>``.

        Raises
        ------
        InvalidMeshError
            If the file is missing.
        """
        data = storage.read(self.kv, str(int(segment_id)))
        if data is None:
            raise InvalidMeshError(f"segment {segment_id}: fragment data file missing")
        return data

    def manifests(self, segment_ids: Sequence[int], batch: int = 64):
        """Like :meth:`_MultiresSource.manifests`, reading ``batch`` manifests at once."""
        for s, (mbytes,) in _read_batched(self.kv, segment_ids, lambda s: [f"{s}.index"], batch):
            yield s, mbytes

    def fetch(self, segment_ids: Sequence[int], batch: int = 64, failures: bool = False):
        """Like :meth:`_MultiresSource.fetch`, issuing reads for ``batch`` segments at once.
        With ``failures``, a read that fails (an I/O error, a permission refused) gives its
        exception in place of the bytes, and the other segments are still read; else it
        raises."""
        for s, (mbytes, data) in _read_batched(self.kv, segment_ids, lambda s: [f"{s}.index", str(s)], batch,
                                               failures):
            yield s, mbytes, data


class ShardedMultiresSource(_MultiresSource):
    """Sharded multi-resolution meshes (``info`` ``sharding``; ``neuroglancer-sharded.md``).

    A segment's manifest is the chunk stored under its ID: its shard and minishard follow from
    ``hash(id >> preshift_bits)``, the shard index entry gives the minishard index, which gives
    the manifest's byte range.  Its fragment data is the ``sum(fragment sizes)`` bytes just
    before the manifest (always raw; ``data_encoding`` applies to the manifest only).

    Shard indices and minishard indices are cached once read.

    Attributes
    ----------
    sharding : gpumesh.sharding.ShardingSpec
    """

    def __init__(self, kv, info: dict) -> None:
        super().__init__(kv, info)
        try:
            self.sharding = ShardingSpec.from_json(info["sharding"])
        except ValueError as exc:
            raise InvalidMeshError(f"invalid sharding: {exc}") from exc
        self._shard_index: dict[int, Optional[np.ndarray]] = {}
        self._minishards: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    # -- index access -----------------------------------------------------------------------

    def shard_numbers(self) -> list[int]:
        """Shard numbers that have a correctly named ``<shard>.shard`` file, sorted."""
        out = []
        for key in storage.list_keys(self.kv):
            shard = self.sharding.parse_shard_key(key)
            if shard is not None:
                out.append(shard)
        return sorted(out)

    def shard_index(self, shard: int) -> Optional[np.ndarray]:
        """``(2**minishard_bits, 2)`` uint64 file offsets ``[start, end)`` of each minishard
        index of a shard, or ``None`` when the shard file is missing.

        Raises
        ------
        InvalidMeshError
            If the shard file is shorter than its shard index.
        """
        shard = int(shard)
        if shard not in self._shard_index:
            spec = self.sharding
            raw = storage.read(self.kv, spec.shard_key(shard), (0, spec.shard_index_bytes))
            if raw is None:
                self._shard_index[shard] = None
            else:
                try:
                    self._shard_index[shard] = spec.decode_shard_index(raw)
                except ShardFormatError as exc:
                    raise InvalidMeshError(f"shard {spec.shard_key(shard)}: {exc}") from exc
        return self._shard_index[shard]

    def minishard_index(self, shard: int, minishard: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(ids, starts, sizes)`` (uint64; starts are file offsets) of one minishard.

        Raises
        ------
        InvalidMeshError
            If the index range is inverted, beyond the file, or does not decode.
        """
        key = (int(shard), int(minishard))
        if key not in self._minishards:
            empty = (np.zeros(0, np.uint64),) * 3
            index = self.shard_index(shard)
            if index is None:
                self._minishards[key] = empty
            else:
                start, end = (int(v) for v in index[int(minishard)])
                name = self.sharding.shard_key(shard)
                if end < start:
                    raise InvalidMeshError(f"shard {name} minishard {minishard}: index range [{start}, {end}) inverted")
                if end == start:
                    self._minishards[key] = empty
                else:
                    raw = storage.read(self.kv, name, (start, end))
                    if raw is None or len(raw) != end - start:
                        raise InvalidMeshError(
                            f"shard {name} minishard {minishard}: index range [{start}, {end}) beyond end of file")
                    try:
                        self._minishards[key] = self.sharding.decode_minishard_index(raw)
                    except ShardFormatError as exc:
                        raise InvalidMeshError(f"shard {name} minishard {minishard}: {exc}") from exc
        return self._minishards[key]

    def locate(self, segment_id: int) -> Optional[tuple[str, int, int]]:
        """``(shard file, start, size)`` of a segment's stored manifest, or ``None``."""
        seg = int(segment_id)
        shard, minishard = (int(v[0]) for v in self.sharding.locate([seg]))
        ids, starts, sizes = self.minishard_index(shard, minishard)
        hit = np.flatnonzero(ids == np.uint64(seg))
        if not len(hit):
            return None
        i = int(hit[0])
        return self.sharding.shard_key(shard), int(starts[i]), int(sizes[i])

    # -- MeshSource -------------------------------------------------------------------------

    def _prefetch_minishards(self, shard: int) -> None:
        """Read every uncached non-empty minishard index of a shard at once (into the cache)."""
        index = self.shard_index(shard)
        if index is None:
            return
        name = self.sharding.shard_key(shard)
        futures = []
        for minishard, (start, end) in enumerate(index.tolist()):
            if (shard, minishard) not in self._minishards and end > start:
                futures.append((minishard, start, end, self.kv.read(name, byte_range=slice(start, end))))
        for minishard, start, end, fut in futures:
            raw = storage.read_result(fut) or b""
            if len(raw) != end - start:
                continue  # minishard_index() reports it
            try:
                self._minishards[(shard, minishard)] = self.sharding.decode_minishard_index(raw)
            except ShardFormatError:
                continue  # minishard_index() reports it

    def segment_ids(self) -> list[int]:
        ids = []
        for shard in self.shard_numbers():
            self._prefetch_minishards(shard)
            index = self.shard_index(shard)
            for minishard in range(len(index)):
                ids.extend(int(v) for v in self.minishard_index(shard, minishard)[0])
        return sorted(set(ids))

    def _decode(self, seg: int, stored: bytes) -> bytes:
        try:
            return self.sharding.decode_data(stored)
        except ShardFormatError as exc:
            raise InvalidMeshError(f"segment {seg}: manifest: {exc}") from exc

    def manifest_bytes(self, segment_id: int) -> Optional[bytes]:
        loc = self.locate(segment_id)
        if loc is None:
            return None
        name, start, size = loc
        stored = storage.read(self.kv, name, (start, start + size))
        if stored is None or len(stored) != size:
            raise InvalidMeshError(f"segment {segment_id}: manifest bytes [{start}, {start + size}) beyond end of {name}")
        return self._decode(int(segment_id), stored)

    def fragment_data(self, segment_id: int) -> bytes:
        """The ``sum(fragment sizes)`` bytes immediately before the segment's manifest.

        Raises
        ------
        InvalidMeshError
            If the segment is missing, or its data would start before the end of the shard index.
        """
        seg = int(segment_id)
        loc = self.locate(seg)
        if loc is None:
            raise self._missing(seg)
        name, start, size = loc
        total = self.manifest(seg).total_bytes
        return self._data_before(seg, name, start, total)

    def _data_before(self, seg: int, name: str, start: int, total: int) -> bytes:
        if total == 0:
            return b""
        if start - total < self.sharding.shard_index_bytes:
            raise InvalidMeshError(f"segment {seg}: fragment data ({total} bytes before the manifest at {start}) "
                                   f"would start inside the shard index of {name}")
        data = storage.read(self.kv, name, (start - total, start))
        if data is None or len(data) != total:
            raise InvalidMeshError(f"segment {seg}: fragment data of {name} unreadable")
        return data

    def _read_manifests(self, segs: list) -> list:
        locs = [self.locate(s) for s in segs]
        futs = [None if loc is None else self.kv.read(loc[0], byte_range=slice(loc[1], loc[1] + loc[2]))
                for loc in locs]
        out = []
        for seg, loc, fut in zip(segs, locs, futs):
            if fut is None:
                out.append((seg, loc, None))
                continue
            stored = storage.read_result(fut) or b""
            if len(stored) != loc[2]:
                raise InvalidMeshError(f"segment {seg}: manifest bytes beyond end of {loc[0]}")
            out.append((seg, loc, self._decode(seg, stored)))
        return out

    def manifests(self, segment_ids: Sequence[int], batch: int = 64):
        """Like :meth:`_MultiresSource.manifests`, reading ``batch`` manifests at once."""
        ids = [int(s) for s in segment_ids]
        for i in range(0, len(ids), batch):
            for seg, _, mbytes in self._read_manifests(ids[i : i + batch]):
                yield seg, mbytes

    def fetch(self, segment_ids: Sequence[int], batch: int = 64):
        """Like :meth:`_MultiresSource.fetch`, reading ``batch`` segments at once."""
        ids = [int(s) for s in segment_ids]
        for i in range(0, len(ids), batch):
            got = self._read_manifests(ids[i : i + batch])
            reads = []
            for seg, loc, mbytes in got:
                fut = None
                if mbytes is not None:
                    try:
                        total = Manifest.from_bytes(mbytes).total_bytes
                    except InvalidMeshError:
                        total = None
                    if total and loc[1] - total >= self.sharding.shard_index_bytes:
                        fut = self.kv.read(loc[0], byte_range=slice(loc[1] - total, loc[1]))
                    elif total == 0:
                        fut = b""
                reads.append(fut)
            for (seg, loc, mbytes), fut in zip(got, reads):
                if fut is None or isinstance(fut, bytes):
                    yield seg, mbytes, fut
                else:
                    yield seg, mbytes, storage.read_result(fut)


#: :meth:`LegacySource.fragment_names` without its manifest: read there.
_UNREAD = object()


class LegacySource(MeshSource):
    """Legacy single-resolution meshes: JSON manifests ``<id>:0`` listing fragment files."""

    kind = "legacy"

    def segment_ids(self) -> list[int]:
        ids = []
        for key in storage.list_keys(self.kv):
            m = _LEGACY_KEY.match(key)
            if m:
                ids.append(int(m.group(1)))
        return sorted(ids)

    def manifest_bytes(self, segment_id: int) -> Optional[bytes]:
        return storage.read(self.kv, f"{int(segment_id)}:0")

    def manifests(self, segment_ids: Sequence[int], batch: int = 64) -> Iterator[tuple[int, Any]]:
        """``(segment ID, its manifest)`` per segment of ``segment_ids``, in their order, with the
        reads of ``batch`` manifests issued at once (a round trip per batch on a network store,
        not per segment).  The manifest is the bytes of ``<id>:0``, ``None`` where it is
        missing, or the exception that reading it raised (one segment's, not the others')."""
        for s, (manifest,) in _read_batched(self.kv, segment_ids, lambda s: [f"{s}:0"], batch, failures=True):
            yield s, manifest

    def fragment_names(self, segment_id: int, manifest: Any = _UNREAD) -> list[str]:
        """Fragment file names (relative to the mesh directory) listed by ``<id>:0``.

        Parameters
        ----------
        segment_id : int
        manifest : bytes or None, optional
            The manifest's bytes, read already (:meth:`manifests`; ``None``: missing); by default
            it is read here.

        Raises
        ------
        InvalidMeshError
            If the manifest is missing, not JSON, or lacks a ``fragments`` list of strings.
        """
        data = self.manifest_bytes(int(segment_id)) if manifest is _UNREAD else manifest
        if data is None:
            raise self._missing(segment_id)
        try:
            obj = json.loads(data)
        except ValueError as exc:
            raise InvalidMeshError(f"segment {segment_id}: manifest {segment_id}:0 is not JSON: {exc}") from exc
        frags = obj.get("fragments") if isinstance(obj, dict) else None
        if not isinstance(frags, list) or not all(isinstance(f, str) for f in frags):
            raise InvalidMeshError(f"segment {segment_id}: manifest {segment_id}:0 needs a 'fragments' list of strings")
        return frags

    def fragment_data(self, segment_id: int) -> bytes:
        """Concatenated bytes of all legacy fragment files of a segment (in manifest order)."""
        return b"".join(self.fragment_bytes(segment_id))

    def fragment_bytes(self, segment_id: int) -> list[bytes]:
        """Raw bytes of each legacy fragment file.

        Raises
        ------
        InvalidMeshError
            If the manifest is bad or a listed fragment file is missing.
        """
        names = self.fragment_names(segment_id)
        futures = [self.kv.read(name) for name in names]
        out = []
        for name, fut in zip(names, futures):
            data = storage.read_result(fut)
            if data is None:
                raise InvalidMeshError(f"segment {segment_id}: fragment file {name!r} missing")
            out.append(data)
        return out

    def legacy_fragments(self, segment_id: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Decoded legacy fragments of a segment.

        Returns
        -------
        list of (vertices, faces)
            vertices: (n, 3) float32, nm; faces: (m, 3) uint32 vertex indices.

        Raises
        ------
        InvalidMeshError
            If the manifest or a fragment is malformed (see :func:`parse_legacy_fragment`).
        """
        names = self.fragment_names(segment_id)
        out = []
        for name, data in zip(names, self.fragment_bytes(segment_id)):
            try:
                out.append(parse_legacy_fragment(data))
            except InvalidMeshError as exc:
                raise InvalidMeshError(f"segment {segment_id}: fragment {name!r}: {exc}") from exc
        return out


def open_mesh(location: Union[storage.KvSpec, MeshSource]) -> MeshSource:
    """Open a precomputed mesh directory.

    Parameters
    ----------
    location : str, os.PathLike, dict, tensorstore.KvStore or MeshSource
        Path, kvstore URL or spec of the mesh directory (the one holding ``info``).
        A :class:`MeshSource` is returned unchanged.

    Returns
    -------
    MeshSource
        :class:`UnshardedMultiresSource` or :class:`ShardedMultiresSource` (``kind ==
        'multires'``), or :class:`LegacySource` (``kind == 'legacy'``).

    Raises
    ------
    InvalidMeshError
        If ``info`` is not JSON, has an unknown ``@type``, or is an invalid multi-resolution
        info (a bad ``sharding`` included); or a local location is missing or a file (a
        directory without ``info`` opens as a legacy mesh, as old legacy meshes have none).
    SourceReadError
        If the location cannot be opened.
    """
    if isinstance(location, MeshSource):
        return location
    kv = storage.open_kvstore(location)
    raw = storage.read(kv, "info")
    if raw is None:
        spec = kv.spec().to_json()
        local = spec.get("path", "").rstrip("/") if spec.get("driver") == "file" else None
        if local and not os.path.isdir(local):   # not an old legacy mesh without info: nothing at all
            shown = storage.display(location)
            raise InvalidMeshError(f"{shown}: " + ("a file, not a mesh directory" if os.path.exists(local)
                                                   else "no such directory"))
        return LegacySource(kv, {})
    try:
        info = json.loads(raw)
    except ValueError as exc:
        raise InvalidMeshError(f"info is not valid JSON: {exc}") from exc
    if not isinstance(info, dict):
        raise InvalidMeshError("info is not a JSON object")
    kind = info.get("@type")
    if kind == LEGACY_TYPE:
        return LegacySource(kv, info)
    if kind != MULTIRES_TYPE:
        raise InvalidMeshError(
            f"info @type is {kind!r}: expected {MULTIRES_TYPE!r} or {LEGACY_TYPE!r}"
        )
    problems = multires_info_problems(info)
    if problems:
        raise InvalidMeshError("invalid info: " + "; ".join(problems))
    if info.get("sharding") is not None:
        return ShardedMultiresSource(kv, info)
    return UnshardedMultiresSource(kv, info)


# --------------------------------------------------------------------------------------------
# Fragments
# --------------------------------------------------------------------------------------------


def decode_fragment(data: bytes, bits: Optional[int] = None,
                    check_identity: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Decode one Draco fragment of a multi-resolution mesh to its integer vertex positions.

    The client reads Draco's stored integers directly, without Draco's dequantization (spec:
    "Multi-resolution mesh fragment data file format"; Neuroglancer's
    ``neuroglancer_draco.cc``), so producers quantize to integers themselves and make Draco's
    quantization the identity.  With gpumesh's Draco extension (``gpumesh._dracoenc``, built
    at install) the positions returned are those stored integers, as the client reads them: a
    fragment whose Draco quantization is not the identity (an origin or range of its own)
    decodes to where the client would draw it, and unquantized float positions are an error.
    Without the extension DracoPy decodes it, dequantized, and the positions must be exact
    integers: such a fragment is then caught only where its dequantized positions are not.

    Parameters
    ----------
    data : bytes
        One Draco-encoded triangle mesh (non-empty).
    bits : int, optional
        ``vertex_quantization_bits``; when given, positions must lie in ``[0, 2**bits)``.
    check_identity : bool
        Require Draco's quantization to be the identity (origin 0, range ``2**b - 1`` for its
        ``b`` bits), as the producer meant the positions it gave the encoder (``gpumesh
        validate``).

    Returns
    -------
    positions : numpy.ndarray, shape (n, 3), int64
        Quantized vertex positions.
    faces : numpy.ndarray, shape (m, 3), int64
        Triangle vertex indices.

    Raises
    ------
    InvalidMeshError
        If Draco cannot decode the bytes, they hold no triangle mesh, positions are not
        quantized integers, or (with ``bits``) are out of range; with ``check_identity``,
        if Draco's quantization is not the identity.
    """
    raw = _raw_decoder()
    if raw is not None:
        try:
            pos, tri, quant = raw(bytes(data))
        except ValueError as exc:
            raise InvalidMeshError(f"Draco fragment ({len(data)} bytes) as the client reads it: {exc}") from exc
        positions = np.frombuffer(pos, dtype=np.uint32).reshape(-1, 3).astype(np.int64)
        faces = np.frombuffer(tri, dtype=np.uint32).reshape(-1, 3).astype(np.int64)
        if check_identity and quant is not None:
            qbits, origin, extent = quant
            if any(origin) or extent != (1 << qbits) - 1:
                raise InvalidMeshError(
                    f"Draco's quantization is not the identity: origin {list(origin)}, range {extent:g} for "
                    f"{qbits} bits (the identity is origin 0, range {(1 << qbits) - 1}), so the client draws "
                    f"positions other than the encoder was given")
    else:
        positions, faces = _decode_dracopy(data)
    if bits is not None and len(positions):
        lo, hi = int(positions.min()), int(positions.max())
        if lo < 0 or hi >= 2**bits:
            raise InvalidMeshError(f"vertex positions span [{lo}, {hi}], outside [0, 2**{bits})")
    if len(faces) and (faces.min() < 0 or faces.max() >= len(positions)):
        raise InvalidMeshError("face indices out of range")
    return positions, faces


def _raw_decoder():
    """``gpumesh._dracoenc.decode`` (Draco's stored integers), or None where it is not built."""
    try:
        from ._dracoenc import decode
    except ImportError:
        return None
    return decode


def _decode_dracopy(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """DracoPy's dequantized decoding, whose positions must be exact integers."""
    import DracoPy

    try:
        mesh = DracoPy.decode(bytes(data))
    except Exception as exc:  # DracoPy raises its own FileTypeException etc.
        raise InvalidMeshError(f"Draco cannot decode fragment ({len(data)} bytes): {exc}") from exc
    faces = getattr(mesh, "faces", None)
    if faces is None:
        raise InvalidMeshError("Draco fragment is a point cloud, not a triangle mesh")
    points = np.asarray(mesh.points, dtype=np.float64).reshape(-1, 3)
    faces = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    rounded = np.rint(points)
    if not np.array_equal(rounded, points):
        bad = int(np.count_nonzero(np.any(rounded != points, axis=1)))
        raise InvalidMeshError(
            f"{bad} of {len(points)} decoded vertex positions are not integers "
            "(Draco quantization is not the identity)"
        )
    return rounded.astype(np.int64), faces


def parse_legacy_fragment(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Parse one legacy single-resolution mesh fragment file.

    Format (spec: "Legacy single-resolution mesh format"): uint32le ``num_vertices``,
    ``num_vertices*3`` float32le positions (nm), then uint32le triangle indices.

    Parameters
    ----------
    data : bytes

    Returns
    -------
    vertices : numpy.ndarray, shape (n, 3), float32
        Positions in nm.
    faces : numpy.ndarray, shape (m, 3), uint32

    Raises
    ------
    InvalidMeshError
        If the file is shorter than its header says, the index bytes are not a multiple of 12,
        an index is ``>= num_vertices`` or a position is not finite.
    """
    data = bytes(data)
    if len(data) < 4:
        raise InvalidMeshError(f"fragment of {len(data)} bytes has no vertex count")
    (nv,) = struct.unpack_from("<I", data, 0)
    vend = 4 + 12 * nv
    if len(data) < vend:
        raise InvalidMeshError(f"fragment of {len(data)} bytes too short for {nv} vertices")
    rest = len(data) - vend
    if rest % 12:
        raise InvalidMeshError(f"{rest} bytes of triangle indices is not a multiple of 12")
    vertices = np.frombuffer(data, "<f4", 3 * nv, 4).reshape(nv, 3).astype(np.float32)
    faces = np.frombuffer(data, "<u4", rest // 4, vend).reshape(-1, 3).astype(np.uint32)
    if len(faces) and int(faces.max()) >= nv:
        raise InvalidMeshError(f"triangle index {int(faces.max())} >= num_vertices {nv}")
    if not np.all(np.isfinite(vertices)):
        raise InvalidMeshError("non-finite vertex positions")
    return vertices, faces


#: Triangles of a placeholder fragment (a tetrahedron, consistently oriented).
PLACEHOLDER_FACES = np.array([[0, 1, 2], [0, 3, 1], [0, 2, 3], [1, 3, 2]], dtype=np.int64)


def is_placeholder(positions_q: np.ndarray, faces: np.ndarray) -> bool:
    """Whether a decoded fragment is a placeholder: four collinear vertices, four triangles.

    Parameters
    ----------
    positions_q : (n, 3) int
    faces : (m, 3) int

    Returns
    -------
    bool
        ``True`` for a fragment of 4 vertices and 4 triangles with zero area (no meshed
        surface is like that).
    """
    if len(positions_q) != 4 or len(faces) != 4:
        return False
    v = np.asarray(positions_q, dtype=np.int64)
    d = v[1:] - v[0]
    return not np.cross(d[:, None, :], d[None, :, :]).any()   # all on one line


def load_fragments(location_or_source, segment_id: int, lod: int) -> list[dict]:
    """Decode every fragment of one LOD of a multi-resolution segment.

    Parameters
    ----------
    location_or_source : location or MeshSource
        See :func:`open_mesh`.
    segment_id : int
    lod : int
        Level of detail, ``0 <= lod < num_lods``.

    Returns
    -------
    list of dict
        One per octree node of the LOD in manifest order (empty nodes included, with
        zero-length arrays), with keys ``position`` ((3,) uint32 grid position),
        ``positions_q`` ((n, 3) int64 quantized positions), ``faces`` ((m, 3) int64) and
        ``placeholder`` (bool: a placeholder that stands for an empty parent node, see
        :mod:`gpumesh.writer`).

    Raises
    ------
    InvalidMeshError
        If the source is not multi-resolution, the segment is missing, ``lod`` is out of
        range, the data file is shorter than the manifest says, or a fragment fails
        :func:`decode_fragment`.
    """
    src = open_mesh(location_or_source)
    if src.kind != "multires":
        raise InvalidMeshError("load_fragments needs a multi-resolution mesh source")
    return _load_fragments(src, int(segment_id), int(lod), src.manifest(int(segment_id)))


def _load_fragments(src, seg: int, lod: int, manifest: Manifest) -> list[dict]:
    if not 0 <= lod < manifest.num_lods:
        raise InvalidMeshError(f"segment {seg}: LOD {lod} out of range (num_lods={manifest.num_lods})")
    data = src.fragment_data(seg) if manifest.total_bytes else b""
    ranges = manifest.fragment_byte_ranges()[lod]
    if len(ranges) and ranges[-1, 1] > len(data):
        raise InvalidMeshError(
            f"segment {seg}: data file has {len(data)} bytes, manifest needs {manifest.total_bytes}"
        )
    out = []
    for i, (start, stop) in enumerate(ranges.tolist()):
        pos = manifest.fragment_positions[lod][i]
        if stop == start:
            q, f = np.zeros((0, 3), np.int64), np.zeros((0, 3), np.int64)
        else:
            try:
                q, f = decode_fragment(data[start:stop], src.vertex_quantization_bits)
            except InvalidMeshError as exc:
                raise InvalidMeshError(f"segment {seg} lod {lod} node {i} {pos.tolist()}: {exc}") from exc
        out.append({"position": pos, "positions_q": q, "faces": f, "placeholder": is_placeholder(q, f)})
    return out


def stored_to_model(
    manifest: Manifest, lod: int, position: np.ndarray, positions_q: np.ndarray, bits: int, transform: np.ndarray
) -> np.ndarray:
    """Model-space (nm) positions of quantized vertices of one fragment.

    ``stored[j] = grid_origin[j] + vertex_offsets[lod, j] + chunk_shape[j] * 2**lod *
    (position[j] + q[j] / (2**bits - 1))``, then ``model = T @ [stored, 1]``.

    Parameters
    ----------
    manifest : Manifest
    lod : int
    position : array-like, shape (3,)
        Fragment grid position.
    positions_q : numpy.ndarray, shape (n, 3), integer
    bits : int
        ``vertex_quantization_bits``.
    transform : numpy.ndarray, shape (3, 4)

    Returns
    -------
    numpy.ndarray, shape (n, 3), float64
    """
    scale = manifest.chunk_shape * float(2**lod)
    frac = np.asarray(position, np.float64)[None, :] + np.asarray(positions_q, np.float64) / float(2**bits - 1)
    stored = manifest.grid_origin + manifest.vertex_offsets[lod] + scale * frac
    return stored @ transform[:, :3].T + transform[:, 3]


def _weld(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(vertices) == 0:
        return vertices, faces
    key = np.round(vertices, 6)
    _, first, inverse = np.unique(key, axis=0, return_index=True, return_inverse=True)
    inverse = np.asarray(inverse).reshape(-1)
    return vertices[first], inverse[faces] if len(faces) else faces


def load_mesh(location_or_source, segment_id: int, lod: int = 0, *, weld: bool = True):
    """Load one segment's mesh (one LOD) as a single trimesh in model space (nm).

    Parameters
    ----------
    location_or_source : location or MeshSource
        See :func:`open_mesh`.
    segment_id : int
    lod : int, default 0
        Multi-resolution LOD; must be 0 for legacy meshes.
    weld : bool, default True
        Merge vertices with identical model-space positions (float64 rounded to 6 decimals),
        e.g. the shared border vertices of adjacent fragments and Draco's per-corner copies.

    Returns
    -------
    trimesh.Trimesh
        ``process=False``: vertices (float64, nm) and faces exactly as decoded (and welded).

    Raises
    ------
    InvalidMeshError
        ``"segment N not found"``, LOD out of range, or malformed data.
    """
    import trimesh

    src = open_mesh(location_or_source)
    seg = int(segment_id)
    verts, faces = [], []
    base = 0
    if src.kind == "multires":
        manifest = src.manifest(seg)
        bits = src.vertex_quantization_bits
        for frag in _load_fragments(src, seg, int(lod), manifest):
            if len(frag["positions_q"]) == 0 or frag["placeholder"]:
                continue
            v = stored_to_model(manifest, lod, frag["position"], frag["positions_q"], bits, src.transform)
            verts.append(v)
            faces.append(frag["faces"] + base)
            base += len(v)
    else:
        if lod != 0:
            if not src.has_segment(seg):   # not found (or not a mesh directory) says more
                raise src._missing(seg)
            raise InvalidMeshError(f"segment {seg}: legacy meshes have only LOD 0 (asked for {lod})")
        for v, f in src.legacy_fragments(seg):
            verts.append(v.astype(np.float64))
            faces.append(f.astype(np.int64) + base)
            base += len(v)
    vertices = np.concatenate(verts) if verts else np.zeros((0, 3), np.float64)
    tris = np.concatenate(faces) if faces else np.zeros((0, 3), np.int64)
    if weld:
        vertices, tris = _weld(vertices, tris)
    return trimesh.Trimesh(vertices=vertices, faces=tris, process=False)
