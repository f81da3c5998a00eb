"""The Triton backend's ops (same interface as torch_ops.TorchOps).

  logprobs          fused tile kernel (triton_lse.py): no logits in memory (phase 1 and
                    linear_logprobs)
  logits            cuBLAS GEMM of one chunk, fp32 output where torch supports it on CUDA
  chunk_forward     row logsumexp + target logit over the chunk (triton_epilogue.py)
  softmax_grad      G = c (softmax - onehot), fp32 arithmetic, written in the compute dtype
  grad_hidden       cuBLAS dH = G W
  accum_grad_weight fp32 dW += G^T h (triton_grad_weight.py for 16-bit, addmm_ for fp32)
"""

from __future__ import annotations

import torch

from . import triton_epilogue, triton_grad_weight, triton_lse

_MM_FP32_OUT: dict = {}  # device type -> whether torch.mm(..., out_dtype=float32) works


def _mm_fp32_out(h, Wt):
    ok = _MM_FP32_OUT.get(h.device.type)
    if ok is not False:
        try:
            z = torch.mm(h, Wt, out_dtype=torch.float32)
            _MM_FP32_OUT[h.device.type] = True
            return z
        except (RuntimeError, TypeError, NotImplementedError):
            _MM_FP32_OUT[h.device.type] = False
    return None


class TritonOps:
    name = "triton"

    def logprobs(self, h, W, b, y, rows_per_chunk):
        lse, t = triton_lse.lse_forward(h, W, b, y)
        return (t - lse).clamp_(max=0.0)

    def logits(self, h, W, b):
        z = None
        if h.dtype != torch.float32 and h.device.type == "cuda":
            z = _mm_fp32_out(h, W.T)
            if z is not None and b is not None:
                z += b
        if z is None:
            z = h @ W.T if b is None else torch.addmm(b, h, W.T)
        return z

    def chunk_forward(self, z, y):
        lse, t = triton_epilogue.row_lse(z, y)
        return lse, t, (z, lse)

    def softmax_grad(self, state, y, logp, coef, out_dtype):
        z, lse = state
        return triton_epilogue.softmax_grad(z, y, lse, coef, out_dtype)

    def grad_hidden(self, g, W):
        return g @ W

    def accum_grad_weight(self, dW32, g, h):
        if g.dtype == torch.float32:
            dW32.addmm_(g.T, h)
        else:
            triton_grad_weight.accum_grad_weight(dW32, g, h)
