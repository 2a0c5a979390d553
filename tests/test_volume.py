"""Tests of gpumesh.volume: opening label volumes of every supported format."""

from __future__ import annotations

import json
import os
import re
import subprocess

import numpy as np
import pytest
import tensorstore as ts

from gpumesh import storage
from gpumesh.errors import GpumeshError, InvalidVolumeError, InvalidVoxelSizeError, SourceReadError
from gpumesh.volume import Volume, open_volume

from conftest import tree_files

SHAPE = (20, 17, 13)  # x, y, z: distinct so axis mix-ups show
SHARED = "/work/shared/data/connectomics.zarr"

# A box partly outside the volume on every side.
START = (-3, 5, 10)
STOP = (6, 21, 16)


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.integers(0, 1000, size=SHAPE, dtype=np.uint32)


def expected_box(arr: np.ndarray, start, stop) -> np.ndarray:
    """Reference: the box [start, stop) of arr with zeros outside."""
    out = np.zeros(tuple(b - a for a, b in zip(start, stop)), arr.dtype)
    src = tuple(slice(max(a, 0), min(b, n)) for a, b, n in zip(start, stop, arr.shape))
    dst = tuple(slice(s.start - a, s.stop - a) for s, a in zip(src, start))
    out[dst] = arr[src]
    return out


def check_read(vol: Volume, arr: np.ndarray, start=START, stop=STOP) -> None:
    assert vol.shape == arr.shape
    got = vol.read(start, stop)
    assert got.flags.c_contiguous
    assert got.dtype == vol.dtype
    np.testing.assert_array_equal(got, expected_box(arr, start, stop))
    np.testing.assert_array_equal(vol.read((0, 0, 0), arr.shape), arr)


def write_ts(spec: dict, data: np.ndarray) -> ts.TensorStore:
    if isinstance(spec.get("kvstore"), str):
        spec = dict(spec, kvstore={"driver": "file", "path": spec["kvstore"]})
    store = ts.open(spec, create=True, dtype=data.dtype.name, shape=data.shape).result()
    store.write(data).result()
    return store


def edit_json(path, update) -> None:
    with open(path) as f:
        obj = json.load(f)
    update(obj)
    with open(path, "w") as f:
        json.dump(obj, f)


# ----------------------------------------------------------------------------- formats


def test_numpy(labels):
    vol = open_volume(labels)
    check_read(vol, labels)
    assert vol.dtype == np.uint32
    assert vol.voxel_size.dtype == np.float64 and vol.voxel_offset.dtype == np.int64
    np.testing.assert_array_equal(vol.voxel_size, [1, 1, 1])
    assert not vol.voxel_size_known   # the (1, 1, 1) default: the main job warns
    np.testing.assert_array_equal(vol.voxel_offset, [0, 0, 0])
    assert vol.precomputed is None and vol.chunk_shape is None
    # Reads are copies, not views of the input.
    before = labels[:2, :2, :2].copy()
    block = vol.read((0, 0, 0), (2, 2, 2))
    block[:] = 1234
    np.testing.assert_array_equal(labels[:2, :2, :2], before)


def test_numpy_axes_and_overrides(labels):
    zyx = np.ascontiguousarray(labels.transpose(2, 1, 0))
    vol = open_volume(zyx, axes="zyx", voxel_size=(4, 5, 6), voxel_offset=(1, -2, 3))
    check_read(vol, labels)
    np.testing.assert_array_equal(vol.voxel_size, [4, 5, 6])
    assert vol.voxel_size_known and vol.crop((1, -2, 3, 5, 5, 5)).voxel_size_known
    np.testing.assert_array_equal(vol.voxel_offset, [1, -2, 3])
    czyx = zyx[None]
    check_read(open_volume(czyx, axes="czyx"), labels)
    # Unnamed leading singleton axes are dropped.
    check_read(open_volume(labels[None, None]), labels)


