"""Ad-hoc meshing, export to files, and the HTTP server of the viewer (issue 4)."""

from __future__ import annotations

import os
import urllib.error
import urllib.request

import numpy as np
import pytest
import trimesh
from click.testing import CliRunner

from gpumesh.adhoc import SegmentCutWarning, SegmentNotFoundError, find_segment_bbox, mask_to_mesh, mesh_segment
from gpumesh.cli_extra import export as export_cmd
from gpumesh.cli_extra import segment as segment_cmd
from gpumesh.cli_extra import view as view_cmd
from gpumesh.reader import load_mesh
from gpumesh.viewer import serve, view

from conftest import CROP_SIZE, CROP_START, VOXEL_SIZE

CROP_BOX = (CROP_START, tuple(s + CROP_SIZE for s in CROP_START))
VS = np.array(VOXEL_SIZE)


def picks(crop: np.ndarray) -> list[int]:
    """Segments of several sizes: largest (touches the crop border), mid-sized, small."""
    ids, counts = np.unique(crop[crop != 0], return_counts=True)
    order = ids[np.argsort(-counts, kind="stable")]
    return [int(s) for s in (order[0], order[3], order[len(order) // 4], order[len(order) // 2], order[-1])]


def interior_segment(crop: np.ndarray) -> int:
    """The largest segment whose voxels stay off the crop's faces."""
    border = set(np.unique(np.concatenate([crop[[0, -1]].ravel(), crop[:, [0, -1]].ravel(),
                                            crop[:, :, [0, -1]].ravel()])).tolist())
    ids, counts = np.unique(crop[crop != 0], return_counts=True)
    for s in ids[np.argsort(-counts, kind="stable")]:
        if int(s) not in border:
            return int(s)
    raise AssertionError("no interior segment")


def snap_to_lattice(mesh: trimesh.Trimesh) -> np.ndarray:
    """Vertices of a decoded multires mesh put back on the half-voxel lattice (nm).

    The client (and :func:`gpumesh.reader.load_mesh`) decodes ``q / (2**bits - 1)`` while
    positions are quantized as ``p * 2**bits / chunk``, so decoded LOD 0 vertices sit up to
    ``chunk / 2**bits`` voxels (< 1e-3) off the exact half-voxel positions; undo that.
    """
    vox = np.asarray(mesh.vertices) / VS
    snapped = np.round(vox * 2) / 2
    assert np.abs(vox - snapped).max() < 1e-3
    return snapped * VS


def triangles(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Sorted rows of each triangle's vertex positions (nm, rounded to 1e-3), each rotated so
    its smallest vertex comes first (orientation kept)."""
    tri = np.rint(np.asarray(vertices, np.float64)[np.asarray(faces)] * 1000).astype(np.int64)  # (m, 3, 3)
    if len(tri) == 0:
        return tri.reshape(0, 9)
    _, rank = np.unique(tri.reshape(-1, 3), axis=0, return_inverse=True)
    first = rank.reshape(-1, 3).argmin(axis=1)
    rot = np.take_along_axis(tri, ((first[:, None] + np.arange(3)) % 3)[:, :, None], axis=1).reshape(-1, 9)
    return rot[np.lexsort(rot.T[::-1])]


def same_triangles(a_vertices, a_faces, b_vertices, b_faces) -> bool:
    ta, tb = triangles(a_vertices, a_faces), triangles(b_vertices, b_faces)
    return ta.shape == tb.shape and np.array_equal(ta, tb)


# --------------------------------------------------------------------------------------------
# ad-hoc meshes


def test_adhoc_equals_batch_lod0(crop, crop_high):
    dest, _ = crop_high
    for seg in picks(crop):
        batch = load_mesh(str(dest), seg, lod=0)
        mesh = mesh_segment(crop, seg, voxel_size=VOXEL_SIZE, voxel_offset=CROP_START, device="cpu")
        assert len(mesh.faces) == len(batch.faces), seg
        assert len(mesh.vertices) == len(batch.vertices), seg  # welded the same way
        assert same_triangles(mesh.vertices, mesh.faces, snap_to_lattice(batch), batch.faces), seg
        assert mesh.is_watertight and mesh.is_winding_consistent and mesh.volume > 0, seg


def test_adhoc_on_real_zarr_with_bbox(real_zarr, crop, crop_high):
    dest, _ = crop_high
    for seg in picks(crop)[:3]:
        batch = load_mesh(str(dest), seg, lod=0)
        with pytest.warns(SegmentCutWarning, match=f"segment {seg} goes on past the bbox"):   # the crop cuts them
            mesh = mesh_segment(str(real_zarr), seg, bbox=CROP_BOX, device="cpu")  # voxel size from metadata
        assert same_triangles(mesh.vertices, mesh.faces, snap_to_lattice(batch), batch.faces), seg


def test_a_segment_cut_by_the_bbox_or_bounds_warns(tmp_path):
    """A segment that goes on past a face of ``bbox`` or ``bounds`` inside the volume is meshed
    closed there, with a :class:`SegmentCutWarning` naming the faces (global voxels); a box
    face on the volume's edge, or one the segment only touches, is no cut.  The CLI shows it
    in one line."""
    import shutil
    import warnings

    from conftest import write_zarr

    labels = np.zeros((24, 24, 24), np.uint32)
    labels[2:20, 4:8, 4:8] = 5      # a bar along x
    labels[10:12, 12:14, 12:14] = 6   # a small cube
    kw = dict(voxel_size=(1, 1, 1), voxel_offset=(100, 0, 0), device="cpu")

    def cut(**more):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            mesh = mesh_segment(labels, more.pop("seg", 5), **kw, **more)
        assert mesh.is_watertight
        return [str(w.message) for w in seen if issubclass(w.category, SegmentCutWarning)]

    assert cut() == []
    assert cut(bbox=((0, 0, 0), (10, 24, 24))) == [
        "segment 5 goes on past the bbox (x = 110, global voxels): its mesh is closed there; widen the bbox for "
        "the whole segment"]
    assert cut(bbox=((5, 5, 0), (12, 24, 24))) == [
        "segment 5 goes on past the bbox (x = 105, x = 112, y = 5, global voxels): its mesh is closed there; "
        "widen the bbox for the whole segment"]
    assert cut(bbox=((2, 4, 4), (20, 8, 8))) == []       # the bar's own box: touched, not cut
    assert cut(bbox=((0, 0, 0), (20, 24, 24))) == []
    assert cut(bounds=(100, 0, 0, 124, 24, 24)) == []    # the whole volume (with its offset)
    assert cut(bounds=(100, 0, 0, 115, 24, 24)) == [
        "segment 5 goes on past the bounds (x = 115, global voxels): its mesh is closed there; widen the bounds "
        "for the whole segment"]
    # bbox within bounds: bbox's faces in the cropped volume; one on the bounds face (or a
    # bbox reaching past it, clipped there) is the bounds' cut: widening the bbox would not help
    assert cut(bounds=(105, 0, 0, 124, 24, 24), bbox=((0, 0, 0), (10, 24, 24))) == [
        "segment 5 goes on past the bbox (x = 115, global voxels) and the bounds (x = 105, global voxels): its "
        "mesh is closed there; widen the bbox and the bounds for the whole segment"]
    assert cut(bounds=(100, 0, 0, 110, 24, 24), bbox=((0, 0, 0), (100, 24, 24))) == [
        "segment 5 goes on past the bounds (x = 110, global voxels): its mesh is closed there; widen the bounds "
        "for the whole segment"]
    assert cut(seg=6, bbox=((8, 8, 8), (14, 14, 14))) == []
    # what lies past the box need not be readable: negative labels of a signed array, a chunk
    # not stored (fill_missing=False); the box is meshed as before, with no warning
    signed = labels.astype(np.int16)
    signed[12:, :, :] = -1
    with warnings.catch_warnings():
        warnings.simplefilter("error", SegmentCutWarning)
        for more in (dict(bbox=((0, 0, 0), (12, 24, 24))), dict(bounds=(100, 0, 0, 112, 24, 24))):
            assert mesh_segment(signed, 5, **kw, **more).is_watertight
        filled = labels.copy()
        filled[filled == 0] = 1   # every chunk stored
        write_zarr(tmp_path / "holes.zarr", filled, chunk=8)
        shutil.rmtree(tmp_path / "holes.zarr" / "c" / "1")   # x in 8 .. 16 not stored
        for more in (dict(bbox=((0, 0, 0), (8, 24, 24))), dict(bounds=(0, 0, 0, 8, 24, 24))):
            assert mesh_segment(str(tmp_path / "holes.zarr"), 5, voxel_size=(1, 1, 1), device="cpu",
                                fill_missing=False, **more).is_watertight
    write_zarr(tmp_path / "v.zarr", labels, chunk=8)
    res = CliRunner().invoke(segment_cmd, [str(tmp_path / "v.zarr"), "5", "-o", str(tmp_path / "m.stl"),
                                           "--voxel-size", "1,1,1", "--bbox", "0,0,0,10,24,24", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert [line for line in res.output.splitlines() if "warning" in line] == [
        "gpumesh: warning: segment 5 goes on past the bbox (x = 10, global voxels): its mesh is closed there; "
        "widen the bbox for the whole segment"], res.output


def test_bbox_scan(crop):
    for seg in picks(crop):
        idx = np.argwhere(crop == seg)
        want = (tuple(int(v) for v in idx.min(axis=0)), tuple(int(v) + 1 for v in idx.max(axis=0)))
        assert find_segment_bbox(crop, seg) == want
        sub = ((10, 20, 30), (100, 90, 120))
        inner = idx[np.all((idx >= sub[0]) & (idx < sub[1]), axis=1)]
        got = find_segment_bbox(crop, seg, bbox=sub)
        if len(inner):
            assert got == (tuple(int(v) for v in inner.min(axis=0)), tuple(int(v) + 1 for v in inner.max(axis=0)))
        else:
            assert got is None


def test_scan_blocks_and_threads_agree(crop):
    seg = picks(crop)[1]
    one = mesh_segment(crop, seg, threads=1, device="cpu")
    many = mesh_segment(crop, seg, threads=8, device="cpu")
    assert same_triangles(one.vertices, one.faces, many.vertices, many.faces)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sparse_marching_equals_dense(seed):
    """Marching only the sub-blocks near the mask gives the triangles of one dense pass."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((40, 37, 29), np.uint8)
    for _ in range(6):  # a few random blobs, far apart blocks stay empty
        c = rng.integers(0, mask.shape)
        r = rng.integers(1, 5, size=3)
        sl = tuple(slice(max(0, a - b), a + b) for a, b in zip(c, r))
        mask[sl] = rng.random(mask[sl].shape) < 0.7
    dense = mask_to_mesh(mask, (5, -3, 7), VOXEL_SIZE, device="cpu", sparse_block=0)
    for block in (4, 7, 16):
        sparse = mask_to_mesh(mask, (5, -3, 7), VOXEL_SIZE, device="cpu", sparse_block=block)
        assert len(sparse[0]) == len(dense[0])
        assert same_triangles(*sparse, *dense), block
        # on threads: the same arrays, in the same order
        threaded = mask_to_mesh(mask, (5, -3, 7), VOXEL_SIZE, device="cpu", sparse_block=block, threads=4)
        single = mask_to_mesh(mask, (5, -3, 7), VOXEL_SIZE, device="cpu", sparse_block=block, threads=1)
        for a, b in zip(threaded, single):
            np.testing.assert_array_equal(a, b)
    m = trimesh.Trimesh(*dense, process=False)
    assert m.is_watertight and m.volume > 0


@pytest.mark.parametrize("block", [4, 7, 16])
def test_sparse_marching_finds_a_lone_voxel_in_any_layer_of_a_sub_block(block):
    """One voxel alone at the first or the last layer of a sub-block (of the mask padded by
    one voxel) on each axis: the occupancy scan must see it wherever it lies; the sparse
    mesh is the dense one."""
    for pos in ((block - 2, block - 2, block - 2), (block - 1, 0, block - 2), (2 * block - 2, block - 1, 0)):
        mask = np.zeros((3 * block, 2 * block + 1, 2 * block + 3), np.uint8)
        mask[pos] = 1
        v, f = mask_to_mesh(mask, (0, 0, 0), VOXEL_SIZE, device="cpu", sparse_block=block)
        dense = mask_to_mesh(mask, (0, 0, 0), VOXEL_SIZE, device="cpu", sparse_block=0)
        assert len(f) > 0 and same_triangles(v, f, *dense), (block, pos)


def test_geometry_convention():
    """One voxel i covers [i, i + 1) plus the offset: a unit cube scaled by the voxel size."""
    vol = np.zeros((4, 4, 4), np.uint16)
    vol[1, 2, 3] = 7
    mesh = mesh_segment(vol, 7, voxel_size=VOXEL_SIZE, voxel_offset=(10, 20, 30), device="cpu")
    lo = (np.array([10, 20, 30]) + [1, 2, 3]) * VS
    np.testing.assert_allclose(mesh.bounds, [lo, lo + VS])
    assert mesh.is_watertight and mesh.volume > 0
    # the volume border closes the surface (zero padding outside the volume)
    vol[:] = 7
    mesh = mesh_segment(vol, 7, device="cpu")
    np.testing.assert_allclose(mesh.bounds, [[0, 0, 0], [4, 4, 4]])
    assert mesh.is_watertight


def test_the_largest_id_of_the_dtype_and_any_nonzero_mask_value_are_meshed():
    # 255 in a uint8 volume is a segment like any other; mask_to_mesh takes any non-zero as
    # inside (a label array's own values, not only 0/1)
    from gpumesh.adhoc import mask_to_mesh

    vol = np.zeros((6, 5, 7), np.uint8)
    vol[1:4, 2:4, 1:6] = 255
    mesh = mesh_segment(vol, 255, voxel_size=(2, 3, 4), device="cpu")
    assert mesh.is_watertight
    np.testing.assert_allclose(mesh.bounds, [[2, 6, 4], [8, 12, 24]])
    v, f = mask_to_mesh(vol, (0, 0, 0), (2, 3, 4), device="cpu")
    assert same_triangles(v, f, mesh.vertices, mesh.faces)


def test_decimated_mesh_is_placed_at_the_voxel_offset(crop):
    # a preset that decimates goes through another route to nm: the voxel offset must move the
    # mesh by offset * voxel size there too
    seg = picks(crop)[2]
    offset = np.array([1000, -20, 7])
    for quality in (None, "low"):
        at0 = mesh_segment(crop, seg, voxel_size=VOXEL_SIZE, quality=quality, device="cpu")
        moved = mesh_segment(crop, seg, voxel_size=VOXEL_SIZE, voxel_offset=offset, quality=quality, device="cpu")
        assert np.array_equal(at0.faces, moved.faces)
        np.testing.assert_allclose(moved.vertices, at0.vertices + offset * VS, atol=1e-6)


def test_quality_decimates(crop):
    seg = picks(crop)[0]
    exact = mesh_segment(crop, seg, voxel_size=VOXEL_SIZE, device="cpu")
    high = mesh_segment(crop, seg, voxel_size=VOXEL_SIZE, quality="high", device="cpu")
    low = mesh_segment(crop, seg, voxel_size=VOXEL_SIZE, quality="low", device="cpu")
    assert len(high.faces) == len(exact.faces)
    # the CLI's name of the default (--quality exact) is the API's too
    named = mesh_segment(crop, seg, voxel_size=VOXEL_SIZE, quality="exact", device="cpu")
    assert np.array_equal(named.faces, exact.faces) and np.array_equal(named.vertices, exact.vertices)
    assert 0.15 * len(exact.faces) < len(low.faces) < 0.35 * len(exact.faces)
    # decimated vertices stay within a voxel of the exact surface's box
    assert np.all(low.bounds[0] >= exact.bounds[0] - VS) and np.all(low.bounds[1] <= exact.bounds[1] + VS)
    with pytest.raises(ValueError):
        mesh_segment(crop, seg, quality="ultra")


def test_missing_segment_and_bad_input(crop):
    with pytest.raises(SegmentNotFoundError):
        mesh_segment(crop, 12345, device="cpu")
    with pytest.raises(SegmentNotFoundError):
        mesh_segment(crop, 2**40, device="cpu")  # larger than uint32
    seg = picks(crop)[-1]
    idx = np.argwhere(crop == seg)
    far = tuple(int(v) for v in np.where(idx.min(axis=0) > 64, 0, 100))
    with pytest.raises(SegmentNotFoundError):
        mesh_segment(crop, seg, bbox=(far, tuple(v + 20 for v in far)), device="cpu")
    for bad in (0, -3, 1.5, "7"):
        with pytest.raises(ValueError):
            mesh_segment(crop, bad, device="cpu")
    for bad in (((0, 0, 0), (0, 10, 10)), ((0, 0), (5, 5)), "0,0,0,5,5,5", ((0, 0, 0.5), (5, 5, 5)),
                ((0, 0, 0), (10**20, 5, 5))):
        with pytest.raises(ValueError):
            mesh_segment(crop, seg, bbox=bad, device="cpu")
    # a box past the volume: said so, not "segment not found"
    with pytest.raises(ValueError, match=r"holds no voxel of the volume.*\(128, 128, 128\)"):
        mesh_segment(crop, seg, bbox=((200, 200, 200), (210, 210, 210)), device="cpu")
    # an empty box inside the volume is a malformed box, not one "past the volume"
    with pytest.raises(ValueError, match="stop > start"):
        mesh_segment(crop, seg, bbox=((5, 5, 5), (9, 5, 9)), device="cpu")
    # an open Volume was opened already: mip, axes and fill_missing cannot apply to it
    from gpumesh.volume import open_volume

    vol = open_volume(crop)
    for kw in ({"mip": 1}, {"axes": "zyx"}, {"fill_missing": False}):
        with pytest.raises(ValueError, match="not to an open Volume"):
            mesh_segment(vol, seg, device="cpu", **kw)
    # no threads is not one thread: refused (0 and negative numbers used to be taken as 1)
    for bad in (0, -2, 1.5, "4", True):
        with pytest.raises(ValueError, match="threads must be"):
            mesh_segment(crop, seg, device="cpu", threads=bad)
        with pytest.raises(ValueError, match="threads must be"):
            find_segment_bbox(crop, seg, threads=bad)
        with pytest.raises(ValueError, match="threads must be"):
            mask_to_mesh(crop == seg, (0, 0, 0), VOXEL_SIZE, device="cpu", threads=bad)
    assert find_segment_bbox(crop, seg, threads=np.int64(1)) == find_segment_bbox(crop, seg, threads=3)


def test_scan_of_the_whole_real_volume(real_zarr):
    """One segment of the whole 512^3 volume, found by the scan: the same mesh as with its box
    given.  (How long it takes is measured by ``bench/bench_adhoc.py``, not here.)"""
    from gpumesh.volume import open_volume

    vol = open_volume(str(real_zarr))
    seg = 67406930  # a median-sized segment of the volume
    mesh = mesh_segment(vol, seg, device="cpu")
    assert mesh.is_watertight
    box = find_segment_bbox(vol, seg)
    boxed = mesh_segment(vol, seg, bbox=box, device="cpu")
    np.testing.assert_array_equal(mesh.faces, boxed.faces)
    np.testing.assert_array_equal(mesh.vertices, boxed.vertices)
    lo = (np.asarray(box[0]) + vol.voxel_offset) * vol.voxel_size
    hi = (np.asarray(box[1]) + vol.voxel_offset) * vol.voxel_size
    v = np.asarray(mesh.vertices)
    assert (v >= lo - vol.voxel_size).all() and (v <= hi + vol.voxel_size).all()


# --------------------------------------------------------------------------------------------
# files


@pytest.mark.parametrize("suffix", [".stl", ".ply", ".obj", ".glb"])
def test_segment_command_round_trip(real_zarr, crop, tmp_path, suffix):
    seg = picks(crop)[2]
    out = tmp_path / f"mesh{suffix}"
    box = ",".join(map(str, CROP_BOX[0])) + ":" + ",".join(map(str, CROP_BOX[1]))
    res = CliRunner().invoke(segment_cmd, [str(real_zarr), str(seg), "-o", str(out), "--bbox", box,
                                           "--voxel-size", "32,32,40", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "triangles:" in res.output
    want = mesh_segment(crop, seg, voxel_size=VOXEL_SIZE, voxel_offset=CROP_START, device="cpu")
    got = trimesh.load(str(out), process=False, force="mesh")
    assert same_triangles(got.vertices, got.faces, want.vertices, want.faces)
    merged = trimesh.load(str(out), force="mesh")  # trimesh merges per-corner copies (STL)
    assert merged.is_watertight


def test_segment_command_errors(real_zarr, tmp_path):
    r = CliRunner().invoke(segment_cmd, [str(real_zarr), "5", "-o", str(tmp_path / "m.xyz")])
    assert r.exit_code == 2 and "gpumesh: error:" in r.output
    r = CliRunner().invoke(segment_cmd, [str(real_zarr), "5", "-o", str(tmp_path / "m.stl"),
                                         "--bbox", "0,0,0:8,8,8"])
    assert r.exit_code == 2 and "does not occur" in r.output
    assert not (tmp_path / "m.stl").exists()
    r = CliRunner().invoke(segment_cmd, [str(tmp_path / "nothing"), "5", "-o", str(tmp_path / "m.stl")])
    assert r.exit_code == 2 and "gpumesh: error:" in r.output
    r = CliRunner().invoke(segment_cmd, [str(real_zarr), "5", "-o", str(tmp_path / "m.stl"), "--bbox", "1,2,3"])
    assert r.exit_code == 2


@pytest.mark.parametrize("lod", [0, 1])
def test_export_command_closed(crop, crop_high, tmp_path, lod):
    dest, _ = crop_high
    seg = interior_segment(crop)
    out = tmp_path / "seg.stl"
    res = CliRunner().invoke(export_cmd, [str(dest), str(seg), "--lod", str(lod), "-o", str(out)])
    assert res.exit_code == 0, res.output
    mesh = trimesh.load(str(out))  # STL: per-corner vertices, merged on load
    assert mesh.is_watertight and mesh.is_winding_consistent and mesh.volume > 0
    assert len(mesh.faces) == len(load_mesh(str(dest), seg, lod=lod).faces)
    if lod == 0:
        exact = mesh_segment(crop, seg, voxel_size=VOXEL_SIZE, voxel_offset=CROP_START, device="cpu")
        assert same_triangles(snap_to_lattice(mesh), mesh.faces, exact.vertices, exact.faces)


@pytest.mark.parametrize("layout", ["legacy", "sharded"])
def test_export_other_layouts(crop, tmp_path, layout):
    """Legacy and sharded directories export through reader.load_mesh like unsharded ones."""
    import dataclasses

    from gpumesh.pipeline import MeshOptions, run_mesh

    seg = interior_segment(crop)
    idx = np.argwhere(crop == seg)
    lo, hi = np.maximum(idx.min(axis=0) - 3, 0), idx.max(axis=0) + 4
    sub = np.ascontiguousarray(crop[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]])
    offset = tuple(int(v) for v in np.array(CROP_START) + lo)
    if layout == "legacy":
        options = MeshOptions(chunk_size=32, max_lods=1, quality="high", format="legacy")
    else:
        sharding = pytest.importorskip("gpumesh.sharding")
        if "sharding" not in {f.name for f in dataclasses.fields(MeshOptions)}:
            pytest.skip("MeshOptions has no sharding yet")
        options = MeshOptions(chunk_size=32, max_lods=2, quality="high", sharding=sharding.ShardingOptions())
    dest = tmp_path / "mesh"
    run_mesh(sub, str(dest), options=options, voxel_size=VOXEL_SIZE, voxel_offset=offset, workers=1)
    out = tmp_path / "seg.ply"
    res = CliRunner().invoke(export_cmd, [str(dest), str(seg), "-o", str(out)])
    assert res.exit_code == 0, res.output
    got = trimesh.load(str(out), process=False)
    exact = mesh_segment(crop, seg, voxel_size=VOXEL_SIZE, voxel_offset=CROP_START, device="cpu")
    assert same_triangles(snap_to_lattice(got), got.faces, exact.vertices, exact.faces)
    assert trimesh.load(str(out)).is_watertight


def test_open_volume_is_reused_with_overrides(crop):
    from gpumesh.volume import open_volume

    vol = open_volume(crop)
    seg = picks(crop)[2]
    a = mesh_segment(vol, seg, voxel_size=VOXEL_SIZE, voxel_offset=CROP_START, device="cpu")
    b = mesh_segment(crop, seg, voxel_size=VOXEL_SIZE, voxel_offset=CROP_START, device="cpu")
    assert same_triangles(a.vertices, a.faces, b.vertices, b.faces)
    assert np.array_equal(vol.voxel_size, [1, 1, 1])  # the open volume is not changed


def test_export_command_errors(crop_high, tmp_path):
    dest, _ = crop_high
    r = CliRunner().invoke(export_cmd, [str(dest), "1", "-o", str(tmp_path / "m.stl")])
    assert r.exit_code == 2 and "segment 1 not found in file://" in r.output and "not a mesh" not in r.output
    r = CliRunner().invoke(export_cmd, [str(dest), "1", "--lod", "9", "-o", str(tmp_path / "m.stl")])
    assert r.exit_code == 2
    # a mistyped directory: said so, not only that the segment is missing
    r = CliRunner().invoke(export_cmd, [str(tmp_path / "typo"), "5", "-o", str(tmp_path / "m.stl")])
    assert r.exit_code == 2 and r.output == f"gpumesh: error: {tmp_path / 'typo'}: no such directory\n", r.output
    (tmp_path / "empty").mkdir()   # a folder with no mesh
    r = CliRunner().invoke(export_cmd, [str(tmp_path / "empty"), "5", "-o", str(tmp_path / "m.stl")])
    assert r.exit_code == 2 and "no info file there: not a mesh directory?" in r.output, r.output
    r = CliRunner().invoke(export_cmd, [str(dest), str(2**64), "-o", str(tmp_path / "m.stl")])   # no uint64
    assert r.exit_code == 2 and "is not in the range 1<=x<=18446744073709551615" in r.output, r.output
    r = CliRunner().invoke(export_cmd, [str(dest), "5", "--scale", "nan", "-o", str(tmp_path / "m.stl")])
    assert r.exit_code == 2 and "scale must be a finite number > 0" in r.output, r.output
    assert not (tmp_path / "m.stl").exists()


def test_export_mesh_type_override_empty_mesh_and_atomic_failure(tmp_path, monkeypatch):
    from gpumesh import export

    tet = trimesh.Trimesh(vertices=[[0, 0, 0], [32, 0, 0], [0, 32, 0], [0, 0, 40]],
                          faces=[[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]], process=False)
    # the type given wins over the suffix
    path = export.export_mesh(tet, tmp_path / "tet.bin", file_type=".PLY", scale=1e-3)
    back = trimesh.load(path, file_type="ply", process=False)
    np.testing.assert_allclose(back.vertices, tet.vertices * 1e-3, rtol=1e-6)
    assert (back.faces == tet.faces).all()
    with pytest.raises(ValueError, match="unknown mesh file type 'fbx'"):
        export.export_mesh(tet, tmp_path / "tet.fbx", file_type="fbx")
    with pytest.raises(ValueError, match="no triangles"):
        export.export_mesh(trimesh.Trimesh(), tmp_path / "empty.stl")
    for bad in (0, -1.0, float("nan"), float("inf"), "x", True):   # 0 collapses, < 0 turns inside out
        with pytest.raises(ValueError, match="scale must be a finite number > 0"):
            export.export_mesh(tet, tmp_path / "bad.stl", scale=bad)
    # the file gets the permissions any new file gets (the umask's), not mkstemp's 0600
    old = os.umask(0o027)
    try:
        mode = os.stat(export.export_mesh(tet, tmp_path / "mode.stl")).st_mode & 0o777
    finally:
        os.umask(old)
    assert mode == 0o640, oct(mode)
    os.unlink(tmp_path / "mode.stl")
    # a write that fails leaves the earlier file as it was and no temporary file
    target = tmp_path / "tet.stl"
    export.export_mesh(tet, target)
    before = target.read_bytes()

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(export.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        export.export_mesh(tet, target, scale=2.0, overwrite=True)
    assert target.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["tet.bin", "tet.stl"]


def test_export_refuses_an_existing_file_without_overwrite(crop, crop_high, tmp_path, monkeypatch):
    """``segment`` and ``export`` replaced an existing file without asking; now they refuse it
    before reading anything (a missing source is not even opened), and ``--overwrite`` replaces it
    (through a symbolic link: its target)."""
    from gpumesh import export
    from gpumesh.errors import DestinationExistsError

    dest, _ = crop_high
    target = tmp_path / "keep.stl"
    target.write_bytes(b"mine")
    for cmd, source in ((segment_cmd, tmp_path / "no-such-volume"), (export_cmd, tmp_path / "no-such-mesh")):
        r = CliRunner().invoke(cmd, [str(source), "5", "-o", str(target)])
        assert r.exit_code == 2 and f"{target} exists; use --overwrite to replace it" in r.output, r.output
    assert target.read_bytes() == b"mine"
    seg = interior_segment(crop)
    r = CliRunner().invoke(export_cmd, [str(dest), str(seg), "-o", str(target), "--overwrite"])
    assert r.exit_code == 0, r.output
    assert trimesh.load(str(target)).is_watertight
    # a file that appears while the mesh is being written is not replaced either
    tet = trimesh.Trimesh(vertices=[[0, 0, 0], [32, 0, 0], [0, 32, 0], [0, 0, 40]],
                          faces=[[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]], process=False)
    late = tmp_path / "late.stl"
    late.write_bytes(b"theirs")
    monkeypatch.setattr(export, "_check_output", lambda path, overwrite: None)
    with pytest.raises(DestinationExistsError, match="late.stl exists"):
        export.export_mesh(tet, late)
    assert late.read_bytes() == b"theirs"
    assert sorted(os.listdir(tmp_path)) == ["keep.stl", "late.stl"]
    # a symbolic link is written through with --overwrite (its target replaced, the link kept)
    (tmp_path / "data").mkdir()
    real = tmp_path / "data" / "real.stl"
    real.write_bytes(b"old")
    link = tmp_path / "link.stl"
    link.symlink_to(real)
    with pytest.raises(DestinationExistsError, match="link.stl exists"):
        export.export_mesh(tet, link)
    export.export_mesh(tet, link, overwrite=True)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert np.array_equal(trimesh.load(str(real)).faces.shape, (4, 3))
    assert sorted(os.listdir(tmp_path / "data")) == ["real.stl"]
    # chains and relative targets are followed to the file; a link to no file (dangling, a
    # loop) is not written through, nor are folders made for it (as cp refuses it)
    chain = tmp_path / "chain.stl"
    chain.symlink_to("link.stl")
    export.export_mesh(tet, chain, overwrite=True)
    assert os.readlink(chain) == "link.stl" and link.is_symlink() and real.stat().st_size > 3
    from gpumesh.errors import DestinationError

    dangling = tmp_path / "dangling.stl"
    dangling.symlink_to(tmp_path / "nowhere" / "deep" / "x.stl")
    loop = tmp_path / "loop.stl"
    loop.symlink_to("loop.stl")
    for bad in (dangling, loop):
        with pytest.raises(DestinationError, match="symbolic link"):
            export.export_mesh(tet, bad, overwrite=True)
        assert bad.is_symlink()
    assert not (tmp_path / "nowhere").exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".gpumesh-")]


# --------------------------------------------------------------------------------------------
# viewer


def _serving() -> set:
    """The names of this process's running ``gpumesh view`` server threads."""
    import threading

    return {t.name for t in threading.enumerate() if t.name.startswith("gpumesh-serve")}


def _get(url, headers=None, method="GET"):
    req = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_plot_mesh_draws_within_its_triangle_budget(crop):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gpumesh.viewer import plot_mesh

    ids, counts = np.unique(crop[crop != 0], return_counts=True)
    mesh = trimesh.Trimesh(*mask_to_mesh(crop == ids[np.argmax(counts)], (0, 0, 0), VS), process=False)
    assert len(mesh.faces) > 50_000
    for budget in (8000, 20000):
        ax = plot_mesh(mesh, max_faces=budget)
        drawn = len(ax.collections[0].get_facecolor())   # one colour per triangle
        assert 0.9 * budget <= drawn <= budget and ax.get_title() == f"{len(mesh.faces):,} triangles", drawn
        plt.close(ax.figure)
    small = trimesh.creation.box(extents=(64, 64, 80))
    ax = plot_mesh(small, max_faces=8000)                 # under the budget: drawn as it is
    assert len(ax.collections[0].get_facecolor()) == len(small.faces)
    plt.close(ax.figure)


def test_serve_range_requests(tmp_path):
    data = os.urandom(5000)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "12:0").write_bytes(data)
    (tmp_path / "info").write_text('{"@type": "x"}')
    server, url = serve(str(tmp_path), port=0)
    try:
        assert url.startswith("http://127.0.0.1:") and url.endswith("/")
        status, headers, body = _get(url + "sub/12%3A0", {"Range": "bytes=100-199"})
        assert status == 206 and body == data[100:200]
        assert headers["Content-Range"] == "bytes 100-199/5000"
        assert headers["Content-Length"] == "100"
        assert headers["Access-Control-Allow-Origin"] == "*"
        status, headers, body = _get(url + "sub/12:0")
        assert status == 200 and body == data and headers["Accept-Ranges"] == "bytes"
        assert headers["Access-Control-Allow-Origin"] == "*"
        assert _get(url + "sub/12:0", {"Range": "bytes=4990-"})[2] == data[4990:]
        assert _get(url + "sub/12:0", {"Range": "bytes=-10"})[2] == data[-10:]
        assert _get(url + "sub/12:0", {"Range": "bytes=4900-9999"})[2] == data[4900:]
        for bad in ("bytes=5000-", "bytes=9000-9100", "bytes=200-100", "bytes=abc", "bytes=-0"):
            status, headers, _ = _get(url + "sub/12:0", {"Range": bad})
            assert status == 416, bad
            assert headers["Content-Range"] == "bytes */5000"
        status, headers, body = _get(url + "sub/12:0", method="HEAD")
        assert status == 200 and body == b"" and headers["Content-Length"] == "5000"
        status, headers, _ = _get(url + "sub/12:0", {"Origin": "http://x", "Access-Control-Request-Headers": "range"},
                                  method="OPTIONS")
        assert status == 204 and headers["Access-Control-Allow-Origin"] == "*"
        assert "range" in headers["Access-Control-Allow-Headers"].lower()
        assert _get(url + "info")[2] == b'{"@type": "x"}'
        assert _get(url + "missing")[0] == 404
        assert _get(url + "sub")[0] == 404  # no directory listings
        assert _get(url + "..%2F..%2Fetc%2Fpasswd")[0] == 404
        assert _get(url + "sub/../../etc/passwd")[0] == 404
    finally:
        server.stop()
    with pytest.raises(OSError):
        _get(url + "info")


def test_serve_range_edge_cases_and_headers(tmp_path):
    """Ranges the server must answer as RFC 9110 says: several ranges or another unit -> the
    whole file (200); a suffix longer than the file -> all of it; a one-byte range; nothing of
    an empty file.  ``info`` is JSON; a page of another origin may read Content-Range (its
    ``fetch`` sees only the exposed headers) and may ask a server on the loopback at all
    (Chrome's Private Network Access preflight)."""
    data = os.urandom(5000)
    (tmp_path / "f").write_bytes(data)
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "info").write_text('{"@type": "x"}')
    server, url = serve(str(tmp_path), port=0)
    try:
        for whole in ("bytes=0-1,5-6", "items=0-5"):
            status, headers, body = _get(url + "f", {"Range": whole})
            assert status == 200 and body == data and "Content-Range" not in headers, whole
        status, headers, body = _get(url + "f", {"Range": "bytes=-9999"})
        assert status == 206 and body == data and headers["Content-Range"] == "bytes 0-4999/5000"
        status, headers, body = _get(url + "f", {"Range": "bytes=7-7"})
        assert status == 206 and body == data[7:8] and headers["Content-Range"] == "bytes 7-7/5000"
        for rng in ("bytes=-10", "bytes=0-"):
            status, headers, _ = _get(url + "empty", {"Range": rng})
            assert status == 416 and headers["Content-Range"] == "bytes */0", rng
        assert _get(url + "empty")[:3:2] == (200, b"")
        status, headers, _ = _get(url + "info")
        assert status == 200 and headers["Content-Type"] == "application/json"
        exposed = {h.strip().lower() for h in headers["Access-Control-Expose-Headers"].split(",")}
        assert {"content-range", "content-length", "accept-ranges"} <= exposed
        status, headers, _ = _get(url + "f", {"Origin": "https://neuroglancer-demo.appspot.com",
                                              "Access-Control-Request-Method": "GET",
                                              "Access-Control-Request-Private-Network": "true"}, method="OPTIONS")
        assert status == 204 and headers["Access-Control-Allow-Private-Network"] == "true"
        assert {"GET", "HEAD"} <= {m.strip() for m in headers["Access-Control-Allow-Methods"].split(",")}
        assert _get(url + "f%00x")[0] == 404
    finally:
        server.stop()


def test_serve_keeps_a_connection_usable_after_head_requests(tmp_path):
    """A HEAD answer carries no body, found or not: a client reusing the connection (HTTP/1.1
    keep-alive, as browsers do) reads the next answer intact."""
    import http.client

    data = os.urandom(3000)
    (tmp_path / "f").write_bytes(data)
    server, url = serve(str(tmp_path), port=0)
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
    try:
        for path, status in (("/f", 200), ("/missing", 404), ("/f", 200)):
            conn.request("HEAD", path)
            r = conn.getresponse()
            assert r.status == status and r.read() == b""
            conn.request("GET", "/f", headers={"Range": "bytes=10-19"})
            r = conn.getresponse()
            assert r.status == 206 and r.read() == data[10:20]
    finally:
        conn.close()
        server.stop()


def test_serve_keeps_to_its_directory_through_links(tmp_path):
    """A link inside the served directory is followed while it stays inside; one out of it is
    not, also to a sibling whose name starts with the directory's; a directory that does not
    exist is refused."""
    root = tmp_path / "srv"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "f").write_bytes(b"inside")
    (tmp_path / "srv-secret").mkdir()
    (tmp_path / "srv-secret" / "key").write_bytes(b"outside")
    (root / "in").symlink_to(root / "sub" / "f")
    (root / "out").symlink_to(tmp_path / "srv-secret" / "key")
    (root / "outdir").symlink_to(tmp_path / "srv-secret")
    server, url = serve(str(root), port=0)
    try:
        assert _get(url + "in")[::2] == (200, b"inside")
        assert _get(url + "out")[0] == 404
        assert _get(url + "outdir/key")[0] == 404
    finally:
        server.stop()
    with pytest.raises(NotADirectoryError):
        serve(str(tmp_path / "nowhere"))


def test_view_serves_the_mesh_directory(crop, crop_high, real_zarr):
    dest, _ = crop_high
    seg = picks(crop)[0]
    session = view(str(dest), source=str(real_zarr), segments=[seg], use_neuroglancer=False)
    try:
        assert session.mesh_url.startswith("precomputed://http://127.0.0.1:")
        assert session.volume_url.startswith("zarr3://http://127.0.0.1:")
        base = session.mesh_url[len("precomputed://"):]
        status, _, body = _get(base + "info")
        assert status == 200 and b"neuroglancer_multilod_draco" in body
        assert _get(base + f"{seg}.index")[0] == 200
        vbase = session.volume_url[len("zarr3://"):]
        assert _get(vbase + "zarr.json")[0] == 200
        layer = session.state["layers"][0]
        assert layer["type"] == "segmentation" and layer["segments"] == [str(seg)]
        assert session.link.startswith("https://") and "precomputed" in session.link
        assert session.viewer_url is None
    finally:
        session.stop()
    # default segments: the largest by segment properties
    session = view(str(dest), use_neuroglancer=False)
    try:
        assert session.state["layers"][0]["segments"][0] == str(picks(crop)[0])
    finally:
        session.stop()


def test_default_segments_are_the_largest_by_voxels(crop, crop_high):
    from gpumesh.viewer import default_segments

    dest, _ = crop_high
    ids, counts = np.unique(crop[crop != 0], return_counts=True)
    size = dict(zip(ids.tolist(), counts.tolist()))
    top = default_segments(str(dest))
    assert len(top) == 5 and len(set(top)) == 5
    assert [size[s] for s in top] == sorted((size[s] for s in top), reverse=True)
    assert min(size[s] for s in top) >= max(v for s, v in size.items() if s not in top)
    assert default_segments(str(dest), 2) == top[:2]


def test_neuroglancer_state_layers_and_units():
    """The voxel size given for a volume Neuroglancer cannot scale becomes its source's output
    dimensions in metres; a precomputed volume (scaled by its own info) gets none; the layout
    shows slices only with a volume."""
    from gpumesh.viewer import neuroglancer_state

    mesh = "precomputed://http://127.0.0.1:1/m/"
    state = neuroglancer_state(mesh, [3, 1], "zarr3://http://127.0.0.1:2/v/", (4, 5, 40))
    layer = state["layers"][0]
    vol, m = layer["source"]
    assert m == mesh and vol["url"] == "zarr3://http://127.0.0.1:2/v/" and layer["segments"] == ["3", "1"]
    dims = vol["transform"]["outputDimensions"]
    assert {a: u for a, (_, u) in dims.items()} == {"x": "m", "y": "m", "z": "m"}
    assert [dims[a][0] for a in "xyz"] == pytest.approx([4e-9, 5e-9, 40e-9])
    assert state["layout"] == "xy-3d"
    state = neuroglancer_state(mesh, [], "precomputed://http://127.0.0.1:2/v/", (4, 5, 40))
    assert state["layers"][0]["source"] == ["precomputed://http://127.0.0.1:2/v/", mesh]
    state = neuroglancer_state(mesh, [7])
    assert state["layers"][0]["source"] == mesh and state["layout"] == "3d"


def test_view_of_a_url_serves_nothing_and_a_failed_view_stops_its_servers(tmp_path, crop_high):
    """A mesh directory given as a URL goes to Neuroglancer as it is (one precomputed://
    prefix); a local volume of unknown format fails the call and leaves no server running;
    a voxel size given wins over the volume's own."""
    from conftest import write_zarr

    for dest in ("gs://bucket/meshes/", "precomputed://https://example.org/meshes/"):
        session = view(dest, segments=[1], use_neuroglancer=False)
        assert session.mesh_url == "precomputed://" + dest.replace("precomputed://", "") and session.servers == []

    mesh_dir, _ = crop_high
    before = _serving()
    (tmp_path / "unknown").mkdir()
    with pytest.raises(ValueError, match="cannot tell the format"):
        view(str(mesh_dir), source=str(tmp_path / "unknown"), segments=[1], use_neuroglancer=False)
    assert _serving() == before
    write_zarr(tmp_path / "v.zarr", np.ones((8, 8, 8), np.uint32), chunk=8)
    session = view(str(mesh_dir), source=str(tmp_path / "v.zarr"), segments=[1], use_neuroglancer=False,
                   voxel_size=(4, 5, 40))
    try:
        dims = session.state["layers"][0]["source"][0]["transform"]["outputDimensions"]
        assert [dims[a][0] for a in "xyz"] == pytest.approx([4e-9, 5e-9, 40e-9])
    finally:
        session.stop()
    assert _serving() == before


def test_view_refuses_a_folder_without_a_mesh(tmp_path, crop_high):
    """A folder with no mesh (empty, a volume, a bad info) is refused before anything is
    served, as the CLI's one line with status 2; a legacy mesh without info is served."""
    import json

    from gpumesh.errors import InvalidMeshError

    before = _serving()
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidMeshError, match="empty: no info file there .*not a mesh directory"):
        view(str(tmp_path / "empty"), segments=[1], use_neuroglancer=False)
    volume = tmp_path / "volume"
    volume.mkdir()
    (volume / "info").write_text(json.dumps({"type": "segmentation", "data_type": "uint32", "num_channels": 1,
                                             "mesh": "mesh", "scales": []}))
    with pytest.raises(InvalidMeshError, match=f"volume is a volume; its meshes are in {volume / 'mesh'}$"):
        view(str(volume), segments=[1], use_neuroglancer=False)
    (volume / "info").write_text("{")
    with pytest.raises(InvalidMeshError, match="volume: not a mesh directory .*not valid JSON"):
        view(str(volume), segments=[1], use_neuroglancer=False)
    assert _serving() == before
    res = CliRunner().invoke(view_cmd, [str(tmp_path / "empty"), "--no-browser", "--duration", "0"])
    assert res.exit_code == 2 and res.output.startswith("gpumesh: error: ") and "not a mesh directory" in res.output
    old = tmp_path / "old"   # legacy meshes written without an info
    old.mkdir()
    (old / "7:0").write_text(json.dumps({"fragments": []}))
    session = view(str(old), segments=[7], use_neuroglancer=False)
    session.stop()
    mesh_dir, _ = crop_high
    session = view(str(mesh_dir), segments=[1], use_neuroglancer=False)
    session.stop()
    assert _serving() == before


