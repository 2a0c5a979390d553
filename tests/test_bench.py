"""The benchmarks' own logic (bench/bench_gpu.py, bench/tiled.py, bench/many.py...), on small inputs.

The GPU rows run through the emulated kernels (tests/cuda_emulation) with a stand-in for
CuPy's events, so a lent device's short time is not spent finding a bug in the benchmark."""

from __future__ import annotations

import argparse
import pathlib
import sys
import types

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests" / "cuda_emulation"))
import bench_gpu  # noqa: E402
import cuda_emu  # noqa: E402
from many import many_segments  # noqa: E402
from tiled import tile_volume  # noqa: E402

from gpumesh import gpu, marching  # noqa: E402


def test_tile_volume_keeps_ids_distinct():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, size=(4, 3, 5)).astype(np.uint8)
    a[0, 0, 0] = 250
    t = tile_volume(a, 2)
    assert t.shape == (8, 6, 10) and t.dtype == np.uint64  # 8 * 251 IDs do not fit uint8
    step = 251
    for k in range(8):
        i, j, m = k // 4, (k // 2) % 2, k % 2
        tile = t[4 * i:4 * i + 4, 3 * j:3 * j + 3, 5 * m:5 * m + 5].astype(np.int64)
        assert np.array_equal(tile == 0, a == 0)
        assert np.array_equal(tile[a != 0] - k * step, a[a != 0])
    assert len(np.unique(t)) - 1 == 8 * (len(np.unique(a)) - 1)
    assert tile_volume(a.astype(np.uint32), 2).dtype == np.uint32  # fits: the dtype is kept


def test_many_segments_gives_one_separate_segment_per_cube():
    v = many_segments(16, 4)
    assert v.shape == (16, 16, 16) and v.dtype == np.uint64
    assert not v[::4].any() and v[1:4].all()             # every 4th x-plane cleared, the rest labelled
    ids = np.unique(v[v != 0])
    assert len(ids) == 64 and ids.max() < 2**63           # (16 / 4)^3 distinct 63-bit IDs
    for x in range(4):                                   # each cube holds one ID, in its 3 labelled planes
        for y in range(4):
            for z in range(4):
                cube = v[4 * x + 1:4 * x + 4, 4 * y:4 * y + 4, 4 * z:4 * z + 4]
                assert len(np.unique(cube)) == 1
    assert np.array_equal(v, many_segments(16, 4))       # seeded: the same volume every time
    with pytest.raises(ValueError):
        many_segments(18, 4)


class _Event:
    def record(self):
        pass

    def synchronize(self):
        pass


def _fake_cupy():
    device = types.SimpleNamespace(synchronize=lambda: None, id=0)
    cuda = types.SimpleNamespace(Event=_Event, Device=lambda: device,
                                 get_elapsed_time=lambda a, b: 1.5)
    return types.SimpleNamespace(cuda=cuda)


@pytest.fixture(scope="module")
def emu_lib(tmp_path_factory):
    if cuda_emu.compiler() is None:
        pytest.skip("g++ not found: cannot build the CUDA emulation")
    files = [gpu.kernel_dir() / f for f in gpu.KERNEL_FILES]
    return cuda_emu.build(tmp_path_factory.mktemp("emu"), files, gpu.KERNEL_NAMES)


def test_bench_rows_and_parity_through_the_emulated_backend(emu_lib, real_zarr, capsys):
    import tensorstore as ts

    store = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(real_zarr)}}).result()
    labels = np.ascontiguousarray(store[100:136, 200:233, 300:340].read().result())
    args = argparse.Namespace(warmup=1, repeat=2, host_repeat=1, cpu_repeat=1, cpu_tiled=False)
    rows: list = []
    cpu = bench_gpu.bench_cpu(rows, "real", labels, args)
    backend = gpu.GPUBackend(runtime=cuda_emu.EmulatedRuntime(emu_lib))
    info = bench_gpu.bench_gpu(rows, "real", labels, args, cpu, backend=backend, cp=_fake_cupy())
    assert info["parity"] is True and info["parity_pieces"] is True
    assert info["pool_peak_bytes"] > labels.nbytes
    what = [r["what"] for r in rows]
    assert what == ["cpu mc", "weld (cpu)", "cpu mc + weld", "cpu downsample", "gpu mc kernels",
                    "gpu mc + weld kernels (sort)", "gpu mc + weld kernels (hash)",
                    "gpu downsample kernel", "gpu downsample kernel 2x2x1", "gpu mc + transfers",
                    "gpu mc + transfers + weld (cpu)",
                    "gpu mc + weld (device)"]
    assert backend.weld == "sort"   # the rows of the hash weld leave the backend as it was
    assert rows[-1]["welded_on_device"] is True
    tris = len(marching.march_cubes(labels, bench_gpu.PIECE_SIZE)[0])
    assert tris > 0
    assert {r.get("triangles") for r in rows if "triangles" in r} == {tris}
    kernels = rows[what.index("gpu mc kernels")]
    assert kernels["median_s"] == 1.5e-3 and kernels["runs_s"] == [1.5e-3] * 2
    assert np.isclose(kernels["gvox_per_s"], labels.size / 1.5e-3 / 1e9)
    x = bench_gpu.speedups(rows)[what.index("gpu mc kernels")]
    assert x["x_cpu"] == rows[0]["median_s"] / 1.5e-3 and x["x_zmesh"] is None   # zmesh: mc + weld only
    bench_gpu.print_table(rows)
    table = capsys.readouterr().out
    assert "gpu mc kernels" in table and "x zmesh" in table


class _SharedPoolRuntime(cuda_emu.EmulatedRuntime):
    """CuPy's default pool: one for every runtime of the process, and after ``release()``
    (``free_all_blocks``) its ``total_bytes()`` counts only the blocks still in use."""

    def release(self) -> None:
        self.peak = self.live


def test_bench_pool_peak_survives_the_pageable_backends_release(emu_lib, real_zarr):
    import tensorstore as ts

    store = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(real_zarr)}}).result()
    labels = np.ascontiguousarray(store[100:120, 200:220, 300:320].read().result())
    args = argparse.Namespace(warmup=1, repeat=1, host_repeat=1, cpu_repeat=1, cpu_tiled=False)
    rows: list = []
    cpu = bench_gpu.bench_cpu(rows, "real", labels, args)
    rt = _SharedPoolRuntime(emu_lib)
    info = bench_gpu.bench_gpu(rows, "real", labels, args, cpu, backend=gpu.GPUBackend(runtime=rt),
                               cp=_fake_cupy(), pageable=gpu.GPUBackend(runtime=rt))
    assert info["parity_pieces_pageable"] is True
    assert rows[-1]["what"] == "gpu mc + weld (device), pageable copies"
    assert info["pool_peak_bytes"] > labels.nbytes


