"""Commands ``gpumesh segment``, ``gpumesh export``, ``gpumesh view`` and ``gpumesh warmup``.

They are plain click commands; :mod:`gpumesh.cli` registers them on the ``gpumesh`` group
(``for cmd in COMMANDS: main.add_command(cmd)``).  Like the other commands, an error caused by
bad input prints one line (``gpumesh: error: ...``) and exits with status 2.
"""

from __future__ import annotations

import sys
import time

import click

from ._cliutil import _fail, _location, _numbers, _one_line_warnings, _segments
from .errors import GpumeshError

_MESH_SUFFIXES = ".stl, .ply, .obj or .glb"


def _bbox(ctx, param, value):
    """``x0,y0,z0,x1,y1,z1`` or ``x0,y0,z0:x1,y1,z1`` -> ((x0, y0, z0), (x1, y1, z1))."""
    if value is None:
        return None
    nums = _numbers(int, 6, "x0,y0,z0:x1,y1,z1")(ctx, param, value.replace(" ", ""))
    lo, hi = tuple(nums[:3]), tuple(nums[3:])
    if any(b <= a for a, b in zip(lo, hi)):
        raise click.BadParameter(f"bbox stop must exceed start on every axis, got {value!r}")
    return lo, hi


def _report(mesh, path, seconds) -> None:
    click.echo(f"triangles: {len(mesh.faces):,}")
    click.echo(f"vertices:  {len(mesh.vertices):,}")
    if len(mesh.faces):
        lo, hi = mesh.bounds
        click.echo(f"bounds:    {[round(float(v), 1) for v in lo]} - {[round(float(v), 1) for v in hi]} nm")
    click.echo(f"closed:    {'yes' if mesh.is_watertight else 'no'}")
    click.echo(f"seconds:   {seconds:.2f}")
    click.echo(f"wrote:     {path}")


@click.command("segment")
@click.argument("source", callback=_location)
@click.argument("segment_id", type=click.IntRange(min=1, max=2**64 - 1))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help=f"mesh file ({_MESH_SUFFIXES}); positions in nm")
@click.option("--voxel-size", callback=_numbers(float), help="nm per voxel x,y,z (overrides metadata), e.g. 32,32,40")
@click.option("--voxel-offset", callback=_numbers(int, 3, "0,0,0"), help="voxel offset x,y,z (overrides metadata)")
@click.option("--bbox", callback=_bbox, default=None,
              help="only this voxel box x0,y0,z0:x1,y1,z1 (array coordinates, stop exclusive); "
                   "default: scan the volume for the segment")
@click.option("--bounds", callback=_numbers(int, 6, "0,0,0,512,512,256"), metavar="X0,Y0,Z0,X1,Y1,Z1",
              help="the same in global voxel coordinates (voxel offset included), as gpumesh mesh --bounds")
@click.option("--mip", default=0, show_default=True, help="scale of a multiscale source")
@click.option("--axes", default=None, help="storage axis order, e.g. zyx, for a source without dimension names (overrides stored names)")
@click.option("--fill-missing/--no-fill-missing", default=True, show_default=True,
              help="read the source's chunks that are not stored as background (0), else stop with an error")
@click.option("--quality", type=click.Choice(["exact", "low", "medium", "high"]), default="exact", show_default=True,
              help="exact: the marching-cubes surface; else decimate like that preset's LOD 0")
@click.option("--device", type=click.Choice(["auto", "cpu", "gpu"]), default="auto", show_default=True)
@click.option("--scale", type=float, default=1.0, show_default=True, help="factor on positions (1e-3: µm)")
@click.option("--overwrite", is_flag=True, help="replace the output file if it exists")
def segment(source, segment_id, output, voxel_size, voxel_offset, bbox, bounds, mip, axes, fill_missing, quality,
            device, scale, overwrite):
    """Mesh segment SEGMENT_ID of the volume SOURCE now and write it to a file.

    SOURCE: a zarr v2/v3, N5, OME-Zarr or precomputed volume (path or URL).
    """
    from .export import export_adhoc, file_type_of

    try:
        file_type_of(output)
        t0 = time.perf_counter()
        with _one_line_warnings():
            mesh = export_adhoc(source, segment_id, output, scale=scale, bbox=bbox, mip=mip, voxel_size=voxel_size,
                                voxel_offset=voxel_offset, axes=axes, quality=None if quality == "exact" else quality,
                                device=device, bounds=bounds, fill_missing=fill_missing, overwrite=overwrite)
    except (GpumeshError, ValueError, OSError) as exc:
        _fail(exc)
    _report(mesh, output, time.perf_counter() - t0)


