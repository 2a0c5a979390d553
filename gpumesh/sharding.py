"""The Neuroglancer ``neuroglancer_uint64_sharded_v1`` format: hashing, parameters, encoding.

Spec: ``../shared/specs/neuroglancer-sharded.md`` (and ``neuroglancer-sharding.yml``).  This
module is pure format code (bytes in, bytes out); :mod:`gpumesh.writer` decides what goes into
each shard and writes it through :mod:`gpumesh.storage`, :mod:`gpumesh.reader` and
:mod:`gpumesh.validate` read it back.

Layout of a shard file as gpumesh writes it::

    shard index        2**minishard_bits * 16 bytes: (start, end) uint64le per minishard,
                       relative to the end of the shard index
    chunks             minishard by minishard, segments by increasing ID within a minishard;
                       for a multi-resolution mesh each chunk is the segment's fragment data
                       (raw, not indexed) immediately followed by its manifest (the indexed
                       chunk, encoded per ``data_encoding``)
    minishard indices  one per non-empty minishard, in minishard order (encoded per
                       ``minishard_index_encoding``)

Automatic parameters (:func:`choose_bits`)
------------------------------------------
From the number of segments ``n`` and their total fragment bytes ``B`` (manifests are ~16 bytes
per octree node, small next to the Draco data):

* ``preshift_bits = 0`` (segment IDs carry no spatial locality worth keeping together);
* ``shard_bits``: the smallest ``s`` with ``B / 2**s <= MAX_SHARD_BYTES`` (128 MiB) and
  ``n / 2**s <= MAX_SEGMENTS_PER_MINISHARD * 2**MAX_MINISHARD_BITS`` (one million), so one
  shard is a bounded unit of memory, of work and of resume, and is written in one request;
* ``minishard_bits``: the smallest ``m <= MAX_MINISHARD_BITS`` (12) with
  ``n / 2**s / 2**m <= MAX_SEGMENTS_PER_MINISHARD`` (256): a minishard index is at most
  ~256 * 24 bytes before gzip, and the shard index at most 64 KiB, so either is one small
  read.

With the murmurhash the counts per shard and minishard scatter around these averages
(Poisson).  Any of the bits can be given instead; the others are then chosen by the same rule
given it.  ``identity`` hashing keeps ID order (``preshift_bits`` then groups runs of IDs).
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

__all__ = [
    "SHARDED_TYPE", "HASHES", "ENCODINGS", "ShardingOptions", "ShardingSpec", "murmurhash3_x86_128_low64",
    "choose_bits", "sharding_problems", "build_shard", "ShardFormatError",
]

SHARDED_TYPE = "neuroglancer_uint64_sharded_v1"
HASHES = ("murmurhash3_x86_128", "identity")
ENCODINGS = ("raw", "gzip")

#: Average segments per minishard the automatic rule stays under.
MAX_SEGMENTS_PER_MINISHARD = 256
#: Most minishards per shard the automatic rule uses (shard index of 64 KiB).
MAX_MINISHARD_BITS = 12
#: Average bytes per shard the automatic rule stays under.
MAX_SHARD_BYTES = 128 << 20
#: Most minishards per shard gpumesh writes when asked (every shard file starts with a
#: ``16 * 2**minishard_bits``-byte shard index: 256 MiB at 24 bits).  Readers take any.
MAX_WRITE_MINISHARD_BITS = 24

_SHARD_KEY = re.compile(r"^([0-9a-f]+)\.shard$")


class ShardFormatError(ValueError):
    """Malformed sharded data (bad index, bad gzip, ranges outside the file)."""


# --------------------------------------------------------------------------------------------
# Hashing
# --------------------------------------------------------------------------------------------

_M32 = np.uint64(0xFFFFFFFF)


def _mul32(a: np.ndarray, c: int) -> np.ndarray:
    # (a * c) mod 2**32 for uint64 arrays holding 32-bit values: split c so nothing overflows 64 bits
    lo, hi = np.uint64(c & 0xFFFF), np.uint64(c >> 16)
    return ((a * lo) + (((a * hi) & np.uint64(0xFFFF)) << np.uint64(16))) & _M32


def _rotl32(a: np.ndarray, r: int) -> np.ndarray:
    return ((a << np.uint64(r)) | (a >> np.uint64(32 - r))) & _M32


def _fmix32(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint64(16))
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> np.uint64(13))
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> np.uint64(16))


def murmurhash3_x86_128_low64(ids, seed: int = 0) -> np.ndarray:
    """MurmurHash3_x86_128 of each ID's 8 little-endian bytes; the low 64 bits of the hash.

    As Neuroglancer's ``murmurHash3_x86_128Hash64Bits`` and TensorStore's sharded kvstore: the
    128-bit result is the little-endian words ``h1, h2, h3, h4``; the low 8 bytes read as a
    little-endian uint64 are ``h1 | h2 << 32``.

    Parameters
    ----------
    ids : array-like of uint64
    seed : int

    Returns
    -------
    numpy.ndarray of uint64, same shape as ``ids``
    """
    x = np.asarray(ids, dtype=np.uint64)
    shape = x.shape
    x = x.reshape(-1)
    c1, c2, c3 = 0x239B961B, 0xAB0E9789, 0x38B34AE5
    k1 = x & _M32  # bytes 0..3
    k2 = x >> np.uint64(32)  # bytes 4..7
    h = np.full(len(x), seed & 0xFFFFFFFF, dtype=np.uint64)
    h1, h2, h3, h4 = h.copy(), h.copy(), h.copy(), h.copy()
    # no 16-byte body; the 8-byte tail
    k2 = _mul32(_rotl32(_mul32(k2, c2), 16), c3)
    h2 ^= k2
    k1 = _mul32(_rotl32(_mul32(k1, c1), 15), c2)
    h1 ^= k1
    n = np.uint64(8)
    h1 ^= n
    h2 ^= n
    h3 ^= n
    h4 ^= n
    h1 = (h1 + h2 + h3 + h4) & _M32
    h2 = (h2 + h1) & _M32
    h3 = (h3 + h1) & _M32
    h4 = (h4 + h1) & _M32
    h1, h2, h3, h4 = _fmix32(h1), _fmix32(h2), _fmix32(h3), _fmix32(h4)
    h1 = (h1 + h2 + h3 + h4) & _M32
    h2 = (h2 + h1) & _M32
    return (h1 | (h2 << np.uint64(32))).reshape(shape)


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------


def _check_bits(name: str, value, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= int(value) <= 64:
        raise ValueError(f"{name} must be an integer in 0..64, got {value!r}")


def choose_bits(num_segments: int, data_bytes: int, *, shard_bits: Optional[int] = None,
                minishard_bits: Optional[int] = None) -> tuple[int, int]:
    """``(shard_bits, minishard_bits)`` by the rule in the module docstring.

    Parameters
    ----------
    num_segments : int
        Segments to store.
    data_bytes : int
        Their fragment data bytes (sum over segments).
    shard_bits, minishard_bits : int, optional
        Fixed by the caller; the other one is then chosen given it.
    """
    n, b = max(0, int(num_segments)), max(0, int(data_bytes))
    per_shard_cap = MAX_SEGMENTS_PER_MINISHARD << (MAX_MINISHARD_BITS if minishard_bits is None else minishard_bits)
    s = shard_bits
    if s is None:
        s = 0
        while s + (minishard_bits or 0) < 64 and (b > (MAX_SHARD_BYTES << s) or n > (per_shard_cap << s)):
            s += 1
    m = minishard_bits
    if m is None:
        per_shard = -(-n // (1 << s))
        m = 0
        while m < MAX_MINISHARD_BITS and m + s < 64 and per_shard > (MAX_SEGMENTS_PER_MINISHARD << m):
            m += 1
    return int(s), int(m)


@dataclass(frozen=True)
class ShardingOptions:
    """What the user asks for; ``None`` bits are chosen automatically (:func:`choose_bits`).

    Attributes
    ----------
    hash : str
        ``murmurhash3_x86_128`` (default) or ``identity``.
    preshift_bits, minishard_bits, shard_bits : int or None
    minishard_index_encoding : str
        ``gzip`` (default) or ``raw``.
    data_encoding : str
        ``raw`` (default) or ``gzip``; for multi-resolution meshes it applies to the manifests
        only, the fragment data before each manifest is always raw (spec).
    """

    hash: str = "murmurhash3_x86_128"
    preshift_bits: Optional[int] = None
    minishard_bits: Optional[int] = None
    shard_bits: Optional[int] = None
    minishard_index_encoding: str = "gzip"
    data_encoding: str = "raw"

    def validate(self) -> None:
        """Raise ``ValueError`` on bad values."""
        if self.hash not in HASHES:
            raise ValueError(f"sharding hash must be one of {', '.join(HASHES)}, got {self.hash!r}")
        for name in ("preshift_bits", "minishard_bits", "shard_bits"):
            _check_bits(name, getattr(self, name), True)
        if (self.minishard_bits or 0) + (self.shard_bits or 0) > 64:
            raise ValueError("minishard_bits + shard_bits must be <= 64")
        if (self.minishard_bits or 0) > MAX_WRITE_MINISHARD_BITS:
            raise ValueError(f"minishard_bits {self.minishard_bits} would start every shard file with a "
                             f"16 * 2**{self.minishard_bits}-byte shard index; at most {MAX_WRITE_MINISHARD_BITS}")
        for name in ("minishard_index_encoding", "data_encoding"):
            if getattr(self, name) not in ENCODINGS:
                raise ValueError(f"{name} must be raw or gzip, got {getattr(self, name)!r}")

    def resolve(self, num_segments: int, data_bytes: int) -> "ShardingSpec":
        """The concrete spec for a data set of ``num_segments`` segments and ``data_bytes`` bytes."""
        self.validate()
        s, m = choose_bits(num_segments, data_bytes, shard_bits=self.shard_bits, minishard_bits=self.minishard_bits)
        return ShardingSpec(preshift_bits=self.preshift_bits or 0, hash=self.hash, minishard_bits=m, shard_bits=s,
                            minishard_index_encoding=self.minishard_index_encoding,
                            data_encoding=self.data_encoding)


def sharding_problems(obj) -> list[str]:
    """What is wrong with a ``sharding`` JSON object (empty when it is a valid spec)."""
    if not isinstance(obj, dict):
        return [f"sharding must be a JSON object, got {type(obj).__name__}"]
    problems = []
    if obj.get("@type") != SHARDED_TYPE:
        problems.append(f"sharding @type is {obj.get('@type')!r}, expected {SHARDED_TYPE!r}")
    for name in ("preshift_bits", "minishard_bits", "shard_bits"):
        v = obj.get(name)
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 64:
            problems.append(f"sharding {name} must be an integer in 0..64, got {v!r}")
    if obj.get("hash") not in HASHES:
        problems.append(f"sharding hash must be one of {list(HASHES)}, got {obj.get('hash')!r}")
    for name in ("minishard_index_encoding", "data_encoding"):
        if obj.get(name, "raw") not in ENCODINGS:
            problems.append(f"sharding {name} must be 'raw' or 'gzip', got {obj.get(name)!r}")
    if not problems and obj["minishard_bits"] + obj["shard_bits"] > 64:
        problems.append("sharding minishard_bits + shard_bits must be <= 64")
    return problems


#: The gzip header's OS byte that :func:`_gzip` writes: 3 ("Unix"), what zlib writes on Linux and
#: ``gzip.compress(mtime=0)`` on Python 3.11 and 3.12 (3.10 and 3.13 write 255, zlib on Windows
#: 10), so sharded output no longer depends on the Python version.
GZIP_OS = 3


def _gzip(data: bytes) -> bytes:
    """gzip (level 6) with mtime 0, no file name and :data:`GZIP_OS`: the same bytes on every
    run, platform and Python version (given the same zlib)."""
    c = zlib.compressobj(6, zlib.DEFLATED, 31)   # a gzip member: 10-byte header, deflate, trailer
    out = bytearray(c.compress(data) + c.flush())
    out[9] = GZIP_OS
    return bytes(out)


def _gunzip(data: bytes) -> bytes:
    """One whole gzip member, and nothing after it: Python's ``gzip.decompress`` would also take
    several members and trailing zeros, which a browser's ``DecompressionStream`` refuses."""
    d = zlib.decompressobj(31)
    try:
        out = d.decompress(data) + d.flush()
    except zlib.error as exc:
        raise ShardFormatError(f"cannot gunzip {len(data)} bytes: {exc}") from exc
    if not d.eof:
        raise ShardFormatError(f"cannot gunzip {len(data)} bytes: the gzip stream is cut short")
    if d.unused_data:
        raise ShardFormatError(f"cannot gunzip {len(data)} bytes: {len(d.unused_data)} bytes after the gzip stream")
    return out


