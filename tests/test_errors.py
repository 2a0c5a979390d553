"""Bad input: a typed, one-line error and nothing written (API and CLI)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import warnings

import numpy as np
import pytest
import tensorstore as ts

from gpumesh import (DestinationExistsError, EmptyVolumeWarning, InvalidVolumeError, InvalidVoxelSizeError,
                     SourceReadError, StorageUnreachableError, open_mesh, open_volume, run_mesh, validate)
from gpumesh import storage
from gpumesh.pipeline import COARSE, MeshOptions
from gpumesh.sharding import ShardingOptions
from gpumesh.writer import convert_mesh, foreign_keys

from conftest import cli_command

GOOD = np.zeros((8, 8, 8), np.uint16)
GOOD[2:5, 2:6, 3:5] = 7


def _no_output(path) -> bool:
    return not os.path.exists(path) or not os.listdir(path)


@pytest.mark.parametrize("labels, error", [
    (np.zeros((8, 8, 8), np.float32), InvalidVolumeError),
    (np.zeros((8, 8, 8), bool), InvalidVolumeError),
    (np.zeros((8, 8), np.uint32), InvalidVolumeError),
    (np.zeros((0, 8, 8), np.uint32), InvalidVolumeError),
])
def test_bad_labels(tmp_path, labels, error):
    dest = tmp_path / "out"
    with pytest.raises(error):
        run_mesh(labels, str(dest), workers=1)
    assert _no_output(dest)


@pytest.mark.parametrize("voxel_size", [(0, 1, 1), (1, 1), (1, float("nan"), 1), (-4, 4, 4)])
def test_bad_voxel_size(tmp_path, voxel_size):
    dest = tmp_path / "out"
    with pytest.raises(InvalidVoxelSizeError):
        run_mesh(GOOD, str(dest), voxel_size=voxel_size, workers=1)
    assert _no_output(dest)


def test_each_bad_input_error_is_a_gpumesh_error_and_the_builtin_error_it_stands_for(tmp_path):
    # callers catch either gpumesh's base class or the built-in kind (ValueError for bad
    # values, OSError for storage, FileExistsError for a destination in use)
    from gpumesh import GpumeshError, TaskFailedError, WorkerFailedError

    dest = tmp_path / "used"
    dest.mkdir()
    (dest / "precious.txt").write_text("keep me")
    cases = [
        (lambda: run_mesh(np.zeros((8, 8, 8), np.float32), str(tmp_path / "a"), workers=1), InvalidVolumeError,
         ValueError),
        (lambda: run_mesh(GOOD, str(tmp_path / "b"), voxel_size=(0, 1, 1), workers=1), InvalidVoxelSizeError,
         ValueError),
        (lambda: run_mesh(str(tmp_path / "missing.zarr"), str(tmp_path / "c"), workers=1), SourceReadError, OSError),
        (lambda: run_mesh(GOOD, str(dest), workers=1), DestinationExistsError, FileExistsError),
    ]
    for call, error, builtin in cases:
        with pytest.raises(error) as info:
            call()
        assert isinstance(info.value, GpumeshError) and isinstance(info.value, builtin), (error, builtin)
    # a failed task is a failed job (CLI status 1, --resume continues), not bad input
    assert issubclass(TaskFailedError, WorkerFailedError)


def test_unreadable_source(tmp_path):
    dest = tmp_path / "out"
    with pytest.raises(SourceReadError):
        run_mesh(str(tmp_path / "missing.zarr"), str(dest), workers=1)
    assert _no_output(dest)


def test_nonempty_destination(tmp_path):
    from conftest import tree_files

    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "precious.txt").write_text("keep me")
    # neither flag would do here, so the refusal offers neither
    with pytest.raises(DestinationExistsError, match="holds 1 file.* gpumesh did not write .*precious.txt.*; "
                                                      "choose another destination$"):
        run_mesh(GOOD, str(dest), workers=1)
    assert sorted(os.listdir(dest)) == ["precious.txt"]
    # --overwrite replaces a mesh directory, never deletes files gpumesh did not write
    with pytest.raises(DestinationExistsError, match="1 file.* that gpumesh did not write .*precious.txt"):
        run_mesh(GOOD, str(dest), workers=1, overwrite=True)
    assert sorted(os.listdir(dest)) == ["precious.txt"]
    # nor does --resume write among them: no interrupted run is there (it wrote its plan first)
    with pytest.raises(DestinationExistsError, match="holds no interrupted run to resume .*plan.json is missing"):
        run_mesh(GOOD, str(dest), workers=1, resume=True)
    assert sorted(os.listdir(dest)) == ["precious.txt"]
    os.unlink(dest / "precious.txt")
    # nor among the blocks that an --overwrite stopped while deleting left without their plan
    # (matched by name only, they would be taken as this run's); a plan whose write was
    # stopped (TensorStore's lock file alone) is no run yet, and the resume starts afresh
    blocks = dest / ".gpumesh-work" / "blocks"
    blocks.mkdir(parents=True)
    (blocks / "0_0_0.o0").write_bytes(b"an older run's")
    with pytest.raises(DestinationExistsError, match="holds no interrupted run to resume"):
        run_mesh(GOOD, str(dest), workers=1, resume=True)
    assert (blocks / "0_0_0.o0").read_bytes() == b"an older run's"
    shutil.rmtree(dest / ".gpumesh-work")
    (dest / ".gpumesh-work").mkdir()
    (dest / ".gpumesh-work" / "plan.json.__lock").write_bytes(b"")
    assert run_mesh(GOOD, str(dest), workers=1, resume=True).segments == 1 and validate(str(dest)).ok
    # without a flag, a mesh is refused with the flag that replaces it, an interrupted run
    # with both
    with pytest.raises(DestinationExistsError, match="is not empty; pass --overwrite to replace the mesh there$"):
        run_mesh(GOOD, str(dest), workers=1)
    (dest / "info").unlink()
    (dest / ".gpumesh-work").mkdir()
    (dest / ".gpumesh-work" / "plan.json").write_text("{}")
    with pytest.raises(DestinationExistsError, match="holds an interrupted run; pass --resume to finish it, "
                                                      "or --overwrite to start again$"):
        run_mesh(GOOD, str(dest), workers=1)
    (dest / "notes.txt").write_text("mine")   # which --overwrite would refuse to delete
    with pytest.raises(DestinationExistsError, match="holds an interrupted run; pass --resume to finish it$"):
        run_mesh(GOOD, str(dest), workers=1)
    shutil.rmtree(dest)
    dest.mkdir()
    for fmt, sharding in (("multires", ShardingOptions()), ("multires", None), ("legacy", None)):
        opts = MeshOptions(format=fmt, sharding=sharding)
        run_mesh(GOOD, str(dest), options=opts, workers=1, overwrite=True)   # over any earlier output
        assert validate(str(dest)).ok
        fresh = tmp_path / f"fresh-{fmt}-{sharding is None}"
        assert run_mesh(GOOD, str(fresh), options=opts, workers=1).segments == 1
        assert tree_files(dest) == tree_files(fresh)   # nothing of the earlier output is left beside it
        assert not foreign_keys(storage.list_keys(storage.open_kvstore(str(dest))))
    # the scratch area of an interrupted run, and TensorStore's write locks, are gpumesh's too
    assert not foreign_keys([".gpumesh-work/plan.json", ".gpumesh-work/blocks/0_0_0.o3", "7.index.__lock",
                             "5:0:0_-1_2", "0a.shard", "segment_properties/info", "source_info.json"])
    assert foreign_keys(["zarr.json", "c/0/0/0", "0.0.0", "32_32_40/0-64_0-64_0-64", ".bashrc"]) == \
        ["zarr.json", "c/0/0/0", "0.0.0", "32_32_40/0-64_0-64_0-64", ".bashrc"]
    # and a conversion's --overwrite alike
    run_mesh(GOOD, str(tmp_path / "multi"), workers=1)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(DestinationExistsError, match="notes.txt"):
        convert_mesh(str(tmp_path / "multi"), str(other), overwrite=True)
    assert os.listdir(other) == ["notes.txt"]


def test_overwrite_and_resume_together_are_refused_before_output(tmp_path):
    # resume keeps the finished tasks, overwrite deletes them: both at once is a mistake, said
    # so before the destination is touched (it was taken as overwrite)
    from conftest import tree_files

    dest = tmp_path / "out"
    run_mesh(GOOD, str(dest), workers=1)
    before = tree_files(dest)
    with pytest.raises(ValueError, match="not both"):
        run_mesh(GOOD, str(dest), workers=1, overwrite=True, resume=True)
    assert tree_files(dest) == before
    with pytest.raises(ValueError, match="not both"):
        run_mesh(GOOD, str(tmp_path / "new"), workers=1, overwrite=True, resume=True)
    assert _no_output(tmp_path / "new")


def test_resume_of_a_finished_mesh_is_refused_and_changes_nothing(tmp_path):
    """A finished mesh directory has no record of its run (the scratch area went with its end):
    ``resume`` there, with the same or other options, is refused, not taken as a fresh run
    over it."""
    from conftest import tree_files

    dest = tmp_path / "out"
    run_mesh(GOOD, str(dest), workers=1)
    before = tree_files(dest)
    for options in (MeshOptions(), MeshOptions(max_lods=1)):
        with pytest.raises(DestinationExistsError, match="holds a finished mesh; use --overwrite"):
            run_mesh(GOOD, str(dest), options=options, workers=1, resume=True)
        assert tree_files(dest) == before


@pytest.mark.parametrize("options, workers", [
    (MeshOptions(chunk_size=48), 1), (MeshOptions(dust_threshold=-1), 1), (MeshOptions(dust_threshold=2.5), 1),
    (MeshOptions(dust_threshold=True), 1),
    ("high", 1), (MeshOptions(), 0), (MeshOptions(), -2), (MeshOptions(), 1.5),
    (MeshOptions(segments=[]), 1), (MeshOptions(segments=[7, 0]), 1), (MeshOptions(segments=[2**64]), 1),
    (MeshOptions(segments=[7, 2.0]), 1), (MeshOptions(segments=[True]), 1), (MeshOptions(segments="7"), 1),
    (MeshOptions(segments=7), 1),
])
def test_bad_options_before_output(tmp_path, options, workers):
    dest = tmp_path / "out"
    with pytest.raises(ValueError):
        run_mesh(GOOD, str(dest), options=options, workers=workers)
    assert _no_output(dest)


@pytest.mark.parametrize("options, message", [
    (MeshOptions(max_lods=0), "max LODs must be in 1..10"),
    (MeshOptions(max_lods=11), "max LODs must be in 1..10"),
    (MeshOptions(num_lods=4, max_lods=3), "--lods must be in 1..3"),
    (MeshOptions(num_lods=0), "--lods must be in 1..3"),
    (MeshOptions(vertex_quantization_bits=12), "bits must be 10 or 16"),
    (MeshOptions(vertex_quantization_bits=10, chunk_size=1024), "chunk size 1024 too large"),
    (MeshOptions(vertex_quantization_bits=10, chunk_size=512), "at most 256 .a half voxel must stay two"),
    (MeshOptions(format="obj"), "format must be multires or legacy"),
    (MeshOptions(format="legacy", vertex_quantization_bits=10), "bits only apply to multires output"),
    (MeshOptions(chunk_size=64.0), "chunk_size must be an integer, got 64.0"),
    (MeshOptions(max_lods="3"), "max_lods must be an integer, got '3'"),
    (MeshOptions(num_lods=True), "num_lods must be an integer, got True"),
    (MeshOptions(quality="best"), "unknown quality preset 'best'"),
    (MeshOptions(sharding={"shard_bits": 1}), "sharding must be a ShardingOptions"),
    (MeshOptions(format="legacy", sharding=ShardingOptions()), "legacy meshes have no sharded form"),
    (MeshOptions(sharding=ShardingOptions(minishard_bits=25)), "16 \\* 2\\*\\*25-byte shard index; at most 24"),
])
def test_each_bad_option_says_what_is_wrong_before_output(tmp_path, options, message):
    dest = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        run_mesh(GOOD, str(dest), options=options, workers=1)
    assert _no_output(dest)


def test_every_segment_under_the_dust_threshold_gives_valid_empty_output(tmp_path):
    dest = tmp_path / "out"
    with pytest.warns(EmptyVolumeWarning, match="all 1 segments have fewer voxels than the dust threshold"):
        summary = run_mesh(GOOD, str(dest), options=MeshOptions(dust_threshold=25), workers=1)
    assert (summary.segments, summary.dust_segments) == (0, 1)
    assert validate(str(dest)).ok and os.listdir(dest) == ["info"]
    summary = run_mesh(GOOD, str(dest), options=MeshOptions(dust_threshold=24), workers=1, overwrite=True)
    assert (summary.segments, summary.dust_segments) == (1, 0)    # 24 voxels: kept


def test_all_zero_volume_gives_valid_empty_output(tmp_path):
    dest = tmp_path / "out"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = run_mesh(np.zeros((10, 9, 8), np.uint64), str(dest), workers=1)
    assert any(issubclass(w.category, EmptyVolumeWarning) for w in caught)
    assert summary.segments == 0
    report = validate(str(dest))
    assert report.ok and report.num_segments == 0
    files = [os.path.relpath(os.path.join(d, f), dest) for d, _, fs in os.walk(dest) for f in fs]
    assert files == ["info"]


def _cli(*args):
    return subprocess.run(cli_command() + list(args), capture_output=True, text=True, timeout=120)


def test_a_multi_line_message_becomes_one_line():
    # TensorStore's messages can span lines (a status and its source locations); the typed
    # errors built from them keep to one line, as the CLI prints them
    from gpumesh.errors import one_line

    exc = ValueError("NOT_FOUND: Error reading \"c/0/0/0\"\n  [source locations='a.cc:1\nb.cc:2']\n")
    text = one_line(exc)
    assert "\n" not in text and text.startswith("NOT_FOUND: Error reading") and text.endswith("b.cc:2']")
    assert text.split() == str(exc).split()


def test_cli_errors_are_one_line(tmp_path, real_zarr):
    dest = tmp_path / "out"
    cases = [
        (str(tmp_path / "nope.zarr"), "--voxel-size", "32,32,40"),
        (str(real_zarr), "--voxel-size", "32,0,40"),
        (str(real_zarr), "--format", "legacy", "--bits", "16"),   # legacy positions are float32
        (str(real_zarr), "--format", "legacy", "--max-lods", "2"),   # one resolution: refused, not ignored
        (str(real_zarr), "--format", "legacy", "--downsampling", "all"),
        (str(real_zarr), "--summary-json", str(tmp_path / "missing" / "s.json")),   # before the job, not after
    ]
    for args in cases:
        r = _cli("mesh", args[0], str(dest), *args[1:], "--quiet")
        assert r.returncode == 2, r.stderr
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("gpumesh: error:"), r.stderr
        assert _no_output(dest)
    r = _cli("mesh", str(real_zarr), str(dest), "--voxel-size", "32,32")
    assert r.returncode == 2 and _no_output(dest)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_summary_json_that_cannot_be_written_is_one_line_and_status_1(tmp_path):
    """The meshes are written, then ``--summary-json`` cannot be (a full disk: ``/dev/full``):
    one ``gpumesh: error:`` line naming the file, status 1 (the job failed once started), not a
    traceback; the summary's lines are still on stdout.  Written to a regular file, the JSON
    goes through a temporary file renamed into place, so none is left beside it."""
    from conftest import write_zarr

    write_zarr(tmp_path / "v.zarr", GOOD, chunk=8)
    dest = tmp_path / "out"
    r = _cli("mesh", str(tmp_path / "v.zarr"), str(dest), "--voxel-size", "1,1,1", "--workers", "1", "--quiet",
             "--summary-json", "/dev/full")
    assert r.returncode == 1, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("gpumesh: error: --summary-json /dev/full:"), r.stderr
    assert "segments:  1" in r.stdout and (dest / "info").exists()
    r = _cli("mesh", str(tmp_path / "v.zarr"), str(tmp_path / "out2"), "--voxel-size", "1,1,1", "--workers", "1",
             "--quiet", "--summary-json", str(tmp_path / "s.json"))
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "s.json").read_text())["segments"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out2", "s.json", "v.zarr"]


def test_cli_validate_fails_on_corrupt_output(tmp_path):
    dest = tmp_path / "out"
    # a local path that is missing or a file: one line, status 2 (bad input), not a table of
    # kind "unknown" with TensorStore's NOT_FOUND as its violation
    for where, says in ((dest, "no such directory"), (tmp_path / "f.txt", "a file, not a mesh directory")):
        r = _cli("validate", str(where))
        assert r.returncode == 2 and r.stderr.strip() == f"gpumesh: error: {where}: {says}", r.stdout + r.stderr
        assert r.stdout == ""
        (tmp_path / "f.txt").write_text("not a mesh")
    run_mesh(GOOD, str(dest), workers=1)
    r = _cli("validate", str(dest))
    assert r.returncode == 0, r.stdout + r.stderr
    data = dest / "7"
    data.write_bytes(data.read_bytes()[:-5])
    r = _cli("validate", str(dest))
    assert r.returncode == 1
    # each violation once: on stderr (the table on stdout listed them too)
    problems = [ln for ln in r.stderr.splitlines() if ln.startswith("  ")]
    assert problems and all(p.strip() not in r.stdout for p in problems), r.stdout + r.stderr


def test_cli_validate_writes_its_report_as_json_also_where_it_finds_violations(tmp_path):
    """``gpumesh validate --summary-json FILE``: the report's figures and violations as JSON,
    written before status 1; a folder that is not there is refused before anything is read."""
    dest = tmp_path / "out"
    run_mesh(GOOD, str(dest), workers=1)
    r = _cli("validate", str(dest), "--summary-json", str(tmp_path / "no" / "r.json"))
    assert r.returncode == 2 and r.stdout == "" and "is not a writable folder" in r.stderr, r.stdout + r.stderr
    good = validate(str(dest))
    r = _cli("validate", str(dest), "--summary-json", str(tmp_path / "r.json"))
    assert r.returncode == 0, r.stdout + r.stderr
    got = json.loads((tmp_path / "r.json").read_text())
    assert got["ok"] is True and got["num_errors"] == 0 and got["errors"] == []
    assert got["kind"] == "multires" and got["num_segments"] == good.num_segments == 1
    assert got["per_lod"] == good.per_lod and got["per_lod"][0]["triangles"] > 0
    data = dest / "7"
    data.write_bytes(data.read_bytes()[:-5])
    r = _cli("validate", str(dest), "--summary-json", str(tmp_path / "r.json"))
    assert r.returncode == 1
    got = json.loads((tmp_path / "r.json").read_text())
    problems = [ln.strip() for ln in r.stderr.splitlines() if ln.startswith("  ")]
    assert got["ok"] is False and got["num_errors"] == len(got["errors"]) == len(problems) > 0
    assert got["errors"] == problems == validate(str(dest)).errors
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "r.json"]


def test_an_unknown_url_scheme_is_refused_not_taken_as_a_local_folder(tmp_path, real_zarr):
    # gcs:// (for gs://) was a relative path: as DEST the meshes went to ./gcs:/bucket/mesh/
    r = subprocess.run(cli_command() + ["mesh", str(real_zarr), "gcs://bucket/mesh", "--bounds", "0,0,0,32,32,32"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2 and "gcs://bucket/mesh: not a location TensorStore can open" in r.stderr, r.stderr
    assert os.listdir(tmp_path) == []
    r = subprocess.run(cli_command() + ["mesh", "gcs://bucket/seg", "out"], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert r.returncode == 2 and 'unsupported URL scheme "gcs"' in r.stderr, r.stderr
    assert os.listdir(tmp_path) == []


def _refused_port() -> int:
    """A local TCP port that nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_network_source_fails_fast(tmp_path):
    # with TensorStore's own retries this waited for minutes
    url = f"http://127.0.0.1:{_refused_port()}/seg/"
    with pytest.raises(StorageUnreachableError, match="cannot reach http://127.0.0.1"):
        open_volume(url)
    dest = tmp_path / "out"
    with pytest.raises(StorageUnreachableError):
        run_mesh(url, str(dest), workers=1)
    assert _no_output(dest)
    assert issubclass(StorageUnreachableError, SourceReadError)


