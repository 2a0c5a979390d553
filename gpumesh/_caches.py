"""Writable homes for the compiled-kernel caches of numba and CuPy.

gpumesh's CPU kernels are ``numba.njit(cache=True)`` functions, and its CUDA kernels are
compiled by CuPy, which also caches what it compiles.  Both look for their cache directory in
places that a batch or cloud job often cannot write: a container run as another user than the
one who installed the package, with a read-only root file system or a ``HOME`` it cannot write
(Kubernetes' ``readOnlyRootFilesystem``, OpenShift's arbitrary user IDs, ``HOME=/nonexistent``).

* numba picks its directory when a kernel is *defined*, i.e. when its module is imported:
  ``NUMBA_CACHE_DIR`` if set, else ``__pycache__`` beside the source, else its user-wide cache
  (``~/.cache/numba`` on Linux).  Where none can be written, defining the kernel raises
  ``RuntimeError: cannot cache function ...: no locator available``, so ``import
  gpumesh.marching``, and with it every ``gpumesh mesh``, failed outright.
  :func:`ensure_numba_cache_dir` runs when the package is imported (``gpumesh/__init__.py``),
  before any kernel module, in the main process and in every worker.
* CuPy writes each compiled module to ``CUPY_CACHE_DIR``, by default
  ``~/.cupy/kernel_cache``, and raises when it cannot make that directory: the GPU backend
  could not be built, so ``--device auto`` fell back to the CPU and ``--device gpu`` failed.
  :func:`ensure_cupy_cache_dir` runs in :class:`gpumesh.gpu.CupyRuntime` before it compiles.

Each does what the library would do and stops at the first directory it can write (the one
named by the library's variable is always left alone).  Only when none can be written does it
set the variable to a directory of this user's own in the temporary directory
(``gpumesh-numba-<uid>``, ``gpumesh-cupy-<uid>``), created mode 0700 and used only when this
user owns it and no one else may write it, since both caches hold code that gets loaded.  The
kernels are then compiled on each such container's first run, as on any fresh install, unless
the image holds them: where numba will look in another directory than the package's
``__pycache__`` (``NUMBA_CACHE_DIR``, its user-wide cache, or the temporary one), the kernels
that ``gpumesh warmup`` compiled into ``__pycache__`` when the image was built are copied
there first (:func:`seed_numba_cache`), as numba reads a cache only where it may also write.
"""

from __future__ import annotations

import os
import stat
import sys
import tempfile
from typing import Optional

NUMBA_ENV = "NUMBA_CACHE_DIR"
CUPY_ENV = "CUPY_CACHE_DIR"


def _can_write(path: str) -> bool:
    """Whether a file can be created in directory ``path`` (made if missing): the libraries'
    own test."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
        return True
    except OSError:
        return False


def _home(path: str) -> Optional[str]:
    """``path`` with ``~`` expanded, or None where there is no home directory to expand."""
    path = os.path.expanduser(path)
    return None if path.startswith("~") else path


def numba_user_cache() -> Optional[str]:
    """numba's user-wide cache directory on this platform (its ``appdirs`` rule), or None."""
    if sys.platform.startswith("linux"):
        base = os.environ.get("XDG_CACHE_HOME") or _home("~/.cache")
    elif sys.platform == "darwin":
        base = _home("~/Library/Caches")
    else:  # Windows and others: leave the choice to numba
        return None
    return None if base is None else os.path.join(base, "numba")


def _private_dir(path: str) -> bool:
    """Whether ``path`` is (or now is) a directory that this user owns and only it may write."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISDIR(st.st_mode) or st.st_mode & 0o022:
        return False
    return not hasattr(os, "getuid") or st.st_uid == os.getuid()


def _use_private_tmp(env: str, name: str) -> Optional[str]:
    """Set ``env`` to this user's ``<tmp>/gpumesh-<name>-<uid>`` (a fresh directory when that
    one is someone else's); the path, or None when no temporary directory can be written."""
    uid = os.getuid() if hasattr(os, "getuid") else os.getpid()
    try:
        path = os.path.join(tempfile.gettempdir(), f"gpumesh-{name}-{uid}")
        if not (_private_dir(path) and _can_write(path)):
            path = tempfile.mkdtemp(prefix=f"gpumesh-{name}-")
    except OSError:
        return None
    os.environ[env] = path
    return path


def ensure_numba_cache_dir(package_dir: Optional[str] = None) -> Optional[str]:
    """Give numba a writable cache directory if it would find none, and the kernels compiled
    into the package's ``__pycache__`` (``gpumesh warmup`` in a container image) where numba
    will look elsewhere (:func:`seed_numba_cache`).

    Parameters
    ----------
    package_dir : str, optional
        Directory of the kernels' source files (default: this package's).

    Returns
    -------
    str or None
        The directory now in ``NUMBA_CACHE_DIR`` when this call set it; None when numba's own
        choice stands (the variable was set, or ``__pycache__`` or numba's user-wide cache can
        be written) or when no directory at all can be written (numba then raises as before).
    """
    here = package_dir or os.path.dirname(os.path.abspath(__file__))
    in_tree = os.path.join(here, "__pycache__")
    given = os.environ.get(NUMBA_ENV)
    if given:
        if _can_write(given):
            seed_numba_cache(in_tree, given, here)
        return None
    if _can_write(in_tree):
        return None
    user = numba_user_cache()
    if user is not None and _can_write(user):
        seed_numba_cache(in_tree, user, here)
        return None
    path = _use_private_tmp(NUMBA_ENV, "numba")
    config = sys.modules.get("numba.core.config")
    if path is not None and config is not None:  # numba has read its configuration already
        config.CACHE_DIR = path
    if path is not None:
        seed_numba_cache(in_tree, path, here)
    return path


