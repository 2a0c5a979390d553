"""The main job against an S3 API (a moto server standing in for S3, MinIO or Ceph): a volume
read from a bucket, meshes written to one, the bytes of a run on local files, and the CLI's
ways to name such a store (an ``s3://`` URL with ``AWS_ENDPOINT_URL``, or a JSON spec)."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
import tensorstore as ts

from gpumesh import run_mesh, validate
from gpumesh.export import export_segment
from gpumesh.pipeline import MeshOptions

from conftest import VOXEL_SIZE, cli_command, tree_files, write_zarr

moto_server = pytest.importorskip("moto.server")

BUCKET = "gpumesh-s3-test"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def endpoint():
    """An S3 endpoint (``http://127.0.0.1:PORT``) with an empty bucket :data:`BUCKET`."""
    import boto3

    with pytest.MonkeyPatch.context() as mp:
        for k, v in CREDENTIALS.items():
            mp.setenv(k, v)
        server = moto_server.ThreadedMotoServer(port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            url = f"http://{host}:{port}"
            boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket=BUCKET)
            yield url
        finally:
            server.stop()


def s3(endpoint, path: str) -> dict:
    return {"driver": "s3", "bucket": BUCKET, "path": path, "endpoint": endpoint}


def s3_files(spec: dict) -> dict:
    """Every key under ``spec`` (relative key -> bytes), as :func:`tree_files` gives a folder's."""
    kv = ts.KvStore.open(spec).result()
    return {k.decode(): kv.read(k).result().value for k in kv.list().result()}


@pytest.fixture(scope="module")
def s3_crop(endpoint, crop, tmp_path_factory):
    """The crop as a zarr v3 volume on local disk and the same bytes in the bucket."""
    local = tmp_path_factory.mktemp("s3") / "crop.zarr"
    write_zarr(local, crop[:96, :96, :96], chunk=32)
    kv = ts.KvStore.open(s3(endpoint, "crop.zarr/")).result()
    for name, data in tree_files(local).items():
        kv.write(name.replace(os.sep, "/"), data).result()
    return local


def test_the_cli_meshes_a_volume_in_a_bucket_into_a_bucket_with_the_bytes_of_local_files(endpoint, s3_crop, tmp_path):
    # s3:// URLs reach another endpoint than AWS's through AWS_ENDPOINT_URL, as the AWS CLI's
    # do (TensorStore reads no such variable); a DEST given as a JSON spec was taken as the
    # name of a local folder, '{"driver": ...', and the meshes went there
    env = dict(os.environ, **CREDENTIALS, AWS_ENDPOINT_URL=endpoint)
    args = ["--voxel-size", "32,32,40", "--chunk-size", "32", "--quiet"]
    local = tmp_path / "local"
    r = subprocess.run(cli_command() + ["mesh", str(s3_crop), str(local)] + args,
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    dest = json.dumps({"driver": "s3", "bucket": BUCKET, "path": "cli-mesh/"})
    r = subprocess.run(cli_command() + ["mesh", f"s3://{BUCKET}/crop.zarr", dest] + args,
                       capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert os.listdir(tmp_path) == ["local"]   # nothing written beside it
    assert s3_files(s3(endpoint, "cli-mesh/")) == {k.replace(os.sep, "/"): v for k, v in tree_files(local).items()}
    r = subprocess.run(cli_command() + ["validate", f"s3://{BUCKET}/cli-mesh/"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    # a DEST that holds a mesh is refused without --overwrite, and replaced with it
    r = subprocess.run(cli_command() + ["mesh", f"s3://{BUCKET}/crop.zarr", dest] + args,
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 2 and "not empty; pass --overwrite to replace the mesh there" in r.stderr, r.stderr
    r = subprocess.run(cli_command() + ["mesh", f"s3://{BUCKET}/crop.zarr", dest, "--overwrite", "--format", "legacy"]
                       + args, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert "info" in s3_files(s3(endpoint, "cli-mesh/")) and "0.shard" not in s3_files(s3(endpoint, "cli-mesh/"))
    r = subprocess.run(cli_command() + ["mesh", str(s3_crop), "{not json"] + args,
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 2 and "is not a JSON spec" in r.stderr


@pytest.mark.filterwarnings("ignore::gpumesh.cluster.StillRunningNotice")
def test_run_mesh_from_and_to_a_bucket_given_as_kvstore_specs_resumes_to_the_same_bytes(endpoint, s3_crop, tmp_path):
    options = MeshOptions(chunk_size=32, max_lods=2)
    local = tmp_path / "local"
    run_mesh(str(s3_crop), str(local), options=options, voxel_size=VOXEL_SIZE, workers=1)
    source, dest = s3(endpoint, "crop.zarr/"), s3(endpoint, "api-mesh/")

    def stop(done, total):
        if done >= total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):   # a kvstore spec as the source: its format detected
        run_mesh(source, dest, options=options, voxel_size=VOXEL_SIZE, workers=2, progress=stop)
    assert "info" not in s3_files(dest)
    summary = run_mesh(source, dest, options=options, voxel_size=VOXEL_SIZE, workers=2, resume=True)
    assert summary.tasks_resumed > 0
    assert s3_files(dest) == {k.replace(os.sep, "/"): v for k, v in tree_files(local).items()}
    assert validate(dest).ok
    segment = int(np.bincount(np.asarray(ts.open({"driver": "zarr3", "kvstore": source}).result()
                                        .read().result()).ravel())[1:].argmax() + 1)
    mesh = export_segment(dest, segment, str(tmp_path / "one.stl"))
    assert len(mesh.faces) > 0 and mesh.is_watertight


def test_a_dask_cluster_reads_and_writes_the_bucket_at_this_process_endpoint(endpoint, s3_crop, tmp_path,
                                                                             monkeypatch):
    # workers started before AWS_ENDPOINT_URL was set (another host's, say) do not see it: the
    # job sends it to them, with the source and the destination
    distributed = pytest.importorskip("distributed")
    options = MeshOptions(chunk_size=32, max_lods=2)
    local = tmp_path / "local"
    run_mesh(str(s3_crop), str(local), options=options, voxel_size=VOXEL_SIZE, workers=1)
    for k, v in CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            distributed.Client(cluster) as client:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        assert not any(client.run(lambda: "AWS_ENDPOINT_URL" in os.environ).values())
        summary = run_mesh(f"s3://{BUCKET}/crop.zarr", f"s3://{BUCKET}/dask-mesh/", options=options,
                           voxel_size=VOXEL_SIZE, client=client)
    assert summary.workers == 2
    assert s3_files(s3(endpoint, "dask-mesh/")) == {k.replace(os.sep, "/"): v for k, v in tree_files(local).items()}


def test_an_array_jobs_parts_into_a_bucket_record_tasks_that_find_nothing_by_name(endpoint, tmp_path):
    """The parts of an array job writing into a bucket: a task that found only background
    leaves no object of its own (a PUT, a listing entry, a GET and a DELETE each on a cloud
    store), only its name in its part's record; the run after the parts writes the bytes of one
    run on local files, and leaves no scratch object."""
    from gpumesh.pipeline import SCRATCH, Plan

    vol = np.zeros((72, 64, 56), np.uint32)
    vol[3:20, 5:17, 2:14] = 7
    vol[10:15, 30:40, 4:9] = 9
    options = MeshOptions(chunk_size=8)
    tasks = Plan.make(vol.shape, options).tasks()
    local = tmp_path / "local"
    run_mesh(vol, str(local), options=options, voxel_size=VOXEL_SIZE, workers=1)
    dest = s3(endpoint, "parts-mesh/")
    for k, workers in ((0, 1), (1, 2)):
        run_mesh(vol, dest, options=options, voxel_size=VOXEL_SIZE, workers=workers, part=(k, 2))
    keys = list(s3_files(dest))
    results = [k for k in keys if k.startswith(SCRATCH + "blocks/")]
    records = [k for k in keys if k.startswith(SCRATCH + "empty/")]
    assert len(records) == 2 and 0 < len(results) < len(tasks) // 4
    last = run_mesh(vol, dest, options=options, voxel_size=VOXEL_SIZE, workers=2, resume=True)
    assert last.tasks_resumed == len(tasks)
    assert s3_files(dest) == {k.replace(os.sep, "/"): v for k, v in tree_files(local).items()}
