"""The loss as a registered ``torch.library`` custom op, so that ``torch.compile`` sees it as
one opaque node (no graph break at the loss) and ``torch.library.opcheck`` passes.

    torch.ops.iwsft.linear_iwsft_fwd(hidden, weight, bias, labels, ref_logprobs, cu_seqlens,
        quality, normalizer_value, normalizer_tensor, mode, temperature, w_min, w_max,
        length_normalize, self_normalize, ignore_index, chunk_bytes, backend,
        need_dh, need_dw, need_db, logit_scale=1.0, logit_softcap=None,
        logit_temperature=1.0, z_loss=0.0, want_entropy=False, want_top1=False,
        want_lse=False)
      -> (loss, token_logprobs, token_weights, seq_weights, stats, entropy, top1, lse,
          z_loss_term, dh, dw, db)

The op takes the caller's tensors as they are (hidden (..., H), labels (...), ...). Everything
data-dependent happens inside its real implementation, which runs eagerly even inside a
compiled graph: full input validation (``core.prepare``: label range, cu_seqlens, ref and
quality checks), dropping the ignored positions, the default normaliser (number of targets),
backend choice, then the same chunked computation as the eager path (``core.forward_prepared``).
So errors are raised under ``torch.compile`` too, from inside the op at run time.
Every output's shape follows from the input shapes (the fake kernel below):
  loss (), token_logprobs (N,), token_weights (N,), seq_weights (S,), stats (len(STATS_KEYS),)
  entropy (N,) fp32 / top1 (N,) bool / lse (N,) fp32 when requested (want_*), else (0,);
  z_loss_term () fp32 (the z-loss part of loss; 0 when z_loss = 0)
  dh hidden.shape / dw weight.shape / db bias.shape in the input dtypes, or (0,) when not
  requested. S = cu_seqlens.numel() - 1, else labels.shape[0] for a (B, T) layout, else 1.
Gradients are computed in forward (as in the eager path) and returned as outputs; the
registered backward multiplies them by grad_output (out of place: an op's saved outputs must
not be mutated, so unlike the eager path this costs one extra dh/dw-sized tensor in backward).

The op is registered for all devices (CompositeExplicitAutograd): the same python
implementation runs on CPU (torch backend, native epilogue when it loads) and on CUDA (Triton
backend), dispatching exactly as ``linear_iwsft_loss`` does.
"""

from typing import Optional

import torch

from . import core
from .config import IDENTITY, IWConfig, LogitTransform

STATS_KEYS = ("weight_mean", "weight_min", "weight_max", "ess_fraction", "clip_frac_max",
              "clip_frac_min", "log_ratio_mean", "num_target_tokens", "num_sequences")
_NO_GRAD_OUT = 3  # number of trailing gradient outputs (dh, dw, db)


def _num_sequences(labels: torch.Tensor, cu_seqlens: Optional[torch.Tensor]):
    if cu_seqlens is not None:
        return cu_seqlens.shape[0] - 1
    if labels.dim() == 2:
        return labels.shape[0]
    return 1


@torch.library.custom_op("iwsft::linear_iwsft_fwd", mutates_args=())
def linear_iwsft_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    ref_logprobs: Optional[torch.Tensor],
    cu_seqlens: Optional[torch.Tensor],
    quality: Optional[torch.Tensor],
    normalizer_value: Optional[float],
    normalizer_tensor: Optional[torch.Tensor],
    mode: str,
    temperature: float,
    w_min: float,
    w_max: float,
    length_normalize: bool,
    self_normalize: bool,
    ignore_index: int,
    chunk_bytes: Optional[int],
    backend: str,
    need_dh: bool,
    need_dw: bool,
    need_db: bool,
    logit_scale: float = 1.0,
    logit_softcap: Optional[float] = None,
    logit_temperature: float = 1.0,
    z_loss: float = 0.0,
    want_entropy: bool = False,
    want_top1: bool = False,
    want_lse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor]:
    cfg = IWConfig(mode=mode, temperature=temperature, w_min=w_min, w_max=w_max,
                   length_normalize=length_normalize, self_normalize=self_normalize)
    xf = core.make_transform(logit_scale, logit_softcap, logit_temperature)
    z_loss = core.check_z_loss(z_loss)
    normalizer = normalizer_tensor if normalizer_tensor is not None else normalizer_value
    be = core.resolve_backend(backend, hidden.device)
    p = core.prepare(hidden, weight, labels, ref_logprobs, cu_seqlens, bias, quality, cfg,
                     ignore_index, normalizer, need_ref=cfg.needs_reference)
    chunk_rows = core.chunk_rows_for(weight, chunk_bytes, weight.dtype, p.y.numel(),
                                     core.extra_fp32_buffers(be, hidden.device, xf))
    need_db = need_db and bias is not None
    res, (dh, dw, db) = core.forward_prepared(hidden, weight, bias, p, cfg, be, chunk_rows,
                                              need_dh, need_dw, need_db, xf, want_entropy,
                                              z_loss)
    w = res.weights
    stats = torch.stack([w.stats[k].to(torch.float32).reshape(()) for k in STATS_KEYS])

    def empty(like, dtype=None):
        return like.new_empty((0,), dtype=dtype)

    def per_token(values, wanted, dtype):
        if not wanted:
            return empty(hidden, dtype)
        return core.scatter(values, p.idx, p.N).clone()

    return (
        res.loss.float().clone(),  # clone: outputs must never alias one another
        core.scatter(res.logp, p.idx, p.N).clone(),
        core.scatter(w.row, p.idx, p.N).clone(),
        w.seq.clone(),
        stats,
        per_token(res.entropy, want_entropy, torch.float32),
        per_token(res.top1, want_top1, torch.bool),
        per_token(res.lse, want_lse, torch.float32),
        res.z_loss.float().clone(),
        dh if dh is not None else empty(hidden),
        dw if dw is not None else empty(weight),
        db if db is not None else empty(weight if bias is None else bias),
    )


