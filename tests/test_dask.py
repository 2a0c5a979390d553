"""The main job on a Dask cluster (gpumesh.cluster): the bytes of one local process, resume,
and the errors a cluster adds.  A LocalCluster of 2 worker processes stands in for a real one."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import numpy as np
import pytest
from distributed import Client, LocalCluster, WorkerPlugin

from gpumesh import run_mesh, validate
from gpumesh.pipeline import MeshOptions
from gpumesh.sharding import ShardingOptions

from conftest import CROP_START, VOXEL_SIZE, cli_command, tree_files, write_zarr


@pytest.fixture(autouse=True)
def _fresh_task_counts(monkeypatch):
    """Each test starts with no task counted as running in this process and no job's end asked
    for (gpumesh.cluster's _ACTIVE and _ENDING): else what one test leaves there (a job's end
    asked for while a task ran) decides what another one's tasks do as they finish."""
    import collections

    from gpumesh import cluster

    monkeypatch.setattr(cluster, "_ACTIVE", collections.Counter())
    monkeypatch.setattr(cluster, "_ENDING", set())


@pytest.fixture(scope="module")
def client():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as c:
        yield c


def test_a_cluster_writes_the_bytes_of_one_process(client, crop, crop_medium, tmp_path):
    # unsharded: the crop's session fixture (one process, in this one)
    dest = tmp_path / "unsharded"
    summary = run_mesh(crop, str(dest), options=MeshOptions(chunk_size=32, max_lods=3), voxel_size=VOXEL_SIZE,
                       voxel_offset=CROP_START, client=client)
    assert summary.workers == 2 and summary.device == "cpu"
    assert summary.segments == crop_medium[1].segments > 100
    assert tree_files(dest) == tree_files(crop_medium[0])
    # legacy, and sharded in 4 shards whose segments the workers build
    for name, options in [("legacy", MeshOptions(chunk_size=32, format="legacy", max_lods=1)),
                          ("sharded", MeshOptions(chunk_size=32, sharding=ShardingOptions(shard_bits=2)))]:
        one, many = tmp_path / f"{name}-1", tmp_path / f"{name}-dask"
        run_mesh(crop, str(one), options=options, workers=1)
        run_mesh(crop, str(many), options=options, client=client)
        assert tree_files(many) == tree_files(one), name
        assert validate(str(many)).ok


def test_a_cluster_writes_in_waves_the_bytes_of_one_process(client, crop, tmp_path, monkeypatch):
    """Past the assembly's index cap the cluster's workers write the shards wave by wave (two
    waves of two shards for two workers): the bytes of one process holding the index."""
    import gpumesh.writer as writer

    options = MeshOptions(chunk_size=32, sharding=ShardingOptions(shard_bits=2))
    one = tmp_path / "one"
    assert run_mesh(crop, str(one), options=options, workers=1).index_waves == 0
    monkeypatch.setattr(writer, "ASSEMBLY_INDEX_BYTES", 1)
    written = []
    summary = run_mesh(crop, str(tmp_path / "dask"), options=options, client=client,
                       write_progress=lambda d, t: written.append((d, t)))
    assert summary.workers == 2 and summary.index_waves == 2
    assert tree_files(tmp_path / "dask") == tree_files(one)
    assert written[-1] == (summary.segments, summary.segments)


@pytest.mark.filterwarnings("ignore::gpumesh.cluster.StillRunningNotice")   # Ctrl-C mid-run waits for its tasks
def test_an_interrupted_cluster_run_resumes(client, crop, tmp_path):
    options = MeshOptions(chunk_size=32, max_lods=2)
    whole = tmp_path / "whole"
    run_mesh(crop, str(whole), options=options, workers=1)
    dest = tmp_path / "dest"

    def stop(done, total):
        if done >= total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_mesh(crop, str(dest), options=options, client=client, progress=stop)
    assert not (dest / "info").exists()
    summary = run_mesh(crop, str(dest), options=options, client=client, resume=True)
    assert summary.tasks_resumed >= summary.tasks // 2
    assert tree_files(dest) == tree_files(whole)


def test_a_chunk_that_cannot_be_read_fails_its_cluster_tasks_alone(client, tmp_path):
    """On a cluster as in a local pool (tests/test_errors.py): the tasks that read a corrupt
    chunk fail, the others are kept, and a resumed run writes the bytes of a clean one."""
    from gpumesh import SourceReadError, TaskFailedError

    from test_errors import _blobs

    write_zarr(tmp_path / "v.zarr", _blobs(), chunk=16)
    options = MeshOptions(chunk_size=16)
    clean = run_mesh(str(tmp_path / "v.zarr"), str(tmp_path / "clean"), options=options, workers=1)
    chunk = tmp_path / "v.zarr" / "c" / "0" / "1" / "2"
    good = chunk.read_bytes()
    chunk.write_bytes(b"not a chunk")
    dest = tmp_path / "out"
    with pytest.raises(TaskFailedError, match="tasks failed, the first: cannot read box") as info:
        run_mesh(str(tmp_path / "v.zarr"), str(dest), options=options, client=client)
    assert isinstance(info.value.__cause__, SourceReadError)
    kept = len(os.listdir(dest / ".gpumesh-work" / "blocks"))
    assert 0 < kept < clean.tasks
    chunk.write_bytes(good)
    again = run_mesh(str(tmp_path / "v.zarr"), str(dest), options=options, client=client, resume=True)
    assert again.tasks_resumed == kept
    assert tree_files(dest) == tree_files(tmp_path / "clean")


