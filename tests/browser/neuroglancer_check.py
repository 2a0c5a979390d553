"""Render a gpumesh output directory in the real Neuroglancer client and check what it did.

The client is the one the ``neuroglancer`` PyPI package ships (served by its Python
``neuroglancer.Viewer`` on 127.0.0.1); the browser is the system Chromium (Debian's
``chromium`` + ``chromium-driver``) driven by Selenium over WebDriver BiDi, headless, with
software WebGL (SwiftShader).  The mesh directory is served by :func:`gpumesh.viewer.serve`
(HTTP Range, CORS) with a request log.

:func:`check_in_browser` opens one segmentation layer with the mesh source, each selected segment
in its own fixed colour, and looks from far away (only the coarsest LOD may be chosen) and from
close by (LOD 0 everywhere, the whole object in view).  From each view it takes a screenshot and
the requests the server answered, and from the whole run the browser console.  It then asserts:

* every selected segment is drawn: pixels of its colour in each screenshot (and, when a reference
  result of a good output is given, not much fewer of them than there);
* the console has no errors (Neuroglancer reports a failed chunk with ``console.log("Error
  retrieving chunk ...")`` from its worker, so error-like messages count whatever their level);
* the viewer became ready (all chunks it wanted are loaded);
* the requests the client made are what the format implies: every fragment request is exactly one
  manifest fragment's byte range (or shard index, minishard index or manifest range), answered
  with all its bytes; the far view reads the coarsest LOD of every segment and nothing finer; the
  close view reads every non-empty LOD 0 fragment; together the views read every non-empty
  fragment of every LOD.  Legacy output: every fragment file each manifest lists is read.

Problems are collected, and an :class:`AssertionError` lists all of them.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

#: Chromium flags: headless, software WebGL, nothing contacted but 127.0.0.1.
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
    "--use-gl=angle",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--disable-dev-shm-usage",
    "--disable-default-apps",
    "--disable-extensions",
    "--no-default-browser-check",
    "--metrics-recording-only",
]

CHROMIUM_PATHS = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
CHROMEDRIVER_PATHS = ["/usr/bin/chromedriver"]

#: Fixed segment colours (saturated, far apart in hue), assigned in order.
PALETTE = [(255, 0, 0), (0, 255, 0), (0, 96, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255)]

#: Console messages that count as errors whatever their level (Neuroglancer's worker reports a
#: failed chunk with console.log).
_ERROR_TEXT = re.compile(r"\berror\b|\bfailed\b|\bfailure\b|\bexception\b|\binvalid\b", re.IGNORECASE)


def find_browser() -> tuple[Optional[tuple[str, str]], str]:
    """``((chromium, chromedriver), "")`` or ``(None, why not)``.

    ``$GPUMESH_CHROMIUM`` / ``$GPUMESH_CHROMEDRIVER`` name other binaries.
    """
    try:
        import selenium  # noqa: F401
    except ImportError:
        return None, "the selenium package is not installed (pip install -e '.[dev]')"
    try:
        import neuroglancer  # noqa: F401
    except ImportError:
        return None, "the neuroglancer package is not installed (pip install -e '.[dev]')"
    if os.environ.get("GPUMESH_CHROMIUM") or os.environ.get("GPUMESH_CHROMEDRIVER"):
        chromium, driver = (p if p and os.access(p, os.X_OK) else None for p in (
            os.environ.get("GPUMESH_CHROMIUM", CHROMIUM_PATHS[0]), os.environ.get("GPUMESH_CHROMEDRIVER", CHROMEDRIVER_PATHS[0])))
    else:
        chromium = next((p for p in CHROMIUM_PATHS if os.access(p, os.X_OK)), shutil.which("chromium"))
        driver = next((p for p in CHROMEDRIVER_PATHS if os.access(p, os.X_OK)), shutil.which("chromedriver"))
    if chromium is None or driver is None:
        return None, ("Chromium and ChromeDriver are needed "
                      "(apt-get install -y --no-install-recommends chromium chromium-driver)")
    return (chromium, driver), ""


# --------------------------------------------------------------------------------------------
# What an output directory holds, byte range by byte range


@dataclass(frozen=True)
class Fragment:
    """One fragment of a segment: where the client must read it."""

    segment: int
    lod: int  # -1 for legacy
    index: int  # position in its LOD's list (legacy: in the manifest's list)
    position: tuple  # octree node (x, y, z); () for legacy
    key: str  # file (unsharded: "<id>", sharded: "<shard>.shard", legacy: the fragment name)
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start

    def describe(self) -> str:
        if self.lod < 0:
            return f"segment {self.segment} fragment {self.key!r}"
        return (f"segment {self.segment} LOD {self.lod} fragment {self.index} (node {list(self.position)}, "
                f"bytes {self.start}-{self.stop - 1} of {self.key})")


@dataclass
class OutputMap:
    """Every byte range of a mesh directory the client may read, and what it is."""

    kind: str  # "unsharded", "sharded" or "legacy"
    fragments: dict = field(default_factory=dict)  # segment -> list of Fragment
    ranges: dict = field(default_factory=dict)  # (key, start, stop) -> Fragment or label
    whole_files: dict = field(default_factory=dict)  # key -> label or Fragment (read without a range)
    index_spans: dict = field(default_factory=dict)  # key -> (start, stop) of a shard index
    num_lods: dict = field(default_factory=dict)  # segment -> number of LODs
    bounds_nm: dict = field(default_factory=dict)  # segment -> (lower (3,), upper (3,)) in nm
    lod_scale_nm: float = 1.0  # nm per stored-model unit (largest axis), multiplies lod scales
    lod_scales: dict = field(default_factory=dict)  # segment -> lod scales (stored units)
    unreadable: dict = field(default_factory=dict)  # segment -> why gpumesh.reader cannot read its manifest

    def describe_chunk(self, segment: int, lod: int, row: int) -> str:
        """Neuroglancer's chunk ``<segment>/<lod>:<row>`` (row of its octree, LODs in order) in our terms."""
        frags = [f for f in self.fragments.get(segment, []) if f.lod >= 0]
        base = sum(1 for f in frags if f.lod < lod)
        hit = [f for f in frags if f.lod == lod and f.index == row - base]
        return hit[0].describe() if hit else f"segment {segment} LOD {lod} octree row {row}"

    def nonempty(self, segment: int, lod: Optional[int] = None) -> list:
        return [f for f in self.fragments.get(segment, []) if f.size > 0 and (lod is None or f.lod == lod)]


