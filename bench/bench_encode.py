#!/usr/bin/env python3
"""Draco encoding of real fragments at 16 and 10 vertex quantization bits.

Reads the fragments of a multi-resolution mesh that gpumesh wrote at 16 bits (the default;
for instance ``out/`` of the README's first command), and encodes every non-placeholder
fragment of a sample of its segments again, once as stored and once at 10 bits, with each
encoder available: ``gpumesh._dracoenc`` (when built) and ``DracoPy.encode``.  The 10-bit
positions are the 16-bit ones divided by 2**6 (the node's far face, 2**16 - 1, becomes
2**10 - 1): gpumesh's vertices lie on the half-voxel lattice, which both depths hold exactly,
so this is what ``gpumesh mesh --bits 10`` writes (``tests/test_mesh_real.py`` checks that on a
crop).  A sample of the encodings is decoded again: each must hold the fragment's
triangles (Draco orders vertices and faces its own way, so re-encoding a decoded fragment
does not give the stored bytes; the triangles are compared as position triples), and every
encoder must have written the same bytes.

Why the two depths differed in speed: Draco's rANS coder writes and sorts a probability table
over every residual value up to the largest in the fragment, and the residuals of a
fragment span its coordinate range, up to 2**16 values at 16 bits against 2**10 at 10.  The
extension, where it is built with the linker wrap (Linux), codes those large alphabets in time
linear in the symbols, with the same bytes; the row ``_dracoenc/draco-symbols`` is the extension
with that path switched off (Draco's own ``EncodeSymbols``), i.e. what it was before.

    .venv/bin/python bench/bench_encode.py --mesh out            # 400 segments, 5 passes
    .venv/bin/python bench/bench_encode.py --mesh out --segments 0   # every segment

Prints a table (median of the passes) and writes ``bench/results/encode-<UTC start>-<host>.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_main import REPO_ROOT, add_result_args, environment, save_result  # noqa: E402

sys.path.insert(0, str(REPO_ROOT))


def collect(mesh: str, segments: int, seed: int) -> tuple[list, dict]:
    """The sampled segments' fragments: ``[(q16 (n, 3) int64, faces (m, 3) uint32, bytes)]``."""
    from gpumesh import reader

    src = reader.open_mesh(mesh)
    if src.kind != "multires" or src.vertex_quantization_bits != 16:
        raise SystemExit(f"{mesh}: needs a multi-resolution mesh at 16 bits")
    ids = src.segment_ids()
    if 0 < segments < len(ids):
        ids = sorted(np.random.default_rng(seed).choice(ids, segments, replace=False).tolist())
    frags = []
    for seg in ids:
        m = src.manifest(seg)
        data = src.fragment_data(seg)
        ranges = m.fragment_byte_ranges()
        for lod in range(m.num_lods):
            for start, stop in ranges[lod].tolist():
                if stop == start:
                    continue
                blob = data[start:stop]
                q, f = reader.decode_fragment(blob, 16)
                if reader.is_placeholder(q, f):
                    continue
                frags.append((q, np.ascontiguousarray(f, dtype=np.uint32), blob))
    return frags, {"mesh": str(mesh), "segments": len(ids), "seed": seed}


def triangle_set(q: np.ndarray, faces: np.ndarray) -> bytes:
    """The fragment's triangles as position triples, each rotated to start at its least
    corner, sorted: equal for the same triangles whatever the vertex and face order."""
    tri = np.asarray(q, dtype=np.int64)[np.asarray(faces, dtype=np.int64)]   # (m, 3 corners, 3)
    key = tri[:, :, 0] * (1 << 40) + tri[:, :, 1] * (1 << 20) + tri[:, :, 2]
    first = np.argmin(key, axis=1)
    rot = (first[:, None] + np.arange(3)) % 3
    tri = np.take_along_axis(tri, rot[:, :, None], axis=1).reshape(len(tri), 9)
    return np.unique(tri, axis=0).tobytes()


def to_ten_bits(q16: np.ndarray) -> np.ndarray:
    """The 10-bit positions of the same lattice vertices (see the module docs)."""
    top16 = q16 == (1 << 16) - 1
    if (q16[~top16] % 64).any():
        raise SystemExit("positions are not on the half-voxel lattice; was this mesh written by gpumesh?")
    return np.where(top16, (1 << 10) - 1, q16 >> 6)