def test_a_cluster_keeps_a_few_tasks_per_worker_thread_in_flight_and_more_as_workers_join(tmp_path, monkeypatch):
    """On a Dask cluster the job keeps TASKS_AHEAD tasks per worker thread submitted and not yet
    taken, the threads it has now, not all of its tasks: submitted at once, each held ~6 KB in
    the client and ~2.4 KB in the scheduler (3.6 GB and 1.5 GB for a teravoxel's 620,978 tasks).
    A cluster that grows during the job (dask-jobqueue, adaptive scaling) gets more, up to
    TASKS_AHEAD per thread it has then (a review found that a window fixed at the start kept the
    workers that joined later idle).  Checked: the tasks in flight at each report of a finished
    task, in the plan's order; the bytes of one process."""
    import threading
    import time

    import gpumesh.cluster as cluster_module
    from gpumesh.pipeline import REFILL_S, TASKS_AHEAD, Plan, _run_task

    submitted, in_flight = [], []
    real = cluster_module.DaskExecutor.submit

    def submit(self, fn, *args):
        if fn is _run_task:
            submitted.append(args[0])
        return real(self, fn, *args)

    monkeypatch.setattr(cluster_module.DaskExecutor, "submit", submit)
    vol = np.zeros((96, 96, 64), np.uint32)
    vol[5:90, 7:80, 3:60] = 1
    vol[20:70, 30:60, 10:50] = 2
    options = MeshOptions(chunk_size=16)
    tasks = Plan.make(vol.shape, options).tasks()
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as c:
        grown = threading.Event()

        def progress(done, total):
            if done:
                in_flight.append((done, len(submitted) - done))
            if done == 1:   # two workers join during the job
                cluster.scale(3)
                c.wait_for_workers(3)
                time.sleep(2 * REFILL_S)   # the job's look at the cluster's size
                grown.set()

        assert len(tasks) > 4 * TASKS_AHEAD * 3
        run_mesh(vol, str(tmp_path / "dask"), options=options, voxel_size=(1, 1, 1), client=c, progress=progress)
    assert grown.is_set() and submitted == tasks
    assert in_flight[0] == (1, TASKS_AHEAD)   # one thread at the start, its task topped up before the report
    most = max(n for _, n in in_flight)
    assert most == TASKS_AHEAD * 3, in_flight   # the three threads it had then, no more
    run_mesh(vol, str(tmp_path / "one"), options=options, voxel_size=(1, 1, 1), workers=1)
    assert tree_files(tmp_path / "dask") == tree_files(tmp_path / "one")


def test_a_cluster_cannot_write_to_memory(client):
    progress = []
    with pytest.raises(ValueError, match="memory://"):
        run_mesh(np.ones((8, 8, 8), np.uint8), "memory://out/", client=client,
                 progress=lambda *a: progress.append(a))
    assert progress == []


def test_a_memory_destination_is_refused_as_the_destination():
    from gpumesh import storage
    from gpumesh.cluster import check_destination

    with pytest.raises(ValueError, match="memory:// destination"):
        check_destination(storage.kvstore_spec("memory://out/"))
    check_destination(storage.kvstore_spec("/shared/out"))   # a shared file system: fine


def test_cli_scheduler(client, crop, tmp_path):
    source = tmp_path / "crop.zarr"
    write_zarr(source, crop)
    one = tmp_path / "one"
    run_mesh(str(source), str(one), options=MeshOptions(chunk_size=32, sharding=ShardingOptions(shard_bits=1)),
             voxel_size=VOXEL_SIZE, workers=1)
    dest = tmp_path / "dask"
    r = subprocess.run(cli_command() + ["mesh", str(source), str(dest), "--voxel-size", ",".join(map(str, VOXEL_SIZE)),
                                        "--chunk-size", "32", "--shard-bits", "1", "--quiet",
                                        "--scheduler", client.scheduler.address],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "2 worker(s), device cpu" in r.stdout
    assert tree_files(dest) == tree_files(one)
    r = subprocess.run(cli_command() + ["mesh", str(source), str(tmp_path / "x"), "--scheduler", "tcp://127.0.0.1:9"],
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT="2s"))
    assert r.returncode == 2 and "cannot connect to the Dask scheduler at tcp://127.0.0.1:9" in r.stderr, r.stderr
    assert not (tmp_path / "x").exists()
    r = subprocess.run(cli_command() + ["mesh", str(source), str(tmp_path / "x"), "--workers", "4", "--scheduler",
                                        client.scheduler.address], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--workers sets local processes" in r.stderr, r.stderr
    assert not (tmp_path / "x").exists()


class _KillOnMeshing(WorkerPlugin):
    """A worker plugin that makes meshing kill the worker process, as the out-of-memory killer
    would."""

    def setup(self, worker):
        import os

        import gpumesh.pipeline

        gpumesh.pipeline.mesh_block = lambda *a, **k: os._exit(9)


def test_dying_cluster_workers_stop_the_job_with_one_error(crop, tmp_path):
    import dask

    from gpumesh import WorkerFailedError

    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), \
            LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as c:
        c.register_plugin(_KillOnMeshing(), name="kill-on-meshing")
        with pytest.raises(WorkerFailedError, match="Dask workers died running a task .* after 0 of"):
            run_mesh(crop[:64, :64, :64], str(tmp_path / "out"), options=MeshOptions(chunk_size=32), client=c)
    assert not (tmp_path / "out" / "info").exists()


def test_workers_share_a_gpu_only_with_workers_of_their_host_that_see_it_first():
    from gpumesh.cluster import gpu_groups

    seen = {"tcp://10.0.0.1:4001": "0", "tcp://10.0.0.1:4002": "1",      # dask-cuda: a GPU each
            "tcp://10.0.0.2:4001": "", "tcp://10.0.0.2:4002": "",        # plain workers: one GPU
            "tcp://10.0.0.2:4003": "", "tcp://10.0.0.3:4001": "0"}
    assert gpu_groups(seen) == {"tcp://10.0.0.1:4001": (0, 1), "tcp://10.0.0.1:4002": (0, 1),
                                "tcp://10.0.0.2:4001": (0, 3), "tcp://10.0.0.2:4002": (1, 3),
                                "tcp://10.0.0.2:4003": (2, 3), "tcp://10.0.0.3:4001": (0, 1)}


def test_a_cluster_runs_as_many_tasks_at_once_as_its_workers_have_threads():
    # a worker started with --nthreads 4 runs 4 tasks at once: the job keeps that many in flight
    from gpumesh.cluster import DaskExecutor

    class Threads:   # a client's view of the cluster: threads per worker
        def nthreads(self):
            return {"tcp://10.0.0.1:4001": 4, "tcp://10.0.0.2:4001": 1, "tcp://10.0.0.2:4002": 2}

    assert DaskExecutor(Threads()).workers == 7


def test_workers_sharing_a_small_gpu_use_only_as_many_as_its_memory_holds():
    # three workers of one host see the same GPU, whose free memory holds two of them: the
    # group's first worker measures it, and only two of the three use it; a worker alone on
    # its GPU is not measured and uses it
    from gpumesh import cluster, gpu
    from gpumesh.cluster import device_shares

    per_process = gpu.CONTEXT_BYTES + gpu.MIN_POOL_BYTES
    free = int(2.5 * per_process / gpu.GPU_MEMORY_FRACTION)
    asked = []

    class Cluster:
        def run(self, fn, workers, callback_timeout):
            asked.extend(workers)
            assert callback_timeout == cluster.ANSWER_TIMEOUT_S   # a worker that cannot answer holds nothing
            return dict.fromkeys(workers, free)

    seen = {"tcp://10.0.0.1:4003": "", "tcp://10.0.0.1:4001": "", "tcp://10.0.0.1:4002": "", "tcp://10.0.0.2:4001": ""}
    shares = device_shares(Cluster(), seen)
    assert asked == ["tcp://10.0.0.1:4001"]
    assert shares == {"tcp://10.0.0.1:4001": (0, 3, 2), "tcp://10.0.0.1:4002": (1, 3, 2),
                      "tcp://10.0.0.1:4003": (2, 3, 2), "tcp://10.0.0.2:4001": (0, 1, 1)}


