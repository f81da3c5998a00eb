"""Benchmark inputs and an independent, chunked high-precision oracle for the iw-SFT loss.

The oracle implements docs/design.md §1 from the formulas (it shares no code with
``iwsft_kernels``), so the accuracy columns of the benchmark also cross-check the package.

Math, per target token i (ignored positions dropped first), with D = number of targets:
    z_i = W h_i,  logp_i = z_i[y_i] - logsumexp(z_i),  d_i = logp_i - ref_i (detached)
    sft:       w_i = 1
    token:     w_i = clamp(exp(T d_i), w_min=0.2, w_max=1.8)
    sequence:  w_i = w_s(i),  w_s = clamp(exp(T mean_{i in s} d_i), w_min=0, w_max=16)
    L = -sum_i w_i logp_i / D
    dL/dz_i = w_i (softmax(z_i) - onehot(y_i)) / D,  dH_i = g_i W,  dW = sum_i g_i^T h_i
It runs in float64 on the CPU and float32 (TF32 off) on a GPU, in row chunks so that the
full N x V logits never exist.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
MODES = ("sft", "token", "sequence")
# docs/design.md §1 defaults: (temperature, w_min, w_max)
MODE_DEFAULTS = {"token": (1.0, 0.2, 1.8), "sequence": (1.0, 0.0, 16.0)}


@dataclass
class BenchInputs:
    hidden: torch.Tensor  # (N, H) in the benchmark dtype, requires_grad
    weight: torch.Tensor  # (V, H) in the benchmark dtype, requires_grad
    labels: torch.Tensor  # (N,) int64, IGNORE_INDEX at the first 10% of every sequence
    cu_seqlens: torch.Tensor  # (S+1,) int32
    ref_logprobs: torch.Tensor | None = None  # (N,) float32, set from the oracle


def make_inputs(n: int, h: int, v: int, *, seq_len: int, dtype: torch.dtype,
                device: str | torch.device, seed: int = 0) -> BenchInputs:
    """Deterministic inputs whose logits look like a trained LM head's, not pure noise.

    W rows ~ N(0, 1/H) (|W_v| ~ 1); h ~ N(0, 4) plus beta_i * W[y_i] with beta_i ~ U(0, 20),
    so the target logit is boosted by ~beta_i: target probabilities range from ~1e-6 to ~1
    (peaked rows included). The first 10% of each sequence is ignored (a prompt).
    """
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(v, h, generator=g, device=device) / math.sqrt(h)
    y = torch.randint(0, v, (n,), generator=g, device=device)
    beta = torch.rand(n, generator=g, device=device) * 20.0
    x = 2.0 * torch.randn(n, h, generator=g, device=device) + beta[:, None] * w[y]
    pos = torch.arange(n, device=device) % seq_len
    y = torch.where(pos < max(1, seq_len // 10), torch.full_like(y, IGNORE_INDEX), y)
    bounds = list(range(0, n, seq_len)) + [n]
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    return BenchInputs(
        hidden=x.to(dtype).requires_grad_(True),
        weight=w.to(dtype).requires_grad_(True),
        labels=y,
        cu_seqlens=cu,
    )


def make_ref_logprobs(logp: torch.Tensor, labels: torch.Tensor, cu_seqlens: torch.Tensor,
                      seed: int = 1) -> torch.Tensor:
    """log q_ref = oracle logp + per-token noise N(0, 0.5^2) + per-sequence offset U(-1, 1).

    Gives sequence weights spread over ~[e^-1, e^1] and some clipped token weights, so the
    weighted paths do real work. Clamped to <= 0; 0 at non-target positions.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    n = labels.numel()
    s = cu_seqlens.numel() - 1
    noise = 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    offset = torch.rand(s, generator=g, dtype=torch.float64) * 2.0 - 1.0
    seg = _segment_ids(cu_seqlens.cpu(), n)
    ref = (logp.detach().double().cpu() + noise + offset[seg]).clamp(max=0.0)
    ref = torch.where(labels.cpu() == IGNORE_INDEX, torch.zeros_like(ref), ref)
    return ref.float().to(labels.device)


def _segment_ids(cu_seqlens: torch.Tensor, n: int) -> torch.Tensor:
    pos = torch.arange(n, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].long(), pos, right=True)


