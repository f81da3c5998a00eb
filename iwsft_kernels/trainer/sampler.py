"""Which examples each optimizer step sees: a pure function of (seed, step), so resuming at a
step reproduces the data order exactly, and every rank knows the whole global batch (hence the
global target-token normaliser without communication).

- uniform: a fresh permutation per epoch, cut into global batches (the last partial one dropped).
- quality (SFT(Q)): each epoch draws n examples with replacement, P(i) proportional to quality_i
  (torch.multinomial up to its 2^24-category limit; above it, inverse-CDF sampling in float64).
Within a global batch, examples are sorted by length and dealt round-robin to the ranks, then
cut into micro-batches: micro-batches hold similar lengths (little padding), ranks balanced.
"""

from __future__ import annotations

import torch

MULTINOMIAL_MAX = 2**24  # torch.multinomial refuses more categories


def _draw_with_replacement(probs: torch.Tensor, cdf: torch.Tensor | None, n: int,
                           g: torch.Generator) -> torch.Tensor:
    """n i.i.d. indices with P(i) = probs[i]: torch.multinomial where it can (its draws, so
    existing runs keep their order), else inverse CDF in float64: n sorted uniforms made
    directly (normalised cumulative sums of exponentials, the uniform order statistics), one
    ordered search through the CDF, then a random permutation (i.i.d. draws again)."""
    if probs.numel() <= MULTINOMIAL_MAX:
        return torch.multinomial(probs, n, replacement=True, generator=g)
    e = torch.empty(n + 1, dtype=torch.float64).exponential_(generator=g).cumsum_(0)
    u_sorted = e[:n] / e[n] * cdf[-1]
    # right=True: i with cdf[i-1] <= u < cdf[i], so a zero-probability example is never drawn
    picked = torch.searchsorted(cdf, u_sorted, right=True)
    last = int(torch.nonzero(probs > 0)[-1])  # u rounding up to cdf[-1]: the last drawable one
    picked.clamp_(max=last)
    return picked[torch.randperm(n, generator=g)]


class StepSampler:
    def __init__(self, n: int, global_batch: int, seed: int = 0,
                 quality: list[float] | torch.Tensor | None = None):
        if n < global_batch:
            raise ValueError(f"the dataset has {n} usable examples, fewer than one global batch "
                             f"({global_batch} = micro_batch_size x grad_accum x processes); "
                             f"lower micro_batch_size or grad_accum")
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self.steps_per_epoch = n // global_batch
        self.probs, self._cdf = None, None
        if quality is not None:
            q = torch.as_tensor(quality, dtype=torch.float64).reshape(-1)
            if q.numel() != n:
                raise ValueError(f"quality sampling needs one quality per example: {q.numel()} "
                                 f"given for {n} examples")
            if (q < 0).any() or not torch.isfinite(q).all() or q.sum() <= 0:
                raise ValueError("quality sampling needs finite qualities >= 0 with a positive sum")
            self.probs = q / q.sum()
            self._cdf = torch.cumsum(self.probs, 0) if n > MULTINOMIAL_MAX else None
        self._cache: tuple[int, list[int]] | None = None

    def epoch_order(self, epoch: int) -> list[int]:
        if self._cache is None or self._cache[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            if self.probs is None:
                order = torch.randperm(self.n, generator=g)
            else:
                order = _draw_with_replacement(self.probs, self._cdf, self.n, g)
            self._cache = (epoch, order.tolist())
        return self._cache[1]

    def batch(self, step: int) -> list[int]:
        epoch, k = divmod(step, self.steps_per_epoch)
        return self.epoch_order(epoch)[k * self.global_batch:(k + 1) * self.global_batch]


def rank_micro_batches(indices: list[int], lengths: list[int], rank: int, world: int,
                       micro_batch_size: int) -> list[list[int]]:
    by_len = sorted(indices, key=lambda i: (-lengths[i], i))
    mine = by_len[rank::world]
    return [mine[j:j + micro_batch_size] for j in range(0, len(mine), micro_batch_size)]
