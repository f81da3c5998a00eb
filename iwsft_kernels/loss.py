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
from .config import IWConfig, LogitTransform, VocabParallel  # noqa: F401  (re-exported)
from .core import BACKENDS, DEFAULT_CHUNK_BYTES  # noqa: F401  (re-exported)


@dataclass
class IWSFTOutput:
    loss: torch.Tensor  # scalar, differentiable w.r.t. hidden, weight, bias
    token_logprobs: torch.Tensor  # (N,) fp32, detached, 0 at non-target positions
    seq_weights: torch.Tensor  # (S,) fp32
    token_weights: torch.Tensor  # (N,) fp32, 0 at non-target positions
    stats: dict = field(default_factory=dict)  # 0-d detached tensors
    # the fused per-token outputs (docs/design.md §9), aligned like token_logprobs, 0 / False
    # at non-target positions, None unless requested with outputs=(...):
    entropy: torch.Tensor | None = None  # (N,) fp32 entropy of the (transformed) softmax
    top1: torch.Tensor | None = None  # (N,) bool: the label attains the row max (ties count)
    lse: torch.Tensor | None = None  # (N,) fp32 logsumexp of the (transformed) logits
    z_loss: torch.Tensor | None = None  # 0-d detached fp32: the z-loss term included in loss