# --------------------------------------------------------------------------------------
# bench_main's igneous peer: the parent's side (the worker runs under igneous's own Python)

import importlib.util  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402

import bench_main  # noqa: E402


def test_igneous_source_layer_holds_the_volume(tmp_path):
    import tensorstore as ts

    rng = np.random.default_rng(1)
    a = rng.integers(0, 7, size=(70, 17, 9)).astype(np.uint32)  # more than one 64^3 chunk in x
    src = tmp_path / "labels.npy"
    np.save(src, a)
    args = argparse.Namespace(source=str(src), voxel_size=(4.0, 5.0, 6.0))
    setup = bench_main.prepare_igneous_source(args, tmp_path)
    layer = pathlib.Path(setup["layer"])
    assert setup["seconds"] >= 0 and setup["encoding"] == "raw"
    info = json.loads((layer / "info").read_text())
    assert info["type"] == "segmentation" and info["data_type"] == "uint32"
    assert info["scales"][0]["resolution"] == [4.0, 5.0, 6.0]
    fresh = bench_main._fresh_igneous_layer(layer, tmp_path, 0)
    for root in (layer, fresh):
        store = ts.open({"driver": "neuroglancer_precomputed",
                         "kvstore": {"driver": "file", "path": str(root)}}).result()
        assert np.array_equal(store[..., 0].read().result(), a)
    # each run gets its own info (igneous writes its mesh entry there), not the source's
    (fresh / "info").write_text("{}")
    assert json.loads((layer / "info").read_text()) == info
    again = bench_main._fresh_igneous_layer(layer, tmp_path, 0)
    assert json.loads((again / "info").read_text()) == info


def test_igneous_unavailable_says_why(tmp_path):
    missing = str(tmp_path / "no-such-python")
    assert "cannot run" in bench_main.igneous_unavailable(missing)
    why = bench_main.igneous_unavailable(sys.executable)
    if importlib.util.find_spec("igneous") is None:
        assert why is not None and "does not import" in why
    else:
        assert why is None


def _one_peer_on_a_crop(tmp_path, real_zarr, peer: str, *args) -> dict:
    """``bench_main`` with only ``peer`` (and ``args``) on a 96³ crop of the real volume; its result record."""
    import tensorstore as ts

    store = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(real_zarr)}}).result()
    src = tmp_path / "crop.npy"
    np.save(src, np.ascontiguousarray(store[100:196, 100:196, 100:196].read().result()))
    rc = bench_main.main(["--source", str(src), "--skip", ",".join(t for t in bench_main.TOOLS if t != peer), *args,
                          "--results-dir", str(tmp_path / "res"), "--out-dir", str(tmp_path / "out")])
    assert rc == 0
    (result,) = (tmp_path / "res").glob("main-*.json")
    return json.loads(result.read_text())


def _needs(env: str, what: str):
    return pytest.mark.skipif(not os.environ.get(env), reason=f"{env} names no environment with {what}")


@pytest.mark.parametrize("peer, args, lods", [
    pytest.param("igneous", ("--igneous-workers", "2"), None, marks=_needs("GPUMESH_IGNEOUS_PYTHON", "igneous-pipeline")),
    pytest.param("mesh-n-bone", ("--mnb-workers", "2"), 3, marks=_needs("GPUMESH_MNB_PYTHON", "mesh-n-bone")),
])
def test_a_peer_pipeline_end_to_end(tmp_path, real_zarr, capsys, peer, args, lods):
    """igneous's and mesh-n-bone's runs, each in its own environment, counted and checked by
    gpumesh.validate (``lods``: the LODs it must write, where it writes as many as asked)."""
    rec = _one_peer_on_a_crop(tmp_path, real_zarr, peer, *args)
    res = rec["results"][peer]
    assert res["runs_ok"] == 1 and res["processes"] == 2 and res["segments"] > 0
    assert res["triangles_per_lod"][0] > 0 and res["bytes"] > 0 and "validate_errors" in res
    assert lods is None or len(res["triangles_per_lod"]) == lods
    assert peer in capsys.readouterr().out
    if peer == "mesh-n-bone":   # the versions of its own environment
        assert rec["options"]["mnb_setup"]["packages"]["mesh-n-bone"]


# --------------------------------------------------------------------------------------
# bench_main's mesh-n-bone peer: its own command under its own Python


def test_mnb_source_is_the_volume_in_z_y_x_order(tmp_path):
    import tensorstore as ts

    a = np.random.default_rng(2).integers(0, 9, size=(140, 17, 9)).astype(np.uint32)  # 2 chunks in x
    src = tmp_path / "labels.npy"
    np.save(src, a)
    setup = bench_main.prepare_mnb_source(argparse.Namespace(source=str(src), voxel_size=(4.0, 5.0, 6.0)), tmp_path)
    store = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": setup["path"]}}).result()
    assert store.domain.labels == ("z", "y", "x") and store.chunk_layout.read_chunk.shape == (9, 17, 128)
    assert np.array_equal(store.read().result(), a.transpose(2, 1, 0))


def test_mnb_unavailable_says_why(tmp_path):
    assert "no mesh-n-bone command" in bench_main.mnb_unavailable(str(tmp_path / "python"))
    # a mesh-n-bone command beside a Python that cannot import it
    (tmp_path / "mesh-n-bone").write_text("#!/bin/sh\n")
    (tmp_path / "python").symlink_to(sys.executable)
    assert "does not import" in bench_main.mnb_unavailable(str(tmp_path / "python"))


