"""Read meshes with cloud-volume, run under a Python that has it (see tests/test_cloudvolume.py).

    python read_meshes.py VOLUME_DIR REQUEST_JSON OUT_DIR

``REQUEST_JSON``: ``{"segment id": number of LODs, ...}``; ``VOLUME_DIR`` a precomputed volume
whose ``info`` names the mesh directory (``"mesh"``).  Writes ``OUT_DIR/<id>_<lod>.npz`` with
cloud-volume's ``vertices`` (nm) and ``faces``.  Only cloud-volume and NumPy are imported.
"""

import json
import sys

import numpy as np
from cloudvolume import CloudVolume

volume, request, out = sys.argv[1:4]
cv = CloudVolume(f"file://{volume}", progress=False)
legacy = cv.mesh.meta.info.get("@type") != "neuroglancer_multilod_draco"
for seg, lods in json.load(open(request)).items():
    for lod in range(lods):
        mesh = cv.mesh.get(int(seg)) if legacy else cv.mesh.get(int(seg), lod=lod)
        mesh = mesh[int(seg)] if isinstance(mesh, dict) else mesh
        np.savez(f"{out}/{seg}_{lod}.npz", vertices=np.asarray(mesh.vertices, np.float64),
                 faces=np.asarray(mesh.faces, np.int64))
print("read", len(json.load(open(request))), "segments")
