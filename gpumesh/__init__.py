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

from .pipeline import MeshOptions, Summary, run_mesh
from .reader import load_mesh, open_mesh
from .validate import validate
from .volume import Volume, open_volume


def __getattr__(name):
    # mesh_segment is imported on first use, so that the main job's worker processes (which
    # need only gpumesh.pipeline) do not also import trimesh and the ad-hoc module
    if name == "mesh_segment":
        from .adhoc import mesh_segment

        globals()[name] = mesh_segment
        return mesh_segment
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | {"mesh_segment"})


__version__ = "0.1.0"

__all__ = [
    "DestinationExistsError", "EmptyVolumeWarning", "GpumeshError", "InvalidMeshError", "InvalidVolumeError",
    "InvalidVoxelSizeError", "SourceReadError", "MeshOptions", "Summary", "run_mesh", "load_mesh", "open_mesh",
    "validate", "Volume", "open_volume", "mesh_segment",
]
