"""The native CPU epilogue with logit transforms / fused outputs: what each option costs, and
(--baseline REV) the identity case against the epilogue of an older revision, both in one
process, alternating. Not a test.

One fp32 chunk of raw logits (default 220 x 151936: the CPU chunk cap at Qwen2.5's V), timed
as chunk_forward + softmax_grad (the chunk is refilled from a saved copy before each call,
untimed). Median of --reps.

    python bench/bench_native_transforms.py [--m 220 --v 151936 --reps 15 --baseline REV]
                                            [--torch] [--ab-only]

--torch: also times the pure torch ops (TorchOps) on every case.

--baseline REV: compiles csrc/iwsft_epilogue.cpp as of git revision REV (the pre-transform
two-op interface: chunk_forward(z, y) -> (logp, rest), softmax_grad_(e, y, logp, coef, rest))
under another op namespace, and times it against this checkout's identity path
(no transform, no entropy, no zcoef) on the same chunk.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from iwsft_kernels.backends import native_cpu as native
from iwsft_kernels.backends.torch_ops import TorchOps
from iwsft_kernels.config import IDENTITY, LogitTransform

ROOT = Path(__file__).resolve().parents[1]


def load_baseline(rev: str):
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:csrc/iwsft_epilogue.cpp"],
                         check=True, capture_output=True, text=True).stdout
    if "chunk_forward(Tensor(a!) z, Tensor y) -> (Tensor, Tensor)" not in src:
        raise SystemExit(f"{rev}: not the pre-transform two-op epilogue")
    src = src.replace("TORCH_LIBRARY(iwsft_native,", "TORCH_LIBRARY(iwsft_native_base,")
    src = src.replace("TORCH_LIBRARY_IMPL(iwsft_native,", "TORCH_LIBRARY_IMPL(iwsft_native_base,")
    d = Path(tempfile.mkdtemp(prefix="iwsft-base-"))
    (d / "base.cpp").write_text(src)
    cmd = native._build_command(native.find_compiler(), d / "base.cpp", str(d / "base.so"))
    subprocess.run(cmd, check=True)  # same flags as the loader
    torch.ops.load_library(str(d / "base.so"))
    return torch.ops.iwsft_native_base


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=220)
    ap.add_argument("--v", type=int, default=151936)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--baseline", default=None, help="git revision of the old epilogue")
    ap.add_argument("--torch", action="store_true", help="also time the pure torch ops")
    ap.add_argument("--ab-only", action="store_true",
                    help="only identity (new) vs --baseline (more reps in the same time)")
    a = ap.parse_args()
    lib = native.load()
    if lib is None:
        raise SystemExit(f"native epilogue unavailable: {native.load_error()}")
    ops = native.NativeTorchOps(lib)
    g = torch.Generator().manual_seed(0)
    m, V = a.m, a.v
    z0 = torch.randn(m, V, generator=g) * 3
    buf = torch.empty_like(z0)
    y = torch.randint(0, V, (m,), generator=g)
    coef = torch.rand(m, generator=g)
    zcoef = torch.rand(m, generator=g) * 1e-3

    def new(xf, ent=False, zc=None, o=ops):
        def step():
            rows, st = o.chunk_forward(buf, y, xf, ent)
            o.softmax_grad(st, y, rows, coef, zc, xf, torch.float32)
        return step

    cases = {"identity (new)": new(IDENTITY)}
    if a.baseline:
        base = load_baseline(a.baseline)

        def old():
            lp, s = base.chunk_forward(buf, y)
            base.softmax_grad_(buf, y, lp, coef, s)

        cases["identity (baseline " + a.baseline + ")"] = old
    variants = {
        "identity + entropy": (IDENTITY, True, None),
        "identity + zcoef": (IDENTITY, False, zcoef),
        "scale/temperature": (LogitTransform(scale=0.5, temperature=0.7), False, None),
        "softcap 30": (LogitTransform(softcap=30.0), False, None),
        "softcap 30 + entropy + zcoef": (LogitTransform(softcap=30.0), True, zcoef),
    }
    if a.ab_only:
        variants = {}
    for k, (xf, ent, zc) in variants.items():
        cases[k] = new(xf, ent, zc)
    if a.torch:
        t_ops = TorchOps()
        cases["identity (torch ops)"] = new(IDENTITY, o=t_ops)
        for k, (xf, ent, zc) in variants.items():
            cases[k + " (torch ops)"] = new(xf, ent, zc, o=t_ops)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, chunk {m} x {V} fp32, "
          f"median of {a.reps} (cases alternate)")
    times = {k: [] for k in cases}
    for _ in range(a.reps):
        for k, f in cases.items():
            buf.copy_(z0)
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    ref = med["identity (new)"]
    for k, t in med.items():
        print(f"  {k:44s} {t * 1e3:8.1f} ms   x{t / ref:.3f} of identity (new)")


if __name__ == "__main__":
    main()
