"""Run the CUDA kernels of ``kernels/*.cu`` on the CPU, to test them without a GPU.

How it works
------------
* ``cuda_shim.h`` defines the few CUDA keywords the kernels use (``__global__``,
  ``__device__``, ``__forceinline__``, ``threadIdx``/``blockIdx``/``blockDim``/``gridDim`` as
  thread-local globals, ``atomicAdd``), so the unmodified ``.cu`` files compile with g++.
* :func:`build` writes a translation unit that includes the shim and the ``.cu`` files and
  wraps every entry point with ``EMU_KERNEL`` (a thunk taking CUDA's ``void** args`` and a
  signature listing its parameter types).  It is compiled with ``-nostdinc -nostdinc++``
  (like NVRTC, a kernel can use no host library), ``-Wall -Wextra -Werror`` and, when
  available, UBSan (out-of-range indexing of local arrays, overflow, bad shifts).
  ``emu_driver.cpp`` holds the grid loop.  Both go into one shared library loaded by ctypes.
* :class:`EmulatedRuntime` is a drop-in for :class:`gpumesh.gpu.CupyRuntime`: "device" arrays
  are :class:`DeviceArray` (a NumPy subclass, so a host array passed to a kernel by mistake is
  caught), new device arrays are filled with a garbage byte pattern (a kernel that leaves an
  output element unwritten is caught), and :meth:`EmulatedRuntime.launch` checks every
  argument against the kernel's C signature (pointer element type = array dtype; scalar
  type = NumPy scalar type, Python ints taken as int64 as CuPy does), runs each array through
  a guarded copy with canary bytes on both sides (an out-of-bounds write is caught), runs the
  grid with each emulated thread seeing only its own indices, in launch order or in a
  seeded random permutation (a result that depends on thread order is caught), and then
  checks the canaries, that ``const`` inputs are unchanged, and that UBSan reported nothing.
* Device memory: the runtime counts the bytes of the device arrays it made that are still
  alive, each rounded up to a multiple of 512 as CuPy's pool rounds its blocks, against an
  optional ``capacity`` and the pool limit the backend sets, and raises
  :class:`EmulatedOutOfMemory` past either (as CuPy raises ``OutOfMemoryError``).  Not
  modelled, so a device may run out where the emulation does not: the freed blocks that
  CuPy's pool keeps (its limit counts them until ``free_all_blocks``; a request that no
  cached block fits then fails), blocks split from larger ones, thrust's sort workspace, and
  arrays made by operators on device arrays (not counted here at all).
* ``EmulatedRuntime.xp`` stands for CuPy's array module (the device weld's sorts and
  gathers): NumPy, refusing host arrays, with results made device arrays; an
  out-of-memory error can be injected into the next call of any of its functions.
"""

from __future__ import annotations

import ctypes
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import weakref
from typing import Iterable, Optional, Sequence

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
SHIM = HERE / "cuda_shim.h"
DRIVER = HERE / "emu_driver.cpp"
SELFTEST = HERE / "selftest.cu"
SELFTEST_KERNELS = ("st_double", "st_oob", "st_race", "st_atomic", "st_ub")

_TYPES = {"i8": np.int8, "u8": np.uint8, "i16": np.int16, "u16": np.uint16, "i32": np.int32,
          "u32": np.uint32, "i64": np.int64, "u64": np.uint64, "f32": np.float32,
          "f64": np.float64}
GUARD = 256          # canary bytes on each side of every array argument
CANARY = 0xA5
GARBAGE = 0xCD       # fill of new "device" arrays
#: CuPy's memory pool hands out blocks in multiples of this many bytes, and its limit
#: (``MemoryPool.set_limit``) counts the rounded sizes (``_round_size`` in
#: ``cupy/cuda/memory.pyx``); an empty array takes no block
ALLOCATION_UNIT = 512


