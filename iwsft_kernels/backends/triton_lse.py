"""Phase 1 kernel: per-row logsumexp, target logit (and optionally the entropy sum S1) of
z = xf(h W^T + b), no logits in memory.

For a block of BLOCK_M rows and one split of the vocabulary, the program walks vocabulary
tiles of BLOCK_N columns; each raw tile r[BLOCK_M, BLOCK_N] = sum_k h[:, k] W[n, k] (+ b) is
built in registers (fp32 accumulator over BLOCK_K steps), transformed in registers to
z = xf(r) (scale / soft cap / temperature, triton_epilogue.apply_transform), then folded into
a running
  m_i = max_j z_ij,   r_i = sum_j exp(z_ij - m_i) over all j but ONE arg-max entry
(online logsumexp that never adds the arg-max's exact 1 into the sum: the softmax
denominator is 1 + r_i, never rounded; see triton_epilogue.merge_max_rest), and the target
logit t_i = z_i[y_i] is picked out of the tile that holds column y_i. With WANT_ENTROPY the
running S1_i = sum_j exp(z_ij - m_i)(z_ij - m_i) is carried beside r_i (one extra
multiply-add per element; merge rule in triton_epilogue.merge_stats).
Partial (m, r, t[, S1]) per split are written to (SPLITS, M) buffers and merged on the host
side with the same rule: the split k holding the max keeps its r and S1, every other split
adds its full sum (1 + r_s) exp(m_s - m_i) (exactly 1 + r_s on a tie) and its rebased
exp(m_s - m_i) (S1_s + (m_s - m_i)(1 + r_s)), t_i = sum_s t_si, and
  lse_i = m_i + log1p(r_i),  logp_i = (t_i - m_i) - log1p(r_i),  top1_i = (t_i == m_i)
which stays exact to fp32 relative rounding as p_y -> 1 (log(sum) would quantise logp to
multiples of 2^-24 and give exactly 0 for 1 - p_y < 6e-8).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..config import LogitTransform
from .rows import RowStats
from .triton_configs import aligned16, dot_precision, interpreting, lse_config, lse_num_splits
from .triton_epilogue import (apply_transform, merge_max_rest, merge_stats, rows_from, tile_max_rest,
                              tile_stats, xf_args)


@triton.jit
def _lse_forward_kernel(
    H, W, B, Y, M_out, S_out, T_out, E_out,
    M, V, K, stride_hm, stride_wv, tiles_per_split, n_tiles, xa, xb,
    HAS_BIAS: tl.constexpr, XF_MODE: tl.constexpr, WANT_ENTROPY: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < M
    y = tl.load(Y + offs_m, mask=row_ok, other=-1)
    h_rows = H + offs_m.to(tl.int64)[:, None] * stride_hm

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    s_i = tl.full([BLOCK_M], -1.0, tl.float32)  # (-inf, -1): the empty partial
    t_i = tl.zeros([BLOCK_M], tl.float32)
    e_i = tl.zeros([BLOCK_M], tl.float32)  # S1 (WANT_ENTROPY)
    tile_lo = pid_s * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, n_tiles)
    for tile in range(tile_lo, tile_hi):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = offs_n < V
        w_rows = W + offs_n.to(tl.int64)[:, None] * stride_wv
        z = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            h = tl.load(h_rows + offs_k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_rows + offs_k[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            if UPCAST:  # the interpreter's 16-bit tl.dot is wrong (Triton 3.6)
                h = h.to(tl.float32)
                w = w.to(tl.float32)
            z = tl.dot(h, tl.trans(w), z, input_precision=PRECISION)
        if HAS_BIAS:
            z += tl.load(B + offs_n, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        z = apply_transform(z, xa, xb, XF_MODE)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        if WANT_ENTROPY:
            # the target first: z dies inside tile_stats (fewer live tiles)
            t_i += tl.sum(tl.where(offs_n[None, :] == y[:, None], z, 0.0), axis=1)
            t_max, t_rest, t_s1 = tile_stats(z, 1, True)
            m_i, s_i, e_i = merge_stats(m_i, s_i, e_i, t_max, t_rest, t_s1, True)
        else:
            t_max, t_rest = tile_max_rest(z, 1)
            m_i, s_i = merge_max_rest(m_i, s_i, t_max, t_rest)
            t_i += tl.sum(tl.where(offs_n[None, :] == y[:, None], z, 0.0), axis=1)
    out = pid_s * M + offs_m
    tl.store(M_out + out, m_i, mask=row_ok)
    tl.store(S_out + out, s_i, mask=row_ok)
    tl.store(T_out + out, t_i, mask=row_ok)
    if WANT_ENTROPY:
        tl.store(E_out + out, e_i, mask=row_ok)


def lse_rows(h: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None, y: torch.Tensor,
             xf: LogitTransform | None = None, want_entropy: bool = False) -> RowStats:
    """RowStats (logp, lse, top1[, entropy]) of z = xf(h W^T + b), fp32, for h (M, H),
    W (V, H), y in [0, V): the fused tile kernel, no logits in memory."""
    return rows_from(*lse_partials(h, W, b, y, xf, want_entropy))


def lse_partials(h: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None, y: torch.Tensor,
                 xf: LogitTransform | None = None, want_entropy: bool = False):
    """Per row of z = xf(h W^T + b): (max, rest, target logit, S1 or None), fp32, merged over
    the kernel's vocabulary splits; y in [0, V), or < 0 for a target outside W's rows (its
    target logit is then 0: the vocabulary-parallel merge sums the shards' target logits)."""
    M, K = h.shape
    V = W.shape[0]
    h = h.contiguous()
    W = W.contiguous()
    args = xf_args(xf)
    want_entropy = bool(want_entropy)
    precision = dot_precision(W.dtype)
    aligned = aligned16((h, W, b), (K, h.stride(0), W.stride(0)))
    cfg = lse_config(W.dtype, aligned=aligned, precision=precision, entropy=want_entropy)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    m_blocks = triton.cdiv(M, bm)
    n_tiles = triton.cdiv(V, bn)
    splits = lse_num_splits(m_blocks, n_tiles, h.device)
    tiles_per_split = triton.cdiv(n_tiles, splits)
    splits = triton.cdiv(n_tiles, tiles_per_split)  # every split gets >= 1 tile
    part = torch.empty(4 if want_entropy else 3, splits, M, dtype=torch.float32,
                       device=h.device)
    if M:
        _lse_forward_kernel[(m_blocks, splits)](
            h, W, b if b is not None else h, y, part[0], part[1], part[2], part[-1],
            M, V, K, h.stride(0), W.stride(0), tiles_per_split, n_tiles,
            args["xa"], args["xb"],
            HAS_BIAS=b is not None, XF_MODE=args["XF_MODE"], WANT_ENTROPY=want_entropy,
            UPCAST=interpreting(), PRECISION=precision,
            **cfg,
        )
    m, r, t = part[0], part[1], part[2]
    mx, top = m.max(dim=0, keepdim=True)
    empty = m == float("-inf")
    scale = torch.where(empty, 0.0, torch.exp(m - mx))
    full = (r + 1.0) * scale
    full.scatter_(0, top, r.gather(0, top))  # the split holding the max keeps its rest
    s1 = None
    if want_entropy:  # rebased S1 of every split (the max split: scale 1, m - mx = 0)
        s1 = torch.where(empty, 0.0, scale * (part[3] + (m - mx) * (r + 1.0))).sum(dim=0)
    return mx.squeeze(0), full.sum(dim=0), t.sum(dim=0), s1


def lse_forward(h: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None, y: torch.Tensor,
                xf: LogitTransform | None = None):
    """(lse, logp) (M,) fp32 of z = xf(h W^T + b) (lse_rows without top1 / entropy)."""
    rows = lse_rows(h, W, b, y, xf)
    return rows.lse, rows.logp
