"""Load a `.pte` and run its methods on numpy arrays, without torch.

ExecuTorch's Python bindings cannot do that in 1.5.1: `executorch.runtime` and
`executorch.extension.pybindings.portable_lib` import torch, the compiled `_C` extension links
libtorch / libtorch_python, accepts only `torch.Tensor` inputs (numpy raises "Unsupported python
type") and returns `torch.Tensor` outputs; only constant methods (ints) work without torch.
The wheel's native runtime libraries (`executorch/lib/libexecutorch*.so`) do not depend on
libtorch, and the wheel ships headers to build against them. So the default backend, `native`,
compiles `executorch_shim.cpp` (a ~150-line C ABI over ExecuTorch's C++ `Module`) once with the
system C++ compiler, caches the library under `$TINYALIGN_CACHE/native` (default
`~/.cache/tinyalign/native`) and calls it through ctypes with numpy buffers. The `pybindings`
backend (needs torch) is the fallback where no compiler is available.

A `Program` holds one loaded program: each method keeps its own planned memory, so the KV
cache of `text_decoder` persists between calls, as docs/bundle.md requires.
"""

from __future__ import annotations

import abc

import ctypes
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from .errors import ProgramError

__all__ = ["Program", "open_program", "BACKENDS", "native_library"]

BACKENDS = ("auto", "native", "pybindings")
SHIM = Path(__file__).with_name("executorch_shim.cpp")
# ExecuTorch ScalarType codes (runtime/core/portable_type/scalar_type.h) <-> numpy
_ET_DTYPES = {0: np.uint8, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.int64, 5: np.float16, 6: np.float32,
              7: np.float64, 11: np.bool_}
_NP_TO_ET = {np.dtype(v): k for k, v in _ET_DTYPES.items()}
_build_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL] = {}


class NativeUnavailable(ProgramError):
    """The native backend cannot be built or loaded here (no compiler, no ExecuTorch wheel...)."""


# ---- building the native shim -------------------------------------------------------------------
def _executorch_root() -> Path:
    spec = importlib.util.find_spec("executorch")  # a namespace package: finding it imports nothing
    if spec is None or not spec.submodule_search_locations:
        raise NativeUnavailable("the executorch package is not installed (pip install executorch==1.5.1)")
    for loc in spec.submodule_search_locations:
        root = Path(loc)
        if (root / "lib" / "libexecutorch.so").is_file() or (root / "lib" / "libexecutorch.dylib").is_file():
            return root
    raise NativeUnavailable("this executorch wheel ships no native runtime library (executorch/lib/libexecutorch.*)")


def _cache_dir() -> Path:
    return Path(os.environ.get("TINYALIGN_CACHE", Path.home() / ".cache" / "tinyalign")) / "native"


def _compile_command(cxx: str, root: Path, out: Path) -> list[str]:
    lib = root / "lib"
    libs = ["executorch", "executorch_kernels_optimized", "executorch_kernels_quantized", "executorch_backend_xnnpack",
            "executorch_threadpool"]
    libs = [n for n in libs if any((lib / f"lib{n}{ext}").is_file() for ext in (".so", ".dylib"))]
    cmd = [cxx, "-std=c++17", "-O2", "-fPIC", "-shared", "-w", "-DC10_USING_CUSTOM_GENERATED_MACROS",
           "-DET_EVENT_TRACER_ENABLED", f"-I{root / 'include'}",
           f"-I{root / 'include' / 'executorch' / 'runtime' / 'core' / 'portable_type' / 'c10'}",
           str(SHIM), "-o", str(out), f"-L{lib}"]
    if sys.platform.startswith("linux"):  # keep every library: their static initializers register kernels
        cmd += ["-Wl,--no-as-needed", *[f"-l{n}" for n in libs], "-Wl,--as-needed"]
    else:
        cmd += [f"-l{n}" for n in libs]
    return cmd + [f"-Wl,-rpath,{lib}"]