def map_output(dest: str, segments: Sequence[int]) -> OutputMap:
    """Byte ranges of the manifests and fragments of ``segments`` in ``dest`` (via gpumesh.reader).

    The manifests are taken as they are (a corrupted manifest gives the ranges the client will ask
    for); fragment data is not read, except for legacy output, whose bounds come from its vertices.
    """
    from gpumesh import reader

    src = reader.open_mesh(str(dest))
    if src.kind == "legacy":
        out = OutputMap("legacy")
        out.whole_files["info"] = "info"
        for seg in segments:
            seg = int(seg)
            out.whole_files[f"{seg}:0"] = f"segment {seg} manifest"
            try:
                names = src.fragment_names(seg)
            except Exception as exc:  # noqa: BLE001
                out.unreadable[seg] = str(exc)
                continue
            frags = []
            for i, name in enumerate(names):
                # Legacy fragments are whole files; start/stop are unknown here (size > 0 assumed).
                f = Fragment(seg, -1, i, (), name, 0, 1)
                frags.append(f)
                out.whole_files[name] = f
            out.fragments[seg] = frags
            out.num_lods[seg] = 1
            try:
                mesh = reader.load_mesh(str(dest), seg)
                out.bounds_nm[seg] = (np.asarray(mesh.vertices).min(0), np.asarray(mesh.vertices).max(0))
            except Exception:  # noqa: BLE001 (a corrupted output: no bounds from it)
                pass
        return out

    info = src.info
    transform = reader.info_transform(info)
    scale = np.abs(np.diag(transform[:, :3]))
    out = OutputMap("sharded" if info.get("sharding") else "unsharded")
    out.lod_scale_nm = float(scale.max()) * float(info.get("lod_scale_multiplier", 1.0))
    out.whole_files["info"] = "info"
    if info.get("segment_properties"):
        out.whole_files[info["segment_properties"].rstrip("/") + "/info"] = "segment properties"
    if out.kind == "sharded":
        spec = src.sharding
        for shard in src.shard_numbers():
            name = spec.shard_key(shard)
            out.index_spans[name] = (0, spec.shard_index_bytes)
            index = src.shard_index(shard)
            for minishard, (a, b) in enumerate(index.tolist()):
                if b > a:
                    out.ranges[(name, int(a), int(b))] = f"{name} minishard {minishard} index"
    for seg in segments:
        seg = int(seg)
        if out.kind == "sharded":
            loc = src.locate(seg)
            if loc is None:
                out.unreadable[seg] = "not in the shard's minishard index"
                continue
            name, mstart, msize = loc
            out.ranges[(name, mstart, mstart + msize)] = f"segment {seg} manifest"
        try:
            m = src.manifest(seg)
        except Exception as exc:  # noqa: BLE001 (a corrupted manifest: nothing to map)
            out.unreadable[seg] = str(exc)
            continue
        if out.kind == "sharded":
            key, base = name, mstart - m.total_bytes
        else:
            out.whole_files[f"{seg}.index"] = f"segment {seg} manifest"
            key, base = str(seg), 0
        frags = []
        for lod, spans in enumerate(m.fragment_byte_ranges()):
            for i, (a, b) in enumerate(spans.tolist()):
                f = Fragment(seg, lod, i, tuple(int(v) for v in m.fragment_positions[lod][i]), key, base + a, base + b)
                frags.append(f)
                if b > a:
                    out.ranges[(key, f.start, f.stop)] = f
        out.fragments[seg] = frags
        out.num_lods[seg] = m.num_lods
        out.lod_scales[seg] = m.lod_scales
        pos0 = m.fragment_positions[0][m.fragment_sizes[0] > 0] if m.num_lods else np.zeros((0, 3))
        if len(pos0):
            lo = m.grid_origin + pos0.min(0) * m.chunk_shape
            hi = m.grid_origin + (pos0.max(0) + 1) * m.chunk_shape
            lo_nm = transform[:, :3] @ lo + transform[:, 3]
            hi_nm = transform[:, :3] @ hi + transform[:, 3]
            out.bounds_nm[seg] = (np.minimum(lo_nm, hi_nm), np.maximum(lo_nm, hi_nm))
    return out


