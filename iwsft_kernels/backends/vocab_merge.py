"""Vocabulary parallelism, the per-chunk phase: merge every rank's row partials over its
vocabulary shard into the exact global row statistics, with two collectives per chunk
(docs/distributed.md, "Vocabulary-parallel loss").

Rank r holds rows [start_r, stop_r) of W (and b). For a chunk of target rows it computes, over
its shard of the transformed logits z (the backend's ``partials``):
    m_r    = the row max over the shard (-inf for an empty shard)
    rest_r = the sum of exp(z_j - m_r) over the shard without ONE arg-max entry (-1: empty)
    t_r    = z_y if the row's target y is in the shard, else 0
    S1_r   = sum_j exp(z_j - m_r)(z_j - m_r) over the shard (entropy only)
Merge (all ranks get the same, bitwise: all-reduce results are identical on every rank):
    M      = MAX_r m_r                                   (all-reduce MAX, 1 float per row)
    top_r  = [m_r == M]
    a_r    = rest_r if top_r else (1 + rest_r) exp(m_r - M)
    SUM over r of (a_r, top_r, t_r[, e^{m_r - M}(S1_r + (m_r - M)(1 + rest_r))])
                                                         (one all-reduce SUM of a (3|4, m) stack)
    rest   = sum a_r + (sum top_r - 1)
i.e. the global arg-max entry is left out exactly once: by the one rank attaining M (then
sum top_r - 1 = 0 is added, exactly), and on a tie between ranks every other rank attaining M
contributes its full 1 + rest_r (rest is >= 1 then, no precision at stake). So
    logp = (t - M) - log1p(rest)
stays exact to fp32 relative rounding as p_y -> 1, as on one rank; lse = M + log1p(rest),
top1 = (t == M) (the label attains the global max; ties count), entropy from rest and S1.

The gradient on each shard (made in forward like the single-rank path) is the backend's
``softmax_grad_merged`` with the global (M, rest, logp): G_r = coef (softmax - onehot) [+ zcoef
softmax] over the shard's columns only (the one-hot only on the rank holding y); dW_r, db_r
stay local, dH_r = G_r W_r is summed over the group once per call (reduce_grad_hidden) unless
the caller asked for the partial dH (sequence_parallel).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..config import IDENTITY
from .rows import RowStats, rows_from


@dataclass(frozen=True)
class VocabShard:
    """A resolved vocabulary shard (iwsft_kernels/vocab_shard.py makes it): this rank's rows
    [start, stop) of a V-row head, the group's largest shard (chunks are sized on it, so every
    rank runs the same number of chunks, hence of collectives) and the dH option."""

    group: object
    start: int
    stop: int
    V: int
    max_rows: int
    sequence_parallel: bool = False

    @property
    def rows(self) -> int:
        return self.stop - self.start


def merge_partials(mx, rest, tgt, s1, group):
    """The exact global (max, rest, target logit, S1 or None) of each row from this rank's
    shard partials (see the module docstring): one all-reduce MAX of (m,) and one all-reduce
    SUM of a (3, m) stack ((4, m) with S1). Every rank of ``group`` must call it with the
    same rows."""
    big = mx.float().clone()
    dist.all_reduce(big, op=dist.ReduceOp.MAX, group=group)
    empty = mx == float("-inf")
    top = (mx == big) & ~empty
    scale = torch.where(empty, 0.0, torch.exp(mx - big))
    full = rest + 1.0
    parts = [torch.where(top, rest, full * scale), top.float(), tgt.float()]
    if s1 is not None:
        parts.append(torch.where(empty, 0.0, scale * (s1 + (mx - big) * full)))
    stack = torch.stack(parts)
    dist.all_reduce(stack, op=dist.ReduceOp.SUM, group=group)
    rest_g = stack[0] + (stack[1] - 1.0)
    return big, rest_g, stack[2], (stack[3] if s1 is not None else None)


def _empty_partials(m: int, device, want_entropy: bool):
    """The partials of an empty shard (no vocabulary rows on this rank)."""
    f = dict(dtype=torch.float32, device=device)
    return (torch.full((m,), float("-inf"), **f), torch.full((m,), -1.0, **f),
            torch.zeros(m, **f), torch.zeros(m, **f) if want_entropy else None)


class VocabParallelOps:
    """The ops interface of backends/torch_ops.py over one vocabulary shard: wraps a backend's
    ops (torch, native CPU, Triton) and merges their shard partials across the group, so the
    chunk driver (chunked.py) runs unchanged on the local W / b. Labels y stay global ids;
    dW and db come out local (the shard's rows)."""

    def __init__(self, inner, shard: VocabShard):
        for need in ("partials", "logprob_partials", "softmax_grad_merged"):
            if not hasattr(inner, need):
                raise ValueError(f"backend ops {getattr(inner, 'name', inner)!r} have no "
                                 f"{need}: vocabulary parallelism is not supported there")
        self.inner = inner
        self.shard = shard
        self.name = f"{inner.name}+vocab_parallel"
        # the (m, V) buffers its partials allocate under a softcap (the native ops' sharded
        # epilogue is the torch ops', which keep a dz/dr buffer)
        self.softcap_extra_buffers = getattr(inner, "partials_softcap_extra_buffers",
                                             getattr(inner, "softcap_extra_buffers", 0))

    def _local(self, y):
        s = self.shard
        return torch.where((y >= s.start) & (y < s.stop), y - s.start, -1)

    def logits(self, h, W, b, out=None):
        return self.inner.logits(h, W, b, out)

    def chunk_forward(self, r, y, xf=IDENTITY, want_entropy=False):
        yl = self._local(y)
        if r.shape[1] == 0:
            part, state = _empty_partials(r.shape[0], r.device, want_entropy), None
        else:
            part, state = self.inner.partials(r, yl, xf, want_entropy)
        mx, rest, tgt, s1 = merge_partials(*part, self.shard.group)
        return rows_from(mx, rest, tgt, s1), (state, yl, mx, rest, r)

    def row_stats(self, r, y, xf=IDENTITY, want_entropy=False):
        return self.chunk_forward(r, y, xf, want_entropy)[0]

    def softmax_grad(self, state, y, rows, coef, zcoef=None, xf=IDENTITY,
                     out_dtype=torch.float32):
        st, yl, mx, rest, r = state
        if st is None:  # empty shard: a (m, 0) gradient
            return r
        return self.inner.softmax_grad_merged(st, yl, mx, rest, rows.logp, coef, zcoef, xf,
                                              out_dtype)

    def logprobs(self, h, W, b, y, rows_per_chunk, xf=IDENTITY, want_entropy=False) -> RowStats:
        """RowStats of every row: the backend's partials of all rows (Triton: the fused tile
        kernel; torch: chunked), then ONE merge for all of them."""
        if W.shape[0] == 0:
            part = _empty_partials(h.shape[0], h.device, want_entropy)
        else:
            part = self.inner.logprob_partials(h, W, b, self._local(y), rows_per_chunk, xf,
                                               want_entropy)
        return rows_from(*merge_partials(*part, self.shard.group))

    def grad_hidden(self, g, W):
        if W.shape[0] == 0:  # empty shard: no contribution to dH
            return torch.zeros(g.shape[0], W.shape[1], dtype=W.dtype, device=W.device)
        return self.inner.grad_hidden(g, W)

    def accum_grad_weight(self, dW32, g, h):
        if dW32.shape[0]:
            self.inner.accum_grad_weight(dW32, g, h)


def reduce_grad_hidden(dh: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """dH = SUM over the group of the shards' G_r W_r (in place), unless the caller asked for
    the partial dH (shard.sequence_parallel)."""
    if not shard.sequence_parallel:
        dist.all_reduce(dh, op=dist.ReduceOp.SUM, group=shard.group)
    return dh
