"""Typed errors raised by gpumesh.

Every error that bad input can cause is a subclass of :class:`GpumeshError`, raised
before any output is written, with a one-line message fit for the CLI.
"""

from __future__ import annotations


class GpumeshError(Exception):
    """Base class of every error gpumesh raises on bad input or bad state."""


class InvalidVolumeError(GpumeshError, ValueError):
    """The label volume cannot be meshed: wrong dtype (float, bool), wrong rank, or empty."""


class InvalidVoxelSizeError(GpumeshError, ValueError):
    """A voxel size is not three finite, positive numbers (nm)."""


class SourceReadError(GpumeshError, OSError):
    """The source volume cannot be opened or read (missing path, unknown format, bad metadata)."""


class DestinationExistsError(GpumeshError, FileExistsError):
    """The destination holds data and neither ``overwrite`` nor ``resume`` was given."""


class InvalidMeshError(GpumeshError, ValueError):
    """A precomputed mesh directory violates the Neuroglancer spec (raised by readers)."""


class EmptyVolumeWarning(UserWarning):
    """The volume holds only background (label 0): the output is valid but holds no meshes."""