@linear_iwsft_fwd.register_fake
def _(hidden, weight, bias, labels, ref_logprobs, cu_seqlens, quality, normalizer_value,
      normalizer_tensor, mode, temperature, w_min, w_max, length_normalize, self_normalize,
      ignore_index, chunk_bytes, backend, need_dh, need_dw, need_db, logit_scale=1.0,
      logit_softcap=None, logit_temperature=1.0, z_loss=0.0, want_entropy=False,
      want_top1=False, want_lse=False):
    N = labels.numel()
    S = _num_sequences(labels, cu_seqlens)
    f32 = dict(dtype=torch.float32, device=hidden.device)
    b8 = dict(dtype=torch.bool, device=hidden.device)
    need_db = need_db and bias is not None
    return (
        hidden.new_empty((), **f32),
        hidden.new_empty((N,), **f32),
        hidden.new_empty((N,), **f32),
        hidden.new_empty((S,), **f32),
        hidden.new_empty((len(STATS_KEYS),), **f32),
        hidden.new_empty((N if want_entropy else 0,), **f32),
        hidden.new_empty((N if want_top1 else 0,), **b8),
        hidden.new_empty((N if want_lse else 0,), **f32),
        hidden.new_empty((), **f32),
        torch.empty_like(hidden) if need_dh else hidden.new_empty((0,)),
        torch.empty_like(weight) if need_dw else weight.new_empty((0,)),
        torch.empty_like(bias) if need_db else (weight if bias is None else bias).new_empty((0,)),
    )


_NEED_AT = 18  # index of need_dh among the op's inputs (need_dh, need_dw, need_db follow)


def _setup_context(ctx, inputs, output):
    need_dh, need_dw, need_db = inputs[_NEED_AT:_NEED_AT + 3]
    ctx.need = (need_dh, need_dw, need_db and inputs[2] is not None)
    ctx.num_inputs = len(inputs)
    ctx.save_for_backward(*output[-_NO_GRAD_OUT:])


def _backward(ctx, grad_loss, *_unused):
    dh, dw, db = ctx.saved_tensors
    out = []
    for g, needed in zip((dh, dw, db), ctx.need):
        out.append(g * grad_loss if needed else None)  # result in g.dtype; scalar not rounded
    # one gradient per op input: hidden, weight, bias, then the non-differentiable ones
    return (out[0], out[1], out[2]) + (None,) * (ctx.num_inputs - 3)


linear_iwsft_fwd.register_autograd(_backward, setup_context=_setup_context)


def call(hidden, weight, labels, ref_logprobs, cu_seqlens, bias, quality, config, ignore_index,
         normalizer, backend, chunk_bytes, xf: LogitTransform = IDENTITY, z_loss: float = 0.0,
         outputs=()):
    """Run the op with ``linear_iwsft_loss``'s arguments; returns (loss, token_logprobs,
    seq_weights, token_weights, stats dict, extras) with extras = dict(entropy, top1, lse:
    (N,) or None when not in ``outputs``; z_loss: the 0-d z-loss term). Only static checks
    happen here (no host syncs: this is what runs under torch.compile); the op itself
    validates the data. xf, z_loss and outputs come validated (loss.py: core.make_transform,
    core.check_z_loss, core.check_outputs)."""
    core.check_backend_name(backend)
    if isinstance(normalizer, torch.Tensor):
        norm_value, norm_tensor = None, normalizer
    elif normalizer is None:
        norm_value, norm_tensor = None, None
    else:
        if isinstance(normalizer, bool) or not isinstance(normalizer, (int, float)):
            raise TypeError(f"normalizer must be a number or 0-d tensor, got {normalizer!r}")
        norm_value, norm_tensor = float(normalizer), None
    core.check_chunk_bytes(chunk_bytes)
    grad_on = torch.is_grad_enabled()
    need_dh = grad_on and hidden.requires_grad
    need_dw = grad_on and weight.requires_grad
    need_db = grad_on and bias is not None and bias.requires_grad
    lo, hi = config.bounds
    (loss, logp, token_w, seq_w, stats, ent, top1, lse, zterm, _, _, _
     ) = torch.ops.iwsft.linear_iwsft_fwd(
        hidden, weight, bias, labels, ref_logprobs, cu_seqlens, quality, norm_value,
        norm_tensor, config.mode, float(config.temperature), lo, hi,
        bool(config.length_normalize), bool(config.self_normalize), int(ignore_index),
        chunk_bytes, backend, need_dh, need_dw, need_db, xf.scale, xf.softcap,
        xf.temperature, z_loss, "entropy" in outputs, "top1" in outputs, "lse" in outputs)
    stats_d = {k: stats[i].detach() for i, k in enumerate(STATS_KEYS)}
    extras = dict(entropy=ent.detach() if "entropy" in outputs else None,
                  top1=top1.detach() if "top1" in outputs else None,
                  lse=lse.detach() if "lse" in outputs else None,
                  z_loss=zterm.detach())
    return loss, logp.detach(), seq_w.detach(), token_w.detach(), stats_d, extras


__all__ = ["linear_iwsft_fwd", "call", "STATS_KEYS"]