class _DeviceNumpy:
    """The array module of emulated device arrays: NumPy, with results made device arrays."""

    def __init__(self, rt: "EmulatedRuntime"):
        self._rt = rt

    def __getattr__(self, name):
        f = getattr(np, name)
        if not callable(f) or isinstance(f, type):
            return f

        def call(*args, **kwargs):
            for a in list(args) + list(kwargs.values()):
                if isinstance(a, np.ndarray) and not isinstance(a, DeviceArray):
                    raise EmulationError(f"xp.{name} given a host array")
            if name in self._rt.oom_in:  # an injected out-of-memory error
                self._rt.oom_in.discard(name)
                self._rt.oom_raised += 1
                raise EmulatedOutOfMemory(f"xp.{name}: injected")
            if name == "empty":  # garbage-filled, as the runtime's new arrays are
                return self._rt.empty(*args, **kwargs)
            out = f(*args, **kwargs)
            how = self._rt.corrupt_in.pop(name, None)
            if how is not None:   # a wrong result and no error, as CuPy <= 13.6's thrust sorts give
                self._rt.corrupted += 1   # when their workspace allocation fails (cupy/cupy#9894)
                bad = np.ascontiguousarray(out[::-1])
                if how == "garbage":   # every byte 0xCD, as an unwritten buffer
                    bad.view(np.uint8)[...] = GARBAGE
                elif how == "unstable":   # (argsort) still sorted, but each run of ties reversed
                    keys = np.asarray(args[0])[out]
                    bad = np.array(out, copy=True)
                    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
                    for a, b in zip(starts, np.r_[starts[1:], len(keys)]):
                        bad[a:b] = out[a:b][::-1]
                out = bad
            if isinstance(out, np.ndarray) and not isinstance(out, DeviceArray):
                return self._rt._alloc(out)
            return out

        return call


class EmulationError(AssertionError):
    """A kernel did something that would be a bug on a GPU (or the launch is malformed)."""


class DeviceArray(np.ndarray):
    """A NumPy array standing for device memory in the emulation."""


class EmulatedOutOfMemory(MemoryError):
    """An emulated allocation did not fit the device's capacity or the pool's limit."""


def compiler() -> Optional[str]:
    return shutil.which(os.environ.get("CXX", "g++"))


def _run(cmd: Sequence[str]) -> None:
    res = subprocess.run(list(cmd), capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stdout}\n{res.stderr}")


class EmulatedLibrary:
    """The compiled emulation: kernel thunks, their signatures and the grid loop."""

    def __init__(self, path: pathlib.Path, names: Iterable[str], ubsan: bool):
        self.path = path
        self.ubsan = ubsan
        self.lib = ctypes.CDLL(str(path))
        self.lib.emu_launch.restype = ctypes.c_int
        self.lib.emu_launch.argtypes = [ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint,
                                        ctypes.c_ulonglong, ctypes.POINTER(ctypes.c_void_p)]
        self.thunks = {}
        self.signatures = {}
        for name in names:
            thunk = getattr(self.lib, f"emu_thunk_{name}")
            sig = getattr(self.lib, f"emu_sig_{name}")
            sig.restype = ctypes.c_int
            sig.argtypes = [ctypes.POINTER(ctypes.c_char_p), ctypes.c_int]
            buf = (ctypes.c_char_p * 64)()
            n = sig(buf, 64)
            self.signatures[name] = tuple(buf[i].decode() for i in range(n))
            self.thunks[name] = ctypes.cast(thunk, ctypes.c_void_p).value

    def launch(self, name: str, grid: int, block: int, seed: int, argv) -> tuple[int, str]:
        """Run the grid; return the driver's status and what the kernels wrote to stderr.

        UBSan reports go to file descriptor 2 (its options cannot be changed after the process
        started), so fd 2 is redirected to a temporary file around the call.
        """
        sys.stderr.flush()
        saved = os.dup(2)
        with tempfile.TemporaryFile() as tmp:
            os.dup2(tmp.fileno(), 2)
            try:
                rc = self.lib.emu_launch(self.thunks[name], grid, block, seed, argv)
            finally:
                os.dup2(saved, 2)
                os.close(saved)
            tmp.seek(0)
            err = tmp.read().decode(errors="replace")
        return rc, err


def load(path: pathlib.Path, names: Sequence[str], ubsan: bool) -> EmulatedLibrary:
    """A library that :func:`build` made (e.g. in another process), with the same ``names``."""
    return EmulatedLibrary(pathlib.Path(path), list(names) + list(SELFTEST_KERNELS), ubsan)


