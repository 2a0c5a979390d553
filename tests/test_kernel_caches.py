"""gpumesh imports, meshes and builds its GPU kernels where numba and CuPy would find no writable
cache directory (gpumesh._caches).

A container that runs as another user than the installer, with a read-only root file system or
an unwritable ``HOME``, gives numba and CuPy no place for their kernel caches: numba then
refuses to define any ``cache=True`` function, and CuPy to compile.  The tests build that
situation as any user (root too): a copy of the package whose ``__pycache__`` is a regular
file, and ``HOME`` / ``XDG_CACHE_HOME`` below a regular file, so that no directory can be made
there.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest

from gpumesh import _caches, marching, validate

REPO = pathlib.Path(__file__).resolve().parents[1]


def _package_copy(tmp_path):
    """A copy of the package in ``tmp_path/site`` without its caches, and the environment that
    runs it (numba's cache where numba itself puts it)."""
    site = tmp_path / "site"
    shutil.copytree(REPO / "gpumesh", site / "gpumesh", ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env.update(PYTHONPATH=str(site), PYTHONDONTWRITEBYTECODE="1")
    return site, env


def _hostile_copy(tmp_path):
    """A copy of the package where numba's own cache locations cannot be written, and the
    environment to run it in (its temporary directory inside ``tmp_path``)."""
    site, env = _package_copy(tmp_path)
    (site / "gpumesh" / "__pycache__").write_text("not a directory\n")
    (site / "plain.py").write_text("import numba\n\n@numba.njit(cache=True)\ndef f(x):\n    return x + 1\n")
    (site / "__pycache__").write_text("not a directory\n")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, so nothing can be made below it\n")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env.update(HOME=str(blocker / "home"), XDG_CACHE_HOME=str(blocker / "cache"), TMPDIR=str(tmp))
    return site, tmp, env


def _python(code, env, cwd):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


def test_kernels_load_where_numba_has_no_cache_directory(tmp_path):
    _, tmp, env = _hostile_copy(tmp_path)
    # numba alone fails there: the situation the package must survive
    plain = _python("import plain", env, tmp_path)
    assert plain.returncode != 0 and "no locator available" in plain.stderr, plain.stderr[-2000:]
    code = ("import os, numpy as np\n"
            "import gpumesh.marching as m\n"
            "assert m.__file__.startswith(os.environ['PYTHONPATH']), m.__file__\n"
            "lab = np.zeros((6, 6, 6), np.uint32); lab[2:4, 2:4, 2:4] = 5\n"
            "print(len(m.march_cubes(lab, 4)[0]), os.environ['NUMBA_CACHE_DIR'])\n")
    proc = _python(code, env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ntri, cache = proc.stdout.split()
    lab = np.zeros((6, 6, 6), np.uint32)
    lab[2:4, 2:4, 2:4] = 5
    assert int(ntri) == len(marching.march_cubes(lab, 4)[0]) > 0  # the same kernel's result
    cache = pathlib.Path(cache)
    assert cache.parent == tmp and cache.name == f"gpumesh-numba-{os.getuid()}"
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    # the kernel was cached there, and a second process runs the same way with that directory
    assert any(p.suffix == ".nbi" and p.name.startswith("marching._march") for p in cache.rglob("*"))
    again = _python(code, env, tmp_path)
    assert again.returncode == 0 and again.stdout == proc.stdout, again.stderr[-3000:]


def test_the_main_job_runs_where_numba_has_no_cache_directory(tmp_path, crop):
    _, _, env = _hostile_copy(tmp_path)
    np.save(tmp_path / "labels.npy", np.ascontiguousarray(crop[:48, :48, :48]))
    code = ("import numpy as np, gpumesh\n"
            f"s = gpumesh.run_mesh(np.load({str(tmp_path / 'labels.npy')!r}), {str(tmp_path / 'out')!r},"
            " voxel_size=(32, 32, 40), workers=2)\n"
            "print(s.segments)\n")
    proc = _python(code, env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.split()[-1]) > 0
    assert validate(str(tmp_path / "out")).ok


def test_writable_locations_are_left_to_numba(tmp_path, monkeypatch):
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    assert _caches.ensure_numba_cache_dir(str(pkg)) is None  # __pycache__ can be made
    assert (pkg / "__pycache__").is_dir() and "NUMBA_CACHE_DIR" not in os.environ
    (pkg / "__pycache__").rmdir()
    (pkg / "__pycache__").write_text("x")
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    monkeypatch.setattr(_caches.tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("HOME", str(blocker / "home"))
    # __pycache__ cannot be made, numba's user-wide cache (XDG_CACHE_HOME, before HOME) can
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _caches.ensure_numba_cache_dir(str(pkg)) is None
    assert (tmp_path / "xdg" / "numba").is_dir() and "NUMBA_CACHE_DIR" not in os.environ
    # neither can be made, but the user named a directory: the user's choice stands
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker / "cache"))
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "given"))
    assert _caches.ensure_numba_cache_dir(str(pkg)) is None
    assert os.environ["NUMBA_CACHE_DIR"] == str(tmp_path / "given")
    assert not list(tmp_path.glob("gpumesh-numba-*"))


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX user ids")
@pytest.mark.parametrize("mode", [0o777, 0o770, 0o720], ids=["777", "770", "720"])
def test_a_shared_cache_directory_of_someone_else_is_not_used(tmp_path, monkeypatch, mode):
    """The cache holds pickles numba loads: a directory others (or the group) may write is
    never used.  A numba that has read its configuration already is told the directory too."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__pycache__").write_text("x")
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    planted = tmp / f"gpumesh-numba-{os.getuid()}"
    planted.mkdir()
    planted.chmod(mode)
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker / "cache"))
    monkeypatch.setenv("HOME", str(blocker / "home"))
    monkeypatch.setattr(_caches.tempfile, "tempdir", str(tmp))
    from numba.core import config

    monkeypatch.setattr(config, "CACHE_DIR", config.CACHE_DIR)   # put back after the test
    chosen = _caches.ensure_numba_cache_dir(str(pkg))
    assert chosen is not None and pathlib.Path(chosen).parent == tmp and pathlib.Path(chosen) != planted
    assert os.environ["NUMBA_CACHE_DIR"] == chosen == config.CACHE_DIR
    assert stat.S_IMODE(os.stat(chosen).st_mode) == 0o700


def test_cupy_gets_a_private_cache_where_home_cannot_be_written(tmp_path, monkeypatch):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.delenv("CUPY_CACHE_DIR", raising=False)
    monkeypatch.setattr(_caches.tempfile, "tempdir", str(tmp))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert _caches.ensure_cupy_cache_dir() is None  # CuPy's default can be made: it stands
    assert (tmp_path / "home" / ".cupy" / "kernel_cache").is_dir()
    assert "CUPY_CACHE_DIR" not in os.environ
    monkeypatch.setenv("HOME", str(blocker / "home"))
    chosen = _caches.ensure_cupy_cache_dir()
    assert chosen == str(tmp / f"gpumesh-cupy-{os.getuid()}") == os.environ["CUPY_CACHE_DIR"]
    assert stat.S_IMODE(os.stat(chosen).st_mode) == 0o700
    monkeypatch.setenv("CUPY_CACHE_DIR", str(tmp_path / "given"))
    assert _caches.ensure_cupy_cache_dir() is None
    assert os.environ["CUPY_CACHE_DIR"] == str(tmp_path / "given")


def test_the_cupy_runtime_sets_the_cache_before_it_compiles(tmp_path, monkeypatch):
    """CupyRuntime over a stand-in ``cupy`` that records ``CUPY_CACHE_DIR`` when asked to
    compile (and then fails, as a compile error would: the runtime raises ImportError)."""
    import types

    from gpumesh import gpu

    seen = {}

    class Compiled(Exception):
        pass

    def raw_module(code):
        seen["cache"] = os.environ.get("CUPY_CACHE_DIR")
        seen["code"] = code
        raise Compiled("stand-in: no compiler")

    fake = types.ModuleType("cupy")
    fake.RawModule = raw_module
    fake.cuda = types.SimpleNamespace(memory=types.SimpleNamespace(OutOfMemoryError=MemoryError))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    monkeypatch.delenv("CUPY_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(blocker / "home"))
    monkeypatch.setattr(_caches.tempfile, "tempdir", str(tmp_path))
    with pytest.raises(ImportError, match="could not be compiled"):
        gpu.CupyRuntime()
    assert seen["cache"] == str(tmp_path / f"gpumesh-cupy-{os.getuid()}")
    assert seen["code"] == gpu.kernel_source()


# A later process: the main job (in this process: one worker) and ad-hoc meshing, exact and
# decimated, over uint64 labels; prints the gpumesh kernels numba compiled meanwhile.
_LATER_JOB = r"""
import json, sys
import numpy as np
from numba.core import event
import gpumesh
from gpumesh.adhoc import mesh_segment
assert gpumesh.__file__.startswith(sys.argv[2]), gpumesh.__file__
labels = np.load(sys.argv[1])
ids, counts = np.unique(labels[labels != 0], return_counts=True)
seg = int(ids[np.argmax(counts)])
with event.install_recorder("numba:compile") as rec:
    s = gpumesh.run_mesh(labels, sys.argv[3], voxel_size=(32, 32, 40), workers=1,
                         options=gpumesh.MeshOptions(chunk_size=16, max_lods=3))
    exact = mesh_segment(labels, seg, voxel_size=(32, 32, 40), device="cpu")
    coarse = mesh_segment(labels, seg, voxel_size=(32, 32, 40), device="cpu", quality="medium")
