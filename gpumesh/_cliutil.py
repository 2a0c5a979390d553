"""Helpers shared by the click commands of :mod:`gpumesh.cli` and :mod:`gpumesh.cli_extra`."""

from __future__ import annotations

import sys

import click


def _numbers(kind, count: int = 3, example: str = "32,32,40"):
    """click callback parsing ``32,32,40`` (or ``32x32x40``; a box also as ``x0,y0,z0:x1,y1,z1``) into
    ``count`` ``kind`` values."""

    def convert(ctx, param, value):
        if value is None:
            return None
        try:
            parts = [kind(v) for v in value.replace("x", ",").replace(":", ",").split(",")]
        except ValueError:
            parts = []
        if len(parts) != count:
            raise click.BadParameter(f"expected {count} numbers like {example}, got {value!r}")
        return parts

    return convert


def _fail(exc: Exception) -> None:
    """Print a one-line error and exit with status 2 (bad input)."""
    click.echo(f"gpumesh: error: {exc}", err=True)
    sys.exit(2)