def test_view_with_neuroglancer(crop_high):
    neuroglancer = pytest.importorskip("neuroglancer")
    dest, _ = crop_high
    session = view(str(dest), segments=[1, 2])
    try:
        assert session.viewer_url.startswith("http://127.0.0.1:")
        assert _get(session.viewer_url)[0] == 200
        state = session.viewer.state
        assert [str(s) for s in state.layers[0].segments] == ["1", "2"]
        assert state.layers[0].source[0].url == session.mesh_url
    finally:
        session.stop()
        neuroglancer.server.stop()


def test_view_command(crop_high):
    dest, _ = crop_high
    res = CliRunner().invoke(view_cmd, [str(dest), "--segments", "3,4", "--no-browser", "--no-neuroglancer",
                                        "--duration", "0"])
    assert res.exit_code == 0, res.output
    assert "precomputed://http://127.0.0.1:" in res.output and "3, 4" in res.output
    res = CliRunner().invoke(view_cmd, [str(dest), "--segments", "x", "--duration", "0"])
    assert res.exit_code == 2


@pytest.mark.filterwarnings("always::gpumesh.backend.CPUFallbackNotice")   # the CLI shows it
def test_segment_command_quality_and_cpu_notice(tmp_path, monkeypatch):
    """``--quality low`` decimates (fewer triangles than the exact surface); on a machine where
    ``--device auto`` finds no GPU the CPU fallback is a one-line notice, not a warning."""
    from gpumesh import backend

    from conftest import write_zarr

    x, y, z = np.mgrid[:24, :24, :24]
    labels = (((x - 12) ** 2 + (y - 12) ** 2 + (z - 12) ** 2) < 81).astype(np.uint32) * 3
    write_zarr(tmp_path / "v.zarr", labels, chunk=24)
    monkeypatch.setattr(backend, "gpu_available", lambda: False)
    faces = {}
    for quality in ("exact", "low"):
        out = tmp_path / f"{quality}.ply"
        res = CliRunner().invoke(segment_cmd, [str(tmp_path / "v.zarr"), "3", "-o", str(out), "--quality", quality,
                                               "--voxel-size", "1,1,1"])
        assert res.exit_code == 0, res.output
        notices = [line for line in res.output.splitlines() if "meshing on the CPU" in line]
        assert len(notices) == 1 and notices[0].startswith("gpumesh: ") and "warning" not in notices[0], res.output
        faces[quality] = len(trimesh.load(str(out), process=False).faces)
    assert 0 < faces["low"] < 0.5 * faces["exact"], faces


