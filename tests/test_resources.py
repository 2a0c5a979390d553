"""gpumesh.resources: the cores and memory a container gives the job, read from fake cgroup
and meminfo files, and the main job's default worker count."""

from __future__ import annotations

import os

import numpy as np
import pytest

from gpumesh import resources
from gpumesh.resources import available_memory, default_workers, usable_cores, worker_bytes

from conftest import write_zarr

GIB = 1 << 30


def _files(root, files: dict) -> str:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return str(root)


def _meminfo(tmp_path, gib: float) -> str:
    path = tmp_path / "meminfo"
    path.write_text(f"MemTotal:       99999999 kB\nMemFree:  1 kB\nMemAvailable:   {int(gib * 2**20)} kB\n")
    return str(path)


def test_cpu_quota_caps_the_cores(tmp_path):
    host = len(os.sched_getaffinity(0))
    assert usable_cores(_files(tmp_path / "none", {})) == host
    assert usable_cores(_files(tmp_path / "v2max", {"cpu.max": "max 100000"})) == host
    assert usable_cores(_files(tmp_path / "v2", {"cpu.max": "50000 100000"})) == 1          # half a CPU: 1
    assert usable_cores(_files(tmp_path / "v2big", {"cpu.max": "6400000 100000"})) == host  # 64 CPUs' quota
    v1 = {"cpu/cpu.cfs_quota_us": "100000", "cpu/cpu.cfs_period_us": "100000"}
    assert usable_cores(_files(tmp_path / "v1", v1)) == 1
    v1none = {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}
    assert usable_cores(_files(tmp_path / "v1none", v1none)) == host


def test_memory_limit_caps_the_available_memory(tmp_path):
    meminfo = _meminfo(tmp_path, 20)
    assert available_memory(_files(tmp_path / "none", {}), meminfo) == 20 * GIB
    assert available_memory(_files(tmp_path / "max", {"memory.max": "max", "memory.current": "5"}), meminfo) == 20 * GIB
    v2 = {"memory.max": str(8 * GIB), "memory.current": str(3 * GIB)}
    assert available_memory(_files(tmp_path / "v2", v2), meminfo) == 5 * GIB
    v1 = {"memory/memory.limit_in_bytes": str(4 * GIB), "memory/memory.usage_in_bytes": str(GIB)}
    assert available_memory(_files(tmp_path / "v1", v1), meminfo) == 3 * GIB
    v1none = {"memory/memory.limit_in_bytes": str(2**63 - 4096), "memory/memory.usage_in_bytes": "1"}
    assert available_memory(_files(tmp_path / "v1none", v1none), meminfo) == 20 * GIB
    assert available_memory(_files(tmp_path / "nothing", {}), str(tmp_path / "no-meminfo")) is None


