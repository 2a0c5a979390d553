"""CPU kernels: marching cubes topology, label downsampling rule, quantization and Draco."""

from __future__ import annotations

import numpy as np
import pytest

from gpumesh import encode, marching
from gpumesh.backend import CPUBackend
from gpumesh.lod import downsample_labels, lod_factors
from gpumesh.mctable import TRI_COUNTS, TRI_TABLE


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.uint64])
def test_random_labels_give_closed_oriented_surfaces(dtype):
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 5, size=(13, 11, 9)).astype(dtype)
    if dtype == np.uint64:
        labels[labels == 4] = np.uint64(2**63 + 5)  # IDs beyond 2**63 survive
    padded = np.zeros(tuple(s + 2 for s in labels.shape), dtype)
    padded[1:-1, 1:-1, 1:-1] = labels
    pieces = CPUBackend().mesh(padded, 1000)
    assert {p.label for p in pieces} == set(np.unique(labels).tolist()) - {0}
    for p in pieces:
        f = p.faces
        directed = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
        assert np.unique(directed, axis=0).shape[0] == len(directed)
        _, c = np.unique(np.sort(directed, axis=1), axis=0, return_counts=True)
        assert (c == 2).all()
        # divergence theorem: enclosed volume is positive (outward normals)
        v = p.vertices2 / 2.0
        a, b, cc = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
        assert np.einsum("ij,ij->", a, np.cross(b, cc)) > 0
        assert len(np.unique(p.vertices2, axis=0)) == len(p.vertices2)


def _check_piece_labels(padded, pieces):
    """Every vertex of a piece is the midpoint of a lattice edge with the piece's label on
    exactly one end (the surface of that label, not of another segment)."""
    for p in pieces:
        v2 = p.vertices2.astype(np.int64)
        axis = np.argmax(v2 & 1, axis=1)
        lo = v2 >> 1
        hi = lo + np.eye(3, dtype=np.int64)[axis]
        a = padded[lo[:, 0], lo[:, 1], lo[:, 2]] == p.label
        b = padded[hi[:, 0], hi[:, 1], hi[:, 2]] == p.label
        assert (a != b).all(), f"piece of label {p.label} has vertices off its boundary"


@pytest.mark.parametrize("ids", [(1, 2, 3, 4), (2**63 + 5, 9, 2**40, 7), (2**32 + 1, 2**32 + 3, 2**32, 2**33)])
def test_each_piece_lies_on_its_own_labels_boundary(ids):
    # Large IDs (beyond the dense table) are compacted before welding: each piece's label must
    # still be that of the voxels it wraps, whatever order the IDs first appear in.
    rng = np.random.default_rng(11)
    small = rng.integers(0, 5, size=(12, 10, 9))
    padded = np.zeros(tuple(s + 2 for s in small.shape), np.uint64)
    lut = np.array((0,) + tuple(ids), dtype=np.uint64)
    padded[1:-1, 1:-1, 1:-1] = lut[small]
    pieces = CPUBackend().mesh(padded, 4)
    assert {p.label for p in pieces} == set(int(i) for i in ids)
    assert [(p.label, p.piece) for p in pieces] == sorted((p.label, p.piece) for p in pieces)
    _check_piece_labels(padded, pieces)