def test_a_cluster_without_workers_is_refused_before_any_output(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "precious.txt").write_text("keep me")
    with LocalCluster(n_workers=0, processes=True, dashboard_address=":0") as cluster, Client(cluster) as c:
        with pytest.raises(ValueError, match="has no workers"):
            run_mesh(np.ones((8, 8, 8), np.uint8), str(dest), client=c, overwrite=True)
    assert [p.name for p in dest.iterdir()] == ["precious.txt"]


def test_connect_by_address_or_scheduler_file(client, tmp_path):
    import json

    from gpumesh.cluster import connect

    path = tmp_path / "scheduler.json"
    path.write_text(json.dumps({"type": "Scheduler", "address": client.scheduler.address}))
    for where in (client.scheduler.address, str(path)):
        with connect(where) as c:
            assert c.scheduler.address == client.scheduler.address
            assert len(c.scheduler_info()["workers"]) == 2


def test_gpu_asked_of_workers_without_one_is_a_typed_error(client, tmp_path):
    from gpumesh.backend import DeviceUnavailableError

    with pytest.raises(DeviceUnavailableError, match="no CUDA GPU"):
        run_mesh(np.ones((8, 8, 8), np.uint8), str(tmp_path / "out"), client=client, device="gpu")
    assert not (tmp_path / "out" / "info").exists()


