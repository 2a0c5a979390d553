"""Typed errors raised by gpumesh.

Every error that bad input can cause is a subclass of :class:`GpumeshError`, raised
before any output is written, with a one-line message fit for the CLI.  So is
:class:`WorkerFailedError`, which bad state causes mid-run (a worker process killed).
"""

from __future__ import annotations


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (TensorStore's span several), for a typed error."""
    return " ".join(str(exc).split())


class GpumeshError(Exception):
    """Base class of every error gpumesh raises on bad input or bad state."""


class InvalidVolumeError(GpumeshError, ValueError):
    """The label volume cannot be meshed: wrong dtype (float, bool), wrong rank, or empty."""


class InvalidVoxelSizeError(GpumeshError, ValueError):
    """A voxel size is not three finite, positive numbers (nm)."""


class SourceReadError(GpumeshError, OSError):
    """The source volume cannot be opened or read (missing path, unknown format, bad metadata)."""


class StorageUnreachableError(SourceReadError):
    """A network location (``gs://``, ``s3://``, ``http(s)://``, a source or a destination)
    did not answer the first request: no network, a refused connection, a failed name lookup
    or no reply within :data:`gpumesh.storage.PROBE_TIMEOUT_S`.  Raised before anything is
    written, instead of TensorStore's retries, which go on for minutes."""


class DestinationExistsError(GpumeshError, FileExistsError):
    """The destination holds data and neither ``overwrite`` nor ``resume`` was given."""


class DestinationError(GpumeshError, OSError):
    """The destination cannot be written: a file where a directory should be, no permission,
    a path that cannot be created.  Raised before any output is written."""


class InvalidMeshError(GpumeshError, ValueError):
    """A precomputed mesh directory violates the Neuroglancer spec (raised by readers)."""


class WorkerFailedError(GpumeshError, RuntimeError):
    """A worker process of the main job ended abruptly (killed, e.g. by the out-of-memory
    killer, or crashed), or, as :class:`TaskFailedError`, a task failed.  The tasks that
    finished are kept in the destination's scratch area, so the run can be resumed."""


class TaskFailedError(WorkerFailedError):
    """A task of the main job raised a :class:`GpumeshError` (a source chunk that cannot be
    read, a write that failed: a full disk, lost credentials), or the output could not be
    written.  Its ``__cause__`` is that error.  The tasks that finished are kept in the
    destination's scratch area, so the run can be resumed once the cause is fixed."""


class DestinationTakenError(GpumeshError, RuntimeError):
    """Another gpumesh run started writing into the destination (``--overwrite``, ``--resume``)
    while this one ran: this one stops before its ``info``, leaving the destination to the
    other (the CLI's status 1)."""


class SegmentNotFoundError(GpumeshError, LookupError):
    """The segment does not occur in the volume (or in the given bounding box)."""


class DeviceUnavailableError(GpumeshError, RuntimeError):
    """``device="gpu"`` was asked for but no GPU backend can run here (the CLI says so in one
    line and exits with status 2)."""


class EmptyVolumeWarning(UserWarning):
    """The volume holds only background (label 0): the output is valid but holds no meshes."""


class NoVoxelSizeWarning(UserWarning):
    """The source states no voxel size (no ``resolution``, ``voxel_size_nm``, dimension units,
    OME scale, N5 resolution) and none was given: the meshes are in voxels, taken as 1 nm
    each, so they do not overlay the volume in a viewer that knows its real voxel size."""


class VoxelSizeOverrideWarning(UserWarning):
    """The voxel size given (``--voxel-size``) differs from the one the source states: the
    meshes are placed by the one given, so they do not overlay the volume in a viewer that
    shows it by its own metadata (nor where ``source_info.json`` or ``--link-source`` pair
    them)."""


class SegmentsNotFoundWarning(UserWarning):
    """Some segment IDs selected for meshing (``MeshOptions.segments``, ``--segments``) have no
    voxel in the volume (or within the bounds): they get no mesh."""


class IndexInMemoryWarning(UserWarning):
    """The assembly's fragment index, past ``gpumesh.writer.ASSEMBLY_INDEX_BYTES``, goes to a
    temporary file in ``TMPDIR``, which is a ``tmpfs`` (or ``ramfs``): the file takes memory,
    not disk."""


class SegmentCutWarning(UserWarning):
    """The segment reaches a face of ``bbox`` or ``bounds`` inside the volume and goes on past
    it (:func:`gpumesh.mesh_segment`): its mesh is closed there, where the segment is not."""
