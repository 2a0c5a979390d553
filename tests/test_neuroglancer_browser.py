"""End to end: the real Neuroglancer client renders gpumesh output in headless Chromium.

A 128³ crop of the real volume is meshed unsharded, sharded (at 16 and at 10 bits) and legacy;
each output is served on 127.0.0.1 and shown in Neuroglancer (the client of the ``neuroglancer``
package) with five real segments, from far away and from close by (see
``tests/browser/neuroglancer_check.py`` for what is checked).  Deliberately corrupted copies must
fail the same check, each for its own reason.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them); without them the
tests are skipped, except under ``CI`` where they fail.  Screenshots go to
``$GPUMESH_BROWSER_ARTIFACTS`` or ``tests/.artifacts/browser/``, with ``report.txt`` there.
"""

from __future__ import annotations

import os
import pathlib
import shutil

import pytest

from browser import corrupt
from browser.neuroglancer_check import NeuroglancerBrowser, check_in_browser, find_browser

from conftest import CROP_START, VOXEL_SIZE

pytestmark = pytest.mark.browser
ANISOTROPIC = (8.0, 8.0, 40.0)

ARTIFACTS = pathlib.Path(os.environ.get("GPUMESH_BROWSER_ARTIFACTS")
                         or pathlib.Path(__file__).resolve().parent / ".artifacts" / "browser")

_results: dict = {}


def _report(capsys, result) -> None:
    """Keep the result for report.txt and print where its screenshots are (visible with -q)."""
    _results[result.name] = result
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with open(ARTIFACTS / "report.txt", "w") as fh:
        for r in _results.values():
            fh.write(r.summary() + ("\n  problems:\n    - " + "\n    - ".join(r.problems) if r.problems else "")
                     + "\n\n")
    with capsys.disabled():
        print(f"\n[browser] {result.name}: screenshots " + ", ".join(result.screenshots)
              + f" (report {ARTIFACTS / 'report.txt'})")


@pytest.fixture(scope="module")
def browser():
    paths, why = find_browser()
    if paths is None:
        if os.environ.get("CI"):
            pytest.fail(f"the Neuroglancer browser test cannot run under CI: {why}")
        pytest.skip(why)
    b = NeuroglancerBrowser(*paths)
    try:
        yield b
    finally:
        b.close()


def _mesh(crop, dest, voxel_size=VOXEL_SIZE, **kw):
    from gpumesh.pipeline import MeshOptions, run_mesh

    run_mesh(crop, str(dest), options=MeshOptions(chunk_size=32, max_lods=3, **kw), voxel_size=voxel_size,
             voxel_offset=CROP_START, workers=1, overwrite=True)
    return dest


@pytest.fixture(scope="module")
def outputs(crop, tmp_path_factory):
    """The crop meshed as multires unsharded, multires sharded (at 16 and at 10 vertex
    quantization bits) and legacy."""
    from gpumesh.sharding import ShardingOptions

    root = tmp_path_factory.mktemp("browser_outputs")
    return {"unsharded": _mesh(crop, root / "unsharded"),
            "sharded": _mesh(crop, root / "sharded", sharding=ShardingOptions()),
            "sharded-10bit": _mesh(crop, root / "sharded-10bit", sharding=ShardingOptions(),
                                   vertex_quantization_bits=10),
            "legacy": _mesh(crop, root / "legacy", format="legacy"),
            # the crop taken as 8x8x40 nm voxels: LODs 1 and 2 downsampled along x and y only
            # (per-axis vertex_offsets), or along every axis
            "anisotropic": _mesh(crop, root / "anisotropic", voxel_size=ANISOTROPIC),
            "anisotropic-all": _mesh(crop, root / "anisotropic-all", voxel_size=ANISOTROPIC, downsampling="all")}


@pytest.fixture(scope="module")
def segments(outputs):
    """Five real segments: the 2nd to 6th largest of the crop (the largest hides the rest)."""
    from gpumesh.viewer import default_segments

    segs = default_segments(str(outputs["unsharded"]), 6)[1:]
    assert len(segs) == 5
    return segs


@pytest.fixture(scope="module")
def reference(browser, outputs, segments):
    """The check of the good unsharded output (corrupted copies are compared with it)."""
    return check_in_browser(outputs["unsharded"], segments, browser=browser, name="unsharded",
                            artifacts=str(ARTIFACTS))


@pytest.mark.parametrize("kind", ["unsharded", "sharded", "sharded-10bit", "legacy"])
def test_neuroglancer_renders_output(kind, browser, outputs, segments, reference, capsys):
    if kind == "unsharded":
        result = reference
    else:
        result = check_in_browser(outputs[kind], segments, browser=browser, name=kind, artifacts=str(ARTIFACTS),
                                  reference=reference if kind.startswith("sharded") else None)
    _report(capsys, result)
    assert not result.problems
    for view in result.views:
        assert view.ready
        assert all(view.pixels[s] > 0 for s in segments)
    if kind != "legacy":
        far, close = result.views
        for s in segments:
            assert far.lods_read[s] == [max(far.lods_read[s])], "far view: one LOD, the coarsest"
            assert 0 in close.lods_read[s] and 0 not in far.lods_read[s]
        if kind.startswith("sharded"):
            # The same meshes, laid out differently (and at 10 bits, each vertex within 1/16 of
            # a voxel of its 16-bit position): the same picture.
            for mine, ref in zip(result.views, reference.views):
                for s in segments:
                    assert abs(mine.pixels[s] - ref.pixels[s]) <= 0.02 * ref.pixels[s] + 20