@click.command("export")
@click.argument("dest", callback=_location)
@click.argument("segment_id", type=click.IntRange(min=1, max=2**64 - 1))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help=f"mesh file ({_MESH_SUFFIXES}); positions in nm")
@click.option("--lod", default=0, show_default=True, type=click.IntRange(min=0), help="level of detail")
@click.option("--scale", type=float, default=1.0, show_default=True, help="factor on positions (1e-3: µm)")
@click.option("--overwrite", is_flag=True, help="replace the output file if it exists")
def export(dest, segment_id, output, lod, scale, overwrite):
    """Write segment SEGMENT_ID of the mesh directory DEST (one LOD, fragments joined) to a file.

    DEST: a multi-resolution (sharded or not) or legacy precomputed mesh directory, path or URL.
    """
    from .export import export_segment, file_type_of

    try:
        file_type_of(output)
        t0 = time.perf_counter()
        mesh = export_segment(dest, segment_id, output, lod=lod, scale=scale, overwrite=overwrite)
    except (GpumeshError, ValueError, OSError) as exc:
        _fail(exc)
    _report(mesh, output, time.perf_counter() - t0)


@click.command("view")
@click.argument("dest")
@click.option("--source", default=None, help="the label volume (path or URL), shown in the same layer")
@click.option("--segments", callback=_segments, default=None,
              help="segment IDs to show, e.g. 1,2,3 (default: the 5 largest, from segment properties)")
@click.option("--port", default=0, show_default=True, type=click.IntRange(0, 65535),
              help="port of the mesh server (0: any free port)")
@click.option("--voxel-size", callback=_numbers(float), default=None,
              help="nm per voxel of --source when its metadata has none Neuroglancer reads")
@click.option("--no-browser", is_flag=True, help="do not open a web browser")
@click.option("--no-neuroglancer", is_flag=True, help="do not start the local Neuroglancer viewer")
@click.option("--duration", type=float, default=None, hidden=True, help="serve this many seconds, then exit")
def view(dest, source, segments, port, voxel_size, no_browser, no_neuroglancer, duration):
    """Serve the mesh directory DEST on 127.0.0.1 and show it in Neuroglancer (Ctrl-C stops).

    With the `neuroglancer` Python package installed, a local viewer opens with a
    segmentation layer of the meshes; otherwise the precomputed URL is printed to paste
    into any Neuroglancer, with a ready link.
    """
    from .viewer import view as start_view

    try:
        session = start_view(dest, source=source, segments=segments, port=port, open_browser=not no_browser,
                             use_neuroglancer=not no_neuroglancer, voxel_size=voxel_size)
    except (GpumeshError, ValueError, OSError) as exc:
        _fail(exc)
    click.echo(f"mesh source:   {session.mesh_url}")
    if session.volume_url:
        click.echo(f"volume source: {session.volume_url}")
    segs = session.state["layers"][0]["segments"]
    click.echo(f"segments:      {', '.join(segs) if segs else '(none selected; pick them in the viewer)'}")
    if session.viewer_url:
        click.echo(f"viewer:        {session.viewer_url}")
    else:
        hint = "" if no_neuroglancer else "(pip install neuroglancer for a local viewer) "
        click.echo(f"viewer:        {hint}paste the mesh source into any Neuroglancer, or open:")
        click.echo(f"               {session.link}")
    sys.stdout.flush()
    try:
        if duration is not None:
            time.sleep(duration)
        else:
            click.echo("serving; Ctrl-C to stop")
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        session.stop()


@click.command("warmup")
@click.option("--dtype", "dtypes", default="all", show_default=True, metavar="DTYPE,...",
              help="label dtypes to compile the kernels for: uint8..uint64, int8..int64 (a signed dtype shares "
                   "its unsigned kernels), or all")
@click.option("--device", type=click.Choice(["auto", "cpu", "gpu"]), default="auto", show_default=True,
              help="auto and gpu also compile the CUDA kernels where CuPy sees a GPU")
def warmup(dtypes, device):
    """Compile gpumesh's kernels into their caches now, so that later jobs compile none.

    Run it where the jobs' kernels should come from, e.g. in a container image's build
    (RUN gpumesh warmup): numba's kernels go to the package's __pycache__ (or NUMBA_CACHE_DIR),
    CuPy's to its cache (CUPY_CACHE_DIR). Status 1 when some kernels failed to compile (they are
    compiled on first use then).
    """
    from .warmup import KERNEL_DTYPES, precompile

    names = KERNEL_DTYPES if dtypes.strip().lower() == "all" else [d.strip() for d in dtypes.split(",") if d.strip()]
    try:
        import numpy as np

        kinds = [np.dtype(d) for d in names]
    except TypeError as exc:
        _fail(f"--dtype: {exc}")
    t0 = time.perf_counter()
    try:
        with _one_line_warnings():
            report = precompile(kinds, device,
                                progress=lambda name, s: click.echo(f"{name + ':':<8} {s:6.1f} s"))
    except (GpumeshError, TypeError, ValueError) as exc:
        _fail(exc)
    click.echo(f"numba:    kernels for CPU {report.cpu_name} in {report.numba_cache or 'numba cache (unknown)'}")
    click.echo(f"CUDA:     {report.cuda}" + (f" (CuPy cache {report.cupy_cache})" if report.cupy_cache else ""))
    click.echo(f"seconds:  {time.perf_counter() - t0:.1f}")
    if report.failed:
        click.echo(f"gpumesh: error: not compiled (compiled on first use instead): {', '.join(report.failed)}",
                   err=True)
        sys.exit(1)


#: The commands to register on the ``gpumesh`` group.
COMMANDS = [segment, export, view, warmup]
