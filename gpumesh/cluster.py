"""Run the main job's tasks on a Dask cluster: ``run_mesh(..., client=...)`` and
``gpumesh mesh --scheduler ADDRESS``.

The job's tasks are the same functions the local pool runs (:func:`gpumesh.pipeline._run_task`
for the meshing, the writer's shard and segment tasks for the output): each reads its block
from the source and writes its result into the destination's scratch area, so the source and
the destination must be locations that every worker can reach (``gs://``, ``s3://``, a shared
file system), never ``memory://``.  The main process plans the job, follows the tasks and
joins what the workers wrote, as with the local pool; ``resume`` works the same.

Each worker process opens the source, the destination and its backend once per job, on the
first task of the job it runs (:func:`gpumesh.pipeline.set_up_worker`); the job's arguments
travel to the workers once, as one task's result that the scheduler computes again if the
workers holding it are lost (a NumPy source is scattered to every worker instead, which
cannot be: losing all of them fails the job).  A relative source path is made absolute
first (workers may run in another directory).  A worker process holds the state of one job
at a time, so a cluster should run one gpumesh job at a time; when the job ends, each worker
lets go of it (:func:`gpumesh.pipeline.end_worker_job`: its source and read cache, the task
results it held, its backend's device memory and pool limit).  Start the workers with one
thread each (``dask worker --nthreads 1``, ``LocalCluster(threads_per_worker=1)``) and as many
processes as cores: the tasks are CPU-bound Python and hold the GIL in parts.  On GPU nodes
a worker uses the first GPU it sees and takes its share of that device's free memory, shared
among the workers of its host that see the same first GPU (``CUDA_VISIBLE_DEVICES``): with
dask-cuda (``LocalCUDACluster``, ``dask cuda worker``), one worker per GPU, each has a GPU of
its own.  As in the local pool, only as many of a GPU's workers use it as
:func:`gpumesh.gpu.device_processes` allows for its free memory (measured by the group's first
worker before the job); the others mesh on the CPU backend, which writes the same bytes.
A worker takes the local pool's memory settings while it runs a job
(:func:`gpumesh.pipeline._keep_freed_memory`: glibc keeps freed heap instead of returning it,
NumPy asks for no transparent huge pages): without them the workers spent 15-20 % more CPU
time on the real volume (page faults).  When the job ends they are undone
(:func:`gpumesh.pipeline._restore_memory`: glibc's parameters as the environment set them,
``MALLOC_TRIM_THRESHOLD_`` of Dask's nanny included, and the heap's free memory handed back),
so that the worker's resident memory does not stay at the job's peak, which Dask reports as
unmanaged memory.  The local pool's one arena for all threads (``M_ARENA_MAX``), which glibc
cannot undo, is not set in a Dask worker.  Nor can glibc undo one thing more: setting any of
these parameters turns off its dynamic mmap and trim thresholds, which a worker started with
none of them in the environment had (under Dask's nanny, which sets ``MALLOC_TRIM_THRESHOLD_``,
they were off already).  ``_end_job`` runs in the worker's event loop and does not wait: a
worker that still runs tasks of this one (a job stopped twice leaves them running: Dask cannot
stop them) ends it as the last of them finishes; one that is setting up another job then, or
does not answer within :data:`ANSWER_TIMEOUT_S`, keeps the job's state until its next job.
"""

from __future__ import annotations

import collections
import threading
import uuid
from typing import Any, Optional

from . import pipeline, storage

_LOCK = threading.Lock()

#: Held only for a moment, never while waiting (so the event loop may take it): the tasks of
#: each job running in this process, from before their set-up (:func:`_run_in_job`), and the
#: jobs whose end was asked for while some still ran (:func:`_end_job`): the last to finish
#: ends the job.
_ACTIVE_LOCK = threading.Lock()
_ACTIVE: collections.Counter = collections.Counter()
_ENDING: set = set()


