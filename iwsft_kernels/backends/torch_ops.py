"""The torch backend's ops: plain torch twins of each Triton kernel, on any device.

Shapes: h (m, H) compute dtype; W (V, H); b (V,) or None; y (m,) int64 in [0, V).
A logits chunk is (m, V). All softmax arithmetic is fp32. The ops interface (every backend):
    logits(h, W, b, out=None) -> r                        raw fp32 (m, V)
    chunk_forward(r, y, xf, want_entropy) -> (RowStats, state)
    softmax_grad(state, y, rows, coef, zcoef, xf, out_dtype) -> G_r (gradient w.r.t. raw r)
    logprobs(h, W, b, y, rows_per_chunk, xf, want_entropy) -> RowStats   (no grad)
    grad_hidden(g, W), accum_grad_weight(dW32, g, h)
  vocabulary parallelism (backends/vocab_merge.py; y local to the shard, < 0 outside it):
    partials(r, y, xf, want_entropy) -> ((max, rest, tgt, S1 or None), state)
    logprob_partials(h, W, b, y, rows_per_chunk, xf, want_entropy) -> (max, rest, tgt, S1)
    softmax_grad_merged(state, y, max, rest, logp, coef, zcoef, xf, out_dtype) -> G_r
with xf a config.LogitTransform and RowStats from backends/rows.py (docs/design.md §9).
"""

from __future__ import annotations

import torch

from ..config import IDENTITY, LogitTransform
from .rows import RowStats, rows_from

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


# rows of a chunk handled at once by the entropy pass, so that its temporaries stay small:
# ~8 MiB of fp32 per temporary (~14 rows at V = 151,936; 1 MiB blocks meant one row per block
# there, and per-op overheads dominated on a busy CPU: every torch op is a parallel region)
_BLOCK_ELEMS = 2**21


