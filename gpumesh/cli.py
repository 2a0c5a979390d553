"""Command line: ``gpumesh mesh``, ``gpumesh validate``, ``gpumesh convert``.

Errors caused by bad input print one line (``gpumesh: error: ...``) and exit with status 2;
a failed validation, and a main job that failed once started (a worker process died, tasks
failed, a write failed: ``--resume`` continues it), exit with status 1; Ctrl-C, SIGTERM and
SIGHUP exit with status 130, 143 and 129.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import warnings

import click
from click.core import ParameterSource

from ._cliutil import _fail, _location, _numbers, _part, _segments
from .errors import (DestinationTakenError, EmptyVolumeWarning, GpumeshError, IndexInMemoryWarning,
                     NoVoxelSizeWarning, SegmentsNotFoundWarning, VoxelSizeOverrideWarning, WorkerFailedError)




def _sharding_flags(default_sharded):
    """The ``--sharded/--unsharded`` switch and the sharding overrides, shared by mesh and convert."""

    def decorate(fn):
        opts = [
            click.option("--sharded/--unsharded", "sharded", default=default_sharded,
                         help="multires: sharded files (neuroglancer_uint64_sharded_v1, the default) or one "
                              "manifest and one data file per segment; legacy meshes are never sharded"),
            click.option("--shard-bits", type=click.IntRange(0, 64), default=None,
                         help="2^N shard files (default: from segment count and bytes, see README)"),
            click.option("--minishard-bits", type=int, default=None,
                         help="2^N minishards per shard, 0-24 (default: automatic)"),
            click.option("--preshift-bits", type=click.IntRange(0, 64), default=None,
                         help="low ID bits ignored by the hash (default 0)"),
            click.option("--hash", "shard_hash", type=click.Choice(["murmurhash3_x86_128", "identity"]), default=None,
                         help="segment ID hash of the sharding [default: murmurhash3_x86_128]"),
            click.option("--minishard-index-encoding", type=click.Choice(["gzip", "raw"]), default=None,
                         help="[default: gzip]"),
            click.option("--data-encoding", type=click.Choice(["raw", "gzip"]), default=None,
                         help="encoding of the manifests in shards (fragment data is always raw) [default: raw]"),
        ]
        for opt in reversed(opts):
            fn = opt(fn)
        return fn

    return decorate


def _sharding_options(multires: bool, sharded, shard_bits, minishard_bits, preshift_bits, shard_hash,
                      minishard_index_encoding, data_encoding):
    """``ShardingOptions`` or ``None`` from the flags; one-line error on conflicting flags."""
    from .sharding import ShardingOptions

    overrides = {"shard_bits": shard_bits, "minishard_bits": minishard_bits, "preshift_bits": preshift_bits,
                 "hash": shard_hash, "minishard_index_encoding": minishard_index_encoding,
                 "data_encoding": data_encoding}
    given = {k: v for k, v in overrides.items() if v is not None}
    if not multires:
        if sharded:
            _fail(ValueError("legacy meshes have no sharded form (drop --sharded)"))
        sharded = False
    if sharded is None:
        sharded = True
    if not sharded:
        if given:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            _fail(ValueError(f"{flags} only apply to sharded output"))
        return None
    try:
        options = ShardingOptions(**given)
        options.validate()
    except ValueError as exc:
        _fail(exc)
    return options


#: Signals that stop a command as Ctrl-C does: SIGTERM (a batch scheduler's stop or preemption,
#: ``docker stop``, ``kill``) and SIGHUP (the terminal or the ssh session closed).  One that the
#: process ignores (``nohup``) stays ignored.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class _Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP (:data:`STOP_SIGNALS`), handled as Ctrl-C is; ``signum`` is the signal."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__()
        self.signum = signum


def _raise_terminated(signum, frame):
    # a second SIGTERM ends the process at once; a second SIGHUP is no one's second word: a
    # closed terminal sends it twice (the shell passes its SIGHUP on to its jobs, and the kernel
    # sends one to the foreground job when the shell exits), which ended the job half the time
    # before it had stopped its workers and said so
    signal.signal(signum, signal.SIG_IGN if signum == getattr(signal, "SIGHUP", None) else signal.SIG_DFL)
    raise _Terminated(signum)


def _stopped(exc: KeyboardInterrupt, what: str) -> None:
    """End a command stopped by Ctrl-C, SIGTERM or SIGHUP (``exc``): one line, ``gpumesh:
    interrupted; WHAT`` (``terminated (SIGTERM)`` or ``terminated (SIGHUP)`` for those), and
    status 128 + the signal's number."""
    if isinstance(exc, _Terminated):
        _last_word(f"gpumesh: terminated ({signal.Signals(exc.signum).name}); {what}")
        sys.exit(128 + exc.signum)
    _last_word(f"gpumesh: interrupted; {what}")
    sys.exit(130)