def test_the_limits_of_the_own_cgroup_and_its_ancestors_count(tmp_path):
    """Without a cgroup namespace (a Slurm job step, a systemd unit) the job's limits sit below
    the root, at the path ``/proc/self/cgroup`` names: the tightest of it and its ancestors
    wins.  Reclaimable page cache is not memory taken."""
    meminfo = _meminfo(tmp_path, 64)
    v2 = _files(tmp_path / "v2", {
        "memory.max": "max", "cpu.max": "max 100000",
        "job/memory.max": str(16 * GIB), "job/memory.current": str(2 * GIB),
        "job/step/memory.max": str(8 * GIB), "job/step/memory.current": str(7 * GIB + GIB // 2),
        "job/step/memory.stat": f"anon 1000\ninactive_file {6 * GIB}\nactive_file 5\n",
        "job/cpu.max": "300000 100000"})
    own = tmp_path / "self-cgroup"
    own.write_text("0::/job/step\n")
    # 8 GiB less 1.5 GiB used (7.5 less 6 of cache) in the step; 14 GiB left in the job
    assert available_memory(v2, meminfo, str(own)) == 8 * GIB - (GIB + GIB // 2)
    assert usable_cores(v2, str(own)) == min(3, len(os.sched_getaffinity(0)))
    # cgroup v1: the memory controller's line names the path
    v1 = _files(tmp_path / "v1", {
        "memory/memory.limit_in_bytes": str(2**63 - 4096), "memory/memory.usage_in_bytes": str(GIB),
        "memory/batch/7/memory.limit_in_bytes": str(4 * GIB), "memory/batch/7/memory.usage_in_bytes": str(3 * GIB),
        "memory/batch/7/memory.stat": f"cache 9\ninactive_file 1\ntotal_inactive_file {2 * GIB}\n",
        "cpu/batch/cpu.cfs_quota_us": "200000", "cpu/batch/cpu.cfs_period_us": "100000"})
    own.write_text("5:memory:/batch/7\n3:cpu,cpuacct:/batch/7\n0::/\n")
    assert available_memory(v1, meminfo, str(own)) == 3 * GIB
    assert usable_cores(v1, str(own)) == min(2, len(os.sched_getaffinity(0)))
    # inside a namespace the path is / : the root's files, as before
    own.write_text("0::/\n")
    assert available_memory(v2, meminfo, str(own)) == 64 * GIB


def test_default_workers_fit_in_memory(tmp_path):
    root = _files(tmp_path / "cg", {"cpu.max": "max 100000"})
    cores = usable_cores(root)
    per = worker_bytes(256, 4, 64 << 20)
    assert per == resources.WORKER_BASE_BYTES + 256 ** 3 * (resources.WORKER_BYTES_PER_VOXEL + 4) + (64 << 20)
    assert default_workers(per, root, _meminfo(tmp_path, 1000)) == (cores, "")
    # room for 1 worker besides the main process's reserve: one, and a sentence saying why
    small = (resources.MAIN_RESERVE_BYTES + per * 1.5) / GIB
    n, why = default_workers(per, root, _meminfo(tmp_path, small))
    if cores > 1:
        assert n == 1 and why.startswith(f"1 worker(s) for {cores} cores") and "--workers" in why
    assert default_workers(per, root, _meminfo(tmp_path, 0.1))[0] == 1        # never none


def test_the_main_job_runs_the_workers_that_fit(tmp_path, monkeypatch):
    """run_mesh without ``workers`` caps them by memory with a FewerWorkersNotice; the CLI
    prints it as one line at once."""
    from gpumesh import pipeline
    from gpumesh.pipeline import MeshOptions, run_mesh
    from gpumesh.resources import FewerWorkersNotice

    labels = np.zeros((40, 40, 40), np.uint32)
    labels[3:30, 5:33, 2:20] = 4
    monkeypatch.setattr(pipeline, "SMALL_JOB_VOXELS", 0)   # a job large enough for workers
    monkeypatch.setattr(resources, "usable_cores", lambda *args: 4)
    monkeypatch.setattr(resources, "available_memory", lambda *args: 2 * GIB)
    monkeypatch.setattr(resources, "MAIN_RESERVE_BYTES", GIB)
    monkeypatch.setattr(resources, "WORKER_BASE_BYTES", 400 << 20)   # 2 fit in the 1 GiB left
    with pytest.warns(FewerWorkersNotice, match="2 worker\\(s\\) for 4 cores"):
        summary = run_mesh(labels, str(tmp_path / "out"), options=MeshOptions(chunk_size=16))
    assert summary.workers == 2
    monkeypatch.setattr(resources, "available_memory", lambda *args: 100 * GIB)
    assert run_mesh(labels, str(tmp_path / "more"), options=MeshOptions(chunk_size=16)).workers == 4
    # the CLI prints the notice as one line, before the job's output
    from click.testing import CliRunner

    from gpumesh.cli import main

    write_zarr(tmp_path / "v.zarr", labels, chunk=16)
    monkeypatch.setattr(resources, "available_memory", lambda *args: 2 * GIB)
    r = CliRunner().invoke(main, ["mesh", str(tmp_path / "v.zarr"), str(tmp_path / "cli"), "--chunk-size", "16"])
    assert r.exit_code == 0, r.output
    assert "gpumesh: 2 worker(s) for 4 cores: each needs about" in r.output
    assert "2 worker(s), device" in r.output


def test_a_worker_count_given_that_does_not_fit_in_memory_is_warned_about(tmp_path, monkeypatch):
    """``workers`` (``--workers``) more than fit in the available memory, by the estimate that
    caps the default count, runs as given with a WorkersMemoryWarning before the job (the CLI
    prints it at once); no more workers than tasks count; none where they fit or where the
    available memory is not known."""
    import warnings

    from gpumesh.pipeline import MeshOptions, Plan, part_tasks, run_mesh
    from gpumesh.resources import WorkersMemoryWarning, workers_memory

    labels = np.zeros((40, 40, 40), np.uint32)
    labels[3:30, 5:33, 2:20] = 4
    opts = MeshOptions(chunk_size=16)
    tasks = len(Plan.make(labels.shape, opts).tasks())
    assert 3 < tasks < 20
    assert workers_memory(1, 4 * GIB, str(tmp_path), _meminfo(tmp_path, 64)) == ""
    # one worker: fewer is no advice
    one = workers_memory(1, 4 * GIB, str(tmp_path), _meminfo(tmp_path, 2))
    assert "enough for 0" in one and one.endswith("(a smaller --max-lods needs less)"), one
    assert workers_memory(2, 4 * GIB, str(tmp_path), _meminfo(tmp_path, 2)).endswith(
        "(fewer --workers, or a smaller --max-lods, needs less)")
    monkeypatch.setattr(resources, "available_memory", lambda *args: 2 * GIB)
    monkeypatch.setattr(resources, "MAIN_RESERVE_BYTES", GIB)
    monkeypatch.setattr(resources, "WORKER_BASE_BYTES", 400 << 20)   # 2 fit in the 1 GiB left
    with pytest.warns(WorkersMemoryWarning, match=r"^--workers 3: each needs about 0\.4 GiB and 2\.0 GiB of memory "
                                                  r"is available, enough for 2: the out-of-memory killer may stop "
                                                  r"the job"):
        summary = run_mesh(labels, str(tmp_path / "three"), options=opts, workers=3)
    assert summary.workers == 3
    # one worker per task, of the 20 given (the count given named, not one the user never typed)
    with pytest.warns(WorkersMemoryWarning, match=rf"^--workers 20 \({tasks} run, one per task\): "):
        run_mesh(labels, str(tmp_path / "many"), options=opts, workers=20)
    small = MeshOptions(chunk_size=8)   # 8 blocks: a part has its own tasks
    every, half = Plan.make(labels.shape, small).tasks(), part_tasks(Plan.make(labels.shape, small).tasks(), 0, 2)
    assert 2 < len(half) < len(every) < 50
    def stop(done, total):   # the first report comes before any worker starts
        raise KeyboardInterrupt

    with pytest.warns(WorkersMemoryWarning, match=rf"^--workers 50 \({len(half)} run, one per task\):"), \
            pytest.raises(KeyboardInterrupt):
        run_mesh(labels, str(tmp_path / "part"), options=small, workers=50, part=(0, 2), progress=stop)
    with warnings.catch_warnings():
        warnings.simplefilter("error", WorkersMemoryWarning)
        assert run_mesh(labels, str(tmp_path / "two"), options=opts, workers=2).workers == 2
        monkeypatch.setattr(resources, "available_memory", lambda *args: None)
        run_mesh(labels, str(tmp_path / "unknown"), options=opts, workers=3)
    # the CLI prints it as one line, before the job's output
    from click.testing import CliRunner

    from gpumesh.cli import main

    write_zarr(tmp_path / "v.zarr", labels, chunk=16)
    monkeypatch.setattr(resources, "available_memory", lambda *args: 2 * GIB)
    r = CliRunner().invoke(main, ["mesh", str(tmp_path / "v.zarr"), str(tmp_path / "cli"), "--chunk-size", "16",
                                  "--workers", "3", "--voxel-size", "1,1,1"])
    assert r.exit_code == 0, r.output
    assert "\ngpumesh: warning: --workers 3: each needs about 0.4 GiB" in r.output, r.output
    # before the job's progress, not with the warnings said after it
    assert r.output.index("gpumesh: warning: --workers 3") < r.output.index("meshing: 0/"), r.output
    assert "3 worker(s), device" in r.output


def test_a_limit_set_on_an_ancestor_alone_counts_and_a_partial_cpu_rounds_up(tmp_path, monkeypatch):
    """The limits of an ancestor of the own cgroup cap the job even where the own cgroup sets
    none (a Slurm job's limit, a step below it), for cgroup v2 and v1; a CPU quota of 1.5 CPUs
    gives 2 cores (rounded up), not 1."""
    monkeypatch.setattr(resources.os, "sched_getaffinity", lambda pid: set(range(8)))   # 8 CPUs
    meminfo = _meminfo(tmp_path, 64)
    own = tmp_path / "self-cgroup"
    own.write_text("0::/job/step\n")
    v2 = _files(tmp_path / "v2", {
        "job/memory.max": str(4 * GIB), "job/memory.current": str(3 * GIB), "job/cpu.max": "150000 100000",
        "job/step/memory.max": str(8 * GIB), "job/step/memory.current": str(GIB), "job/step/cpu.max": "max 100000"})
    assert available_memory(v2, meminfo, str(own)) == GIB            # the job's 1 GiB left, not the step's 7
    assert usable_cores(v2, str(own)) == 2                           # the job's 1.5 CPUs, not the host's 8
    own.write_text("4:memory:/job/step\n3:cpu,cpuacct:/job/step\n0::/\n")
    v1 = _files(tmp_path / "v1", {
        "memory/job/memory.limit_in_bytes": str(4 * GIB), "memory/job/memory.usage_in_bytes": str(3 * GIB),
        "memory/job/step/memory.limit_in_bytes": str(2**63 - 4096), "memory/job/step/memory.usage_in_bytes": "1",
        "cpu/job/cpu.cfs_quota_us": "250000", "cpu/job/cpu.cfs_period_us": "100000"})
    assert available_memory(v1, meminfo, str(own)) == GIB
    assert usable_cores(v1, str(own)) == 3                           # 2.5 CPUs: 3


def test_memory_used_past_the_limit_leaves_none(tmp_path):
    """A cgroup may use more than its limit for a while (usage is checked lazily): nothing is
    left then, not a negative amount."""
    root = _files(tmp_path / "cg", {"memory.max": str(2 * GIB), "memory.current": str(3 * GIB)})
    assert available_memory(root, _meminfo(tmp_path, 20), str(tmp_path / "no-self-cgroup")) == 0


def test_default_workers_without_memory_figures_or_with_room_for_every_core(tmp_path, monkeypatch):
    """Where no memory figure can be read every core gets a worker; where exactly as many
    workers fit as there are cores, all run with no notice; fewer fit: the notice gives each
    worker's need and the memory available in GiB (2**30 bytes)."""
    monkeypatch.setattr(resources.os, "sched_getaffinity", lambda pid: set(range(4)))   # 4 CPUs
    root = _files(tmp_path / "cg", {})
    own = str(tmp_path / "no-self-cgroup")
    per = 3 * GIB
    assert default_workers(per, root, str(tmp_path / "no-meminfo"), own) == (4, "")
    exact = (resources.MAIN_RESERVE_BYTES + 4 * per) / GIB
    assert default_workers(per, root, _meminfo(tmp_path, exact), own) == (4, "")
    n, why = default_workers(per, root, _meminfo(tmp_path, exact - 1), own)
    avail = (exact - 1) * GIB
    assert n == 3 and why.startswith(f"3 worker(s) for 4 cores: each needs about 3.0 GiB and "
                                     f"{avail / GIB:.1f} GiB of memory is available"), why