def test_a_stop_signal_before_the_job_starts_is_one_line(tmp_path):
    """SIGTERM (or Ctrl-C) while the CLI still waits for a Dask scheduler that does not answer:
    one line and status 143 (130), as once the job runs; click's "Aborted!" and status 1 (a
    failed job) before, or no word at all for SIGTERM."""
    import signal
    import time

    write_zarr(tmp_path / "v.zarr", np.zeros((16, 16, 16), np.uint8))
    proc = subprocess.Popen(cli_command() + ["mesh", str(tmp_path / "v.zarr"), str(tmp_path / "out"), "--scheduler",
                                             "tcp://127.0.0.1:9", "--voxel-size", "1,1,1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(4)   # imports done, connecting (a refused port is retried for 30 s)
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert err.strip().splitlines() == ["gpumesh: terminated (SIGTERM); nothing was written"], err
    assert not (tmp_path / "out").exists()


def test_a_relative_source_path_means_the_same_on_the_workers(client, crop, tmp_path, monkeypatch):
    # The workers run in another directory (the cluster's); they were given the path as typed
    # and opened another volume, or none ("source not found", though this process found it).
    write_zarr(tmp_path / "crop.zarr", crop[:64, :64, :64])
    one = tmp_path / "one"
    run_mesh(str(tmp_path / "crop.zarr"), str(one), options=MeshOptions(chunk_size=32), workers=1)
    assert client.run(os.getcwd) != {a: str(tmp_path) for a in client.nthreads()}
    monkeypatch.chdir(tmp_path)
    for source in ("crop.zarr", "zarr3://crop.zarr", {"driver": "zarr3", "kvstore": {"driver": "file", "path": "crop.zarr"}}):
        dest = tmp_path / f"dask-{len(str(source))}"
        run_mesh(source, str(dest), options=MeshOptions(chunk_size=32), client=client)
        assert tree_files(dest) == tree_files(one), source


def test_portable_source():
    import tensorstore as ts

    from gpumesh.volume import portable_source

    here = os.getcwd()
    assert portable_source("seg.zarr") == os.path.join(here, "seg.zarr")
    assert portable_source("n5://a/b") == "n5://" + os.path.join(here, "a/b")
    assert portable_source("a/b|zarr3:") == os.path.join(here, "a/b") + "|zarr3:"
    for url in ("gs://b/seg", "zarr3://gs://b/seg", "gs://b/seg|zarr3:", "/abs/seg.zarr"):
        assert portable_source(url) == url
    spec = {"driver": "cast", "dtype": "uint32",
            "base": {"driver": "zarr3", "kvstore": {"driver": "file", "path": "seg/"}}}
    assert portable_source(spec)["base"]["kvstore"] == {"driver": "file", "path": os.path.join(here, "seg") + "/"}
    assert spec["base"]["kvstore"]["path"] == "seg/"   # not changed in place
    array = np.zeros((2, 2, 2), np.uint8)
    assert portable_source(array) is array
    store = ts.open({"driver": "zarr3", "kvstore": {"driver": "memory"}, "create": True, "dtype": "uint8",
                     "metadata": {"shape": [2, 2, 2]}}).result()
    assert portable_source(store) is store


def test_portable_source_carries_the_s3_endpoint_of_this_process(monkeypatch):
    # the DEST went to the workers with the endpoint filled in, the SOURCE as an s3:// URL
    # that a worker without AWS_ENDPOINT_URL resolved to AWS
    from gpumesh.volume import portable_source

    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    assert portable_source("s3://bkt/seg.zarr") == "s3://bkt/seg.zarr"   # AWS: as it is
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    want = {"driver": "s3", "bucket": "bkt", "path": "seg.zarr/", "endpoint": "http://minio:9000"}
    for url in ("s3://bkt/seg.zarr", "zarr3://s3://bkt/seg.zarr", "s3://bkt/seg.zarr|zarr3:"):
        assert portable_source(url) == want, url
    assert portable_source("precomputed://s3://bkt/seg.zarr") == {"driver": "neuroglancer_precomputed", "kvstore": want}
    # inside a TensorStore spec too, as a URL or a spec
    for kvstore in ("s3://bkt/seg.zarr/", {"driver": "s3", "bucket": "bkt", "path": "seg.zarr/"}):
        assert portable_source({"driver": "zarr3", "kvstore": kvstore})["kvstore"] == want
    assert portable_source({"driver": "zarr3", "kvstore": dict(want, endpoint="https://other")})["kvstore"] == \
        dict(want, endpoint="https://other")   # one given is kept


class _SlowOnWorker1(WorkerPlugin):
    """Meshing takes 3 s more on the worker named 1."""

    def setup(self, worker):
        if worker.name != 1:
            return
        import time

        import gpumesh.pipeline

        mesh = gpumesh.pipeline.mesh_block

        def slow(*args, **kwargs):
            time.sleep(3)
            return mesh(*args, **kwargs)

        gpumesh.pipeline.mesh_block = slow


def _interrupt_at_first_result(done: int, total: int) -> None:
    """A job's progress callback: Ctrl-C once its first task has finished."""
    if done:
        raise KeyboardInterrupt


def test_a_stopped_cluster_job_waits_for_its_running_tasks(crop, tmp_path):
    # Dask cannot stop a running task: one left behind wrote its result after the job had
    # ended, into the next run's output even (an --overwrite run with other options then
    # assembled the old task's bytes).  The job now waits for them, and says so.
    from gpumesh.cluster import StillRunningNotice

    dest = tmp_path / "out"

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as c:
        c.register_plugin(_SlowOnWorker1(), name="slow-on-1")
        with pytest.warns(StillRunningNotice, match=r"waiting for [12] task\(s\) still running"), \
                pytest.raises(KeyboardInterrupt):
            run_mesh(crop[:64, :64, :64], str(dest), options=MeshOptions(chunk_size=32), client=c,
                     progress=_interrupt_at_first_result)
        blocks = sorted(os.listdir(dest / ".gpumesh-work" / "blocks"))
        import time

        time.sleep(3.5)   # past the end of a task left running
        assert sorted(os.listdir(dest / ".gpumesh-work" / "blocks")) == blocks


class _KillOnceOnMeshing(WorkerPlugin):
    """The first worker to mesh dies (as the out-of-memory killer would kill it) unless the
    file ``marker`` exists, which it makes first; the worker its nanny restarts lives."""

    def __init__(self, marker):
        self.marker = marker

    def setup(self, worker):
        import os

        import gpumesh.pipeline

        marker = self.marker
        mesh = gpumesh.pipeline.mesh_block

        def once(*args, **kwargs):
            if not os.path.exists(marker):
                open(marker, "w").close()
                os._exit(9)
            return mesh(*args, **kwargs)

        gpumesh.pipeline.mesh_block = once


def _zarr_and_one_process(crop, tmp_path) -> tuple:
    """A 64³ corner of the crop as a zarr volume, and its meshes by one local process."""
    source = tmp_path / "crop.zarr"
    write_zarr(source, crop[:64, :64, :64])
    one = tmp_path / "one"
    run_mesh(str(source), str(one), options=MeshOptions(chunk_size=32), workers=1)
    return source, one


def test_a_worker_lost_once_is_replaced_and_the_job_goes_on(crop, tmp_path):
    # The job's arguments were scattered, which Dask cannot compute again: losing the one
    # worker that held them cancelled every task (a bare CancelledError traceback), where Dask
    # would have retried the task on the restarted worker.
    from gpumesh import WorkerFailedError

    source, one = _zarr_and_one_process(crop, tmp_path)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as c:
        c.register_plugin(_KillOnceOnMeshing(str(tmp_path / "killed")), name="kill-once")
        dest = tmp_path / "dask"
        run_mesh(str(source), str(dest), options=MeshOptions(chunk_size=32), client=c)
        assert tree_files(dest) == tree_files(one)
        # an array source is scattered still: its loss fails the job, with the way on
        (tmp_path / "killed").unlink()
        with pytest.raises(WorkerFailedError, match=r"lost its scheduler, or the workers holding the job's data "
                                                    r"\(.*CancelledError.*--resume"):
            run_mesh(crop[:64, :64, :64], str(tmp_path / "array"), options=MeshOptions(chunk_size=32), client=c)


def test_a_worker_that_joins_later_takes_no_share_of_a_gpu_in_use(monkeypatch):
    import distributed

    from gpumesh.cluster import _share

    seen = {"tcp://10.0.0.1:4001": "", "tcp://10.0.0.1:4002": "", "tcp://10.0.0.2:4001": "1"}
    shares = {"tcp://10.0.0.1:4001": (0, 2, 1), "tcp://10.0.0.1:4002": (1, 2, 1), "tcp://10.0.0.2:4001": (0, 1, 1)}
    alive = set(seen)

    class Client:   # the scheduler's list of live workers, as a worker's get_client() gives it
        def nthreads(self):
            return dict.fromkeys(alive, 1)

    monkeypatch.setattr(distributed, "get_client", lambda: Client())
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert _share("tcp://10.0.0.1:4002", shares, seen) == (1, 2, 1)
    assert _share("tcp://10.0.0.1:5000", shares, seen) == (0, 1, 0)   # a restarted worker: the CPU
    assert _share("tcp://10.0.0.3:5000", shares, seen) == (0, 1, 1)   # a new host: its GPU
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    assert _share("tcp://10.0.0.2:5000", shares, seen) == (0, 1, 0)
    assert _share("tcp://10.0.0.1:5000", shares, seen) == (0, 1, 1)   # GPU 1 of that host is free
    # the worker that used the GPU died: its replacement takes the GPU
    alive = {"tcp://10.0.0.1:4002", "tcp://10.0.0.1:5000", "tcp://10.0.0.2:5000"}
    assert _share("tcp://10.0.0.2:5000", shares, seen) == (0, 1, 1)   # replaced the GPU's only worker
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert _share("tcp://10.0.0.1:5000", shares, seen) == (0, 1, 1)   # 4001 used it; 4002 (alive) did not


def test_a_scheduler_that_is_no_address_is_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    for where, message in [("127.0.0.1:notaport", "not a Dask scheduler address"),
                           ("bogus://x", "unknown address scheme"),
                           (str(bad), "is not a Dask scheduler file"),
                           (str(tmp_path / "none.json"), "no scheduler file")]:
        r = subprocess.run(cli_command() + ["mesh", str(tmp_path / "src.zarr"), str(tmp_path / "x"), "--scheduler", where],
                           capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT="1s"))
        assert r.returncode == 2 and r.stderr.startswith("gpumesh: error: cannot connect to the Dask scheduler"), r.stderr
        assert message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_cluster_without_workers_left_says_the_job_waits_and_goes_on_when_one_joins(crop, tmp_path, monkeypatch):
    # Every worker gone for good (their batch jobs ended): the tasks wait for workers, as
    # Dask's do; that wait was silent.  The job now says so, and finishes when one joins (the
    # job's data, lost with the last worker, computed again).
    import threading
    import warnings

    import gpumesh.cluster as cluster_module
    from gpumesh.cluster import NoWorkersNotice

    monkeypatch.setattr(cluster_module, "NO_WORKERS_NOTICE_S", 0.5)
    source, one = _zarr_and_one_process(crop, tmp_path)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as c:
        told = threading.Event()
        # without the notice the test would wait forever: a worker joins anyway, later
        later = threading.Timer(15, cluster.scale, (1,))
        later.daemon = True

        def gone(done, total):
            if done == 1:
                cluster.scale(0)
                later.start()

        def shown(message, category, *args, **kwargs):
            if issubclass(category, NoWorkersNotice):
                told.set()
                cluster.scale(1)   # a worker joins once the job has said it waits

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.showwarning = shown
                dest = tmp_path / "dask"
                run_mesh(str(source), str(dest), options=MeshOptions(chunk_size=32), client=c, progress=gone)
        finally:
            later.cancel()   # not to scale a closed cluster during a later test
        assert told.is_set()
        assert tree_files(dest) == tree_files(one)


def test_each_stretch_without_workers_is_said_once(monkeypatch):
    # the cluster loses its workers, gets one back, and loses it again: two notices, one for
    # each stretch (not one per poll, and not only the first)
    import warnings

    import gpumesh.cluster as cluster_module
    from gpumesh.cluster import DaskExecutor, NoWorkersNotice

    monkeypatch.setattr(cluster_module, "NO_WORKERS_NOTICE_S", 0.04)   # polled every 0.01 s
    polls = [{"w": 1}] + [{}] * 20 + [{"w": 1}] * 3 + [{}] * 20

    class Cluster:
        def nthreads(self):
            if not polls:
                executor._stop_watch.set()
                return {"w": 1}
            return polls.pop(0)

    executor = DaskExecutor(Cluster())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        executor._watch_workers()
    assert [issubclass(w.category, NoWorkersNotice) for w in caught] == [True, True]


def _memory_state() -> dict:
    """In a worker: whether glibc maps a large allocation by itself again (``M_MMAP_MAX``, 0
    while a job's settings hold: its bytes then come from the heap), NumPy's huge-page setting,
    and the job state the worker holds."""
    import ctypes

    from gpumesh import pipeline

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    before = libc.mallinfo2().hblkhd
    big = np.ones(64 << 20, dtype=np.uint8)
    mapped = libc.mallinfo2().hblkhd - before >= big.nbytes
    del big
    switch = pipeline._madvise_switch()
    hugepage = switch(True)
    switch(hugepage)
    return {"mapped": bool(mapped), "hugepage": bool(hugepage), "job": sorted(pipeline._WORKER),
            "kept": sorted(pipeline._KEPT_MEMORY)}


#: the repository's root (a fresh Python imports gpumesh from there)
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code: str, *args: str, env: dict | None = None) -> str:
    """What ``code`` prints in a fresh Python (``sys.argv[1:]``: ``args``; environment ``env``,
    default this one's), which must end with status 0."""
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator")


