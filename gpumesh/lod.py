"""Levels of detail: label downsampling (CPU) and decimation (meshoptimizer).

Downsampling rule
-----------------
LOD ``k`` is meshed from the labels downsampled by ``F_k`` (per axis, :func:`lod_factors`): by
``2**k`` on every axis for near-isotropic voxels, and on anisotropic ones by 2 only along the
finer axes until the voxel is near isotropic (4x4x40 nm voxels give 8x8x40, 16x16x40 and
32x32x40 nm at LODs 1-3, then 64x64x80), as image pyramids of such data are downsampled, so
that coarse LODs do not lose thin processes across the coarse axis first.  Each step maps a
``fx x fy x fz`` block (each factor 1 or 2) to one voxel with the **mode of its non-zero
labels** (ties: the smaller segment ID; background only when all its voxels are 0).
Background never wins over a segment, so a thin process that is surrounded by extracellular
space (label 0) does not vanish when it is coarsened; it can only be absorbed by a
neighbouring segment that covers more of the block.  Every voxel
labelled ``s`` at LOD ``k`` contains at least one voxel labelled ``s`` at LOD ``k - 1``, so the
coarse surface of ``s`` stays near its LOD 0 surface: a LOD ``k`` vertex is the centre of a
face of a LOD ``k`` voxel of ``s``, which holds a LOD 0 voxel of ``s`` at worst in the opposite
corner, so it lies within ``sqrt((2**k - 1)**2 + 2 * (2**(k-1) - 1)**2)`` voxels of the label
boundary: 1 and 3.32 at LODs 1 and 2 (within ``2**k``), 8.19 and 17.97 at LODs 3 and 4 (a
little beyond ``2**k``; checked on random volumes, ``tests/test_random_volumes.py``); on
anisotropic voxels, whose LOD ``k`` voxels are no larger, within the same.  A segment that
does vanish at some LOD gets fewer LODs (its coarsest LOD is the last one where it has
triangles).  The CUDA kernel applies the same rule.

Decimation
----------
Each LOD's pieces are decimated with meshoptimizer's simplifier (``meshopt_simplify``: greedy
quadric-error edge collapses onto existing vertices) in nm, so the error metric respects
anisotropic voxels, with the piece's open border locked: the borders where neighbouring
fragments (and the 2x2x2 sub-grid pieces of a LOD > 0 fragment) meet keep their vertices, so
fragments of one LOD still share border vertices exactly.  Because every collapse moves a
vertex onto one of its neighbours, a decimated piece's vertices are a subset of its
marching-cubes vertices: they stay on the half-voxel lattice (exact in the quantized
fragment, and well compressed by Draco) and inside the piece's box.  Collapses stop at an
error of ``max_error`` voxels of that LOD (meshoptimizer's absolute error bound), so a preset's
keep fraction is a target that smooth pieces reach and rough ones may not.  That error is
meshoptimizer's quadric measure (distances to the planes of the triangles a vertex gathered,
averaged), not a distance: the surface itself moves further.  On the real volume's crop the
default preset's LOD 0 lay at most 0.93 voxels from the marching-cubes surface (both ways;
``tests/test_mesh_real.py``); its pieces decimated to a fifth without the thin-spot locks, up
to 5.5 (``bench/bench_fidelity.py`` measures whole outputs).

Pieces meet on their box planes, and a marching-cubes surface can have triangles lying in
such a plane.  Locking the open border is not enough there: a vertex collapsing onto a border
vertex could make a new edge between two vertices of the shared plane, which the neighbouring
piece may also have, and the joined fragments would then use that edge three times.  So the
vertices on a piece's box planes *and their 1-ring* are locked (``frozen``): no collapse then
touches a triangle with a vertex in the plane, and both sides of every shared plane keep their
marching-cubes triangles there, which fit together.

meshoptimizer checks collapses for flipped triangles but not for the link condition, so on
thin parts of a segment it can make two triangles use the same directed edge (a
non-manifold surface).  :func:`decimate` checks every result: where an edge is used twice,
or an edge that was interior lost its twin, the 1-ring (in the input) of the offending
vertices is locked and the piece is simplified again; after a few rounds without success the
piece is kept undecimated.  So every decimated piece is as closed and as manifold as its
input.  Its collapses also leave a few triangles of three collinear vertices (zero area; 8.5e-4
of LOD 0's triangles on the real volume): each is flipped with its neighbour across its long
edge into two triangles that cover exactly the neighbour's area (:func:`_flip_flat`), so the
surface is unchanged and no zero-area triangle is written; where no flip can remove one (the
simplifier folded the surface back over itself there: a flip would use an edge twice), its
vertices' 1-ring is locked and the piece is simplified again, like the other defects.

meshoptimizer is called through its C ABI, as shipped in the ``meshoptimizer`` package
(``meshopt_simplifyWithAttributes`` with no attributes, for its ``vertex_lock``), with the
argument types declared here.
"""

