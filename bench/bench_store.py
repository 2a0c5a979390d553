#!/usr/bin/env python3
"""The main job writing to an S3 API (a local moto server): its requests, and how long it writes.

On a cloud store each read or write is a round trip, so what a job costs there follows its
request count more than its bytes.  This benchmark runs ``gpumesh mesh SOURCE s3://...`` with
the output (and so the scratch area of task results) on a moto server started here, counts the
server's requests by method during each run, and takes the meshing and writing seconds from the
job's summary.  With ``--baseline REV`` it runs that commit's gpumesh in turn with this
checkout's, against the same server, so that the two can be compared in one run (a ratio).

moto answers each request in about a millisecond on this machine and shares its CPUs, so its
seconds are not a cloud store's; its request counts are what any S3 API would get.  A job of
many shards (``--shard-bits``) is the case where each worker needs a little of every task
result: what a teravoxel job's assembly does on every shard.

    .venv/bin/python bench/bench_store.py --shard-bits 4                    # the real volume, 16 shards
    .venv/bin/python bench/bench_store.py --shard-bits 4 --baseline HEAD~3  # against an older commit
    .venv/bin/python bench/bench_store.py --parts 3 --baseline HEAD~1  # the --resume after 3 parts

Prints a table and writes ``bench/results/store-<UTC start>-<hostname>.json``.
"""

from __future__ import annotations

import argparse
import collections
import datetime as _dt
import importlib.util
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_main import REPO_ROOT, add_result_args, environment, save_result, source_missing  # noqa: E402
from bench_startup import add_source_args, make_cutout, run_once, source_or_cutout  # noqa: E402

BUCKET = "gpumesh-bench"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}
#: the moto server, in a process of its own: prints its port, then logs a line per request on stderr
SERVER = """
import sys, time, boto3
from moto.server import ThreadedMotoServer
s = ThreadedMotoServer(port=0, verbose=True)
s.start()
host, port = s.get_host_and_port()
boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1").create_bucket(Bucket=sys.argv[1])
print(f"http://127.0.0.1:{port}", flush=True)
while True:
    time.sleep(3600)
"""
#: a request's method in the server's log line (werkzeug colours some: ANSI codes after the quote)
REQUEST = re.compile(r'"(?:\x1b\[[0-9;]*m)*([A-Z]+) /')


def requests_since(log: Path, start: int) -> collections.Counter:
    """Requests by method in the server's log after byte ``start``."""
    return collections.Counter(REQUEST.findall(log.read_bytes()[start:].decode(errors="replace")))


def checkout(rev: str, where: Path) -> Path:
    """A copy of commit ``rev``'s files at ``where``, with this checkout's Draco extension (a
    build of the same source, which no commit changed the bytes of)."""
    where.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", rev], cwd=REPO_ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive, check=True)
    for so in (REPO_ROOT / "gpumesh").glob("_dracoenc*.so"):
        shutil.copy(so, where / "gpumesh" / so.name)
    return where


def compared_codes(baseline, tmp: Path) -> dict:
    """``{name: gpumesh source tree}`` of a comparison: this checkout, after commit
    ``baseline``'s (:func:`checkout` under ``tmp``) where one is given."""
    codes = {"this checkout": REPO_ROOT}
    if baseline:
        rev = subprocess.run(["git", "rev-parse", baseline], cwd=REPO_ROOT, check=True, capture_output=True,
                             text=True).stdout.strip()
        codes = {f"baseline {rev[:9]}": checkout(rev, tmp / "baseline"), **codes}
    return codes


def same_output(runs: dict) -> bool:
    """Whether every run of ``runs`` (name -> list of :func:`run_once` results) wrote the same
    bytes and triangles per LOD; printed."""
    same = len({(r["bytes"], tuple(r["triangles_per_lod"])) for rs in runs.values() for r in rs}) == 1
    print(f"same bytes and triangles in every run: {same}")
    return same