@glibc
def test_a_finished_job_leaves_the_cluster_workers_as_it_found_them(client, crop, tmp_path):
    """A Dask worker outlives the job: once it ends, the workers hold none of its state (the
    source and its read cache, the task results, the backend) and have the allocator and NumPy
    settings they had before, which the job changes for its own speed (_keep_freed_memory)."""
    before = client.run(_memory_state)
    assert all(s["mapped"] and not s["job"] for s in before.values()), before
    options = MeshOptions(chunk_size=32, sharding=ShardingOptions(shard_bits=2))
    seen = []

    def during(done, total):   # a worker's settings while the job runs (after its first task)
        if done and not seen:
            seen.append(client.run(_memory_state))

    summary = run_mesh(crop, str(tmp_path / "dask"), options=options, client=client, progress=during)
    assert summary.workers == 2 and seen
    assert any(s["job"] and not s["mapped"] and not s["hugepage"] for s in seen[0].values()), seen
    after = client.run(_memory_state)
    assert after == before, (before, after)


@glibc
def test_memory_settings_of_a_process_that_outlives_the_job_are_undone():
    """_keep_freed_memory(own_process=False) and _restore_memory in a fresh process: large
    allocations come from the heap, with no huge pages, then are mapped by glibc again (with
    Dask's nanny's MALLOC_TRIM_THRESHOLD_ in the environment, as its workers have it)."""
    code = r"""
import sys
sys.path.insert(0, sys.argv[1])
from test_dask import _memory_state
from gpumesh import pipeline
first = _memory_state()
pipeline._keep_freed_memory(own_process=False)
during = _memory_state()
pipeline._restore_memory()
pipeline._restore_memory()   # twice: nothing more
after = _memory_state()
print(first == after, first["mapped"], during["mapped"], during["hugepage"], first["hugepage"], after["kept"])
"""
    env = dict(os.environ, MALLOC_TRIM_THRESHOLD_="65536")
    env.pop("NUMPY_MADVISE_HUGEPAGE", None)
    out = _python(code, os.path.dirname(__file__), env=env)
    assert out.split() == ["True", "True", "False", "False", "True", "[]"], out


def test_ending_a_job_in_a_worker_closes_its_backend_and_lets_go_of_its_state(monkeypatch):
    from gpumesh import cluster, pipeline

    closed = []

    class Backend:
        name = "gpu"

        def close(self):
            closed.append(True)

    restored = []
    monkeypatch.setattr(pipeline, "_restore_memory", lambda: restored.append(True))
    monkeypatch.setattr(pipeline, "_WORKER", {"job": "a", "backend": Backend(), "volume": object()})
    assert not cluster._end_job("b", "prefix-")   # another job's: left as it is
    assert pipeline._WORKER["job"] == "a" and not closed

    class Worker:   # a task of the job still runs in this worker: left for it
        state = type("State", (), {"all_running_tasks": [type("T", (), {"key": "prefix-1"})()]})()
        loop = type("Loop", (), {"call_later": lambda *args: None})()   # (asked again later)

    assert not cluster._end_job("a", "prefix-", Worker())
    assert pipeline._WORKER["job"] == "a" and not closed
    assert cluster._end_job("a", "prefix-")
    assert pipeline._WORKER == {} and closed == [True] and restored == [True]
    monkeypatch.setattr(pipeline, "_WORKER", {"job": "c", "backend": object()})   # no close (the CPU's)
    assert cluster._end_job("c", "prefix-") and pipeline._WORKER == {} and restored == [True, True]


def test_ending_a_job_does_not_wait_for_a_worker_setting_one_up(monkeypatch):
    """_end_job runs in the worker's event loop: while a task holds the set-up lock (and may wait
    for that loop itself, in _share's get_client), it returns at once without ending the job."""

    from gpumesh import cluster, pipeline

    ended = []
    monkeypatch.setattr(pipeline, "end_worker_job", lambda: ended.append(True))
    monkeypatch.setattr(pipeline, "_WORKER", {"job": "a"})
    with cluster._LOCK:   # a task setting up a job
        # a deadlock detector: it returns at once, or waits on the lock for good
        result = _within(30, cluster._end_job, "a", "prefix-")
        assert result and result[0].result() is False and not ended
    assert cluster._end_job("a", "prefix-") and ended == [True]