def token_weights(mode: str, logp: torch.Tensor, ref: torch.Tensor, seg: torch.Tensor,
                  num_segments: int) -> torch.Tensor:
    """Per-target-token weights (1-D over targets only) for one mode, in logp's dtype."""
    if mode == "sft":
        return torch.ones_like(logp)
    t, w_min, w_max = MODE_DEFAULTS[mode]
    d = logp - ref.to(logp.dtype)
    lo = math.log(w_min) if w_min > 0 else -math.inf
    hi = math.log(w_max)
    if mode == "token":
        return torch.exp((t * d).clamp(lo, hi))
    sums = torch.zeros(num_segments, dtype=logp.dtype, device=logp.device).index_add_(0, seg, d)
    cnt = torch.zeros(num_segments, dtype=logp.dtype, device=logp.device).index_add_(
        0, seg, torch.ones_like(d))
    mean = sums / cnt.clamp(min=1)
    w_s = torch.exp((t * mean).clamp(lo, hi))
    return w_s[seg]


@torch.no_grad()
def oracle(inp: BenchInputs, *, dtype: torch.dtype, chunk_rows: int = 256,
           modes=MODES, ref_logprobs: torch.Tensor | None = None):
    """Chunked high-precision loss and gradients for each mode.

    Returns (logp_full (N,) in ``dtype`` with 0 at ignored positions, {mode: (loss, dH, dW)}).
    If ``ref_logprobs`` is None only phase 1 runs and the dict is empty; the caller then builds
    ref_logprobs from logp and calls again.
    """
    x = inp.hidden.detach()
    dev = x.device
    n, hdim = x.shape
    w = inp.weight.detach().to(dtype)
    y = inp.labels
    valid = (y != IGNORE_INDEX).nonzero().squeeze(1)
    xv = x[valid].to(dtype)
    yv = y[valid]
    nv = valid.numel()

    logp = torch.empty(nv, dtype=dtype, device=dev)
    for s in range(0, nv, chunk_rows):
        z = xv[s:s + chunk_rows] @ w.T
        lse = torch.logsumexp(z, dim=1)
        logp[s:s + chunk_rows] = z.gather(1, yv[s:s + chunk_rows, None]).squeeze(1) - lse
        del z
    logp_full = torch.zeros(n, dtype=dtype, device=dev)
    logp_full[valid] = logp
    if ref_logprobs is None:
        return logp_full, {}

    seg_all = _segment_ids(inp.cu_seqlens.to(dev), n)
    seg = seg_all[valid]
    nseg = inp.cu_seqlens.numel() - 1
    ref = ref_logprobs.to(dev)[valid]
    weights = {m: token_weights(m, logp, ref, seg, nseg) for m in modes}
    out = {}
    dh = {m: torch.zeros(n, hdim, dtype=dtype, device=dev) for m in modes}
    dw = {m: torch.zeros_like(w) for m in modes}
    for s in range(0, nv, chunk_rows):
        rows = valid[s:s + chunk_rows]
        z = xv[s:s + chunk_rows] @ w.T
        p = torch.softmax(z, dim=1)
        del z
        p[torch.arange(p.shape[0], device=dev), yv[s:s + chunk_rows]] -= 1.0
        for m in modes:
            gm = p * (weights[m][s:s + chunk_rows] / nv)[:, None]
            dh[m][rows] = gm @ w
            dw[m].addmm_(gm.T, xv[s:s + chunk_rows])
            del gm
        del p
    for m in modes:
        loss = -(weights[m] * logp).sum() / nv
        out[m] = (loss, dh[m], dw[m])
    return logp_full, out


def rel_err(x: torch.Tensor, ref: torch.Tensor, chunk: int = 1 << 22) -> float:
    """||x - ref|| / ||ref|| (Frobenius), accumulated in float64 in flat chunks."""
    xf = x.detach().reshape(-1)
    rf = ref.detach().reshape(-1)
    num = torch.zeros((), dtype=torch.float64, device=xf.device)
    den = torch.zeros((), dtype=torch.float64, device=xf.device)
    for s in range(0, rf.numel(), chunk):
        a = xf[s:s + chunk].double()
        b = rf[s:s + chunk].to(a.device, non_blocking=True).double()
        num += ((a - b) ** 2).sum()
        den += (b ** 2).sum()
    num, den = float(num), float(den)
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return math.sqrt(num / den)
