"""Helpers shared by the click commands of :mod:`gpumesh.cli` and :mod:`gpumesh.cli_extra`."""

from __future__ import annotations

import contextlib
import json
import sys
import warnings

import click


def _numbers(kind, count: int = 3, example: str = "32,32,40"):
    """click callback parsing ``32,32,40`` (or ``32x32x40``; a box also as ``x0,y0,z0:x1,y1,z1``) into
    ``count`` ``kind`` values."""

    def convert(ctx, param, value):
        if value is None:
            return None
        try:
            groups = [[kind(v) for v in h.replace("x", ",").split(",")] for h in value.split(":")]
        except ValueError:
            groups = []
        # a box's corners may be split by one ':', between its two halves only (0:128,0:128,0:128,
        # a slice per axis, is no box of this form: it was read as 0,128,0,128,0,128)
        halves_ok = len(groups) == 1 or (len(groups) == 2 and len(groups[0]) == len(groups[1]))
        parts = [v for g in groups for v in g] if halves_ok else []
        if len(parts) != count:
            noun = "integers" if kind is int else "numbers"
            raise click.BadParameter(f"expected {count} {noun} like {example}, got {value!r}")
        return parts

    return convert


def _part(ctx, param, value):
    """click callback parsing ``--part K/N`` (part K, 0-based, of N) into ``(K, N)``."""
    if value is None:
        return None
    try:
        k, n = (int(v) for v in value.split("/"))
    except ValueError:
        raise click.BadParameter(f"expected K/N (part K, from 0, of N; e.g. 0/16), got {value!r}") from None
    if not 0 <= k < n:
        raise click.BadParameter(f"K/N needs 0 <= K < N (parts are numbered from 0), got {value!r}")
    return k, n


def _segments(ctx, param, value):
    """click callback parsing segment IDs ``1,2,3``, or ``@FILE`` holding IDs separated by commas,
    spaces or newlines (``#`` starts a comment), into a list of ints > 0."""
    if value is None:
        return None
    text, where = value, ""
    if value.startswith("@"):
        try:
            with open(value[1:]) as fh:
                text = "\n".join(line.split("#")[0] for line in fh)
        except OSError as exc:
            raise click.BadParameter(f"cannot read segment IDs from {value[1:]}: {exc.strerror or exc}")
        where = f" in {value[1:]}"
    try:
        ids = [int(v) for v in text.replace(",", " ").split()]
    except ValueError as exc:
        raise click.BadParameter(f"expected segment IDs like 1,2,3{where}: {exc}")
    if not ids:
        raise click.BadParameter(f"no segment IDs{where}")
    bad = [s for s in ids if not 0 < s < 1 << 64]
    if bad:
        raise click.BadParameter(f"segment IDs must be in 1..2**64-1, got {bad[0]}{where}")
    return ids


def _location(ctx, param, value):
    """click callback: a path or URL as given, or a JSON kvstore / TensorStore spec (text
    starting with ``{``, e.g. ``{"driver": "s3", "bucket": "b", "path": "seg/", "endpoint":
    "https://minio.example.org"}``) as a dict."""
    if value is None or not value.lstrip().startswith("{"):
        return value
    try:
        spec = json.loads(value)
    except ValueError as exc:
        raise click.BadParameter(f"starts with '{{' but is not a JSON spec: {exc}")
    if not isinstance(spec, dict) or not isinstance(spec.get("driver"), str):
        raise click.BadParameter("a JSON spec must be an object with a \"driver\"")
    return spec


def _fail(exc: Exception) -> None:
    """Print a one-line error and exit with status 2 (bad input)."""
    click.echo(f"gpumesh: error: {exc}", err=True)
    sys.exit(2)


@contextlib.contextmanager
def _one_line_warnings():
    """Within it, warnings print as one line each, ``gpumesh: warning: MESSAGE`` (``gpumesh:
    MESSAGE`` for notices such as the CPU fallback), not as Python's file-and-line report."""
    from .backend import CPUFallbackNotice

    def show(message, category, *args, **kwargs):
        kind = "" if issubclass(category, CPUFallbackNotice) else "warning: "
        click.echo(f"gpumesh: {kind}{message}", err=True)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield
