"""Patch a transformers causal LM so that its forward computes the fused iw-SFT loss.

After ``apply_iwsft_to_model(model, IWConfig(...))``:

    out = model(input_ids, attention_mask=..., labels=labels,        # labels in the usual HF
                ref_logprobs=ref, quality=q, num_items_in_batch=D)   # convention (unshifted)
    out.loss            # fused loss, no (B, T, V) logits ever exist; out.logits is None
    out.token_logprobs  # (B, T) fp32, aligned with `labels`: log p(labels[b, t] | tokens < t)
    out.seq_weights, out.token_weights, out.stats, out.num_targets

Conventions (all tensors (B, T) like ``input_ids``):
- ``labels[b, t]`` is the target for position t (HF convention); the patch shifts: hidden state
  t predicts labels[b, t + 1]. No target crosses a sequence boundary: in a packed row, sequence
  starts come from ``cu_seqlens`` (S+1,) over the flattened positions, or from ``position_ids``
  (a new sequence wherever position_ids[t] != position_ids[t-1] + 1, the rule transformers
  uses for packed SDPA / flash-attention).
- ``ref_logprobs[b, t] = log q_ref(labels[b, t] | tokens < t)``, same alignment as labels (it is
  what ``model(..., labels=labels, return_logprobs_only=True).token_logprobs`` returns), so the
  patch shifts it with the labels. Values at non-target positions are ignored.
- Sequences: each row is one sequence unless it is packed; ``quality`` has one entry per
  sequence (B entries for unpacked batches).
- ``num_items_in_batch`` is the loss divisor D (global target-token count across accumulation
  steps and ranks); default: the target tokens of this call.

The loss is computed inside the output-embedding module's own call (``lm_head(hidden,
request)``), so the lm_head weight (tied or not) is only touched while that module runs: the
gather/reshard hooks of FSDP2 and DeepSpeed ZeRO-3 see an ordinary forward. Without labels the
model's original forward runs unchanged.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from transformers.utils import ModelOutput

from .. import IWConfig, linear_iwsft_loss, linear_logprobs


@dataclass
class IWSFTCausalLMOutput(ModelOutput):
    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None  # always None: no logits are materialised
    token_logprobs: Optional[torch.Tensor] = None  # (B, T) fp32, aligned with labels
    token_weights: Optional[torch.Tensor] = None  # (B, T) fp32, aligned with labels
    seq_weights: Optional[torch.Tensor] = None  # (S,) fp32
    num_targets: Optional[torch.Tensor] = None  # 0-d int64: target tokens in this call
    stats: Optional[dict] = None  # per-call weight statistics (see iwsft_kernels.weights)


# ------------------------------------------------------------------------------ shifting
def sequence_starts(labels: torch.Tensor, position_ids: torch.Tensor | None = None,
                    cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) bool: True where a new sequence starts (column 0 always)."""
    starts = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    starts[:, 0] = True
    if cu_seqlens is not None:
        cu = cu_seqlens.to(labels.device, torch.long)
        if cu.dim() != 1 or cu[0] != 0 or cu[-1] != labels.numel():
            raise ValueError(f"cu_seqlens must be (S+1,) from 0 to B*T={labels.numel()}, "
                             f"got {cu.tolist()}")
        starts.view(-1)[cu[:-1]] = True
    elif position_ids is not None:
        pos = position_ids.to(labels.device).expand_as(labels)
        starts[:, 1:] |= pos[:, 1:] != pos[:, :-1] + 1
    return starts


def shift_for_next_token(x: torch.Tensor, starts: torch.Tensor, fill) -> torch.Tensor:
    """out[b, t] = x[b, t + 1] unless t + 1 starts a new sequence or t is last: then `fill`."""
    out = torch.full_like(x, fill)
    out[:, :-1] = x[:, 1:].masked_fill(starts[:, 1:], fill)
    return out


def unshift(x: torch.Tensor) -> torch.Tensor:
    """Inverse alignment: out[b, t] = x[b, t - 1], out[b, 0] = 0 (back to the labels convention)."""
    out = torch.zeros_like(x)
    out[:, 1:] = x[:, :-1]
    return out


# -------------------------------------------------------------------- lm_head-side compute
class _HeadRequest:
    """What the patched lm_head computes. A plain object on purpose: FSDP2's input casting and
    DeepSpeed's hooks traverse tuples/dicts/dataclasses, and would cast the fp32 ref_logprobs."""

    __slots__ = ("labels", "ref", "quality", "cu_seqlens", "config", "normalizer",
                 "logprobs_only", "backend", "ignore_index")

    def __init__(self, **kw):
        for k in self.__slots__:
            setattr(self, k, kw.get(k))


def _head_forward(self: nn.Module, hidden: torch.Tensor, request: _HeadRequest | None = None):
    if request is None:
        return self._iwsft_orig_forward(hidden)
    weight, bias = self.weight, getattr(self, "bias", None)
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):  # what nn.Linear does under autocast
        dt = torch.get_autocast_dtype(dev)
        hidden, weight = hidden.to(dt), weight.to(dt)
        bias = None if bias is None else bias.to(dt)
    r = request
    if r.logprobs_only:
        lp = linear_logprobs(hidden, weight, r.labels, bias=bias, ignore_index=r.ignore_index,
                             backend=r.backend)
        return (lp,)
    out = linear_iwsft_loss(hidden, weight, r.labels, r.ref, cu_seqlens=r.cu_seqlens, bias=bias,
                            quality=r.quality, config=r.config, ignore_index=r.ignore_index,
                            normalizer=r.normalizer, backend=r.backend)
    # a tuple whose first item is the loss tensor: DeepSpeed attaches its backward hooks to it
    return out.loss, out


# ---------------------------------------------------------------------- model-side forward
_OUR_KWARGS = ("ref_logprobs", "quality", "cu_seqlens", "iw_config", "num_items_in_batch",
               "return_logprobs_only")


def _iwsft_forward(self: nn.Module, *args, labels: torch.Tensor | None = None,
                   ref_logprobs: torch.Tensor | None = None, quality: torch.Tensor | None = None,
                   cu_seqlens: torch.Tensor | None = None, iw_config: IWConfig | None = None,
                   num_items_in_batch: Any = None, return_logprobs_only: bool = False,
                   **kwargs):
    if labels is None:
        if ref_logprobs is not None or quality is not None or return_logprobs_only:
            raise ValueError("ref_logprobs / quality / return_logprobs_only need `labels`")
        return self._iwsft_orig_forward(*args, **kwargs)  # plain inference: unchanged

    st = self._iwsft
    if labels.dim() == 1:
        labels = labels[None]
    if kwargs.get("logits_to_keep", 0) not in (0, None):
        raise ValueError("logits_to_keep is not supported together with labels")
    kwargs.pop("logits_to_keep", None)
    kwargs.pop("return_dict", None)
    for k in ("use_cache", "past_key_values", "cache"):
        kwargs.pop(k, None)

    body_out = _decoder_of(self)(*args, use_cache=False, **kwargs)
    hidden = body_out.last_hidden_state if hasattr(body_out, "last_hidden_state") else body_out[0]
    if hidden.shape[:2] != labels.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match the hidden states "
                         f"{tuple(hidden.shape[:2])}")

    starts = sequence_starts(labels, kwargs.get("position_ids"), cu_seqlens)
    targets = shift_for_next_token(labels, starts, st.ignore_index)
    packed = bool(starts[:, 1:].any())
    if packed:  # flatten; each start is a sequence boundary
        flat_starts = starts.reshape(-1).nonzero().squeeze(1)
        cu = torch.cat([flat_starts, flat_starts.new_tensor([labels.numel()])])
        h, y = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    else:  # (B, T): each row is a sequence
        cu, h, y = None, hidden, targets
    head = self.get_output_embeddings()
    common = dict(cu_seqlens=cu, ignore_index=st.ignore_index, backend=st.backend)

    if return_logprobs_only:
        (lp,) = head(h, _HeadRequest(labels=y, logprobs_only=True, **common))
        return IWSFTCausalLMOutput(token_logprobs=unshift(lp.reshape(labels.shape)),
                                   num_targets=(targets != st.ignore_index).sum())

    config = iw_config if iw_config is not None else st.config
    ref = None
    if ref_logprobs is not None:
        ref = shift_for_next_token(ref_logprobs.to(hidden.device, torch.float32).reshape(
            labels.shape), starts, 0.0)
        ref = ref.masked_fill(targets == st.ignore_index, 0.0).reshape(y.shape)
    if quality is not None:
        quality = quality.to(hidden.device, torch.float32).reshape(-1)
        n_seq = int(starts.sum())
        if quality.numel() != n_seq:
            raise ValueError(f"quality has {quality.numel()} entries but the batch holds {n_seq} "
                             f"sequences")
    req = _HeadRequest(labels=y, ref=ref, quality=quality, config=config,
                       normalizer=num_items_in_batch, logprobs_only=False, **common)
    loss, res = head(h, req)
    return IWSFTCausalLMOutput(
        loss=loss,
        token_logprobs=unshift(res.token_logprobs.reshape(labels.shape)),
        token_weights=unshift(res.token_weights.reshape(labels.shape)),
        seq_weights=res.seq_weights,
        num_targets=(targets != st.ignore_index).sum(),
        stats=res.stats,
    )