def test_a_backend_that_fails_to_close_still_leaves_the_worker_its_memory_settings(monkeypatch):
    """end_worker_job: a backend whose close raises (a device in an error state) still lets go
    of the job's state and undoes the memory settings; the error is not hidden."""
    from gpumesh import pipeline

    class Backend:
        def close(self):
            raise RuntimeError("device error")

    restored = []
    monkeypatch.setattr(pipeline, "_restore_memory", lambda: restored.append(True))
    monkeypatch.setattr(pipeline, "_WORKER", {"job": "a", "backend": Backend()})
    with pytest.raises(RuntimeError, match="device error"):
        pipeline.end_worker_job()
    assert pipeline._WORKER == {} and restored == [True]


def test_a_job_that_fails_to_set_up_in_a_worker_leaves_it_as_it_found_it(monkeypatch):
    """A worker whose set-up fails (a source it cannot open) has no job for _end_job to end: it
    undoes the memory settings and lets go of what the set-up opened there and then."""
    import distributed

    from gpumesh import cluster, pipeline

    def set_up_worker(*args, **kwargs):
        pipeline._WORKER["volume"] = object()
        raise OSError("cannot open the source")

    calls = []
    monkeypatch.setattr(pipeline, "_keep_freed_memory", lambda own_process=True: calls.append("keep"))
    monkeypatch.setattr(pipeline, "_restore_memory", lambda: calls.append("restore"))
    monkeypatch.setattr(pipeline, "set_up_worker", set_up_worker)
    monkeypatch.setattr(pipeline, "_WORKER", {})
    monkeypatch.setattr(distributed, "get_worker", lambda: type("Worker", (), {"address": "tcp://w:1"})())
    job = (None, {}, None, None, None, "cpu", {"tcp://w:1": (0, 1, 1)}, {})
    with pytest.raises(OSError, match="cannot open"):
        cluster._run_in_job("a", job, print)
    assert calls == ["keep", "restore"] and pipeline._WORKER == {}
    assert not cluster._ACTIVE   # the failed task is no longer counted as running


_HEAP_CODE = r"""
import ctypes, sys
sys.path.insert(0, sys.argv[1])
from gpumesh import pipeline

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def kept():   # the free top of the heap that glibc keeps after blocks below the mmap threshold are freed
    blocks = [libc.malloc(100 << 10) for _ in range(64)]
    for b in reversed(blocks):
        libc.free(b)
    return libc.mallinfo2().keepcost

def mapped():   # of 80 blocks past the largest mmap threshold, how many glibc maps (M_MMAP_MAX)
    before = libc.mallinfo2().hblks
    blocks = [libc.malloc(33 << 20) for _ in range(80)]
    n = libc.mallinfo2().hblks - before
    for b in blocks:
        libc.free(b)
    return n

fresh = kept()
pipeline._keep_freed_memory(own_process=False)
kept()
pipeline._restore_memory()
print(fresh, kept(), mapped())
"""


def _heap_after_a_job(env: dict) -> list:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"} | env
    return [int(n) for n in _python(_HEAP_CODE, _ROOT, env=env).split()]


@glibc
def test_the_heap_of_a_process_that_outlives_the_job_is_trimmed_as_before():
    """After _restore_memory the heap keeps as much free memory at its top as glibc's defaults say
    (a 128 KiB pad, trimmed past 128 KiB, not the job's 256 MiB untrimmed), or as the environment
    set it at start-up: GLIBC_TUNABLES (which wins over MALLOC_TOP_PAD_, as in glibc), numbers in
    hex; and glibc maps as many blocks as before (M_MMAP_MAX: 65536)."""
    _, restored, mapped = _heap_after_a_job({})
    assert 128 << 10 <= restored < 160 << 10 and mapped == 80
    fresh, restored, mapped = _heap_after_a_job({"GLIBC_TUNABLES": "glibc.malloc.top_pad=0x200000",
                                                 "MALLOC_TOP_PAD_": "1048576"})
    assert 2 << 20 <= fresh < (2 << 20) + (32 << 10) and abs(restored - fresh) < 32 << 10 and mapped == 80


@glibc
@pytest.mark.parametrize("hugepage", ["0", "1"])
def test_huge_pages_go_back_to_what_they_were_before_the_first_job(hugepage):
    """NumPy's huge pages after _restore_memory are what they were before the first
    _keep_freed_memory (NUMPY_MADVISE_HUGEPAGE's), also when a second job set up in the worker
    before the first one was ended there (a worker that _end_job could not reach)."""
    code = r"""
import sys
sys.path.insert(0, sys.argv[1])
from gpumesh import pipeline
switch = pipeline._madvise_switch()
first = switch(True)
switch(first)
pipeline._keep_freed_memory(own_process=False)
pipeline._keep_freed_memory(own_process=False)
pipeline._restore_memory()
after = switch(True)
print(first, after)
"""
    env = dict(os.environ, NUMPY_MADVISE_HUGEPAGE=hugepage)
    out = _python(code, _ROOT, env=env)
    expected = "True" if hugepage == "1" else "False"
    assert out.split() == [expected, expected], out


@glibc
def test_the_threads_of_a_process_that_outlives_the_job_keep_their_own_malloc_arenas():
    """_keep_freed_memory(own_process=False) leaves M_ARENA_MAX alone (glibc cannot undo it): a
    thread started after it still allocates from an arena of its own; the local pool's
    processes (own_process) share one."""
    code = r"""
import ctypes, os, sys, tempfile, threading
sys.path.insert(0, sys.argv[1])
from gpumesh import pipeline
libc = ctypes.CDLL("libc.so.6")
libc.fopen.restype = ctypes.c_void_p
libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
libc.fclose.argtypes = [ctypes.c_void_p]
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.malloc.restype = ctypes.c_void_p
pipeline._keep_freed_memory(own_process=sys.argv[2] == "1")
held = []
thread = threading.Thread(target=lambda: held.append(libc.malloc(1000)))
thread.start()
thread.join()
path = os.path.join(tempfile.mkdtemp(), "info.xml")
f = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, f)
libc.fclose(f)
print(open(path).read().count("<heap nr="))
"""
    heaps = [int(_python(code, _ROOT, own)) for own in ("0", "1")]
    assert heaps[0] >= 2 and heaps[1] == 1, heaps


def test_a_dask_worker_sets_up_a_job_with_only_the_memory_settings_it_can_undo(monkeypatch):
    """_run_in_job: a Dask worker outlives the job, so it takes _keep_freed_memory's settings
    that _restore_memory undoes (own_process=False: no M_ARENA_MAX), then runs the task."""
    import distributed

    from gpumesh import cluster, pipeline

    calls = []
    monkeypatch.setattr(pipeline, "_keep_freed_memory", lambda own_process=True: calls.append(own_process))
    monkeypatch.setattr(pipeline, "set_up_worker", lambda *args, **kwargs: None)
    monkeypatch.setattr(pipeline, "_WORKER", {})
    monkeypatch.setattr(distributed, "get_worker", lambda: type("Worker", (), {"address": "tcp://w:1"})())
    job = (None, {}, None, None, None, "cpu", {"tcp://w:1": (0, 1, 1)}, {})
    assert cluster._run_in_job("a", job, lambda x: x + 1, 1) == 2
    assert cluster._run_in_job("a", job, lambda x: x + 1, 2) == 3   # set up once per job
    assert calls == [False] and pipeline._WORKER == {"job": "a"}