def test_mnb_run_writes_its_configuration(tmp_path, monkeypatch):
    """The run configuration mesh-n-bone gets: the z, y, x copy, gpumesh's LOD count, the voxel
    size z, y, x, a local Dask cluster whose workers are not sized (or stopped) by memory."""
    import yaml

    seen = {}

    def fake_run_child(cmd, log_path, env=None, cwd=None, timeout=None, **kw):
        cfg = pathlib.Path(cmd[2])
        seen["cmd"], seen["cwd"] = cmd, cwd
        seen["run"] = yaml.safe_load((cfg / "run-config.yaml").read_text())
        seen["dask"] = yaml.safe_load((cfg / "dask-config.yaml").read_text())
        return {"returncode": 1, "wall_s": 0.1, "timed_out": False, "log": str(log_path)}

    monkeypatch.setattr(bench_main, "run_child", fake_run_child)
    args = argparse.Namespace(voxel_size=(32.0, 32.0, 40.0), mnb_python="/env/bin/python", mnb_workers=3,
                              mnb_nlod=3, timeout=None)
    res = bench_main.run_mnb(args, tmp_path, 0, tmp_path / "mnb-source.zarr")
    assert "error" in res   # no output: a failed run, not counted
    assert seen["cmd"] == ["/env/bin/mesh-n-bone", "meshify", str(tmp_path / "mnb-config-0"), "-n", "3"]
    assert seen["run"] == {"input_path": str(tmp_path / "mnb-source.zarr"), "output_directory": str(tmp_path / "mnb-0"),
                           "num_lods": 3, "voxel_size_nm": [40, 32, 32]}
    local = seen["dask"]["jobqueue"]["local"]
    assert "memory" not in local and local["processes"] == local["cores"] == 1
    assert set(seen["dask"]["distributed"]["worker"]["memory"].values()) == {False}



# --------------------------------------------------------------------------------------
# bench_tasks: per-task CPU times and the list-scheduling model

import bench_tasks  # noqa: E402


def test_makespan_is_list_scheduling():
    assert bench_tasks.makespan([3, 3, 2, 2, 2], 2) == 7
    assert bench_tasks.makespan([1, 1, 4], 2) == 5        # the job's order: 4 comes last
    assert bench_tasks.makespan([4, 1, 1], 2) == 4        # longest first
    assert bench_tasks.makespan([2.5], 8) == 2.5
    assert bench_tasks.makespan([], 3) == 0


def test_tasks_benchmark_runs_every_task_of_the_job(real_zarr):
    import tensorstore as ts

    from gpumesh.pipeline import MeshOptions, Plan, task_name

    store = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(real_zarr)}}).result()
    labels = np.ascontiguousarray(store[:150, :140, :70].read().result())
    rows, backend = bench_tasks.measure(labels, (32.0, 32.0, 40.0), "cpu")
    assert backend == "cpu"
    assert [r["task"] for r in rows] == [task_name(t) for t in Plan.make(labels.shape, MeshOptions()).tasks()]
    assert all(r["cpu_s"] >= 0 and r["bytes"] > 0 for r in rows)
    sched = bench_tasks.model(rows)
    longest, total = max(r["cpu_s"] for r in rows), sum(r["cpu_s"] for r in rows)
    for s in sched:
        assert s["ideal_s"] == pytest.approx(total / s["workers"])
        for key in ("job_order_s", "longest_first_s"):  # Graham's bounds of list scheduling
            assert max(longest, s["ideal_s"]) - 1e-9 <= s[key] <= s["ideal_s"] + longest + 1e-9
    assert sched[0]["job_order_s"] == pytest.approx(total)  # one worker


def test_run_child_samples_the_peak_of_device_memory(tmp_path):
    import bench_main

    given = []

    def reader():  # "device memory in use": 300 MB before the run, then rising by 10 MB
        given.append(300 << 20 if not given else (100 + 10 * len(given)) << 20)
        return given[-1]

    meas = bench_main.run_child([sys.executable, "-c", "import time; time.sleep(0.5)"],
                                tmp_path / "log.txt", sample_interval=0.02, gpu_reader=reader)
    assert meas["returncode"] == 0
    assert meas["gpu_before_mb"] == 300
    assert len(given) > 3
    assert meas["gpu_peak_mb"] == max(given[1:]) / 2**20
    none = bench_main.run_child([sys.executable, "-c", "pass"], tmp_path / "log2.txt")
    assert none["gpu_peak_mb"] is None and none["gpu_before_mb"] is None


def test_no_gpu_memory_reader_without_a_gpu(monkeypatch):
    import bench_main

    monkeypatch.setitem(sys.modules, "pynvml", None)   # no NVML
    monkeypatch.setattr(bench_main.shutil, "which", lambda name: None)  # no nvidia-smi
    assert bench_main.gpu_memory_reader() is None


def test_a_peer_stopped_at_its_timeout_gives_a_lower_bound(tmp_path, capsys):
    import bench_main

    meas = bench_main.run_child([sys.executable, "-c", "import time; time.sleep(30)"],
                                tmp_path / "log.txt", timeout=0.5)
    assert meas["timed_out"] and meas["returncode"] != 0 and 0.5 <= meas["wall_s"] < 10
    stopped = bench_main.aggregate([bench_main._child_failure({"tool": "igneous", **meas}, meas)])
    failed = bench_main.aggregate([{"tool": "zmesh", "error": "exit status 1", "wall_s": 2.0,
                                    "timed_out": False}])
    gpumesh = {"wall_s": 0.25, "runs_ok": 1}
    assert bench_main.ratio_at_least(stopped, 0.25) == pytest.approx(meas["wall_s"] / 0.25)
    assert bench_main.ratio_at_least(failed, 0.25) is None       # failed, not stopped
    assert bench_main.ratio_at_least(gpumesh, 0.25) is None      # finished: no bound
    bench_main.print_table({"gpumesh": gpumesh, "igneous": stopped, "zmesh": failed})
    rows = {line.split("|")[0].strip(): line.split("|")[-1].strip()
            for line in capsys.readouterr().out.splitlines() if "|" in line}
    assert rows["igneous"] == f"> {meas['wall_s'] / 0.25:.2f}" and rows["zmesh"] == "n/a"


def test_save_result_never_overwrites(tmp_path):
    """Two results of one kind started in the same second (benchmarks run side by side) both stay."""
    import datetime as dt

    from bench_main import save_result

    started = dt.datetime(2026, 12, 3, 18, 30, 16, tzinfo=dt.timezone.utc)
    paths = [save_result({"run": i}, "tasks", started, tmp_path) for i in range(3)]
    assert len(set(paths)) == 3
    assert [json.loads(p.read_text())["run"] for p in paths] == [0, 1, 2]
    assert paths[0].name.startswith("tasks-20261203T183016Z-") and paths[1].stem.endswith("-2")