def test_unreachable_network_destination_fails_before_meshing(tmp_path):
    dest = {"driver": "s3", "bucket": "gpumesh-test", "path": "out/",
            "endpoint": f"http://127.0.0.1:{_refused_port()}"}
    progress = []
    with pytest.raises(StorageUnreachableError, match="cannot reach .*gpumesh-test.*Could not connect"):
        run_mesh(GOOD, dest, workers=1, progress=lambda *a: progress.append(a))
    assert progress == []


def test_silent_network_location_times_out(monkeypatch):
    # a server that accepts the connection and never answers
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        monkeypatch.setattr(storage, "PROBE_TIMEOUT_S", 1.0)
        with pytest.raises(StorageUnreachableError, match="no answer from http://127.0.0.1:.* in 1 s"):
            storage.check_reachable(f"http://127.0.0.1:{server.getsockname()[1]}/m/")


def test_the_probe_looks_through_adapters_and_skips_local_stores(tmp_path):
    port = _refused_port()
    with pytest.raises(StorageUnreachableError):
        storage.check_reachable({"driver": "ocdbt", "base": f"http://127.0.0.1:{port}/db/"})
    with pytest.raises(StorageUnreachableError):
        storage.check_reachable({"driver": "zip",
                                 "base": {"driver": "http", "base_url": f"http://127.0.0.1:{port}/a.zip"}})
    storage.check_reachable(str(tmp_path / "missing"))      # local: not probed
    storage.check_reachable("memory://somewhere/")


