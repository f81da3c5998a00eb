"""The chunked algorithm shared by both backends (docs/design.md §3).

Inputs are the *target rows only* (ignored positions were dropped before any matmul):
  h (M, H) compute dtype, W (V, H), b (V,) or None, y (M,) int64, ref (M,) fp32 or None,
  seg (M,) int64 sequence ids (non-decreasing), S sequences, D the loss divisor.

Per chunk of rows: z = h W^T + b (fp32), lse, logp, the rows' weights w, then
  G = (w / D) * (softmax(z) - onehot(y)),  dH = G W,  dW += G^T h,  db += sum_rows G.
`sft` and `token` weights depend only on the row itself: one pass (6 M H V FLOPs).
`sequence` weights need the whole sequence: if every sequence fits in one chunk, chunks are
cut at sequence boundaries and it is still one pass; otherwise a logprob pass first (2MHV),
then the gradient pass with the weights known (8MHV in all).
Self-normalisation is one batch-wide scalar; gradients are linear in it, so chunks use the
unnormalised weights and the factor is applied once at the end.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from ..config import IWConfig
from ..weights import Weights, compute_weights
from .torch_ops import logits_buffer


@dataclass
class FusedResult:
    logp: torch.Tensor  # (M,) fp32
    weights: Weights
    loss: torch.Tensor  # 0-d fp32
    dh: torch.Tensor | None  # (M, H) compute dtype
    dw: torch.Tensor | None  # (V, H) fp32
    db: torch.Tensor | None  # (V,) fp32


def rows_per_chunk(V: int, dtype: torch.dtype, chunk_bytes: int) -> int:
    """Rows whose logits fit the byte budget: an fp32 (m, V) chunk, plus a compute-dtype copy
    of it when the compute dtype is not fp32."""
    per_row = V * (4 + (0 if dtype == torch.float32 else torch.finfo(dtype).bits // 8))
    return max(1, int(chunk_bytes) // per_row)


def _sequence_aligned_bounds(seg: torch.Tensor, S: int, rows: int) -> list[int] | None:
    """Chunk boundaries at sequence boundaries, each chunk <= rows; None if a sequence is
    longer than a chunk."""
    counts = torch.bincount(seg, minlength=S)
    if int(counts.max()) > rows:
        return None
    ends = torch.cumsum(counts[counts > 0], 0).tolist()
    bounds, start = [0], 0
    while start < ends[-1]:
        start = ends[bisect.bisect_right(ends, start + rows) - 1]
        bounds.append(start)
    return bounds


def fused_linear_iw(ops, h, W, b, y, ref, seg, S, quality, cfg: IWConfig, D: float, *,
                    need_dh: bool, need_dw: bool, need_db: bool, chunk_rows: int) -> FusedResult:
    M = h.shape[0]
    need_grad = need_dh or need_dw or need_db
    coef = None  # precomputed per-row w/D (two-phase sequence mode)
    weights = None
    logp = None
    bounds = list(range(0, M, chunk_rows)) + [M]
    two_phase = False
    if M and cfg.mode == "sequence" and need_grad:
        aligned = _sequence_aligned_bounds(seg, S, chunk_rows)
        two_phase = aligned is None
        bounds = bounds if two_phase else aligned
    if not need_grad or two_phase:
        logp = ops.logprobs(h, W, b, y, chunk_rows)
        weights = compute_weights(None if ref is None else logp - ref, seg, S, cfg, quality)
        if not need_grad:
            return FusedResult(logp, weights, _loss(weights, logp, D), None, None, None)
        coef = weights.row / D

    dh = torch.empty_like(h) if need_dh else None
    dw = torch.zeros(W.shape, dtype=torch.float32, device=W.device) if need_dw else None
    db = torch.zeros(W.shape[0], dtype=torch.float32, device=W.device) if need_db else None
    logp_all = torch.empty(M, dtype=torch.float32, device=h.device)
    # one logits buffer for every chunk of the call (CPU; see torch_ops.chunk_logits)
    buf = logits_buffer(max((e - s for s, e in zip(bounds[:-1], bounds[1:])), default=0),
                        W.shape[0], h.device)
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e <= s:
            continue
        hc, yc = h[s:e], y[s:e]
        lp, state = ops.chunk_forward(ops.logits(hc, W, b, None if buf is None else buf[: e - s]),
                                      yc)
        logp_all[s:e] = lp
        if coef is not None:
            c = coef[s:e]
        else:
            d = None if ref is None else lp - ref[s:e]
            c = compute_weights(d, seg[s:e], S, cfg, quality, normalize=False, with_stats=False).row / D
        g = ops.softmax_grad(state, yc, lp, c, W.dtype)
        if need_dh:
            dh[s:e] = ops.grad_hidden(g, W)
        if need_dw:
            ops.accum_grad_weight(dw, g, hc)
        if need_db:
            db += g.sum(0, dtype=torch.float32)
        del g, state

    if weights is None:
        logp = logp_all
        weights = compute_weights(None if ref is None else logp - ref, seg, S, cfg, quality)
        if cfg.self_normalize:  # chunks used unnormalised weights
            for t_ in (dh, dw, db):
                if t_ is not None:
                    t_.mul_(weights.norm.to(t_.dtype))
    return FusedResult(logp, weights, _loss(weights, logp, D), dh, dw, db)


def _loss(weights: Weights, logp: torch.Tensor, D: float) -> torch.Tensor:
    return -(weights.row * logp).sum() / D
