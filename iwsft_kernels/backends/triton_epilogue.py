"""Row-wise kernels over a materialised logits chunk z (m, V) (one-pass gradient phase).

_row_lse_kernel:      online over BLOCK_V tiles, per row: the max m_i, the target logit
                      z_i[y_i] and rest_i = the sum of exp(z_ij - m_i) over every entry
                      except ONE arg-max entry (which would contribute exactly 1), so the
                      softmax denominator is 1 + rest_i and is never rounded. Then (host,
                      torch.log1p) logp_i = (z_i[y_i] - m_i) - log1p(rest_i): exact to fp32
                      relative rounding as p_y -> 1 (log(1 + rest) would quantise logp to
                      multiples of 2^-24, and give exactly 0 for 1 - p_y < 6e-8).
_softmax_grad_kernel: G_ij = c_i * exp(z_ij - m_i) / (1 + rest_i) off target, c_i * e_i on
                      target where e_i = expm1(logp_i) = p_y - 1 computed without
                      cancellation; fp32 arithmetic, stored in G's dtype (G may alias z when
                      the dtypes match).

The (max, rest) pair of a row is merged tile by tile with merge_max_rest (also used by the
fused logits kernel in triton_lse.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_configs import epilogue_config, padded_row_stride


@triton.jit
def tile_max_rest(z, AXIS: tl.constexpr):
    """(max, rest) of a tile along AXIS: rest = sum of exp(z - max) over the entries below the
    max plus (number of entries equal to the max) - 1, i.e. the sum without one arg-max
    entry. A tile that is all -inf gives (-inf, -1): an empty sum (1 + rest = 0)."""
    t_max = tl.max(z, axis=AXIS)
    t_max_b = tl.expand_dims(t_max, AXIS)
    top = z == t_max_b
    below = tl.sum(tl.where(top, 0.0, tl.exp(z - t_max_b)), axis=AXIS)
    n_top = tl.sum(top.to(tl.float32), axis=AXIS)
    rest = tl.where(t_max == float("-inf"), -1.0, below + (n_top - 1.0))
    return t_max, rest


@triton.jit
def merge_max_rest(m_a, r_a, m_b, r_b):
    """Merge two (max, rest) partials: the side with the larger max keeps its rest (its
    arg-max is the one left out); the other side's full sum 1 + rest is rescaled and added
    (on a tie: scale 1, so the other side's arg-max contributes exactly 1). (-inf, -1) is
    the empty partial."""
    a_big = m_a >= m_b
    m = tl.maximum(m_a, m_b)
    lo = tl.minimum(m_a, m_b)
    scale = tl.where(lo == float("-inf"), 0.0, tl.exp(lo - m))
    keep = tl.where(a_big, r_a, r_b)
    other = tl.where(a_big, r_b, r_a)
    return m, keep + (other + 1.0) * scale


@triton.jit
def _row_lse_kernel(Z, Y, MAX, REST, TGT, V, stride_zm, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    z_row = Z + row.to(tl.int64) * stride_zm
    m = tl.full([1], float("-inf"), tl.float32)
    r = tl.full([1], -1.0, tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        z = tl.load(z_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        t_m, t_r = tile_max_rest(z[None, :], 1)
        m, r = merge_max_rest(m, r, t_m, t_r)
    one = tl.arange(0, 1)
    tl.store(MAX + row + one, m)
    tl.store(REST + row + one, r)
    tl.store(TGT + row + one, tl.load(z_row + tl.load(Y + row) + one).to(tl.float32))


@triton.jit
def _softmax_grad_kernel(Z, G, Y, MAX, REST, C, E, V, stride_zm, stride_gm,
                         BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    ok = offs < V
    z = tl.load(Z + row.to(tl.int64) * stride_zm + offs, mask=ok, other=0.0).to(tl.float32)
    m = tl.load(MAX + row)
    inv = 1.0 / (1.0 + tl.load(REST + row))
    c = tl.load(C + row)
    y = tl.load(Y + row)
    e = tl.load(E + row)
    g = c * tl.where(offs == y, e, tl.exp(z - m) * inv)
    tl.store(G + row.to(tl.int64) * stride_gm + offs, g.to(G.dtype.element_ty), mask=ok)


def logp_from(mx: torch.Tensor, rest: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """logp = (z_y - max) - log1p(rest), clamped to <= 0 (fp32, torch's accurate log1p)."""
    return ((tgt - mx) - torch.log1p(rest)).clamp_(max=0.0)


def row_lse(z: torch.Tensor, y: torch.Tensor):
    """Per row of z (m, V): (max, rest, logp), fp32; lse = max + log1p(rest)."""
    m, V = z.shape
    part = torch.empty(3, m, dtype=torch.float32, device=z.device)
    if m:
        cfg = epilogue_config()
        _row_lse_kernel[(m,)](z, y, part[0], part[1], part[2], V, z.stride(0), **cfg)
    mx, rest, tgt = part
    return mx, rest, logp_from(mx, rest, tgt)


def softmax_grad(z: torch.Tensor, y: torch.Tensor, mx: torch.Tensor, rest: torch.Tensor,
                 coef: torch.Tensor, tgt: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    m, V = z.shape
    # a new G gets a row stride padded to 16 elements: the dW kernel then reads aligned rows
    g = z if z.dtype == out_dtype else torch.empty(
        m, padded_row_stride(V), dtype=out_dtype, device=z.device)[:, :V]
    if m:
        cfg = epilogue_config()
        grid = (m, triton.cdiv(V, cfg["BLOCK_V"]))
        _softmax_grad_kernel[grid](z, g, y, mx, rest, coef.float().contiguous(),
                                   tgt.float().contiguous(), V, z.stride(0),
                                   g.stride(0), **cfg)
    return g