def test_cli_unreachable_gcs_source_is_one_error_line(tmp_path):
    env = dict(os.environ, TENSORSTORE_GCS_HTTP_URL=f"http://127.0.0.1:{_refused_port()}")
    dest = tmp_path / "out"
    r = subprocess.run(cli_command() + ["mesh", "gs://gpumesh-test-bucket/seg", str(dest), "--quiet"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2, r.stderr
    ours = [ln for ln in r.stderr.splitlines() if ln.startswith("gpumesh: error:")]
    assert len(ours) == 1 and "cannot reach gs://gpumesh-test-bucket/seg/" in ours[0], r.stderr
    assert _no_output(dest)


def test_cli_dust_threshold(tmp_path):
    from conftest import write_zarr

    labels = GOOD.copy()
    labels[6:8, 6:8, 6:8] = 9       # 8 voxels, under the threshold; segment 7 has 24
    write_zarr(tmp_path / "v.zarr", labels, chunk=8)
    r = _cli("mesh", str(tmp_path / "v.zarr"), str(tmp_path / "out"), "--dust-threshold", "10", "--workers", "1",
             "--quiet")
    assert r.returncode == 0, r.stderr
    assert "segments:  1 (1 below the dust threshold, not meshed)" in r.stdout
    r = _cli("mesh", str(tmp_path / "v.zarr"), str(tmp_path / "bad"), "--dust-threshold", "-3", "--quiet")
    assert r.returncode == 2 and "dust threshold must be an integer >= 0" in r.stderr, r.stderr


def test_cli_segments(tmp_path):
    """``--segments`` takes IDs or ``@FILE``; absent IDs are a warning, bad ones one error line
    before any output."""
    from conftest import write_zarr

    labels = GOOD.copy()
    labels[6:8, 6:8, 6:8] = 9
    write_zarr(tmp_path / "v.zarr", labels, chunk=8)
    ids = tmp_path / "ids.txt"
    ids.write_text("# proofread\n9\n12, 13  # not in the volume\n")
    for i, arg in enumerate(["9,12,13", f"@{ids}"]):
        dest = tmp_path / f"out{i}"
        r = _cli("mesh", str(tmp_path / "v.zarr"), str(dest), "--segments", arg, "--workers", "1", "--quiet")
        assert r.returncode == 0, r.stderr
        assert "segments:  1\n" in r.stdout
        assert "gpumesh: warning: 2 of the 3 selected segments are not in the volume: 12, 13" in r.stderr, r.stderr
        src = open_mesh(str(dest))
        assert src.segment_ids() == [9]
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    for arg, message in [("0", "segment IDs must be in 1..2**64-1, got 0"), ("9,x", "expected segment IDs like 1,2,3"),
                         (str(2**64), "segment IDs must be in 1..2**64-1"), (f"@{tmp_path}/none.txt", "cannot read"),
                         (f"@{empty}", "no segment IDs in")]:
        dest = tmp_path / "bad"
        r = _cli("mesh", str(tmp_path / "v.zarr"), str(dest), "--segments", arg, "--quiet")
        assert r.returncode == 2 and message in r.stderr, (arg, r.stderr)
        assert _no_output(dest)


def test_cli_exclude_segments(tmp_path):
    """``--exclude-segments`` meshes every segment but the given ones (IDs or ``@FILE``, as
    ``--segments``), alone or with ``--segments``; an ID not in the volume is no warning; bad
    IDs, or a selection that is all excluded, are one error line before any output."""
    from conftest import write_zarr

    labels = GOOD.copy()
    labels[6:8, 6:8, 6:8] = 9
    labels[0:2, 0:2, 0:2] = 4
    write_zarr(tmp_path / "v.zarr", labels, chunk=8)
    ids = tmp_path / "ids.txt"
    ids.write_text("9  # glia\n12\n")
    for i, (args, kept) in enumerate([(["--exclude-segments", "9,12"], [4, 7]),
                                      (["--exclude-segments", f"@{ids}"], [4, 7]),
                                      (["--segments", "4,9", "--exclude-segments", "9"], [4])]):
        dest = tmp_path / f"out{i}"
        r = _cli("mesh", str(tmp_path / "v.zarr"), str(dest), *args, "--voxel-size", "1,1,1", "--workers", "1",
                 "--quiet")
        assert r.returncode == 0, r.stderr
        assert f"segments:  {len(kept)}\n" in r.stdout and "warning" not in r.stderr, r.stderr
        assert open_mesh(str(dest)).segment_ids() == kept
    for args, message in [(["--exclude-segments", "0"], "segment IDs must be in 1..2**64-1, got 0"),
                          (["--exclude-segments", "9,x"], "expected segment IDs like 1,2,3"),
                          (["--segments", "9", "--exclude-segments", "9,4"],
                           "every selected segment is excluded (segments, exclude_segments): nothing to mesh")]:
        dest = tmp_path / "bad"
        r = _cli("mesh", str(tmp_path / "v.zarr"), str(dest), *args, "--quiet")
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)
        assert _no_output(dest)


def test_cli_bounds_syntax(tmp_path):
    from conftest import write_zarr

    write_zarr(tmp_path / "v.zarr", GOOD, chunk=8)
    outs = []
    for i, text in enumerate(["0,0,0,5,8,8", "0,0,0:5,8,8"]):
        dest = tmp_path / f"out{i}"
        r = _cli("mesh", str(tmp_path / "v.zarr"), str(dest), "--bounds", text, "--workers", "1", "--quiet")
        assert r.returncode == 0, r.stderr
        outs.append({p.name: p.read_bytes() for p in dest.rglob("*") if p.is_file()})
    assert outs[0] == outs[1] and outs[0]
    r = _cli("mesh", str(tmp_path / "v.zarr"), str(tmp_path / "bad"), "--bounds", "0,0,0,5,8", "--quiet")
    assert r.returncode == 2 and "expected 6 integers" in r.stderr and not (tmp_path / "bad").exists()


def test_option_parsers_take_their_documented_forms():
    """The number options take ``32,32,40`` or ``32x32x40`` and exactly their count of
    numbers; a location starting with ``{`` must be a JSON object naming its driver."""
    import click

    from gpumesh._cliutil import _location, _numbers

    three = _numbers(float)
    assert three(None, None, "32x32x40") == three(None, None, "32,32,40") == [32.0, 32.0, 40.0]
    for bad in ("32,32", "32,32,40,1", "32x32x40x1", "a,b,c"):
        with pytest.raises(click.BadParameter, match="expected 3 numbers"):
            three(None, None, bad)
    box = _numbers(int, 6)
    assert box(None, None, "0,0,0:5,8,8") == box(None, None, "0,0,0,5,8,8") == [0, 0, 0, 5, 8, 8]
    # one ':' between the corners only: a slice per axis is refused, not read as a box's six
    # numbers (0:128,0:128,0:128 gave x 0..128 and y 0..0, "no voxel" later)
    for bad in ("0,0,0:5,8,8,9", "0:5,0:8,0:8", "0,0:5,8,8,8", "0,0,0:5:8,8", "0.5,0,0,5,8,8"):
        with pytest.raises(click.BadParameter, match="expected 6 integers"):
            box(None, None, bad)
    with pytest.raises(click.BadParameter, match="expected 3 numbers"):
        three(None, None, "32:32:40")
    from gpumesh.cli_extra import _bbox   # gpumesh segment --bbox: the same form, start < stop

    assert _bbox(None, None, "0, 0, 0:5, 8, 8") == _bbox(None, None, "0,0,0,5,8,8") == ((0, 0, 0), (5, 8, 8))
    for bad in ("0:5,0:8,0:8", "0,0,0:5,8"):
        with pytest.raises(click.BadParameter, match="expected 6 integers like x0,y0,z0:x1,y1,z1"):
            _bbox(None, None, bad)
    with pytest.raises(click.BadParameter, match="stop must exceed start"):
        _bbox(None, None, "0,0,0:5,0,8")
    assert _location(None, None, ' {"driver": "memory"}') == {"driver": "memory"}
    assert _location(None, None, "/data/seg.zarr") == "/data/seg.zarr"
    for bad in ('{"path": "seg/"}', '{"driver": 3}'):
        with pytest.raises(click.BadParameter, match="must be an object with a \"driver\""):
            _location(None, None, bad)


def test_destination_that_cannot_be_written(tmp_path):
    from gpumesh import DestinationError

    afile = tmp_path / "afile"
    afile.write_text("keep me")
    with pytest.raises(DestinationError, match="destination is a file, not a directory"):
        run_mesh(GOOD, str(afile), workers=1)
    assert afile.read_text() == "keep me"
    # under a file no directory can be made (whoever runs it, root included)
    for below in (afile / "out", afile / "out" / "deeper"):   # named, not TensorStore's FAILED_PRECONDITION
        with pytest.raises(DestinationError, match=f"^cannot write to {below}: {afile} is a file, not a directory$"):
            run_mesh(GOOD, str(below), workers=1)
    from conftest import write_zarr

    write_zarr(tmp_path / "v.zarr", GOOD, chunk=8)
    r = _cli("mesh", str(tmp_path / "v.zarr"), str(afile), "--workers", "1", "--quiet")
    assert r.returncode == 2 and r.stderr.strip().endswith(f"destination is a file, not a directory: {afile}"), r.stderr
    assert afile.read_text() == "keep me"
    # convert checks its destination the same way (it showed TensorStore's NOT_FOUND)
    mesh = tmp_path / "mesh"
    run_mesh(GOOD, str(mesh), workers=1)
    r = _cli("convert", str(mesh), str(afile))
    assert r.returncode == 2 and r.stderr == f"gpumesh: error: destination is a file, not a directory: {afile}\n", \
        r.stderr
    r = _cli("convert", str(mesh), str(afile / "sub"))
    assert r.returncode == 2 and r.stderr == f"gpumesh: error: cannot write to {afile / 'sub'}: {afile} is a file, " \
        "not a directory\n", r.stderr
    assert afile.read_text() == "keep me"


def _fingerprint_of(labels, options, **open_kwargs) -> dict:
    """The fingerprint (``plan.json``) of ``run_mesh(labels, ..., options=options)``: an array
    source's contents included, as run_mesh has them."""
    from gpumesh.pipeline import Plan, _array_digest, _plan_fingerprint
    from gpumesh.volume import open_volume

    volume = open_volume(labels, **open_kwargs)
    contents = _array_digest(labels) if isinstance(labels, np.ndarray) else None
    return _plan_fingerprint(volume, Plan.make(volume.shape, options, volume.voxel_size), options, None, 0, True,
                             contents)


def _stamp_of(labels, options, **open_kwargs) -> str:
    """The stamp in the names of the task results of ``run_mesh(labels, ..., options=options)``."""
    from gpumesh.pipeline import _stamp

    return _stamp(_fingerprint_of(labels, options, **open_kwargs))


def _result_name(labels, options, task, **open_kwargs) -> str:
    """The name in the scratch area of ``task``'s result in ``run_mesh(labels, ...,
    options=options)``: its task, the job's stamp and its header's size
    (:func:`gpumesh.pipeline.block_key`), from the task meshed here."""
    from gpumesh.backend import CPUBackend
    from gpumesh.pipeline import Plan, block_header_size, block_key, mesh_block
    from gpumesh.volume import open_volume

    volume = open_volume(labels, **open_kwargs)
    blob = mesh_block(volume, Plan.make(volume.shape, options, volume.voxel_size), options, task[0], CPUBackend(),
                      task[1])
    return block_key(task, _stamp_of(labels, options, **open_kwargs), block_header_size(blob)).rpartition("/")[2]


def _blobs(shape=(64, 64, 64), seed=0) -> np.ndarray:
    """Random labels in blobs (every task of a small job has work)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 6, size=tuple(-(-s // 8) for s in shape)).astype(np.uint32)
    return np.repeat(np.repeat(np.repeat(coarse, 8, 0), 8, 1), 8, 2)[:shape[0], :shape[1], :shape[2]]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_chunk_that_cannot_be_read_mid_run_fails_the_tasks_that_read_it(tmp_path, workers):
    """A corrupt source chunk fails only the tasks that read it: the others finish and are
    kept, the job ends with one TaskFailedError (status 1 on the CLI, the count and the first
    error on one line), and once the chunk reads again ``--resume`` writes the bytes of an
    uninterrupted run."""
    from conftest import tree_files, write_zarr

    from gpumesh import TaskFailedError

    write_zarr(tmp_path / "v.zarr", _blobs(), chunk=16)
    opts = ["--chunk-size", "16", "--workers", str(workers), "--voxel-size", "1,1,1", "--quiet"]
    r = _cli("mesh", str(tmp_path / "v.zarr"), str(tmp_path / "clean"), *opts)
    assert r.returncode == 0, r.stderr
    chunk = tmp_path / "v.zarr" / "c" / "3" / "3" / "3"
    good = chunk.read_bytes()
    chunk.write_bytes(b"not a chunk")
    dest = tmp_path / "out"
    r = _cli("mesh", str(tmp_path / "v.zarr"), str(dest), *opts)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert "tasks failed, the first: cannot read box" in lines[0] and "c/3/3/3" in lines[0], lines[0]
    assert "run it again with --resume" in lines[0]
    kept = os.listdir(dest / ".gpumesh-work" / "blocks")
    import re

    failed, done, total = map(int, re.search(r"error: (\d+) tasks failed.*\(after (\d+) of (\d+) tasks\)",
                                             lines[0]).groups())
    assert done == len(kept)
    assert len(kept) == total - failed > 0 and failed > 0
    assert not (dest / "info").exists()
    with pytest.raises(TaskFailedError) as info:    # the API: the first error is the cause
        run_mesh(str(tmp_path / "v.zarr"), str(tmp_path / "api"), options=MeshOptions(chunk_size=16),
                 workers=workers)
    assert isinstance(info.value.__cause__, SourceReadError)
    chunk.write_bytes(good)
    r = _cli("mesh", str(tmp_path / "v.zarr"), str(dest), "--resume", *opts)
    assert r.returncode == 0, r.stderr
    assert tree_files(dest) == tree_files(tmp_path / "clean")


def test_no_fill_missing_fails_the_tasks_that_need_a_chunk_not_stored(tmp_path):
    """A source chunk that is not stored is background by default (the main job and
    ``gpumesh segment`` run); with ``--no-fill-missing`` the tasks that need it fail, the job
    ends with one line naming the chunk (status 1), ``--resume`` without ``--no-fill-missing``
    is refused, and once the chunk is there ``--resume`` writes the bytes of an uninterrupted
    run.  ``gpumesh segment --no-fill-missing`` stops with
    one line (status 2)."""
    from conftest import tree_files, write_zarr

    blobs = _blobs()
    write_zarr(tmp_path / "v.zarr", blobs, chunk=16)
    opts = ["--chunk-size", "16", "--workers", "2", "--voxel-size", "1,1,1", "--quiet"]
    r = _cli("mesh", str(tmp_path / "v.zarr"), str(tmp_path / "clean"), "--no-fill-missing", *opts)
    assert r.returncode == 0, r.stderr
    chunk = tmp_path / "v.zarr" / "c" / "1" / "2" / "1"
    good = chunk.read_bytes()
    chunk.unlink()
    seg = int(blobs[16:32, 32:48, 16:32].max())
    assert seg > 0
    r = _cli("mesh", str(tmp_path / "v.zarr"), str(tmp_path / "filled"), *opts)   # default: background there
    assert r.returncode == 0, r.stderr
    hole = blobs.copy()
    hole[16:32, 32:48, 16:32] = 0
    options = MeshOptions(chunk_size=16, sharding=ShardingOptions())
    assert run_mesh(hole, str(tmp_path / "hole"), options=options, voxel_size=(1, 1, 1), workers=1).segments > 0
    assert tree_files(tmp_path / "filled") == tree_files(tmp_path / "hole")
    dest = tmp_path / "out"
    r = _cli("mesh", str(tmp_path / "v.zarr"), str(dest), "--no-fill-missing", *opts)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert "tasks failed, the first: cannot read box" in lines[0] and "c/1/2/1\" is missing" in lines[0], lines[0]
    assert "--fill-missing reads such chunks as background" in lines[0] and "run it again with --resume" in lines[0]
    assert not (dest / "info").exists()
    box = ["--bbox", "16,32,16:32,48,32", "--voxel-size", "1,1,1", "-o"]
    r = _cli("segment", str(tmp_path / "v.zarr"), str(seg), *box, str(tmp_path / "s.stl"), "--no-fill-missing")
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert r.returncode == 2 and len(errors) == 1 and "c/1/2/1\" is missing" in errors[0], r.stderr
    assert not (tmp_path / "s.stl").exists()
    # resumed without --no-fill-missing, the missing chunk would be meshed as background
    r = _cli("mesh", str(tmp_path / "v.zarr"), str(dest), "--resume", *opts)
    assert r.returncode == 2 and "--resume with different options" in r.stderr, r.stderr
    assert not (dest / "info").exists()
    chunk.write_bytes(good)
    r = _cli("mesh", str(tmp_path / "v.zarr"), str(dest), "--no-fill-missing", "--resume", *opts)
    assert r.returncode == 0, r.stderr
    assert tree_files(dest) == tree_files(tmp_path / "clean")
    r = _cli("segment", str(tmp_path / "v.zarr"), str(seg), *box, str(tmp_path / "s.stl"), "--no-fill-missing")
    assert r.returncode == 0 and (tmp_path / "s.stl").stat().st_size > 0, r.stderr


@pytest.mark.parametrize("workers", [1, 2])
def test_a_write_that_fails_mid_run_stops_the_job(tmp_path, workers):
    """A task result that cannot be written (here a directory in its place; a full disk or
    lost credentials alike) stops the job at once with a TaskFailedError naming the key; the
    finished tasks are kept and ``resume`` completes the run with the bytes of a clean one."""
    from conftest import tree_files

    from gpumesh import DestinationError, TaskFailedError

    labels = _blobs()
    opts = MeshOptions(chunk_size=16)
    clean = run_mesh(labels, str(tmp_path / "clean"), options=opts, workers=1)
    dest = tmp_path / "out"
    # a late task (the coarse ones run last); its name carries the job's stamp and its header's size
    blocker = dest / ".gpumesh-work" / "blocks" / _result_name(labels, opts, ((0, 0, 0), COARSE))
    (blocker / "x").mkdir(parents=True)
    with pytest.raises(TaskFailedError, match="cannot write to .*0_0_0.coarse.*run it again with --resume") as info:
        run_mesh(labels, str(dest), options=opts, workers=workers, resume=True)
    assert isinstance(info.value.__cause__, DestinationError)
    kept = os.listdir(dest / ".gpumesh-work" / "blocks")
    assert 0 < len(kept) - 1 < clean.tasks
    (blocker / "x").rmdir()
    blocker.rmdir()
    again = run_mesh(labels, str(dest), options=opts, workers=workers, resume=True)
    assert again.tasks_resumed == len(kept) - 1
    assert tree_files(dest) == tree_files(tmp_path / "clean")


def test_cli_refuses_conflicting_or_bad_flags_in_its_own_words(tmp_path):
    """--overwrite with --resume, and --workers 0, are refused as CLI usage (status 2, the
    flags named), not with the Python API's words (``overwrite``, ``None: every core``)."""
    from conftest import write_zarr

    write_zarr(tmp_path / "v.zarr", GOOD, chunk=8)
    r = _cli("mesh", str(tmp_path / "v.zarr"), str(tmp_path / "out"), "--overwrite", "--resume")
    assert r.returncode == 2 and "give --overwrite or --resume, not both" in r.stderr, r.stderr
    r = _cli("mesh", str(tmp_path / "v.zarr"), str(tmp_path / "out"), "--workers", "0")
    assert r.returncode == 2 and "--workers" in r.stderr and "None" not in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_cli_progress_in_a_log_is_lines(tmp_path, capsys):
    """Where stderr is not a terminal (a batch job's log) the progress is whole lines, the
    first at the start and the last at the end, not a bar redrawn with carriage returns."""
    from conftest import write_zarr

    write_zarr(tmp_path / "v.zarr", _blobs((40, 40, 40)), chunk=16)
    r = _cli("mesh", str(tmp_path / "v.zarr"), str(tmp_path / "out"), "--chunk-size", "16", "--workers", "1")
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("meshing: ")]
    total = int(lines[0].split("/")[1].split()[0])
    assert total > 1 and lines[0].startswith(f"meshing: 0/{total} tasks (0%)")
    assert lines[-1].startswith(f"meshing: {total}/{total} tasks (100%)") and len(lines) >= 2
    after = r.stderr.split(lines[-1], 1)[1].strip().splitlines()
    assert after[0] == "writing the output"          # the assembly's phase, said when the meshing ends
    # then its progress in segments, a line at the start and one at the end
    segments = int(next(ln for ln in r.stdout.splitlines() if ln.startswith("segments:")).split()[1])
    writing = [ln for ln in after if ln.startswith("writing: ")]
    assert writing[0].startswith(f"writing: 0/{segments} segments (0%)")
    assert writing[-1].startswith(f"writing: {segments}/{segments} segments (100%)") and segments > 1
    # the last lines say no "? left" (no rate to tell it by), nor does a run with nothing left
    assert not lines[-1].endswith("left") and not writing[-1].endswith("left"), (lines[-1], writing[-1])
    from gpumesh.cli import _ProgressLines

    _ProgressLines(35, 35, "meshing", "tasks")   # a run resumed with every task done
    assert capsys.readouterr().err == "meshing: 35/35 tasks (100%), 00:00 elapsed\n"