def test_a_gpumesh_variant_runs_beside_gpumesh(tmp_path, crop, capsys):
    """``--gpumesh-variant ARGS`` adds a row that runs gpumesh with ARGS, interleaved with gpumesh."""
    from conftest import write_zarr

    src = tmp_path / "part.zarr"
    write_zarr(src, crop[:64, :64, :64])
    rc = bench_main.main(["--source", str(src), "--skip", "zmesh,serra,igneous,mesh-n-bone", "--workers", "1",
                          "--gpumesh-variant", "--bits 10", "--repeat", "2",
                          "--results-dir", str(tmp_path / "res"), "--out-dir", str(tmp_path / "out")])
    assert rc == 0
    (result,) = (tmp_path / "res").glob("main-*.json")
    rec = json.loads(result.read_text())
    base, var = rec["results"]["gpumesh"], rec["results"]["gpumesh --bits 10"]
    assert base["runs_ok"] == var["runs_ok"] == 2
    assert var["triangles_per_lod"] == base["triangles_per_lod"] and var["bytes"] < base["bytes"]
    assert [r["command"][-2:] for r in rec["runs"]["gpumesh --bits 10"]] == [["--bits", "10"]] * 2
    assert "--bits" not in rec["runs"]["gpumesh"][0]["command"]
    assert rec["ratios"]["gpumesh --bits 10"]["wall_vs_gpumesh"] > 0
    out = capsys.readouterr()
    order = [line.split("]")[0] for line in out.err.splitlines() if " run " in line and ": wall" in line]
    assert order == ["[gpumesh", "[gpumesh --bits 10"] * 2   # interleaved
    assert "gpumesh --bits 10: segments" in out.out


def test_lods_benchmark_compares_the_downsampling_rules(tmp_path, crop, capsys):
    """``bench_lods.py`` meshes with each rule and compares every LOD's volume with LOD 0's: on
    anisotropic voxels the two rules give the same LOD 0 and differ past it."""
    import bench_lods

    from conftest import write_zarr

    src = tmp_path / "part.zarr"
    write_zarr(src, crop[:64, :64, :64])
    assert bench_lods.main(["--source", str(src), "--voxel-size", "8,8,40", "--sample", "20", "--workers", "1",
                            "--gpumesh-args", "--chunk-size 16", "--results-dir", str(tmp_path / "res")]) == 0
    (result,) = (tmp_path / "res").glob("lods-*.json")
    rec = json.loads(result.read_text())
    auto, every = rec["rows"]["auto"], rec["rows"]["all"]
    assert len(rec["sample"]) == 20 and rec["git"]["commit"]
    assert auto["triangles_per_lod"][0] == every["triangles_per_lod"][0]
    assert auto["triangles_per_lod"][1:] != every["triangles_per_lod"][1:]
    for row in (auto, every):
        assert sum(row["segments_per_num_lods"].values()) == 20
        assert all(0 <= e["median"] <= e["p90"] for e in row["volume_error"].values())
    assert "|V_k-V_0|/V_0" in capsys.readouterr().out


def test_parts_benchmark_runs_the_parts_and_the_last_run_and_compares_the_bytes(tmp_path, real_zarr, capsys):
    """``bench_parts.py`` on a 64^3 cutout in 8 blocks: the whole run, 3 parts that write no
    output, the ``--resume``; the same bytes; the estimate is the slowest part plus the last."""
    import bench_parts

    assert bench_parts.main(["--source", str(real_zarr), "--size", "64", "--parts", "3", "--workers", "1",
                             "--gpumesh-args", "--chunk-size 8", "--results-dir", str(tmp_path / "res")]) == 0
    (result,) = (tmp_path / "res").glob("parts-*.json")
    rec = json.loads(result.read_text())
    assert rec["same_bytes"] is True and rec["git"]["commit"] and len(rec["parts"]) == 3
    assert rec["whole"]["bytes"] == rec["last"]["bytes"] > 0
    assert all(r["bytes"] == 0 and "--part" in r["command"] for r in rec["parts"])
    assert [r["command"][r["command"].index("--part") + 1] for r in rec["parts"]] == ["0/3", "1/3", "2/3"]
    walls = [r["wall_s"] for r in rec["parts"]]
    assert rec["estimated_wall_on_n_machines_s"] == pytest.approx(max(walls) + rec["last"]["wall_s"])
    assert rec["sum_of_runs_s"] == pytest.approx(sum(walls) + rec["last"]["wall_s"])
    out = capsys.readouterr().out
    assert "on 3 machines: slowest part + last" in out and "part 2/3" in out


def test_scale_benchmark_resumes_a_sparse_jobs_parts_with_real_meshes(tmp_path, real_zarr, capsys):
    """``bench_scale.py`` on a small sparse volume: part 0 meshes the real cutout's block, the
    other parts' task results are written as empty ones, and the ``--resume`` takes every task
    as finished and writes the cutout's meshes; a job on a Dask cluster says its client's RSS."""
    import bench_scale

    assert bench_scale.main(["--source", str(real_zarr), "--shape", "512,512,128", "--cutout", "64",
                             "--part-tasks", "20", "--workers", "1", "--dask-tasks", "30",
                             "--results-dir", str(tmp_path / "res")]) == 0
    (result,) = (tmp_path / "res").glob("scale-*.json")
    rec = json.loads(result.read_text())
    assert rec["git"]["commit"] and rec["tasks"] > 40 and rec["part"]["bytes"] == 0
    assert 15 <= rec["dask_job"]["tasks"] <= 60 and rec["dask_job"]["client_peak_rss_mb"] > 50
    assert rec["part"]["tasks"] + rec["results_written_for_other_parts"] == rec["tasks"]
    assert rec["resume"]["tasks_resumed"] == rec["tasks"]
    assert rec["resume"]["bytes"] > 0 and rec["resume"]["triangles_per_lod"][0] > 1000
    assert "--resume after" in capsys.readouterr().out


def _bench_on_a_corner(bench, kind: str, crop, tmp_path, *args) -> dict:
    """``bench.main(args)`` on the crop's 64³ corner (zarr v3); its result record (``kind``-*.json)."""
    from conftest import write_zarr

    src = tmp_path / "part.zarr"
    write_zarr(src, crop[:64, :64, :64])
    assert bench.main(["--source", str(src), *args, "--results-dir", str(tmp_path / "res")]) == 0
    (result,) = (tmp_path / "res").glob(f"{kind}-*.json")
    return json.loads(result.read_text())


