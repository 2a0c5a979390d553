"""Helpers shared by the click commands of :mod:`gpumesh.cli` and :mod:`gpumesh.cli_extra`."""

from __future__ import annotations

import sys

import click


def _triple(kind):
    """click callback parsing ``32,32,40`` (or ``32x32x40``) into three ``kind`` values."""

    def convert(ctx, param, value):
        if value is None:
            return None
        try:
            parts = [kind(v) for v in value.replace("x", ",").split(",")]
        except ValueError:
            raise click.BadParameter(f"expected three numbers like 32,32,40, got {value!r}")
        if len(parts) != 3:
            raise click.BadParameter(f"expected three numbers like 32,32,40, got {value!r}")
        return parts

    return convert


def _fail(exc: Exception) -> None:
    """Print a one-line error and exit with status 2 (bad input)."""
    click.echo(f"gpumesh: error: {exc}", err=True)
    sys.exit(2)
