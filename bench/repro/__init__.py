"""Small-scale reproductions of the iw-SFT paper's claims (arXiv:2507.12856).

The curated-data experiments (``curated/run.py``, ``curated/teacher.py``) train for 1,000+
steps, and one rounding difference changes every number after it (docs/repro.md,
*Reproducibility*). Besides the code, the seeds, the torch version and the thread count, their
numbers depend on which CPU kernels torch picks, and torch picks them by CPU:

- fp32 matrix products (``F.linear`` and its backward) run in MKL, whose code path depends on
  the CPU's vendor and instruction set unless ``MKL_CBWR`` fixes it;
- ATen's vectorised kernels (softmax, log-softmax, exp, reductions, optimizer arithmetic) come
  in builds per instruction set, chosen by ``ATEN_CPU_CAPABILITY`` (default: the best the CPU
  has: AVX512 or AVX2 on x86).

Both are read when torch starts, so :func:`pin_cpu_kernels` must run before ``import torch``:
the experiments' command lines call it first. It fixes MKL's branch to ``COMPATIBLE`` (SSE2
code without approximate reciprocals, which oneMKL offers for the same results on any x86-64
CPU, Intel or not) and ATen's kernels to the AVX2 build (present on any x86-64 CPU with AVX2).
What was tested, and what was not: docs/repro.md.
"""

from __future__ import annotations

import os
import sys

PINNED_CPU_KERNELS = {"MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "avx2"}
NO_PIN = "IWSFT_REPRO_NO_PIN"    # =1: leave the kernels to torch (the CPU's best)
_MARK = "IWSFT_REPRO_PINNED"     # set by pin_cpu_kernels for the process and its children


def pin_cpu_kernels(announce: bool = True) -> dict[str, str | None]:
    """Pin the CPU kernels of PINNED_CPU_KERNELS for this process and its children, and say so
    on stderr. A value already in the environment is kept (and the line says it differs from
    the committed results' setting); ``IWSFT_REPRO_NO_PIN=1`` pins nothing. If torch is already
    imported, the process re-executes itself with the variables set (sys.orig_argv), since
    torch reads them only at start. Returns {variable: value in effect, or None}."""
    if os.environ.get(NO_PIN, "0") not in ("", "0"):
        if announce:
            print(f"[repro] CPU kernels NOT pinned ({NO_PIN}=1): the numbers depend on this "
                  "CPU's vendor and instruction set (docs/repro.md)", file=sys.stderr)
        return {k: os.environ.get(k) for k in PINNED_CPU_KERNELS}
    changed = {k: v for k, v in PINNED_CPU_KERNELS.items() if k not in os.environ}
    os.environ.update(changed)
    if changed:
        os.environ[_MARK] = " ".join(f"{k}={v}" for k, v in changed.items())
    if changed and "torch" in sys.modules:  # too late for this process: start again
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    if announce:
        ours = os.environ.get(_MARK, "")
        parts = []
        for k, v in PINNED_CPU_KERNELS.items():
            got = os.environ[k]
            note = "" if f"{k}={got}" in ours.split() else (
                " (from your environment" + ("" if got == v else
                                             f"; the committed results use {v}") + ")")
            parts.append(f"{k}={got}{note}")
        print(f"[repro] CPU kernels pinned before torch starts: {', '.join(parts)} "
              f"({NO_PIN}=1 turns this off; see docs/repro.md)", file=sys.stderr, flush=True)
    return {k: os.environ.get(k) for k in PINNED_CPU_KERNELS}


MKL_BRANCHES = {1: "OFF", 2: "AUTO", 3: "COMPATIBLE", 4: "SSE2", 8: "SSE4_2", 9: "AVX",
                10: "AVX2", 12: "AVX512", 14: "AVX512_E1"}


def mkl_branch() -> dict:
    """MKL's code branch: the one fixed by MKL_CBWR ("OFF": none, MKL picks per CPU) and the
    one it picks on this CPU. Read through oneMKL's internal mkl_serv_cbwr_get, which torch's
    x86-64 Linux wheels export; {} where it is not there."""
    import ctypes
    from pathlib import Path

    import torch

    try:
        lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        get, auto = lib.mkl_serv_cbwr_get, lib.mkl_serv_cbwr_get_auto_branch
    except (OSError, AttributeError):
        return {}
    get.argtypes, get.restype, auto.restype = [ctypes.c_int], ctypes.c_int, ctypes.c_int
    b, a = get(1), auto()  # 1 = MKL_CBWR_BRANCH
    return {"fixed": MKL_BRANCHES.get(b, str(b)), "auto_for_this_cpu": MKL_BRANCHES.get(a, str(a))}