from __future__ import annotations

from dataclasses import dataclass

import ctypes
import glob
import os

import numba
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

from .marching import native_order, unsigned_view


@numba.njit(cache=True, nogil=True)
def _downsample(labels, out, fx, fy, fz):
    nx, ny, nz = out.shape
    sx, sy, sz = labels.shape
    v = np.empty(8, dtype=labels.dtype)
    for i in range(nx):
        for j in range(ny):
            for k in range(nz):
                n = 0
                for dx in range(fx):
                    x = fx * i + dx
                    for dy in range(fy):
                        y = fy * j + dy
                        for dz in range(fz):
                            z = fz * k + dz
                            if x < sx and y < sy and z < sz:
                                val = labels[x, y, z]
                                if val != 0:
                                    v[n] = val
                                    n += 1
                if n == 0:
                    out[i, j, k] = 0
                    continue
                best = v[0]
                best_count = 0
                for a in range(n):
                    c = 0
                    for b in range(n):
                        if v[b] == v[a]:
                            c += 1
                    if c > best_count or (c == best_count and v[a] < best):
                        best = v[a]
                        best_count = c
                out[i, j, k] = best


def downsample_labels(labels: np.ndarray, factor=(2, 2, 2)) -> np.ndarray:
    """Downsample labels by ``factor`` with the non-zero mode rule (see module docs).

    Parameters
    ----------
    labels : (nx, ny, nz) integer ndarray
        Axes x, y, z.  Odd sizes are allowed: the last, partial block uses the voxels it has.
        Signed labels are compared as their unsigned view (as the GPU kernel compares them).
    factor : (3,) int
        1 or 2 per axis (x, y, z).

    Returns
    -------
    (ceil(nx/fx), ceil(ny/fy), ceil(nz/fz)) ndarray of the same dtype (in the machine's byte order).

    Raises
    ------
    ValueError
        A factor that is not 1 or 2.
    """
    fx, fy, fz = _check_factor(factor)
    labels = np.ascontiguousarray(native_order(labels))
    given = labels.dtype
    labels = unsigned_view(labels)
    out = np.empty(downsampled_shape(labels.shape, (fx, fy, fz)), dtype=labels.dtype)
    _downsample(labels, out, fx, fy, fz)
    return out.view(given)


def _check_factor(factor) -> tuple:
    f = tuple(int(v) for v in factor)
    if len(f) != 3 or any(v not in (1, 2) for v in f):
        raise ValueError(f"downsampling factor must be 1 or 2 per axis, got {factor!r}")
    return f


