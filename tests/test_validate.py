"""Tests of gpumesh.reader and gpumesh.validate on small hand-built mesh directories."""

from __future__ import annotations

import gzip
import importlib
import itertools
import json
import re
import os
import struct

import DracoPy
import numpy as np
import pytest

from gpumesh import reader, storage
from gpumesh.errors import InvalidMeshError
from gpumesh.reader import (
    Manifest,
    decode_fragment,
    load_fragments,
    load_mesh,
    open_mesh,
    PLACEHOLDER_FACES,
    is_placeholder,
    parse_legacy_fragment,
)
from gpumesh.validate import crossing_triangles, missing_parents, validate, zorder_less
from gpumesh.writer import placeholder_positions

validate_module = importlib.import_module("gpumesh.validate")   # (gpumesh.validate: the function)

BITS = 10
CHUNK = [64.0, 64.0, 32.0]
ORIGIN = [10.0, 20.0, 30.0]
OFFSETS = [[0.5, 0.0, 0.0], [0.0, 0.0, 0.25]]
TRANSFORM = [32, 4, 0, 100, 0, 32, 0, -50, 2, 0, 40, 7]  # (32,32,40) sheared (x += 4y, z += 2x) + translation


def draco(points, faces, bits=BITS):
    """Draco-encode integer points with identity quantization."""
    return DracoPy.encode(
        np.asarray(points, dtype=np.float64),
        np.asarray(faces, dtype=np.uint32),
        quantization_bits=bits,
        quantization_range=2**bits - 1,
        quantization_origin=[0, 0, 0],
        preserve_order=False,
    )


def info(**over):
    d = {
        "@type": "neuroglancer_multilod_draco",
        "vertex_quantization_bits": BITS,
        "transform": TRANSFORM,
        "lod_scale_multiplier": 1.0,
    }
    d.update(over)
    return d


# LOD 0: two nodes side by side along x; LOD 1: their parent.
F_LOD0_A = draco([[0, 0, 0], [1023, 0, 0], [1023, 1023, 0]], [[0, 1, 2]])
F_LOD0_B = draco([[0, 0, 0], [1023, 0, 0], [0, 1023, 0]], [[0, 1, 2]])
# Touches the partition plane x = 512 / y = 512 but does not cross it.
F_LOD1 = draco(
    [[0, 0, 0], [512, 0, 0], [512, 512, 0], [1023, 0, 0], [1023, 512, 0]],
    [[0, 1, 2], [1, 3, 4]],
)
F_CROSS = draco([[0, 0, 0], [1023, 0, 0], [0, 1023, 0]], [[0, 1, 2]])


SHARDING = {"@type": "neuroglancer_uint64_sharded_v1", "preshift_bits": 0, "hash": "murmurhash3_x86_128",
            "minishard_bits": 1, "shard_bits": 1, "minishard_index_encoding": "gzip", "data_encoding": "raw"}


def seg_parts(lod0=((0, 0, 0), (1, 0, 0)), lod1=((0, 0, 0),), frags0=(F_LOD0_A, F_LOD0_B), frags1=(F_LOD1,)):
    m = Manifest(
        chunk_shape=CHUNK,
        grid_origin=ORIGIN,
        num_lods=2,
        lod_scales=[1.0, 2.0],
        vertex_offsets=OFFSETS,
        fragment_positions=[np.array(lod0, np.uint32), np.array(lod1, np.uint32)],
        fragment_sizes=[[len(f) for f in frags0], [len(f) for f in frags1]],
    )
    return m.to_bytes(), b"".join(frags0) + b"".join(frags1)


def write_dir(kv, segments, info_obj=None):
    storage.write_json(kv, "info", info() if info_obj is None else info_obj)
    for seg, (mbytes, data) in segments.items():
        storage.write(kv, f"{seg}.index", mbytes)
        storage.write(kv, str(seg), data)


@pytest.fixture
def good(tmp_path):
    kv = storage.open_kvstore(tmp_path / "mesh")
    segs = {
        1: seg_parts(),
        # segment 2: two LOD 0 nodes whose parent at LOD 1 is an empty (0-byte) fragment
        2: seg_parts(lod0=((0, 0, 0), (0, 1, 0)), frags1=(b"",)),
    }
    write_dir(kv, segs)
    return tmp_path / "mesh", kv, segs


# ------------------------------------------------------------------------------------------


def test_valid_multires_passes_and_counts(good):
    path, _, segs = good
    rep = validate(path)
    assert rep.ok, rep.errors
    assert rep.kind == "multires" and rep.num_segments == 2
    l0, l1 = rep.per_lod
    assert (l0["fragments"], l0["empty_fragments"], l0["triangles"], l0["segments_with_lod"]) == (4, 0, 4, 2)
    assert (l1["fragments"], l1["empty_fragments"], l1["triangles"], l1["segments_with_lod"]) == (2, 1, 2, 2)
    assert l0["bytes"] + l1["bytes"] == sum(len(d) for _, d in segs.values())
    # segment 2's zero-byte parent: valid, with a warning for WEBKNOSSOS
    assert len(rep.warnings) == 1 and "1 zero-byte" in rep.warnings[0] and "WEBKNOSSOS" in rep.warnings[0]
    table = rep.format_table()
    assert table.splitlines()[-1] == "OK" and "total" in table and "warning: 1 zero-byte" in table
    assert table.splitlines()[1].split() == ["LOD", "fragments", "empty", "triangles", "fragment", "bytes"]
    quick = validate(path, decode=False)
    assert quick.ok and quick.per_lod[0]["triangles"] is None
    assert validate(path, segments=[2]).num_segments == 1


def test_manifest_round_trip(good):
    _, _, segs = good
    for mbytes, _ in segs.values():
        m = Manifest.from_bytes(mbytes)
        assert m.to_bytes() == mbytes
    m = Manifest.from_bytes(segs[1][0])
    assert m.num_lods == 2 and m.fragment_positions[0].tolist() == [[0, 0, 0], [1, 0, 0]]
    np.testing.assert_array_equal(m.chunk_shape, CHUNK)
    np.testing.assert_array_equal(m.vertex_offsets, OFFSETS)
    r = m.fragment_byte_ranges()
    assert r[0].tolist() == [[0, len(F_LOD0_A)], [len(F_LOD0_A), len(F_LOD0_A) + len(F_LOD0_B)]]
    assert r[1][0, 1] == m.total_bytes == len(segs[1][1])
    with pytest.raises(InvalidMeshError):
        Manifest.from_bytes(segs[1][0][:-4])
    with pytest.raises(InvalidMeshError):
        Manifest.from_bytes(segs[1][0] + b"\0\0\0\0")


def _expected_model(pos, q, lod):
    T = np.array(TRANSFORM, float).reshape(3, 4)
    stored = (
        np.array(ORIGIN) + np.array(OFFSETS[lod]) + np.array(CHUNK) * 2**lod * (np.array(pos) + np.array(q) / 1023.0)
    )
    return T[:, :3] @ stored + T[:, 3]


def _rowset(a):
    return {tuple(np.round(r, 6)) for r in np.asarray(a)}


def test_load_mesh_model_space_and_weld(good):
    path, _, _ = good
    src = open_mesh(path)
    assert src.kind == "multires" and src.segment_ids() == [1, 2]
    mesh = load_mesh(src, 1, 0)
    expected = [_expected_model((0, 0, 0), q, 0) for q in ([0, 0, 0], [1023, 0, 0], [1023, 1023, 0])]
    expected += [_expected_model((1, 0, 0), q, 0) for q in ([0, 0, 0], [1023, 0, 0], [0, 1023, 0])]
    # the two fragments share 2 border vertices: 6 -> 4 after welding
    assert len(mesh.vertices) == 4 and len(mesh.faces) == 2
    assert _rowset(mesh.vertices) == _rowset(expected)
    raw = load_mesh(path, 1, 0, weld=False)
    assert len(raw.vertices) == 6 and _rowset(raw.vertices) == _rowset(expected)
    # faces reference the right corners
    tri_sets = {frozenset(_rowset(mesh.vertices[f])) for f in mesh.faces}
    assert frozenset(_rowset(expected[:3])) in tri_sets and frozenset(_rowset(expected[3:])) in tri_sets
    lod1 = load_mesh(path, 1, 1)
    assert _rowset(lod1.vertices) == _rowset(
        [_expected_model((0, 0, 0), q, 1) for q in ([0, 0, 0], [512, 0, 0], [512, 512, 0], [1023, 0, 0], [1023, 512, 0])]
    )
    frags = load_fragments(path, 2, 1)
    assert len(frags) == 1 and frags[0]["positions_q"].shape == (0, 3)
    assert len(load_mesh(path, 2, 1).faces) == 0
    with pytest.raises(InvalidMeshError, match="segment 99 not found"):
        load_mesh(path, 99)
    with pytest.raises(InvalidMeshError, match="out of range"):
        load_mesh(path, 1, 2)


def _bad(tmp_path, segs, info_obj=None):
    kv = storage.open_kvstore(tmp_path / "bad")
    write_dir(kv, segs, info_obj)
    rep = validate(tmp_path / "bad")
    assert not rep.ok
    assert rep.format_table().splitlines()[-1 - min(rep.num_errors, 20)].endswith("violations")
    return rep


def _has(rep, *words):
    assert any(all(w in e for w in words) for e in rep.errors), rep.errors


def test_zorder_violation(tmp_path):
    rep = _bad(tmp_path, {1: seg_parts(lod0=((1, 0, 0), (0, 0, 0)), frags0=(F_LOD0_B, F_LOD0_A))})
    _has(rep, "segment 1", "lod 0", "node 1", "Z-order")


def test_missing_parent(tmp_path):
    rep = _bad(tmp_path, {1: seg_parts(lod1=((5, 5, 5),))})
    _has(rep, "segment 1", "lod 0", "node 0", "parent [0, 0, 0] missing")


def _seg_lods(*lods):
    """A manifest of ``len(lods)`` LODs with nodes at the given positions (LOD 0 fragments
    F_LOD0_A, coarser ones F_LOD1, which crosses no partition plane) and its data."""
    frags = [[F_LOD0_A if k == 0 else F_LOD1] * len(p) for k, p in enumerate(lods)]
    m = Manifest(chunk_shape=CHUNK, grid_origin=ORIGIN, num_lods=len(lods),
                 lod_scales=[float(2 ** k) for k in range(len(lods))], vertex_offsets=[[0.0] * 3] * len(lods),
                 fragment_positions=[np.array(p, np.uint32).reshape(-1, 3) for p in lods],
                 fragment_sizes=[[len(f) for f in fs] for fs in frags])
    return m.to_bytes(), b"".join(b"".join(fs) for fs in frags)


@pytest.mark.parametrize("lods, words", [
    ((((0, 0, 0), (0, 0, 0)), ((0, 0, 0),)), ("lod 0", "node 1", "Z-order")),           # a node twice
    ((((0, 0, 0), (2, 0, 0)), ((1, 0, 0), (0, 0, 0))), ("lod 1", "node 1", "Z-order")),  # the top LOD
    ((((0, 0, 0),), ((0, 0, 0), (2, 0, 0)), ((1, 0, 0), (0, 0, 0))), ("lod 2", "node 1", "Z-order")),
    ((((0, 0, 0),), ((0, 0, 0),), ((5, 5, 5),)), ("lod 1", "node 0", "missing at lod 2")),  # a parent past LOD 1
], ids=["duplicate", "top-lod-order", "lod2-order", "lod1-parent"])
def test_octree_rules_are_checked_at_every_lod(tmp_path, lods, words):
    rep = _bad(tmp_path, {1: _seg_lods(*lods)})
    _has(rep, "segment 1", *words)


