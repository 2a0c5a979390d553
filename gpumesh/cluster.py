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
its own.  The local pool's cap on the workers that use one GPU (:func:`gpumesh.gpu.device_processes`)
is not applied here: many plain workers on one GPU each take a thin share; use one per GPU.
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


def gpu_sharing(workers: dict) -> dict:
    """How many workers share each worker's GPU: ``{address: count}`` from
    ``{address: first visible GPU}``, counting workers of one host that see the same first GPU."""
    groups = collections.Counter((_host(a), g) for a, g in workers.items())
    return {a: groups[(_host(a), g)] for a, g in workers.items()}


def _run_in_job(job_id: str, job: tuple, fn, *args):
    """Run task ``fn(*args)`` in a Dask worker, first setting up the job there if this worker
    process has not yet (see the module docstring)."""
    with _LOCK:
        if pipeline._WORKER.get("job") != job_id:
            source, open_kwargs, plan, options, dest_spec, device, sharing = job
            from distributed import get_worker

            sharing = sharing.get(get_worker().address, 1)   # workers that share this one's GPU
            pipeline._WORKER.clear()
            pipeline._keep_freed_memory()
            pipeline.set_up_worker(source, open_kwargs, plan, options, dest_spec, device,
                                   device_workers=sharing, nworkers=sharing)
            pipeline._WORKER["job"] = job_id
    return fn(*args)


def check_destination(dest_spec: dict) -> None:
    """Raise ``ValueError`` when the workers of a cluster could not see ``dest_spec``
    (an in-memory kvstore lives in one process)."""
    if any(s.get("driver") == "memory" for s in storage.kvstore_chain(dest_spec)):
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
        sharing = gpu_sharing(client.run(_first_visible_gpu)) if device != "cpu" else {}
        self._client = client
        self._executor = client.get_executor(pure=False)
        self._id = uuid.uuid4().hex
        # the job's arguments (a NumPy source, say) travel to each worker once
        self._job = client.scatter([tuple(job) + (sharing,)], broadcast=True, hash=False)[0]

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
