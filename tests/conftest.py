"""Shared fixtures: the real pinky40 cutout from ../shared/data, and meshes of a crop of it."""

from __future__ import annotations

import os
import pathlib
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# GPUMESH_DATA: the data folder where ../shared/data is not beside the checkout (a lent GPU
# machine, see bench/device/)
SHARED = pathlib.Path(os.environ.get("GPUMESH_DATA", REPO.parent / "shared" / "data"))
REAL_ZARR = SHARED / "connectomics.zarr"
VOXEL_SIZE = (32.0, 32.0, 40.0)

# A 128^3 crop of the real volume (voxels [192, 320) on each axis), meshed with 32-voxel
# LOD 0 nodes and 3 LODs so that several blocks, nodes and LODs are exercised.
CROP_START = (192, 192, 192)
CROP_SIZE = 128


def cli_command() -> list:
    """The ``gpumesh`` command of this environment (its console script, else ``python -m``)."""
    exe = os.path.join(os.path.dirname(sys.executable), "gpumesh")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "gpumesh.cli"]


def write_zarr(path, arr, chunk: int = 64) -> None:
    """Write ``arr`` (axes x, y, z) as a zarr v3 volume at ``path``, in ``chunk``-voxel cubes."""
    import tensorstore as ts

    spec = {
        "driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)},
        "metadata": {"shape": list(arr.shape), "data_type": str(arr.dtype), "dimension_names": ["x", "y", "z"],
                     "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [chunk] * 3}}},
    }
    ts.open(spec, create=True).result().write(arr).result()


def tree_files(root) -> dict:
    """Every file under ``root`` (relative path -> bytes)."""
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


#: Set (to 1) where a GPU must be used, as the device kit does: the `gpu` tests then fail
#: instead of skipping when CuPy sees none (a driver mismatch skipped them all, and the run
#: passed).
REQUIRE_GPU_ENV = "GPUMESH_REQUIRE_GPU"


def gpu_present() -> bool:
    """Whether CuPy sees a CUDA device; with :data:`REQUIRE_GPU_ENV` set, why it does not
    is raised instead of ``False``."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        if os.environ.get(REQUIRE_GPU_ENV) == "1":
            raise
        return False


def pytest_collection_modifyitems(config, items):
    try:
        if gpu_present():
            return
        why = "the gpu tests would skip"
    except Exception as e:  # noqa: BLE001 - REQUIRE_GPU_ENV is set: why, in one line (not INTERNALERROR)
        why = f"{type(e).__name__}: {e}"
    if os.environ.get(REQUIRE_GPU_ENV) == "1":
        raise pytest.UsageError(f"{REQUIRE_GPU_ENV}=1 but CuPy sees no CUDA device: {why}")
    skip = pytest.mark.skip(reason="needs a CUDA GPU with CuPy")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _environment_restored():
    """Each test leaves ``os.environ`` as it found it.  A Dask ``LocalCluster`` sets
    ``OMP_NUM_THREADS`` and more in this process for good; a changed environment makes the
    worker server's later pools spawn their workers (``workerserver.context``), which
    ``test_workers_are_forked_from_a_server_that_has_gpumesh_loaded`` then saw, depending on
    the order the tests ran in."""
    saved = dict(os.environ)
    yield
    if dict(os.environ) != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(autouse=True)
def _temporary_folder_on_disk(monkeypatch):
    """The assembly takes ``TMPDIR`` for a disk whatever this machine's is (where it is a
    tmpfs, the index spill is not grouped by wave, which the tests of the waves count on);
    the tests of a tmpfs say so themselves."""
    monkeypatch.setattr("gpumesh.writer.MOUNTS", os.devnull)


@pytest.fixture
def unwelded_fragments(monkeypatch) -> dict:
    """Watch every fragment the main job hands to the Draco encoder (in this process, so
    ``workers=1``): ``{"encoded": n, "unwelded": [...]}``, where ``unwelded`` lists the triangle
    counts of the fragments that repeat a quantized position or that hold a triangle repeating a
    vertex.  (A decoded fragment may still repeat a position: Draco splits a vertex where two
    sheets of a thin segment meet at it after decimation.)"""
    from gpumesh import encode

    seen = {"encoded": 0, "unwelded": []}
    real = encode.encode_draco

    def encode_draco(q, faces, bits):
        f = np.asarray(faces)
        seen["encoded"] += 1
        if len(np.unique(q, axis=0)) != len(q) or not (np.diff(np.sort(f, axis=1), axis=1) > 0).all():
            seen["unwelded"].append(len(f))
        return real(q, faces, bits)

    monkeypatch.setattr(encode, "encode_draco", encode_draco)
    return seen


@pytest.fixture(scope="session")
def real_zarr() -> pathlib.Path:
    if not REAL_ZARR.exists():
        pytest.skip(f"real data not found at {REAL_ZARR}")
    return REAL_ZARR


@pytest.fixture(scope="session")
def crop(real_zarr) -> np.ndarray:
    """(128, 128, 128) uint32 labels, axes x, y, z."""
    import tensorstore as ts

    t = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(real_zarr)}}).result()
    s = CROP_START
    return t[s[0]:s[0] + CROP_SIZE, s[1]:s[1] + CROP_SIZE, s[2]:s[2] + CROP_SIZE].read().result()


def _mesh_crop(crop, dest, **kw):
    from gpumesh.pipeline import MeshOptions, run_mesh

    options = MeshOptions(chunk_size=32, max_lods=3, **kw)
    return run_mesh(crop, str(dest), options=options, voxel_size=VOXEL_SIZE, voxel_offset=CROP_START, workers=1)


@pytest.fixture(scope="session")
def crop_high(crop, tmp_path_factory):
    """Multi-resolution meshes of the crop with LOD 0 undecimated (quality high)."""
    dest = tmp_path_factory.mktemp("crop_high")
    summary = _mesh_crop(crop, dest, quality="high")
    return dest, summary


@pytest.fixture(scope="session")
def crop_medium(crop, tmp_path_factory):
    """Multi-resolution meshes of the crop at the default preset (medium)."""
    dest = tmp_path_factory.mktemp("crop_medium")
    summary = _mesh_crop(crop, dest)
    return dest, summary