def test_size_mismatch(tmp_path):
    m, d = seg_parts()
    rep = _bad(tmp_path, {1: (m, d[:-5])})
    _has(rep, "segment 1", "data file has", "sum to")
    rep = _bad(tmp_path / "long", {1: (m, d + b"\0" * 5)})   # bytes past the last fragment
    _has(rep, "segment 1", f"data file has {len(d) + 5} bytes", "sum to")


def test_undecodable_fragment(tmp_path):
    garbage = b"\x07" * len(F_LOD0_B)
    rep = _bad(tmp_path, {1: seg_parts(frags0=(F_LOD0_A, garbage))})
    _has(rep, "segment 1 lod 0 node 1", "Draco")


@pytest.mark.parametrize("pts", [[[0.0, 0.0, 0.0], [1000.3, 0.0, 0.0], [0.0, 700.7, 0.0]],
                                 [[5, 5, 5], [105, 5, 5], [5, 105, 5]]], ids=["fractions", "integers"])
def test_draco_quantization_that_is_not_the_identity(tmp_path, monkeypatch, pts):
    """The client reads Draco's stored integers, not dequantized positions: a fragment with
    Draco's own quantization (an origin and a range of its own) is drawn elsewhere than its
    producer meant, even where its dequantized positions are integers."""
    frag = DracoPy.encode(np.array(pts, np.float64), np.array([[0, 1, 2]], np.uint32))   # Draco's own quantization
    with pytest.raises(InvalidMeshError, match="not the identity"):
        decode_fragment(frag, check_identity=True)
    rep = _bad(tmp_path, {1: seg_parts(frags0=(F_LOD0_A, frag))})
    _has(rep, "segment 1 lod 0 node 1", "not the identity")
    if pts[0] != [5, 5, 5]:   # without gpumesh's extension DracoPy decodes: fractions are still caught
        with monkeypatch.context() as m:
            m.setattr(reader, "_raw_decoder", lambda: None)
            with pytest.raises(InvalidMeshError, match="not integers .*not the identity"):
                decode_fragment(frag, check_identity=True)
    if reader._raw_decoder() is not None and pts[0] == [5, 5, 5]:
        # what the client reads: the origin dropped, the range stretched to DracoPy's 14 bits
        q, _ = decode_fragment(frag)
        assert sorted(q.tolist()) == [[0, 0, 0], [0, 16383, 0], [16383, 0, 0]]


def test_unquantized_draco_positions_are_refused(tmp_path):
    """Float positions that Draco stored unquantized: the client would take their bits for
    integers."""
    if reader._raw_decoder() is None:
        pytest.skip("gpumesh._dracoenc is not built")
    frag = DracoPy.encode(np.array([[0, 0, 0], [100, 0, 0], [0, 100, 0]], np.float64),
                          np.array([[0, 1, 2]], np.uint32), quantization_bits=0)
    with pytest.raises(InvalidMeshError, match="not quantized integers"):
        decode_fragment(frag)


def test_out_of_range_positions(tmp_path):
    frag = draco([[0, 0, 0], [1024, 0, 0], [0, 5, 0]], [[0, 1, 2]], bits=11)
    rep = _bad(tmp_path, {1: seg_parts(frags0=(F_LOD0_A, frag))})
    _has(rep, "segment 1 lod 0 node 1", "outside [0, 2**10)")
    for load in (load_fragments, load_mesh):   # the readers refuse them too
        with pytest.raises(InvalidMeshError, match=r"outside \[0, 2\*\*10\)"):
            load(tmp_path / "bad", 1, 0)


def test_a_missing_data_file_is_reported_without_decoding(good):
    path, _, _ = good
    os.remove(path / "1")
    for decode in (False, True):
        _has(validate(path, decode=decode), "segment 1", "fragment data file 1 missing")


def test_nearby_vertices_stay_apart_and_stray_files_are_no_segments(good):
    """Welding joins only equal positions: at 0.01 nm per stored unit the fragments' vertices
    lie < 1 nm apart and stay 4 (the two shared corners joined); a file such as
    ``5.index.bak`` is no segment 5."""
    path, kv, _ = good
    storage.write_json(kv, "info", info(transform=[0.01, 0, 0, 0, 0, 0.01, 0, 0, 0, 0, 0.01, 0]))
    assert len(load_mesh(path, 1, 0).vertices) == 4
    storage.write(kv, "5.index.bak", b"old")
    storage.write(kv, "5.index~", b"old")
    assert open_mesh(path).segment_ids() == [1, 2]
    assert validate(path).num_segments == 2


def test_triangle_crossing_grid(tmp_path):
    rep = _bad(tmp_path, {1: seg_parts(frags1=(F_CROSS,))})
    _has(rep, "segment 1 lod 1 node 0", "cross the 2x2x2")
    assert rep.num_errors == 1
    # the same fragment is fine at LOD 0
    assert validate(tmp_path / "bad", segments=[1]).per_lod[0]["triangles"] == 2


def test_the_report_is_the_same_whatever_the_threads(tmp_path):
    """Fragments are decoded on threads (``threads=``, ``--threads``), results taken in the
    manifest's order: the same errors in the same order, and the same counts, as on one."""
    garbage = b"\x07" * len(F_LOD0_B)
    m, d = seg_parts()
    segs = {
        1: seg_parts(frags0=(F_LOD0_A, garbage)),           # undecodable, after a good one
        2: seg_parts(frags1=(F_CROSS,)),                     # crosses the grid at LOD 1
        3: (m, d[:-5]),                                      # data short: its last fragment past the end
        4: seg_parts(lod0=((0, 0, 0), (0, 1, 0)), frags1=(b"",)),
        5: seg_parts(frags0=(garbage, F_LOD0_A)),
    }
    kv = storage.open_kvstore(tmp_path / "mixed")
    write_dir(kv, segs)
    reports = [validate(tmp_path / "mixed", threads=t) for t in (1, 2, 5)]
    one = reports[0]
    assert one.num_errors >= 4
    nodes = [e for e in one.errors if "lod" in e and "node" in e]
    assert len(nodes) == 4, one.errors
    for e, words in zip(nodes,
                        [("segment 1 lod 0 node 1", "Draco"), ("segment 2 lod 1 node 0", "cross the 2x2x2"),
                         ("segment 3", "beyond end of data file"), ("segment 5 lod 0 node 0", "Draco")]):
        assert all(w in e for w in words), (e, words)
    for rep in reports[1:]:
        assert rep.errors == one.errors and rep.per_lod == one.per_lod and rep.warnings == one.warnings
    with pytest.raises(ValueError, match="threads"):
        validate(tmp_path / "mixed", threads=0)


@pytest.mark.parametrize(
    "info_obj, words",
    [
        (info(**{"@type": "neuroglancer_mesh"}), "@type"),
        (info(vertex_quantization_bits=12), "vertex_quantization_bits"),
        (info(transform=[1, 0, 0]), "transform"),
        (info(lod_scale_multiplier="x"), "lod_scale_multiplier"),
        (info(lod_scale_multiplier=0), "lod_scale_multiplier must be a finite number > 0, got 0"),
        (info(sharding=None), "sharding is null"),
        (info(sharding={"@type": "neuroglancer_uint64_sharded_v1"}), "sharding"),
        (info(segment_properties=["props"]), "segment_properties must be a string"),
        (info(sharding=[1]), "sharding must be a JSON object, got list"),
        (info(sharding=dict(SHARDING, **{"@type": "neuroglancer_sharded"})), "sharding @type is 'neuroglancer_sharded'"),
        (info(sharding=dict(SHARDING, shard_bits=65)), "sharding shard_bits must be an integer in 0..64, got 65"),
        (info(sharding=dict(SHARDING, preshift_bits=True)), "sharding preshift_bits must be an integer"),
        (info(sharding=dict(SHARDING, hash="md5")), "sharding hash must be one of"),
        (info(sharding=dict(SHARDING, data_encoding="zstd")), "sharding data_encoding must be 'raw' or 'gzip'"),
        (info(sharding=dict(SHARDING, minishard_bits=40, shard_bits=30)), "minishard_bits + shard_bits must be <= 64"),
    ],
)
def test_bad_info(tmp_path, info_obj, words):
    from gpumesh.sharding import sharding_problems

    assert sharding_problems(SHARDING) == []    # each case below breaks one thing of a valid spec
    rep = _bad(tmp_path, {1: seg_parts()}, info_obj)
    _has(rep, words)
    assert rep.num_segments == 0
    with pytest.raises(InvalidMeshError):
        open_mesh(tmp_path / "bad")


def test_open_mesh_of_a_missing_path_or_a_file_is_refused(tmp_path):
    """A local path that is missing or a file is no mesh (it opened as an empty legacy mesh, and
    only ``load_mesh`` said so later); a folder without info still opens as a legacy mesh."""
    from gpumesh import load_mesh

    with pytest.raises(InvalidMeshError, match="nothere: no such directory$"):
        open_mesh(tmp_path / "nothere")
    with pytest.raises(InvalidMeshError, match="nothere: no such directory$"):
        load_mesh(str(tmp_path / "nothere"), 1)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(InvalidMeshError, match="afile: a file, not a mesh directory$"):
        open_mesh(f"file://{tmp_path / 'afile'}")
    (tmp_path / "old").mkdir()
    assert open_mesh(tmp_path / "old").kind == "legacy"
    assert not validate(tmp_path / "nothere").ok


def test_truncated_manifest(tmp_path):
    m, d = seg_parts()
    rep = _bad(tmp_path, {1: (m[:-8], d), 2: seg_parts()})
    _has(rep, "segment 1", "manifest has")
    assert rep.num_errors == 1 and rep.num_segments == 2


def test_bad_manifest_values(tmp_path):
    m = Manifest.from_bytes(seg_parts()[0])
    m.lod_scales = np.array([2.0, 1.0])
    m.chunk_shape = np.array([64.0, 0.0, 32.0])
    rep = _bad(tmp_path, {1: (m.to_bytes(), seg_parts()[1])})
    _has(rep, "lod_scales")
    _has(rep, "chunk_shape")


@pytest.mark.parametrize("field, value, words", [
    ("num_lods", 0, "num_lods is 0, must be >= 1"),
    ("grid_origin", [10.0, np.nan, 30.0], "grid_origin [10.0, nan, 30.0] is not finite"),
    ("vertex_offsets", [[0.5, 0.0, np.inf], [0.0, 0.0, 0.25]], "vertex_offsets are not finite"),
    ("lod_scales", [1.0, -2.0], "lod_scales [1.0, -2.0] must be finite and positive"),
    ("lod_scales", [np.nan, 2.0], "lod_scales [nan, 2.0] must be finite and positive"),
    ("lod_scales", [0.0, 2.0], "lod_scales [0.0, 2.0] must be finite and positive"),
    ("chunk_shape", [64.0, np.inf, 32.0], "chunk_shape [64.0, inf, 32.0] must be finite and positive"),
])
def test_each_bad_manifest_value_is_reported_alone(tmp_path, field, value, words):
    m = Manifest.from_bytes(seg_parts()[0])
    if field == "num_lods":     # a manifest of no LODs lists no fragments
        m = Manifest(chunk_shape=m.chunk_shape, grid_origin=m.grid_origin, num_lods=0, lod_scales=[],
                     vertex_offsets=np.zeros((0, 3)), fragment_positions=[], fragment_sizes=[])
        data = b""
    else:
        setattr(m, field, np.array(value, dtype=np.float32))
        data = seg_parts()[1]
    rep = _bad(tmp_path, {1: (m.to_bytes(), data), 2: seg_parts()})
    assert rep.num_errors == 1 and "segment 1: " + words in rep.errors[0], rep.errors