def build(workdir: pathlib.Path, kernel_files: Sequence[pathlib.Path], names: Sequence[str],
          ubsan: bool = True) -> EmulatedLibrary:
    """Compile the kernels (plus the emulator's self-test kernels) into a shared library.

    Parameters
    ----------
    workdir : Path
        Empty scratch directory.
    kernel_files : sequence of Path
        ``.cu`` files, included in this order.
    names : sequence of str
        Entry points to expose (``extern "C"`` kernels defined in ``kernel_files``).
    ubsan : bool
        Instrument the kernels with UBSan when the compiler supports it.
    """
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler")
    workdir = pathlib.Path(workdir)
    tu = workdir / "kernels_tu.cpp"
    lines = [f'#include "{SHIM}"']
    lines += [f'#include "{pathlib.Path(f).resolve()}"' for f in list(kernel_files) + [SELFTEST]]
    lines += [f"EMU_KERNEL({n})" for n in list(names) + list(SELFTEST_KERNELS)]
    tu.write_text("\n".join(lines) + "\n")
    common = ["-std=c++17", "-O2", "-fPIC", "-g"]
    kflags = common + ["-nostdinc", "-nostdinc++", "-Wall", "-Wextra", "-Werror", "-I", str(HERE)]
    san = []
    if ubsan:
        probe = workdir / "probe.cpp"
        probe.write_text("int f(int a) { return a + 1; }\n")
        try:
            _run([cxx, *common, "-fsanitize=undefined", "-shared", str(probe),
                  "-o", str(workdir / "probe.so")])
            san = ["-fsanitize=undefined"]
        except RuntimeError:
            san = []
    _run([cxx, *kflags, *san, "-c", str(tu), "-o", str(workdir / "kernels.o")])
    _run([cxx, *common, "-I", str(HERE), "-c", str(DRIVER), "-o", str(workdir / "driver.o")])
    lib = workdir / "libcuda_emu.so"
    _run([cxx, *common, *san, "-shared", str(workdir / "kernels.o"), str(workdir / "driver.o"),
          "-o", str(lib)])
    return load(lib, names, bool(san))