# --------------------------------------------------------------------------------------------
# The browser


@dataclass(frozen=True)
class ConsoleEntry:
    kind: str  # "console" or "javascript"
    level: str
    text: str

    @property
    def is_error(self) -> bool:
        return self.kind == "javascript" or self.level in ("error", "severe") or bool(_ERROR_TEXT.search(self.text))


class NeuroglancerBrowser:
    """Headless Chromium showing a local ``neuroglancer.Viewer`` (both on 127.0.0.1).

    One instance serves many checks: :meth:`show` replaces the whole viewer state.
    """

    def __init__(self, chromium: str, chromedriver: str, width: int = 800, height: int = 800,
                 start_timeout: float = 60.0):
        import neuroglancer
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.width, self.height = int(width), int(height)
        self._console: list[ConsoleEntry] = []
        self._lock = threading.Lock()
        self._profile = tempfile.mkdtemp(prefix="gpumesh-chromium-")
        neuroglancer.set_server_bind_address("127.0.0.1", 0)
        self.viewer = neuroglancer.Viewer()
        with self.viewer.config_state.txn() as s:
            s.show_ui_controls = False
            s.show_panel_borders = False
        opts = webdriver.ChromeOptions()
        opts.binary_location = chromium
        opts.enable_bidi = True
        for flag in CHROMIUM_FLAGS + [f"--user-data-dir={self._profile}", f"--window-size={self.width},{self.height}"]:
            opts.add_argument(flag)
        self.driver = webdriver.Chrome(options=opts, service=Service(chromedriver))
        try:
            self.driver.script.add_console_message_handler(self._on_console)
            self.driver.script.add_javascript_error_handler(self._on_js_error)
            self.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
                "width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False})
            self.driver.get(self.viewer.get_viewer_url())
            deadline = time.monotonic() + start_timeout
            while not self.driver.execute_script("return !!(window.viewer && window.viewer.display)"):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Neuroglancer did not start in {start_timeout:.0f} s; console: {self.console()}")
                time.sleep(0.1)
            self.renderer = self.driver.execute_script(
                "const g = document.createElement('canvas').getContext('webgl2');"
                "if (!g) return null;"
                "const e = g.getExtension('WEBGL_debug_renderer_info');"
                "return e ? g.getParameter(e.UNMASKED_RENDERER_WEBGL) : g.getParameter(g.RENDERER);")
            if not self.renderer:
                raise RuntimeError("no WebGL 2 in this Chromium (software WebGL through SwiftShader expected)")
        except BaseException:
            self.close()
            raise

    # -- console --------------------------------------------------------------------------

    def _on_console(self, entry) -> None:
        with self._lock:
            self._console.append(ConsoleEntry("console", str(entry.level), str(entry.text)))

    def _on_js_error(self, entry) -> None:
        with self._lock:
            self._console.append(ConsoleEntry("javascript", str(getattr(entry, "level", "error")), str(entry.text)))

    def console(self) -> list[ConsoleEntry]:
        with self._lock:
            return list(self._console)

    def clear_console(self) -> None:
        with self._lock:
            self._console.clear()

    # -- viewer ---------------------------------------------------------------------------

    def show(self, state: dict) -> None:
        import neuroglancer

        self.viewer.set_state(neuroglancer.ViewerState(state))

    def update(self, **camera) -> None:
        """Change ``projection_scale``, ``projection_orientation`` or ``position`` only."""
        with self.viewer.txn() as s:
            for k, v in camera.items():
                setattr(s, k, v)

    def is_ready(self) -> bool:
        return bool(self.driver.execute_script("return !!(window.viewer && window.viewer.isReady())"))

    def wait_settled(self, server, timeout: float = 20.0, quiet: float = 0.8,
                     min_requests: int = 0) -> tuple[bool, float]:
        """Wait until the viewer is ready and the server has had no request for ``quiet`` s
        (and at least ``min_requests`` since it was last cleared).

        Gives up earlier when an error reached the console and nothing was requested for 2 s,
        and when nothing was requested for 5 s.  Returns ``(ready, seconds waited)``.
        """
        t0 = time.monotonic()
        n_last, t_last = -1, t0
        ready = False
        while True:
            time.sleep(0.2)
            now = time.monotonic()
            n = len(server.recorded())
            if n != n_last:
                n_last, t_last = n, now
            ready = self.is_ready()
            idle = now - t_last
            if ready and idle >= quiet and now - t0 >= 0.6 and n >= min_requests:
                break
            if not ready and ((idle >= 2.0 and any(e.is_error for e in self.console())) or idle >= 5.0):
                break
            if now - t0 > timeout:
                break
        if ready:
            time.sleep(0.3)  # let the frame with the last chunks be drawn
        return ready, time.monotonic() - t0

    def screenshot(self, path: str) -> np.ndarray:
        """Save a PNG of the page (the 3-D panel only: UI controls hidden) and return RGB pixels."""
        from PIL import Image

        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.driver.save_screenshot(path)
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))

    def close(self) -> None:
        try:
            if getattr(self, "driver", None) is not None:
                self.driver.quit()
                self.driver = None
        finally:
            # The neuroglancer.Viewer's server is the package's global one (other tests share it).
            shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> "NeuroglancerBrowser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# Pixels


