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

from .errors import (DestinationExistsError, EmptyVolumeWarning, GpumeshError, InvalidMeshError,
                     InvalidVolumeError, InvalidVoxelSizeError, SourceReadError)

# The rest is imported on first use, so that a worker process of the main job (which needs only
# gpumesh.pipeline) does not also import trimesh and the ad-hoc, reader and validator modules.
_LAZY = {
    "mesh_segment": "adhoc", "MeshOptions": "pipeline", "Summary": "pipeline", "run_mesh": "pipeline",
    "load_mesh": "reader", "open_mesh": "reader", "validate": "validate", "Volume": "volume",
    "open_volume": "volume",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [
    "DestinationExistsError", "EmptyVolumeWarning", "GpumeshError", "InvalidMeshError", "InvalidVolumeError",
    "InvalidVoxelSizeError", "SourceReadError", "MeshOptions", "Summary", "run_mesh", "load_mesh", "open_mesh",
    "validate", "Volume", "open_volume", "mesh_segment",
]