def encoders() -> dict:
    """Name -> ``encode(q, faces, bits) -> bytes``: :func:`gpumesh.encode.encode_draco` through
    ``gpumesh._dracoenc`` (when built; with its linker wrap, also once with Draco's own
    ``EncodeSymbols``) and through DracoPy (the extension set aside)."""
    from gpumesh import encode

    built = encode._dracoenc

    def through(extension):
        def enc(q, faces, bits):
            encode._dracoenc = extension
            try:
                return encode.encode_draco(q, faces, bits)
            finally:
                encode._dracoenc = built
        return enc

    def draco_symbols(q, faces, bits):   # the extension without its symbol path
        before = built._set_symbol_fast_path(-1)
        try:
            return through(built)(q, faces, bits)
        finally:
            built._set_symbol_fast_path(before)

    out = {"_dracoenc": through(built)} if built is not None else {}
    if built is not None:
        previous = built._set_symbol_fast_path(-1)   # None: built without the linker wrap
        if previous is not None:
            built._set_symbol_fast_path(previous)
            out["_dracoenc/draco-symbols"] = draco_symbols
    out["DracoPy"] = through(None)
    return out


def main(argv=None) -> int:
    from gpumesh import reader

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mesh", required=True, help="a multires mesh directory gpumesh wrote at 16 bits")
    p.add_argument("--segments", type=int, default=400, help="segments sampled (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--passes", type=int, default=5, help="timed passes over the fragments (median)")
    add_result_args(p)
    args = p.parse_args(argv)
    started = _dt.datetime.now(_dt.timezone.utc)
    frags, sample = collect(args.mesh, args.segments, args.seed)
    inputs = {16: [(q, f) for q, f, _ in frags], 10: [(to_ten_bits(q), f) for q, f, _ in frags]}
    triangles = sum(len(f) for _, f, _ in frags)
    encs = encoders()
    first = {}   # (fragment, bits) -> the first encoder's bytes: every encoder must write them
    for name, enc in encs.items():
        for i in range(0, len(frags), max(1, len(frags) // 200)):
            for bits in (16, 10):
                q, f = inputs[bits][i]
                data = enc(q, f, bits)
                if triangle_set(*reader.decode_fragment(data, bits)) != triangle_set(q, f):
                    raise SystemExit(f"{name}: a fragment encoded at {bits} bits decodes to other triangles")
                if first.setdefault((i, bits), data) != data:
                    raise SystemExit(f"{name}: a fragment encoded at {bits} bits differs from {next(iter(encs))}'s bytes")
    configs = [(name, bits) for name in encs for bits in (16, 10)]
    times = {c: [] for c in configs}
    size = {}
    for _ in range(args.passes):   # interleaved, so that a slower spell of the machine hits all alike
        for name, bits in configs:
            enc = encs[name]
            t0 = time.process_time()
            size[name, bits] = sum(len(enc(q, f, bits)) for q, f in inputs[bits])
            times[name, bits].append(time.process_time() - t0)
    rows = []
    for name, bits in configs:
        cpu = statistics.median(times[name, bits])
        rows.append({"encoder": name, "bits": bits, "cpu_s": cpu, "cpu_s_passes": times[name, bits],
                     "bytes": size[name, bits], "mtriangles_per_s": triangles / cpu / 1e6})
    print(f"{len(frags)} fragments, {triangles / 1e6:.2f} M triangles of {sample['segments']} segments "
          f"(placeholders left out); CPU s, median of {args.passes}")
    print("encoder                 | bits | CPU s  | M tri/s | bytes      | vs 16 bits")
    print("------------------------+------+--------+---------+------------+-----------")
    for r in rows:
        base = next(b for b in rows if b["encoder"] == r["encoder"] and b["bits"] == 16)
        r["speedup_vs_16"] = base["cpu_s"] / r["cpu_s"]
        r["bytes_vs_16"] = r["bytes"] / base["bytes"]
        print(f"{r['encoder']:23s} | {r['bits']:4d} | {r['cpu_s']:6.2f} | {r['mtriangles_per_s']:7.2f} | "
              f"{r['bytes']:10d} | {r['speedup_vs_16']:.2f}x faster, {r['bytes_vs_16']:.3f} of the bytes")
    record = {
        "benchmark": "encode", "started_utc": started.isoformat(),
        "finished_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(), **environment(),
        "options": {**sample, "passes": args.passes},
        "fragments": len(frags), "triangles": triangles, "rows": rows,
    }
    if not args.no_save:
        print(f"\nresults: {save_result(record, 'encode', started, args.results_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