def downsampled_shape(shape, factor) -> tuple:
    """Shape of ``shape``-voxel labels downsampled by ``factor``: ``ceil(n / f)`` per axis (a
    partial block at an odd edge makes a voxel too), as Python ints."""
    return tuple(-(-int(n) // int(f)) for n, f in zip(shape, factor))


#: :attr:`gpumesh.pipeline.MeshOptions.downsampling` choices.
DOWNSAMPLING = ("auto", "all")


def lod_factors(voxel_size, lods: int, downsampling: str = "auto", max_ratio: int = 1 << 30) -> np.ndarray:
    """Per-axis downsampling of each LOD's labels against LOD 0's.

    Step ``k`` (LOD ``k - 1`` to ``k``) halves the axes whose voxel size, doubled, stays within
    the largest voxel size of LOD ``k - 1``; where none does (near-isotropic voxels), or with
    ``downsampling="all"``, it halves every axis.  So ``F_k <= 2**k`` on every axis.  A step
    also halves every axis where halving only some would make an octree node of LOD ``k``
    (``C * 2**k`` LOD 0 voxels) more than ``max_ratio * C`` LOD ``k`` voxels long on some axis
    (the quantization must keep half a voxel apart on every axis, see
    :meth:`gpumesh.pipeline.Plan.make`).

    Parameters
    ----------
    voxel_size : (3,) float
        LOD 0 voxel size (nm, or any unit shared by the axes).
    lods : int
        LODs (``>= 1``).
    downsampling : {"auto", "all"}
    max_ratio : int
        Largest allowed ``2**k / min(F_k)`` (a power of two >= 1).

    Returns
    -------
    (lods, 3) int64
        Power-of-two shifts ``s``: LOD ``k`` voxels are ``2**s[k]`` LOD 0 voxels (row 0 is 0).

    Raises
    ------
    ValueError
        Unknown ``downsampling``.
    """
    if downsampling not in DOWNSAMPLING:
        raise ValueError(f"downsampling must be one of {', '.join(DOWNSAMPLING)}, got {downsampling!r}")
    size = np.asarray(voxel_size, dtype=np.float64).reshape(3)
    shifts = np.zeros((lods, 3), dtype=np.int64)
    for k in range(1, lods):
        s = shifts[k - 1]
        r = size * (2.0 ** s)
        step = (2 * r <= r.max()).astype(np.int64)
        if downsampling == "all" or not step.any() or k - (s + step).min() > max_ratio.bit_length() - 1:
            step[:] = 1
        shifts[k] = s + step
    return shifts


@dataclass(frozen=True)
class Quality:
    """Decimation targets of a quality preset.

    Attributes
    ----------
    name : str
    lod0_keep : float
        Fraction of LOD 0 triangles kept (1.0: LOD 0 is the exact marching-cubes surface).
    lod_keep : float
        Fraction of triangles kept at each LOD > 0 (of that LOD's own marching-cubes surface,
        which is already about 4x smaller per LOD since it is meshed from coarser labels).
    """

    name: str
    lod0_keep: float
    lod_keep: float

    def keep(self, lod: int) -> float:
        """Fraction of triangles kept at ``lod``."""
        return self.lod0_keep if lod == 0 else self.lod_keep


#: The quality presets.  ``high`` leaves LOD 0 undecimated.
QUALITY_PRESETS = {
    "low": Quality("low", lod0_keep=0.25, lod_keep=0.2),
    "medium": Quality("medium", lod0_keep=0.4, lod_keep=0.3),
    "high": Quality("high", lod0_keep=1.0, lod_keep=0.5),
}

#: Pieces with fewer triangles than this are left as they are.
MIN_DECIMATE_TRIANGLES = 16


def get_quality(name: "str | Quality") -> Quality:
    """Look up a preset by name.

    Raises
    ------
    ValueError
        For an unknown preset name.
    """
    if isinstance(name, Quality):
        return name
    try:
        return QUALITY_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown quality preset {name!r}; choose one of {sorted(QUALITY_PRESETS)}") from None


#: meshoptimizer's option flags (``meshopt_Simplify*`` in meshoptimizer.h).
_SIMPLIFY_LOCK_BORDER = 1
_SIMPLIFY_ERROR_ABSOLUTE = 4

#: Rounds of "lock the defect's neighbourhood and simplify again" before a piece is kept as is.
MAX_LOCK_ROUNDS = 8

_MESHOPT = None


def _meshopt():
    """``meshopt_simplifyWithAttributes`` from the meshoptimizer package's shared library."""
    global _MESHOPT
    if _MESHOPT is None:
        import meshoptimizer

        libs = sorted(glob.glob(os.path.join(os.path.dirname(meshoptimizer.__file__), "_meshoptimizer*")))
        if not libs:
            raise ImportError("the meshoptimizer package ships no shared library")
        fn = ctypes.CDLL(libs[0]).meshopt_simplifyWithAttributes
        p, size = ctypes.c_void_p, ctypes.c_size_t
        # destination, indices, index_count, positions, vertex_count, positions_stride,
        # attributes, attributes_stride, attribute_weights, attribute_count, vertex_lock,
        # target_index_count, target_error, options, result_error
        fn.argtypes = [p, p, size, p, size, size, p, size, p, size, p, size, ctypes.c_float, ctypes.c_uint, p]
        fn.restype = size
        _MESHOPT = fn
    return _MESHOPT


_MESHOPT_ADDRESS = 0


def _meshopt_address() -> int:
    """The address of :func:`_meshopt`'s function, for :func:`_decimate` (which calls it from numba)."""
    global _MESHOPT_ADDRESS
    if not _MESHOPT_ADDRESS:
        _MESHOPT_ADDRESS = ctypes.cast(_meshopt(), ctypes.c_void_p).value
    return _MESHOPT_ADDRESS


@numba.njit(cache=True, nogil=True)
def _edge_table(faces, nv):
    """Open-addressing set of the directed edges of ``faces`` (key ``a * nv + b``).

    At most 1/4 full (3 edges per triangle in at least 12 slots) up to 2**20 triangles (a
    pipeline piece has far fewer): the defect checks look up every edge's reverse, and a
    sparser table takes them ~30 % faster than one up to 1/2 full; larger meshes (ad-hoc
    meshing decimates whole segments) keep the half-full table's memory."""
    slots = 12 if faces.shape[0] <= 1 << 20 else 6
    size = 16
    while size < slots * faces.shape[0]:
        size *= 2
    table = np.full(size, -1, dtype=np.int64)
    dup = False
    for t in range(faces.shape[0]):
        for s in range(3):
            key = np.int64(faces[t, s]) * nv + faces[t, (s + 1) % 3]
            h = (key * 0x9E3779B97F4A7C15) & (size - 1)
            while table[h] != -1 and table[h] != key:
                h = (h + 1) & (size - 1)
            if table[h] == key:
                dup = True
            table[h] = key
    return table, dup


@numba.njit(cache=True, nogil=True)
def _has_edge(table, key):
    size = table.shape[0]
    h = (key * 0x9E3779B97F4A7C15) & (size - 1)
    while table[h] != -1:
        if table[h] == key:
            return True
        h = (h + 1) & (size - 1)
    return False


@numba.njit(cache=True, nogil=True)
def _mark_repeated(out, nv, size, bad):
    """Mark the vertices of every edge that ``out`` uses a second time in the same direction."""
    seen = np.full(size, -1, dtype=np.int64)
    for t in range(out.shape[0]):
        for s in range(3):
            a = out[t, s]
            b = out[t, (s + 1) % 3]
            key = np.int64(a) * nv + b
            h = (key * 0x9E3779B97F4A7C15) & (size - 1)
            while seen[h] != -1 and seen[h] != key:
                h = (h + 1) & (size - 1)
            if seen[h] == key:
                bad[a] = True
                bad[b] = True
            seen[h] = key


@numba.njit(cache=True, nogil=True)
def _count_border_edges(table, faces, nv):
    """Edges of ``faces`` whose reverse is not in ``table`` (the open border)."""
    n = 0
    for t in range(faces.shape[0]):
        for s in range(3):
            if not _has_edge(table, np.int64(faces[t, (s + 1) % 3]) * nv + faces[t, s]):
                n += 1
    return n


@numba.njit(cache=True, nogil=True)
def _defects(out, nv, table_in, border_in):
    """Vertices of the result's topological defects.

    A defect is an edge used twice in one direction, or an edge without its reverse that is
    not an open-border edge of the input; the input's border edges must all still be there.
    """
    table, dup = _edge_table(out, nv)
    bad = np.zeros(nv, dtype=np.bool_)
    found = dup
    if dup:
        _mark_repeated(out, nv, table.shape[0], bad)
    border_out = 0
    for t in range(out.shape[0]):
        for s in range(3):
            a = out[t, s]
            b = out[t, (s + 1) % 3]
            if not _has_edge(table, np.int64(b) * nv + a):
                if _has_edge(table_in, np.int64(a) * nv + b) and not _has_edge(table_in, np.int64(b) * nv + a):
                    border_out += 1
                else:
                    bad[a] = True
                    bad[b] = True
                    found = True
    if border_out != border_in:
        found = True
    return found, bad


@numba.njit(cache=True, nogil=True)
def _defects_frozen(out, nv, core):
    """:func:`_defects` for a piece whose open border lies in ``core`` (frozen with its ring).

    The triangles around ``core`` vertices are the input's, so an edge without its reverse is a
    border edge exactly when it touches ``core``; elsewhere it is a hole.
    """
    table, dup = _edge_table(out, nv)
    bad = np.zeros(nv, dtype=np.bool_)
    found = dup
    if dup:
        _mark_repeated(out, nv, table.shape[0], bad)
    for t in range(out.shape[0]):
        for s in range(3):
            a = out[t, s]
            b = out[t, (s + 1) % 3]
            if not (core[a] or core[b]) and not _has_edge(table, np.int64(b) * nv + a):
                bad[a] = True
                bad[b] = True
                found = True
    return found, bad


@numba.njit(cache=True, nogil=True)
def _lock_rings(faces, bad, lock):
    """Lock every vertex of every input triangle that touches a ``bad`` vertex."""
    for t in range(faces.shape[0]):
        if bad[faces[t, 0]] or bad[faces[t, 1]] or bad[faces[t, 2]]:
            for s in range(3):
                lock[faces[t, s]] = 1


_NO_VERTEX = np.zeros(0, dtype=np.bool_)


@numba.njit(cache=True, nogil=True)
def _prepare(vertices, faces, scale, locked, frozen, pos, f_in, lock):
    """meshoptimizer's inputs: float32 positions in nm, uint32 triangles, the lock flags
    (``locked`` vertices, and ``frozen`` ones with their 1-ring; either may be empty)."""
    for i in range(vertices.shape[0]):
        for a in range(3):
            pos[i, a] = vertices[i, a] * scale[a]
        lock[i] = 1 if locked.shape[0] and locked[i] else 0
    for t in range(faces.shape[0]):
        for s in range(3):
            f_in[t, s] = faces[t, s]
    if frozen.shape[0]:
        _lock_rings(f_in, frozen, lock)


@numba.njit(cache=True, nogil=True)
def _cross_is_zero(pos, a, b, c):
    # (its callers pass int64 indices: one compiled signature, not one per index type)
    ux, uy, uz = pos[b, 0] - pos[a, 0], pos[b, 1] - pos[a, 1], pos[b, 2] - pos[a, 2]
    vx, vy, vz = pos[c, 0] - pos[a, 0], pos[c, 1] - pos[a, 1], pos[c, 2] - pos[a, 2]
    return uy * vz - uz * vy == 0.0 and uz * vx - ux * vz == 0.0 and ux * vy - uy * vx == 0.0


@numba.njit(cache=True, nogil=True)
def _flip_flat(pos, faces, core):
    """Flip away the zero-area triangles that a simplification left (in place).

    A triangle ``(a, b, c)`` whose vertex ``b`` lies on the segment from ``c`` to ``a`` covers no
    area; with its neighbour ``(a, c, d)`` across that edge it is replaced by ``(a, b, d)`` and
    ``(b, c, d)``, which cover exactly the neighbour's area: the surface is the same point set,
    with the same orientation, and every edge still has its reverse.  Skipped where ``b`` and
    ``d`` are already joined (a flip would use that edge twice), where the neighbour is flat
    too or missing (an open border), and where a vertex is in ``core`` (the frozen vertices,
    whose triangles must stay).  Positions are exact on the half-voxel lattice, so ``== 0`` is
    exact.  A piece has a few such triangles at most: each looks for its neighbour by a scan.

    Returns how many it flipped and whether a zero-area triangle may be left: False when the
    last pass flipped nothing and saw none (then :func:`_mark_flat` would find none).
    """
    m = faces.shape[0]
    nc = core.shape[0]
    joined = np.empty(256, dtype=faces.dtype)
    flips = 0
    for _ in range(4):   # a flip can leave a neighbour's flat triangle flippable
        changed = False
        seen = False
        for t in range(m):
            if not _cross_is_zero(pos, np.int64(faces[t, 0]), np.int64(faces[t, 1]), np.int64(faces[t, 2])):
                continue
            seen = True
            r = -1
            for q in range(3):   # b: the vertex between the other two
                a, b, c = faces[t, q], faces[t, (q + 1) % 3], faces[t, (q + 2) % 3]
                dot = 0.0
                for x in range(3):
                    dot += (pos[a, x] - pos[b, x]) * (pos[c, x] - pos[b, x])
                if dot < 0.0:
                    r = q
                    break
            if r < 0:
                continue
            a, b, c = faces[t, r], faces[t, (r + 1) % 3], faces[t, (r + 2) % 3]
            if nc and (core[a] or core[b] or core[c]):
                continue
            # one scan: the neighbour across c -> a (the triangle with a -> c), and b's neighbours
            u, d, nb = -1, -1, 0
            for s in range(m):
                for q in range(3):
                    v0, v1 = faces[s, q], faces[s, (q + 1) % 3]
                    if v0 == a and v1 == c:
                        u, d = s, faces[s, (q + 2) % 3]
                    if v0 == b or v1 == b:
                        if nb < joined.shape[0]:
                            joined[nb] = v1 if v0 == b else v0
                        nb += 1
            if u < 0 or u == t or d == b or (nc and core[d]):
                continue
            if _cross_is_zero(pos, np.int64(a), np.int64(c), np.int64(d)):
                continue
            if nb > joined.shape[0] or d in joined[:nb]:   # b is joined to d already (or too many to tell)
                continue
            faces[t, 0], faces[t, 1], faces[t, 2] = a, b, d
            faces[u, 0], faces[u, 1], faces[u, 2] = b, c, d
            flips += 1
            changed = True
        if not changed:
            return flips, seen
    return flips, True



@numba.njit(cache=True, nogil=True)
def _mark_flat(pos, faces, bad):
    """Mark in ``bad`` the vertices of the zero-area triangles of ``faces`` (those
    :func:`_flip_flat` could not flip); returns whether there are any."""
    found = False
    for t in range(faces.shape[0]):
        if _cross_is_zero(pos, np.int64(faces[t, 0]), np.int64(faces[t, 1]), np.int64(faces[t, 2])):
            for s in range(3):
                bad[faces[t, s]] = True
            found = True
    return found


@numba.njit(cache=True, nogil=True)
def _compact(vertices, out):
    """The vertices that ``out`` uses (in input order) and ``out`` renumbered into them."""
    nv = vertices.shape[0]
    remap = np.full(nv, -1, dtype=np.int32)
    for t in range(out.shape[0]):
        for s in range(3):
            remap[out[t, s]] = 0
    n = 0
    for i in range(nv):
        if remap[i] == 0:
            remap[i] = n
            n += 1
    v = np.empty((n, 3), dtype=np.float64)
    for i in range(nv):
        if remap[i] >= 0:
            for a in range(3):   # (not a row copy: its shape check takes numba seconds to compile)
                v[remap[i], a] = vertices[i, a]
    f = np.empty((out.shape[0], 3), dtype=np.int32)
    for t in range(out.shape[0]):
        for s in range(3):
            f[t, s] = remap[out[t, s]]
    return v, f


@intrinsic
def _simplify(typingctx, fn, dst, idx, index_count, pos, nv, lock, target, err, options):
    """``meshopt_simplifyWithAttributes`` at address ``fn`` (no attributes), called from numba:
    the address is an argument, so the kernels that call it can be cached.  Pointers and sizes
    as ``uintp``, ``err`` float32, ``options`` uint32; returns the index count (``uintp``)."""
    sig = types.uintp(types.uintp, types.uintp, types.uintp, types.uintp, types.uintp, types.uintp,
                      types.uintp, types.uintp, types.float32, types.uint32)

    def codegen(context, builder, signature, args):
        fn, dst, idx, index_count, pos, nv, lock, target, err, options = args
        # size_t and pointers: the platform's width (uintp), 64 bits on the platforms we build for
        word, f32, i32 = context.get_value_type(types.uintp), ir.FloatType(), ir.IntType(32)
        # destination, indices, index_count, positions, vertex_count, positions_stride,
        # attributes, attributes_stride, attribute_weights, attribute_count, vertex_lock,
        # target_index_count, target_error, options, result_error
        fnty = ir.FunctionType(word, [word] * 12 + [f32, i32, word])
        ptr = builder.inttoptr(fn, fnty.as_pointer())
        zero = ir.Constant(word, 0)
        return builder.call(ptr, [dst, idx, index_count, pos, nv, ir.Constant(word, 12), zero, zero, zero, zero,
                                  lock, target, err, options, zero])
    return sig, codegen


@numba.njit(cache=True, nogil=True)
def _decimate(fn, vertices, faces, scale, locked, core, frozen, target, err, options, rounds):
    """:func:`decimate`'s work in one call: meshoptimizer's inputs (:func:`_prepare`), up to
    ``rounds`` simplifications with the defect checks and flips between them, and the result's
    compaction.  ``core`` is the frozen vertices (empty when ``frozen`` is False).  Returns
    ``(False, ...)`` when every round left a defect."""
    nv = vertices.shape[0]
    m = faces.shape[0]
    pos = np.empty((nv, 3), dtype=np.float32)
    f_in = np.empty((m, 3), dtype=np.uint32)
    lock = np.empty(nv, dtype=np.uint8)
    _prepare(vertices, faces, scale, locked, core, pos, f_in, lock)
    if frozen:
        table_in = np.empty(0, dtype=np.int64)
        border_in = 0
    else:
        table_in, _ = _edge_table(f_in, nv)
        border_in = _count_border_edges(table_in, f_in, nv)
    dst = np.empty(3 * m, dtype=np.uint32)
    for _ in range(rounds):
        n = _simplify(fn, dst.ctypes.data, f_in.ctypes.data, 3 * m, pos.ctypes.data, nv, lock.ctypes.data,
                      target, err, options)
        out = dst[:n].reshape((n // 3, 3))
        if frozen:
            found, bad = _defects_frozen(out, nv, core)
        else:
            found, bad = _defects(out, nv, table_in, border_in)
        if not found:
            # a flat triangle that no flip removes (its flip would use an edge twice: there the
            # simplifier folded the surface back over itself) is a defect like the others
            if not _flip_flat(vertices, out, core)[1] or not _mark_flat(vertices, out, bad):
                v, f = _compact(vertices, out)
                return True, v, f
        _lock_rings(f_in, bad, lock)
    return False, np.empty((0, 3), dtype=np.float64), np.empty((0, 3), dtype=np.int32)


def decimates(keep: float, num_faces: int) -> bool:
    """Whether :func:`decimate` changes a piece of ``num_faces`` triangles at all."""
    return keep < 1.0 and num_faces >= MIN_DECIMATE_TRIANGLES


def decimate(vertices: np.ndarray, faces: np.ndarray, keep: float, scale: np.ndarray,
             max_error: float = 0.5, frozen: "np.ndarray | None" = None,
             locked: "np.ndarray | None" = None) -> tuple[np.ndarray, np.ndarray]:
    """Decimate a mesh piece, keeping its open border and its manifoldness.

    Parameters
    ----------
    vertices : (n, 3) float64
        Positions in any unit (voxels of the piece's LOD in the pipeline); multiplied by
        ``scale`` for the error metric.
    faces : (m, 3) int
        Triangles, counter-clockwise seen from outside; each directed edge used at most once.
    keep : float
        Target fraction of triangles kept, in (0, 1].  1.0 returns the input unchanged.
    scale : (3,) float64
        Per-axis factor to nm (voxel size times ``2**lod``), so the error is isotropic in
        physical space.
    max_error : float
        meshoptimizer's error bound, in units of ``min(scale)`` (voxels of that LOD); ``inf``
        for none.  The keep target is not reached where it would need more.  It bounds the
        simplifier's quadric error, not the distance the surface moves (see module docs).
    frozen : (n,) bool, optional
        Vertices whose triangles must stay as they are: they and their 1-ring are locked.  It
        must contain every vertex of the open border.  The pipeline freezes the vertices on
        the piece's box planes, so that no collapse makes a new edge in a plane the
        neighbouring piece shares (see module docs).
    locked : (n,) bool, optional
        Vertices that must not move (collapses onto them are still allowed).  The pipeline
        locks thin spots (:func:`gpumesh.marching.thin_vertices`): that keeps thin processes
        and avoids most of the defects that would need a second round.

    Returns
    -------
    vertices : (n', 3) float64
        A subset of the input rows (the vertices still used), in the input unit.
    faces : (m', 3) int32
        Into the returned vertices.  Vertices on the input's open border are all kept; the
        result has no edge used twice in one direction, and every edge that had a reverse
        edge in the input still has one.

    Notes
    -----
    See the module docs (Decimation) for the simplifier and the defect checks.
    """
    if not decimates(keep, len(faces)):
        return vertices, faces.astype(np.int32, copy=False)
    vertices = np.ascontiguousarray(vertices, dtype=np.float64)
    scale = np.ascontiguousarray(scale, dtype=np.float64)
    target = 3 * max(4, int(round(len(faces) * keep)))
    err = float(max_error) * float(scale.min()) if np.isfinite(max_error) else 3.0e38
    ok, v, f = _decimate(_meshopt_address(), vertices, np.ascontiguousarray(faces), scale,
                         _NO_VERTEX if locked is None else np.ascontiguousarray(locked, dtype=np.bool_),
                         _NO_VERTEX if frozen is None else np.ascontiguousarray(frozen, dtype=np.bool_),
                         frozen is not None, target, np.float32(err),
                         np.uint32(_SIMPLIFY_LOCK_BORDER | _SIMPLIFY_ERROR_ABSOLUTE), MAX_LOCK_ROUNDS)
    if not ok:
        return vertices, faces.astype(np.int32, copy=False)
    return v, f
