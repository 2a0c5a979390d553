"""Write meshes to common 3-D file formats (STL, PLY, OBJ, GLB) with trimesh's exporters.

Positions are written in nm (model space), as :func:`gpumesh.adhoc.mesh_segment` and
:func:`gpumesh.reader.load_mesh` return them; ``scale`` converts (``1e-3`` gives µm).

* :func:`export_mesh`: any ``trimesh.Trimesh`` to a file, the format from the suffix.
* :func:`export_segment`: a segment of a mesh directory already written (multi-resolution,
  sharded or not, or legacy; one LOD, fragments joined and welded) via
  :func:`gpumesh.reader.load_mesh`.
* :func:`export_adhoc`: mesh a segment of a volume now (:func:`gpumesh.adhoc.mesh_segment`)
  and write it.
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Any, Optional

import numpy as np

__all__ = ["FORMATS", "file_type_of", "export_mesh", "export_segment", "export_adhoc"]

#: File suffix -> trimesh file type.  STL, PLY and GLB are binary (float32 positions);
#: OBJ is text.
FORMATS = {".stl": "stl", ".ply": "ply", ".obj": "obj", ".glb": "glb"}


def file_type_of(path, file_type: Optional[str] = None) -> str:
    """The trimesh file type for ``path`` (from its suffix unless ``file_type`` is given).

    Raises
    ------
    ValueError
        Unknown suffix or type.
    """
    if file_type is not None:
        ft = file_type.lower().lstrip(".")
        if "." + ft not in FORMATS:
            raise ValueError(f"unknown mesh file type {file_type!r}; choose one of "
                             f"{', '.join(sorted(FORMATS.values()))}")
        return ft
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix not in FORMATS:
        raise ValueError(f"cannot tell the mesh format of {os.fspath(path)!r}: use a suffix among "
                         f"{', '.join(sorted(FORMATS))}")
    return FORMATS[suffix]


def _check_scale(scale) -> float:
    """``scale`` as a float, or ``ValueError`` unless it is a finite number > 0 (0 collapses the
    mesh, a negative one turns it inside out)."""
    try:
        value = float(scale)
    except (TypeError, ValueError):
        value = float("nan")
    if isinstance(scale, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
    return value


def _exists(path):
    from .errors import DestinationExistsError

    return DestinationExistsError(f"{os.fspath(path)} exists; use --overwrite to replace it")


def _check_output(path, overwrite: bool) -> None:
    """``DestinationExistsError`` if ``path`` exists and ``overwrite`` is false, and
    ``DestinationError`` if ``overwrite`` would write through a symbolic link to no file
    (checked before any reading or meshing, so a refused export costs nothing)."""
    if not overwrite and os.path.lexists(os.fspath(path)):
        raise _exists(path)
    _written_path(path, overwrite)


def _written_path(path, overwrite: bool) -> str:
    """The file that replacing ``path`` writes: with ``overwrite``, a symbolic link's target
    (the link kept), as cp and trimesh's own export do; ``DestinationError`` for a link to no
    file (dangling, a loop, a folder), which cp does not write through either."""
    path = os.fspath(path)
    if not (overwrite and os.path.islink(path)):
        return path
    if not os.path.isfile(path):
        from .errors import DestinationError

        raise DestinationError(f"cannot write {path}: a symbolic link to {os.path.realpath(path)}, which is no "
                               f"file (dangling, a loop or a folder); remove the link or write to its target")
    return os.path.realpath(path)


def _publish(tmp: str, path: str, overwrite: bool) -> None:
    """Give the finished temporary file ``tmp`` the name ``path``: ``os.replace`` with
    ``overwrite``, else a hard link, which fails rather than replace a file that appeared
    meanwhile (a file system without hard links falls back to a check and a rename)."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise _exists(path) from None
    except OSError:
        _check_output(path, False)
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def _umask() -> int:
    """The process's umask, read without setting it where Linux says it (threads may be
    creating files meanwhile)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def export_mesh(mesh, path, *, file_type: Optional[str] = None, scale: float = 1.0,
                overwrite: bool = False) -> str:
    """Write a mesh to ``path`` (atomically: a temporary file in the same folder, then renamed).

    Parameters
    ----------
    mesh : trimesh.Trimesh
    path : str or os.PathLike
        ``.stl``, ``.ply``, ``.obj`` or ``.glb`` (or give ``file_type``).
    file_type : str, optional
        ``stl``, ``ply``, ``obj`` or ``glb``.
    scale : float
        Factor applied to the positions (nm) before writing (glTF's unit is the metre: ``1e-9``
        opens a ``.glb`` at its true size).
    overwrite : bool
        Replace an existing file at ``path`` (where ``path`` is a symbolic link, its target);
        without it an existing file is an error.

    Returns
    -------
    str
        The path written.

    Raises
    ------
    ValueError
        Unknown format, a mesh without triangles, or ``scale`` not a finite number > 0.
    DestinationExistsError
        ``path`` exists and ``overwrite`` is false (also when another process creates it while
        this one writes: on a file system with hard links it is never replaced then).
    NotADirectoryError
        A folder of ``path`` is a file.
    DestinationError
        ``path`` is a symbolic link to no file (dangling, a loop of links, a folder) and ``overwrite``
        is true: it is not written through.
    """
    import trimesh

    scale = _check_scale(scale)
    ft = file_type_of(path, file_type)
    _check_output(path, overwrite)
    faces = np.asarray(mesh.faces)
    if len(faces) == 0:
        raise ValueError("the mesh has no triangles; nothing to export")
    out = trimesh.Trimesh(vertices=np.asarray(mesh.vertices, np.float64) * float(scale), faces=faces,
                          process=False)
    path = os.fspath(path)
    target = _written_path(path, overwrite)   # a symbolic link is written through (its target replaced)
    folder = os.path.dirname(os.path.abspath(target))
    above = folder
    while not os.path.exists(above) and os.path.dirname(above) != above:
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        raise NotADirectoryError(f"cannot write {path}: {above} is a file, not a folder")
    os.makedirs(folder, exist_ok=True)
    if ft == "obj":
        # text with trimesh's 8 decimals by default: at a scale such as 1e-9 (metres) they snap
        # the positions to 10 nm; keep float32's 8 significant digits of the largest coordinate
        top = float(np.abs(out.vertices).max())
        digits = max(8, 8 - math.floor(math.log10(top))) if top > 0 else 8
        data = out.export(file_type=ft, digits=digits)
    else:
        data = out.export(file_type=ft)
    if isinstance(data, str):
        data = data.encode()
    fd, tmp = tempfile.mkstemp(prefix=".gpumesh-", suffix="." + ft, dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            os.fchmod(fh.fileno(), 0o666 & ~_umask())   # mkstemp's file is the owner's only
        _publish(tmp, target, overwrite)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def export_segment(dest, segment_id: int, path, *, lod: int = 0, file_type: Optional[str] = None,
                   scale: float = 1.0, overwrite: bool = False):
    """Write one LOD of a segment of a precomputed mesh directory to a file.

    Parameters
    ----------
    dest : location or MeshSource
        Mesh directory (see :func:`gpumesh.reader.open_mesh`).
    segment_id : int
    path : str or os.PathLike
    lod : int
        Multi-resolution LOD (0 for legacy meshes).
    file_type, scale, overwrite
        See :func:`export_mesh`.

    Returns
    -------
    trimesh.Trimesh
        The mesh written (nm, before ``scale``).

    Raises
    ------
    InvalidMeshError
        Missing segment, LOD out of range, malformed data.
    DestinationExistsError
        ``path`` exists and ``overwrite`` is false (checked before reading).
    """
    from .reader import load_mesh

    file_type_of(path, file_type)  # fail before reading
    _check_scale(scale)
    _check_output(path, overwrite)
    mesh = load_mesh(dest, int(segment_id), lod=int(lod))
    export_mesh(mesh, path, file_type=file_type, scale=scale, overwrite=overwrite)
    return mesh


def export_adhoc(source: Any, segment_id: int, path, *, file_type: Optional[str] = None, scale: float = 1.0,
                 overwrite: bool = False, **mesh_kwargs):
    """Mesh a segment of a volume now and write it (see :func:`gpumesh.adhoc.mesh_segment`;
    ``file_type``, ``scale`` and ``overwrite`` as in :func:`export_mesh`).

    Returns
    -------
    trimesh.Trimesh
        The mesh written (nm, before ``scale``).

    Raises
    ------
    DestinationExistsError
        ``path`` exists and ``overwrite`` is false (checked before meshing).
    """
    from .adhoc import mesh_segment

    file_type_of(path, file_type)   # fail before meshing
    _check_scale(scale)
    _check_output(path, overwrite)
    mesh = mesh_segment(source, segment_id, **mesh_kwargs)
    export_mesh(mesh, path, file_type=file_type, scale=scale, overwrite=overwrite)
    return mesh
