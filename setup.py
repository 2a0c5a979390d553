"""Build the optional Draco encoder extension (``gpumesh._dracoenc``).

Everything else is in ``pyproject.toml``.  The extension is compiled against the Draco
library that DracoPy's wheel installs beside itself (``include/draco`` and ``lib*/libdraco.a``
under the environment's prefix; DracoPy is a build requirement).  It is optional: when no C++
compiler or no Draco library is found, the build goes on without it and
:func:`gpumesh.encode.encode_draco` uses ``DracoPy.encode``, which writes the same bytes, more
slowly.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

from setuptools import Extension, setup


def _draco_prefixes() -> list[str]:
    """Environment prefixes where DracoPy may have put Draco's headers and static library."""
    prefixes = []
    # locate DracoPy without importing it (its import needs NumPy, which the build lacks)
    spec = importlib.util.find_spec("DracoPy")
    if spec is not None and spec.origin:
        site = os.path.dirname(os.path.abspath(spec.origin))
        # <prefix>/lib/pythonX.Y/site-packages/DracoPy*.so -> <prefix>; a `pip install
        # --target DIR` puts the headers and library in DIR itself
        prefixes.append(os.path.dirname(os.path.dirname(os.path.dirname(site))))
        prefixes.append(site)
    prefixes += [sys.prefix, sys.base_prefix]
    return prefixes


def _find_draco():
    for prefix in _draco_prefixes():
        include = os.path.join(prefix, "include")
        libs = glob.glob(os.path.join(prefix, "lib*", "libdraco.a"))
        if os.path.isfile(os.path.join(include, "draco", "compression", "encode.h")) and libs:
            return include, libs[0]
    return None


#: draco::EncodeSymbols(const uint32_t *, int, int, const draco::Options *, draco::EncoderBuffer *)
_ENCODE_SYMBOLS = "_ZN5draco13EncodeSymbolsEPKjiiPKNS_7OptionsEPNS_13EncoderBufferE"
_WRAP = sys.platform.startswith("linux")

ext_modules = []
found = _find_draco()
if found is None:
    print("gpumesh: Draco headers/libdraco.a not found beside DracoPy; DracoPy.encode is used")
else:
    include, lib = found
    ext_modules.append(Extension(
        "gpumesh._dracoenc",
        sources=["gpumesh/_dracoenc.cpp"],
        include_dirs=[include],
        extra_objects=[lib],
        extra_compile_args=["-std=c++17", "-O2", "-g0"],  # -g0: no debug info (half the size)
        # Draco's calls of draco::EncodeSymbols go through the extension's linear-time path
        # (see _dracoenc.cpp); GNU ld, gold and lld know --wrap, Apple's linker does not
        define_macros=[("GPUMESH_WRAP_ENCODE_SYMBOLS", "1")] if _WRAP else [],
        extra_link_args=[f"-Wl,--wrap={_ENCODE_SYMBOLS}"] if _WRAP else [],
        language="c++",
        optional=True,  # a failed compile (no compiler, ...) is a warning, not a failed install
    ))

setup(ext_modules=ext_modules)