def test_the_weld_grows_its_vertex_buffer_and_keeps_every_vertex():
    """Isolated voxels of distinct IDs: each is wrapped by 8 triangles on 6 vertices, more
    vertices per triangle than the weld first makes room for (9/16 per triangle and 1,024), so
    its buffer grows while it welds; every vertex is kept, once, on its label's boundary."""
    rng = np.random.default_rng(5)
    padded = np.zeros((42, 42, 42), np.uint32)
    at = np.argwhere(np.ones((13, 13, 13), bool)) * 3 + 2
    padded[tuple(at.T)] = rng.permutation(len(at)) + 1
    tri_label, tri_piece, tri_edges = marching.march_cubes(padded, 1000)
    pieces = marching.weld(tri_label, tri_piece, tri_edges, padded.shape)
    where = {int(padded[tuple(q)]): q for q in at}
    eye = np.eye(3, dtype=np.int64)
    assert sum(len(p.vertices2) for p in pieces) > len(tri_label) * 9 // 16 + 1024   # it grew
    assert len(pieces) == len(at) and {p.label for p in pieces} == set(range(1, len(at) + 1))
    for p in pieces:
        assert p.faces.shape == (8, 3) and len(p.vertices2) == 6
        _, c = np.unique(np.sort(np.concatenate([p.faces[:, [0, 1]], p.faces[:, [1, 2]], p.faces[:, [2, 0]]]), axis=1),
                         axis=0, return_counts=True)
        assert (c == 2).all() and len(c) == 12   # closed, every vertex used
        q = where[p.label]   # the vertices are the midpoints of the voxel's 6 edges to its neighbours
        assert sorted(map(tuple, p.vertices2.astype(np.int64) - 2 * q)) == sorted(map(tuple, np.vstack([eye, -eye])))
    _check_piece_labels(padded, pieces)


@pytest.mark.parametrize("nids", [3, 700, 5000])
def test_relabel_block_numbers_ids_by_rank_like_unique(nids):
    # Local IDs must keep the IDs' order and map back exactly, also past the hash table's
    # growth (1024 slots at first, more than 512 IDs grow it).
    from gpumesh.marching import compact_labels, relabel_block

    rng = np.random.default_rng(nids)
    pool = np.unique(rng.integers(1, 2**64 - 1, size=nids, dtype=np.uint64))
    labels = rng.choice(pool, size=(24, 20, 18))
    labels[rng.random(labels.shape) < 0.3] = 0
    local, ids = relabel_block(labels)
    want = np.unique(labels[labels != 0])
    assert ids.dtype == np.uint64 and np.array_equal(ids, want)
    assert local.dtype == np.uint32 and local.shape == labels.shape
    assert np.array_equal(local == 0, labels == 0)
    assert np.array_equal(ids[local[labels != 0].astype(np.int64) - 1], labels[labels != 0])
    flat = labels[labels != 0]
    uniq, inverse = compact_labels(flat)
    assert np.array_equal(uniq, want) and np.array_equal(uniq[inverse], flat)


