"""A writable home for numba's kernel cache, chosen before any kernel is defined.

gpumesh's CPU kernels are ``numba.njit(cache=True)`` functions.  numba picks the cache's
directory when a function is *defined*, i.e. when its module is imported: ``NUMBA_CACHE_DIR``
if set, else ``__pycache__`` beside the source, else its user-wide cache (``~/.cache/numba``
on Linux).  Where none of these can be written, defining the function raises
``RuntimeError: cannot cache function ...: no locator available``, so ``import gpumesh.marching``
(and every ``gpumesh mesh``) failed outright.  That is the usual case of a batch or cloud job
in a container that runs as a user other than the one who installed the package, with a
read-only root file system or a ``HOME`` it cannot write (Kubernetes' ``readOnlyRootFilesystem``,
OpenShift's arbitrary user IDs, ``HOME=/nonexistent``).

:func:`ensure_cache_dir` runs when the package is imported (``gpumesh/__init__.py``), before
any of its kernel modules, in the main process and in every worker.  It does what numba would
do and stops at the first directory it can write: ``NUMBA_CACHE_DIR`` when set (left alone),
the package's ``__pycache__``, numba's user-wide cache.  Only when neither can be written does
it set ``NUMBA_CACHE_DIR`` to a directory of this user's own in the temporary directory
(``gpumesh-numba-<uid>``, created mode 0700 and used only when this user owns it and no one
else may write it: the cache holds pickles that numba loads).  The kernels are then compiled
on the first run of each such container, as on any fresh install; nothing else changes.
"""

from __future__ import annotations

import os
import sys
import tempfile
from typing import Optional

ENV = "NUMBA_CACHE_DIR"


def _can_write(path: str) -> bool:
    """Whether a file can be created in directory ``path`` (made if missing): numba's test."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
        return True
    except OSError:
        return False


def numba_user_cache() -> Optional[str]:
    """numba's user-wide cache directory on this platform (its ``appdirs`` rule), or None."""
    if sys.platform.startswith("linux"):
        base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    elif sys.platform == "darwin":
        base = os.path.expanduser("~/Library/Caches")
    else:  # Windows and others: leave the choice to numba
        return None
    if base.startswith("~"):  # no home directory to expand
        return None
    return os.path.join(base, "numba")


def _private_dir(path: str) -> bool:
    """Whether ``path`` is a directory that this user owns and only this user may write."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError:
        return False
    import stat

    if not stat.S_ISDIR(st.st_mode) or st.st_mode & 0o022:
        return False
    return not hasattr(os, "getuid") or st.st_uid == os.getuid()


def ensure_cache_dir(package_dir: Optional[str] = None) -> Optional[str]:
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
        be written) or when no directory at all could be written (numba then raises as before).
    """
    if os.environ.get(ENV):
        return None
    here = package_dir or os.path.dirname(os.path.abspath(__file__))
    if _can_write(os.path.join(here, "__pycache__")):
        return None
    user = numba_user_cache()
    if user is not None and _can_write(user):
        return None
    uid = os.getuid() if hasattr(os, "getuid") else os.getpid()
    try:
        path = os.path.join(tempfile.gettempdir(), f"gpumesh-numba-{uid}")
    except OSError:  # no usable temporary directory either
        return None
    if not (_private_dir(path) and _can_write(path)):
        try:
            path = tempfile.mkdtemp(prefix="gpumesh-numba-")  # someone else's: a fresh one
        except OSError:
            return None
    os.environ[ENV] = path
    config = sys.modules.get("numba.core.config")
    if config is not None:  # numba already read its configuration: tell it too
        config.CACHE_DIR = path
    return path
