"""The main job on random label volumes and random options, checked segment by segment.

Each case draws a small volume (any shape, thin ones included, every label dtype, IDs up to
2**64 - 1) and a set of options (chunk size, LODs, preset, quantization bits, format,
sharding, voxel size and offset; in a quarter of the cases a dust threshold), meshes it in this
process, and checks every segment of the output, not a sample:

* ``gpumesh validate`` passes without warnings; the segment IDs are exactly the volume's
  non-zero labels with at least the dust threshold's voxels, and the segment properties give
  each one's voxel count;
* every LOD of every segment is a closed, consistently oriented surface (the meshes close at
  the volume border: past it every voxel is background);
* LOD 0 with ``--quality high`` has exactly the label boundary's face centres as vertices,
  and otherwise lies within 1 voxel of the boundary; LOD ``k`` lies within
  ``test_mesh_real.coarse_lod_bound(k)`` voxels of it (``2**k`` up to LOD 2, a little more
  beyond); every LOD's vertices lie on that LOD's lattice (its voxels are anisotropic where
  the random voxel size is: ``--downsampling auto``); the coarsest LOD has triangles.

The cases are seeded, so a failure names the seed that reproduces it
(``GPUMESH_RANDOM_SEEDS=17 pytest tests/test_random_volumes.py``).  The default run checks a
few cases, the first two also on 2 workers against 1, byte for byte, and the third also
interrupted after a random number of tasks and resumed, which must give the same bytes;
``GPUMESH_RANDOM_CASES=N`` checks N (a longer campaign, not for CI), and
``GPUMESH_RANDOM_WORKERS=1`` / ``GPUMESH_RANDOM_RESUME=1`` do those checks on every case, as
``GPUMESH_RANDOM_BOUNDS=1`` does the fourth's: meshing a random box of the volume (``bounds``)
gives the bytes of the box's array meshed at its offset, ``GPUMESH_RANDOM_SEGMENTS=1`` the
fifth's: meshing a random selection of the segments (``segments``) gives each the bytes of the
full job, and ``GPUMESH_RANDOM_WAVES=1`` the sixth's: the assembly's index capped at a few
entries (so written in waves, its entries from a temporary file grouped by wave, from that
file read whole, or from the task results' headers again) gives the same bytes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings

import numpy as np
import pytest

from gpumesh import SegmentsNotFoundWarning
from gpumesh.pipeline import MeshOptions, Plan, run_mesh
from gpumesh.reader import load_fragments, load_mesh, open_mesh
from gpumesh.sharding import ShardingOptions
from gpumesh.validate import validate

from conftest import tree_files
from test_mesh_real import assert_closed_oriented, boundary_faces, coarse_lod_bound, distance_to_faces

DTYPES = ["uint8", "uint16", "uint32", "uint64", "int16", "int32", "int64"]


def _seeds() -> list[int]:
    if os.environ.get("GPUMESH_RANDOM_SEEDS"):
        return [int(s) for s in os.environ["GPUMESH_RANDOM_SEEDS"].split(",")]
    return list(range(int(os.environ.get("GPUMESH_RANDOM_CASES", "6"))))


def _worker_seeds() -> set[int]:
    """Cases also run on 2 workers: seeds 0 and 1 (unsharded and sharded), or every case with
    ``GPUMESH_RANDOM_WORKERS=1``."""
    return set(_seeds()) if os.environ.get("GPUMESH_RANDOM_WORKERS") == "1" else {0, 1}


def _bounds_seeds() -> set[int]:
    """Cases also meshed within a random box: seed 3, or every case with ``GPUMESH_RANDOM_BOUNDS=1``."""
    return set(_seeds()) if os.environ.get("GPUMESH_RANDOM_BOUNDS") == "1" else {3}


def _segments_seeds() -> set[int]:
    """Cases also meshed for a random selection of segments: seed 4, or every case with
    ``GPUMESH_RANDOM_SEGMENTS=1``."""
    return set(_seeds()) if os.environ.get("GPUMESH_RANDOM_SEGMENTS") == "1" else {4}


def _waves_seeds() -> set[int]:
    """Cases also meshed with the assembly's index capped at a few entries: seed 5, or every
    case with ``GPUMESH_RANDOM_WAVES=1``."""
    return set(_seeds()) if os.environ.get("GPUMESH_RANDOM_WAVES") == "1" else {5}


def _resume_seeds() -> set[int]:
    """Cases also interrupted and resumed: seed 2, or every case with ``GPUMESH_RANDOM_RESUME=1``."""
    return set(_seeds()) if os.environ.get("GPUMESH_RANDOM_RESUME") == "1" else {2}


class _Interrupted(Exception):
    """Stands for a job stopped between two tasks (killed, out of time)."""


def random_labels(rng: np.random.Generator) -> np.ndarray:
    """A label volume (axes x, y, z) of random shape and dtype: Voronoi cells, some of them
    background, with single voxels and thin rods of other segments scattered over them."""
    shape = rng.integers(3, 41, size=3)
    if rng.random() < 0.2:
        shape[rng.integers(3)] = rng.integers(1, 3)   # a slab one or two voxels thick
    dtype = np.dtype(DTYPES[rng.integers(len(DTYPES))])
    n_cells = int(rng.integers(1, 12))
    seeds = rng.random((n_cells, 3)) * shape
    grid = np.stack(np.meshgrid(*(np.arange(s) + 0.5 for s in shape), indexing="ij"), axis=-1)
    d = ((grid[..., None, :] - seeds) ** 2).sum(axis=-1)
    cell = np.argmin(d, axis=-1) + 1
    background = rng.random(n_cells + 1) < 0.3
    background[0] = True
    cell[background[cell]] = 0
    if rng.random() < 0.25:
        # rough surfaces: every voxel one of a few labels at random, or a noisy mix of cells
        noise = rng.integers(0, int(rng.integers(2, 5)), size=cell.shape)
        cell = np.where(rng.random(cell.shape) < rng.choice([0.3, 1.0]), noise, cell)
    # speckle: single voxels of new segments, and rods one voxel thick along a random axis
    speckle = rng.random(cell.shape) < rng.choice([0.0, 0.002, 0.02])
    cell[speckle] = n_cells + 1 + np.arange(int(speckle.sum()))
    nxt = int(cell.max()) + 1
    for _ in range(int(rng.integers(0, 4))):
        a = int(rng.integers(3))
        p = [int(rng.integers(s)) for s in shape]
        lo, hi = sorted(int(v) for v in rng.integers(0, shape[a] + 1, size=2))
        idx = list(p)
        idx[a] = slice(lo, hi)
        cell[tuple(idx)] = nxt
        nxt += 1
    # map cell numbers to distinct IDs of the dtype, large ones included
    used = np.unique(cell[cell != 0])
    hi = np.iinfo(dtype).max
    if hi > 2**40 and rng.random() < 0.5:
        ids = np.array([hi - int(v) for v in rng.choice(2**20, size=len(used), replace=False)], dtype=np.uint64)
    else:
        top = min(hi, 2**31)
        if len(used) >= top:   # more cells than IDs (uint8): some segments get the same ID
            ids = np.arange(len(used)) % top + 1
        else:
            ids = rng.choice(top, size=len(used), replace=False) + 1
    lut = np.zeros(int(cell.max()) + 1, dtype=np.uint64)
    lut[used] = np.asarray(ids, dtype=np.uint64)
    return lut[cell].astype(dtype)


def random_options(rng: np.random.Generator) -> MeshOptions:
    chunk = int(rng.choice([4, 8, 16]))
    max_lods = int(rng.integers(1, 5))
    num_lods = None if rng.random() < 0.7 else int(rng.integers(1, max_lods + 1))
    fmt = "legacy" if rng.random() < 0.15 else "multires"
    sharding = None
    if fmt == "multires" and rng.random() < 0.5:
        sharding = ShardingOptions(
            hash=str(rng.choice(["murmurhash3_x86_128", "identity"])),
            preshift_bits=int(rng.integers(0, 3)), shard_bits=int(rng.integers(0, 3)),
            minishard_bits=int(rng.integers(0, 3)),
            minishard_index_encoding=str(rng.choice(["gzip", "raw"])),
            data_encoding=str(rng.choice(["raw", "gzip"])))
    quality = str(rng.choice(["low", "medium", "high"]))
    bits = int(rng.choice([10, 16]))
    if fmt == "legacy":
        bits = 16   # float32 positions; still drawn, so each seed keeps its case
    return MeshOptions(chunk_size=chunk, max_lods=max_lods, num_lods=num_lods, quality=quality,
                       vertex_quantization_bits=bits, format=fmt, sharding=sharding)


def assert_on_lod_lattice(v: np.ndarray, voxel: np.ndarray, error: float, what: str) -> None:
    """Every vertex (``v``: (n, 3), LOD 0 voxels from the voxel offset) is a marching-cubes
    vertex of its LOD's labels, whose voxels are ``voxel`` (3,) LOD 0 voxels: on one axis on a
    face between two of them (a multiple of ``voxel``), on the others at their centres (an odd
    multiple of ``voxel / 2``).  Decimated vertices are a subset of those.  ``error``: the
    decoding's error per axis (LOD 0 voxels); axes where it could hide the lattice are not
    checked."""
    half = 2 * v / voxel                      # integers: even on a face, odd at a centre
    near = np.rint(half)
    checked = 2 * error / voxel < 0.25
    assert np.abs(half - near)[:, checked].max(initial=0) <= 2 * error / voxel.min() + 1e-6, what
    if checked.all():
        faces = (near.astype(np.int64) % 2 == 0).sum(axis=1)
        assert np.all(faces == 1), f"{what}: {np.count_nonzero(faces != 1)} vertices off the LOD's lattice"


def _voxel_counts(dest) -> dict:
    with open(os.path.join(dest, "segment_properties", "info")) as fh:
        sp = json.load(fh)
    values = sp["inline"]["properties"][0]["values"]
    return {int(i): int(v) for i, v in zip(sp["inline"]["ids"], values)}


@pytest.mark.parametrize("seed", _seeds())
def test_random_volume(seed, tmp_path, unwelded_fragments, monkeypatch):
    rng = np.random.default_rng(seed)
    labels = random_labels(rng)
    options = random_options(rng)
    fmt = options.format
    voxel_size = np.round(rng.uniform(1, 50, size=3), 1)
    voxel_offset = rng.integers(-100, 100, size=3)
    what = (f"seed {seed}: shape {labels.shape} {labels.dtype}, chunk {options.chunk_size}, "
            f"max_lods {options.max_lods}, lods {options.num_lods}, {options.quality}, "
            f"{options.vertex_quantization_bits} bits, {fmt}, sharding {options.sharding}")
    dest = tmp_path / "out"
    ids, counts = np.unique(labels[labels != 0], return_counts=True)
    # a quarter of the cases drop the segments under a dust threshold, one of the voxel counts
    # (drawn from a generator of their own, so the cases' other draws stay as they were)
    dust_rng = np.random.default_rng([seed, 7])
    if dust_rng.random() < 0.25 and len(counts):
        options = dataclasses.replace(options, dust_threshold=int(dust_rng.choice(counts)))
        what += f", dust threshold {options.dust_threshold}"
    kept = counts >= options.dust_threshold
    ids, counts = ids[kept], counts[kept]
    present = ids.astype(np.uint64)
    if len(present) == 0:
        with pytest.warns(UserWarning):
            run_mesh(labels, str(dest), options=options, voxel_size=voxel_size, voxel_offset=voxel_offset,
                     workers=1)
        assert validate(str(dest)).ok, what
        return
    summary = run_mesh(labels, str(dest), options=options, voxel_size=voxel_size, voxel_offset=voxel_offset,
                       workers=1)
    # every fragment handed to the Draco encoder is welded (load_mesh welds what it joins, so
    # the checks below would not see a split vertex)
    assert not unwelded_fragments["unwelded"], (what, unwelded_fragments["unwelded"][:5])
    report = validate(str(dest))
    assert report.ok, (what, report.errors[:5])
    assert not report.warnings, (what, report.warnings[:5])
    src = open_mesh(str(dest))
    assert sorted(int(s) for s in src.segment_ids()) == sorted(int(s) for s in present), what
    assert summary.segments == len(present), what
    assert _voxel_counts(dest) == {int(i): int(c) for i, c in zip(ids.astype(np.uint64), counts)}, what

    plan = Plan.make(labels.shape, options, voxel_size)
    for seg in present:
        seg = int(seg)
        mask = labels == np.asarray(seg, dtype=np.uint64).astype(labels.dtype)
        centers, axes = boundary_faces(mask)
        num_lods = src.manifest(seg).num_lods if fmt == "multires" else 1
        if options.num_lods is not None:
            assert num_lods <= options.num_lods, what
        for k in range(num_lods):
            mesh = load_mesh(src, seg, lod=k)
            if k == num_lods - 1:
                assert len(mesh.faces) > 0, f"{what}: segment {seg} has no triangles at its coarsest LOD {k}"
            if len(mesh.faces) == 0:
                continue
            assert_closed_oriented(mesh, f"{what}: segment {seg} LOD {k}")
            v = np.asarray(mesh.vertices) / voxel_size - voxel_offset
            f = np.asarray(mesh.faces)
            area2 = np.linalg.norm(np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]]), axis=1)
            assert (area2 > 1e-6).all(), f"{what}: segment {seg} LOD {k}: zero-area triangles"
            if k == 0 and options.quality == "high":
                halves = np.round(v * 2) / 2
                assert np.abs(v - halves).max() < 2e-3 * options.chunk_size, f"{what}: segment {seg}"
                got = {tuple(r) for r in halves.tolist()}
                want = {tuple(r) for r in centers.tolist()}
                assert got == want, f"{what}: segment {seg}: {len(got - want)} stray vertices, " \
                                    f"{len(want - got)} boundary faces untouched"
            else:
                d = distance_to_faces(v, centers, axes)
                bound = 1.0 if k == 0 else coarse_lod_bound(k)
                # plus the decoding's error: the client divides by 2**bits - 1 where gpumesh
                # quantizes with 2**bits, up to chunk * 2**k / (2**bits - 1) voxels per axis
                step = options.chunk_size * 2.0 ** k / (2 ** options.vertex_quantization_bits - 1)
                bound += np.sqrt(3) * step
                assert d.max() <= bound, f"{what}: segment {seg} LOD {k}: {d.max():.3f} voxels off"
                assert_on_lod_lattice(v, 2 ** plan.shift(k), step, f"{what}: segment {seg} LOD {k}")
        if fmt == "multires" and num_lods > 1:
            assert any(not f["placeholder"] and len(f["faces"]) for f in load_fragments(src, seg, num_lods - 1))

    if seed in _resume_seeds() and summary.tasks > 1:
        # interrupted after a random number of tasks: nothing a reader would take for a mesh
        # (no info), and resume=True gives the uninterrupted bytes
        stop_after = int(rng.integers(1, summary.tasks))

        def interrupt(done, total):
            if done >= stop_after:
                raise _Interrupted

        cut = tmp_path / "cut"
        with pytest.raises(_Interrupted):
            run_mesh(labels, str(cut), options=options, voxel_size=voxel_size, voxel_offset=voxel_offset,
                     workers=1, progress=interrupt)
        assert not (cut / "info").exists() and not validate(str(cut)).ok, what
        again = run_mesh(labels, str(cut), options=options, voxel_size=voxel_size, voxel_offset=voxel_offset,
                         workers=1, resume=True)
        assert again.tasks_resumed == stop_after, what
        assert tree_files(cut) == tree_files(dest), what

    if seed in _bounds_seeds():
        # bounds: a random box (reaching past the volume at times, so clipped) gives the bytes of
        # the box's array meshed at its offset
        box_rng = np.random.default_rng([seed, 11])
        shape = np.array(labels.shape)
        lo = box_rng.integers(0, shape)
        hi = np.minimum(lo + box_rng.integers(1, shape + 3), shape + 2)
        part = labels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        kw = dict(options=options, voxel_size=voxel_size, workers=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)     # a box of background only
            run_mesh(labels, str(tmp_path / "bounds"), voxel_offset=voxel_offset,
                     bounds=tuple(voxel_offset + lo) + tuple(voxel_offset + hi), **kw)
            run_mesh(part, str(tmp_path / "part"), voxel_offset=voxel_offset + lo, **kw)
        assert tree_files(tmp_path / "bounds") == tree_files(tmp_path / "part"), f"{what}: box {lo}-{hi}"

    if seed in _segments_seeds():
        # a random selection of the segments (and an ID not in the volume) gives each selected
        # segment the bytes of the full job, and only those
        pick_rng = np.random.default_rng([seed, 13])
        chosen = [int(s) for s in present if pick_rng.random() < 0.4] or [int(present[-1])]
        # not in the volume at all (a segment under the dust threshold is there, so no warning)
        in_volume = {int(v) for v in np.unique(labels).astype(np.uint64)}
        absent = next(s for s in (1, 2**63, 2**64 - 1, 12345) if s not in in_volume)
        with pytest.warns(SegmentsNotFoundWarning):
            part = run_mesh(labels, str(tmp_path / "chosen"), options=dataclasses.replace(
                options, segments=chosen + [absent]), voxel_size=voxel_size, voxel_offset=voxel_offset, workers=1)
        assert (part.segments, part.missing_segments) == (len(chosen), 1), what
        sub = open_mesh(str(tmp_path / "chosen"))
        assert sub.segment_ids() == sorted(chosen), what
        for seg in chosen:
            assert sub.manifest_bytes(seg) == src.manifest_bytes(seg), f"{what}: segment {seg}"
            assert sub.fragment_data(seg) == src.fragment_data(seg), f"{what}: segment {seg}"
        full = _voxel_counts(dest)
        assert _voxel_counts(tmp_path / "chosen") == {s: full[s] for s in chosen}, what
        assert validate(str(tmp_path / "chosen")).ok, what

    if seed in _waves_seeds():
        # the fragment index past a cap of a few entries: the shards (runs of segments) written
        # in waves, each reading its entries from the grouped temporary file, from that file
        # read whole, or from the headers again, on 1 or 2 workers, give the same bytes
        import gpumesh.writer as writer

        wave_rng = np.random.default_rng([seed, 17])
        how = str(wave_rng.choice(["grouped", "whole", "headers"]))
        cap = int(wave_rng.integers(1, 40))
        with monkeypatch.context() as m:
            m.setattr(writer, "ASSEMBLY_INDEX_BYTES", cap * writer.INDEX_DTYPE.itemsize)
            m.setattr(writer, "INDEX_SPILL", how != "headers")
            m.setattr(writer, "SPILL_GROUP_WAVES", 1 if how == "grouped" else 1 << 62)
            waved = run_mesh(labels, str(tmp_path / "waves"), options=options, voxel_size=voxel_size,
                             voxel_offset=voxel_offset, workers=int(wave_rng.integers(1, 3)))
        where = f"{what}: index cap {cap} entries, {how}, {waved.workers} workers"
        assert tree_files(tmp_path / "waves") == tree_files(dest), where
        assert waved.index_spilled == (how != "headers" and waved.index_waves > 0), where
        assert waved.index_grouped == (how == "grouped" and waved.index_waves > 0), where

    if seed in _worker_seeds():
        # several workers (which also write the output) give the bytes of one
        two = run_mesh(labels, str(tmp_path / "two"), options=options, voxel_size=voxel_size,
                       voxel_offset=voxel_offset, workers=2)
        assert two.workers == min(2, two.tasks), what
        assert tree_files(tmp_path / "two") == tree_files(dest), what


def test_nodes_stay_short_enough_for_the_quantization_to_keep_half_voxels_apart(tmp_path):
    """At 10 bits a node may be at most 2**8 voxels along an axis: at 2**9 a half voxel is one
    quantization step and the last half voxel's vertices land on the far face's (clipped), so
    two columns of a segment that touch along an edge there were pinched into a non-manifold
    surface (found on 4x40x40 nm voxels at LOD 3).  Every LOD's mesh is closed and oriented,
    and the plan keeps every node short enough."""
    labels = np.zeros((24, 520, 520), np.uint32)
    labels[:, 510, 511] = labels[:, 511, 510] = 7
    dest = tmp_path / "out"
    opts = MeshOptions(chunk_size=64, max_lods=4, num_lods=4, vertex_quantization_bits=10, quality="high")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_mesh(labels, str(dest), options=opts, voxel_size=(4, 40, 40), workers=1)
    plan = Plan.make(labels.shape, opts, np.array([4.0, 40.0, 40.0]))
    assert all(int(np.max(plan.node_voxels(k))) <= 2**8 for k in range(4))
    assert validate(str(dest)).ok
    for k in range(4):
        assert_closed_oriented(load_mesh(str(dest), 7, lod=k), f"LOD {k}")
