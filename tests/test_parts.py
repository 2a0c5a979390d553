"""A job split into parts (``run_mesh(part=(K, N))``, ``gpumesh mesh --part K/N``): N runs,
one per machine of an array job, each mesh their share of the tasks into one DEST and write no
output; one ``--resume`` then writes it, with the bytes of a whole run."""

from __future__ import annotations

import subprocess
import time

import numpy as np
import pytest

from gpumesh import DestinationExistsError, DestinationTakenError, TaskFailedError
from gpumesh.pipeline import (SCRATCH, MeshOptions, Plan, finished_tasks, parse_block_key, part_tasks, run_mesh,
                              task_name)
from gpumesh.sharding import ShardingOptions

from conftest import CROP_SIZE, CROP_START, cli_command, tree_files, write_zarr


def _blobs(shape=(64, 48, 40), seed=3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint32)
    for i in range(1, 40):
        c = rng.integers(0, shape)
        r = rng.integers(3, 9)
        labels[max(c[0] - r, 0):c[0] + r, max(c[1] - r, 0):c[1] + r, max(c[2] - r, 0):c[2] + r] = i
    return labels


def test_the_parts_split_the_tasks_block_by_block_and_cover_each_once():
    """Each task is in exactly one part; a block's tasks (octants and coarse) in the same one;
    every N-th block in the plan's order; the parts' sizes within one block of each other."""
    plan = Plan.make((300, 260, 200), MeshOptions(chunk_size=16))
    tasks = plan.tasks()
    blocks = list(dict.fromkeys(t[0] for t in tasks))
    assert len(blocks) > 20
    for n in (1, 2, 3, 7, len(blocks), len(blocks) + 5):
        parts = [part_tasks(tasks, k, n) for k in range(n)]
        assert sorted(task_name(t) for p in parts for t in p) == sorted(map(task_name, tasks))   # all, once
        owner = {t[0]: k for k, p in enumerate(parts) for t in p}
        assert all(owner[t[0]] == k for k, p in enumerate(parts) for t in p)   # a block in one part
        assert [owner[b] for b in blocks] == [i % n for i in range(len(blocks))]
        assert all(p == [t for t in tasks if t in set(p)] for p in parts)   # in the plan's order
        sizes = [len({t[0] for t in p}) for p in parts]
        assert max(sizes) - min(sizes) <= 1