def test_neuroglancer_renders_lods_downsampled_along_some_axes(browser, outputs, segments, capsys):
    """Anisotropic voxels' LODs, downsampled along x and y only, with per-axis vertex_offsets:
    the client reads the LODs it should and draws the segments as it draws the LODs of the
    same voxels downsampled along every axis (the close view is LOD 0, the same meshes; the
    far view the coarsest LOD)."""
    # the crop is 5x longer in z than across at these voxels: a coarser detail cutoff than the
    # other outputs' 4 leaves the far view at the coarsest LOD (at 4 the far view also read
    # LOD 1 of the largest segments, as it does of the output downsampled along every axis)
    scale = 8.0
    ref = check_in_browser(outputs["anisotropic-all"], segments, browser=browser, name="anisotropic-all",
                           artifacts=str(ARTIFACTS), mesh_render_scale=scale)
    result = check_in_browser(outputs["anisotropic"], segments, browser=browser, name="anisotropic",
                              artifacts=str(ARTIFACTS), reference=ref, mesh_render_scale=scale)
    _report(capsys, result)
    assert not ref.problems and not result.problems
    far, close = result.views
    for s in segments:
        assert far.lods_read[s] == [max(far.lods_read[s])] and 0 in close.lods_read[s]
        assert abs(close.pixels[s] - ref.views[1].pixels[s]) <= 0.02 * ref.views[1].pixels[s] + 20
        assert far.pixels[s] > 0.7 * ref.views[0].pixels[s]


def _corrupted_copy(outputs, kind, tmp_path):
    dest = tmp_path / f"{kind}-corrupt"
    shutil.copytree(outputs[kind], dest)
    return dest


# Each corruption: how it is made, on which output, and what the failure message must name.
CORRUPTIONS = {
    # The client asks for the whole last fragment and gets half of it: Neuroglancer logs "Received
    # truncated response", never becomes ready, and draws nothing under that coarsest-LOD node.
    "truncated_fragment": ("unsharded", corrupt.truncate_last_fragment,
                           ["truncated", "Received truncated response"]),
    # The client reads a fragment 16 bytes past its start: its Draco decoder fails.
    "manifest_wrong_offset": ("unsharded", corrupt.shift_manifest_offset,
                              ["Failed to decode draco mesh", "LOD 0 fragment"]),
    # The children of a removed LOD 1 node are unreachable from the octree's root: no error at all,
    # the client just never asks for them (and draws a hole).
    "child_without_parent": ("unsharded", corrupt.orphan_children,
                             ["never requested", "child without its parent"]),
    # Sharded: the minishard index points 16 bytes before the manifest: the client reads garbage as
    # the manifest, rejects it, and draws nothing of that segment.
    "sharded_manifest_wrong_offset": ("sharded", corrupt.shift_sharded_manifest,
                                      ["Invalid index file size", "not drawn"]),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_neuroglancer_check_fails_on_corrupted_output(case, browser, outputs, segments, reference, tmp_path,
                                                      capsys):
    kind, make, expected = CORRUPTIONS[case]
    dest = _corrupted_copy(outputs, kind, tmp_path)
    what = make(str(dest), segments[0])
    result = check_in_browser(dest, segments, browser=browser, name=f"corrupt-{case}", artifacts=str(ARTIFACTS),
                              reference=reference, raise_on_problems=False)
    _report(capsys, result)
    with pytest.raises(AssertionError) as info:
        result.raise_if_failed()
    message = str(info.value)
    for text in expected:
        assert text in message, f"{case} ({what}): the check failed, but not with {text!r}:\n{message}"
    assert str(segments[0]) in message


def test_serve_records_requests(tmp_path):
    """The request log the browser checks rely on (no browser needed)."""
    import urllib.error
    import urllib.request

    from gpumesh.viewer import serve

    (tmp_path / "a").write_bytes(bytes(range(100)))
    server, url = serve(tmp_path, record=True)
    try:
        req = urllib.request.Request(url + "a", headers={"Range": "bytes=10-19"})
        assert urllib.request.urlopen(req).read() == bytes(range(10, 20))
        assert urllib.request.urlopen(url + "a").read() == bytes(range(100))
        req = urllib.request.Request(url + "a", headers={"Range": "bytes=95-199"})
        assert urllib.request.urlopen(req).read() == bytes(range(95, 100))
        for path, rng in (("missing", None), ("a", "bytes=200-300")):
            req = urllib.request.Request(url + path, headers={"Range": rng} if rng else {})
            with pytest.raises(urllib.error.HTTPError):
                urllib.request.urlopen(req)
        got = [(r.method, r.path, r.range, r.status, r.start, r.stop, r.size) for r in server.recorded()]
        assert got == [("GET", "/a", "bytes=10-19", 206, 10, 20, 100), ("GET", "/a", None, 200, 0, 100, 100),
                       ("GET", "/a", "bytes=95-199", 206, 95, 100, 100), ("GET", "/missing", None, 404, None, None, None),
                       ("GET", "/a", "bytes=200-300", 416, None, None, 100)]
        server.clear_recorded()
        assert server.recorded() == []
    finally:
        server.stop()
    plain, url = serve(tmp_path)
    try:
        urllib.request.urlopen(url + "a").read()
        assert plain.requests is None and plain.recorded() == []
    finally:
        plain.stop()
