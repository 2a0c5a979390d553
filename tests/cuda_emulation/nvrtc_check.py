"""Compile the kernels with NVRTC (CUDA's runtime compiler, what CuPy uses) to PTX, no GPU needed.

The g++ emulation proves the kernels' logic; this proves that NVRTC accepts the same source
and exports every entry point.  libnvrtc comes from the ``nvidia-cuda-nvrtc-cu12`` wheel (a
``pip install --target DIR`` copy works: point ``GPUMESH_NVRTC`` at ``DIR`` or at the library)
or from a CUDA toolkit on the library path.

Usage: ``python nvrtc_check.py [ARCH]`` prints the entry points found in the PTX.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import importlib
import os
import pathlib
import re
import sys
from typing import Optional, Sequence


def find_nvrtc() -> Optional[str]:
    """Path (or soname) of libnvrtc, or None."""
    hint = os.environ.get("GPUMESH_NVRTC")
    roots = []
    if hint:
        if os.path.isfile(hint):
            return hint
        roots.append(hint)
    # the pip wheels: nvidia-cuda-nvrtc-cu12 (nvidia/cuda_nvrtc/lib), and CUDA 13's
    # nvidia-cuda-nvrtc (nvidia/cu13/lib, the device image's)
    for name in ("nvidia.cuda_nvrtc", "nvidia.cu13", "nvidia.cu12"):
        try:
            roots += list(importlib.import_module(name).__path__)
        except ImportError:
            pass
    for r in roots:
        hits = sorted(glob.glob(os.path.join(r, "**", "libnvrtc.so*"), recursive=True))
        hits = [h for h in hits if "builtins" not in h and ".alt." not in h]
        if hits:
            return hits[0]
    return ctypes.util.find_library("nvrtc")


def compile_ptx(source: str, options: Sequence[str] = (), lib: Optional[str] = None) -> tuple[str, str]:
    """PTX of ``source`` and NVRTC's log (warnings); RuntimeError with the log on failure."""
    path = lib or find_nvrtc()
    if path is None:
        raise FileNotFoundError("libnvrtc not found")
    nv = ctypes.CDLL(path)
    prog = ctypes.c_void_p()

    def check(rc, what):
        if rc != 0:
            nv.nvrtcGetErrorString.restype = ctypes.c_char_p
            raise RuntimeError(f"{what}: {nv.nvrtcGetErrorString(rc).decode()}")

    check(nv.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"gpumesh.cu", 0, None, None),
          "nvrtcCreateProgram")
    try:
        opts = (ctypes.c_char_p * max(1, len(options)))(*[o.encode() for o in options])
        rc = nv.nvrtcCompileProgram(prog, len(options), opts)
        size = ctypes.c_size_t()
        nv.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        nv.nvrtcGetProgramLog(prog, log)
        if rc != 0:
            raise RuntimeError(f"NVRTC failed:\n{log.value.decode(errors='replace')}")
        nv.nvrtcGetPTXSize(prog, ctypes.byref(size))
        ptx = ctypes.create_string_buffer(size.value)
        check(nv.nvrtcGetPTX(prog, ptx), "nvrtcGetPTX")
        return ptx.value.decode(), log.value.decode(errors="replace")
    finally:
        nv.nvrtcDestroyProgram(ctypes.byref(prog))


def entry_points(ptx: str) -> list[str]:
    """Names of the ``.entry`` (kernel) functions in a PTX module."""
    return re.findall(r"\.entry\s+(\w+)\s*\(", ptx)


if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
    from gpumesh import gpu

    arch = sys.argv[1] if len(sys.argv) > 1 else "compute_80"
    ptx, log = compile_ptx(gpu.kernel_source(), [f"--gpu-architecture={arch}"])
    print(log, end="")
    names = entry_points(ptx)
    print("\n".join(names))
    missing = set(gpu.KERNEL_NAMES) - set(names)
    sys.exit(f"missing entry points: {sorted(missing)}" if missing else 0)
