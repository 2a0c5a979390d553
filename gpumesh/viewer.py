"""Look at meshes: serve a precomputed directory over HTTP, open Neuroglancer, plot with matplotlib.

* :func:`serve` serves any local directory on ``127.0.0.1`` from a background thread, with
  HTTP Range requests (``206``, ``Content-Range``, ``416`` on unsatisfiable or malformed byte
  ranges; the sharded format reads shards by range) and CORS headers, so a Neuroglancer page
  from another origin can read it. With ``record=True`` it keeps a log of every request
  (:class:`RequestRecord`: path, Range header, status, bytes served), which tests use to see
  what a client read.
* :func:`view` serves a mesh directory (and a local volume), then, when the ``neuroglancer``
  Python package is installed, opens a viewer bound to ``127.0.0.1`` with one segmentation
  layer; without it, it gives the ``precomputed://`` URL and a Neuroglancer link to paste.
* :func:`plot_mesh` draws a mesh into a matplotlib 3-D axis (for notebooks and PNGs; no
  display needed).
"""

from __future__ import annotations

import json
import mimetypes
import os
import re
import threading
import urllib.parse
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional, Sequence

import numpy as np

__all__ = ["MeshServer", "RequestRecord", "serve", "view", "ViewSession", "neuroglancer_state", "public_viewer_url",
           "volume_source_url", "plot_mesh", "default_segments"]

#: Public Neuroglancer deployment used for the paste-able link when the package is missing.
PUBLIC_NEUROGLANCER = "https://neuroglancer-demo.appspot.com/"

_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class RequestRecord:
    """One request a :class:`MeshServer` answered (kept when it was started with ``record=True``).

    Attributes
    ----------
    method : str
        ``GET``, ``HEAD`` or ``OPTIONS``.
    path : str
        Request path without the query, ``/`` separated, unquoted (``/123.index``).
    range : str or None
        The ``Range`` header as sent.
    status : int
        HTTP status of the answer.
    start, stop : int or None
        Byte span ``[start, stop)`` of the file that was sent (``None`` when no file was).
    size : int or None
        Size of the file (``None`` when there is none).
    """

    method: str
    path: str
    range: Optional[str]
    status: int
    start: Optional[int] = None
    stop: Optional[int] = None
    size: Optional[int] = None


