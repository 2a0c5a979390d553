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
``memory.usage_in_bytes``) are read; where none is present, the host's figures hold.
"""

from __future__ import annotations

import math
import os
from typing import Optional

CGROUP = "/sys/fs/cgroup"
MEMINFO = "/proc/meminfo"

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


def usable_cores(root: str = CGROUP) -> int:
    """CPUs this process may use: its CPU affinity, capped by the container's CPU quota
    (rounded up), at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):   # not Linux
        cores = os.cpu_count() or 1
    v2 = _read(os.path.join(root, "cpu.max"))
    if v2 is not None:
        parts = v2.split()
        quota, period = _number(parts[0]), _number(parts[1] if len(parts) > 1 else None)
    else:
        quota = _number(_read(os.path.join(root, "cpu", "cpu.cfs_quota_us")))
        period = _number(_read(os.path.join(root, "cpu", "cpu.cfs_period_us")))
    if quota and period:
        cores = min(cores, math.ceil(quota / period))
    return max(1, cores)


def available_memory(root: str = CGROUP, meminfo: str = MEMINFO) -> Optional[int]:
    """Bytes of memory the job may still use: the host's ``MemAvailable``, capped by what the
    container's limit leaves; ``None`` when neither can be read."""
    avail = None
    for line in (_read(meminfo) or "").splitlines():
        if line.startswith("MemAvailable:"):
            avail = int(line.split()[1]) * 1024
    limit = _number(_read(os.path.join(root, "memory.max")))
    used = _number(_read(os.path.join(root, "memory.current")))
    if limit is None:
        limit = _number(_read(os.path.join(root, "memory", "memory.limit_in_bytes")))
        used = _number(_read(os.path.join(root, "memory", "memory.usage_in_bytes")))
    if limit is not None:
        left = max(0, limit - (used or 0))
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


def default_workers(per_worker: int, root: str = CGROUP, meminfo: str = MEMINFO) -> tuple[int, str]:
    """The main job's worker count when none is given: the usable cores, capped by how many
    workers of ``per_worker`` bytes fit in the available memory (less
    :data:`MAIN_RESERVE_BYTES`), at least 1.

    Returns
    -------
    workers : int
    why : str
        Empty, or a sentence saying why fewer workers than cores run (for a notice).
    """
    cores = usable_cores(root)
    avail = available_memory(root, meminfo)
    if avail is None:
        return cores, ""
    fit = max(1, (avail - MAIN_RESERVE_BYTES) // max(1, per_worker))
    if fit >= cores:
        return cores, ""
    return int(fit), (f"{fit} worker(s) for {cores} cores: each needs about {per_worker / 2**30:.1f} GiB "
                      f"and {avail / 2**30:.1f} GiB of memory is available (--workers sets the count; "
                      f"a smaller --max-lods needs less per worker)")


__all__ = ["FewerWorkersNotice", "available_memory", "default_workers", "usable_cores", "worker_bytes"]
