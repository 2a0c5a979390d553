"""Costs that grow with the size of the job rather than with its meshes: per task result, per
task submitted.  Property tests (what is read, parsed or held), not timings."""

from __future__ import annotations

import collections
import concurrent.futures
import threading

import numpy as np
import pytest

from gpumesh import storage
from gpumesh.pipeline import FRAG_DTYPE, SCRATCH, block_is_empty, pack_block, parse_block_key, unpack_block_header


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


class _Outstanding:
    """Counts a pool's submitted and unfinished tasks, and the most there were at once."""

    def __init__(self):
        self.now = self.most = self.submitted = 0
        self.lock = threading.Lock()

    def submitted_one(self, fut):
        with self.lock:
            self.now += 1
            self.submitted += 1
            self.most = max(self.most, self.now)
        fut.add_done_callback(self.finished_one)
        return fut

    def finished_one(self, fut):
        with self.lock:
            self.now -= 1


@pytest.mark.parametrize("ahead", [1, 3, 16])
def test_tasks_are_submitted_in_order_a_few_ahead_and_each_handed_on_once(ahead):
    """:class:`gpumesh.pipeline._InFlight` keeps at most ``ahead`` tasks unfinished, submits
    them in the order given, and hands on each future once, as it finishes; stopped early, the
    tasks not yet submitted never are."""
    import random
    import time
    from concurrent.futures import ThreadPoolExecutor

    from gpumesh.pipeline import _InFlight

    count, order = _Outstanding(), []
    rng = random.Random(ahead)
    delays = [rng.random() * 0.004 for _ in range(60)]

    with ThreadPoolExecutor(4) as pool:
        def submit(i):
            order.append(i)
            return count.submitted_one(pool.submit(lambda: (time.sleep(delays[i]), i)[1]))

        flight = _InFlight(submit, range(60), ahead)
        assert len(flight.pending) == min(ahead, 60) and order == list(range(min(ahead, 60)))
        got = [fut.result() for fut in flight]
    assert sorted(got) == list(range(60)) and order == list(range(60))
    assert count.most <= ahead and not flight.pending

    count, order = _Outstanding(), []
    with ThreadPoolExecutor(2) as pool:
        def submit(i):
            order.append(i)
            return count.submitted_one(pool.submit(lambda: i))

        flight = _InFlight(submit, range(60), ahead)
        for n, _ in enumerate(flight, 1):
            if n == 5:
                break
    assert count.submitted <= 5 + ahead and len(order) == count.submitted