def numba_cache_subdir(cache_root: str, package_dir: str) -> str:
    """Where numba caches the kernels of the modules in ``package_dir`` when its cache directory
    is ``cache_root`` (``NUMBA_CACHE_DIR``, or its user-wide cache): a subdirectory named after
    the package directory's path (numba's ``get_suitable_cache_subpath``)."""
    from numba.core.caching import _CacheLocator

    return os.path.join(cache_root, _CacheLocator.get_suitable_cache_subpath(os.path.join(package_dir, "__init__.py")))


def seed_numba_cache(source: str, cache_root: str, package_dir: str) -> int:
    """Copy the compiled kernels that ``source`` holds into numba's cache ``cache_root``.

    A container image built with ``gpumesh warmup`` holds the kernels in the package's
    ``__pycache__``, which numba reads only while it can also write there: run as another user
    or on a read-only root file system, numba looks in another directory and compiled every
    kernel again in every new container.  So the kernels' files are copied from ``source`` (a
    directory laid out as ``__pycache__``: per kernel an index ``NAME.nbi`` and its data files
    ``NAME.<n>.nbc``) into the subdirectory of ``cache_root`` where numba will look for them
    (:func:`numba_cache_subdir`).  A kernel is copied whole or not at all: where ``cache_root``
    has any file of it (its own entries, or data a crash left without its index), none of ours
    is copied, since an index names its data files by number and would then point at another
    kernel's code.  Data files go first and the index last, each under a temporary name then
    linked into place, so that a process starting beside this one never reads an index whose
    data is not there, and a file of the kernel that numba writes there meanwhile stops the
    kernel's copy rather than being replaced by ours.  numba still checks every entry it loads
    (the source file's contents, the CPU it was compiled for) and compiles what does not match.

    Parameters
    ----------
    source : str
        The directory to copy from; nothing happens where it is missing or unreadable.
    cache_root : str
        numba's cache directory (``NUMBA_CACHE_DIR`` or its user-wide cache).
    package_dir : str
        The directory of the kernels' source files.

    Returns
    -------
    int
        How many files were copied (0 also where copying failed: numba then compiles).
    """
    try:
        names = [n for n in os.listdir(source) if n.endswith((".nbi", ".nbc"))]
    except OSError:
        return 0
    kernels = [n[:-len(".nbi")] for n in names if n.endswith(".nbi")]
    if not kernels:
        return 0
    copied = 0
    try:
        target = numba_cache_subdir(cache_root, package_dir)
        if os.path.realpath(target) == os.path.realpath(source):
            return 0
        os.makedirs(target, mode=0o700, exist_ok=True)
        there = os.listdir(target)
        for stem in kernels:
            if any(n == stem + ".nbi" or (n.startswith(stem + ".") and n.endswith(".nbc")) for n in there):
                continue
            data = sorted(n for n in names if n.startswith(stem + ".") and n.endswith(".nbc"))
            for name in data + [stem + ".nbi"]:
                if not _copy_file(os.path.join(source, name), target, name):
                    # numba wrote this kernel there since the listing: its files stay, ours stop (our
                    # data files linked before it have no index of ours, as after a crash; numba's own
                    # writes replace them)
                    break
                copied += 1
    except (OSError, ImportError):
        return copied
    return copied


def _copy_file(path: str, directory: str, name: str) -> bool:
    """Copy ``path`` to ``directory/name`` under a temporary name, then link it there, unless a
    file of that name is there by then.  Returns whether it was copied.  A hard link refuses to
    replace a file that numba (another process) has written meanwhile; where the file system
    has no hard links, the temporary file is renamed in place instead."""
    with open(path, "rb") as f:
        data = f.read()
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".seed-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        final = os.path.join(directory, name)
        try:
            os.link(tmp, final)
        except FileExistsError:
            return False
        except OSError:   # no hard links there (some FUSE and SMB mounts)
            if os.path.lexists(final):
                return False
            os.replace(tmp, final)
            return True
        return True
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def ensure_cupy_cache_dir() -> Optional[str]:
    """Give CuPy a writable kernel cache directory if its default cannot be written.

    Returns
    -------
    str or None
        The directory now in ``CUPY_CACHE_DIR`` when this call set it; None when CuPy's own
        choice stands (the variable was set, or ``~/.cupy/kernel_cache`` can be written) or
        when no directory at all can be written (CuPy then raises as before).
    """
    if os.environ.get(CUPY_ENV):
        return None
    default = _home("~/.cupy/kernel_cache")
    if default is not None and _can_write(default):
        return None
    return _use_private_tmp(CUPY_ENV, "cupy")
