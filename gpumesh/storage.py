"""Byte storage through TensorStore's kvstore.

Every byte gpumesh reads from or writes to a mesh destination goes through this module,
so a destination can be a local path or any kvstore URL TensorStore knows
(``file://``, ``memory://``, ``gs://``, ``s3://``) or a kvstore JSON spec.

TensorStore's ``file`` driver writes each key through a temporary file and a rename, so a
key appears whole or not at all; the other drivers write objects atomically by nature.  It
also fsyncs each file before its rename, so that a key is on disk once its write returns.
Writing the many small files of an unsharded or legacy mesh that way costs ~4x the time of
the writes alone (230 against 58 µs a file, measured on a VM); those are written with
``write_many(..., sync=False)`` and made durable together by a :func:`flush` in each
process that wrote them, before the directory's ``info``, the key that says it is finished.
What a crash before that ``info`` leaves is rewritten by a resumed run.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
from typing import Any, Iterable, Optional, Union

import tensorstore as ts

from .errors import DestinationError, SourceReadError, StorageUnreachableError, one_line

KvSpec = Union[str, os.PathLike, dict, "ts.KvStore"]

#: A destination's scratch area: the main job's task results, plan and resume records
#: (:mod:`gpumesh.pipeline`), deleted once the output is written.
SCRATCH = ".gpumesh-work/"

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")   # any URL: never taken as a local path


def kvstore_spec(location: KvSpec) -> dict:
    """Turn a path, URL or spec into a TensorStore kvstore JSON spec for a directory.

    Parameters
    ----------
    location : str, os.PathLike or dict
        A local path (relative or absolute), a kvstore URL (``file://``, ``memory://``,
        ``gs://``, ``s3://``) or a kvstore JSON spec.

    Returns
    -------
    dict
        A kvstore spec whose ``path`` ends in ``/`` (a directory), so keys are file names.

    Notes
    -----
    The spec is :func:`resolved_spec`'s: relative ``file`` paths made absolute, and an ``s3``
    store without an ``endpoint`` given the one the environment names.
    """
    if isinstance(location, ts.KvStore):
        spec = location.spec().to_json()
    elif isinstance(location, dict):
        spec = dict(location)
    else:
        text = os.fspath(location)
        if _SCHEME.match(text):
            try:
                spec = ts.KvStore.Spec(text).to_json()
            except ValueError as exc:   # gcs://, a typo: not a local folder of that name
                raise ValueError(f"{text}: not a location TensorStore can open ({one_line(exc)}); "
                                 f"use a path or a file://, gs://, s3://, http(s):// or memory:// URL") from None
        else:
            spec = {"driver": "file", "path": os.path.abspath(text)}
    spec = resolved_spec(spec)
    path = spec.get("path", "")
    if path and not path.endswith("/"):
        spec["path"] = path + "/"
    return spec


def display(location: Any) -> str:
    """``location`` as a user gave it, for messages: a path or URL as it is, a spec as JSON
    (which the CLI takes back), an opened kvstore as its URL."""
    if isinstance(location, dict):
        return json.dumps(location)
    if isinstance(location, ts.KvStore):
        return kvstore_url(kvstore_spec(location))
    return os.fspath(location) if isinstance(location, (str, os.PathLike)) else str(location)


def s3_endpoint() -> Optional[str]:
    """The S3 endpoint the environment names (``AWS_ENDPOINT_URL_S3``, else
    ``AWS_ENDPOINT_URL``, as the AWS CLI and SDKs read them; TensorStore reads neither), or
    ``None`` (AWS's own)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def resolved_spec(spec: Any) -> Any:
    """A TensorStore or kvstore JSON spec that means the same in any process: every ``file``
    kvstore's relative path made absolute (against this process's working directory), and
    every ``s3`` kvstore without an ``endpoint`` given :func:`s3_endpoint`'s (an ``s3://`` URL
    as a ``kvstore`` or ``base`` member turned into a spec for it), at any depth.  So
    ``s3://`` reaches S3-compatible stores (MinIO, Ceph, R2), and a spec sent to a Dask worker
    names the same location there."""
    if isinstance(spec, list):
        return [resolved_spec(v) for v in spec]
    if not isinstance(spec, dict):
        return spec
    out = {}
    for k, v in spec.items():
        if k in ("kvstore", "base") and isinstance(v, str) and v.startswith("s3://") and s3_endpoint():
            v = ts.KvStore.Spec(v).to_json()
        out[k] = resolved_spec(v)
    if out.get("driver") == "file" and isinstance(out.get("path"), str) and not os.path.isabs(out["path"]):
        out["path"] = os.path.abspath(out["path"]) + ("/" if out["path"].endswith("/") else "")
    if out.get("driver") == "s3" and "endpoint" not in out and s3_endpoint():
        out["endpoint"] = s3_endpoint()
    return out


def is_kvstore_spec(spec: dict) -> bool:
    """Whether ``spec`` (a JSON dict) is a kvstore spec (``{"driver": "s3", ...}``) rather
    than a TensorStore spec (``{"driver": "zarr3", ...}``)."""
    try:
        ts.KvStore.Spec(spec)
        return True
    except Exception:
        return False


def kvstore_url(spec: dict) -> str:
    """A kvstore URL for a spec (``file:///abs/path/``, ``gs://bucket/path/``), or its JSON."""
    try:
        return ts.KvStore.Spec(spec).url
    except Exception:
        return json.dumps(spec)


def open_kvstore(location: KvSpec, *, context: Optional[ts.Context] = None,
                 check: bool = True) -> ts.KvStore:
    """Open a directory-like kvstore.

    Parameters
    ----------
    location : str, os.PathLike, dict or tensorstore.KvStore
        See :func:`kvstore_spec`.
    context : tensorstore.Context, optional
        Shared context (needed for ``memory://`` stores to be seen by several openers).
    check : bool
        For a network location (``gs://``, ``s3://``, ``http(s)://``, or a spec over one),
        first make sure it answers (:func:`check_reachable`).  Off in the job's workers,
        whose location the main process has checked.

    Returns
    -------
    tensorstore.KvStore

    Raises
    ------
    StorageUnreachableError
        A network location does not answer (see :func:`check_reachable`).
    SourceReadError
        If TensorStore cannot open the location.
    """
    if isinstance(location, ts.KvStore):
        return location
    spec = kvstore_spec(location)
    try:
        kv = ts.KvStore.open(spec, context=context or _default_context()).result()
    except Exception as exc:  # TensorStore raises ValueError/RuntimeError subclasses
        raise SourceReadError(f"cannot open storage {location!r}: {exc}") from exc
    if check:
        check_reachable(spec, context=context)
    return kv


#: Seconds the first request to a network location may take, retries included, before
#: :func:`check_reachable` gives up.
PROBE_TIMEOUT_S = 60.0

# TensorStore's context resource that sets each network driver's retries.  Its defaults
# suit a long job's reads, but they make an unreachable location look like a hang (over
# 120 s with no network, measured).
_RETRY_RESOURCES = {"gcs": "gcs_request_retries", "s3": "s3_request_retries",
                    "http": "http_request_retries"}
_PROBE_RETRIES = {"max_retries": 3, "initial_delay": "0.5s", "max_delay": "4s"}


def kvstore_chain(spec: dict) -> Iterable[dict]:
    """``spec`` and the kvstores under it: the ``base`` of an adapter such as ``ocdbt`` or
    ``zip``, at any depth (a base given as a URL is parsed)."""
    while isinstance(spec, dict):
        yield spec
        spec = spec.get("base")
        if isinstance(spec, str):
            spec = kvstore_spec(spec)


def in_memory(spec: dict) -> bool:
    """Whether a kvstore spec's chain (:func:`kvstore_chain`) holds a ``memory`` store, which
    lives in one process: other processes that open the same spec see an empty store."""
    return any(s.get("driver") == "memory" for s in kvstore_chain(spec))


def within(inner: dict, outer: dict) -> bool:
    """Whether the directory ``inner`` is the directory ``outer`` or lies inside it (both
    kvstore specs, compared by their URLs: :func:`kvstore_url`)."""
    a, b = kvstore_url(kvstore_spec(inner)), kvstore_url(kvstore_spec(outer))
    return a.startswith(b) if b.endswith("/") else a == b


def _network_spec(spec: dict) -> Optional[dict]:
    """The network kvstore in ``spec``'s chain (:func:`kvstore_chain`), or ``None`` for local
    and in-memory stores."""
    return next((s for s in kvstore_chain(spec) if s.get("driver") in _RETRY_RESOURCES), None)


def check_reachable(location: KvSpec, key: str = "info", context: Optional[ts.Context] = None) -> None:
    """Fail fast when a network kvstore cannot be reached.

    Reads one small key (missing is fine) with few retries (3, backing off from 0.5 s to
    4 s) and waits at most :data:`PROBE_TIMEOUT_S`.  Local (``file``) and ``memory`` stores
    are not checked.

    Parameters
    ----------
    location : str, os.PathLike, dict or tensorstore.KvStore
        See :func:`kvstore_spec`.
    key : str
        The key to read, relative to the location's path.
    context : tensorstore.Context, optional
        The context the location is opened with (credentials, billing project): the probe's
        retries are set in a child of it.  Default: gpumesh's process-wide context.

    Raises
    ------
    StorageUnreachableError
        The request failed after its retries (no network, name lookup failed, connection
        refused, server errors) or had no answer in time.  A denied permission is reported
        the same way, with TensorStore's message.
    """
    spec = _network_spec(kvstore_spec(location))
    if spec is None:
        return
    spec = dict(spec)
    url = kvstore_url(spec)
    probe = ts.Context({_RETRY_RESOURCES[spec["driver"]]: _PROBE_RETRIES}, parent=context or _default_context())
    try:
        kv = ts.KvStore.open(spec, context=probe).result(timeout=PROBE_TIMEOUT_S)
        kv.read(key).result(timeout=PROBE_TIMEOUT_S)
    except TimeoutError as exc:
        raise StorageUnreachableError(f"no answer from {url} in {PROBE_TIMEOUT_S:g} s") from exc
    except Exception as exc:
        raise StorageUnreachableError(f"cannot reach {url}: {one_line(exc)}") from exc


_CONTEXT: Optional[ts.Context] = None


def _default_context() -> ts.Context:
    # One process-wide context, so every opener of memory:// sees the same bytes.
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = ts.Context()
    return _CONTEXT


def read(kv: ts.KvStore, key: str, byte_range: Optional[tuple[int, int]] = None) -> Optional[bytes]:
    """Read one key, or ``None`` if it is missing.

    Parameters
    ----------
    kv : tensorstore.KvStore
    key : str
    byte_range : (int, int), optional
        ``(inclusive_min, exclusive_max)`` bytes to read.
    """
    if byte_range is None:
        return read_result(kv.read(key))
    return read_result(kv.read(key, byte_range=slice(byte_range[0], byte_range[1])))


def read_result(future) -> Optional[bytes]:
    """The bytes of a ``kv.read`` future, or ``None`` if the key is missing.

    A byte range that reaches past the end of the value (TensorStore's ``OUT_OF_RANGE``) reads
    as ``b""``, so that the caller's length check says what is wrong (a truncated shard).

    Raises
    ------
    SourceReadError
        An HTTP server ignored the byte range (it sends whole files).
    """
    try:
        result = future.result()
    except ValueError as exc:
        if str(exc).startswith("OUT_OF_RANGE"):
            return b""
        if "was ignored by server" in str(exc):   # TensorStore's http kvstore
            raise SourceReadError(f"the server answered a byte-range read with the whole file: it ignores HTTP "
                                  f"Range requests, which reading a sharded mesh needs (Python's http.server does "
                                  f"not honour them; `gpumesh view`, nginx and cloud storage do) ({one_line(exc)})") from None
        raise
    if result.state != "value":
        return None
    return bytes(result.value)


#: The escapes of absl's ``CHexEscape`` that TensorStore's messages quote a path with: a
#: backslash, a quote, and ``\\xNN`` for a byte that is not printable ASCII (read left to right,
#: so that an escaped backslash is not read as the start of another escape).
_ESCAPE = re.compile(rb"""\\(\\|"|'|x[0-9a-fA-F]{2})""")


def _unescape(match: "re.Match") -> bytes:
    """One escape as its byte, a NUL (TensorStore's separator of a path's parts) as ``/``, a
    control byte as it was."""
    code = match.group(1)
    if not code.startswith(b"x"):
        return code
    value = int(code[1:], 16)
    if value == 0:
        return b"/"
    return bytes([value]) if value >= 0x20 and value != 0x7F else match.group(0)   # control bytes stay escaped


def destination_error(where, exc: Exception) -> DestinationError:
    """A one-line :class:`DestinationError` saying that ``where`` cannot be written, from
    TensorStore's error, with the path it names as it is: TensorStore quotes it with absl's
    ``CHexEscape`` (the parts of a file path joined by an escaped NUL, here ``/``; a hex digit
    after an escape, UTF-8 bytes and backslashes escaped too)."""
    text = _ESCAPE.sub(_unescape, one_line(exc).encode("utf-8", "surrogateescape"))
    return DestinationError(f"cannot write to {where}: " + text.decode("utf-8", "backslashreplace"))


def _write_failed(kv: ts.KvStore, key: str, exc: Exception) -> DestinationError:
    """:func:`destination_error` naming the key."""
    return destination_error(kvstore_url(kv.spec().to_json()) + key, exc)


def write(kv: ts.KvStore, key: str, value: bytes) -> None:
    """Write one key atomically (whole or not at all).

    Raises
    ------
    DestinationError
        The write failed (no permission, a full disk, a file where a directory should be).
    """
    try:
        kv.write(key, value).result()
    except (ValueError, OSError) as exc:   # TensorStore's errors are ValueErrors
        raise _write_failed(kv, key, exc) from exc


def write_json(kv: ts.KvStore, key: str, obj: Any, compact: bool = False) -> None:
    """Write ``obj`` as JSON (UTF-8, trailing newline) under ``key``: indented, or with no
    whitespace at all when ``compact`` (for files that list every segment)."""
    text = json.dumps(obj, separators=(",", ":")) if compact else json.dumps(obj, indent=2)
    write(kv, key, (text + "\n").encode())


def read_json(kv: ts.KvStore, key: str) -> Optional[Any]:
    """Read a JSON value, or ``None`` when the key is missing."""
    data = read(kv, key)
    return None if data is None else json.loads(data)


def list_keys(kv: ts.KvStore, prefix: str = "") -> list[str]:
    """All keys under ``prefix``, sorted, as ``str``."""
    if prefix:
        keys = kv.list(ts.KvStore.KeyRange(inclusive_min=prefix, exclusive_max=prefix + "\xff")).result()
    else:
        keys = kv.list().result()
    return sorted(k.decode() if isinstance(k, bytes) else k for k in keys)


def destination_keys(location: KvSpec, kv: ts.KvStore) -> list[str]:
    """The keys a destination holds (sorted), or a :class:`DestinationError` saying why it cannot
    be one, before anything is written to it.

    Parameters
    ----------
    location
        The destination as the user gave it (named in messages).
    kv
        The destination opened (:func:`open_kvstore`).

    Raises
    ------
    DestinationError
        A local destination is a file, or lies under one; or it cannot be listed (TensorStore's
        error, one line).
    """
    shown = display(location)
    spec = kv.spec().to_json()
    if spec.get("driver") == "file" and spec.get("path"):
        path = os.path.abspath(spec["path"].rstrip("/") or "/")
        if os.path.isfile(path):
            raise DestinationError(f"destination is a file, not a directory: {shown}")
        above = os.path.dirname(path)
        while above != os.path.dirname(above) and not os.path.lexists(above):
            above = os.path.dirname(above)
        if os.path.exists(above) and not os.path.isdir(above):
            raise DestinationError(f"cannot write to {shown}: {above} is a file, not a directory")
    try:
        return list_keys(kv)
    except Exception as exc:   # TensorStore's errors are ValueError subclasses
        raise destination_error(shown, exc) from exc


def delete_prefix(kv: ts.KvStore, prefix: str) -> None:
    """Delete every key under ``prefix``; on a local ``file`` kvstore, and when ``prefix`` is a
    directory (ends in ``/``), also its directories that are left empty (TensorStore deletes
    files only)."""
    kv.delete_range(ts.KvStore.KeyRange(inclusive_min=prefix, exclusive_max=prefix + "\xff")).result()
    if prefix.endswith("/"):
        spec = kv.spec().to_json()
        if spec.get("driver") == "file" and spec.get("path"):
            root = os.path.join(spec["path"], prefix)
            for d, _, _ in os.walk(root, topdown=False):   # children before their parent
                try:
                    os.rmdir(d)
                except OSError:   # not empty (another writer's file), or already gone
                    pass


def delete_all(kv: ts.KvStore) -> None:
    """Delete every key of the store (used by ``--overwrite``)."""
    kv.delete_range(ts.KvStore.KeyRange()).result()


def write_many(kv: ts.KvStore, items: Iterable[tuple[str, bytes]], sync: bool = True) -> None:
    """Write several keys concurrently and wait for all (each key atomic).

    Parameters
    ----------
    kv : tensorstore.KvStore
    items : iterable of (key, bytes)
    sync : bool
        ``False``: on a local ``file`` store, do not fsync each file (see the module docs);
        the caller calls :func:`flush` before it records the keys as written.

    Raises
    ------
    DestinationError
        A write failed (see :func:`write`).
    """
    if not sync:
        kv = _unsynced(kv)
    futures = [(k, kv.write(k, v)) for k, v in items]
    for k, f in futures:
        try:
            f.result()
        except (ValueError, OSError) as exc:
            raise _write_failed(kv, k, exc) from exc


_UNSYNCED: dict = {}


def _unsynced(kv: ts.KvStore) -> ts.KvStore:
    """The same local ``file`` store opened without an fsync per file (TensorStore's
    ``file_io_sync``), one handle per store and process; ``kv`` itself for other drivers."""
    spec = kv.spec().to_json()
    if spec.get("driver") != "file":
        return kv
    key = json.dumps(spec, sort_keys=True)
    if key not in _UNSYNCED:
        context = ts.Context({"file_io_sync": False}, parent=_default_context())
        _UNSYNCED[key] = ts.KvStore.open(spec, context=context).result()
    return _UNSYNCED[key]


def _syncfs(fd: int) -> Optional[int]:
    """``syncfs(fd)``: 0, the errno of a failure, or ``None`` where libc has no ``syncfs``."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "syncfs", None)
    if fn is None:
        return None
    return 0 if fn(fd) == 0 else ctypes.get_errno()


def flush(kv: ts.KvStore) -> None:
    """Make every write to a local ``file`` store durable, those of ``write_many(...,
    sync=False)`` in any process included: ``syncfs`` of the file system that holds it
    (``sync`` where libc or the file system has no ``syncfs``).  Nothing for other drivers,
    whose writes are durable when they return.

    Raises
    ------
    DestinationError
        The file system reported a write error (``EIO``, ``ENOSPC``...).
    """
    spec = kv.spec().to_json()
    if spec.get("driver") != "file" or not spec.get("path"):
        return
    try:
        fd = os.open(spec["path"], os.O_RDONLY)
    except OSError as exc:
        raise destination_error(spec["path"], exc) from exc
    try:
        err = _syncfs(fd)
    finally:
        os.close(fd)
    if err in (None, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        os.sync()
    elif err:
        raise destination_error(spec["path"], OSError(err, os.strerror(err)))