def test_zarr3_dimension_names_zyx(tmp_path, labels):
    path = tmp_path / "a.zarr"
    write_ts(
        {"driver": "zarr3", "kvstore": str(path),
         "metadata": {"dimension_names": ["z", "y", "x"], "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [8, 8, 8]}}}},
        np.ascontiguousarray(labels.transpose(2, 1, 0)),
    )
    edit_json(path / "zarr.json", lambda m: m.setdefault("attributes", {}).update(voxel_size_nm=[40, 8, 4]))
    vol = open_volume(str(path))
    check_read(vol, labels)
    # voxel_size_nm is in storage order of the spatial axes (here z, y, x).
    np.testing.assert_array_equal(vol.voxel_size, [4, 8, 40])
    assert vol.voxel_size_known
    assert vol.chunk_shape == (8, 8, 8)
    assert "zarr v3" in vol.description
    # Prefix, file:// URL and overrides.
    vol2 = open_volume(f"zarr3://file://{path}", voxel_size=[1, 2, 3], voxel_offset=[5, 6, 7])
    check_read(vol2, labels)
    np.testing.assert_array_equal(vol2.voxel_size, [1, 2, 3])
    np.testing.assert_array_equal(vol2.voxel_offset, [5, 6, 7])
    # The axes argument overrides the names.
    vol3 = open_volume(str(path), axes="xyz")
    assert vol3.shape == SHAPE[::-1]


def test_zarr3_unnamed(tmp_path, labels):
    path = tmp_path / "xyz.zarr"
    write_ts({"driver": "zarr3", "kvstore": str(path)}, labels)
    unnamed = open_volume(path)
    check_read(unnamed, labels)  # storage order taken as x, y, z
    assert not unnamed.voxel_size_known and not unnamed.crop((0, 0, 0, 4, 4, 4)).voxel_size_known
    assert open_volume(path, voxel_size=(8, 8, 40)).voxel_size_known
    path2 = tmp_path / "zyx.zarr"
    write_ts({"driver": "zarr3", "kvstore": str(path2)}, np.ascontiguousarray(labels.transpose(2, 1, 0)))
    check_read(open_volume(str(path2), axes="zyx"), labels)


def test_zarr2_array_dimensions(tmp_path, labels):
    path = tmp_path / "v2.zarr"
    write_ts({"driver": "zarr", "kvstore": str(path), "metadata": {"chunks": [5, 6, 7]}},
             np.ascontiguousarray(labels.transpose(2, 1, 0)))
    with open(path / ".zattrs", "w") as f:
        json.dump({"_ARRAY_DIMENSIONS": ["z", "y", "x"], "resolution": [40, 6, 4]}, f)
    vol = open_volume(str(path))
    check_read(vol, labels)
    np.testing.assert_array_equal(vol.voxel_size, [4, 6, 40])
    assert vol.chunk_shape == (7, 6, 5)
    assert "zarr v2" in vol.description
    check_read(open_volume(f"zarr2://{path}"), labels)
    check_read(open_volume(f"{path}|zarr2:"), labels)


def test_three_voxel_sizes_of_a_rank_4_array_are_in_the_storage_order_of_its_spatial_axes(tmp_path, labels):
    # c, z, y, x with voxel_size_nm for the 3 spatial axes only: z, y, x (as they are stored)
    path = tmp_path / "czyx.zarr"
    write_ts({"driver": "zarr3", "kvstore": str(path), "metadata": {"dimension_names": ["c", "z", "y", "x"]}},
             np.ascontiguousarray(labels.transpose(2, 1, 0))[None])
    edit_json(path / "zarr.json", lambda m: m.setdefault("attributes", {}).update(
        voxel_size_nm=[40, 8, 4], voxel_offset=[3, 2, 1]))
    vol = open_volume(str(path))
    check_read(vol, labels)
    np.testing.assert_array_equal(vol.voxel_size, [4, 8, 40])
    np.testing.assert_array_equal(vol.voxel_offset, [1, 2, 3])
    # one entry per array dimension (the channel's included) reads the same
    edit_json(path / "zarr.json", lambda m: m["attributes"].update(voxel_size_nm=[1, 40, 8, 4]))
    np.testing.assert_array_equal(open_volume(str(path)).voxel_size, [4, 8, 40])


def _ome_datasets(scales, translations):
    return [
        {"path": str(i), "coordinateTransformations": [
            {"type": "scale", "scale": s}, {"type": "translation", "translation": t}]}
        for i, (s, t) in enumerate(zip(scales, translations))
    ]


def _write_ome_group(root, multiscales):
    """An OME-Zarr (zarr v2) group's ``.zgroup`` and its ``.zattrs`` of ``multiscales``."""
    (root / ".zgroup").write_text(json.dumps({"zarr_format": 2}))
    (root / ".zattrs").write_text(json.dumps({"multiscales": multiscales}))


def test_ome_zarr_04_two_scales(tmp_path, labels):
    root = tmp_path / "ome.zarr"
    root.mkdir()
    low = labels[::2, ::2, ::2].copy()
    for i, arr in enumerate([labels, low]):
        write_ts({"driver": "zarr", "kvstore": str(root / str(i))}, np.ascontiguousarray(arr.transpose(2, 1, 0)))
    axes = [{"name": n, "type": "space", "unit": "micrometer"} for n in "zyx"]
    ms = [{"version": "0.4", "axes": axes, "datasets": _ome_datasets(
        [[0.04, 0.008, 0.004], [0.04, 0.016, 0.008]],
        [[0.4, 0.08, 0.08], [0.4, 0.16, 0.16]])}]
    _write_ome_group(root, ms)

    vol0 = open_volume(str(root))
    check_read(vol0, labels)
    np.testing.assert_allclose(vol0.voxel_size, [4, 8, 40])
    np.testing.assert_array_equal(vol0.voxel_offset, [20, 10, 10])
    vol1 = open_volume(str(root), mip=1)
    check_read(vol1, low, (-1, -1, -1), (4, 5, 9))
    np.testing.assert_allclose(vol1.voxel_size, [8, 16, 40])
    np.testing.assert_array_equal(vol1.voxel_offset, [20, 10, 10])
    assert "OME-Zarr 0.4" in vol1.description
    with pytest.raises(SourceReadError, match="mip 2"):
        open_volume(str(root), mip=2)


def _ds0(ms):
    return ms[0]["datasets"][0]


@pytest.mark.parametrize("mutate, error, words", [
    (lambda ms: _ds0(ms).update(path=0), SourceReadError, "dataset 0 has path 0, not a string"),
    (lambda ms: _ds0(ms).update(path=["0"]), SourceReadError, "not a string"),
    (lambda ms: _ds0(ms)["coordinateTransformations"][1].update(translation=[1e300, 0, 0]), SourceReadError,
     "is not a voxel offset"),
    (lambda ms: _ds0(ms)["coordinateTransformations"][1].update(translation=[float("nan"), 0, 0]), SourceReadError,
     "is not a voxel offset"),
    (lambda ms: _ds0(ms)["coordinateTransformations"][0].update(scale=[0.04, 0, 0.004]), InvalidVoxelSizeError,
     r"scale must be 3 finite numbers > 0 \(nm\), got \[4.0, 0.0, 40.0\]"),
    (lambda ms: _ds0(ms)["coordinateTransformations"][0].update(scale="x"), SourceReadError,
     "bad OME-Zarr coordinateTransformations"),
    (lambda ms: ms[0].update(datasets=[]), SourceReadError, "has no scale mip 0"),
    (lambda ms: ms[0]["axes"][0].update(unit="furlong"), SourceReadError, "unknown length unit 'furlong'"),
    (lambda ms: ms.clear(), SourceReadError, "group without OME-Zarr multiscales"),
    (lambda ms: ms.__setitem__(0, "x"), SourceReadError, "bad OME-Zarr multiscales metadata"),
])
def test_bad_ome_zarr_metadata_is_a_typed_error(tmp_path, labels, mutate, error, words):
    """Whatever the multiscales metadata holds, opening says what is wrong with a gpumesh error
    (a non-string path, or a translation past int64, used to escape as AttributeError or
    OverflowError)."""
    root = tmp_path / "ome.zarr"
    write_ts({"driver": "zarr", "kvstore": str(root / "0")}, np.ascontiguousarray(labels.transpose(2, 1, 0)))
    axes = [{"name": n, "type": "space", "unit": "micrometer"} for n in "zyx"]
    ms = [{"version": "0.4", "axes": axes, "datasets": _ome_datasets([[0.04, 0.008, 0.004]], [[0.4, 0.08, 0.08]])}]
    _write_ome_group(root, ms)
    assert open_volume(str(root)).shape == labels.shape
    mutate(ms)
    _write_ome_group(root, ms)
    with pytest.raises(error, match=words):
        open_volume(str(root))


@pytest.mark.parametrize("offset", [(2**62, 0, 0), (0, -2**63, 0), (1e300, 0, 0)])
def test_a_voxel_offset_past_int64_is_refused(labels, offset):
    with pytest.raises(InvalidVolumeError, match="voxel offset must be 3 integers"):
        open_volume(labels, voxel_offset=offset)


def test_ome_zarr_05(tmp_path, labels):
    root = tmp_path / "ome5.zarr"
    write_ts({"driver": "zarr3", "kvstore": str(root / "s0"), "metadata": {"dimension_names": ["c", "z", "y", "x"]}},
             np.ascontiguousarray(labels.transpose(2, 1, 0))[None])
    axes = [{"name": "c", "type": "channel"}] + [{"name": n, "type": "space", "unit": "nanometer"} for n in "zyx"]
    ms = [{"axes": axes, "datasets": [{"path": "s0", "coordinateTransformations": [
        {"type": "scale", "scale": [1, 40, 8, 4]}]}],
        "coordinateTransformations": [{"type": "scale", "scale": [1, 1, 2, 2]}]}]
    (root / "zarr.json").write_text(json.dumps(
        {"zarr_format": 3, "node_type": "group", "attributes": {"ome": {"version": "0.5", "multiscales": ms}}}))
    vol = open_volume(str(root))
    check_read(vol, labels)
    np.testing.assert_allclose(vol.voxel_size, [8, 16, 40])
    assert "OME-Zarr 0.5" in vol.description


def test_ome_zarr_multiscale_scale_applies_to_the_dataset_translation(tmp_path, labels):
    # The multiscale's own coordinateTransformations come after each dataset's: physical = s2 *
    # (s * i + t) + t2, so the voxel offset is (s2 * t + t2) / (s2 * s).  Here the dataset's
    # translation is 10 voxels on every axis and the multiscale doubles y and x.
    root = tmp_path / "ome.zarr"
    write_ts({"driver": "zarr", "kvstore": str(root / "0")}, np.ascontiguousarray(labels.transpose(2, 1, 0)))
    axes = [{"name": n, "type": "space", "unit": "nanometer"} for n in "zyx"]
    ms = [{"version": "0.4", "axes": axes,
           "datasets": _ome_datasets([[40, 8, 4]], [[400, 80, 40]]),
           "coordinateTransformations": [{"type": "scale", "scale": [1, 2, 2]}]}]
    _write_ome_group(root, ms)
    vol = open_volume(str(root))
    check_read(vol, labels)
    np.testing.assert_allclose(vol.voxel_size, [8, 16, 40])
    np.testing.assert_array_equal(vol.voxel_offset, [10, 10, 10])
    # and a multiscale translation, in physical units, after it
    ms[0]["coordinateTransformations"].append({"type": "translation", "translation": [80, 32, 16]})
    _write_ome_group(root, ms)
    np.testing.assert_array_equal(open_volume(str(root)).voxel_offset, [12, 12, 12])


def test_n5(tmp_path, labels):
    path = tmp_path / "vol.n5"
    write_ts({"driver": "n5", "kvstore": str(path), "metadata": {"blockSize": [8, 8, 8], "compression": {"type": "raw"}}},
             labels)
    edit_json(path / "attributes.json", lambda a: a.update(axes=["x", "y", "z"], resolution=[4, 5, 45]))
    vol = open_volume(str(path))
    check_read(vol, labels)
    np.testing.assert_array_equal(vol.voxel_size, [4, 5, 45])
    assert vol.chunk_shape == (8, 8, 8)
    assert "N5" in vol.description
    check_read(open_volume(f"n5://{path}"), labels)


def test_n5_multiscale_group(tmp_path, labels):
    root = tmp_path / "ms.n5"
    low = labels[::2, ::2, ::2].copy()
    for i, arr in enumerate([labels, low]):
        write_ts({"driver": "n5", "kvstore": str(root / f"s{i}"), "metadata": {"compression": {"type": "raw"}}}, arr)
    edit_json(root / "s1" / "attributes.json", lambda a: a.update(downsamplingFactors=[2, 2, 1]))
    (root / "attributes.json").write_text(json.dumps(
        {"n5": "2.0.0", "pixelResolution": {"dimensions": [4, 4, 40], "unit": "nm"}}))
    vol = open_volume(str(root), mip=1)
    check_read(vol, low, (0, 0, 0), low.shape)
    np.testing.assert_array_equal(vol.voxel_size, [8, 8, 40])


def test_n5_viewer_group_scales_units_and_missing_mip(tmp_path, labels):
    """The n5-viewer layout: the group lists ``scales`` (no ``downsamplingFactors`` in the
    datasets), ``resolution`` and per-axis ``units``; a dataset's own resolution wins."""
    root = tmp_path / "viewer.n5"
    low = labels[::2, ::2, :].copy()
    for i, arr in enumerate([labels, low]):
        write_ts({"driver": "n5", "kvstore": str(root / f"s{i}"), "metadata": {"compression": {"type": "raw"}}}, arr)
    (root / "attributes.json").write_text(json.dumps(
        {"n5": "2.0.0", "scales": [[1, 1, 1], [2, 2, 1]], "resolution": [4, 4, 0.04], "units": ["nm", "nm", "um"]}))
    np.testing.assert_allclose(open_volume(str(root)).voxel_size, [4, 4, 40])
    vol = open_volume(str(root), mip=1)
    check_read(vol, low, (0, 0, 0), low.shape)
    np.testing.assert_allclose(vol.voxel_size, [8, 8, 40])
    assert "s1" in vol.description
    with pytest.raises(SourceReadError, match="has no dataset s2"):
        open_volume(str(root), mip=2)
    edit_json(root / "s1" / "attributes.json", lambda a: a.update(resolution=[9, 9, 90]))
    np.testing.assert_allclose(open_volume(str(root), mip=1).voxel_size, [9, 9, 90])
    (root / "attributes.json").unlink()
    with pytest.raises(SourceReadError, match="no N5 attributes.json"):
        open_volume(f"n5://{root}")


def test_precomputed_two_scales(tmp_path, labels):
    root = tmp_path / "pre"
    low = labels[::2, ::2, ::2].copy()
    common = {"driver": "neuroglancer_precomputed", "kvstore": str(root),
              "multiscale_metadata": {"type": "segmentation", "data_type": "uint32", "num_channels": 1}}
    for arr, res, off in [(labels, [4, 4, 40], [100, 200, 300]), (low, [8, 8, 80], [50, 100, 150])]:
        spec = dict(common, scale_metadata={
            "size": list(arr.shape), "resolution": res, "voxel_offset": off, "chunk_size": [8, 8, 8],
            "encoding": "compressed_segmentation", "compressed_segmentation_block_size": [8, 8, 8]})
        store = ts.open(dict(spec, kvstore={"driver": "file", "path": str(root)}), create=True).result()
        store[ts.d["channel"][0]].write(arr).result()
    info = json.loads((root / "info").read_text())
    assert len(info["scales"]) == 2

    vol = open_volume(f"precomputed://{root}", mip=1)
    assert vol.voxel_size_known
    check_read(vol, low, (-1, 2, 3), (12, 9, 10))
    np.testing.assert_array_equal(vol.voxel_size, [8, 8, 80])
    np.testing.assert_array_equal(vol.voxel_offset, [50, 100, 150])
    assert vol.chunk_shape == (8, 8, 8)
    pre = vol.precomputed
    assert pre["scale_key"] == info["scales"][1]["key"]
    assert pre["info"] == info
    assert pre["kvstore"]["driver"] == "file" and pre["kvstore"]["path"] == str(root) + "/"

    vol0 = open_volume(str(root))  # detected from `info`
    check_read(vol0, labels)
    np.testing.assert_array_equal(vol0.voxel_offset, [100, 200, 300])
    with pytest.raises(SourceReadError, match="available"):
        open_volume(str(root), mip=2)
    check_read(open_volume(str(root), axes="xyz"), labels)   # its axes, said again
    with pytest.raises(InvalidVolumeError, match="axes are always x, y, z"):   # refused, not ignored
        open_volume(str(root), axes="zyx")
    # Scales are read from the stored info; num_channels must be 1.
    edit_json(root / "info", lambda i: i.update(num_channels=2))
    with pytest.raises(InvalidVolumeError, match="num_channels"):
        open_volume(str(root))
    (root / "info").write_text(json.dumps(info))
    # An opened precomputed TensorStore also fills `precomputed`.
    vol_ts = open_volume(ts.open(dict(common, kvstore={"driver": "file", "path": str(root)}, scale_index=1)).result())
    check_read(vol_ts, low, (0, 0, 0), low.shape)
    np.testing.assert_array_equal(vol_ts.voxel_offset, [50, 100, 150])
    np.testing.assert_array_equal(vol_ts.voxel_size, [8, 8, 80])
    assert vol_ts.precomputed["scale_key"] == pre["scale_key"]
    with pytest.raises(InvalidVolumeError, match="axes are always x, y, z"):
        open_volume(ts.open(dict(common, kvstore={"driver": "file", "path": str(root)})).result(), axes="zyx")
    assert vol_ts.location == storage.kvstore_spec(str(root)) == vol0.location


@pytest.mark.parametrize("offset, name", [([10, 20, 30], "pre"), ([-12, -20, 30], "a layer")],
                         ids=["offset", "negative-offset"])
def test_precomputed_chunks_compressed_by_cloudfiles_are_refused(tmp_path, labels, offset, name):
    """cloud-volume and igneous gzip the chunks they write to a local (``file://``) layer by
    default into ``<chunk>.gz`` files, which TensorStore (and Neuroglancer) do not read: every
    chunk read as missing, so the job wrote an empty mesh with only a warning.  Refused now,
    saying how to decompress them (the folder quoted for the shell), before anything is
    written; a plain layer still opens.  A negative voxel offset gives chunk names such as
    ``-12--4_...``."""
    import gzip
    import shlex

    from gpumesh.pipeline import run_mesh

    root = tmp_path / name
    spec = {"driver": "neuroglancer_precomputed", "kvstore": {"driver": "file", "path": str(root)},
            "multiscale_metadata": {"type": "segmentation", "data_type": "uint32", "num_channels": 1},
            "scale_metadata": {"size": list(labels.shape), "resolution": [8, 8, 30], "voxel_offset": offset,
                               "chunk_size": [8, 8, 8], "encoding": "raw"}}
    store = ts.open(spec, create=True).result()[ts.d["channel"][0]]
    store.write(labels).result()
    check_read(open_volume(str(root)), labels)
    key = json.loads((root / "info").read_text())["scales"][0]["key"]
    chunks = [f for f in (root / key).iterdir()]
    assert chunks and all(re.fullmatch(r"-?\d+--?\d+_-?\d+--?\d+_\d+-\d+", f.name) for f in chunks)
    assert any(f.name.startswith("-") for f in chunks) == (offset[0] < 0)
    for f in chunks:     # as cloud-files stores them on a local disk
        f.with_name(f.name + ".gz").write_bytes(gzip.compress(f.read_bytes()))
        f.unlink()
    with pytest.raises(SourceReadError, match=r"compressed.*\.gz.*gunzip") as caught:
        open_volume(str(root))
    assert f"`find {shlex.quote(str(root / key))} -name" in str(caught.value)
    dest = tmp_path / "mesh"
    with pytest.raises(SourceReadError, match="cloud-files"):
        run_mesh(str(root), str(dest), workers=1)
    assert not dest.exists()
    # A TensorStore spec of the scale, and the opened TensorStore, are refused alike (they read
    # the same missing chunks)
    one_scale = {"driver": "neuroglancer_precomputed", "kvstore": {"driver": "file", "path": str(root)},
                 "scale_index": 0}
    for source in (one_scale, ts.open(one_scale).result()):
        with pytest.raises(SourceReadError, match=rf"\(scale: {key}\) holds chunks that cloud-files stored "
                                                  rf"compressed.*gunzip"):
            open_volume(source)
    with pytest.raises(SourceReadError, match="cloud-files"):
        run_mesh(one_scale, str(dest), workers=1)
    assert not dest.exists()
    # Decompressed, with one .gz left beside its plain file: not refused.
    plain = chunks[0]
    plain.write_bytes(gzip.decompress(plain.with_name(plain.name + ".gz").read_bytes()))
    for f in chunks[1:]:
        g = f.with_name(f.name + ".gz")
        f.write_bytes(gzip.decompress(g.read_bytes()))
        g.unlink()
    check_read(open_volume(str(root)), labels)
    check_read(open_volume(one_scale), labels)


def test_voxel_counts_of_mip_1_say_their_voxel_size(tmp_path, labels):
    """Meshed at mip 1, the segment properties count mip 1 voxels (as ``dust_threshold`` does,
    like igneous's): their description said "at mip 0"."""
    from gpumesh.pipeline import MeshOptions, run_mesh

    root = tmp_path / "pre"
    low = labels[::2, ::2, ::2].copy()
    common = {"driver": "neuroglancer_precomputed", "kvstore": {"driver": "file", "path": str(root)},
              "multiscale_metadata": {"type": "segmentation", "data_type": "uint32", "num_channels": 1}}
    for arr, res in [(labels, [4, 4, 40]), (low, [8, 8, 80])]:
        spec = dict(common, scale_metadata={"size": list(arr.shape), "resolution": res, "chunk_size": [8, 8, 8],
                                            "encoding": "raw"})
        ts.open(spec, create=True).result()[ts.d["channel"][0]].write(arr).result()
    run_mesh(str(root), str(tmp_path / "mesh"), mip=1, options=MeshOptions(chunk_size=8, max_lods=2), workers=1)
    props = json.loads((tmp_path / "mesh" / "segment_properties" / "info").read_text())["inline"]
    ids, counts = np.unique(low[low != 0], return_counts=True)
    assert props["ids"] == [str(i) for i in ids]
    (voxels,) = props["properties"]
    assert voxels["values"] == counts.tolist()
    assert "mip 0" not in voxels["description"] and "8x8x80 nm" in voxels["description"]


def test_sharded_precomputed_with_missing_chunks(tmp_path, labels):
    """A sharded precomputed segmentation (as large datasets are stored), written only in part:
    the chunks never written read as background, and the main job meshes it as the array."""
    from gpumesh.pipeline import MeshOptions, run_mesh

    root = tmp_path / "sharded"
    sharding = {"@type": "neuroglancer_uint64_sharded_v1", "preshift_bits": 0, "hash": "identity",
                "minishard_bits": 1, "shard_bits": 1, "minishard_index_encoding": "gzip", "data_encoding": "gzip"}
    spec = {"driver": "neuroglancer_precomputed", "kvstore": {"driver": "file", "path": str(root)},
            "multiscale_metadata": {"type": "segmentation", "data_type": "uint32", "num_channels": 1},
            "scale_metadata": {"size": list(labels.shape), "resolution": [8, 8, 30], "chunk_size": [8, 8, 8],
                               "encoding": "compressed_segmentation", "compressed_segmentation_block_size": [8, 8, 8],
                               "sharding": sharding}}
    store = ts.open(spec, create=True).result()[ts.d["channel"][0]]
    part = np.zeros_like(labels)
    part[:16, :, :8] = labels[:16, :, :8]                  # whole chunks only; the rest never written
    store[:16, :, :8].write(labels[:16, :, :8]).result()
    assert any(f.name.endswith(".shard") for f in root.rglob("*"))
    vol = open_volume(str(root))
    check_read(vol, part)
    np.testing.assert_array_equal(vol.voxel_size, [8, 8, 30])
    options = MeshOptions(chunk_size=8, max_lods=2)
    run_mesh(str(root), str(tmp_path / "from-shards"), options=options, workers=1)
    run_mesh(part, str(tmp_path / "from-array"), options=options, voxel_size=(8, 8, 30), workers=1)
    meshes = tree_files(tmp_path / "from-shards")
    assert "source_info.json" in meshes   # a precomputed source gets a ready copy of its info, linking the meshes
    del meshes["source_info.json"]
    assert meshes == tree_files(tmp_path / "from-array")


_SEGMENTATION = {"type": "segmentation", "data_type": "uint32", "num_channels": 1}
_CHUNKED = {   # kind -> its metadata, 8-voxel chunks; each writer leaves out chunks of fill value only
    "neuroglancer_precomputed": {"multiscale_metadata": _SEGMENTATION,
                                 "scale_metadata": {"size": list(SHAPE), "resolution": [8, 8, 30],
                                                    "chunk_size": [8, 8, 8], "encoding": "raw"}},
    "sharded precomputed": {"multiscale_metadata": _SEGMENTATION,
                            "scale_metadata": {"size": list(SHAPE), "resolution": [8, 8, 30], "chunk_size": [8, 8, 8],
                                               "encoding": "compressed_segmentation",
                                               "compressed_segmentation_block_size": [8, 8, 8],
                                               "sharding": {"@type": "neuroglancer_uint64_sharded_v1",
                                                            "preshift_bits": 0, "hash": "identity",
                                                            "minishard_bits": 1, "shard_bits": 1,
                                                            "minishard_index_encoding": "gzip",
                                                            "data_encoding": "gzip"}}},
    "zarr": {"metadata": {"shape": list(SHAPE), "chunks": [8, 8, 8], "dtype": "<u4", "fill_value": 0}},
    "zarr3": {"metadata": {"shape": list(SHAPE), "data_type": "uint32",
                           "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [8, 8, 8]}}}},
    "n5": {"metadata": {"dimensions": list(SHAPE), "blockSize": [8, 8, 8], "dataType": "uint32",
                        "compression": {"type": "raw"}}},
}


@pytest.mark.parametrize("kind", sorted(_CHUNKED))
def test_chunks_not_stored_are_background_unless_fill_missing_is_off(tmp_path, labels, kind):
    """A chunk that is not stored reads as background (0) by default, as the formats' readers
    take it; with ``fill_missing=False`` a read that needs it is a SourceReadError naming the
    chunk (igneous's default), and reads that do not need it are unchanged."""
    root = tmp_path / "v"
    driver = "neuroglancer_precomputed" if "precomputed" in kind else kind
    store = ts.open({"driver": driver, "kvstore": {"driver": "file", "path": str(root)}, **_CHUNKED[kind]},
                    create=True).result()
    if driver == "neuroglancer_precomputed":
        store = store[ts.d["channel"][0]]
    part = labels.copy()
    part[8:16, 8:16, :8] = 0           # one chunk of background only: the writer leaves it out
    store.write(part).result()
    check_read(open_volume(str(root)), part)
    strict = open_volume(str(root), fill_missing=False)
    np.testing.assert_array_equal(strict.read((0, 0, 0), (8, 17, 13)), part[:8])     # chunks all stored
    with pytest.raises(SourceReadError, match=r"cannot read box .* is missing \(a storage chunk that is not "
                                              r"stored; --fill-missing reads such chunks as background\)"):
        strict.read((0, 0, 0), SHAPE)
    with pytest.raises(SourceReadError, match="is missing"):      # cropped too
        open_volume(str(root), fill_missing=False, bounds=(8, 8, 0, 9, 9, 1)).read((0, 0, 0), (1, 1, 1))


def test_fill_missing_off_needs_a_source_gpumesh_opens(tmp_path, labels):
    """``fill_missing=False`` applies to a spec (opened strictly) but cannot change an opened
    TensorStore: a ValueError, not a silent fill."""
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp_path / "v")}}
    part = labels.copy()
    part[:, :, 8:] = 0
    write_ts(dict(spec, metadata={"chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [8, 8, 8]}}}),
             part)
    with pytest.raises(SourceReadError, match="is missing"):
        open_volume(spec, fill_missing=False).read((0, 0, 0), SHAPE)
    check_read(open_volume(spec), part)
    with pytest.raises(ValueError, match="fill_missing=False needs a source that gpumesh opens"):
        open_volume(ts.open(spec).result(), fill_missing=False)


def test_tensorstore_and_spec_inputs(tmp_path, labels):
    spec = {"driver": "zarr3", "kvstore": {"driver": "memory", "path": "vol_test/"}}
    ctx = ts.Context()
    store = ts.open(spec, create=True, dtype="uint32", shape=SHAPE, context=ctx).result()
    store.write(labels).result()
    check_read(open_volume(store), labels)
    path = tmp_path / "s.zarr"
    write_ts({"driver": "zarr3", "kvstore": str(path)}, labels)
    check_read(open_volume({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}), labels)
    # memory:// URL through the process-wide context of gpumesh.storage.
    from gpumesh import storage
    mem = ts.open({"driver": "zarr3", "kvstore": "memory://vol_mem/"}, create=True, dtype="uint16", shape=SHAPE,
                  context=storage._default_context()).result()
    mem.write(labels.astype(np.uint16)).result()
    vol = open_volume("memory://vol_mem/")
    assert vol.dtype == np.uint16
    check_read(vol, labels.astype(np.uint16))


def test_an_in_memory_tensorstore_opens_without_its_spec_as_json(labels):
    """A TensorStore of the in-memory ``array`` driver is opened without its spec's JSON, which
    holds every voxel as a Python number (1.4 s and hundreds of MB for 256^3 uint32); it is
    still named as of the array driver, and read as given."""
    import tracemalloc

    big = ts.array(np.zeros((128, 128, 128), np.uint32))   # 8 MiB; its spec's JSON ~100 MB
    tracemalloc.start()
    try:
        vol = open_volume(big)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak
    assert vol.description == "TensorStore (array)" and vol.location is None
    check_read(open_volume(ts.array(labels)), labels)
    view = ts.array(labels)[ts.d[0].translate_by[5]]   # a domain that does not start at 0
    assert open_volume(view).description == "TensorStore (array)"
    cast = ts.cast(ts.array(labels), ts.uint64)   # a virtual driver keeps its name
    assert open_volume(cast).description == "TensorStore (cast)"
    check_read(open_volume(cast), labels.astype(np.uint64))


def test_tensorstore_dimension_units_are_converted_to_nm(labels):
    # an opened TensorStore that states its voxel size as dimension units, in any length unit
    store = ts.open({"driver": "array", "array": labels.tolist(), "dtype": "uint32",
                     "schema": {"dimension_units": ["0.004um", "8nm", [4, "nm"]]}}).result()
    vol = open_volume(store)
    assert vol.voxel_size_known
    np.testing.assert_allclose(vol.voxel_size, [4, 8, 4])
    check_read(vol, labels)


def test_signed_labels(tmp_path, labels):
    signed = labels.astype(np.int64)
    vol = open_volume(signed)
    assert vol.dtype == np.uint64
    got = vol.read((0, 0, 0), SHAPE)
    assert got.dtype == np.uint64
    np.testing.assert_array_equal(got, labels)
    signed[3, 4, 5] = -1
    vol = open_volume(signed)  # no bulk read at open time
    vol.read((0, 0, 0), (2, 2, 2))  # box without the negative value
    with pytest.raises(InvalidVolumeError, match="negative"):
        vol.read((0, 0, 0), (5, 5, 6))
    path = tmp_path / "i16.zarr"
    write_ts({"driver": "zarr3", "kvstore": str(path)}, labels.astype(np.int16) - 10)
    vol = open_volume(str(path))
    assert vol.dtype == np.uint16
    with pytest.raises(InvalidVolumeError):
        vol.read((0, 0, 0), SHAPE)


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="shared connectomics volume not present")
def test_shared_connectomics_volume():
    vol = open_volume(SHARED)
    assert vol.shape == (512, 512, 512)
    assert vol.dtype == np.uint32
    np.testing.assert_array_equal(vol.voxel_size, [32, 32, 40])
    np.testing.assert_array_equal(vol.voxel_offset, [0, 0, 0])
    assert vol.chunk_shape == (128, 128, 128)
    ref = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": SHARED}}).result()
    got = vol.read((120, 250, 300), (130, 260, 310))
    np.testing.assert_array_equal(got, ref[120:130, 250:260, 300:310].read().result())
    assert got.any()
    edge = vol.read((505, 0, 0), (515, 10, 10))
    np.testing.assert_array_equal(edge[:7], ref[505:512, 0:10, 0:10].read().result())
    assert not edge[7:].any()


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="shared connectomics volume not present")
def test_read_cache_reads_the_same_and_is_sized_to_one_block():
    from gpumesh.pipeline import MeshOptions, Plan, read_cache_bytes

    plain = open_volume(SHARED)
    plan = Plan.make(plain.shape, MeshOptions())
    # blocks of 256 voxels read [b*256 - 4, b*256 + 256): at most 3 chunks of 128 per axis
    assert read_cache_bytes(plain, plan) == 27 * 128**3 * 4
    assert read_cache_bytes(open_volume(np.zeros((8, 8, 8), np.uint8)), plan) == 0
    cached = open_volume(SHARED, cache_bytes=read_cache_bytes(plain, plan))
    for box in [((254, 254, 254), (386, 386, 386)), ((380, 250, 120), (400, 260, 140)),
                ((254, 254, 254), (386, 386, 386)), ((505, 0, 0), (515, 10, 10))]:
        np.testing.assert_array_equal(cached.read(*box), plain.read(*box))


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.complex64, bool])
def test_non_integer_dtype(dtype):
    with pytest.raises(InvalidVolumeError, match="dtype"):
        open_volume(np.zeros((3, 4, 5), dtype=dtype))