def _host(address: str) -> str:
    """``"10.0.0.5"`` from a Dask worker address such as ``"tcp://10.0.0.5:40123"``."""
    return address.split("://")[-1].rsplit(":", 1)[0]


def _first_visible_gpu() -> str:
    """The first entry of this process's ``CUDA_VISIBLE_DEVICES`` ("" when unset)."""
    import os

    return os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()


def gpu_groups(workers: dict) -> dict:
    """The workers that share each worker's GPU: ``{address: (rank, count)}`` from ``{address:
    first visible GPU}``, a group being the workers of one host that see the same first GPU and
    ``rank`` a worker's place in its group (by address)."""
    groups = collections.defaultdict(list)
    for a, g in workers.items():
        groups[(_host(a), g)].append(a)
    out = {}
    for members in groups.values():
        for rank, a in enumerate(sorted(members)):
            out[a] = (rank, len(members))
    return out


def _free_device_memory() -> Optional[int]:
    """Free memory of this worker's GPU (bytes), or ``None`` when it has no usable one."""
    from .backend import gpu_available

    if not gpu_available():
        return None
    try:
        from .gpu import CupyRuntime

        return int(CupyRuntime().mem_info()[0])
    except ImportError:
        return None


def device_shares(client, seen: dict) -> dict:
    """For each worker of ``seen`` (``{address: first visible GPU}``): ``(rank, count,
    device_workers)``, where the first ``device_workers`` of a group of ``count`` use its GPU
    (:func:`gpumesh.gpu.device_processes` of the free memory its first worker measures)."""
    from .gpu import device_processes

    groups = gpu_groups(seen)
    leaders = [a for a, (rank, count) in groups.items() if rank == 0 and count > 1]
    free = _run_on_workers(client, _free_device_memory, workers=leaders) if leaders else {}
    fits = {(_host(a), seen[a]): free.get(a) for a in leaders}
    out = {}
    for a, (rank, count) in groups.items():
        f = fits.get((_host(a), seen[a]))
        out[a] = (rank, count, count if f is None else device_processes(f, count))
    return out


def _share(address: str, shares: dict, seen: dict) -> tuple:
    """``(rank, count, device_workers)`` of the worker at ``address`` (see :func:`device_shares`).

    A worker that was not there when the job started (one that its nanny restarted has a new
    address) takes no share of a GPU that a live worker of the job uses: it meshes on the CPU
    backend (the same bytes), rather than taking the whole device's memory beside the others.
    It takes the GPU when no live worker uses it (it replaced the one that did)."""
    if address in shares:
        return shares[address]
    host, gpu = _host(address), _first_visible_gpu()
    # the job's workers on that GPU that use it (rank < device_workers)
    taken = [a for a, g in seen.items() if _host(a) == host and g == gpu and shares[a][0] < shares[a][2]]
    if taken:   # of those, only the workers still there (a restarted one replaced a dead one)
        try:
            from distributed import get_client

            alive = set(get_client().nthreads())
            taken = [a for a in taken if a in alive]
        except Exception:   # the scheduler cannot say: take the GPU as used
            pass
    return (0, 1, 0 if taken else 1)


def _run_in_job(job_id: str, job: tuple, fn, *args):
    """Run task ``fn(*args)`` in a Dask worker, first setting up the job there if this worker
    process has not yet (see the module docstring).  A task that was still running when the job
    ended (cancelled: Dask cannot stop it) ends the job in this worker as it finishes, unless
    another task of the job still runs here (see :func:`_end_job`)."""
    with _ACTIVE_LOCK:
        _ACTIVE[job_id] += 1
    try:
        _set_up_job(job_id, job)
        return fn(*args)
    finally:
        with _ACTIVE_LOCK:
            _ACTIVE[job_id] -= 1
            ending = False
            if not _ACTIVE[job_id]:   # the last task of the job here
                del _ACTIVE[job_id]
                ending = job_id in _ENDING
                _ENDING.discard(job_id)
        if ending:   # a task's thread, not the event loop: it may wait for the lock
            with _LOCK:
                try:
                    _end_if_set_up(job_id)
                except Exception:   # (a backend that failed to close): not this task's error
                    pass