class _Handler(BaseHTTPRequestHandler):
    """GET/HEAD of files under ``server.root`` with Range support and CORS."""

    server_version = "gpumesh-serve"
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002  (quiet unless asked)
        if getattr(self.server, "verbose", False):
            super().log_message(format, *args)

    # -- helpers --------------------------------------------------------------------------

    def _cors(self) -> None:
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Access-Control-Expose-Headers", "Content-Range, Content-Length, Accept-Ranges, ETag")

    def _resolve(self) -> Optional[str]:
        """The file a request path names, or None when it leaves the root or is not a file."""
        path = urllib.parse.urlsplit(self.path).path
        parts = [p for p in urllib.parse.unquote(path).split("/") if p not in ("", ".")]
        if any(p == ".." or "\\" in p or "\x00" in p for p in parts):
            return None
        full = os.path.join(self.server.root, *parts)
        real = os.path.realpath(full)
        if real != self.server.root and not real.startswith(self.server.root + os.sep):
            return None
        return real if os.path.isfile(real) else None

    def _record(self, status: int, start: Optional[int] = None, stop: Optional[int] = None,
                size: Optional[int] = None) -> None:
        log = getattr(self.server, "requests", None)
        if log is None:
            return
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        rec = RequestRecord(self.command, path, self.headers.get("Range"), int(status), start, stop, size)
        with self.server.requests_lock:
            log.append(rec)

    def _error(self, status: int, extra: Optional[dict] = None, size: Optional[int] = None) -> None:
        self._record(status, size=size)
        body = f"{status} {HTTPStatus(status).phrase}\n".encode()
        self.send_response(status)
        self._cors()
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    @staticmethod
    def parse_range(header: str, size: int):
        """``(start, stop)`` of a single byte range, ``"unsatisfiable"``, or None (serve it all).

        ``bytes=a-b``, ``bytes=a-`` and ``bytes=-n``; other units and multiple ranges are
        ignored (the whole file is sent, which RFC 9110 allows); a malformed ``bytes`` range
        (no digits, last < first) or one that starts past the end is unsatisfiable.
        """
        unit, _, spec = header.partition("=")
        if unit.strip().lower() != "bytes" or "," in spec:
            return None
        m = _RANGE.match(header)
        if m is None:
            return "unsatisfiable"
        first, last = m.group(1), m.group(2)
        if first == "" and last == "":
            return "unsatisfiable"
        if first == "":  # suffix: the last n bytes
            n = int(last)
            if n == 0 or size == 0:
                return "unsatisfiable"
            return max(0, size - n), size
        start = int(first)
        stop = size if last == "" else int(last) + 1
        if last != "" and int(last) < start:
            return "unsatisfiable"
        if start >= size:
            return "unsatisfiable"
        return start, min(stop, size)

    # -- methods --------------------------------------------------------------------------

    def do_OPTIONS(self) -> None:  # CORS preflight (Range is not a CORS-safelisted header)
        self._record(HTTPStatus.NO_CONTENT)
        self.send_response(HTTPStatus.NO_CONTENT)
        self._cors()
        self.send_header("Access-Control-Allow-Methods", "GET, HEAD, OPTIONS")
        self.send_header("Access-Control-Allow-Headers",
                         self.headers.get("Access-Control-Request-Headers", "Range, Content-Type"))
        self.send_header("Access-Control-Allow-Private-Network", "true")
        self.send_header("Access-Control-Max-Age", "86400")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        path = self._resolve()
        if path is None:
            self._error(HTTPStatus.NOT_FOUND)
            return
        try:
            fh = open(path, "rb")
        except OSError:
            self._error(HTTPStatus.NOT_FOUND)
            return
        with fh:
            size = os.fstat(fh.fileno()).st_size
            rng = self.headers.get("Range")
            span = self.parse_range(rng, size) if rng else None
            if span == "unsatisfiable":
                self._error(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, {"Content-Range": f"bytes */{size}"}, size)
                return
            start, stop = span if span else (0, size)
            self._record(HTTPStatus.PARTIAL_CONTENT if span else HTTPStatus.OK, start, stop, size)
            self.send_response(HTTPStatus.PARTIAL_CONTENT if span else HTTPStatus.OK)
            self._cors()
            ctype = "application/json" if os.path.basename(path) == "info" else \
                (mimetypes.guess_type(path)[0] or "application/octet-stream")
            self.send_header("Content-Type", ctype)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Content-Length", str(stop - start))
            if span:
                self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{size}")
            self.end_headers()
            if self.command == "HEAD":
                return
            fh.seek(start)
            left = stop - start
            while left > 0:
                buf = fh.read(min(left, 1 << 20))
                if not buf:
                    break
                self.wfile.write(buf)
                left -= len(buf)


class MeshServer(ThreadingHTTPServer):
    """A threaded HTTP server of one directory (see :func:`serve`).

    Attributes
    ----------
    root : str
        The served directory (real path).
    url : str
        ``http://127.0.0.1:PORT/``.
    thread : threading.Thread
        The thread running ``serve_forever``.
    requests : list of RequestRecord or None
        Every request answered, in order, when started with ``record=True``.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, directory: str, host: str = "127.0.0.1", port: int = 0, verbose: bool = False,
                 record: bool = False):
        self.root = os.path.realpath(os.fspath(directory))
        self.verbose = verbose
        #: Requests answered, in order (a list of :class:`RequestRecord`), when ``record``; else None.
        self.requests: Optional[list] = [] if record else None
        self.requests_lock = threading.Lock()
        super().__init__((host, int(port)), _Handler)
        self.thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        """``http://HOST:PORT/`` of the served directory (a ``precomputed://`` source once prefixed)."""
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"

    def handle_error(self, request, client_address) -> None:
        """Clients (Neuroglancer) drop connections whose data they no longer need: stay quiet."""
        import sys

        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)

    def start(self) -> "MeshServer":
        """Serve in a daemon thread; returns the server (``stop()`` ends it)."""
        self.thread = threading.Thread(target=self.serve_forever, name=f"gpumesh-serve {self.url}", daemon=True)
        self.thread.start()
        return self

    def recorded(self) -> list:
        """A copy of the request log (empty when not recording)."""
        with self.requests_lock:
            return list(self.requests or [])

    def clear_recorded(self) -> None:
        """Forget the requests recorded so far."""
        with self.requests_lock:
            if self.requests is not None:
                self.requests.clear()

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        if self.thread is not None:
            self.shutdown()
            self.thread.join()
            self.thread = None
        self.server_close()

    def __enter__(self) -> "MeshServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(directory, port: int = 0, *, host: str = "127.0.0.1", verbose: bool = False,
          record: bool = False) -> tuple[MeshServer, str]:
    """Serve a local directory over HTTP from a background thread.

    Parameters
    ----------
    directory : str or os.PathLike
        Any local directory (a mesh directory, a volume).
    port : int
        0 picks a free port.
    host : str
        Bind address (default loopback only).
    verbose : bool
        Log requests to stderr.
    record : bool
        Keep a log of the requests (``server.requests``, :meth:`MeshServer.recorded`).

    Returns
    -------
    (MeshServer, str)
        The running server (``server.stop()`` ends it; also a context manager) and its URL
        ``http://127.0.0.1:PORT/``.

    Raises
    ------
    NotADirectoryError
        ``directory`` is not a directory.
    """
    if not os.path.isdir(directory):
        raise NotADirectoryError(f"not a directory: {directory}")
    server = MeshServer(directory, host, port, verbose, record).start()
    return server, server.url


