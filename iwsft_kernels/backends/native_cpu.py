"""The native CPU epilogue (csrc/iwsft_epilogue.cpp): loading it, and the ops that use it.

Where the compiled code comes from, first that works:
1. ``iwsft_kernels._C``: built by setup.py when ``IWSFT_BUILD_NATIVE=1`` was set at install
   time (a plain ``pip install .`` builds nothing, see setup.py);
2. compiled on first use: one compiler call (``$CXX``, else ``c++``) against torch's headers,
   no ninja and no pybind11 needed (the ops register through ``TORCH_LIBRARY`` and the
   library is loaded with ``torch.ops.load_library``). The source ships inside the package
   (``iwsft_kernels/csrc/`` in a wheel; ``csrc/`` at the top of a source checkout). One line on
   stderr says when this compile runs (once; ~10-30 s on 2 cores). The library is cached per
   user, not per environment, in :func:`cache_dir` (``$TORCH_EXTENSIONS_DIR/iwsft_kernels``,
   else ``$XDG_CACHE_HOME/iwsft_kernels``, else ``~/.cache/iwsft_kernels``), named after the
   torch and Python versions and a hash of the source, compiler and flags: every environment
   with the same torch version reuses it, and a new torch version compiles its own.
3. neither: :func:`load` returns None, the pure torch ops run, and one line on stderr says why.

``IWSFT_NO_NATIVE=1`` disables the native path (the pure torch ops run, nothing is compiled,
no notice).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from typing import NamedTuple

import torch

from ..config import IDENTITY, LogitTransform
from .rows import RowStats
from .torch_ops import TorchOps

_HERE = Path(__file__).resolve()
# the C++ source: inside the package (wheel / non-editable install: setup.py copies csrc/ into
# iwsft_kernels/csrc/), else at the top of a source checkout (editable install, PYTHONPATH)
SOURCE_CANDIDATES = (_HERE.parents[1] / "csrc" / "iwsft_epilogue.cpp",
                     _HERE.parents[2] / "csrc" / "iwsft_epilogue.cpp")
_UNSET = object()
_state = {"lib": _UNSET, "error": None, "noticed": False, "origin": None,
          "compiled": False}


class NativeUnavailable(RuntimeError):
    """The extension could not be found, built or loaded."""


def disabled() -> bool:
    return os.environ.get("IWSFT_NO_NATIVE", "0") not in ("", "0")


def cache_dir() -> Path:
    base = os.environ.get("TORCH_EXTENSIONS_DIR")
    if base:
        return Path(base) / "iwsft_kernels"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "iwsft_kernels"


def source_path() -> Path | None:
    """The C++ source this install compiles (None if it was not shipped)."""
    return next((p for p in SOURCE_CANDIDATES if p.is_file()), None)


def find_compiler() -> str | None:
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx) or (cxx if os.path.isfile(cxx) else None)
    for c in ("c++", "g++", "clang++"):
        p = shutil.which(c)
        if p:
            return p
    return None


def _cpu_flags() -> list[str]:
    """-mavx2 -mfma where this CPU has them (x86 Linux); the cache key includes the flags."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read(1 << 16)
    except OSError:
        return []
    words = set(info.split())
    return ["-mavx2", "-mfma"] if {"avx2", "fma"} <= words else []


def _build_command(cxx: str, src: Path, out: str) -> list[str]:
    from torch.utils import cpp_extension as ce

    abi = int(bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True)))
    # -fopenmp: at::parallel_for is inline and only runs in parallel when compiled with
    # OpenMP (torch's wheel ships the libgomp it uses; -L below finds that one).
    # -fno-trapping-math lets gcc if-convert, hence vectorise, the branch-free exp.
    omp = "-fopenmp" if sys.platform.startswith("linux") else "-fopenmp-simd"
    cmd = [cxx, "-O3", "-std=c++17", "-shared", "-fPIC", omp, "-fno-trapping-math", "-w",
           f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *_cpu_flags()]
    for inc in ce.include_paths("cpu"):
        cmd += ["-isystem", inc]
    cmd += [str(src), "-o", out]
    for lib in ce.library_paths("cpu"):
        cmd += [f"-L{lib}", f"-Wl,-rpath,{lib}"]
    cmd += ["-lc10", "-ltorch_cpu", "-ltorch"]
    return cmd


def _flags_without_paths(cmd: list[str]) -> list[str]:
    """The compile command minus the paths (source, output, torch's include and library
    folders), which differ between environments that share one torch version."""
    out, skip = [], False
    for a in cmd[1:]:
        if skip:
            skip = False
        elif a in ("-isystem", "-o"):
            skip = True
        elif not a.startswith(("-L", "-Wl,-rpath")) and not a.endswith(".cpp"):
            out.append(a)
    return out