def test_validate_benchmark_times_each_thread_count_on_the_same_report(tmp_path, crop, capsys):
    """``bench_validate.py`` meshes once, validates on 1 and 3 threads in turn, and records
    every run's seconds; the reports agree (else it fails)."""
    import bench_validate

    rec = _bench_on_a_corner(bench_validate, "validate", crop, tmp_path, "--threads", "1,3", "--repeat", "2",
                             "--gpumesh-args", "--chunk-size 16 --workers 1")
    assert rec["segments"] > 0 and rec["errors"] == 0 and rec["same_report"] and rec["git"]["commit"]
    assert set(rec["seconds"]) == {"1", "3"} and all(len(v) == 2 and min(v) > 0 for v in rec["seconds"].values())
    assert sum(s["triangles"] for s in rec["per_lod"]) == sum(rec["mesh"]["triangles_per_lod"])
    assert "threads | median s" in capsys.readouterr().out


def test_dask_benchmark_reads_the_workers_around_each_job(tmp_path, crop, capsys):
    """``bench_dask.py`` starts a scheduler and a worker (with its nanny), runs the job on it
    and reads the worker process: its CPU seconds during the job, its resident memory after it
    and its peak."""
    import bench_dask

    rec = _bench_on_a_corner(bench_dask, "dask", crop, tmp_path, "--workers", "1", "--runs", "1")
    assert rec["same_bytes"] is True and rec["git"]["commit"] and list(rec["runs"]) == ["this checkout"]
    (run,) = rec["runs"]["this checkout"]
    assert run["bytes"] > 0 and run["workers_cpu_s"] > 0
    assert len(run["workers_rss_after_mb"]) == len(run["workers_hwm_mb"]) == 1
    assert 0 < run["workers_rss_after_mb"][0] <= run["workers_hwm_mb"][0]
    assert "workers' CPU s" in capsys.readouterr().out


def test_store_benchmark_counts_the_requests_of_a_job_on_an_s3_api(tmp_path, crop, capsys):
    """``bench_store.py`` starts a moto server, meshes into it and counts its requests by
    method: the job's writes (PUT) and reads (GET) are there, and its summary's seconds."""
    pytest.importorskip("moto.server")
    import bench_store

    rec = _bench_on_a_corner(bench_store, "store", crop, tmp_path, "--shard-bits", "2", "--workers", "1",
                             "--runs", "2")
    assert rec["same_bytes"] is True and rec["git"]["commit"] and list(rec["runs"]) == ["this checkout"]
    runs = rec["runs"]["this checkout"]
    assert len(runs) == 2 and all(r["bytes"] > 0 and r["writing_s"] > 0 for r in runs)
    for r in runs:   # 4 shards and their records, the info, the task results: written, then read
        assert r["requests"]["PUT"] >= 4 and r["requests"]["GET"] > 0
        assert r["requests_all"] == sum(r["requests"].values())
    assert "requests |   GETs" in capsys.readouterr().out


def test_store_benchmark_runs_the_job_as_parts_and_counts_the_last_run(tmp_path, crop, capsys):
    """``bench_store.py --parts N``: the job as N parts, then the ``--resume`` that writes the
    output, whose requests and seconds the run's are (each part's beside them), with the bytes
    of a whole job."""
    pytest.importorskip("moto.server")
    import bench_store

    rec = _bench_on_a_corner(bench_store, "store", crop, tmp_path, "--shard-bits", "1", "--workers", "1",
                             "--parts", "2")
    assert rec["same_bytes"] is True and rec["options"]["parts"] == 2
    (run,) = rec["runs"]["this checkout"]
    assert len(run["parts"]) == 2 and all(p["requests_all"] > 0 and p["wall_s"] > 0 for p in run["parts"])
    # the last run meshed nothing: it read the parts' results and wrote the shards
    assert run["meshing_s"] < run["wall_s"] and run["requests"]["GET"] > 0 and run["requests"]["PUT"] >= 2
    assert run["bytes"] > 0 and "the --resume after 2 parts" in capsys.readouterr().out


def test_fidelity_benchmark_measures_lod0_against_the_exact_surface(tmp_path, crop, capsys):
    """``bench_fidelity.py`` meshes with high and the compared presets and measures each
    preset's LOD 0 against high's, both ways: within two voxels at ``medium``; ``low`` here
    drops a one-voxel cavity inside a segment (a closed surface of 8 triangles, 3 voxels from
    the segment's outer surface), which only the cap bounds."""
    import bench_fidelity

    rec = _bench_on_a_corner(bench_fidelity, "fidelity", crop, tmp_path, "--sample", "15", "--workers", "1",
                             "--gpumesh-args", "--chunk-size 16")
    rows = rec["rows"]
    assert len(rec["sample"]) == 15 and rec["git"]["commit"] and set(rows) == {"high", "medium", "low"}
    assert rows["low"]["triangles_per_lod"][0] < rows["medium"]["triangles_per_lod"][0] \
        < rows["high"]["triangles_per_lod"][0]
    for preset in ("medium", "low"):
        d = rows[preset]["lod0_distance_voxels"]
        for way in ("exact_to_preset", "preset_to_exact"):
            assert 0 < d[way]["median"] <= d[way]["p90"] <= d[way]["max"] <= bench_fidelity.CAP_VOXELS
            assert d[way]["median"] <= 1.0
        assert d["worst_segment"] in rec["sample"]
    assert rows["medium"]["lod0_distance_voxels"]["either"]["max"] <= 2.0
    assert "exact->preset" in capsys.readouterr().out


def test_encode_benchmark_compares_the_two_depths(crop_medium, tmp_path, capsys):
    """bench_encode re-encodes a 16-bit output at 16 and 10 bits: the same triangles, fewer bytes at 10."""
    import bench_encode

    dest, _ = crop_medium
    assert bench_encode.main(["--mesh", str(dest), "--segments", "20", "--passes", "1",
                              "--results-dir", str(tmp_path)]) == 0
    (result,) = tmp_path.glob("encode-*.json")
    rec = json.loads(result.read_text())
    assert rec["fragments"] > 0 and rec["triangles"] > 0 and rec["options"]["segments"] == 20
    rows = {(r["encoder"], r["bits"]): r for r in rec["rows"]}
    assert ("DracoPy", 16) in rows and ("DracoPy", 10) in rows
    for bits in (16, 10):   # every encoder writes Draco's bytes
        assert len({r["bytes"] for (_, b), r in rows.items() if b == bits}) == 1
    for (enc, bits), r in rows.items():
        if bits == 10:   # the same triangles as the 16-bit rows (checked inside), in fewer bytes
            assert r["bytes"] < rows[enc, 16]["bytes"] and r["bytes_vs_16"] < 1
    assert "DracoPy" in capsys.readouterr().out