class EmulatedRuntime:
    """Drop-in for :class:`gpumesh.gpu.CupyRuntime` that runs kernels through the emulation.

    Parameters
    ----------
    lib : EmulatedLibrary
    seed : int
        0: threads run in launch order; otherwise a random permutation seeded by ``seed``.
    capacity : int, optional
        Bytes of the emulated device (default: unbounded).  Like the pool's limit
        (:meth:`set_limit`), it is checked against the bytes of the device arrays alive at
        each allocation (each rounded up to :data:`ALLOCATION_UNIT`, as CuPy's pool blocks);
        past either, the allocation raises :class:`EmulatedOutOfMemory`.
    """

    oom_errors = (EmulatedOutOfMemory,)

    def __init__(self, lib: EmulatedLibrary, seed: int = 0, capacity: Optional[int] = None):
        self.lib = lib
        self.seed = int(seed)
        self.launches: list[tuple[str, int, int]] = []
        self.capacity = capacity
        self.limit: Optional[int] = None
        #: the limit before set_limit, until restore_limit puts it back
        self.limit_before: Optional[int] = None
        self.limit_set = False
        self.live = 0        # bytes of the device arrays alive now (their pool blocks)
        self.peak = 0        # the most ever alive
        self.oom_raised = 0
        #: names of xp functions whose next call raises EmulatedOutOfMemory (the bytes of
        #: arrays made by operators on device arrays are not counted, so a weld's own
        #: allocations cannot reach the capacity)
        self.oom_in: set[str] = set()
        #: xp function name -> "reverse", "garbage" or (argsort) "unstable": its next result is
        #: corrupted that way, with no error (counted in ``corrupted``)
        self.corrupt_in: dict[str, str] = {}
        self.corrupted = 0

    # --- memory -------------------------------------------------------------------------
    def _alloc(self, a: np.ndarray) -> DeviceArray:
        n = -(-int(a.nbytes) // ALLOCATION_UNIT) * ALLOCATION_UNIT   # the pool block's bytes
        for cap in (self.capacity, self.limit):
            if cap is not None and self.live + n > cap:
                self.oom_raised += 1
                raise EmulatedOutOfMemory(f"{n} bytes requested, {self.live} of {cap} in use")
        d = a.view(DeviceArray)
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(d, self._free, n)
        return d

    def _free(self, n: int) -> None:
        self.live -= n

    @property
    def xp(self):
        """NumPy standing for CuPy: its array results are device arrays (counted in ``live``)."""
        return _DeviceNumpy(self)

    def mem_info(self) -> tuple[int, int]:
        total = self.capacity if self.capacity is not None else 1 << 40
        return total - self.live, total

    def set_limit(self, nbytes: int) -> None:
        if not self.limit_set:
            self.limit_before, self.limit_set = self.limit, True
        self.limit = int(nbytes)

    def restore_limit(self) -> None:
        if self.limit_set:
            self.limit, self.limit_set = self.limit_before, False

    def release(self) -> None:
        pass  # freed arrays are given back at once here

    def synchronize(self) -> None:
        pass  # copies and kernels run when they are called here: nothing is queued

    def pool_bytes(self) -> int:
        return self.peak

    def to_device(self, a: np.ndarray) -> DeviceArray:
        if isinstance(a, DeviceArray):
            raise EmulationError("to_device of an array that is already on the device")
        return self._alloc(np.array(a, order="C", copy=True))

    def to_host(self, a: DeviceArray) -> np.ndarray:
        if not isinstance(a, DeviceArray):
            raise EmulationError("to_host of a host array")
        return np.array(a.view(np.ndarray), copy=True)

    def to_host_many(self, arrays: Sequence[DeviceArray]) -> list[np.ndarray]:
        return [self.to_host(a) for a in arrays]

    def empty(self, shape, dtype) -> DeviceArray:
        a = np.empty(shape, dtype=dtype)
        a.view(np.uint8)[...] = GARBAGE if a.size else 0
        return self._alloc(a)

    def cumsum(self, a: DeviceArray) -> DeviceArray:
        if not isinstance(a, DeviceArray):
            raise EmulationError("cumsum of a host array")
        return self._alloc(np.cumsum(a.view(np.ndarray), dtype=np.int64))

    # --- launch -------------------------------------------------------------------------
    def launch(self, name: str, grid: int, block: int, args: Sequence) -> None:
        if name not in self.lib.signatures:
            raise EmulationError(f"unknown kernel {name}")
        sig = self.lib.signatures[name]
        if len(args) != len(sig):
            raise EmulationError(f"{name}: {len(args)} arguments for {len(sig)} parameters {sig}")
        if not (isinstance(grid, int) and isinstance(block, int)):
            raise EmulationError(f"{name}: grid and block must be ints")
        if not (1 <= grid <= 2**31 - 1 and 1 <= block <= 1024):
            raise EmulationError(f"{name}: invalid launch configuration grid={grid} block={block}")
        keep = []          # ctypes objects that must outlive the call
        argv = (ctypes.c_void_p * max(1, len(args)))()
        arrays = []        # (argument index, user array, guarded raw buffer, nbytes, is_const)
        for i, (a, t) in enumerate(zip(args, sig)):
            if t.endswith("*"):
                is_const = t.startswith("const ")
                want = np.dtype(_TYPES[t[6:-1] if is_const else t[:-1]])
                if not isinstance(a, DeviceArray):
                    raise EmulationError(f"{name}: argument {i} ({t}) is {type(a).__name__}, "
                                         "not a device array")
                if a.dtype != want:
                    raise EmulationError(f"{name}: argument {i} ({t}) has dtype {a.dtype}")
                if not a.flags.c_contiguous:
                    raise EmulationError(f"{name}: argument {i} is not C-contiguous")
                nbytes = a.nbytes
                raw = np.full(nbytes + 2 * GUARD, CANARY, dtype=np.uint8)
                raw[GUARD:GUARD + nbytes] = a.view(np.ndarray).reshape(-1).view(np.uint8)
                ptr = ctypes.c_void_p(raw.ctypes.data + GUARD)
                keep.append(ptr)
                argv[i] = ctypes.cast(ctypes.pointer(ptr), ctypes.c_void_p)
                arrays.append((i, a, raw, nbytes, is_const))
            else:
                want = np.dtype(_TYPES[t])
                if isinstance(a, (bool, np.bool_)):
                    raise EmulationError(f"{name}: argument {i} ({t}) is a bool")
                if isinstance(a, int):
                    a = np.int64(a)   # what CuPy does with a Python int
                if not isinstance(a, np.generic) or a.dtype != want:
                    raise EmulationError(f"{name}: argument {i} ({t}) is {type(a).__name__} "
                                         f"{getattr(a, 'dtype', '')}")
                buf = ctypes.create_string_buffer(a.tobytes(), a.itemsize)
                keep.append(buf)
                argv[i] = ctypes.cast(buf, ctypes.c_void_p)
        rc, err = self.lib.launch(name, grid, block, self.seed, argv)
        if err.strip():
            raise EmulationError(f"{name}: undefined behaviour (UBSan):\n{err[:4000]}")
        if rc != 0:
            raise EmulationError(f"{name}: launch failed ({rc})")
        self.launches.append((name, grid, block))
        for i, a, raw, nbytes, is_const in arrays:
            if (raw[:GUARD] != CANARY).any() or (raw[GUARD + nbytes:] != CANARY).any():
                raise EmulationError(f"{name}: out-of-bounds write around argument {i}")
            inner = raw[GUARD:GUARD + nbytes]
            flat = a.view(np.ndarray).reshape(-1).view(np.uint8)
            if is_const:
                if not np.array_equal(inner, flat):
                    raise EmulationError(f"{name}: const argument {i} was modified")
            else:
                flat[...] = inner