def test_many_octree_violations_are_summed_up(tmp_path):
    """Past five, Z-order violations and nodes without a parent are counted in one line each."""
    lod0 = [(x, 0, 0) for x in range(8, 0, -1)]     # 7 pairs out of Z-order
    frag = draco([[0, 0, 0], [1023, 0, 0], [1023, 1023, 0]], [[0, 1, 2]])
    rep = _bad(tmp_path, {1: seg_parts(lod0=lod0, lod1=((9, 9, 9),), frags0=(frag,) * 8)})
    order = [e for e in rep.errors if "Z-order" in e]
    assert len(order) == 6 and order[-1] == "segment 1 lod 0: 2 more Z-order violations", rep.errors
    parents = [e for e in rep.errors if "parent" in e]
    assert len(parents) == 6 and parents[-1] == "segment 1 lod 0: 3 more nodes without parent", rep.errors


def test_error_cap(tmp_path):
    segs = {s: seg_parts(lod1=((5, 5, 5),)) for s in range(1, 6)}
    kv = storage.open_kvstore(tmp_path / "cap")
    write_dir(kv, segs)
    rep = validate(tmp_path / "cap", max_errors=3)
    assert rep.num_errors == 10 and len(rep.errors) == 3 and "10 violations" in rep.format_table()


# ------------------------------------------------------------------------------------------


def test_zorder_less_matches_morton():
    def morton(x, y, z):
        code = 0
        for b in range(12):
            code |= ((x >> b) & 1) << (3 * b) | ((y >> b) & 1) << (3 * b + 1) | ((z >> b) & 1) << (3 * b + 2)
        return code

    rng = np.random.default_rng(1)
    pts = rng.integers(0, 2**12, (500, 3)).astype(np.uint32)
    a, b = pts[:250], pts[250:]
    want = np.array([morton(*map(int, p)) < morton(*map(int, q)) for p, q in zip(a, b)])
    np.testing.assert_array_equal(zorder_less(a, b), want)
    cube = np.array(list(itertools.product(range(4), repeat=3)), np.uint32)
    order = sorted(cube.tolist(), key=lambda p: morton(*p))
    o = np.array(order, np.uint32)
    assert zorder_less(o[:-1], o[1:]).all() and not zorder_less(o[1:], o[:-1]).any()
    assert not zorder_less(o, o).any()
    big = np.array([[2**32 - 1, 0, 0]], np.uint32)
    assert zorder_less(np.array([[0, 0, 1]], np.uint32), big)[0] == (morton(0, 0, 1) < (1 << 93) - 1)


def test_segment_nodes_lists_every_node_and_parent_in_z_order_up_to_2_21():
    """The manifest's nodes (octree.segment_nodes) against a plain reference: LOD k holds its
    fragments' nodes and the parents (position >> 1) of LOD k - 1's nodes, each once, in
    Z-order (x bit lowest), for positions up to the spec's 2**21 - 1 per axis (positions that
    differ only in their top bits must stay two nodes)."""
    from gpumesh.octree import segment_nodes

    def morton(p):
        return sum(((int(c) >> b) & 1) << (3 * b + a) for b in range(21) for a, c in enumerate(p))

    rng = np.random.default_rng(7)
    top = 2**21 - 1
    lod0 = np.unique(np.vstack([rng.integers(0, top + 1, (60, 3)), rng.integers(2**20 - 2, 2**20 + 2, (20, 3)),
                                [[0, 0, 0], [2**20, 0, 0], [0, 2**20, 0], [0, 0, 2**20], [top, top, top]]]), axis=0)
    lod1 = np.unique(np.vstack([lod0[::3] >> 1, rng.integers(0, 2**20, (15, 3))]), axis=0)  # some equal to parents
    pos = np.vstack([lod0, lod1]).astype(np.uint32)
    lods = np.array([0] * len(lod0) + [1] * len(lod1))
    nodes, node_lod, source = segment_nodes(pos, lods, num_lods=3)
    want, below = [], []
    for k in range(3):
        mine = {tuple(map(int, pos[i])): i for i in np.flatnonzero(lods == k)}
        level = set(mine) | {tuple(c >> 1 for c in p) for p in below}
        below = sorted(level, key=morton)
        want += [(p, k, mine.get(p, -1)) for p in below]
    got = [(tuple(map(int, p)), int(k), int(s)) for p, k, s in zip(nodes, node_lod, source)]
    assert got == want


def test_the_octree_sort_is_numpys_stable_argsort():
    """``octree._stable_argsort`` (a radix sort: numba's own took seconds to compile) orders as
    ``np.argsort(kind="stable")``: many equal codes keep their order, codes with their top bit
    set, one byte and none, a single code and none."""
    from gpumesh.octree import _stable_argsort

    rng = np.random.default_rng(3)
    cases = [rng.integers(0, 5, 300).astype(np.uint64),
             rng.integers(0, 2**64, 200, dtype=np.uint64, endpoint=False),
             np.array([2**63, 1, 2**63, 0, 2**64 - 1, 1, 2**56, 2**56 - 1], np.uint64),
             np.zeros(7, np.uint64), np.array([9], np.uint64), np.zeros(0, np.uint64),
             (rng.integers(0, 4, 500).astype(np.uint64) << np.uint64(40)) | rng.integers(0, 2, 500).astype(np.uint64)]
    for code in cases:
        np.testing.assert_array_equal(_stable_argsort(code), np.argsort(code, kind="stable"))


def test_crossing_mask_rules():
    pp = 512
    q = np.array([[0, 0, 0], [pp, 0, 0], [pp + 1, 0, 0], [pp, pp, pp], [1023, 1023, 1023], [0, 1023, 0], [1023, pp, 1023]])
    f = np.array([[0, 1, 3], [1, 2, 3], [0, 2, 1], [3, 4, 1], [0, 5, 1], [0, 1, 2], [3, 4, 6]])
    np.testing.assert_array_equal(crossing_triangles(q, f, 10), [False, False, True, True, True, True, False])
    assert crossing_triangles(np.array([[0, 0, 0], [2**15, 0, 0], [2**15, 9, 0]]), np.array([[0, 1, 2]]), 16)[0] == False  # noqa: E712
    # a triangle that crosses one plane only, for each axis
    for a in range(3):
        tri = np.zeros((3, 3), np.int64)
        tri[1, a], tri[2, a] = 1023, 1023
        tri[2, (a + 1) % 3] = 100
        assert crossing_triangles(tri, np.array([[0, 1, 2]]), 10).tolist() == [True], a
    assert missing_parents(np.array([[2, 3, 4], [8, 8, 8]], np.uint32), np.array([[1, 1, 2]], np.uint32)).tolist() == [1]


# ------------------------------------------------------------------------------------------


def legacy_fragment(vertices, faces):
    v = np.asarray(vertices, "<f4")
    return struct.pack("<I", len(v)) + v.tobytes() + np.asarray(faces, "<u4").tobytes()


def test_legacy_valid_and_bad_index(tmp_path):
    kv = storage.open_kvstore(tmp_path / "legacy")
    storage.write_json(kv, "info", {"@type": "neuroglancer_legacy_mesh"})
    storage.write(kv, "7:0", json.dumps({"fragments": ["7:0:a", "7:0:b"]}).encode())
    storage.write(kv, "7:0:a", legacy_fragment([[0, 0, 0], [8, 0, 0], [0, 8, 0]], [[0, 1, 2]]))
    storage.write(kv, "7:0:b", legacy_fragment([[8, 0, 0], [0, 8, 0], [8, 8, 0]], [[0, 2, 1]]))
    rep = validate(tmp_path / "legacy")
    assert rep.ok, rep.errors
    assert rep.kind == "legacy" and rep.num_segments == 1
    assert rep.per_lod[0]["fragments"] == 2 and rep.per_lod[0]["triangles"] == 2
    src = open_mesh(tmp_path / "legacy")
    assert src.segment_ids() == [7]
    frags = src.legacy_fragments(7)
    assert frags[0][0].dtype == np.float32 and frags[0][1].dtype == np.uint32
    mesh = load_mesh(src, 7)
    assert len(mesh.vertices) == 4 and len(mesh.faces) == 2
    assert _rowset(mesh.vertices) == _rowset([[0, 0, 0], [8, 0, 0], [0, 8, 0], [8, 8, 0]])

    storage.write(kv, "7:0:b", legacy_fragment([[8, 0, 0], [0, 8, 0], [8, 8, 0]], [[0, 3, 1]]))
    rep = validate(tmp_path / "legacy")
    _has(rep, "segment 7", "7:0:b", "index 3")
    with pytest.raises(InvalidMeshError):
        parse_legacy_fragment(legacy_fragment([[0, 0, 0]], [[0, 0, 1]]))
    with pytest.raises(InvalidMeshError):
        parse_legacy_fragment(legacy_fragment([[0, 0, 0]], [[0, 0, 0]]) + b"\0")
    with pytest.raises(InvalidMeshError, match="multiple of 12"):   # a stray uint32: not a triangle
        parse_legacy_fragment(legacy_fragment([[0, 0, 0]], [[0, 0, 0]]) + b"\0" * 4)
    # missing fragment file
    storage.write(kv, "7:0", json.dumps({"fragments": ["7:0:a", "7:0:zz"]}).encode())
    _has(validate(tmp_path / "legacy"), "segment 7", "missing")


TRI = legacy_fragment([[0, 0, 0], [8, 0, 0], [0, 8, 0]], [[0, 1, 2]])


@pytest.mark.parametrize("manifest, fragment, words", [
    (None, b"\x01\x00", "fragment '7:0:a': fragment of 2 bytes has no vertex count"),
    (None, struct.pack("<I", 5) + TRI[4:40], "fragment of 40 bytes too short for 5 vertices"),
    (None, TRI + b"\0\0", "14 bytes of triangle indices is not a multiple of 12"),
    (None, legacy_fragment([[0, 0, 0], [8, 0, 0], [0, 8, 0]], [[0, 1, 3]]), "triangle index 3 >= num_vertices 3"),
    (None, legacy_fragment([[0, 0, 0], [8, np.nan, 0], [0, 8, 0]], [[0, 1, 2]]), "non-finite vertex positions"),
    (b"{fragments", TRI, "segment 7: manifest 7:0 is not JSON"),
    (b'{"fragments": "7:0:a"}', TRI, "manifest 7:0 needs a 'fragments' list of strings"),
    (b'{"fragments": ["7:0:a", 3]}', TRI, "manifest 7:0 needs a 'fragments' list of strings"),
])
def test_each_legacy_defect_is_reported_alone(tmp_path, manifest, fragment, words):
    kv = storage.open_kvstore(tmp_path / "legacy")
    storage.write_json(kv, "info", {"@type": "neuroglancer_legacy_mesh"})
    storage.write(kv, "7:0", manifest or json.dumps({"fragments": ["7:0:a"]}).encode())
    storage.write(kv, "7:0:a", fragment)
    for seg in (8, 9):    # good segments beside it
        storage.write(kv, f"{seg}:0", json.dumps({"fragments": [f"{seg}:0:a"]}).encode())
        storage.write(kv, f"{seg}:0:a", TRI)
    rep = validate(tmp_path / "legacy")
    assert rep.num_segments == 3 and rep.num_errors == 1 and words in rep.errors[0], rep.errors


UNEXPECTED = legacy_fragment([[0, 0, 0], [9, 0, 0], [0, 9, 0]], [[0, 1, 2]])   # made to raise (a bug)