@dataclass
class LogProbsOutput:
    """What :func:`linear_logprobs` returns when ``outputs`` is not empty (fields not asked
    for are None). All (N,), 0 / False at ignored positions."""
    logprobs: torch.Tensor  # fp32
    entropy: torch.Tensor | None = None  # fp32
    top1: torch.Tensor | None = None  # bool
    lse: torch.Tensor | None = None  # fp32


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
                      chunk_bytes: int | None = None, logit_scale: float = 1.0,
                      logit_softcap: float | None = None, logit_temperature: float = 1.0,
                      z_loss: float = 0.0, outputs=(),
                      vocab_parallel: VocabParallel | None = None) -> IWSFTOutput:
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

    Logit transforms (docs/design.md §9): the softmax is that of
    z = logit_scale * (W h + b), then z = logit_softcap * tanh(z / logit_softcap) if a softcap
    is given, then z = z / logit_temperature (Gemma2 ``final_logit_softcapping``, Granite /
    Cohere logit scaling, a sampling temperature); logp, weights and every output are those
    of z. z_loss >= 0 adds ``z_loss * sum_{target rows} lse_i^2 / D`` to the loss (lse_i =
    logsumexp of z_i): NOT multiplied by the importance weights or quality; its gradient is
    never self-normalised. outputs: any of ("entropy", "top1", "lse") -> the (N,) fields of
    the result (entropy costs one more reduction over the vocabulary; top1 and lse are free).

    Vocabulary parallelism (docs/distributed.md): ``vocab_parallel=VocabParallel(group,
    start, stop)`` when this rank's weight (and bias) are rows [start, stop) of the head, or a
    DTensor weight placed Shard(0) (detected, no argument needed). Every rank of the group
    passes the same hidden, labels and options; labels are global ids; every rank gets the
    same loss and outputs; dW / db are the shard's (a DTensor for a DTensor weight), dH is
    summed over the group (the partial dH with ``VocabParallel(sequence_parallel=True)``).
    """
    config = IWConfig() if config is None else config
    if not isinstance(config, IWConfig):
        raise TypeError(f"config must be an IWConfig, got {type(config).__name__}")
    xf = core.make_transform(logit_scale, logit_softcap, logit_temperature)
    z_loss = core.check_z_loss(z_loss)
    outputs = core.check_outputs(outputs)
    return _loss(hidden, weight, labels, ref_logprobs, cu_seqlens, bias, quality, config,
                 ignore_index, normalizer, backend, chunk_bytes, xf, z_loss, outputs,
                 vocab_parallel)


def _refuse_compiled_vocab_parallel(vocab_parallel, weight):
    from .vocab_shard import is_dtensor

    if vocab_parallel is not None or is_dtensor(weight):
        raise NotImplementedError(
            "the vocabulary-parallel loss (vocab_parallel=... or a DTensor weight) does not run "
            "under torch.compile: its collectives are not part of the registered op "
            "(iwsft::linear_iwsft_fwd). Call it outside the compiled region "
            "(torch.compiler.disable) or run eagerly")


def _loss(hidden, weight, labels, ref_logprobs, cu_seqlens, bias, quality, config, ignore_index,
          normalizer, backend, chunk_bytes, xf, z_loss, outputs,
          vocab_parallel=None) -> IWSFTOutput:
    """linear_iwsft_loss with its config / transform / z_loss / outputs already validated
    (LinearIWSFTLoss validates them once, in its constructor: under torch.compile with
    dynamic shapes its float attributes may be symbolic, so they are not re-checked here)."""
    core.check_float("hidden", hidden)
    if torch.compiler.is_compiling():
        _refuse_compiled_vocab_parallel(vocab_parallel, weight)
        # One registered op (ops.py): no graph break at the loss. Its eager implementation
        # runs the same validation and computation as below, inside the compiled graph.
        loss, logp, seq_w, token_w, stats, ex = ops.call(
            hidden, weight, labels, ref_logprobs, cu_seqlens, bias, quality, config,
            ignore_index, normalizer, backend, chunk_bytes, xf, z_loss, outputs)
        return IWSFTOutput(loss=loss, token_logprobs=logp, seq_weights=seq_w,
                           token_weights=token_w, stats=stats, entropy=ex["entropy"],
                           top1=ex["top1"], lse=ex["lse"], z_loss=ex["z_loss"])
    def validate(hidden, weight, bias, V):  # run by setup_vocab_parallel (before its all-gather)
        be = core.resolve_backend(backend, hidden.device)
        return be, core.prepare(hidden, weight, labels, ref_logprobs, cu_seqlens, bias, quality,
                                config, ignore_index, normalizer,
                                need_ref=config.needs_reference, vocab_size=V)

    # a vocabulary shard: the local weight / bias (a DTensor's to_local(), differentiable)
    hidden, weight, bias, shard, (be, p) = core.setup_vocab_parallel(
        vocab_parallel, hidden, weight, bias, labels, ignore_index, validate)
    chunk_rows = core.chunk_rows_for(weight, chunk_bytes, weight.dtype, p.y.numel(),
                                     core.extra_fp32_buffers(be, hidden.device, xf, shard),
                                     shard)
    want_entropy = "entropy" in outputs
    grad_on = torch.is_grad_enabled()
    need_dh = grad_on and hidden.requires_grad
    need_dw = grad_on and weight.requires_grad
    need_db = grad_on and bias is not None and bias.requires_grad
    holder = {}

    def run():
        res, grads = core.forward_prepared(hidden, weight, bias, p, config, be, chunk_rows,
                                           need_dh, need_dw, need_db, xf, want_entropy,
                                           z_loss, shard)
        holder["res"] = res
        return res.loss, grads

    if need_dh or need_dw or need_db:
        loss = _FusedLinearIWSFT.apply(hidden, weight, bias, run)
    else:
        loss, _ = run()
    res = holder["res"]
    w = res.weights

    def per_token(name, values):
        return core.scatter(values, p.idx, p.N) if name in outputs else None

    return IWSFTOutput(
        loss=loss,
        token_logprobs=core.scatter(res.logp, p.idx, p.N),
        seq_weights=w.seq,
        token_weights=core.scatter(w.row, p.idx, p.N),
        stats=w.stats,
        entropy=per_token("entropy", res.entropy),
        top1=per_token("top1", res.top1),
        lse=per_token("lse", res.lse),
        z_loss=res.z_loss,
    )


class LinearIWSFTLoss(torch.nn.Module):
    """nn.Module form of :func:`linear_iwsft_loss`; returns an :class:`IWSFTOutput`."""

    def __init__(self, config: IWConfig | None = None, *, ignore_index: int = -100,
                 backend: str = "auto", chunk_bytes: int | None = None,
                 logit_scale: float = 1.0, logit_softcap: float | None = None,
                 logit_temperature: float = 1.0, z_loss: float = 0.0, outputs=(),
                 vocab_parallel: VocabParallel | None = None):
        super().__init__()
        if vocab_parallel is not None and not isinstance(vocab_parallel, VocabParallel):
            raise TypeError(f"vocab_parallel must be an iwsft_kernels.VocabParallel or None, "
                            f"got {type(vocab_parallel).__name__}")
        self.vocab_parallel = vocab_parallel
        self.config = IWConfig() if config is None else config
        if not isinstance(self.config, IWConfig):
            raise TypeError(f"config must be an IWConfig, got {type(self.config).__name__}")
        core.check_backend_name(backend)
        core.check_chunk_bytes(chunk_bytes)
        self.ignore_index = ignore_index
        self.backend = backend
        self.chunk_bytes = chunk_bytes
        self.logit_transform = core.make_transform(logit_scale, logit_softcap,
                                                   logit_temperature)
        self.z_loss = core.check_z_loss(z_loss)
        self.outputs = core.check_outputs(outputs)

    def forward(self, hidden, weight, labels, ref_logprobs=None, *, cu_seqlens=None, bias=None,
                quality=None, normalizer=None) -> IWSFTOutput:
        return _loss(hidden, weight, labels, ref_logprobs, cu_seqlens, bias, quality,
                     self.config, self.ignore_index, normalizer, self.backend, self.chunk_bytes,
                     self.logit_transform, self.z_loss, self.outputs, self.vocab_parallel)

    def extra_repr(self) -> str:
        s = f"config={self.config}, ignore_index={self.ignore_index}, backend={self.backend!r}"
        if not self.logit_transform.identity:
            s += f", logit_transform={self.logit_transform}"
        if self.z_loss:
            s += f", z_loss={self.z_loss}"
        if self.outputs:
            s += f", outputs={self.outputs}"
        if self.vocab_parallel is not None:
            s += f", vocab_parallel={self.vocab_parallel}"
        return s


@torch.no_grad()
def linear_logprobs(hidden, weight, labels, bias=None, ignore_index: int = -100,
                    backend: str = "auto", chunk_bytes: int | None = None, *,
                    logit_scale: float = 1.0, logit_softcap: float | None = None,
                    logit_temperature: float = 1.0, outputs=(),
                    vocab_parallel: VocabParallel | None = None):
    """(N,) fp32 log-probs log_softmax(z_i)[y_i] of the labels, z_i = the transformed W h_i + b
    (see linear_iwsft_loss), 0 at ignored positions; no grad, no logits materialised. Used to
    precompute reference log-probs. With outputs (any of "entropy", "top1", "lse") returns a
    LogProbsOutput(logprobs, entropy, top1, lse) instead (fields not asked for are None).
    vocab_parallel: as in linear_iwsft_loss (a DTensor weight placed Shard(0) is detected)."""
    xf = core.make_transform(logit_scale, logit_softcap, logit_temperature)
    outputs = core.check_outputs(outputs)
    if torch.compiler.is_compiling():
        _refuse_compiled_vocab_parallel(vocab_parallel, weight)
    rs = core.logprobs(hidden, weight, labels, bias, ignore_index, backend, chunk_bytes, xf,
                       "entropy" in outputs, vocab_parallel)
    if not outputs:
        return rs.logp
    return LogProbsOutput(logprobs=rs.logp,
                          entropy=rs.entropy if "entropy" in outputs else None,
                          top1=rs.top1 if "top1" in outputs else None,
                          lse=rs.lse if "lse" in outputs else None)