def test_float_zarr(tmp_path):
    path = tmp_path / "f.zarr"
    write_ts({"driver": "zarr3", "kvstore": str(path)}, np.zeros((3, 4, 5), np.float32))
    with pytest.raises(InvalidVolumeError, match="float32"):
        open_volume(str(path))


def test_rank_errors(tmp_path):
    with pytest.raises(InvalidVolumeError, match="rank 2"):
        open_volume(np.zeros((3, 4), np.uint8))
    with pytest.raises(InvalidVolumeError):
        open_volume(np.zeros((2, 3, 4, 5), np.uint8))
    with pytest.raises(InvalidVolumeError, match="'c'"):
        open_volume(np.zeros((2, 3, 4, 5), np.uint8), axes="czyx")
    cv = np.zeros((5, 4, 3, 1), np.uint8)   # cloud-volume's (x, y, z, channel): the hint names what works
    with pytest.raises(InvalidVolumeError, match="give axes=, 'xyzc'"):
        open_volume(cv)
    assert open_volume(cv, axes="xyzc").shape == (5, 4, 3)
    path = tmp_path / "c.zarr"
    write_ts({"driver": "zarr3", "kvstore": str(path), "metadata": {"dimension_names": ["c", "z", "y", "x"]}},
             np.zeros((2, 3, 4, 5), np.uint8))
    with pytest.raises(InvalidVolumeError, match="size 2"):
        open_volume(str(path))
    with pytest.raises(InvalidVolumeError, match="axes"):
        open_volume(np.zeros((3, 4, 5), np.uint8), axes="zy")


def test_axes_of_the_wrong_length_or_with_a_repeated_letter_are_refused(tmp_path, labels):
    # one letter per stored axis, each of x, y, z once: a wrong axes string is a typed error,
    # not a NumPy / TensorStore indexing error (nor taken with a letter dropped)
    path = tmp_path / "zyx.zarr"
    write_ts({"driver": "zarr3", "kvstore": str(path)}, np.ascontiguousarray(labels.transpose(2, 1, 0)))
    for source in (labels, str(path)):
        with pytest.raises(InvalidVolumeError, match="letters"):
            open_volume(source, axes="czyx")   # 4 letters for 3 axes
    with pytest.raises(InvalidVolumeError, match="letters"):
        open_volume(labels[..., None], axes="zyx")   # 3 letters for 4 axes
    with pytest.raises(InvalidVolumeError, match="once"):
        open_volume(labels[..., None], axes="xyzz")


def test_empty_volume(tmp_path):
    with pytest.raises(InvalidVolumeError, match="empty"):
        open_volume(np.zeros((0, 4, 5), np.uint32))
    path = tmp_path / "e.zarr"
    ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}, create=True, dtype="uint32", shape=[4, 0, 5]).result()
    with pytest.raises(InvalidVolumeError, match="empty"):
        open_volume(str(path))


