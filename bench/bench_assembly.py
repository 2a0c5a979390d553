#!/usr/bin/env python3
"""The main process's peak memory with and without the whole fragment index held.

The assembly holds every fragment entry (52 bytes each) while they fit in
``gpumesh.writer.ASSEMBLY_INDEX_BYTES`` (1 GiB); past it, it keeps a row per segment and writes
the shards in waves, each reading the entries again: from the temporary file they were written
to (``gpumesh.writer.IndexSpill``), which is written again wave by wave so that each wave reads
its own entries alone (``IndexSpill.group``); with a cap given as ``Ns``, from that file read
whole by each wave (not grouped, as gpumesh did before it grouped it); with ``Nh``, from the
task results' headers (``INDEX_SPILL`` off, as gpumesh did before it had the file).  To see
them on a volume of this size, each run meshes the same job in a fresh process with the cap
left as it is (``default``) or set to ``--caps`` MiB, and reports the main process's peak RSS
(its workers are other processes), the waves, the wall time of the writing phase, the task
results' reads by this process, the bytes of the temporary file read back and a digest of
every output file, which must be the same for every cap.  The default job is the real volume
with 8-voxel octree nodes and 5 LODs: ~0.94 M fragments, an index of ~49 MB, where 64-voxel
nodes give 37 k.  It is written in 16 shards (``--shard-bits 4``), so that a wave can hold a
few.

    .venv/bin/python bench/bench_assembly.py                    # caps: default, 8 MiB
    .venv/bin/python bench/bench_assembly.py --caps 4 --repeat 2
    .venv/bin/python bench/bench_assembly.py --caps 8,8h        # 8 MiB with the spill, then without
    .venv/bin/python bench/bench_assembly.py --caps 8,8s        # the spill grouped by wave, then read whole

Prints a table and writes ``bench/results/assembly-<UTC start>-<hostname>.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_main import (DEFAULT_SOURCE, add_result_args, environment, save_result,  # noqa: E402
                        source_missing)


def tree_digest(root: Path) -> str:
    """sha256 over every file's relative path and bytes, in sorted order."""
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            path = Path(dirpath) / name
            h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def parse_cap(cap: str) -> tuple[float, bool, bool]:
    """A ``--caps`` entry: its MiB, whether the index goes to a temporary file past it
    (``False`` for ``Nh``: the headers read again), and whether that file is grouped by wave
    (``False`` for ``Ns`` and ``Nh``).  ``ValueError`` where it is not one."""
    mode = cap[-1:] if cap[-1:] in ("h", "s") else ""
    mib = float(cap[:len(cap) - len(mode)])
    if not mib >= 0:
        raise ValueError(f"not a size: {cap!r}")
    return mib, mode != "h", mode == ""


