"""What a backend returns per target row besides the gradient (docs/design.md §9).

All of them come from the row's (max m, rest, target logit t) of the *transformed* logits z
(see config.LogitTransform), where rest = the sum of exp(z_j - m) over every entry but one
arg-max entry:
    logp    = (t - m) - log1p(rest), clamped to <= 0      (exact as p_y -> 1)
    lse     = m + log1p(rest)
    top1    = t == m   (the target attains the row maximum; ties count as correct, so with
                        exactly tied maxima this can differ from argmax(z) == y)
    entropy = log1p(rest) - S1 / (1 + rest),  S1 = sum_j exp(z_j - m) * (z_j - m)
              (the arg-max entry contributes 0 to S1), clamped to >= 0; only when asked.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class RowStats(NamedTuple):
    logp: torch.Tensor  # (m,) fp32
    lse: torch.Tensor  # (m,) fp32
    top1: torch.Tensor  # (m,) bool
    entropy: Optional[torch.Tensor] = None  # (m,) fp32, only when asked


def entropy_from(rest: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
    """entropy = log1p(rest) - S1 / (1 + rest), clamped to >= 0 (fp32)."""
    return (torch.log1p(rest) - s1 / (1.0 + rest)).clamp_(min=0.0)


def rows_from(mx, rest, tgt, s1=None) -> RowStats:
    """RowStats of per-row (max, rest, target logit[, S1]) of the transformed logits (every
    backend's single-rank rows, and the rows of a vocabulary-parallel merge)."""
    log1p_rest = torch.log1p(rest)
    return RowStats(logp=((tgt - mx) - log1p_rest).clamp_(max=0.0),
                    lse=mx + log1p_rest,
                    top1=tgt == mx,
                    entropy=None if s1 is None else entropy_from(rest, s1))
