"""The Triton backend's ops (same interface as torch_ops.TorchOps).

  logprobs          fused tile kernel (triton_lse.py): no logits in memory (phase 1 and
                    linear_logprobs)
  logits            cuBLAS GEMM of one chunk, fp32 output (torch_ops.chunk_logits)
  chunk_forward     row (max, rest = sum without one arg-max) + target logit over the chunk
                    (triton_epilogue.py); logp = (z_y - max) - log1p(rest)
  softmax_grad      G = c (softmax - onehot), fp32 arithmetic, written in the compute dtype
  grad_hidden       cuBLAS dH = G W
  accum_grad_weight fp32 dW += G^T h (triton_grad_weight.py for 16-bit, addmm_ for fp32)
"""

from __future__ import annotations

import torch

from ..config import IDENTITY
from . import triton_epilogue, triton_grad_weight, triton_lse  # noqa: F401
from .rows import RowStats
from .torch_ops import TorchOps, chunk_logits, chunked_logprobs  # SHIM(H1): TorchOps, chunked_logprobs


class TritonOps:
    name = "triton"
    # SHIM(H1): a softcap goes to the torch ops below, which allocate one dz/dr buffer
    softcap_extra_buffers = 1

    # SHIM(H1): the Triton kernels predate the logit transforms / fused outputs / z-loss.
    # logprobs: no transform and no entropy -> the fused triton_lse kernel, launched by
    # _fused_row_stats (a copy of triton_lse.lse_forward's host code that also returns top1
    # from the merged row max and target logit); else chunk by chunk (logits GEMM +
    # chunk_forward).
    # chunk_forward: no cap and no entropy -> the row_lse kernel on z = f r (scaled in place),
    # lse and top1 from its max plus a gathered target logit; else the torch ops on the chunk.
    # softmax_grad: the kernel with the z-loss and a constant dz/dr folded into the per-row
    # coefficient and the target entry written afterwards; torch state -> the torch ops.
    # Drop when the Triton kernels implement the new interface.
    def _torch_ops(self):
        if getattr(self, "_torch", None) is None:
            self._torch = TorchOps()  # one instance per call: its dz/dr buffer is reused
        return self._torch

    def logprobs(self, h, W, b, y, rows_per_chunk, xf=IDENTITY, want_entropy=False):
        if xf.identity and not want_entropy:
            return _fused_row_stats(h, W, b, y)
        return chunked_logprobs(self, h, W, b, y, rows_per_chunk, xf, want_entropy)

    def logits(self, h, W, b, out=None):
        return chunk_logits(h, W, b, out)

    def chunk_forward(self, z, y, xf=IDENTITY, want_entropy=False):
        if not xf.linear or want_entropy or z.dtype != torch.float32:
            rows, st = self._torch_ops().chunk_forward(z, y, xf, want_entropy)
            return rows, ("torch", st)
        if not xf.identity:
            z.mul_(xf.factor)
        t = z.gather(1, y[:, None]).squeeze(1)
        mx, rest, logp = triton_epilogue.row_lse(z, y)
        rows = RowStats(logp=logp, lse=mx + torch.log1p(rest), top1=t == mx)
        return rows, (z, mx, rest, 1.0 if xf.identity else xf.factor)

    def softmax_grad(self, state, y, rows, coef, zcoef=None, xf=IDENTITY,
                     out_dtype=torch.float32):
        if isinstance(state[0], str):
            return self._torch_ops().softmax_grad(state[1], y, rows, coef, zcoef, xf, out_dtype)
        z, mx, rest, k = state
        lp = rows.logp
        c = coef if zcoef is None else coef + zcoef
        if k != 1.0:
            c = c * k
        # target entry c * (p_y - 1) = c * expm1(logp): exact when p_y -> 1 (logp is exact
        # there: its denominator 1 + rest is never rounded, see triton_epilogue.py)
        g = triton_epilogue.softmax_grad(z, y, mx, rest, c, torch.expm1(lp), out_dtype)
        if zcoef is not None:
            tgt = (coef * torch.expm1(lp) + zcoef * torch.exp(lp)) * k
            g.scatter_(1, y[:, None], tgt.to(g.dtype)[:, None])
        return g

    def grad_hidden(self, g, W):
        if g.dtype != W.dtype:  # SHIM(H1): the torch fallback's G is fp32
            return g.to(W.dtype) @ W
        # G may be a column view of a row-padded buffer (triton_epilogue.softmax_grad). torch's
        # CPU bf16/fp16 GEMM (the interpreter's path) reads the padding of such an operand, and
        # that memory is uninitialised (NaN garbage gave NaN rows of dH, torch 2.13): on CPU
        # multiply a contiguous copy. cuBLAS honours the stride.
        if g.device.type == "cpu" and not g.is_contiguous():
            g = g.contiguous()
        return g @ W

    def accum_grad_weight(self, dW32, g, h):  # SHIM(H1): h.float() for the fp32 torch G
        if g.dtype == torch.float32:
            dW32.addmm_(g.T, h if h.dtype == torch.float32 else h.float())
        else:
            triton_grad_weight.accum_grad_weight(dW32, g, h)


def _fused_row_stats(h, W, b, y) -> RowStats:  # SHIM(H1): triton_lse.lse_forward + top1
    M, K = h.shape
    V = W.shape[0]
    h = h.contiguous()
    W = W.contiguous()
    tl_ = triton_lse
    precision = tl_.dot_precision(W.dtype)
    aligned = tl_.aligned16((h, W, b), (K, h.stride(0), W.stride(0)))
    cfg = tl_.lse_config(W.dtype, aligned=aligned, precision=precision)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    m_blocks = tl_.triton.cdiv(M, bm)
    n_tiles = tl_.triton.cdiv(V, bn)
    splits = tl_.lse_num_splits(m_blocks, n_tiles, h.device)
    tiles_per_split = tl_.triton.cdiv(n_tiles, splits)
    splits = tl_.triton.cdiv(n_tiles, tiles_per_split)
    part = torch.empty(3, splits, M, dtype=torch.float32, device=h.device)
    if M:
        tl_._lse_forward_kernel[(m_blocks, splits)](
            h, W, b if b is not None else h, y, part[0], part[1], part[2],
            M, V, K, h.stride(0), W.stride(0), tiles_per_split, n_tiles,
            HAS_BIAS=b is not None, UPCAST=tl_.interpreting(), PRECISION=precision, **cfg)
    m, r, t = part
    mx, top = m.max(dim=0, keepdim=True)
    full = (r + 1.0) * torch.where(m == float("-inf"), 0.0, torch.exp(m - mx))
    full.scatter_(0, top, r.gather(0, top))
    log_s = torch.log1p(full.sum(dim=0))
    mx = mx.squeeze(0)
    t = t.sum(dim=0)
    return RowStats(logp=((t - mx) - log_s).clamp_(max=0.0), lse=mx + log_s, top1=t == mx)