def test_encode_benchmark_rejects_positions_off_the_lattice():
    import bench_encode

    q = np.array([[0, 0, 0], [512, 0, 0], [0, 65535, 64]])
    np.testing.assert_array_equal(bench_encode.to_ten_bits(q[:2]), [[0, 0, 0], [8, 0, 0]])
    np.testing.assert_array_equal(bench_encode.to_ten_bits(q[2:]), [[0, 1023, 1]])
    with pytest.raises(SystemExit, match="lattice"):
        bench_encode.to_ten_bits(np.array([[0, 0, 100]]))


def test_adhoc_benchmark_times_both_tools_on_one_segment(real_zarr, tmp_path, capsys):
    """bench_adhoc meshes a segment of the real volume with gpumesh (scan and box) and zmesh, and
    records both meshes' triangles (closed) and the ratio."""
    import bench_adhoc

    seg = 67406930
    assert bench_adhoc.main(["--source", str(real_zarr), "--ids", str(seg), "--repeat", "1",
                             "--results-dir", str(tmp_path)]) == 0
    (result,) = tmp_path.glob("adhoc-*.json")
    rec = json.loads(result.read_text())
    (row,) = rec["rows"]
    assert row["segment"] == seg and row["voxels"] > 0 and row["gpumesh_closed"]
    assert row["gpumesh_scan_s"] > 0 and row["gpumesh_bbox_s"] > 0 and row["gpumesh_triangles"] > 0
    if "zmesh_bbox_s" in row:
        assert row["zmesh_closed"] and row["zmesh_triangles"] > 0
        assert row["zmesh_over_gpumesh_bbox"] == pytest.approx(row["zmesh_bbox_s"] / row["gpumesh_bbox_s"])
    assert str(seg) in capsys.readouterr().out


def test_adhoc_benchmark_picks_segments_at_percentiles():
    import bench_adhoc

    labels = np.zeros((8, 8, 8), np.uint32)
    labels[0, 0, :1] = 5     # 1 voxel
    labels[1, :, :2] = 7     # 16
    labels[2:4] = 9          # 128

    class Vol:
        shape = labels.shape

        def read(self, start, stop):
            return labels[start[0]:stop[0], start[1]:stop[1], start[2]:stop[2]]

    assert bench_adhoc.pick_segments(Vol(), [0, 50, 100]) == [(5, 1), (7, 16), (9, 128)]


def test_a_dask_variant_gets_no_workers_flag(tmp_path, crop):
    """A ``--scheduler`` variant runs the main job on the cluster: the same output as gpumesh's,
    without the local ``--workers`` (which the CLI refuses beside ``--scheduler``)."""
    from distributed import LocalCluster

    from conftest import write_zarr

    src = tmp_path / "part.zarr"
    write_zarr(src, crop[:64, :64, :64])
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        variant = f"--scheduler {cluster.scheduler_address}"
        rc = bench_main.main(["--source", str(src), "--skip", "zmesh,serra,igneous,mesh-n-bone", "--workers", "1",
                              "--gpumesh-variant", variant, "--results-dir", str(tmp_path / "res"),
                              "--out-dir", str(tmp_path / "out")])
    assert rc == 0
    (result,) = (tmp_path / "res").glob("main-*.json")
    rec = json.loads(result.read_text())
    base, var = rec["results"]["gpumesh"], rec["results"][f"gpumesh {variant}"]
    assert base["runs_ok"] == var["runs_ok"] == 1
    assert var["triangles_per_lod"] == base["triangles_per_lod"] and var["bytes"] == base["bytes"]
    assert "--workers" in rec["runs"]["gpumesh"][0]["command"]
    assert "--workers" not in rec["runs"][f"gpumesh {variant}"][0]["command"]


# --------------------------------------------------------------------------------------
# bench_memory: a worker's peak memory against the model

import bench_memory  # noqa: E402


def test_bench_memory_runs_every_task_as_one_worker(tmp_path, capsys):
    """On a small zarr: one row per max LODs, every task of the job run (its results written),
    the peak at least the start, and the model's figure beside it."""
    import json

    from conftest import write_zarr
    from gpumesh.pipeline import MeshOptions, Plan

    labels = np.zeros((48, 40, 36), np.uint32)
    labels[4:30, 6:35, 3:33] = 3
    labels[20:44, 2:20, 10:30] = 9
    write_zarr(tmp_path / "v.zarr", labels, chunk=16)
    assert bench_memory.main(["--source", str(tmp_path / "v.zarr"), "--chunk-size", "8", "--max-lods", "2",
                              "--max-lods", "3", "--results-dir", str(tmp_path / "res")]) == 0
    out = capsys.readouterr().out
    assert "model / peak" in out
    (result,) = list((tmp_path / "res").glob("memory-*.json"))
    rows = json.loads(result.read_text())["rows"]
    assert [r["max_lods"] for r in rows] == [2, 3]
    for r in rows:
        plan = Plan.make(labels.shape, MeshOptions(chunk_size=8, max_lods=r["max_lods"]))
        assert r["block"] == plan.block and r["tasks"] == len(plan.tasks())
        assert r["peak_rss_mib"] >= r["rss_before_mib"] > 0 and r["model_mib"] > 0 and r["read_cache_mib"] > 0


# --------------------------------------------------------------------------------------
# bench_assembly: the main process's memory with the index held whole and in waves

import bench_assembly  # noqa: E402


@pytest.mark.parametrize("caps", ["h", "s", "8H", "8hs", "-1", "8,x"])
def test_bench_assembly_refuses_a_malformed_cap_at_once(caps, capsys):
    with pytest.raises(SystemExit) as stop:
        bench_assembly.main(["--caps", caps, "--no-save"])
    assert stop.value.code == 2 and "is not a size in MiB" in capsys.readouterr().err


