"""Sharded multi-resolution output (``neuroglancer_uint64_sharded_v1``).

The writer, reader, validator, resume and conversion, checked against TensorStore's own
``neuroglancer_uint64_sharded`` kvstore driver (an independent implementation of the format).
Volumes are sub-crops of the real crop fixture, meshed with 16-voxel nodes so that a few
seconds cover several blocks.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import re
import signal
import struct
import subprocess
import time

import numpy as np
import pytest
import tensorstore as ts

from gpumesh import storage
from gpumesh.errors import DestinationError, InvalidMeshError
from gpumesh.pipeline import SCRATCH, MeshOptions, run_mesh
from gpumesh.reader import Manifest, ShardedMultiresSource, load_mesh, open_mesh
from gpumesh.sharding import (MAX_SEGMENTS_PER_MINISHARD, ShardFormatError, ShardingOptions, ShardingSpec, build_shard,
                              choose_bits, murmurhash3_x86_128_low64)
from gpumesh.validate import validate
from gpumesh.writer import SegmentTable, convert_mesh, segment_num_lods, split_segments

from conftest import VOXEL_SIZE, cli_command, tree_files, write_zarr

CHUNK = 16
SMALL = 64  # 8 blocks, about a second
BIG = 96  # 8 larger blocks, several seconds with one worker (the kill / resume test)
VS_ARG = ",".join(str(int(v)) for v in VOXEL_SIZE)


def _cli(*args, wait=True):
    cmd = cli_command() + [str(a) for a in args]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def _mesh(arr, dest, sharding=None, **kw):
    return run_mesh(arr, str(dest), options=MeshOptions(chunk_size=CHUNK, sharding=sharding), voxel_size=VOXEL_SIZE,
                    workers=1, **kw)


@pytest.fixture(scope="module")
def small(crop):
    return np.ascontiguousarray(crop[:SMALL, :SMALL, :SMALL])


@pytest.fixture(scope="module")
def outputs(small, tmp_path_factory):
    """The small volume meshed by the CLI (default: sharded; --unsharded) and with other shardings."""
    root = tmp_path_factory.mktemp("sharded")
    src = root / "src.zarr"
    write_zarr(src, small, chunk=32)
    common = ["--voxel-size", VS_ARG, "--chunk-size", CHUNK, "--workers", 1, "--quiet"]
    for name, extra in (("sharded", []), ("unsharded", ["--unsharded"])):
        r = _cli("mesh", src, root / name, *common, *extra)
        assert r.returncode == 0, r.stderr
    variants = {
        # several shards and minishards, gzipped manifests
        "gzip": ShardingOptions(shard_bits=2, minishard_bits=2, data_encoding="gzip"),
        # identity hash with preshift, raw minishard indices
        "identity": ShardingOptions(hash="identity", preshift_bits=1, shard_bits=1, minishard_bits=3,
                                    minishard_index_encoding="raw"),
    }
    for name, sharding in variants.items():
        _mesh(small, root / name, sharding)
    return root


def _sharded_kvstore(dest) -> ts.KvStore:
    """TensorStore's own sharded kvstore over a mesh directory, keyed by 8-byte big-endian IDs."""
    info = json.loads((dest / "info").read_text())
    return ts.KvStore.open({
        "driver": "neuroglancer_uint64_sharded",
        "base": storage.kvstore_spec(str(dest)),
        "metadata": info["sharding"],
    }).result()


# ------------------------------------------------------------------------------------------
# Format units


def test_murmurhash_places_ids_like_tensorstore(tmp_path):
    """IDs written through TensorStore's driver land in the shard and minishard our hash says."""
    spec = ShardingSpec(shard_bits=3, minishard_bits=2, minishard_index_encoding="gzip")
    kv = ts.KvStore.open({"driver": "neuroglancer_uint64_sharded", "base": {"driver": "file", "path": str(tmp_path) + "/"},
                          "metadata": spec.to_json()}).result()
    rng = np.random.default_rng(1)
    ids = np.unique(np.concatenate([np.arange(1, 120, dtype=np.uint64), rng.integers(0, 2**63, 120, dtype=np.uint64),
                                    np.array([2**64 - 1], np.uint64)]))
    txn = ts.Transaction()
    for i in ids.tolist():
        kv.with_transaction(txn).write(struct.pack(">Q", i), b"x").result()
    txn.commit_sync()
    shards, minishards = spec.locate(ids)
    found = 0
    for name in os.listdir(tmp_path):
        shard = spec.parse_shard_key(name)
        assert shard is not None, name
        blob = (tmp_path / name).read_bytes()
        for ms, (a, b) in enumerate(spec.decode_shard_index(blob).tolist()):
            if a == b:
                continue
            for seg in spec.decode_minishard_index(blob[a:b])[0].tolist():
                j = int(np.searchsorted(ids, np.uint64(seg)))
                assert (shards[j], minishards[j]) == (shard, ms), seg
                found += 1
    assert found == len(ids)
    # vectorised and scalar calls agree
    assert int(murmurhash3_x86_128_low64(ids)[5]) == int(murmurhash3_x86_128_low64(int(ids[5])))


