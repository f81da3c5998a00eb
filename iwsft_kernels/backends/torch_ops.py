"""The torch backend's ops: plain torch twins of each Triton kernel, on any device.

Shapes: h (m, H) compute dtype; W (V, H); b (V,) or None; y (m,) int64 in [0, V).
A logits chunk is (m, V). All softmax arithmetic is fp32.
"""

from __future__ import annotations

import torch


_MM_FP32_OUT: dict = {}  # device type -> whether torch.mm(..., out_dtype=float32) works
_UPCAST_BLOCK_BYTES = 32 * 2**20


def chunk_logits(h, W, b, out=None):
    """z = h W^T + b as an fp32 (m, V) tensor that the caller owns (may overwrite).

    16-bit inputs: the product is accumulated in fp32 and *not* rounded to 16 bits (bf16
    logits carry ~0.05 absolute error at |z| ~ 10, which wrecks peaked softmaxes). On CUDA
    through torch.mm(..., out_dtype=float32) where torch has it; elsewhere by upcasting W one
    vocabulary block at a time (no fp32 copy of W).

    out: optional contiguous fp32 (m, V) buffer to write z into on CPU (the chunk driver
    reuses one buffer for all chunks of a call: a fresh allocation per chunk lets glibc's
    malloc keep two chunks resident once its mmap threshold has grown past the chunk size).
    Ignored on CUDA (the caching allocator reuses blocks)."""
    if out is not None and (out.device.type != "cpu" or out.shape != (h.shape[0], W.shape[0])
                            or out.dtype != torch.float32 or not out.is_contiguous()):
        out = None
    if h.dtype == torch.float32:
        if out is None:
            return h @ W.T if b is None else torch.addmm(b.float(), h, W.T)
        return torch.mm(h, W.T, out=out) if b is None else torch.addmm(b.float(), h, W.T, out=out)
    dev = h.device.type
    if dev == "cuda" and _MM_FP32_OUT.get(dev) is not False:
        try:
            z = torch.mm(h, W.T, out_dtype=torch.float32)
            _MM_FP32_OUT[dev] = True
        except (RuntimeError, TypeError, NotImplementedError):
            _MM_FP32_OUT[dev] = False
        else:
            return z if b is None else z.add_(b)
    if dev == "cuda":  # no fp32-output GEMM: bf16 logits (documented accuracy loss)
        z = h @ W.T if b is None else torch.addmm(b, h, W.T)
        return z.float()
    m, V = h.shape[0], W.shape[0]
    z = out if out is not None else torch.empty(m, V, dtype=torch.float32, device=h.device)
    hf = h.float()
    step = max(1, _UPCAST_BLOCK_BYTES // (4 * W.shape[1]))
    for v0 in range(0, V, step):
        torch.mm(hf, W[v0:v0 + step].float().T, out=z[:, v0:v0 + step])
    return z if b is None else z.add_(b)


def logits_buffer(rows: int, V: int, device) -> torch.Tensor | None:
    """One fp32 (rows, V) logits buffer for all chunks of a call (CPU; None on CUDA)."""
    if rows <= 0 or torch.device(device).type != "cpu":
        return None
    return torch.empty(rows, V, dtype=torch.float32, device=device)


class TorchOps:
    name = "torch"

    def logits(self, h, W, b, out=None):
        return chunk_logits(h, W, b, out)

    def logprobs(self, h, W, b, y, rows_per_chunk):
        """logp_i = log_softmax(z_i)[y_i] for all rows, one chunk of logits at a time (one
        chunk buffer for all of them)."""
        M = h.shape[0]
        out = torch.empty(M, dtype=torch.float32, device=h.device)
        buf = logits_buffer(min(rows_per_chunk, M), W.shape[0], h.device)
        for s in range(0, M, rows_per_chunk):
            e = min(s + rows_per_chunk, M)
            z = self.logits(h[s:e], W, b, None if buf is None else buf[: e - s])
            out[s:e], _ = self.chunk_forward(z, y[s:e])
        return out

    # -- one-pass chunk: logp, then the weighted softmax-minus-onehot gradient -----------
    def chunk_forward(self, z, y):
        """Consumes z (fp32, owned): z <- e = exp(z - max). Returns logp (m,) and the state
        (e, rest) that softmax_grad finishes from, where rest = the sum of e over every entry
        except ONE arg-max entry (whose e is exactly 1), so sum(e) = 1 + rest without ever
        rounding 1 + rest. logp = (z_y - max) - log1p(rest): exact to fp32 relative rounding
        even when p_y -> 1 (log(1 + rest) would quantise logp to multiples of 2^-24 and give
        exactly 0 for 1 - p_y < 6e-8)."""
        t = z.gather(1, y[:, None]).squeeze(1)
        mx, arg = z.max(dim=1, keepdim=True)
        e = z.sub_(mx).exp_()
        e.scatter_(1, arg, 0.0)
        rest = e.sum(dim=1)
        e.scatter_(1, arg, 1.0)
        return ((t - mx.squeeze(1)) - torch.log1p(rest)).clamp_(max=0.0), (e, rest)

    def softmax_grad(self, state, y, logp, coef, out_dtype):
        """G = coef_i * (softmax_i - onehot(y_i)), fp32: off target coef_i * e_ij / (1 + rest_i),
        on target coef_i * expm1(logp_i) = coef_i * (p_y - 1) without cancellation when
        p_y -> 1 (logp is exact there, see chunk_forward). Returns G in fp32 (reuses e)."""
        e, rest = state
        g = e.mul_((coef / (1.0 + rest))[:, None])
        g.scatter_(1, y[:, None], (coef * torch.expm1(logp))[:, None])
        return g

    # -- gradient GEMMs -----------------------------------------------------------------------
    def grad_hidden(self, g, W):
        """dH = G W in the compute dtype."""
        return (g if g.dtype == W.dtype else g.to(W.dtype)) @ W

    def accum_grad_weight(self, dW32, g, h):
        """dW32 += G^T h, fp32 accumulation, no (V, H) temporary."""
        dW32.addmm_(g.T, h if h.dtype == torch.float32 else h.float())