def test_bench_assembly_runs_each_cap_and_compares_the_outputs(tmp_path, capsys):
    """On a small zarr: a row per cap, the default holding the index whole (no waves) and a
    tiny cap writing in waves, from the spill grouped by wave, from the spill read whole by
    each wave (``s``: more of it read), then from the headers again (``h``: more reads of the
    task results), the same output digest for all, the main process's peak RSS."""
    import json

    from conftest import write_zarr

    labels = np.zeros((48, 40, 36), np.uint32)
    labels[4:30, 6:35, 3:33] = 3
    labels[20:44, 2:20, 10:30] = 9
    labels[30:40, 25:38, 2:12] = 12
    for k, x in enumerate(range(2, 44, 6)):   # small ones, in other shards
        labels[x:x + 4, 36:39, 30:34] = 20 + k
    write_zarr(tmp_path / "v.zarr", labels, chunk=16)
    assert bench_assembly.main(["--source", str(tmp_path / "v.zarr"), "--chunk-size", "8", "--max-lods", "2",
                                "--shard-bits", "3", "--caps", "0.0001,0.0001s,0.0001h",
                                "--results-dir", str(tmp_path / "res")]) == 0
    out = capsys.readouterr().out
    assert "the same output bytes at every cap: True" in out
    (result,) = list((tmp_path / "res").glob("assembly-*.json"))
    record = json.loads(result.read_text())
    default, small, whole, headers = record["rows"]
    assert default["cap"] == "default" and default["index_waves"] == 0 and not default["index_spilled"]
    assert small["index_waves"] >= 3 and small["cap_bytes"] < default["cap_bytes"] and small["index_spilled"]
    assert small["index_grouped"] and not whole["index_grouped"] and whole["index_spilled"]
    assert whole["index_bytes_read"] > small["index_bytes_read"] > 0 == default["index_bytes_read"]
    assert headers["index_waves"] == whole["index_waves"] == small["index_waves"] and not headers["index_spilled"]
    assert headers["result_reads"] > small["result_reads"] == whole["result_reads"] > 0
    assert headers["index_bytes_read"] == 0
    assert default["digest"] == small["digest"] == whole["digest"] == headers["digest"]
    assert default["fragments"] == small["fragments"] > 0
    assert record["same_output"] and default["main_peak_rss_mib"] > 0


@pytest.mark.parametrize("stages", [None, "tests", "bench,main", "igneous", "tests,nope"])
def test_the_device_kit_runs_the_stages_asked_for(tmp_path, stages):
    """``STAGES`` of ``bench/device/gpu_check.sh`` runs those stages alone after the install (a
    first, shorter device call, or one stage again), all without it; a stage it does not know
    stops it with status 2 before anything runs.  Python is a stub here that logs its calls."""
    import shutil
    import subprocess

    repo = tmp_path / "repo"
    (repo / "bench" / "device").mkdir(parents=True)
    shutil.copy(os.path.join(os.path.dirname(bench_main.__file__), "device", "gpu_check.sh"), repo / "bench" / "device")
    calls = tmp_path / "calls"
    stub = tmp_path / "python"
    stub.write_text(f"#!/bin/sh\necho \"$*\" >> {calls}\nexit 0\n")
    stub.chmod(0o755)
    (repo / ".whl").mkdir()
    (repo / ".whl" / "igneous-site-cp312.tar.xz").write_bytes(b"not unpacked by the stub")
    (tmp_path / "work").mkdir()
    env = dict(os.environ, PYTHON=str(stub), OUT=str(tmp_path / "out"), WORK=str(tmp_path / "work"), BUDGET="540")
    env.pop("STAGES", None)
    if stages is not None:
        env["STAGES"] = stages
    r = subprocess.run(["bash", str(repo / "bench" / "device" / "gpu_check.sh")], env=env, capture_output=True,
                       text=True, timeout=120)
    log = calls.read_text() if calls.exists() else ""
    if stages == "tests,nope":
        assert r.returncode == 2 and "no stage nope" in r.stdout and log == ""
        return
    asked = ["tests", "bench", "main", "igneous"] if stages is None else stages.split(",")
    assert "pip install" in log   # the install, whatever the stages
    assert ("tests/test_gpu.py" in log) == ("tests" in asked)
    assert ("-m gpumesh.cli warmup --dtype uint32 --device gpu" in log) == ("tests" in asked)
    assert ("bench/bench_gpu.py" in log) == ("bench" in asked)
    assert ("--skip zmesh,serra,igneous,mesh-n-bone" in log) == ("main" in asked)
    assert ("--igneous-python" in log) == ("igneous" in asked)
    # igneous runs from its own site, unpacked under WORK, as all else the kit writes
    assert f"PYTHONPATH={tmp_path / 'work' / 'ignsite'} exec" in (tmp_path / "work" / "ignpy").read_text()
    for left in {"tests", "bench", "main", "igneous"} - set(asked):
        assert f"stage {left} left out" in r.stdout


def _git_repo(path):
    """``git(*args)`` (its stdout) in a new, empty repository at ``path``."""
    import subprocess

    def git(*a):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *a], cwd=path,
                              check=True, capture_output=True).stdout

    git("init", "-q")
    return git


def test_prepared_commit_names_the_commit_and_the_files_that_differ_from_it(tmp_path, monkeypatch):
    # a device machine gets the working tree without .git: bench/device/prepare.sh records the
    # commit and its blobs in .devdata/COMMIT, and git_info reads them there
    import shutil

    git = _git_repo(tmp_path)
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b b.txt").write_bytes(b"\x00\xff bytes\n")
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "r.json").write_text("{}")
    os.symlink("sub", tmp_path / "link")
    git("add", "-A")
    git("commit", "-q", "-m", "c")
    (tmp_path / ".devdata").mkdir()
    (tmp_path / ".devdata" / "COMMIT").write_bytes(git("rev-parse", "HEAD") + git("ls-tree", "-r", "-z", "HEAD"))
    head = git("rev-parse", "HEAD").decode().strip()
    monkeypatch.setattr(bench_main, "REPO_ROOT", tmp_path)
    got = bench_main.prepared_commit(tmp_path / ".devdata" / "COMMIT")
    assert got["commit"] == head and got["dirty"] is False and got["changed_files"] == []
    (tmp_path / "bench" / "results" / "r.json").write_text('{"a benchmark": "rewrote it"}')   # as git_info
    assert bench_main.prepared_commit(tmp_path / ".devdata" / "COMMIT")["dirty"] is False
    (tmp_path / "a.py").write_text("x = 2\n")
    (tmp_path / "sub" / "b b.txt").unlink()
    got = bench_main.prepared_commit(tmp_path / ".devdata" / "COMMIT")
    assert got["dirty"] is True and sorted(got["changed_files"]) == ["a.py", "sub/b b.txt"]
    assert bench_main.prepared_commit(tmp_path / "none") is None
    shutil.rmtree(tmp_path / ".git")   # what the device gets
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    monkeypatch.setattr(bench_main, "PREPARED_COMMIT", tmp_path / ".devdata" / "COMMIT")
    info = bench_main.git_info()
    assert info["commit"] == head and info["dirty"] is True and "commit_error" in info


