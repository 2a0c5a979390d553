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
kernels are then compiled on each such container's first run, as on any fresh install.
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
    """Give numba a writable cache directory if it would find none.

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
    if os.environ.get(NUMBA_ENV):
        return None
    here = package_dir or os.path.dirname(os.path.abspath(__file__))
    if _can_write(os.path.join(here, "__pycache__")):
        return None
    user = numba_user_cache()
    if user is not None and _can_write(user):
        return None
    path = _use_private_tmp(NUMBA_ENV, "numba")
    config = sys.modules.get("numba.core.config")
    if path is not None and config is not None:  # numba has read its configuration already
        config.CACHE_DIR = path
    return path


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
