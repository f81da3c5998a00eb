"""Row-wise kernels over a materialised chunk of RAW logits r (m, V) (one-pass gradient phase),
with the logit transform of config.LogitTransform applied in registers (no (m, V) temporary).

Transform (constexpr XF_MODE, runtime fp32 xa, xb, xg; see xf_args):
  0 identity   z = r
  1 linear     z = xa * r                                  (xa = scale / temperature)
  2 cap        z = xb * tanh(xa * r),  dz/dr = xg * sech^2(xa * r)
               (xa = scale / softcap, xb = softcap / temperature, xg = scale / temperature)
               with u = exp(-2|x|): tanh(x) = sign(x) (1 - u) / (1 + u), sech^2(x) = 4u / (1+u)^2
               (one exp, no 1 - tanh^2 cancellation; saturated |x| gives z = +-xb, dz/dr -> 0)

_row_lse_kernel:      online over BLOCK_V tiles, per row of z: the max m_i, the target logit
                      t_i = z_i[y_i] (0 when y_i < 0: the target is in another vocabulary
                      shard) and rest_i = the sum of exp(z_ij - m_i) over every entry
                      except ONE arg-max entry (which would contribute exactly 1), so the
                      softmax denominator is 1 + rest_i and is never rounded; with
                      WANT_ENTROPY also S1_i = sum_j exp(z_ij - m_i) (z_ij - m_i) (the arg-max
                      entry contributes 0). Then (host, torch.log1p, rows_from):
                      logp = (t - m) - log1p(rest) (exact to fp32 relative rounding as
                      p_y -> 1), lse = m + log1p(rest), top1 = (t == m),
                      entropy = log1p(rest) - S1 / (1 + rest).
_softmax_grad_kernel: G_r = dz/dr * G_z with G_z[j] = C_i exp(z_ij - m_i) / (1 + rest_i) off
                      target and E_i on target (no target entry when y_i < 0: a vocabulary
                      shard without the target; m_i, rest_i may be the merged global ones), where the host folds the z-loss in:
                      C = coef + zcoef, E = coef expm1(logp) + zcoef exp(logp) (p_y - 1
                      without cancellation); fp32 arithmetic, stored in G's dtype (G may alias
                      r when the dtypes match).

The (max, rest, S1) triple of a row is merged tile by tile with merge_stats (also used by the
fused logits kernel in triton_lse.py). Merge rule for S1 (derivation): a partial with max m_a
holds S1_a = sum_j e^{z_j - m_a} (z_j - m_a) over its entries (its arg-max included: term 0).
Rebased on a larger max m, every term is e^{m_a - m} e^{z_j - m_a} ((z_j - m_a) + (m_a - m)),
so summed over the partial's 1 + rest_a weights:
    S1_a -> e^{m_a - m} (S1_a + (m_a - m) (1 + rest_a)).
The side holding the max keeps its S1 (m_a = m); an empty partial (-inf) adds nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..config import IDENTITY, LogitTransform
from .rows import rows_from  # noqa: F401  (re-exported: triton_lse, triton_ops)
from .triton_configs import epilogue_config, padded_row_stride

XF_IDENTITY, XF_LINEAR, XF_CAP = 0, 1, 2


def xf_args(xf: LogitTransform | None) -> dict:
    """Kernel arguments of a logit transform: XF_MODE (constexpr) and the fp32 xa, xb, xg."""
    xf = IDENTITY if xf is None else xf
    if not isinstance(xf, LogitTransform):
        raise TypeError(f"xf must be a config.LogitTransform, got {type(xf).__name__}")
    if xf.identity:
        return dict(XF_MODE=XF_IDENTITY, xa=1.0, xb=1.0, xg=1.0)
    if xf.linear:
        return dict(XF_MODE=XF_LINEAR, xa=xf.factor, xb=1.0, xg=xf.factor)
    return dict(XF_MODE=XF_CAP, xa=xf.scale / xf.softcap, xb=xf.softcap / xf.temperature,
                xg=xf.factor)


@triton.jit
def apply_transform(r, xa, xb, XF_MODE: tl.constexpr):
    """z of raw r (fp32) under the transform (see the module docstring)."""
    if XF_MODE == 0:
        z = r
    elif XF_MODE == 1:
        z = r * xa
    else:
        x = r * xa
        u = tl.exp(-2.0 * tl.abs(x))
        th = (1.0 - u) / (1.0 + u)
        z = tl.where(x < 0.0, -th, th) * xb
    return z


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
def _add2(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def tile_stats(z, AXIS: tl.constexpr, WANT_ENTROPY: tl.constexpr):
    """(max, rest, S1) of a tile along AXIS: tile_max_rest plus
    S1 = sum of exp(z - max) (z - max) (the max entries contribute 0). An all -inf tile gives
    (-inf, -1, 0). Without WANT_ENTROPY: tile_max_rest and S1 = 0."""
    if WANT_ENTROPY:
        t_max = tl.max(z, axis=AXIS)
        d = z - tl.expand_dims(t_max, AXIS)
        top = d == 0.0
        n_top = tl.sum(top.to(tl.float32), axis=AXIS)
        e = tl.exp(d)
        # masked (-inf) entries: e = 0 times a finite clamp of d (0 * -inf would be NaN)
        below, s1 = tl.reduce((tl.where(top, 0.0, e), e * tl.maximum(d, -3.0e38)), AXIS, _add2)
        empty = t_max == float("-inf")
        rest = tl.where(empty, -1.0, below + (n_top - 1.0))
        s1 = tl.where(empty, 0.0, s1)
    else:
        t_max, rest = tile_max_rest(z, AXIS)
        s1 = tl.zeros_like(t_max)
    return t_max, rest, s1


@triton.jit
def merge_stats(m_a, r_a, s_a, m_b, r_b, s_b, WANT_ENTROPY: tl.constexpr):
    """Merge two (max, rest, S1) partials: merge_max_rest for (max, rest); the side with the
    larger max keeps its S1, the other side's S1 is rebased:
    e^{lo - m} (S1 + (lo - m)(1 + rest)). (-inf, -1, 0) is the empty partial. Without
    WANT_ENTROPY: merge_max_rest and S1 = s_a."""
    if WANT_ENTROPY:
        a_big = m_a >= m_b
        m = tl.maximum(m_a, m_b)
        lo = tl.minimum(m_a, m_b)
        empty = lo == float("-inf")
        scale = tl.where(empty, 0.0, tl.exp(lo - m))
        keep = tl.where(a_big, r_a, r_b)
        other = tl.where(a_big, r_b, r_a)
        s_keep = tl.where(a_big, s_a, s_b)
        s_other = tl.where(a_big, s_b, s_a)
        s = s_keep + tl.where(empty, 0.0, scale * (s_other + (lo - m) * (other + 1.0)))
        r = keep + (other + 1.0) * scale
    else:
        m, r = merge_max_rest(m_a, r_a, m_b, r_b)
        s = s_a
    return m, r, s


@triton.jit
def _row_lse_kernel(R, Y, MAX, REST, TGT, S1, V, stride_rm, xa, xb,
                    XF_MODE: tl.constexpr, WANT_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    r_row = R + row.to(tl.int64) * stride_rm
    m = tl.full([1], float("-inf"), tl.float32)
    r = tl.full([1], -1.0, tl.float32)
    s = tl.zeros([1], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        ok = offs < V
        z = apply_transform(tl.load(r_row + offs, mask=ok, other=float("-inf")).to(tl.float32),
                            xa, xb, XF_MODE)
        if XF_MODE == 2:  # the cap maps -inf to -xb: mask after the transform
            z = tl.where(ok, z, float("-inf"))
        t_m, t_r, t_s = tile_stats(z[None, :], 1, WANT_ENTROPY)
        m, r, s = merge_stats(m, r, s, t_m, t_r, t_s, WANT_ENTROPY)
    one = tl.arange(0, 1)
    tl.store(MAX + row + one, m)
    tl.store(REST + row + one, r)
    if WANT_ENTROPY:
        tl.store(S1 + row + one, s)
    # y < 0: the target is outside this chunk's columns (a vocabulary shard that does not
    # hold it): t = 0, the neutral element of the vocabulary-parallel SUM merge
    yv = tl.load(Y + row + one)
    has = yv >= 0
    t = apply_transform(tl.load(r_row + tl.maximum(yv, 0), mask=has, other=0.0).to(tl.float32),
                        xa, xb, XF_MODE)
    tl.store(TGT + row + one, tl.where(has, t, 0.0))


@triton.jit
def _softmax_grad_kernel(R, G, Y, MAX, REST, C, E, V, stride_rm, stride_gm, xa, xb, xg,
                         XF_MODE: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    ok = offs < V
    r = tl.load(R + row.to(tl.int64) * stride_rm + offs, mask=ok, other=0.0).to(tl.float32)
    m = tl.load(MAX + row)
    inv = 1.0 / (1.0 + tl.load(REST + row))
    c = tl.load(C + row)
    y = tl.load(Y + row)
    e = tl.load(E + row)
    if XF_MODE == 0:
        g = tl.where(offs == y, e, c * (tl.exp(r - m) * inv))
    elif XF_MODE == 1:
        g = xg * tl.where(offs == y, e, c * (tl.exp(r * xa - m) * inv))
    else:
        x = r * xa
        u = tl.exp(-2.0 * tl.abs(x))
        inv_1pu = 1.0 / (1.0 + u)
        th = (1.0 - u) * inv_1pu
        z = tl.where(x < 0.0, -th, th) * xb
        sech2 = 4.0 * u * inv_1pu * inv_1pu
        g = (xg * sech2) * tl.where(offs == y, e, c * (tl.exp(z - m) * inv))
    tl.store(G + row.to(tl.int64) * stride_gm + offs, g.to(G.dtype.element_ty), mask=ok)


def logp_from(mx: torch.Tensor, rest: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """logp = (t - max) - log1p(rest), clamped to <= 0 (fp32, torch's accurate log1p)."""
    return ((tgt - mx) - torch.log1p(rest)).clamp_(max=0.0)


def row_stats(r: torch.Tensor, y: torch.Tensor, xf: LogitTransform | None = None,
              want_entropy: bool = False):
    """Per row of the raw logits r (m, V) (fp32 or 16-bit, unit column stride) with
    z = xf(r): (max, rest, target logit, S1 or None), fp32."""
    if r.dim() != 2 or (r.shape[1] > 1 and r.stride(1) != 1):
        raise ValueError(f"logits chunk must be a 2-D tensor with unit column stride, got "
                         f"shape {tuple(r.shape)} strides {tuple(r.stride())}")
    m, V = r.shape
    args = xf_args(xf)
    part = torch.empty(4 if want_entropy else 3, m, dtype=torch.float32, device=r.device)
    if m:
        cfg = epilogue_config()
        _row_lse_kernel[(m,)](r, y, part[0], part[1], part[2], part[-1], V, r.stride(0),
                              args["xa"], args["xb"], XF_MODE=args["XF_MODE"],
                              WANT_ENTROPY=bool(want_entropy), **cfg)
    return part[0], part[1], part[2], (part[3] if want_entropy else None)


def row_lse(r: torch.Tensor, y: torch.Tensor, xf: LogitTransform | None = None):
    """Per row of z = xf(r): (max, rest, logp), fp32; lse = max + log1p(rest)."""
    mx, rest, tgt, _ = row_stats(r, y, xf)
    return mx, rest, logp_from(mx, rest, tgt)


def softmax_grad(r: torch.Tensor, y: torch.Tensor, mx: torch.Tensor, rest: torch.Tensor,
                 coef: torch.Tensor, tgt: torch.Tensor, out_dtype: torch.dtype,
                 xf: LogitTransform | None = None) -> torch.Tensor:
    """G_r (m, V) = dz/dr * G_z: off target coef_i exp(z - m_i) / (1 + rest_i), on target
    tgt_i (the caller's coef expm1(logp) [+ zcoef exp(logp)]); coef here already includes
    any zcoef. Written in out_dtype, in r's memory when the dtypes match."""
    m, V = r.shape
    # a new G gets a row stride padded to 16 elements: the dW kernel then reads aligned rows
    g = r if r.dtype == out_dtype else torch.empty(
        m, padded_row_stride(V), dtype=out_dtype, device=r.device)[:, :V]
    if m:
        args = xf_args(xf)
        cfg = epilogue_config()
        grid = (m, triton.cdiv(V, cfg["BLOCK_V"]))
        _softmax_grad_kernel[grid](r, g, y, mx, rest, coef.float().contiguous(),
                                   tgt.float().contiguous(), V, r.stride(0), g.stride(0),
                                   args["xa"], args["xb"], args["xg"],
                                   XF_MODE=args["XF_MODE"], **cfg)
    return g
