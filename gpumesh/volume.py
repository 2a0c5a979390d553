"""Open 3-D segmentation label volumes for chunked reading.

:func:`open_volume` accepts a NumPy array, a TensorStore, a TensorStore spec or a path /
URL of a zarr (v2, v3), OME-Zarr (0.4, 0.5), N5 or Neuroglancer precomputed volume and
returns a :class:`Volume` whose :meth:`Volume.read` gives label boxes with axes
``x, y, z``.

Axis convention
---------------
Arrays are presented with axes ``x, y, z`` whatever the storage order. The storage axes
are identified, in order of precedence, by

1. the ``axes`` argument of :func:`open_volume` (a permutation of ``"xyz"``, optionally
   with extra letters for singleton non-spatial axes, e.g. ``"czyx"``);
2. the format's axis names: OME-Zarr ``multiscales[0].axes``, zarr v3
   ``dimension_names``, zarr v2 ``_ARRAY_DIMENSIONS`` in ``.zattrs`` (xarray convention),
   N5 ``axes`` attribute, TensorStore dimension labels (names match ``x``/``y``/``z``
   case-insensitively; names are used only when each of x, y and z appears once);
3. otherwise the storage order is taken as ``x, y, z`` (the Neuroglancer / cloud-volume
   convention); leading singleton axes of a rank > 3 array are dropped.

Axes other than x, y and z (channel, time) must have size 1 and are dropped.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional, Sequence

import numpy as np
import tensorstore as ts

from . import storage
from .errors import (InvalidVolumeError, InvalidVoxelSizeError, NoVoxelSizeWarning, SourceReadError,
                     VoxelSizeOverrideWarning, one_line)

__all__ = ["Volume", "open_volume", "portable_source"]

_FORMAT_PREFIXES = {
    "zarr://": "zarr",
    "zarr2://": "zarr2",
    "zarr3://": "zarr3",
    "n5://": "n5",
    "precomputed://": "precomputed",
}

# Length units (OME-Zarr / UDUNITS names and common abbreviations) in nanometres.
_UNIT_NM = {
    "angstrom": 0.1, "å": 0.1,
    "attometer": 1e-9, "zeptometer": 1e-12, "yoctometer": 1e-15,
    "femtometer": 1e-6, "fm": 1e-6,
    "picometer": 1e-3, "pm": 1e-3,
    "nanometer": 1.0, "nm": 1.0, "nanometre": 1.0,
    "micrometer": 1e3, "um": 1e3, "µm": 1e3, "μm": 1e3, "micron": 1e3, "micrometre": 1e3,
    "millimeter": 1e6, "mm": 1e6, "millimetre": 1e6,
    "centimeter": 1e7, "cm": 1e7, "centimetre": 1e7,
    "decimeter": 1e8, "dm": 1e8,
    "meter": 1e9, "m": 1e9, "metre": 1e9,
    "decameter": 1e10, "hectometer": 1e11,
    "kilometer": 1e12, "km": 1e12,
    "inch": 2.54e7, "foot": 3.048e8, "yard": 9.144e8, "mile": 1.609344e12,
}


@dataclass(frozen=True, eq=False)
class Volume:
    """A label volume opened for chunked reading. Axes are always x, y, z.

    Attributes
    ----------
    shape : tuple of 3 int
        Size in voxels, ``(x, y, z)``.
    dtype : numpy.dtype
        Label dtype as returned by :meth:`read`: uint8, uint16, uint32 or uint64 (signed
        sources are viewed as the unsigned dtype of the same width).
    voxel_size : numpy.ndarray
        float64, shape (3,): nm per voxel along x, y, z.
    voxel_offset : numpy.ndarray
        int64, shape (3,): global voxel coordinate of array index 0.
    description : str
        Human-readable description of the source, e.g. ``"zarr v3 /path (mip 0)"``.
    precomputed : dict or None
        For a Neuroglancer precomputed source: ``{"kvstore": <kvstore spec dict of the
        volume root, the directory holding info>, "info": <info dict>, "scale_key":
        <key of the chosen scale>}``; else ``None``.
    voxel_size_known : bool
        False when neither the caller nor the metadata gave the voxel size, which is then
        (1, 1, 1) (the main job and ad-hoc meshing warn: :class:`gpumesh.errors.NoVoxelSizeWarning`).
    location : dict or None
        The TensorStore kvstore spec of the storage the volume was opened from (the location
        given, or an opened TensorStore's kvstore); ``None`` for an in-memory array, or where
        TensorStore does not say.  The main job keeps its destination apart from it, and a
        ``memory://`` location keeps the job in one process.
    """

    shape: tuple
    dtype: np.dtype
    voxel_size: np.ndarray
    voxel_offset: np.ndarray
    description: str
    precomputed: Optional[dict]
    _reader: Callable[[tuple, tuple], np.ndarray] = field(repr=False)
    _chunk_shape: Optional[tuple] = field(default=None, repr=False)
    voxel_size_known: bool = True
    location: Optional[dict] = field(default=None, repr=False)

    @property
    def chunk_shape(self) -> Optional[tuple]:
        """Storage chunk shape ``(x, y, z)`` in voxels, or ``None`` when unknown."""
        return self._chunk_shape

    def read(self, start: Sequence[int], stop: Sequence[int]) -> np.ndarray:
        """Read the labels of a box.

        Parameters
        ----------
        start, stop : sequence of 3 int
            The box ``[start, stop)`` in array index coordinates (0-based; ``voxel_offset``
            is NOT applied), axes x, y, z. Parts outside ``[0, shape)`` read as 0.

        Returns
        -------
        numpy.ndarray
            C-contiguous array of shape ``stop - start`` (axes x, y, z), dtype
            :attr:`dtype`.

        Raises
        ------
        ValueError
            If ``start``/``stop`` are not 3 integers each or ``stop < start``.
        InvalidVolumeError
            If a signed source holds negative labels in the box.
        SourceReadError
            If the storage cannot be read, or (opened with ``fill_missing=False``) a chunk
            that the box needs is not stored.
        """
        start = _int3(start, "start")
        stop = _int3(stop, "stop")
        size = tuple(b - a for a, b in zip(start, stop))
        if any(s < 0 for s in size):
            raise ValueError(f"box stop {stop} is before start {start}")
        cstart = tuple(max(a, 0) for a in start)
        cstop = tuple(min(b, n) for b, n in zip(stop, self.shape))
        if any(b <= a for a, b in zip(cstart, cstop)):
            return np.zeros(size, dtype=self.dtype)
        try:
            block = self._reader(cstart, cstop)
        except (InvalidVolumeError, SourceReadError):
            raise
        except Exception as exc:
            hint = ""
            if str(exc).startswith("NOT_FOUND") and "is missing" in str(exc):   # open_volume(fill_missing=False)
                hint = " (a storage chunk that is not stored; --fill-missing reads such chunks as background)"
            raise SourceReadError(f"cannot read box {cstart}-{cstop} of {self.description}: {exc}{hint}") from exc
        block = self._as_labels(np.asarray(block), f"box {cstart}-{cstop} of ")
        if cstart == start and cstop == stop:
            return np.ascontiguousarray(block)
        out = np.zeros(size, dtype=self.dtype)
        out[tuple(slice(a - s, b - s) for a, b, s in zip(cstart, cstop, start))] = block
        return out

    def crop(self, bounds: Sequence[int]) -> "Volume":
        """The part of this volume inside a box, as a volume of its own.

        Parameters
        ----------
        bounds : sequence of 6 int
            ``(x0, y0, z0, x1, y1, z1)``: the box ``[x0, x1) x [y0, y1) x [z0, z1)`` in global
            voxel coordinates of this volume's scale (:attr:`voxel_offset` included, as
            Neuroglancer shows them for mip 0; at a coarser mip, that scale's voxels), clipped
            to the volume.

        Returns
        -------
        Volume
            Shape ``(x1 - x0, ...)`` after clipping, ``voxel_offset`` ``(x0, y0, z0)``, the same
            voxel size and dtype; it reads the same labels at the same global coordinates, so a
            segment cut by the box is meshed closed at the box's faces, as at a volume border.

        Raises
        ------
        InvalidVolumeError
            ``bounds`` is not 6 integers, or the box is empty or misses the volume.
        """
        try:
            items = list(bounds)
            first, last = _int3(items[:3], "bounds"), _int3(items[3:], "bounds")
        except (TypeError, ValueError):
            raise InvalidVolumeError(f"bounds must be 6 integers x0,y0,z0,x1,y1,z1 (within +-2**62), got {bounds!r}") from None
        lo = np.maximum(np.asarray(first, np.int64) - self.voxel_offset, 0)
        hi = np.minimum(np.asarray(last, np.int64) - self.voxel_offset, self.shape)
        if (hi <= lo).any():
            top = self.voxel_offset + np.asarray(self.shape)
            raise InvalidVolumeError(
                f"bounds {first + last} hold no voxel of {self.description}, which spans "
                f"{tuple(self.voxel_offset.tolist())} to {tuple(top.tolist())} (voxels, end excluded)")
        start = tuple(int(v) for v in lo)
        reader = self._reader

        def read(a, b):
            return reader(tuple(x + o for x, o in zip(a, start)), tuple(x + o for x, o in zip(b, start)))

        return replace(self, shape=tuple(int(v) for v in hi - lo), voxel_offset=self.voxel_offset + lo,
                       description=f"{self.description} [{start} to {tuple(int(v) for v in hi)})",
                       _reader=read)

    def _as_labels(self, block: np.ndarray, where: str = "") -> np.ndarray:
        if not block.dtype.isnative:
            block = block.astype(block.dtype.newbyteorder("="))
        if block.dtype.kind == "i":
            if block.size and block.min() < 0:
                raise InvalidVolumeError(
                    f"negative label {int(block.min())} in {where}{self.description}: labels must be >= 0"
                )
            block = block.view(self.dtype)
        elif block.dtype != self.dtype:
            block = block.astype(self.dtype)
        return block


# ----------------------------------------------------------------------------- helpers


def _int3(value: Any, name: str) -> tuple:
    try:
        items = [v for v in value]
    except TypeError:
        raise ValueError(f"{name} must be 3 integers, got {value!r}") from None
    if len(items) != 3 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in items):
        raise ValueError(f"{name} must be 3 integers, got {value!r}")
    if not all(-2**62 <= int(v) < 2**62 for v in items):   # int64 arithmetic on them stays exact
        raise ValueError(f"{name} must be 3 integers within +-2**62, got {value!r}")
    return tuple(int(v) for v in items)


def _check_voxel_size(value: Any, what: str = "voxel size") -> np.ndarray:
    try:
        if isinstance(value, (str, bytes)):
            raise TypeError
        items = list(value)
        arr = np.array([float(v) for v in items], dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidVoxelSizeError(f"{what} must be 3 finite numbers > 0 (nm), got {value!r}") from None
    if arr.shape != (3,) or not np.all(np.isfinite(arr)) or not np.all(arr > 0):
        raise InvalidVoxelSizeError(f"{what} must be 3 finite numbers > 0 (nm), got {arr.tolist()}")
    return arr


def _check_voxel_offset(value: Any) -> np.ndarray:
    try:
        if isinstance(value, (str, bytes)):
            raise TypeError
        items = [float(v) for v in value]
    except (TypeError, ValueError):
        raise InvalidVolumeError(f"voxel offset must be 3 integers, got {value!r}") from None
    if len(items) != 3 or not all(math.isfinite(v) and v == int(v) and abs(v) < 2**62 for v in items):
        raise InvalidVolumeError(f"voxel offset must be 3 integers (|offset| < 2**62), got {value!r}")
    return np.array([int(v) for v in items], dtype=np.int64)


def label_dtype(dtype: Any) -> np.dtype:
    """The unsigned dtype the kernels (CPU and GPU) read for a label dtype: signed labels are
    read as the unsigned type of their width (:func:`gpumesh.marching.unsigned_view`).

    Raises
    ------
    TypeError
        Not an integer dtype of 1, 2, 4 or 8 bytes.
    """
    dt = np.dtype(dtype)
    if dt.kind not in "iu" or dt.itemsize not in (1, 2, 4, 8):
        raise TypeError(f"labels must be uint8..uint64 or int8..int64 (got {dt})")
    return np.dtype(f"uint{dt.itemsize * 8}")


def _label_dtype(dtype: Any, where: str) -> np.dtype:
    """:func:`label_dtype`, or InvalidVolumeError naming ``where``."""
    try:
        return label_dtype(dtype)
    except TypeError:
        raise InvalidVolumeError(
            f"{where} has dtype {np.dtype(dtype).name}: labels must be an integer type (uint8..uint64 or int8..int64)"
        ) from None


def _parse_axes(axes: Optional[str], rank: int) -> Optional[list]:
    if axes is None:
        return None
    if not isinstance(axes, str):
        raise InvalidVolumeError(f"axes must be a string such as 'zyx', got {axes!r}")
    names = list(axes.lower())
    if len(names) != rank:
        raise InvalidVolumeError(f"axes {axes!r} has {len(names)} letters but the volume has rank {rank}")
    if len(set(names)) != len(names) or not {"x", "y", "z"} <= set(names):
        raise InvalidVolumeError(f"axes {axes!r} must name each of x, y, z once (other letters: singleton axes)")
    return names


def _spatial_dims(names: Optional[list], shape: Sequence[int], where: str, axes_arg: Optional[str]) -> tuple:
    """Storage dimension indices of x, y, z and the indices of dropped singleton dims."""
    rank = len(shape)
    given = _parse_axes(axes_arg, rank)
    if given is not None:
        names = given
    elif isinstance(names, (list, tuple)):
        lowered = [str(n).lower() if n is not None else "" for n in names]
        if len(lowered) == rank and all(lowered.count(a) == 1 for a in "xyz"):
            names = lowered
        elif len(lowered) == rank and any(a in lowered for a in "xyz"):
            # names such as c, y, x (a 2-D image): taking storage order as x, y, z would mesh
            # the stored x as z
            raise InvalidVolumeError(
                f"{where} names its axes {list(names)}: not each of x, y, z once, so it is no 3-D label volume "
                f"(give axes=, e.g. 'czyx', where the names are wrong)")
        else:
            names = None  # no spatial names (dim_0, ...): fall back to storage order
    else:
        names = None  # no names, or malformed metadata: storage order
    if names is None:
        if rank < 3:
            raise InvalidVolumeError(f"{where} has rank {rank}: a label volume must be 3-D (x, y, z)")
        lead = rank - 3
        extra = list(range(lead))
        for d in extra:
            if shape[d] != 1:
                hint = "e.g. 'czyx'"
                if rank == 4 and shape[3] == 1:   # cloud-volume's arrays are (x, y, z, channel)
                    hint = "'xyzc' for an (x, y, z, channel) array such as cloud-volume's"
                raise InvalidVolumeError(
                    f"{where} has shape {tuple(shape)}: rank {rank} with non-singleton leading axis; "
                    f"a label volume must be 3-D (give axes=, {hint}, to name the axes)"
                )
        return (lead, lead + 1, lead + 2), extra
    xyz = tuple(names.index(a) for a in "xyz")
    extra = [d for d in range(rank) if d not in xyz]
    for d in extra:
        if shape[d] != 1:
            raise InvalidVolumeError(
                f"{where} has non-spatial axis {names[d]!r} of size {shape[d]}: only x, y, z may exceed size 1"
            )
    return xyz, extra


def _check_shape(shape: Sequence[int], where: str) -> tuple:
    shape = tuple(int(s) for s in shape)
    if any(s == 0 for s in shape):
        raise InvalidVolumeError(f"{where} is an empty volume (shape {shape})")
    return shape


def _units_to_nm(units: Sequence[Any]) -> Optional[np.ndarray]:
    """Voxel size from TensorStore dimension units (x, y, z), or None when not all known."""
    out = []
    for u in units:
        if u is None:
            return None
        factor = _UNIT_NM.get(str(u.base_unit).lower())
        if factor is None:
            return None
        out.append(u.multiplier * factor)
    return np.array(out, dtype=np.float64)


def _unit_nm(unit: Optional[str], where: str) -> float:
    if unit is None or unit == "":
        return 1.0
    factor = _UNIT_NM.get(str(unit).lower())
    if factor is None:
        raise SourceReadError(f"{where}: unknown length unit {unit!r}")
    return factor


def _spatial_attr(value: Any, xyz: tuple, rank: int) -> Optional[list]:
    """A per-axis attribute list in x, y, z order (given in storage order)."""
    if not isinstance(value, (list, tuple)):
        return None
    if len(value) == rank:
        return [value[d] for d in xyz]
    if len(value) == 3:
        order = sorted(range(3), key=lambda i: xyz[i])  # spatial axes in storage order
        out = [None] * 3
        for k, i in enumerate(order):
            out[i] = value[k]
        return out
    return None


def _funlib_offset(attrs: dict, xyz: tuple, rank: int, where: str) -> Optional[np.ndarray]:
    """The voxel offset of funlib's and daisy's zarr attributes: ``offset`` in world units (nm)
    beside ``resolution``, both in storage order; ``None`` (with a warning) when it is not a
    whole number of voxels."""
    off = _spatial_attr(attrs.get("offset"), xyz, rank)
    res = _spatial_attr(attrs.get("resolution"), xyz, rank)
    try:
        vox = [float(o) / float(r) for o, r in zip(off, res)]
    except (TypeError, ValueError, ZeroDivisionError):
        vox = None
    if vox is None or not all(math.isfinite(v) and abs(v) < 2**62 and abs(v - round(v)) < 1e-6 for v in vox):
        warnings.warn(f"{where}: attribute offset {attrs.get('offset')} is not a whole number of voxels of "
                      f"resolution {attrs.get('resolution')}: ignored (give --voxel-offset)", stacklevel=4)
        return None
    return np.array([int(round(v)) for v in vox], dtype=np.int64)


# ----------------------------------------------------------------------------- readers


def _tensorstore_volume(
    store: ts.TensorStore,
    *,
    where: str,
    description: str,
    names: Optional[list],
    axes: Optional[str],
    voxel_size: Optional[np.ndarray],
    voxel_offset: Optional[np.ndarray],
    attrs: Optional[dict] = None,
    precomputed: Optional[dict] = None,
) -> Volume:
    """Build a Volume over an opened TensorStore."""
    ldtype = _label_dtype(store.dtype.numpy_dtype, where)
    shape = tuple(int(s) for s in store.domain.shape)
    if names is None and any(store.domain.labels):
        names = list(store.domain.labels)
    xyz, extra = _spatial_dims(names, shape, where, axes)
    origin = store.domain.origin
    # Zero-based view, singleton axes indexed away, dims reordered to x, y, z.
    view = store.translate_to[0]
    if extra:
        view = view[ts.d[tuple(extra)][tuple(0 for _ in extra)]]
        remaining = [d for d in range(len(shape)) if d not in extra]
        vxyz = tuple(remaining.index(d) for d in xyz)
    else:
        vxyz = xyz
    view = view[ts.d[vxyz].transpose[0, 1, 2]]
    xyz_shape = _check_shape([shape[d] for d in xyz], where)

    if voxel_size is None and attrs:
        for key in ("voxel_size_nm", "resolution"):
            vs = _spatial_attr(attrs.get(key), xyz, len(shape))
            if vs is not None:
                voxel_size = _check_voxel_size(vs, f"{where} attribute {key}")
                break
    if voxel_size is None:
        try:
            units = store.dimension_units
        except Exception:
            units = None
        if units is not None:
            voxel_size = _units_to_nm([units[d] for d in xyz])
    given_offset = voxel_offset is not None
    if voxel_offset is None and attrs and "voxel_offset" in attrs:
        vo = _spatial_attr(attrs.get("voxel_offset"), xyz, len(shape))
        if vo is not None:
            voxel_offset = _check_voxel_offset(vo)
    if voxel_offset is None and attrs and "offset" in attrs and "resolution" in attrs:
        voxel_offset = _funlib_offset(attrs, xyz, len(shape), where)
    if voxel_offset is not None and not given_offset and any(origin):
        # the attributes place stored index 0; a view cropped at the low end starts at its origin
        voxel_offset = voxel_offset + np.array([origin[d] for d in xyz], dtype=np.int64)
    if voxel_offset is None:
        voxel_offset = np.array([origin[d] for d in xyz], dtype=np.int64)

    chunk = None
    try:
        cs = store.chunk_layout.read_chunk.shape
        if cs is not None:
            chunk = tuple(int(cs[d]) for d in xyz)
    except Exception:
        chunk = None

    def reader(start: tuple, stop: tuple) -> np.ndarray:
        box = view[start[0]:stop[0], start[1]:stop[1], start[2]:stop[2]]
        return box.read().result()

    return Volume(
        shape=xyz_shape,
        dtype=ldtype,
        voxel_size=voxel_size if voxel_size is not None else np.ones(3),
        voxel_offset=voxel_offset,
        description=description,
        precomputed=precomputed,
        _reader=reader,
        _chunk_shape=chunk,
        voxel_size_known=voxel_size is not None,
    )


def warn_if_no_voxel_size(volume: Volume) -> None:
    """Warn (:class:`gpumesh.errors.NoVoxelSizeWarning`) when ``volume``'s voxel size is the
    (1, 1, 1) default, i.e. neither its metadata nor the caller gave one: the meshes written
    would be in voxels, labelled nm."""
    if not volume.voxel_size_known:
        warnings.warn(NoVoxelSizeWarning(
            f"{volume.description} states no voxel size and none was given: the meshes are in voxels "
            f"(1 nm each); give it in nm (--voxel-size X,Y,Z; Python: voxel_size=(x, y, z))"), stacklevel=3)


def warn_if_voxel_size_overridden(source: Any, volume: Volume, voxel_size, *, mip: int = 0,
                                  axes: Optional[str] = None) -> None:
    """Warn (:class:`gpumesh.errors.VoxelSizeOverrideWarning`) when ``voxel_size`` was given
    and differs from the one the metadata of ``source`` states (``volume`` is ``source``
    opened with it): the meshes would not overlay the volume in a viewer.  Opens ``source``
    once more without it (its metadata only: a few small reads), with ``volume``'s voxel
    offset and its own warnings silenced; nothing for arrays and Volumes."""
    if voxel_size is None or isinstance(source, (np.ndarray, Volume)):
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # the first open said what there was to say
            stored = open_volume(source, mip=mip, axes=axes, voxel_offset=volume.voxel_offset)
    except Exception:   # it opened a moment ago: nothing to compare
        return
    if stored.voxel_size_known and not np.allclose(stored.voxel_size, volume.voxel_size, rtol=1e-6, atol=0):
        def nm(v):
            return ",".join(f"{float(x):g}" for x in v)

        warnings.warn(VoxelSizeOverrideWarning(
            f"the voxel size given, {nm(volume.voxel_size)} nm, differs from the {nm(stored.voxel_size)} nm that "
            f"{stored.description} states: the meshes are placed by the one given, so they will not overlay the "
            f"volume where a viewer shows it by its own metadata"), stacklevel=3)


def _numpy_volume(arr: np.ndarray, axes: Optional[str], voxel_size, voxel_offset) -> Volume:
    where = f"numpy array of shape {arr.shape}"
    ldtype = _label_dtype(arr.dtype, where)
    xyz, extra = _spatial_dims(None, arr.shape, where, axes)
    view = arr[tuple(0 if d in extra else slice(None) for d in range(arr.ndim))]
    remaining = [d for d in range(arr.ndim) if d not in extra]
    view = view.transpose([remaining.index(d) for d in xyz])
    shape = _check_shape(view.shape, where)

    def reader(start: tuple, stop: tuple) -> np.ndarray:
        return np.array(view[start[0]:stop[0], start[1]:stop[1], start[2]:stop[2]], order="C", copy=True)

    return Volume(
        shape=shape,
        dtype=ldtype,
        voxel_size=voxel_size if voxel_size is not None else np.ones(3),
        voxel_offset=voxel_offset if voxel_offset is not None else np.zeros(3, np.int64),
        description=f"numpy array {shape} {arr.dtype.name}",
        precomputed=None,
        _reader=reader,
        _chunk_shape=None,
        voxel_size_known=voxel_size is not None,
    )


@dataclass(frozen=True)
class _Opening:
    """How :func:`open_volume` opens a stored array: its chunk cache (``context``; ``None``:
    gpumesh's default context) and whether missing chunks read as the fill value."""

    context: Optional[ts.Context] = None
    fill_missing: bool = True


def _ts_open(spec: dict, where: str, kvstore: Optional[ts.KvStore] = None,
             how: _Opening = _Opening()) -> ts.TensorStore:
    if not how.fill_missing:
        spec = {**spec, "fill_missing_data_reads": False}   # a missing chunk is then a read error
    try:
        if kvstore is not None:
            return ts.open(spec, kvstore=kvstore, read=True, context=how.context).result()
        return ts.open(spec, read=True, context=how.context or storage._default_context()).result()
    except Exception as exc:
        raise SourceReadError(f"cannot open {where}: {one_line(exc)}") from exc


def _read_json(kv: ts.KvStore, key: str, where: str) -> Optional[Any]:
    try:
        data = storage.read(kv, key)
    except Exception as exc:
        raise SourceReadError(f"cannot read {where}/{key}: {one_line(exc)}") from exc
    if data is None:
        return None
    try:
        return json.loads(data)
    except ValueError as exc:
        raise SourceReadError(f"bad JSON in {where}/{key}: {one_line(exc)}") from exc


def _object(value) -> dict:
    """``value`` if it is a JSON object, else an empty one (optional metadata of the wrong type
    is ignored, as a missing one is)."""
    return value if isinstance(value, dict) else {}


def _sub(kv: ts.KvStore, path: str) -> ts.KvStore:
    path = path.strip("/")
    return kv / (path + "/") if path and path != "." else kv


def _no_mip(mip: int, where: str) -> None:
    if mip != 0:
        raise SourceReadError(f"{where} has a single scale (mip 0); mip {mip} requested")


# ----------------------------------------------------------------------------- formats


def _open_zarr(kv, where, version, mip, axes, voxel_size, voxel_offset, how: _Opening = _Opening()) -> Volume:
    if version == 3:
        meta = _read_json(kv, "zarr.json", where)
        if meta is None:
            raise SourceReadError(f"no zarr.json at {where}")
        if not isinstance(meta, dict):
            raise SourceReadError(f"bad zarr.json at {where}: not a JSON object")
        if meta.get("node_type") == "group":
            attrs = _object(meta.get("attributes"))
            ms = _object(attrs.get("ome")).get("multiscales") or attrs.get("multiscales")
            if not ms:
                raise SourceReadError(f"zarr v3 group without OME-Zarr multiscales at {where}")
            return _open_ome(kv, where, ms, 3, mip, axes, voxel_size, voxel_offset, how)
        _no_mip(mip, where)
        attrs = _object(meta.get("attributes"))
        names = meta.get("dimension_names")
        store = _ts_open({"driver": "zarr3"}, where, kv, how)
        return _tensorstore_volume(
            store, where=where, description=f"zarr v3 {where} (mip 0)", names=names, axes=axes,
            voxel_size=voxel_size, voxel_offset=voxel_offset, attrs=attrs,
        )
    zarray = _read_json(kv, ".zarray", where)
    zattrs = _zattrs(kv, where)
    if zarray is None:
        ms = zattrs.get("multiscales")
        if not ms:
            raise SourceReadError(f"zarr v2 group without OME-Zarr multiscales at {where}")
        return _open_ome(kv, where, ms, 2, mip, axes, voxel_size, voxel_offset, how)
    _no_mip(mip, where)
    store = _ts_open({"driver": "zarr"}, where, kv, how)
    return _tensorstore_volume(
        store, where=where, description=f"zarr v2 {where} (mip 0)", names=zattrs.get("_ARRAY_DIMENSIONS"),
        axes=axes, voxel_size=voxel_size, voxel_offset=voxel_offset, attrs=zattrs,
    )


def _zattrs(kv, where) -> dict:
    """A zarr v2 node's ``.zattrs`` ({} where there is none)."""
    zattrs = _read_json(kv, ".zattrs", where) or {}
    if not isinstance(zattrs, dict):
        raise SourceReadError(f"bad .zattrs at {where}")
    return zattrs


def _open_ome(kv, where, multiscales, zarr_version, mip, axes, voxel_size, voxel_offset,
              how: _Opening = _Opening()) -> Volume:
    try:
        ms = multiscales[0]
        datasets = ms["datasets"]
        ax = ms.get("axes")
        names = None
        units: list = []
        if ax is not None:
            names = [a["name"] if isinstance(a, dict) else str(a) for a in ax]
            units = [a.get("unit") if isinstance(a, dict) else None for a in ax]
        if not 0 <= mip < len(datasets):
            raise SourceReadError(
                f"OME-Zarr {where} has no scale mip {mip}; available: "
                + ", ".join(f"{i}: {d.get('path')}" for i, d in enumerate(datasets))
            )
        ds = datasets[mip]
        path = ds["path"]
        if not isinstance(path, str):
            raise SourceReadError(f"OME-Zarr {where}: dataset {mip} has path {path!r}, not a string")

        def scale_translation(transforms, rank):
            """The transforms' scale and translation, and whether any scale was among them."""
            s = np.ones(rank)
            t = np.zeros(rank)
            scaled = False
            for tr in transforms or []:
                if tr.get("type") == "scale":
                    s = s * np.asarray(tr["scale"], dtype=np.float64)
                    t = t * np.asarray(tr["scale"], dtype=np.float64)
                    scaled = True
                elif tr.get("type") == "translation":
                    t = t + np.asarray(tr["translation"], dtype=np.float64)
            return s, t, scaled
    except SourceReadError:
        raise
    except Exception as exc:
        raise SourceReadError(f"bad OME-Zarr multiscales metadata at {where}: {one_line(exc)}") from exc

    sub = _sub(kv, path)
    dwhere = f"{where.rstrip('/')}/{path}"
    store = _ts_open({"driver": "zarr3" if zarr_version == 3 else "zarr"}, dwhere, sub, how)
    rank = store.rank
    if names is None and str(ms.get("version")) in ("0.1", "0.2") and rank <= 5:
        names = list("tczyx"[5 - rank:])   # before axes (0.3), images were t, c, z, y, x
    if names is not None and len(names) != rank:
        raise SourceReadError(f"OME-Zarr {where}: {len(names)} axes for a rank-{rank} array {path!r}")
    shape = tuple(store.domain.shape)
    xyz, _ = _spatial_dims(names, shape, dwhere, axes)
    try:
        s, t, scaled = scale_translation(ds.get("coordinateTransformations"), rank)
        s2, t2, scaled2 = scale_translation(ms.get("coordinateTransformations"), rank)
        s, t, scaled = s * s2, t * s2 + t2, scaled or scaled2
    except Exception as exc:
        raise SourceReadError(f"bad OME-Zarr coordinateTransformations at {where}: {one_line(exc)}") from exc
    if voxel_size is None and scaled:   # without a scale, no voxel size is known (NoVoxelSizeWarning)
        factors = [_unit_nm(units[d] if d < len(units) else None, where) for d in xyz]
        voxel_size = _check_voxel_size([s[d] * f for d, f in zip(xyz, factors)], f"OME-Zarr {where} scale")
    if voxel_offset is None:
        with np.errstate(divide="ignore", invalid="ignore"):
            offset = [float(t[d] / s[d]) for d in xyz]
        if not all(math.isfinite(v) and abs(v) < 2**62 for v in offset):
            raise SourceReadError(f"OME-Zarr {where}: translation / scale {offset} is not a voxel offset")
        voxel_offset = np.array([int(round(v)) for v in offset], dtype=np.int64)
    version = "0.5" if zarr_version == 3 else "0.4"
    return _tensorstore_volume(
        store, where=dwhere, description=f"OME-Zarr {version} {where} (mip {mip}: {path})", names=names,
        axes=axes, voxel_size=voxel_size, voxel_offset=voxel_offset,
    )


def _n5_voxel_size(attrs: dict, where: str) -> Optional[list]:
    res = attrs.get("resolution")
    if res is None:
        res = attrs.get("pixelResolution")
    if res is None:
        return None
    unit = attrs.get("units")
    if isinstance(res, dict):
        unit = res.get("unit")
        res = res.get("dimensions")
    if not isinstance(res, list):
        return None
    if not all(isinstance(r, (int, float)) for r in res):
        raise InvalidVoxelSizeError(f"N5 {where} resolution must be finite numbers > 0 (nm), got {res!r}")
    if isinstance(unit, list):
        return [r * _unit_nm(u, where) for r, u in zip(res, unit)] if len(unit) == len(res) else None
    f = _unit_nm(unit, where)
    return [r * f for r in res]


def _n5_level_voxel_size(attrs: dict, where: str) -> Optional[list]:
    """A dataset's voxel size from its attributes: its ``resolution`` (the level's own, as
    paintera and BigCat write it), else its ``pixelResolution`` times its
    ``downsamplingFactors`` (n5-spark, n5-ij and n5-viewer write the full-resolution voxel
    size there and the level's factors beside it, and read it so)."""
    vs = _n5_voxel_size(attrs, where)
    factors = attrs.get("downsamplingFactors")
    if vs is not None and "resolution" not in attrs and isinstance(factors, list) and len(factors) == len(vs) \
            and all(isinstance(f, (int, float)) and not isinstance(f, bool) for f in factors):
        vs = [v * f for v, f in zip(vs, factors)]
    return vs


def _open_n5(kv, where, mip, axes, voxel_size, voxel_offset, how: _Opening = _Opening()) -> Volume:
    attrs = _read_json(kv, "attributes.json", where)
    if not isinstance(attrs, dict):
        raise SourceReadError(f"no N5 attributes.json at {where}")
    group_vs = None
    dwhere = where
    desc_mip = f"mip {mip}"
    if "dimensions" not in attrs:
        # Multiscale N5 group: datasets s0, s1, ...
        sub = _sub(kv, f"s{mip}")
        dattrs = _read_json(sub, "attributes.json", where)
        if not isinstance(dattrs, dict) or "dimensions" not in dattrs:
            raise SourceReadError(f"N5 group {where} has no dataset s{mip}")
        group_vs = _n5_voxel_size(attrs, where)
        factors = dattrs.get("downsamplingFactors")
        if factors is None and isinstance(attrs.get("scales"), list) and mip < len(attrs["scales"]):
            factors = attrs["scales"][mip]
        if group_vs is not None and isinstance(factors, list) and len(factors) == len(group_vs):
            group_vs = [v * f for v, f in zip(group_vs, factors)]
        if "resolution" in dattrs or "pixelResolution" in dattrs:
            group_vs = None  # the dataset's own resolution wins (see _n5_level_voxel_size)
        kv, dwhere, desc_mip = sub, f"{where.rstrip('/')}/s{mip}", f"mip {mip}: s{mip}"
        merged = {k: v for k, v in attrs.items() if k not in ("resolution", "pixelResolution", "units")}
        merged.update(dattrs)
        attrs = merged
    else:
        _no_mip(mip, where)
    store = _ts_open({"driver": "n5"}, dwhere, kv, how)
    names = attrs.get("axes")
    shape = tuple(store.domain.shape)
    xyz, _ = _spatial_dims(names if isinstance(names, list) else None, shape, dwhere, axes)
    if voxel_size is None:
        vs = group_vs if group_vs is not None else _n5_level_voxel_size(attrs, where)
        vs = _spatial_attr(vs, xyz, len(shape)) if vs is not None else None
        if vs is not None:
            voxel_size = _check_voxel_size(vs, f"N5 {where} resolution")
    return _tensorstore_volume(
        store, where=dwhere, description=f"N5 {where} ({desc_mip})", names=names if isinstance(names, list) else None,
        axes=axes, voxel_size=voxel_size, voxel_offset=voxel_offset,
    )


#: A precomputed chunk or shard file that cloud-files (cloud-volume, igneous) stored compressed
#: on a local disk: it appends the codec's suffix to the name instead of setting a
#: Content-Encoding, as it does on GCS or S3.
_CLOUDFILES_COMPRESSED = re.compile(r"(-?\d+--?\d+_-?\d+--?\d+_-?\d+--?\d+|[0-9a-f]+\.shard)(\.gz|\.br|\.zstd|\.xz|\.bz2)")

#: Most directory entries of a scale :func:`_cloudfiles_compressed_chunk` looks at.
_COMPRESSED_SCAN = 10_000


def _cloudfiles_compressed_chunk(kvspec: dict, key: Any) -> Optional[str]:
    """The name of a chunk file of the local precomputed scale ``key`` stored only under a
    cloud-files compression suffix (``500-564_1000-1064_300-364.gz``), or None.

    cloud-volume and igneous compress the chunks they write to a ``file://`` layer by
    default (gzip for ``raw`` encoding), into files so named; TensorStore and Neuroglancer
    read a chunk under its plain name only, so such a chunk reads as not stored: background
    with fill_missing, a whole empty mesh.  Looks at the first entries of the scale's
    directory only (a compressed layer's chunks all are).
    """
    if kvspec.get("driver") != "file" or not isinstance(key, str) or not key:
        return None
    folder = os.path.join(kvspec.get("path", "") or ".", key)
    try:
        entries = os.scandir(folder)
    except OSError:
        return None
    with entries:
        for n, entry in enumerate(entries):
            if n >= _COMPRESSED_SCAN:
                break
            m = _CLOUDFILES_COMPRESSED.fullmatch(entry.name)
            if m and not os.path.exists(os.path.join(folder, m.group(1))):
                return entry.name
    return None


def _refuse_cloudfiles_compressed(kvspec: dict, key: Any, what: str) -> None:
    """Raise :class:`SourceReadError` where the local precomputed scale ``key`` (of the
    kvstore ``kvspec``) holds chunks that cloud-files stored compressed under a suffix
    (:func:`_cloudfiles_compressed_chunk`), saying how to decompress them; ``what`` names the
    source (``precomputed /x (mip 0``, closed with the key)."""
    packed = _cloudfiles_compressed_chunk(kvspec, key)
    if packed is None:
        return
    folder = os.path.join(kvspec.get("path", ""), key)
    suffix = os.path.splitext(packed)[1]
    how_to = (f"`find {shlex.quote(folder)} -name '*.gz' -exec gunzip {{}} +`" if suffix == ".gz"
              else f"each file to its name without {suffix}")
    raise SourceReadError(
        f"{what}: {key}) holds chunks that cloud-files stored compressed under a suffix ({folder}/{packed}), which "
        f"TensorStore and Neuroglancer do not read: each would read as missing (background). Decompress them in "
        f"place ({how_to}), or write the layer with cloud-volume's compress=False")


def _open_precomputed(kv, where, mip, voxel_size, voxel_offset, how: _Opening = _Opening()) -> Volume:
    info = _read_json(kv, "info", where)
    if not isinstance(info, dict) or not isinstance(info.get("scales"), list) or not info["scales"]:
        raise SourceReadError(f"no valid precomputed info at {where}")
    scales = info["scales"]
    if not 0 <= mip < len(scales):
        avail = ", ".join(
            f"{i}: {s.get('key')} {s.get('size')} @ {s.get('resolution')} nm"
            for i, s in enumerate(map(_object, scales))
        )
        raise SourceReadError(f"precomputed {where} has no scale mip {mip}; available: {avail}")
    nc = info.get("num_channels", 1)
    if nc != 1:
        raise InvalidVolumeError(f"precomputed {where} has num_channels {nc}: a label volume must have 1")
    scale = scales[mip]
    kvspec = kv.spec().to_json()
    _refuse_cloudfiles_compressed(kvspec, _object(scale).get("key"), f"precomputed {where} (mip {mip}")
    store = _ts_open({"driver": "neuroglancer_precomputed", "scale_index": mip}, where, kv, how)
    if voxel_size is None:
        voxel_size = _check_voxel_size(scale.get("resolution"), f"precomputed {where} resolution")
    if voxel_offset is None:
        voxel_offset = _check_voxel_offset(scale.get("voxel_offset", [0, 0, 0]))
    pre = {"kvstore": kvspec, "info": info, "scale_key": scale.get("key")}
    if pre["kvstore"].get("path") and not pre["kvstore"]["path"].endswith("/"):
        pre["kvstore"]["path"] += "/"
    vol = _tensorstore_volume(
        store, where=where, description=f"precomputed {where} (mip {mip}: {scale.get('key')})", names=None,
        axes=None, voxel_size=voxel_size, voxel_offset=voxel_offset, precomputed=pre,
    )
    cs = scale.get("chunk_sizes")
    if isinstance(cs, list) and cs and isinstance(cs[0], list) and len(cs[0]) == 3:
        object.__setattr__(vol, "_chunk_shape", tuple(int(c) for c in cs[0]))
    return vol


def _open_location(source, fmt, mip, axes, voxel_size, voxel_offset, how: _Opening = _Opening()) -> Volume:
    where = os.fspath(source) if not isinstance(source, dict) else json.dumps(source)
    loc = source
    if isinstance(loc, str) and "://" not in loc.split("|")[0]:
        # A local path naming a metadata file: use its directory.
        base = os.path.basename(loc.rstrip("/"))
        if base in ("zarr.json", ".zarray", ".zattrs", ".zgroup", "attributes.json", "info") and os.path.isfile(loc):
            loc = os.path.dirname(os.path.abspath(loc))
    spec = storage.kvstore_spec(loc)
    kv = storage.open_kvstore(spec)
    if spec.get("driver") == "file":
        local = spec.get("path", "")
        if not os.path.exists(local.rstrip("/") or "/"):
            raise SourceReadError(f"source not found: {where}")
        if not os.path.isdir(local):
            raise SourceReadError(f"source is a file, not a volume directory: {where}")
    if fmt is None:
        try:
            present = {k for k in ("zarr.json", ".zarray", ".zattrs", ".zgroup", "attributes.json", "info")
                       if storage.read(kv, k) is not None}
        except Exception as exc:
            raise SourceReadError(f"cannot read {where}: {one_line(exc)}") from exc
        if "zarr.json" in present:
            fmt = "zarr3"
        elif present & {".zarray", ".zattrs", ".zgroup"}:
            fmt = "zarr2"
        elif "attributes.json" in present:
            fmt = "n5"
        elif "info" in present:
            fmt = "precomputed"
        else:
            raise SourceReadError(
                f"unknown volume format at {where}: none of zarr.json, .zarray, .zattrs, attributes.json, info found"
            )
    if fmt == "zarr":
        fmt = "zarr3" if storage.read(kv, "zarr.json") is not None else "zarr2"
    if fmt in ("zarr3", "zarr2"):
        volume = _open_zarr(kv, where, int(fmt[-1]), mip, axes, voxel_size, voxel_offset, how)
    elif fmt == "n5":
        volume = _open_n5(kv, where, mip, axes, voxel_size, voxel_offset, how)
    else:
        _no_axes(axes, where)
        volume = _open_precomputed(kv, where, mip, voxel_size, voxel_offset, how)
    return replace(volume, location=spec)


def _no_axes(axes, where: str) -> None:
    """A precomputed volume's axes are x, y, z (and channel): ``axes`` other than that is a
    mistake, said so rather than ignored."""
    if axes is not None and str(axes).lower() not in ("xyz", "xyzc"):
        raise InvalidVolumeError(f"{where} is a precomputed volume, whose axes are always x, y, z: "
                                 f"axes {axes!r} (--axes) does not apply")


def _split_prefix(text: str) -> tuple:
    """``("zarr3", "gs://b/p")`` from ``"zarr3://gs://b/p"`` or ``"gs://b/p|zarr3:"``."""
    for prefix, fmt in _FORMAT_PREFIXES.items():
        if text.startswith(prefix):
            rest = text[len(prefix):]
            if "://" not in rest:
                rest = os.path.abspath(rest) if not rest.startswith("/") else rest
            return fmt, rest
    if "|" in text:
        loc, _, tail = text.partition("|")
        name = tail.rstrip(":").strip()
        fmt = {"zarr": "zarr", "zarr2": "zarr2", "zarr3": "zarr3", "n5": "n5",
               "neuroglancer-precomputed": "precomputed", "precomputed": "precomputed"}.get(name)
        if fmt is None:
            raise SourceReadError(f"unknown format {name!r} in {text!r}")
        return fmt, loc
    return None, text


# ----------------------------------------------------------------------------- public


def portable_source(source: Any) -> Any:
    """``source`` (as :func:`open_volume` takes it) with local paths made absolute, so that it
    means the same in a process with another working directory (a Dask worker's).

    Parameters
    ----------
    source : numpy.ndarray, tensorstore.TensorStore, dict, str or os.PathLike

    Returns
    -------
    The same kind of object: a path string made absolute (``"zarr3://seg"`` and
    ``"seg|zarr3:"`` forms included), a spec as :func:`gpumesh.storage.resolved_spec` makes
    it (absolute ``file`` paths, the environment's S3 endpoint), or ``source`` itself (URLs,
    arrays).  An ``s3://`` URL, where the environment names an S3 endpoint
    (:func:`gpumesh.storage.s3_endpoint`), becomes a kvstore spec with it (the worker's
    environment may name none): its format is then detected, as for the URL without a prefix.

    Raises
    ------
    ValueError
        An opened ``tensorstore.TensorStore`` on a relative local path (TensorStore keeps the
        path as given): open it with an absolute path.
    """
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if isinstance(text, bytes):
            text = text.decode()
        fmt, loc = _split_prefix(text)
        if loc.startswith("s3://") and storage.s3_endpoint():
            spec = storage.kvstore_spec(loc)   # with the endpoint
            return {"driver": "neuroglancer_precomputed", "kvstore": spec} if fmt == "precomputed" else spec
        for prefix in _FORMAT_PREFIXES:
            if text.startswith(prefix):
                rest = text[len(prefix):]
                return text if "://" in rest else prefix + os.path.abspath(rest)
        loc, bar, tail = text.partition("|")
        return text if "://" in loc else os.path.abspath(loc) + bar + tail
    if isinstance(source, dict):
        return storage.resolved_spec(source)
    if isinstance(source, ts.TensorStore):
        try:
            spec = source.kvstore.spec().to_json()
        except Exception:   # no kvstore (an in-memory array)
            return source
        if spec.get("driver") == "file" and not os.path.isabs(spec.get("path", "/")):
            raise ValueError(f"a TensorStore opened on the relative path {spec['path']!r} opens another location "
                             f"in a Dask worker with another working directory: open it with an absolute path")
    return source



def open_volume(
    source: Any,
    *,
    voxel_size: Optional[Sequence[float]] = None,
    voxel_offset: Optional[Sequence[int]] = None,
    mip: int = 0,
    axes: Optional[str] = None,
    cache_bytes: int = 0,
    bounds: Optional[Sequence[int]] = None,
    fill_missing: bool = True,
) -> Volume:
    """Open a segmentation label volume for chunked reading with axes x, y, z.

    Parameters
    ----------
    source : numpy.ndarray, tensorstore.TensorStore, dict, str or os.PathLike
        - a 3-D integer NumPy array (axes x, y, z unless ``axes`` says otherwise);
        - an opened ``tensorstore.TensorStore`` (dimension labels x/y/z are honoured);
        - a TensorStore spec ``dict`` (opened read-only), or a kvstore spec ``dict`` of the
          volume's directory (``{"driver": "s3", "bucket": ..., "endpoint": ...}``), whose
          format is detected as for a path;
        - a local path or a URL (``file://``, ``gs://``, ``s3://``, ``memory://``, ...),
          optionally with a Neuroglancer-style format prefix ``zarr://``, ``zarr2://``,
          ``zarr3://``, ``n5://`` or ``precomputed://`` (e.g.
          ``precomputed://gs://bucket/seg``) or suffix (``gs://bucket/seg|zarr3:``).
          Without one, the format is detected from the metadata keys present:
          ``zarr.json`` (zarr v3; a group with OME-Zarr ``multiscales`` is OME-Zarr 0.5),
          ``.zarray`` (zarr v2), ``.zattrs``/``.zgroup`` with ``multiscales`` (OME-Zarr
          0.4), ``attributes.json`` (N5; a group with datasets ``s0, s1, ...`` is read
          as multiscale), ``info`` (Neuroglancer precomputed).
    voxel_size : sequence of 3 float, optional
        Voxel size in nm (x, y, z), overriding the metadata. Without it and without
        metadata: (1, 1, 1).
    voxel_offset : sequence of 3 int, optional
        Global voxel coordinate of array index 0 (x, y, z), overriding the metadata.
        Default: from metadata, else the TensorStore domain origin, else (0, 0, 0).
    mip : int
        Scale index for multiscale sources (precomputed ``scales``, OME-Zarr
        ``datasets``, N5 ``s<mip>``). Single-scale sources accept only 0.
    axes : str, optional
        Storage axis order, a permutation of ``"xyz"`` optionally with letters for
        singleton non-spatial axes (e.g. ``"zyx"``, ``"czyx"``). It overrides axis names
        in the metadata. Without it: axis names from the metadata (zarr v3
        ``dimension_names``, zarr v2 ``_ARRAY_DIMENSIONS``, OME-Zarr ``axes``, N5 ``axes``,
        TensorStore labels); when there are none, the storage order is x, y, z (the
        Neuroglancer / cloud-volume convention) and leading singleton axes of a rank > 3
        array are dropped. Precomputed sources are always x, y, z: other axes are an error.
    cache_bytes : int
        Decoded chunks that TensorStore keeps in memory for later reads (bytes; 0: none).
        Reads of neighbouring boxes that share storage chunks then decode them once.  Applies
        to sources opened from a location or a spec, not to arrays or opened TensorStores.
    bounds : sequence of 6 int, optional
        Only this box of the volume, ``(x0, y0, z0, x1, y1, z1)`` in global voxel coordinates
        (voxel offset included), clipped to the volume: see :meth:`Volume.crop`.
    fill_missing : bool
        ``True`` (default): a storage chunk that is not stored reads as the array's fill value
        (0, background), as zarr, N5 and precomputed readers (TensorStore, Neuroglancer) do;
        writers leave out chunks that hold only the fill value.  ``False``: reading a box
        that needs such a chunk raises :class:`SourceReadError` (igneous's and cloud-volume's
        default, where a missing chunk means a failed upload).  For sources opened from a
        location or a spec.

    Returns
    -------
    Volume

    Notes
    -----
    Voxel size from metadata: OME-Zarr ``coordinateTransformations`` scale (dataset times
    multiscale) converted to nm from the axis ``unit`` (missing: nm); precomputed scale
    ``resolution``; N5 ``resolution`` / ``pixelResolution``; zarr attributes
    ``voxel_size_nm`` or ``resolution``; TensorStore ``dimension_units``. Per-axis
    attribute lists (zarr, N5) are read in storage order (3 entries for the spatial axes,
    or one per array dimension). Voxel offset: OME-Zarr translation / scale (rounded),
    precomputed ``voxel_offset``, zarr attribute ``voxel_offset``.

    Signed integer labels are accepted; :meth:`Volume.read` returns them viewed as the
    unsigned dtype of the same width and raises :class:`InvalidVolumeError` when a box
    holds negative values.

    Raises
    ------
    InvalidVoxelSizeError
        The voxel size (argument or metadata) is not 3 finite numbers > 0.
    InvalidVolumeError
        Non-integer dtype (float, complex, bool, ...), rank not 3 after dropping singleton
        non-spatial axes, a non-spatial axis larger than 1, an empty volume, a bad
        ``axes`` string or ``voxel_offset``, a precomputed volume with
        ``num_channels`` != 1, or ``bounds`` that are not 6 integers or miss the volume.
    SourceReadError
        Missing or unreadable location, unknown format, bad metadata, or ``mip`` out of
        range; the message names the location.
    ValueError
        ``fill_missing=False`` with an opened ``tensorstore.TensorStore``, which gpumesh
        cannot reopen strictly.
    """
    if bounds is not None:
        return open_volume(source, voxel_size=voxel_size, voxel_offset=voxel_offset, mip=mip, axes=axes,
                           cache_bytes=cache_bytes, fill_missing=fill_missing).crop(bounds)
    vs = None if voxel_size is None else _check_voxel_size(voxel_size)
    vo = None if voxel_offset is None else _check_voxel_offset(voxel_offset)
    if isinstance(mip, bool) or not isinstance(mip, (int, np.integer)) or mip < 0:
        raise SourceReadError(f"mip must be an integer >= 0, got {mip!r}")
    mip = int(mip)
    context = None
    if cache_bytes:
        context = ts.Context({"cache_pool": {"total_bytes_limit": int(cache_bytes)}},
                             parent=storage._default_context())
    how = _Opening(context, bool(fill_missing))

    if isinstance(source, np.ndarray):
        _no_mip(mip, "numpy array")
        return _numpy_volume(source, axes, vs, vo)
    if isinstance(source, ts.TensorStore):
        if not fill_missing:
            raise ValueError("fill_missing=False needs a source that gpumesh opens (a path, URL or spec), "
                             "not an opened TensorStore")
        return _from_tensorstore(source, "TensorStore", mip, axes, vs, vo)
    if isinstance(source, dict):
        driver = source.get("driver")
        if driver is None:
            raise SourceReadError(f"TensorStore spec without 'driver': {json.dumps(source)[:200]}")
        source = storage.resolved_spec(source)   # the environment's S3 endpoint, absolute file paths
        if storage.is_kvstore_spec(source):   # a location ({"driver": "s3", ...}): its format detected
            return _open_location(source, None, mip, axes, vs, vo, how)
        if driver == "neuroglancer_precomputed" and "kvstore" in source and "scale_index" not in source \
                and "scale_metadata" not in source:
            kvs = source["kvstore"]
            loc = kvs if isinstance(kvs, (dict, str)) else None
            if loc is not None:
                return _open_location(loc, "precomputed", mip, axes, vs, vo, how)
        where = f"TensorStore spec {json.dumps(source)[:200]}"
        return _from_tensorstore(_ts_open(source, where, how=how), where, mip, axes, vs, vo)
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if isinstance(text, bytes):
            text = text.decode()
        fmt, loc = _split_prefix(text)
        return _open_location(loc, fmt, mip, axes, vs, vo, how)
    if isinstance(source, Volume):   # e.g. run_mesh(open_volume(path)): its workers open the source themselves
        raise SourceReadError(f"give the source itself (the path, URL, spec, array or TensorStore that "
                              f"open_volume opened), not an opened Volume ({source.description})")
    raise SourceReadError(f"unsupported source type {type(source).__name__}: {source!r}"[:300]
                          + "; give a path or URL, a kvstore or TensorStore spec (dict), a TensorStore or a "
                            "NumPy array (np.asarray(x) of a Dask array or a list)")


def _from_tensorstore(store: ts.TensorStore, where: str, mip: int, axes, vs, vo) -> Volume:
    spec = {}
    try:
        if store.kvstore is None and _is_array_driver(store):
            # no storage: the in-memory "array" driver, whose spec as JSON holds every voxel
            # (1.4 s for 256^3 uint32); only stored arrays' metadata is read
            spec = {"driver": "array"}
        else:   # (a virtual driver over one, such as a cast, as before: only its name is used)
            spec = store.spec().to_json()
    except Exception:
        pass
    driver = spec.get("driver", "?")
    precomputed = None
    if driver == "neuroglancer_precomputed":
        try:
            kv = store.kvstore
            info = storage.read_json(kv, "info")
            key = spec.get("scale_metadata", {}).get("key")
            kvspec = kv.spec().to_json()
            if kvspec.get("path") and not kvspec["path"].endswith("/"):
                kvspec["path"] += "/"
            precomputed = {"kvstore": kvspec, "info": info, "scale_key": key}
        except Exception:
            precomputed = None
        if precomputed is not None:   # as a path to it is refused (the scale as opened, whatever its index)
            _refuse_cloudfiles_compressed(precomputed["kvstore"], precomputed["scale_key"], f"{where} (scale")
        _no_axes(axes, where)
        axes = None
    if mip != 0:   # an opened TensorStore (or a spec with its scale_index) is one scale
        raise SourceReadError(f"{where} is one scale: open the scale wanted (precomputed: scale_index), or give "
                              f"the volume's location with mip {mip}")
    try:
        location = storage.kvstore_spec(store.kvstore)
    except Exception:   # a driver without a kvstore (an in-memory "array")
        location = None
    attrs, names = _stored_attributes(store, driver, spec, where, voxel_size=vs is None)
    volume = _tensorstore_volume(
        store, where=where, description=f"{where} ({driver})", names=names, axes=axes,
        voxel_size=vs, voxel_offset=vo, attrs=attrs, precomputed=precomputed,
    )
    return replace(volume, location=location)


def _is_array_driver(store: ts.TensorStore) -> bool:
    """Whether ``store`` is of TensorStore's in-memory ``array`` driver, told without its spec's
    JSON (which holds the whole array): a one-voxel view's spec names the driver."""
    try:
        corner = store[tuple(slice(lo, lo + 1) for lo in store.domain.inclusive_min)]
        return corner.spec().to_json().get("driver") == "array"
    except Exception:
        return False


def _stored_attributes(store: ts.TensorStore, driver: str, spec: dict, where: str, *,
                       voxel_size: bool = True) -> tuple:
    """The attributes and axis names that a path to ``store``'s array would give (zarr v3
    ``attributes``, zarr v2 ``.zattrs`` and ``_ARRAY_DIMENSIONS``, N5 ``resolution``; N5
    ``axes`` and zarr v3 ``dimension_names`` are TensorStore's labels already), for a spec or
    an opened TensorStore of the array as stored or cropped (a voxel offset they state is that
    of stored index 0); ``(None, None)`` for other drivers and for a view (a transform that
    moves, transposes or drops the stored dimensions), whose metadata no longer lines up with
    its dimensions.  ``voxel_size=False`` (one was given): N5's resolution is not read, so
    that a unit gpumesh does not know is no error, as for a path."""
    if driver not in ("zarr", "zarr3", "n5"):
        return None, None
    t = spec.get("transform") or {}
    maps = t.get("output")
    if maps is not None and (len(maps) != store.rank
                             or any(m != {"input_dimension": i} for i, m in enumerate(maps))):
        return None, None
    if driver == "zarr3":   # an opened array's spec holds its zarr.json's attributes
        return _object(_object(spec.get("metadata")).get("attributes")), None
    kv = store.kvstore
    if driver == "zarr":
        attrs = _zattrs(kv, where)
        return attrs, None if any(store.domain.labels) else attrs.get("_ARRAY_DIMENSIONS")
    if not voxel_size:
        return None, None
    attrs = _object(_read_json(kv, "attributes.json", where))
    vs = _n5_level_voxel_size(attrs, where)   # as a path to it reads it (see _open_n5)
    return ({} if vs is None else {"resolution": vs}), None