def test_shard_names_and_rule():
    assert ShardingSpec(shard_bits=0).shard_key(0) == "0.shard"
    assert ShardingSpec(shard_bits=5).shard_key(3) == "03.shard"
    assert ShardingSpec(shard_bits=9).shard_key(0x1AB) == "1ab.shard"
    spec = ShardingSpec(shard_bits=5)
    assert spec.parse_shard_key("03.shard") == 3
    assert spec.parse_shard_key("3.shard") is None and spec.parse_shard_key("20.shard") is None
    # the automatic rule: few segments -> one shard, one minishard; minishards of <= 256 on average
    assert choose_bits(10, 10_000) == (0, 0)
    assert choose_bits(256, 0) == (0, 0) and choose_bits(257, 0) == (0, 1)   # <= 256, not < 256
    assert choose_bits(2523, 80 << 20) == (0, 4)
    s, m = choose_bits(3_000_000, 40 << 30)
    assert (40 << 30) >> s <= 128 << 20 and -(-3_000_000 // (1 << (s + m))) <= MAX_SEGMENTS_PER_MINISHARD
    assert choose_bits(3000, 0, shard_bits=3) == (3, 1)
    assert choose_bits(3000, 0, minishard_bits=0)[1] == 0
    with pytest.raises(ValueError):
        ShardingOptions(hash="md5").validate()
    with pytest.raises(ValueError):
        MeshOptions(format="legacy", max_lods=1, sharding=ShardingOptions()).validate()


def test_build_shard_deterministic_gzip():
    spec = ShardingSpec(shard_bits=0, minishard_bits=1, data_encoding="gzip")
    items = [(7, b"data7", b"manifest7"), (3, b"", b"m3"), (12, b"d12" * 50, b"m12")]
    a, b = build_shard(spec, items), build_shard(spec, list(reversed(items)))
    assert a == b
    # gzip members carry mtime 0
    start, end = (int(v) for v in spec.decode_shard_index(a)[0])
    assert a[start:start + 2] == b"\x1f\x8b" and a[start + 4:start + 8] == b"\0\0\0\0"
    ids, starts, sizes = spec.decode_minishard_index(a[start:end])
    for seg, s0, n in zip(ids.tolist(), starts.tolist(), sizes.tolist()):
        payload = gzip.decompress(a[s0:s0 + n])
        prefix = dict((i, p) for i, p, _ in items)[seg]
        assert payload == dict((i, m) for i, _, m in items)[seg]
        assert a[s0 - len(prefix):s0] == prefix


# ------------------------------------------------------------------------------------------
# The mesh command


def test_cli_writes_sharded_by_default_and_validates(outputs):
    dest = outputs / "sharded"
    info = json.loads((dest / "info").read_text())
    assert info["sharding"]["@type"] == "neuroglancer_uint64_sharded_v1"
    assert info["sharding"]["hash"] == "murmurhash3_x86_128"
    assert info["sharding"]["minishard_index_encoding"] == "gzip" and info["sharding"]["data_encoding"] == "raw"
    names = sorted(os.listdir(dest))
    assert any(n.endswith(".shard") for n in names)
    assert not any(n.endswith(".index") or n.isdigit() for n in names)
    assert "sharding" not in json.loads((outputs / "unsharded" / "info").read_text())
    r = _cli("validate", dest)
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("gzip", "identity"):
        rep = validate(str(outputs / name))
        assert rep.ok, rep.errors[:5]
        assert rep.num_segments == validate(str(outputs / "unsharded")).num_segments


@pytest.mark.parametrize("name", ["sharded", "gzip", "identity"])
def test_tensorstore_driver_reads_every_manifest_and_fragment_data(outputs, name):
    """TensorStore's sharded kvstore finds every segment; bytes equal the unsharded output."""
    dest, plain = outputs / name, outputs / "unsharded"
    kv = _sharded_kvstore(dest)
    ids = sorted(int(n[:-6]) for n in os.listdir(plain) if n.endswith(".index"))
    assert ids
    listed = sorted(struct.unpack(">Q", k)[0] for k in kv.list().result())
    assert listed == ids
    for seg in ids:
        manifest = (plain / f"{seg}.index").read_bytes()
        data = (plain / str(seg)).read_bytes()
        got = kv.read(struct.pack(">Q", seg)).result()
        assert got.state == "value" and bytes(got.value) == manifest, seg
        total = Manifest.from_bytes(manifest).total_bytes
        assert total == len(data)
        # 16-byte key: the `total` bytes immediately before the chunk, raw
        before = kv.read(struct.pack(">QQ", seg, total)).result()
        assert bytes(before.value) == data, seg
    assert open_mesh(str(dest)).segment_ids() == ids
    shard_files = [n for n in os.listdir(dest) if n.endswith(".shard")]
    assert 1 <= len(shard_files) <= 1 << json.loads((dest / "info").read_text())["sharding"]["shard_bits"]


def test_reader_on_sharded(outputs):
    src = open_mesh(str(outputs / "gzip"))
    assert isinstance(src, ShardedMultiresSource)
    plain = open_mesh(str(outputs / "unsharded"))
    ids = plain.segment_ids()
    for seg in ids[:: max(1, len(ids) // 6)]:
        for lod in range(src.manifest(seg).num_lods):
            a = load_mesh(src, seg, lod)
            b = load_mesh(plain, seg, lod)
            assert np.array_equal(a.vertices, b.vertices) and np.array_equal(a.faces, b.faces)
    assert src.manifest_bytes(2**63 + 5) is None
    rep = validate(src.kv, segments=[ids[0], 2**63 + 5])
    assert rep.num_segments == 1 and rep.num_errors == 1 and "not found" in rep.errors[0]


def test_a_sharding_without_its_optional_encodings_reads_as_raw(small, outputs, tmp_path):
    """The spec makes ``minishard_index_encoding`` and ``data_encoding`` optional, ``"raw"``
    when left out (gpumesh writes both; another tool's mesh may not): such a mesh reads, and
    validates, as TensorStore reads it."""
    dest = tmp_path / "raw"
    _mesh(small, dest, ShardingOptions(shard_bits=1, minishard_bits=1, minishard_index_encoding="raw",
                                       data_encoding="raw"))
    info = json.loads((dest / "info").read_text())
    del info["sharding"]["minishard_index_encoding"], info["sharding"]["data_encoding"]
    (dest / "info").write_text(json.dumps(info))
    spec = ShardingSpec.from_json(info["sharding"])
    assert (spec.minishard_index_encoding, spec.data_encoding) == ("raw", "raw")
    rep = validate(str(dest))
    assert rep.num_errors == 0 and rep.num_segments > 0, rep.errors[:3]
    plain = open_mesh(str(outputs / "unsharded"))
    ids = plain.segment_ids()
    assert open_mesh(str(dest)).segment_ids() == ids
    kv = _sharded_kvstore(dest)
    for seg in ids[:: max(1, len(ids) // 6)]:
        assert bytes(kv.read(struct.pack(">Q", seg)).result().value) == plain.manifest_bytes(seg)
        a, b = load_mesh(str(dest), seg, 0), load_mesh(plain, seg, 0)
        assert np.array_equal(a.vertices, b.vertices) and np.array_equal(a.faces, b.faces)


def test_empty_volume_sharded(tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = _mesh(np.zeros((10, 9, 8), np.uint64), tmp_path / "out", ShardingOptions())
    assert summary.segments == 0 and list(tree_files(tmp_path / "out")) == ["info"]
    rep = validate(str(tmp_path / "out"))
    assert rep.ok and rep.num_segments == 0
    assert open_mesh(str(tmp_path / "out")).segment_ids() == []


def test_deterministic_and_memory_kvstore(small, outputs, tmp_path, monkeypatch):
    """The same pipeline writes to memory:// (no file touched) the same bytes as to a directory."""
    monkeypatch.chdir(tmp_path)
    url = "memory://gpumesh_test_sharded/out/"
    _mesh(small, url, ShardingOptions(shard_bits=2, minishard_bits=2, data_encoding="gzip"))
    assert os.listdir(tmp_path) == []
    rep = validate(url)
    assert rep.ok and rep.num_segments > 0, rep.errors[:5]
    kv = storage.open_kvstore(url)
    mem = {k: storage.read(kv, k) for k in storage.list_keys(kv)}
    assert mem == tree_files(outputs / "gzip")


def test_bulk_writes_skip_the_fsync_of_each_file_and_flush_once(tmp_path):
    """write_many(sync=False) writes through a second handle on the same directory with
    TensorStore's file_io_sync off (one per store); other drivers keep their own handle;
    flush syncs a local store's file system and says so when it cannot."""
    kv = storage.open_kvstore(tmp_path / "d")
    storage.write_many(kv, [("a", b"1"), ("b/c", b"22")], sync=False)
    assert storage.read(kv, "a") == b"1" and storage.read(kv, "b/c") == b"22"
    bulk = storage._unsynced(kv)
    assert bulk is storage._unsynced(storage.open_kvstore(tmp_path / "d"))

    def file_io_sync(store):   # a resource of the spec (TensorStore 0.1.86) or of its context (0.1.81)
        spec = store.spec(retain_context=True).to_json()
        return spec["file_io_sync"] if "file_io_sync" in spec else spec["context"]["file_io_sync"]

    assert file_io_sync(bulk) is False
    assert file_io_sync(kv) is True
    storage.flush(kv)
    mem = storage.open_kvstore("memory://gpumesh_test_flush/")
    assert storage._unsynced(mem) is mem
    storage.write_many(mem, [("a", b"1")], sync=False)
    storage.flush(mem)
    with pytest.raises(DestinationError):
        storage.flush(storage.open_kvstore(tmp_path / "never-written"))


def test_delete_prefix_removes_the_keys_and_the_folders_it_leaves_empty(tmp_path):
    """delete_prefix of a folder: its keys at any depth gone, the folders left empty removed
    (children before their parents), a folder with a file it did not delete kept, other keys
    untouched; a prefix that is no folder deletes keys only."""
    kv = storage.open_kvstore(tmp_path / "d")
    storage.write_many(kv, [("work/blocks/0_0_0.o1", b"1"), ("work/blocks/deep/x", b"2"), ("work/plan.json", b"3"),
                            ("workbench", b"4"), ("info", b"5"), ("wo", b"6")])
    storage.delete_prefix(kv, "work/")
    assert storage.list_keys(kv) == ["info", "wo", "workbench"]
    assert sorted(os.listdir(tmp_path / "d")) == ["info", "wo", "workbench"]
    storage.write_many(kv, [("s/a/1", b"1"), ("s/b/2", b"2"), ("s.txt", b"7")])
    os.makedirs(tmp_path / "d" / "s" / "c")
    (tmp_path / "d" / "s" / "c" / "other").write_bytes(b"not a key it deletes")
    storage.delete_prefix(kv, "s/a")        # no folder: keys only, the empty folder stays
    assert storage.list_keys(kv, "s/") == ["s/b/2", "s/c/other"] and (tmp_path / "d" / "s" / "a").is_dir()
    storage.delete_prefix(kv, "s/")
    assert storage.list_keys(kv) == ["info", "s.txt", "wo", "workbench"]


def test_locations_are_shown_as_given_and_compared_as_folders(tmp_path):
    """Messages show a JSON spec as JSON (what the CLI takes back), a path as given, an opened
    store as its URL; a folder lies within another only below it, not beside it under a longer
    name (``v.zarr-mesh`` beside ``v.zarr``)."""
    spec = {"driver": "file", "path": str(tmp_path / "d") + "/"}
    assert json.loads(storage.display(spec)) == spec
    assert storage.display(tmp_path / "d") == str(tmp_path / "d")
    assert storage.display(storage.open_kvstore(tmp_path / "d")) == (tmp_path / "d").as_uri() + "/"
    src = storage.kvstore_spec(tmp_path / "v.zarr")
    assert storage.within(storage.kvstore_spec(tmp_path / "v.zarr" / "mesh"), src)
    assert storage.within(storage.kvstore_spec(str(tmp_path / "v.zarr") + "/"), src)
    assert not storage.within(storage.kvstore_spec(tmp_path / "v.zarr-mesh"), src)
    assert not storage.within(src, storage.kvstore_spec(tmp_path / "v.zarr-mesh"))


def test_only_unsynced_bulk_writes_skip_the_fsync_and_a_range_past_the_end_reads_empty(tmp_path, monkeypatch):
    """write_many goes through the handle without fsync only when asked (sync=False): the
    shard files and info written with sync=True stay fsynced each.  A byte range past a
    value's end reads as b"" (so the caller's length check names a truncated shard), a
    missing key as None."""
    kv = storage.open_kvstore(tmp_path / "d")
    used = []
    real = storage._unsynced
    monkeypatch.setattr(storage, "_unsynced", lambda k: used.append(k) or real(k))
    storage.write_many(kv, [("a", b"12345")])
    assert used == []
    storage.write_many(kv, [("b", b"1")], sync=False)
    assert len(used) == 1
    assert storage.read(kv, "a", (1, 3)) == b"23"
    assert storage.read(kv, "a", (2, 9)) == b"" and storage.read(kv, "a", (7, 9)) == b""
    assert storage.read(kv, "missing", (0, 2)) is None


def test_s3_endpoint_reaches_every_s3_store_of_a_spec(tmp_path, monkeypatch):
    """AWS_ENDPOINT_URL_S3 wins over AWS_ENDPOINT_URL (as in the AWS CLI); every s3 store of a
    spec gets it, a URL given as ``kvstore`` or ``base`` (an adapter over S3) included; an
    endpoint already given is kept; relative file paths become absolute at any depth."""
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    assert storage.s3_endpoint() is None
    assert storage.kvstore_spec("s3://bkt/m") == {"driver": "s3", "bucket": "bkt", "path": "m/"}   # AWS's own
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic:9000")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3only:9000")
    assert storage.s3_endpoint() == "http://s3only:9000"
    want = {"driver": "s3", "bucket": "bkt", "path": "db/", "endpoint": "http://s3only:9000"}
    assert storage.kvstore_spec("s3://bkt/db") == want
    got = storage.kvstore_spec({"driver": "ocdbt", "base": "s3://bkt/db/"})
    assert got["base"] == want
    plain = {"driver": "s3", "bucket": "bkt", "path": "db/"}
    assert storage.kvstore_spec({"driver": "ocdbt", "base": plain})["base"] == want
    mine = dict(want, endpoint="https://mine")
    assert storage.kvstore_spec({"driver": "ocdbt", "base": mine})["base"] == mine
    monkeypatch.chdir(tmp_path)
    got = storage.kvstore_spec({"driver": "ocdbt", "base": {"driver": "file", "path": "rel/db/"}})
    assert got["base"] == {"driver": "file", "path": os.path.join(os.getcwd(), "rel", "db") + "/"}


@pytest.mark.parametrize("err,expect", [(0, "done"), (None, "sync"), (errno.ENOSYS, "sync"),
                                        (errno.EINVAL, "sync"), (errno.EIO, "error"), (errno.ENOSPC, "error")])
def test_flush_falls_back_to_sync_and_reports_write_errors(tmp_path, monkeypatch, err, expect):
    """flush: syncfs; sync where libc or the file system lacks it; a write error it reports
    is a DestinationError naming the directory."""
    kv = storage.open_kvstore(tmp_path / "d")
    storage.write(kv, "a", b"1")
    synced = []
    monkeypatch.setattr(storage, "_syncfs", lambda fd: err)
    monkeypatch.setattr(storage.os, "sync", lambda: synced.append(1))
    if expect == "error":
        with pytest.raises(DestinationError, match=re.escape(str(tmp_path / "d")) + ".*" + os.strerror(err)):
            storage.flush(kv)
    else:
        storage.flush(kv)
        assert synced == ([1] if expect == "sync" else [])


def test_syncfs_syncs_a_real_directory(tmp_path):
    import errno

    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        got = storage._syncfs(fd)
    finally:
        os.close(fd)
    if got is None:
        pytest.skip("this libc has no syncfs")
    assert got == 0
    # the call reaches the kernel: a closed descriptor is its EBADF (a no-op returned 0)
    assert storage._syncfs(fd) == errno.EBADF


@pytest.mark.parametrize("fmt", ["multires", "legacy"])
def test_unsharded_files_are_on_disk_before_info(small, outputs, tmp_path, monkeypatch, fmt):
    """The segments' files of an unsharded or legacy mesh, written without an fsync each, are
    made durable by a flush after the last of them and before info (multires: the bytes of the
    CLI's unsharded output)."""
    at_flush = []

    def spy(kv, flush=storage.flush):
        at_flush.append([k for k in storage.list_keys(kv) if not k.startswith(SCRATCH)])
        flush(kv)

    monkeypatch.setattr(storage, "flush", spy)
    dest = tmp_path / fmt
    run_mesh(small, str(dest), options=MeshOptions(chunk_size=CHUNK, format=fmt), voxel_size=VOXEL_SIZE, workers=1)
    final = tree_files(dest)
    assert at_flush and not any("info" in keys for keys in at_flush)
    # every segment's files; only the keys written with an fsync of their own come after it
    assert set(final) - set(at_flush[-1]) == {"info", "segment_properties/info"} and len(final) > 10
    if fmt == "multires":
        assert final == tree_files(outputs / "unsharded")


@pytest.mark.parametrize("layout", ["gzip", "unsharded"])
@pytest.mark.parametrize("cap", ["none", "some"])
def test_assembly_past_its_memory_cap_reads_by_range(small, outputs, tmp_path, monkeypatch, layout, cap):
    """Task results past ASSEMBLY_CACHE_BYTES are read by byte range (headers, then fragments),
    the others once and whole: the files are the same either way."""
    import gpumesh.writer as writer

    made = []

    class Spy(writer.TaskResults):
        def __init__(self, kv, keys, **kwargs):
            super().__init__(kv, keys, **kwargs)
            made.append(self)

    monkeypatch.setattr(writer, "TaskResults", Spy)
    # "some": room for a few results (the job's results are 5-60 kB each); "none": no room
    monkeypatch.setattr(writer, "ASSEMBLY_CACHE_BYTES", 0 if cap == "none" else 120_000)
    sharding = ShardingOptions(shard_bits=2, minishard_bits=2, data_encoding="gzip") if layout == "gzip" else None
    _mesh(small, tmp_path / "out", sharding)
    (results,) = made
    kept, total = len(results.kept), len(results.keys)
    assert kept == 0 if cap == "none" else 0 < kept < total
    assert tree_files(tmp_path / "out") == tree_files(outputs / layout)


@pytest.mark.parametrize("layout", ["gzip", "unsharded"])
def test_one_process_past_its_cache_reads_fragments_in_spans_within_it(small, outputs, tmp_path, monkeypatch, layout):
    """One process writing the output keeps task results whole up to ASSEMBLY_CACHE_BYTES and
    reads the others' fragments of each shard (or wave) in spans, in the room the kept results
    leave (:meth:`TaskResults.prefetch`): the files of reading them one by one, in fewer reads;
    the spans dropped after each, the cap's count back to the kept results'.  The room was
    none: a result that did not fit set the count to the cap."""
    import gpumesh.writer as writer
    from test_scale import _CountingReads

    made, room = [], []

    class Spy(writer.TaskResults):
        def __init__(self, kv, keys, **kwargs):
            super().__init__(_CountingReads(kv), keys, **kwargs)
            made.append(self)

        def prefetch(self, rows, gap=writer.SPAN_GAP_BYTES):
            assert self.spans == {} and self.span_bytes == 0   # the last one's dropped
            super().prefetch(rows, gap)
            room.append(self.span_bytes)
            assert self.kept_bytes == sum(map(len, self.kept.values())) + self.span_bytes <= self.cache_bytes

    monkeypatch.setattr(writer, "TaskResults", Spy)
    monkeypatch.setattr(writer, "ASSEMBLY_CACHE_BYTES", 180_000)   # 3 of the job's results kept, 74 kB left
    sharding = ShardingOptions(shard_bits=2, minishard_bits=2, data_encoding="gzip") if layout == "gzip" else None
    _mesh(small, tmp_path / "spans", sharding)
    monkeypatch.setattr(Spy, "prefetch", lambda self, rows, gap=0: room.append(0))
    _mesh(small, tmp_path / "alone", sharding)
    spans, alone = made
    assert tree_files(tmp_path / "spans") == tree_files(tmp_path / "alone") == tree_files(outputs / layout)
    assert 0 < len(spans.kept) < len(spans.keys) and max(room) > 0
    assert sum(spans.kv.reads.values()) < sum(alone.kv.reads.values())
    assert spans.spans == {} and spans.kept_bytes == sum(map(len, spans.kept.values()))


def test_results_kept_whole_leave_the_spans_room(small, outputs, tmp_path, monkeypatch):
    """Where the task results do not all fit in one process's cap, those kept whole leave at
    least 1 / SPAN_ROOM_SHARE of it to the spans of the others (the last kept are let go): kept
    up to the cap, here to within a byte of it, they left each shard's spans no room and its
    fragments were read one by one.  The same bytes either way, in fewer reads."""
    import gpumesh.writer as writer
    from test_scale import _CountingReads

    made = []

    class Spy(writer.TaskResults):
        def __init__(self, kv, keys, **kwargs):
            super().__init__(_CountingReads(kv), keys, **kwargs)
            made.append(self)

    monkeypatch.setattr(writer, "TaskResults", Spy)
    sharding = ShardingOptions(shard_bits=2, minishard_bits=2, data_encoding="gzip")
    _mesh(small, tmp_path / "sizes", sharding)   # every result kept: their sizes, in the order read
    sizes = [len(blob) for blob in made.pop().kept.values()]
    assert len(sizes) > 6
    cap = sum(sizes[:4]) + 1   # 4 results fill it to a byte, the 5th does not fit
    monkeypatch.setattr(writer, "ASSEMBLY_CACHE_BYTES", cap)
    _mesh(small, tmp_path / "room", sharding)
    monkeypatch.setattr(writer, "SPAN_ROOM_SHARE", 1 << 62)   # no room left: as before
    _mesh(small, tmp_path / "full", sharding)
    room, full = made
    assert tree_files(tmp_path / "room") == tree_files(tmp_path / "full") == tree_files(outputs / "gzip")
    assert len(full.kept) == 4 and full.kept_bytes == cap - 1
    assert 0 < len(room.kept) < 4 and cap - room.kept_bytes >= cap // 4
    assert sum(room.kv.reads.values()) < sum(full.kv.reads.values())


class _Killed(Exception):
    pass


@pytest.mark.parametrize("waves", [False, True])
def test_resume_skips_finished_shards(small, outputs, tmp_path, monkeypatch, waves):
    """An assembly interrupted after a shard: the resumed run skips it and ends byte-identical
    (also when the index is read again shard by shard: a wave per shard)."""
    import gpumesh.writer as writer

    if waves:
        monkeypatch.setattr(writer, "ASSEMBLY_INDEX_BYTES", 1)

    sharding = ShardingOptions(shard_bits=2, minishard_bits=2, data_encoding="gzip")
    dest = tmp_path / "out"
    real = writer.build_shard
    calls = []

    def failing(spec, items):
        calls.append(1)
        if len(calls) == 2 and not resumed:
            raise _Killed("killed while building the second shard")
        return real(spec, items)

    resumed = False

    monkeypatch.setattr(writer, "build_shard", failing)
    with pytest.raises(_Killed):
        _mesh(small, dest, sharding)
    assert len([n for n in os.listdir(dest) if n.endswith(".shard")]) == 1
    assert not (dest / "info").exists()
    calls.clear()
    resumed = True
    written = []
    summary = _mesh(small, dest, sharding, resume=True, write_progress=lambda d, t: written.append((d, t)))
    shards = len([n for n in os.listdir(dest) if n.endswith(".shard")])
    assert len(calls) == shards - 1 and summary.tasks_resumed == summary.tasks
    # the writing's progress starts from the segments of the shard written before
    assert 0 < written[0][0] < summary.segments and written[-1] == (summary.segments, summary.segments)
    assert tree_files(dest) == tree_files(outputs / "gzip")
    assert summary.segments == validate(str(dest)).num_segments


@pytest.mark.parametrize("waves", [False, True])
def test_a_resume_after_every_shard_was_written_reads_no_wave(small, outputs, tmp_path, monkeypatch, waves):
    """An assembly stopped after its last shard, before its info: the resumed run writes no
    shard again and, past the index cap, reads no wave of entries for none (it read the spill, or
    every header, once more)."""
    import gpumesh.writer as writer

    if waves:
        monkeypatch.setattr(writer, "ASSEMBLY_INDEX_BYTES", 1)
    sharding = ShardingOptions(shard_bits=2, minishard_bits=2, data_encoding="gzip")
    dest = tmp_path / "out"
    real = writer.mesh_info

    def killed(*args, **kwargs):   # (made just before the info is written)
        raise _Killed("killed after the last shard")

    monkeypatch.setattr(writer, "mesh_info", killed)
    with pytest.raises(_Killed):
        _mesh(small, dest, sharding)
    assert len([n for n in os.listdir(dest) if n.endswith(".shard")]) == 4 and not (dest / "info").exists()
    monkeypatch.setattr(writer, "mesh_info", real)
    built = []
    monkeypatch.setattr(writer, "build_shard", lambda spec, items: built.append(1))
    waves_read = _spy_waves(monkeypatch, writer)
    summary = _mesh(small, dest, sharding, resume=True)
    assert not built and waves_read == [] and summary.index_waves == 0
    assert tree_files(dest) == tree_files(outputs / "gzip")


@pytest.mark.parametrize("stop_at", ["blocks/", "shards/"])   # deleting the task results, the shards' records
def test_a_run_stopped_while_deleting_its_scratch_area_resumes(small, outputs, tmp_path, monkeypatch, stop_at):
    """The output is written (``info`` too) and the run is stopped (SIGTERM, a kill) while it
    deletes its scratch area, which deletes in no set order: the plan outlives the task results,
    so ``--resume``, which the stop's line advises, is not refused as "a finished mesh" with the
    rest of the scratch area left in it; it ends with the uninterrupted bytes and no scratch."""
    import gpumesh.pipeline as pipeline

    sharding = ShardingOptions(shard_bits=2, minishard_bits=2, data_encoding="gzip")
    dest = tmp_path / "out"
    real = storage.delete_prefix
    calls = []

    def stopped_halfway(kv, prefix):
        calls.append(prefix)
        if not prefix.endswith(stop_at) or prefix == SCRATCH:   # before it (the plan, "", is last)
            return real(kv, prefix)
        # the worst order: the plan first, then half of the rest
        keys = sorted(storage.list_keys(kv, prefix), key=lambda k: not k.endswith("plan.json"))
        assert keys   # something to delete: the task results, the shards' records
        for key in keys[:max(1, len(keys) // 2)]:
            kv.delete_range(ts.KvStore.KeyRange(inclusive_min=key, exclusive_max=key + "\x00")).result()
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.storage, "delete_prefix", stopped_halfway)
    with pytest.raises(KeyboardInterrupt):
        _mesh(small, dest, sharding)
    assert (dest / "info").exists() and (dest / SCRATCH).exists()
    monkeypatch.setattr(pipeline.storage, "delete_prefix", real)
    _mesh(small, dest, sharding, resume=True)
    assert tree_files(dest) == tree_files(outputs / "gzip")


def test_a_run_resumed_while_writing_writes_with_every_worker(small, outputs, tmp_path, monkeypatch):
    """Every task was done, the output not: the resumed run still writes with its workers (the
    pool was sized by the tasks left, so such a run wrote everything in the main process)."""
    import gpumesh.writer as writer

    sharding = ShardingOptions(shard_bits=2, minishard_bits=2, data_encoding="gzip")
    dest = tmp_path / "out"
    real = writer.build_shard

    def failing(spec, items):
        raise _Killed("killed while building a shard")

    monkeypatch.setattr(writer, "build_shard", failing)
    with pytest.raises(_Killed):
        _mesh(small, dest, sharding)
    monkeypatch.setattr(writer, "build_shard", real)
    summary = run_mesh(small, str(dest), options=MeshOptions(chunk_size=CHUNK, sharding=sharding),
                       voxel_size=VOXEL_SIZE, workers=2, resume=True)
    assert summary.tasks_resumed == summary.tasks and summary.workers == 2
    assert tree_files(dest) == tree_files(outputs / "gzip")


def test_kill_and_resume_cli(crop, tmp_path):
    """SIGKILL a real CLI run after some blocks finished; --resume gives the uninterrupted bytes."""
    big = np.ascontiguousarray(crop[:BIG, :BIG, :BIG])
    src = tmp_path / "src.zarr"
    write_zarr(src, big, chunk=32)
    dest = tmp_path / "killed"
    args = ["mesh", src, dest, "--voxel-size", VS_ARG, "--chunk-size", CHUNK, "--workers", 1, "--quiet"]
    proc = _cli(*args, wait=False)
    blocks = dest / SCRATCH / "blocks"

    def finished_blocks() -> int:
        # only complete task results (x_y_z.coarse@STAMP.hBYTES, x_y_z.o<octant>@STAMP.hBYTES); TensorStore's
        # in-flight temporary files don't count
        if not blocks.is_dir():
            return 0
        return sum(1 for n in os.listdir(blocks)
                   if re.fullmatch(r"\d+_\d+_\d+(\.coarse|\.o[0-7])?@[0-9a-f]{16}\.h[0-9]+", n))

    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if finished_blocks() >= 1:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
    finished = finished_blocks()
    from gpumesh.pipeline import MeshOptions, Plan

    tasks = len(Plan.make(big.shape, MeshOptions(chunk_size=CHUNK)).tasks())
    assert 1 <= finished < tasks and not (dest / "info").exists()
    r = _cli(*args, "--resume", "--summary-json", tmp_path / "summary.json")
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["tasks_resumed"] >= finished
    ref = tmp_path / "ref"
    _mesh(big, ref, ShardingOptions())
    got, want = tree_files(dest), tree_files(ref)
    assert sorted(got) == sorted(want) and got == want
    assert validate(str(dest)).ok


def test_cli_summary_and_its_json_give_the_figures_of_the_output(small, tmp_path):
    """The end summary's lines and ``--summary-json`` give the same figures, those of what was
    written: the segments, triangles and fragments of each LOD as the validator counts them, the
    bytes of the shards, the plan's blocks and tasks, and meshing and writing seconds that add up
    to the whole.  The command leaves this process's SIGTERM handler as it found it."""
    from click.testing import CliRunner

    from gpumesh.cli import main
    from gpumesh.pipeline import Plan

    src = tmp_path / "src.zarr"
    write_zarr(src, small, chunk=32)
    dest = tmp_path / "out"
    before = signal.getsignal(signal.SIGTERM)
    try:
        r = CliRunner().invoke(main, ["mesh", str(src), str(dest), "--voxel-size", VS_ARG, "--chunk-size", str(CHUNK),
                                      "--workers", "1", "--device", "cpu", "--quiet", "--shard-bits", "1",
                                      "--summary-json", str(tmp_path / "summary.json")])
        assert r.exit_code == 0, r.output
        assert signal.getsignal(signal.SIGTERM) is before
    finally:
        signal.signal(signal.SIGTERM, before)
    s = json.loads((tmp_path / "summary.json").read_text())
    report = validate(str(dest))
    assert report.ok and s["segments"] == report.num_segments > 0
    assert s["triangles_per_lod"] == [lod["triangles"] for lod in report.per_lod]
    assert s["fragments_per_lod"] == [lod["fragments"] for lod in report.per_lod]
    assert s["bytes"] == sum(p.stat().st_size for p in dest.glob("*.shard")) > 0
    plan = Plan.make(small.shape, MeshOptions(chunk_size=CHUNK))
    assert (s["blocks"], s["tasks"], s["tasks_resumed"], s["workers"]) == (len(plan.blocks()), len(plan.tasks()), 0, 1)
    assert min(s["seconds_meshing"], s["seconds_writing"]) >= 0
    assert s["seconds_meshing"] + s["seconds_writing"] == pytest.approx(s["seconds"])
    out = r.stdout.splitlines()
    assert f"segments:  {s['segments']}" in out and f"bytes:     {s['bytes']:,} (mesh files written)" in out
    lods = [line.split() for line in out if line.startswith("LOD ")]
    assert [(int(w[2].replace(",", "")), w[3], int(w[4].replace(",", "")), w[5]) for w in lods] == \
        [(t, "triangles", f, "fragments") for t, f in zip(s["triangles_per_lod"], s["fragments_per_lod"])]
    assert f"1 worker(s), device cpu, {s['blocks']} blocks in {s['tasks']} tasks, 0 resumed)" in r.stdout


def test_cli_options_reach_the_job(small, tmp_path):
    """Each option of ``gpumesh mesh`` reaches the job: the command writes the files that
    ``run_mesh`` writes with the same settings.  The settings are chosen so that each one
    changes the files here (checked when written, by dropping each option in turn: the test
    failed every time), e.g. ``--lods 2`` of 3 LODs, where some segments would get 3;
    ``--mip`` on a precomputed source of two scales, whose ``source_info.json`` names the
    destination."""
    from click.testing import CliRunner

    from gpumesh.cli import main

    src = tmp_path / "src.zarr"
    write_zarr(src, small, chunk=32)
    r = CliRunner().invoke(main, [
        "mesh", str(src), str(tmp_path / "cli"), "--voxel-size", "4,4,40", "--voxel-offset", "3,-5,7",
        "--bounds", "5,-3,9,53,45,57", "--axes", "zyx", "--chunk-size", "8", "--lods", "2",
        "--quality", "high", "--downsampling", "all", "--bits", "10", "--dust-threshold", "300",
        "--no-segment-properties", "--shard-bits", "1", "--workers", "1", "--quiet"])
    assert r.exit_code == 0, r.output
    options = MeshOptions(chunk_size=8, num_lods=2, quality="high", downsampling="all",
                          vertex_quantization_bits=10, dust_threshold=300, segment_properties=False,
                          sharding=ShardingOptions(shard_bits=1))
    run_mesh(str(src), str(tmp_path / "api"), options=options, voxel_size=(4, 4, 40), voxel_offset=(3, -5, 7),
             bounds=(5, -3, 9, 53, 45, 57), axes="zyx", workers=1)
    assert tree_files(tmp_path / "cli") == tree_files(tmp_path / "api") != {}

    pre = tmp_path / "pre"
    for arr, res in ((small, [32, 32, 40]), (np.ascontiguousarray(small[::2, ::2, ::2]), [64, 64, 80])):
        ts.open({"driver": "neuroglancer_precomputed", "kvstore": {"driver": "file", "path": str(pre)},
                 "multiscale_metadata": {"type": "segmentation", "data_type": "uint32", "num_channels": 1},
                 "scale_metadata": {"size": list(arr.shape), "resolution": res, "chunk_size": [32, 32, 32],
                                    "encoding": "raw"}},
                create=True).result()[ts.d["channel"][0]].write(arr.astype(np.uint32)).result()
    r = CliRunner().invoke(main, ["mesh", str(pre), str(tmp_path / "mip-cli"), "--mip", "1", "--chunk-size",
                                  str(CHUNK), "--workers", "1", "--quiet"])
    assert r.exit_code == 0, r.output
    run_mesh(str(pre), str(tmp_path / "mip-api"), options=MeshOptions(chunk_size=CHUNK, sharding=ShardingOptions()),
             mip=1, workers=1)
    cli, api = tree_files(tmp_path / "mip-cli"), tree_files(tmp_path / "mip-api")
    assert json.loads(cli.pop("source_info.json"))["mesh"] == "../mip-cli"
    assert json.loads(api.pop("source_info.json"))["mesh"] == "../mip-api"
    assert cli == api != {}


# ------------------------------------------------------------------------------------------
# Conversion


def test_convert_round_trip(outputs, tmp_path):
    plain = outputs / "unsharded"
    sharded = tmp_path / "sharded"
    r = _cli("convert", plain, sharded)
    assert r.returncode == 0, r.stderr
    # the same bytes as meshing straight into the sharded layout (same automatic rule)
    assert tree_files(sharded) == tree_files(outputs / "sharded")
    back = tmp_path / "back"
    r = _cli("convert", sharded, back, "--unsharded")
    assert r.returncode == 0, r.stderr
    assert tree_files(back) == tree_files(plain)
    # other parameters, through the API, and back
    res = convert_mesh(str(plain), str(tmp_path / "gz"), sharding=ShardingOptions(shard_bits=2, minishard_bits=2,
                                                                                   data_encoding="gzip"))
    assert res["shards"] >= 2 and tree_files(tmp_path / "gz") == tree_files(outputs / "gzip")
    convert_mesh(str(tmp_path / "gz"), str(tmp_path / "back2"), sharding=None)
    assert tree_files(tmp_path / "back2") == tree_files(plain)
    with pytest.raises(Exception):
        convert_mesh(str(plain), str(tmp_path / "back2"), sharding=None)  # not empty


_SLOW_CONVERT = r"""
import pathlib, sys, time
import gpumesh.writer as writer
from gpumesh.cli import main

marker = pathlib.Path(sys.argv[1])
build = writer.build_shard

def slow_build(*args, **kwargs):   # every shard waits, so that the test can stop the job mid-way
    marker.touch()
    time.sleep(1.0)
    return build(*args, **kwargs)

writer.build_shard = slow_build
main(sys.argv[2:])
"""


@pytest.mark.parametrize("sig, status, how", [(signal.SIGINT, 130, "interrupted"),
                                              (signal.SIGTERM, 143, "terminated (SIGTERM)")],
                         ids=["ctrl-c", "sigterm"])
def test_a_stopped_convert_says_so_in_one_line_and_leaves_no_info(outputs, tmp_path, sig, status, how):
    """Ctrl-C or SIGTERM during ``gpumesh convert``: one line, status 128 + the signal, no
    ``info`` in DEST (written last, so no reader trusts it), and ``--overwrite`` then writes the
    bytes of an uninterrupted conversion.  It used to end with a traceback (Ctrl-C) or no word
    at all (SIGTERM)."""
    import sys

    dest = tmp_path / "dest"
    marker = tmp_path / "building"
    args = ["convert", str(outputs / "unsharded"), str(dest), "--shard-bits", "2"]
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_CONVERT, str(marker)] + args, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 60
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the conversion never reached a shard"
        proc.send_signal(sig)
        err = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == status, (proc.returncode, err)
    assert err.strip().splitlines() == [f"gpumesh: {how}; {dest} is incomplete (no info): run it again with "
                                        f"--overwrite"], err
    assert not (dest / "info").exists()
    r = _cli(*args, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert validate(str(dest)).ok
    want = tmp_path / "want"
    assert _cli(*args[:2], str(want), *args[3:]).returncode == 0
    assert tree_files(dest) == tree_files(want)


def test_convert_from_a_plain_http_server_is_refused_before_the_destination_is_touched(outputs, tmp_path):
    """A plain HTTP server cannot list its files, which a conversion needs: a typed error that
    says so (it was TensorStore's NotImplementedError, a traceback in the CLI), raised before an
    ``overwrite`` deletes anything."""
    from gpumesh.errors import InvalidMeshError
    from gpumesh.viewer import serve

    dest = tmp_path / "dest"
    convert_mesh(str(outputs / "gzip"), str(dest), sharding=None)
    before = tree_files(dest)
    server, url = serve(str(outputs / "unsharded"), port=0)
    try:
        with pytest.raises(InvalidMeshError, match="cannot list its files .*not a plain HTTP server"):
            convert_mesh(url, str(dest), sharding=ShardingOptions(), overwrite=True)
    finally:
        server.stop()
    assert tree_files(dest) == before


def test_convert_refuses_bad_sources_and_destinations(outputs, small, tmp_path):
    from gpumesh.errors import DestinationExistsError, InvalidMeshError

    legacy = tmp_path / "legacy"
    run_mesh(small[:16, :16, :16], str(legacy), options=MeshOptions(chunk_size=CHUNK, format="legacy"),
             voxel_size=VOXEL_SIZE, workers=1)
    with pytest.raises(InvalidMeshError, match="only multi-resolution meshes"):
        convert_mesh(str(legacy), str(tmp_path / "x"))
    (tmp_path / "volume.zarr").mkdir()   # not a mesh at all (it said "only multi-resolution meshes")
    with pytest.raises(InvalidMeshError, match="no info file there: not a mesh directory"):
        convert_mesh(str(tmp_path / "volume.zarr"), str(tmp_path / "x"))
    with pytest.raises(InvalidMeshError, match="typo: no such directory$"):
        convert_mesh(str(tmp_path / "typo"), str(tmp_path / "x"))
    plain = tmp_path / "plain"
    for rel, blob in tree_files(outputs / "unsharded").items():
        (plain / rel).parent.mkdir(parents=True, exist_ok=True)
        (plain / rel).write_bytes(blob)
    for nested in (plain, plain / "inside"):
        with pytest.raises(ValueError, match="must not be the source or lie inside it"):
            convert_mesh(str(plain), str(nested), sharding=ShardingOptions())
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(DestinationExistsError, match="did not write .*keep.txt.*; choose another destination$"):
        convert_mesh(str(plain), str(busy), sharding=ShardingOptions())
    assert os.listdir(busy) == ["keep.txt"]
    with pytest.raises(DestinationExistsError, match="did not write .*keep.txt"):   # not gpumesh's to delete
        convert_mesh(str(plain), str(busy), sharding=ShardingOptions(), overwrite=True)
    (busy / "keep.txt").unlink()
    run_mesh(small[:16, :16, :16], str(busy), options=MeshOptions(chunk_size=CHUNK), voxel_size=VOXEL_SIZE,
             workers=1)
    with pytest.raises(DestinationExistsError, match="is not empty; pass --overwrite to replace the mesh there$"):
        convert_mesh(str(plain), str(busy), sharding=ShardingOptions())
    convert_mesh(str(plain), str(busy), sharding=ShardingOptions(), overwrite=True)   # over a mesh: replaced
    assert tree_files(busy) == tree_files(outputs / "sharded")
    # a data file shorter than its manifest says: the conversion stops and writes no info,
    # so nothing half-converted passes for a mesh
    seg = sorted(int(k[:-6]) for k in os.listdir(plain) if k.endswith(".index"))[0]
    (plain / str(seg)).write_bytes((plain / str(seg)).read_bytes()[:-1])
    for sharding in (None, ShardingOptions()):
        dest = tmp_path / f"cut-{sharding is None}"
        with pytest.raises(InvalidMeshError, match=f"segment {seg}: fragment data has"):
            convert_mesh(str(plain), str(dest), sharding=sharding)
        assert not (dest / "info").exists()


# ------------------------------------------------------------------------------------------
# Validator and CLI errors on bad sharded data


def _one_shard_dir(tmp_path, outputs, mutate):
    """Copy of the 'gzip' output with one shard file replaced by ``mutate(spec, name, blob)``."""
    dest = tmp_path / "bad"
    for rel, blob in tree_files(outputs / "gzip").items():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_bytes(blob)
    spec = ShardingSpec.from_json(json.loads((dest / "info").read_text())["sharding"])
    name = sorted(n for n in os.listdir(dest) if n.endswith(".shard"))[0]
    out = mutate(spec, name, (dest / name).read_bytes())
    if out is not None:
        (dest / name).write_bytes(out)
    return dest


def _has(rep, *words):
    assert not rep.ok
    assert any(all(w in e for w in words) for e in rep.errors), rep.errors[:10]


def test_validator_catches_bad_shards(tmp_path, outputs):
    # truncated: minishard index or chunk beyond the end
    _has(validate(str(_one_shard_dir(tmp_path / "a", outputs, lambda s, n, b: b[:-30]))), "outside")
    # shorter than its shard index
    _has(validate(str(_one_shard_dir(tmp_path / "b", outputs, lambda s, n, b: b[:20]))), "shorter than its shard index")

    def misplace(spec, name, blob):
        # a segment stored under an ID that hashes to another shard
        shard = spec.parse_shard_key(name)
        seg = next(i for i in range(10**6, 10**7) if spec.locate([i])[0][0] != shard)
        return build_shard(spec, [(seg, b"", b"m")])

    _has(validate(str(_one_shard_dir(tmp_path / "c", outputs, misplace))), "hashes to shard")

    def bad_gzip(spec, name, blob):
        idx = spec.decode_shard_index(blob)
        ms = int(np.flatnonzero(idx[:, 1] > idx[:, 0])[0])
        a, b = (int(v) for v in idx[ms])
        return blob[:a] + b"\0" * (b - a) + blob[b:]

    _has(validate(str(_one_shard_dir(tmp_path / "d", outputs, bad_gzip))), "gunzip")

    def rename(spec, name, blob):
        os.rename(tmp_path / "e" / "bad" / name, tmp_path / "e" / "bad" / ("0" + name))
        return None

    _has(validate(str(_one_shard_dir(tmp_path / "e", outputs, rename))), "unexpected shard file")

    def in_shard(spec, name):
        # the smallest segment ID that hashes to the shard file ``name``
        shard = spec.parse_shard_key(name)
        return next(i for i in range(1, 10**6) if spec.locate([i])[0][0] == shard)

    def claiming(size):
        # one segment whose manifest claims ``size`` fragment bytes before it, none stored there:
        # more than precede it, or few enough that they would start inside the shard index
        def mutate(spec, name, blob):
            m = Manifest(chunk_shape=[1, 1, 1], grid_origin=[0, 0, 0], num_lods=1, lod_scales=[1],
                         vertex_offsets=[[0, 0, 0]], fragment_positions=[np.zeros((1, 3), np.uint32)],
                         fragment_sizes=[[size]])
            return build_shard(spec, [(in_shard(spec, name), b"", m.to_bytes())])
        return mutate

    _has(validate(str(_one_shard_dir(tmp_path / "f", outputs, claiming(10**6)))), "inside the shard index")
    g = _one_shard_dir(tmp_path / "g", outputs, claiming(10))
    _has(validate(str(g), decode=False), "inside the shard index")
    src = open_mesh(str(g))
    seg = next(s for s in src.segment_ids() if src.manifest(s).total_bytes == 10)
    with pytest.raises(InvalidMeshError, match="inside the shard index"):
        load_mesh(src, seg, 0)
    assert [data for got, _, data in src.fetch([seg]) if got == seg] == [None]

    def wrong_minishard(spec, name, blob):
        # a segment of this shard whose minishard index sits under another minishard's range
        seg = in_shard(spec, name)
        out = bytearray(build_shard(spec, [(seg, b"", b"m")]))
        ms = int(spec.locate([seg])[1][0])
        other = (ms + 1) % spec.num_minishards
        out[16 * ms:16 * ms + 16], out[16 * other:16 * other + 16] = out[16 * other:16 * other + 16], out[16 * ms:16 * ms + 16]
        return bytes(out)

    _has(validate(str(_one_shard_dir(tmp_path / "h", outputs, wrong_minishard))), "hashes to", "minishard")


def _reindexed(spec, blob, change):
    """``blob`` (a shard as ``build_shard`` lays it out: index, chunks, minishard indices) with
    its minishard indices rebuilt from ``change(ms, ids, starts, sizes)``, which returns the
    lists to encode (or bytes: the stored index itself); the chunks stay where they were."""
    ib = spec.shard_index_bytes
    ranges = spec.decode_shard_index(blob)
    used = {ms: (int(a), int(b)) for ms, (a, b) in enumerate(ranges.tolist()) if b > a}
    chunks_end = min(a for a, _ in used.values())
    index, tail, pos = np.zeros((spec.num_minishards, 2), "<u8"), [], chunks_end
    for ms in range(spec.num_minishards):
        stored = b""
        if ms in used:
            a, b = used[ms]
            got = change(ms, *(v.tolist() for v in spec.decode_minishard_index(blob[a:b])))
            stored = got if isinstance(got, bytes) else spec.encode_minishard_index(*got)
        index[ms] = (pos - ib, pos - ib + len(stored))
        tail.append(stored)
        pos += len(stored)
    return index.tobytes() + blob[ib:chunks_end] + b"".join(tail)


def _first_used(spec, blob):
    return int(np.flatnonzero(np.diff(spec.decode_shard_index(blob), axis=1)[:, 0] > 0)[0])


def _in_first_minishard(edit):
    """A shard mutation: ``edit(ids, starts, sizes)`` applied to the first non-empty minishard."""
    def mutate(spec, blob):
        first = _first_used(spec, blob)
        return _reindexed(spec, blob, lambda ms, *entries: edit(*entries) if ms == first else entries)
    return mutate


def _inverted(spec, blob):
    ms = _first_used(spec, blob)
    start, end = np.frombuffer(blob, "<u8", 2, 16 * ms)
    return blob[:16 * ms] + np.array([end, start], "<u8").tobytes() + blob[16 * ms + 16:]


SHARD_DEFECTS = {
    # name: (mutate(spec, blob), words of the one error it must cause)
    "inverted minishard range": (_inverted, "is inverted"),
    "empty minishard index": (_in_first_minishard(lambda ids, starts, sizes: ([], [], [])),
                              "empty minishard index under a non-empty range"),
    "a segment listed twice": (_in_first_minishard(lambda ids, starts, sizes: (ids + ids[:1], starts + starts[:1],
                                                                               sizes + sizes[:1])),
                               "listed more than once"),
    "manifest past the end": (_in_first_minishard(lambda ids, starts, sizes: (ids, starts[:-1] + [10**9], sizes)),
                              "manifest bytes"),
    "manifest not gzip": (_in_first_minishard(lambda ids, starts, sizes: (ids, [starts[0] + 1] + starts[1:], sizes)),
                          "manifest in shard"),
    "minishard index not a multiple of 24": (_in_first_minishard(lambda *entries: gzip.compress(b"\0" * 25)),
                                             "not a multiple of 24"),
}


@pytest.mark.parametrize("defect", sorted(SHARD_DEFECTS))
def test_each_shard_defect_is_reported_alone(tmp_path, outputs, defect):
    mutate, words = SHARD_DEFECTS[defect]
    ok = _one_shard_dir(tmp_path / "ok", outputs, lambda spec, name, blob: _reindexed(
        spec, blob, lambda ms, ids, starts, sizes: (ids, starts, sizes)))
    assert tree_files(ok) == tree_files(outputs / "gzip")     # the rebuild itself changes nothing
    bad = str(_one_shard_dir(tmp_path, outputs, lambda spec, name, blob: mutate(spec, blob)))
    rep = validate(bad)
    assert rep.num_errors == 1 and words in rep.errors[0], rep.errors
    # the reader meets the defect as an InvalidMeshError (or reads around it), never another error
    src = open_mesh(bad)
    for seg in open_mesh(str(outputs / "gzip")).segment_ids():
        try:
            load_mesh(src, seg, 0)
        except InvalidMeshError:
            pass
    # a sample reads its segments by range as a reader does and does not check the shards'
    # layout (validate's docs): it sees the defects on a reader's path, not a repeated ID
    # or an empty minishard index
    assert validate(bad, sample=1000).ok == (defect in ("a segment listed twice", "empty minishard index"))


def test_a_cut_shard_reads_as_an_invalid_mesh(tmp_path, outputs):
    """Reads by range past the end of a truncated shard: ``InvalidMeshError`` naming the
    shard, from ``load_mesh`` and a sampled validation (TensorStore raises ``OUT_OF_RANGE``)."""
    from gpumesh.errors import InvalidMeshError

    whole = ShardedMultiresSource(storage.open_kvstore(str(outputs / "gzip")), json.loads(
        (outputs / "gzip" / "info").read_text()))
    bad = _one_shard_dir(tmp_path, outputs, lambda spec, name, blob: blob[:len(blob) // 2])
    name = sorted(n for n in os.listdir(bad) if n.endswith(".shard"))[0]
    spec = whole.sharding
    ids = [s for s in whole.segment_ids() if spec.shard_key(int(spec.locate([s])[0][0])) == name]
    cut = 0
    for seg in ids:
        try:
            load_mesh(str(bad), seg)
        except InvalidMeshError as exc:
            assert name in str(exc) and ("beyond end" in str(exc) or "unreadable" in str(exc)), exc
            cut += 1
    assert 0 < cut <= len(ids)
    rep = validate(str(bad), sample=1000)
    assert not rep.ok and not [e for e in rep.errors if "OUT_OF_RANGE" in e], rep.errors


def test_cli_sharding_flag_errors(tmp_path, real_zarr):
    dest = tmp_path / "out"
    for extra in (["--format", "legacy", "--sharded"], ["--unsharded", "--shard-bits", "2"],
                  ["--minishard-bits", "40"]):    # a 16 TiB shard index: refused before any work
        r = _cli("mesh", real_zarr, dest, "--voxel-size", VS_ARG, "--quiet", *extra)
        assert r.returncode == 2, r.stderr
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("gpumesh: error:"), r.stderr
        assert not dest.exists() or not os.listdir(dest)


@pytest.mark.parametrize("plan_lods,requested", [(1, None), (3, None), (5, None), (4, 2), (3, 3)])
def test_segment_table_lods_match_the_rule_per_segment(plan_lods, requested):
    """The assembly's LOD count (SegmentTable.num_lods, all segments at once) against
    segment_num_lods, segment by segment, on random fragment lists: segments without LOD 0,
    with gaps in their LODs, spread or not."""
    from gpumesh.pipeline import FRAG_DTYPE

    rng = np.random.default_rng(plan_lods * 10 + (requested or 0))
    rows = []
    for label in range(1, 400):
        spread = int(rng.choice([1, 2, 5, 40, 3000]))
        for _ in range(int(rng.integers(1, 12))):
            lod = int(rng.integers(0, plan_lods + 1)) if rng.random() < 0.5 else 0
            base = rng.integers(0, spread, size=3) >> lod
            rows.append((label, lod, *base.tolist()))
    index = np.zeros(len(rows), dtype=FRAG_DTYPE)
    for name, col in zip(("label", "lod", "x", "y", "z"), zip(*rows)):
        index[name] = col
    index = index[np.argsort(index["label"], kind="stable")]
    lab = index["label"]
    starts = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]])
    table = SegmentTable(plan_lods)
    table.add(index)
    assert np.array_equal(table.labels, lab[starts])
    got = table.num_lods(requested)
    want = []
    for s0, s1 in zip(starts, np.r_[starts[1:], len(index)]):
        e = index[s0:s1]
        lod0 = e[e["lod"] == 0]
        pos0 = np.stack([lod0["x"], lod0["y"], lod0["z"]], axis=1).astype(np.uint32)
        want.append(segment_num_lods(pos0, set(e["lod"].tolist()), plan_lods, requested))
    assert got.tolist() == want
    assert 0 in want and len(set(want)) > 1


@pytest.mark.parametrize("parts", [1, 2, 3, 7, 50])
def test_split_segments_keeps_segments_whole_and_balances_bytes(parts):
    from gpumesh.pipeline import FRAG_DTYPE

    rng = np.random.default_rng(parts)
    labels = np.sort(rng.choice(np.arange(1, 10_000), size=30, replace=False))
    rows = np.zeros(int(rng.integers(200, 400)), dtype=FRAG_DTYPE)
    rows["label"] = np.sort(rng.choice(labels, size=len(rows)))
    rows["size"] = rng.integers(1, 5000, size=len(rows))
    got = split_segments(rows, parts)
    assert 1 <= len(got) <= parts and all(len(g) for g in got)
    assert np.array_equal(np.concatenate(got), rows)
    for a, b in zip(got[:-1], got[1:]):
        assert a["label"][-1] != b["label"][0]        # no segment cut in two
    if parts <= 3:   # far fewer parts than segments: each part near an equal share of the bytes
        share = rows["size"].sum() / parts
        biggest = max(int(rows["size"][rows["label"] == s].sum()) for s in np.unique(rows["label"]))
        assert all(abs(int(g["size"].sum()) - share) <= biggest + 1 for g in got)


def _spy_waves(monkeypatch, writer) -> list:
    """Record each wave of the assembly: (segments, fragment entries, where it read them:
    "held" (the index held whole), "spill" (:class:`IndexSpill`) or "headers" (read again))."""
    waves = []
    real = writer._wave_rows

    def spy(results, index, labels, stats):
        rows = real(results, index, labels, stats)
        waves.append((labels.copy(), rows.copy(), "headers" if index is None else
                      "spill" if isinstance(index, writer.IndexSpill) else "held"))
        return rows

    monkeypatch.setattr(writer, "_wave_rows", spy)
    return waves


@pytest.mark.parametrize("spill", [True, False], ids=["spill", "headers"])
@pytest.mark.parametrize("layout", ["sharded", "gzip", "unsharded"])
@pytest.mark.parametrize("cap", ["one entry", "some"])
def test_assembly_past_its_index_cap_writes_in_waves(small, outputs, tmp_path, monkeypatch, layout, cap, spill):
    """Fragment entries past ASSEMBLY_INDEX_BYTES are not held: the shards (unsharded: runs of
    segments) are written in waves whose entries fit, each reading the entries again, from a
    temporary file (:class:`IndexSpill`) or, without one (``INDEX_SPILL`` off), from the
    results' headers, and keeping its own segments' entries.  The files are the same bytes;
    every segment is in exactly one wave, with all its entries; a wave holds more than the cap
    only when it is one shard (or one segment)."""
    import gpumesh.writer as writer

    waves = _spy_waves(monkeypatch, writer)
    spilled, real_group, real_rows_of = [], writer.IndexSpill.group, writer.IndexSpill.rows_of
    monkeypatch.setattr(writer.IndexSpill, "group",
                        lambda self, *a: (spilled.append(self.rows), real_group(self, *a))[1])
    monkeypatch.setattr(writer.IndexSpill, "rows_of",   # None: a grouped spill's wave
                        lambda self, *a: (spilled.append(None if self.grouped else self.rows),
                                          real_rows_of(self, *a))[1])
    entry = writer.INDEX_DTYPE.itemsize
    limit = entry if cap == "one entry" else 60 * entry
    monkeypatch.setattr(writer, "ASSEMBLY_INDEX_BYTES", limit)
    monkeypatch.setattr(writer, "INDEX_SPILL", spill)
    sharding = {"sharded": ShardingOptions(), "unsharded": None,
                "gzip": ShardingOptions(shard_bits=2, minishard_bits=2, data_encoding="gzip")}[layout]
    summary = _mesh(small, tmp_path / "out", sharding)
    assert tree_files(tmp_path / "out") == tree_files(outputs / layout)
    assert waves and all(kind == ("spill" if spill else "headers") for _, _, kind in waves)
    assert summary.index_spilled == spill and summary.index_waves == len(waves)
    labels = np.concatenate([lab for lab, _, _ in waves])
    assert len(labels) == len(np.unique(labels)) == summary.segments
    info = json.loads((tmp_path / "out" / "info").read_text())
    spec = ShardingSpec.from_json(info["sharding"]) if sharding is not None else None
    for lab, rows, _ in waves:
        assert set(np.unique(rows["label"]).tolist()) <= set(lab.tolist())
        units = len(lab) if spec is None else len(np.unique(spec.locate(lab)[0]))   # segments or shards
        if len(rows) * entry > limit:   # over the cap: a single shard or segment
            assert units == 1
    if cap == "one entry":   # a wave per shard (per segment)
        assert len(waves) == (summary.segments if spec is None else 1 << spec.shard_bits)
    if layout != "sharded":   # the default bits give this volume one shard
        assert len(waves) > 1
    # the spill written again wave by wave, from SPILL_GROUP_WAVES: read once for that, then
    # each wave its own entries alone; else read whole by each wave
    grouped = spill and len(waves) >= writer.SPILL_GROUP_WAVES
    assert summary.index_grouped == grouped and len(spilled) == (len(waves) + grouped if spill else 0)
    if grouped:   # the whole file once, then each wave its own
        assert spilled[1:] == [None] * len(waves)
        assert summary.index_bytes_read == (spilled[0] + sum(len(rows) for _, rows, _ in waves)) * entry
    else:   # the whole file by each wave (none without it)
        assert summary.index_bytes_read == sum(spilled) * entry and len(set(spilled)) <= 1


def test_the_index_spill_is_closed_when_the_assembly_ends_or_fails(small, outputs, tmp_path, monkeypatch):
    """The temporary file of fragment entries (:class:`IndexSpill`) is closed, which deletes it,
    when the assembly has written the output, and when it fails."""
    import gpumesh.writer as writer
    from gpumesh.errors import GpumeshError

    closed, real_close = [], writer.IndexSpill.close
    monkeypatch.setattr(writer.IndexSpill, "close", lambda self: (closed.append(self.rows), real_close(self)))
    monkeypatch.setattr(writer, "ASSEMBLY_INDEX_BYTES", 60 * writer.INDEX_DTYPE.itemsize)
    summary = _mesh(small, tmp_path / "ok", None)
    assert tree_files(tmp_path / "ok") == tree_files(outputs / "unsharded")
    assert summary.index_spilled and len(closed) == 1 and closed[0] > 60

    def failing(*args, **kwargs):
        raise GpumeshError("a write failed")

    monkeypatch.setattr(writer, "write_all_segments", failing)
    with pytest.raises(GpumeshError):
        _mesh(small, tmp_path / "failed", None)
    assert len(closed) == 2


def test_assembly_holds_the_index_whole_within_its_cap(small, outputs, tmp_path, monkeypatch):
    """Within ASSEMBLY_INDEX_BYTES (the default) the entries read once are used: one wave, no
    second read of the headers."""
    import gpumesh.writer as writer

    waves = _spy_waves(monkeypatch, writer)
    summary = _mesh(small, tmp_path / "out", ShardingOptions(shard_bits=2, minishard_bits=2, data_encoding="gzip"))
    assert tree_files(tmp_path / "out") == tree_files(outputs / "gzip")
    assert len(waves) == 1 and waves[0][2] == "held" and not summary.index_spilled and summary.index_waves == 0


@pytest.mark.parametrize("plan_lods", [1, 3])
def test_segment_table_merged_in_parts_equals_one_pass(plan_lods, monkeypatch):
    """A SegmentTable fed task by task, merging every few rows, holds what one pass over all the
    entries gives: each segment's LOD-0 node bounds, LODs, bytes per LOD and entry count."""
    from gpumesh.pipeline import FRAG_DTYPE
    from gpumesh.writer import LabelTable, SegmentTable

    rng = np.random.default_rng(plan_lods)
    index = np.zeros(3000, dtype=FRAG_DTYPE)
    index["label"] = rng.integers(1, 300, len(index)) * np.uint64(1 << 40)
    index["lod"] = rng.integers(0, plan_lods + 1, len(index))
    for c in "xyz":
        index[c] = rng.integers(0, 50, len(index))
    index["size"] = rng.integers(80, 5000, len(index))
    whole = SegmentTable(plan_lods)
    whole.add(index)
    monkeypatch.setattr(LabelTable, "MERGE_ROWS", 7)
    parts = SegmentTable(plan_lods)
    for chunk in np.array_split(index, 40):
        parts.add(chunk)
    assert len(parts._parts) < 40   # it did merge along the way
    assert np.array_equal(parts.labels, whole.labels) and np.array_equal(parts.labels, np.unique(index["label"]))
    for name in whole.columns:
        assert np.array_equal(parts.columns[name], whole.columns[name]), name
    assert parts.columns["entries"].sum() == len(index)
    # 40 + 8 * lods bytes a segment (its ID included), kept through the merges
    assert sum(c.nbytes for c in parts.columns.values()) + parts.labels.nbytes == len(parts.labels) * (40 + 8 * plan_lods)
    assert parts.columns["size"].sum() == index["size"][index["lod"] < plan_lods].sum()
    for requested in (None, 1):
        assert np.array_equal(parts.num_lods(requested), whole.num_lods(requested))
    n = whole.num_lods(None)
    assert whole.kept_bytes(n) == sum(int(e["size"]) for e in index
                                      if e["lod"] < n[np.searchsorted(whole.labels, e["label"])])


def test_segment_lods_looks_up_like_a_dict():
    """SegmentLods (two arrays) answers as the dict of every segment's LODs did, IDs past
    2^63 included, raises KeyError for an ID it lacks, and hands out a part's own."""
    from gpumesh.pipeline import FRAG_DTYPE
    from gpumesh.writer import SegmentLods

    rng = np.random.default_rng(5)
    labels = np.unique(rng.integers(1, 2**64 - 1, 500, dtype=np.uint64, endpoint=True))
    lods = rng.integers(0, 4, len(labels))
    table = SegmentLods(labels, lods)
    as_dict = dict(zip(labels.tolist(), lods.tolist()))
    asked = rng.permutation(labels)
    assert table.many(asked) == [as_dict[k] for k in asked.tolist()]
    assert labels.max() >= 2**63 and table.many([labels.max()]) == [as_dict[int(labels.max())]]
    assert table.many([]) == []
    for missing in (0, int(labels[0]) + 1, 2**64 - 1):   # 0 is never a segment ID
        if missing not in as_dict:
            with pytest.raises(KeyError, match=str(missing)):
                table.many([labels[3], np.uint64(missing), labels[4]])
    with pytest.raises(KeyError):
        SegmentLods(np.zeros(0, np.uint64), np.zeros(0)).many([7])
    rows = np.zeros(40, dtype=FRAG_DTYPE)
    rows["label"] = rng.choice(labels, 40)
    part = table.of(rows)
    assert part.labels.tolist() == sorted(set(rows["label"].tolist()))
    assert part.many(part.labels) == [as_dict[k] for k in part.labels.tolist()]


def test_a_single_fragment_segment_gets_the_bytes_of_the_general_path():
    """build_multires's shortcut for a segment of one LOD 0 fragment and one LOD (most of a
    volume of many small segments) gives the bytes that the general path gives the same
    segment with one more fragment at a LOD past it (which it ignores), and a manifest that
    reads back as the spec lays it out."""
    from gpumesh.pipeline import Plan
    from gpumesh.writer import INDEX_DTYPE, _new_stats, build_multires

    options = MeshOptions(chunk_size=32)
    plan = Plan.make((300, 300, 300), options)
    one = np.zeros(1, INDEX_DTYPE)
    one[["label", "lod", "x", "y", "z", "size", "triangles"]] = (9, 0, 5, 2**20 + 3, 7, 11, 30)
    two = np.zeros(2, INDEX_DTYPE)
    two[:] = one[0]
    two["lod"][1], two["x"][1], two["size"][1], two["triangles"][1] = 1, 2, 4, 12
    origin = (4, -8, 96)
    fast, general = _new_stats(plan.lods), _new_stats(plan.lods)
    got = build_multires(9, one, [b"a" * 11], plan, options, fast, origin, 1)
    want = build_multires(9, two, [b"a" * 11, b"b" * 4], plan, options, general, origin, 1)
    assert got == want and got[0] == b"a" * 11
    assert fast == general and fast["triangles_per_lod"][0] == 30 and fast["fragments_per_lod"][0] == 1
    m = Manifest.from_bytes(got[1])
    assert m.num_lods == 1 and m.chunk_shape.tolist() == [32] * 3 and m.grid_origin.tolist() == [4, -8, 96]
    assert m.lod_scales.tolist() == [1] and m.vertex_offsets.tolist() == [[-0.5] * 3]
    assert m.fragment_positions[0].tolist() == [[5, 2**20 + 3, 7]] and m.fragment_sizes[0].tolist() == [11]
    assert build_multires(9, one, [b"a" * 11], plan, options, fast, origin, 0) is None


def test_waves_fit_the_cap_with_at_least_one_unit_per_worker(monkeypatch):
    """_waves: consecutive slices covering every unit once; within the cap unless the wave is
    no more than ``at_least`` units; all in one when they fit."""
    import gpumesh.writer as writer

    monkeypatch.setattr(writer, "ASSEMBLY_INDEX_BYTES", 100 * writer.INDEX_DTYPE.itemsize)
    rng = np.random.default_rng(5)
    entries = rng.integers(1, 60, 200)
    entries[[7, 50]] = 500   # units larger than the cap alone
    for at_least in (1, 2, 5):
        waves = writer._waves(entries, at_least)
        assert [i for w in waves for i in range(w.start, w.stop)] == list(range(len(entries)))
        for w in waves[:-1]:
            n = w.stop - w.start
            assert n >= at_least
            assert entries[w].sum() <= 100 or n == at_least
            assert entries[w].sum() + entries[w.stop] > 100   # the next unit did not fit
    assert writer._waves(entries[:3], 2) == [slice(0, 3)]
    assert writer._waves(np.zeros(0, np.int64)) == [slice(0, 0)]


@pytest.mark.parametrize("layout", ["sharded", "unsharded"])
def test_validate_a_random_sample(outputs, layout):
    """validate(sample=N) checks N segments drawn from those the directory holds: with N past
    their count it checks them all, with the full run's counts; with fewer, exactly N."""
    whole = validate(str(outputs / layout))
    assert whole.ok and whole.num_segments > 5 and whole.segments_total is None
    every = validate(str(outputs / layout), sample=whole.num_segments + 10)
    assert every.ok and every.num_segments == every.segments_total == whole.num_segments
    assert every.per_lod == whole.per_lod
    some = validate(str(outputs / layout), sample=5, seed=3)
    assert some.ok and some.num_segments == 5 and some.segments_total == whole.num_segments
    assert some.per_lod[0]["segments_with_lod"] == 5
    assert f"segments: 5 (a random sample of the {whole.num_segments})" in some.format_table()
    with pytest.raises(ValueError):
        validate(str(outputs / layout), sample=0)
    with pytest.raises(ValueError):
        validate(str(outputs / layout), sample=2, segments=[1])


def test_a_sample_finds_a_broken_segment_when_it_draws_it(outputs, tmp_path):
    """One segment's fragment data cut short: a sample of one segment fails for the seeds that
    draw it and passes for the others; different seeds draw different segments."""
    import shutil

    dest = tmp_path / "out"
    shutil.copytree(outputs / "unsharded", dest)
    victim = sorted(int(p.name) for p in dest.iterdir() if p.name.isdigit())[2]
    data = (dest / str(victim)).read_bytes()
    (dest / str(victim)).write_bytes(data[:-7])
    assert not validate(str(dest)).ok
    failed = [s for s in range(60) if not validate(str(dest), sample=1, seed=s, decode=False).ok]
    assert 0 < len(failed) < 60
    for s in failed[:3]:
        assert any(f"segment {victim}" in e for e in validate(str(dest), sample=1, seed=s, decode=False).errors)


def test_validate_cli_options(outputs, tmp_path):
    """gpumesh validate --sample / --segments / --no-decode, and their misuse."""
    out = str(outputs / "sharded")
    r = _cli("validate", out, "--sample", 4, "--seed", 7)
    assert r.returncode == 0 and "segments: 4 (a random sample of the" in r.stdout and "OK" in r.stdout, r.stderr
    two = open_mesh(out).segment_ids()[:2]
    r = _cli("validate", out, "--segments", ",".join(map(str, two)))
    assert r.returncode == 0 and "segments: 2\n" in r.stdout + "\n" and "OK" in r.stdout, r.stderr
    report = validate(out)
    r = _cli("validate", out, "--no-decode")
    assert r.returncode == 0 and f"segments: {report.num_segments}" in r.stdout
    total_line = [ln for ln in r.stdout.splitlines() if ln.startswith("total")][0]
    assert total_line.split()[3] == "-"   # no triangle count without decoding
    (tmp_path / "ids.txt").write_text("# two IDs that are not there\n4000000001, 4000000002\n")
    r = _cli("validate", out, "--segments", f"@{tmp_path / 'ids.txt'}")
    assert r.returncode == 1 and "segment 4000000001 not found" in r.stderr
    r = _cli("validate", out, "--segments", "1", "--sample", "2")
    assert r.returncode == 2 and "not both" in r.stderr
    r = _cli("validate", out, "--sample", "0")
    assert r.returncode == 2
    r = _cli("validate", out, "--seed", "3")   # ignored before: the whole directory checked
    assert r.returncode == 2 and "--seed only applies with --sample" in r.stderr, r.stderr


@pytest.mark.parametrize("layout,waves", [("gzip", False), ("gzip", True), ("unsharded", False), ("unsharded", True),
                                          ("legacy", False)])
def test_write_progress_counts_the_segments(small, tmp_path, monkeypatch, layout, waves):
    """run_mesh(write_progress=) hears of the writing: first 0 of all the segments, then more
    after each shard (run of segments, batch), last all of them, the total never changing."""
    import gpumesh.writer as writer

    if waves:
        monkeypatch.setattr(writer, "ASSEMBLY_INDEX_BYTES", 1)
    monkeypatch.setattr(writer, "WRITE_BATCH", 5)   # a few batches on this small volume
    calls = []
    sharding = ShardingOptions(shard_bits=2, minishard_bits=2, data_encoding="gzip") if layout == "gzip" else None
    fmt = "legacy" if layout == "legacy" else "multires"
    summary = run_mesh(small, str(tmp_path / "out"), voxel_size=VOXEL_SIZE, workers=1,
                       options=MeshOptions(chunk_size=CHUNK, sharding=sharding, format=fmt,
                                           max_lods=1 if fmt == "legacy" else 3),
                       write_progress=lambda done, total: calls.append((done, total)))
    done = [d for d, _ in calls]
    assert calls[0] == (0, summary.segments) and calls[-1] == (summary.segments, summary.segments)
    assert {t for _, t in calls} == {summary.segments} and done == sorted(done) and len(set(done)) > 2
    if layout == "gzip":
        assert len(calls) == 1 + 4   # the start, then each of the 4 shards


def test_a_sharded_sample_is_read_by_range_and_still_finds_damage(outputs, tmp_path, monkeypatch):
    """A sample of sharded output reads its segments as a reader does, by byte range, never a
    whole shard; fragment bytes overwritten inside a shard show as errors of their segment,
    and a shard cut short (its minishard indices gone) as an error, nothing raising."""
    import shutil

    whole_reads = []
    real_read = storage.read

    def spy(kv, key, byte_range=None):
        if key.endswith(".shard") and byte_range is None:
            whole_reads.append(key)
        return real_read(kv, key, byte_range)

    monkeypatch.setattr(storage, "read", spy)
    good = validate(str(outputs / "gzip"), sample=10**6)
    assert good.ok and good.num_segments == good.segments_total > 0 and whole_reads == []
    assert validate(str(outputs / "gzip")).per_lod == good.per_lod and whole_reads   # the full run reads them
    dest = tmp_path / "cut"
    shutil.copytree(outputs / "gzip", dest)
    shard = sorted(dest.glob("*.shard"))[0]
    blob = bytearray(shard.read_bytes())
    start = 16 * 4 + 8   # past the shard index (2 minishard bits), into the first fragments
    blob[start:start + 64] = b"\xa5" * 64
    shard.write_bytes(bytes(blob))
    bad = validate(str(dest), sample=10**6)
    assert not bad.ok and bad.errors and all(e.startswith("segment ") for e in bad.errors)
    shard.write_bytes(bytes(blob[:-200]))
    cut = validate(str(dest), sample=3)
    assert not cut.ok and "cannot list the segments" in cut.errors[0]


@pytest.mark.parametrize("options", [dict(dust_threshold=400), dict(num_lods=2), dict(quality="high")],
                         ids=["dust", "two-lods", "high"])
def test_waves_keep_the_bytes_with_dust_forced_lods_and_presets(small, tmp_path, monkeypatch, options):
    """The dust filter (the table and the entries both), a forced LOD count and another preset
    give the same files in waves as with the index held whole."""
    import gpumesh.writer as writer

    sharding = ShardingOptions(shard_bits=2, minishard_bits=2)
    kw = dict(options=MeshOptions(chunk_size=CHUNK, sharding=sharding, **options), voxel_size=VOXEL_SIZE, workers=1)
    held = run_mesh(small, str(tmp_path / "held"), **kw)
    monkeypatch.setattr(writer, "ASSEMBLY_INDEX_BYTES", 1)
    waved = run_mesh(small, str(tmp_path / "waved"), **kw)
    assert held.index_waves == 0 and waved.index_waves == 4
    assert tree_files(tmp_path / "waved") == tree_files(tmp_path / "held") != {}
    assert waved.dust_segments == held.dust_segments and (held.dust_segments > 0) == ("dust_threshold" in options)


def test_cli_says_when_the_output_was_written_in_waves(small, tmp_path, monkeypatch):
    """The CLI's summary names the waves (in-process, the cap lowered), and not without them; and
    says so where they read the task results' headers again (no temporary file for the index)."""
    from click.testing import CliRunner

    import gpumesh.writer as writer
    from gpumesh.cli import main

    src = tmp_path / "src.zarr"
    write_zarr(src, small, chunk=32)
    args = ["mesh", str(src), None, "--voxel-size", VS_ARG, "--chunk-size", str(CHUNK), "--workers", "1", "--quiet",
            "--shard-bits", "2"]
    runner = CliRunner()
    plain = runner.invoke(main, [str(tmp_path / "plain") if a is None else a for a in args])
    assert plain.exit_code == 0, plain.output
    assert " waves;" not in plain.output
    monkeypatch.setattr(writer, "ASSEMBLY_INDEX_BYTES", 1)
    waved = runner.invoke(main, [str(tmp_path / "waved") if a is None else a for a in args])
    assert waved.exit_code == 0, waved.output
    assert " in 4 waves;" in waved.output
    assert tree_files(tmp_path / "waved") == tree_files(tmp_path / "plain")
    monkeypatch.setattr(writer, "INDEX_SPILL", False)   # no temporary file: the headers read again, said so
    again = runner.invoke(main, [str(tmp_path / "again") if a is None else a for a in args])
    assert again.exit_code == 0, again.output
    assert " in 4 waves, headers read again;" in again.output
    assert tree_files(tmp_path / "again") == tree_files(tmp_path / "plain")


def test_gzip_bytes_do_not_depend_on_the_python_version():
    """Gzipped minishard indices and manifests are the same bytes whatever Python writes them:
    ``gzip.compress(mtime=0)`` puts OS byte 3 in the header on Python 3.11-3.12 and 255 on 3.10
    and 3.13, so a 3.13 run's shards differed from a 3.11 run's in 16 bytes (seen here, the
    segments' data identical). The reference is built by hand: RFC 1952 header with mtime 0,
    no flags and OS 3, raw deflate at level 6, CRC-32 and size."""
    import zlib

    from gpumesh.sharding import _gunzip, _gzip

    rng = np.random.default_rng(5)
    for data in (b"", b"x", bytes(1000), rng.integers(0, 4, 50_000, dtype=np.uint8).tobytes(),
                 rng.integers(0, 256, 70_000, dtype=np.uint8).tobytes()):
        c = zlib.compressobj(6, zlib.DEFLATED, -15)
        ref = (b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03" + c.compress(data) + c.flush()
               + struct.pack("<II", zlib.crc32(data), len(data) & 0xFFFFFFFF))
        assert _gzip(data) == ref
        assert gzip.decompress(ref) == data and _gunzip(ref) == data
        # one member and nothing else, as a browser's DecompressionStream takes it
        for bad, why in ((ref + bytes(7), "7 bytes after"), (ref + ref, "after the gzip stream"),
                         (ref[:-3], "cut short")):
            with pytest.raises(ShardFormatError, match=why):
                _gunzip(bad)


@pytest.mark.parametrize("hash_", ["murmurhash3_x86_128", "identity"])
def test_sixty_four_shard_bits_name_shards_past_int64(tmp_path, hash_):
    """With ``shard_bits`` 64 a shard number can reach past int64 (an ID >= 2**63 with the
    identity hash, half the hashes otherwise): the shard is still named by its 16 hex digits,
    and TensorStore's sharded kvstore and gpumesh's reader find every segment."""
    arr = np.zeros((24, 24, 24), np.uint64)
    ids = [5, 2**63 + 7, 2**64 - 2]
    arr[2:9, 2:9, 2:9], arr[12:20, 3:20, 4:9], arr[14:22, 14:22, 12:22] = ids
    dest = tmp_path / "out"
    _mesh(arr, dest, ShardingOptions(hash=hash_, shard_bits=64, minishard_bits=0))
    names = sorted(n for n in os.listdir(dest) if n.endswith(".shard"))
    assert len(names) == 3 and all(len(n) == 16 + 6 for n in names), names
    if hash_ == "identity":
        assert names == [f"{i:016x}.shard" for i in ids]
    assert validate(str(dest)).ok
    kv = _sharded_kvstore(dest)   # (its list() walks shard numbers and finds none of 2**64 here)
    for seg in ids:
        assert bytes(kv.read(struct.pack(">Q", seg)).result().value) == open_mesh(str(dest)).manifest_bytes(seg)
        assert len(load_mesh(str(dest), seg).faces) > 0


def test_a_write_error_names_the_path_as_it_is(tmp_path):
    """TensorStore quotes a path with absl's CHexEscape: the parts joined by an escaped NUL, a
    hex digit after an escape (``\\x37.index``), UTF-8 bytes and a backslash escaped too.  The
    error names the path as it is, for single and bulk writes; a control byte stays escaped."""
    kv = storage.open_kvstore(tmp_path / "d")
    storage.write(kv, "info", b"{}")
    (tmp_path / "d" / "gone").symlink_to(tmp_path / "nowhere")   # a dangling link: no folder below it
    for key in ("gone/7.index", "gone/abc/def", "gone/e0/1", "gone/a\\x37/b", "gone/\u00e91/c", "gone/q'\"/1"):
        for write in (lambda: storage.write(kv, key, b"1"),
                      lambda: storage.write_many(kv, [(key, b"1")], sync=False)):
            with pytest.raises(DestinationError) as err:
                write()
            message = str(err.value)
            assert f'"{tmp_path / "d" / key}"' in message, message
    with pytest.raises(DestinationError, match=r"gone/a\\x01b"):
        storage.write(kv, "gone/a\x01b", b"1")


# ------------------------------------------------------------------------------------------
# The writer beyond sharding: unsharded and legacy figures, the order of writes, segment
# properties


@pytest.mark.parametrize("fmt", ["multires", "legacy"])
def test_the_summary_gives_the_figures_of_unsharded_and_legacy_output(small, tmp_path, fmt):
    """As for sharded output, the summary of an unsharded or legacy mesh gives what was written:
    segments, triangles and fragments of each LOD as the validator counts them, and the bytes of
    the segments' files (unsharded: manifests and fragment data; legacy: the fragment files)."""
    dest = tmp_path / fmt
    options = MeshOptions(chunk_size=CHUNK, format=fmt, max_lods=1 if fmt == "legacy" else 3)
    s = run_mesh(small, str(dest), options=options, voxel_size=VOXEL_SIZE, workers=1)
    report = validate(str(dest))
    assert report.ok and s.segments == report.num_segments > 0
    assert s.triangles_per_lod == [lod["triangles"] for lod in report.per_lod] and s.triangles_per_lod[0] > 0
    assert s.fragments_per_lod == [lod["fragments"] for lod in report.per_lod]
    mesh_file = r"\d+:0:.+" if fmt == "legacy" else r"\d+(\.index)?"
    assert s.bytes == sum(len(b) for k, b in tree_files(dest).items() if re.fullmatch(mesh_file, k)) > 0


def _spy_write_order(monkeypatch) -> list:
    """Record every key written (``storage.write`` and ``write_many``), each with the number of
    the call that wrote it: keys of one ``write_many`` call are written concurrently."""
    calls: list = []
    real_write, real_many = storage.write, storage.write_many

    def write(kv, key, value):
        calls.append([key])
        real_write(kv, key, value)

    def write_many(kv, items, sync=True):
        items = list(items)
        calls.append([k for k, _ in items])
        real_many(kv, items, sync=sync)

    monkeypatch.setattr(storage, "write", write)
    monkeypatch.setattr(storage, "write_many", write_many)
    return calls


def _first_call(calls: list) -> dict:
    return {k: i for i, keys in reversed(list(enumerate(calls))) for k in keys}


def test_a_conversion_writes_each_segments_fragment_data_before_its_manifest(outputs, tmp_path, monkeypatch):
    """An unsharded conversion writes each segment's fragment data before its manifest, in an
    earlier call, and ``info`` last: a conversion stopped between the two never leaves a
    manifest whose fragments are missing.  (The main job's order is checked by
    ``test_mesh_real.py::test_data_is_written_before_what_points_at_it_and_info_last``.)"""
    calls = _spy_write_order(monkeypatch)
    convert_mesh(str(outputs / "gzip"), str(tmp_path / "back"), sharding=None)
    first = _first_call(calls)
    manifests = {int(m[1]): i for k, i in first.items() if (m := re.fullmatch(r"(\d+)\.index", k))}
    datas = {int(k): i for k, i in first.items() if re.fullmatch(r"\d+", k)}
    assert len(manifests) > 10 and set(datas) == set(manifests)
    assert all(datas[seg] < at for seg, at in manifests.items())
    assert first["info"] > max(manifests.values())


def test_a_shard_is_written_before_its_record(small, tmp_path, monkeypatch):
    """A shard's record in the scratch area (which makes a resumed run skip the shard) is
    written only once the shard itself is: a run stopped between the two rewrites the shard
    instead of finishing without it."""
    from gpumesh.writer import shard_marker_key

    calls = _spy_write_order(monkeypatch)
    dest = tmp_path / "out"
    _mesh(small, dest, ShardingOptions(shard_bits=2, minishard_bits=2))
    first = _first_call(calls)
    spec = ShardingSpec.from_json(json.loads((dest / "info").read_text())["sharding"])
    shards = [int(k[:-len(".shard")], 16) for k in first if k.endswith(".shard")]
    assert len(shards) == 4
    for shard in shards:
        assert first[spec.shard_key(shard)] < first[shard_marker_key(spec, shard)]


@pytest.mark.parametrize("top", [5, 2**32 - 1, 2**32, 2**40 + 1])
def test_segment_properties_voxel_counts_fit_their_data_type(top):
    """Voxel counts are listed as uint32 while every count fits one (exact), else as float32;
    either way every value lies in its data type's range, as the spec requires."""
    from gpumesh.writer import write_segment_properties

    kv = storage.open_kvstore(f"memory://gpumesh_test_props_{top}/")
    write_segment_properties(kv, np.array([3, 9, 2**60], np.uint64), np.array([7, top, 1], np.uint64))
    props = storage.read_json(kv, "segment_properties/info")
    assert props["inline"]["ids"] == ["3", "9", str(2**60)]
    (voxels,) = props["inline"]["properties"]
    assert voxels["values"] == [7, top, 1]
    assert voxels["data_type"] == ("uint32" if top < 2**32 else "float32")
    if voxels["data_type"] == "uint32":
        assert all(0 <= v <= np.iinfo(np.uint32).max for v in voxels["values"])


def test_an_unsharded_conversion_is_on_disk_before_info_and_counts_its_files(outputs, tmp_path, monkeypatch):
    """Converting to the unsharded layout writes the segments' files without an fsync each,
    then flushes them once, before ``info`` (which says the directory is finished); its result
    gives the segments and bytes of those files."""
    at_flush = []

    def spy(kv, flush=storage.flush):
        at_flush.append(storage.list_keys(kv))
        flush(kv)

    monkeypatch.setattr(storage, "flush", spy)
    dest = tmp_path / "back"
    res = convert_mesh(str(outputs / "gzip"), str(dest), sharding=None)
    final = tree_files(dest)
    # the result's figures are those of the files written: manifests and fragment data
    segment_files = {k: b for k, b in final.items() if re.fullmatch(r"\d+(\.index)?", k)}
    assert res["segments"] == len(segment_files) // 2 > 0 and res["shards"] == 0
    assert res["bytes"] == sum(len(b) for b in segment_files.values())
    assert at_flush and not any("info" in keys for keys in at_flush)
    assert set(final) - set(at_flush[-1]) == {"info", "segment_properties/info"} and len(final) > 10
    assert final == tree_files(outputs / "unsharded")


@pytest.mark.parametrize("layout", ["gzip", "unsharded"])
def test_assembly_past_both_caps_reads_headers_again_by_range(small, outputs, tmp_path, monkeypatch, layout):
    """With no room for the task results (ASSEMBLY_CACHE_BYTES) nor for the index
    (ASSEMBLY_INDEX_BYTES), each wave reads the results' headers again by byte range, their
    sizes known from the first read: the files are the same bytes."""
    import gpumesh.writer as writer

    monkeypatch.setattr(writer, "ASSEMBLY_CACHE_BYTES", 0)
    monkeypatch.setattr(writer, "ASSEMBLY_INDEX_BYTES", 1)
    sharding = ShardingOptions(shard_bits=2, minishard_bits=2, data_encoding="gzip") if layout == "gzip" else None
    summary = _mesh(small, tmp_path / "out", sharding)
    assert summary.index_waves > 1
    assert tree_files(tmp_path / "out") == tree_files(outputs / layout)


def test_a_shard_record_of_another_sharding_is_not_trusted_on_resume(small, outputs, tmp_path, monkeypatch):
    """A record in the scratch area that names another sharding (an older run's, say) does not
    make a resumed run skip the shard: it is written again, and the output is whole."""
    import gpumesh.writer as writer

    sharding = ShardingOptions(shard_bits=2, minishard_bits=2, data_encoding="gzip")
    dest = tmp_path / "out"

    def failing(spec, items):
        raise _Killed("killed while building the first shard")

    monkeypatch.setattr(writer, "build_shard", failing)
    with pytest.raises(_Killed):
        _mesh(small, dest, sharding)
    monkeypatch.undo()
    kv = storage.open_kvstore(str(dest))
    spec = ShardingSpec.from_json(json.loads((outputs / "gzip" / "info").read_text())["sharding"])
    other = ShardingSpec.from_json(dict(spec.to_json(), minishard_bits=3))
    for shard in range(1 << spec.shard_bits):
        storage.write_json(kv, writer.shard_marker_key(spec, shard),
                           {"sharding": other.to_json(), "stats": writer._new_stats(3)})
    summary = _mesh(small, dest, sharding, resume=True)
    assert tree_files(dest) == tree_files(outputs / "gzip")
    assert summary.segments == validate(str(dest)).num_segments


@pytest.mark.parametrize("whole", [True, False])
def test_a_task_result_missing_at_assembly_is_named(tmp_path, whole):
    """A task result gone from the scratch area when the assembly reads it is an error that
    names it and says how to recover, read whole or by its header alike."""
    from gpumesh.errors import GpumeshError
    from gpumesh.writer import TaskResults

    kv = storage.open_kvstore(str(tmp_path / "m"))
    storage.write(kv, SCRATCH + "plan.json", b"{}")   # a scratch area, without the result
    results = TaskResults(kv, [SCRATCH + "blocks/1_0_0"], cache_bytes=None if whole else 0)
    with pytest.raises(GpumeshError, match=r"blocks/1_0_0 is missing from the scratch area; rerun with --overwrite"):
        list(results.iter_headers(None, whole=whole))


def test_a_shard_its_workers_built_is_skipped_by_the_resumed_run(small, tmp_path, monkeypatch):
    """Fewer shards than workers: the workers build parts of each and this process writes it
    and its record, which carries the run's stamp like the others: a run stopped after it and
    resumed skips it instead of building it again."""
    import gpumesh.writer as writer

    sharding = ShardingOptions(shard_bits=0, minishard_bits=2)   # one shard, two workers

    class Stop(Exception):
        pass

    def stop(done, total):
        if done:
            raise Stop

    dest = tmp_path / "out"
    with pytest.raises(Stop):
        run_mesh(small, str(dest), options=MeshOptions(chunk_size=CHUNK, sharding=sharding), voxel_size=VOXEL_SIZE,
                 workers=2, write_progress=stop)
    assert len([n for n in os.listdir(dest) if n.endswith(".shard")]) == 1 and not (dest / "info").exists()
    real, built = writer.build_shard, []
    monkeypatch.setattr(writer, "build_shard", lambda spec, items: built.append(1) or real(spec, items))
    _mesh(small, dest, sharding, resume=True)
    assert built == [] and validate(str(dest)).ok