def check_mesh_folder(path) -> None:
    """Refuse a local folder that holds no mesh, before it is served.

    A mesh directory has an ``info`` file of a mesh ``@type`` (spec: meshes.md), or, as old
    legacy meshes do without one, legacy manifests (``ID:0``).

    Raises
    ------
    NotADirectoryError
        ``path`` is not a directory.
    InvalidMeshError
        No ``info`` and no legacy manifest, or an ``info`` that is not a mesh's (a volume's
        names its mesh folder in the message).
    """
    from .errors import InvalidMeshError
    from .reader import open_mesh

    if not os.path.isdir(path):
        raise NotADirectoryError(f"not a directory: {path}")
    info_path = os.path.join(path, "info")
    if os.path.isfile(info_path):
        try:
            open_mesh(os.path.abspath(path))
        except InvalidMeshError as exc:
            try:
                with open(info_path, "rb") as fh:
                    info = json.load(fh)
            except ValueError:
                info = None
            if isinstance(info, dict) and isinstance(info.get("mesh"), str) and "@type" not in info:
                raise InvalidMeshError(f"{path} is a volume; its meshes are in "
                                       f"{os.path.join(path, info['mesh'])}") from exc
            raise InvalidMeshError(f"{path}: not a mesh directory ({exc})") from exc
        return
    with os.scandir(path) as entries:
        if any(e.name.endswith(":0") for e in entries):
            return
    raise InvalidMeshError(f"{path}: no info file there (nor legacy manifests, ID:0): not a mesh directory?")


# --------------------------------------------------------------------------------------------
# Neuroglancer


def _is_url(text: str) -> bool:
    return "://" in text.split("|")[0]


_NG_PREFIXES = ("precomputed://", "zarr://", "zarr2://", "zarr3://", "n5://")
_FORMAT_PREFIX = [("zarr.json", "zarr3://"), (".zarray", "zarr2://"), (".zattrs", "zarr2://"),
                  (".zgroup", "zarr2://"), ("attributes.json", "n5://"), ("info", "precomputed://")]


def volume_source_url(location: str, served_url: Optional[str] = None) -> str:
    """Neuroglancer data source URL of a volume: format prefix + URL.

    Parameters
    ----------
    location : str
        A local directory or a URL, with or without a Neuroglancer format prefix.
    served_url : str, optional
        HTTP URL where a local ``location`` is served.
    """
    if location.startswith(_NG_PREFIXES):
        return location
    from . import storage

    kv = storage.open_kvstore(location)
    prefix = None
    for key, pre in _FORMAT_PREFIX:
        try:
            if storage.read(kv, key) is not None:
                prefix = pre
                break
        except Exception:
            continue
    if prefix is None:
        raise ValueError(f"cannot tell the format of the volume at {location} (no zarr.json, .zarray, "
                         "attributes.json or info)")
    return prefix + (served_url or location)


def default_segments(dest, n: int = 5) -> list[int]:
    """The ``n`` largest segments by the ``voxels`` segment property, or [] when there is none."""
    from . import storage

    try:
        kv = storage.open_kvstore(dest)
        info = storage.read_json(kv, "info") or {}
        sp = info.get("segment_properties")
        if not isinstance(sp, str):
            return []
        props = storage.read_json(kv, sp.rstrip("/") + "/info") or {}
        inline = props.get("inline", {})
        ids = [int(s) for s in inline.get("ids", [])]
        for p in inline.get("properties", []):
            if p.get("id") == "voxels" and p.get("type") == "number":
                order = np.argsort(-np.asarray(p["values"], dtype=np.float64), kind="stable")
                return [ids[i] for i in order[:n]]
    except Exception:
        return []
    return []