def _legacy_faults(path):
    """A legacy directory of 14 segments, 8 of them with faults (two fragments each, but 10 and
    12: three), and a fragment file without its manifest; returns the segments with an error."""
    kv = storage.open_kvstore(path)
    storage.write_json(kv, "info", {"@type": "neuroglancer_legacy_mesh"})
    other = legacy_fragment([[8, 0, 0], [0, 8, 0], [8, 8, 0]], [[0, 2, 1]])
    frags = {s: [TRI, other] for s in range(1, 15)}
    frags[6] = [legacy_fragment([[0, 0, 0], [8, 0, 0], [0, 8, 0]], [[0, 1, 3]]), other]   # index past the vertices
    frags[8] = [legacy_fragment([[0, 0, 0]], np.zeros((0, 3))), TRI + b"\0\0"]   # empty (fine), then cut
    frags[10] = [TRI, UNEXPECTED, b"\1"]   # an unexpected failure: the fragment after it is not checked
    frags[13] = [legacy_fragment([[0, 0, 0], [8, np.nan, 0], [0, 8, 0]], [[0, 1, 2]]), other]
    for seg, blobs in frags.items():
        names = [f"{seg}:0:{i}" for i in range(len(blobs))] + (["../12"] if seg == 12 else [])   # unreadable
        storage.write(kv, f"{seg}:0", json.dumps({"fragments": names}).encode())
        for name, blob in zip(names, blobs):
            if (seg, name) != (3, "3:0:1"):   # missing
                storage.write(kv, name, blob)
    storage.write(kv, "5:0", b"{fragments")
    storage.write(kv, "11:0", b'{"fragments": "11:0:0"}')
    storage.write(kv, "20:0:0", TRI)
    return [3, 5, 6, 8, 10, 11, 12, 13]