def _row_blocks(m: int, V: int):
    step = max(1, _BLOCK_ELEMS // max(V, 1))
    for s in range(0, m, step):
        yield s, min(s + step, m)


def apply_transform(r: torch.Tensor, xf: LogitTransform, dz: torch.Tensor | None = None):
    """r (m, V) fp32 raw logits -> the transformed logits z, in place (config.LogitTransform).
    Without a cap: z = (scale / temperature) r. With a cap c: z = (c / tau) tanh(x),
    x = s r / c, and if ``dz`` (an fp32 (m, V) buffer) is given it receives
    sech^2(x) = cosh(x)^-2, so that dz/dr = (s / tau) * dz. Both from torch's vectorised tanh /
    cosh (accurate to a few ulp: no 1 - tanh^2, which is 0 once tanh rounds to 1; no (1 - u)
    cancellation near x = 0) in 5 full-chunk passes and no temporaries (cosh overflows to inf
    for |x| > 89, giving sech^2 = 0, below fp32's range anyway)."""
    if xf.identity:
        return r
    if xf.linear:
        return r.mul_(xf.factor)
    s, c, tau = xf.scale, xf.softcap, xf.temperature
    if dz is None:
        return r.mul_(s / c).tanh_().mul_(c / tau)
    x = torch.mul(r, s / c, out=dz)
    torch.tanh(x, out=r).mul_(c / tau)
    dz.cosh_().pow_(-2.0)
    return r


class TorchOps:
    name = "torch"
    # extra fp32 (m, V) buffers per chunk this backend allocates when a softcap is on (the dz/dr
    # buffer of chunk_forward); the chunk driver's budget counts them (core.chunk_rows_for)
    softcap_extra_buffers = 1

    def __init__(self):
        self._dz = None  # the dz/dr buffer, reused by every chunk of a call (softcap only)

    def _dz_buffer(self, r):
        m, V = r.shape
        buf = self._dz
        if buf is None or buf.shape[0] < m or buf.shape[1] != V or buf.device != r.device:
            buf = self._dz = torch.empty(m, V, dtype=torch.float32, device=r.device)
        return buf[:m]

    def logits(self, h, W, b, out=None):
        return chunk_logits(h, W, b, out)

    def logprobs(self, h, W, b, y, rows_per_chunk, xf=IDENTITY, want_entropy=False):
        """RowStats (logp, lse, top1, entropy if asked) of every row, one chunk of logits at a
        time (one chunk buffer for all of them); no gradient state is kept."""
        return chunked_logprobs(self, h, W, b, y, rows_per_chunk, xf, want_entropy)

    def row_stats(self, r, y, xf=IDENTITY, want_entropy=False):
        """chunk_forward without the gradient state (no dz/dr buffer under a softcap)."""
        return self._forward(r, y, xf, want_entropy, need_dz=False)[0]

    # -- one-pass chunk: the row statistics, then the weighted softmax-minus-onehot gradient --
    def chunk_forward(self, r, y, xf=IDENTITY, want_entropy=False):
        """Consumes r (fp32 raw logits, owned): r <- z (transformed) <- e = exp(z - max).
        Returns RowStats and the state (e, rest, dz, k) that softmax_grad finishes from, where
        rest = the sum of e over every entry except ONE arg-max entry (whose e is exactly 1),
        so sum(e) = 1 + rest without ever rounding 1 + rest. logp = (z_y - max) - log1p(rest):
        exact to fp32 relative rounding even when p_y -> 1 (log(1 + rest) would quantise logp
        to multiples of 2^-24 and give exactly 0 for 1 - p_y < 6e-8). dz/dr = k * dz: dz is
        None without a cap (k = scale / temperature, 1 for the identity) and the fp32 (m, V)
        sech^2 buffer with one (k = scale / temperature). Entropy (only if asked): S1 =
        sum_j e_j (z_j - max) = sum_j e_j log e_j, one extra pass over e in row blocks."""
        return self._forward(r, y, xf, want_entropy, need_dz=True)

    def _forward(self, r, y, xf, want_entropy, need_dz):
        (mx, rest, t, s1), (e, dz, k, _) = self._partials(r, y, xf, want_entropy, need_dz)
        return rows_from(mx, rest, t, s1), (e, rest, dz, k)

    def _partials(self, r, y, xf, want_entropy, need_dz):
        """(max, rest, target logit, S1 or None) of z = xf(r) per row, and the state
        (e, dz, k, max). y < 0 (a vocabulary shard without the row's target): target logit 0."""
        dz = self._dz_buffer(r) if need_dz and not xf.linear else None
        z = apply_transform(r, xf, dz)
        has = y >= 0
        t = z.gather(1, y.clamp(min=0)[:, None]).squeeze(1)
        if not bool(has.all()):
            t = torch.where(has, t, 0.0)
        mx, arg = z.max(dim=1, keepdim=True)
        e = z.sub_(mx).exp_()
        s1 = None
        if want_entropy:
            # S1 = sum e log e (xlogy: 0 where e = 0, e.g. z = -inf; the arg-max's e = 1
            # gives 0); e log e = e (z - max) to fp32 rounding of e
            s1 = torch.empty(e.shape[0], dtype=torch.float32, device=e.device)
            for a, b in _row_blocks(e.shape[0], e.shape[1]):
                s1[a:b] = torch.special.xlogy(e[a:b], e[a:b]).sum(dim=1)
        e.scatter_(1, arg, 0.0)
        rest = e.sum(dim=1)
        e.scatter_(1, arg, 1.0)
        mx = mx.squeeze(1)
        return (mx, rest, t, s1), (e, dz, xf.factor, mx)

    def softmax_grad(self, state, y, rows, coef, zcoef=None, xf=IDENTITY,
                     out_dtype=torch.float32):
        """The gradient w.r.t. the raw logits r of sum_i coef_i CE_i + zcoef-weighted z-loss:
        G_z = coef_i (softmax_i - onehot(y_i)) + zcoef_i softmax_i, fp32: off target
        (coef_i + zcoef_i) e_ij / (1 + rest_i), on target coef_i expm1(logp_i) +
        zcoef_i exp(logp_i) (p_y - 1 without cancellation when p_y -> 1: logp is exact there,
        see chunk_forward); then G_r = G_z dz/dr (its constant factor folded into the per-row
        factors, times the cap's sech^2 buffer). Returns G in fp32 (reuses e); out_dtype is
        not used (the gradient GEMMs cast)."""
        e, rest, dz, k = state
        return _softmax_grad(e, dz, k, y, rows.logp, None, 1.0 + rest, coef, zcoef)

    # -- vocabulary-parallel pieces (backends/vocab_merge.py merges the shards' partials) ----
    def partials(self, r, y, xf=IDENTITY, want_entropy=False):
        """((max, rest, target logit, S1 or None), state) of z = xf(r) over this shard's
        columns (consumes r like chunk_forward); y local, < 0 where the target is in another
        shard (target logit 0)."""
        return self._partials(r, y, xf, want_entropy, need_dz=True)

    def logprob_partials(self, h, W, b, y, rows_per_chunk, xf=IDENTITY, want_entropy=False):
        """partials of every row, one chunk of logits at a time (one buffer), no state kept."""
        M = h.shape[0]
        out = [torch.empty(M, dtype=torch.float32, device=h.device)
               for _ in range(4 if want_entropy else 3)]
        rows_per_chunk = max(1, int(rows_per_chunk))
        buf = logits_buffer(min(rows_per_chunk, M), W.shape[0], h.device)
        for s in range(0, M, rows_per_chunk):
            e = min(s + rows_per_chunk, M)
            r = self.logits(h[s:e], W, b, None if buf is None else buf[: e - s])
            part = TorchOps._partials(self, r, y[s:e], xf, want_entropy, need_dz=False)[0]
            for o, v in zip(out, part):
                o[s:e] = v
        return out[0], out[1], out[2], (out[3] if want_entropy else None)

    def softmax_grad_merged(self, state, y, mx, rest, logp, coef, zcoef=None, xf=IDENTITY,
                            out_dtype=torch.float32):
        """softmax_grad with the row's global (max, rest) and logp (a vocabulary shard):
        softmax_j = e_j exp(m_local - max) / (1 + rest); no target entry where y < 0."""
        e, dz, k, m_local = state
        return _softmax_grad(e, dz, k, y, logp, torch.exp(m_local - mx), 1.0 + rest, coef,
                             zcoef)

    # -- gradient GEMMs -----------------------------------------------------------------------
    def grad_hidden(self, g, W):
        """dH = G W in the compute dtype."""
        return (g if g.dtype == W.dtype else g.to(W.dtype)) @ W

    def accum_grad_weight(self, dW32, g, h):
        """dW32 += G^T h, fp32 accumulation, no (V, H) temporary."""
        dW32.addmm_(g.T, h if h.dtype == torch.float32 else h.float())


def _softmax_grad(e, dz, k, y, lp, num, den, coef, zcoef):
    """G_r in e's memory: off target (coef + zcoef) num e / den, on target (y >= 0 only)
    coef expm1(logp) + zcoef exp(logp), times dz/dr = k [* dz]; softmax = e num / den per
    row (e = exp(z - m_e), num = exp(m_e - max) or None for 1, den = 1 + rest)."""
    coef = coef.float()
    tgt = coef * torch.expm1(lp)
    if zcoef is not None:
        zcoef = zcoef.float()
        tgt = tgt + zcoef * torch.exp(lp)
        coef = coef + zcoef
    row = (coef if num is None else coef * num) / den
    if k != 1.0:
        row = row * k
        tgt = tgt * k
    g = e.mul_(row[:, None])
    has = y >= 0
    if bool(has.all()):
        g.scatter_(1, y[:, None], tgt[:, None])
    else:
        i = has.nonzero().squeeze(1)
        g[i, y[i]] = tgt[i]
    if dz is not None:
        g.mul_(dz)
    return g


def chunked_logprobs(ops, h, W, b, y, rows_per_chunk, xf=IDENTITY, want_entropy=False):
    """ops.logprobs through ops.logits + ops.row_stats (or ops.chunk_forward), one chunk of
    rows at a time, one logits buffer for all chunks: RowStats of all M rows."""
    M = h.shape[0]
    dev = h.device
    logp = torch.empty(M, dtype=torch.float32, device=dev)
    lse = torch.empty(M, dtype=torch.float32, device=dev)
    top1 = torch.empty(M, dtype=torch.bool, device=dev)
    ent = torch.empty(M, dtype=torch.float32, device=dev) if want_entropy else None
    rows_per_chunk = max(1, int(rows_per_chunk))
    buf = logits_buffer(min(rows_per_chunk, M), W.shape[0], dev)
    stats = getattr(ops, "row_stats", None)
    for s in range(0, M, rows_per_chunk):
        e = min(s + rows_per_chunk, M)
        r = ops.logits(h[s:e], W, b, None if buf is None else buf[: e - s])
        if stats is not None:
            rs = stats(r, y[s:e], xf, want_entropy)
        else:
            rs = ops.chunk_forward(r, y[s:e], xf, want_entropy)[0]
        logp[s:e], lse[s:e], top1[s:e] = rs.logp, rs.lse, rs.top1
        if want_entropy:
            ent[s:e] = rs.entropy
    return RowStats(logp=logp, lse=lse, top1=top1, entropy=ent)