def test_vertices_shared_by_neighbouring_pieces_are_on_their_box_planes():
    # piece_in_node marks the vertices on a piece's box planes (decimation freezes them, so
    # that both pieces keep their common border): every vertex a piece shares with another
    # piece of its segment, on the low or the high side, must be marked in both.
    from gpumesh.marching import piece_in_node

    rng = np.random.default_rng(3)
    padded = np.zeros((15, 14, 13), np.uint8)
    padded[1:-1, 1:-1, 1:-1] = rng.integers(0, 3, size=(13, 12, 11))
    ps = 4
    py, pz = (-(-(n - 1) // ps) for n in padded.shape[1:])
    pieces = CPUBackend().mesh(padded, ps)
    node = np.array([2, -1, 5])
    marked = {}
    for p in pieces:
        pc = np.array([p.piece // (py * pz), (p.piece // pz) % py, p.piece % pz])
        p_rel, on_plane = piece_in_node(p, node, pc * ps - node, ps)
        np.testing.assert_array_equal(p_rel, p.vertices2 / 2 - node)
        for v, m in zip(map(tuple, p.vertices2.tolist()), on_plane):
            marked.setdefault((p.label, v), []).append(bool(m))
    shared = [m for m in marked.values() if len(m) > 1]
    assert len(shared) > 100 and all(all(m) for m in shared)


def test_table_is_complementary_consistent():
    # Every case emits triangles exactly when the cube is mixed.
    assert TRI_COUNTS[0] == 0 and TRI_COUNTS[255] == 0
    assert (TRI_COUNTS[1:255] > 0).all()
    assert TRI_TABLE.shape[1] == TRI_COUNTS.max()


def test_table_kept_on_disk_is_the_rules_table(tmp_path, monkeypatch):
    from gpumesh import mctable

    counts, table = mctable.build_table()
    assert np.array_equal(TRI_COUNTS, counts) and np.array_equal(TRI_TABLE, table)
    assert TRI_COUNTS.dtype == np.int32 and TRI_TABLE.dtype == np.int8
    assert mctable.table_cache_path().parent.name == "__pycache__"

    def same(got):
        return np.array_equal(got[0], counts) and np.array_equal(got[1], table) and got[1].dtype == np.int8

    path = tmp_path / "__pycache__" / "mctable-test.npy"
    monkeypatch.setattr(mctable, "table_cache_path", lambda: path)
    assert same(mctable.load_table()) and path.exists()      # built, then written
    assert same(mctable.load_table())                        # read back
    good = np.load(path)
    assert np.array_equal(good, mctable._pack(counts, table))
    # a count that disagrees with its rows, rows cut short, bytes that are no array, an empty
    # file: each is ignored, the table built by the rule and written again
    for bad in (good.copy(), good[:, :-3], b"not an array", b""):
        if isinstance(bad, bytes):
            path.write_bytes(bad)
        else:
            if bad.shape == good.shape:
                bad[7, 0] += 1
            np.save(path, bad)
        assert same(mctable.load_table())
        assert np.array_equal(np.load(path), good)


def _mode_reference(block: np.ndarray) -> int:
    vals = block[block != 0]
    if len(vals) == 0:
        return 0
    ids, counts = np.unique(vals, return_counts=True)
    return int(ids[counts == counts.max()].min())


@pytest.mark.parametrize("factor", [(2, 2, 2), (2, 2, 1), (1, 2, 2), (2, 1, 1), (1, 1, 1)])
def test_downsample_rule_matches_reference(factor):
    rng = np.random.default_rng(3)
    labels = rng.choice(np.array([0, 0, 0, 3, 9, 12], np.uint32), size=(9, 8, 7))
    out = downsample_labels(labels, factor)
    fx, fy, fz = factor
    assert out.shape == tuple(-(-n // f) for n, f in zip(labels.shape, factor))
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            for k in range(out.shape[2]):
                block = labels[fx * i:fx * i + fx, fy * j:fy * j + fy, fz * k:fz * k + fz]
                assert out[i, j, k] == _mode_reference(block)
    if factor == (1, 1, 1):
        assert np.array_equal(out, labels)


@pytest.mark.parametrize("factor", [(2, 2, 3), (0, 2, 2), (2, 2)])
def test_downsample_factor_must_be_one_or_two_per_axis(factor):
    with pytest.raises(ValueError, match="1 or 2 per axis"):
        downsample_labels(np.zeros((4, 4, 4), np.uint8), factor)


@pytest.mark.parametrize("voxel, lods, how, want", [
    ((4, 4, 40), 6, "auto", [[0, 0, 0], [1, 1, 0], [2, 2, 0], [3, 3, 0], [4, 4, 1], [5, 5, 2]]),
    ((4, 4, 40), 3, "all", [[0, 0, 0], [1, 1, 1], [2, 2, 2]]),
    ((32, 32, 40), 4, "auto", [[0, 0, 0], [1, 1, 1], [2, 2, 2], [3, 3, 3]]),   # near isotropic
    ((1, 1, 1), 2, "auto", [[0, 0, 0], [1, 1, 1]]),
    ((40, 8, 8), 3, "auto", [[0, 0, 0], [0, 1, 1], [0, 2, 2]]),                # any axis
    ((4, 7, 120), 6, "auto", [[0, 0, 0], [1, 1, 0], [2, 2, 0], [3, 3, 0], [4, 4, 0], [5, 5, 1]]),
    ((4, 4, 8), 3, "auto", [[0, 0, 0], [1, 1, 0], [2, 2, 1]]),                 # exactly 2:1: x, y doubled first
])
def test_lod_factors_halve_the_finer_axes_until_near_isotropic(voxel, lods, how, want):
    assert lod_factors(voxel, lods, how).tolist() == want


@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.int64])
def test_signed_labels_downsample_as_their_unsigned_view(dtype):
    """Ties go to the smaller ID as the GPU kernel compares them, unsigned: a negative label
    (an ID of 2**(bits-1) or more, stored signed) loses a tie to 5."""
    rng = np.random.default_rng(3)
    labels = rng.choice(np.array([-1, 5, 0, 7], dtype), (8, 8, 8))
    labels[:2, :2, :2] = np.array([-1, 5] * 4, dtype).reshape(2, 2, 2)   # a 4:4 tie
    got = downsample_labels(labels, (2, 2, 2))
    udt = np.dtype(dtype).str.replace("i", "u")
    want = downsample_labels(labels.view(udt), (2, 2, 2)).view(dtype)
    np.testing.assert_array_equal(got, want)
    assert got[0, 0, 0] == 5


@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.int64])
def test_signed_labels_mesh_as_their_unsigned_view(dtype):
    """The backend's contract: signed labels are meshed as their unsigned view, a piece's label
    being that value (a negative label is an ID of 2**(bits-1) or more, stored signed), as the
    GPU backend gives them."""
    rng = np.random.default_rng(5)
    labels = np.zeros((12, 11, 10), dtype)
    labels[1:-1, 1:-1, 1:-1] = rng.choice(np.array([-1, 5, 0, -7], dtype), (10, 9, 8))
    udt = np.dtype(dtype).str.replace("i", "u")
    got = CPUBackend().mesh(labels, 4)
    want = CPUBackend().mesh(labels.view(udt), 4)
    assert {p.label for p in got} == {int(v) for v in np.array([-1, 5, -7], dtype).view(udt)}
    assert [(p.label, p.piece) for p in got] == [(p.label, p.piece) for p in want]
    for a, b in zip(got, want):
        assert np.array_equal(a.vertices2, b.vertices2) and np.array_equal(a.faces, b.faces)


@pytest.mark.parametrize("dtype", [">u2", ">u4", ">i4", ">i8"])
def test_big_endian_labels_mesh_and_downsample_as_native_ones(dtype):
    """A big-endian array (an N5 block as stored; NumPy holds it as it is) meshes and
    downsamples as the same labels in the machine's byte order: its labels were read as other
    numbers (another tie of the mode, other pieces' IDs), and numba refused a big-endian
    unsigned array with a TypingError."""
    rng = np.random.default_rng(8)
    native = np.dtype(dtype).newbyteorder("=")
    labels = rng.choice(np.array([0, 3, 258, 70000 % 2**(8 * native.itemsize)], native), (10, 9, 8))
    labels[:2, :2, :2] = np.array([3, 258] * 4, native).reshape(2, 2, 2)   # a 4:4 tie: 3 wins
    big = labels.astype(dtype)
    assert not big.dtype.isnative and np.array_equal(big, labels)
    got = downsample_labels(big, (2, 2, 2))
    assert got.dtype == native and got[0, 0, 0] == 3
    np.testing.assert_array_equal(got, downsample_labels(labels, (2, 2, 2)))
    want = CPUBackend().mesh(labels, 4)
    pieces = CPUBackend().mesh(big, 4)
    assert [(p.label, p.piece) for p in pieces] == [(p.label, p.piece) for p in want]
    for a, b in zip(pieces, want):
        assert np.array_equal(a.vertices2, b.vertices2) and np.array_equal(a.faces, b.faces)
    if native.kind == "u":   # march_cubes reads unsigned labels
        for g, w in zip(marching.march_cubes(big, 4), marching.march_cubes(labels, 4)):
            assert np.array_equal(g, w)


def test_lod_factors_keep_a_node_within_the_quantization():
    """A LOD ``k`` node spans ``C * 2**(k - shift)`` voxels per axis: past ``max_ratio * C`` the
    step halves every axis, so a half voxel stays at least one quantization step."""
    got = lod_factors((4, 4, 400), 6, max_ratio=4)
    assert got.tolist() == [[0, 0, 0], [1, 1, 0], [2, 2, 0], [3, 3, 1], [4, 4, 2], [5, 5, 3]]
    assert all(k - row.min() <= 2 for k, row in enumerate(got))
    with pytest.raises(ValueError, match="downsampling must be one of auto, all"):
        lod_factors((1, 1, 1), 2, "z")


def test_thin_segment_survives_background():
    labels = np.zeros((8, 8, 8), np.uint32)
    labels[3, :, 3] = 5  # a one-voxel-thick line in background
    out = downsample_labels(downsample_labels(labels))
    assert (out == 5).any()


@pytest.mark.parametrize("bits", [10, 16])
def test_draco_decodes_to_exact_quantized_integers(bits):
    import DracoPy

    rng = np.random.default_rng(bits)
    q = rng.integers(0, 2**bits, size=(500, 3))
    q[0] = 0
    q[1] = 2**bits - 1
    faces = np.array([rng.choice(500, 3, replace=False) for _ in range(900)])
    mesh = DracoPy.decode(encode.encode_draco(q, faces, bits))
    got = np.asarray(mesh.points, np.float64)
    assert np.array_equal(got, np.round(got))
    used = np.unique(faces)
    assert {tuple(r) for r in got.astype(np.int64).tolist()} == {tuple(r) for r in q[used].tolist()}
    # triangles map to the same positions
    tri_in = {tuple(sorted(map(tuple, q[f].tolist()))) for f in faces}
    tri_out = {tuple(sorted(map(tuple, got[f].astype(np.int64).tolist()))) for f in np.asarray(mesh.faces)}
    assert tri_in == tri_out


@pytest.mark.parametrize("bits", [10, 16])
def test_midplane_quantizes_to_partition_point(bits):
    chunk = 64
    q = encode.quantize(np.array([[0.0, chunk / 2, chunk]]), chunk, bits)
    assert q.tolist() == [[0, 2 ** (bits - 1), 2**bits - 1]]


def test_quantize_rounds_to_the_nearest_step_and_clamps_to_the_node():
    """Quantization takes the nearest step (positions a rounding error off a step, as float
    arithmetic leaves them, land on it) and clamps to [0, 2**bits - 1] (a position a hair below
    the node's origin is 0, not a wrapped integer)."""
    chunk, bits = 32, 16
    step = chunk / 2 ** bits
    p = np.array([[3 * step + 0.4 * step, 3 * step + 0.6 * step, 5 * step - 1e-9],
                  [-1e-9, -1.6 * step, chunk + step],
                  [7 * step + 0.5001 * step, 7 * step + 0.4999 * step, chunk - 0.4 * step]])
    q = encode.quantize(p, chunk, bits)
    assert q.tolist() == [[3, 4, 5], [0, 0, 2 ** bits - 1], [8, 7, 2 ** bits - 1]]


@pytest.mark.parametrize("bits", [10, 16])
def test_weld_quantized_matches_a_slow_reference(bits):
    """Vertices at one quantized position become the first of them (in input order), faces are
    renumbered into them, and a triangle left with a repeated vertex, whichever two corners
    meet, is dropped; positions anywhere in [0, 2**bits), the far face's 2**bits - 1 included."""
    rng = np.random.default_rng(bits)
    rows = rng.integers(0, 2**bits, (40, 3))
    rows[0], rows[1] = 2**bits - 1, [0, 2**bits - 1, 1]
    q = rows[rng.integers(0, len(rows), 300)]
    faces = rng.integers(0, len(q), (900, 3))
    got_q, got_f, kept = encode.weld_quantized(q, faces)
    first = {}
    for i, r in enumerate(map(tuple, q.tolist())):
        first.setdefault(r, i)
    want_kept = sorted(first.values())
    new_id = {v: n for n, v in enumerate(want_kept)}
    remap = np.array([new_id[first[r]] for r in map(tuple, q.tolist())])
    f = remap[faces]
    f = f[(f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 0] != f[:, 2])]
    assert 0 < len(f) < len(faces)
    assert kept.tolist() == want_kept
    assert np.array_equal(got_q, q[want_kept]) and np.array_equal(got_f, f)


@pytest.mark.parametrize("bits", [10, 16])
def test_draco_of_no_triangle_is_empty(bits):
    """A fragment without triangles is written as no bytes (the extension refuses to encode it)."""
    assert encode.encode_draco(np.zeros((3, 3), np.int64), np.zeros((0, 3), np.int32), bits) == b""


def test_draco_extension_is_built_under_ci():
    # The extension is optional for users (DracoPy writes the same bytes), but CI must build it.
    import os

    if encode._dracoenc is None:
        if os.environ.get("CI"):
            pytest.fail("gpumesh._dracoenc was not built (see setup.py); CI must exercise it")
        pytest.skip("gpumesh._dracoenc not built; encode_draco uses DracoPy")


@pytest.mark.parametrize("bits", [10, 16])
def test_draco_extension_writes_dracopys_bytes_on_real_fragments(crop, bits, monkeypatch):
    # Real marching-cubes pieces of the pinky40 crop, decimated as the pipeline does, with
    # unused vertices and a shuffled vertex order: the extension must give DracoPy's bytes.
    if encode._dracoenc is None:
        pytest.skip("gpumesh._dracoenc not built")
    from gpumesh.lod import decimate

    pieces = [p for p in CPUBackend().mesh(np.ascontiguousarray(crop[:65, :65, :65]), 64) if len(p.faces) > 30]
    assert len(pieces) > 20
    rng = np.random.default_rng(bits)
    for p in pieces[:40]:
        v, f = decimate(p.vertices2 * 0.5, p.faces, 0.4, np.array([32.0, 32.0, 40.0]))
        q = encode.quantize(v, 64, bits)
        extra = rng.integers(0, 2**bits, (5, 3))
        allq = np.vstack([q, extra])
        perm = rng.permutation(len(allq))
        inv = np.empty_like(perm)
        inv[perm] = np.arange(len(perm))
        q2, f2 = allq[perm], inv[f]
        ours = encode.encode_draco(q2, f2, bits)
        with monkeypatch.context() as m:  # the fallback path: DracoPy.encode
            m.setattr(encode, "_dracoenc", None)
            theirs = encode.encode_draco(q2, f2, bits)
        assert ours == theirs


@pytest.fixture
def draco_symbol_path():
    """Switch the extension's entropy coding between its linear-time path (from an alphabet of
    ``n`` values on) and Draco's own ``EncodeSymbols`` (``-1``); restored afterwards."""
    if encode._dracoenc is None:
        pytest.skip("gpumesh._dracoenc not built")
    enc = encode._dracoenc
    before = enc._set_symbol_fast_path(-1)
    if before is None:
        pytest.skip("gpumesh._dracoenc built without the linker wrap (not Linux)")
    enc._set_symbol_fast_path(before)

    def use(n):
        enc._set_symbol_fast_path(n)
    yield use
    enc._set_symbol_fast_path(before)


def _real_fragments(crop, bits, count):
    """Pipeline-like Draco inputs: decimated marching-cubes pieces of the pinky40 crop, at LOD 0
    (32-voxel pieces) and LOD 1 (the crop downsampled, 16-voxel pieces), quantized."""
    from gpumesh.lod import decimate

    out = []
    for k, labels, size in ((0, crop, 32), (1, downsample_labels(crop), 16)):
        for p in CPUBackend().mesh(np.ascontiguousarray(labels), size):
            if len(p.faces) > 4:
                v, f = decimate(p.vertices2 * 0.5, p.faces, 0.4, np.array([32.0, 32.0, 40.0]) * 2**k)
                q, f, _ = encode.weld_quantized(encode.quantize(v, size, bits), f)
                if len(f):
                    out.append((q, f))
    assert len(out) >= count
    return out[:count]


@pytest.mark.parametrize("bits", [10, 16])
def test_draco_symbol_fast_path_writes_dracos_bytes(crop, bits, draco_symbol_path, monkeypatch):
    # The extension codes Draco's symbol streams over large alphabets itself (ranks through
    # Draco's RAnsSymbolEncoder, the probability table rewritten with its zero runs).  Every
    # fragment must get the bytes of Draco's own EncodeSymbols and of DracoPy, the fast path must
    # actually run (at 16 bits nearly every fragment's positions), and the result must decode to
    # the input.
    import DracoPy

    enc = encode._dracoenc
    frags = _real_fragments(crop, bits, 300)
    draco_symbol_path(-1)
    theirs = [encode.encode_draco(q, f, bits) for q, f in frags]
    for n in (0, 4096):
        draco_symbol_path(n)
        fast0, _ = enc._symbol_calls()
        ours = [encode.encode_draco(q, f, bits) for q, f in frags]
        fast = enc._symbol_calls()[0] - fast0
        assert [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b] == []
        if bits == 16 or n == 0:
            assert fast >= len(frags) // 2, fast
    with monkeypatch.context() as m:   # DracoPy's own Draco
        m.setattr(encode, "_dracoenc", None)
        assert [encode.encode_draco(q, f, bits) for q, f in frags[:60]] == theirs[:60]
    for (q, f), data in zip(frags[:20], theirs):
        mesh = DracoPy.decode(data)
        got = np.asarray(mesh.points, np.int64)
        assert {tuple(r) for r in got.tolist()} == {tuple(r) for r in np.asarray(q)[np.unique(f)].astype(np.int64).tolist()}


def test_draco_symbol_fast_path_edge_cases(draco_symbol_path):
    # Random meshes over every Draco speed (its symbol coding level moves the rANS precision),
    # with sparse alphabets (gaps far beyond one 64-value run), a single distinct value, all
    # values below 2**18 (the raw scheme's limit) and above it (the tagged scheme): the
    # extension's bytes equal Draco's own EncodeSymbols in each case.
    enc = encode._dracoenc
    rng = np.random.default_rng(5)
    cases = []
    for bits, step, n in ((16, 512, 300), (16, 1, 400), (16, 4096, 50), (18, 1, 2000), (20, 1, 300), (12, 64, 40),
                          (16, 512, 3)):
        q = (rng.integers(0, 2**bits // step, size=(n, 3)) * step).astype(np.float32)
        faces = np.array([rng.choice(n, 3, replace=False) for _ in range(2 * n)], np.uint32)
        cases.append((q, faces, bits))
    flat = np.zeros((4, 3), np.float32)
    flat[1:, 0] = [512, 1024, 1536]   # collinear: one value in two of the axes
    cases.append((flat, np.array([[0, 1, 2], [0, 2, 3]], np.uint32), 16))
    fast0, _ = enc._symbol_calls()
    for speed in range(11):
        draco_symbol_path(-1)
        theirs = [enc.encode(q, f, bits, speed) for q, f, bits in cases]
        draco_symbol_path(0)
        assert [enc.encode(q, f, bits, speed) for q, f, bits in cases] == theirs, speed
    # the fast path coded streams at every speed but 10 (Draco's sequential coder), 4 or 5 a speed
    assert enc._symbol_calls()[0] - fast0 >= 10 * 3


def test_draco_extension_rejects_bad_buffers():
    if encode._dracoenc is None:
        pytest.skip("gpumesh._dracoenc not built")
    enc = encode._dracoenc.encode
    q = np.zeros((3, 3), np.float32)
    f = np.array([[0, 1, 2]], np.uint32)
    with pytest.raises(ValueError):
        enc(q.astype(np.float64), f, 16, 3)
    with pytest.raises(ValueError):
        enc(q, f.astype(np.int64), 16, 3)
    with pytest.raises(IndexError):
        enc(q, np.array([[0, 1, 3]], np.uint32), 16, 3)
    with pytest.raises(ValueError):
        enc(q, np.zeros((0, 3), np.uint32), 16, 3)
    with pytest.raises(ValueError):
        enc(q, f, 40, 3)