def test_a_benchmark_imports_its_own_checkouts_gpumesh(tmp_path):
    # run from another checkout (a clean clone), a benchmark imported the gpumesh that the
    # Python had installed (an editable install of this one) and named the clone's commit
    import shutil
    import subprocess

    other = tmp_path / "clone"
    (other / "bench").mkdir(parents=True)
    shutil.copy(bench_main.__file__, other / "bench")
    (other / "gpumesh").mkdir()
    (other / "gpumesh" / "__init__.py").write_text("")
    probe = tmp_path / "probe.py"   # run as a benchmark is: its folder first on the path, not the checkout
    probe.write_text(f"import sys\nsys.path.insert(0, {str(other / 'bench')!r})\n"
                     "import bench_main, gpumesh\nprint(gpumesh.__file__)\n")
    r = subprocess.run([sys.executable, str(probe)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert pathlib.Path(r.stdout.strip()).resolve() == (other / "gpumesh" / "__init__.py").resolve()


def test_mesh_with_cli_runs_its_own_checkouts_gpumesh(tmp_path, monkeypatch):
    # a benchmark's CLI runs (bench_parts, bench_scale, bench_lods, ...) ran the gpumesh script
    # this Python had installed, which may be another checkout's, under this one's commit
    other = tmp_path / "clone"
    (other / "gpumesh").mkdir(parents=True)
    (other / "gpumesh" / "__init__.py").write_text("")
    (other / "gpumesh" / "cli.py").write_text(
        "import json, sys\n"
        "out = sys.argv[sys.argv.index('--summary-json') + 1]\n"
        "json.dump({'seconds': 1.0, 'seconds_meshing': 0.5, 'seconds_writing': 0.5, 'bytes': 7,\n"
        "           'triangles_per_lod': [__file__], 'workers': 1, 'peak_rss_mb': 1.0}, open(out, 'w'))\n")
    monkeypatch.setattr(bench_main, "REPO_ROOT", other)
    (tmp_path / "runs").mkdir()
    got = bench_main.mesh_with_cli(tmp_path / "none.zarr", tmp_path / "runs" / "out", "1,1,1")
    assert got["bytes"] == 7
    assert pathlib.Path(got["triangles_per_lod"][0]).resolve() == (other / "gpumesh" / "cli.py").resolve()


def test_git_info_leaves_the_benchmarks_results_out_of_dirty(tmp_path, monkeypatch):
    # a second benchmark run from a clean clone found the first's result JSON there, untracked,
    # and said "dirty"; a change anywhere else still is

    git = _git_repo(tmp_path)
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "-A")
    git("commit", "-q", "-m", "c")
    monkeypatch.setattr(bench_main, "REPO_ROOT", tmp_path)
    assert bench_main.git_info()["dirty"] is False
    (tmp_path / "bench" / "results" / "main-x.json").write_text("{}")
    info = bench_main.git_info()
    assert info["dirty"] is False and info["commit"] == git("rev-parse", "HEAD").decode().strip()
    (tmp_path / "b.py").write_text("y = 1\n")
    assert bench_main.git_info()["dirty"] is True
    (tmp_path / "b.py").unlink()
    (tmp_path / "a.py").write_text("x = 2\n")
    assert bench_main.git_info()["dirty"] is True


def test_git_info_is_dirty_by_any_file_outside_the_benchmarks_results(tmp_path, monkeypatch):
    # only bench/results/ is left out: a change to the benchmarks' own code beside it, or to a
    # file of any kind (not only Python), still makes the tree dirty

    git = _git_repo(tmp_path)
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "bench_x.py").write_text("x = 1\n")
    (tmp_path / "setup.cfg").write_text("[x]\n")
    git("add", "-A")
    git("commit", "-q", "-m", "c")
    monkeypatch.setattr(bench_main, "REPO_ROOT", tmp_path)
    (tmp_path / "bench" / "results" / "main-x.json").write_text("{}")
    assert bench_main.git_info()["dirty"] is False
    (tmp_path / "bench" / "bench_x.py").write_text("x = 2\n")
    assert bench_main.git_info()["dirty"] is True
    git("checkout", "--", "bench/bench_x.py")
    (tmp_path / "setup.cfg").write_text("[y]\n")
    assert bench_main.git_info()["dirty"] is True


def test_device_info_names_each_gpu_and_its_driver(tmp_path, monkeypatch):
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 580.159.04'\necho 'NVIDIA H200, 580.159.03'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert bench_main.device_info() == "NVIDIA H100 80GB HBM3 (driver 580.159.04), NVIDIA H200 (driver 580.159.03)"
    smi.write_text("#!/bin/sh\nexit 9\n")
    assert bench_main.device_info() == "cpu"


def test_startup_cold_runs_a_copy_of_the_package_without_its_caches(tmp_path):
    """``bench_startup.py --cold``: each run's copy of ``gpumesh/`` has every module and the
    Draco extension where the checkout has one, and no ``__pycache__`` (numba's kernels and
    Python's bytecode), so the run compiles every kernel as a fresh install does."""
    import bench_startup

    checkout = tmp_path / "checkout"
    (checkout / "gpumesh" / "__pycache__").mkdir(parents=True)
    (checkout / "gpumesh" / "__init__.py").write_text("")
    (checkout / "gpumesh" / "_dracoenc.cpython-311-x86_64-linux-gnu.so").write_bytes(b"\x7fELF")
    (checkout / "gpumesh" / "__pycache__" / "marching._march-34.py311.nbi").write_bytes(b"index")
    (checkout / "gpumesh" / "kernels" / "__pycache__").mkdir(parents=True)
    (checkout / "gpumesh" / "kernels" / "weld.cu").write_text("// kernel")
    run_as = bench_startup.fresh_copy(checkout, tmp_path / "copy")
    assert run_as == tmp_path / "copy"
    assert sorted(str(p.relative_to(run_as)) for p in run_as.rglob("*")) == [
        "gpumesh", "gpumesh/__init__.py", "gpumesh/_dracoenc.cpython-311-x86_64-linux-gnu.so", "gpumesh/kernels",
        "gpumesh/kernels/weld.cu"]