def colour_pixels(rgb: np.ndarray, palette: Sequence[tuple]) -> np.ndarray:
    """Pixels of each palette colour (any brightness: the mesh shading scales all channels)."""
    img = rgb.astype(np.float32)
    # Neuroglancer's overlays: the coloured x/y/z labels top left, the maximize button top right.
    img[:80, :40] = 0
    img[:40, -40:] = 0
    peak = img.max(axis=2)
    lit = peak >= 40
    norm = img / np.maximum(peak, 1)[..., None]
    counts = []
    for c in palette:
        cn = np.asarray(c, np.float32) / max(c)
        counts.append(int(np.count_nonzero(lit & (np.abs(norm - cn).max(axis=2) < 0.25))))
    return np.asarray(counts)


# --------------------------------------------------------------------------------------------
# The check


@dataclass(frozen=True)
class View:
    """A camera: ``fov`` is the projection scale in units of the objects' extent."""

    name: str
    fov: float
    expect: str  # "coarsest" (only the coarsest LOD may be read) or "finest" (all of LOD 0)


#: Far: the objects span a few dozen pixels (coarsest LOD).  Close: they fill most of the view.
DEFAULT_VIEWS = (View("far", 8.0, "coarsest"), View("close", 0.8, "finest"))

#: Looking from a corner (quaternion x, y, z, w), so that no face of the crop faces the camera.
ORIENTATION = [0.28, -0.36, -0.12, 0.88]