def _last_word(line: str) -> None:
    """``line`` on stderr, if it can still be written: after SIGHUP, stderr is often the closed
    terminal, whose write fails (EIO); the status must still say how the job ended (it was 1,
    the traceback's).  The streams are then pointed at ``os.devnull``, so that the
    interpreter's last flush of them does not fail in turn (status 120)."""
    try:
        click.echo(line, err=True)
    except OSError:
        for name in ("stdout", "stderr"):
            try:
                setattr(sys, name, open(os.devnull, "w"))
            except OSError:
                pass


def _stop_on_signals() -> dict:
    """Make SIGTERM and SIGHUP (:data:`STOP_SIGNALS`) stop the main job as Ctrl-C does (workers
    stopped, finished tasks kept, one line, status 128 + the signal), instead of ending the
    process with no word and leaving the worker pool's semaphores to the resource tracker's
    warning.  A signal the process ignores (``nohup gpumesh mesh ...`` ignores SIGHUP) is left
    ignored.  Returns the previous handlers by signal, for :func:`_restore_signals`; none where
    no handler can be set (not the main thread)."""
    previous = {}
    for sig in STOP_SIGNALS:
        try:
            if signal.getsignal(sig) == signal.SIG_IGN:
                continue
            previous[sig] = signal.signal(sig, _raise_terminated)
        except ValueError:   # not the main thread
            break
    return previous


def _restore_signals(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


@click.group()
@click.version_option(package_name="gpumesh-ng")
def main():
    """gpumesh: mesh segmentation volumes into Neuroglancer precomputed meshes."""


PROGRESS_EVERY_S = 30.0   # seconds between two progress lines in a log


class _ProgressLines:
    """The main job's progress as a line at the start, every :data:`PROGRESS_EVERY_S` seconds
    and at the end, where stderr is not a terminal (a batch or cloud job's log): tqdm's bar
    redraws one line with carriage returns, which a log keeps as one endless line."""

    FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%), {elapsed} elapsed, {remaining} left"
    DONE = "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%), {elapsed} elapsed"   # no rate: "? left"

    def __init__(self, total: int, initial: int, desc: str, unit: str):
        import time

        self.desc, self.unit = desc, unit
        self.total, self.n, self.initial = total, initial, initial
        self.clock = time.monotonic
        self.start = self.last = self.clock()
        self._line()

    def update(self, k: int) -> None:
        self.n += k
        now = self.clock()
        if now - self.last >= PROGRESS_EVERY_S or self.n >= self.total:
            self.last = now
            self._line()

    def close(self) -> None:
        pass

    def _line(self) -> None:
        from tqdm import tqdm

        form = self.DONE if self.n >= self.total else self.FORMAT
        click.echo(tqdm.format_meter(self.n, self.total, self.clock() - self.start, prefix=self.desc,
                                     bar_format=form.replace("{unit}", self.unit), initial=self.initial),
                   err=True)


@main.command()
@click.argument("source", callback=_location)
@click.argument("dest", callback=_location)
@click.option("--voxel-size", callback=_numbers(float), help="nm per voxel x,y,z (overrides metadata), e.g. 32,32,40")
@click.option("--voxel-offset", callback=_numbers(int, 3, "0,0,0"), help="voxel offset x,y,z (overrides metadata)")
@click.option("--bounds", callback=_numbers(int, 6, "0,0,0,512,512,256"), metavar="X0,Y0,Z0,X1,Y1,Z1",
              help="mesh only this box (global voxel coordinates, end excluded; clipped to the volume)")