def native_library(build: bool = True) -> Path:
    """Path of the compiled shim for this ExecuTorch install (built on first use when `build`)."""
    if sys.platform == "win32":
        raise NativeUnavailable("the native backend is not available on Windows; use backend='pybindings'")
    root = _executorch_root()
    version = (root / "version.py").read_text(errors="replace") if (root / "version.py").is_file() else ""
    key = hashlib.sha256(SHIM.read_bytes() + str(root).encode() + version.encode()).hexdigest()[:16]
    out = _cache_dir() / f"tae-{key}{'.dylib' if sys.platform == 'darwin' else '.so'}"
    if out.is_file() or not build:
        return out
    cxx = os.environ.get("CXX") or next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
    if cxx is None:
        raise NativeUnavailable("no C++ compiler found (set CXX or install g++ / clang++) to build the torch-free "
                                "ExecuTorch shim; or use backend='pybindings' (needs torch)")
    with _build_lock:
        if out.is_file():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
        os.close(fd)
        try:
            res = subprocess.run(_compile_command(cxx, root, Path(tmp)), capture_output=True, text=True, timeout=600)
            if res.returncode != 0:
                raise NativeUnavailable(f"building the ExecuTorch shim failed ({cxx}):\n{res.stderr[-2000:]}")
            os.replace(tmp, out)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise NativeUnavailable(f"building the ExecuTorch shim failed ({cxx}): {exc}") from exc
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return out


def _load_library(path: Path) -> ctypes.CDLL:
    key = str(path)
    if key not in _loaded:
        try:
            lib = ctypes.CDLL(key)
        except OSError as exc:
            raise NativeUnavailable(f"cannot load the ExecuTorch shim {path}: {exc}") from exc
        vp, cp, ip, i64p = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.POINTER(ctypes.c_int64)
        lib.tae_open.restype, lib.tae_open.argtypes = vp, [cp, cp, ip]
        lib.tae_close.restype, lib.tae_close.argtypes = None, [vp]
        lib.tae_num_methods.restype, lib.tae_num_methods.argtypes = ip, [vp]
        lib.tae_method_name.restype, lib.tae_method_name.argtypes = cp, [vp, ip]
        lib.tae_run.restype = ip
        lib.tae_run.argtypes = [vp, cp, ip, ctypes.POINTER(ip), ctypes.POINTER(ip), i64p,
                                ctypes.POINTER(vp), cp, ip]
        lib.tae_output.restype = ip
        lib.tae_output.argtypes = [vp, ip, ctypes.POINTER(ip), ctypes.POINTER(ip), ctypes.POINTER(ip), i64p,
                                   ctypes.POINTER(vp), i64p, i64p, ctypes.POINTER(ctypes.c_double)]
        _loaded[key] = lib
    return _loaded[key]


# ---- programs ---------------------------------------------------------------------------------------
class Program(abc.ABC):
    """One loaded `.pte`. `run(name, *arrays)` -> list of numpy arrays (tensors) and Python
    scalars (ints, floats, bools of constant methods). Not thread-safe: one caller at a time."""

    backend = "?"
    method_names: frozenset

    @abc.abstractmethod
    def run(self, name: str, *inputs):
        """Execute method `name` on `inputs` (numpy arrays) and return its outputs."""

    def close(self):
        pass

    def __repr__(self):
        return f"{type(self).__name__}(backend={self.backend}, methods={len(self.method_names)})"