def _set_up_job(job_id: str, job: tuple) -> None:
    """Set up job ``job_id`` in this worker process unless it is already."""
    with _LOCK:
        if pipeline._WORKER.get("job") != job_id:
            source, open_kwargs, plan, options, dest_spec, device, shares, seen = job
            from distributed import get_worker

            # this worker's place among those that share its GPU, and how many of them use it
            rank, count, device_workers = _share(get_worker().address, shares, seen)
            pipeline._WORKER.clear()
            with _ACTIVE_LOCK:   # the ends asked of earlier jobs whose tasks are all gone are moot
                _ENDING.intersection_update(_ACTIVE)
            pipeline._keep_freed_memory(own_process=False)
            try:
                pipeline.set_up_worker(source, open_kwargs, plan, options, dest_spec, device, worker=rank,
                                       nworkers=count, device_workers=device_workers)
            except BaseException:   # (a source the workers cannot open): no job to end later, so now
                pipeline.end_worker_job()
                raise
            pipeline._WORKER["job"] = job_id


#: Seconds between the asks of :func:`_end_job` while Dask lists a task of the job as running
#: that is not in :func:`_run_in_job`, and how many times it asks again at most.
_END_AGAIN_S, _END_TRIES = 0.1, 100


def _end_job(job_id: str, prefix: str, dask_worker=None, tries: int = _END_TRIES) -> bool:
    """End job ``job_id`` in this Dask worker (:func:`gpumesh.pipeline.end_worker_job`) unless
    the worker has since set up another job or still runs a task of this one (``prefix``, as
    :func:`_running`; the last of them then ends it as it finishes).  Returns whether it did.

    It runs in the worker's event loop (``Client.run``), so it does not wait for the lock: a
    task that holds it sets up a job (this one's, whose task still runs, or the next one's),
    and may itself wait for that loop (``get_client`` in :func:`_share`).  Dask may list as
    running a task that is not in :func:`_run_in_job`: one about to begin (it will end the job
    as it finishes), or one that has just finished, which that loop has not heard of yet (no
    task is left to end the job): it asks again every :data:`_END_AGAIN_S` s, ``tries`` times
    at most, in that loop."""
    with _ACTIVE_LOCK:
        if _ACTIVE[job_id]:
            _ENDING.add(job_id)   # for the last of them
            return False
        if dask_worker is not None and _running(prefix, dask_worker):
            _ENDING.add(job_id)   # for a task about to begin
            if tries > 0:
                dask_worker.loop.call_later(_END_AGAIN_S, _end_job, job_id, prefix, dask_worker, tries - 1)
            return False
    if not _LOCK.acquire(blocking=False):
        return False
    try:
        return _end_if_set_up(job_id)
    finally:
        _LOCK.release()


def _end_if_set_up(job_id: str) -> bool:
    """End job ``job_id`` in this worker process if it is the job set up here; the caller
    holds ``_LOCK``.  Returns whether it did."""
    if pipeline._WORKER.get("job") != job_id:
        return False
    pipeline.end_worker_job()
    return True


def _running(prefix: str, dask_worker=None) -> int:
    """How many tasks whose key starts with ``prefix`` occupy a thread of this worker, those
    cancelled while they ran included (Dask cannot stop a running task)."""
    return sum(1 for ts in dask_worker.state.all_running_tasks
               if isinstance(ts.key, str) and ts.key.startswith(prefix))


class StillRunningNotice(UserWarning):
    """The job stopped while some of its tasks still ran on the cluster; it waits for them."""


class NoWorkersNotice(UserWarning):
    """The cluster has had no workers for :data:`NO_WORKERS_NOTICE_S`: the job waits for some."""


#: Seconds a job's cluster may have no worker before the job says that it waits for one.
NO_WORKERS_NOTICE_S = 30.0

