"""What this machine, or the container the job runs in, gives the main job: cores and memory.

``os.cpu_count()`` and ``/proc/meminfo`` describe the host.  A batch or cloud job often runs in
a container (Kubernetes, Docker, Slurm's cgroups) that may use only some of the host's CPUs
(its CPU affinity, or a CPU quota: ``cpu.max``) and memory (``memory.max``).  A worker per
host core would then run many processes per usable CPU and could exceed the container's memory,
where the out-of-memory killer ends the job.  So the main job's default worker count is the
usable cores, capped by the workers that fit in the available memory
(:func:`default_workers`).  ``--workers`` overrides it.

cgroup v2 (``/sys/fs/cgroup/cpu.max``, ``memory.max``, ``memory.current``) and v1
(``cpu/cpu.cfs_quota_us`` and ``cpu.cfs_period_us``, ``memory/memory.limit_in_bytes`` and
``memory.usage_in_bytes``) are read; where none is present, the host's figures hold.  They are
read for this process's own cgroup (``/proc/self/cgroup``) and each of its ancestors, the
tightest winning: a container with its own cgroup namespace sees its cgroup at the root, but a
Slurm job step or a ``systemd-run -p MemoryMax=`` unit sits below it.  Memory in use excludes
the reclaimable page cache (``inactive_file`` of ``memory.stat``), as the kubelet counts it:
right after a volume was written or copied, the cache would otherwise look like memory taken.
"""

from __future__ import annotations

import math
import os
from typing import Optional

CGROUP = "/sys/fs/cgroup"
MEMINFO = "/proc/meminfo"
PROC_CGROUP = "/proc/self/cgroup"

#: Memory a worker needs besides its block and read cache (imports, pieces, buffers), bytes.
#: Measured (``bench/bench_memory.py``: one worker process running every task of the real
#: volume, read cache included, ``ru_maxrss``): 362-386, 773-788 and 1,947-1,950 MiB for
#: blocks of 128, 256 and 512 voxels a side in two runs (uint32 labels; read caches of 64,
#: 216 and 512 MiB); this model gives 496, 872 and 2,960 MiB, a margin of 11 % at the
#: default block (docs/STATUS.md, fourteenth session).
WORKER_BASE_BYTES = 400 << 20
#: Memory a worker needs per voxel of a block besides the labels' own bytes (see above).
WORKER_BYTES_PER_VOXEL = 12
#: Memory kept for the main process (the assembly's index, the worker server).
MAIN_RESERVE_BYTES = 1 << 30


class FewerWorkersNotice(UserWarning):
    """The main job runs fewer workers than there are usable cores, as more would not fit in
    the available memory (the one-line notice; ``--workers`` overrides)."""


class WorkersMemoryWarning(UserWarning):
    """The worker count given (``--workers``) needs more memory than is available, by the
    estimate that caps the default count (:func:`worker_bytes`): the out-of-memory killer may
    stop the job (it then ends with status 1, and ``--resume`` continues it)."""


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return None


def _number(text: Optional[str]) -> Optional[int]:
    """An integer limit, or ``None`` for no limit (``max``, a v1 "unlimited", unreadable)."""
    if text is None or not text.lstrip("-").isdigit():
        return None
    value = int(text)
    return value if 0 < value < 1 << 60 else None   # v1 writes no limit as about 2**63


