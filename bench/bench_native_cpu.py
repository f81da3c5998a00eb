"""Native CPU epilogue vs the pure torch composite (issue 6), one process, alternating.

Not a test. Qwen2.5-0.5B head by default: N=2048 target rows, H=896, V=151936, fp32.
Times (a) the loss forward+backward (linear_iwsft_loss + .backward(), backend="torch"),
(b) the epilogue alone on one default-size chunk (chunk_forward + softmax_grad).
The two paths run alternately in the same process (IWSFT_NO_NATIVE toggled per call), so
machine noise hits both alike; the median of --reps runs is reported.

    python bench/bench_native_cpu.py [--n 2048 --h 896 --v 151936 --reps 3 --mode token]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from iwsft_kernels import IWConfig, linear_iwsft_loss
from iwsft_kernels.config import IDENTITY
from iwsft_kernels.backends import native_cpu as native
from iwsft_kernels.backends.chunked import rows_per_chunk
from iwsft_kernels.backends.torch_ops import TorchOps
from iwsft_kernels.core import DEFAULT_CHUNK_BYTES, select_ops as _ops


def _set_native(on: bool):
    if on:
        os.environ.pop("IWSFT_NO_NATIVE", None)
    else:
        os.environ["IWSFT_NO_NATIVE"] = "1"


def loss_step(h, W, y, ref, cfg):
    hh = h.detach().requires_grad_()
    WW = W.detach().requires_grad_()
    t0 = time.perf_counter()
    out = linear_iwsft_loss(hh, WW, y, ref, config=cfg, backend="torch")
    out.loss.backward()
    return time.perf_counter() - t0, float(out.loss.detach())


def epilogue_step(ops, z, y, coef):
    zc = z.clone()
    t0 = time.perf_counter()
    rows, state = ops.chunk_forward(zc, y)
    ops.softmax_grad(state, y, rows, coef, None, IDENTITY, torch.float32)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--h", type=int, default=896)
    ap.add_argument("--v", type=int, default=151936)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--epi-reps", type=int, default=7)
    ap.add_argument("--mode", default="token", choices=["sft", "token", "sequence"])
    a = ap.parse_args()
    lib = native.load()
    if lib is None:
        raise SystemExit(f"native epilogue unavailable: {native.load_error()}")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, native lib: "
          f"{native.origin()}")
    g = torch.Generator().manual_seed(0)
    N, H, V = a.n, a.h, a.v
    W = torch.randn(V, H, generator=g) / H**0.5
    h = torch.randn(N, H, generator=g)
    y = torch.randint(0, V, (N,), generator=g)
    ref = -2 * torch.rand(N, generator=g) - 0.01
    cfg = IWConfig(mode=a.mode)

    # (b) epilogue alone, one default CPU chunk
    m = rows_per_chunk(V, torch.float32, DEFAULT_CHUNK_BYTES["cpu"])
    z = torch.randn(m, V, generator=g) * 3
    yc = y[:m].clone()
    coef = torch.rand(m, generator=g)
    ops = {"native": native.NativeTorchOps(lib), "torch": TorchOps()}
    times = {"native": [], "torch": []}
    for _ in range(a.epi_reps):
        for k in ("torch", "native"):
            times[k].append(epilogue_step(ops[k], z, yc, coef))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"epilogue, one chunk ({m} x {V} fp32), median of {a.epi_reps}: "
          f"torch {med['torch'] * 1e3:.1f} ms, native {med['native'] * 1e3:.1f} ms, "
          f"speedup {med['torch'] / med['native']:.2f}x")
    del z

    # (a) full loss forward + backward
    loss_step(h[:64], W, y[:64], ref[:64], cfg)  # warm-up
    times = {"native": [], "torch": []}
    losses = {}
    for r in range(a.reps):
        for k in (("torch", "native") if r % 2 == 0 else ("native", "torch")):
            _set_native(k == "native")
            assert isinstance(_ops("torch", h.device), native.NativeTorchOps) == (k == "native")
            t, losses[k] = loss_step(h, W, y, ref, cfg)
            times[k].append(t)
            print(f"  rep {r} {k:6s} {t:.2f} s", flush=True)
    _set_native(True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"loss fwd+bwd N={N} H={H} V={V} fp32 mode={a.mode}, median of {a.reps}: "
          f"torch {med['torch']:.2f} s, native {med['native']:.2f} s, "
          f"speedup {med['torch'] / med['native']:.3f}x  "
          f"(loss torch {losses['torch']:.6f}, native {losses['native']:.6f})")


if __name__ == "__main__":
    main()