@pytest.mark.parametrize("vs", [(0, 1, 1), (1, 1), (1, 1, 1, 1), (float("nan"), 1, 1), (1, float("inf"), 1),
                                (-1, 1, 1), "abc", 5, (1, "x", 1)])
def test_bad_voxel_size(labels, vs):
    with pytest.raises(InvalidVoxelSizeError):
        open_volume(labels, voxel_size=vs)


def test_bad_voxel_size_in_metadata(tmp_path, labels):
    path = tmp_path / "v.zarr"
    write_ts({"driver": "zarr3", "kvstore": str(path)}, labels)
    edit_json(path / "zarr.json", lambda m: m.setdefault("attributes", {}).update(voxel_size_nm=[0, 1, 1]))
    with pytest.raises(InvalidVoxelSizeError):
        open_volume(str(path))
    assert open_volume(str(path), voxel_size=(1, 1, 1)).shape == SHAPE  # the override wins


def test_bad_voxel_offset(labels):
    with pytest.raises(InvalidVolumeError):
        open_volume(labels, voxel_offset=(1, 2))
    with pytest.raises(InvalidVolumeError):
        open_volume(labels, voxel_offset=(1.5, 2, 3))


def test_missing_and_unknown(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(SourceReadError, match="nope"):
        open_volume(str(missing))
    with pytest.raises(SourceReadError, match="nope"):
        open_volume(f"zarr3://{missing}")
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "data.bin").write_bytes(b"\0" * 10)
    with pytest.raises(SourceReadError, match="unknown volume format"):
        open_volume(str(unknown))
    with pytest.raises(SourceReadError):
        open_volume(f"precomputed://{unknown}")
    with pytest.raises(SourceReadError, match=r"unsupported source type int: .*; give a path or URL, .* a NumPy "
                                              r"array \(np.asarray\(x\) of a Dask array or a list\)$"):
        open_volume(12345)
    # run_mesh(open_volume(...)): its workers open the source, so it needs the source itself
    from gpumesh import run_mesh

    with pytest.raises(SourceReadError, match="give the source itself .* not an opened Volume"):
        run_mesh(open_volume(np.ones((4, 4, 4), np.uint8)), str(tmp_path / "out"), workers=1)
    assert not (tmp_path / "out").exists()
    bad = tmp_path / "bad.zarr"
    bad.mkdir()
    (bad / "zarr.json").write_text("{not json")
    with pytest.raises(SourceReadError, match="bad.zarr"):
        open_volume(str(bad))
    with pytest.raises(SourceReadError, match="single scale"):
        open_volume(np.zeros((2, 2, 2), np.uint8), mip=1)
    assert issubclass(SourceReadError, GpumeshError)


