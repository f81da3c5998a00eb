"""The Triton backend's ops (the interface of docs/design.md, same as torch_ops.TorchOps).

xf is a config.LogitTransform (scale, soft cap, temperature), applied in registers from the
raw logits r = h W^T + b by every kernel (no (m, V) temporary); the outputs and the softmax
are those of z = xf(r), the gradient is returned w.r.t. r.

  logprobs          fused tile kernel (triton_lse.py): no logits in memory (phase 1 and
                    linear_logprobs); RowStats (logp, lse, top1[, entropy])
  logits            cuBLAS GEMM of one chunk, fp32 raw output (torch_ops.chunk_logits)
  chunk_forward     row (max, rest = sum without one arg-max[, S1]) + target logit of z over
                    the chunk (triton_epilogue.py); logp = (z_y - max) - log1p(rest)
  softmax_grad      G_r = dz/dr * (coef (softmax - onehot) + zcoef softmax), fp32 arithmetic,
                    written in the compute dtype (in r's memory when the dtypes match)
  grad_hidden       cuBLAS dH = G W
  accum_grad_weight fp32 dW += G^T h (triton_grad_weight.py for 16-bit, addmm_ for fp32)
  partials, logprob_partials, softmax_grad_merged
                    the vocabulary-parallel pieces (raw per-shard row partials and the
                    gradient from merged global stats; backends/vocab_merge.py)
"""

from __future__ import annotations

import torch

from ..config import IDENTITY
from . import triton_epilogue, triton_grad_weight, triton_lse
from .rows import RowStats, rows_from
from .torch_ops import chunk_logits


def _row_vector(name: str, t, m: int, device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != (m,):
        raise ValueError(f"{name} must have shape ({m},) (one value per row), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, the logits on {device}")
    return t.float()


class TritonOps:
    name = "triton"
    softcap_extra_buffers = 0  # the transform is applied in registers: no (m, V) buffer

    def logprobs(self, h, W, b, y, rows_per_chunk, xf=IDENTITY, want_entropy=False) -> RowStats:
        return triton_lse.lse_rows(h, W, b, y, xf, want_entropy)

    def logits(self, h, W, b, out=None):
        return chunk_logits(h, W, b, out)

    def chunk_forward(self, r, y, xf=IDENTITY, want_entropy=False):
        """Row stats of z = xf(r) for the raw fp32 chunk r (kept unchanged: softmax_grad
        reads it again); state = (r, max, rest)."""
        mx, rest, tgt, s1 = triton_epilogue.row_stats(r, y, xf, want_entropy)
        return rows_from(mx, rest, tgt, s1), (r, mx, rest)

    def softmax_grad(self, state, y, rows, coef, zcoef=None, xf=IDENTITY,
                     out_dtype=torch.float32):
        """G_r = dz/dr * G_z, G_z = coef (softmax - onehot) + zcoef softmax. The target entry
        coef (p_y - 1) + zcoef p_y = coef expm1(logp) + zcoef exp(logp): exact when p_y -> 1
        (logp is exact there: its denominator 1 + rest is never rounded); off target the
        kernel scales softmax by coef + zcoef."""
        r, mx, rest = state
        return self.softmax_grad_merged(r, y, mx, rest, rows.logp, coef, zcoef, xf, out_dtype)

    # -- vocabulary-parallel pieces (backends/vocab_merge.py merges the shards' partials) ----
    def partials(self, r, y, xf=IDENTITY, want_entropy=False):
        """((max, rest, target logit, S1 or None), state) of z = xf(r) over this shard's
        columns; y local, < 0 where the target is in another shard (target logit 0)."""
        return triton_epilogue.row_stats(r, y, xf, want_entropy), r

    def logprob_partials(self, h, W, b, y, rows_per_chunk, xf=IDENTITY, want_entropy=False):
        """partials of every row through the fused tile kernel (no logits in memory)."""
        return triton_lse.lse_partials(h, W, b, y, xf, want_entropy)

    def softmax_grad_merged(self, state, y, mx, rest, logp, coef, zcoef=None, xf=IDENTITY,
                            out_dtype=torch.float32):
        """softmax_grad with the row's (max, rest) and logp given (the merged global ones
        under vocabulary parallelism); no target entry where y < 0."""
        r = state
        m = r.shape[0]
        c = _row_vector("coef", coef, m, r.device)
        e = c * torch.expm1(logp)
        if zcoef is not None:
            zc = _row_vector("zcoef", zcoef, m, r.device)
            e = e + zc * torch.exp(logp)
            c = c + zc
        return triton_epilogue.softmax_grad(r, y, mx, rest, c, e, out_dtype, xf)

    def grad_hidden(self, g, W):
        # G may be a column view of a row-padded buffer (triton_epilogue.softmax_grad). torch's
        # CPU bf16/fp16 GEMM (the interpreter's path) reads the padding of such an operand, and
        # that memory is uninitialised (NaN garbage gave NaN rows of dH, torch 2.13): on CPU
        # multiply a contiguous copy. cuBLAS honours the stride.
        if g.device.type == "cpu" and not g.is_contiguous():
            g = g.contiguous()
        return g @ W

    def accum_grad_weight(self, dW32, g, h):
        if g.dtype == torch.float32:
            dW32.addmm_(g.T, h)
        else:
            triton_grad_weight.accum_grad_weight(dW32, g, h)
