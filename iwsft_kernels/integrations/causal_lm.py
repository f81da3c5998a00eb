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

Only architectures whose output path the patch reproduces exactly are patched (the table in
``architectures.py``, docs/models.md): their logit transform (Gemma2's final-logit softcap,
Granite's ``logits_scaling``, Cohere's ``logit_scale``, ...) is applied by the kernel, and the MoE
router auxiliary loss is added exactly as the model's own forward adds it
(``out.aux_loss``). Anything else raises ``UnsupportedModelError`` (a TypeError and a
ValueError) naming the model type and the reason.

Fused per-token outputs: ``iw_outputs=("entropy", "top1", "lse")`` (or the patch-level default
``apply_iwsft_to_model(..., outputs=...)``) adds ``out.entropy`` (fp32), ``out.top1`` (bool) and
``out.lse`` (fp32), (B, T) aligned with labels like ``token_logprobs`` (0 / False at
non-target positions): entropy of the model's next-token distribution, whether the label is
its arg-max, and the logsumexp of the (transformed) logits.

The loss is computed inside the output-embedding module's own call (``lm_head(hidden,
request)``), so the lm_head weight (tied or not) is only touched while that module runs: the
gather/reshard hooks of FSDP2 and DeepSpeed ZeRO-3 see an ordinary forward. Without labels the
model's original forward runs unchanged.
"""

from __future__ import annotations

import inspect
import types
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from transformers.utils import ModelOutput

from .. import IWConfig, linear_iwsft_loss, linear_logprobs
from ..config import OUTPUTS
from .architectures import Plan, UnsupportedModelError, resolve


@dataclass
class IWSFTCausalLMOutput(ModelOutput):
    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None  # always None: no logits are materialised
    token_logprobs: Optional[torch.Tensor] = None  # (B, T) fp32, aligned with labels
    token_weights: Optional[torch.Tensor] = None  # (B, T) fp32, aligned with labels
    seq_weights: Optional[torch.Tensor] = None  # (S,) fp32
    num_targets: Optional[torch.Tensor] = None  # 0-d int64: target tokens in this call
    stats: Optional[dict] = None  # per-call weight statistics (see iwsft_kernels.weights)
    aux_loss: Optional[torch.Tensor] = None  # MoE router auxiliary loss (coef * it is in loss)
    entropy: Optional[torch.Tensor] = None  # (B, T) fp32, aligned with labels (iw_outputs)
    top1: Optional[torch.Tensor] = None  # (B, T) bool, aligned with labels (iw_outputs)
    lse: Optional[torch.Tensor] = None  # (B, T) fp32, aligned with labels (iw_outputs)


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
                 "logprobs_only", "backend", "ignore_index", "transform", "outputs")

    def __init__(self, **kw):
        for k in self.__slots__:
            setattr(self, k, kw.get(k))


def _kernel_kwargs(r: _HeadRequest) -> dict:
    """The logit transform / fused outputs, passed only when used."""
    kw = {}
    xf = r.transform
    if xf is not None and not xf.identity:
        kw.update(logit_scale=xf.scale, logit_softcap=xf.softcap,
                  logit_temperature=xf.temperature)
    if r.outputs:
        kw["outputs"] = r.outputs
    return kw


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
                             backend=r.backend, **_kernel_kwargs(r))
        return (lp,)
    out = linear_iwsft_loss(hidden, weight, r.labels, r.ref, cu_seqlens=r.cu_seqlens, bias=bias,
                            quality=r.quality, config=r.config, ignore_index=r.ignore_index,
                            normalizer=r.normalizer, backend=r.backend, **_kernel_kwargs(r))
    # a tuple whose first item is the loss tensor: DeepSpeed attaches its backward hooks to it
    return out.loss, out


# ---------------------------------------------------------------------- model-side forward
_OUR_KWARGS = ("ref_logprobs", "quality", "cu_seqlens", "iw_config", "num_items_in_batch",
               "return_logprobs_only", "iw_outputs")


def _named_inputs(self: nn.Module, args: tuple, kwargs: dict) -> dict:
    """Positional arguments named after the model's own forward signature: the body is called
    with keywords only (its positional order can differ from the model's)."""
    if not args:
        return kwargs
    names = [p.name for p in inspect.signature(self._iwsft_orig_forward).parameters.values()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(args) > len(names):
        raise TypeError(f"{type(self).__name__}.forward got {len(args)} positional arguments")
    named = dict(zip(names, args))
    dup = set(named) & set(kwargs)
    if dup:
        raise TypeError(f"{type(self).__name__}.forward got multiple values for {sorted(dup)}")
    return {**named, **kwargs}


def _as_outputs(outs) -> tuple:
    """("entropy", "top1", "lse") subset as a tuple; a single name may be given as a str."""
    if isinstance(outs, str):
        outs = (outs,)
    outs = tuple(outs or ())
    bad = [o for o in outs if o not in OUTPUTS]
    if bad:
        raise ValueError(f"iw outputs must be a subset of {OUTPUTS}, got {bad}")
    return outs


def _aligned(x: torch.Tensor | None, shape) -> torch.Tensor | None:
    return None if x is None else unshift(x.reshape(shape))


def _iwsft_forward(self: nn.Module, *args, labels: torch.Tensor | None = None,
                   ref_logprobs: torch.Tensor | None = None, quality: torch.Tensor | None = None,
                   cu_seqlens: torch.Tensor | None = None, iw_config: IWConfig | None = None,
                   num_items_in_batch: Any = None, return_logprobs_only: bool = False,
                   iw_outputs=None, **kwargs):
    if labels is None:
        if ref_logprobs is not None or quality is not None or return_logprobs_only \
                or iw_outputs:
            raise ValueError("ref_logprobs / quality / return_logprobs_only / iw_outputs need "
                             "`labels`")
        return self._iwsft_orig_forward(*args, **kwargs)  # plain inference: unchanged

    st: _PatchState = self._iwsft
    plan: Plan = st.plan
    kwargs = _named_inputs(self, args, kwargs)
    if labels.dim() == 1:
        labels = labels[None]
    if kwargs.get("logits_to_keep", 0) not in (0, None):
        raise ValueError("logits_to_keep is not supported together with labels")
    if kwargs.get("shift_labels") is not None:
        raise ValueError("shift_labels is not supported by the iw-SFT patch; pass the unshifted "
                         "`labels` (the patch shifts them, never across a sequence boundary)")
    for k in ("logits_to_keep", "return_dict", "shift_labels", "use_cache", "past_key_values",
              "cache"):
        kwargs.pop(k, None)
    outputs = st.outputs if iw_outputs is None else _as_outputs(iw_outputs)
    router = plan.router_logits_wanted(self, kwargs.pop("output_router_logits", None))
    if router is not None:
        kwargs["output_router_logits"] = router
    if st.body_takes_use_cache:
        kwargs["use_cache"] = False

    body_out = plan.body(self)(**kwargs)
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
    head = plan.head(self)
    common = dict(cu_seqlens=cu, ignore_index=st.ignore_index, backend=st.backend,
                  transform=plan.transform(self), outputs=outputs)
    num_targets = (targets != st.ignore_index).sum()

    if return_logprobs_only:
        (lp,) = head(h, _HeadRequest(labels=y, logprobs_only=True, **common))
        res = lp if outputs else None
        lp = lp.logprobs if outputs else lp
        return IWSFTCausalLMOutput(
            token_logprobs=unshift(lp.reshape(labels.shape)), num_targets=num_targets,
            **{k: _aligned(getattr(res, k), labels.shape) for k in outputs})

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
    aux = None
    if router:  # the MoE forward: loss += coef * load_balancing_loss_func(...)
        coef, aux = plan.aux_loss(self, body_out, kwargs.get("attention_mask"))
        loss = loss + coef * aux.to(loss.device)
    return IWSFTCausalLMOutput(
        loss=loss,
        token_logprobs=unshift(res.token_logprobs.reshape(labels.shape)),
        token_weights=unshift(res.token_weights.reshape(labels.shape)),
        seq_weights=res.seq_weights,
        num_targets=num_targets,
        stats=res.stats,
        aux_loss=aux,
        **{k: _aligned(getattr(res, k), labels.shape) for k in outputs},
    )


# --------------------------------------------------------------------------------- patching
@dataclass
class _PatchState:
    config: IWConfig
    backend: str
    ignore_index: int
    plan: Plan
    outputs: tuple = ()
    body_takes_use_cache: bool = False


def _takes(module: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def check_model(model: nn.Module) -> Plan:
    """Raise UnsupportedModelError (a TypeError and a ValueError) naming the model type and the
    reason unless the patch reproduces `model`'s output path exactly (docs/models.md)."""
    return resolve(model)


def apply_iwsft_to_model(model: nn.Module, config: IWConfig | None = None, *,
                         backend: str = "auto", ignore_index: int = -100,
                         outputs=()) -> nn.Module:
    """Patch `model` (in place; also returned) so that forward with `labels` computes the fused
    iw-SFT loss. Only the model types verified to match their own forward exactly are patched
    (docs/models.md: Llama, Mistral, Qwen2/3, Qwen3-MoE, Mixtral, Gemma 1/2/3, Phi-3, Granite,
    Cohere, OLMo2, GPT-2, GPT-NeoX, DeepSeek-V3, GPT-OSS, Falcon-H1, SmolLM3, ...); anything
    else raises UnsupportedModelError with the reason. `outputs`: default fused per-token
    outputs (subset of ("entropy", "top1", "lse")) for every call. Calling it again only
    updates the config/backend/outputs."""
    config = IWConfig() if config is None else config
    if not isinstance(config, IWConfig):
        raise TypeError(f"config must be an IWConfig, got {type(config).__name__}")
    outputs = _as_outputs(outputs)
    st = getattr(model, "_iwsft", None)
    if st is not None:
        model._iwsft = _PatchState(config, backend, ignore_index, st.plan, outputs,
                                   st.body_takes_use_cache)
        return model
    plan = check_model(model)
    head = plan.head(model)
    head._iwsft_orig_forward = head.forward
    head.forward = types.MethodType(_head_forward, head)
    model._iwsft_orig_forward = model.forward
    model.forward = types.MethodType(_iwsft_forward, model)
    model._iwsft = _PatchState(config, backend, ignore_index, plan, outputs,
                               _takes(plan.body(model), "use_cache"))
    return model


def remove_iwsft_patch(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_iwsft_to_model`."""
    if getattr(model, "_iwsft", None) is None:
        return model
    head = model._iwsft.plan.head(model)
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