# --------------------------------------------------------------------------------- patching
@dataclass
class _PatchState:
    config: IWConfig
    backend: str
    ignore_index: int


def _decoder_of(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_decoder", None)
    body = get() if callable(get) else None
    if body is None or body is model:
        body = getattr(model, "base_model", None)
    if body is None or body is model:
        raise TypeError(f"{type(model).__name__}: cannot find the decoder body (expected "
                        f"`get_decoder()` or `base_model` returning the transformer)")
    return body


def apply_iwsft_to_model(model: nn.Module, config: IWConfig | None = None, *,
                         backend: str = "auto", ignore_index: int = -100) -> nn.Module:
    """Patch `model` (in place; also returned) so that forward with `labels` computes the fused
    iw-SFT loss. Works for any causal LM with a decoder body and an output-embedding Linear
    (``get_output_embeddings()``): Qwen2/Qwen2.5, Llama, Mistral, GPT-2, ... Calling it again
    only updates the config/backend."""
    config = IWConfig() if config is None else config
    if not isinstance(config, IWConfig):
        raise TypeError(f"config must be an IWConfig, got {type(config).__name__}")
    if getattr(model, "_iwsft", None) is not None:
        model._iwsft = _PatchState(config, backend, ignore_index)
        return model
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise TypeError(f"{type(model).__name__} has no output embedding (lm_head) with a "
                        f"`weight`; is it a causal LM?")
    _decoder_of(model)  # fail early
    head._iwsft_orig_forward = head.forward
    head.forward = types.MethodType(_head_forward, head)
    model._iwsft_orig_forward = model.forward
    model.forward = types.MethodType(_iwsft_forward, model)
    model._iwsft = _PatchState(config, backend, ignore_index)
    return model


def remove_iwsft_patch(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_iwsft_to_model`."""
    if getattr(model, "_iwsft", None) is None:
        return model
    head = model.get_output_embeddings()
    del head.forward, head._iwsft_orig_forward
    del model.forward, model._iwsft_orig_forward
    model._iwsft = None
    return model


def _check_type(model: nn.Module, model_types: tuple[str, ...]) -> None:
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt not in model_types:
        raise TypeError(f"expected a model of type {model_types}, got {mt!r}; use "
                        f"apply_iwsft_to_model for other architectures")


def apply_iwsft_to_qwen2(model: nn.Module, config: IWConfig | None = None, **kw) -> nn.Module:
    """Qwen2 / Qwen2.5 (tied embeddings for 0.5B-3B are handled: the tied weight is used)."""
    _check_type(model, ("qwen2",))
    return apply_iwsft_to_model(model, config, **kw)


def apply_iwsft_to_llama(model: nn.Module, config: IWConfig | None = None, **kw) -> nn.Module:
    _check_type(model, ("llama",))
    return apply_iwsft_to_model(model, config, **kw)
