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

from . import triton_epilogue, triton_grad_weight, triton_lse
from .torch_ops import chunk_logits


class TritonOps:
    name = "triton"

    def logprobs(self, h, W, b, y, rows_per_chunk):
        return triton_lse.lse_forward(h, W, b, y)[1]

    def logits(self, h, W, b, out=None):
        return chunk_logits(h, W, b, out)

    def chunk_forward(self, z, y):
        mx, rest, logp = triton_epilogue.row_lse(z, y)
        return logp, (z, mx, rest)

    def softmax_grad(self, state, y, logp, coef, out_dtype):
        z, mx, rest = state
        # target entry c * (p_y - 1) = c * expm1(logp): exact when p_y -> 1 (logp is exact
        # there: its denominator 1 + rest is never rounded, see triton_epilogue.py)
        return triton_epilogue.softmax_grad(z, y, mx, rest, coef, torch.expm1(logp), out_dtype)

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