fns = [e.data["dispatcher"].py_func for _, e in rec.buffer if e.is_start]
compiled = sorted({f"{f.__module__}.{f.__qualname__}" for f in fns if f.__module__.startswith("gpumesh")})
print(json.dumps({"compiled": compiled, "segments": s.segments, "faces": [len(exact.faces), len(coarse.faces)]}))
"""


def test_gpumesh_warmup_leaves_a_later_process_nothing_to_compile(tmp_path, crop):
    """``gpumesh warmup`` in a copy of the package with no cache (an image being built): a later
    process meshes with no compile, from the package's ``__pycache__``, and so does one whose
    numba looks in another directory (``NUMBA_CACHE_DIR``, as a container that cannot write
    ``__pycache__`` gets): the kernels are copied there."""
    site, env = _package_copy(tmp_path)
    np.save(tmp_path / "labels.npy", np.ascontiguousarray(crop[:48, :48, :48]).astype(np.uint64))

    def later(name, env):
        proc = subprocess.run([sys.executable, "-c", _LATER_JOB, str(tmp_path / "labels.npy"), str(site),
                               str(tmp_path / name)], capture_output=True, text=True, env=env, cwd=tmp_path,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    warm = subprocess.run([sys.executable, "-m", "gpumesh.cli", "warmup", "--dtype", "int64", "--device", "cpu"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert warm.returncode == 0, warm.stderr[-3000:]
    in_tree = site / "gpumesh" / "__pycache__"
    assert f"in {in_tree}" in warm.stdout and warm.stdout.startswith("uint64:"), warm.stdout
    assert "CUDA:     not asked for" in warm.stdout
    first = later("out1", env)
    assert first["segments"] > 0 and min(first["faces"]) > 0
    assert first["compiled"] == [], "\n".join(first["compiled"])
    elsewhere = tmp_path / "elsewhere"
    second = later("out2", dict(env, NUMBA_CACHE_DIR=str(elsewhere)))
    assert second == first
    copied = {p.name for p in elsewhere.rglob("*.nb[ic]")}
    assert copied == {p.name for p in in_tree.glob("*.nb[ic]")} != set()


def test_the_seed_copies_whole_kernels_and_none_that_the_cache_has_a_file_of(tmp_path, monkeypatch):
    """A kernel's index names its data files by number, so a kernel that the cache has any
    file of (its own entries, or data a crash left without its index) is not copied at all:
    our index would point at the cache's other code."""
    pkg = tmp_path / "pkg"
    (pkg / "__pycache__").mkdir(parents=True)
    for name, data in [("m.a-3.py311.nbi", b"index a"), ("m.a-3.py311.1.nbc", b"data a"),
                       ("m.b-9.py311.nbi", b"index b"), ("m.b-9.py311.1.nbc", b"b1"), ("m.b-9.py311.2.nbc", b"b2"),
                       ("m.cpython-311.pyc", b"pyc")]:
        (pkg / "__pycache__" / name).write_bytes(data)
    root = tmp_path / "cache"
    target = pathlib.Path(_caches.numba_cache_subdir(str(root), str(pkg)))
    assert target.parent == root and target.name.startswith("pkg_")
    target.mkdir(parents=True)
    (target / "m.a-3.py311.1.nbc").write_bytes(b"its own, without its index")
    assert _caches.seed_numba_cache(str(pkg / "__pycache__"), str(root), str(pkg)) == 3
    assert {p.name: p.read_bytes() for p in target.iterdir()} == {
        "m.a-3.py311.1.nbc": b"its own, without its index",
        "m.b-9.py311.nbi": b"index b", "m.b-9.py311.1.nbc": b"b1", "m.b-9.py311.2.nbc": b"b2"}
    assert _caches.seed_numba_cache(str(pkg / "__pycache__"), str(root), str(pkg)) == 0
    assert _caches.seed_numba_cache(str(tmp_path / "missing"), str(root), str(pkg)) == 0
    # ensure_numba_cache_dir seeds numba's user-wide cache where __pycache__ cannot be written
    in_tree = str(pkg / "__pycache__")
    writable = _caches._can_write
    monkeypatch.setattr(_caches, "_can_write", lambda p: p != in_tree and writable(p))
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _caches.ensure_numba_cache_dir(str(pkg)) is None
    user = pathlib.Path(_caches.numba_cache_subdir(str(tmp_path / "xdg" / "numba"), str(pkg)))
    assert sorted(p.name for p in user.iterdir()) == ["m.a-3.py311.1.nbc", "m.a-3.py311.nbi", "m.b-9.py311.1.nbc",
                                                      "m.b-9.py311.2.nbc", "m.b-9.py311.nbi"]


