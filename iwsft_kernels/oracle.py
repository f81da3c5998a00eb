"""The float64 oracle of docs/design.md §1: materialises the logits, float64-capable, for tests.

Written independently of the fused path (plain loops over sequences, no chunking) so that it
can serve as an oracle. Not for training: it allocates N x V.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import IWConfig


def _target_logprob(logits, y):
    """log softmax(logits)[y] per row as -softplus(logsumexp_{j != y} z_j - z_y): the same
    number as log_softmax, but without its cancellation z_y - lse, which costs |z| * 2^-53
    absolute (float64 log_softmax is off by ~5e-4 *relative* at 1 - p_y = 1e-12, |z| ~ 90)
    and whose autograd forms the target entry p_y - 1 by cancellation. Here the gradient's
    target entry is sigmoid(.) = 1 - p_y directly."""
    if logits.shape[1] == 1:
        return torch.log_softmax(logits, dim=-1)[:, 0]
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    others = torch.logsumexp(logits.scatter(1, y[:, None], float("-inf")), dim=-1)
    return -F.softplus(others - z_y, threshold=40.0)


class _SoftCap(torch.autograd.Function):
    """c * tanh(x / c) with the derivative sech^2(x / c) = 1 / cosh(x / c)^2 evaluated
    directly (autograd's 1 - tanh^2 is 0 once tanh rounds to 1, and loses all relative
    accuracy well before: at |x / c| = 18 in float64)."""

    @staticmethod
    def forward(ctx, x, c):
        ctx.save_for_backward(x)
        ctx.c = c
        return c * torch.tanh(x / c)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g / torch.cosh(x / ctx.c) ** 2, None


def transformed_logits(raw, logit_scale=1.0, logit_softcap=None, logit_temperature=1.0):
    """z = scale * raw; z = softcap * tanh(z / softcap) if a softcap is given; z / temperature
    (the definition, in raw's dtype; differentiable)."""
    z = raw * logit_scale
    if logit_softcap is not None:
        z = _SoftCap.apply(z, float(logit_softcap))
    return z / logit_temperature


def _row_outputs(z, y):
    """Per row of z (n, V) and target y: (lse, top1, entropy), all from the definition:
    lse = logsumexp(z); top1 = z_y == max z (a tie counts); entropy = -sum_j p_j log p_j
    with log p_j = z_j - lse, except the target's, taken from the exact
    -softplus(logsumexp_{j != y} z_j - z_y) (see _target_logprob)."""
    lse = torch.logsumexp(z, dim=-1)
    top1 = z.gather(1, y[:, None]).squeeze(1) == z.amax(dim=-1)
    logpj = z - lse[:, None]
    logpj = logpj.scatter(1, y[:, None], _target_logprob(z, y)[:, None])
    p = torch.exp(logpj)
    ent = -torch.where(p > 0, p * logpj, torch.zeros_like(p)).sum(dim=-1)
    return lse, top1, ent


def oracle_iwsft(hidden, weight, labels, ref_logprobs=None, *, cu_seqlens=None, bias=None,
                    quality=None, config=IWConfig(), ignore_index=-100, normalizer=None,
                    dtype=torch.float64, logit_scale=1.0, logit_softcap=None,
                    logit_temperature=1.0, z_loss=0.0):
    """Returns dict(loss, token_logprobs, token_weights, seq_weights, entropy, top1, lse,
    z_loss). ``loss`` is differentiable w.r.t. hidden/weight/bias (computed in ``dtype``).
    The logits are transformed (transformed_logits) before the softmax; z_loss adds
    z_loss * sum_{target rows} lse_i^2 / D (not importance-weighted); entropy / top1 / lse are
    (N,) detached, 0 / False at non-target positions; z_loss the 0-d detached term."""
    H = hidden.shape[-1]
    h = hidden.reshape(-1, H).to(dtype)
    y = labels.reshape(-1)
    N = y.numel()
    if cu_seqlens is not None:
        bounds = [int(v) for v in cu_seqlens]
    elif labels.dim() == 2:
        T = labels.shape[1]
        bounds = [b * T for b in range(labels.shape[0] + 1)]
    else:
        bounds = [0, N]
    S = len(bounds) - 1

    logits = h @ weight.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    logits = transformed_logits(logits, logit_scale, logit_softcap, logit_temperature)
    mask = y != ignore_index
    safe_y = torch.where(mask, y, torch.zeros_like(y))
    logp = _target_logprob(logits, safe_y)  # differentiable
    lp = logp.detach()
    lse, top1, ent = _row_outputs(logits.detach(), safe_y)

    lo, hi = config.bounds
    T_ = config.temperature
    tw = torch.zeros(N, dtype=dtype, device=h.device)
    sw = torch.zeros(S, dtype=dtype, device=h.device)
    if config.mode != "sft":
        d = lp - ref_logprobs.reshape(-1).to(dtype)

    def clipped_exp(x):
        # clamp in log space: exp(min(max(x, log lo), log hi))
        lx = max(x, math.log(lo)) if lo > 0 else x
        lx = min(lx, math.log(hi)) if hi < math.inf else lx
        return math.exp(lx) if lx > -745 else 0.0

    units = []  # (seq index, positions) for valid sequences
    for s in range(S):
        pos = [i for i in range(bounds[s], bounds[s + 1]) if bool(mask[i])]
        if pos:
            units.append((s, pos))
    for s, pos in units:
        if config.mode == "sft":
            for i in pos:
                tw[i] = 1.0
        elif config.mode == "token":
            for i in pos:
                tw[i] = clipped_exp(T_ * float(d[i]))
        else:
            a = sum(float(d[i]) for i in pos)
            if config.length_normalize:
                a /= len(pos)
            sw[s] = clipped_exp(T_ * a)
            for i in pos:
                tw[i] = sw[s]
    if config.self_normalize and units:
        if config.mode == "sequence":
            mean = sum(float(sw[s]) for s, _ in units) / len(units)
        else:
            allpos = [i for _, pos in units for i in pos]
            mean = sum(float(tw[i]) for i in allpos) / len(allpos)
        if mean > 0:
            tw = tw / mean
            sw = sw / mean
    if quality is not None:
        for s, pos in units:
            q = float(quality[s])
            sw[s] = sw[s] * q
            for i in pos:
                tw[i] = tw[i] * q
    if config.mode != "sequence":
        for s, pos in units:
            sw[s] = sum(float(tw[i]) for i in pos) / len(pos)

    n_targets = int(mask.sum())
    D = float(normalizer) if normalizer is not None else max(n_targets, 1)
    loss = -(tw * torch.where(mask, logp, torch.zeros_like(logp))).sum() / D
    zterm = torch.zeros((), dtype=dtype, device=h.device)
    if z_loss:
        lse_d = torch.logsumexp(logits, dim=-1)  # differentiable
        zterm = z_loss * torch.where(mask, lse_d * lse_d, torch.zeros_like(lse_d)).sum() / D
        loss = loss + zterm
    return dict(loss=loss, token_logprobs=torch.where(mask, lp, 0.0), token_weights=tw,
                seq_weights=sw, entropy=torch.where(mask, ent, 0.0),
                top1=top1 & mask, lse=torch.where(mask, lse, 0.0), z_loss=zterm.detach())