def test_legacy_manifests_are_read_in_batches_and_a_failed_read_is_its_segments_error(tmp_path, monkeypatch):
    """Legacy manifests (``<id>:0``) are read ``batch`` at a time (:meth:`LegacySource.manifests`:
    a round trip per batch on a network store; they were read one by one, each waited for), and
    a manifest whose read fails (an I/O error) is that segment's error: the others are checked."""
    from gpumesh.reader import LegacySource

    _legacy_faults(tmp_path / "legacy")
    issued, waited = [], []
    real = LegacySource.manifests

    class Store:   # the mesh directory's kvstore, its reads of manifests seen (and 9:0's failing)
        def __init__(self, kv):
            self.kv = kv

        def __getattr__(self, name):
            return getattr(self.kv, name)

        def read(self, key, **kwargs):
            fut = self.kv.read(key, **kwargs)
            if not re.fullmatch(r"[0-9]+:0", key):   # a fragment file
                return fut
            issued.append(key)

            class Seen:
                def result(self):
                    waited.append((key, len(issued)))
                    if key == "9:0":
                        raise ValueError("UNAVAILABLE: the store did not answer")
                    return fut.result()
            return Seen()

    def manifests(self, ids, batch=64):
        self.kv = Store(self.kv)
        return real(self, ids, batch=5)

    monkeypatch.setattr(LegacySource, "manifests", manifests)
    rep = validate(tmp_path / "legacy", threads=1)
    ids = list(range(1, 15))
    assert issued == [f"{s}:0" for s in ids]
    # each manifest waited for once every manifest of its batch of 5 was asked for
    assert waited == [(f"{s}:0", min(len(ids), (i // 5 + 1) * 5)) for i, s in enumerate(ids)]
    assert rep.num_segments == 14 and rep.num_errors == 9
    assert ("segment 9: unexpected error while checking: ValueError('UNAVAILABLE: the store did not answer')"
            in rep.errors), rep.errors


def test_legacy_segments_parse_ahead_on_threads_with_the_report_of_one(tmp_path, monkeypatch):
    """Legacy segments are checked as multi-resolution ones are: up to ``SEGMENTS_AHEAD``
    segments' fragments read and parse on the threads while the next manifests are read (they
    were checked one by one, on one thread); the report is the one of one thread, and of the
    code before (errors in the same order, the same counts), with every kind of fault."""
    import threading

    outstanding = _count_segments_in_flight(monkeypatch, "_start_legacy_segment")
    parse, where = validate_module.parse_legacy_fragment, set()

    def parsing(data):
        where.add(threading.current_thread().name.startswith("gpumesh-validate"))
        if bytes(data) == UNEXPECTED:
            raise RuntimeError("parse")
        return parse(data)

    monkeypatch.setattr(validate_module, "parse_legacy_fragment", parsing)
    bad = _legacy_faults(tmp_path / "legacy")
    reports = []
    for threads in (1, 4):
        outstanding[:] = [0, 0]
        where.clear()
        reports.append(validate(tmp_path / "legacy", threads=threads))
        assert outstanding == [0, validate_module.SEGMENTS_AHEAD + 1 if threads > 1 else 1]
        assert where == {threads > 1}
    one, many = reports
    assert many.errors == one.errors and many.per_lod == one.per_lod and many.warnings == one.warnings
    assert many.num_segments == one.num_segments == 14 and one.num_errors == 8 and one.kind == "legacy"
    assert [int(e.split()[1].rstrip(":")) for e in one.errors] == bad, one.errors
    assert one.errors[4] == "segment 10: unexpected error while checking: RuntimeError('parse')"
    # 12 manifests (not 5, 11) of 2 fragments counted (10: to its failure; 12: 3); 6 of them all good
    assert one.per_lod == [{"fragments": 12 * 2 + 1, "empty_fragments": 1, "zero_byte_fragments": 0, "placeholders": 0,
                            "triangles": 6 * 2 + 6, "bytes": 1162, "segments_with_lod": 12}], one.per_lod
    assert len(one.warnings) == 1 and "segments' fragment files without a manifest" in one.warnings[0]
    nodecode = [validate(tmp_path / "legacy", threads=t, decode=False) for t in (1, 4)]
    assert nodecode[0].errors == nodecode[1].errors == one.errors
    assert nodecode[0].per_lod == nodecode[1].per_lod == [dict(one.per_lod[0], triangles=None)]


@pytest.mark.parametrize("stage", ["manifest", "read"])
def test_a_legacy_segment_whose_checks_fail_unexpectedly_is_its_error_whatever_the_threads(tmp_path, stage):
    """A legacy manifest that makes its segment's checks fail unexpectedly (JSON nested too deep
    for Python's parser: a RecursionError; a fragment name that TensorStore refuses before it
    reads: a TypeError) is that segment's error, as when the segments were checked one by one:
    validate does not raise, the segments after it are checked, the segment is counted as it
    was (with a LOD where its fragment names were read), and the report is the same whatever
    the threads, decoding or not."""
    kv = storage.open_kvstore(str(tmp_path / "legacy"))
    storage.write_json(kv, "info", {"@type": "neuroglancer_legacy_mesh"})
    for seg in (1, 2, 3):
        storage.write(kv, f"{seg}:0", json.dumps({"fragments": [f"{seg}:0:0"]}).encode())
        storage.write(kv, f"{seg}:0:0", TRI)
    storage.write(kv, "2:0", b"[" * 100_000 if stage == "manifest" else b'{"fragments": ["2:0:0", "\\udc80"]}')
    reports = [validate(tmp_path / "legacy", threads=t, decode=d) for d in (True, False) for t in (1, 4)]
    for rep in reports[1:]:
        assert rep.errors == reports[0].errors and rep.num_segments == reports[0].num_segments
    assert reports[1].per_lod == reports[0].per_lod and reports[3].per_lod == reports[2].per_lod
    rep = reports[0]
    assert rep.num_segments == 3 and rep.num_errors == 1, rep.errors
    kind = "RecursionError" if stage == "manifest" else "TypeError"
    assert rep.errors[0].startswith(f"segment 2: unexpected error while checking: {kind}("), rep.errors
    st = rep.per_lod[0]
    assert (st["segments_with_lod"], st["fragments"], st["triangles"]) == (2 + (stage == "read"), 2, 2), st


def test_a_point_cloud_fragment_is_reported(tmp_path):
    cloud = DracoPy.encode(np.array([[0, 0, 0], [1023, 0, 0], [0, 1023, 0]], np.float64), quantization_bits=BITS,
                           quantization_range=2**BITS - 1, quantization_origin=[0, 0, 0])
    with pytest.raises(InvalidMeshError, match="point cloud"):
        decode_fragment(cloud)
    rep = _bad(tmp_path, {1: seg_parts(frags0=(F_LOD0_A, cloud)), 2: seg_parts()})
    assert rep.num_errors == 1 and "segment 1 lod 0 node 1" in rep.errors[0] and "point cloud" in rep.errors[0]


def test_legacy_without_info(tmp_path):
    kv = storage.open_kvstore(tmp_path / "noinfo")
    storage.write(kv, "3:0", json.dumps({"fragments": ["3:0:x"]}).encode())
    storage.write(kv, "3:0:x", legacy_fragment([[0, 0, 0], [1, 0, 0], [0, 1, 0]], [[0, 1, 2]]))
    rep = validate(tmp_path / "noinfo")
    assert rep.ok and rep.kind == "legacy" and rep.num_segments == 1


def test_nothing_there_is_not_a_mesh(tmp_path):
    """A missing or empty directory, or shards without their info, is no mesh: a violation, not
    "OK, 0 segments" (a mistyped path used to pass)."""
    _has(validate(tmp_path / "missing"), "missing/: no such directory")
    (tmp_path / "empty").mkdir()
    _has(validate(tmp_path / "empty"), "no precomputed mesh")
    kv = storage.open_kvstore(tmp_path / "shards")
    storage.write(kv, "0.shard", b"\0" * 16)
    _has(validate(tmp_path / "shards"), "no info file", ".shard")
    # and the report does not call it legacy meshes
    assert validate(tmp_path / "empty").kind is None
    assert validate(tmp_path / "empty").format_table().startswith("kind: unknown")


def test_fragment_files_without_a_manifest_are_reported(good, tmp_path):
    path, kv, _ = good
    os.remove(path / "2.index")
    rep = validate(path)
    assert rep.ok and rep.num_segments == 1
    assert any("1 fragment data files without a manifest" in w and "segments 2" in w for w in rep.warnings), rep.warnings
    assert not validate(path, segments=[1]).warnings   # a subset is not checked for leftovers
    # legacy: fragments of a segment whose <id>:0 is gone
    kv = storage.open_kvstore(tmp_path / "legacy")
    storage.write(kv, "7:0", json.dumps({"fragments": ["7:0:a"]}).encode())
    storage.write(kv, "7:0:a", legacy_fragment([[0, 0, 0], [8, 0, 0], [0, 8, 0]], [[0, 1, 2]]))
    storage.write(kv, "9:0:a", legacy_fragment([[0, 0, 0], [8, 0, 0], [0, 8, 0]], [[0, 1, 2]]))
    rep = validate(tmp_path / "legacy")
    assert rep.ok and any("without a manifest (<id>:0): segments 9" in w for w in rep.warnings), rep.warnings


def test_memory_kvstore():
    kv = storage.open_kvstore("memory://gpumesh_test_validate/")
    write_dir(kv, {4: seg_parts()})
    rep = validate("memory://gpumesh_test_validate/")
    assert rep.ok, rep.errors
    assert rep.num_segments == 1 and rep.per_lod[0]["triangles"] == 2
    assert len(load_mesh("memory://gpumesh_test_validate/", 4).vertices) == 4
    storage.write(kv, "4", seg_parts()[1][:-1])
    _has(validate("memory://gpumesh_test_validate/"), "segment 4", "data file has")


# ------------------------------------------------------------------------------------------
# Placeholder fragments (what gpumesh writes for an empty parent node)


@pytest.mark.parametrize("bits", [10, 16])
def test_placeholder_stays_in_one_grid_cell_and_inside_the_node(bits):
    top, mid = (1 << bits) - 1, 1 << (bits - 1)
    for x in sorted({0, 1, 2, 3, mid - 4, mid - 3, mid - 2, mid - 1, mid, mid + 1, mid + 2, top - 3, top - 2, top,
                     top + 5, -1}):
        q = placeholder_positions([x, mid, 7], bits)
        assert q.min() >= 0 and q.max() <= top, (x, q)
        assert len({tuple(r) for r in q.tolist()}) == 4, (x, q)
        assert is_placeholder(q, PLACEHOLDER_FACES)
        assert not crossing_triangles(q, PLACEHOLDER_FACES, bits).any(), (x, q)


def test_placeholder_recognised_and_counted(tmp_path):
    q = placeholder_positions([100, 200, 300], BITS)
    blob = draco(q, PLACEHOLDER_FACES)
    positions, faces = decode_fragment(blob, BITS)
    assert is_placeholder(positions, faces)
    # a real tetrahedron, and a flat but non-collinear one, are not placeholders
    assert not is_placeholder(np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]]), PLACEHOLDER_FACES)
    assert not is_placeholder(np.array([[0, 0, 0], [1, 0, 0], [2, 0, 0], [0, 1, 0]]), PLACEHOLDER_FACES)
    assert not is_placeholder(q[:3], PLACEHOLDER_FACES[:1])
    kv = storage.open_kvstore(tmp_path / "mesh")
    write_dir(kv, {2: seg_parts(lod0=((0, 0, 0), (0, 1, 0)), frags1=(blob,))})
    rep = validate(tmp_path / "mesh")
    assert rep.ok and not rep.warnings, (rep.errors, rep.warnings)
    l1 = rep.per_lod[1]
    assert (l1["fragments"], l1["empty_fragments"], l1["placeholders"], l1["zero_byte_fragments"], l1["triangles"]) \
        == (1, 1, 1, 0, 0)
    assert len(load_mesh(tmp_path / "mesh", 2, lod=1).faces) == 0
    assert [f["placeholder"] for f in load_fragments(tmp_path / "mesh", 2, 1)] == [True]
    assert [f["placeholder"] for f in load_fragments(tmp_path / "mesh", 2, 0)] == [False, False]


def test_a_lost_shard_or_manifest_is_seen_through_the_segment_properties(tmp_path):
    from gpumesh import run_mesh
    from gpumesh.pipeline import MeshOptions
    from gpumesh.sharding import ShardingOptions

    labels = np.zeros((24, 24, 24), np.uint32)
    for i in range(8):
        x, y, z = (i & 1) * 12, (i >> 1 & 1) * 12, (i >> 2) * 12
        labels[x + 2:x + 9, y + 2:y + 9, z + 2:z + 9] = 100 + i
    sharded, unsharded = tmp_path / "sharded", tmp_path / "unsharded"
    run_mesh(labels, str(sharded), workers=1,
             options=MeshOptions(chunk_size=16, sharding=ShardingOptions(shard_bits=2, minishard_bits=1)))
    run_mesh(labels, str(unsharded), workers=1, options=MeshOptions(chunk_size=16))
    for path in (sharded, unsharded):
        rep = validate(path)
        assert rep.ok and not rep.warnings and rep.num_segments == 8, rep.format_table()
    shards = sorted(f for f in os.listdir(sharded) if f.endswith(".shard"))
    assert len(shards) >= 2
    os.remove(sharded / shards[0])
    os.remove(unsharded / "103.index")
    for path in (sharded, unsharded):
        rep = validate(path)
        assert rep.ok and 0 < rep.num_segments < 8
        lost = [w for w in rep.warnings if "listed in segment_properties/info have no mesh" in w]
        assert len(lost) == 1, rep.warnings
        assert f"{8 - rep.num_segments} segments" in lost[0]
        assert not validate(path, segments=[100 + i for i in range(8) if str(100 + i) not in lost[0]]).warnings
    assert "segments 103" in [w for w in validate(unsharded).warnings if "no mesh" in w][0]


def test_a_shard_that_cannot_be_read_is_its_error_and_the_other_shards_are_checked(tmp_path, monkeypatch):
    """A shard whose read fails (an I/O error, a permission refused; not a missing file) is an
    error naming it, and the other shards are checked: it raised out of ``validate`` (a
    traceback on the CLI).  Its segments are neither "not found" nor said to be lost, as they
    may be there."""
    from gpumesh import run_mesh
    from gpumesh.pipeline import MeshOptions
    from gpumesh.sharding import ShardingOptions

    labels = np.zeros((24, 24, 24), np.uint32)
    for i in range(8):
        x, y, z = (i & 1) * 12, (i >> 1 & 1) * 12, (i >> 2) * 12
        labels[x + 2:x + 9, y + 2:y + 9, z + 2:z + 9] = 100 + i
    path = tmp_path / "sharded"
    run_mesh(labels, str(path), workers=1,
             options=MeshOptions(chunk_size=16, sharding=ShardingOptions(shard_bits=2, minishard_bits=1)))
    whole = validate(path)
    assert whole.ok and whole.num_segments == 8
    shards = sorted(f for f in os.listdir(path) if f.endswith(".shard"))
    real = storage.read

    def failing(kv, key, *args, **kwargs):
        if key == shards[0]:
            raise ValueError("PERMISSION_DENIED: not yours")
        return real(kv, key, *args, **kwargs)

    monkeypatch.setattr(validate_module.storage, "read", failing)
    for segments in (None, list(range(100, 108))):
        rep = validate(path, segments=segments)
        assert rep.errors == [f"shard {shards[0]} cannot be read (PERMISSION_DENIED: not yours): its segments are "
                              "not checked"], rep.errors
        assert 0 < rep.num_segments < 8 and not rep.warnings, (rep.num_segments, rep.warnings)
        assert rep.per_lod[0]["fragments"] > 0   # the other shards' segments were checked


def test_an_unsharded_file_that_cannot_be_read_is_its_segments_error(tmp_path, monkeypatch):
    """Unsharded output: a manifest or data file whose read fails (not a missing file) is its
    segment's error, and the other segments are checked; it raised out of ``validate``."""
    from gpumesh import run_mesh
    from gpumesh.pipeline import MeshOptions
    from gpumesh.reader import UnshardedMultiresSource

    labels = np.zeros((24, 24, 24), np.uint32)
    for i in range(4):
        labels[2 + 5 * i:6 + 5 * i, 2:20, 2:20] = 100 + i
    path = tmp_path / "unsharded"
    run_mesh(labels, str(path), workers=1, options=MeshOptions(chunk_size=16))
    whole = validate(path)
    assert whole.ok and whole.num_segments == 4
    real = UnshardedMultiresSource.fetch
    broken = {"101.index", "103"}

    def fetch(self, ids, batch=64, failures=False):
        kv = self.kv

        class Store:   # reads of the two files fail
            def __getattr__(self, name):
                return getattr(kv, name)

            def read(self, key, **kwargs):
                if key in broken:
                    class Failing:
                        def result(self):
                            raise ValueError(f"UNAVAILABLE: {key}")
                    return Failing()
                return kv.read(key, **kwargs)

        self.kv = Store()
        return real(self, ids, batch, failures)

    monkeypatch.setattr(UnshardedMultiresSource, "fetch", fetch)
    for threads in (1, 3):
        rep = validate(path, threads=threads)
        assert rep.errors == ["segment 101: its manifest 101.index cannot be read (UNAVAILABLE: 101.index)",
                              "segment 103: its fragment data file 103 cannot be read (UNAVAILABLE: 103)"], rep.errors
        assert rep.num_segments == 4 and rep.per_lod[0]["segments_with_lod"] == 2
    with pytest.raises(ValueError, match="UNAVAILABLE"):   # the reader's other callers: raised
        list(open_mesh(str(path)).fetch([101]))


def test_shard_bytes_that_nothing_references_are_reported(tmp_path):
    from gpumesh import run_mesh
    from gpumesh.pipeline import MeshOptions
    from gpumesh.sharding import ShardingOptions
    from gpumesh.validate import _covered

    assert _covered([(0, 4), (2, 6), (10, 12), (11, 11), (0, 1)]) == 8
    labels = np.zeros((20, 20, 20), np.uint16)
    labels[2:9, 3:12, 4:15] = 5
    labels[10:18, 3:12, 4:15] = 6
    dest = tmp_path / "out"
    run_mesh(labels, str(dest), workers=1, options=MeshOptions(chunk_size=8, sharding=ShardingOptions(shard_bits=0)))
    assert not validate(str(dest)).warnings
    with open(dest / "0.shard", "ab") as fh:
        fh.write(b"\0" * 100)
    rep = validate(str(dest))
    assert rep.ok and len(rep.warnings) == 1 and "shard 0.shard: 100 of its" in rep.warnings[0], rep.warnings
    assert not validate(str(dest), segments=[5]).warnings    # a subset does not see the whole shard


def test_a_shards_errors_come_in_the_order_of_its_segments_whatever_the_threads(tmp_path):
    """In a shard, a segment's fragments decode while the next segment is checked: its errors
    are still reported before the next one's, a shard-level error between them included."""
    from gpumesh import run_mesh
    from gpumesh.pipeline import MeshOptions
    from gpumesh.sharding import ShardingOptions

    labels = np.zeros((24, 24, 24), np.uint16)
    for k, seg in enumerate((5, 6, 7, 8)):
        labels[2 + 5 * k:6 + 5 * k, 3:20, 4:21] = seg
    dest = tmp_path / "out"
    run_mesh(labels, str(dest), workers=1, options=MeshOptions(chunk_size=8, sharding=ShardingOptions(
        shard_bits=0, minishard_bits=0, minishard_index_encoding="raw")))
    blob = bytearray((dest / "0.shard").read_bytes())
    start, end = np.frombuffer(bytes(blob[:16]), "<u8") + 16
    index = np.frombuffer(bytes(blob[start:end]), "<u8").reshape(3, -1).copy()
    # raw minishard index: ID deltas, start deltas (each from the end of the chunk before), sizes;
    # starts counted from the end of the 16-byte shard index
    ids, starts = np.cumsum(index[0]), np.cumsum(index[1]) + np.cumsum(index[2]) - index[2] + 16
    assert ids.tolist() == [5, 6, 7, 8]
    src = reader.open_mesh(str(dest))
    for seg in (5, 7):   # the first fragment of segments 5 and 7: garbage
        data_start = int(starts[ids.tolist().index(seg)]) - len(src.fragment_data(seg))
        blob[data_start:data_start + 8] = b"\x07" * 8
    # segment 6's manifest past the end of the shard (segment 7's start delta making up for it)
    index[1][2] = (int(index[1][2]) - (1 << 40) + int(index[2][1])) % (1 << 64)
    index[2][1] = 1 << 40
    blob[start:end] = index.tobytes()
    (dest / "0.shard").write_bytes(bytes(blob))
    reports = [validate(str(dest), threads=t) for t in (1, 3)]
    assert reports[0].errors == reports[1].errors and reports[0].per_lod == reports[1].per_lod
    segs = [int(e.split()[1].rstrip(":")) for e in reports[0].errors]
    assert segs == sorted(segs) and {5, 6, 7} <= set(segs) and 8 not in segs, reports[0].errors
    assert any("segment 6: manifest bytes" in e for e in reports[0].errors)


GARBAGE = b"\x07" * len(F_LOD0_B)


def _shard_file(spec, lists, ranges=None, raw_manifest=()):
    """One shard's bytes, laid out by hand: ``lists`` maps a minishard to its entries ``(ID,
    (manifest, fragment data))`` in file order, listed as given (an ID twice, or in a minishard
    it does not hash to); ``ranges`` replaces minishard index ranges (``{ms: (start, end)}``,
    file offsets, or ``bytes`` as the stored index); the manifests of ``raw_manifest`` IDs are
    stored unencoded."""
    ib = spec.shard_index_bytes
    body, pos, indices = [], ib, []
    for ms in range(spec.num_minishards):
        ids, starts, sizes = [], [], []
        for seg, (mbytes, data) in lists.get(ms, []):
            enc = mbytes if seg in raw_manifest else spec.encode_data(mbytes)
            body += [data, enc]
            ids.append(seg)
            starts.append(pos + len(data))
            sizes.append(len(enc))
            pos += len(data) + len(enc)
        indices.append(spec.encode_minishard_index(ids, starts, sizes) if ids else b"")
    index = np.zeros((spec.num_minishards, 2), "<u8")
    for ms, enc in enumerate(indices):
        given = (ranges or {}).get(ms)
        if isinstance(given, bytes):
            enc = indices[ms] = given
        index[ms] = (pos - ib, pos - ib + len(enc)) if not isinstance(given, tuple) else np.subtract(given, ib)
        pos += len(enc)
    return index.tobytes() + b"".join(body) + b"".join(indices)


def _sharded_dir(path, lists, **shard_file):
    """A sharded mesh directory of one shard (:func:`_shard_file`) with two minishards."""
    from gpumesh.sharding import ShardingSpec

    spec = ShardingSpec(minishard_bits=1, shard_bits=0, minishard_index_encoding="gzip", data_encoding="gzip")
    kv = storage.open_kvstore(path)
    storage.write_json(kv, "info", info(sharding=spec.to_json()))
    storage.write(kv, spec.shard_key(0), _shard_file(spec, lists, **shard_file))
    return str(path)


def _ids_by_minishard():
    from gpumesh.sharding import ShardingSpec

    ids = np.arange(1, 41)
    ms = ShardingSpec(minishard_bits=1, shard_bits=0).locate(ids)[1]
    return ids[ms == 0].tolist(), ids[ms == 1].tolist()


SHARD_DEFECTS = {   # (what to change in the shard of _sharded_dir's segments, the words of its error)
    "none": ({}, None),
    "a segment listed twice": ({"twice": True}, "listed more than once"),
    "a segment in a minishard its ID does not hash to": ({"stray": True}, "so readers cannot find it"),
    "a manifest not in the data encoding": ({"raw_manifest": True}, "manifest in shard 0.shard"),
    "a minishard index not in its encoding": ({"ranges": {1: b"not gzip"}}, "minishard 1"),
    "an empty minishard index": ({"ranges": {1: gzip.compress(b"")}}, "empty minishard index"),
    "an inverted minishard index range": ({"ranges": {1: (200, 100)}}, "is inverted"),
    "a minishard index range past the end": ({"ranges": {1: (100, 10**9)}}, "outside"),
}


@pytest.mark.parametrize("defect", sorted(SHARD_DEFECTS))
def test_a_shards_errors_between_its_segments_come_in_file_order_whatever_the_threads(tmp_path, defect):
    """Each segment of a shard has errors of its own (an undecodable fragment; the second also
    an octree error, found before its fragments decode); a shard-level error among them comes
    after those of the segments before it and before those after it, as with one thread."""
    change, words = SHARD_DEFECTS[defect]
    m0, m1 = _ids_by_minishard()
    bad = seg_parts(frags0=(GARBAGE, F_LOD0_A))
    first = [(s, bad) for s in m0[:6]]
    first[1] = (m0[1], seg_parts(lod0=((1, 0, 0), (0, 0, 0)), frags0=(GARBAGE, F_LOD0_A)))
    if change.get("twice"):
        first.insert(3, first[0])
    if change.get("stray"):
        first.insert(3, (m1[5], bad))
    if change.get("raw_manifest"):
        first.insert(3, (m0[6], bad))
    path = _sharded_dir(tmp_path / "out", {0: first, 1: [(s, bad) for s in m1[:4]]}, ranges=change.get("ranges"),
                        raw_manifest=(m0[6],) if change.get("raw_manifest") else ())
    reports = [validate(path, threads=t) for t in (1, 3)]
    for rep in reports[1:]:
        assert rep.errors == reports[0].errors and rep.per_lod == reports[0].per_lod, defect
        assert rep.num_segments == reports[0].num_segments
    errors = reports[0].errors
    assert [e.split()[1] for e in errors[:3]] == [str(m0[0]), str(m0[1]), str(m0[1])], errors
    assert "Z-order" in errors[1] and "Draco" in errors[2], errors
    if words is None:
        assert len(errors) == 11, errors
        return
    at = next(i for i, e in enumerate(errors) if words in e)
    before = {int(e.split()[1].rstrip(":")) for e in errors[:at]}
    after = {int(e.split()[1].rstrip(":")) for e in errors[at + 1:] if e.startswith("segment ")}
    if errors[at].startswith("shard "):   # the second minishard's segments are not reached
        assert before == set(m0[:6]) and not after, errors
    else:
        assert before == set(m0[:3]) and after == set(m0[3:6] + m1[:4]), errors


def _count_segments_in_flight(monkeypatch, name="_start_multires_segment") -> list:
    """``[now, most]``: the segments whose checks have started (their fragments decoding) and
    are not recorded yet, as validate runs (the function ``name`` of validate wrapped)."""
    start, outstanding = getattr(validate_module, name), [0, 0]

    def counting(*args, **kwargs):
        finish = start(*args, **kwargs)
        outstanding[0] += 1
        outstanding[1] = max(outstanding)

        def counted():
            outstanding[0] -= 1
            finish()
        return counted

    monkeypatch.setattr(validate_module, name, counting)
    return outstanding


@pytest.mark.parametrize("threads", [1, 3])
def test_a_shards_segments_decode_at_most_segments_ahead_ahead(tmp_path, monkeypatch, threads):
    """On threads, the fragments of up to ``SEGMENTS_AHEAD`` segments of a shard decode (and
    are held) while the next segment is checked, no more; one thread checks one at a time."""
    outstanding = _count_segments_in_flight(monkeypatch)
    m0, m1 = _ids_by_minishard()
    path = _sharded_dir(tmp_path / "out", {0: [(s, seg_parts()) for s in m0[:12]],
                                           1: [(s, seg_parts()) for s in m1[:12]]})
    rep = validate(path, threads=threads)
    assert rep.ok and rep.num_segments == 24 and rep.per_lod[1]["triangles"] == 24 * 2
    assert outstanding == [0, validate_module.SEGMENTS_AHEAD + 1 if threads > 1 else 1]


@pytest.mark.parametrize("layout", ["unsharded", "sample"])
def test_segments_read_one_by_one_decode_ahead_too_with_the_same_report(tmp_path, monkeypatch, layout):
    """An unsharded directory, and a sample of a sharded one (each segment read by byte range),
    decode up to ``SEGMENTS_AHEAD`` segments' fragments while the next are read and checked,
    as a shard's do (before, one segment at a time); the report is the one of one thread, its
    errors (undecodable fragments, a manifest past its data, a grid crossing) in the same order."""
    outstanding = _count_segments_in_flight(monkeypatch)
    garbage = b"\x07" * len(F_LOD0_B)
    m, d = seg_parts()
    bad = {3: seg_parts(frags0=(F_LOD0_A, garbage)), 7: (m, d[:-5]), 8: seg_parts(frags1=(F_CROSS,)),
           12: seg_parts(frags0=(garbage, F_LOD0_A))}
    segs = {s: bad.get(s) or seg_parts() for s in range(1, 15)}
    if layout == "unsharded":
        write_dir(storage.open_kvstore(tmp_path / "out"), segs)
        path, kwargs = tmp_path / "out", {}
    else:
        m0, m1 = _ids_by_minishard()
        path = _sharded_dir(tmp_path / "out", {0: [(s, segs[s]) for s in m0 if s in segs],
                                               1: [(s, segs[s]) for s in m1 if s in segs]})
        kwargs = {"sample": 14}
    reports = []
    for threads in (1, 3):
        outstanding[:] = [0, 0]
        reports.append(validate(path, threads=threads, **kwargs))
        assert outstanding == [0, validate_module.SEGMENTS_AHEAD + 1 if threads > 1 else 1]
    one, many = reports
    assert one.num_segments == 14 and one.num_errors == 5 + (layout == "sample"), "\n".join(one.errors)
    of = [int(e.split()[1].rstrip(":")) for e in one.errors]   # the segment of each error
    assert set(of) == set(bad) and (layout == "sample" or of == [3, 7, 7, 8, 12]), one.errors
    assert many.errors == one.errors and many.per_lod == one.per_lod and many.warnings == one.warnings


@pytest.mark.parametrize("decode", [True, False])
def test_fragment_data_that_would_start_in_the_shard_index_is_one_error(tmp_path, decode):
    """A shard's first segment whose fragment sizes add up to more than the bytes before its
    manifest: one error, its fragments not decoded from bytes that are not theirs."""
    m0, _ = _ids_by_minishard()
    mbytes, _ = seg_parts()
    path = _sharded_dir(tmp_path / "out", {0: [(m0[0], (mbytes, b"")), (m0[1], seg_parts())]})
    rep = validate(path, decode=decode, threads=2)
    assert rep.num_errors == 1 and rep.errors[0].startswith(f"segment {m0[0]}: its ") \
        and "would start inside the shard index" in rep.errors[0], rep.errors
    assert rep.per_lod[1]["triangles"] == (2 if decode else None)


RAISING = b"\x09" * len(F_LOD0_B)


def _raising_decoder(monkeypatch, exc):
    """Make the validator's Draco decoding raise an ``exc`` (a class) on the fragment ``RAISING``."""
    def decode(blob, *args, **kwargs):
        if bytes(blob) == RAISING:
            raise exc("raised")
        return decode_fragment(blob, *args, **kwargs)

    monkeypatch.setattr(validate_module, "decode_fragment", decode)


@pytest.mark.parametrize("layout", ["sharded", "unsharded", "sample"])
@pytest.mark.parametrize("exc", [RuntimeError, MemoryError])
def test_a_decode_that_fails_unexpectedly_is_one_fragments_error_whatever_the_threads(tmp_path, monkeypatch,
                                                                                        layout, exc):
    """A decode that raises what no bad fragment raises (a bug, or memory running out) is an
    error of that fragment: the other fragments and segments are still checked, and the report
    is the same whatever the threads."""
    _raising_decoder(monkeypatch, exc)
    m0, m1 = _ids_by_minishard()
    segs = {s: seg_parts(frags0=(GARBAGE, F_LOD0_A)) for s in m0[:5] + m1[:3]}
    segs[m0[1]] = seg_parts(frags0=(RAISING, GARBAGE))
    if layout == "unsharded":
        write_dir(storage.open_kvstore(tmp_path / "out"), segs)
        path = str(tmp_path / "out")
    else:
        path = _sharded_dir(tmp_path / "out", {0: [(s, segs[s]) for s in m0[:5]], 1: [(s, segs[s]) for s in m1[:3]]})
    reports = [validate(path, threads=t, sample=100 if layout == "sample" else None) for t in (1, 3)]
    for rep in reports[1:]:
        assert rep.errors == reports[0].errors and rep.per_lod == reports[0].per_lod
    rep = reports[0]
    assert rep.num_segments == 8 and rep.num_errors == 9, rep.errors
    assert sorted({int(e.split()[1]) for e in rep.errors}) == sorted(segs)
    raised = [e for e in rep.errors if e.startswith(f"segment {m0[1]} ")]
    assert len(raised) == 2 and exc.__name__ in raised[0] and "node 0" in raised[0] and "node 1" in raised[1]
    assert rep.per_lod[1]["triangles"] == 8 * 2 and rep.per_lod[0]["triangles"] == 7


def test_a_grid_check_that_fails_unexpectedly_is_its_fragments_error(tmp_path, monkeypatch):
    """As a decode that fails unexpectedly, a failure of the 2x2x2 grid check (on the decoding
    threads) is the error of its fragment, whatever the threads."""
    def failing(*args):
        raise RuntimeError("grid")

    monkeypatch.setattr(validate_module, "crossing_triangles", failing)
    write_dir(storage.open_kvstore(tmp_path / "out"), {1: seg_parts(), 2: seg_parts()})
    reports = [validate(tmp_path / "out", threads=t) for t in (1, 3)]
    assert reports[1].errors == reports[0].errors and reports[1].per_lod == reports[0].per_lod
    assert [e.split(":")[0] for e in reports[0].errors] == [f"segment {s} lod 1 node 0 [0, 0, 0]" for s in (1, 2)]
    assert all("RuntimeError('grid')" in e for e in reports[0].errors)
    assert reports[0].per_lod[0]["triangles"] == 4 and reports[0].per_lod[1]["triangles"] == 0


def test_a_segment_check_that_fails_unexpectedly_is_its_error_whatever_the_threads(tmp_path, monkeypatch):
    """An unexpected failure in a segment's checks before its fragments decode (here: its
    octree check) is that segment's error; in a shard, the segments before and after it are
    checked and reported in their order, whatever the threads."""
    m0, m1 = _ids_by_minishard()
    check_octree = validate_module._check_octree

    def failing(report, seg, m):
        if seg == m0[2]:
            raise RuntimeError("octree")
        check_octree(report, seg, m)

    monkeypatch.setattr(validate_module, "_check_octree", failing)
    bad = seg_parts(frags0=(GARBAGE, F_LOD0_A))
    path = _sharded_dir(tmp_path / "out", {0: [(s, bad) for s in m0[:5]], 1: [(s, bad) for s in m1[:3]]})
    reports = [validate(path, threads=t) for t in (1, 3)]
    assert reports[1].errors == reports[0].errors and reports[1].per_lod == reports[0].per_lod
    segs = [int(e.split()[1].rstrip(":")) for e in reports[0].errors]
    assert segs == m0[:5] + m1[:3], reports[0].errors
    assert "RuntimeError('octree')" in reports[0].errors[2] and reports[0].num_segments == 8


@pytest.mark.parametrize("stage", ["manifest", "recording"])
def test_an_unexpected_failure_in_one_segment_of_a_shard_is_its_error_whatever_the_threads(tmp_path, monkeypatch,
                                                                                             stage):
    """An unexpected failure (a bug) while one segment of a shard is found in it (its manifest
    decoded) or recorded (its fragments' results read) is that segment's error: the shard's
    other segments are still checked and counted, in their order, whatever the threads (it
    ended the shard); and the failing segment's bytes are not said to be unreferenced."""
    from gpumesh.sharding import ShardingSpec

    m0, m1 = _ids_by_minishard()
    bad = seg_parts(frags0=(GARBAGE, F_LOD0_A))
    odd = seg_parts(lod0=((0, 0, 0), (0, 1, 0)), frags0=(RAISING, F_LOD0_A))   # a manifest of its own
    segs = {s: bad for s in m0[:5] + m1[:3]}
    segs[m0[2]] = odd
    if stage == "manifest":
        decode_data = ShardingSpec.decode_data

        def failing(self, stored):
            out = decode_data(self, stored)
            if out == odd[0]:
                raise RuntimeError(stage)
            return out

        monkeypatch.setattr(ShardingSpec, "decode_data", failing)
    else:
        check_fragment = validate_module._check_fragment

        def failing(job):
            if bytes(job[0]) == RAISING:
                raise RuntimeError(stage)
            return check_fragment(job)

        monkeypatch.setattr(validate_module, "_check_fragment", failing)
    path = _sharded_dir(tmp_path / "out", {0: [(s, segs[s]) for s in m0[:5]], 1: [(s, segs[s]) for s in m1[:3]]})
    reports = [validate(path, threads=t) for t in (1, 3)]
    for rep in reports[1:]:
        assert rep.errors == reports[0].errors and rep.per_lod == reports[0].per_lod
    rep = reports[0]
    assert rep.num_segments == 8 and not rep.warnings, (rep.num_segments, rep.warnings)
    assert [int(e.split()[1].rstrip(":")) for e in rep.errors] == m0[:5] + m1[:3], rep.errors
    assert rep.errors[2] == f"segment {m0[2]}: unexpected error while checking: RuntimeError('{stage}')"
    assert rep.per_lod[1]["triangles"] == 7 * 2 and rep.per_lod[1]["segments_with_lod"] == 7 + (stage == "recording")


def test_an_unexpected_failure_in_a_shard_comes_after_its_segments_before_it(tmp_path, monkeypatch):
    """A shard whose checks fail unexpectedly between its segments (here: reading its second
    minishard index) is reported after the segments before the failure, whatever the threads."""
    from gpumesh.sharding import ShardingSpec

    m0, m1 = _ids_by_minishard()
    bad = seg_parts(frags0=(GARBAGE, F_LOD0_A))
    path = _sharded_dir(tmp_path / "out", {0: [(s, bad) for s in m0[:5]], 1: [(s, bad) for s in m1[:3]]})
    decode_index = ShardingSpec.decode_minishard_index
    calls = []

    def failing(self, stored):
        calls.append(1)
        if len(calls) % 2 == 0:   # the second minishard of each run
            raise RuntimeError("index")
        return decode_index(self, stored)

    monkeypatch.setattr(ShardingSpec, "decode_minishard_index", failing)
    reports = [validate(path, threads=t) for t in (1, 3)]
    assert reports[1].errors == reports[0].errors and reports[1].per_lod == reports[0].per_lod
    errors = reports[0].errors
    assert [int(e.split()[1]) for e in errors[:-1]] == m0[:5], errors
    assert errors[-1].startswith("shard 0.shard: unexpected error") and "RuntimeError('index')" in errors[-1]


def test_an_unexpected_failure_of_a_shard_keeps_its_segments_before_it_counted(tmp_path, monkeypatch):
    """A shard that fails unexpectedly between its segments (here: reading its second minishard
    index) still counts the segments checked before the failure, whatever the threads (the
    count was dropped), and its error says that the rest is not checked: the segments asked
    for in that part are named there, not called "not found", and the segments that the
    segment properties list are not said to have no mesh."""
    from gpumesh.sharding import ShardingSpec

    m0, m1 = _ids_by_minishard()
    bad = seg_parts(frags0=(GARBAGE, F_LOD0_A))
    path = _sharded_dir(tmp_path / "out", {0: [(s, bad) for s in m0[:5]], 1: [(s, bad) for s in m1[:3]]})
    kv = storage.open_kvstore(path)
    storage.write_json(kv, "info", dict(json.loads(storage.read(kv, "info")), segment_properties="props"))
    storage.write_json(kv, "props/info", {"@type": "neuroglancer_segment_properties", "inline": {
        "ids": [str(s) for s in m0[:5] + m1[:3]],
        "properties": [{"id": "label", "type": "label", "values": ["x"] * 8}]}})
    assert validate(path).num_segments == 8
    decode_index = ShardingSpec.decode_minishard_index

    def failing(self, stored):
        out = decode_index(self, stored)
        if m1[0] in out[0].tolist():
            raise RuntimeError("index")
        return out

    monkeypatch.setattr(ShardingSpec, "decode_minishard_index", failing)
    failure = "shard 0.shard: unexpected error while checking: RuntimeError('index')"
    reports = [validate(path, threads=t) for t in (1, 3)]
    for rep in reports:
        assert rep.num_segments == 5 and rep.num_errors == 6 and not rep.warnings, (rep.num_segments, rep.warnings)
        assert rep.errors[-1] == f"{failure} (its segments after that point are not checked)"
    assert reports[1].errors == reports[0].errors and reports[1].per_lod == reports[0].per_lod
    for t in (1, 3):
        rep = validate(path, segments=m0[:2] + m1[:2], threads=t)
        assert rep.num_segments == 2 and rep.num_errors == 3, rep.errors
        assert rep.errors[-1] == f"{failure} (2 of the segments asked for in it are not checked: {m1[0]}, {m1[1]})"


def _validate_threads():
    import threading

    return [t for t in threading.enumerate() if t.name.startswith("gpumesh-validate")]


def test_the_decoding_threads_end_with_validate_and_an_interrupt_drops_what_is_queued(tmp_path, monkeypatch):
    """validate's threads are gone when it returns, and when it is interrupted (Ctrl-C in a
    decode: KeyboardInterrupt): then the fragments queued to decode are not decoded."""
    import threading
    m0, m1 = _ids_by_minishard()
    many = seg_parts(lod0=[(x, y, 0) for y in range(2) for x in range(2)],
                     frags0=[F_LOD0_A] * 4, frags1=(F_LOD1,))
    segs = {s: many for s in m0[:10]}
    segs[m0[0]] = seg_parts(frags0=(RAISING, F_LOD0_A))
    path = _sharded_dir(tmp_path / "out", {0: [(s, segs[s]) for s in m0[:10]]})
    assert validate(path, threads=3).num_errors == 1 and not _validate_threads()   # RAISING: not Draco
    _raising_decoder(monkeypatch, KeyboardInterrupt)
    closing, decoded = threading.Event(), []
    close = validate_module._Decoder.close

    def closing_close(self):
        closing.set()   # the fragments being decoded finish now: the queued ones must not start
        close(self)

    decode = validate_module.decode_fragment

    def held(blob, *args, **kwargs):
        if bytes(blob) != RAISING:
            closing.wait(5)
            decoded.append(1)
        return decode(blob, *args, **kwargs)

    monkeypatch.setattr(validate_module._Decoder, "close", closing_close)
    monkeypatch.setattr(validate_module, "decode_fragment", held)
    with pytest.raises(KeyboardInterrupt):
        validate(path, threads=3)
    assert not _validate_threads()
    assert len(decoded) < 9 * 5 // 2, len(decoded)   # of the 9 segments ahead's fragments


# ------------------------------------------------------------------------------------------
# Segment properties (spec segment_properties): every rule the validator checks, one at a time


def _properties():
    """Inline properties for segments 1 and 2 with one property of every type."""
    return {
        "@type": "neuroglancer_segment_properties",
        "inline": {
            "ids": ["1", "2"],
            "properties": [
                {"id": "name", "type": "label", "values": ["axon", "dendrite"]},
                {"id": "note", "type": "description", "values": ["", "spiny"]},
                {"id": "cell", "type": "string", "description": "cell type", "values": ["pyr", "int"]},
                {"id": "kind", "type": "tags", "tags": ["soma", "glia", "merge"],
                 "tag_descriptions": ["has a soma", "a glial cell", "a merge error"], "values": [[0, 2], []]},
                {"id": "voxels", "type": "number", "data_type": "uint32", "values": [4294967295, 0]},
                {"id": "size", "type": "number", "data_type": "float32", "values": [1.5e38, -2]},
            ],
        },
    }


def _prop(props, pid):
    return next(p for p in props["inline"]["properties"] if p["id"] == pid)


def _set(pid, **kv):
    def mutate(props):
        _prop(props, pid).update(kv)
    return mutate


def _drop(pid, key):
    def mutate(props):
        del _prop(props, pid)[key]
    return mutate


PROPERTY_DEFECTS = {
    "wrong @type": (lambda p: p.update({"@type": "neuroglancer_segment_property"}), "@type must be"),
    "id with a sign": (lambda p: p["inline"].update(ids=["1", "-2"]), "inline.ids must be"),
    "id past uint64": (lambda p: p["inline"].update(ids=["1", str(2**64)]), "inline.ids must be"),
    "id as a number": (lambda p: p["inline"].update(ids=["1", 2]), "inline.ids must be"),
    "id in other digits": (lambda p: p["inline"].update(ids=["1", "\u0662"]), "inline.ids must be"),
    "properties not a list": (lambda p: p["inline"].update(properties={}), "inline.properties must be a list"),
    "property not an object": (lambda p: p["inline"]["properties"].append("x"), "a property is not an object"),
    "repeated id": (_set("cell", id="name", type="string"), "'name' missing or not unique"),
    "bad type": (_set("cell", type="text"), "property 'cell' has bad type 'text'"),
    "number without data_type": (_drop("voxels", "data_type"), "property 'voxels' needs a valid data_type"),
    "number of another data_type": (_set("voxels", data_type="uint64"), "property 'voxels' needs a valid data_type"),
    "too few values": (_set("cell", values=["pyr"]), "property 'cell' needs 2 values"),
    "label not a string": (_set("name", values=["axon", 7]), "property 'name' value 1 (7) is not a string"),
    "uint32 past its range": (_set("voxels", values=[2**32, 0]), "value 0 (4294967296) is outside uint32's range"),
    "int8 below its range": (_set("voxels", data_type="int8", values=[1, -129]), "outside int8's range"),
    "number as a string": (_set("voxels", values=["5", 0]), "value 0 ('5') is not a finite number"),
    "number as a bool": (_set("voxels", values=[1, True]), "value 1 (True) is not a finite number"),
    "float32 past its range": (_set("size", values=[1e39, 0]), "value 0 (1e+39) is beyond float32's range"),
    "a huge integer": (_set("voxels", values=[10**400, 0]), "value 0 (1000"),
    "a huge integer as float32": (_set("size", values=[0, -10**400]), "beyond float32's range"),
    "NaN": (_set("size", values=[float("nan"), 0]), "value 0 (nan) is not a finite number"),
    "tags without tags": (_drop("kind", "tags"), "property 'kind' needs 'tags'"),
    "a tag with a #": (_set("kind", tags=["#soma", "glia", "merge"]), "needs 'tags'"),
    "a tag with a space": (_set("kind", tags=["soma", "glial cell", "merge"]), "needs 'tags'"),
    "tags not increasing": (_set("kind", values=[[2, 0], []]), "value 0 ([2, 0]) is not a list of increasing"),
    "tag index past tags": (_set("kind", values=[[0], [3]]), "value 1 ([3]) is not a list of increasing"),
    "tag value not a list": (_set("kind", values=[0, []]), "value 0 (0) is not a list of increasing"),
    "description of tags": (_set("kind", description="kinds"), "not allowed on a 'tags' property"),
    "tag_descriptions short": (_set("kind", tag_descriptions=["a", "b"]), "tag_descriptions that are not one"),
    "tag_descriptions long": (_set("kind", tag_descriptions=["a", "b", "c", "d"]), "tag_descriptions that are not one"),
    "tag repeated": (_set("kind", values=[[0, 0], []]), "not a list of increasing"),
    "tags on a string": (_set("cell", tags=["a"]), "property 'cell' has tags or tag_descriptions"),
    "second label": (_set("cell", type="label"), "more than one 'label' property"),
    "second tags": (lambda p: p["inline"]["properties"].append(
        {"id": "more", "type": "tags", "tags": ["x"], "values": [[], [0]]}), "more than one 'tags' property"),
}


@pytest.fixture
def with_properties(good):
    path, kv, _ = good
    storage.write_json(kv, "info", info(segment_properties="props"))
    return path, kv


def test_segment_properties_of_every_type_pass(with_properties):
    path, kv = with_properties
    storage.write_json(kv, "props/info", _properties())
    rep = validate(path)
    assert rep.ok, rep.errors
    assert not [w for w in rep.warnings if "segment" in w and "no mesh" in w]


@pytest.mark.parametrize("defect", sorted(PROPERTY_DEFECTS))
def test_each_segment_properties_defect_is_reported_alone(with_properties, defect):
    path, kv = with_properties
    mutate, words = PROPERTY_DEFECTS[defect]
    props = _properties()
    mutate(props)
    storage.write_json(kv, "props/info", props)
    rep = validate(path)
    assert rep.num_errors == 1 and words in rep.errors[0] and "props/info" in rep.errors[0], rep.errors


def test_segment_properties_missing_or_not_json(with_properties):
    path, kv = with_properties
    rep = validate(path)
    assert rep.num_errors == 1 and "segment properties props/info not found" in rep.errors[0], rep.errors
    storage.write(kv, "props/info", b'{"@type": ')
    rep = validate(path)
    assert rep.num_errors == 1 and "props/info: not valid JSON" in rep.errors[0], rep.errors


def test_segment_properties_beside_the_mesh_directory_are_found(with_properties, tmp_path):
    """``segment_properties`` is resolved as the client resolves it: ``../props`` (the
    segmentation's own properties, one level up) is read there, not refused as a bad key."""
    path, kv = with_properties
    storage.write_json(kv, "info", info(segment_properties="../props"))
    above = storage.open_kvstore(str(os.path.dirname(str(path).rstrip("/"))))
    rep = validate(path)
    assert rep.num_errors == 1 and "segment properties ../props/info not found" in rep.errors[0], rep.errors
    storage.write_json(above, "props/info", _properties())
    rep = validate(path)
    assert rep.ok, rep.errors


@pytest.mark.parametrize("layout", ["sharded", "unsharded", "legacy"])
def test_given_segments_are_validated_over_plain_http(tmp_path, layout):
    """``validate --segments`` reads the segments by name, so a store that cannot list its keys
    (plain HTTP, a static file server) can be checked; an ID that is not there is reported."""
    import functools
    import http.server
    import threading

    from gpumesh.pipeline import MeshOptions, run_mesh
    from gpumesh.sharding import ShardingOptions

    labels = np.zeros((24, 24, 24), np.uint32)
    labels[2:10, 3:12, 2:9], labels[12:20, 5:15, 6:14] = 5, 70000
    opts = {"sharded": MeshOptions(chunk_size=8, sharding=ShardingOptions()), "unsharded": MeshOptions(chunk_size=8),
            "legacy": MeshOptions(chunk_size=8, format="legacy")}[layout]
    run_mesh(labels, str(tmp_path / "m"), options=opts, workers=1)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "m"))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        rep = validate(url, segments=[5, 70000])
        assert rep.ok and rep.num_segments == 2, rep.errors
        rep = validate(url, segments=[5, 6])
        assert rep.errors == ["segment 6 not found"], rep.errors
        # without segments: those the segment properties name (listing failed, as a violation,
        # and every listed segment was said to have "no mesh (a lost shard or manifest?)")
        for kw in ({}, {"sample": 1}):
            rep = validate(url, **kw)
            assert len(rep.warnings) == 1 and "cannot list its keys" in rep.warnings[0], rep.warnings
            if kw and layout == "sharded":   # a sample reads by byte range, which this server ignores
                assert len(rep.errors) == 1 and "it ignores HTTP Range requests" in rep.errors[0], rep.errors
                continue
            assert rep.ok and rep.num_segments == (1 if kw else 2), rep.errors
        # segment properties may name segments without a mesh: a warning, as where the store lists
        props_path = tmp_path / "m" / "segment_properties" / "info"
        props = json.loads(props_path.read_text())
        props["inline"]["ids"].append("999")
        for p in props["inline"]["properties"]:
            p["values"].append(p["values"][0])
        props_path.write_text(json.dumps(props))
        for kw in ({}, {"sample": 3}):
            rep = validate(url, **kw)
            if kw and layout == "sharded":
                continue
            assert rep.ok and rep.num_segments == 2, (kw, rep.errors)
            assert "1 segments listed in the segment properties have no mesh" in rep.warnings[-1], rep.warnings
            assert "segments 999" in rep.warnings[-1]
        (tmp_path / "m" / "segment_properties" / "info").unlink()
        rep = validate(url)
        assert not rep.ok and "give the segments to check (--segments" in rep.errors[0], rep.errors
    finally:
        server.shutdown()


