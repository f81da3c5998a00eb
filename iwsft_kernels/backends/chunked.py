"""The chunked algorithm shared by both backends (docs/design.md §3).

Inputs are the *target rows only* (ignored positions were dropped before any matmul):
  h (M, H) compute dtype, W (V, H), b (V,) or None, y (M,) int64, ref (M,) fp32 or None,
  seg (M,) int64 sequence ids (non-decreasing), S sequences, D the loss divisor.

Per chunk of rows: r = h W^T + b (fp32), z = xf(r) (the logit transform), lse, logp, the
rows' weights w, then G_z = (w / D) * (softmax(z) - onehot(y)) [+ zcoef * softmax(z)],
G = G_z dz/dr,  dH = G W,  dW += G^T h,  db += sum_rows G.
`sft` and `token` weights depend only on the row itself: one pass (6 M H V FLOPs).
`sequence` weights need the whole sequence: if every sequence fits in one chunk, chunks are
cut at sequence boundaries and it is still one pass; otherwise a logprob pass first (2MHV),
then the gradient pass with the weights known (8MHV in all).
Self-normalisation is one batch-wide scalar; gradients are linear in it, so chunks use the
unnormalised weights and the factor is applied once at the end (except with a z-loss, whose
gradient must not be scaled: then the weights are computed first, two-phase).
Logit transforms, the fused per-row outputs and the z-loss: docs/design.md §9.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from ..config import IDENTITY, IWConfig, LogitTransform
from ..weights import Weights, compute_weights
from .torch_ops import logits_buffer


@dataclass
class FusedResult:
    logp: torch.Tensor  # (M,) fp32
    weights: Weights
    loss: torch.Tensor  # 0-d fp32 (includes the z-loss term)
    dh: torch.Tensor | None  # (M, H) compute dtype
    dw: torch.Tensor | None  # (V, H) fp32
    db: torch.Tensor | None  # (V,) fp32
    lse: torch.Tensor | None = None  # (M,) fp32 logsumexp of the transformed logits
    top1: torch.Tensor | None = None  # (M,) bool: the target attains the row max
    entropy: torch.Tensor | None = None  # (M,) fp32, only when asked
    z_loss: torch.Tensor | None = None  # 0-d fp32: the z-loss term included in loss


def rows_per_chunk(V: int, dtype: torch.dtype, chunk_bytes: int, extra_fp32: int = 0) -> int:
    """Rows whose logits fit the byte budget: an fp32 (m, V) chunk, plus a compute-dtype copy
    of it when the compute dtype is not fp32, plus ``extra_fp32`` more fp32 (m, V) buffers
    (the torch ops' dz/dr buffer under a softcap)."""
    per_row = V * (4 * (1 + int(extra_fp32))
                   + (0 if dtype == torch.float32 else torch.finfo(dtype).bits // 8))
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
                    need_dh: bool, need_dw: bool, need_db: bool, chunk_rows: int,
                    xf: LogitTransform = IDENTITY, want_entropy: bool = False,
                    z_loss: float = 0.0) -> FusedResult:
    """The loss L = -sum_i w_i logp_i / D + z_loss * sum_i lse_i^2 / D over the M target rows
    (logp, lse of the transformed logits, xf), its gradients, and the rows' lse / top1 /
    entropy (entropy only if want_entropy). The z-loss term is not importance-weighted, and
    its gradient G_z = zcoef_i softmax_i (zcoef_i = 2 z_loss lse_i / D) is never scaled by the
    self-normalisation factor: with z-loss and self-normalised data-dependent weights the
    weights (hence the factor) are computed first, by a log-prob pass (the two-phase route)."""
    M = h.shape[0]
    need_grad = need_dh or need_dw or need_db
    z_loss = float(z_loss)
    coef = None  # precomputed per-row w/D (two-phase route)
    weights = None
    bounds = list(range(0, M, chunk_rows)) + [M]
    two_phase = False
    if M and need_grad:
        if cfg.mode == "sequence":
            aligned = _sequence_aligned_bounds(seg, S, chunk_rows)
            two_phase = aligned is None
            bounds = bounds if two_phase else aligned
        # one pass applies the self-normalisation factor to the finished gradients, which
        # would scale the z-loss gradient too: know the weights first instead (sft: factor 1)
        if z_loss > 0 and cfg.self_normalize and cfg.mode != "sft":
            two_phase = True
    if not need_grad or two_phase:
        rs = ops.logprobs(h, W, b, y, chunk_rows, xf, want_entropy and not need_grad)
        logp = rs.logp
        weights = compute_weights(None if ref is None else logp - ref, seg, S, cfg, quality)
        if not need_grad:
            return _result(logp, weights, D, None, None, None, rs.lse, rs.top1, rs.entropy,
                           z_loss)
        coef = weights.row / D

    dh = torch.empty_like(h) if need_dh else None
    dw = torch.zeros(W.shape, dtype=torch.float32, device=W.device) if need_dw else None
    db = torch.zeros(W.shape[0], dtype=torch.float32, device=W.device) if need_db else None
    dev = h.device
    logp_all = torch.empty(M, dtype=torch.float32, device=dev)
    lse_all = torch.empty(M, dtype=torch.float32, device=dev)
    top1_all = torch.empty(M, dtype=torch.bool, device=dev)
    ent_all = torch.empty(M, dtype=torch.float32, device=dev) if want_entropy else None
    # one logits buffer for every chunk of the call (CPU; see torch_ops.chunk_logits)
    buf = logits_buffer(max((e - s for s, e in zip(bounds[:-1], bounds[1:])), default=0),
                        W.shape[0], h.device)
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e <= s:
            continue
        hc, yc = h[s:e], y[s:e]
        r = ops.logits(hc, W, b, None if buf is None else buf[: e - s])
        rows, state = ops.chunk_forward(r, yc, xf, want_entropy)
        lp = rows.logp
        logp_all[s:e] = lp
        lse_all[s:e] = rows.lse
        top1_all[s:e] = rows.top1
        if want_entropy:
            ent_all[s:e] = rows.entropy
        if coef is not None:
            c = coef[s:e]
        else:
            d = None if ref is None else lp - ref[s:e]
            c = compute_weights(d, seg[s:e], S, cfg, quality, normalize=False,
                                with_stats=False).row / D
        zc = (2.0 * z_loss / D) * rows.lse if z_loss > 0 else None
        g = ops.softmax_grad(state, yc, rows, c, zc, xf, W.dtype)
        if need_dh:
            dh[s:e] = ops.grad_hidden(g, W)
        if need_dw:
            ops.accum_grad_weight(dw, g, hc)
        if need_db:
            db += g.sum(0, dtype=torch.float32)
        del g, state, r

    if weights is None:
        logp = logp_all
        weights = compute_weights(None if ref is None else logp - ref, seg, S, cfg, quality)
        if cfg.self_normalize:  # chunks used unnormalised weights (no z-loss here, see above)
            for t_ in (dh, dw, db):
                if t_ is not None:
                    t_.mul_(weights.norm.to(t_.dtype))
    # two-phase: logp and the weights from the log-prob pass; lse / top1 / entropy (and the
    # z-loss, consistent with its gradient) from the gradient pass
    return _result(logp, weights, D, dh, dw, db, lse_all, top1_all, ent_all, z_loss)


def _result(logp, weights, D, dh, dw, db, lse, top1, entropy, z_loss) -> FusedResult:
    loss = -(weights.row * logp).sum() / D
    if z_loss > 0:
        zterm = (z_loss / D) * lse.double().square().sum().float()
        loss = loss + zterm
    else:
        zterm = torch.zeros((), dtype=torch.float32, device=logp.device)
    return FusedResult(logp, weights, loss, dh, dw, db, lse=lse, top1=top1, entropy=entropy,
                       z_loss=zterm.detach())