def test_read_box_validation(labels):
    vol = open_volume(labels)
    assert vol.read((0, 0, 0), (0, 5, 5)).shape == (0, 5, 5)
    out = vol.read((-10, -10, -10), (-5, -5, -5))
    assert out.shape == (5, 5, 5) and not out.any()
    with pytest.raises(ValueError):
        vol.read((5, 5, 5), (4, 6, 6))
    with pytest.raises(ValueError):
        vol.read((0, 0), (1, 1))


def test_bounds_crop_in_global_coordinates(tmp_path, labels):
    offset = np.array([10, -20, 30])
    vol = open_volume(labels, voxel_offset=offset, voxel_size=(4, 5, 6))
    lo, hi = offset + [2, 3, 1], offset + [7, 5, 4]
    part = vol.crop(tuple(lo) + tuple(hi))
    assert part.shape == (5, 2, 3) and part.voxel_offset.tolist() == lo.tolist()
    np.testing.assert_array_equal(part.voxel_size, [4, 5, 6])
    check_read(part, labels[2:7, 3:5, 1:4], (-1, -1, -1), (6, 3, 4))   # nothing past the box
    # clipped to the volume; past its end a read is background, as for any volume
    edge = vol.crop(tuple(offset - 100) + tuple(offset + [3, 2, 1]))
    assert edge.shape == (3, 2, 1) and edge.voxel_offset.tolist() == offset.tolist()
    np.testing.assert_array_equal(edge.read((0, 0, 0), (4, 2, 1))[:3], labels[:3, :2, :1])
    assert not edge.read((0, 0, 0), (4, 2, 1))[3].any()
    # the same through open_volume, from storage
    from conftest import write_zarr

    path = tmp_path / "v.zarr"
    write_zarr(path, labels, chunk=8)
    stored = open_volume(str(path), voxel_offset=offset, bounds=tuple(lo) + tuple(hi))
    assert stored.shape == part.shape and stored.voxel_offset.tolist() == lo.tolist()
    check_read(stored, labels[2:7, 3:5, 1:4], (-1, -1, -1), (6, 3, 4))
    for bad in [(0, 0, 0, 1, 1), (0, 0, 0, 1, 1, 1.5), tuple(offset) + tuple(offset), (1000, 0, 0, 1001, 1, 1),
                (0, 0, 0, 10**20, 1, 1)]:
        with pytest.raises(InvalidVolumeError):
            vol.crop(bad)


def _precomputed_source(root, arr, extra_info=None) -> None:
    spec = {"driver": "neuroglancer_precomputed", "kvstore": {"driver": "file", "path": str(root)},
            "multiscale_metadata": {"type": "segmentation", "data_type": "uint32", "num_channels": 1},
            "scale_metadata": {"size": list(arr.shape), "resolution": [8, 8, 30], "chunk_size": [8, 8, 8],
                               "encoding": "raw"}}
    ts.open(spec, create=True).result()[ts.d["channel"][0]].write(arr).result()
    if extra_info:
        edit_json(root / "info", lambda i: i.update(extra_info))


