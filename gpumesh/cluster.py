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
travel to the workers once (``Client.scatter``).  A worker process keeps the state of the last
job it ran, so a cluster should run one gpumesh job at a time.  Start the workers with one
thread each (``dask worker --nthreads 1``, ``LocalCluster(threads_per_worker=1)``) and as many
processes as cores: the tasks are CPU-bound Python and hold the GIL in parts.  On GPU nodes
a worker uses the first GPU it sees and takes its share of that device's free memory, shared
among the workers of its host that see the same first GPU (``CUDA_VISIBLE_DEVICES``): with
dask-cuda (``LocalCUDACluster``, ``dask cuda worker``), one worker per GPU, each has a GPU of
its own.  As in the local pool, only as many of a GPU's workers use it as
:func:`gpumesh.gpu.device_processes` allows for its free memory (measured by the group's first
worker before the job); the others mesh on the CPU backend, which writes the same bytes.
A worker takes the local pool's memory settings when it sets up a job
(:func:`gpumesh.pipeline._keep_freed_memory`: glibc keeps freed heap instead of returning it,
NumPy asks for no transparent huge pages), for the rest of its life: without them the workers
spent 15-20 % more CPU time on the real volume (page faults), and their resident memory stays
at its peak, which Dask reports as unmanaged memory (the job's tasks keep no data in Dask).
"""

from __future__ import annotations

import collections
import threading
import uuid
from typing import Any, Optional

from . import pipeline, storage

_LOCK = threading.Lock()


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
    free = client.run(_free_device_memory, workers=leaders) if leaders else {}
    fits = {(_host(a), seen[a]): free.get(a) for a in leaders}
    out = {}
    for a, (rank, count) in groups.items():
        f = fits.get((_host(a), seen[a]))
        out[a] = (rank, count, count if f is None else device_processes(f, count))
    return out


def _run_in_job(job_id: str, job: tuple, fn, *args):
    """Run task ``fn(*args)`` in a Dask worker, first setting up the job there if this worker
    process has not yet (see the module docstring)."""
    with _LOCK:
        if pipeline._WORKER.get("job") != job_id:
            source, open_kwargs, plan, options, dest_spec, device, shares = job
            from distributed import get_worker

            # this worker's place among those that share its GPU, and how many of them use it
            rank, count, device_workers = shares.get(get_worker().address, (0, 1, 1))
            pipeline._WORKER.clear()
            pipeline._keep_freed_memory()
            pipeline.set_up_worker(source, open_kwargs, plan, options, dest_spec, device, worker=rank,
                                   nworkers=count, device_workers=device_workers)
            pipeline._WORKER["job"] = job_id
    return fn(*args)


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
    job : tuple
        ``(source, open_kwargs, plan, options, dest_spec, device)``: what
        :func:`gpumesh.pipeline.set_up_worker` needs in each worker.

    Raises
    ------
    ValueError
        The cluster has no workers.
    """

    def __init__(self, client, job: tuple):
        info = client.scheduler_info()
        workers = info.get("workers", {})
        if not workers:
            raise ValueError(f"the Dask cluster at {client.scheduler.address} has no workers")
        #: worker threads in the cluster: tasks that can run at once
        self.workers = sum(int(w.get("nthreads", 1)) for w in workers.values())
        device = job[5]
        shares = device_shares(client, client.run(_first_visible_gpu)) if device != "cpu" else {}
        self._client = client
        self._executor = client.get_executor(pure=False)
        self._id = uuid.uuid4().hex
        # the job's arguments (a NumPy source, say) travel to each worker once
        self._job = client.scatter([tuple(job) + (shares,)], broadcast=True, hash=False)[0]

    def submit(self, fn, *args):
        """Run ``fn(*args)`` on a worker; returns a :class:`concurrent.futures.Future`."""
        return self._executor.submit(_run_in_job, self._id, self._job, fn, *args)

    def __enter__(self) -> "DaskExecutor":
        return self

    def __exit__(self, *exc: Any) -> Optional[bool]:
        self._executor.shutdown(wait=exc[0] is None)
        try:
            self._client.cancel(self._job)
        except Exception:   # the client may be closing
            pass
        return None


def connect(address: str):
    """A ``distributed.Client`` for the scheduler at ``address`` (``tcp://host:8786``, or the path
    of a scheduler file as ``dask scheduler --scheduler-file`` and dask-jobqueue/dask-mpi write
    it), waiting for it as long as Dask's ``distributed.comm.timeouts.connect`` says (30 s;
    environment variable ``DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT``).

    Raises
    ------
    ImportError
        ``distributed`` is not installed (``pip install "gpumesh-ng[dask]"``).
    OSError
        No scheduler answers at ``address``.
    """
    try:
        from distributed import Client
    except ImportError as exc:   # pragma: no cover - dask is in the dev extra
        raise ImportError('--scheduler needs Dask: pip install "gpumesh-ng[dask]"') from exc
    import os

    if os.path.isfile(address):
        return Client(scheduler_file=address)
    return Client(address)


__all__ = ["DaskExecutor", "check_destination", "connect"]