def test_the_selection_tells_selected_ids_from_the_others():
    """``MeshOptions.selected`` against NumPy's set membership, for selections of one ID to
    10**5 (lists, arrays, repeats, the largest uint64), and empty inputs."""
    rng = np.random.default_rng(5)
    for size in (1, 7, 100_000):
        chosen = rng.integers(1, 2**63, size, dtype=np.uint64)
        chosen[0] = 2**64 - 1
        options = MeshOptions(segments=np.r_[chosen, chosen[:3]])    # repeats are one
        assert options.segments[0] == 2**64 - 1 and isinstance(options.segments[0], int)
        ids = np.unique(np.r_[chosen[::3], rng.integers(1, 2**63, 5000, dtype=np.uint64),
                              np.array([1, 2**64 - 1], np.uint64)])
        assert ids.dtype == np.uint64
        assert np.array_equal(options.selected(ids), np.isin(ids, chosen))
        assert options.selected(np.zeros(0, np.uint64)).shape == (0,)
    assert MeshOptions(segments=[3, 1]).selected_ids().tolist() == [1, 3]
    assert MeshOptions(segments=[5]).selected(np.array([1, 5, 9], np.uint64)).tolist() == [False, True, False]
    assert MeshOptions().selected(np.array([4, 9], np.uint64)).all()
    # exclusions: alone, and taken out of a selection
    chosen = rng.integers(1, 2**63, 1000, dtype=np.uint64)
    ids = np.unique(np.r_[chosen[::2], rng.integers(1, 2**63, 3000, dtype=np.uint64)])
    assert np.array_equal(MeshOptions(exclude_segments=chosen).selected(ids), ~np.isin(ids, chosen))
    both = MeshOptions(segments=ids[::3], exclude_segments=chosen)
    assert np.array_equal(both.selected(ids), np.isin(ids, ids[::3]) & ~np.isin(ids, chosen))
    assert np.array_equal(both.selected_ids(), np.setdiff1d(ids[::3], chosen))
    assert MeshOptions(segments=[5, 3], exclude_segments=[3, 8]).selected_ids().tolist() == [5]
    assert MeshOptions(exclude_segments=[3]).selected_ids() is None
    assert MeshOptions(exclude_segments=np.array([[3], [1]])).exclude_segments == (3, 1)
    for bad, message in [(dict(exclude_segments=[]), "exclude_segments must be a non-empty sequence"),
                         (dict(exclude_segments=[0]), r"got 0 \(exclude_segments\)"),
                         (dict(exclude_segments=[True]), r"got True \(exclude_segments\)"),
                         (dict(exclude_segments=7), "exclude_segments must be a non-empty sequence"),
                         (dict(segments=[2, 2], exclude_segments=[2]), "every selected segment is excluded")]:
        with pytest.raises(ValueError, match=message):
            MeshOptions(**bad).validate()


def test_a_source_without_a_voxel_size_is_meshed_in_voxels_with_a_warning(tmp_path):
    """No voxel size in the metadata and none given: the meshes are in voxels (1 nm each), and
    the main job, ad-hoc meshing and their commands say so before meshing."""
    import json

    import tensorstore as ts

    from gpumesh import NoVoxelSizeWarning, mesh_segment

    with pytest.warns(NoVoxelSizeWarning, match="states no voxel size and none was given"):
        run_mesh(GOOD, str(tmp_path / "a"), workers=1)
    assert json.loads((tmp_path / "a" / "info").read_text())["transform"][:3] == [1, 0, 0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoVoxelSizeWarning)
        run_mesh(GOOD, str(tmp_path / "b"), voxel_size=(4, 4, 40), workers=1)
        mesh_segment(GOOD, 7, voxel_size=(4, 4, 40))
    with pytest.warns(NoVoxelSizeWarning):
        mesh_segment(GOOD, 7)
    src = tmp_path / "src.zarr"
    ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(src)},
             "metadata": {"dimension_names": ["x", "y", "z"]}},
            create=True, shape=GOOD.shape, dtype=ts.uint16).result().write(GOOD).result()
    mesh = _cli("mesh", str(src), str(tmp_path / "c"), "--workers", "1", "--device", "cpu")
    assert mesh.returncode == 0, mesh.stderr
    first = mesh.stderr.splitlines()[0]
    assert first.startswith(f"gpumesh: warning: zarr v3 {src}") and "--voxel-size X,Y,Z" in first
    segment = _cli("segment", str(src), "7", "-o", str(tmp_path / "s.stl"), "--device", "cpu")
    assert segment.returncode == 0, segment.stderr
    assert segment.stderr.splitlines()[0] == first
    given = _cli("mesh", str(src), str(tmp_path / "d"), "--workers", "1", "--device", "cpu", "--voxel-size", "4,4,40")
    assert given.returncode == 0 and "voxel size" not in given.stderr, given.stderr


