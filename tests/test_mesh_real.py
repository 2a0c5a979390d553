"""The main job on a crop of the real pinky40 volume: geometry and format properties."""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
import pytest

from gpumesh.reader import load_fragments, load_mesh, open_mesh, stored_to_model
from gpumesh.validate import crossing_triangles, validate

from conftest import CROP_START, VOXEL_SIZE
from surface import distance_to_mesh, hausdorff, square_faces

BITS = 16


def sampled_segments(crop: np.ndarray, n: int = 12) -> list[int]:
    """Segments of several sizes: the largest few, some mid-sized, some small."""
    ids, counts = np.unique(crop[crop != 0], return_counts=True)
    order = ids[np.argsort(-counts, kind="stable")]
    picks = list(order[:4]) + list(order[len(order) // 4: len(order) // 4 + 4]) + list(order[-40::10])
    return [int(s) for s in picks[:n]]


def boundary_faces(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Boundary faces of a voxel mask (outside the crop counts as background).

    Returns
    -------
    centers : (F, 3) float64, crop voxel-corner coordinates of face centers
    axes : (F,) int, the axis each face is normal to
    """
    p = np.pad(mask, 1)
    centers, axes = [], []
    for a in range(3):
        diff = np.diff(p.astype(np.int8), axis=a) != 0
        idx = np.argwhere(diff).astype(np.float64)
        c = idx - 0.5
        c[:, a] = idx[:, a]
        centers.append(c)
        axes.append(np.full(len(idx), a))
    return np.concatenate(centers), np.concatenate(axes)


def to_crop_voxels(vertices_nm: np.ndarray) -> np.ndarray:
    return vertices_nm / np.array(VOXEL_SIZE) - np.array(CROP_START)


def distance_to_faces(points: np.ndarray, centers: np.ndarray, axes: np.ndarray) -> np.ndarray:
    """Each point's distance (voxel units) to the union of unit boundary faces (exact: each face
    as two triangles, ``tests/surface.py``; 64 and more read as 64)."""
    V, F = square_faces(centers, axes)
    return distance_to_mesh(points, V, F, np.ones(3), 64.0)


def coarse_lod_bound(k: int) -> float:
    """How far (voxels) a LOD ``k >= 1`` vertex may lie from the segment's label boundary.

    A vertex is the centre of a face of a LOD ``k`` voxel (``2**k`` voxels a side) of the
    segment, and that voxel holds at least one LOD 0 voxel of it (the downsampling rule); the
    farthest that voxel can be is the opposite corner: ``(2**k - 1)`` across and
    ``(2**(k-1) - 1)`` along each in-plane axis.  1 and 3.32 for LODs 1 and 2 (under ``2**k``),
    8.19 for LOD 3 and 17.97 for LOD 4 (over it).
    """
    return float(np.hypot(2.0 ** k - 1, np.sqrt(2) * (2.0 ** (k - 1) - 1)))


def assert_closed_oriented(mesh, what: str) -> None:
    faces = np.asarray(mesh.faces)
    assert len(faces) > 0, f"{what}: no triangles"
    directed = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    # every directed edge once (consistent winding, no edge used twice the same way)
    _, dcount = np.unique(directed, axis=0, return_counts=True)
    assert dcount.max() == 1, f"{what}: a directed edge is used {dcount.max()} times"
    undirected = np.sort(directed, axis=1)
    _, ucount = np.unique(undirected, axis=0, return_counts=True)
    assert (ucount == 2).all(), f"{what}: {np.sum(ucount != 2)} edges not shared by exactly two triangles"
    assert mesh.volume > 0, f"{what}: normals point inwards"


def test_validator_passes(crop_high, crop_medium):
    for dest, summary in (crop_high, crop_medium):
        report = validate(str(dest))
        assert report.ok, report.errors[:10]
        assert not report.warnings, report.warnings
        assert report.num_segments == summary.segments
        assert [s["triangles"] for s in report.per_lod] == summary.triangles_per_lod


def test_all_segments_written(crop, crop_medium):
    dest, summary = crop_medium
    expected = set(np.unique(crop).tolist()) - {0}
    assert set(open_mesh(str(dest)).segment_ids()) == expected
    assert summary.segments == len(expected)


def test_lod0_exact_on_label_boundary(crop, crop_high):
    """Undecimated LOD 0: vertices are exactly the label boundary's face centres, all of them."""
    dest, _ = crop_high
    for seg in sampled_segments(crop):
        mesh = load_mesh(str(dest), seg, lod=0)
        v = to_crop_voxels(np.asarray(mesh.vertices))
        halves = np.round(v * 2) / 2
        # within 1/2 voxel per axis of the boundary: here, on it up to quantization rounding
        assert np.abs(v - halves).max() < 1e-3, seg
        centers, _ = boundary_faces(crop == seg)
        got = {tuple(r) for r in halves.tolist()}
        want = {tuple(r) for r in centers.tolist()}
        assert got == want, f"segment {seg}: {len(got - want)} stray vertices, {len(want - got)} faces untouched"


def test_lod0_closed_manifold_exact(crop, crop_high):
    dest, _ = crop_high
    for seg in sampled_segments(crop):
        assert_closed_oriented(load_mesh(str(dest), seg, lod=0), f"segment {seg} LOD 0 (high)")


def test_default_preset_lod0_closed_and_near(crop, crop_medium):
    dest, _ = crop_medium
    for seg in sampled_segments(crop):
        mesh = load_mesh(str(dest), seg, lod=0)
        assert_closed_oriented(mesh, f"segment {seg} LOD 0 (medium)")
        centers, axes = boundary_faces(crop == seg)
        d = distance_to_faces(to_crop_voxels(np.asarray(mesh.vertices)), centers, axes)
        assert d.max() <= 1.0, f"segment {seg}: LOD 0 vertex {d.max():.2f} voxels from the label boundary"


def test_default_preset_lod0_stays_near_the_exact_surface(crop, crop_high, crop_medium):
    """The default preset's LOD 0 against the exact marching-cubes surface (``high``'s LOD 0),
    both ways (vertices and triangle centroids).  Over the crop's 156 segments it moved at most
    0.93 voxels (30 nm; the median segment 0.63): meshoptimizer's error bound, half a voxel, is
    its quadric measure, not a distance.  1.5 voxels bounds it."""
    vs = np.asarray(VOXEL_SIZE)
    worst = 0.0
    for seg in sampled_segments(crop):
        exact, medium = load_mesh(str(crop_high[0]), seg, lod=0), load_mesh(str(crop_medium[0]), seg, lod=0)
        assert len(medium.faces) <= len(exact.faces)
        there, back = hausdorff(exact.vertices, exact.faces, medium.vertices, medium.faces, cell=vs / 2,
                                cap=3 * vs.min())
        assert max(there, back) <= 1.5 * vs.min(), (
            f"segment {seg}: LOD 0 moved {max(there, back) / vs.min():.2f} voxels from the exact surface")
        worst = max(worst, there, back)
    assert worst > 0.0


def test_coarser_lods_stay_near_lod0(crop, crop_medium):
    """LOD k stays within :func:`coarse_lod_bound` (k) voxels of the label boundary (under 2**k),
    and is closed and consistently oriented, as LOD 0 is."""
    dest, _ = crop_medium
    src = open_mesh(str(dest))
    checked = 0
    for seg in sampled_segments(crop):
        m = src.manifest(seg)
        centers, axes = boundary_faces(crop == seg)
        for k in range(1, m.num_lods):
            mesh = load_mesh(src, seg, lod=k)
            if len(mesh.vertices) == 0:
                continue
            assert_closed_oriented(mesh, f"segment {seg} LOD {k} (medium)")
            d = distance_to_faces(to_crop_voxels(np.asarray(mesh.vertices)), centers, axes)
            assert d.max() <= coarse_lod_bound(k) + 1e-3, f"segment {seg} LOD {k}: {d.max():.2f} voxels from LOD 0"
            checked += 1
    assert checked > 0


def test_every_segment_has_triangles_at_coarsest_lod(crop_medium):
    dest, _ = crop_medium
    src = open_mesh(str(dest))
    for seg in src.segment_ids():
        m = src.manifest(seg)
        top = m.num_lods - 1
        frags = load_fragments(src, seg, top)
        assert any(len(f["faces"]) and not f["placeholder"] for f in frags), f"segment {seg}: coarsest LOD {top} is empty"


def test_empty_parents_hold_placeholders(crop, crop_medium):
    """Every listed node holds bytes; a parent without the segment's surface holds a placeholder:
    four collinear vertices, a closed surface of zero area inside one cell of the node's 2x2x2
    grid, lying on the segment's finer surface (so within 2**k voxels of the label boundary)."""
    dest, _ = crop_medium
    src = open_mesh(str(dest))
    found = 0
    for seg in src.segment_ids():
        m = src.manifest(seg)
        assert all((sizes > 0).all() for sizes in m.fragment_sizes), f"segment {seg}: a zero-byte fragment"
        if m.num_lods < 2:
            continue
        centers = axes = None
        finer = load_fragments(src, seg, 0)
        for k in range(1, m.num_lods):
            frags = load_fragments(src, seg, k)
            for f in frags:
                if not f["placeholder"]:
                    continue
                # at a vertex of one of its children (moved onto the node's box: a child's box
                # reaches half a finer voxel past it), up to this LOD's quantization step
                kids = [g for g in finer if (np.asarray(g["position"]) >> 1 == f["position"]).all()]
                assert kids
                kid_model = np.concatenate([stored_to_model(m, k - 1, g["position"], g["positions_q"], BITS,
                                                            src.transform) for g in kids])
                lo, hi = stored_to_model(m, k, f["position"], [[0, 0, 0], [(1 << BITS) - 1] * 3], BITS,
                                         src.transform)
                # its anchor is one end of its line of four (which one comes first depends on
                # the decoder's numbering of the points)
                q = np.asarray(f["positions_q"])
                ends = q[[int(np.argmin(q[:, 0])), int(np.argmax(q[:, 0]))]]
                here = stored_to_model(m, k, f["position"], ends, BITS, src.transform)
                step_nm = m.chunk_shape * 2 ** k / ((1 << BITS) - 1) * np.asarray(VOXEL_SIZE)
                near = np.abs(np.clip(kid_model, lo, hi)[:, None, :] - here[None, :, :]) <= step_nm * 1.01
                assert near.all(axis=2).any(), f"segment {seg} LOD {k}: placeholder not at a child's vertex"
                found += 1
                q, faces = f["positions_q"], f["faces"]
                assert len(q) == 4 and len(faces) == 4
                directed = {(int(a), int(b)) for t in faces for a, b in ((t[0], t[1]), (t[1], t[2]), (t[2], t[0]))}
                assert len(directed) == 12 and all((b, a) in directed for a, b in directed)
                assert not crossing_triangles(q, faces, BITS).any()
                if centers is None:
                    centers, axes = boundary_faces(crop == seg)
                model = stored_to_model(m, k, f["position"], q, BITS, src.transform)
                d = distance_to_faces(to_crop_voxels(model), centers, axes)
                assert d.max() <= 2 ** k, f"segment {seg} LOD {k}: placeholder {d.max():.2f} voxels off"
            finer = frags
    assert found > 0, "the crop has no empty parent node: this test checks nothing"


def test_load_mesh_leaves_out_placeholders(crop_medium):
    dest, _ = crop_medium
    src = open_mesh(str(dest))
    for seg in src.segment_ids():
        m = src.manifest(seg)
        for k in range(1, m.num_lods):
            frags = load_fragments(src, seg, k)
            if any(f["placeholder"] for f in frags):
                mesh = load_mesh(src, seg, lod=k, weld=False)
                assert len(mesh.faces) == sum(len(f["faces"]) for f in frags if not f["placeholder"])
                assert (mesh.area_faces > 0).all()
                return
    pytest.fail("no placeholder in the crop's output")


def test_lod_count_follows_size(crop, crop_medium):
    dest, _ = crop_medium
    src = open_mesh(str(dest))
    seg_ids, counts = np.unique(crop[crop != 0], return_counts=True)
    big = int(seg_ids[np.argmax(counts)])
    small = int(seg_ids[np.argmin(counts)])
    assert src.manifest(big).num_lods == 3
    assert src.manifest(small).num_lods == 1


@pytest.mark.parametrize("which", ["crop_high", "crop_medium"])
def test_fragments_share_border_vertices(which, crop, request):
    """Adjacent fragments of one LOD decode to the same positions on their common face."""
    dest, _ = request.getfixturevalue(which)
    src = open_mesh(str(dest))
    top = (1 << BITS) - 1
    pairs = 0
    for seg in sampled_segments(crop)[:6]:
        m = src.manifest(seg)
        for lod in range(m.num_lods):
            frags = {tuple(f["position"].tolist()): f for f in load_fragments(src, seg, lod)}
            for pos, f in frags.items():
                for a in range(3):
                    nb = list(pos)
                    nb[a] += 1
                    g = frags.get(tuple(nb))
                    if g is None or len(f["faces"]) == 0 or len(g["faces"]) == 0 or f["placeholder"] \
                            or g["placeholder"]:
                        continue
                    fa = f["positions_q"][f["positions_q"][:, a] == top]
                    gb = g["positions_q"][g["positions_q"][:, a] == 0]
                    other = [b for b in range(3) if b != a]
                    sf = {tuple(r) for r in fa[:, other].tolist()}
                    sg = {tuple(r) for r in gb[:, other].tolist()}
                    assert sf == sg, f"segment {seg} LOD {lod} nodes {pos}/{tuple(nb)}: border vertices differ"
                    pairs += bool(sf)
    assert pairs > 0


@pytest.mark.parametrize("quality", ["high", "medium"])
def test_fragments_are_welded_when_encoded(crop, tmp_path, unwelded_fragments, quality):
    """Every fragment handed to the Draco encoder is welded: no two vertices at one quantized
    position, no triangle that repeats a vertex.  Fragments of several sub-node pieces (LOD > 0)
    are welded when written; one piece's vertices are distinct half-voxel points already (LOD
    0)."""
    from gpumesh.pipeline import MeshOptions, run_mesh

    labels = np.ascontiguousarray(crop[:64, :64, :64])
    run_mesh(labels, str(tmp_path / "out"), options=MeshOptions(chunk_size=16, max_lods=3, quality=quality),
             voxel_size=VOXEL_SIZE, workers=1)
    assert unwelded_fragments["encoded"] > 100 and not unwelded_fragments["unwelded"], unwelded_fragments


def test_quantized_positions_are_exact_for_lod0(crop, crop_high):
    """Undecimated LOD 0 vertices are exact multiples of 2**bits / (2 * chunk) (half voxels)."""
    dest, _ = crop_high
    src = open_mesh(str(dest))
    seg = sampled_segments(crop)[0]
    step = (1 << BITS) // (2 * 32)
    for f in load_fragments(src, seg, 0):
        q = f["positions_q"]
        interior = q[(q < (1 << BITS) - 1).all(axis=1)]
        assert (interior % step == 0).all()


def test_segment_properties_voxel_counts(crop, crop_medium):
    from gpumesh import storage

    dest, _ = crop_medium
    raw = storage.read(storage.open_kvstore(str(dest)), "segment_properties/info")
    # written compact: it lists every segment, so whitespace would nearly double it
    assert raw.endswith(b"}\n") and raw.count(b"\n") == 1 and b": " not in raw
    info = json.loads(raw)
    ids = [int(s) for s in info["inline"]["ids"]]
    values = info["inline"]["properties"][0]["values"]
    seg_ids, counts = np.unique(crop[crop != 0], return_counts=True)
    assert ids == seg_ids.tolist()
    assert values == counts.tolist()


def test_legacy_matches_multires_lod0(crop, crop_high, tmp_path):
    from conftest import _mesh_crop

    dest = tmp_path / "legacy"
    _mesh_crop(crop, dest, quality="high", format="legacy")
    report = validate(str(dest))
    assert report.ok, report.errors[:10]
    assert report.kind == "legacy"
    multires_dest, _ = crop_high
    for seg in sampled_segments(crop)[:4]:
        a = load_mesh(str(dest), seg)
        b = load_mesh(str(multires_dest), seg, lod=0)
        assert_closed_oriented(a, f"legacy segment {seg}")
        va = {tuple(r) for r in np.round(to_crop_voxels(np.asarray(a.vertices)) * 2).astype(int).tolist()}
        vb = {tuple(r) for r in np.round(to_crop_voxels(np.asarray(b.vertices)) * 2).astype(int).tolist()}
        assert va == vb
        assert len(a.faces) == len(b.faces)
    # LOD 1 of a legacy mesh does not exist; of a segment that is not there, the segment does not
    from gpumesh.errors import InvalidMeshError

    with pytest.raises(InvalidMeshError, match="legacy meshes have only LOD 0"):
        load_mesh(str(dest), sampled_segments(crop)[0], lod=1)
    with pytest.raises(InvalidMeshError, match=r"segment 4294967295 not found in file://"):
        load_mesh(str(dest), 2**32 - 1, lod=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidMeshError, match=r"no info file there: not a mesh directory\?"):
        load_mesh(str(tmp_path / "empty"), 3, lod=1)


def test_cut_border_blocks_mesh_like_full_blocks(crop):
    # A border block is cut past the coarsest LOD's first voxel outside the volume.  Padding the
    # same labels with background (so nothing is cut) must give the very same block result, at
    # every LOD, for a shape that is a multiple of nothing.
    from gpumesh.backend import CPUBackend
    from gpumesh.pipeline import MeshOptions, Plan, mesh_block
    from gpumesh.volume import open_volume

    labels = np.ascontiguousarray(crop[:45, :38, :51])
    options = MeshOptions(chunk_size=8, max_lods=3)
    vol = open_volume(labels, voxel_size=VOXEL_SIZE)
    padded = open_volume(np.pad(labels, ((0, 64), (0, 64), (0, 64))), voxel_size=VOXEL_SIZE)
    plan = Plan.make(vol.shape, options)
    assert plan.grid == (2, 2, 2)
    backend = CPUBackend()
    for b in plan.blocks():
        cut = mesh_block(vol, plan, options, b, backend)
        full = mesh_block(padded, plan, options, b, backend)
        assert cut == full, f"block {b}"
        assert len(cut) > 100


def _block_fragments(blob: bytes) -> tuple[dict, dict]:
    from gpumesh.pipeline import unpack_block_header

    index, labels, counts, start = unpack_block_header(blob)
    # a result lists its fragments by segment ID, LOD, node, its bytes laid out in that order
    # (a segment's fragments side by side: the assembly reads them in one byte range)
    keys = [tuple(int(e[f]) for f in ("label", "lod", "x", "y", "z")) for e in index]
    assert keys == sorted(keys)
    sizes = index["size"].astype(np.int64)
    assert index["offset"].tolist() == (np.cumsum(sizes) - sizes).tolist()
    assert start + int(sizes.sum()) == len(blob)
    frags = {}
    for e in index:
        key = (int(e["label"]), int(e["lod"]), int(e["x"]), int(e["y"]), int(e["z"]))
        assert key not in frags
        frags[key] = (int(e["triangles"]), blob[start + int(e["offset"]):start + int(e["offset"] + e["size"])])
    return frags, dict(zip(labels.tolist(), counts.tolist()))


@pytest.mark.parametrize("shape, chunk, lods, zero_from", [((45, 38, 51), 8, 3, None), ((47, 33, 64), 8, 3, None),
                                                           ((71, 40, 49), 4, 4, None), ((30, 23, 41), 8, 2, None),
                                                           ((45, 38, 70), 8, 3, 25)])
def test_block_tasks_give_the_whole_blocks_fragments(crop, shape, chunk, lods, zero_from):
    # The main job splits each block into a task for its coarsest LOD and one per octant for
    # the finer LODs.  Their fragments together must be the whole block's, byte for byte, with
    # the voxel counts once; on shapes that cut border blocks and octants unevenly (47: an
    # octant whose LOD 0 cubes all lie past the volume still has a LOD 1 cube inside it), at
    # the default preset (decimated, so the thin-spot locks count).  With
    # ``zero_from``, z from there on is background, so that whole blocks and octants read
    # nothing else (the tasks skip those) and others hold a little of it.
    from gpumesh.backend import CPUBackend
    from gpumesh.pipeline import MeshOptions, Plan, mesh_block
    from gpumesh.volume import open_volume

    labels = np.array(crop[:shape[0], :shape[1], :shape[2]], order="C")   # a copy: the fixture is shared
    if zero_from is not None:
        labels[:, :, zero_from:] = 0
    options = MeshOptions(chunk_size=chunk, max_lods=lods)
    vol = open_volume(labels, voxel_size=VOXEL_SIZE)
    plan = Plan.make(vol.shape, options)
    tasks = plan.tasks()
    assert {t[0] for t in tasks} == set(plan.blocks())
    backend = CPUBackend()
    octant_fragments = 0
    for b in plan.blocks():
        whole, whole_counts = _block_fragments(mesh_block(vol, plan, options, b, backend))
        got, got_counts = {}, {}
        for _, part in (t for t in tasks if t[0] == b):
            frags, counts = _block_fragments(mesh_block(vol, plan, options, b, backend, part))
            assert not set(frags) & set(got), f"block {b} part {part}: fragments listed twice"
            assert all((key[1] == lods - 1) == (part == "coarse") for key in frags)
            octant_fragments += sum(key[1] < lods - 1 for key in frags)
            got.update(frags)
            for label, n in counts.items():
                got_counts[label] = got_counts.get(label, 0) + n
        assert got == whole, f"block {b}"
        assert got_counts == whole_counts
    assert octant_fragments > 50



def test_tasks_run_the_fullest_blocks_octants_first_and_the_coarse_tasks_last():
    """``Plan.tasks`` is the order the job runs its tasks in: every octant before every coarse
    task, a block's octants one after the other, the blocks with the most voxels inside the
    volume first (a cut border block's slab comes late), and the coarse tasks in that order too."""
    from gpumesh.pipeline import COARSE, MeshOptions, Plan

    shape = (70, 40, 100)
    plan = Plan.make(shape, MeshOptions(chunk_size=8, max_lods=3))
    tasks = plan.tasks()
    parts = [part for _, part in tasks]
    octants = sum(part != COARSE for part in parts)
    assert 0 < octants < len(tasks) and all(part == COARSE for part in parts[octants:])
    order = [b for b, part in tasks if part == COARSE]
    assert sorted(order) == sorted(plan.blocks())
    inside = [int(np.prod([max(0, min((i + 1) * plan.block, n) - i * plan.block) for i, n in zip(b, shape)]))
              for b in order]
    assert inside == sorted(inside, reverse=True) and inside[0] > inside[-1]
    runs = [b for i, (b, _) in enumerate(tasks[:octants]) if i == 0 or b != tasks[i - 1][0]]
    assert len(runs) == len(set(runs)) and runs == [b for b in order if b in runs]


@pytest.mark.parametrize("shape, chunk, lods, voxel, fmt", [
    ((70, 40, 100), 8, 3, (1, 1, 1), "multires"), ((45, 38, 51), 8, 2, (4, 4, 40), "multires"),
    ((100, 9, 17), 4, 4, (1, 1, 1), "multires"), ((200, 130, 33), 8, 5, (8, 8, 40), "multires"),
    ((1, 1, 1), 8, 3, (1, 1, 1), "multires"), ((64, 64, 64), 8, 3, (1, 1, 1), "multires"),
    ((70, 40, 100), 8, 3, (1, 1, 1), "legacy"), ((33, 65, 17), 16, 4, (40, 4, 4), "multires"),
    ((3, 4, 3), 4, 2, (1, 1, 1), "multires")])   # an octant whose first coarser cube starts at the volume's end
def test_tasks_and_read_cache_listed_in_arrays_agree_with_each_blocks_bounds(shape, chunk, lods, voxel, fmt):
    """``Plan.tasks`` and ``read_cache_bytes`` work on all blocks at once (in arrays: a
    1.1-teravoxel volume's 620,978 tasks took 10.6 s block by block). They list what the
    per-block geometry that ``mesh_block`` reads gives: each block in order of its voxels
    inside the volume (ties in row order), its octants that hold a cube touching the volume,
    then the coarse tasks; the cache holds the most storage chunks one block's reads touch."""
    import dataclasses

    from gpumesh.pipeline import COARSE, MeshOptions, Plan, read_cache_bytes
    from gpumesh.volume import open_volume

    plan = Plan.make(shape, MeshOptions(chunk_size=chunk, max_lods=lods, format=fmt), voxel)
    # block_bounds as its docstring gives it, block by block: a halo of 2**(L-1) below, cut a halo
    # past the volume's last coarsest voxel (tasks and read_cache_bytes ask it for all blocks at once)
    halo = 1 << (plan.lods - 1)
    for b in plan.blocks():
        start, stop = plan.block_bounds(b)
        assert start.tolist() == [i * plan.block - halo for i in b]
        assert stop.tolist() == [min(i * plan.block + plan.block, (-(-n // halo) + 1) * halo) for i, n in zip(b, shape)]
    inside = [int(np.prod([max(0, min((i + 1) * plan.block, n) - i * plan.block) for i, n in zip(b, shape)]))
              for b in plan.blocks()]
    assert plan.voxels_in_volume(plan.block_array()).tolist() == inside
    blocks = [b for _, b in sorted(zip(inside, plan.blocks()), key=lambda vb: vb[0], reverse=True)]
    if plan.lods == 1:
        want = [(b, None) for b in blocks]
    else:
        reach = 1 << (plan.lods - 2)
        want = [(b, k) for b in blocks for k in range(8)
                if all(g1 - g0 >= 2 and g0 + 1 - reach < n
                       for g0, g1, n in zip(*plan.octant_bounds(b, k), shape))]
        want += [(b, COARSE) for b in blocks]
    got = plan.tasks()
    assert got == want
    assert all(type(v) is int for b, k in got for v in b + ((k,) if isinstance(k, int) else ()))
    assert plan.block_array().tolist() == [list(b) for b in plan.blocks()]

    storage = (7, 5, 3)
    vol = dataclasses.replace(open_volume(np.zeros(shape, np.uint8), voxel_size=voxel), _chunk_shape=storage)
    most = 0
    for b in plan.blocks():
        start, stop = plan.block_bounds(b)
        lo, hi = np.maximum(start, 0), np.minimum(stop, shape)
        if np.all(hi > lo):
            most = max(most, int(np.prod((hi - 1) // storage - lo // storage + 1)))
    assert read_cache_bytes(vol, plan) == most * int(np.prod(storage)) > 0


@pytest.mark.parametrize("shape, chunk, lods", [((45, 38, 51), 8, 3), ((30, 23, 41), 8, 2), ((100, 9, 17), 4, 4)])
def test_every_task_of_a_volume_without_background_has_work(shape, chunk, lods):
    """A task is made only for a part of a block that holds some of the volume: in a volume
    without background every task meshes a fragment (the volume's faces at least) or counts
    voxels, cut border blocks included, while their parts all past the volume get no task."""
    from gpumesh.backend import CPUBackend
    from gpumesh.pipeline import MeshOptions, Plan, mesh_block, unpack_block_header
    from gpumesh.volume import open_volume

    options = MeshOptions(chunk_size=chunk, max_lods=lods)
    vol = open_volume(np.ones(shape, np.uint8), voxel_size=(1, 1, 1))
    plan = Plan.make(shape, options)
    backend = CPUBackend()
    for b, part in plan.tasks():
        index, labels, _, _ = unpack_block_header(mesh_block(vol, plan, options, b, backend, part))
        assert len(index) or len(labels), (b, part)


def test_lods_past_the_one_that_spans_the_volume_change_nothing_but_the_blocks(crop, tmp_path):
    """The plan stops at the LOD whose single node spans the volume (LOD 0 nodes are
    0 .. n // chunk): more LODs gave no segment another LOD and the same fragments, in blocks
    twice as wide per LOD (--max-lods 10 on the 512^3 volume ran out of memory)."""
    from gpumesh import run_mesh
    from gpumesh.pipeline import MeshOptions, Plan

    from conftest import tree_files

    plan = Plan.make((512, 512, 512), MeshOptions(max_lods=10))
    assert (plan.lods, plan.block, plan.grid) == (5, 1024, (1, 1, 1))          # 512 // 64 = 8: 4 bits
    assert Plan.make((512, 512, 512), MeshOptions(max_lods=3)).lods == 3
    assert Plan.make((512, 511, 100), MeshOptions(max_lods=10, num_lods=7)).lods == 7
    assert Plan.make((511, 63, 20), MeshOptions(max_lods=10)).lods == 4        # 511 // 64 = 7: 3 bits
    assert Plan.make((63, 63, 63), MeshOptions(max_lods=10)).lods == 1
    assert Plan.make((512, 512, 512), MeshOptions(max_lods=10, format="legacy")).lods == 1
    labels = np.ascontiguousarray(crop[:64, :48, :40])
    outputs = []
    for lods in (4, 9):
        dest = tmp_path / f"lods{lods}"
        options = MeshOptions(chunk_size=16, max_lods=lods)
        assert Plan.make(labels.shape, options).lods == 4
        summary = run_mesh(labels, str(dest), options=options, voxel_size=VOXEL_SIZE, workers=1)
        assert len(summary.triangles_per_lod) == 4 and summary.triangles_per_lod[3] > 0
        outputs.append(tree_files(dest))
    assert outputs[0] == outputs[1]


def test_each_lods_voxel_size_is_reported(crop, tmp_path):
    """The summary (and the CLI's LOD lines) give each LOD's voxel size in nm: halved along x
    and y only while the voxel is anisotropic, along every axis at the real volume's
    32x32x40 nm; the manifests' ``vertex_offsets`` are minus half of it, in LOD 0 voxels."""
    import subprocess

    from conftest import cli_command, write_zarr
    from gpumesh.pipeline import MeshOptions, run_mesh

    labels = np.ascontiguousarray(crop[:64, :64, :32])
    options = MeshOptions(chunk_size=8, max_lods=4)
    got = run_mesh(labels, str(tmp_path / "a"), options=options, voxel_size=(4, 4, 40), workers=1)
    assert got.voxel_size_per_lod == [[4, 4, 40], [8, 8, 40], [16, 16, 40], [32, 32, 40]]
    src = open_mesh(str(tmp_path / "a"))
    seg = max(src.segment_ids(), key=lambda s: src.manifest(s).num_lods)
    m = src.manifest(seg)
    assert m.num_lods == 4 and m.vertex_offsets.tolist() == [[-0.5, -0.5, -0.5], [-1, -1, -0.5], [-2, -2, -0.5],
                                                              [-4, -4, -0.5]]
    got = run_mesh(labels, str(tmp_path / "b"), options=options, voxel_size=VOXEL_SIZE, workers=1)
    assert got.voxel_size_per_lod == [[32, 32, 40], [64, 64, 80], [128, 128, 160], [256, 256, 320]]
    write_zarr(tmp_path / "v.zarr", labels)
    r = subprocess.run([*cli_command(), "mesh", str(tmp_path / "v.zarr"), str(tmp_path / "c"), "--voxel-size",
                        "4,4,40", "--chunk-size", "8", "--max-lods", "4", "--workers", "1", "--quiet"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lods = [line for line in r.stdout.splitlines() if line.startswith("LOD ")]
    assert [line.split("(")[1] for line in lods] == ["4x4x40 nm voxels)", "8x8x40 nm voxels)",
                                                     "16x16x40 nm voxels)", "32x32x40 nm voxels)"]


def _fragments_by_node(src, segment_id: int, shift_voxels) -> dict:
    """{(lod, x, y, z): Draco bytes} of a segment, node positions moved by ``shift_voxels``."""
    m = src.manifest(segment_id)
    data = src.fragment_data(segment_id)
    assert len(data) == m.total_bytes
    out = {}
    for lod, ranges in enumerate(m.fragment_byte_ranges()):
        shift = np.asarray(shift_voxels, dtype=np.int64) // (m.chunk_shape.astype(np.int64) << lod)
        for p, (start, stop) in zip(m.fragment_positions[lod].astype(np.int64), ranges.tolist()):
            out[(lod, *(p + shift))] = data[start:stop]
    return out


def test_each_tile_of_a_tiled_volume_is_meshed_as_if_alone(crop, tmp_path):
    # A segment's fragments depend on its own labels only, not on the segments around it nor on
    # where in the volume it lies (at shifts of whole coarsest nodes): in 2x2x2 tiles of a crop,
    # each tile's IDs shifted past the previous tile's (bench/tiled.py, the 1024^3 benchmark
    # volume), every tile's segments must have the crop's own fragments, byte for byte, at node
    # positions moved by the tile's offset, and the same manifest header.  The neighbours of a
    # tile's border segments are other tiles' segments here and background in the crop.
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))
    from tiled import tile_volume

    from gpumesh.pipeline import MeshOptions, run_mesh

    tile = np.ascontiguousarray(crop[:64, :64, :64])
    options = MeshOptions(chunk_size=16, max_lods=3)  # coarsest node: 64 voxels, one tile
    run_mesh(tile, str(tmp_path / "alone"), options=options, voxel_size=VOXEL_SIZE, workers=1)
    run_mesh(tile_volume(tile, 2), str(tmp_path / "tiled"), options=options, voxel_size=VOXEL_SIZE,
             workers=1)
    alone, tiled = open_mesh(str(tmp_path / "alone")), open_mesh(str(tmp_path / "tiled"))
    ids = alone.segment_ids()
    step = int(tile.max()) + 1
    assert len(tiled.segment_ids()) == 8 * len(ids) and len(ids) > 20
    for t in range(8):
        offset = np.array([t // 4, (t // 2) % 2, t % 2]) * 64
        for s in ids:
            a, b = alone.manifest(s), tiled.manifest(s + t * step)
            assert a.num_lods == b.num_lods and np.array_equal(a.lod_scales, b.lod_scales)
            assert np.array_equal(a.vertex_offsets, b.vertex_offsets)
            assert np.array_equal(a.grid_origin, b.grid_origin)
            assert (_fragments_by_node(alone, s, offset) == _fragments_by_node(tiled, s + t * step, 0)), \
                f"tile {t}, segment {s}"


def test_fragments_do_not_depend_on_the_block_layout(crop, tmp_path):
    """A LOD's fragments are the same whatever ``max_lods`` (blocks of 32 or 64 voxels here,
    and 128 at four LODs), byte for byte: a piece's decimation looks at its own voxels only
    (``thin_vertices``), so where a block begins changes nothing.  Before, the thin-spot test
    took the voxels past a block as outside and locked the vertices next to its high faces:
    325 of a 96^3 crop's LOD 0 fragments differed between 2 and 3 LODs."""
    from gpumesh.pipeline import MeshOptions, Plan, run_mesh

    labels = np.ascontiguousarray(crop[:96, :80, :72])
    srcs = {}
    for lods in (2, 3, 4):
        options = MeshOptions(chunk_size=16, max_lods=lods)
        assert Plan.make(labels.shape, options).block == 16 << (lods - 1)
        run_mesh(labels, str(tmp_path / f"lods{lods}"), options=options, voxel_size=VOXEL_SIZE, workers=1)
        srcs[lods] = open_mesh(str(tmp_path / f"lods{lods}"))
    ids = srcs[2].segment_ids()
    assert len(ids) > 30 and all(np.array_equal(srcs[n].segment_ids(), ids) for n in (3, 4))
    compared = 0
    for s in ids:
        frags = {n: _fragments_by_node(src, s, 0) for n, src in srcs.items()}
        for lod in (0, 1):
            want = {k: v for k, v in frags[2].items() if k[0] == lod}
            for n in (3, 4):
                assert {k: v for k, v in frags[n].items() if k[0] == lod} == want, (s, lod, n)
            compared += len(want)
    assert compared > 500


def test_ten_bit_output_is_the_sixteen_bit_output_rescaled(crop, crop_medium, tmp_path):
    """``vertex_quantization_bits=10`` keeps every vertex and triangle of the default 16 bits.

    Vertices lie on the half-voxel lattice, which both depths hold exactly, so a 10-bit
    fragment is the 16-bit one with every position divided by 2**6 (the node's far face,
    clipped to 2**bits - 1, excepted): the same fragments, triangles and decoded triangle
    order, at 1/64 of the precision of the decode (see :mod:`gpumesh.encode`).
    """
    from conftest import _mesh_crop

    dest10 = tmp_path / "bits10"
    summary10 = _mesh_crop(crop, dest10, vertex_quantization_bits=10)
    dest16, summary16 = crop_medium
    assert summary10.triangles_per_lod == summary16.triangles_per_lod
    assert validate(str(dest10)).ok
    src10, src16 = open_mesh(str(dest10)), open_mesh(str(dest16))
    assert src10.vertex_quantization_bits == 10
    ids = src16.segment_ids()
    assert src10.segment_ids() == ids
    compared = 0
    for seg in ids:
        m10, m16 = src10.manifest(seg), src16.manifest(seg)
        assert m10.num_lods == m16.num_lods
        for lod in range(m16.num_lods):
            for f10, f16 in zip(load_fragments(src10, seg, lod), load_fragments(src16, seg, lod), strict=True):
                assert np.array_equal(f10["position"], f16["position"])
                assert f10["placeholder"] == f16["placeholder"]
                if f16["placeholder"]:
                    continue
                q10, q16 = f10["positions_q"], f16["positions_q"]
                np.testing.assert_array_equal(f10["faces"], f16["faces"])
                np.testing.assert_array_equal(np.where(q16 == (1 << 16) - 1, (1 << 10) - 1, q16 >> 6), q10)
                assert not (q16[q16 != (1 << 16) - 1] % 64).any()
                compared += len(q16)
    assert compared > 0


def test_dust_threshold_drops_small_segments_whole(crop, crop_medium, tmp_path):
    """Segments under the dust threshold (voxels in the whole volume, here the crop) get no files
    and no segment properties entry; every other segment keeps its bytes."""
    from gpumesh import storage
    from gpumesh.pipeline import MeshOptions, run_mesh
    from gpumesh.sharding import ShardingOptions

    from conftest import tree_files

    ids, counts = np.unique(crop[crop != 0], return_counts=True)
    threshold = int(np.median(counts))
    kept, dust = ids[counts >= threshold], ids[counts < threshold]
    assert len(kept) > 10 and len(dust) > 10
    # the count is over the volume, not per octant (a task): some kept segments have fewer
    # voxels than the threshold in every octant of the crop
    octants = [crop[x:x + 64, y:y + 64, z:z + 64] for x in (0, 64) for y in (0, 64) for z in (0, 64)]
    most = np.max([[np.count_nonzero(o == s) for o in octants] for s in kept[:200].tolist()], axis=1)
    assert (most < threshold).any()
    dest = tmp_path / "dust"
    summary = run_mesh(crop, str(dest), options=MeshOptions(chunk_size=32, max_lods=3, dust_threshold=threshold),
                       voxel_size=VOXEL_SIZE, voxel_offset=CROP_START, workers=1)
    assert (summary.segments, summary.dust_segments) == (len(kept), len(dust))
    files, full = tree_files(dest), tree_files(crop_medium[0])
    for s in kept.tolist():
        assert files[f"{s}.index"] == full[f"{s}.index"] and files[str(s)] == full[str(s)]
    assert not any(f"{s}.index" in files or str(s) in files for s in dust.tolist())
    info = storage.read_json(storage.open_kvstore(str(dest)), "segment_properties/info")
    assert [int(s) for s in info["inline"]["ids"]] == kept.tolist()
    assert info["inline"]["properties"][0]["values"] == counts[counts >= threshold].tolist()
    report = validate(str(dest))
    assert report.ok and not report.warnings and report.num_segments == len(kept)
    # sharded, with the workers writing the shards: the same segments as one process
    opts = MeshOptions(chunk_size=32, dust_threshold=threshold, sharding=ShardingOptions(shard_bits=1))
    one, two = tmp_path / "one", tmp_path / "two"
    run_mesh(crop, str(one), options=opts, workers=1)
    run_mesh(crop, str(two), options=opts, workers=2)
    assert tree_files(one) == tree_files(two)
    report = validate(str(two))
    assert report.ok and not report.warnings and report.num_segments == len(kept)


def _holds_the_full_jobs_meshes_of(dest, full_dest, ids, counts, kept) -> None:
    """``dest`` (unsharded) holds the files of the full job's output ``full_dest`` for the
    segments ``kept`` and no others, its segment properties list just them with their voxel
    counts (``counts`` of the crop's ``ids``), and it passes ``validate`` without a warning."""
    from gpumesh import storage

    from conftest import tree_files

    files, full = tree_files(dest), tree_files(full_dest)
    meshes = {k: v for k, v in files.items() if not k.startswith(("info", "segment_properties"))}
    assert meshes == {k: full[k] for s in kept.tolist() for k in (f"{s}.index", str(s))}
    info = storage.read_json(storage.open_kvstore(str(dest)), "segment_properties/info")
    assert [int(s) for s in info["inline"]["ids"]] == kept.tolist()
    assert info["inline"]["properties"][0]["values"] == counts[np.isin(ids, kept)].tolist()
    report = validate(str(dest))
    assert report.ok and not report.warnings and report.num_segments == len(kept)


def test_selected_segments_get_the_bytes_of_the_full_job(crop, crop_medium, tmp_path):
    """``MeshOptions.segments`` meshes only the selected segments, each with the bytes the full
    job gives it (its neighbours still shape its coarse LODs); absent IDs are a warning; the
    sharded output on 2 workers equals 1 worker's; a resumed run must select the same."""
    import dataclasses

    from gpumesh import SegmentsNotFoundWarning
    from gpumesh.errors import DestinationExistsError
    from gpumesh.pipeline import MeshOptions, run_mesh
    from gpumesh.sharding import ShardingOptions

    from conftest import tree_files

    ids, counts = np.unique(crop[crop != 0], return_counts=True)
    order = np.argsort(counts)
    # the 3 largest segments, 3 of 1-10 voxels, and some in between (one of them in one octant)
    chosen = np.r_[ids[order[-3:]], ids[order[:3]], ids[order[len(order) // 2::len(order) // 7]]]
    octant = crop[:64, :64, :64]
    alone = [s for s in ids.tolist() if np.count_nonzero(octant == s) == np.count_nonzero(crop == s)]
    chosen = np.unique(np.r_[chosen, alone[len(alone) // 2]]).astype(np.uint64)
    absent = [int(ids.max()) + 17, 2**64 - 1]
    selection = [int(s) for s in chosen[::-1]] + absent          # any order, absent IDs too
    opts = MeshOptions(chunk_size=32, max_lods=3, segments=selection)
    dest = tmp_path / "chosen"
    with pytest.warns(SegmentsNotFoundWarning, match=f"2 of the {len(chosen) + 2} selected segments are not in "
                                                     f"the volume: {absent[0]}, {absent[1]}"):
        summary = run_mesh(crop, str(dest), options=opts, voxel_size=VOXEL_SIZE, voxel_offset=CROP_START, workers=1)
    assert (summary.segments, summary.missing_segments) == (len(chosen), 2)
    _holds_the_full_jobs_meshes_of(dest, crop_medium[0], ids, counts, chosen)
    # sharded, 1 and 2 workers (the workers build the shards); a resume must select the same
    opts = dataclasses.replace(opts, segments=chosen, sharding=ShardingOptions(shard_bits=1))
    one, two = tmp_path / "one", tmp_path / "two"
    run_mesh(crop, str(one), options=opts, voxel_size=VOXEL_SIZE, voxel_offset=CROP_START, workers=1)
    run_mesh(crop, str(two), options=opts, voxel_size=VOXEL_SIZE, voxel_offset=CROP_START, workers=2)
    assert tree_files(one) == tree_files(two)
    # an interrupted run resumes with the same selection (in any order) only
    cut = tmp_path / "cut"

    def stop(done, total):
        if done == 3:
            raise KeyboardInterrupt

    kw = dict(voxel_size=VOXEL_SIZE, voxel_offset=CROP_START, workers=1)
    with pytest.raises(KeyboardInterrupt):
        run_mesh(crop, str(cut), options=opts, progress=stop, **kw)
    with pytest.raises(DestinationExistsError, match="different options"):
        run_mesh(crop, str(cut), options=dataclasses.replace(opts, segments=chosen[1:]), resume=True, **kw)
    summary = run_mesh(crop, str(cut), options=dataclasses.replace(opts, segments=chosen[::-1]), resume=True, **kw)
    assert summary.tasks_resumed == 3 and tree_files(cut) == tree_files(one)
    src = open_mesh(str(two))
    assert sorted(src.segment_ids()) == chosen.tolist()
    for s in chosen.tolist():
        for lod in range(src.manifest(s).num_lods):
            got, want = load_mesh(src, s, lod=lod), load_mesh(open_mesh(str(crop_medium[0])), s, lod=lod)
            assert np.array_equal(got.faces, want.faces) and np.array_equal(got.vertices, want.vertices)


def test_excluded_segments_leave_the_others_the_bytes_of_the_full_job(crop, crop_medium, tmp_path):
    """``MeshOptions.exclude_segments`` leaves out the excluded segments (no files, no segment
    properties entry) and every other segment keeps the bytes of the full job: the excluded
    ones still shape their neighbours' surfaces and coarse LODs, where igneous masks them to
    background.  Sharded on 2 workers, the output equals 1 worker's."""
    from gpumesh.pipeline import MeshOptions, run_mesh
    from gpumesh.sharding import ShardingOptions

    from conftest import tree_files

    ids, counts = np.unique(crop[crop != 0], return_counts=True)
    order = np.argsort(counts)
    # the 3 largest segments (those a user would leave out: glia, a merger) and every 9th other
    excluded = np.unique(np.r_[ids[order[-3:]], ids[::9]]).astype(np.uint64)
    kept = np.setdiff1d(ids, excluded)
    opts = MeshOptions(chunk_size=32, max_lods=3, exclude_segments=[int(s) for s in excluded] + [2**64 - 1])
    dest = tmp_path / "others"
    summary = run_mesh(crop, str(dest), options=opts, voxel_size=VOXEL_SIZE, voxel_offset=CROP_START, workers=1)
    assert (summary.segments, summary.missing_segments) == (len(kept), 0)
    _holds_the_full_jobs_meshes_of(dest, crop_medium[0], ids, counts, kept)
    # the largest excluded segment touches kept ones, whose meshes stay those of the full job
    big = int(ids[order[-1]])
    touching = np.unique(crop[1:][crop[:-1] == big])
    assert np.isin(touching, kept).sum() > 3
    # sharded, 1 and 2 workers (the workers build the shards), with a selection too
    for name, extra in [("all", {}), ("chosen", dict(segments=ids[::2]))]:
        sharded = MeshOptions(chunk_size=32, exclude_segments=excluded, sharding=ShardingOptions(shard_bits=1), **extra)
        one, two = tmp_path / f"{name}1", tmp_path / f"{name}2"
        run_mesh(crop, str(one), options=sharded, voxel_size=VOXEL_SIZE, voxel_offset=CROP_START, workers=1)
        run_mesh(crop, str(two), options=sharded, voxel_size=VOXEL_SIZE, voxel_offset=CROP_START, workers=2)
        assert tree_files(one) == tree_files(two)
        want = np.setdiff1d(ids[::2], excluded) if extra else kept
        assert sorted(open_mesh(str(two)).segment_ids()) == want.tolist()


def test_bounds_mesh_the_box_as_a_volume_of_its_own(real_zarr, crop, crop_medium, tmp_path):
    """``bounds`` on the whole real volume gives the bytes of the crop array meshed at its offset
    (segments cut by the box closed at its faces); the CLI's ``--bounds`` on 2 workers too."""
    import subprocess

    from gpumesh.pipeline import MeshOptions, run_mesh
    from gpumesh.sharding import ShardingOptions

    from conftest import CROP_SIZE, cli_command, tree_files

    box = tuple(CROP_START) + tuple(s + CROP_SIZE for s in CROP_START)
    dest = tmp_path / "bounds"
    summary = run_mesh(str(real_zarr), str(dest), options=MeshOptions(chunk_size=32, max_lods=3),
                       voxel_size=VOXEL_SIZE, bounds=box, workers=1)
    assert summary.segments == crop_medium[1].segments
    assert tree_files(dest) == tree_files(crop_medium[0])
    # CLI: a box reaching past the volume's end is clipped to it
    small = (448, 448, 480, 600, 600, 600)
    cli = tmp_path / "cli"
    r = subprocess.run(cli_command() + ["mesh", str(real_zarr), str(cli), "--voxel-size", "32,32,40", "--bounds",
                                        ",".join(map(str, small)), "--workers", "2", "--quiet"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    api = tmp_path / "api"
    run_mesh(crop_of(real_zarr, (448, 448, 480), (512, 512, 512)), str(api), voxel_size=VOXEL_SIZE,
             voxel_offset=(448, 448, 480), options=MeshOptions(sharding=ShardingOptions()), workers=1)
    assert tree_files(cli) == tree_files(api)
    r = subprocess.run(cli_command() + ["mesh", str(real_zarr), str(tmp_path / "x"), "--bounds", "600,0,0,700,9,9"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "hold no voxel" in r.stderr and not (tmp_path / "x").exists(), r.stderr


def crop_of(real_zarr, start, stop) -> np.ndarray:
    import tensorstore as ts

    t = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(real_zarr)}}).result()
    return t[start[0]:stop[0], start[1]:stop[1], start[2]:stop[2]].read().result()


def _spec_manifest(data: bytes) -> dict:
    """A multi-resolution manifest parsed as the spec lays it out (independently of
    gpumesh.reader): chunk_shape, grid_origin, num_lods, lod_scales, vertex_offsets
    [num_lods, 3], num_fragments_per_lod, then per LOD fragment_positions as a C-order
    [3, n] array (every x, then every y, then every z) and fragment_offsets (sizes)."""
    import struct

    chunk = struct.unpack_from("<3f", data, 0)
    origin = struct.unpack_from("<3f", data, 12)
    (num_lods,) = struct.unpack_from("<I", data, 24)
    at = 28
    scales = struct.unpack_from(f"<{num_lods}f", data, at)
    at += 4 * num_lods
    offsets = np.frombuffer(data, "<f4", 3 * num_lods, at).reshape(num_lods, 3)
    at += 12 * num_lods
    counts = np.frombuffer(data, "<u4", num_lods, at)
    at += 4 * num_lods
    lods = []
    for n in counts.tolist():
        positions = np.frombuffer(data, "<u4", 3 * n, at).reshape(3, n).T   # [3, n] in the file
        at += 12 * n
        sizes = np.frombuffer(data, "<u4", n, at)
        at += 4 * n
        lods.append((positions, sizes))
    assert at == len(data), "bytes past the manifest"
    return dict(chunk=np.array(chunk), origin=np.array(origin), scales=scales, offsets=offsets, lods=lods)


def test_manifests_read_by_the_spec_put_every_fragment_on_its_segment(crop, crop_medium):
    """Manifests and fragments read as the spec says, with DracoPy and no gpumesh reader: every
    fragment's size adds up to the data file, nodes are in Z-order, and each LOD 0 vertex, at
    ``grid_origin + vertex_offset + chunk * (position + x / (2**bits - 1))``, lies on its
    segment's voxel bounding box (a layout read back by gpumesh's own reader would not show
    fragment positions written [n, 3] instead of [3, n])."""
    import DracoPy

    def zorder_key(p):   # x, y, z bits interleaved, x lowest (the client's order)
        return sum(((int(c) >> b) & 1) << (3 * b + a) for b in range(21) for a, c in enumerate(p))

    dest, _ = crop_medium
    info = json.loads((dest / "info").read_text())
    bits = info["vertex_quantization_bits"]
    # stored model space is voxels: the transform scales them to nm, and LOD k, meshed from
    # labels downsampled 2**k times, has the scale 2**k there (what the client compares with
    # the screen's resolution to pick a LOD; a wrong one draws the wrong LOD at every zoom)
    assert info["transform"] == [VOXEL_SIZE[0], 0, 0, 0, 0, VOXEL_SIZE[1], 0, 0, 0, 0, VOXEL_SIZE[2], 0]
    assert info["lod_scale_multiplier"] == 1.0
    several = 0
    for seg in sampled_segments(crop, 8):
        m = _spec_manifest((dest / f"{seg}.index").read_bytes())
        data = (dest / str(seg)).read_bytes()
        assert sum(int(s.sum()) for _, s in m["lods"]) == len(data)
        assert list(m["scales"]) == [2.0 ** k for k in range(len(m["lods"]))]
        np.testing.assert_array_equal(m["origin"], CROP_START)
        vox = np.argwhere(crop == seg) + np.array(CROP_START)
        lo, hi = vox.min(axis=0), vox.max(axis=0) + 1   # the segment's voxels span [lo, hi)
        at = 0
        for k, (positions, sizes) in enumerate(m["lods"]):
            keys = [zorder_key(p) for p in positions.tolist()]
            assert keys == sorted(keys), f"segment {seg} LOD {k}: nodes not in Z-order"
            several += k == 0 and len(sizes) > 1
            for pos, size in zip(positions, sizes.tolist()):
                frag = data[at:at + size]
                at += size
                if k > 0 or size == 0:
                    continue
                x = np.asarray(DracoPy.decode(frag).points, dtype=np.float64)
                if len(x) < 3:
                    continue   # a placeholder
                assert x.min() >= 0 and x.max() < 2 ** bits
                p = m["origin"] + m["offsets"][k] + m["chunk"] * (pos + x / (2 ** bits - 1))
                assert (p >= lo - 1e-3).all() and (p <= hi + 1e-3).all(), (
                    f"segment {seg} fragment {pos.tolist()}: vertices {p.min(0)}-{p.max(0)} off its voxels {lo}-{hi}")
    assert several >= 4   # several LOD 0 fragments per segment: a layout error would show


@pytest.mark.parametrize("kind", ["multires", "sharded", "legacy"])
def test_data_is_written_before_what_points_at_it_and_info_last(crop, tmp_path, monkeypatch, kind):
    """What makes a reader trust a file comes after it: a segment's fragment data is written
    (whole) before its manifest, and ``info``, which makes the directory a mesh, after every
    other file of the output (module docs of :mod:`gpumesh.writer`).  The writes are watched
    through :mod:`gpumesh.storage` (one worker, so all in this process): a call returns only
    when its writes are done, so keys of an earlier call are on disk before a later call."""
    from gpumesh import storage
    from gpumesh.pipeline import SCRATCH, MeshOptions, run_mesh
    from gpumesh.sharding import ShardingOptions

    calls: list[list[str]] = []   # the final (not scratch) keys of each write call, in order
    real_write, real_many = storage.write, storage.write_many

    def write(kv, key, value):
        real_write(kv, key, value)
        if not key.startswith(SCRATCH):
            calls.append([key])

    def write_many(kv, items, sync=True):
        items = list(items)
        real_many(kv, items, sync)
        calls.append([k for k, _ in items if not k.startswith(SCRATCH)])

    monkeypatch.setattr(storage, "write", write)
    monkeypatch.setattr(storage, "write_many", write_many)
    options = MeshOptions(chunk_size=16, max_lods=3, format="legacy" if kind == "legacy" else "multires",
                          sharding=ShardingOptions(shard_bits=1, minishard_bits=1) if kind == "sharded" else None)
    run_mesh(crop[:64, :64, :48], str(tmp_path / "m"), options=options, voxel_size=VOXEL_SIZE,
             voxel_offset=CROP_START, workers=1)
    done_at = {}
    for i, keys in enumerate(calls):
        for key in keys:
            assert key not in done_at, f"{key} written twice"
            done_at[key] = i
    on_disk = {str(p.relative_to(tmp_path / "m")) for p in (tmp_path / "m").rglob("*") if p.is_file()}
    assert set(done_at) == on_disk, "every file of the output goes through the watched writes"
    last = max(done_at.values())
    assert [k for k, i in done_at.items() if i == last] == ["info"], "info alone, after every other file"
    if kind == "sharded":
        assert any(k.endswith(".shard") for k in done_at)
        return
    manifests = [k for k in done_at if (k.endswith(".index") if kind == "multires" else k.endswith(":0"))]
    assert len(manifests) > 10
    for manifest in manifests:
        label = manifest.split(".")[0] if kind == "multires" else manifest.split(":")[0]
        data = [label] if kind == "multires" else [k for k in done_at if k.startswith(f"{label}:0:")]
        assert data, f"{manifest}: no fragment data"
        assert max(done_at[k] for k in data) < done_at[manifest], f"{manifest} written before its fragment data"