def test_link_source_points_the_volume_at_the_meshes_and_their_segment_properties(tmp_path):
    """A precomputed source gets ``source_info.json`` (its info with ``mesh``, and
    ``segment_properties`` where it names none: the client reads a volume's segment properties
    from its own info, not from the mesh directory's); ``--link-source`` writes it into the
    source, keeping ``info.bak``, and the paths resolve from the volume's root as the client
    resolves them."""
    import gpumesh
    from conftest import cli_command

    arr = np.zeros((24, 20, 16), np.uint32)
    arr[2:10, 3:12, 2:9] = 5
    arr[12:20, 5:15, 6:14] = 70000
    root = tmp_path / "seg"
    _precomputed_source(root, arr)
    before = (root / "info").read_bytes()

    def mesh(dest, *extra, source=root):
        r = subprocess.run(cli_command() + ["mesh", str(source), str(dest), "--workers", "1", "--quiet",
                                            "--chunk-size", "8", *extra], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return json.loads((dest / "source_info.json").read_text())

    offered = mesh(tmp_path / "meshes")   # beside the volume: not linked
    assert (root / "info").read_bytes() == before and not (root / "info.bak").exists()
    assert offered == dict(json.loads(before), mesh="../meshes", segment_properties="../meshes/segment_properties")

    linked = mesh(root / "mesh", "--link-source")   # inside it, linked
    assert linked == dict(json.loads(before), mesh="mesh", segment_properties="mesh/segment_properties")
    assert json.loads((root / "info").read_text()) == linked and (root / "info.bak").read_bytes() == before
    props = json.loads((root / linked["segment_properties"] / "info").read_text())
    assert props["@type"] == "neuroglancer_segment_properties" and props["inline"]["ids"] == ["5", "70000"]
    assert len(gpumesh.load_mesh(str(root / linked["mesh"]), 70000).faces) > 0
    vol = open_volume(str(root))   # the linked source still reads as before
    np.testing.assert_array_equal(vol.read((0, 0, 0), arr.shape), arr)
    # linked again, to meshes without segment properties: the earlier link's are not kept
    # (the client would fail to load the volume on the missing file), nor is info.bak replaced
    relinked = mesh(tmp_path / "other", "--link-source", "--no-segment-properties")
    assert relinked == dict(json.loads(before), mesh="../other")
    assert json.loads((root / "info").read_text()) == relinked and (root / "info.bak").read_bytes() == before
    assert mesh(root / "mesh", "--link-source", "--overwrite") == linked

    # a source that names its own segment properties keeps them; no properties, no link to them
    own = tmp_path / "own"
    _precomputed_source(own, arr, {"segment_properties": "names"})
    assert mesh(tmp_path / "m-own", source=own)["segment_properties"] == "names"
    plain = tmp_path / "plain"
    _precomputed_source(plain, arr)
    assert "segment_properties" not in mesh(tmp_path / "m-none", "--no-segment-properties", source=plain)


def test_link_source_of_a_source_that_is_not_precomputed_is_refused_before_output(tmp_path, labels):
    """--link-source used to be ignored where there is no precomputed info to link the meshes
    into; now it is bad input: one line, status 2, nothing written."""
    from gpumesh.pipeline import run_mesh
    from conftest import cli_command

    with pytest.raises(ValueError, match="not a precomputed volume"):
        run_mesh(labels, str(tmp_path / "api"), voxel_size=(8, 8, 30), link_source=True, workers=1)
    assert not (tmp_path / "api").exists()
    src = tmp_path / "v.zarr"
    write_ts({"driver": "zarr3", "kvstore": str(src)}, labels)
    r = subprocess.run(cli_command() + ["mesh", str(src), str(tmp_path / "cli"), "--voxel-size", "8,8,30",
                                        "--link-source"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"gpumesh: error: link_source (--link-source) names the meshes in a precomputed source's info; "
        f"zarr v3 {src} (mip 0) is not a precomputed volume"], r.stderr
    assert not (tmp_path / "cli").exists()


def test_n5_levels_with_pixel_resolution_and_downsampling_factors(tmp_path, labels):
    # n5-spark, n5-ij and n5-viewer write the full-resolution voxel size as every level's
    # pixelResolution, with the level's downsamplingFactors beside it, and read the level as
    # their product: mip 1 was meshed at half size
    root = tmp_path / "spark.n5"
    low = labels[::2, ::2, :].copy()
    for i, (arr, f) in enumerate([(labels, [1, 1, 1]), (low, [2, 2, 1])]):
        write_ts({"driver": "n5", "kvstore": str(root / f"s{i}"), "metadata": {"compression": {"type": "raw"}}}, arr)
        edit_json(root / f"s{i}" / "attributes.json",
                  lambda a, f=f: a.update(pixelResolution={"dimensions": [4, 4, 40], "unit": "nm"},
                                          downsamplingFactors=f))
    (root / "attributes.json").write_text(json.dumps({"n5": "2.0.0"}))
    np.testing.assert_allclose(open_volume(str(root)).voxel_size, [4, 4, 40])
    np.testing.assert_allclose(open_volume(str(root), mip=1).voxel_size, [8, 8, 40])
    np.testing.assert_allclose(open_volume(str(root / "s1")).voxel_size, [8, 8, 40])   # the level alone
    # a level's own resolution (paintera, BigCat) is the level's: not multiplied
    edit_json(root / "s1" / "attributes.json", lambda a: a.update(resolution=[8, 8, 40]))
    np.testing.assert_allclose(open_volume(str(root), mip=1).voxel_size, [8, 8, 40])


def test_n5_pixel_resolution_unit_is_converted_to_nm(tmp_path, labels):
    # n5-spark / BigDataViewer write pixelResolution as {"dimensions": [...], "unit": "um"}
    path = tmp_path / "um.n5"
    write_ts({"driver": "n5", "kvstore": str(path), "metadata": {"compression": {"type": "raw"}}}, labels)
    edit_json(path / "attributes.json",
              lambda a: a.update(pixelResolution={"dimensions": [0.004, 0.008, 0.04], "unit": "um"}))
    np.testing.assert_allclose(open_volume(str(path)).voxel_size, [4, 8, 40])
    edit_json(path / "attributes.json",
              lambda a: a.update(pixelResolution={"dimensions": [4, 8, 40], "unit": "nm"}, units=["um"] * 3))
    np.testing.assert_allclose(open_volume(str(path)).voxel_size, [4, 8, 40])   # the object's own unit wins


def test_names_with_some_but_not_all_of_x_y_z_are_refused(tmp_path, labels):
    # c, y, x (a 2-D image with a channel) was read in storage order as x, y, z: the stored x
    # meshed as z
    path = tmp_path / "cyx.zarr"
    write_ts({"driver": "zarr3", "kvstore": str(path), "metadata": {"dimension_names": ["c", "y", "x"]}},
             labels[:1].copy())
    with pytest.raises(InvalidVolumeError, match=r"names its axes \['c', 'y', 'x'\]: not each of x, y, z once"):
        open_volume(str(path))
    check_read(open_volume(str(path), axes="zyx"), labels[:1].transpose(2, 1, 0))   # axes= still overrides
    # names without x, y or z (dim_0, ...), or malformed ones, leave the storage order
    path = tmp_path / "v2.zarr"
    write_ts({"driver": "zarr", "kvstore": str(path)}, labels)
    for names in (["dim_0", "dim_1", "dim_2"], 3):
        (path / ".zattrs").write_text(json.dumps({"_ARRAY_DIMENSIONS": names}))
        check_read(open_volume(str(path)), labels)


def test_axis_names_that_repeat_a_spatial_axis_are_refused(tmp_path, labels):
    path = tmp_path / "dup.zarr"   # zarr v2: the names are xarray's, which TensorStore does not check
    write_ts({"driver": "zarr", "kvstore": str(path)}, labels[..., None].copy())
    (path / ".zattrs").write_text(json.dumps({"_ARRAY_DIMENSIONS": ["x", "y", "z", "z"]}))
    with pytest.raises(InvalidVolumeError, match="not each of x, y, z once"):
        open_volume(str(path))
    check_read(open_volume(str(path), axes="xyzc"), labels)   # axes= overrides the names


def test_ome_zarr_before_axes_is_t_c_z_y_x_and_without_scale_has_no_voxel_size(tmp_path, labels):
    zyx = np.ascontiguousarray(labels.transpose(2, 1, 0))[None, None]   # t, c, z, y, x
    root = tmp_path / "old.zarr"
    write_ts({"driver": "zarr", "kvstore": str(root / "0")}, zyx)
    _write_ome_group(root, [{"version": "0.2", "datasets": [{"path": "0"}]}])
    vol = open_volume(str(root))
    check_read(vol, labels)   # was read as x = z
    # no scale: 1 nm voxels, not known (it was taken as known, so no NoVoxelSizeWarning)
    assert not vol.voxel_size_known


def test_funlib_offset_in_nm_beside_resolution(tmp_path, labels):
    path = tmp_path / "funlib.zarr"
    write_ts({"driver": "zarr", "kvstore": str(path)}, np.ascontiguousarray(labels.transpose(2, 1, 0)))
    (path / ".zattrs").write_text(json.dumps({"resolution": [40, 8, 4], "offset": [400, 80, 40]}))   # z, y, x; nm
    vol = open_volume(str(path), axes="zyx")
    np.testing.assert_array_equal(vol.voxel_size, [4, 8, 40])
    np.testing.assert_array_equal(vol.voxel_offset, [10, 10, 10])   # was (0, 0, 0): meshes at the origin
    (path / ".zattrs").write_text(json.dumps({"resolution": [40, 8, 4], "offset": [400, 80, 42]}))
    with pytest.warns(UserWarning, match="not a whole number of voxels"):
        np.testing.assert_array_equal(open_volume(str(path), axes="zyx").voxel_offset, [0, 0, 0])


def test_mip_of_an_opened_tensorstore_is_refused_not_ignored(tmp_path, labels):
    path = tmp_path / "pc"
    write_ts({"driver": "neuroglancer_precomputed", "kvstore": str(path),
              "scale_metadata": {"resolution": [4, 4, 40], "encoding": "raw", "chunk_size": [8, 8, 8]},
              "multiscale_metadata": {"type": "segmentation", "num_channels": 1}}, labels[..., None])
    store = ts.open({"driver": "neuroglancer_precomputed", "kvstore": {"driver": "file", "path": str(path)}}).result()
    with pytest.raises(SourceReadError, match="is one scale"):
        open_volume(store, mip=1)
    with pytest.raises(SourceReadError, match="is one scale"):
        open_volume({"driver": "neuroglancer_precomputed", "kvstore": {"driver": "file", "path": str(path)},
                     "scale_index": 0}, mip=1)
    check_read(open_volume(store), labels)


def test_a_kvstore_spec_is_a_location_whose_format_is_detected(tmp_path, labels):
    path = tmp_path / "n.n5"
    write_ts({"driver": "n5", "kvstore": str(path), "metadata": {"compression": {"type": "raw"}}}, labels)
    edit_json(path / "attributes.json", lambda a: a.update(resolution=[4, 6, 40]))
    vol = open_volume({"driver": "file", "path": str(path)})
    check_read(vol, labels)
    np.testing.assert_array_equal(vol.voxel_size, [4, 6, 40])
    assert "N5" in vol.description


@pytest.mark.parametrize("fmt", ["zarr3", "zarr", "n5"])
def test_a_spec_or_tensorstore_of_a_stored_array_reads_its_metadata_as_its_path_does(tmp_path, labels, fmt):
    """Voxel size, voxel offset and axis names come from the array's attributes whether it is
    given by path, by TensorStore spec or as an opened TensorStore (a spec read none of them:
    no voxel size, and a zarr v2 array named z, y, x was meshed with x and z swapped).  A view
    (here a crop that moves the origin) no longer lines up with the stored metadata: its
    attributes are not read."""
    path = tmp_path / f"v.{fmt}"
    if fmt == "n5":
        write_ts({"driver": "n5", "kvstore": str(path), "metadata": {"compression": {"type": "raw"}}},
                 np.ascontiguousarray(labels.transpose(2, 1, 0)))
        edit_json(path / "attributes.json", lambda a: a.update(axes=["z", "y", "x"], resolution=[45, 5, 4]))
        vs, vo = [4, 5, 45], [0, 0, 0]
    elif fmt == "zarr3":
        write_ts({"driver": "zarr3", "kvstore": str(path), "metadata": {"dimension_names": ["z", "y", "x"]}},
                 np.ascontiguousarray(labels.transpose(2, 1, 0)))
        edit_json(path / "zarr.json", lambda m: m.setdefault("attributes", {}).update(
            voxel_size_nm=[40, 8, 4], voxel_offset=[3, 2, 1]))
        vs, vo = [4, 8, 40], [1, 2, 3]
    else:
        write_ts({"driver": "zarr", "kvstore": str(path)}, np.ascontiguousarray(labels.transpose(2, 1, 0)))
        (path / ".zattrs").write_text(json.dumps({"_ARRAY_DIMENSIONS": ["z", "y", "x"], "resolution": [40, 6, 4],
                                                  "offset": [400, 60, 40]}))   # funlib: nm
        vs, vo = [4, 6, 40], [10, 10, 10]
    spec = {"driver": fmt, "kvstore": {"driver": "file", "path": str(path)}}
    for source in (str(path), spec, ts.open(spec).result()):
        vol = open_volume(source)
        check_read(vol, labels)
        assert vol.voxel_size_known, type(source)
        np.testing.assert_array_equal(vol.voxel_size, vs)
        np.testing.assert_array_equal(vol.voxel_offset, vo)
    moved = ts.open(spec).result()
    moved = moved[ts.d[:].translate_by[1]]   # the view's index 1 is the stored 0: attributes are not read
    assert not open_volume(moved).voxel_size_known


@pytest.mark.parametrize("fmt", ["zarr3", "zarr", "n5"])
def test_a_view_cropped_at_the_low_end_keeps_the_arrays_voxel_size_and_places_the_crop(tmp_path, labels, fmt):
    # a crop keeps the stored coordinates (the transform is the identity on a smaller box): the
    # voxel size still applies, and the crop's first voxel is the stored offset plus its origin,
    # as at the high end (it read no voxel size, so the crop was meshed in voxels)
    path = tmp_path / f"v.{fmt}"
    if fmt == "n5":
        write_ts({"driver": "n5", "kvstore": str(path), "metadata": {"compression": {"type": "raw"}}}, labels)
        edit_json(path / "attributes.json", lambda a: a.update(resolution=[4, 5, 45]))
        vs, vo = [4, 5, 45], [0, 0, 0]
    else:
        write_ts({"driver": fmt, "kvstore": str(path)}, labels)
        key = "zarr.json" if fmt == "zarr3" else ".zattrs"
        if fmt == "zarr":
            (path / key).write_text("{}")
        edit_json(path / key, lambda m: (m.setdefault("attributes", {}) if fmt == "zarr3" else m).update(
            voxel_size_nm=[4, 5, 45], voxel_offset=[100, 200, 300]))
        vs, vo = [4, 5, 45], [100, 200, 300]
    spec = {"driver": fmt, "kvstore": {"driver": "file", "path": str(path)}}
    low = {**spec, "transform": {"input_inclusive_min": [2, 3, 4], "input_exclusive_max": list(labels.shape)}}
    for source in (low, ts.open(spec).result()[2:, 3:, 4:]):
        vol = open_volume(source)
        assert vol.voxel_size_known, type(source)
        np.testing.assert_array_equal(vol.voxel_size, vs)
        np.testing.assert_array_equal(vol.voxel_offset, np.add(vo, [2, 3, 4]))
        assert vol.shape == tuple(np.subtract(labels.shape, [2, 3, 4]))
        np.testing.assert_array_equal(vol.read((0, 0, 0), (3, 3, 3)), labels[2:5, 3:6, 4:7])
    np.testing.assert_array_equal(open_volume(low, voxel_offset=(1, 2, 3)).voxel_offset, [1, 2, 3])   # given: kept


def test_an_n5_tensorstore_whose_unit_gpumesh_does_not_know_opens_with_a_voxel_size_given(tmp_path, labels):
    # as its path does: the resolution is not read when the voxel size is given (it raised
    # "unknown length unit" however it was given); without one, the error names the attribute
    path = tmp_path / "px.n5"
    write_ts({"driver": "n5", "kvstore": str(path), "metadata": {"compression": {"type": "raw"}}}, labels)
    edit_json(path / "attributes.json", lambda a: a.update(pixelResolution={"dimensions": [1, 1, 1], "unit": "pixel"}))
    spec = {"driver": "n5", "kvstore": {"driver": "file", "path": str(path)}}
    for source in (str(path), spec, ts.open(spec).result()):
        vol = open_volume(source, voxel_size=(4, 4, 40))
        np.testing.assert_array_equal(vol.voxel_size, [4, 4, 40])
        check_read(vol, labels)
        with pytest.raises(SourceReadError, match="unknown length unit 'pixel'"):
            open_volume(source)
    edit_json(path / "attributes.json", lambda a: a.update(pixelResolution=[4, 0, 40]))
    for source in (str(path), spec, ts.open(spec).result()):
        with pytest.raises(InvalidVoxelSizeError, match="resolution must be") as info:
            open_volume(source)
        assert "voxel_size_nm" not in str(info.value)   # an attribute the array does not have


@pytest.mark.parametrize("bad", [["4", "4", "40"], [4, None, 40]])
def test_n5_resolution_entries_that_are_not_numbers_are_a_voxel_size_error(tmp_path, labels, bad):
    # "4" * 1.0 raised a bare TypeError from open_volume (the CLI's traceback)
    path = tmp_path / "bad.n5"
    write_ts({"driver": "n5", "kvstore": str(path), "metadata": {"compression": {"type": "raw"}}}, labels)
    edit_json(path / "attributes.json", lambda a: a.update(pixelResolution=bad))
    spec = {"driver": "n5", "kvstore": {"driver": "file", "path": str(path)}}
    for source in (str(path), spec, ts.open(spec).result()):
        with pytest.raises(InvalidVoxelSizeError, match="resolution"):
            open_volume(source)
        np.testing.assert_array_equal(open_volume(source, voxel_size=(4, 4, 40)).voxel_size, [4, 4, 40])
