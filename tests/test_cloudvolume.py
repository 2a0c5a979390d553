"""cloud-volume, an independent reader, reads what gpumesh writes as gpumesh's reader does.

cloud-volume (the reader igneous and many notebooks use: ``CloudVolume(...).mesh.get(id,
lod=k)``) decodes the manifests, the Draco fragments, ``vertex_offsets`` and the shards on its
own.  Every output kind is read by both, a sample of segments at every LOD: the same
triangles, vertices within 0.01 nm, where cloud-volume's only extra triangles are the
placeholder fragments of empty parent nodes (zero area, at a child's vertex), which gpumesh's
reader leaves out.  Includes anisotropic voxels, whose LODs have per-axis ``vertex_offsets``.

cloud-volume is in the ``dev`` extra, so the default run reads with it (it is, with the
browser test, the one independent reader of the whole output); ``GPUMESH_CLOUDVOLUME_PYTHON``
names another Python that imports it (an igneous environment), and without either the test
is skipped.  It runs that Python on ``tests/cv_reader/read_meshes.py``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from conftest import CROP_START
from surface import nearest_vertex

PYTHON = os.environ.get("GPUMESH_CLOUDVOLUME_PYTHON") or (
    sys.executable if importlib.util.find_spec("cloudvolume") is not None else None)
READER = pathlib.Path(__file__).resolve().parent / "cv_reader" / "read_meshes.py"

pytestmark = pytest.mark.skipif(not PYTHON, reason="cloud-volume is not installed here (the dev extra), nor named by GPUMESH_CLOUDVOLUME_PYTHON")

KINDS = {   # name: voxel size (nm), MeshOptions
    "unsharded": ((32, 32, 40), {}),
    "sharded": ((32, 32, 40), {"sharded": True}),
    "anisotropic-sharded": ((8, 8, 40), {"sharded": True}),
    "anisotropic-10bit": ((8, 8, 40), {"sharded": True, "vertex_quantization_bits": 10}),
    "legacy": ((32, 32, 40), {"format": "legacy"}),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_cloudvolume_reads_the_meshes_gpumesh_reads(kind, crop, tmp_path):
    from gpumesh import load_mesh, open_mesh
    from gpumesh.pipeline import MeshOptions, run_mesh
    from gpumesh.sharding import ShardingOptions

    voxel_size, kw = KINDS[kind]
    kw = dict(kw)
    sharding = ShardingOptions() if kw.pop("sharded", False) else None
    run_mesh(crop, str(tmp_path / "mesh"), options=MeshOptions(chunk_size=32, max_lods=3, sharding=sharding, **kw),
             voxel_size=voxel_size, voxel_offset=CROP_START, workers=1)
    (tmp_path / "info").write_text(json.dumps({
        "@type": "neuroglancer_multiscale_volume", "type": "segmentation", "data_type": "uint32", "num_channels": 1,
        "mesh": "mesh", "scales": [{"key": "s0", "size": list(crop.shape), "resolution": list(voxel_size),
                                    "voxel_offset": list(CROP_START), "chunk_sizes": [[64, 64, 64]],
                                    "encoding": "raw"}]}))
    src = open_mesh(str(tmp_path / "mesh"))
    ids = sorted(int(s) for s in src.segment_ids())
    sample = np.random.default_rng(1).choice(ids, 12, replace=False).tolist()
    lods = {str(s): (1 if kind == "legacy" else src.manifest(s).num_lods) for s in sample}
    assert max(lods.values()) == (1 if kind == "legacy" else 3)
    (tmp_path / "request.json").write_text(json.dumps(lods))
    out = tmp_path / "read"
    out.mkdir()
    r = subprocess.run([PYTHON, str(READER), str(tmp_path), str(tmp_path / "request.json"), str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    placeholders = 0
    for seg, n in lods.items():
        for k in range(n):
            ours = load_mesh(src, int(seg), lod=k)
            ov, of = np.asarray(ours.vertices), np.asarray(ours.faces)
            theirs = np.load(out / f"{seg}_{k}.npz")
            v, f = theirs["vertices"], theirs["faces"]
            d, nearest = nearest_vertex(v, ov, np.full(3, 64.0), 1.0)   # nm
            mine = d < 0.01
            extra = ~mine[f].all(axis=1)        # a vertex that is none of ours: a placeholder's
            ex = f[extra]
            area = np.linalg.norm(np.cross(v[ex[:, 1]] - v[ex[:, 0]], v[ex[:, 2]] - v[ex[:, 0]]), axis=1)
            assert np.all(area < 1e-6), f"{kind} segment {seg} LOD {k}: triangles off our vertices"
            placeholders += int(extra.sum())
            got = Counter(tuple(sorted(t)) for t in nearest[f[~extra]].tolist())
            assert got == Counter(tuple(sorted(t)) for t in of.tolist()), f"{kind} segment {seg} LOD {k}"
            assert len(np.unique(nearest[mine])) == len(ov), f"{kind} segment {seg} LOD {k}: vertices missing"
    if kind == "legacy":
        assert placeholders == 0