@dataclass
class ViewResult:
    name: str
    screenshot: str
    ready: bool
    seconds: float
    pixels: dict  # segment -> pixels of its colour
    lods_read: dict  # segment -> sorted LODs whose fragments were requested
    fragments_read: dict  # segment -> number of fragment requests
    requests: list  # RequestRecord


@dataclass
class BrowserResult:
    """What :func:`check_in_browser` saw."""

    name: str
    dest: str
    kind: str
    segments: list
    colours: dict  # segment -> "#rrggbb"
    views: list  # ViewResult
    console: list  # ConsoleEntry
    problems: list  # str
    renderer: str

    @property
    def screenshots(self) -> list:
        return [v.screenshot for v in self.views]

    def raise_if_failed(self) -> None:
        """Raise an AssertionError listing every problem, if there is any."""
        if self.problems:
            raise AssertionError(f"Neuroglancer check {self.name!r} of {self.dest} failed:\n  - "
                                 + "\n  - ".join(self.problems) + "\n" + self.summary())

    def summary(self) -> str:
        lines = [f"{self.name}: {self.kind} output {self.dest}, segments {self.segments}, WebGL {self.renderer}"]
        for v in self.views:
            lods = ", ".join(f"{s}: LODs {v.lods_read.get(s, [])}" for s in self.segments)
            px = ", ".join(f"{s}: {v.pixels.get(s, 0)} px" for s in self.segments)
            lines.append(f"  {v.name} ({'ready' if v.ready else 'NOT ready'} after {v.seconds:.1f} s, "
                         f"{len(v.requests)} requests): {v.screenshot}\n    read {lods}\n    drawn {px}")
        errors = [e for e in self.console if e.is_error]
        lines.append(f"  console: {len(self.console)} messages, {len(errors)} errors")
        return "\n".join(lines)


def _hex(c) -> str:
    return "#%02x%02x%02x" % tuple(int(v) for v in c)


def _range_of(rec) -> Optional[tuple[int, int]]:
    """Requested ``[start, stop)`` from a ``bytes=a-b`` Range header, or None."""
    if not rec.range:
        return None
    m = re.match(r"^\s*bytes\s*=\s*(\d+)\s*-\s*(\d+)\s*$", rec.range)
    if not m:
        return None
    return int(m.group(1)), int(m.group(2)) + 1


def _classify(omap: OutputMap, rec, problems: list, seen: dict) -> None:
    """Map one request onto the output; note what is wrong with it."""
    key = rec.path.lstrip("/")
    if rec.method == "OPTIONS":
        return
    if rec.status == 404:
        if key in omap.whole_files or any(k[0] == key for k in omap.ranges):
            problems.append(f"the client asked for {key} and got 404")
        # other 404s: the client probing optional files; not ours to judge
        return
    span = _range_of(rec)
    if span is None:
        target = omap.whole_files.get(key)
        if target is None:
            if key.endswith(".shard") or key.split(".")[0].isdigit():
                problems.append(f"the client read all of {key} ({rec.method}, status {rec.status}); "
                                "expected byte ranges of it")
            return
        if rec.status not in (200, 206) or rec.stop is None or rec.stop - rec.start != rec.size:
            problems.append(f"{key}: answered with status {rec.status}")
        if isinstance(target, Fragment):
            seen.setdefault(target.segment, set()).add(target)
        return
    start, stop = span
    sent = (rec.stop - rec.start) if rec.stop is not None else 0
    target = omap.ranges.get((key, start, stop))
    if target is None:
        lo_hi = omap.index_spans.get(key)
        if lo_hi is not None and lo_hi[0] <= start and stop <= lo_hi[1]:
            target = f"{key} shard index"
    if target is None:
        problems.append(f"the client read bytes {start}-{stop - 1} of {key}, which are no fragment, manifest or "
                        f"index of the output (wrong offsets?)")
        return
    what = target.describe() if isinstance(target, Fragment) else target
    if rec.status == 416 or sent < stop - start:
        problems.append(f"{what}: the client asked for {stop - start} bytes but the file ({rec.size} bytes) has only "
                        f"{sent} of them (status {rec.status}): truncated")
    elif rec.status not in (200, 206):
        problems.append(f"{what}: answered with status {rec.status}")
    if isinstance(target, Fragment):
        seen.setdefault(target.segment, set()).add(target)