def test_a_scratch_area_left_in_a_mesh_is_warned_about(tmp_path):
    """A mesh directory that still holds the main job's scratch area (a run stopped while
    removing it, or one running there now) validates with a warning that says so and how to
    finish it; the scratch area's name is the pipeline's."""
    import shutil

    from gpumesh import run_mesh
    from gpumesh.pipeline import SCRATCH
    labels = np.zeros((16, 16, 16), np.uint32)
    labels[4:12, 4:12, 4:12] = 7
    dest = tmp_path / "m"
    run_mesh(labels, str(dest), voxel_size=(1, 1, 1), workers=1)
    clean = validate(dest)
    assert clean.ok and not clean.warnings
    (dest / SCRATCH / "blocks").mkdir(parents=True)
    (dest / SCRATCH / "plan.json").write_text("{}")
    (dest / SCRATCH / "blocks" / "0_0_0@0123456789abcdef").write_bytes(b"x")
    rep = validate(dest)
    assert rep.ok and rep.warnings == [
        ".gpumesh-work/ holds 2 file(s) of a gpumesh run that has not finished (stopped, or running now; the mesh's "
        "info is there: the run was stopped while removing them): gpumesh mesh --resume with that run's options "
        "finishes it"]
    shutil.rmtree(dest / SCRATCH)
    assert not validate(dest).warnings