#: Seconds the job waits for its workers to answer a call outside its tasks (``Client.run``):
#: which GPU each sees and its free memory, at the start; which of the job's tasks still run,
#: when a stopped job waits for them; the job's end in each worker (:func:`_end_job`).  Once it
#: is connected to them, ``Client.run`` waits for every worker without a limit, so one that
#: cannot answer (stopped, hung in C code holding the GIL, its host cut off) held the job
#: forever, after all its output was written.
ANSWER_TIMEOUT_S = 30.0


def _run_on_workers(client, fn, *args, **kwargs):
    """``client.run(fn, *args, **kwargs)``, which raises ``TimeoutError`` when not every worker
    has answered within :data:`ANSWER_TIMEOUT_S`."""
    return client.run(fn, *args, callback_timeout=ANSWER_TIMEOUT_S, **kwargs)


def check_destination(dest_spec: dict) -> None:
    """Raise ``ValueError`` when the workers of a cluster could not see ``dest_spec``
    (an in-memory kvstore lives in one process)."""
    if storage.in_memory(dest_spec):
        raise ValueError("a Dask cluster's workers cannot reach a memory:// destination; use a path on a "
                         "shared file system or a gs:// or s3:// URL")


class DaskExecutor:
    """The ``submit`` of :class:`concurrent.futures.Executor` onto a Dask client's workers,
    for one job.

    Parameters
    ----------
    client : distributed.Client
        Connected to the cluster's scheduler, with at least one worker.

    Raises
    ------
    ValueError
        The cluster has no workers.

    Notes
    -----
    :meth:`start` sends the job's arguments, before the first task.  A job that stops early
    (an error, Ctrl-C) cancels its tasks and, leaving the ``with`` block, waits for those that
    were already running, as the local pool does: Dask cannot stop them, and they would write
    their results into the destination after the job ended, into the next run's output even
    (a :class:`StillRunningNotice` says so; a second Ctrl-C leaves them).  When every worker
    is gone (killed for memory, their batch jobs ended), the job waits for new ones, as Dask
    does (its scheduler's ``distributed.scheduler.no-workers-timeout`` bounds the wait): after
    :data:`NO_WORKERS_NOTICE_S` a :class:`NoWorkersNotice` says so.  A worker that does not
    answer the job's calls outside its tasks within :data:`ANSWER_TIMEOUT_S` (stopped, hung)
    is not waited for: not for its running tasks when the job stopped (the other workers'
    still are), nor at the end, where it keeps the job's state.
    """

    def __init__(self, client):
        nthreads = client.nthreads()   # every worker (scheduler_info() lists 5 in some releases)
        if not nthreads:
            raise ValueError(f"the Dask cluster at {client.scheduler.address} has no workers")
        #: worker threads in the cluster: tasks that can run at once
        self.workers = sum(int(n) for n in nthreads.values())
        #: worker threads in the cluster now, as last seen (the job keeps TASKS_AHEAD tasks per
        #: thread submitted): at the start, then every second once the job has started
        self.threads = self.workers
        self._client = client
        self._id = uuid.uuid4().hex
        self._task_prefix = f"gpumesh-task-{self._id}-"   # this job's task keys (see _wait_for_running)
        self._job = None
        self._executor = None
        self._submitted = 0
        self._stop_watch = threading.Event()
        self._watch = None

    def start(self, job: tuple) -> None:
        """Send the job's arguments to the cluster.

        ``job`` is ``(source, open_kwargs, plan, options, dest_spec, device)``: what
        :func:`gpumesh.pipeline.set_up_worker` needs in each worker.  ``source`` must mean the
        same on every worker (an absolute path, a URL or a spec; see
        :func:`gpumesh.volume.portable_source`).

        Raises
        ------
        gpumesh.errors.WorkerFailedError
            With ``device`` other than ``"cpu"``: some worker did not say within
            :data:`ANSWER_TIMEOUT_S` which GPU it sees (stopped, hung).
        """
        import pickle

        import numpy as np

        client = self._client
        device = job[5]
        try:
            seen = _run_on_workers(client, _first_visible_gpu) if device != "cpu" else {}
            payload = tuple(job) + (device_shares(client, seen) if seen else {}, seen)
        except TimeoutError:
            from .errors import WorkerFailedError

            raise WorkerFailedError(f"the Dask cluster's workers did not all answer within {ANSWER_TIMEOUT_S:g} s "
                                    f"(a worker stopped or hung, or its host cut off): the job did not "
                                    f"start") from None
        if isinstance(job[0], np.ndarray):
            # a NumPy source travels to each worker once; such data cannot be recomputed when
            # every worker holding it is lost (the job then fails, and --resume continues)
            self._job = client.scatter([payload], broadcast=True, hash=False)[0]
        else:
            # a task the scheduler can run again when the workers that hold its result are lost
            # (pickled: Dask would look inside a tuple's dataclasses for tasks)
            self._job = client.submit(pickle.loads, pickle.dumps(payload), pure=False,
                                      key=f"gpumesh-job-{self._id}")
        self._executor = client.get_executor(pure=False)
        self._watch = threading.Thread(target=self._watch_workers, name="gpumesh-cluster-size", daemon=True)
        self._watch.start()

    def _watch_workers(self) -> None:
        """Keep :attr:`threads` up to date (workers join and leave), and say so (once per
        stretch) when the cluster has had no worker for :data:`NO_WORKERS_NOTICE_S`: the job's
        tasks wait for one, silently in Dask."""
        import time
        import warnings

        since, told = None, False   # when the cluster last lost its workers; whether that was said
        while not self._stop_watch.wait(min(1.0, NO_WORKERS_NOTICE_S / 4)):
            try:
                nthreads = self._client.nthreads()
            except Exception:   # the client closing, or the scheduler gone: the job says so
                return
            none = not nthreads
            if nthreads:   # none: the tasks in flight wait for workers, no more are needed
                self.threads = sum(int(n) for n in nthreads.values())
            if not none:
                since, told = None, False
            elif since is None:
                since = time.monotonic()
            elif not told and time.monotonic() - since >= NO_WORKERS_NOTICE_S:
                # explicit, with no registry: Python's default filter shows a warning once per
                # place, and each stretch without workers is to be said
                warnings.warn_explicit(
                    f"the Dask cluster has had no workers for {NO_WORKERS_NOTICE_S:g} s: the job waits for some to "
                    f"join (the scheduler's distributed.scheduler.no-workers-timeout bounds the wait; Ctrl-C stops "
                    f"it, and --resume continues)", NoWorkersNotice, __file__, 0, module=__name__, registry=None)
                told = True   # not again until workers have come back

    def submit(self, fn, *args):
        """Run ``fn(*args)`` on a worker; returns a :class:`concurrent.futures.Future`."""
        self._submitted += 1
        return self._executor.submit(_run_in_job, self._id, self._job, fn, *args,
                                     key=f"{self._task_prefix}{self._submitted}")

    def __enter__(self) -> "DaskExecutor":
        return self

    def __exit__(self, *exc: Any) -> Optional[bool]:
        self._stop_watch.set()
        if self._watch is not None:
            self._watch.join()
        try:
            if self._executor is not None:
                self._executor.shutdown(wait=exc[0] is None)
                if exc[0] is not None:
                    self._wait_for_running()
        finally:   # a second Ctrl-C during the wait too: the job's data is let go
            try:
                if self._job is not None:
                    self._client.cancel(self._job)
            except Exception:   # the client may be closing
                pass
            if self._job is not None:
                try:   # and the workers' state of the job (a worker that cannot answer keeps it)
                    _run_on_workers(self._client, _end_job, self._id, self._task_prefix, on_error="return")
                except Exception:   # the scheduler gone, the client closing, or a worker that did not answer
                    pass
            self._job = None
        return None

    def _wait_for_running(self) -> None:
        """Wait until no task of this job runs on any worker (those that cannot be reached
        any more, or do not answer within :data:`ANSWER_TIMEOUT_S`, are not waited for)."""
        import time
        import warnings

        told = False
        workers = None   # all of them, then those that answered
        while True:
            try:   # a worker that cannot answer runs nothing of ours any more
                counts = _run_on_workers(self._client, _running, self._task_prefix, on_error="return",
                                         workers=workers)
            except TimeoutError:   # one did not answer: the others' tasks are still waited for
                counts = self._running_on_each(workers)
                if not counts:
                    return
                workers = list(counts)
            except Exception:   # the scheduler gone: nothing to wait for
                return
            running = sum(n for n in counts.values() if isinstance(n, int))
            if not running:
                return
            if not told:
                warnings.warn(f"waiting for {running} task(s) still running on the Dask cluster to end (they would "
                              f"write into the destination after the job; Ctrl-C again leaves them)",
                              StillRunningNotice, stacklevel=3)
                told = True
            time.sleep(0.2)

    def _running_on_each(self, workers) -> dict:
        """``{address: _running(...)}`` of each of ``workers`` (default: all) that answers within
        :data:`ANSWER_TIMEOUT_S`, asked each alone and all at once (daemon threads: a Ctrl-C
        does not wait for them)."""
        try:
            workers = list(self._client.nthreads()) if workers is None else workers
        except Exception:   # the scheduler gone
            return {}
        out = {}

        def ask(address):
            try:
                out.update(_run_on_workers(self._client, _running, self._task_prefix, on_error="return",
                                           workers=[address]))
            except Exception:   # it did not answer
                pass

        threads = [threading.Thread(target=ask, args=(a,), daemon=True) for a in workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(ANSWER_TIMEOUT_S + 5)
        return dict(out)


def connect(address: str):
    """A ``distributed.Client`` for the scheduler at ``address`` (``tcp://host:8786``, or the path
    of a scheduler file as ``dask scheduler --scheduler-file`` and dask-jobqueue/dask-mpi write
    it), waiting for it (and for the file to appear) as long as Dask's
    ``distributed.comm.timeouts.connect`` says (30 s; environment variable
    ``DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT``).

    Raises
    ------
    ImportError
        ``distributed`` is not installed (the ``[dask]`` extra: ``pip install -e ".[dask]"`` in a gpumesh clone).
    OSError
        No scheduler answers at ``address``, or no scheduler file appeared there.
    ValueError
        ``address`` is not an address Dask knows, or the scheduler file holds none.
    """
    try:
        import dask
        from distributed import Client
    except ImportError as exc:   # pragma: no cover - dask is in the dev extra
        raise ImportError('--scheduler needs Dask: pip install -e ".[dask]" in a gpumesh clone') from exc
    import json
    import os
    import time

    if "://" not in address and (os.path.exists(address) or os.sep in address or address.endswith(".json")):
        timeout = dask.utils.parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"), "s")
        deadline = time.monotonic() + timeout
        while not os.path.isfile(address):
            if time.monotonic() > deadline:
                raise OSError(f"no scheduler file {address} (waited {timeout:g} s)")
            time.sleep(0.1)
        for attempt in range(20):   # its writer may not have finished it
            try:
                with open(address) as fh:
                    address = json.load(fh)["address"]
                break
            except (ValueError, KeyError, TypeError) as exc:
                if attempt == 19:
                    raise ValueError(f"{address} is not a Dask scheduler file (no JSON with an "
                                     f"'address'): {exc}") from None
                time.sleep(0.1)
    try:
        return Client(address)
    except (ValueError, TypeError) as exc:   # a malformed address (Dask's own message)
        raise ValueError(f"not a Dask scheduler address: {exc}") from None


__all__ = ["DaskExecutor", "NoWorkersNotice", "StillRunningNotice", "check_destination", "connect"]