def test_view_command_browser_viewer_and_servers(crop_high, tmp_path, monkeypatch):
    """``--no-browser`` opens no browser, else the link is opened; ``--no-neuroglancer`` gives
    the public link to paste (no local viewer, no hint to install one); the volume source is
    printed when there is one; the servers stop when the command ends."""
    import webbrowser

    from conftest import write_zarr

    dest, _ = crop_high
    opened = []
    monkeypatch.setattr(webbrowser, "open", lambda url, *a, **k: opened.append(url) or True)

    before = _serving()
    args = [str(dest), "--segments", "3", "--no-neuroglancer", "--duration", "0"]
    res = CliRunner().invoke(view_cmd, args + ["--no-browser"])
    assert res.exit_code == 0, res.output
    assert opened == [] and _serving() == before
    link = [line.strip() for line in res.output.splitlines() if line.strip().startswith("https://")]
    assert len(link) == 1 and link[0].startswith("https://neuroglancer-demo.appspot.com/#!"), res.output
    assert "pip install neuroglancer" not in res.output and "volume source" not in res.output
    write_zarr(tmp_path / "v.zarr", np.ones((8, 8, 8), np.uint32), chunk=8)
    res = CliRunner().invoke(view_cmd, args + ["--source", str(tmp_path / "v.zarr")])
    assert res.exit_code == 0, res.output
    assert len(opened) == 1 and opened[0].startswith("https://neuroglancer-demo.appspot.com/#!")
    assert "volume source: zarr3://http://127.0.0.1:" in res.output
    assert _serving() == before


