"""The main job's worker processes: forked from a server with gpumesh loaded, and never left behind.

This module imports only the standard library and conftest (NumPy, pytest) at the top: a worker
that unpickles one of its probe functions imports it, and must not get gpumesh, numba or
TensorStore from it.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest

from conftest import cli_command, tree_files, write_zarr

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc; forkserver")


def _loaded_at_start() -> tuple[list, int]:
    return sorted(m for m in ("gpumesh.pipeline", "numba", "tensorstore") if m in sys.modules), os.getppid()


def _env(name: str):
    return os.environ.get(name)


def test_workers_are_forked_from_a_server_that_has_gpumesh_loaded():
    from gpumesh import workerserver

    if workerserver._server_env not in (None, workerserver._environment()):
        # started by an earlier test while it had changed the environment: this process's
        # later jobs spawn their workers (test_a_changed_environment_...); start a new one
        workerserver.stop_server()
    ctx = workerserver.context()
    assert ctx.get_start_method() == "forkserver"
    with ProcessPoolExecutor(1, mp_context=ctx) as pool:
        loaded, parent = pool.submit(_loaded_at_start).result(timeout=60)
    # a spawned worker would start with none of them (this module imports none)
    assert loaded == ["gpumesh.pipeline", "numba", "tensorstore"]
    assert parent != os.getpid()   # the server's child, not this process's


def test_a_changed_environment_gets_spawned_workers_that_see_it(monkeypatch):
    from gpumesh import workerserver

    workerserver.start_server()
    monkeypatch.setenv("GPUMESH_TEST_PROBE", "changed")
    ctx = workerserver.context()
    assert ctx.get_start_method() == "spawn"
    with ProcessPoolExecutor(1, mp_context=ctx) as pool:
        assert pool.submit(_env, "GPUMESH_TEST_PROBE").result(timeout=60) == "changed"
    monkeypatch.delenv("GPUMESH_TEST_PROBE")
    assert workerserver.context().get_start_method() == "forkserver"


@pytest.mark.parametrize("fmt,shard_bits,cache", [
    ("multires", None, None), ("multires", None, 1), ("legacy", None, None), ("multires", 0, None),
    ("multires", 0, 1), ("multires", 2, None), ("multires", 2, 1)],
    ids=["unsharded", "unsharded-read-by-range", "legacy", "1-shard", "1-shard-read-by-range", "4-shards",
         "4-shards-read-by-range"])
def test_two_workers_write_the_bytes_of_one(crop, tmp_path, monkeypatch, fmt, shard_bits, cache):
    """The workers also write the output: each a part of the segments' files (unsharded,
    legacy), of one shard's segments, or whole shards (four), reading the task results whole
    or, past the assembly cache, fragment by fragment."""
    from gpumesh import writer
    from gpumesh.pipeline import MeshOptions, run_mesh
    from gpumesh.sharding import ShardingOptions

    if cache is not None:
        monkeypatch.setattr(writer, "ASSEMBLY_CACHE_BYTES", cache)
    sub = crop[:64, :64, :64]
    sharding = None if shard_bits is None else ShardingOptions(shard_bits=shard_bits)
    options = MeshOptions(chunk_size=16, max_lods=1 if fmt == "legacy" else 3, sharding=sharding, format=fmt)
    kw = dict(options=options, voxel_size=(32.0, 32.0, 40.0))
    one = run_mesh(sub, str(tmp_path / "one"), workers=1, **kw)
    two = run_mesh(sub, str(tmp_path / "two"), workers=2, **kw)
    assert one.workers == 1 and two.workers == 2 and two.tasks > 2
    assert tree_files(tmp_path / "one") == tree_files(tmp_path / "two") != {}
    if shard_bits is not None:
        assert len([n for n in tree_files(tmp_path / "two") if n.endswith(".shard")]) == 1 << shard_bits
    # the scratch area goes, directories included (TensorStore's file driver deletes files only)
    assert not (tmp_path / "one" / ".gpumesh-work").exists() and not (tmp_path / "two" / ".gpumesh-work").exists()
    # every worker reports its own peak (a forked worker is not this process's child)
    assert two.peak_rss_mb > 0


def test_the_assembly_reads_only_the_headers_no_worker_returned(crop, tmp_path, monkeypatch):
    """With workers writing the output, the main process reads no task result that a worker
    returned the header of: none on a fresh run; on a resumed run the resumed tasks' headers
    alone, by byte range (not whole), one read each (their keys give their sizes), and the
    bytes of an uninterrupted run."""
    from gpumesh import writer
    from gpumesh.pipeline import BLOCK_PREFIX, MeshOptions, run_mesh
    from gpumesh.sharding import ShardingOptions

    read = []
    real = writer.TaskResults._values

    def spy(self, reads):
        for b, blob in real(self, reads):
            read.append((b, len(blob)))
            yield b, blob

    monkeypatch.setattr(writer.TaskResults, "_values", spy)
    sub = crop[:64, :64, :64]
    kw = dict(options=MeshOptions(chunk_size=16, sharding=ShardingOptions(shard_bits=1)), voxel_size=(32.0, 32.0, 40.0))
    whole = run_mesh(sub, str(tmp_path / "whole"), workers=2, **kw)
    assert whole.workers == 2 and read == []

    def stop(done, total):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_mesh(sub, str(tmp_path / "cut"), workers=1, progress=stop, **kw)
    read.clear()
    again = run_mesh(sub, str(tmp_path / "cut"), workers=2, resume=True, **kw)
    assert again.tasks_resumed == 3
    assert tree_files(tmp_path / "cut") == tree_files(tmp_path / "whole")
    assert len(read) == 3 and len({b for b, _ in read}) == 3 and all(n > BLOCK_PREFIX for _, n in read)
    # one process reads (and keeps) the results whole: it writes the output from them
    read.clear()
    run_mesh(sub, str(tmp_path / "one"), workers=1, **kw)
    assert len(read) == whole.tasks and tree_files(tmp_path / "one") == tree_files(tmp_path / "whole")


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    return children


def _descendants(root: int) -> set[int]:
    children = _children()
    out, stack = set(), [root]
    while stack:
        for c in children.get(stack.pop(), ()):
            out.add(c)
            stack.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def _assert_ended(seen: set, job: str) -> None:
    """Every process in ``seen`` ends within 30 s (those left are killed, and the test fails)."""
    deadline = time.time() + 30
    while time.time() < deadline and any(_alive(p) for p in seen):
        time.sleep(0.1)
    left = [p for p in seen if _alive(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left, f"processes of {job} still running: {left}"


def _ignores_sigint(pid: int, sig: int = signal.SIGINT) -> bool:
    """Whether process ``pid`` is running and ignores SIGINT (or ``sig``)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            status = dict(line.split(":", 1) for line in f)
    except OSError:
        return False
    return status["State"].split()[0] != "Z" and bool(int(status["SigIgn"], 16) >> (sig - 1) & 1)


def _results(blocks) -> list[str]:
    """The finished task results in a scratch ``blocks`` folder: not TensorStore's ``*.__lock``
    file of a write in progress (renamed into place when done, left behind if interrupted)."""
    return [n for n in os.listdir(blocks) if not n.endswith(".__lock")] if blocks.is_dir() else []


def _wait_for_first_result(proc, dest, timeout=120) -> set[int]:
    """Wait until the job in ``proc`` wrote its first task result; the job's processes seen."""
    blocks = dest / ".gpumesh-work" / "blocks"
    seen: set[int] = set()
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not _results(blocks):
        seen |= _descendants(proc.pid)
        time.sleep(0.05)
    seen |= _descendants(proc.pid)
    assert proc.poll() is None, "the job ended before the test could interrupt it"
    return seen


def test_killing_the_main_job_ends_its_workers(real_zarr, tmp_path):
    """SIGKILL the CLI while its workers mesh: no process of the job is left running.

    A pool worker used to wait forever for its next task (and keep its memory, and on a GPU its
    CUDA context) once the main process was killed, as a batch scheduler or the OOM killer does.
    """
    proc = subprocess.Popen(cli_command() + ["mesh", str(real_zarr), str(tmp_path / "out"), "--voxel-size",
                                          "32,32,40", "--workers", "2", "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        seen = _wait_for_first_result(proc, tmp_path / "out")
        assert len(seen) >= 3   # the worker server (or the resource tracker) and two workers
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
    _assert_ended(seen, "the killed job")


_STOP_ARGS = ["--bounds", "128,128,128,384,384,384", "--voxel-size", "32,32,40", "--workers", "2", "--quiet"]


@pytest.fixture(scope="module")
def uninterrupted(real_zarr, tmp_path_factory):
    """The output of the job that the stop tests interrupt, run to its end."""
    dest = tmp_path_factory.mktemp("uninterrupted") / "out"
    clean = subprocess.run(cli_command() + ["mesh", str(real_zarr), str(dest)] + _STOP_ARGS,
                           capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0, clean.stderr
    return dest


def _default_stop_signals():
    """In a child: SIGINT and SIGHUP with their default action, whatever this process (a test
    runner started in the background, or under nohup) ignores."""
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


@pytest.mark.parametrize("sig, status, how", [(signal.SIGINT, 130, "interrupted"),
                                              (signal.SIGTERM, 143, "terminated (SIGTERM)"),
                                              (signal.SIGHUP, 129, "terminated (SIGHUP)")],
                         ids=["ctrl-c", "sigterm", "sighup"])
def test_a_stop_signal_ends_the_job_at_once_and_resume_finishes_it(real_zarr, tmp_path, uninterrupted,
                                                                     sig, status, how):
    """SIGINT (Ctrl-C) or SIGTERM (a batch scheduler, ``docker stop``) to the CLI while its
    workers mesh: it ends within seconds with status 128 + the signal and one line, none of
    its processes is left, the finished tasks are kept, and ``--resume`` writes the bytes of
    an uninterrupted run.

    The pool used to wait for every queued task before the interrupt took effect (its exit
    joins them), so a Ctrl-C stopped nothing until the meshing was done; SIGTERM ended the
    main process with no word but the resource tracker's warning of leaked semaphores.  A
    terminal's Ctrl-C reaches the job's whole process group, its workers too: they leave it to
    the main process (no traceback of theirs on stderr).  So does SIGHUP, when the terminal or
    ssh session closes: it ended the job with status 129 and no line, and killed
    multiprocessing's resource tracker, whose relaunch warned and printed a traceback per
    semaphore; every process of the job but the main one now ignores it.
    """
    dest = tmp_path / "out"
    proc = subprocess.Popen(cli_command() + ["mesh", str(real_zarr), str(dest)] + _STOP_ARGS,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=_default_stop_signals)
    try:
        seen = _wait_for_first_result(proc, dest)
        if sig in (signal.SIGINT, signal.SIGHUP):
            # every process of the job but the main one leaves Ctrl-C (and SIGHUP) to it (a
            # worker's own KeyboardInterrupt would print its traceback); the workers set that up
            # as they start (the processes running now: one that has ended meanwhile is not asked)
            def setting_up():
                return [p for p in _descendants(proc.pid) if _alive(p) and not _ignores_sigint(p, sig)]

            deadline = time.time() + 30
            while time.time() < deadline and setting_up():
                time.sleep(0.1)
            assert _descendants(proc.pid) and not setting_up() and proc.poll() is None
        t0 = time.time()
        if sig in (signal.SIGINT, signal.SIGHUP):
            os.killpg(proc.pid, sig)   # as a terminal sends it
        else:
            proc.send_signal(sig)
        err = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == status and time.time() - t0 < 15, (proc.returncode, err)
    _assert_ended(seen, "the interrupted job")
    kept = len(_results(dest / ".gpumesh-work" / "blocks"))
    # how many tasks a resumed run skips: those whose results are in DEST
    assert err.strip().splitlines() == [f"gpumesh: {how}; {kept} of 35 tasks had finished; they are kept in {dest}: "
                                        f"run it again with --resume to continue"], err
    resumed = subprocess.run(cli_command() + ["mesh", str(real_zarr), str(dest), "--resume"] + _STOP_ARGS,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{kept} resumed" in resumed.stdout and kept < 35
    assert tree_files(dest) == tree_files(uninterrupted)


def test_the_cli_leaves_an_ignored_hangup_ignored():
    """``nohup gpumesh mesh ...`` (SIGHUP ignored: the job is to outlive its terminal) keeps
    running when the terminal closes; SIGTERM still stops it.  The handlers are put back as
    they were when the command ends."""
    from gpumesh import cli

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGHUP, signal.SIGTERM)}
    try:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        previous = cli._stop_on_signals()
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is cli._raise_terminated
        cli._restore_signals(previous)
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == before[signal.SIGTERM]
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        previous = cli._stop_on_signals()
        assert signal.getsignal(signal.SIGHUP) is cli._raise_terminated
        cli._restore_signals(previous)
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


@pytest.mark.parametrize("part", [[], ["--part", "0/1"]], ids=["whole", "part"])
def test_a_killed_worker_fails_the_job_in_one_line_and_resume_finishes_it(crop, tmp_path, part):
    """SIGKILL one worker mid-job (as the out-of-memory killer would): the CLI says so in one
    line with status 1, and ``--resume`` then writes the bytes of an uninterrupted run.  In a
    part (``--part``), the line says to run the same part again, which then finishes it."""
    src = tmp_path / "src.zarr"
    write_zarr(src, crop)
    args = ["mesh", str(src), "--voxel-size", "32,32,40", "--chunk-size", "16", "--quiet"]
    dest = tmp_path / "killed"
    proc = subprocess.Popen(cli_command() + args[:2] + [str(dest)] + args[2:] + ["--workers", "2"] + part,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_first_result(proc, dest)
        children = _children()
        workers = [p for p in _descendants(proc.pid)
                   if not children.get(p) and b"resource_tracker" not in open(f"/proc/{p}/cmdline", "rb").read()]
        assert workers, "no worker process found"
        os.kill(workers[0], signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode == 1, err
    assert len(lines) == 1 and lines[0].startswith("gpumesh: error: a worker process ended abruptly"), err
    assert "SIGKILL" in lines[0]
    assert ("run it again with --resume" in lines[0] if not part else
            "run it again with the same --part 0/1 (Python: part=(0, 1))" in lines[0]), lines[0]
    assert not (dest / "info").exists()
    if part:   # the part run again finishes its tasks; the --resume below only writes the output
        r = subprocess.run(cli_command() + args[:2] + [str(dest)] + args[2:] + part, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0 and "tasks have finished; every task has" in r.stdout, r.stderr

    r = subprocess.run(cli_command() + args[:2] + [str(dest)] + args[2:] + ["--resume"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    ref = tmp_path / "ref"
    r = subprocess.run(cli_command() + args[:2] + [str(ref)] + args[2:] + ["--workers", "1"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert tree_files(dest) == tree_files(ref) != {}


def test_the_cli_counts_its_workers_cpu_time(crop, tmp_path):
    """``time gpumesh mesh ...`` (a parent's ``wait4``) reports the workers' CPU time too.

    The workers are children of the worker server, not of the CLI; the CLI waits for the
    server when the job ends (``workerserver.stop_server``), so their CPU time reaches it.  A
    2-worker run then costs more CPU than a 1-worker run of the same job (the server's imports
    and each worker's kernel loading come on top); counting the CLI alone, it costs less,
    since the CLI then meshes nothing itself.
    """
    src = tmp_path / "src.zarr"
    write_zarr(src, crop[:64, :64, :64])

    def cpu_seconds(workers: int) -> float:
        proc = subprocess.Popen(cli_command() + ["mesh", str(src), str(tmp_path / f"w{workers}"), "--voxel-size",
                                                 "32,32,40", "--chunk-size", "16", "--quiet", "--workers",
                                                 str(workers)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        assert proc.returncode == 0, proc.stderr.read()
        proc.stderr.close()
        return usage.ru_utime + usage.ru_stime

    one, two = cpu_seconds(1), cpu_seconds(2)
    assert two > one, f"2 workers: {two:.2f} CPU s counted, 1 worker: {one:.2f}"


def test_stopping_a_server_that_is_gone_raises_nothing(monkeypatch):
    """The CLI stops the server after every job, a failed one too: that must never raise."""
    from multiprocessing import forkserver

    from gpumesh import workerserver

    def gone():
        raise ChildProcessError(10, "No child processes")

    import threading

    workerserver.start_server()
    monkeypatch.setattr(forkserver._forkserver, "_stop", gone)
    raised = []   # what the waiting thread raised (Python prints it as a traceback)
    monkeypatch.setattr(threading, "excepthook", raised.append)
    workerserver.stop_server()
    assert workerserver._server_env is None
    assert raised == []


SCRIPT = """
import numpy as np
from gpumesh import MeshOptions, run_mesh

print("top level ran")
labels = np.zeros((48, 40, 36), np.uint32)
labels[3:40, 4:30, 2:30] = 5
labels[20:44, 10:20, 5:25] = 7
summary = run_mesh(labels, {dest!r}, workers=2, options=MeshOptions(chunk_size=16))   # 3 LODs: 9 tasks
print("workers", summary.workers, "segments", summary.segments, "file", __file__)
"""


@pytest.mark.parametrize("how", ["file", "stdin"])
def test_a_script_without_a_main_guard_runs_the_job_once(tmp_path, how):
    """The workers do not import the caller's script (workerserver.without_main_script), so a
    script without ``if __name__ == "__main__":``, or piped to ``python -``, runs its top
    level once and its job on 2 workers (before, each worker ran it again and failed)."""
    code = SCRIPT.format(dest=str(tmp_path / "out"))
    if how == "file":
        script = tmp_path / "job.py"
        script.write_text(code)
        r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
        where = str(script)
    else:
        r = subprocess.run([sys.executable, "-"], input=code, capture_output=True, text=True, timeout=300,
                           cwd=tmp_path)
        where = "<stdin>"
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("top level ran") == 1, r.stdout
    assert f"workers 2 segments 2 file {where}" in r.stdout      # __main__ as it was, after the job


def test_the_workers_get_no_main_module_and_the_caller_keeps_its_own(monkeypatch):
    """What a new worker is told to import first (multiprocessing's preparation data, as the
    spawn and forkserver contexts send it) names no ``__main__``, neither by its module name
    (``python -m job``) nor by its file; after the block the caller's ``__main__`` is as it was."""
    import importlib.machinery
    import types
    from multiprocessing import spawn

    from gpumesh import workerserver

    main = types.ModuleType("__main__")
    main.__file__ = "/somewhere/job.py"
    main.__spec__ = importlib.machinery.ModuleSpec("job", None)
    monkeypatch.setitem(sys.modules, "__main__", main)
    before = spawn.get_preparation_data("probe")
    assert before["init_main_from_name"] == "job"
    with workerserver.without_main_script():
        data = spawn.get_preparation_data("probe")
        assert "init_main_from_name" not in data and "init_main_from_path" not in data
    assert main.__spec__.name == "job" and main.__file__ == "/somewhere/job.py"


def test_the_socket_folder_goes_under_tmp_and_the_temporary_directory_stays(tmp_path, monkeypatch):
    """Where the temporary directory is too long for the server's socket, the socket's folder
    is chosen under a short one, and the temporary directory that the rest of the job (and
    the caller) uses is left as it was (the folder is chosen in this process, no server
    started)."""
    import tempfile
    from multiprocessing import util

    from gpumesh import workerserver

    deep = tmp_path / ("scratch-" + "j" * 80)
    deep.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    chosen = []
    monkeypatch.setattr(util, "get_temp_dir", lambda: chosen.append(tempfile.gettempdir()))
    workerserver._socket_dir_fits()
    assert len(chosen) == 1 and chosen[0] in ("/tmp", "/var/tmp", "/usr/tmp")
    assert tempfile.gettempdir() == str(deep)


def test_a_long_tmpdir_still_starts_the_worker_server(tmp_path):
    """Below Python 3.13 the worker server's socket lies in a folder under ``TMPDIR``, and a
    ``TMPDIR`` longer than ~75 bytes (a batch system's per-job scratch folder) made every job
    on 2 workers fail with ``OSError: AF_UNIX path too long``; its socket now goes under /tmp
    then, and the job runs on 2 forked workers."""
    from gpumesh import workerserver

    deep = tmp_path / ("scratch-" + "j" * 40) / ("task-" + "t" * 40)
    deep.mkdir(parents=True)
    assert len(str(deep)) + 32 > workerserver.SOCKET_PATH_MAX
    code = SCRIPT.format(dest=str(tmp_path / "out")) + (
        "from gpumesh import workerserver\n"
        "print('method', workerserver.context().get_start_method())\n")
    r = subprocess.run([sys.executable, "-"], input=code, capture_output=True, text=True, timeout=300,
                       cwd=tmp_path, env={**os.environ, "TMPDIR": str(deep)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "workers 2 segments 2" in r.stdout and "method forkserver" in r.stdout, r.stdout
    assert not any(deep.iterdir())   # nothing left where the folder would have been


@pytest.mark.parametrize("spill", [True, False], ids=["spill", "headers"])
@pytest.mark.parametrize("fmt,shard_bits", [("multires", None), ("legacy", None), ("multires", 0), ("multires", 2)],
                         ids=["unsharded", "legacy", "1-shard", "4-shards"])
def test_two_workers_write_in_waves_the_bytes_of_one(crop, tmp_path, monkeypatch, fmt, shard_bits, spill):
    """Past the assembly's index cap the workers write the output wave by wave (a wave per
    shard, or per few segments), and the main process keeps none of the headers the workers
    returned: the bytes of one worker holding the whole index.  Each wave takes its entries
    from the temporary file they were written to (:class:`IndexSpill`), or, without one
    (``INDEX_SPILL`` off), reads every header again."""
    from gpumesh import writer
    from gpumesh.pipeline import MeshOptions, run_mesh
    from gpumesh.sharding import ShardingOptions

    sub = crop[:64, :64, :64]
    sharding = None if shard_bits is None else ShardingOptions(shard_bits=shard_bits)
    options = MeshOptions(chunk_size=16, max_lods=1 if fmt == "legacy" else 3, sharding=sharding, format=fmt)
    kw = dict(options=options, voxel_size=(32.0, 32.0, 40.0))
    one = run_mesh(sub, str(tmp_path / "one"), workers=1, **kw)
    waves, reads = [], []
    real, real_values = writer._wave_rows, writer.TaskResults._values

    def spy(results, index, labels, stats):
        waves.append(isinstance(index, writer.IndexSpill) if spill else index is None)
        return real(results, index, labels, stats)

    def count(self, pending):
        for b, blob in real_values(self, pending):
            reads.append(b)
            yield b, blob

    sent = []
    real_part = writer.WorkerReads.part

    def part(self, rows):
        keys, local, whole = real_part(self, rows)
        sent.append((keys, [self.keys[b] for b in rows["block"]], len(np.unique(rows["block"])), local, rows, whole))
        return keys, local, whole

    monkeypatch.setattr(writer, "_wave_rows", spy)
    monkeypatch.setattr(writer.TaskResults, "_values", count)
    monkeypatch.setattr(writer.WorkerReads, "part", part)
    monkeypatch.setattr(writer, "ASSEMBLY_INDEX_BYTES", 50 * writer.INDEX_DTYPE.itemsize)
    monkeypatch.setattr(writer, "INDEX_SPILL", spill)
    written = []
    two = run_mesh(sub, str(tmp_path / "two"), workers=2, write_progress=lambda d, t: written.append((d, t)), **kw)
    assert two.workers == 2 and two.segments == one.segments > 0 and two.index_waves == len(waves)
    assert two.index_spilled == spill
    assert written[0] == (0, two.segments) and written[-1] == (two.segments, two.segments)
    assert tree_files(tmp_path / "one") == tree_files(tmp_path / "two") != {}
    assert all(waves) and len(waves) == (1 if shard_bits == 0 else len(waves)) and (shard_bits == 0 or len(waves) > 1)
    # this process read the headers the workers returned past the cap: one read each at first
    # (the result's key gives its size); and, without the spill, every header again in each
    # wave, in one read
    # each writing task was sent the keys of the results its rows use, not every key
    assert sent and any(len(keys) < two.tasks for keys, *_ in sent)
    for keys, row_keys, used, local, rows, whole in sent:
        assert len(keys) == used and [keys[b] for b in local["block"]] == row_keys
        assert np.array_equal(local[["label", "lod", "offset", "size"]], rows[["label", "lod", "offset", "size"]])
        assert set(whole.tolist()) <= set(range(len(keys)))
    per_task = collections.Counter(reads)
    if spill:   # once at most: none again (those this process held are not read at all)
        assert set(per_task) < set(range(two.tasks)) and set(per_task.values()) == {1}
    else:
        assert set(per_task) == set(range(two.tasks))
        assert len(waves) + 1 in set(per_task.values()) <= {len(waves), len(waves) + 1}


def test_shard_tasks_wait_in_a_window(crop, tmp_path, monkeypatch):
    """The workers' shard tasks are submitted a few per worker ahead (each holds a copy of its
    shard's entries), not all at once; the bytes stay those of one process."""
    from gpumesh import pipeline, writer
    from gpumesh.pipeline import MeshOptions, run_mesh
    from gpumesh.sharding import ShardingOptions

    monkeypatch.setattr(writer, "SHARDS_AHEAD", 1)
    waiting, most = set(), [0]
    real_submit = ProcessPoolExecutor.submit

    def submit(self, fn, *args, **kwargs):
        fut = real_submit(self, fn, *args, **kwargs)
        if fn is pipeline._run_shard_task:
            waiting.add(fut)
            most[0] = max(most[0], len(waiting))
            real_result = fut.result

            def result(timeout=None):
                waiting.discard(fut)
                return real_result(timeout)

            fut.result = result
        return fut

    monkeypatch.setattr(ProcessPoolExecutor, "submit", submit)
    sub = crop[:64, :64, :64]
    kw = dict(options=MeshOptions(chunk_size=16, sharding=ShardingOptions(shard_bits=3)), voxel_size=(32.0, 32.0, 40.0))
    run_mesh(sub, str(tmp_path / "one"), workers=1, **kw)
    run_mesh(sub, str(tmp_path / "two"), workers=2, **kw)
    assert most[0] == 2 and not waiting   # SHARDS_AHEAD per worker, every one taken
    assert tree_files(tmp_path / "one") == tree_files(tmp_path / "two") != {}
    assert len([n for n in tree_files(tmp_path / "two") if n.endswith(".shard")]) == 8


def test_stop_signals_are_held_while_the_pool_starts_its_workers():
    """A SIGINT or SIGTERM that comes while the pool forks its workers is delivered once they
    are started: a worker forked but not yet registered with the pool could not be stopped,
    and waiting for the workers' server then hung the CLI (about one time in three when the
    signal came as the first worker appeared)."""
    from gpumesh import pipeline

    got = []

    def handler(num, frame):
        got.append(num)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        with pipeline._signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)   # a handler would have run by now
            assert got == []
        assert got == [signal.SIGTERM] and signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, old)


def test_an_ignored_signal_is_not_held_while_the_pool_starts_and_hides_no_later_one():
    """A signal the process ignores (SIGHUP under ``nohup``, SIGINT in a background job) stays
    ignored while the pool starts its workers: held, it was caught as the first signal, and the
    SIGTERM that came after it was then dropped (only the first held signal is delivered)."""
    from gpumesh import pipeline

    got = []

    def handler(num, frame):
        got.append(num)

    old = {sig: signal.getsignal(sig) for sig in (signal.SIGHUP, signal.SIGTERM)}
    try:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, handler)
        with pipeline._signals_deferred():
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGHUP)   # the terminal closes: nohup's job goes on
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            assert got == []
        assert got == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN and signal.getsignal(signal.SIGTERM) is handler
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def test_a_stop_signal_held_while_the_pool_starts_ends_a_process_that_left_it_to_the_default():
    """Held while the pool starts its workers, a signal is then taken as the process would have
    taken it: where SIGTERM has its default action (a script calling run_mesh), it ends the process."""
    code = ("import os, signal, time\n"
            "from gpumesh import pipeline\n"
            "with pipeline._signals_deferred():\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(0.05)\n"
            "    print('held', flush=True)\n"
            "print('not ended', flush=True)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGTERM and r.stdout == "held\n", (r.returncode, r.stdout, r.stderr)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["sigterm", "sighup"])
def test_a_second_sigterm_is_left_to_the_default_action(sig):
    """The CLI takes a first SIGTERM (or SIGHUP) as Ctrl-C (workers stopped, one line, status
    143 or 129) and the next SIGTERM with the default action: a job that does not stop on the
    first ends on the second (a second SIGHUP is ignored)."""
    from gpumesh import cli

    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        # a test run under nohup ignores SIGHUP, which the CLI then leaves ignored
        signal.signal(sig, signal.SIG_DFL)
        assert cli._stop_on_signals()[sig] == signal.SIG_DFL
        with pytest.raises(KeyboardInterrupt) as caught:
            os.kill(os.getpid(), sig)
            time.sleep(5)   # the handler raises at once
        assert caught.value.signum == sig
        # a second SIGHUP is ignored (test_a_closed_terminals_second_sighup_does_not_end_the_job)
        assert signal.getsignal(sig) == (signal.SIG_IGN if sig == signal.SIGHUP else signal.SIG_DFL)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def test_a_closed_terminals_second_sighup_does_not_end_the_job():
    """A terminal that closes sends the foreground job SIGHUP twice (the shell passes its own on
    to its jobs, and the kernel sends one when the shell, the session leader, exits).  The first
    stops the job as SIGTERM does; the second, when it came after the handler had run, ended
    the process with the default action before the workers were stopped and the line written
    (status -SIGHUP, the resource tracker's leaked-semaphore warning): 2 of 5 terminals closed
    on a running job.  A second SIGTERM still ends it at once."""
    code = ("import os, signal, sys, time\n"
            "from gpumesh import cli\n"
            "cli._stop_on_signals()\n"
            "try:\n"
            "    os.kill(os.getpid(), signal.SIGHUP)\n"
            "    time.sleep(5)\n"
            "except KeyboardInterrupt as exc:\n"
            "    print('stopping', exc.signum, flush=True)\n"
            "os.kill(os.getpid(), signal.SIGHUP)   # the second, while the job stops\n"
            "time.sleep(0.05)\n"
            "print('stopped', flush=True)\n"
            "sys.exit(129)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       preexec_fn=_default_stop_signals)
    assert r.returncode == 129 and r.stdout == f"stopping {int(signal.SIGHUP)}\nstopped\n", (r.returncode, r.stdout,
                                                                                              r.stderr)


def test_a_job_of_one_task_runs_in_this_process_however_many_workers_are_asked_for(tmp_path, monkeypatch):
    """No more workers than tasks: a volume of one block (one LOD, so one task) is meshed in
    this process, and the summary says one worker; no worker server is started for it (an
    idle process importing gpumesh). A job with more tasks starts one."""
    from gpumesh import workerserver
    from gpumesh.pipeline import MeshOptions, run_mesh

    starts = []
    real_start = workerserver.start_server
    monkeypatch.setattr(workerserver, "start_server", lambda: starts.append(1) or real_start())
    labels = np.zeros((8, 8, 8), np.uint16)
    labels[2:5, 2:6, 3:5] = 7
    summary = run_mesh(labels, str(tmp_path / "out"), options=MeshOptions(), voxel_size=(1, 1, 1), workers=4)
    assert (summary.tasks, summary.workers, summary.segments) == (1, 1, 1)
    assert starts == []
    labels = np.zeros((40, 8, 8), np.uint16)
    labels[2:5, 2:6, 3:5], labels[30:33, 2:6, 3:5] = 7, 8
    summary = run_mesh(labels, str(tmp_path / "two"), options=MeshOptions(chunk_size=16, max_lods=1),
                       voxel_size=(1, 1, 1), workers=2)
    assert summary.tasks > 1 and (summary.workers, summary.segments) == (2, 2)
    assert starts   # (context() asks again: start_server is idempotent)


def test_a_server_that_forked_no_worker_is_ended_not_waited_for(monkeypatch):
    """The CLI starts the worker server before it knows the job; a small job then runs in its
    own process, and the server, perhaps still importing gpumesh, is ended at once instead of
    waited for.  A server that workers were forked from is waited for (their CPU time)."""
    from multiprocessing import forkserver

    from gpumesh import workerserver

    workerserver.stop_server()   # one started by an earlier test, perhaps used
    real_kill, killed = os.kill, []
    monkeypatch.setattr(workerserver.os, "kill", lambda pid, sig: killed.append((pid, sig)) or real_kill(pid, sig))
    workerserver.start_server()
    pid = forkserver._forkserver._forkserver_pid
    workerserver.stop_server()
    assert killed == [(pid, signal.SIGTERM)]
    killed.clear()
    workerserver.context()   # a pool's context: workers forked from the server
    workerserver.stop_server()
    assert killed == []


def test_a_small_job_runs_in_its_own_process(tmp_path, monkeypatch):
    """Without ``workers``, a volume of fewer than SMALL_JOB_VOXELS voxels is meshed in this
    process: each worker loads its kernels before its first task, and such a job is done as
    soon (a 128^3 cutout: 1.17 s against 1.92 s on two workers).  Given ``workers``, that many."""
    from gpumesh import pipeline, resources

    # two cores, and too little memory for them: no notice of fewer workers for a small job
    monkeypatch.setattr(resources, "default_workers", lambda *a, **k: (2, "2 worker(s) for 3 cores"))
    labels = np.zeros((40, 40, 40), np.uint32)
    labels[5:30, 5:30, 5:30] = 7
    opts = pipeline.MeshOptions(chunk_size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", resources.FewerWorkersNotice)
        small = pipeline.run_mesh(labels, str(tmp_path / "a"), options=opts, voxel_size=(1, 1, 1))
    assert small.workers == 1 and small.tasks > 1
    given = pipeline.run_mesh(labels, str(tmp_path / "b"), options=opts, voxel_size=(1, 1, 1), workers=2)
    assert given.workers == 2
    monkeypatch.setattr(pipeline, "SMALL_JOB_VOXELS", 40 ** 3)
    with pytest.warns(resources.FewerWorkersNotice):
        large = pipeline.run_mesh(labels, str(tmp_path / "c"), options=opts, voxel_size=(1, 1, 1))
    assert large.workers == 2
    assert tree_files(tmp_path / "a") == tree_files(tmp_path / "b") == tree_files(tmp_path / "c")


@pytest.mark.parametrize("exc, status", [("sighup", 129), ("ctrl-c", 130)])
def test_a_stop_line_that_cannot_be_written_keeps_the_status(monkeypatch, exc, status):
    """After SIGHUP stderr is often the closed terminal, whose write fails (EIO): the command
    still ends with 128 + the signal, not 1 (the traceback's) or 120 (a failed last flush)."""
    import errno

    from gpumesh import cli

    class Closed:
        def write(self, text):
            raise OSError(errno.EIO, "Input/output error")

        def flush(self):
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(sys, "stderr", Closed())
    monkeypatch.setattr(sys, "stdout", sys.stdout)   # put back after the test, as stderr
    stop = cli._Terminated(signal.SIGHUP) if exc == "sighup" else KeyboardInterrupt()
    with pytest.raises(SystemExit) as ended:
        cli._stopped(stop, "the finished tasks are kept")
    assert ended.value.code == status
    assert not isinstance(sys.stderr, Closed)   # the streams now lead nowhere
    sys.stderr.write("dropped\n")
    sys.stderr.flush()