class NativeProgram(Program):
    """Through the compiled shim (ctypes + numpy), no torch anywhere in the process."""

    backend = "native"

    def __init__(self, path: str | Path, library: Path | None = None):
        self._lib = _load_library(library or native_library())
        err = ctypes.create_string_buffer(1024)
        self._h = self._lib.tae_open(str(path).encode(), err, len(err))
        if not self._h:
            raise ProgramError(err.value.decode(errors="replace") or f"cannot load {path}")
        n = self._lib.tae_num_methods(self._h)
        self.method_names = frozenset(self._lib.tae_method_name(self._h, i).decode() for i in range(n))

    def run(self, name: str, *inputs):
        if not self._h:
            raise ProgramError("the program was closed")
        arrays = []
        for a in inputs:
            a = np.ascontiguousarray(a)
            if a.dtype not in _NP_TO_ET:
                raise ProgramError(f"method {name}: unsupported input dtype {a.dtype}")
            arrays.append(a)
        n = len(arrays)
        dtypes = (ctypes.c_int * max(n, 1))(*[_NP_TO_ET[a.dtype] for a in arrays])
        ndims = (ctypes.c_int * max(n, 1))(*[a.ndim for a in arrays])
        flat = [int(s) for a in arrays for s in a.shape]
        sizes = (ctypes.c_int64 * max(len(flat), 1))(*flat)
        data = (ctypes.c_void_p * max(n, 1))(*[a.ctypes.data for a in arrays])
        err = ctypes.create_string_buffer(1024)
        count = self._lib.tae_run(self._h, name.encode(), n, dtypes, ndims, sizes, data, err, len(err))
        if count < 0:
            raise ProgramError(err.value.decode(errors="replace"))
        return [self._output(i) for i in range(count)]

    def _output(self, i: int):
        tag, dtype, ndim = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        sizes = (ctypes.c_int64 * 16)()
        ptr, nbytes, ival, dval = ctypes.c_void_p(), ctypes.c_int64(), ctypes.c_int64(), ctypes.c_double()
        if self._lib.tae_output(self._h, i, ctypes.byref(tag), ctypes.byref(dtype), ctypes.byref(ndim), sizes,
                                ctypes.byref(ptr), ctypes.byref(nbytes), ctypes.byref(ival), ctypes.byref(dval)) != 0:
            raise ProgramError(f"cannot read output {i}")
        if tag.value == 1:
            if dtype.value not in _ET_DTYPES:
                raise ProgramError(f"output {i} has an unsupported dtype (ExecuTorch ScalarType {dtype.value})")
            out = np.empty([sizes[d] for d in range(ndim.value)], dtype=_ET_DTYPES[dtype.value])
            if out.nbytes != nbytes.value:
                raise ProgramError(f"output {i}: {nbytes.value} bytes for shape {list(out.shape)}")
            if out.nbytes:
                ctypes.memmove(out.ctypes.data, ptr.value, out.nbytes)  # copy: the program reuses its memory
            return out
        return {0: None, 2: int(ival.value), 3: float(dval.value), 4: bool(ival.value)}.get(tag.value)

    def close(self):
        if getattr(self, "_h", None):
            self._lib.tae_close(self._h)
            self._h = None

    __del__ = close


class PybindProgram(Program):
    """Through ExecuTorch's Python bindings (`executorch.runtime`); imports torch."""

    backend = "pybindings"

    def __init__(self, path: str | Path):
        try:
            import torch  # noqa: F401
            from executorch.runtime import Runtime
        except Exception as exc:  # ImportError, or a ModuleNotFoundError raised by executorch.runtime
            raise ProgramError(f"the pybindings backend needs torch and executorch.runtime: {exc}") from exc
        try:
            self._program = Runtime.get().load_program(str(path))
        except Exception as exc:
            raise ProgramError(f"cannot load the ExecuTorch program {path}: {exc}") from exc
        self.method_names = frozenset(self._program.method_names)
        self._methods = {}

    def run(self, name: str, *inputs):
        import torch

        if name not in self._methods:
            self._methods[name] = self._program.load_method(name)
        try:
            outs = self._methods[name].execute([torch.from_numpy(np.ascontiguousarray(a)) for a in inputs])
        except Exception as exc:
            raise ProgramError(f"ExecuTorch method {name!r} failed: {exc}") from exc
        return [o.detach().numpy().copy() if isinstance(o, torch.Tensor) else o for o in outs]


def open_program(path: str | Path, backend: str = "auto") -> Program:
    """Load `path` with `backend`: "native" (torch-free), "pybindings" (needs torch), or "auto"
    (native, else pybindings when torch can be imported). Raises ProgramError."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if backend == "native":
        return NativeProgram(path)
    if backend == "pybindings":
        return PybindProgram(path)
    try:
        return NativeProgram(path)
    except NativeUnavailable as exc:
        if sys.modules.get("torch", False) is None or importlib.util.find_spec("torch") is None:
            raise ProgramError(f"{exc}\n(the pybindings fallback needs torch, which cannot be imported here)") from exc
        return PybindProgram(path)