def test_a_worker_that_does_not_answer_holds_neither_the_start_nor_the_end_of_a_job(crop, tmp_path, monkeypatch):
    """Dask's Client.run waits for every worker without a limit once connected: a worker that
    could not answer (stopped, hung) held the job forever at its end, after all its output was
    written, and at its start.  Now the job waits ANSWER_TIMEOUT_S for it: at the start it
    fails in one typed error, at the end it leaves that worker the job's state."""
    import signal

    from gpumesh import WorkerFailedError, cluster

    monkeypatch.setattr(cluster, "ANSWER_TIMEOUT_S", 3.0)
    options = MeshOptions(chunk_size=32, sharding=ShardingOptions(shard_bits=1))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as lc, \
            Client(lc) as c:
        pids = c.run(os.getpid)
        pid = min(pids.values())   # the worker to stop
        others = [a for a, p in pids.items() if p != pid]
        stopped = []

        def stop():
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)

        run_on_workers = cluster._run_on_workers

        def stop_at_the_end(client, fn, *args, **kwargs):   # the job's tasks have all ended
            if fn is cluster._end_job and not stopped:
                stop()
            return run_on_workers(client, fn, *args, **kwargs)

        try:
            stop()   # at the start: the job asks the workers which GPU each sees
            ended = _within(30, run_mesh, crop[:64, :64, :64], str(tmp_path / "start"), options=options, client=c,
                            device="auto")
            assert ended, "the job's start waited for the stopped worker"
            with pytest.raises(WorkerFailedError, match=r"did not all answer within 3 s"):
                ended[0].result()
            os.kill(pid, signal.SIGCONT)
            stopped.clear()

            monkeypatch.setattr(cluster, "_run_on_workers", stop_at_the_end)
            ended = _within(60, run_mesh, crop[:64, :64, :64], str(tmp_path / "end"), options=options, client=c)
            assert stopped and ended, "the job's end waited for the stopped worker"
            summary = ended[0].result()
            # the worker that answered has ended the job all the same
            assert [s["job"] for s in c.run(_memory_state, workers=others).values()] == [[]]
        finally:
            for p in stopped:
                os.kill(p, signal.SIGCONT)
    assert summary.segments and validate(str(tmp_path / "end")).ok


def _within(seconds: float, fn, *args, **kwargs) -> list:
    """``[future of fn(*args, **kwargs)]`` when it ended within ``seconds``, else ``[]`` (it goes
    on in a daemon thread)."""
    import concurrent.futures
    import threading

    out = concurrent.futures.Future()

    def call():
        try:
            out.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            out.set_exception(exc)

    threading.Thread(target=call, daemon=True).start()
    concurrent.futures.wait([out], timeout=seconds)
    return [out] if out.done() else []


@glibc
def test_a_task_left_running_after_the_job_ends_the_job_in_its_worker_as_it_finishes(crop, tmp_path, monkeypatch):
    """A job stopped twice (Ctrl-C, then Ctrl-C again while it waits for its running tasks)
    leaves them running: Dask cannot stop them.  Their worker kept the job's state (its source
    and read cache, its backend, the memory settings) until its next gpumesh job; now the last
    of them ends the job there as it finishes."""
    import time

    from gpumesh import cluster

    # the second Ctrl-C: the job no longer waits for its running tasks
    monkeypatch.setattr(cluster.DaskExecutor, "_wait_for_running", lambda self: None)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as lc, \
            Client(lc) as c:
        before = c.run(_memory_state)
        c.register_plugin(_SlowOnWorker1(), name="slow-on-1")
        with pytest.raises(KeyboardInterrupt):
            run_mesh(crop[:64, :64, :64], str(tmp_path / "out"), options=MeshOptions(chunk_size=32), client=c,
                     progress=_interrupt_at_first_result)
        left = c.run(lambda: dict(cluster._ACTIVE))
        deadline = time.monotonic() + 30
        while (after := c.run(_memory_state)) != before and time.monotonic() < deadline:
            time.sleep(0.5)
    assert any(left.values()), "no task was left running: the test shows nothing"
    assert after == before, (before, after)


def _task_running_in_job(job_id: str) -> tuple:
    """``(gate, thread)``: a task of job ``job_id`` (already set up in this process) running in
    ``thread`` (cluster._run_in_job) until ``gate`` is set, once it is counted as running."""
    import threading
    import time

    from gpumesh import cluster

    before = cluster._ACTIVE[job_id]
    gate = threading.Event()
    task = threading.Thread(target=cluster._run_in_job, args=(job_id, None, gate.wait, 30), daemon=True)
    task.start()
    deadline = time.monotonic() + 30
    while cluster._ACTIVE[job_id] == before and time.monotonic() < deadline:
        time.sleep(0.01)
    return gate, task


def test_the_last_task_left_running_ends_the_job_and_only_the_last(monkeypatch):
    from gpumesh import cluster, pipeline

    ended = []
    monkeypatch.setattr(pipeline, "end_worker_job", lambda: ended.append(pipeline._WORKER.get("job")))
    monkeypatch.setattr(pipeline, "_WORKER", {"job": "a"})   # set up already: no set-up
    gates, tasks = zip(_task_running_in_job("a"), _task_running_in_job("a"))
    assert not cluster._end_job("a", "prefix-") and not ended   # two tasks of the job still run here
    gates[0].set()
    tasks[0].join(30)
    assert not ended and cluster._ACTIVE["a"] == 1   # one still runs
    gates[1].set()
    tasks[1].join(30)
    assert ended == ["a"] and not cluster._ACTIVE and "a" not in cluster._ENDING
    # a task that finishes while its job goes on ends nothing
    cluster._run_in_job("a", None, int)
    assert ended == ["a"]