def run(code: Path, source, dest: str, args: argparse.Namespace, endpoint: str, log: Path, tmp: Path) -> dict:
    """One ``gpumesh mesh`` of the gpumesh at ``code`` into ``dest`` (on the server, or a local
    folder for the untimed run that loads or compiles that code's numba kernels), with the
    server's requests during it by method.  With ``--parts N``: the job as an array job's N
    parts, one after another, then the ``--resume`` that writes the output, whose requests and
    seconds these are (``parts``: each part's)."""
    env = dict(os.environ, **CREDENTIALS, AWS_ENDPOINT_URL=endpoint)
    shards = ["--shard-bits", str(args.shard_bits)]
    parts = []
    for k in range(args.parts):
        before = log.stat().st_size
        part = run_once(code, source, dest, args.workers, args.voxel_size, [*shards, "--part", f"{k}/{args.parts}"],
                        env=env, summary=tmp / "summary.json", overwrite=False)
        parts.append({"wall_s": part["wall_s"], "requests_all": sum(requests_since(log, before).values())})
    before = log.stat().st_size
    got = run_once(code, source, dest, args.workers, args.voxel_size, [*shards, *(["--resume"] if parts else [])],
                   env=env, summary=tmp / "summary.json", overwrite=not parts)
    counts = requests_since(log, before)
    return {**got, "requests": dict(counts), "requests_all": sum(counts.values()),
            **({"parts": parts} if parts else {})}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_source_args(p)
    p.add_argument("--shard-bits", type=int, default=4, help="shards of the output: 2**bits")
    p.add_argument("--runs", type=int, default=1, help="runs of each gpumesh, in turn (medians)")
    p.add_argument("--baseline", default=None, metavar="REV", help="also run this commit's gpumesh, in turn")
    p.add_argument("--parts", type=int, default=0, metavar="N",
                   help="run the job as an array job's N parts, then time and count the --resume that writes it")
    add_result_args(p)
    args = p.parse_args(argv)
    if source_missing(args.source):
        return 2
    if importlib.util.find_spec("moto") is None:
        print("moto is not installed (pip install 'moto[server]')", file=sys.stderr)
        return 2
    started = _dt.datetime.now(_dt.timezone.utc)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        log = tmp / "moto.log"
        with open(log, "wb") as err:
            server = subprocess.Popen([sys.executable, "-c", SERVER, BUCKET], stdout=subprocess.PIPE, stderr=err,
                                      env=dict(os.environ, **CREDENTIALS), text=True)
        try:
            endpoint = ""
            for line in server.stdout:   # moto says more before the endpoint
                if line.startswith("http://"):
                    endpoint = line.strip()
                    break
            if not endpoint:
                print("the moto server did not start:\n" + log.read_text(), file=sys.stderr)
                return 1
            source = source_or_cutout(args, tmp)
            warm = tmp / "warm.zarr"
            make_cutout(Path(args.source), 64, warm)
            codes = compared_codes(args.baseline, tmp)
            for k, code in enumerate(codes.values()):   # each code's kernels loaded (or compiled), untimed
                run(code, warm, str(tmp / f"warm{k}"), args, endpoint, log, tmp)
            runs: dict = {name: [] for name in codes}
            for i in range(args.runs):
                for k, (name, code) in enumerate(codes.items()):
                    runs[name].append(run(code, source, f"s3://{BUCKET}/run{i}-{k}/", args, endpoint, log, tmp))
        finally:
            server.kill()
            server.wait()
    rows = {name: {key: statistics.median(r[key] for r in rs)
                   for key in ("wall_s", "meshing_s", "writing_s", "requests_all")} for name, rs in runs.items()}
    for name, rs in runs.items():
        rows[name]["gets"] = statistics.median(r["requests"].get("GET", 0) for r in rs)
    print(f"{'cutout ' + str(args.size) + '^3' if args.size else 'the whole volume'} of {args.source} into "
          f"{2 ** args.shard_bits} shards on a local S3 API (moto), {args.runs} run(s) each, medians"
          + (f"; the --resume after {args.parts} parts" if args.parts else ""))
    print(f"{'gpumesh':24s} | wall s | meshing s | writing s | requests |   GETs")
    print(f"{'-' * 24}-+--------+-----------+-----------+----------+--------")
    for name, r in rows.items():
        print(f"{name:24s} | {r['wall_s']:6.1f} | {r['meshing_s']:9.1f} | {r['writing_s']:9.1f} | "
              f"{r['requests_all']:8.0f} | {r['gets']:6.0f}")
    ratios = {}
    if args.baseline:
        base, new = rows[next(iter(rows))], rows["this checkout"]
        ratios = {"writing_s_baseline_over_this": base["writing_s"] / max(new["writing_s"], 1e-9),
                  "requests_baseline_over_this": base["requests_all"] / max(new["requests_all"], 1)}
        print(f"baseline / this checkout: writing {ratios['writing_s_baseline_over_this']:.2f}x, "
              f"requests {ratios['requests_baseline_over_this']:.2f}x")
    same = same_output(runs)
    record = {"benchmark": "store", "started_utc": started.isoformat(),
              "finished_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(), **environment(),
              "options": {"source": args.source, "size": args.size, "shard_bits": args.shard_bits,
                          "workers": args.workers, "runs": args.runs, "baseline": args.baseline, "parts": args.parts,
                          "voxel_size_nm": args.voxel_size},
              "store": "moto server (S3 API) on this machine", "runs": runs, "medians": rows,
              "ratios": ratios, "same_bytes": same}
    if not args.no_save:
        print(f"\nresults: {save_result(record, 'store', started, args.results_dir)}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