def test_task_results_left_in_a_finished_mesh_without_a_plan_are_not_said_to_resume(tmp_path):
    """A part (--part) still running when the --resume that writes the output deleted the
    scratch area leaves the task result it writes then, with no plan.json: --resume refuses that
    finished mesh, so the warning says to delete the files rather than to --resume."""
    import pytest

    from gpumesh import DestinationExistsError, run_mesh
    from gpumesh.pipeline import SCRATCH
    labels = np.zeros((16, 16, 16), np.uint32)
    labels[4:12, 4:12, 4:12] = 7
    dest = tmp_path / "m"
    run_mesh(labels, str(dest), voxel_size=(1, 1, 1), workers=1)
    (dest / SCRATCH / "blocks").mkdir(parents=True)
    (dest / SCRATCH / "blocks" / "0_0_0.coarse@0123456789abcdef").write_bytes(b"x")
    rep = validate(dest)
    assert rep.ok and len(rep.warnings) == 1, rep.warnings
    assert "--resume with that run's options finishes it" not in rep.warnings[0], rep.warnings
    assert rep.warnings[0].startswith(".gpumesh-work/ holds 1 file(s) left by a gpumesh run after the mesh was "
                                      "finished") and rep.warnings[0].endswith("delete .gpumesh-work/"), rep.warnings
    with pytest.raises(DestinationExistsError, match="holds a finished mesh"):   # nothing to resume
        run_mesh(labels, str(dest), voxel_size=(1, 1, 1), workers=1, resume=True)
    # without the info either, the mesh is not finished: not said to be
    (dest / "info").unlink()
    rep = validate(dest)
    assert len(rep.warnings) == 1 and "no info: the mesh is not finished" in rep.warnings[0], rep.warnings
    assert "after the mesh was finished" not in rep.warnings[0], rep.warnings