@pytest.mark.filterwarnings("ignore::gpumesh.adhoc.SegmentCutWarning")   # the crop cuts the segment
def test_bounds_are_global_where_bbox_is_in_array_coordinates(real_zarr, crop, tmp_path):
    """``bounds`` (API and ``segment --bounds``) is the crop's box in global voxel coordinates,
    the voxel offset included; meshing within it equals meshing the crop array at its place."""
    seg = picks(crop)[1]
    offset = np.array([1000, -2000, 30])
    start = offset + CROP_START
    bounds = tuple(start.tolist()) + tuple((start + CROP_SIZE).tolist())
    want = mesh_segment(crop, seg, voxel_size=VOXEL_SIZE, voxel_offset=start, device="cpu")
    got = mesh_segment(str(real_zarr), seg, voxel_offset=offset, bounds=bounds, device="cpu")
    assert same_triangles(got.vertices, got.faces, want.vertices, want.faces)
    out = tmp_path / "m.ply"
    res = CliRunner().invoke(segment_cmd, [str(real_zarr), str(seg), "-o", str(out), "--voxel-offset",
                                           ",".join(map(str, offset)), "--bounds", ",".join(map(str, bounds)),
                                           "--voxel-size", "32,32,40", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    mesh = trimesh.load(str(out), process=False, force="mesh")
    assert same_triangles(mesh.vertices, mesh.faces, want.vertices, want.faces)


def test_obj_keeps_its_precision_at_any_scale(tmp_path):
    # trimesh writes OBJ with 8 decimals: in metres (scale 1e-9) that snapped the positions to
    # 10 nm, merging most vertices of 4 nm voxels (zero-area triangles).
    from gpumesh import export

    labels = np.zeros((8, 8, 6), np.uint8)
    labels[2:6, 3:5, 1:5] = 7
    mesh = mesh_segment(labels, 7, voxel_size=(4, 4, 40), voxel_offset=(1000, 2000, 30), device="cpu")
    for scale in (1.0, 1e-3, 1e-9):
        path = export.export_mesh(mesh, tmp_path / f"m{scale:g}.obj", scale=scale)
        back = trimesh.load(path, process=False, force="mesh")
        assert len(back.vertices) == len(mesh.vertices)
        np.testing.assert_allclose(back.vertices, mesh.vertices * scale, rtol=1e-7)


def test_export_reads_the_format_from_an_upper_case_suffix(tmp_path):
    from gpumesh import export

    tet = trimesh.Trimesh(vertices=[[0, 0, 0], [32, 0, 0], [0, 32, 0], [0, 0, 40]],
                          faces=[[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]], process=False)
    for name, ft in (("m.STL", "stl"), ("m.Ply", "ply"), ("m.OBJ", "obj"), ("m.GLB", "glb")):
        path = export.export_mesh(tet, tmp_path / name)
        back = trimesh.load(path, file_type=ft, process=False, force="mesh")
        assert len(back.faces) == 4 and np.allclose(back.bounds, tet.bounds)


def test_export_into_a_file_as_folder_says_so(tmp_path):
    # os.makedirs said "[Errno 17] File exists: '.../afile'"
    from gpumesh import export

    tet = trimesh.Trimesh(vertices=[[0, 0, 0], [32, 0, 0], [0, 32, 0], [0, 0, 40]],
                          faces=[[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]], process=False)
    (tmp_path / "afile").write_text("x")
    for where in (tmp_path / "afile" / "m.stl", tmp_path / "afile" / "sub" / "m.stl"):
        with pytest.raises(NotADirectoryError, match=f"{tmp_path / 'afile'} is a file, not a folder"):
            export.export_mesh(tet, where)
    assert (tmp_path / "afile").read_text() == "x"
