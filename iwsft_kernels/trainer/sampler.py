"""Which examples each optimizer step sees: a pure function of (seed, step), so resuming at a
step reproduces the data order exactly, and every rank knows the whole global batch (hence the
global target-token normaliser without communication).

- uniform: a fresh permutation per epoch, cut into global batches (the last partial one dropped).
- quality (SFT(Q)): each epoch draws n examples with replacement, P(i) proportional to quality_i.
Within a global batch, examples are sorted by length and dealt round-robin to the ranks, then
cut into micro-batches: micro-batches hold similar lengths (little padding), ranks balanced.
"""

from __future__ import annotations

import torch


class StepSampler:
    def __init__(self, n: int, global_batch: int, seed: int = 0,
                 quality: list[float] | None = None):
        if n < global_batch:
            raise ValueError(f"the dataset has {n} usable examples, fewer than one global batch "
                             f"({global_batch} = micro_batch_size x grad_accum x processes); "
                             f"lower micro_batch_size or grad_accum")
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self.steps_per_epoch = n // global_batch
        self.probs = None
        if quality is not None:
            q = torch.tensor(quality, dtype=torch.float64)
            if (q < 0).any() or not torch.isfinite(q).all() or q.sum() <= 0:
                raise ValueError("quality sampling needs finite qualities >= 0 with a positive sum")
            self.probs = q / q.sum()
        self._cache: tuple[int, list[int]] | None = None

    def epoch_order(self, epoch: int) -> list[int]:
        if self._cache is None or self._cache[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            if self.probs is None:
                order = torch.randperm(self.n, generator=g)
            else:
                order = torch.multinomial(self.probs, self.n, replacement=True, generator=g)
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