@dataclass(frozen=True)
class ShardingSpec:
    """A concrete sharding specification (the ``sharding`` member of ``info``)."""

    preshift_bits: int = 0
    hash: str = "murmurhash3_x86_128"
    minishard_bits: int = 0
    shard_bits: int = 0
    minishard_index_encoding: str = "gzip"
    data_encoding: str = "raw"

    # -- JSON ------------------------------------------------------------------------------

    def to_json(self) -> dict:
        """The ``sharding`` object of the mesh ``info`` (sharded spec, "Sharding specification")."""
        return {
            "@type": SHARDED_TYPE,
            "preshift_bits": int(self.preshift_bits),
            "hash": self.hash,
            "minishard_bits": int(self.minishard_bits),
            "shard_bits": int(self.shard_bits),
            "minishard_index_encoding": self.minishard_index_encoding,
            "data_encoding": self.data_encoding,
        }

    @classmethod
    def from_json(cls, obj) -> "ShardingSpec":
        """Parse a ``sharding`` object; ``ValueError`` when it is not a valid spec."""
        problems = sharding_problems(obj)
        if problems:
            raise ValueError("; ".join(problems))
        return cls(preshift_bits=obj["preshift_bits"], hash=obj["hash"], minishard_bits=obj["minishard_bits"],
                   shard_bits=obj["shard_bits"], minishard_index_encoding=obj.get("minishard_index_encoding", "raw"),
                   data_encoding=obj.get("data_encoding", "raw"))

    # -- placement -------------------------------------------------------------------------

    @property
    def shard_index_bytes(self) -> int:
        """Size of the shard index at the start of every shard file."""
        return 16 << self.minishard_bits

    @property
    def num_shards(self) -> int:
        """``2**shard_bits``: how many shard files the spec addresses."""
        return 1 << self.shard_bits

    @property
    def num_minishards(self) -> int:
        """``2**minishard_bits``: minishards per shard."""
        return 1 << self.minishard_bits

    def hashed(self, ids) -> np.ndarray:
        """Hashed chunk IDs: ``hash(id >> preshift_bits)`` (uint64 array)."""
        x = np.asarray(ids, dtype=np.uint64)
        if self.preshift_bits >= 64:
            x = np.zeros_like(x)
        elif self.preshift_bits:
            x = x >> np.uint64(self.preshift_bits)
        return murmurhash3_x86_128_low64(x) if self.hash == "murmurhash3_x86_128" else x

    def locate(self, ids) -> tuple[np.ndarray, np.ndarray]:
        """``(shard, minishard)`` of each ID: int64 arrays (shards uint64 where ``shard_bits``
        is 64, whose shard numbers reach past int64)."""
        h = self.hashed(ids)
        mbits, sbits = self.minishard_bits, self.shard_bits
        ms = h & np.uint64((1 << mbits) - 1) if mbits < 64 else h
        sh = h >> np.uint64(mbits) if mbits < 64 else np.zeros_like(h)
        if sbits < 64:
            sh = sh & np.uint64((1 << sbits) - 1)
        return (sh if sbits == 64 else sh.astype(np.int64)), ms.astype(np.int64)

    def shard_key(self, shard: int) -> str:
        """File name of a shard: lowercase hex, zero-padded to ``ceil(shard_bits / 4)`` digits."""
        width = -(-self.shard_bits // 4)
        return f"{int(shard):0{width}x}.shard" if width else f"{int(shard):x}.shard"

    def parse_shard_key(self, key: str) -> Optional[int]:
        """Shard number of a file name that is exactly :meth:`shard_key` of a valid shard, else None."""
        m = _SHARD_KEY.match(key)
        if not m:
            return None
        shard = int(m.group(1), 16)
        if shard >= self.num_shards or self.shard_key(shard) != key:
            return None
        return shard

    # -- encodings -------------------------------------------------------------------------

    def encode_data(self, payload: bytes) -> bytes:
        """A chunk's bytes as stored in its shard (``data_encoding``: raw, or gzip)."""
        return _gzip(payload) if self.data_encoding == "gzip" else bytes(payload)

    def decode_data(self, stored: bytes) -> bytes:
        """The inverse of :meth:`encode_data`."""
        return _gunzip(stored) if self.data_encoding == "gzip" else bytes(stored)

    def encode_minishard_index(self, ids: Sequence[int], starts: Sequence[int], sizes: Sequence[int]) -> bytes:
        """Encoded minishard index of chunks at ``starts`` (file offsets) with ``sizes``.

        Chunks must be listed in file order (as written); IDs are delta-encoded in that order.
        """
        ids = np.asarray(ids, dtype=np.uint64)
        starts = np.asarray(starts, dtype=np.uint64) - np.uint64(self.shard_index_bytes)
        sizes = np.asarray(sizes, dtype=np.uint64)
        prev_end = np.concatenate([np.zeros(1, np.uint64), (starts + sizes)[:-1]])
        arr = np.stack([np.diff(ids, prepend=np.uint64(0)), starts - prev_end, sizes])
        raw = arr.astype("<u8").tobytes()
        return _gzip(raw) if self.minishard_index_encoding == "gzip" else raw

    def decode_minishard_index(self, stored: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(ids, starts, sizes)`` (uint64; starts are file offsets) of an encoded minishard index.

        Raises
        ------
        ShardFormatError
            Bad gzip, or a length that is not a multiple of 24.
        """
        raw = _gunzip(stored) if self.minishard_index_encoding == "gzip" else bytes(stored)
        if len(raw) % 24:
            raise ShardFormatError(f"minishard index of {len(raw)} bytes is not a multiple of 24")
        n = len(raw) // 24
        arr = np.frombuffer(raw, "<u8").reshape(3, n).astype(np.uint64)
        with np.errstate(over="ignore"):
            ids = np.cumsum(arr[0], dtype=np.uint64)
            sizes = arr[2]
            prev = np.concatenate([np.zeros(1, np.uint64), np.cumsum(sizes, dtype=np.uint64)[:-1]])
            starts = np.cumsum(arr[1], dtype=np.uint64) + prev + np.uint64(self.shard_index_bytes)
        return ids, starts, sizes

    def decode_shard_index(self, stored: bytes) -> np.ndarray:
        """``(2**minishard_bits, 2)`` uint64 ``[start, end)`` file offsets of each minishard index.

        Raises
        ------
        ShardFormatError
            When ``stored`` is shorter than the shard index.
        """
        nbytes = self.shard_index_bytes
        if len(stored) < nbytes:
            raise ShardFormatError(f"shard of {len(stored)} bytes is shorter than its {nbytes}-byte shard index")
        arr = np.frombuffer(stored, "<u8", 2 * self.num_minishards).reshape(-1, 2).astype(np.uint64)
        with np.errstate(over="ignore"):
            return arr + np.uint64(nbytes)


def build_shard(spec: ShardingSpec, items: Iterable[tuple[int, bytes, bytes]]) -> bytes:
    """One shard file.

    Parameters
    ----------
    spec : ShardingSpec
    items : iterable of (segment ID, prefix, payload)
        All segments of the shard.  ``payload`` is the indexed chunk (encoded here per
        ``data_encoding``); ``prefix`` (possibly empty) is stored raw immediately before it (for
        meshes: the fragment data before the manifest).

    Returns
    -------
    bytes
        Shard index, then the chunks minishard by minishard (IDs increasing), then the
        minishard indices.  The same items give the same bytes.
    """
    items = list(items)
    if not items:
        return b""
    ids = np.array([it[0] for it in items], dtype=np.uint64)
    _, minishards = spec.locate(ids)
    order = np.lexsort((ids, minishards))
    base = spec.shard_index_bytes
    parts = [b""]
    pos = base
    per_minishard: dict[int, tuple[list, list, list]] = {}
    for i in order.tolist():
        seg, prefix, payload = items[i]
        parts.append(prefix)
        pos += len(prefix)
        enc = spec.encode_data(payload)
        parts.append(enc)
        entry = per_minishard.setdefault(int(minishards[i]), ([], [], []))
        entry[0].append(int(seg))
        entry[1].append(pos)
        entry[2].append(len(enc))
        pos += len(enc)
    index = np.zeros((spec.num_minishards, 2), dtype="<u8")
    for ms in range(spec.num_minishards):
        if ms in per_minishard:
            sids, starts, sizes = per_minishard[ms]
            enc = spec.encode_minishard_index(sids, starts, sizes)
            parts.append(enc)
            index[ms] = (pos - base, pos - base + len(enc))
            pos += len(enc)
        else:
            index[ms] = (pos - base, pos - base)
    parts[0] = index.tobytes()
    return b"".join(parts)
