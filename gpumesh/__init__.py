"""gpumesh: GPU-accelerated meshing of segmentation volumes into Neuroglancer precomputed meshes.

Main entry points
-----------------
- :func:`run_mesh` (``gpumesh mesh``): mesh every segment of a label volume into a
  multi-resolution (``neuroglancer_multilod_draco``) or legacy mesh directory.
- :func:`open_volume`: open a label volume (zarr v2/v3, N5, precomputed, OME-Zarr, NumPy).
- :func:`load_mesh`: one segment at one LOD as a ``trimesh.Trimesh`` in model space (nm).
- :func:`validate` (``gpumesh validate``): check a mesh directory against the spec and the
  Neuroglancer client's stricter rules.
"""

# before any kernel module: numba needs a writable cache directory when a kernel is defined
from ._caches import ensure_numba_cache_dir as _ensure_numba_cache_dir

_ensure_numba_cache_dir()

from .errors import (DestinationError, DestinationExistsError, DestinationTakenError, DeviceUnavailableError,
                     EmptyVolumeWarning, GpumeshError, IndexInMemoryWarning, InvalidMeshError, InvalidVolumeError,
                     InvalidVoxelSizeError, NoVoxelSizeWarning, SegmentCutWarning, SegmentNotFoundError,
                     SegmentsNotFoundWarning, SourceReadError, StorageUnreachableError, TaskFailedError,
                     VoxelSizeOverrideWarning, WorkerFailedError)
# eager: the function must stay gpumesh.validate once the submodule gpumesh.validate is imported
from .validate import validate

# The other entry points are imported on first use, so that ``import gpumesh.cli`` (the command
# line) stays light: the CLI starts the main job's worker server (gpumesh.workerserver) before
# it imports numba and the pipeline itself, and the main job's worker processes import only
# gpumesh.pipeline (not trimesh and the ad-hoc module).
_LAZY = {
    "MeshOptions": "pipeline", "Summary": "pipeline", "run_mesh": "pipeline", "ShardingOptions": "sharding",
    "load_mesh": "reader", "open_mesh": "reader",
    "Volume": "volume", "open_volume": "volume", "mesh_segment": "adhoc",
}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [
    "DestinationError", "DestinationExistsError", "DestinationTakenError", "DeviceUnavailableError",
    "EmptyVolumeWarning", "GpumeshError", "IndexInMemoryWarning",
    "InvalidMeshError", "InvalidVolumeError", "InvalidVoxelSizeError", "NoVoxelSizeWarning", "SegmentCutWarning",
    "SegmentNotFoundError", "SegmentsNotFoundWarning", "VoxelSizeOverrideWarning", "SourceReadError",
    "StorageUnreachableError", "TaskFailedError", "WorkerFailedError", "MeshOptions",
    "ShardingOptions", "Summary", "run_mesh",
    "load_mesh", "open_mesh", "validate", "Volume", "open_volume", "mesh_segment",
]