@pytest.mark.parametrize("links", [True, False], ids=["hard-links", "no-hard-links"])
def test_the_seed_leaves_a_kernel_that_numba_writes_meanwhile_to_numba(tmp_path, monkeypatch, links):
    """A kernel's file that numba (another process) writes into the cache after the seed has
    listed it is neither replaced nor joined by our index: that kernel's copy stops there, the
    other kernels are copied, and no temporary file is left.  Where the file system has no hard
    links, the copy is renamed into place, with the same rule."""
    pkg = tmp_path / "pkg"
    (pkg / "__pycache__").mkdir(parents=True)
    for name, data in [("m.a-3.py311.nbi", b"index a"), ("m.a-3.py311.1.nbc", b"a1"), ("m.a-3.py311.2.nbc", b"a2"),
                       ("m.b-9.py311.nbi", b"index b"), ("m.b-9.py311.1.nbc", b"b1")]:
        (pkg / "__pycache__" / name).write_bytes(data)
    root = tmp_path / "cache"
    target = pathlib.Path(_caches.numba_cache_subdir(str(root), str(pkg)))
    target.mkdir(parents=True)
    (target / "m.a-3.py311.2.nbc").write_bytes(b"numba's own")   # written after the listing below
    listdir = os.listdir
    monkeypatch.setattr(os, "listdir", lambda p: [] if os.path.samefile(p, target) else listdir(p))
    if not links:
        def no_link(src, dst):
            raise PermissionError(1, "Operation not permitted")

        monkeypatch.setattr(os, "link", no_link)
    assert _caches.seed_numba_cache(str(pkg / "__pycache__"), str(root), str(pkg)) == 3
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in target.iterdir()} == {
        "m.a-3.py311.1.nbc": b"a1", "m.a-3.py311.2.nbc": b"numba's own",
        "m.b-9.py311.nbi": b"index b", "m.b-9.py311.1.nbc": b"b1"}