def test_the_main_job_keeps_a_few_tasks_per_worker_submitted_not_all(tmp_path, monkeypatch):
    """The main job submits its meshing tasks a few per worker at a time
    (:data:`gpumesh.pipeline.TASKS_AHEAD`), not all at once: the main process then holds a
    future and the pool's work item per task in flight, not per task of the job (0.7 GB for a
    0.55-teravoxel volume's 320,922 tasks).  The output is that of one worker."""
    import gpumesh.pipeline as pipeline
    from gpumesh.pipeline import MeshOptions, Plan, run_mesh

    from conftest import tree_files

    count = _Outstanding()

    class CountingPool(pipeline.ProcessPoolExecutor):
        def submit(self, fn, *args, **kwargs):
            fut = super().submit(fn, *args, **kwargs)
            return count.submitted_one(fut) if fn is pipeline._run_task else fut

    rng = np.random.default_rng(3)
    vol = np.zeros((72, 72, 72), np.uint32)
    for label in range(1, 30):   # small boxes all over the volume, so that every block has work
        lo = rng.integers(0, 60, 3)
        hi = lo + rng.integers(3, 12, 3)
        vol[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = label
    options = MeshOptions(chunk_size=16)
    tasks = len(Plan.make(vol.shape, options).tasks())
    assert tasks > 4 * pipeline.TASKS_AHEAD * 2
    run_mesh(vol, str(tmp_path / "one"), options=options, workers=1)
    monkeypatch.setattr(pipeline, "ProcessPoolExecutor", CountingPool)
    summary = run_mesh(vol, str(tmp_path / "two"), options=options, workers=2)
    assert summary.workers == 2 and count.submitted == tasks
    assert count.most <= pipeline.TASKS_AHEAD * 2
    assert tree_files(tmp_path / "two") == tree_files(tmp_path / "one")


def test_an_index_spill_that_cannot_be_written_leaves_the_waves_to_the_headers(tmp_path, monkeypatch):
    """Past its cap the fragment index goes to a temporary file (:class:`IndexSpill`); where the
    temporary folder fills up while it is written, or no file can be made there, the spill is
    closed and dropped, and the waves read the headers again: the same entries.  A spill read
    back short of what was written is a GpumeshError, never fewer entries."""
    import errno
    import io

    import gpumesh.writer as writer
    from gpumesh.errors import GpumeshError

    kv, keys, blobs = _results(tmp_path, np.random.default_rng(7), n=120)
    want = _index_one_by_one(blobs, 3)[0]
    labels = np.unique(want["label"])
    monkeypatch.setattr(writer, "HEADER_BATCH_ROWS", 1)
    monkeypatch.setattr(writer, "ASSEMBLY_INDEX_BYTES", want.nbytes // 3)
    closed = []

    class Filling(io.BytesIO):   # a temporary folder with room for half the index
        def write(self, data):
            if self.tell() + len(data) > want.nbytes // 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(data)

        def close(self):
            closed.append(self.tell())
            super().close()

    def read_again(index):
        stats = {"index_waves": 0}
        rows = writer._wave_rows(writer.TaskResults(kv, keys, cache_bytes=0), index, labels, stats)
        assert rows.tobytes() == want.tobytes() and stats["index_waves"] == 1

    monkeypatch.setattr(writer.tempfile, "TemporaryFile", lambda **kwargs: Filling())
    index = writer._read_index(writer.TaskResults(kv, keys, cache_bytes=0), {}, 3, False)[0]
    assert index is None and len(closed) == 1 and want.nbytes // 3 < closed[0] <= want.nbytes // 2
    read_again(index)

    def no_file(**kwargs):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(writer.tempfile, "TemporaryFile", no_file)
    index = writer._read_index(writer.TaskResults(kv, keys, cache_bytes=0), {}, 3, False)[0]
    assert index is None
    read_again(index)

    monkeypatch.undo()
    monkeypatch.setattr(writer, "ASSEMBLY_INDEX_BYTES", want.nbytes // 3)
    index = writer._read_index(writer.TaskResults(kv, keys, cache_bytes=0), {}, 3, False)[0]
    assert isinstance(index, writer.IndexSpill) and index.rows == len(want)
    monkeypatch.setattr(writer, "SPILL_READ_BYTES", 5 * writer.INDEX_DTYPE.itemsize)   # read back 5 at a time
    read_again(index)
    index.file.truncate(want.nbytes - 1)
    with pytest.raises(GpumeshError, match="ended early"):
        index.rows_of(labels)
    index.close()
    # a result that cannot be read once the spill is started: its file is closed (deleted) at once
    class Roomy(io.BytesIO):
        def close(self):
            closed.append(self.tell())
            super().close()

    closed.clear()
    monkeypatch.setattr(writer.tempfile, "TemporaryFile", lambda **kwargs: Roomy())
    monkeypatch.setattr(writer, "ASSEMBLY_INDEX_BYTES", 1)
    monkeypatch.setattr(writer, "HEADER_BATCH_ROWS", 1)   # (the spill starts with the first result's rows)
    assert len(keys) > writer.HEADER_READS   # the last is read in a later batch, once the spill has rows
    storage.delete_prefix(kv, keys[-1])
    try:
        writer._read_index(writer.TaskResults(kv, keys, cache_bytes=0), {}, 3, False)
    except GpumeshError as exc:   # (checked while the error holds the frames: closed by the code, not collected)
        assert "missing from the scratch area" in str(exc) and len(closed) == 1
    else:
        pytest.fail("a missing result was not an error")


def test_a_buffered_index_spill_that_fills_its_folder_leaves_the_waves_to_the_headers(tmp_path, monkeypatch):
    """``tempfile.TemporaryFile`` is buffered: a batch of entries smaller than its buffer is not
    written at once, and a full temporary folder is known only at the next write or at the flush.
    Wherever that comes (a later batch, the first wave's read), the spill is dropped, its file
    closed without a second error, and the waves read the headers again: the same entries, never
    an OSError out of the assembly."""
    import errno
    import io

    import gpumesh.writer as writer

    kv, keys, blobs = _results(tmp_path, np.random.default_rng(7), n=120)
    want = _index_one_by_one(blobs, 3)[0]
    labels = np.unique(want["label"])
    monkeypatch.setattr(writer, "HEADER_BATCH_ROWS", 1)   # batches of a result each: a few entries
    monkeypatch.setattr(writer, "ASSEMBLY_INDEX_BYTES", want.nbytes // 3)

    class Disk(io.RawIOBase):   # a file on a disk with room for ``room`` bytes
        def __init__(self, room):
            self.data, self.room = io.BytesIO(), room

        def readable(self):
            return True

        def writable(self):
            return True

        def seekable(self):
            return True

        def seek(self, pos, whence=0):
            return self.data.seek(pos, whence)

        def tell(self):
            return self.data.tell()

        def readinto(self, b):
            got = self.data.read(len(b))
            b[:len(got)] = got
            return len(got)

        def write(self, b):
            if self.data.tell() + len(b) > self.room:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.data.write(bytes(b))

    buffer = 1024
    assert want.nbytes > 2 * buffer   # some batches reach the disk before it fills, some do not
    for room in (want.nbytes // 2, want.nbytes - 1):   # full while written; full at the last batches only
        files = []

        def temporary_file(**kwargs):
            files.append(io.BufferedRandom(Disk(room), buffer_size=buffer))
            return files[-1]

        monkeypatch.setattr(writer.tempfile, "TemporaryFile", temporary_file)
        index = writer._read_index(writer.TaskResults(kv, keys, cache_bytes=0), {}, 3, False)[0]
        stats = {"index_waves": 0}
        rows = writer._wave_rows(writer.TaskResults(kv, keys, cache_bytes=0), index, labels, stats)
        assert index is None and len(files) == 1 and files[0].closed, room
        assert rows.tobytes() == want.tobytes() and stats["index_waves"] == 1


@pytest.mark.parametrize("step_rows", [5, 0, 1 << 20], ids=["5 rows", "under a row", "past the cap's 1/16"])
def test_a_wave_reads_the_index_spill_back_a_bounded_step_at_a_time(tmp_path, monkeypatch, step_rows):
    """Each wave reads the spill back :data:`SPILL_READ_BYTES` at a time, or 1/16 of the cap
    where that is less (a row at least, where it is set below one), never the whole file at
    once (the memory of the index the cap keeps out): the same entries, in task order."""
    import io

    import gpumesh.writer as writer

    kv, keys, blobs = _results(tmp_path, np.random.default_rng(7), n=120)
    want = _index_one_by_one(blobs, 3)[0]
    entry = writer.INDEX_DTYPE.itemsize
    step = max(1, min(step_rows, want.nbytes // 3 // 16 // entry)) * entry
    assert len(want) > 3 * step // entry and want.nbytes // 3 // 16 >= 2 * entry
    reads = []

    class Counted(io.BytesIO):
        def read(self, size=-1):
            reads.append(size)
            assert len(reads) <= 2 * len(want), "the spill is read back without end"
            return super().read(size)

    monkeypatch.setattr(writer.tempfile, "TemporaryFile", lambda **kwargs: Counted())
    monkeypatch.setattr(writer, "ASSEMBLY_INDEX_BYTES", want.nbytes // 3)
    monkeypatch.setattr(writer, "SPILL_READ_BYTES", step_rows * writer.INDEX_DTYPE.itemsize)
    index = writer._read_index(writer.TaskResults(kv, keys, cache_bytes=0), {}, 3, False)[0]
    assert isinstance(index, writer.IndexSpill)
    some = np.unique(want["label"])[::2]
    rows = index.rows_of(some)
    assert rows.tobytes() == want[np.isin(want["label"], some)].tobytes()
    assert max(reads) == step and sum(reads) == want.nbytes
    index.close()


@pytest.mark.parametrize("step_rows", [5, 1 << 20], ids=["5 rows", "all at once"])
def test_a_grouped_index_spill_gives_each_wave_its_own_entries_alone(tmp_path, monkeypatch, step_rows):
    """Once the waves are known, the spill is written again wave by wave
    (:meth:`IndexSpill.group`): each wave then reads its own run of the file alone, its entries
    in task order (the same as a read of the whole file gives); the file is read once more for
    that, instead of once per wave.  Entries of segments in no wave are dropped; a wave's
    entries that the table's count does not match are a GpumeshError, and the file is left as
    it was."""
    import io

    import gpumesh.writer as writer
    from gpumesh.errors import GpumeshError

    kv, keys, blobs = _results(tmp_path, np.random.default_rng(11), n=200)
    want, table = _index_one_by_one(blobs, 3)[:2]
    files, reads = [], []

    class Counted(io.BytesIO):
        def read(self, size=-1):
            data = super().read(size)
            reads.append(len(data))
            return data

    monkeypatch.setattr(writer.tempfile, "TemporaryFile", lambda **kwargs: files.append(Counted()) or files[-1])
    monkeypatch.setattr(writer, "ASSEMBLY_INDEX_BYTES", want.nbytes // 3)
    monkeypatch.setattr(writer, "SPILL_READ_BYTES", step_rows * writer.INDEX_DTYPE.itemsize)
    index = writer._read_index(writer.TaskResults(kv, keys, cache_bytes=0), {}, 3, False)[0]
    assert isinstance(index, writer.IndexSpill) and index.rows == len(want) and len(files) == 1
    labels, counts = table.labels, table.columns["entries"]
    assert len(labels) > 8
    # four waves, not in ID order (as shards are), and two segments in none (dust)
    pick = np.random.default_rng(3).permutation(len(labels))
    dropped, rest = pick[:2], pick[2:]
    waves = [np.sort(labels[w]) for w in np.array_split(rest, 4)]
    entries = [int(counts[np.isin(labels, w)].sum()) for w in waves]
    assert not index.grouped and index.group(waves, entries)
    assert index.grouped and files[0].closed and len(files) == 2 and index.rows == sum(entries)
    assert sum(reads) == want.nbytes == index.bytes_read and max(reads) <= max(1, step_rows) * want.itemsize
    for wave, n in zip(waves, entries):
        reads.clear()
        rows = index.rows_of(wave)
        assert rows.tobytes() == want[np.isin(want["label"], wave)].tobytes()
        assert sum(reads) == n * want.itemsize   # its own run alone
    assert len(index.rows_of(labels[dropped])) == 0
    # a segment from each of two waves: each wave's entries in task order, one wave after the other
    two = np.sort(np.r_[waves[1][:1], waves[3][:1]])
    rows = index.rows_of(two)
    assert len(rows) == int(counts[np.isin(labels, two)].sum())
    for label in two.tolist():
        assert rows[rows["label"] == label].tobytes() == want[want["label"] == label].tobytes()
    index.close()

    for wrong in (-1, 1):   # the table's count one short, one over
        index = writer._read_index(writer.TaskResults(kv, keys, cache_bytes=0), {}, 3, False)[0]
        bad = list(entries)
        bad[2] += wrong
        with pytest.raises(GpumeshError, match="wave 2"):
            index.group(waves, bad)
        assert not index.grouped and files[-1].closed and not files[-2].closed   # the new file gone, the old kept
        assert index.rows_of(waves[2]).tobytes() == want[np.isin(want["label"], waves[2])].tobytes()
        index.close()


def test_an_index_spill_that_cannot_be_grouped_is_read_whole_by_each_wave(tmp_path, monkeypatch):
    """Where the temporary folder has no room for the spill written again wave by wave (or
    would be left with less than :data:`SPILL_GROUP_ROOM`), or no second file can be made,
    :meth:`IndexSpill.group` says so and leaves the spill as it was:
    each wave reads the whole file, the same entries.  In the assembly, fewer than
    :data:`SPILL_GROUP_WAVES` waves leave it as it is."""
    import errno
    import io

    import gpumesh.writer as writer

    kv, keys, blobs = _results(tmp_path, np.random.default_rng(11), n=200)
    want, table = _index_one_by_one(blobs, 3)[:2]
    waves = np.array_split(table.labels, 3)
    entries = [int(table.columns["entries"][np.isin(table.labels, w)].sum()) for w in waves]
    files = []

    class Filling(io.BytesIO):   # the second file has room for half the index
        def write(self, data):
            if len(files) > 1 and self is files[1] and self.tell() + len(data) > want.nbytes // 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(data)

    monkeypatch.setattr(writer.tempfile, "TemporaryFile", lambda **kwargs: files.append(Filling()) or files[-1])
    monkeypatch.setattr(writer, "ASSEMBLY_INDEX_BYTES", want.nbytes // 3)
    index = writer._read_index(writer.TaskResults(kv, keys, cache_bytes=0), {}, 3, False)[0]
    assert not index.group(waves, entries)
    assert not index.grouped and len(files) == 2 and files[1].closed and not files[0].closed
    assert index.rows == len(want)
    for wave in waves:
        index.bytes_read = 0
        assert index.rows_of(wave).tobytes() == want[np.isin(want["label"], wave)].tobytes()
        assert index.bytes_read == want.nbytes   # the whole file
    index.close()

    # a folder that the new file would leave with less than SPILL_GROUP_ROOM: not tried
    made = len(files)
    index = writer._read_index(writer.TaskResults(kv, keys, cache_bytes=0), {}, 3, False)[0]
    usage = collections.namedtuple("usage", "total used free")
    room = sum(entries) * want.itemsize + writer.SPILL_GROUP_ROOM
    monkeypatch.setattr(writer.shutil, "disk_usage", lambda path: usage(1 << 40, 0, room - 1))
    assert not index.group(waves, entries) and len(files) == made + 1   # the spill's alone
    monkeypatch.setattr(writer.shutil, "disk_usage", lambda path: usage(1 << 40, 0, room))
    assert index.group(waves, entries) and len(files) == made + 2
    index.close()

    def no_file(**kwargs):
        raise OSError(errno.EMFILE, "Too many open files")

    index = writer._read_index(writer.TaskResults(kv, keys, cache_bytes=0), {}, 3, False)[0]
    monkeypatch.setattr(writer.tempfile, "TemporaryFile", no_file)
    assert not index.group(waves, entries) and not index.grouped
    assert index.rows_of(waves[0]).tobytes() == want[np.isin(want["label"], waves[0])].tobytes()
    index.close()

    monkeypatch.undo()
    monkeypatch.setattr(writer, "ASSEMBLY_INDEX_BYTES", want.nbytes // 3)
    index = writer._read_index(writer.TaskResults(kv, keys, cache_bytes=0), {}, 3, False)[0]
    few = writer.SPILL_GROUP_WAVES - 1
    writer._group_spill(index, waves[:few], entries[:few])
    assert not index.grouped
    writer._group_spill(index, waves, entries)
    assert index.grouped
    index.close()


def test_a_grouped_index_spill_drops_the_segments_of_no_wave_whatever_their_ids(tmp_path, monkeypatch):
    """Segments in no wave (dust, no LOD to write, a shard written by an interrupted run) may
    hold the lowest and the highest IDs of the index: :meth:`IndexSpill.group` drops their
    entries, and :meth:`IndexSpill.rows_of` them gives none and reads no run of the file, not
    one of a wave whose IDs are near theirs.  The room it asks for is that of its own file (the
    waves' entries), in the folder the temporary files are made in."""
    import io

    import gpumesh.writer as writer

    kv, keys, blobs = _results(tmp_path, np.random.default_rng(11), n=200)
    want, table = _index_one_by_one(blobs, 3)[:2]
    labels, counts = table.labels, table.columns["entries"]
    assert len(labels) > 8
    folder = tmp_path / "tmp"
    folder.mkdir()
    asked, real_usage = [], writer.shutil.disk_usage
    monkeypatch.setattr(writer.tempfile, "tempdir", str(folder))
    monkeypatch.setattr(writer.shutil, "disk_usage", lambda path: asked.append(str(path)) or real_usage(path))
    monkeypatch.setattr(writer, "ASSEMBLY_INDEX_BYTES", want.nbytes // 3)
    reads = []

    class Counted(io.BytesIO):
        def read(self, size=-1):
            data = super().read(size)
            reads.append(len(data))
            return data

    monkeypatch.setattr(writer.tempfile, "TemporaryFile", lambda **kwargs: Counted())
    index = writer._read_index(writer.TaskResults(kv, keys, cache_bytes=0), {}, 3, False)[0]
    assert isinstance(index, writer.IndexSpill) and index.rows == len(want)
    # the first, the last and one in between in no wave; the others in three waves
    outside = np.r_[0, len(labels) // 2, len(labels) - 1]
    inside = np.delete(np.arange(len(labels)), outside)
    waves = [labels[w] for w in np.array_split(inside, 3)]
    entries = [int(counts[w].sum()) for w in np.array_split(inside, 3)]
    assert index.group(waves, entries) and index.grouped and index.rows == sum(entries) < len(want)
    assert asked == [str(folder)]
    for wave in waves:
        assert index.rows_of(wave).tobytes() == want[np.isin(want["label"], wave)].tobytes()
    reads.clear()
    assert len(index.rows_of(labels[outside])) == 0 and sum(reads) == 0
    assert len(index.rows_of(np.array([labels[-1] + 1], dtype=labels.dtype))) == 0 and sum(reads) == 0
    index.close()

    # the room it asks for is that of its own file: the waves' entries, not the dropped ones too
    index = writer._read_index(writer.TaskResults(kv, keys, cache_bytes=0), {}, 3, False)[0]
    usage = collections.namedtuple("usage", "total used free")
    room = sum(entries) * want.itemsize + writer.SPILL_GROUP_ROOM
    monkeypatch.setattr(writer.shutil, "disk_usage", lambda path: usage(1 << 40, 0, room))
    assert index.rows > sum(entries) and index.group(waves, entries) and index.grouped
    index.close()


def test_a_folder_that_holds_its_files_in_memory_is_told_by_the_mount_table(tmp_path):
    """:func:`memory_filesystem` names the tmpfs (or ramfs) that holds a path, from the mount
    table: the longest mount point that holds it wins (a disk mounted inside a tmpfs is a
    disk), a space in a mount point is ``\\040`` there, a mount point is no prefix of a
    sibling's name; ``None`` for a disk or where the table cannot be read."""
    from gpumesh.writer import memory_filesystem

    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/vda / ext4 rw 0 0\n"
                      "tmpfs /run tmpfs rw 0 0\n"
                      "/dev/vdb /run/disk ext4 rw 0 0\n"
                      "none /mnt/ram\\040disk ramfs rw 0 0\n"
                      "broken\n")
    table = str(mounts)
    assert memory_filesystem("/run", table) == "tmpfs"
    assert memory_filesystem("/run/user/1000/x", table) == "tmpfs"
    assert memory_filesystem("/run/disk/tmp", table) is None      # a disk inside the tmpfs
    assert memory_filesystem("/running", table) is None           # not under /run
    assert memory_filesystem("/mnt/ram disk/tmp", table) == "ramfs"
    assert memory_filesystem("/home", table) is None
    assert memory_filesystem("/run", str(tmp_path / "none")) is None


def test_an_index_spill_in_memory_is_said_and_not_grouped(tmp_path, monkeypatch):
    """Where ``TMPDIR`` keeps its files in memory (a tmpfs), the spill says so at once
    (:class:`IndexInMemoryWarning`: set TMPDIR to a disk) and is not written again wave by
    wave (a second copy would take as much memory again; each wave reads it whole from
    memory): the same entries either way.  The CLI prints the warning at once."""
    import io
    import warnings

    import gpumesh.writer as writer
    from gpumesh.writer import IndexInMemoryWarning

    kv, keys, blobs = _results(tmp_path, np.random.default_rng(11), n=200)
    want, table = _index_one_by_one(blobs, 3)[:2]
    waves = np.array_split(table.labels, 3)
    entries = [int(table.columns["entries"][np.isin(table.labels, w)].sum()) for w in waves]
    files = []
    monkeypatch.setattr(writer.tempfile, "TemporaryFile", lambda **kwargs: files.append(io.BytesIO()) or files[-1])
    monkeypatch.setattr(writer, "ASSEMBLY_INDEX_BYTES", want.nbytes // 3)
    monkeypatch.setattr(writer, "memory_filesystem", lambda path: "tmpfs")
    with pytest.warns(IndexInMemoryWarning, match=r"a tmpfs that holds it in memory .*set TMPDIR to a folder on disk"):
        index = writer._read_index(writer.TaskResults(kv, keys, cache_bytes=0), {}, 3, False)[0]
    assert isinstance(index, writer.IndexSpill) and index.in_memory == "tmpfs"
    assert not index.group(waves, entries) and not index.grouped and len(files) == 1
    assert index.rows_of(waves[1]).tobytes() == want[np.isin(want["label"], waves[1])].tobytes()
    index.close()
    monkeypatch.setattr(writer, "memory_filesystem", lambda path: None)   # on disk: no word, grouped
    with warnings.catch_warnings():
        warnings.simplefilter("error", IndexInMemoryWarning)
        index = writer._read_index(writer.TaskResults(kv, keys, cache_bytes=0), {}, 3, False)[0]
    assert index.in_memory is None and index.group(waves, entries)
    index.close()


def test_the_cli_says_at_once_that_the_index_spill_is_in_memory(tmp_path, monkeypatch):
    """``gpumesh mesh`` prints an :class:`IndexInMemoryWarning` as it comes (a reason to stop
    the job and set TMPDIR), as a warning line, and writes the same mesh."""
    from click.testing import CliRunner

    import gpumesh.writer as writer
    from conftest import tree_files, write_zarr
    from gpumesh.cli import main

    labels = np.zeros((40, 36, 32), np.uint32)
    labels[4:30, 6:30, 3:28] = 3
    labels[20:38, 2:20, 10:30] = 9
    write_zarr(tmp_path / "v.zarr", labels, chunk=16)
    args = [str(tmp_path / "v.zarr"), "--voxel-size", "4,4,40", "--chunk-size", "8", "--workers", "1"]
    assert CliRunner().invoke(main, ["mesh", *args[:1], str(tmp_path / "held"), *args[1:]]).exit_code == 0
    monkeypatch.setattr(writer, "ASSEMBLY_INDEX_BYTES", writer.INDEX_DTYPE.itemsize)
    monkeypatch.setattr(writer, "memory_filesystem", lambda path: "tmpfs")
    res = CliRunner().invoke(main, ["mesh", *args[:1], str(tmp_path / "spilled"), *args[1:]])
    assert res.exit_code == 0, res.output
    said = [line for line in res.stderr.splitlines() if "a tmpfs that holds it in memory" in line]
    assert len(said) == 1 and said[0].startswith("gpumesh: warning: the fragment index of this job passes")
    assert res.stderr.index(said[0]) < res.stderr.index("writing: 0/")   # as it comes, not after the job
    assert tree_files(tmp_path / "spilled") == tree_files(tmp_path / "held")


def test_an_interrupted_header_read_closes_the_index_spill_at_once(tmp_path, monkeypatch):
    """Ctrl-C (a BaseException, not an Exception) while the headers are read past the cap closes
    the spill (which deletes its file) before the interrupt goes on, as an unreadable result
    does: not when, or if, its object is collected."""
    import io

    import gpumesh.writer as writer

    kv, keys, blobs = _results(tmp_path, np.random.default_rng(7), n=120)
    closed = []

    class Roomy(io.BytesIO):
        def close(self):
            closed.append(self.tell())
            super().close()

    real = writer._header_batches

    def interrupted(*args, **kwargs):
        for k, got in enumerate(real(*args, **kwargs)):
            if k == 3:
                raise KeyboardInterrupt
            yield got

    monkeypatch.setattr(writer.tempfile, "TemporaryFile", lambda **kwargs: Roomy())
    monkeypatch.setattr(writer, "_header_batches", interrupted)
    monkeypatch.setattr(writer, "ASSEMBLY_INDEX_BYTES", 1)
    monkeypatch.setattr(writer, "HEADER_BATCH_ROWS", 1)
    try:
        writer._read_index(writer.TaskResults(kv, keys, cache_bytes=0), {}, 3, False)
    except KeyboardInterrupt:   # (checked while the exception holds the frames)
        assert len(closed) == 1 and closed[0] > 0
    else:
        pytest.fail("the interrupt was lost")


def test_a_part_and_the_resume_after_it_list_the_scratch_area_no_more_than_they_need(tmp_path, monkeypatch):
    """The listing of DEST made before a run writes its plan also gives the tasks finished there
    (``finished_tasks(keys=)``): a part lists its task results twice (what is left of its share,
    then the whole job's progress for its summary), the resume that writes the output once (it
    was twice and three times: each listing of a few hundred thousand results takes a second on
    a local disk, and many requests on a cloud store).  The parts skip what they finished."""
    from gpumesh.pipeline import MeshOptions, Plan, part_tasks, run_mesh, task_name

    from conftest import tree_files

    listed = []
    list_keys = storage.list_keys

    def counting(kv, prefix=""):
        keys = list_keys(kv, prefix)
        if any(k.startswith(SCRATCH + "blocks/") for k in keys) or prefix.startswith(SCRATCH + "blocks"):
            listed.append(prefix)
        return keys

    rng = np.random.default_rng(5)
    vol = np.zeros((60, 50, 40), np.uint32)
    for label in range(1, 25):
        lo = rng.integers(0, 35, 3)
        vol[lo[0]:lo[0] + 9, lo[1]:lo[1] + 7, lo[2]:lo[2] + 5] = label
    options, dest = MeshOptions(chunk_size=8), tmp_path / "parts"
    tasks = Plan.make(vol.shape, options).tasks()
    run_mesh(vol, str(dest), options=options, workers=1, part=(0, 2))
    monkeypatch.setattr(storage, "list_keys", counting)
    again = run_mesh(vol, str(dest), options=options, workers=1, part=(0, 2))   # all its tasks done
    assert (again.tasks, again.tasks_resumed, len(listed)) == (len(part_tasks(tasks, 0, 2)),) * 2 + (2,)
    listed.clear()
    run_mesh(vol, str(dest), options=options, workers=1, part=(1, 2))
    assert len(listed) == 2
    results, named, _, _, _ = _scratch(dest)   # a result each, or a name in a record (found nothing)
    assert sorted(results + named) == sorted(map(task_name, tasks))
    listed.clear()
    last = run_mesh(vol, str(dest), options=options, workers=1, resume=True)
    assert last.tasks_resumed == len(tasks) and len(listed) == 1
    monkeypatch.setattr(storage, "list_keys", list_keys)
    run_mesh(vol, str(tmp_path / "whole"), options=options, workers=1)
    assert tree_files(dest) == tree_files(tmp_path / "whole")


def test_a_part_reads_each_record_of_tasks_that_found_nothing_once(tmp_path, monkeypatch):
    """A part reads the records of tasks that found nothing (:class:`pipeline._EmptyTasks`) at
    its start, for what is left of its share, and again for its summary, for the whole job's
    progress: the second time only those written since by the other parts, and never its own
    (it read every record twice and its own once: hundreds of small reads a part on a cloud
    store).  Its summary counts the same either way."""
    from gpumesh.pipeline import MeshOptions, Plan, run_mesh

    class Counting:
        def __init__(self, kv):
            self.kv, self.reads = kv, collections.Counter()

        def read(self, key, *args, **kwargs):
            self.reads[key] += 1
            return self.kv.read(key, *args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.kv, name)

    made = []
    open_kvstore = storage.open_kvstore

    def counting(*args, **kwargs):
        made.append(Counting(open_kvstore(*args, **kwargs)))
        return made[-1]

    vol = np.zeros((64, 64, 64), np.uint32)   # tasks in the empty corner find nothing
    vol[2:20, 3:25, 4:17] = 7
    options, dest = MeshOptions(chunk_size=8, max_lods=2), tmp_path / "parts"
    tasks = Plan.make(vol.shape, options).tasks()
    first = run_mesh(vol, str(dest), options=options, workers=1, part=(0, 3))
    monkeypatch.setattr(storage, "open_kvstore", counting)
    second = run_mesh(vol, str(dest), options=options, workers=1, part=(1, 3))
    monkeypatch.setattr(storage, "open_kvstore", open_kvstore)
    _, _, nrecords, _, keys = _scratch(dest)
    records = [k for k in keys if k.startswith(SCRATCH + "empty/")]
    reads = collections.Counter()
    for kv in made:
        reads.update({k: n for k, n in kv.reads.items() if k.startswith(SCRATCH + "empty/")})
    run = lambda k: k[len(SCRATCH + "empty/"):].partition("-")[0]
    assert nrecords >= 2 and len({run(k) for k in records}) == 2   # each part wrote some
    ours = {k for k in records if k not in reads}
    assert ours and all(n == 1 for n in reads.values()) and len(reads) == nrecords - len(ours)
    assert first.tasks_done_all < second.tasks_done_all == first.tasks_done_all + second.tasks
    assert second.tasks_done_all < len(tasks)


@pytest.mark.parametrize("ahead", [0, 1, 3])
def test_in_flight_submits_the_next_task_before_it_hands_one_on(ahead):
    """:class:`gpumesh.pipeline._InFlight` submits at least one task (``ahead`` below 1 counts as
    1), and tops the tasks in flight up before it hands a finished one on, so that a worker never
    waits on the caller's handling of a result: when the n-th future is handed on, ``ahead + n``
    tasks (or all) have been submitted, in the order given."""
    from concurrent.futures import ThreadPoolExecutor

    from gpumesh.pipeline import _InFlight

    order, seen = [], []
    with ThreadPoolExecutor(2) as pool:
        def submit(i):
            order.append(i)
            return pool.submit(lambda: i)

        flight = _InFlight(submit, range(20), ahead)
        for n, fut in enumerate(flight, 1):
            seen.append(len(order))
            assert fut.result() in order
    step = max(1, ahead)
    assert seen == [min(20, step + n) for n in range(1, 21)] and order == list(range(20))


def test_in_flight_follows_a_changing_number_ahead_with_no_task_finishing(monkeypatch):
    """Given a callable ``ahead`` (a Dask cluster's threads, which change as workers join or
    leave), :class:`gpumesh.pipeline._InFlight` asks it again every ``REFILL_S`` seconds while
    no task finishes, and tops the tasks in flight up to it; where it shrinks, no task is
    cancelled and none is submitted until fewer are in flight; each task is handed on once."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    import gpumesh.pipeline as pipeline
    from gpumesh.pipeline import _InFlight

    monkeypatch.setattr(pipeline, "REFILL_S", 0.02)
    release = threading.Event()
    target = [2]
    order: list = []
    with ThreadPoolExecutor(16) as pool:
        def submit(i):
            order.append(i)
            return pool.submit(lambda: (release.wait(10), i)[1])

        flight = _InFlight(submit, range(40), lambda: target[0])
        assert len(flight.pending) == 2
        got = []
        taking = threading.Thread(target=lambda: got.extend(f.result() for f in flight))
        taking.start()
        time.sleep(0.1)
        assert len(order) == 2   # nothing finished, the same number ahead: no more submitted
        target[0] = 9   # workers joined
        until = time.monotonic() + 5
        # the taking thread adds a task to pending once submitted: both are waited for
        while (len(order) < 9 or len(flight.pending) < 9) and time.monotonic() < until:
            time.sleep(0.01)
        assert len(order) == 9 and len(flight.pending) == 9
        target[0] = 0   # every worker gone: the tasks in flight stay, none is added (at least 1 is kept)
        time.sleep(0.1)
        assert len(order) == 9
        target[0] = 3
        release.set()
        taking.join(10)
    assert not taking.is_alive() and sorted(got) == list(range(40)) and order == list(range(40))


def test_the_main_job_submits_its_tasks_in_plan_order_one_per_result_taken(tmp_path, monkeypatch):
    """A local pool gets the plan's tasks in the plan's order, ``TASKS_AHEAD`` per worker first,
    then one more as each result is taken (before it is handled): at the report of the n-th
    finished task, ``TASKS_AHEAD * workers + n`` tasks (or all) have been submitted."""
    import gpumesh.pipeline as pipeline
    from gpumesh.pipeline import MeshOptions, Plan, run_mesh

    order, at_report = [], []

    class RecordingPool(pipeline.ProcessPoolExecutor):
        def submit(self, fn, *args, **kwargs):
            if fn is pipeline._run_task:
                order.append(args[0])
            return super().submit(fn, *args, **kwargs)

    def progress(done, total):
        if done:
            at_report.append((done, len(order)))

    vol = np.zeros((64, 64, 48), np.uint32)
    vol[3:50, 9:60, 2:40] = 7
    options = MeshOptions(chunk_size=16)
    tasks = Plan.make(vol.shape, options).tasks()
    ahead = pipeline.TASKS_AHEAD * 2
    assert len(tasks) > 2 * ahead
    monkeypatch.setattr(pipeline, "ProcessPoolExecutor", RecordingPool)
    run_mesh(vol, str(tmp_path / "out"), options=options, voxel_size=(1, 1, 1), workers=2, progress=progress)
    assert order == tasks
    assert at_report == [(n, min(len(tasks), ahead + n)) for n in range(1, len(tasks) + 1)]


def test_the_index_is_held_whole_exactly_while_its_rows_fit_whatever_the_batches(tmp_path, monkeypatch):
    """Joined in batches, the assembly's index is held whole (not read again by wave) exactly when
    all its fragment entries fit in ``ASSEMBLY_INDEX_BYTES``, as when the results were added one
    at a time: with the cap at their bytes it is the whole index, one byte less and it is None
    (and the waves' rows are then the same entries)."""
    import gpumesh.writer as writer

    rng = np.random.default_rng(7)
    kv, keys, blobs = _results(tmp_path, rng, n=120)
    want = _index_one_by_one(blobs, 3)[0]
    assert len(want) > 10
    for batch_rows in (1, 1 << 16):
        monkeypatch.setattr(writer, "HEADER_BATCH_ROWS", batch_rows)
        for cap, whole, spill in ((want.nbytes, True, True), (want.nbytes - 1, False, True),
                                  (want.nbytes - 1, False, False)):
            monkeypatch.setattr(writer, "ASSEMBLY_INDEX_BYTES", cap)
            monkeypatch.setattr(writer, "INDEX_SPILL", spill)
            index = writer._read_index(writer.TaskResults(kv, keys, cache_bytes=0), {}, 3, False)[0]
            assert isinstance(index, np.ndarray) == whole, (batch_rows, cap)
            if whole:
                assert index.tobytes() == want.tobytes()
            else:   # past the cap: every entry in the spill, in order; or none held
                assert (index.rows == len(want)) if spill else index is None
            rows = writer._wave_rows(writer.TaskResults(kv, keys, cache_bytes=0), index, np.unique(want["label"]),
                                     {"index_waves": 0})
            assert rows.tobytes() == want.tobytes()
            if spill and not whole:
                index.close()


def test_joined_entries_keep_result_numbers_past_16_bits():
    """A job's task results are numbered past 65,535 (620,978 tasks for a 1.1-teravoxel volume):
    the joined entries keep each result's full number and its own data offset."""
    from gpumesh.writer import _joined_entries

    rng = np.random.default_rng(9)
    numbers = [3, 70_000, 2 ** 32 - 1]
    parsed = [(b, *unpack_block_header(_random_result(rng, 2 + i, 1))) for i, b in enumerate(numbers)]
    ext, labels, counts = _joined_entries(parsed)
    assert ext["block"].tolist() == [b for (b, index, *_) in parsed for _ in range(len(index))]
    assert ext["offset"].tolist() == [int(o) + start for (_, index, _, _, start) in parsed for o in index["offset"]]
    assert labels.tolist() == [int(v) for p in parsed for v in p[2]]


def test_finished_tasks_from_a_listing_are_those_of_a_listing_of_the_scratch_area(tmp_path):
    """``finished_tasks(keys=)`` reads a listing of all of DEST's keys, or of its scratch area's,
    as it would list them itself: only results under the scratch area, of this stamp, count (a
    key elsewhere whose tail looks like a result's name does not)."""
    from gpumesh.pipeline import finished_tasks

    kv = storage.open_kvstore(str(tmp_path / "dest"))
    prefix = SCRATCH + "blocks/"
    pairs = [(f"{prefix}0_0_0.o1@abc", b"x"), (f"{prefix}0_0_1.coarse@abc", b"x"), (f"{prefix}1_0_0@other", b"x"),
             ("x" * len(prefix) + "2_0_0.o3@abc", b"x"), ("info", b"{}"), (SCRATCH + "plan.json", b"{}")]
    storage.write_many(kv, pairs, sync=False)
    listed = finished_tasks(kv, "abc")
    assert listed == {"0_0_0.o1", "0_0_1.coarse"}
    assert finished_tasks(kv, "abc", storage.list_keys(kv)) == listed
    assert finished_tasks(kv, "abc", storage.list_keys(kv, prefix)) == listed
    assert finished_tasks(kv, "abc", []) == set()


def _sparse(shape=(80, 72, 64), seed=11):
    """A volume that is background but for a few boxes near one corner: most of its tasks find
    nothing."""
    rng = np.random.default_rng(seed)
    vol = np.zeros(shape, np.uint32)
    for label in range(1, 6):
        lo = rng.integers(0, 14, 3)
        vol[lo[0]:lo[0] + 9, lo[1]:lo[1] + 8, lo[2]:lo[2] + 7] = label
    return vol


def _scratch(dest):
    """(result names, record names, record count) of the scratch area of ``dest``."""
    kv = storage.open_kvstore(str(dest))
    keys = storage.list_keys(kv, SCRATCH)
    results = [parse_block_key(k)[0] for k in keys if k.startswith(SCRATCH + "blocks/")]
    records = [k for k in keys if k.startswith(SCRATCH + "empty/")]
    named = [n for k in records for n in storage.read(kv, k).decode().splitlines()]
    return results, named, len(records), kv, keys


@pytest.mark.parametrize("workers", [1, 2])
def test_tasks_that_find_nothing_are_recorded_by_name_not_a_result_each(tmp_path, workers):
    """An array job's parts on a sparse volume: a task that found only background writes no
    task result (a file to write, list, read and delete per task, hundreds of thousands of
    requests on a cloud store); its run records it by name, in one record here.  Every task is
    either a result that holds something or a recorded name, once; the run that writes the
    output takes the recorded ones as finished (it reads none: they have no key), and writes
    the bytes of a single run."""
    from gpumesh.pipeline import MeshOptions, Plan, block_header_size, run_mesh, scratch_tasks, task_name

    from conftest import tree_files

    vol, options = _sparse(), MeshOptions(chunk_size=8)
    tasks = Plan.make(vol.shape, options).tasks()
    dest = tmp_path / "parts"
    for k in range(2):
        run_mesh(vol, str(dest), options=options, workers=workers, part=(k, 2))
    results, named, records, kv, keys = _scratch(dest)
    assert records == 2   # one per part
    assert len(named) > len(tasks) // 2 and len(results) > 0
    assert sorted(results + named) == sorted(map(task_name, tasks))
    stamp = parse_block_key(next(k for k in keys if k.startswith(SCRATCH + "blocks/")))[1]
    blobs = {parse_block_key(k): storage.read(kv, k) for k in keys if k.startswith(SCRATCH + "blocks/")}
    assert not any(block_is_empty(b) for b in blobs.values())
    # each key says its result's header size (the run after the parts reads each header at once)
    assert all(h == block_header_size(b) and s == stamp for (_, s, h), b in blobs.items())
    assert scratch_tasks(kv, stamp) == (set(results) | set(named), set(named))
    # a recorded task has no key: reading it would stop the run (missing from the scratch area)
    last = run_mesh(vol, str(dest), options=options, workers=workers, resume=True)
    assert last.tasks_resumed == len(tasks)
    assert not storage.list_keys(storage.open_kvstore(str(dest)), SCRATCH)   # records deleted with the rest
    run_mesh(vol, str(tmp_path / "one"), options=options, workers=1)
    assert tree_files(dest) == tree_files(tmp_path / "one")


def test_a_result_key_says_its_header_size_and_parses_back():
    """:func:`block_key` names a result by its task, the job's stamp and its header's size;
    :func:`parse_block_key` gives them back, and a key without them (gpumesh before) parses with
    an empty stamp or a header of 0 (read then in two requests, as before)."""
    from gpumesh.pipeline import COARSE, block_key

    for task in (((0, 0, 0), None), ((3, 12, 7), 5), ((1, 2, 3), COARSE), ((10, 0, 2), 0)):
        name = block_key(task)[len(SCRATCH + "blocks/"):]
        for stamp in ("", "0123456789abcdef"):
            for header in (0, 24, 123456):
                key = block_key(task, stamp, header)
                assert key.startswith(SCRATCH + "blocks/" + name)
                assert parse_block_key(key) == (name, stamp, header), key
                assert parse_block_key(key[len(SCRATCH + "blocks/"):]) == (name, stamp, header)


@pytest.mark.parametrize("workers", [1, 2])
def test_the_run_after_the_parts_reads_each_result_header_in_one_request(tmp_path, monkeypatch, workers):
    """An array job's last run (``--resume`` after the parts) did not run the tasks, so no worker
    handed it their results' headers: it reads them from the scratch area, and reads each in
    one byte-range request, its size taken from the result's key (it was two: the 24-byte prefix
    that gives the size, then the header; a round trip each on a cloud store).  With workers,
    this process reads the headers alone; in one process, each result whole, once."""
    from gpumesh import writer
    from gpumesh.pipeline import MeshOptions, run_mesh

    from conftest import tree_files

    vol, options = _sparse(), MeshOptions(chunk_size=8)
    dest = tmp_path / "parts"
    for k in range(2):
        run_mesh(vol, str(dest), options=options, workers=1, part=(k, 2))
    results = [k for k in storage.list_keys(storage.open_kvstore(str(dest)), SCRATCH)
               if k.startswith(SCRATCH + "blocks/")]
    assert results and all(parse_block_key(k)[2] > 0 for k in results)
    counters = []
    real = writer.TaskResults.__init__

    def counted(self, kv, keys, *args, **kwargs):
        counters.append(_CountingReads(kv))
        real(self, counters[-1], keys, *args, **kwargs)

    monkeypatch.setattr(writer.TaskResults, "__init__", counted)
    run_mesh(vol, str(dest), options=options, workers=workers, resume=True)
    monkeypatch.undo()
    (main,) = counters   # this process's (the workers read fragments with their own)
    assert dict(main.reads) == {k: 1 for k in results}
    run_mesh(vol, str(tmp_path / "one"), options=options, workers=1)
    assert tree_files(dest) == tree_files(tmp_path / "one")


def test_a_task_result_under_two_keys_gives_the_header_size_that_one_of_them_says(tmp_path):
    """A scratch area may hold a task's result under two keys: the one gpumesh wrote before keys
    said their header's size (``NAME@STAMP``) and one that says it (a run of each version into
    one DEST).  :func:`scratch_results` gives the size that the key says, whatever the order of
    the listing (the header is then read in one request, not two); a key that says none gives
    0, and a key of another stamp is not this job's."""
    from gpumesh.pipeline import scratch_results

    kv = storage.open_kvstore(str(tmp_path / "dest"))
    prefix = SCRATCH + "blocks/"
    keys = [f"{prefix}0_0_0.o1@abc", f"{prefix}0_0_0.o1@abc.h96", f"{prefix}1_0_0.coarse@abc",
            f"{prefix}1_0_0.coarse@other.h500", f"{prefix}2_0_0@abc.h40", f"{prefix}3_0_0@other"]
    for listing in (keys, keys[::-1]):
        assert scratch_results(kv, "abc", listing) == ({"0_0_0.o1": 96, "1_0_0.coarse": 0, "2_0_0": 40}, set())


@pytest.mark.parametrize("workers", [1, 2])
def test_a_run_resumed_after_an_older_gpumesh_reads_the_results_it_keyed_without_header_sizes(tmp_path, workers):
    """gpumesh before wrote a task result's key without its header's size (``NAME@STAMP``, the
    same stamp): a run resumed after one (here part 0 of 2, its keys renamed so) takes those
    tasks as finished, reads their results under those keys (their headers in two requests),
    and writes the bytes of a single run."""
    from gpumesh.pipeline import MeshOptions, finished_tasks, run_mesh

    from conftest import tree_files

    vol, options = _sparse(), MeshOptions(chunk_size=8)
    dest = tmp_path / "old"
    run_mesh(vol, str(dest), options=options, workers=1, part=(0, 2))
    blocks = dest / SCRATCH / "blocks"
    results = list(blocks.iterdir())
    assert results
    for path in results:
        name, stamp, header = parse_block_key(path.name)
        assert header > 0
        path.rename(blocks / f"{name}@{stamp}")
    done = finished_tasks(storage.open_kvstore(str(dest)), stamp)
    assert len(done) >= len(results)
    again = run_mesh(vol, str(dest), options=options, workers=workers, resume=True)
    assert again.tasks_resumed == len(done) < again.tasks
    run_mesh(vol, str(tmp_path / "one"), options=options, workers=1)
    assert tree_files(dest) == tree_files(tmp_path / "one")


def test_a_stopped_run_keeps_what_its_tasks_found_nothing_in_and_a_lost_record_is_run_again(tmp_path, monkeypatch):
    """Ctrl-C: the tasks that found nothing so far are recorded on the way out, and a resumed
    run skips them (``tasks_kept`` counts them); a record lost (deleted) only costs running its
    tasks again: the same bytes."""
    import tensorstore as ts

    from gpumesh import pipeline
    from gpumesh.pipeline import MeshOptions, Plan, run_mesh

    from conftest import tree_files

    vol, options = _sparse(), MeshOptions(chunk_size=8)
    tasks = Plan.make(vol.shape, options).tasks()
    real, calls = pipeline.mesh_block, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == len(tasks) // 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    dest = tmp_path / "out"
    monkeypatch.setattr(pipeline, "mesh_block", interrupted)
    with pytest.raises(KeyboardInterrupt) as info:
        run_mesh(vol, str(dest), options=options, workers=1)
    monkeypatch.setattr(pipeline, "mesh_block", real)
    results, named, records, kv, keys = _scratch(dest)
    assert records == 1 and len(named) > 0
    assert info.value.tasks_kept == (len(results) + len(named), len(tasks)) == (len(tasks) // 2 - 1, len(tasks))
    again = run_mesh(vol, str(dest), options=options, workers=1, resume=True)
    assert again.tasks_resumed == len(tasks) // 2 - 1
    run_mesh(vol, str(tmp_path / "one"), options=options, workers=1)
    assert tree_files(dest) == tree_files(tmp_path / "one")

    dest = tmp_path / "lost"
    run_mesh(vol, str(dest), options=options, workers=1, part=(0, 1))
    results, named, records, kv, keys = _scratch(dest)
    for k in keys:
        if k.startswith(SCRATCH + "empty/"):
            kv.delete_range(ts.KvStore.KeyRange(k, k + "\0")).result()
    again = run_mesh(vol, str(dest), options=options, workers=2, resume=True)
    assert again.tasks_resumed == len(results) and len(named) > 0
    assert tree_files(dest) == tree_files(tmp_path / "one")


def test_empty_tasks_are_recorded_a_batch_at_a_time_or_once_the_first_has_waited(tmp_path, monkeypatch):
    """:class:`gpumesh.pipeline._EmptyTasks` writes a record once it holds ``EMPTY_BATCH``
    names or its first has waited ``EMPTY_FLUSH_S``, each record under the run's own name and
    the job's stamp, every name once; ``flush(quiet=True)`` swallows a failed write (a run
    already failing), ``flush()`` raises it."""
    from gpumesh import pipeline
    from gpumesh.errors import DestinationError
    from gpumesh.pipeline import _EmptyTasks, scratch_tasks

    monkeypatch.setattr(pipeline, "EMPTY_BATCH", 3)
    kv = storage.open_kvstore(str(tmp_path / "dest"))
    rec = _EmptyTasks(kv, "st")
    for i in range(7):
        rec.add(f"{i}_0_0")
        rec.tick()
    assert len(storage.list_keys(kv, SCRATCH + "empty/")) == 2   # 6 names; the 7th waits
    monkeypatch.setattr(pipeline, "EMPTY_FLUSH_S", 0.0)
    rec.tick()
    keys = storage.list_keys(kv, SCRATCH + "empty/")
    assert len(keys) == 3 and all(k.endswith("@st") and f"/{rec.run}-" in k for k in keys)
    assert scratch_tasks(kv, "st") == ({f"{i}_0_0" for i in range(7)},) * 2 and rec.names == scratch_tasks(kv, "st")[0]
    assert scratch_tasks(kv, "other") == (set(), set())
    rec.flush()   # nothing pending: nothing written
    assert len(storage.list_keys(kv, SCRATCH + "empty/")) == 3

    class Refusing:   # a store that refuses writes
        def write(self, *args, **kwargs):
            raise ValueError("PERMISSION_DENIED: refused")

        def spec(self):
            return kv.spec()

    bad = _EmptyTasks(Refusing(), "st")
    bad.add("9_9_9")
    bad.flush(quiet=True)
    with pytest.raises(DestinationError):
        bad.flush()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_run_taken_over_records_nothing_on_the_way_out(tmp_path, monkeypatch, workers):
    """A run whose scratch area is deleted while it meshes (by hand, or by another run that has
    finished there since) stops at its next report, and does not record its tasks that found
    nothing on the way out: such a record, in no run's scratch area (no plan), was left in DEST,
    which the next run then refused as not empty, and ``validate`` warned of."""
    import shutil

    from gpumesh import DestinationTakenError, writer
    from gpumesh.pipeline import MeshOptions, run_mesh

    monkeypatch.setattr(writer, "OWNER_CHECK_S", 0.0)
    dest = tmp_path / "out"

    def delete_it(done, total):
        if done == 1:
            shutil.rmtree(dest / SCRATCH)

    vol = np.zeros((64, 64, 64), np.uint32)   # every task finds nothing: none writes a result
    with pytest.raises(DestinationTakenError, match="scratch area was deleted"):
        run_mesh(vol, str(dest), options=MeshOptions(chunk_size=8), workers=workers, progress=delete_it)
    assert not [p for p in dest.rglob("*") if p.is_file()]


def test_a_record_that_cannot_be_read_is_a_destination_error_naming_it(tmp_path):
    """A record of tasks that found nothing that cannot be read (an I/O error, no permission),
    or that is not one (bytes that are not text, or cut short: its last name not ended, which
    could be another task's name cut): :class:`DestinationError` naming it, as
    :func:`scratch_tasks` says, not TensorStore's bare ValueError (a traceback-less "bad input"
    on the command line) or a UnicodeDecodeError; one deleted since the listing is passed over."""
    from gpumesh.errors import DestinationError
    from gpumesh.pipeline import empty_key, scratch_tasks

    kv = storage.open_kvstore(str(tmp_path / "dest"))
    storage.write(kv, empty_key("a", 0, "st"), b"1_0_0\n2_0_0\n")
    storage.write(kv, empty_key("b", 0, "st"), b"\xff\xfe1_0_0\n")
    storage.write(kv, empty_key("c", 0, "st"), b"3_0_0\n4_0_1")   # cut short: "4_0_1" may be "4_0_10"
    keys = storage.list_keys(kv) + [empty_key("gone", 0, "st")]

    class Failing:   # a store whose reads of one record fail
        def read(self, key, **kwargs):
            if "/a-0@" not in key:
                return kv.read(key, **kwargs)

            class Future:
                def result(self):
                    raise ValueError("UNAVAILABLE: the store did not answer")

            return Future()

        def spec(self):
            return kv.spec()

    with pytest.raises(DestinationError, match=r"empty/a-0@st.*UNAVAILABLE"):
        scratch_tasks(Failing(), "st", keys)
    with pytest.raises(DestinationError, match=r"empty/b-0@st"):
        scratch_tasks(kv, "st", keys)
    storage.delete_prefix(kv, empty_key("b", 0, "st"))
    with pytest.raises(DestinationError, match=r"empty/c-0@st.*do not end a name"):
        scratch_tasks(kv, "st", keys)
    storage.delete_prefix(kv, empty_key("c", 0, "st"))
    assert scratch_tasks(kv, "st", keys) == ({"1_0_0", "2_0_0"},) * 2


@pytest.mark.parametrize("workers", [1, 2])
def test_tasks_that_find_nothing_are_recorded_as_the_run_goes_not_only_at_its_end(tmp_path, monkeypatch, workers):
    """A record is written each time ``EMPTY_BATCH`` names wait (here 2), in this process's
    loop and in the pool's: a run killed outright (SIGKILL, a node lost) loses only the names
    not yet recorded, not all of them."""
    import math

    from gpumesh import pipeline
    from gpumesh.pipeline import MeshOptions, run_mesh

    monkeypatch.setattr(pipeline, "EMPTY_BATCH", 2)
    dest = tmp_path / "out"
    run_mesh(_sparse(), str(dest), options=MeshOptions(chunk_size=8), workers=workers, part=(0, 1))
    results, named, records, _, _ = _scratch(dest)
    assert len(named) > 4 and len(set(named)) == len(named)
    assert records == math.ceil(len(named) / 2)


def test_a_pool_run_stopped_keeps_what_its_tasks_found_nothing_in(tmp_path):
    """Ctrl-C while the workers of a pool mesh: the tasks that found nothing so far are
    recorded on the way out (as a one-worker run's are), counted in ``tasks_kept``, skipped by
    the resumed run, which writes the bytes of one run."""
    from gpumesh.pipeline import MeshOptions, Plan, run_mesh

    from conftest import tree_files

    vol, options = _sparse(), MeshOptions(chunk_size=8)
    tasks = Plan.make(vol.shape, options).tasks()

    def stop(done, total):
        if done == len(tasks) // 2:
            raise KeyboardInterrupt

    dest = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt) as info:
        run_mesh(vol, str(dest), options=options, workers=2, progress=stop)
    results, named, records, _, _ = _scratch(dest)
    assert records == 1 and len(named) > len(tasks) // 4
    assert info.value.tasks_kept == (len(set(results) | set(named)), len(tasks))
    again = run_mesh(vol, str(dest), options=options, workers=2, resume=True)
    assert again.tasks_resumed == len(set(results) | set(named))
    run_mesh(vol, str(tmp_path / "one"), options=options, workers=1)
    assert tree_files(dest) == tree_files(tmp_path / "one")


def test_a_record_is_written_once_its_first_name_has_waited_empty_flush_s(tmp_path, monkeypatch):
    """``EMPTY_FLUSH_S`` counts from the first name not yet recorded, not the last: names that
    keep coming (a task that found nothing every few seconds) are still recorded every
    ``EMPTY_FLUSH_S``; the wait starts again with the first name after a record."""
    import types

    from gpumesh import pipeline
    from gpumesh.pipeline import _EmptyTasks

    clock = [1000.0]
    monkeypatch.setattr(pipeline, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    kv = storage.open_kvstore(str(tmp_path / "dest"))
    rec = _EmptyTasks(kv, "st")

    def records():
        return len(storage.list_keys(kv, SCRATCH + "empty/"))

    for i in range(4):   # a name every 10 s
        rec.add(f"{i}_0_0")
        rec.tick()
        assert records() == (1 if i == 3 else 0), i
        clock[0] += 10
    rec.add("9_0_0")   # 40 s after the first, 10 after the last record: waits
    rec.tick()
    clock[0] += pipeline.EMPTY_FLUSH_S - 1
    rec.tick()
    assert records() == 1
    clock[0] += 1
    rec.tick()
    assert records() == 2


def test_a_run_stopped_while_deleting_its_records_resumes(tmp_path, monkeypatch):
    """The output is written and the run is stopped while it deletes the records of its tasks
    that found nothing (the task results are gone): they go before the plan, which outlives
    them, so ``--resume`` finishes the job (the bytes of one run, no scratch area left) rather
    than refusing "a finished mesh" with records left in it."""
    import tensorstore as ts

    from gpumesh import pipeline
    from gpumesh.pipeline import MeshOptions, run_mesh

    from conftest import tree_files

    vol, options = _sparse(), MeshOptions(chunk_size=8)
    run_mesh(vol, str(tmp_path / "one"), options=options, workers=1)
    monkeypatch.setattr(pipeline, "EMPTY_BATCH", 8)   # several records, half of them deleted
    real = storage.delete_prefix

    def stopped_halfway(kv, prefix):
        if prefix != SCRATCH + "empty/":
            return real(kv, prefix)
        keys = storage.list_keys(kv, prefix)
        assert len(keys) > 2
        for key in keys[:len(keys) // 2]:
            kv.delete_range(ts.KvStore.KeyRange(inclusive_min=key, exclusive_max=key + "\x00")).result()
        raise KeyboardInterrupt

    dest = tmp_path / "out"
    monkeypatch.setattr(pipeline.storage, "delete_prefix", stopped_halfway)
    with pytest.raises(KeyboardInterrupt):
        run_mesh(vol, str(dest), options=options, workers=1)
    assert (dest / "info").exists() and (dest / SCRATCH / "plan.json").exists()
    monkeypatch.setattr(pipeline.storage, "delete_prefix", real)
    run_mesh(vol, str(dest), options=options, workers=1, resume=True)
    assert tree_files(dest) == tree_files(tmp_path / "one") and not (dest / SCRATCH).exists()


def test_names_waiting_are_recorded_while_the_run_waits_on_a_long_task(tmp_path, monkeypatch):
    """The names of tasks that found nothing are recorded ``EMPTY_FLUSH_S`` after the first,
    also while no task finishes (a long task runs): the main job looks every ``REFILL_S``.
    Before, it looked only as tasks finished, and a run killed outright during a long task lost
    them however long they had waited.  Here every task but the last is done and handled, the
    wait is then cut to 0, and a record must be written before the last task is let finish."""
    import time
    from concurrent.futures import Future

    from gpumesh import pipeline
    from gpumesh.pipeline import MeshOptions, Plan, run_mesh

    from conftest import tree_files

    vol, options = _sparse(), MeshOptions(chunk_size=8)
    tasks = Plan.make(vol.shape, options).tasks()
    dest = tmp_path / "out"
    monkeypatch.setattr(pipeline, "EMPTY_FLUSH_S", 1e9)   # no record as the tasks finish
    monkeypatch.setattr(pipeline, "REFILL_S", 0.05)
    others, seen = [], []

    def hold(real, held):
        until = time.monotonic() + 60
        while not (real.done() and all(f.done() for f in others)) and time.monotonic() < until:
            time.sleep(0.02)
        time.sleep(0.5)   # the main process has handled them
        pipeline.EMPTY_FLUSH_S = 0.0   # the names have waited long enough now
        time.sleep(0.5)
        kv = storage.open_kvstore(str(dest))
        seen.append(len(storage.list_keys(kv, SCRATCH + "empty/")))
        held.set_result(real.result())

    class HoldingPool(pipeline.ProcessPoolExecutor):
        def submit(self, fn, *args, **kwargs):
            fut = super().submit(fn, *args, **kwargs)
            if fn is not pipeline._run_task:
                return fut
            if args[0] != tasks[-1]:
                others.append(fut)
                return fut
            held = Future()   # the last task, let finish only after the check
            threading.Thread(target=hold, args=(fut, held), daemon=True).start()
            return held

    monkeypatch.setattr(pipeline, "ProcessPoolExecutor", HoldingPool)
    run_mesh(vol, str(dest), options=options, workers=2)
    assert seen == [1]
    run_mesh(vol, str(tmp_path / "one"), options=options, workers=1)   # no pool
    assert tree_files(dest) == tree_files(tmp_path / "one")


def _span_results(tmp_path):
    """Four task results of 4,000 random bytes in a scratch area: its kvstore, keys and bytes."""
    rng = np.random.default_rng(6)
    kv = storage.open_kvstore(str(tmp_path / "dest"))
    keys = [f"{SCRATCH}blocks/{i}_0_0" for i in range(4)]
    blobs = [rng.bytes(4000) for _ in keys]
    storage.write_many(kv, zip(keys, blobs), sync=False)
    return kv, keys, blobs


def test_a_workers_fragments_are_read_in_spans_of_each_result(tmp_path):
    """A worker writing some shards needs a few fragments of each task result, spread over it
    (its segments are drawn by hash); read one by one, each was a round trip to a cloud store
    (34,356 reads against a local S3 server for the real volume in 16 shards, 5,175 in spans).
    :meth:`TaskResults.prefetch` reads the fragments at most ``gap`` bytes apart in one byte
    range: the same bytes, one read per span; fragments past the cap are read alone, and a
    result cut short is still an error naming it."""
    from gpumesh.errors import GpumeshError
    from gpumesh.writer import INDEX_DTYPE, TaskResults, _read_fragments

    kv, keys, blobs = _span_results(tmp_path)
    # fragments of result 0 at 0-100, 150-250 (50 bytes apart), 2000-2100 (1750 apart); of
    # result 2 at 10-20 and 20-40 (adjacent); result 1 is kept whole; result 3 not needed
    rows = np.zeros(7, INDEX_DTYPE)
    rows["block"] = [0, 2, 0, 1, 0, 2, 1]
    rows["offset"] = [2000, 20, 0, 5, 150, 10, 3000]
    rows["size"] = [100, 20, 100, 10, 100, 10, 1000]
    rows["label"] = [3, 3, 4, 4, 5, 5, 5]
    want = [blobs[b][o:o + n] for b, o, n in zip(rows["block"], rows["offset"], rows["size"])]
    batch = [(label, rows[rows["label"] == label]) for label in (3, 4, 5)]
    for gap, cap, reads in ((1000, None, {keys[0]: 2, keys[1]: 1, keys[2]: 1}),   # 0-250 and 2000-2100
                            (5000, None, {keys[0]: 1, keys[1]: 1, keys[2]: 1}),
                            (0, None, {keys[0]: 3, keys[1]: 1, keys[2]: 1}),       # only adjacent ones join
                            (1000, 4000 + 250 + 100, {keys[0]: 2, keys[1]: 1, keys[2]: 2})):   # 2's past the cap
        counting = _CountingReads(kv)
        results = TaskResults(counting, keys, cache_bytes=cap)
        results.keep([1])
        results.prefetch(rows, gap=gap)
        got = [f for blobs_of in _read_fragments(results, batch) for f in blobs_of]
        order = np.concatenate([np.flatnonzero(rows["label"] == label) for label in (3, 4, 5)])
        assert got == [want[i] for i in order]
        assert dict(counting.reads) == reads, (gap, cap)
    # a result cut short after its header was read: its span runs past the end
    storage.write(kv, keys[0], blobs[0][:2050])
    results = TaskResults(kv, keys, cache_bytes=None)
    results.prefetch(rows, gap=1000)
    with pytest.raises(GpumeshError, match=r"blocks/0_0_0 cannot be read from the scratch area .*--overwrite"):
        list(_read_fragments(results, batch))


def test_spans_fill_the_cap_to_the_byte_and_drop_spans_restores_its_count(tmp_path):
    """The spans that :meth:`TaskResults.prefetch` reads count in the cap with the kept results:
    a span that ends the room exactly is read, one a byte past it is not (its fragments then
    read alone: the same bytes).  :meth:`TaskResults.drop_spans` gives back what the spans took,
    also after two prefetches or none; each span is read once and made bytes once, and a
    fragment outside every span of its result (before the first) is read alone; a result gone
    is an error naming it."""
    from gpumesh.errors import GpumeshError
    from gpumesh.writer import INDEX_DTYPE, TaskResults

    kv, keys, blobs = _span_results(tmp_path)
    rows = np.zeros(5, INDEX_DTYPE)   # result 0: spans 0-250 and 2000-2200 (two fragments); 1 kept
    rows["block"] = [0, 0, 0, 0, 1]
    rows["offset"] = [0, 150, 2000, 2100, 5]
    rows["size"] = [100, 100, 100, 100, 10]
    want = [blobs[b][o:o + n] for b, o, n in zip(rows["block"], rows["offset"], rows["size"])]
    for cap, spans, reads in ((4000 + 450, 2, 2), (4000 + 449, 1, 3)):
        counting = _CountingReads(kv)
        results = TaskResults(counting, keys, cache_bytes=cap)
        results.keep([1])
        made = []
        real = results.value
        results.value = lambda b, fut: made.append(b) or real(b, fut)
        results.prefetch(rows, gap=1000)
        assert len(results.spans[0][0]) == spans and results.kept_bytes == (4450 if spans == 2 else 4250) <= cap
        got = [f if isinstance(f, bytes) else results.value(b, f) for b, f in zip(rows["block"], results.read(rows))]
        assert got == want and counting.reads[keys[0]] == reads, cap
        assert made == [0] * reads   # a span made bytes once for its two fragments
        results.drop_spans()
        assert results.kept_bytes == 4000 and results.spans == {} and results.span_bytes == 0
    results = TaskResults(kv, keys)
    results.drop_spans()   # none: nothing to give back
    assert results.kept_bytes == 0
    results.prefetch(rows[:2], gap=1000)
    results.prefetch(rows[2:4], gap=1000)   # twice before a drop: both counted, both given back
    assert results.kept_bytes == results.span_bytes == 450
    results.drop_spans()
    assert results.kept_bytes == 0
    results.prefetch(rows[2:4], gap=1000)
    before = rows[:1].copy()
    before["offset"], before["size"] = 10, 20   # before the result's first span
    (fut,) = results.read(before)
    assert not isinstance(fut, bytes) and results.value(0, fut) == blobs[0][10:30]
    results.drop_spans()
    # a result gone after its header was read: its span's read is an error naming it
    storage.delete_prefix(kv, keys[0])
    results.prefetch(rows[:2], gap=1000)
    with pytest.raises(GpumeshError, match=r"blocks/0_0_0 is missing from the scratch area; rerun with --overwrite"):
        results.read(rows[:2])


def test_a_worker_prefetches_what_it_does_not_keep(tmp_path, monkeypatch):
    """A worker's task results (:func:`gpumesh.pipeline._worker_results`) hold the results it
    reads whole and, within the rest of its cap, spans of the others' fragments it writes."""
    from gpumesh import pipeline
    from gpumesh.writer import INDEX_DTYPE

    kv, keys, blobs = _span_results(tmp_path)
    counting = _CountingReads(kv)
    monkeypatch.setattr(pipeline, "_WORKER", {"kv": counting})
    rows = np.zeros(4, INDEX_DTYPE)
    rows["block"], rows["offset"], rows["size"] = [0, 0, 2, 1], [0, 150, 500, 0], [100, 100, 10, 4000]
    results = pipeline._worker_results(keys, np.array([1]), 10_000, rows)
    assert list(results.kept) == [1] and sorted(results.spans) == [0, 2]
    assert results.kept_bytes == 4000 + 250 + 10
    got = [f if isinstance(f, bytes) else results.value(b, f) for b, f in zip(rows["block"], results.read(rows))]
    assert got == [blobs[b][o:o + n] for b, o, n in zip(rows["block"], rows["offset"], rows["size"])]
    assert dict(counting.reads) == {keys[0]: 1, keys[1]: 1, keys[2]: 1}


def _a_workers_rows(tmp_path, monkeypatch):
    """Four task results (:func:`_span_results`) read by a worker whose reads are counted, and
    the rows of its part: 3 fragments of 100 bytes in the first 1,900 bytes of result 0 (one
    span), and results 1-3 whole (4,000 bytes each).  Returns keys, bytes, counter, rows."""
    from gpumesh import pipeline
    from gpumesh.writer import INDEX_DTYPE

    kv, keys, blobs = _span_results(tmp_path)
    counting = _CountingReads(kv)
    monkeypatch.setattr(pipeline, "_WORKER", {"kv": counting})
    rows = np.zeros(6, INDEX_DTYPE)
    rows["block"], rows["offset"] = [0, 0, 0, 1, 2, 3], [0, 900, 1800, 0, 0, 0]
    rows["size"] = [100, 100, 100, 4000, 4000, 4000]
    return keys, blobs, counting, rows


def _assert_read(results, rows, blobs) -> None:
    """``results`` give the bytes of fragments ``rows`` of results ``blobs``."""
    got = [f if isinstance(f, bytes) else results.value(b, f) for b, f in zip(rows["block"], results.read(rows))]
    assert got == [blobs[b][o:o + n] for b, o, n in zip(rows["block"], rows["offset"], rows["size"])]


def test_a_workers_whole_results_leave_its_spans_room(tmp_path, monkeypatch):
    """The results a worker reads whole stop short of its cap by what the others' fragments
    need, up to 1 / SPAN_ROOM_SHARE of the cap: kept up to the cap, they left those fragments
    no room, each read alone (here 3 reads for result 0 instead of 1)."""
    from gpumesh import pipeline

    keys, blobs, counting, rows = _a_workers_rows(tmp_path, monkeypatch)
    results = pipeline._worker_results(keys, np.array([1, 2, 3]), 12_000, rows)   # 3 would fill the cap
    assert list(results.kept) == [1, 2] and list(results.spans) == [0]
    assert results.kept_bytes == 8000 + 1900
    _assert_read(results, rows, blobs)
    assert counting.reads[keys[0]] == 1
    # the room left is what the spans need, not a quarter of the cap, where that is less
    results = pipeline._worker_results(keys, np.array([1, 2, 3]), 14_000, rows)
    assert list(results.kept) == [1, 2, 3] and list(results.spans) == [0]


def test_a_worker_holds_the_results_it_read_whole_for_its_next_parts(tmp_path, monkeypatch):
    """With ``hold`` (:class:`WorkerReads`: all results fit in a worker's cap), the results a
    worker reads whole for one part of the output (a shard) are held for its next parts: a
    second shard's fragments of those results take no read; results past the cap are not
    held (read again); without ``hold`` each part reads its own.  The bytes are the same."""
    from gpumesh import pipeline
    from gpumesh.writer import INDEX_DTYPE

    kv, keys, blobs = _span_results(tmp_path)
    counting = _CountingReads(kv)
    parts = []   # three shards' fragments: in results 0 and 1, then 0 and 2, then 2
    for blocks in ([0, 1], [0, 2], [2]):
        rows = np.zeros(len(blocks), INDEX_DTYPE)
        rows["block"], rows["offset"], rows["size"] = blocks, [100 * (len(parts) + 1)] * len(blocks), 50
        parts.append(rows)
    # held within the cap: 9,000 bytes hold results 0 and 1, so 2 is read again for the third
    for hold, cap, reads in [(True, 16_000, [1, 1, 1, 0]), (True, 9_000, [1, 1, 2, 0]),
                             (False, 16_000, [2, 1, 2, 0])]:
        monkeypatch.setattr(pipeline, "_WORKER", {"kv": counting})
        counting.reads.clear()
        for rows in parts:
            used = np.unique(rows["block"])
            results = pipeline._worker_results(keys, used, cap, rows, hold)
            assert set(results.kept) == set(used.tolist())   # not the others held
            _assert_read(results, rows, blobs)
        assert [counting.reads[k] for k in keys] == reads, (hold, cap)
        held = pipeline._WORKER.get("held_results")
        assert (held is not None) == hold
        if hold:
            assert held.bytes == sum(map(len, held.blobs.values())) <= cap
            assert all(held.blobs[k] == blobs[keys.index(k)] for k in held.blobs)


def test_workers_hold_every_result_only_where_all_fit_and_they_are_few(tmp_path):
    """:class:`WorkerReads` has each worker read every result it needs whole and hold it for
    all its parts where every result (headers included) fits in a worker's share of the cap
    and the workers are at most HOLD_WORKERS (each reads at most that many times what its parts
    need); else a part reads a result whole where it needs 1/8 of its bytes, else in spans."""
    from gpumesh.pipeline import BLOCK_PREFIX
    from gpumesh.writer import HOLD_WORKERS, INDEX_DTYPE, TaskResults, WorkerReads

    kv, keys, blobs = _span_results(tmp_path)
    rows = np.zeros(2, INDEX_DTYPE)
    rows["block"], rows["size"] = [0, 2], [100, 1000]
    frags = np.array([3900.0] * 4)   # 4 results of 3,900 fragment bytes and a 100-byte header
    for workers, share, header, hold in [(2, 16_000, 100, True), (2, 15_999, 100, False),
                                         (HOLD_WORKERS, 16_000, 100, True), (HOLD_WORKERS + 1, 16_000, 100, False),
                                         (2, 15_600 + 4 * BLOCK_PREFIX, 0, True),   # header sizes not known:
                                         (2, 15_599 + 4 * BLOCK_PREFIX, 0, False)]:  # a prefix each at least
        results = TaskResults(kv, keys, cache_bytes=workers * share)
        results.header_bytes[:] = header
        reads = WorkerReads(results, frags, workers)
        assert reads.hold == hold and reads.cap == share, (workers, share, header)
        assert reads.whole(rows).tolist() == ([0, 2] if hold else [2])
    results = TaskResults(kv, keys, cache_bytes=2 * (15_000 + BLOCK_PREFIX), empty=np.array([False, True, True, True]))
    assert WorkerReads(results, np.array([15_000.0, 0, 0, 0]), 2).hold   # results that hold nothing: no bytes


class _InProcess:
    """An executor that runs each task in this process as it is submitted (one worker)."""

    def submit(self, fn, *args):
        fut = concurrent.futures.Future()
        fut.set_result(fn(*args))
        return fut


@pytest.mark.parametrize("task", ["_run_shard_task", "_run_segments_task", "_run_write_task"])
def test_each_worker_task_holds_the_results_where_the_workers_reads_say(tmp_path, monkeypatch, task):
    """The ``hold`` of :class:`WorkerReads` reaches every worker task that writes part of the
    output (through :func:`gpumesh.writer._submit_part`: shards, runs of a shard's segments,
    segments' files): with it, a worker writing three parts reads each result once; without it
    (more than HOLD_WORKERS workers, the same cap), once for each part that reads it whole.
    Each part gets its fragments' bytes either way."""
    from types import SimpleNamespace

    from gpumesh import pipeline, writer
    from gpumesh.pipeline import BLOCK_PREFIX
    from gpumesh.writer import HOLD_WORKERS, INDEX_DTYPE, TaskResults, WorkerReads, _submit_part

    kv, keys, blobs = _span_results(tmp_path)
    by_key = dict(zip(keys, blobs))
    checked = []

    def check(results, rows):   # the part's fragments, by the keys it was sent
        got = [f if isinstance(f, bytes) else results.value(b, f) for b, f in zip(rows["block"], results.read(rows))]
        assert got == [by_key[results.keys[b]][o:o + n] for b, o, n in zip(rows["block"], rows["offset"], rows["size"])]
        checked.append(len(rows))

    monkeypatch.setattr(writer, "write_shard", lambda kv, results, rows, *rest: check(results, rows) or {})
    monkeypatch.setattr(writer, "build_segments", lambda results, rows, *rest: check(results, rows) or ([], {}))
    monkeypatch.setattr(writer, "write_all_segments", lambda kv, results, rows, *rest: check(results, rows))
    parts = []   # fragments of 1,000 bytes (1/4 of a result: read whole with or without hold) in 0 and 1, 0 and 2, 2
    for blocks in ([0, 1], [0, 2], [2]):
        rows = np.zeros(len(blocks), INDEX_DTYPE)
        rows["block"], rows["offset"], rows["size"] = blocks, 1000 * len(parts), 1000
        parts.append(rows)
    share = 4 * 4000 + 4 * BLOCK_PREFIX   # every result, its header's size not known
    fn = getattr(pipeline, task)
    args = (7, None) if task == "_run_shard_task" else ()   # a shard's number and spec
    for workers, reads in [(2, [1, 1, 1, 0]), (HOLD_WORKERS + 1, [2, 1, 2, 0])]:
        counting = _CountingReads(kv)
        monkeypatch.setattr(pipeline, "_WORKER", {"kv": counting, "plan": SimpleNamespace(lods=1), "options": None})
        results = TaskResults(kv, keys, cache_bytes=workers * share)
        worker_reads = WorkerReads(results, np.full(4, 4000.0), workers)
        assert worker_reads.hold == (workers == 2) and worker_reads.cap == share
        checked.clear()
        for rows in parts:
            _submit_part(_InProcess(), worker_reads, fn, rows, *args, num_lods=None, grid_origin=(0, 0, 0)).result()
        assert checked == [2, 2, 1]
        assert [counting.reads[k] for k in keys] == reads, workers


def test_the_results_a_worker_holds_count_in_each_parts_cap_and_fill_it_to_the_byte(tmp_path, monkeypatch):
    """A worker's part (:func:`gpumesh.pipeline._worker_results` with ``hold``) counts the held
    results it uses in its cap: with two of 4,000 bytes held and a cap of 9,000, a third result
    it needs is not kept whole (12,000 bytes; read, found past the cap, let go) and its
    fragment is read in a span within the 1,000 left.  Results that fill the cap to the byte
    are all held: the next part reads none of them again."""
    from gpumesh import pipeline
    from gpumesh.writer import INDEX_DTYPE

    kv, keys, blobs = _span_results(tmp_path)
    counting = _CountingReads(kv)

    def part(blocks, offset):
        rows = np.zeros(len(blocks), INDEX_DTYPE)
        rows["block"], rows["offset"], rows["size"] = blocks, offset, 50
        return rows

    monkeypatch.setattr(pipeline, "_WORKER", {"kv": counting})
    pipeline._worker_results(keys, np.array([0, 1]), 9000, part([0, 1], 0), True)
    rows = part([0, 1, 2], 100)
    results = pipeline._worker_results(keys, np.array([0, 1, 2]), 9000, rows, True)
    assert sorted(results.kept) == [0, 1] and list(results.spans) == [2]
    assert results.kept_bytes == 8000 + 50 == sum(map(len, results.kept.values())) + results.span_bytes <= 9000
    _assert_read(results, rows, blobs)
    assert [counting.reads[k] for k in keys] == [1, 1, 2, 0]   # 2 read whole (not kept: past the cap), then its span
    # a cap of 8,000 holds both to the byte: the next part, of result 1, reads nothing
    counting = _CountingReads(kv)
    monkeypatch.setattr(pipeline, "_WORKER", {"kv": counting})
    pipeline._worker_results(keys, np.array([0, 1]), 8000, part([0, 1], 0), True)
    assert pipeline._WORKER["held_results"].bytes == 8000
    rows = part([1], 200)
    results = pipeline._worker_results(keys, np.array([1]), 8000, rows, True)
    _assert_read(results, rows, blobs)
    assert [counting.reads[k] for k in keys] == [1, 1, 0, 0]


def test_results_kept_whole_let_the_last_kept_go_down_to_three_quarters_of_the_cap(tmp_path):
    """Where a result read whole does not fit in the cap (:meth:`TaskResults.iter_headers`), the
    results kept last are let go, one after another, until those kept hold at most the cap less
    1 / SPAN_ROOM_SHARE of it (here 3,000 of 4,000 bytes: results 4 and 3 go, 0-2 stay, to the
    byte); every header is still the whole result read."""
    from gpumesh.writer import SPAN_ROOM_SHARE, TaskResults

    assert SPAN_ROOM_SHARE == 4
    rng = np.random.default_rng(3)
    kv = storage.open_kvstore(str(tmp_path / "dest"))
    sizes = [1000, 1000, 1000, 500, 400, 2000, 1000]
    keys = [f"{SCRATCH}blocks/{i}_0_0" for i in range(len(sizes))]
    blobs = [bytes(24) + rng.bytes(n - 24) for n in sizes]   # headers of no entries: their size parses
    storage.write_many(kv, zip(keys, blobs), sync=False)
    results = TaskResults(kv, keys, cache_bytes=4000)
    heads = dict(results.iter_headers(None, whole=True))
    assert heads == dict(enumerate(blobs))
    assert results.full and list(results.kept) == [0, 1, 2] and results.kept_bytes == 3000


def test_a_workers_whole_results_fill_the_cap_less_what_they_leave_to_the_byte(tmp_path, monkeypatch):
    """:meth:`TaskResults.keep` keeps results while they hold at most the cap less ``leave``
    (two results of 4,000 bytes fill 9,000 less 1,000 exactly); a worker leaves at most
    1 / SPAN_ROOM_SHARE of the cap, however many bytes its spans would take (here 4,000)."""
    from gpumesh import pipeline
    from gpumesh.writer import INDEX_DTYPE, TaskResults

    kv, keys, blobs = _span_results(tmp_path)
    results = TaskResults(kv, keys, cache_bytes=9000)
    results.keep([0, 1, 2], leave=1000)
    assert list(results.kept) == [0, 1] and results.kept_bytes == 8000
    monkeypatch.setattr(pipeline, "_WORKER", {"kv": kv})
    rows = np.zeros(3, INDEX_DTYPE)
    rows["block"], rows["size"] = [0, 1, 2], [4000, 4000, 4000]
    results = pipeline._worker_results(keys, np.array([1, 2]), 11_000, rows)   # leaves 2,750
    assert list(results.kept) == [1, 2]


def test_the_records_a_run_has_read_stand_only_for_those_still_listed(tmp_path):
    """:func:`pipeline.scratch_results` given ``records`` (read or written already by this run)
    reads only the records listed that it does not hold, and adds them; one it holds that is no
    longer listed (deleted since: the scratch area deleted, and made again by a run of the same
    plan) counts for nothing."""
    from gpumesh.pipeline import empty_key, scratch_results

    kv = storage.open_kvstore(str(tmp_path / "dest"))
    held, new, gone = empty_key("a", 0, "s"), empty_key("b", 0, "s"), empty_key("c", 0, "s")
    storage.write(kv, new, b"t3\n")
    counting = _CountingReads(kv)
    records = {held: ["t1", "t2"], gone: ["t4"]}
    finished, found = scratch_results(counting, "s", [held, new], records)
    assert finished == {} and found == {"t1", "t2", "t3"}
    assert dict(counting.reads) == {new: 1} and records[new] == ["t3"]


def test_results_kept_whole_to_the_cap_exactly_still_leave_the_spans_room(tmp_path, monkeypatch):
    """Results kept whole that fill the cap to the byte at the end of a batch of reads
    (:data:`~gpumesh.writer.HEADER_READS`) leave the spans of the others their room too: no
    result went past the cap, yet the next batch is read by header, and they kept all of it."""
    from gpumesh import writer

    monkeypatch.setattr(writer, "HEADER_READS", 2)
    kv = storage.open_kvstore(str(tmp_path / "dest"))
    keys = [f"{SCRATCH}blocks/{i}_0_0" for i in range(5)]
    blobs = [bytes(24) + np.random.default_rng(i).bytes(976) for i in range(5)]   # headers of no entries
    storage.write_many(kv, zip(keys, blobs), sync=False)
    results = writer.TaskResults(kv, keys, cache_bytes=2000)   # results 0 and 1 fill it
    heads = dict(results.iter_headers(None, whole=True))
    assert [heads[b] for b in (0, 1)] == blobs[:2] and all(heads[b] == bytes(24) for b in (2, 3, 4))
    assert results.full and list(results.kept) == [0] and results.kept_bytes == 1000


def test_a_worker_leaves_its_spans_what_they_read_gaps_and_all(tmp_path, monkeypatch):
    """The room a worker's whole results leave is that of the spans the others' fragments are
    read in (:meth:`TaskResults.prefetch`: fragments up to SPAN_GAP_BYTES apart share one, the
    bytes between them read too), not the fragments' own bytes: here 3 fragments of 100 bytes
    in one span of 1,900, which left room for 300 did not fit and were read one by one."""
    from gpumesh import pipeline

    keys, blobs, counting, rows = _a_workers_rows(tmp_path, monkeypatch)
    results = pipeline._worker_results(keys, np.array([1, 2, 3]), 13_800, rows)   # 3 leave 1,800
    assert list(results.kept) == [1, 2] and list(results.spans) == [0]
    _assert_read(results, rows, blobs)
    assert counting.reads[keys[0]] == 1


def test_a_stopped_run_counts_the_tasks_it_keeps_without_reading_its_own_records_back(tmp_path, monkeypatch):
    """Ctrl-C: ``tasks_kept`` counts the tasks recorded as finding nothing by the records this
    run wrote (:class:`pipeline._EmptyTasks` adds them to the run's ``records``), not by reading
    them back from the scratch area."""
    from gpumesh import pipeline
    from gpumesh.pipeline import MeshOptions, Plan, run_mesh

    class Counting(_CountingReads):
        def __getattr__(self, name):
            return getattr(self.kv, name)

    vol, options = _sparse(), MeshOptions(chunk_size=8)
    tasks = Plan.make(vol.shape, options).tasks()
    real, calls, made = pipeline.mesh_block, [], []
    open_kvstore = storage.open_kvstore

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == len(tasks) // 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    def counting(*args, **kwargs):
        made.append(Counting(open_kvstore(*args, **kwargs)))
        return made[-1]

    monkeypatch.setattr(pipeline, "mesh_block", interrupted)
    monkeypatch.setattr(storage, "open_kvstore", counting)
    with pytest.raises(KeyboardInterrupt) as info:
        run_mesh(vol, str(tmp_path / "out"), options=options, workers=1)
    monkeypatch.setattr(storage, "open_kvstore", open_kvstore)
    assert made and not [k for kv in made for k in kv.reads if k.startswith(SCRATCH + "empty/")]
    _, named, records, _, _ = _scratch(tmp_path / "out")
    assert records == 1 and len(named) > 0 and info.value.tasks_kept[0] == len(tasks) // 2 - 1