def _own_cgroups(proc_cgroup: str) -> dict:
    """This process's cgroup paths from ``/proc/self/cgroup``: ``""`` for v2's unified
    hierarchy, and each v1 controller's (``"memory"``, ``"cpu"``, ...)."""
    out: dict = {}
    for line in (_read(proc_cgroup) or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(",") if parts[1] else [""]:
                out.setdefault(controller, parts[2])
    return out


def _levels(base: str, path: Optional[str]) -> list:
    """``base`` joined with the cgroup ``path`` and with each of its ancestors, innermost first,
    ending with ``base`` itself (all there is where the path is unknown or ``/``)."""
    dirs = []
    rel = (path or "").strip("/")
    while rel:
        dirs.append(os.path.join(base, rel))
        rel = os.path.dirname(rel)
    return dirs + [base]


def usable_cores(root: str = CGROUP, proc_cgroup: str = PROC_CGROUP) -> int:
    """CPUs this process may use: its CPU affinity, capped by the CPU quota of its cgroup or
    any ancestor's (rounded up), at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):   # not Linux
        cores = os.cpu_count() or 1
    own = _own_cgroups(proc_cgroup)
    for level in _levels(root, own.get("")):   # v2
        parts = (_read(os.path.join(level, "cpu.max")) or "").split()
        quota, period = _number(parts[0] if parts else None), _number(parts[1] if len(parts) > 1 else None)
        if quota and period:
            cores = min(cores, math.ceil(quota / period))
    for level in _levels(os.path.join(root, "cpu"), own.get("cpu")):   # v1
        quota = _number(_read(os.path.join(level, "cpu.cfs_quota_us")))
        period = _number(_read(os.path.join(level, "cpu.cfs_period_us")))
        if quota and period:
            cores = min(cores, math.ceil(quota / period))
    return max(1, cores)


def _inactive_file(stat: Optional[str], key: str) -> int:
    """The reclaimable page cache (bytes) that a ``memory.stat`` lists under ``key``."""
    for line in (stat or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return 0


def available_memory(root: str = CGROUP, meminfo: str = MEMINFO, proc_cgroup: str = PROC_CGROUP) -> Optional[int]:
    """Bytes of memory the job may still use: the host's ``MemAvailable``, capped by what the
    limit of this process's cgroup, or of any ancestor, leaves (its usage less the reclaimable
    page cache); ``None`` when neither can be read."""
    avail = None
    for line in (_read(meminfo) or "").splitlines():
        if line.startswith("MemAvailable:"):
            avail = int(line.split()[1]) * 1024
    own = _own_cgroups(proc_cgroup)
    levels = [(level, "memory.max", "memory.current", "inactive_file")   # v2
              for level in _levels(root, own.get(""))]
    levels += [(level, "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")   # v1
               for level in _levels(os.path.join(root, "memory"), own.get("memory"))]
    for level, limit_file, used_file, cache_key in levels:
        limit = _number(_read(os.path.join(level, limit_file)))
        if limit is None:
            continue
        used = _number(_read(os.path.join(level, used_file))) or 0
        used = max(0, used - _inactive_file(_read(os.path.join(level, "memory.stat")), cache_key))
        left = max(0, limit - used)
        avail = left if avail is None else min(avail, left)
    return avail


def worker_bytes(block: int, itemsize: int, cache_bytes: int) -> int:
    """Estimated peak memory of one worker of the main job (bytes).

    Parameters
    ----------
    block : int
        Block edge (voxels; ``Plan.block``).
    itemsize : int
        Bytes per label of the volume (1-8).
    cache_bytes : int
        The worker's cache of storage chunks (``pipeline.read_cache_bytes``).
    """
    return WORKER_BASE_BYTES + block ** 3 * (WORKER_BYTES_PER_VOXEL + itemsize) + cache_bytes


def default_workers(per_worker: int, root: str = CGROUP, meminfo: str = MEMINFO,
                    proc_cgroup: str = PROC_CGROUP) -> tuple[int, str]:
    """The main job's worker count when none is given: the usable cores, capped by how many
    workers of ``per_worker`` bytes fit in the available memory (less
    :data:`MAIN_RESERVE_BYTES`), at least 1.

    Returns
    -------
    workers : int
    why : str
        Empty, or a sentence saying why fewer workers than cores run (for a notice).
    """
    cores = usable_cores(root, proc_cgroup)
    avail = available_memory(root, meminfo, proc_cgroup)
    if avail is None:
        return cores, ""
    fit = max(1, (avail - MAIN_RESERVE_BYTES) // max(1, per_worker))
    if fit >= cores:
        return cores, ""
    return int(fit), (f"{fit} worker(s) for {cores} cores: each needs about {per_worker / 2**30:.1f} GiB "
                      f"and {avail / 2**30:.1f} GiB of memory is available (--workers sets the count; "
                      f"a smaller --max-lods needs less per worker)")


def workers_memory(workers: int, per_worker: int, root: str = CGROUP, meminfo: str = MEMINFO,
                   proc_cgroup: str = PROC_CGROUP, asked: Optional[int] = None) -> str:
    """Empty, or a sentence for a :class:`WorkersMemoryWarning` where ``workers`` workers of
    ``per_worker`` bytes each (:func:`worker_bytes`) do not fit in the available memory (less
    :data:`MAIN_RESERVE_BYTES`), as :func:`default_workers` counts it; empty where the
    available memory is not known.  ``asked``: the count given, where more than the
    ``workers`` that run (one per task)."""
    avail = available_memory(root, meminfo, proc_cgroup)
    if avail is None:
        return ""
    fit = max(0, (avail - MAIN_RESERVE_BYTES) // max(1, per_worker))
    if workers <= fit:
        return ""
    given = f"--workers {workers}" if asked is None or asked <= workers else \
        f"--workers {asked} ({workers} run, one per task)"
    fewer = "fewer --workers, or a smaller --max-lods, needs less" if workers > 1 else "a smaller --max-lods needs less"
    return (f"{given}: each needs about {per_worker / 2**30:.1f} GiB and {avail / 2**30:.1f} GiB of memory is "
            f"available, enough for {fit}: the out-of-memory killer may stop the job ({fewer})")


__all__ = ["FewerWorkersNotice", "WorkersMemoryWarning", "available_memory", "default_workers", "usable_cores",
           "worker_bytes", "workers_memory"]