def _state(mesh_url: str, segments, colours, center, scale: float, orientation, mesh_render_scale) -> dict:
    layer = {"type": "segmentation", "name": "meshes", "source": mesh_url,
             "segments": [str(int(s)) for s in segments],
             "segmentColors": {str(int(s)): c for s, c in colours.items()},
             "meshRenderScale": mesh_render_scale}
    return {"dimensions": {a: [1e-9, "m"] for a in "xyz"},
            "position": [float(v) for v in center],
            "projectionOrientation": list(orientation),
            "projectionScale": float(scale),
            "layout": "3d", "showAxisLines": False, "showScaleBar": False, "showDefaultAnnotations": False,
            "showSlices": False, "projectionBackgroundColor": "#000000",
            "layers": [layer], "selectedLayer": {"layer": "meshes", "visible": False}}


def check_in_browser(dest, segments: Sequence[int], *, browser: NeuroglancerBrowser, name: str,
                     artifacts: str, views: Sequence[View] = DEFAULT_VIEWS,
                     reference: Optional[BrowserResult] = None, min_pixels: int = 20,
                     reference_fraction: float = 0.7, mesh_render_scale: float = 4.0,
                     settle_timeout: float = 20.0, raise_on_problems: bool = True) -> BrowserResult:
    """Show ``segments`` of the mesh directory ``dest`` in Neuroglancer and check the result.

    Parameters
    ----------
    dest : path of a local mesh directory (multires unsharded or sharded, or legacy).
    segments : up to ``len(PALETTE)`` segment IDs.
    browser : a running :class:`NeuroglancerBrowser`.
    name : names the screenshots (``<artifacts>/<name>-<view>.png``).
    reference : result of the same check on a good output: each segment must be drawn with at least
        ``reference_fraction`` of the pixels it had there.
    mesh_render_scale : the layer's ``meshRenderScale`` (detail cutoff, in screen pixels per LOD
        scale); with the default views it puts LOD 0 everywhere in the close view and only the
        coarsest LOD in the far one.

    Returns
    -------
    BrowserResult

    Raises
    ------
    AssertionError
        Listing every problem (with ``raise_on_problems``).
    """
    from gpumesh.viewer import serve

    segments = [int(s) for s in segments]
    if not 1 <= len(segments) <= len(PALETTE):
        raise ValueError(f"1 to {len(PALETTE)} segments, got {len(segments)}")
    dest = os.path.abspath(os.fspath(dest))
    omap = map_output(dest, segments)
    colours = {s: _hex(PALETTE[i]) for i, s in enumerate(segments)}
    bounds = [omap.bounds_nm[s] for s in segments if s in omap.bounds_nm]
    if not bounds:
        raise ValueError(f"no bounds for segments {segments} in {dest}")
    lo = np.min([b[0] for b in bounds], axis=0)
    hi = np.max([b[1] for b in bounds], axis=0)
    center = (lo + hi) / 2
    extent = float(np.linalg.norm(hi - lo))
    problems: list[str] = []
    results: list[ViewResult] = []
    seen_all: dict = {}

    browser.show({"layers": []})
    time.sleep(0.3)
    browser.clear_console()
    server, url = serve(dest, record=True)
    try:
        for i, view in enumerate(views):
            if i == 0:
                browser.show(_state("precomputed://" + url, segments, colours, center, view.fov * extent,
                                    ORIENTATION, mesh_render_scale))
            else:
                browser.update(projection_scale=view.fov * extent)
            # The first view must at least read the info and each segment's manifest.
            ready, secs = browser.wait_settled(server, timeout=settle_timeout,
                                               min_requests=1 + len(segments) if i == 0 else 0)
            shot = os.path.join(artifacts, f"{name}-{view.name}.png")
            rgb = browser.screenshot(shot)
            recs = server.recorded()
            server.clear_recorded()
            seen: dict = {}
            for rec in recs:
                _classify(omap, rec, problems, seen)
            for s, frags in seen.items():
                seen_all.setdefault(s, set()).update(frags)
            counts = colour_pixels(rgb, PALETTE[:len(segments)])
            vr = ViewResult(view.name, shot, ready, secs, {s: int(c) for s, c in zip(segments, counts)},
                            {s: sorted({f.lod for f in seen.get(s, ())}) for s in segments},
                            {s: len(seen.get(s, ())) for s in segments}, recs)
            results.append(vr)
            if not ready:
                problems.append(f"{view.name} view: Neuroglancer never became ready (some chunk it wanted did not "
                                f"load) within {secs:.1f} s")
            for s in segments:
                px = vr.pixels[s]
                if px < min_pixels:
                    problems.append(f"{view.name} view: segment {s} ({colours[s]}) not drawn: {px} pixels of its colour")
                elif reference is not None:
                    ref = next((r for r in reference.views if r.name == view.name), None)
                    if ref is not None and px < reference_fraction * ref.pixels.get(s, 0):
                        problems.append(f"{view.name} view: segment {s} drawn with {px} pixels, "
                                        f"{ref.pixels[s]} in the reference: part of it is missing")
            if omap.kind == "legacy":
                continue
            for s in segments:
                if s not in omap.num_lods:
                    continue
                top = omap.num_lods[s] - 1
                got = seen.get(s, set())
                if view.expect == "coarsest":
                    finer = sorted({f.lod for f in got if f.lod < top})
                    if finer:
                        problems.append(f"{view.name} view: segment {s}: the client read LODs {finer}, expected only "
                                        f"its coarsest LOD {top}")
                    missing = [f for f in omap.nonempty(s, top) if f not in got]
                else:
                    missing = [f for f in omap.nonempty(s, 0) if f not in got]
                if missing:
                    problems.append(f"{view.name} view: segment {s}: {len(missing)} of {len(omap.nonempty(s, missing[0].lod))} "
                                    f"non-empty LOD {missing[0].lod} fragments never requested although the whole "
                                    f"object is in view, e.g. {missing[0].describe()} (unreachable in the octree: "
                                    f"a child without its parent, or Z-order?)")
        console = browser.console()
    finally:
        server.stop()
        browser.show({"layers": []})

    for s in segments:
        missing = [f for f in omap.nonempty(s) if f not in seen_all.get(s, set())]
        if missing and omap.kind == "legacy":
            problems.append(f"segment {s}: {len(missing)} legacy fragments never requested, e.g. {missing[0].describe()}")
        elif missing:
            lods = sorted({f.lod for f in missing})
            problems.append(f"segment {s}: {len(missing)} non-empty fragments (LODs {lods}) never requested in any "
                            f"view, e.g. {missing[0].describe()}")
    for s, why in omap.unreadable.items():
        problems.append(f"segment {s}: gpumesh.reader cannot read its manifest either ({why})")
    for e in console:
        if e.is_error:
            m = re.search(r"chunk (\d+)/(\d+):(\d+)", e.text)
            what = f" [{omap.describe_chunk(int(m.group(1)), int(m.group(2)), int(m.group(3)))}]" if m else ""
            problems.append(f"browser console {e.kind} {e.level}: {e.text}{what}")

    result = BrowserResult(name, dest, omap.kind, segments, colours, results, console,
                           list(dict.fromkeys(problems)), browser.renderer)
    if raise_on_problems:
        result.raise_if_failed()
    return result
