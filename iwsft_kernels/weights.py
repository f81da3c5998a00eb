"""Importance weights from per-token log-ratios (docs/design.md §1). Tiny tensors only.

Everything here works on the *target* rows of a batch, in order of position:
  d    (M,) float32  d_i = logp_i - ref_i (detached)
  seg  (M,) int64    sequence id of each target row, in [0, S)
All outputs are detached float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import IWConfig


@dataclass
class Weights:
    row: torch.Tensor  # (M,) final weight of each target row (normalised, times quality)
    seq: torch.Tensor  # (S,) final per-sequence weight; token mode: mean of its rows; 0 if empty
    norm: torch.Tensor  # 0-d self-normalisation factor (1 when off)
    stats: dict


def _clipped_exp(x: torch.Tensor, cfg: IWConfig) -> torch.Tensor:
    """clamp(exp(x), w_min, w_max) computed without overflow: x is clamped at log(w_max) in
    log space first; the final clamp makes the bounds exact (exp(log(1.8)) != 1.8 in fp32)."""
    lo, hi = cfg.bounds
    return torch.exp(x.clamp(max=_log_bounds(cfg)[1])).clamp(min=lo, max=hi)


def _log_bounds(cfg: IWConfig) -> tuple[float, float]:
    lo, hi = cfg.bounds
    return (math.log(lo) if lo > 0 else -math.inf), (math.log(hi) if hi < math.inf else math.inf)


def _seq_mean(values: torch.Tensor, seg: torch.Tensor, counts: torch.Tensor, S: int) -> torch.Tensor:
    sums = torch.zeros(S, dtype=values.dtype, device=values.device).index_add_(0, seg, values)
    return sums / counts.clamp(min=1)


def compute_weights(
    d: torch.Tensor | None,
    seg: torch.Tensor,
    S: int,
    cfg: IWConfig,
    quality: torch.Tensor | None = None,
    *,
    normalize: bool = True,
    with_stats: bool = True,
) -> Weights:
    """Weights of the target rows. ``normalize=False`` skips self-normalisation (used per
    chunk: the batch-wide factor is applied once at the end, since gradients are linear in it).
    In sequence mode every sequence present in ``seg`` must be complete."""
    M = seg.numel()
    dev = seg.device
    counts = torch.bincount(seg, minlength=S) if M else torch.zeros(S, dtype=torch.long, device=dev)
    valid = counts > 0
    log_lo, log_hi = _log_bounds(cfg)

    x = None  # T * (log-ratio of each unit), units = valid sequences or target tokens
    if cfg.mode == "sft":
        raw_row = torch.ones(M, dtype=torch.float32, device=dev)
        unit_w = raw_row
    elif cfg.mode == "token":
        x = cfg.temperature * d
        raw_row = _clipped_exp(x, cfg)
        unit_w = raw_row
    else:  # sequence
        agg = torch.zeros(S, dtype=torch.float32, device=dev).index_add_(0, seg, d)
        if cfg.length_normalize:
            agg = agg / counts.clamp(min=1)
        x_all = cfg.temperature * agg
        raw_seq = torch.where(valid, _clipped_exp(x_all, cfg), 0.0)
        raw_row = raw_seq[seg]
        unit_w = raw_seq[valid]
        x = x_all[valid]

    norm = torch.ones((), dtype=torch.float32, device=dev)
    if cfg.self_normalize and normalize and unit_w.numel() > 0:
        mean = unit_w.mean()
        norm = torch.where(mean > 0, 1.0 / mean.clamp(min=torch.finfo(torch.float32).tiny), 1.0)

    q_row = quality[seg] if quality is not None else None
    row = raw_row * norm
    if q_row is not None:
        row = row * q_row
    if cfg.mode == "sequence":
        seq = raw_seq * norm
        if quality is not None:
            seq = seq * quality
    else:
        seq = torch.where(valid, _seq_mean(row, seg, counts, S), 0.0)

    stats = _stats(cfg, d, seg, counts, valid, row, seq, x, log_lo, log_hi) if with_stats else {}
    return Weights(row=row, seq=seq, norm=norm, stats=stats)


def _stats(cfg, d, seg, counts, valid, row, seq, x, log_lo, log_hi) -> dict:
    """Weight statistics over the units (valid sequences; token/sft: target tokens)."""
    units = seq[valid] if cfg.mode == "sequence" else row
    n = units.numel()
    dev = row.device
    nan = torch.tensor(float("nan"), device=dev)
    if n == 0:
        z = torch.zeros((), device=dev)
        out = dict(weight_mean=nan, weight_min=nan, weight_max=nan, ess_fraction=nan,
                   clip_frac_max=z, clip_frac_min=z, log_ratio_mean=nan)
    else:
        u = units.double()
        s1, s2 = u.sum(), (u * u).sum()
        ess = torch.where(s2 > 0, s1 * s1 / s2.clamp(min=1e-300) / n, torch.zeros((), dtype=torch.float64, device=dev))
        if x is not None:
            clip_hi = (x > log_hi).float().mean()
            clip_lo = (x < log_lo).float().mean()
        else:
            clip_hi = clip_lo = torch.zeros((), device=dev)
        if d is None:
            lr = nan
        elif cfg.mode == "sequence":
            lr = (x / cfg.temperature).mean()  # mean over valid sequences of the aggregate
        else:
            lr = d.mean()
        out = dict(weight_mean=units.mean(), weight_min=units.min(), weight_max=units.max(),
                   ess_fraction=ess.float(), clip_frac_max=clip_hi, clip_frac_min=clip_lo,
                   log_ratio_mean=lr.float())
    out["num_target_tokens"] = torch.tensor(float(row.numel()), device=dev)
    out["num_sequences"] = valid.sum().float()
    return {k: v.detach() for k, v in out.items()}