def neuroglancer_state(mesh_url: str, segments: Sequence[int] = (), volume_url: Optional[str] = None,
                       voxel_size: Optional[Sequence[float]] = None) -> dict:
    """A Neuroglancer JSON state: one segmentation layer with the mesh (and volume) sources.

    Parameters
    ----------
    mesh_url : str
        ``precomputed://http://...`` of the mesh directory.
    segments : sequence of int
        Segments shown.
    volume_url : str, optional
        Data source URL of the label volume (same layer, so the segments colour the slices).
    voxel_size : sequence of 3 float, optional
        nm per voxel of a volume whose metadata Neuroglancer cannot scale (zarr, N5 without
        units); sets the source's output dimensions.
    """
    sources: list[Any] = []
    if volume_url is not None:
        if voxel_size is not None and not volume_url.startswith("precomputed://"):
            sources.append({"url": volume_url, "transform": {"outputDimensions": {
                a: [float(v) * 1e-9, "m"] for a, v in zip("xyz", voxel_size)}}})
        else:
            sources.append(volume_url)
    sources.append(mesh_url)
    layer = {"type": "segmentation", "name": "segmentation",
             "source": sources if len(sources) > 1 else sources[0],
             "segments": [str(int(s)) for s in segments]}
    return {"layers": [layer], "selectedLayer": {"layer": "segmentation", "visible": True},
            "layout": "3d" if volume_url is None else "xy-3d"}


def public_viewer_url(state: dict, base: str = PUBLIC_NEUROGLANCER) -> str:
    """A link opening ``state`` in a Neuroglancer deployment (``base#!<json>``)."""
    return base + "#!" + urllib.parse.quote(json.dumps(state, separators=(",", ":")), safe="")


@dataclass
class ViewSession:
    """What :func:`view` started.

    Attributes
    ----------
    mesh_url : str
        ``precomputed://`` URL of the mesh directory (paste into any Neuroglancer).
    volume_url : str or None
        Data source URL of the volume.
    state : dict
        The Neuroglancer state (segmentation layer, segments).
    link : str
        A public Neuroglancer link with that state (works while the servers run).
    viewer_url : str or None
        URL of the local Neuroglancer viewer (``neuroglancer`` package installed).
    viewer : neuroglancer.Viewer or None
    servers : list of MeshServer
    """

    mesh_url: str
    volume_url: Optional[str]
    state: dict
    link: str
    viewer_url: Optional[str] = None
    viewer: Any = None
    servers: list = field(default_factory=list)

    def stop(self) -> None:
        """Stop the HTTP servers (the Neuroglancer viewer server stops with the process)."""
        for s in self.servers:
            s.stop()
        self.servers = []


def _neuroglancer_viewer(state: dict):
    """A local ``neuroglancer.Viewer`` (bound to 127.0.0.1) showing ``state``, or None."""
    try:
        import neuroglancer
    except ImportError:
        return None
    neuroglancer.set_server_bind_address("127.0.0.1", 0)
    viewer = neuroglancer.Viewer()
    viewer.set_state(neuroglancer.ViewerState(state))
    return viewer


def view(dest, *, source: Optional[str] = None, segments: Optional[Sequence[int]] = None, port: int = 0,
         open_browser: bool = False, use_neuroglancer: bool = True,
         voxel_size: Optional[Sequence[float]] = None) -> ViewSession:
    """Serve a mesh directory (and a volume) and open them in Neuroglancer.

    Parameters
    ----------
    dest : str
        A local mesh directory (served on ``127.0.0.1:port``) or a URL Neuroglancer can read
        directly (``gs://``, ``s3://``, ``http(s)://``; not served).
    source : str, optional
        The label volume: a local directory (served on another port) or a URL, with or without
        a Neuroglancer prefix (``zarr3://``, ``precomputed://``, ...).
    segments : sequence of int, optional
        Segments to show; default the 5 largest by segment properties, if any.
    port : int
        Port of the mesh server (0: any free port).
    open_browser : bool
        Open the viewer (or the public link) in a web browser.
    use_neuroglancer : bool
        Start a local ``neuroglancer.Viewer`` when the package is installed.
    voxel_size : sequence of 3 float, optional
        nm per voxel of ``source`` (default: from its metadata via gpumesh).

    Returns
    -------
    ViewSession

    Raises
    ------
    NotADirectoryError
        A local ``dest`` or ``source`` is not a directory.
    InvalidMeshError
        A local ``dest`` holds no mesh (:func:`check_mesh_folder`).
    """
    servers = []
    try:
        if _is_url(str(dest)) and not str(dest).startswith("file://"):
            mesh_url = str(dest) if str(dest).startswith("precomputed://") else "precomputed://" + str(dest)
        else:
            path = str(dest)[len("file://"):] if str(dest).startswith("file://") else str(dest)
            check_mesh_folder(path)
            server, url = serve(path, port)
            servers.append(server)
            mesh_url = "precomputed://" + url
        volume_url = None
        if source is not None:
            src = str(source)
            if voxel_size is None:
                try:
                    from .volume import open_volume

                    voxel_size = [float(v) for v in open_volume(src).voxel_size]
                except Exception:
                    voxel_size = None
            if not _is_url(src) or src.startswith("file://"):
                local = src[len("file://"):] if src.startswith("file://") else src
                vserver, vurl = serve(local, 0)
                servers.append(vserver)
                volume_url = volume_source_url(local, vurl)
            else:
                volume_url = volume_source_url(src)
        if segments is None:
            segments = default_segments(dest)
        state = neuroglancer_state(mesh_url, segments, volume_url, voxel_size)
        session = ViewSession(mesh_url=mesh_url, volume_url=volume_url, state=state,
                              link=public_viewer_url(state), servers=servers)
        if use_neuroglancer:
            viewer = _neuroglancer_viewer(state)
            if viewer is not None:
                session.viewer = viewer
                session.viewer_url = viewer.get_viewer_url()
        if open_browser:
            import webbrowser

            webbrowser.open(session.viewer_url or session.link)
        return session
    except BaseException:
        for s in servers:
            s.stop()
        raise


