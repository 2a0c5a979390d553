"""How the main job's worker processes are started: forked from a server that has gpumesh loaded.

A worker process of the main job (:func:`gpumesh.pipeline.run_mesh`) used to be *spawned*: a
fresh interpreter that imports NumPy, numba, TensorStore and gpumesh (about 0.7 s on the 2-core
VM of ``docs/STATUS.md``) before it can load its kernels and take a task, every worker the
same work.  Here the workers are forked by multiprocessing's *forkserver*: one server process,
started once per Python process, imports gpumesh's worker modules (:data:`PRELOAD`), and every
worker is a fork of it that starts with them already imported.  :func:`start_server` can be
called early (the CLI calls it before it imports gpumesh's modules itself), so that the
server's imports overlap the main process's own start-up instead of following it.

What stays as it was, and why forking is safe here:

* The server only imports modules.  It never opens a TensorStore, runs a numba kernel or
  touches CUDA, so it has no threads of ours when it forks (NumPy's OpenBLAS pool handles
  ``fork`` itself).  Each worker opens its volume, its kvstore and, on the GPU backend, its
  CUDA context after the fork, in :func:`gpumesh.pipeline._init_worker`, exactly as a spawned
  worker did, and loads its numba kernels there (:mod:`gpumesh.warmup`).
* A forked worker has the environment of the server, i.e. of the moment the server started.
  When the environment has changed since (a test that sets ``GPUMESH_WELD``, a notebook that
  sets ``NUMBA_CACHE_DIR``), :func:`context` gives spawned workers instead, which see the
  environment as it is now.
* The workers do not import the caller's main script (:func:`without_main_script`): their
  tasks are gpumesh's own functions, and their arguments (the source, the options) are of
  gpumesh's, NumPy's and TensorStore's types.  So a script that starts the main job needs no
  ``if __name__ == "__main__":`` guard, and neither does ``python - <<EOF``.  Before, each
  worker ran the script again, which failed in a child without the guard ("an attempt has
  been made to start a new process before the current process has finished its
  bootstrapping phase") and left the main process with a ``BrokenPipeError``.
* Where there is no forkserver (Windows) the workers are spawned.

Nothing here changes a result: the workers run the same tasks on the same arguments.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import threading
from typing import Iterator, Optional

#: Modules the server imports before forking workers: everything a worker's tasks use.
PRELOAD = ("gpumesh.pipeline", "gpumesh.warmup")

#: Variables that change while a process runs without bearing on a worker (pytest sets this
#: one for every test); they are left out when the environment is compared.
VOLATILE_ENV = ("PYTEST_CURRENT_TEST",)

#: Seconds :func:`stop_server` waits for the server to end before it leaves it to end with the
#: process.
STOP_SERVER_TIMEOUT_S = 10.0

#: The environment when this process started the server; ``None`` until then.
_server_env: Optional[dict] = None

#: Whether :func:`context` has given the server's context since it started (workers may have
#: been forked from it).
_used = False

#: Longest path of a Unix socket, NUL excluded (``sun_path`` holds 108 bytes on Linux, 104 on
#: the BSDs and macOS).
SOCKET_PATH_MAX = 107 if sys.platform.startswith("linux") else 103

#: Bytes multiprocessing adds to the temporary directory for the server's socket:
#: ``/pymp-XXXXXXXX/listener-XXXXXXXX``.
_SOCKET_SUFFIX_LEN = len("/pymp-12345678/listener-12345678")


def _socket_dir_fits() -> None:
    """Make multiprocessing put the server's socket where its path fits a Unix socket.

    The server listens on a socket in a ``pymp-*`` folder under the temporary directory
    (``TMPDIR``); below Python 3.13, a ``TMPDIR`` longer than about 75 bytes (a batch system's
    per-job scratch folder) made starting it fail with ``OSError: AF_UNIX path too long``.
    Where the socket's path would not fit, that folder is made in the first of ``/tmp``,
    ``/var/tmp`` and ``/usr/tmp`` that can be written, as Python 3.13 does; the folder is still
    removed when this process exits.  Nothing changes where multiprocessing already chose its
    folder, or where the path fits.
    """
    import tempfile
    from multiprocessing import util

    base = tempfile.gettempdir()
    if len(os.fsencode(base)) + _SOCKET_SUFFIX_LEN <= SOCKET_PATH_MAX:
        return
    for short in ("/tmp", "/var/tmp", "/usr/tmp"):
        if os.path.isdir(short) and os.access(short, os.W_OK | os.X_OK):
            break
    else:
        return   # nowhere shorter: leave multiprocessing's own error
    saved = tempfile.tempdir
    tempfile.tempdir = short
    try:
        util.get_temp_dir()   # chooses and keeps the folder (removed at exit) on its first call
    finally:
        tempfile.tempdir = saved


def _environment() -> dict:
    return {k: v for k, v in os.environ.items() if k not in VOLATILE_ENV}


@contextlib.contextmanager
def _hangup_ignored() -> Iterator[None]:
    """Ignore SIGHUP in the processes started in this block (the server, and multiprocessing's
    resource tracker, which the server's start starts too): a closed terminal sends SIGHUP to
    the job's whole process group, and the CLI stops the job on it (``gpumesh.cli``); a tracker
    killed by it left the pool's semaphores behind, with a warning and a traceback per
    semaphore.  The ignored disposition survives their ``exec``; this process's own handler
    is put back at once.  Outside the main thread (no handler can be set), a no-op."""
    sig = getattr(signal, "SIGHUP", None)
    if sig is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(sig, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(sig, previous if previous is not None else signal.SIG_DFL)


def start_server() -> bool:
    """Start the worker server (multiprocessing's forkserver), if not yet started.

    It starts in the background and returns at once; the server imports :data:`PRELOAD` while
    the caller goes on.

    Returns
    -------
    bool
        Whether workers can be forked from it (``False`` where the platform has no forkserver).
    """
    global _server_env
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return False
    if _server_env is None:
        from multiprocessing import forkserver

        # Only takes effect when this call starts the server (not when some other code of this
        # process already started one): then the workers import gpumesh themselves, as before.
        forkserver.set_forkserver_preload(list(PRELOAD))
        _socket_dir_fits()
        with _hangup_ignored():
            forkserver.ensure_running()   # and multiprocessing's resource tracker, if not yet running
        _server_env = _environment()
    return True


def stop_server() -> None:
    """Stop the worker server that :func:`start_server` started, and wait for it to exit.

    The server waits for each worker it forked, so the workers' CPU time is added to the
    server's children's; waiting for the server adds it to this process's children's in turn,
    which is what ``time gpumesh mesh ...``, a benchmark's ``wait4`` and
    ``resource.getrusage(RUSAGE_CHILDREN)`` report.  A server left running ends by itself when
    this process exits, but no process waits for it then, and the workers' CPU time is lost to
    such accounting.  The CLI calls this when the main job ends; a later :func:`start_server`
    starts a new server.  A server that forked no worker (:func:`context` never gave it: a
    small job ran in this process) is ended at once rather than waited for: it may still be
    importing gpumesh.

    Uses the standard library's private ``ForkServer._stop`` (CPython 3.8 and later); where it
    is missing, the server is left to end with the process.  Never raises: it runs after the
    job, also after a failed one, whose error must not be hidden.
    """
    global _server_env, _used
    if _server_env is None:
        return
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    pid = getattr(server, "_forkserver_pid", None)
    if not _used and pid is not None:
        # no worker was forked from it (a small job ran in this process): it may still be
        # importing gpumesh, which this process would otherwise wait for
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    _used = False
    stop = getattr(server, "_stop", None)
    if stop is not None:
        def run():
            try:
                stop()
            except OSError:   # the server is gone already (killed, say): nothing left to wait for
                pass

        # bounded: a worker left behind by an interrupted start would keep the server (and so
        # this wait) alive until this process ends, when that worker ends too (it watches it)
        waiter = threading.Thread(target=run, name="gpumesh-stop-server", daemon=True)
        waiter.start()
        waiter.join(STOP_SERVER_TIMEOUT_S)
        _server_env = None


def context():
    """The multiprocessing context for the main job's worker pool.

    Returns
    -------
    multiprocessing.context.BaseContext
        The forkserver context when :func:`start_server` can start (or has started) the server
        and the environment is the one it started with (but for :data:`VOLATILE_ENV`); the
        spawn context otherwise.
    """
    global _used
    if start_server() and _server_env == _environment():
        _used = True
        return multiprocessing.get_context("forkserver")
    return multiprocessing.get_context("spawn")


@contextlib.contextmanager
def without_main_script() -> Iterator[None]:
    """Start worker processes in this block without the caller's main script.

    multiprocessing's spawn and forkserver workers import the parent's ``__main__`` (by its
    ``__spec__`` name or its ``__file__``) before they run anything, so that functions defined
    there can be unpickled.  The main job's workers need none of it, and importing it runs a
    script's top level again in every worker.  Here the parent's ``__main__`` shows neither
    while the pool may start processes (a pool starts them in ``submit``, as tasks come), and
    both are put back after.
    """
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__dict__["__spec__"] = None
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)
