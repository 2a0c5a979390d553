"""Costs that grow with the size of the job rather than with its meshes: per task result, per
task submitted.  Property tests (what is read, parsed or held), not timings."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from gpumesh import storage
from gpumesh.pipeline import FRAG_DTYPE, SCRATCH, block_is_empty, pack_block, unpack_block_header


def _random_result(rng, nfrag: int, ncount: int, lods: int = 3) -> bytes:
    """A task result of ``nfrag`` fragment entries and ``ncount`` voxel counts, of random
    segments, nodes and sizes (the fragment bytes are random: the assembly's index does not read
    them)."""
    index = np.zeros(nfrag, dtype=FRAG_DTYPE)
    index["label"] = rng.integers(1, 40, nfrag)
    index["lod"] = rng.integers(0, lods + 1, nfrag)   # a LOD past the plan's counts in entries only
    for axis in "xyz":
        index[axis] = rng.integers(0, 8, nfrag)
    index["size"] = rng.integers(1, 60, nfrag)
    index["offset"] = np.r_[0, np.cumsum(index["size"])[:-1]] if nfrag else 0
    index["triangles"] = rng.integers(1, 1000, nfrag)
    labels = np.unique(rng.integers(1, 40, ncount)).astype(np.uint64)
    counts = rng.integers(1, 10_000, len(labels)).astype(np.uint64)
    return pack_block(index, labels, counts, rng.bytes(int(index["size"].sum())))


def _results(tmp_path, rng, n: int = 300):
    """A scratch area of ``n`` task results, most of them empty (a sparse volume's), some with
    voxel counts only, some with fragments; their keys and bytes."""
    kv = storage.open_kvstore(str(tmp_path / "dest"))
    keys, blobs = [], []
    for i in range(n):
        kind = rng.random()
        nfrag, ncount = (0, 0) if kind < 0.6 else (0, 3) if kind < 0.7 else (int(rng.integers(1, 12)), 4)
        blob = _random_result(rng, nfrag, ncount)
        keys.append(f"{SCRATCH}blocks/{i}_0_0.o0")
        blobs.append(blob)
    storage.write_many(kv, zip(keys, blobs), sync=False)   # no fsync each: the test's files need none
    return kv, keys, blobs


class _CountingReads:
    """A kvstore whose reads are counted per key (all that :class:`gpumesh.writer.TaskResults`
    calls)."""

    def __init__(self, kv):
        self.kv, self.reads = kv, collections.Counter()

    def read(self, key, **kwargs):
        self.reads[key] += 1
        return self.kv.read(key, **kwargs)


def test_an_empty_task_result_is_one_read_its_header_at_once(tmp_path):
    """Read by its header, a task result that holds nothing (most of a large, sparse volume's)
    is one read: its first bytes are all of its header.  It was read twice, as every other is:
    the prefix that gives the header's size, then the header."""
    from gpumesh.writer import TaskResults

    rng = np.random.default_rng(0)
    kv, keys, blobs = _results(tmp_path, rng, n=100)
    counting = _CountingReads(kv)
    results = TaskResults(counting, keys, cache_bytes=0)
    got = dict(results.iter_headers(None, whole=False))
    for i, (key, blob) in enumerate(zip(keys, blobs)):
        index, labels, counts, start = unpack_block_header(blob)
        assert got[i] == blob[:start]
        assert counting.reads[key] == (1 if block_is_empty(blob) else 2), key
    assert sum(block_is_empty(b) for b in blobs) > 30   # the case at hand is there


def test_block_is_empty_only_for_a_well_formed_result_of_nothing():
    rng = np.random.default_rng(1)
    empty = _random_result(rng, 0, 0)
    assert block_is_empty(empty) and block_is_empty(empty + b"more")
    assert not block_is_empty(_random_result(rng, 0, 2)) and not block_is_empty(_random_result(rng, 3, 0))
    assert not block_is_empty(empty[:-1])                      # cut short
    assert not block_is_empty(b"GPMBLK02" + empty[8:])         # another magic: corrupt, said so by the unpacking


def _index_one_by_one(blobs: list, lods: int):
    """The assembly's index, tables and bytes per result, parsed and added one result at a
    time (as it was before results were joined in batches)."""
    from gpumesh.writer import INDEX_DTYPE, LabelTable, SegmentTable

    table = SegmentTable(lods)
    voxels = LabelTable({"voxels": np.zeros(0, np.uint64)}, {"voxels": np.add})
    block_bytes = np.zeros(len(blobs))
    exts = []
    for b, blob in enumerate(blobs):
        index, labels, counts, start = unpack_block_header(blob)
        ext = np.empty(len(index), dtype=INDEX_DTYPE)
        for name in FRAG_DTYPE.names:
            ext[name] = index[name]
        ext["offset"] += start
        ext["block"] = b
        table.add(ext)
        voxels.add_rows(labels, {"voxels": counts})
        block_bytes[b] = ext["size"].sum()
        exts.append(ext)
    return np.concatenate(exts), table, voxels, block_bytes


@pytest.mark.parametrize("batch_rows", [1, 7, 1 << 16])
@pytest.mark.parametrize("whole", [True, False])
def test_the_index_read_in_batches_is_the_index_read_result_by_result(tmp_path, monkeypatch, batch_rows, whole):
    """The assembly joins task results' rows in batches and passes over the empty ones: its
    index, segment table, voxel counts and bytes per result are those of adding each result
    alone, in task order, whatever the batches (one row each, a few, all); and a wave's rows
    (:func:`gpumesh.writer._wave_rows`) are the index's rows of its segments."""
    import gpumesh.writer as writer

    monkeypatch.setattr(writer, "HEADER_BATCH_ROWS", batch_rows)
    rng = np.random.default_rng(2)
    kv, keys, blobs = _results(tmp_path, rng)
    want_index, want_table, want_voxels, want_bytes = _index_one_by_one(blobs, 3)
    # some headers as the workers return them, the others read
    known = {b: blob[:unpack_block_header(blob)[3]] for b, blob in enumerate(blobs) if b % 3 == 0}
    results = writer.TaskResults(kv, keys, cache_bytes=None if whole else 0)
    index, table, voxels, block_bytes = writer._read_index(results, known, 3, whole)
    assert index.dtype == want_index.dtype and index.tobytes() == want_index.tobytes()
    assert np.array_equal(table.labels, want_table.labels)
    for name, col in want_table.columns.items():
        assert np.array_equal(table.columns[name], col), name
    assert np.array_equal(voxels.labels, want_voxels.labels)
    assert np.array_equal(voxels.columns["voxels"], want_voxels.columns["voxels"])
    assert np.array_equal(block_bytes, want_bytes)
    labels = want_table.labels[::3]
    stats = {"index_waves": 0}
    rows = writer._wave_rows(writer.TaskResults(kv, keys, cache_bytes=0), None, labels, stats)
    assert rows.tobytes() == want_index[np.isin(want_index["label"], labels)].tobytes()
    assert stats["index_waves"] == 1

