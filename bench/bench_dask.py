#!/usr/bin/env python3
"""The main job on a Dask cluster: its wall time, the workers' CPU time, and the memory the
workers still hold after it.

A Dask worker outlives the job (a notebook's cluster, a shared one), so what a job leaves in
it counts: this benchmark starts a ``dask scheduler`` and ``dask worker --nworkers N
--nthreads 1`` (with their nannies, as a user starts them) for each gpumesh it compares, runs
``gpumesh mesh SOURCE DEST --scheduler FILE`` on it, in turn, and reads each worker process's
CPU seconds during the job, its peak resident memory (``VmHWM``) and its resident memory
(``VmRSS``) a moment after the job ended.  With ``--baseline REV`` that commit's gpumesh runs
on a cluster of its own (the workers import the gpumesh they were started with), in turn with
this checkout's, so the two can be compared in one run.

    .venv/bin/python bench/bench_dask.py                              # the real volume, 2 workers
    .venv/bin/python bench/bench_dask.py --baseline HEAD~1 --runs 3  # against an older commit

Prints a table and writes ``bench/results/dask-<UTC start>-<hostname>.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_main import add_result_args, environment, save_result, source_missing  # noqa: E402
from bench_startup import add_source_args, make_cutout, run_once, source_or_cutout  # noqa: E402
from bench_store import compared_codes, same_output  # noqa: E402

#: seconds after a job before the workers' memory is read (the job's end reaches them by then)
SETTLE_S = 2.0


def _dask(*args) -> list:
    """The ``dask`` command line of this Python's environment."""
    return [sys.executable, "-m", "dask", *args]


