"""Public entry points: linear_iwsft_loss, LinearIWSFTLoss, linear_logprobs (docs/design.md §2).

The loss is L = -sum_i m_i w(i) logp_i / D with logp_i = log_softmax(W h_i + b)[y_i], the
importance weights w detached (see weights.py), D the number of target tokens unless a
``normalizer`` is given. The N x V logits are never materialised: the backends work on chunks
of rows (torch) or tiles (Triton). Gradients are computed inside ``forward`` when needed, so
the lm_head weight is only touched while forward runs (FSDP2 / ZeRO-3 friendly); backward
only scales them by grad_output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import core, ops
from .config import IWConfig
from .core import BACKENDS, DEFAULT_CHUNK_BYTES  # noqa: F401  (re-exported)


@dataclass
class IWSFTOutput:
    loss: torch.Tensor  # scalar, differentiable w.r.t. hidden, weight, bias
    token_logprobs: torch.Tensor  # (N,) fp32, detached, 0 at non-target positions
    seq_weights: torch.Tensor  # (S,) fp32
    token_weights: torch.Tensor  # (N,) fp32, 0 at non-target positions
    stats: dict = field(default_factory=dict)  # 0-d detached tensors


# ----------------------------------------------------------------------------- autograd
class _FusedLinearIWSFT(torch.autograd.Function):
    """loss = fused(hidden, weight, bias). Gradients are made in forward and stored;
    backward scales them by grad_output (in place: backward may run once per forward)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, run):
        loss, grads = run()
        ctx.grads = grads
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grads = ctx.grads
        if grads is None:
            raise RuntimeError("linear_iwsft_loss: backward ran twice through the same forward; "
                               "its gradients were consumed by the first backward "
                               "(retain_graph is not supported). Recompute the loss instead.")
        ctx.grads = None
        out = []
        for g in grads:
            if g is not None:
                g.mul_(grad_loss)  # fp32 scalar: not rounded to g.dtype first
            out.append(g)
        return out[0], out[1], out[2], None


def linear_iwsft_loss(hidden, weight, labels, ref_logprobs=None, *, cu_seqlens=None, bias=None,
                      quality=None, config: IWConfig | None = None, ignore_index: int = -100,
                      normalizer=None, backend: str = "auto",
                      chunk_bytes: int | None = None) -> IWSFTOutput:
    """Fused linear + importance-weighted cross-entropy (docs/design.md §1-§2).

    hidden (..., H) and labels (...) are aligned (hidden[i] predicts labels[i]; the caller
    shifts). weight (V, H), bias (V,). ref_logprobs (...) = log q_ref(y_i | prefix), required
    unless config.mode == "sft". Sequences: ``cu_seqlens`` (S+1,) over the flattened positions,
    else each row of a (B, T) layout, else one sequence. quality (S,) >= 0 multiplies the
    sequence weights. normalizer: the loss divisor D (default: number of target tokens).
    If hidden's dtype differs from weight's, the matmuls run in weight's dtype.
    chunk_bytes: memory budget of one logits chunk; default: ~1/16 of the batch's target
    rows' fp32 logits, at least 64 rows (CPU) / 2048 rows (CUDA), at most 128 MiB (CPU) /
    1 GiB (CUDA) (core.default_chunk_rows).
    """
    config = IWConfig() if config is None else config
    if not isinstance(config, IWConfig):
        raise TypeError(f"config must be an IWConfig, got {type(config).__name__}")
    core.check_float("hidden", hidden)
    if torch.compiler.is_compiling():
        # One registered op (ops.py): no graph break at the loss. Its eager implementation
        # runs the same validation and computation as below, inside the compiled graph.
        loss, logp, seq_w, token_w, stats = ops.call(
            hidden, weight, labels, ref_logprobs, cu_seqlens, bias, quality, config,
            ignore_index, normalizer, backend, chunk_bytes)
        return IWSFTOutput(loss=loss, token_logprobs=logp, seq_weights=seq_w,
                           token_weights=token_w, stats=stats)
    be = core.resolve_backend(backend, hidden.device)
    p = core.prepare(hidden, weight, labels, ref_logprobs, cu_seqlens, bias, quality, config,
                     ignore_index, normalizer, need_ref=config.needs_reference)
    chunk_rows = core.chunk_rows_for(weight, chunk_bytes, weight.dtype, p.y.numel())
    grad_on = torch.is_grad_enabled()
    need_dh = grad_on and hidden.requires_grad
    need_dw = grad_on and weight.requires_grad
    need_db = grad_on and bias is not None and bias.requires_grad
    holder = {}

    def run():
        res, grads = core.forward_prepared(hidden, weight, bias, p, config, be, chunk_rows,
                                           need_dh, need_dw, need_db)
        holder["res"] = res
        return res.loss, grads

    if need_dh or need_dw or need_db:
        loss = _FusedLinearIWSFT.apply(hidden, weight, bias, run)
    else:
        loss, _ = run()
    res = holder["res"]
    w = res.weights
    return IWSFTOutput(
        loss=loss,
        token_logprobs=core.scatter(res.logp, p.idx, p.N),
        seq_weights=w.seq,
        token_weights=core.scatter(w.row, p.idx, p.N),
        stats=w.stats,
    )


class LinearIWSFTLoss(torch.nn.Module):
    """nn.Module form of :func:`linear_iwsft_loss`; returns an :class:`IWSFTOutput`."""

    def __init__(self, config: IWConfig | None = None, *, ignore_index: int = -100,
                 backend: str = "auto", chunk_bytes: int | None = None):
        super().__init__()
        self.config = IWConfig() if config is None else config
        if not isinstance(self.config, IWConfig):
            raise TypeError(f"config must be an IWConfig, got {type(self.config).__name__}")
        core.check_backend_name(backend)
        core.check_chunk_bytes(chunk_bytes)
        self.ignore_index = ignore_index
        self.backend = backend
        self.chunk_bytes = chunk_bytes

    def forward(self, hidden, weight, labels, ref_logprobs=None, *, cu_seqlens=None, bias=None,
                quality=None, normalizer=None) -> IWSFTOutput:
        return linear_iwsft_loss(hidden, weight, labels, ref_logprobs, cu_seqlens=cu_seqlens,
                                 bias=bias, quality=quality, config=self.config,
                                 ignore_index=self.ignore_index, normalizer=normalizer,
                                 backend=self.backend, chunk_bytes=self.chunk_bytes)

    def extra_repr(self) -> str:
        return f"config={self.config}, ignore_index={self.ignore_index}, backend={self.backend!r}"


@torch.no_grad()
def linear_logprobs(hidden, weight, labels, bias=None, ignore_index: int = -100,
                    backend: str = "auto", chunk_bytes: int | None = None) -> torch.Tensor:
    """(N,) fp32 log-probs log_softmax(W h_i + b)[y_i] of the labels, 0 at ignored positions;
    no grad, no logits materialised. Used to precompute reference log-probs."""
    return core.logprobs(hidden, weight, labels, bias, ignore_index, backend, chunk_bytes)