def one_run(cap: str, source: str, voxel_size, chunk: int, max_lods: int, workers: int, shard_bits, dest: str) -> dict:
    """Mesh the job in this process with the index cap ``cap`` (MiB, or ``default``)."""
    import gpumesh.writer as writer
    from gpumesh.pipeline import MeshOptions, run_mesh
    from gpumesh.sharding import ShardingOptions

    if cap != "default":
        mib, writer.INDEX_SPILL, grouped = parse_cap(cap)
        writer.ASSEMBLY_INDEX_BYTES = int(mib * (1 << 20))
        if not grouped:
            writer.SPILL_GROUP_WAVES = 1 << 62
    reads = [0]
    real_values = writer.TaskResults._values

    def counted(self, pending):   # this process's reads of task results (headers, whole results)
        for got in real_values(self, pending):
            reads[0] += 1
            yield got

    writer.TaskResults._values = counted
    t0 = time.perf_counter()
    sharding = ShardingOptions(shard_bits=shard_bits)
    s = run_mesh(source, dest, options=MeshOptions(chunk_size=chunk, max_lods=max_lods, sharding=sharding),
                 voxel_size=voxel_size, workers=workers, overwrite=True)
    return {"cap": cap, "cap_bytes": writer.ASSEMBLY_INDEX_BYTES,
            "main_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "fragments": sum(s.fragments_per_lod), "segments": s.segments, "index_waves": s.index_waves,
            "index_spilled": s.index_spilled, "index_grouped": s.index_grouped,
            "index_bytes_read": s.index_bytes_read, "result_reads": reads[0],
            "seconds": time.perf_counter() - t0, "seconds_writing": s.seconds_writing, "bytes": s.bytes,
            "digest": tree_digest(Path(dest))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", default=str(DEFAULT_SOURCE))
    p.add_argument("--voxel-size", default="32,32,40", help="nm, x,y,z")
    p.add_argument("--chunk-size", type=int, default=8)
    p.add_argument("--max-lods", type=int, default=5)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--shard-bits", type=int, default=4,
                   help="2^N shards, so that a wave can hold a few of them (default 4)")
    p.add_argument("--caps", default="8", help="comma-separated caps in MiB, run after the default")
    p.add_argument("--repeat", type=int, default=1, help="rounds of every cap, interleaved")
    p.add_argument("--one", help=argparse.SUPPRESS)   # internal: run one cap, print JSON
    p.add_argument("--dest", help=argparse.SUPPRESS)
    add_result_args(p)
    args = p.parse_args(argv)
    caps = [c.strip() for c in args.caps.split(",") if c.strip()]
    for cap in caps:   # said here, not by a child's traceback
        try:
            parse_cap(cap)
        except ValueError:
            p.error(f"--caps: {cap!r} is not a size in MiB (with an h: the headers read again, no temporary file; "
                    f"with an s: the temporary file read whole by each wave)")
    voxel_size = [float(v) for v in args.voxel_size.split(",")]
    if args.one:
        print(json.dumps(one_run(args.one, args.source, voxel_size, args.chunk_size, args.max_lods, args.workers,
                                 args.shard_bits, args.dest)))
        return 0
    if source_missing(args.source):
        return 2
    started = _dt.datetime.now(_dt.timezone.utc)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.repeat):
            for cap in ["default"] + caps:
                out = subprocess.run([sys.executable, __file__, "--one", cap, "--dest", f"{tmp}/out",
                                      "--source", args.source, "--voxel-size", args.voxel_size,
                                      "--chunk-size", str(args.chunk_size), "--max-lods", str(args.max_lods),
                                      "--workers", str(args.workers), "--shard-bits", str(args.shard_bits)],
                                     capture_output=True, text=True, check=True)
                rows.append(dict(json.loads(out.stdout.strip().splitlines()[-1]), round=rnd))
    same = len({r["digest"] for r in rows}) == 1
    print(f"source {args.source}; chunk {args.chunk_size}; max LODs {args.max_lods}; {args.workers} workers; "
          f"{1 << args.shard_bits} shards\n")
    print("cap MiB | fragments | waves | spill | grouped | spill MiB read | result reads | main peak RSS MiB | "
          "writing s | wall s")
    print("--------+-----------+-------+-------+---------+----------------+--------------+-------------------+"
          "-----------+-------")
    for r in rows:
        print(f"{r['cap']:>7} | {r['fragments']:>9} | {r['index_waves']:>5} | {str(r['index_spilled']):>5} | "
              f"{str(r['index_grouped']):>7} | {r['index_bytes_read'] / (1 << 20):>14.1f} | "
              f"{r['result_reads']:>12} | {r['main_peak_rss_mib']:>17.0f} | {r['seconds_writing']:>9.1f} | "
              f"{r['seconds']:>6.1f}")
    print(f"\nthe same output bytes at every cap: {same}")
    record = {"benchmark": "assembly", "started": started.isoformat(), "source": args.source,
              "chunk_size": args.chunk_size, "max_lods": args.max_lods, "workers": args.workers,
              "shard_bits": args.shard_bits,
              "same_output": same, "rows": rows, **environment()}
    if not args.no_save:
        print(f"\nresults: {save_result(record, 'assembly', started, args.results_dir)}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