def cached_library_path(src: Path, cxx: str) -> Path:
    """Where the library compiled from `src` by `cxx` is cached: one file per (torch version,
    Python version, source + compiler + flags), shared by every environment of this user."""
    key = hashlib.sha256(src.read_bytes())
    key.update(repr((cxx, _flags_without_paths(_build_command(cxx, src, "OUT")),
                     torch.__version__, sys.version_info[:2],
                     sysconfig.get_platform())).encode())
    tv = torch.__version__.replace("+", "_")
    py = f"py{sys.version_info[0]}{sys.version_info[1]}"
    return cache_dir() / f"iwsft_epilogue-torch{tv}-{py}-{key.hexdigest()[:16]}.so"


def _jit_build(rebuild: bool = False) -> Path:
    """The cached library, compiled first if it is not there (or if `rebuild`).
    Sets ``_state["compiled"]`` when this call ran the compiler."""
    if sys.platform not in ("linux", "darwin"):
        raise NativeUnavailable(f"on-the-fly build not supported on {sys.platform}")
    src = source_path()
    if src is None:
        raise NativeUnavailable(f"source iwsft_epilogue.cpp not found (looked in "
                                f"{', '.join(str(p.parent) for p in SOURCE_CANDIDATES)})")
    cxx = find_compiler()
    if cxx is None:
        raise NativeUnavailable("no C++ compiler found (set CXX or install g++)")
    lib = cached_library_path(src, cxx)
    if lib.is_file() and not rebuild:
        return lib
    d = lib.parent
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise NativeUnavailable(f"cannot create the cache folder {d}: {e} (set "
                                f"TORCH_EXTENSIONS_DIR to a writable folder)") from e
    import fcntl

    with open(d / ".build.lock", "w") as lock:  # one compile at a time; the others wait
        fcntl.flock(lock, fcntl.LOCK_EX)
        if lib.is_file() and not rebuild:  # another process built it while we waited
            return lib
        print(f"iwsft_kernels: compiling the native CPU epilogue for torch {torch.__version__} "
              f"(once per torch version, ~10-30 s; cached in {d}; IWSFT_NO_NATIVE=1 skips it)",
              file=sys.stderr, flush=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", prefix=".build-", dir=d)
        os.close(fd)
        try:
            try:
                r = subprocess.run(_build_command(cxx, src, tmp), capture_output=True,
                                   text=True, timeout=600)
            except (OSError, subprocess.TimeoutExpired) as e:
                raise NativeUnavailable(f"compiler {cxx} failed to run: {e}") from e
            if r.returncode != 0:
                err = (r.stderr or r.stdout).strip().splitlines()
                first = next((ln for ln in err if "error" in ln), err[0] if err else "")
                raise NativeUnavailable(f"compile failed ({cxx}): {first.strip()[:300]}")
            os.replace(tmp, lib)  # atomic: a reader never sees a half-written library
            _state["compiled"] = True
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return lib


def _load_impl():
    if hasattr(torch.ops, "iwsft_native") and hasattr(torch.ops.iwsft_native, "chunk_forward"):
        return "already registered"
    try:
        import importlib

        importlib.import_module("iwsft_kernels._C")
        return "iwsft_kernels._C"
    except ImportError:
        pass
    _state["compiled"] = False
    lib = _jit_build()
    try:
        torch.ops.load_library(str(lib))
    except Exception as e:  # noqa: BLE001
        if _state["compiled"]:
            raise NativeUnavailable(f"could not load {lib}: {e}") from e
        lib = _jit_build(rebuild=True)  # a stale or damaged cached file: compile it again
        try:
            torch.ops.load_library(str(lib))
        except Exception as e:  # noqa: BLE001
            raise NativeUnavailable(f"could not load {lib}: {e}") from e
    return str(lib)


def load():
    """``torch.ops.iwsft_native`` if the native epilogue is usable, else None (then one line
    on stderr, once per process, says why). Builds it on first use if needed."""
    if disabled():
        return None
    if _state["lib"] is _UNSET:
        try:
            _state["origin"] = _load_impl()
            _state["lib"] = torch.ops.iwsft_native
        except Exception as e:  # noqa: BLE001 — any failure means: run the pure torch path
            _state["lib"] = None
            _state["error"] = f"{type(e).__name__}: {e}" if not isinstance(
                e, NativeUnavailable) else str(e)
        if _state["lib"] is None and not _state["noticed"]:
            _state["noticed"] = True
            print(f"iwsft_kernels: native CPU epilogue unavailable, using the pure torch path "
                  f"({_state['error']})", file=sys.stderr)
    return _state["lib"]


def available() -> bool:
    return load() is not None


def load_error() -> str | None:
    """Why :func:`load` returned None (None if it did not, or was not tried)."""
    return _state["error"]


def origin() -> str | None:
    """Where the loaded extension came from (module name or library path)."""
    return _state["origin"] if _state["lib"] not in (None, _UNSET) else None


def _reset_for_tests():
    _state.update(lib=_UNSET, error=None, noticed=False, origin=None, compiled=False)


class NativeState(NamedTuple):
    """What NativeTorchOps.softmax_grad needs from chunk_forward (the chunk is not copied):
    buf = the chunk's memory, holding e = exp(z - max z) (identity / linear transforms) or
    u = exp(-2|x|), x = scale r / softcap, signed like r (softcap: softmax_grad gets z, e and
    sech^2(x) from it; see csrc/iwsft_epilogue.cpp); rest = the row sum of e without one
    arg-max entry; mz = the row max of z (float64); xf = the transform."""

    buf: torch.Tensor
    rest: torch.Tensor
    mz: torch.Tensor
    xf: LogitTransform


class NativeTorchOps(TorchOps):
    """TorchOps with the per-chunk epilogue (chunk_forward, softmax_grad) done by the native
    CPU kernels, every logit transform and output included; chunks the kernels do not take
    (not CPU, not fp32, not a contiguous 2-D chunk, y not int64) go to the pure torch code
    (TorchOps), whose state softmax_grad recognises and hands back to it. The vocabulary-
    parallel pieces (partials, logprob_partials, softmax_grad_merged; backends/vocab_merge.py)
    are TorchOps' own: a sharded chunk runs the pure torch epilogue (docs/distributed.md)."""

    name = "torch+native"
    # no (m, V) buffer beyond the chunk under a softcap (the chunk driver's budget reads this;
    # TorchOps needs one): the capped state lives in the chunk itself (NativeState)
    softcap_extra_buffers = 0
    partials_softcap_extra_buffers = TorchOps.softcap_extra_buffers  # sharded chunks: torch's

    def __init__(self, lib=None):
        super().__init__()
        self._lib = lib if lib is not None else load()
        if self._lib is None:
            raise NativeUnavailable(load_error() or "native epilogue disabled")

    @staticmethod
    def _native_ok(r, y):
        return (r.device.type == "cpu" and r.dtype == torch.float32 and r.dim() == 2
                and r.is_contiguous() and y.dtype == torch.int64)

    def chunk_forward(self, r, y, xf=IDENTITY, want_entropy=False):
        """Consumes r (raw fp32 logits, owned; overwritten by the state, see NativeState).
        Returns (RowStats of the transformed logits, NativeState)."""
        if not self._native_ok(r, y):
            return super().chunk_forward(r, y, xf, want_entropy)
        lp, lse, top1, rest, mz, ent = self._lib.chunk_forward(
            r, y, xf.scale, xf.softcap, xf.temperature, bool(want_entropy))
        return (RowStats(lp, lse, top1, ent if want_entropy else None),
                NativeState(r, rest, mz, xf))

    def row_stats(self, r, y, xf=IDENTITY, want_entropy=False):
        """chunk_forward without keeping the state (TorchOps.logprobs' chunk loop calls this)."""
        return self.chunk_forward(r, y, xf, want_entropy)[0]

    def softmax_grad(self, state, y, rows, coef, zcoef=None, xf=IDENTITY,
                     out_dtype=torch.float32):
        """G_r = (coef (softmax - onehot) + zcoef softmax) * dz/dr, the gradient w.r.t. the raw
        logits, written into the chunk's memory, fp32 like TorchOps.softmax_grad (out_dtype is
        not used: the inherited gradient GEMMs cast)."""
        if not isinstance(state, NativeState):
            return super().softmax_grad(state, y, rows, coef, zcoef, xf, out_dtype)
        if xf != state.xf:
            raise ValueError(f"softmax_grad: the logit transform {xf} differs from the one "
                             f"chunk_forward used ({state.xf})")
        return self._lib.softmax_grad_(state.buf, y, rows.logp, coef, zcoef, state.rest,
                                       state.mz, xf.scale, xf.softcap, xf.temperature)


def native_ops() -> NativeTorchOps | None:
    """A NativeTorchOps if the extension is usable, else None."""
    lib = load()
    return None if lib is None else NativeTorchOps(lib)