def test_a_task_of_an_ended_job_that_finishes_after_the_next_job_set_up_leaves_that_job(monkeypatch):
    """A task left running after its job ended (the job's end asked for) that finishes once the
    worker has set up the next job ends nothing: the worker's state is the next job's."""
    import distributed

    from gpumesh import cluster, pipeline

    ended = []
    monkeypatch.setattr(pipeline, "end_worker_job", lambda: ended.append(pipeline._WORKER.get("job")))
    monkeypatch.setattr(pipeline, "_keep_freed_memory", lambda own_process=True: None)
    monkeypatch.setattr(pipeline, "set_up_worker", lambda *args, **kwargs: None)
    monkeypatch.setattr(pipeline, "_WORKER", {"job": "a"})
    monkeypatch.setattr(distributed, "get_worker", lambda: type("Worker", (), {"address": "tcp://w:1"})())
    gate, task = _task_running_in_job("a")
    assert not cluster._end_job("a", "prefix-")   # left to the task
    job = (None, {}, None, None, None, "cpu", {"tcp://w:1": (0, 1, 1)}, {})
    assert cluster._run_in_job("b", job, int) == 0   # the next job sets up in this worker
    gate.set()
    task.join(30)
    assert not task.is_alive() and not ended and pipeline._WORKER == {"job": "b"}
    assert not cluster._ACTIVE and not cluster._ENDING


def test_ending_a_job_does_not_wait_while_a_task_left_running_waits_to_end_its_job(monkeypatch):
    """The last task of an ended job waits for the set-up lock to end the job while another
    task holds it (setting up a job, it may wait for the worker's event loop): _end_job, which
    runs in that loop, still returns at once (the task waits holding no other lock)."""
    import time

    from gpumesh import cluster, pipeline

    ended = []
    monkeypatch.setattr(pipeline, "end_worker_job", lambda: ended.append(pipeline._WORKER.get("job")))
    monkeypatch.setattr(pipeline, "_WORKER", {"job": "a"})
    gate, task = _task_running_in_job("a")
    assert not cluster._end_job("a", "prefix-")   # left to the task
    with cluster._LOCK:   # a task setting up a job
        gate.set()
        deadline = time.monotonic() + 30
        while "a" in cluster._ACTIVE and time.monotonic() < deadline:   # the task has finished: it waits
            time.sleep(0.01)
        time.sleep(0.1)
        result = _within(5, cluster._end_job, "b", "prefix-")   # a deadlock detector: at once, or never
        assert result and result[0].result() is False and not ended
    task.join(30)
    assert not task.is_alive() and ended == ["a"]


def test_a_task_that_has_just_finished_when_the_job_ends_does_not_leave_the_job(monkeypatch):
    """_end_job runs in the worker's event loop, which hears that a task has finished only after
    the task's thread has left _run_in_job: in between, Dask still lists the task as running,
    but no task of the job is left to end it as it finishes.  The job is ended all the same."""
    import time

    import distributed

    from gpumesh import cluster, pipeline

    ended = []
    monkeypatch.setattr(pipeline, "end_worker_job", lambda: ended.append(pipeline._WORKER.pop("job", None)))
    monkeypatch.setattr(pipeline, "_WORKER", {"job": "a"})   # set up already: no set-up

    def task():   # (Dask sends it pickled, even to a worker in this process: it keeps what it saw there)
        worker = distributed.get_worker()

        def end():   # in the event loop: once this task's thread has left _run_in_job
            deadline = time.monotonic() + 10
            while cluster._ACTIVE["a"] and time.monotonic() < deadline:
                time.sleep(0.01)
            worker.gpumesh_asked = (cluster._running("prefix-", worker), cluster._end_job("a", "prefix-", worker))

        worker.loop.add_callback(end)

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as lc, \
            Client(lc) as c:
        c.submit(cluster._run_in_job, "a", None, task, key="prefix-1").result(30)
        deadline = time.monotonic() + 5
        while not ended and time.monotonic() < deadline:
            time.sleep(0.05)
        asked = [getattr(w, "gpumesh_asked", None) for w in lc.workers.values()]
    assert asked == [(1, False)], asked   # Dask listed the task still, and the job was left: a real race
    assert ended == ["a"] and pipeline._WORKER == {}


class _GateOnWorker1(WorkerPlugin):
    """Meshing on the worker named 1 waits until the file ``path`` exists (30 s at most)."""

    def __init__(self, path: str):
        self.path = path

    def setup(self, worker):
        if worker.name != 1:
            return
        import time

        import gpumesh.pipeline

        mesh, path = gpumesh.pipeline.mesh_block, self.path

        def gated(*args, **kwargs):
            deadline = time.monotonic() + 30
            while not os.path.exists(path) and time.monotonic() < deadline:
                time.sleep(0.05)
            return mesh(*args, **kwargs)

        gpumesh.pipeline.mesh_block = gated


def _tasks_in_jobs() -> int:
    """How many gpumesh tasks run in this worker (in _run_in_job)."""
    from gpumesh import cluster

    return sum(cluster._ACTIVE.values())


def _hung(signum, frame):
    raise AssertionError("the stopped job's wait hung on the worker that does not answer")


def test_a_stopped_job_waits_for_its_running_tasks_on_the_workers_that_answer(crop, tmp_path, monkeypatch):
    """A stopped job waits for its tasks still running on the cluster; a worker that does not
    answer (stopped, hung) is not waited for, but the others still are: their tasks would write
    into the destination after the job ended."""
    import signal
    import threading

    from gpumesh import cluster

    monkeypatch.setattr(cluster, "ANSWER_TIMEOUT_S", 1.0)
    gate = tmp_path / "gate"

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as lc, \
            Client(lc) as c:
        names = {a: w["name"] for a, w in c.scheduler_info()["workers"].items()}
        pids = c.run(os.getpid)
        free = next(a for a, n in names.items() if n != 1)   # the worker to stop
        gated = next(a for a, n in names.items() if n == 1)
        c.register_plugin(_GateOnWorker1(str(gate)), name="gate-on-1")
        wait_for_running = cluster.DaskExecutor._wait_for_running
        stopped, left = [], []

        def stop_then_wait(self):
            os.kill(pids[free], signal.SIGSTOP)
            stopped.append(pids[free])
            threading.Timer(3 * cluster.ANSWER_TIMEOUT_S, gate.touch).start()
            previous = signal.signal(signal.SIGALRM, _hung)
            signal.alarm(60)   # a deadlock detector: a wait that hangs on the stopped worker fails
            try:
                wait_for_running(self)
            finally:
                signal.alarm(0)
                signal.signal(signal.SIGALRM, previous)
            left.append(c.run(_tasks_in_jobs, workers=[gated]))

        monkeypatch.setattr(cluster.DaskExecutor, "_wait_for_running", stop_then_wait)
        try:
            with pytest.warns(cluster.StillRunningNotice, match=r"waiting for 1 task"), \
                    pytest.raises(KeyboardInterrupt):
                run_mesh(crop[:64, :64, :64], str(tmp_path / "out"), options=MeshOptions(chunk_size=32), client=c,
                         progress=_interrupt_at_first_result)
        finally:
            for p in stopped:
                os.kill(p, signal.SIGCONT)
            gate.touch()
    assert stopped and left == [{gated: 0}], left