@pytest.mark.filterwarnings("ignore::gpumesh.adhoc.SegmentCutWarning")   # the crop cuts the segment
def test_a_voxel_size_given_against_the_sources_own_is_warned_about(tmp_path, real_zarr):
    # the meshes are placed by the one given: in a viewer showing the volume by its metadata
    # (or through source_info.json / --link-source) they would not overlay it, silently
    from gpumesh import VoxelSizeOverrideWarning, mesh_segment

    crop = (192, 192, 192, 224, 224, 224)
    with pytest.warns(VoxelSizeOverrideWarning, match=r"given, 4,4,40 nm, differs from the 32,32,40 nm that zarr v3"):
        run_mesh(str(real_zarr), str(tmp_path / "a"), voxel_size=(4, 4, 40), bounds=crop, workers=1)
    with pytest.warns(VoxelSizeOverrideWarning):
        mesh_segment(str(real_zarr), 25024949, voxel_size=(4, 4, 40), bounds=crop)
    opened = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(real_zarr)}}).result()
    with pytest.warns(VoxelSizeOverrideWarning, match="32,32,40 nm"):   # its attributes are read too
        run_mesh(opened, str(tmp_path / "t"), voxel_size=(4, 4, 40), bounds=crop, workers=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", VoxelSizeOverrideWarning)
        run_mesh(str(real_zarr), str(tmp_path / "b"), voxel_size=(32, 32, 40), bounds=crop, workers=1)   # the same
        run_mesh(GOOD, str(tmp_path / "c"), voxel_size=(4, 4, 40), workers=1)   # an array states none
    r = _cli("mesh", str(real_zarr), str(tmp_path / "d"), "--voxel-size", "4,4,40", "--bounds", "192,192,192,224,224,224",
             "--workers", "1", "--device", "cpu")
    assert r.returncode == 0 and r.stderr.splitlines()[0].startswith("gpumesh: warning: the voxel size given"), r.stderr


def test_segment_properties_are_left_out_past_the_cap_unless_asked_for(tmp_path, monkeypatch):
    """Past SEGMENT_PROPERTIES_MAX segments the default leaves the segment properties out (the
    client loads their one JSON file whole before any mesh), with a notice; True writes them,
    False never."""
    import json

    from gpumesh import writer

    two = np.zeros((12, 12, 12), np.uint32)
    two[1:5, 1:5, 1:5] = 3
    two[6:11, 6:11, 6:11] = 9
    monkeypatch.setattr(writer, "SEGMENT_PROPERTIES_MAX", 1)
    with pytest.warns(writer.SegmentPropertiesNotice, match="2 segments: segment properties left out"):
        run_mesh(two, str(tmp_path / "auto"), voxel_size=(8, 8, 8), workers=1)
    assert "segment_properties" not in json.loads((tmp_path / "auto" / "info").read_text())
    assert not (tmp_path / "auto" / "segment_properties").exists() and validate(str(tmp_path / "auto")).ok
    with warnings.catch_warnings():
        warnings.simplefilter("error", writer.SegmentPropertiesNotice)
        run_mesh(two, str(tmp_path / "asked"), voxel_size=(8, 8, 8), workers=1,
                 options=MeshOptions(segment_properties=True))
        run_mesh(two, str(tmp_path / "never"), voxel_size=(8, 8, 8), workers=1,
                 options=MeshOptions(segment_properties=False))
        monkeypatch.setattr(writer, "SEGMENT_PROPERTIES_MAX", 2)
        run_mesh(two, str(tmp_path / "under"), voxel_size=(8, 8, 8), workers=1)
    for name, has in (("asked", True), ("never", False), ("under", True)):
        info = json.loads((tmp_path / name / "info").read_text())
        assert ("segment_properties" in info) == has, name
    props = json.loads((tmp_path / "asked" / "segment_properties" / "info").read_text())
    assert props["inline"]["ids"] == ["3", "9"] and props["inline"]["properties"][0]["values"] == [64, 125]


def test_a_destination_that_holds_the_source_is_refused(tmp_path):
    """``--overwrite`` never deletes the source: a DEST that is the source or holds it is
    refused before anything is written (API, CLI, an opened TensorStore); a folder inside the
    source (``SOURCE/mesh``) is fine."""
    import tensorstore as ts

    from conftest import tree_files, write_zarr

    from gpumesh import DestinationError

    src = tmp_path / "v.zarr"
    write_zarr(src, _blobs((32, 32, 32)), chunk=16)
    before = tree_files(src)
    store = ts.open({"driver": "zarr3", "kvstore": f"file://{src}/"}).result()
    opts = MeshOptions(chunk_size=16)
    for dest in (src, tmp_path):
        for source in (str(src), store):
            for flags in ({"overwrite": True}, {"resume": True}):
                with pytest.raises(DestinationError, match="holds the source volume"):
                    run_mesh(source, str(dest), options=opts, workers=1, **flags)
        r = _cli("mesh", str(src), str(dest), "--overwrite", "--voxel-size", "1,1,1", "--quiet")
        assert r.returncode == 2 and "holds the source volume" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert tree_files(src) == before
    # the same DEST as a JSON spec with a relative path, from the CLI (it was compared as JSON
    # text, not as the folder: --resume wrote the meshes into the volume)
    relative = json.dumps({"driver": "file", "path": src.name})
    r = subprocess.run(cli_command() + ["mesh", src.name, relative, "--resume", "--voxel-size", "1,1,1", "--quiet"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2 and "holds the source volume" in r.stderr, r.stderr
    assert tree_files(src) == before
    run_mesh(str(src), str(src / "mesh"), options=opts, workers=1)
    assert validate(str(src / "mesh")).ok
    # convert --overwrite into its own source, named by a relative JSON spec: refused, kept
    mesh = tree_files(src / "mesh")
    r = subprocess.run(cli_command() + ["convert", "v.zarr/mesh", json.dumps({"driver": "file", "path": "v.zarr/mesh"}),
                                        "--unsharded", "--overwrite"], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path)
    assert r.returncode != 0 and "must not be the source" in r.stderr, r.stderr
    assert tree_files(src / "mesh") == mesh


@pytest.mark.parametrize("where", ["source", "dest"])
def test_a_memory_store_keeps_the_job_in_one_process(tmp_path, where):
    """A ``memory://`` store lives in one process: with more workers asked for, the job runs in
    the calling process (with a warning) and writes what a file destination gets."""
    import tensorstore as ts

    from conftest import tree_files

    labels = _blobs((32, 32, 32))
    opts = MeshOptions(chunk_size=16)
    run_mesh(labels, str(tmp_path / "ref"), options=opts, workers=1)
    source, dest = labels, str(tmp_path / "out")
    name = f"memory://gpumesh-{where}-{os.getpid()}/"
    if where == "source":
        store = ts.open({"driver": "zarr3", "kvstore": name, "metadata": {"chunk_grid": {
            "name": "regular", "configuration": {"chunk_shape": [16, 16, 16]}}}}, create=True, dtype=ts.uint32,
            shape=labels.shape, context=storage._default_context()).result()
        store.write(labels).result()
        source = name
    else:
        dest = name
    with pytest.warns(UserWarning, match="memory:// source or destination .* runs in it"):
        summary = run_mesh(source, dest, options=opts, workers=2)
    assert summary.workers == 1
    if where == "source":
        assert tree_files(dest) == tree_files(tmp_path / "ref")
    else:
        kv = storage.open_kvstore(dest)
        got = {k: storage.read(kv, k) for k in storage.list_keys(kv)}
        assert got == tree_files(tmp_path / "ref")


def test_resume_refuses_another_source_or_axis_order(tmp_path):
    """The interrupted run's source location, axis order and mip are part of what a resumed
    run must match: resuming on another volume of the same shape (or the same volume read
    with other axes) would mix two volumes' meshes."""
    from conftest import write_zarr

    from gpumesh import TaskFailedError

    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    write_zarr(a, _blobs(seed=1), chunk=16)
    write_zarr(b, _blobs(seed=2), chunk=16)
    chunk = a / "c" / "3" / "3" / "3"
    good = chunk.read_bytes()
    chunk.write_bytes(b"not a chunk")
    dest = tmp_path / "out"
    opts = MeshOptions(chunk_size=16)
    with pytest.raises(TaskFailedError):
        run_mesh(str(a), str(dest), options=opts, workers=1, voxel_size=(1, 1, 1))
    with pytest.raises(DestinationExistsError, match="different options or source"):
        run_mesh(str(b), str(dest), options=opts, workers=1, voxel_size=(1, 1, 1), resume=True)
    with pytest.raises(DestinationExistsError, match="different options or source"):
        run_mesh(str(a), str(dest), options=opts, workers=1, voxel_size=(1, 1, 1), axes="zyx", resume=True)
    chunk.write_bytes(good)
    cwd = os.getcwd()
    try:   # the same source named by a relative path resumes
        os.chdir(tmp_path)
        summary = run_mesh("a.zarr", "out", options=opts, workers=1, voxel_size=(1, 1, 1), resume=True)
    finally:
        os.chdir(cwd)
    assert summary.tasks_resumed > 0
    assert validate(str(dest)).ok


def test_negative_labels_of_an_array_are_refused_before_anything_is_written(tmp_path):
    """An array is in memory: its negative labels are bad input found at once (as mesh_segment
    finds them), not a run that fails mid-way and asks to be resumed; within ``bounds`` only."""
    labels = _blobs((32, 32, 32)).astype(np.int64)
    labels[30:, 30:, 30:] = -1
    for dtype in (np.int64, np.int8, ">i4"):
        with pytest.raises(InvalidVolumeError, match="negative label -1 in .*labels must be >= 0"):
            run_mesh(labels.astype(dtype), str(tmp_path / "out"), voxel_size=(1, 1, 1), workers=1)
        assert not (tmp_path / "out").exists()
    summary = run_mesh(labels, str(tmp_path / "out"), voxel_size=(1, 1, 1), workers=1, bounds=(0, 0, 0, 30, 32, 32))
    assert summary.segments > 0


def test_the_negative_label_check_of_an_array_does_not_copy_it_whole(tmp_path, monkeypatch):
    """run_mesh looks for an in-memory signed array's negative labels in slabs: a read copies,
    and one read of the whole array doubled the job's peak memory before anything was meshed;
    a negative label in the last slab is still found."""
    import tracemalloc

    from gpumesh import DestinationError, pipeline

    monkeypatch.setattr(pipeline, "NEGATIVE_CHECK_BYTES", 1 << 20, raising=False)
    labels = np.zeros((128, 128, 256), np.int32)   # 16 MiB
    labels[:8, :8, :8] = 3
    (tmp_path / "afile").write_text("x")   # refused after the check: nothing meshed, nothing written
    tracemalloc.start()
    try:
        with pytest.raises(DestinationError, match="a file, not a directory"):
            run_mesh(labels, str(tmp_path / "afile"), voxel_size=(1, 1, 1), workers=1, axes="zyx")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < labels.nbytes // 4, peak
    labels[-1, -1, -1] = -2
    with pytest.raises(InvalidVolumeError, match="negative label -2 in"):
        run_mesh(labels, str(tmp_path / "out"), voxel_size=(1, 1, 1), workers=1)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("workers", [1, 2])
def test_negative_labels_found_mid_run_fail_the_tasks_that_read_them(tmp_path, workers):
    """Negative labels in a signed source are only seen when their box is read: the tasks that
    read them fail like those of an unreadable chunk (status 1, one line naming the box, the
    others kept), not as bad input (status 2) that leaves a scratch area behind it."""
    from conftest import tree_files, write_zarr

    from gpumesh import TaskFailedError

    labels = _blobs().astype(np.int32)
    write_zarr(tmp_path / "clean.zarr", labels, chunk=16)
    bad = labels.copy()
    bad[56:, 56:, 56:] = -3
    write_zarr(tmp_path / "v.zarr", bad, chunk=16)
    opts = MeshOptions(chunk_size=16)
    run_mesh(str(tmp_path / "clean.zarr"), str(tmp_path / "clean"), options=opts, workers=1, voxel_size=(1, 1, 1))
    dest = tmp_path / "out"
    with pytest.raises(TaskFailedError, match=r"negative label -3 in box .* run it again with --resume") as info:
        run_mesh(str(tmp_path / "v.zarr"), str(dest), options=opts, workers=workers, voxel_size=(1, 1, 1))
    assert isinstance(info.value.__cause__, InvalidVolumeError)
    assert os.listdir(dest / ".gpumesh-work" / "blocks") and not (dest / "info").exists()
    r = _cli("mesh", str(tmp_path / "v.zarr"), str(tmp_path / "cli"), "--chunk-size", "16", "--voxel-size", "1,1,1",
             "--workers", str(workers), "--quiet")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "negative label" in r.stderr, r.stderr
    import shutil

    shutil.rmtree(tmp_path / "v.zarr")
    write_zarr(tmp_path / "v.zarr", labels, chunk=16)   # fixed: the resumed run writes a clean run's bytes
    summary = run_mesh(str(tmp_path / "v.zarr"), str(dest), options=opts, workers=workers, voxel_size=(1, 1, 1),
                       resume=True)
    assert summary.tasks_resumed > 0
    assert tree_files(dest) == tree_files(tmp_path / "clean")


def test_a_large_array_source_reaches_the_workers_as_one_mapped_file(tmp_path, monkeypatch):
    """A NumPy source past ``SPILL_ARRAY_BYTES`` is written once to a temporary ``.npy`` that
    the workers map (not a pickled copy in each), the output is the same bytes as one
    process's, and the file is gone afterwards; a non-contiguous view is written as its values."""
    import tempfile

    from conftest import tree_files

    from gpumesh import pipeline

    labels = np.asfortranarray(_blobs((48, 40, 32)).astype(np.uint16))[:, ::-1]   # a strided view
    opts = MeshOptions(chunk_size=16)
    run_mesh(labels, str(tmp_path / "one"), options=opts, workers=1)
    monkeypatch.setattr(pipeline, "SPILL_ARRAY_BYTES", 1)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    made = []
    real = pipeline._spill_array

    def spill(arr):
        out = real(arr)
        made.append(out)
        np.testing.assert_array_equal(out.load(), labels)
        return out

    monkeypatch.setattr(pipeline, "_spill_array", spill)
    run_mesh(labels, str(tmp_path / "two"), options=opts, workers=2)
    assert len(made) == 1 and made[0].path.startswith(str(scratch))
    assert tree_files(tmp_path / "two") == tree_files(tmp_path / "one")
    assert not [n for n in os.listdir(scratch) if n.startswith("gpumesh-array-")]


def test_a_voxel_offset_past_float32_grid_origins_is_refused(tmp_path):
    """A multi-resolution manifest stores the voxel offset as a float32 ``grid_origin``: past
    2**24 voxels it would move the meshes without a word, so it is refused before output (at
    2**24 it is exact, and the legacy format stores no grid origin)."""
    big = (2**24 + 1, 0, 0)
    with pytest.raises(InvalidVolumeError, match=r"grid_origin.*2\*\*24"):
        run_mesh(GOOD, str(tmp_path / "out"), voxel_offset=big, workers=1)
    assert _no_output(tmp_path / "out")
    run_mesh(GOOD, str(tmp_path / "edge"), voxel_offset=(-2**24, 5, 2**24), workers=1)
    mesh = open_mesh(str(tmp_path / "edge"))
    lo = np.asarray(mesh.manifest(7).grid_origin)
    assert lo.tolist() == [-2**24, 5, 2**24]


def test_a_negative_voxel_offset_past_float32_grid_origins_is_refused(tmp_path):
    # -(2**24 + 1) is no float32 either: the meshes would move by a voxel without a word
    with pytest.raises(InvalidVolumeError, match=r"grid_origin.*2\*\*24"):
        run_mesh(GOOD, str(tmp_path / "out"), voxel_offset=(0, -2**24 - 1, 0), workers=1)
    assert _no_output(tmp_path / "out")


def test_a_resume_refused_says_what_differs_and_an_older_plan_without_fill_missing_says_so(tmp_path):
    # the interrupted run's plan.json, as a gpumesh that did not record fill_missing wrote it:
    # the refusal named "different options or source" though none of those the user gives differed
    from gpumesh.pipeline import SCRATCH, Plan, _array_digest, _plan_fingerprint

    vol = open_volume(GOOD, voxel_size=(1, 1, 1))
    plan = Plan.make(vol.shape, MeshOptions(), vol.voxel_size)
    fingerprint = json.loads(json.dumps(_plan_fingerprint(vol, plan, MeshOptions(), None, 0, True,
                                                          _array_digest(GOOD))))
    del fingerprint["fill_missing"]
    dest = tmp_path / "out"
    (dest / SCRATCH).mkdir(parents=True)
    (dest / SCRATCH / "plan.json").write_text(json.dumps(fingerprint))
    with pytest.raises(DestinationExistsError, match=r"\(fill_missing; it was started by a gpumesh that did not "
                                                     r"record that: rerun with --overwrite\)"):
        run_mesh(GOOD, str(dest), voxel_size=(1, 1, 1), workers=1, resume=True)
    fingerprint["fill_missing"] = True
    (dest / SCRATCH / "plan.json").write_text(json.dumps(fingerprint))
    with pytest.raises(DestinationExistsError, match=r"than the interrupted run "
                                                     r"\(voxel_size: \[1\.0, 1\.0, 1\.0\] -> \[2\.0, 2\.0, 2\.0\]\)$"):
        run_mesh(GOOD, str(dest), voxel_size=(2, 2, 2), workers=1, resume=True)
    assert run_mesh(GOOD, str(dest), voxel_size=(1, 1, 1), workers=1, resume=True).segments == 1   # the same: resumed


def test_a_job_without_exclusions_keeps_the_fingerprint_of_a_gpumesh_before_them():
    """``exclude_segments`` unset is not in the fingerprint (an interrupted run of a gpumesh
    before the option resumes, its task results taken); set, it is, as a digest of its IDs
    (``segments`` then still the digest of the selection as given)."""
    import hashlib

    def digest(ids):
        return {"count": len(ids), "sha256": hashlib.sha256(np.array(ids, "<u8").tobytes()).hexdigest()}

    fingerprint = _fingerprint_of(GOOD, MeshOptions(segments=[2, 1, 2]), voxel_size=(1, 1, 1))
    assert "exclude_segments" not in fingerprint["options"] and fingerprint["options"]["segments"] == digest([1, 2])
    assert "exclude_segments" not in _fingerprint_of(GOOD, MeshOptions(), voxel_size=(1, 1, 1))["options"]
    options = _fingerprint_of(GOOD, MeshOptions(segments=[1, 2], exclude_segments=[2**64 - 1, 2]),
                              voxel_size=(1, 1, 1))["options"]
    assert options["segments"] == digest([1, 2]) and options["exclude_segments"] == digest([2, 2**64 - 1])


def test_a_refused_resume_lists_the_options_first_with_their_values():
    """The refusal's list: the options that changed first, with old and new values, then the
    other keys (a key the old plan lacks by name alone), the plan (which follows from the
    options) last, at most four and '...'; long values cut."""
    from gpumesh.pipeline import _fingerprint_changes

    old = {"options": {"quality": "medium", "chunk_size": 16, "bits": 16}, "plan": {"chunk": 16, "lods": 3},
           "voxel_offset": [0, 0, 0], "source": "file:///data/" + "a" * 40}
    new = {"options": {"quality": "high", "chunk_size": 32, "bits": 16}, "plan": {"chunk": 32, "lods": 3},
           "voxel_offset": [0, 0, 0], "source": "file:///data/b", "fill_missing": True}
    assert _fingerprint_changes(old, new) == (
        'options.chunk_size: 16 -> 32; options.quality: "medium" -> "high"; fill_missing; '
        'source: "file:///data/aaaaaaaaaaaaaaaaaaaaaaa... -> "file:///data/b"; ...')
    assert _fingerprint_changes(old, dict(old, plan={"chunk": 16, "lods": 2})) == "plan.lods: 3 -> 2"
    assert _fingerprint_changes(old, old) == ""


def test_ctrl_c_in_a_numba_kernel_of_a_one_worker_job_is_a_keyboard_interrupt(tmp_path, monkeypatch):
    """Ctrl-C while a numba kernel runs in this process (``workers=1``, a notebook's "interrupt
    the kernel") comes out of the kernel as ``SystemError: CPUDispatcher(...) returned a result
    with an exception set``, caused by the KeyboardInterrupt (seen on the real volume, and as the
    CLI's exit status 1 with a traceback instead of 130 and its one line): run_mesh raises the
    KeyboardInterrupt, and the finished tasks are kept for a resumed run."""
    from conftest import tree_files

    from gpumesh import pipeline

    labels = _blobs((48, 40, 32))
    kw = dict(options=MeshOptions(chunk_size=16), voxel_size=(1, 1, 1), workers=1)
    run_mesh(labels, str(tmp_path / "clean"), **kw)
    real, calls = pipeline.mesh_block, []

    def interrupted(*args, **kwargs):   # as numba's dispatcher raises it
        calls.append(1)
        if len(calls) == 3:
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt as stop:
                try:
                    raise SystemError("<function _numba_unpickle> returned a result with an exception set") from stop
                except SystemError as inner:
                    raise SystemError("CPUDispatcher(<function _compact>) returned a result with an exception "
                                      "set") from inner
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "mesh_block", interrupted)
    dest = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_mesh(labels, str(dest), **kw)
    monkeypatch.setattr(pipeline, "mesh_block", real)
    assert run_mesh(labels, str(dest), resume=True, **kw).tasks_resumed == 2
    assert tree_files(dest) == tree_files(tmp_path / "clean")
    # any other SystemError is left as it is
    monkeypatch.setattr(pipeline, "mesh_block", lambda *a, **k: (_ for _ in ()).throw(SystemError("other")))
    with pytest.raises(SystemError, match="other"):
        run_mesh(labels, str(tmp_path / "other"), **kw)


def test_an_array_digest_covers_every_voxel_and_does_not_copy_an_ordered_array(monkeypatch):
    """``_array_digest`` (an array source's contents in the fingerprint): one voxel changed, in
    any slab, gives another digest, and a copy the same (a strided view's is its C copy's); on
    one thread or several, slab by slab; a C- or Fortran-ordered array is hashed without a copy."""
    import tracemalloc

    from gpumesh import pipeline, resources

    monkeypatch.setattr(pipeline, "NEGATIVE_CHECK_BYTES", 1 << 16)   # slabs of 16 planes of 32x32 uint32
    labels = _blobs((80, 32, 32))
    views = {"C": labels, "F": np.asfortranarray(labels), "view": labels[::2]}
    digests = {name: pipeline._array_digest(arr) for name, arr in views.items()}
    assert len(set(digests.values())) == 3
    assert pipeline._array_digest(np.ascontiguousarray(labels[::2])) == digests["view"]
    for name, arr in views.items():
        assert pipeline._array_digest(arr.copy(order="K")) == digests[name]
        for at in [(0, 0, 0), (arr.shape[0] // 2, 3, 4), tuple(n - 1 for n in arr.shape)]:
            changed = arr.copy(order="K")
            changed[at] += 1
            assert pipeline._array_digest(changed) != digests[name], (name, at)
    monkeypatch.setattr(resources, "usable_cores", lambda: 1)
    assert {name: pipeline._array_digest(arr) for name, arr in views.items()} == digests
    # a Fortran-ordered cube and the C-ordered one with its bytes (other labels, the same slabs)
    cube = np.asfortranarray(_blobs((32, 32, 32)))
    same_bytes = np.frombuffer(cube.tobytes(order="A"), cube.dtype).reshape(cube.shape)
    assert not np.array_equal(same_bytes, cube)
    assert pipeline._array_digest(same_bytes) != pipeline._array_digest(cube)
    monkeypatch.setattr(pipeline, "NEGATIVE_CHECK_BYTES", 16 << 20)
    big = np.zeros((64, 256, 256), np.uint32)   # 16 MiB: one slab
    for arr in (big, np.asfortranarray(big)):
        tracemalloc.start()
        try:
            pipeline._array_digest(arr)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < big.nbytes // 16, peak


def test_a_resume_with_another_offset_shape_dtype_contents_or_selection_is_refused(tmp_path):
    """Besides the source's location and how it is read, a resumed run must share the
    interrupted one's voxel offset, the volume's shape and dtype, an array source's contents
    (one voxel changed is refused; a copy of the array resumes) and its selected and excluded
    segments (the same IDs in another order, or repeated, are the same selection).  A resumed
    run that matches goes on: its progress starts at the tasks kept, and it writes the bytes
    of an uninterrupted run."""
    from conftest import tree_files

    labels = _blobs((48, 40, 32))
    opts = MeshOptions(chunk_size=16, segments=[1, 2, 3])
    kw = dict(voxel_size=(1, 1, 1), workers=1)
    clean = run_mesh(labels, str(tmp_path / "clean"), options=opts, voxel_offset=(5, 6, 7), **kw)

    def stop(done, total):
        if done == 2:
            raise KeyboardInterrupt

    dest = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_mesh(labels, str(dest), options=opts, voxel_offset=(5, 6, 7), progress=stop, **kw)
    plan = (dest / ".gpumesh-work" / "plan.json").read_bytes()
    # each named with its old and new values
    for change, differs in [(dict(voxel_offset=(5, 6, 8)), r"voxel_offset: \[5, 6, 7\] -> \[5, 6, 8\]"),
                            (dict(source=labels[:, :, :24]),
                             r'contents: "[^;]+; plan\.shape: \[48, 40, 32\] -> \[48, 40, 24\]'),
                            (dict(source=labels.astype(np.uint16)), r'contents: "[^;]+; dtype: "uint32" -> "uint16"'),
                            (dict(source=np.where(np.arange(labels.size).reshape(labels.shape) == 777, 9, labels)
                                  .astype(labels.dtype)), r'contents: "[0-9a-f]{36}\.\.\. -> "[0-9a-f]{36}\.\.\.'),
                            (dict(options=MeshOptions(chunk_size=16, segments=[1, 2, 4])),
                             r'options\.segments: \{"count": 3, "sha256": "[0-9a-f]+\.\.\. -> \{"count": 3, .*'),
                            (dict(options=MeshOptions(chunk_size=16, segments=[1, 2, 3], exclude_segments=[9])),
                             r'options\.exclude_segments: null -> \{"count": 1, .*')]:
        args = dict(dict(source=labels, options=opts, voxel_offset=(5, 6, 7)), **change)
        with pytest.raises(DestinationExistsError, match=rf"different options or source than the interrupted run "
                                                         rf"\({differs}\)$"):
            run_mesh(args.pop("source"), str(dest), resume=True, **args, **kw)
        assert (dest / ".gpumesh-work" / "plan.json").read_bytes() == plan
    calls = []
    summary = run_mesh(labels.copy(), str(dest), options=MeshOptions(chunk_size=16, segments=[3, 1, 2, 1]),
                       voxel_offset=(5, 6, 7), resume=True, progress=lambda done, total: calls.append((done, total)),
                       **kw)
    assert summary.tasks_resumed == 2 and summary.tasks == clean.tasks > 2
    assert calls[0] == (2, clean.tasks) and calls[-1] == (clean.tasks, clean.tasks)
    assert tree_files(dest) == tree_files(tmp_path / "clean")


def test_a_resume_with_an_in_memory_tensorstore_of_other_contents_is_refused(tmp_path, monkeypatch):
    """A TensorStore of the in-memory ``array`` driver has no location either: its labels are in
    the fingerprint as an array's are, so a resume with other labels is refused (it resumed,
    keeping the old labels' task results: a mesh of neither) and one with the same labels
    resumes to the bytes of a clean run."""
    from conftest import tree_files

    from gpumesh import writer

    labels = _blobs((48, 40, 32))
    opts, kw = MeshOptions(chunk_size=16), dict(voxel_size=(1, 1, 1), workers=1)
    run_mesh(ts.array(labels), str(tmp_path / "clean"), options=opts, **kw)
    dest = tmp_path / "out"

    def stop(*args, **kwargs):   # every task result written, the output not
        raise KeyboardInterrupt

    monkeypatch.setattr(writer, "assemble", stop)
    with pytest.raises(KeyboardInterrupt):
        run_mesh(ts.array(labels), str(dest), options=opts, **kw)
    monkeypatch.undo()
    changed = labels.copy()
    changed[40:, 30:, 20:] = 9
    with pytest.raises(DestinationExistsError, match=r"than the interrupted run \(contents: "):
        run_mesh(ts.array(changed), str(dest), options=opts, resume=True, **kw)
    summary = run_mesh(ts.array(labels.copy()), str(dest), options=opts, resume=True, **kw)
    assert summary.tasks_resumed == summary.tasks
    assert tree_files(dest) == tree_files(tmp_path / "clean")


def test_an_in_memory_tensorstore_digest_covers_every_voxel_of_the_box(monkeypatch):
    """``_volume_digest`` (an in-memory TensorStore's contents in the fingerprint) reads every
    x slab, the last plane of the last one included, and only the box that ``bounds`` gives."""
    from gpumesh import pipeline

    labels = _blobs((24, 20, 16))

    def digest(arr, **kw):
        return pipeline._volume_digest(open_volume(ts.array(arr), voxel_size=(1, 1, 1), **kw))

    monkeypatch.setattr(pipeline, "NEGATIVE_CHECK_BYTES", 5 * 20 * 16 * 4)   # slabs of 5 x planes, the last of 4
    whole = digest(labels)
    assert digest(labels.copy()) == whole
    for x in (0, 4, 5, 12, 20, 23):   # the first and last planes of slabs, the volume's last plane
        changed = labels.copy()
        changed[x, 19, 15] += 1
        assert digest(changed) != whole, x
    box = (2, 0, 0, 22, 20, 16)
    outside = labels.copy()
    outside[[0, 1, 22, 23]] += 1
    assert digest(outside, bounds=box) == digest(labels, bounds=box) != whole


def test_a_write_that_fails_while_writing_the_output_says_so(tmp_path):
    """A write of the output itself that fails (here the shard file, a directory in its place)
    fails the job as a write of a task result does, said to have happened while writing the
    output, not after some of the tasks, and with no count of failed tasks (none failed); every
    task result is kept, and the resumed run only writes the output."""
    from conftest import tree_files

    from gpumesh import DestinationError, TaskFailedError

    labels = _blobs((32, 32, 32))
    opts = MeshOptions(chunk_size=16, sharding=ShardingOptions(shard_bits=0))
    clean = run_mesh(labels, str(tmp_path / "clean"), options=opts, workers=1)
    dest = tmp_path / "out"
    blocker = dest / "0.shard"
    (blocker / "x").mkdir(parents=True)
    with pytest.raises(TaskFailedError) as info:
        run_mesh(labels, str(dest), options=opts, workers=1)
    message = str(info.value)
    assert message.startswith("cannot write to ") and "0.shard" in message, message
    assert "(while writing the output); the finished tasks are kept in" in message, message
    assert isinstance(info.value.__cause__, DestinationError)
    assert len(os.listdir(dest / ".gpumesh-work" / "blocks")) == clean.tasks and not (dest / "info").exists()
    (blocker / "x").rmdir()
    blocker.rmdir()
    again = run_mesh(labels, str(dest), options=opts, workers=1, resume=True)
    assert again.tasks_resumed == again.tasks == clean.tasks
    assert tree_files(dest) == tree_files(tmp_path / "clean")


def test_the_warnings_of_a_selection_and_of_an_empty_output_say_what_is_missing(tmp_path):
    """Selected segments not in the volume are named, the first five and ``...`` past them,
    ``(within the bounds)`` where a box was meshed; an empty output says whether the selection
    or the volume was empty."""
    from gpumesh import SegmentsNotFoundWarning

    def said(name, labels=GOOD, **kw):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run_mesh(labels, str(tmp_path / name), workers=1, **kw)
        return [(w.category.__name__, str(w.message)) for w in caught
                if issubclass(w.category, (SegmentsNotFoundWarning, EmptyVolumeWarning))]

    assert said("five", options=MeshOptions(segments=[7, 20, 21, 22, 23, 24])) == [
        ("SegmentsNotFoundWarning", "5 of the 6 selected segments are not in the volume: 20, 21, 22, 23, 24")]
    assert said("six", options=MeshOptions(segments=[7, 20, 21, 22, 23, 24, 25])) == [
        ("SegmentsNotFoundWarning", "6 of the 7 selected segments are not in the volume: 20, 21, 22, 23, 24, ...")]
    # segment 7 starts at z = 3
    assert said("box", options=MeshOptions(segments=[7]), bounds=(0, 0, 0, 8, 8, 3)) == [
        ("SegmentsNotFoundWarning", "1 of the 1 selected segments are not in the volume (within the bounds): 7"),
        ("EmptyVolumeWarning", f"none of the selected segments is in the volume: wrote an empty mesh to "
                               f"{tmp_path / 'box'}")]
    assert said("zero", np.zeros((8, 8, 8), np.uint16)) == [
        ("EmptyVolumeWarning", f"the volume holds only background (label 0): wrote an empty mesh to "
                               f"{tmp_path / 'zero'}")]
    # excluded IDs not in the volume are no warning; a volume of excluded segments is named as such
    assert said("others", options=MeshOptions(exclude_segments=[20, 21])) == []
    assert said("excluded", options=MeshOptions(exclude_segments=[7, 20])) == [
        ("EmptyVolumeWarning", f"the volume holds only background (label 0) and excluded segments: wrote an empty "
                               f"mesh to {tmp_path / 'excluded'}")]
    assert said("both", options=MeshOptions(segments=[7, 20, 21], exclude_segments=[21])) == [
        ("SegmentsNotFoundWarning", "1 of the 2 selected segments are not in the volume: 20")]


def test_a_broken_pool_is_said_to_have_ended_as_its_first_dead_worker_did():
    """The exit codes of a broken pool's workers say how the first one died: the pool ends the
    others with SIGTERM, which says nothing; SIGKILL hints at the out-of-memory killer."""
    import signal
    from types import SimpleNamespace as Proc

    from gpumesh.pipeline import _how_workers_ended

    stopped = Proc(exitcode=-signal.SIGTERM)
    assert _how_workers_ended([stopped, Proc(exitcode=-signal.SIGKILL), Proc(exitcode=None)]) == \
        " (killed by SIGKILL: the out-of-memory killer?)"
    assert _how_workers_ended([stopped, Proc(exitcode=-signal.SIGSEGV)]) == " (killed by SIGSEGV)"
    assert _how_workers_ended([Proc(exitcode=0), stopped, Proc(exitcode=3)]) == " (exit status 3)"
    assert _how_workers_ended([stopped, Proc(exitcode=0), Proc(exitcode=None)]) == ""


def test_cli_progress_lines_come_at_the_start_and_end_of_each_phase_and_quiet_says_nothing(tmp_path, monkeypatch):
    """In a log, the progress of a phase is a line at its start, one every ``PROGRESS_EVERY_S``
    seconds (here longer than the job) and one at its end; ``--quiet`` writes nothing to stderr."""
    from click.testing import CliRunner

    from conftest import write_zarr
    from gpumesh import cli

    monkeypatch.setattr(cli, "PROGRESS_EVERY_S", 1e9)
    write_zarr(tmp_path / "v.zarr", _blobs((40, 40, 40)), chunk=16)

    def mesh(dest, *extra):
        r = CliRunner().invoke(cli.main, ["mesh", str(tmp_path / "v.zarr"), str(tmp_path / dest), "--chunk-size", "16",
                                          "--workers", "1", "--voxel-size", "1,1,1", "--device", "cpu", *extra])
        assert r.exit_code == 0, r.output
        return r

    lines = mesh("out").stderr.splitlines()
    assert [line.split(":")[0] for line in lines] == ["meshing", "meshing", "writing the output", "writing", "writing"]
    assert "(0%)" in lines[0] and "(100%)" in lines[1] and "(0%)" in lines[3] and "(100%)" in lines[4], lines
    assert mesh("quiet", "--quiet").stderr == ""


@pytest.mark.parametrize("ahead", [None, 10 ** 6])
def test_a_task_that_fails_stops_the_workers_taking_more(tmp_path, monkeypatch, ahead):
    """A task that fails (its result cannot be written) stops the job at once: the tasks not
    yet handed to a worker are not run, so a job of many tasks whose first one fails keeps few
    results (those its workers had at hand), not all the others.  Also with every task in flight
    at once (``TASKS_AHEAD`` past the job's tasks): those submitted and not started are cancelled,
    not only never submitted."""
    from gpumesh import TaskFailedError, pipeline
    from gpumesh.pipeline import Plan, task_name

    if ahead is not None:
        monkeypatch.setattr(pipeline, "TASKS_AHEAD", ahead)

    labels = _blobs((96, 64, 64))
    opts = MeshOptions(chunk_size=16)
    tasks = Plan.make(labels.shape, opts).tasks()
    dest = tmp_path / "out"
    first = _result_name(labels, opts, tasks[0], voxel_size=(1, 1, 1))
    (dest / ".gpumesh-work" / "blocks" / first / "x").mkdir(parents=True)   # the first task's result
    with pytest.raises(TaskFailedError, match=f"cannot write to .*{task_name(tasks[0])}"):
        run_mesh(labels, str(dest), options=opts, workers=2, voxel_size=(1, 1, 1))
    kept = [n for n in os.listdir(dest / ".gpumesh-work" / "blocks") if not n.endswith(".__lock")]
    assert len(tasks) > 40 and len(kept) - 1 < len(tasks) // 2, (len(kept), len(tasks))


def test_a_task_result_lost_or_cut_short_during_the_assembly_is_an_error_not_empty_fragments(tmp_path):
    """A task result that is gone from the scratch area when the assembly reads its fragments
    (its header read before) is a GpumeshError naming it, as a result gone before its header
    is: before, its fragments read as empty bytes and were written so, silently.  A result too
    short for the byte range read (a fragment, or the header's prefix) is one too, not
    TensorStore's bare ValueError."""
    from gpumesh.errors import GpumeshError
    from gpumesh.pipeline import SCRATCH
    from gpumesh import writer

    kv = storage.open_kvstore(str(tmp_path / "m"))
    storage.write(kv, SCRATCH + "plan.json", b"{}")   # a scratch area, without the result
    key = SCRATCH + "blocks/0_0_0"
    results = writer.TaskResults(kv, [key], cache_bytes=0)   # fragments read by byte range
    entries = np.zeros(2, writer.INDEX_DTYPE)
    entries["offset"], entries["size"] = [0, 100], [100, 50]
    with pytest.raises(GpumeshError, match=r"blocks/0_0_0 is missing from the scratch area; rerun with --overwrite"):
        list(writer._read_fragments(results, [(7, entries)]))
    storage.write(kv, key, bytes(120))   # the first fragment is there, the second runs past the end
    with pytest.raises(GpumeshError, match=r"blocks/0_0_0 cannot be read from the scratch area .*--overwrite"):
        list(writer._read_fragments(results, [(7, entries)]))
    storage.write(kv, key, b"GPU")   # shorter than a result's fixed prefix
    with pytest.raises(GpumeshError, match=r"blocks/0_0_0 cannot be read from the scratch area"):
        list(results.iter_headers(None, whole=False))
    storage.write(kv, key, bytes(150))
    assert list(writer._read_fragments(results, [(7, entries)])) == [[bytes(100), bytes(50)]]
    # read whole and kept in memory (the default cache): a result cut short in its fragments, or
    # in its header, is the same error, not fewer bytes (or a bare struct.error, NumPy's "buffer
    # is smaller than requested size") in their place
    from gpumesh.pipeline import FRAG_DTYPE, pack_block, unpack_block_header

    index = np.zeros(2, FRAG_DTYPE)
    index["label"], index["offset"], index["size"], index["triangles"] = 5, [0, 100], [100, 50], 4
    whole = pack_block(index, np.array([5], np.uint64), np.array([9], np.uint64), bytes(150))
    for cut in (whole[:-1], whole[:60], whole[:20]):   # in the fragments, the header, the prefix
        storage.write(kv, key, cut)
        kept = writer.TaskResults(kv, [key])
        with pytest.raises(GpumeshError, match=r"corrupt block result|blocks/0_0_0 (in the scratch area is cut short"
                                               r"|cannot be read from the scratch area)"):
            for b, head in kept.iter_headers(None, whole=True):
                got = writer._joined_entries([(b, *unpack_block_header(head))])[0]
                list(writer._read_fragments(kept, [(5, got)]))
    storage.write(kv, key, whole)
    kept = writer.TaskResults(kv, [key])
    (b, head), = kept.iter_headers(None, whole=True)
    assert b in kept.kept
    got = writer._joined_entries([(b, *unpack_block_header(head))])[0]
    assert list(writer._read_fragments(kept, [(5, got)])) == [[bytes(100), bytes(50)]]


def test_every_error_and_warning_is_exported_from_the_package():
    """Each typed error and warning that a public function raises is ``gpumesh.X`` (a
    notebook's ``except gpumesh.SegmentNotFoundError``), the same class the modules raise."""
    import inspect

    import gpumesh
    from gpumesh import adhoc, backend, errors

    kinds = {name for name, obj in vars(errors).items()
             if inspect.isclass(obj) and obj.__module__ == errors.__name__}
    assert {"SegmentNotFoundError", "SegmentCutWarning", "DeviceUnavailableError"} <= kinds
    for name in kinds:
        assert name in gpumesh.__all__ and getattr(gpumesh, name) is getattr(errors, name), name
    assert adhoc.SegmentNotFoundError is gpumesh.SegmentNotFoundError
    assert backend.DeviceUnavailableError is gpumesh.DeviceUnavailableError
    with pytest.raises(gpumesh.SegmentNotFoundError):
        gpumesh.mesh_segment(np.ones((4, 4, 4), np.uint8), 2, voxel_size=(1, 1, 1), device="cpu")


def test_task_results_of_a_run_of_other_options_are_never_taken_for_this_ones(tmp_path, monkeypatch):
    """Two runs writing into one destination at once (a second one started with --overwrite and
    other options, while the first still writes its task results): each run's results carry the
    stamp of its options, so a resumed (or concurrent) run of other options reruns the tasks
    instead of taking the others' results for its own and writing a mix."""
    from conftest import tree_files

    from gpumesh import writer
    from gpumesh.pipeline import SCRATCH, Plan, _array_digest, _plan_fingerprint
    from gpumesh.volume import open_volume

    labels = _blobs()
    medium, high = MeshOptions(chunk_size=16), MeshOptions(chunk_size=16, quality="high")
    run_mesh(labels, str(tmp_path / "clean"), options=high, voxel_size=(1, 1, 1), workers=1)
    dest = tmp_path / "out"

    def stop(*args, **kwargs):   # every task result written, the output not
        raise KeyboardInterrupt

    monkeypatch.setattr(writer, "assemble", stop)
    with pytest.raises(KeyboardInterrupt):
        run_mesh(labels, str(dest), options=medium, voxel_size=(1, 1, 1), workers=1)
    monkeypatch.undo()
    # the other run's plan in its place, as its --overwrite would have written it
    volume = open_volume(labels, voxel_size=(1, 1, 1))
    other = _plan_fingerprint(volume, Plan.make(volume.shape, high, volume.voxel_size), high, None, 0, True,
                              _array_digest(labels))
    (dest / SCRATCH / "plan.json").write_text(json.dumps(other))
    summary = run_mesh(labels, str(dest), options=high, voxel_size=(1, 1, 1), workers=1, resume=True)
    assert summary.tasks_resumed == 0
    assert tree_files(dest) == tree_files(tmp_path / "clean")


def test_a_run_whose_destination_another_run_took_over_writes_no_info(tmp_path, monkeypatch):
    """A run started into the destination since this one began (--overwrite, --resume: a job
    requeued while it still ran) has replaced this run's mark: this one stops before its info
    (DestinationTakenError; the CLI's status 1), and the other finishes with a clean run's
    bytes."""
    from click.testing import CliRunner
    from conftest import tree_files

    from gpumesh import DestinationTakenError, pipeline
    from gpumesh.cli import main
    from gpumesh.pipeline import OWNER_KEY

    labels = _blobs()
    opts = MeshOptions(chunk_size=16)
    run_mesh(labels, str(tmp_path / "clean"), options=opts, voxel_size=(1, 1, 1), workers=1)
    dest = tmp_path / "out"

    def taken_over(done, total):   # while this run writes its output
        (dest / OWNER_KEY).write_bytes(b"another run")

    with pytest.raises(DestinationTakenError, match=f"^{dest}: another gpumesh run has started writing there since "
                                                    f"this one began .* this run stops without writing info"):
        run_mesh(labels, str(dest), options=opts, voxel_size=(1, 1, 1), workers=1, write_progress=taken_over)
    assert not (dest / "info").exists() and (dest / ".gpumesh-work" / "plan.json").exists()
    summary = run_mesh(labels, str(dest), options=opts, voxel_size=(1, 1, 1), workers=1, resume=True)
    assert summary.tasks_resumed == summary.tasks
    assert tree_files(dest) == tree_files(tmp_path / "clean")

    # the other run's --overwrite deleted what this one needed: said as the cause, not its effect
    from gpumesh import GpumeshError, writer

    def broken(kv, *args, owner=None, **kwargs):
        storage.write(kv, owner[0], b"another run")
        raise GpumeshError("task result .gpumesh-work/blocks/0_0_0 is missing from the scratch area")

    monkeypatch.setattr(writer, "assemble", broken)
    with pytest.raises(DestinationTakenError, match="another gpumesh run has started writing there") as info:
        run_mesh(labels, str(tmp_path / "other"), options=opts, voxel_size=(1, 1, 1), workers=1)
    assert "is missing from the scratch area" in str(info.value.__cause__)
    monkeypatch.undo()

    def refused(*args, **kwargs):
        raise DestinationTakenError("taken")

    monkeypatch.setattr(pipeline, "run_mesh", refused)
    r = CliRunner().invoke(main, ["mesh", str(tmp_path / "v.zarr"), str(tmp_path / "cli"), "--quiet"])
    assert r.exit_code == 1 and r.output.strip().endswith("gpumesh: error: taken"), r.output


@pytest.mark.parametrize("kept, line", [
    ((0, 35), "none of the 35 tasks had finished; the scratch area is kept in {dest}"),
    ((7, 35), "7 of 35 tasks had finished; they are kept in {dest}"),
    ((35, 35), "all 35 tasks had finished (the output was being written); they are kept in {dest}"),
    (None, "the finished tasks are kept in {dest}")])
def test_the_interrupt_line_says_how_many_tasks_are_kept(tmp_path, monkeypatch, kept, line):
    """Ctrl-C: the one line says how many tasks a resumed run will skip (run_mesh's
    ``tasks_kept``), in words that fit none, some and all of them."""
    from click.testing import CliRunner

    from gpumesh import pipeline
    from gpumesh.cli import main

    def stopped(*args, **kwargs):
        exc = KeyboardInterrupt()
        if kept is not None:
            exc.tasks_kept = kept
        raise exc

    monkeypatch.setattr(pipeline, "run_mesh", stopped)
    dest = tmp_path / "out"
    r = CliRunner().invoke(main, ["mesh", str(tmp_path / "v.zarr"), str(dest), "--quiet", "--workers", "1"])
    assert r.exit_code == 130
    assert r.output.strip().splitlines()[-1] == (f"gpumesh: interrupted; {line.format(dest=dest)}: run it again with "
                                                 f"--resume to continue"), r.output


def test_shard_records_of_a_run_of_other_options_are_never_taken_for_this_ones(tmp_path):
    """The shards' resume records carry the run's stamp too: a run of other options writing its
    output into the destination while this one meshes (it started before this one's
    --overwrite, and stops before its info) leaves its shards and their records there, and this
    run rewrites those shards with its own options' meshes instead of skipping them as its own."""
    from conftest import tree_files

    from gpumesh import DestinationTakenError
    from gpumesh.pipeline import OWNER_KEY
    from gpumesh.sharding import ShardingOptions

    labels = _blobs()
    sharding = ShardingOptions(shard_bits=1)
    medium = MeshOptions(chunk_size=16, sharding=sharding)
    high = MeshOptions(chunk_size=16, sharding=sharding, quality="high")
    run_mesh(labels, str(tmp_path / "clean"), options=high, voxel_size=(1, 1, 1), workers=1)
    other = tmp_path / "other"

    def taken_over(done, total):
        (other / OWNER_KEY).write_bytes(b"another run")

    with pytest.raises(DestinationTakenError):   # the other run: its shards and their records written
        run_mesh(labels, str(other), options=medium, voxel_size=(1, 1, 1), workers=1, write_progress=taken_over)
    written = {k: v for k, v in tree_files(other).items() if "shard" in k}
    assert any(k.startswith(".gpumesh-work/shards/") for k in written), sorted(written)
    dest = tmp_path / "out"

    def other_writes(done, total):   # the other run writes its output while this one meshes
        if done == 1:
            for key, data in written.items():
                (dest / key).parent.mkdir(parents=True, exist_ok=True)
                (dest / key).write_bytes(data)

    run_mesh(labels, str(dest), options=high, voxel_size=(1, 1, 1), workers=1, progress=other_writes)
    assert tree_files(dest) == tree_files(tmp_path / "clean")


@pytest.mark.parametrize("at", [0, 2])
def test_a_run_taken_over_while_it_meshes_writes_nothing_into_the_other_runs_output(tmp_path, at):
    """A run into whose destination another started (--overwrite) while this one meshed stops
    with DestinationTakenError before reading its results or writing any file of the output:
    not with 'task result missing; rerun with --overwrite' (the other run deleted the results
    finished before it began), and not after writing its segments or shards into the other's
    output."""
    import shutil

    from gpumesh import DestinationTakenError
    from gpumesh.pipeline import OWNER_KEY, SCRATCH

    labels = _blobs()
    dest = tmp_path / "out"

    def other_overwrites(done, total):   # another run's --overwrite: deletes all, writes its plan and mark
        if done == at:
            shutil.rmtree(dest)
            (dest / SCRATCH).mkdir(parents=True)
            (dest / SCRATCH / "plan.json").write_text("{}")
            (dest / OWNER_KEY).write_bytes(b"another run")

    with pytest.raises(DestinationTakenError, match="another gpumesh run has started writing there"):
        run_mesh(labels, str(dest), options=MeshOptions(chunk_size=16), voxel_size=(1, 1, 1), workers=1,
                 progress=other_overwrites)
    assert [p.name for p in dest.iterdir()] == [SCRATCH.rstrip("/")]


def test_a_summary_json_written_over_a_file_keeps_its_permissions(tmp_path):
    """``--summary-json`` over an existing file (written through a temporary file renamed into
    place) keeps the file's permissions, as writing into it did: a report kept private (0600)
    does not become readable by all."""
    import stat

    from gpumesh.cli import _write_summary

    path = tmp_path / "s.json"
    path.write_text("{}")
    path.chmod(0o600)
    _write_summary(str(path), {"segments": 1})
    assert json.loads(path.read_text()) == {"segments": 1}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json"]


def _cubes_of_200_segments() -> np.ndarray:
    """A 32^3 volume of 200 segments in cubes of 4 voxels."""
    rng = np.random.default_rng(3)
    return np.repeat(np.repeat(np.repeat(rng.integers(0, 200, size=(8, 8, 8)).astype(np.uint32), 4, 0), 4, 1), 4, 2)


def _taken_over_as_it_writes(monkeypatch, labels, dest, opts, workers: int) -> None:
    """run_mesh of ``labels`` into ``dest`` whose mark another run replaces as the writing
    starts (the mark read at every report): it stops with DestinationTakenError."""
    from gpumesh import DestinationTakenError, writer
    from gpumesh.pipeline import OWNER_KEY

    monkeypatch.setattr(writer, "OWNER_CHECK_S", 0.0)

    def taken_over(done, total):   # the other run's mark, as soon as the writing starts
        (dest / OWNER_KEY).write_bytes(b"another run")

    with pytest.raises(DestinationTakenError, match="another gpumesh run has started writing there"):
        run_mesh(labels, str(dest), options=opts, voxel_size=(1, 1, 1), workers=workers, write_progress=taken_over)


@pytest.mark.parametrize("sharded", [True, False])
def test_a_run_taken_over_while_it_writes_stops_at_its_next_progress_report(tmp_path, monkeypatch, sharded):
    """A run whose destination another takes over while it writes its output reads its mark
    again at its progress reports (at most every OWNER_CHECK_S): it stops after the shard or run
    of segments in hand, not after writing them all into the other's output, and writes no info."""
    from gpumesh import ShardingOptions, writer
    from gpumesh.pipeline import SCRATCH

    labels = _cubes_of_200_segments()
    sharding = ShardingOptions(shard_bits=3, minishard_bits=0) if sharded else None
    opts = MeshOptions(chunk_size=16, sharding=sharding)
    clean = tmp_path / "clean"
    run_mesh(labels, str(clean), options=opts, voxel_size=(1, 1, 1), workers=1)

    def outputs(d):
        return [p for p in d.iterdir() if p.name not in ("info", SCRATCH.rstrip("/"), "segment_properties")]

    assert len(outputs(clean)) > 4
    monkeypatch.setattr(writer, "WRITE_BATCH", 16)
    dest = tmp_path / "out"
    _taken_over_as_it_writes(monkeypatch, labels, dest, opts, workers=1)
    assert not (dest / "info").exists()
    assert len(outputs(dest)) < len(outputs(clean)), (len(outputs(dest)), len(outputs(clean)))


@pytest.mark.parametrize("flag", ["overwrite", "resume"])
def test_a_run_that_finishes_as_another_starts_leaves_the_others_scratch_area(tmp_path, monkeypatch, flag):
    """Run A has written its info and deletes its scratch area when run B starts into the same
    destination (``--overwrite``, or ``--resume`` of a job thought dead): A must not delete B's
    plan, mark and task results, or B ends with DestinationTakenError ("another run has started")
    though none has, and (``--overwrite``) leaves neither a mesh nor a plan to ``--resume``."""
    from conftest import tree_files

    from gpumesh import pipeline, writer

    labels = _blobs((32, 32, 32))
    kw = dict(options=MeshOptions(chunk_size=16), voxel_size=(1, 1, 1), workers=1)
    run_mesh(labels, str(tmp_path / "clean"), **kw)
    dest = tmp_path / "out"
    real = writer.assemble

    class Paused(Exception):
        """B, stopped after its first task (its process goes on meshing)."""

    def pause(done, total):
        if done == (1 if flag == "overwrite" else 0):
            raise Paused

    def b_starts(*args, **kwargs):   # once A's info is written: B starts, writes its mark, meshes a task
        stats = real(*args, **kwargs)
        monkeypatch.setattr(writer, "assemble", real)
        with pytest.raises(Paused):   # --overwrite meshes anew; --resume has every task and writes
            run_mesh(labels, str(dest), **{"progress" if flag == "overwrite" else "write_progress": pause},
                     **{flag: True}, **kw)
        return stats

    monkeypatch.setattr(writer, "assemble", b_starts)
    run_mesh(labels, str(dest), **kw)   # A
    scratch = sorted(p.name for p in (dest / pipeline.SCRATCH).iterdir())
    assert scratch == ["blocks", "owner", "plan.json"], scratch
    assert len(list((dest / pipeline.SCRATCH / "blocks").iterdir())) >= 1
    summary = run_mesh(labels, str(dest), resume=True, **kw)   # B goes on (as its --resume would)
    assert summary.tasks_resumed >= 1 and tree_files(dest) == tree_files(tmp_path / "clean")


def test_a_run_taken_over_while_its_workers_write_an_unsharded_output_stops_before_writing_all(tmp_path,
                                                                                               monkeypatch):
    """Unsharded, the workers write the segments' files: in one run of segments each, all of
    them submitted at once, so a run taken over while they wrote (its mark checked at each
    report) wrote every file into the other run's output before it stopped.  In smaller runs,
    a few submitted at a time and the rest cancelled, it stops with those its workers have in
    hand (2 workers: at most half of 8 runs)."""
    from gpumesh.pipeline import SCRATCH

    labels = _cubes_of_200_segments()
    dest = tmp_path / "out"
    _taken_over_as_it_writes(monkeypatch, labels, dest, MeshOptions(chunk_size=16), workers=2)
    written = [p for p in dest.iterdir() if p.name != SCRATCH.rstrip("/")]
    files = 2 * len(np.unique(labels[labels > 0]))   # a manifest and a data file each
    assert not (dest / "info").exists() and len(written) < files * 3 // 4, (len(written), files)


def test_a_run_taken_over_while_it_meshes_stops_meshing(tmp_path, monkeypatch):
    """A run whose destination another takes over while it meshes (--overwrite with other
    options, --resume of a job thought dead) reads its mark at its progress reports while it
    meshes too (at most every OWNER_CHECK_S): it stops then, not after meshing every task, whose
    results it went on writing into the other run's scratch area, or into its finished output
    (a scratch area that no run deletes: validate's warning, "not empty" refusals)."""
    from gpumesh import DestinationTakenError, pipeline, writer

    labels = _blobs()
    dest = tmp_path / "out"
    fast = MeshOptions(chunk_size=32, quality="low")   # the other run: over before this one is
    real, meshed = pipeline.mesh_block, []

    def counted(*args, **kwargs):
        meshed.append(1)
        return real(*args, **kwargs)

    def other_run(done, total):
        if done == 2:
            monkeypatch.setattr(pipeline, "mesh_block", real)
            run_mesh(labels, str(dest), options=fast, voxel_size=(1, 1, 1), workers=1, overwrite=True)
            monkeypatch.setattr(pipeline, "mesh_block", counted)
            meshed.clear()
            time.sleep(writer.OWNER_CHECK_S)   # this run's next report reads its mark

    monkeypatch.setattr(pipeline, "mesh_block", counted)
    # the other run has finished (its scratch area, this run's mark with it, is gone): said so
    with pytest.raises(DestinationTakenError, match="another gpumesh run has started writing there since this "
                                                    "one began, and has finished"):
        run_mesh(labels, str(dest), options=MeshOptions(chunk_size=16), voxel_size=(1, 1, 1), workers=1,
                 progress=other_run)
    assert len(meshed) == 1   # the task in hand at the check, of dozens left
    left = list((dest / pipeline.SCRATCH / "blocks").iterdir())
    assert len(left) <= 1 and validate(str(dest)).ok, left


@pytest.mark.parametrize("workers", [1, 2])
def test_a_run_whose_scratch_area_is_deleted_says_so(tmp_path, monkeypatch, workers):
    """A run whose scratch area is deleted while it meshes (by hand, say) stops as a run taken
    over does, but says what happened: it used to say that another gpumesh run had started
    writing there, though none had.  DEST is named as given."""
    import shutil

    from gpumesh import DestinationTakenError, pipeline, writer

    dest = tmp_path / "out"
    monkeypatch.setattr(writer, "OWNER_CHECK_S", 0.0)

    def delete_it(done, total):
        if done == 1:
            # the other worker may be writing a task result into it meanwhile: rmtree would then
            # fail on a folder not empty (a race of the test); the mark is gone either way
            shutil.rmtree(dest / pipeline.SCRATCH, ignore_errors=True)
            assert not (dest / pipeline.OWNER_KEY).exists()

    with pytest.raises(DestinationTakenError) as caught:
        run_mesh(_blobs(), str(dest), options=MeshOptions(chunk_size=16), voxel_size=(1, 1, 1), workers=workers,
                 progress=delete_it)
    assert str(caught.value).startswith(f"{dest}: this run's scratch area was deleted while it ran"), caught.value
    assert "another gpumesh run has started" not in str(caught.value)
    assert not (dest / "info").exists()


def test_the_mark_is_read_at_most_every_owner_check_s(tmp_path, monkeypatch):
    """The assembly's (and the meshing's) progress reports read the run's mark at most every
    OWNER_CHECK_S, not at every report once the first second has passed (a read each on a
    cloud store); every report is passed on, and a mark replaced stops the run at the next read."""
    from gpumesh import DestinationTakenError, writer

    kv = storage.open_kvstore(str(tmp_path / "d"))
    storage.write(kv, "owner", b"mine")
    real, reads = storage.read, []
    monkeypatch.setattr(writer.storage, "read", lambda kv, key, *a: reads.append(key) or real(kv, key, *a))
    clock = [100.0]
    monkeypatch.setattr(writer.time, "monotonic", lambda: clock[0])
    seen = []
    check = writer._checking_owner(kv, ("owner", b"mine"), lambda done, total: seen.append(done))
    for i in range(10):   # a report every half second, 5 s in all
        clock[0] += 0.5
        check(i, 10)
    assert seen == list(range(10)) and len(reads) == 5, reads
    storage.write(kv, "owner", b"another run")
    clock[0] += 0.5
    check(10, 12)   # not yet due
    clock[0] += 0.5
    with pytest.raises(DestinationTakenError):
        check(11, 12)


def test_a_mark_that_cannot_be_read_is_not_a_run_taken_over(tmp_path, monkeypatch):
    """A read of the run's mark that fails (a cloud store's passing error) is not taken for
    another run's mark: the run goes on and finishes, rather than stopping as "taken over"."""
    from conftest import tree_files

    from gpumesh import writer
    from gpumesh.pipeline import OWNER_KEY

    labels = _blobs((32, 32, 32))
    kw = dict(options=MeshOptions(chunk_size=16), voxel_size=(1, 1, 1), workers=1)
    run_mesh(labels, str(tmp_path / "clean"), **kw)
    real = storage.read

    def flaky(kv, key, *args):
        if key == OWNER_KEY:
            raise ValueError("UNAVAILABLE: the store did not answer")
        return real(kv, key, *args)

    monkeypatch.setattr(writer.storage, "read", flaky)
    run_mesh(labels, str(tmp_path / "out"), **kw)
    assert tree_files(tmp_path / "out") == tree_files(tmp_path / "clean")


def test_a_run_interrupted_by_a_gpumesh_without_stamps_is_resumed_by_rerunning_its_tasks(tmp_path, monkeypatch):
    """A run interrupted by the gpumesh before task results carried a stamp (``blocks/NAME``,
    a plan.json whose plan has no stamp) is resumed: not refused as "other options", and its
    unstamped results, whose options cannot be told, are not taken: the tasks run again and the
    output is a clean run's."""
    from conftest import tree_files

    from gpumesh import writer
    from gpumesh.pipeline import SCRATCH

    labels = _blobs((32, 32, 32))
    kw = dict(options=MeshOptions(chunk_size=16), voxel_size=(1, 1, 1), workers=1)
    run_mesh(labels, str(tmp_path / "clean"), **kw)
    dest = tmp_path / "out"

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer, "assemble", stop)
    with pytest.raises(KeyboardInterrupt):
        run_mesh(labels, str(dest), **kw)
    monkeypatch.undo()
    blocks = dest / SCRATCH / "blocks"
    for p in list(blocks.iterdir()):   # as the earlier gpumesh named them
        p.rename(blocks / p.name.partition("@")[0])
    (dest / SCRATCH / "owner").unlink()
    plan = json.loads((dest / SCRATCH / "plan.json").read_text())
    assert "stamp" not in plan["plan"]   # as the earlier gpumesh wrote it
    summary = run_mesh(labels, str(dest), resume=True, **kw)
    assert summary.tasks_resumed == 0
    assert tree_files(dest) == tree_files(tmp_path / "clean")


def test_a_summary_json_that_fails_leaves_no_temporary_file_and_a_link_stays_a_link(tmp_path, monkeypatch):
    """``--summary-json``: a write that fails once the temporary file is made (the rename)
    removes it, and leaves the old report as it was; over a symbolic link, the link's target is
    replaced and the link kept."""
    from gpumesh import cli

    path = tmp_path / "s.json"
    path.write_text("{}")
    real = os.replace

    def refused(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cli.os, "replace", refused)
    with pytest.raises(SystemExit) as info:
        cli._write_summary(str(path), {"segments": 1})
    assert info.value.code == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json"] and path.read_text() == "{}"
    monkeypatch.setattr(cli.os, "replace", real)
    (tmp_path / "reports").mkdir()
    link = tmp_path / "reports" / "latest.json"
    link.symlink_to(path)
    cli._write_summary(str(link), {"segments": 2})
    assert link.is_symlink() and json.loads(path.read_text()) == {"segments": 2}
    assert os.listdir(tmp_path / "reports") == ["latest.json"]


def test_convert_into_an_interrupted_runs_folder_does_not_advise_resume(tmp_path):
    """convert has no --resume: a destination holding an interrupted mesh run is refused with
    --overwrite named, not "pass --resume to finish it"."""
    from gpumesh import DestinationExistsError

    src = tmp_path / "mesh"
    run_mesh(_blobs((16, 16, 16)), str(src), voxel_size=(1, 1, 1), workers=1)
    busy = tmp_path / "busy" / ".gpumesh-work"
    busy.mkdir(parents=True)
    (busy / "plan.json").write_text("{}")
    with pytest.raises(DestinationExistsError, match="pass --overwrite to replace the mesh there$") as info:
        convert_mesh(str(src), str(tmp_path / "busy"), sharding=ShardingOptions())
    assert "--resume" not in str(info.value)


def test_ctrl_c_tells_how_many_tasks_are_kept(tmp_path, monkeypatch):
    """run_mesh's KeyboardInterrupt carries ``tasks_kept`` = (the tasks a resumed run skips, all
    of them), which the CLI's line says: Ctrl-C at the third task keeps two."""
    from gpumesh import pipeline
    from gpumesh.pipeline import Plan

    labels = _blobs((32, 32, 32))
    opts = MeshOptions(chunk_size=16)
    real, calls = pipeline.mesh_block, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "mesh_block", interrupted)
    with pytest.raises(KeyboardInterrupt) as info:
        run_mesh(labels, str(tmp_path / "out"), options=opts, voxel_size=(1, 1, 1), workers=1)
    assert info.value.tasks_kept == (2, len(Plan.make(labels.shape, opts).tasks()))


def test_the_writing_cancels_the_tasks_not_started_when_it_stops():
    """The output's tasks are submitted a few per worker ahead (writer._in_turn); when the
    writing stops (a run taken over, at a report), those not started are cancelled rather
    than left to run when the pool shuts down, writing into the other run's output."""
    from concurrent.futures import Future

    from gpumesh import writer

    futures = []

    def submit():   # a task that has not started (the workers are busy)
        futures.append(Future())
        if len(futures) == 1:
            futures[0].set_result(1)
        return futures[-1]

    def stop(result):
        raise RuntimeError("taken over")

    with pytest.raises(RuntimeError):
        writer._in_turn(None, 2, (submit for _ in range(8)), stop)
    assert len(futures) == writer.SHARDS_AHEAD * 2 and all(f.cancelled() for f in futures[1:])