def test_parts_then_a_resume_give_the_bytes_of_one_run(real_zarr, crop_medium, tmp_path):
    """Three parts run at once (CLI processes, two with 2 workers) into one DEST, each meshing
    its tasks only and writing no output; a ``--resume`` then writes the output, meshing
    nothing, with the bytes of one whole run (here the crop's, ``--bounds`` of the real volume)."""
    box = ",".join(map(str, tuple(CROP_START) + tuple(s + CROP_SIZE for s in CROP_START)))
    dest = tmp_path / "parts"
    common = ["mesh", str(real_zarr), str(dest), "--voxel-size", "32,32,40", "--bounds", box, "--chunk-size", "32",
              "--max-lods", "3", "--unsharded", "--quiet"]
    procs = [subprocess.Popen(cli_command() + common + ["--part", f"{k}/3", "--workers", str(1 + k % 2)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(3)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [o[1] for o in outs]
    for k, (out, err) in enumerate(outs):
        assert out.startswith(f"part:      {k}/3: "), out
        assert "job:       " in out and "--resume" in out and "segments:" not in out
    assert not (dest / "info").exists()   # no output yet: no part writes it
    tasks = len(list((dest / SCRATCH / "blocks").iterdir()))
    assert f"of its {tasks} tasks have finished" in "".join(o[0] for o in outs)
    r = subprocess.run(cli_command() + common + ["--resume"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert f"{tasks} tasks, {tasks} resumed)" in r.stdout, r.stdout
    assert tree_files(dest) == tree_files(crop_medium[0])


def test_a_part_resumes_its_own_tasks_and_the_last_run_meshes_what_no_part_did(tmp_path):
    """A part stopped midway and run again skips its finished tasks; a part run when it is done
    meshes nothing; the run that writes the output meshes the tasks of a part that never ran;
    sharded output equals one whole run's; the summary counts the part's tasks and the job's."""
    labels = _blobs()
    opts = MeshOptions(chunk_size=8, sharding=ShardingOptions(shard_bits=1))
    kw = dict(voxel_size=(4, 4, 40), workers=1)
    whole = run_mesh(labels, str(tmp_path / "whole"), options=opts, **kw)
    dest = tmp_path / "parts"
    mine = part_tasks(Plan.make(labels.shape, opts).tasks(), 0, 3)
    assert 4 < len(mine) < whole.tasks

    def stop(done, total):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as caught:
        run_mesh(labels, str(dest), options=opts, part=(0, 3), progress=stop, **kw)
    assert caught.value.tasks_kept == (3, len(mine))
    calls = []
    s = run_mesh(labels, str(dest), options=opts, part=(0, 3), progress=lambda d, t: calls.append((d, t)), **kw)
    assert (s.part, s.tasks, s.tasks_resumed, s.tasks_all, s.tasks_done_all) == \
        ("0/3", len(mine), 3, whole.tasks, len(mine))
    assert s.blocks == len({t[0] for t in mine}) == -(-whole.blocks // 3)   # every 3rd block, from the first
    assert calls[0] == (3, len(mine)) and calls[-1] == (len(mine), len(mine))
    assert (s.segments, s.bytes, s.triangles_per_lod) == (0, 0, [])
    assert s.seconds > 0 and s.peak_rss_mb > 0   # the CLI prints both
    assert not (tmp_path / "parts" / "info").exists()
    # nothing left: no workers start (a part writes no output for them to write)
    again = run_mesh(labels, str(dest), options=opts, part=(0, 3), **dict(kw, workers=2))
    assert (again.tasks, again.tasks_resumed, again.workers) == (len(mine), len(mine), 1)
    s2 = run_mesh(labels, str(dest), options=opts, part=(2, 3), **kw)
    assert s2.tasks_done_all == len(mine) + s2.tasks < whole.tasks   # part 1 never ran
    done = run_mesh(labels, str(dest), options=opts, resume=True, **kw)
    assert done.tasks_resumed == len(mine) + s2.tasks and done.segments == whole.segments
    assert tree_files(dest) == tree_files(tmp_path / "whole")
    # a part after the output is written: refused, as a --resume of a finished mesh is
    with pytest.raises(DestinationExistsError, match="holds a finished mesh"):
        run_mesh(labels, str(dest), options=opts, part=(1, 3), **kw)


def test_a_part_refuses_other_options_overwrite_a_cluster_link_source_and_bad_parts(tmp_path):
    """A part must share the plan of the parts before it (as a resume does), and refuses
    ``overwrite``, a Dask ``client`` and ``link_source``, and a malformed ``part``, before it
    writes anything."""
    labels = _blobs((32, 32, 32))
    opts = MeshOptions(chunk_size=8)
    kw = dict(voxel_size=(4, 4, 40), workers=1)
    dest = tmp_path / "parts"
    run_mesh(labels, str(dest), options=opts, part=(0, 2), **kw)
    before = tree_files(dest)
    with pytest.raises(DestinationExistsError, match=r"different options or source .*quality"):
        run_mesh(labels, str(dest), options=MeshOptions(chunk_size=8, quality="low"), part=(1, 2), **kw)
    with pytest.raises(DestinationExistsError, match="different options or source .*contents"):
        run_mesh(labels + 1, str(dest), options=opts, part=(1, 2), **kw)
    for extra, message in [(dict(overwrite=True), "cannot overwrite DEST"),
                           (dict(client=object()), "not both: each splits the job"),
                           (dict(link_source=True), "belongs to the run that writes the output"),
                           (dict(part=(2, 2)), r"0 <= K < N, got \(2, 2\)"),
                           (dict(part=(-1, 2)), r"0 <= K < N"),
                           (dict(part=(True, 2)), r"0 <= K < N"),
                           (dict(part=(1.0, 2)), r"0 <= K < N"),
                           (dict(part=3), r"part must be \(K, N\)"),
                           (dict(part=(0, 1, 2)), r"part must be \(K, N\)")]:
        args = dict(dict(options=opts, part=(1, 2)), **extra)
        with pytest.raises(ValueError, match=message):
            run_mesh(labels, str(dest), **args, **kw)
        assert tree_files(dest) == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(DestinationExistsError, match="holds no interrupted run"):
        run_mesh(labels, str(other), options=opts, part=(0, 2), **kw)


def test_a_part_stops_when_the_scratch_area_is_deleted_or_replaced(tmp_path, monkeypatch):
    """A part whose job was finished (the scratch area deleted) or started over (another plan)
    while it ran stops with DestinationTakenError at its next check, and a task that fails says
    to run the same part again.  In a finished mesh, what it wrote after the output's run had
    deleted its scratch area (its task results, which no run reads or deletes) goes too."""
    from gpumesh import writer

    monkeypatch.setattr(writer, "OWNER_CHECK_S", 0.0)
    labels = _blobs((40, 40, 40))
    opts = MeshOptions(chunk_size=8)
    kw = dict(voxel_size=(4, 4, 40), workers=1)
    def finish(kv):   # as the run that writes the output does: info, then the scratch area deleted
        writer.storage.write(kv, "info", b"{}\n")
        writer.storage.delete_prefix(kv, SCRATCH)

    for name, change, said in [
            ("deleted", lambda kv: writer.storage.delete_prefix(kv, SCRATCH),
             r"the job's scratch area was deleted while part 1/2 ran \(.*plan.json is gone: by hand, or by another "
             r"gpumesh run there\): part 1/2 stops$"),
            ("replaced", lambda kv: writer.storage.write(kv, SCRATCH + "plan.json", b"{}\n"),
             r"another gpumesh run has started a job of other options there .*: part 1/2 stops, and leaves the "
             r"destination to that run$"),
            ("finished", finish,
             r"a run has written the job's output there while part 1/2 ran .*: part 1/2 stops, and its tasks left "
             r"are not needed \(start the run that writes the output only once every part has ended\)$")]:
        dest = tmp_path / name

        def meddle(done, total, dest=dest, change=change):
            if done == 2:
                change(writer.storage.open_kvstore(str(dest)))
            time.sleep(0.01)

        with pytest.raises(DestinationTakenError, match=said):
            run_mesh(labels, str(dest), options=opts, part=(1, 2), progress=meddle, **kw)
        assert len(finished_tasks(writer.storage.open_kvstore(str(dest)))) <= 3
        if name == "finished":   # what it wrote after the output's run deleted its scratch area: deleted too
            assert sorted(p.name for p in dest.iterdir()) == ["info"]
    # finished after its last check, before its summary: found then, the same
    dest = tmp_path / "finished-last"

    def last(done, total):
        if done == total:
            finish(writer.storage.open_kvstore(str(dest)))
            writer.storage.write(writer.storage.open_kvstore(str(dest)), SCRATCH + "empty/x-0", b"late\n")

    with pytest.raises(DestinationTakenError, match="a run has written the job's output there while part 1/2 ran"):
        run_mesh(labels, str(dest), options=opts, part=(1, 2), progress=last, **kw)
    assert sorted(p.name for p in dest.iterdir()) == ["info"]
    # a task that cannot read the volume: the others finish, the line names the part to rerun
    bad = labels.astype(np.int32)
    plan = Plan.make(bad.shape, opts)
    first = part_tasks(plan.tasks(), 0, 2)[0]
    bad[tuple(plan.octant_origin(*first))] = -5
    write_zarr(tmp_path / "bad.zarr", bad, chunk=8)
    for dest, workers in [("bad2", 2), ("bad", 1)]:   # read by the workers, or in this process
        with pytest.raises(TaskFailedError, match=r"negative label -5 .* run it again with the same --part 0/2 "
                                                  r"\(Python: part=\(0, 2\)\) once the cause is fixed"):
            run_mesh(str(tmp_path / "bad.zarr"), str(tmp_path / dest), options=opts, part=(0, 2),
                     **dict(kw, workers=workers))
    s = run_mesh(str(tmp_path / "bad.zarr"), str(tmp_path / "bad"), options=opts, part=(1, 2), **kw)
    both = s.tasks + len(part_tasks(plan.tasks(), 0, 2))   # the failed tasks of part 0 (those that read the voxel)
    assert s.tasks_resumed == 0 and both - 3 <= s.tasks_done_all < both


def test_cli_part(tmp_path, monkeypatch):
    """``--part K/N`` on the CLI: its syntax, its refusals (status 2, nothing written), and
    Ctrl-C's line naming the part to run again."""
    write_zarr(tmp_path / "v.zarr", _blobs((32, 32, 32)), chunk=16)
    base = cli_command() + ["mesh", str(tmp_path / "v.zarr"), "--voxel-size", "4,4,40", "--chunk-size", "8",
                            "--quiet"]
    for arg, message in [("3/3", "0 <= K < N"), ("1", "expected K/N"), ("a/b", "expected K/N"), ("-1/2", "0 <= K < N")]:
        r = subprocess.run(base + [str(tmp_path / "bad"), "--part", arg], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and message in r.stderr, (arg, r.stderr)
        assert not (tmp_path / "bad").exists()
    for extra, message in [(["--overwrite"], "cannot overwrite DEST"),
                           (["--scheduler", "tcp://127.0.0.1:1"], "give --part or --scheduler, not both")]:
        r = subprocess.run(base + [str(tmp_path / "bad"), "--part", "0/2"] + extra, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 2 and message in r.stderr, (extra, r.stderr)
        assert not (tmp_path / "bad").exists()
    # Ctrl-C (or SIGTERM) in a part: the line names the part to run again, not --resume
    from click.testing import CliRunner

    from gpumesh import pipeline
    from gpumesh.cli import main

    def stopped(*args, **kwargs):
        exc = KeyboardInterrupt()
        exc.tasks_kept = (3, 9)
        raise exc

    monkeypatch.setattr(pipeline, "run_mesh", stopped)
    r = CliRunner().invoke(main, base[len(cli_command()):] + [str(tmp_path / "cut"), "--part", "1/2", "--workers", "1"])
    assert r.exit_code == 130, r.output
    assert ("gpumesh: interrupted; 3 of 9 tasks had finished; they are kept in " in r.output
            and "run it again with the same --part 1/2 to continue" in r.output), r.output


def test_a_part_never_says_it_writes_the_output(tmp_path, monkeypatch):
    """A part's progress (its log, not --quiet) ends without "writing the output", which it does
    not do; Ctrl-C once its tasks have all finished says so, not that the output was being
    written."""
    write_zarr(tmp_path / "v.zarr", _blobs((32, 32, 32)), chunk=16)
    base = ["mesh", str(tmp_path / "v.zarr"), "--voxel-size", "4,4,40", "--chunk-size", "8", "--workers", "1"]
    r = subprocess.run(cli_command() + base + [str(tmp_path / "p"), "--part", "0/2"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "meshing: " in r.stderr and "writing the output" not in r.stderr, r.stderr
    r = subprocess.run(cli_command() + base + [str(tmp_path / "p"), "--resume"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "writing the output" in r.stderr, r.stderr   # the run that writes it says so
    from click.testing import CliRunner

    from gpumesh import pipeline
    from gpumesh.cli import main

    def stopped(*args, **kwargs):
        exc = KeyboardInterrupt()
        exc.tasks_kept = (9, 9)
        raise exc

    monkeypatch.setattr(pipeline, "run_mesh", stopped)
    r = CliRunner().invoke(main, base + [str(tmp_path / "cut"), "--part", "1/2", "--quiet"])
    assert r.exit_code == 130, r.output
    assert "all 9 of its tasks had finished; they are kept in " in r.output, r.output
    assert "output was being written" not in r.output, r.output


def test_a_part_refused_says_what_a_part_can_do(tmp_path):
    """A part into a finished mesh, or into another job's scratch area, is refused with what a
    part can do (not "use --overwrite", which a part refuses, nor "--resume", not given)."""
    labels = _blobs((32, 32, 32))
    opts = MeshOptions(chunk_size=8)
    kw = dict(voxel_size=(4, 4, 40), workers=1)
    dest = tmp_path / "parts"
    run_mesh(labels, str(dest), options=opts, part=(0, 2), **kw)
    with pytest.raises(DestinationExistsError) as caught:
        run_mesh(labels, str(dest), options=MeshOptions(chunk_size=8, dust_threshold=9), part=(1, 2), **kw)
    message = str(caught.value)
    assert "--resume with different" not in message and "than the interrupted run" not in message, message
    assert "different options or source than this part's (options.dust_threshold: 0 -> 9)" in message, message
    assert "give every part, and the --resume that writes the output, the same SOURCE and options" in message
    run_mesh(labels, str(dest), options=opts, resume=True, **kw)   # the output
    before = tree_files(dest)
    with pytest.raises(DestinationExistsError) as caught:
        run_mesh(labels, str(dest), options=opts, part=(1, 2), **kw)
    message = str(caught.value)
    assert "holds a finished mesh" in message and "part 1/2 has nothing left to do" in message, message
    assert "use --overwrite to redo it" not in message and "a part does not --overwrite" in message, message
    # no scratch area left: nothing a --resume would finish (it is refused: "holds a finished mesh")
    assert "--resume" not in message and "scratch area is still there" not in message, message
    assert tree_files(dest) == before


def _two_parts_done(tmp_path, name: str = "parts", whole: bool = True):
    """A small job's 2 parts run into ``tmp_path / name`` (no output yet), and, with ``whole``,
    the job run whole into ``tmp_path / "whole"``.  Returns labels, options, run_mesh's other
    arguments, and the parts' DEST."""
    labels = _blobs((32, 32, 32))
    opts = MeshOptions(chunk_size=8)
    kw = dict(voxel_size=(4, 4, 40), workers=1)
    if whole:
        run_mesh(labels, str(tmp_path / "whole"), options=opts, **kw)
    for k in range(2):
        run_mesh(labels, str(tmp_path / name), options=opts, part=(k, 2), **kw)
    return labels, opts, kw, tmp_path / name


def test_a_part_never_meshes_into_a_finished_mesh_whose_scratch_area_is_being_deleted(tmp_path, monkeypatch):
    """The run that writes the output writes its info, then deletes its scratch area, plan last.
    A part that finds the info with the plan still there (that run deleting it, or stopped while
    it did) is refused, saying that a --resume ends it (it went on into the finished mesh); one
    that listed DEST before the info, and wrote its plan after that run had deleted its own,
    takes it back and is refused (it left its plan in the finished mesh)."""
    from gpumesh import storage

    labels, opts, kw, dest = _two_parts_done(tmp_path)
    plan_key = SCRATCH + "plan.json"
    plan = (dest / plan_key).read_bytes()
    run_mesh(labels, str(dest), options=opts, resume=True, **kw)
    finished = tree_files(dest)
    assert finished == tree_files(tmp_path / "whole")
    (dest / plan_key).parent.mkdir()
    (dest / plan_key).write_bytes(plan)   # as the run left it, stopped before it deleted its plan
    with pytest.raises(DestinationExistsError) as caught:
        run_mesh(labels, str(dest), options=opts, part=(1, 2), **kw)
    message = str(caught.value)
    assert "holds a finished mesh" in message and "part 1/2 has nothing left to do" in message, message
    assert "run it again with --resume to finish that" in message, message
    assert (dest / plan_key).read_bytes() == plan
    run_mesh(labels, str(dest), options=opts, resume=True, **kw)   # (ends it)
    assert tree_files(dest) == finished

    dest = _two_parts_done(tmp_path, "race", whole=False)[3]
    write_json, ended = storage.write_json, []

    def write_json_late(kv, key, value, **kwargs):   # the part's plan: the run writing the output ends first
        if key == plan_key and not ended:
            ended.append(1)
            run_mesh(labels, str(dest), options=opts, resume=True, **kw)
        return write_json(kv, key, value, **kwargs)

    monkeypatch.setattr(storage, "write_json", write_json_late)
    with pytest.raises(DestinationExistsError) as caught:
        run_mesh(labels, str(dest), options=opts, part=(1, 2), **kw)
    assert ended and "part 1/2 has nothing left to do" in str(caught.value)
    assert "--resume to finish" not in str(caught.value)
    assert tree_files(dest) == finished


def test_a_part_refused_by_a_finished_mesh_leaves_the_scratch_area_of_the_run_that_holds_it(tmp_path, monkeypatch):
    """A part that listed DEST before the output was written, and wrote its plan (the same bytes)
    once a whole run held the scratch area again (its mark there: here a --resume ending a run
    stopped before it deleted it), is refused and deletes nothing: that run's mark, plan and
    task results are its own, and it ends the job (the part deleted them: it stopped, "taken
    over", or found its task results gone)."""
    import threading

    from gpumesh import storage
    from gpumesh.pipeline import OWNER_KEY

    labels, opts, kw, dest = _two_parts_done(tmp_path)
    plan_key = SCRATCH + "plan.json"
    listed, go, caught = threading.Event(), threading.Event(), []
    write_json, write, delete_prefix = storage.write_json, storage.write, storage.delete_prefix

    def write_json_late(kv, key, value, **kwargs):   # the part's plan: it has listed DEST, before the info
        if key == plan_key and threading.current_thread() is part:
            listed.set()
            go.wait(120)
        return write_json(kv, key, value, **kwargs)

    def run_part():
        try:
            run_mesh(labels, str(dest), options=opts, part=(1, 2), **kw)
        except Exception as exc:
            caught.append(exc)

    monkeypatch.setattr(storage, "write_json", write_json_late)
    part = threading.Thread(target=run_part)
    part.start()
    assert listed.wait(120)
    monkeypatch.setattr(storage, "delete_prefix", lambda kv, prefix: None)
    run_mesh(labels, str(dest), options=opts, resume=True, **kw)   # the output; stopped before it deleted a thing
    monkeypatch.setattr(storage, "delete_prefix", delete_prefix)
    assert (dest / "info").exists() and (dest / plan_key).exists()

    def write_then_part(kv, key, value):   # the --resume that ends it has written its mark: the part goes on
        write(kv, key, value)
        if key == OWNER_KEY and not go.is_set():
            go.set()
            part.join(120)

    monkeypatch.setattr(storage, "write", write_then_part)
    run_mesh(labels, str(dest), options=opts, resume=True, **kw)
    assert go.is_set() and not part.is_alive()
    assert len(caught) == 1 and isinstance(caught[0], DestinationExistsError), caught
    assert "part 1/2 has nothing left to do" in str(caught[0])
    assert tree_files(dest) == tree_files(tmp_path / "whole")


def test_a_part_whose_plan_another_part_replaced_at_once_is_refused(tmp_path, monkeypatch):
    """Parts of other options started at once into an empty DEST each find it empty and write
    their plan: the one whose plan the other replaced before it read its mark back is refused
    (it took the other plan for its mark and meshed unseen tasks that no run would use)."""
    from gpumesh import storage

    labels = _blobs((32, 32, 32))
    kw = dict(voxel_size=(4, 4, 40), workers=1)
    run_mesh(labels, str(tmp_path / "other"), options=MeshOptions(chunk_size=8, dust_threshold=9), part=(0, 2), **kw)
    theirs = (tmp_path / "other" / SCRATCH / "plan.json").read_bytes()
    write_json = storage.write_json

    def raced(kv, key, value):   # the other part writes its plan just after this one's
        write_json(kv, key, value)
        if key == SCRATCH + "plan.json":
            storage.write(kv, key, theirs)

    monkeypatch.setattr(storage, "write_json", raced)
    with pytest.raises(DestinationExistsError, match=r"different options or source than this part's "
                                                     r"\(options.dust_threshold: 9 -> 0\)"):
        run_mesh(labels, str(tmp_path / "parts"), options=MeshOptions(chunk_size=8), part=(1, 2), **kw)
    assert not finished_tasks(storage.open_kvstore(str(tmp_path / "parts")))   # nothing meshed
    # a plan.json that is no JSON in its place: not this part's mark either
    monkeypatch.setattr(storage, "write_json", lambda kv, key, value: (write_json(kv, key, value),
                                                                        storage.write(kv, key, b"{not json")))
    with pytest.raises(DestinationExistsError, match="different options or source than this part's"):
        run_mesh(labels, str(tmp_path / "garbled"), options=MeshOptions(chunk_size=8), part=(1, 2), **kw)
    assert not finished_tasks(storage.open_kvstore(str(tmp_path / "garbled")))
    # its plan deleted before it read it back (the job's output written there meanwhile): it stops
    monkeypatch.setattr(storage, "write_json", lambda kv, key, value: (write_json(kv, key, value),
                                                                        storage.delete_prefix(kv, SCRATCH)))
    with pytest.raises(DestinationTakenError, match="scratch area was deleted"):
        run_mesh(labels, str(tmp_path / "gone"), options=MeshOptions(chunk_size=8), part=(1, 2), **kw)
    assert not finished_tasks(storage.open_kvstore(str(tmp_path / "gone")))


def test_a_part_taken_over_after_its_last_check_fails_rather_than_counting_its_tasks(tmp_path, monkeypatch):
    """The scratch area deleted (the job's output written) or replaced (a job of other options
    started over) after the part last read its mark, as its last task ends: the part fails with
    DestinationTakenError, not a summary of tasks written where no run will use them."""
    from gpumesh import writer

    monkeypatch.setattr(writer, "OWNER_CHECK_S", 1e9)   # no check of the mark while the tasks run
    labels = _blobs((32, 32, 32))
    kw = dict(options=MeshOptions(chunk_size=8), voxel_size=(4, 4, 40), workers=1)
    for name, change in [("deleted", lambda kv: writer.storage.delete_prefix(kv, SCRATCH)),
                         ("replaced", lambda kv: writer.storage.write(kv, SCRATCH + "plan.json", b"{}\n"))]:
        dest = tmp_path / name

        def last(done, total, dest=dest, change=change):
            if done == total:
                change(writer.storage.open_kvstore(str(dest)))

        with pytest.raises(DestinationTakenError):
            run_mesh(labels, str(dest), part=(0, 2), progress=last, **kw)


def test_a_part_whose_task_result_cannot_be_written_says_to_run_the_same_part_again(tmp_path):
    """A task result that cannot be written (a directory in its place) fails the part, in this
    process or in its workers, with the line to run the same part again, not ``--resume`` (which
    would mesh every part's tasks left on one machine)."""
    labels = _blobs((40, 40, 40))
    opts = MeshOptions(chunk_size=8)
    first = part_tasks(Plan.make(labels.shape, opts).tasks(), 0, 2)[0]
    # the key of that task's result (its name, the job's stamp, its header's size), from a part 0 elsewhere
    run_mesh(labels, str(tmp_path / "key"), options=opts, part=(0, 2), voxel_size=(4, 4, 40), workers=1)
    key = next(p.name for p in (tmp_path / "key" / SCRATCH / "blocks").iterdir()
               if parse_block_key(p.name)[0] == task_name(first))
    for workers in (1, 2):
        dest = tmp_path / f"w{workers}"
        run_mesh(labels, str(dest), options=opts, part=(1, 2), voxel_size=(4, 4, 40), workers=1)
        (dest / SCRATCH / "blocks" / key / "x").mkdir(parents=True)
        with pytest.raises(TaskFailedError, match=r"run it again with the same --part 0/2 \(Python: part=\(0, 2\)\) "
                                                  r"once the cause is fixed"):
            run_mesh(labels, str(dest), options=opts, part=(0, 2), voxel_size=(4, 4, 40), workers=workers)


def test_cli_part_says_what_it_meshed_and_what_the_job_has_left(tmp_path):
    """A part's lines: its tasks meshed and those it had finished before, then the job's
    finished tasks and, until every part has ended, how many are left."""
    from click.testing import CliRunner

    from gpumesh.cli import main

    write_zarr(tmp_path / "v.zarr", _blobs((32, 32, 32)), chunk=16)
    tasks = Plan.make((32, 32, 32), MeshOptions(chunk_size=8)).tasks()
    mine = [len(part_tasks(tasks, k, 2)) for k in (0, 1)]

    def lines(k):
        r = CliRunner().invoke(main, ["mesh", str(tmp_path / "v.zarr"), str(tmp_path / "p"), "--voxel-size", "4,4,40",
                                      "--chunk-size", "8", "--workers", "1", "--quiet", "--part", f"{k}/2"])
        assert r.exit_code == 0, r.output
        return [ln for ln in r.output.splitlines() if ln.startswith(("part:", "job:"))]

    first = lines(0)
    assert first[0].startswith(f"part:      0/2: {mine[0]} of its {mine[0]} tasks meshed (0 had finished before) "
                               f"in "), first
    assert first[1] == (f"job:       {mine[0]} of its {len(tasks)} tasks have finished; once every part has ended "
                        f"({mine[1]} tasks left), `gpumesh mesh` with --resume, the same SOURCE, DEST and options, "
                        f"writes the output"), first
    again = lines(0)
    assert again[0].startswith(f"part:      0/2: 0 of its {mine[0]} tasks meshed ({mine[0]} had finished "
                               f"before) in "), again
    last = lines(1)
    assert last[1] == (f"job:       {len(tasks)} of its {len(tasks)} tasks have finished; every task has: "
                       f"`gpumesh mesh` with --resume, the same SOURCE, DEST and options, writes the output"), last