# --------------------------------------------------------------------------------------------
# matplotlib


def plot_mesh(mesh, ax=None, *, max_faces: int = 20000, color=None, title: Optional[str] = None,
              elev: float = 20.0, azim: float = -60.0, units: str = "um"):
    """Draw a mesh into a matplotlib 3-D axis (decimated for display, equal aspect).

    Parameters
    ----------
    mesh : trimesh.Trimesh
        Vertices in nm.
    ax : mpl_toolkits.mplot3d.Axes3D, optional
        Default: a new figure's 3-D axis.
    max_faces : int
        Meshes with more triangles are decimated (meshoptimizer) for drawing only.
    color : matplotlib colour, optional
    title : str, optional
        Default: the triangle count.
    elev, azim : float
        View angles.
    units : {"um", "nm"}
        Axis units.

    Returns
    -------
    The axis.
    """
    import matplotlib.pyplot as plt
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection

    from .lod import decimate

    if ax is None:
        fig = plt.figure(figsize=(4, 4))
        ax = fig.add_subplot(projection="3d")
    v = np.asarray(mesh.vertices, np.float64)
    f = np.asarray(mesh.faces, np.int64)
    ntri = len(f)
    if len(f) > max_faces:
        lo = v.min(axis=0)
        # for the eye only: the triangle budget rules, not decimate's error bound (0.5 nm here,
        # which left a 200k-triangle mesh at 68k for a budget of 8k)
        v, f = decimate(v - lo, f.astype(np.int32), max_faces / len(f), np.ones(3), max_error=np.inf)
        v = v + lo
    scale = 1e-3 if units == "um" else 1.0
    v = v * scale
    if len(f):
        tris = v[f]
        normals = np.cross(tris[:, 1] - tris[:, 0], tris[:, 2] - tris[:, 0])
        norm = np.linalg.norm(normals, axis=1, keepdims=True)
        normals = normals / np.where(norm > 0, norm, 1.0)
        # light from above the camera (matplotlib's view direction for elev, azim)
        e, a = np.radians(elev), np.radians(azim)
        light = np.array([np.cos(e) * np.cos(a), np.cos(e) * np.sin(a), np.sin(e)]) + np.array([0, 0, 0.6])
        shade = 0.25 + 0.75 * np.clip(normals @ (light / np.linalg.norm(light)), 0, 1)
        base = np.array(plt.matplotlib.colors.to_rgb(color or "tab:blue"))
        coll = Poly3DCollection(tris, facecolors=np.clip(shade[:, None] * base, 0, 1), linewidths=0)
        ax.add_collection3d(coll)
        lo, hi = v.min(axis=0), v.max(axis=0)
        mid, half = (lo + hi) / 2, max((hi - lo).max() / 2, 1e-9)
        ax.set_xlim(mid[0] - half, mid[0] + half)
        ax.set_ylim(mid[1] - half, mid[1] + half)
        ax.set_zlim(mid[2] - half, mid[2] + half)
        ax.set_box_aspect((1, 1, 1))
    unit = "µm" if units == "um" else "nm"
    ax.set_xlabel(f"x ({unit})")
    ax.set_ylabel(f"y ({unit})")
    ax.set_zlabel(f"z ({unit})")
    ax.view_init(elev=elev, azim=azim)
    ax.set_title(title if title is not None else f"{ntri:,} triangles", fontsize=9)
    return ax