@click.option("--mip", default=0, show_default=True,
              help="scale of a multiscale source (precomputed, OME-Zarr, N5 s0, s1, ...)")
@click.option("--axes", default=None, help="storage axis order, e.g. zyx, for a source without dimension names (overrides stored names)")
@click.option("--fill-missing/--no-fill-missing", default=True, show_default=True,
              help="read the source's chunks that are not stored as background (0); with --no-fill-missing a "
                   "task that needs one fails (igneous's default), and --resume continues once it is there")
@click.option("--format", "fmt", type=click.Choice(["multires", "legacy"]), default="multires", show_default=True)
@click.option("--quality", type=click.Choice(["low", "medium", "high"]), default="medium", show_default=True,
              help="decimation preset; high leaves LOD 0 undecimated")
@click.option("--chunk-size", default=64, show_default=True, help="LOD 0 octree node edge (voxels, power of two)")
@click.option("--max-lods", default=3, show_default=True,
              help="LODs per block; block edge = chunk-size * 2^(max-lods - 1) sets memory per worker "
                   "(fewer where one coarser node spans the volume)")
@click.option("--lods", "num_lods", type=int, default=None, help="LODs of every segment (default: by segment size)")
@click.option("--downsampling", type=click.Choice(["auto", "all"]), default="auto", show_default=True,
              help="each LOD's labels: auto halves only the finer axes while voxels are anisotropic "
                   "(4x4x40 nm: 8x8x40, 16x16x40, ...), all halves every axis")
@click.option("--bits", "bits", type=click.Choice(["10", "16"]), default="16", show_default=True,
              help="vertex quantization bits (multires only); 10 keeps every vertex and triangle in ~30% fewer bytes, "
                   "each vertex within chunk/1024 voxels of its LOD")
@click.option("--dust-threshold", type=int, default=0, show_default=True, metavar="VOXELS",
              help="skip segments with fewer voxels than this in the whole volume (voxels of the scale meshed: --mip's)")
@click.option("--segments", callback=_segments, default=None, metavar="IDS",
              help="mesh only these segment IDs: 1,2,3 or @FILE (IDs separated by commas, spaces or "
                   "newlines); each gets the bytes of the full job")
@click.option("--exclude-segments", callback=_segments, default=None, metavar="IDS",
              help="mesh every segment but these IDs (as --segments takes them; igneous's --exclude-labels); "
                   "the others get the bytes of the full job")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="parallel processes (default: the usable cores, as many as fit in memory; one, this "
                   "process, for a volume under 192^3 voxels)")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="run the tasks on the Dask cluster of this scheduler (tcp://host:8786, or a scheduler "
                   "file) instead of local processes; SOURCE and DEST must be reachable from its workers")
@click.option("--part", callback=_part, default=None, metavar="K/N",
              help="mesh only part K (from 0) of N of the tasks and write no output: one part per machine of "
                   "an array job, all into DEST; then --resume writes the output")
@click.option("--device", type=click.Choice(["auto", "cpu", "gpu"]), default="auto", show_default=True)
@click.option("--overwrite", is_flag=True, help="replace the mesh directory DEST holds (never files gpumesh did not write)")
@click.option("--resume", is_flag=True, help="continue an interrupted run into DEST")
@click.option("--segment-properties/--no-segment-properties", default=None,
              help="write segment properties (voxel counts); default: for at most 1,000,000 segments")
@click.option("--link-source", is_flag=True,
              help="set `mesh` (and `segment_properties`) in a precomputed source's info (rewrites the source)")
@_sharding_flags(None)
@click.option("--summary-json", type=click.Path(dir_okay=False), default=None, help="write the end summary as JSON")
@click.option("--quiet", is_flag=True, help="no progress (bar or log lines) and no notices; warnings still print")
def mesh(**params):
    """Mesh every segment of SOURCE into Neuroglancer precomputed meshes in DEST.

    SOURCE: a zarr v2/v3, N5, OME-Zarr or precomputed volume (path or URL).
    DEST: a directory path or kvstore URL (file://, gs://, s3://).
    Multi-resolution meshes are sharded unless --unsharded.
    """
    # Ctrl-C, SIGTERM or SIGHUP before the job starts (imports, a Dask scheduler that does not
    # answer): one line and 130 / 143 / 129, not click's "Aborted!" and status 1, which means a failed job
    previous = _stop_on_signals()
    try:
        _mesh(**params)
    except KeyboardInterrupt as exc:
        _stopped(exc, "nothing was written")
    finally:
        _restore_signals(previous)


def _mesh(source, dest, voxel_size, voxel_offset, bounds, mip, axes, fill_missing, fmt, quality, chunk_size, max_lods,
          num_lods, downsampling, bits, dust_threshold, segments, exclude_segments, workers, scheduler, part, device,
          overwrite, resume, segment_properties, link_source, sharded, shard_bits, minishard_bits, preshift_bits,
          shard_hash, minishard_index_encoding, data_encoding, summary_json, quiet):
    """The ``mesh`` command (:func:`mesh`), its SIGTERM and SIGHUP handlers installed."""
    if overwrite and resume:   # in the CLI's words (run_mesh refuses it in the Python API's)
        raise click.UsageError("give --overwrite or --resume, not both")
    if part is not None and scheduler is not None:   # before connecting to the scheduler
        raise click.UsageError("give --part or --scheduler, not both: each splits the job")
    from .resources import FewerWorkersNotice, WorkersMemoryWarning, usable_cores

    if scheduler is None and (workers or usable_cores()) > 1:
        from .workerserver import start_server

        start_server()   # the workers' server imports gpumesh while this process does the same

    from tqdm import tqdm

    from .backend import CPUFallbackNotice
    from .cluster import NoWorkersNotice, StillRunningNotice
    from .pipeline import MeshOptions, run_mesh

    sharding = _sharding_options(fmt == "multires", sharded, shard_bits, minishard_bits, preshift_bits, shard_hash,
                                 minishard_index_encoding, data_encoding)
    if fmt == "legacy":   # one resolution, float32 positions: refused rather than ignored
        ctx = click.get_current_context()
        given = [f"--{name.replace('_', '-')}" for name in ("bits", "max_lods", "lods", "downsampling")
                 if ctx.get_parameter_source("num_lods" if name == "lods" else name) != ParameterSource.DEFAULT]
        if given:
            _fail(ValueError(f"{', '.join(given)} only appl{'ies' if len(given) == 1 else 'y'} to multires output "
                             f"(legacy meshes have one resolution and store float32 positions)"))
    _check_summary_path(summary_json)   # before the job, not after it
    options = MeshOptions(chunk_size=chunk_size, max_lods=max_lods if fmt == "multires" else 1,
                          num_lods=num_lods, quality=quality, vertex_quantization_bits=int(bits), format=fmt,
                          segment_properties=segment_properties, sharding=sharding, dust_threshold=dust_threshold,
                          segments=segments, exclude_segments=exclude_segments, downsampling=downsampling)
    bar = None
    writing = False

    def advance(shown, done, total, desc, unit):
        """``shown`` moved on to ``done``; made on the first call: a bar on a terminal, lines in a log."""
        if shown is None:
            if sys.stderr.isatty():
                return tqdm(total=total, unit=unit, desc=desc, initial=done)
            return _ProgressLines(total, done, desc, unit + "s")
        shown.update(done - shown.n)
        return shown

    def progress(done, total):
        nonlocal bar, writing
        if quiet:
            return
        bar = advance(bar, done, total, "meshing", "task")
        if done >= total and not writing:   # the assembly, which can take minutes on a large job
            writing = True
            bar.close()
            if part is None:   # a part writes no output
                click.echo("writing the output", err=True)

    written = None

    def close_bars():
        for b in (bar, written):
            if b is not None:
                b.close()

    def write_progress(done, total):
        nonlocal written
        if quiet:
            return
        written = advance(written, done, total, "writing", "segment")
        if done >= total:
            written.close()

    caught = []

    def show(message, category, *args, **kwargs):
        if issubclass(category, (CPUFallbackNotice, FewerWorkersNotice, StillRunningNotice, NoWorkersNotice)):  # at once
            if not quiet:
                click.echo(f"gpumesh: {message}", err=True)
        elif issubclass(category, (NoVoxelSizeWarning, VoxelSizeOverrideWarning, WorkersMemoryWarning,
                                   IndexInMemoryWarning)):
            # at once: a reason to stop the job
            click.echo(f"gpumesh: warning: {message}", err=True)
        else:  # after the progress bar
            caught.append(message)

    client = None
    if scheduler is not None:
        from .cluster import connect

        if workers is not None:
            _fail(ValueError("--workers sets local processes; with --scheduler the cluster's workers run the tasks"))
        try:
            client = connect(scheduler)
        except (ImportError, OSError, ValueError) as exc:
            _fail(GpumeshError(f"cannot connect to the Dask scheduler at {scheduler}: {exc}"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", EmptyVolumeWarning)
            warnings.simplefilter("always", SegmentsNotFoundWarning)
            warnings.simplefilter("always", CPUFallbackNotice)
            warnings.simplefilter("always", FewerWorkersNotice)
            warnings.simplefilter("always", NoWorkersNotice)
            warnings.simplefilter("always", NoVoxelSizeWarning)
            warnings.simplefilter("always", VoxelSizeOverrideWarning)
            warnings.simplefilter("always", WorkersMemoryWarning)
            warnings.simplefilter("always", IndexInMemoryWarning)
            warnings.showwarning = show
            try:
                summary = run_mesh(source, dest, options=options, voxel_size=voxel_size, voxel_offset=voxel_offset,
                                   mip=mip, axes=axes, overwrite=overwrite, resume=resume, workers=workers,
                                   device=device, link_source=link_source, progress=progress,
                                   write_progress=write_progress, client=client,
                                   bounds=bounds, fill_missing=fill_missing, part=part)
            finally:
                if client is not None:
                    client.close()
                # wait for the workers' server, so that the workers' CPU time counts as this
                # process's children's (`time gpumesh mesh`, a benchmark's wait4)
                from .workerserver import stop_server

                stop_server()
    except (WorkerFailedError, DestinationTakenError) as exc:   # not bad input: status 1
        close_bars()
        click.echo(f"gpumesh: error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt as exc:   # Ctrl-C, SIGTERM, SIGHUP: the workers are stopped at once (pipeline._stop_workers)
        close_bars()
        from .storage import display

        kept = getattr(exc, "tasks_kept", None)   # (finished, all) once the tasks are known (run_mesh)
        if kept is None:
            what = "the finished tasks are kept"
        elif kept[0] == kept[1]:   # a part writes no output: it was about to end
            what = (f"all {kept[1]:,} tasks had finished (the output was being written); they are kept" if part is None
                    else f"all {kept[1]:,} of its tasks had finished; they are kept")
        elif kept[0] == 0:
            what = f"none of the {kept[1]:,} tasks had finished; the scratch area is kept"
        else:
            what = f"{kept[0]:,} of {kept[1]:,} tasks had finished; they are kept"
        again = "--resume" if part is None else f"the same --part {part[0]}/{part[1]}"
        _stopped(exc, f"{what} in {display(dest)}: run it again with {again} to continue")
    except (GpumeshError, ValueError) as exc:
        close_bars()
        _fail(exc)
    close_bars()
    for message in caught:
        click.echo(f"gpumesh: warning: {message}", err=True)
    s = summary
    # workers past what the device holds mesh on the CPU backend (gpu.device_processes)
    shared = f" ({s.device_workers} of them on it)" if s.device == "gpu" and s.device_workers < s.workers else ""
    if s.part is not None:   # no output yet
        click.echo(f"part:      {s.part}: {s.tasks - s.tasks_resumed:,} of its {s.tasks:,} tasks meshed "
                   f"({s.tasks_resumed:,} had finished before) in {s.seconds:.1f} s; {s.workers} worker(s), "
                   f"device {s.device}{shared}")
        left = s.tasks_all - s.tasks_done_all
        click.echo(f"job:       {s.tasks_done_all:,} of its {s.tasks_all:,} tasks have finished; "
                   + ("every task has: " if not left else
                      f"once every part has ended ({left:,} tasks left), ")
                   + "`gpumesh mesh` with --resume, the same SOURCE, DEST and options, writes the output")
        click.echo(f"peak RSS:  {s.peak_rss_mb:.0f} MiB (largest process)")
        if summary_json:
            _write_summary(summary_json, s.to_json())
        return
    dust = f" ({s.dust_segments:,} below the dust threshold, not meshed)" if s.dust_segments else ""
    click.echo(f"segments:  {s.segments}{dust}")
    for k, (t, f, v) in enumerate(zip(s.triangles_per_lod, s.fragments_per_lod, s.voxel_size_per_lod)):
        click.echo(f"LOD {k}:     {t:>12,} triangles  {f:>8,} fragments  ({'x'.join(f'{n:g}' for n in v)} nm voxels)")
    click.echo(f"bytes:     {s.bytes:,} (mesh files written)")   # validate's are the fragments'
    # the fragment index past its cap: read back from a temporary file, or from the results' headers
    waves = (f" in {s.index_waves} waves" + ("" if s.index_spilled else ", headers read again")
             if s.index_waves else "")
    click.echo(f"seconds:   {s.seconds:.1f}  (meshing {s.seconds_meshing:.1f}, writing {s.seconds_writing:.1f}{waves}; "
               f"{s.workers} worker(s), device {s.device}{shared}, "
               f"{s.blocks} blocks in {s.tasks} tasks, {s.tasks_resumed} resumed)")
    click.echo(f"peak RSS:  {s.peak_rss_mb:.0f} MiB (largest process)")
    if summary_json:
        _write_summary(summary_json, s.to_json())


def _check_summary_path(path: "str | None") -> None:
    """Refuse a ``--summary-json`` path whose folder is missing or not writable (status 2),
    before the work, not after it."""
    if path is not None:
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            _fail(ValueError(f"--summary-json {path}: {folder} is not a writable folder"))


def _write_summary(path: str, data: dict, done: str = "the meshes were written") -> None:
    """Write the end summary ``data`` as JSON to ``path`` (``--summary-json``).

    A regular file (or a new one) is written whole or not at all: to a temporary file beside
    it, renamed over it (over a symbolic link's target, the link kept; its permissions kept); anything else
    (``/dev/stdout``) is written to as is.  A failure (a full disk) is one line and status 1,
    which says ``done`` (the work was done; its report is not written).
    """
    text = json.dumps(data, indent=2)
    tmp = None
    try:
        if os.path.exists(path) and not os.path.isfile(path):   # a pipe, a device
            with open(path, "w") as fh:
                fh.write(text)
            return
        target = os.path.realpath(path)
        tmp = f"{target}.{os.getpid()}.tmp"
        with open(tmp, "w") as fh:
            fh.write(text)
        if os.path.exists(target):   # the file's permissions kept (a private 0600 report stays private)
            os.chmod(tmp, os.stat(target).st_mode & 0o7777)
        os.replace(tmp, target)
    except OSError as exc:
        if tmp is not None:
            try:
                os.remove(tmp)
            except OSError:
                pass
        click.echo(f"gpumesh: error: --summary-json {path}: cannot write it ({exc.strerror or exc}); {done}",
                   err=True)
        sys.exit(1)


@main.command()
@click.argument("dest", callback=_location)
@click.option("--segments", metavar="IDS", callback=_segments,
              help="check only these segment IDs: 1,2,3 or @FILE (IDs separated by commas, spaces or newlines)")
@click.option("--sample", type=click.IntRange(min=1), metavar="N",
              help="check only N segments drawn at random: a spot check of a large output")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of --sample")
@click.option("--decode/--no-decode", default=True, show_default=True,
              help="decode every fragment (geometry, triangle counts); without, only manifests, octrees, "
                   "sizes and shard structure")
@click.option("--threads", type=click.IntRange(min=1), metavar="N",
              help="threads that decode fragments  [default: one per core]")
@click.option("--summary-json", type=click.Path(dir_okay=False), default=None,
              help="write the report as JSON (also where violations are found)")
def validate(dest, segments, sample, seed, decode, threads, summary_json):
    """Check a precomputed mesh directory DEST against the spec and Neuroglancer's client rules.

    Status 0: no violation; 1: violations, listed on stderr (a DEST that holds no mesh is one);
    2: bad options, or a local DEST that is not a folder."""
    from . import storage
    from .validate import validate as run_validate

    if segments is not None and sample is not None:
        raise click.UsageError("give --segments or --sample, not both")
    if sample is None and click.get_current_context().get_parameter_source("seed") != ParameterSource.DEFAULT:
        raise click.UsageError("--seed only applies with --sample")
    try:   # a local folder that is missing or a file: say so (as the main job does of its source)
        spec = storage.kvstore_spec(dest)
    except ValueError:   # not a location: validate's report says why
        spec = {}
    local = spec.get("path", "").rstrip("/") if spec.get("driver") == "file" else None
    if local is not None and not os.path.isdir(local):
        _fail(f"{dest}: " + ("a file, not a mesh directory" if os.path.exists(local) else "no such directory"))
    _check_summary_path(summary_json)
    try:
        report = run_validate(dest, segments=segments, sample=sample, seed=seed, decode=decode, threads=threads)
    except GpumeshError as exc:
        _fail(exc)
    click.echo(report.format_table(errors=False))   # the violations on stderr, once
    if summary_json:
        _write_summary(summary_json, report.to_json(), "the report is above")
    if not report.ok:
        for err in report.errors[:50]:
            click.echo(f"  {err}", err=True)
        if report.num_errors > 50:
            click.echo(f"  ... and {report.num_errors - 50} more", err=True)
        sys.exit(1)


@main.command()
@click.argument("src", callback=_location)
@click.argument("dest", callback=_location)
@_sharding_flags(True)
@click.option("--overwrite", is_flag=True, help="replace the mesh directory DEST holds (never files gpumesh did not write)")
def convert(src, dest, sharded, shard_bits, minishard_bits, preshift_bits, shard_hash, minishard_index_encoding,
            data_encoding, overwrite):
    """Rewrite the multi-resolution mesh directory SRC into DEST, sharded (default) or --unsharded.

    Manifests and fragment data are copied byte for byte; other files (segment properties) as is.
    """
    from .writer import convert_mesh

    sharding = _sharding_options(True, sharded, shard_bits, minishard_bits, preshift_bits, shard_hash,
                                 minishard_index_encoding, data_encoding)
    previous = _stop_on_signals()
    try:
        result = convert_mesh(src, dest, sharding=sharding, overwrite=overwrite)
    except KeyboardInterrupt as exc:   # Ctrl-C, SIGTERM, SIGHUP: info is written last, so no reader trusts DEST
        from .storage import display

        _stopped(exc, f"{display(dest)} is incomplete (no info): run it again with --overwrite")
    except (GpumeshError, ValueError) as exc:
        _fail(exc)
    finally:
        _restore_signals(previous)
    click.echo(f"segments:  {result['segments']}")
    if result["sharding"] is not None:
        sh = result["sharding"]
        click.echo(f"shards:    {result['shards']} written (shard_bits {sh['shard_bits']}, "
                   f"minishard_bits {sh['minishard_bits']}, {sh['hash']})")
    click.echo(f"bytes:     {result['bytes']:,}")


from .cli_extra import COMMANDS as _EXTRA_COMMANDS  # noqa: E402  (segment, export, view)

for _cmd in _EXTRA_COMMANDS:
    main.add_command(_cmd)


if __name__ == "__main__":
    main()
