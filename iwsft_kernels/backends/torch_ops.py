"""The torch backend's ops: plain torch twins of each Triton kernel, on any device.

Shapes: h (m, H) compute dtype; W (V, H); b (V,) or None; y (m,) int64 in [0, V).
A logits chunk is (m, V). All softmax arithmetic is fp32.
"""

from __future__ import annotations

import torch


class TorchOps:
    name = "torch"

    # -- logits of one chunk -------------------------------------------------------------
    def logits(self, h, W, b):
        """z = h W^T + b as an fp32 (m, V) tensor that the caller owns (may be overwritten)."""
        z = h @ W.T if b is None else torch.addmm(b, h, W.T)
        return z if z.dtype == torch.float32 else z.float()

    def logprobs(self, h, W, b, y, rows_per_chunk):
        """logp_i = z_i[y_i] - lse_i for all rows, one chunk of logits at a time (no grad)."""
        out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        for s in range(0, h.shape[0], rows_per_chunk):
            e = min(s + rows_per_chunk, h.shape[0])
            lse, t, _ = self.chunk_forward(self.logits(h[s:e], W, b), y[s:e])
            out[s:e] = t - lse
        return out.clamp_(max=0.0)

    # -- one-pass chunk: lse, then the weighted softmax-minus-onehot gradient --------------
    def chunk_forward(self, z, y):
        """Consumes z (fp32, owned). Returns (lse, t, state) where state lets softmax_grad
        finish without recomputing: z now holds exp(z - max) and the row sums."""
        t = z.gather(1, y[:, None]).squeeze(1)
        mx = z.amax(dim=1)
        z.sub_(mx[:, None]).exp_()
        s = z.sum(dim=1)
        return mx + s.log(), t, (z, s)

    def softmax_grad(self, state, y, logp, coef, out_dtype):
        """G = coef_i * (softmax_i - onehot(y_i)), fp32 arithmetic; the target entry is
        coef_i * expm1(logp_i) (exact when p_y -> 1). Returns G in fp32 (owned, reused z)."""
        e, s = state
        g = e.mul_((coef / s)[:, None])
        g.scatter_(1, y[:, None], (coef * torch.expm1(logp))[:, None])
        return g

    # -- gradient GEMMs -----------------------------------------------------------------------
    def grad_hidden(self, g, W):
        """dH = G W in the compute dtype."""
        return (g if g.dtype == W.dtype else g.to(W.dtype)) @ W

    def accum_grad_weight(self, dW32, g, h):
        """dW32 += G^T h, fp32 accumulation, no (V, H) temporary."""
        dW32.addmm_(g.T, h if h.dtype == torch.float32 else h.float())