class Cluster:
    """A ``dask scheduler`` and its ``dask worker`` processes, started with ``code`` first on the
    path (so the workers import that gpumesh) and a scheduler file in ``folder``."""

    def __init__(self, code: Path, folder: Path, workers: int):
        folder.mkdir(parents=True)
        self.file = folder / "scheduler.json"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(code), os.environ.get("PYTHONPATH")])))
        logs = open(folder / "dask.log", "wb")
        self.procs = [subprocess.Popen(_dask("scheduler", "--scheduler-file", str(self.file), "--port", "0",
                                             "--dashboard-address", ":0"), env=env, cwd=folder, stdout=logs,
                                       stderr=logs)]
        deadline = time.monotonic() + 120
        while not self.file.exists():
            if time.monotonic() > deadline or self.procs[0].poll() is not None:
                self.procs[0].kill()
                raise RuntimeError(f"the Dask scheduler did not start: {folder / 'dask.log'}")
            time.sleep(0.1)
        time.sleep(0.5)   # written whole by then
        self.procs.append(subprocess.Popen(_dask("worker", "--scheduler-file", str(self.file), "--nworkers",
                                                 str(workers), "--nthreads", "1", "--dashboard-address", ":0",
                                                 "--memory-limit", "0"),
                                           env=env, cwd=folder, stdout=logs, stderr=logs))
        self.workers = workers
        self.client = None
        self._procs = {}
        try:
            from distributed import Client

            self.client = Client(scheduler_file=str(self.file), timeout=120)
            self.client.wait_for_workers(workers, timeout=120)
        except BaseException:   # no scheduler or workers left behind
            self.close()
            raise

    def worker_processes(self) -> list:
        """The worker processes (as the scheduler knows them: a worker that was replaced is
        read under its new process)."""
        import psutil

        pids = self.client.run(os.getpid)
        return [self._procs.setdefault(pid, psutil.Process(pid)) for pid in pids.values()]

    def readings(self) -> dict:
        """Each worker's CPU seconds so far, peak and current resident memory (MiB)."""
        out = {}
        for p in self.worker_processes():
            status = dict(line.split(":", 1) for line in Path(f"/proc/{p.pid}/status").read_text().splitlines()
                          if ":" in line)
            cpu = p.cpu_times()
            out[p.pid] = {"cpu_s": cpu.user + cpu.system, "hwm_mb": int(status["VmHWM"].split()[0]) / 1024,
                          "rss_mb": int(status["VmRSS"].split()[0]) / 1024}
        return out

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        for p in reversed(self.procs):
            p.terminate()
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def run(cluster: Cluster, code: Path, source: Path, dest: Path, args: argparse.Namespace) -> dict:
    """One job on ``cluster``, with the workers' readings around it."""
    before = cluster.readings()
    got = run_once(code, source, dest, None, args.voxel_size, ["--scheduler", str(cluster.file)])
    time.sleep(SETTLE_S)
    after = cluster.readings()
    pids = sorted(set(before) & set(after))
    got["workers_cpu_s"] = sum(after[p]["cpu_s"] - before[p]["cpu_s"] for p in pids)
    got["workers_rss_after_mb"] = [after[p]["rss_mb"] for p in pids]
    got["workers_rss_before_mb"] = [before[p]["rss_mb"] for p in pids]
    got["workers_hwm_mb"] = [after[p]["hwm_mb"] for p in pids]
    return got


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_source_args(p, workers=2)
    p.add_argument("--runs", type=int, default=2, help="jobs of each gpumesh, in turn (medians)")
    p.add_argument("--baseline", default=None, metavar="REV", help="also run this commit's gpumesh, in turn")
    add_result_args(p)
    args = p.parse_args(argv)
    if source_missing(args.source):
        return 2
    started = _dt.datetime.now(_dt.timezone.utc)
    clusters: dict = {}
    runs: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = source_or_cutout(args, tmp)
        warm = tmp / "warm.zarr"
        make_cutout(Path(args.source), 64, warm)
        codes = compared_codes(args.baseline, tmp)
        try:
            for k, (name, code) in enumerate(codes.items()):
                clusters[name] = Cluster(code, tmp / f"cluster{k}", args.workers)
                # the workers load (or compile) that code's kernels, untimed
                run_once(code, warm, tmp / f"warm{k}", None, args.voxel_size,
                         ["--scheduler", str(clusters[name].file)])
            runs = {name: [] for name in codes}
            for i in range(args.runs):
                for k, (name, code) in enumerate(codes.items()):
                    runs[name].append(run(clusters[name], code, source, tmp / f"run{i}-{k}", args))
        finally:
            for c in clusters.values():
                c.close()
    rows = {name: {"wall_s": statistics.median(r["wall_s"] for r in rs),
                   "workers_cpu_s": statistics.median(r["workers_cpu_s"] for r in rs),
                   "rss_after_mb": statistics.median(sum(r["workers_rss_after_mb"]) for r in rs),
                   "hwm_mb": statistics.median(max(r["workers_hwm_mb"]) for r in rs)} for name, rs in runs.items()}
    print(f"{'cutout ' + str(args.size) + '^3' if args.size else 'the whole volume'} of {args.source} on a Dask "
          f"cluster of {args.workers} workers (1 thread each), {args.runs} job(s) each, medians")
    print(f"{'gpumesh':24s} | wall s | workers' CPU s | workers' RSS after, MiB (sum) | largest peak RSS, MiB")
    print(f"{'-' * 24}-+--------+----------------+-------------------------------+----------------------")
    for name, r in rows.items():
        print(f"{name:24s} | {r['wall_s']:6.1f} | {r['workers_cpu_s']:14.1f} | {r['rss_after_mb']:29.0f} | "
              f"{r['hwm_mb']:20.0f}")
    same = same_output(runs)
    record = {"benchmark": "dask", "started_utc": started.isoformat(),
              "finished_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(), **environment(),
              "options": {"source": args.source, "size": args.size, "workers": args.workers, "runs": args.runs,
                          "baseline": args.baseline, "voxel_size_nm": args.voxel_size, "settle_s": SETTLE_S},
              "cluster": "dask scheduler + dask worker --nthreads 1 (nannies) on this machine",
              "runs": runs, "medians": rows, "same_bytes": same}
    if not args.no_save:
        print(f"\nresults: {save_result(record, 'dask', started, args.results_dir)}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
