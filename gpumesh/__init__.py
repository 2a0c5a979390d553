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
from .adhoc import mesh_segment
from .pipeline import MeshOptions, Summary, run_mesh
from .reader import load_mesh, open_mesh
from .validate import validate
from .volume import Volume, open_volume

__version__ = "0.1.0"

__all__ = [
    "DestinationExistsError", "EmptyVolumeWarning", "GpumeshError", "InvalidMeshError", "InvalidVolumeError",
    "InvalidVoxelSizeError", "SourceReadError", "MeshOptions", "Summary", "run_mesh", "load_mesh", "open_mesh",
    "validate", "Volume", "open_volume", "mesh_segment",
]
