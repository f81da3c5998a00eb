"""Row-wise kernels over a materialised logits chunk z (m, V) (one-pass gradient phase).

_row_lse_kernel:      lse_i = m_i + log s_i (online max m and sum s over BLOCK_V tiles) and
                      logp_i = (z_i[y_i] - m_i) - log s_i (max subtracted first: no
                      cancellation at |z| * 2^-24 when p_y -> 1).
_softmax_grad_kernel: G_ij = c_i * exp(z_ij - lse_i) off target, c_i * e_i on target where
                      e_i = expm1(logp_i) = p_y - 1 computed without cancellation; fp32
                      arithmetic, stored in G's dtype (G may alias z when the dtypes match).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_configs import epilogue_config, padded_row_stride


@triton.jit
def _row_lse_kernel(Z, Y, LSE, LOGP, V, stride_zm, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    z_row = Z + row.to(tl.int64) * stride_zm
    m = float("-inf")
    s = 0.0
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        z = tl.load(z_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    y = tl.load(Y + row)
    log_s = tl.log(s)
    tl.store(LSE + row, m + log_s)
    tl.store(LOGP + row, tl.minimum((tl.load(z_row + y).to(tl.float32) - m) - log_s, 0.0))


@triton.jit
def _softmax_grad_kernel(Z, G, Y, LSE, C, E, V, stride_zm, stride_gm, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    ok = offs < V
    z = tl.load(Z + row.to(tl.int64) * stride_zm + offs, mask=ok, other=0.0).to(tl.float32)
    lse = tl.load(LSE + row)
    c = tl.load(C + row)
    y = tl.load(Y + row)
    e = tl.load(E + row)
    g = c * tl.where(offs == y, e, tl.exp(z - lse))
    tl.store(G + row.to(tl.int64) * stride_gm + offs, g.to(G.dtype.element_ty), mask=ok)


def row_lse(z: torch.Tensor, y: torch.Tensor):
    m, V = z.shape
    lse = torch.empty(m, dtype=torch.float32, device=z.device)
    logp = torch.empty_like(lse)
    if m:
        cfg = epilogue_config()
        _row_lse_kernel[(m,)](z, y, lse, logp, V, z.stride(0), **cfg)
    return lse, logp


def softmax_grad(z: torch.Tensor, y: torch.Tensor, lse: torch.Tensor, coef: torch.Tensor,
                 tgt: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    m, V = z.shape
    # a new G gets a row stride padded to 16 elements: the dW kernel then reads aligned rows
    g = z if z.dtype == out_dtype else torch.empty(
        m, padded_row_stride(V), dtype=out_dtype, device=z.device)[:, :V]
    if m:
        cfg = epilogue_config()
        grid = (m, triton.cdiv(V, cfg["BLOCK_V"]))
        _softmax_grad_kernel[grid](z, g, y, lse, coef.float().contiguous(),
                                   tgt.float().contiguous(), V, z.stride(0),
                                   g.stride(0), **cfg)
    return g
