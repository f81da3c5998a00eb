"""Check the iw-SFT transformers patch against every causal-LM type of the installed transformers.

For each model type of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` this builds a tiny random model
(2 layers, hidden 32, vocabulary 151, logits made peaked by a larger output projection) and:

* supported types (``iwsft_kernels/integrations/architectures.py``): compares the patched
  model (fp32, backend "torch") with the unpatched model run in float64, with the float64
  cross-entropy / log-softmax written here from its float64 logits (transformers' own loss
  upcasts to fp32 only): sft-mode loss, every parameter gradient, token log-probs, and
  sequence-mode loss and weights (w_s = clamp(exp(mean_i d_i), 0, 16), d_i = float64 logp_i -
  the given ref_i). MoE types also run with ``output_router_logits=True`` (the truth adds
  ``router_aux_loss_coef * out.aux_loss`` of the float64 model) and transform types with a
  value of the transform that changes the logits. Each check also confirms the truth is the
  model's own loss: the float64 model's ``labels=`` loss must equal it to fp32 precision.
* refused types: confirms that ``apply_iwsft_to_model`` raises UnsupportedModelError (when a
  tiny model can be built) and records the reason.

Writes docs/models.md and bench/results/model_support.json (``--out-md`` / ``--out-json``);
``--types a,b`` checks only those. Exit status 1 if a supported type does not match.

    PYTHONPATH=. python scripts/model_support.py            # all types (~10 min on 2 cores)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import transformers  # noqa: E402
from transformers import CONFIG_MAPPING, AutoModelForCausalLM  # noqa: E402
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # noqa: E402

from iwsft_kernels import IWConfig  # noqa: E402
from iwsft_kernels.integrations import UnsupportedModelError, apply_iwsft_to_model  # noqa: E402
from iwsft_kernels.integrations import architectures as arch  # noqa: E402

V = 151  # odd on purpose
B, T = 3, 12
W_MAX = 16.0

# tolerances of the patched fp32 model vs the float64 truth (relative to the quantity's scale)
TOL = dict(loss=2e-5, grad=5e-4, logprobs=5e-5, seq_loss=2e-5, seq_weights=5e-5)
# the float64 model's own labels= loss vs the truth written here (fp32 cross-entropy inside)
TOL_OWN = 1e-5

GENERIC = dict(
    vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
    moe_intermediate_size=16, shared_expert_intermediate_size=16, n_routed_experts=4,
    num_experts=4, num_local_experts=4, num_experts_per_tok=2, n_shared_experts=1,
    kv_lora_rank=8, q_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
    qk_head_dim=8, d_model=32, decoder_ffn_dim=48, encoder_ffn_dim=48, decoder_attention_heads=4,
    encoder_attention_heads=4, decoder_layers=2, encoder_layers=2, n_layer=2, n_head=4,
    n_embd=32, n_positions=64, n_ctx=64, sliding_window=8, first_k_dense_replace=1,
    mamba_d_state=8, mamba_n_heads=4, mamba_d_head=16, mamba_chunk_size=16, chunk_size=16,
    linear_key_head_dim=8, linear_value_head_dim=8, linear_num_value_heads=4,
    linear_num_key_heads=2, index_head_dim=8, index_n_heads=2, index_topk=8, ffn_dim=48,
    rotary_dim=4, n_group=1, topk_group=1,
)
IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)

_DROP = object()  # an EXTRA value: do not pass this key (leave the config's own default)
_MAMBA2 = dict(mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_chunk_size=16,
               mamba_expand=2)

# per-type overrides on top of GENERIC (what a tiny config of that type needs to build)
EXTRA: dict[str, dict] = {
    "zamba": dict(num_hidden_layers=3, n_mamba_heads=2,
                  layers_block_type=["linear_attention", "hybrid", "hybrid"]),
    "zamba2": dict(num_hidden_layers=3, n_mamba_heads=4, mamba_d_state=8,
                   layers_block_type=["linear_attention", "hybrid", "hybrid"]),
    "bamba": dict(attn_layer_indices=[1], **_MAMBA2),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                  expert_layer_offset=1),
    "granitemoehybrid": dict(layer_types=["linear_attention", "full_attention"], **_MAMBA2),
    "falcon_h1": dict(mamba_d_ssm=64, **_MAMBA2),
    "mamba2": dict(num_heads=4, head_dim=16, n_groups=1, state_size=8),
    "zaya": dict(num_experts_per_tok=1),
    "falcon": dict(head_dim=_DROP),
    "gpt_neo": dict(num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
                    window_size=8),
    "deepseek_v4": dict(mlp_layer_types=["hash_moe", "moe"]),
    "flint": dict(mlp_only_layers=[0]),
    "bert-generation": dict(is_decoder=True),
    "inkling2_text": dict(unpadded_vocab_size=V),
    "inkling2_loop_text": dict(unpadded_vocab_size=V),
    "reformer": dict(is_decoder=True, attn_layers=["local", "local"], local_attn_chunk_length=4,
                     local_num_chunks_before=1, local_num_chunks_after=0, axial_pos_embds=False,
                     feed_forward_size=48, num_attention_heads=2, attention_head_size=16,
                     hidden_dropout_prob=0.0, local_attention_probs_dropout_prob=0.0,
                     lsh_attention_probs_dropout_prob=0.0),
    "dots3_note": dict(composite=dict(vision_config=dict(adapter_out_dim=32),
                                      audio_config=dict(adapter_out_dim=32))),
    "dory": dict(num_hidden_layers=3, n_input_layers=1, n_recurrent_layers=1, n_output_layers=1,
                 layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"]),
    "dbrx": dict(d_model=32, n_heads=4, n_layers=2, max_seq_len=64,
                 attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
                 ffn_config=dict(ffn_hidden_size=48, moe_num_experts=4, moe_top_k=2)),
    "qwen4_exp_text": dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=8,
                           indexer_budget=8, indexer_compress_ratio=2, ngram_vocab_size_base=256,
                           make_ngram_vocab_size_divisible_by=8, split_ngram_parts=4),
    "gemma3n_text": dict(num_kv_shared_layers=0, laurel_rank=4, hidden_size_per_layer_input=8,
                         vocab_size_per_layer_input=V),
    "recurrent_gemma": dict(block_types=["recurrent", "attention"], attention_window_size=8,
                            lru_width=32),
    "cohere_compass_text": dict(layer_types=["full_attention", "full_attention"],
                                rope_parameters={"full_attention": dict(rope_type="default",
                                                                        rope_theta=10000.0)}),
    # xLSTM rounds its q/k/v widths up to multiples of 64: hidden 128 keeps them consistent
    "xlstm": dict(num_heads=4, hidden_size=128, embedding_dim=128, chunk_size=4,
                  v_head_dim=_DROP, qk_head_dim=_DROP, head_dim=_DROP),
}
EXTRA["qwen4_exp"] = EXTRA["qwen4_exp_text"]

# variants run besides the default config: name -> overrides (transform values that change
# the logits, the router auxiliary loss on)
AUX_ON = dict(output_router_logits=True, router_aux_loss_coef=0.3)
_CAP = {"softcap": dict(final_logit_softcapping=2.0)}
VARIANTS: dict[str, dict[str, dict]] = {
    **{t: _CAP for t in ("gemma2", "gemma3_text", "gemma3n_text", "nanochat", "vaultgemma",
                         "beam", "gemma4_text", "gemma4_unified_text", "inkling2_text",
                         "inkling2_loop_text")},
    **{t: {"scale": dict(logits_scaling=4.0)} for t in ("granite", "granite_swa")},
    "minicpm3": {"scale": dict(dim_model_base=8)},  # logits_scaling = hidden_size / 8 = 4
    **{t: {"scale": dict(logits_scaling=4.0), "aux": dict(logits_scaling=4.0, **AUX_ON)}
       for t in ("granitemoe", "granitemoe_swa", "granitemoehybrid", "granitemoeshared")},
    **{t: {"scale": dict(logit_scale=2.5)} for t in ("cohere", "cohere2", "cohere2_moe",
                                                      "cohere_compass_text")},
    "hyperclovax": {"scale": dict(logits_scaling=0.3)},
    "falcon_h1": {"scale": dict(lm_head_multiplier=0.3)},
    "inkling_text": {"scale": dict(logits_mup_width_multiplier=3.0)},
    "recurrent_gemma": {"softcap": dict(logits_soft_cap=2.0)},
    "xlstm": {"softcap": dict(output_logit_soft_cap=2.0)},
    "doge": {"aux": dict(is_moe=True, **AUX_ON)},
}


def _variant_for(mt: str, a) -> dict[str, dict]:
    out = dict(VARIANTS.get(mt, {}))
    if a is not None and a.aux is not None and "aux" not in out:
        coef = dict(AUX_ON)
        if a.aux_coef != "router_aux_loss_coef":
            coef[a.aux_coef] = coef.pop("router_aux_loss_coef")
        out["aux"] = coef
    return out


# ------------------------------------------------------------------------------ building
def _has(obj, key: str) -> bool:
    try:
        getattr(obj, key)
    except AttributeError:
        return False
    except Exception:  # noqa: BLE001  (a per-layer attribute of a heterogeneous config)
        return True
    return True


def _shrink(cls, overrides: dict) -> dict:
    try:
        base = cls()
    except Exception:  # noqa: BLE001  (a config without usable defaults)
        base = None
    kw = {k: v for k, v in GENERIC.items() if base is None or _has(base, k)}
    kw["vocab_size"] = V
    kw.update(IDS)
    if _has(base, "qk_rope_head_dim") and "head_dim" in kw:  # MLA: rotary part = head_dim
        kw["head_dim"] = kw["qk_rope_head_dim"]
    if _has(base, "kv_lora_rank") and "num_key_value_heads" in kw:  # MLA: a kv head per head
        kw["num_key_value_heads"] = kw.get("num_attention_heads", 4)
    n = kw.get("num_hidden_layers", 2)
    lt = getattr(base, "layer_types", None) if _has(base, "layer_types") else None
    settable = "layer_types" in getattr(cls, "__dataclass_fields__", {}) and \
        "layer_types" not in getattr(cls, "attribute_map", {})
    if settable and isinstance(lt, list) and lt and "layer_types" not in overrides:
        kinds = list(dict.fromkeys(lt))  # every kind once, in order of appearance
        kw["layer_types"] = (kinds * n)[:max(n, len(kinds))]
        kw["num_hidden_layers"] = len(kw["layer_types"])
    kw.update(overrides)
    for k in [k for k, v in kw.items() if v is _DROP]:
        del kw[k]
    return kw


def tiny_config(mt: str, variant: dict | None = None):
    cls = CONFIG_MAPPING[mt]
    over = {**EXTRA.get(mt, {}), **(variant or {})}
    text_over = over.pop("text_config", None)
    outer = over.pop("composite", {})  # kwargs of a composite config itself
    subs = getattr(cls, "sub_configs", {}) or {}
    if "text_config" in subs:  # composite config: the causal LM is built from the text part
        tcls = subs["text_config"]
        if not isinstance(tcls, type) or not hasattr(tcls, "to_dict"):
            tcls = CONFIG_MAPPING[cls().text_config.model_type]
        text = _shrink(tcls, {**over, **(text_over or {})})
        return cls(text_config=text, **{**IDS, **outer})
    return cls(**_shrink(cls, over))


def _peaked_head(model: torch.nn.Module) -> None:
    """Scale the output projection so that the logits have std ~3 (peaked, p_y up to ~1)."""
    head = model.get_output_embeddings()
    if isinstance(getattr(head, "weight", None), torch.Tensor):
        with torch.no_grad():
            w = head.weight
            g = torch.Generator().manual_seed(1234)
            w.copy_(torch.randn(w.shape, generator=g) * (3.0 / math.sqrt(w.shape[1])))


# types whose backward needs training mode (Reformer's reversible layers); dropout is 0 above
TRAIN_MODE = {"reformer"}


def build(mt: str, variant: dict | None = None) -> torch.nn.Module:
    cfg = tiny_config(mt, variant)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    _peaked_head(model)
    return model.float().train(mt in TRAIN_MODE)


def batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, T), generator=g)
    lengths = [T, T - 3, T - 5]
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    ids = ids.masked_fill(mask == 0, IDS["pad_token_id"])
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100  # a prompt without loss
    return ids, mask, labels


# -------------------------------------------------------------------------------- truth
def _aux_coef(model, a) -> float:
    return float(getattr(model, a.aux_coef)) if a is not None and a.aux else 0.0


def truth(model, ids, mask, labels, extra: dict, a, noise: torch.Tensor) -> dict:
    """Float64 loss / grads / log-probs / sequence-mode values of the unpatched model."""
    m = copy.deepcopy(model).double()
    if m._can_set_experts_implementation():  # grouped_mm has no float64
        m.set_experts_implementation("eager")
    extra = {**extra, "use_cache": False}  # the training configuration (RWKV updates its state
    # in place with a cache)
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # constants made inside forward (masks) in float64
    try:
        try:
            return _truth(m, ids, mask, labels, extra, a, noise)
        except RuntimeError as e:
            keep32 = getattr(m, "_keep_in_fp32_modules_strict", None) or []
            if "dtype" not in str(e) or not keep32:
                raise
        # parts the model computes in fp32 by design (Inkling2's router casts its input to
        # fp32): those stay fp32, the rest is float64
        with torch.no_grad():
            for name, t in list(m.named_parameters()) + list(m.named_buffers()):
                if any(k in name for k in keep32) and t.is_floating_point():
                    t.data = t.data.float()
        res = _truth(m, ids, mask, labels, extra, a, noise)
        res["fp32_parts"] = list(keep32)
        return res
    finally:
        torch.set_default_dtype(dtype)


def _truth(m, ids, mask, labels, extra, a, noise):
    m.zero_grad()
    seen = []  # the body's output: what a patch that ignores the output path projects
    body = arch._get(m, a.body) if a is not None else m.get_output_embeddings()
    hook = body.register_forward_hook(
        lambda mod, i, o: seen.append(i[0] if a is None else _hidden_of(o)))
    try:
        out = m(input_ids=ids, attention_mask=mask, **extra)
    finally:
        hook.remove()
    logits = out.logits.double()
    lp_all = torch.log_softmax(logits[:, :-1], dim=-1)
    tgt = labels[:, 1:]
    valid = tgt != -100
    lp = lp_all.gather(-1, tgt.clamp(min=0)[..., None]).squeeze(-1) * valid
    n = valid.sum()
    aux = getattr(out, "aux_loss", None)
    coef = _aux_coef(m, a) if extra.get("output_router_logits") else 0.0
    aux_term = torch.zeros((), dtype=torch.float64)
    if coef and aux is not None:
        aux_term = coef * aux.double()
    ce = -lp.sum() / n
    loss = ce + aux_term
    # what a patch that ignores the output path would compute: CE(body output @ W^T + b), no aux
    with torch.no_grad():
        head = arch._get(m, a.head) if a is not None else m.get_output_embeddings()
        naive_logits = head(seen[-1]).double()[:, :-1] if seen else None
        naive = None
        if naive_logits is not None and naive_logits.shape == logits[:, :-1].shape:
            nl = torch.log_softmax(naive_logits, -1).gather(-1, tgt.clamp(min=0)[..., None])
            naive = -(nl.squeeze(-1) * valid).sum() / n
    loss.backward(retain_graph=True)
    grads = {k: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
             for k, p in m.named_parameters()}
    # sequence mode: ref = logp - noise (noise >= 0), w_s = clamp(exp(mean d), 0, 16)
    lpd = lp.detach()
    ref = (lpd - noise) * valid
    d = (lpd - ref) * valid
    mean_d = d.sum(1) / valid.sum(1).clamp(min=1)
    w = torch.exp(mean_d.clamp(max=math.log(W_MAX))).clamp(0, W_MAX)
    seq_loss = (-(lpd * valid).sum(1) * w).sum() / n + aux_term.detach()
    # the model's own loss (fp32 cross-entropy inside) must be this truth
    with torch.no_grad():
        own = m(input_ids=ids, attention_mask=mask, labels=labels, **extra).loss
    lp_aligned = torch.zeros(labels.shape, dtype=torch.float64)
    lp_aligned[:, 1:] = lpd
    ref_aligned = torch.zeros(labels.shape, dtype=torch.float64)
    ref_aligned[:, 1:] = ref
    return dict(loss=loss.detach(), grads=grads, logprobs=lp_aligned, ref=ref_aligned,
                seq_weights=w, seq_loss=seq_loss.detach(),
                own_loss=None if own is None else own.double(), aux=aux_term.detach(),
                naive=naive)


def _hidden_of(out):
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _rel(a: torch.Tensor, b: torch.Tensor, scale: float | None = None) -> float:
    a, b = a.double(), b.double()
    s = scale if scale is not None else float(b.abs().max()) if b.numel() else 0.0
    return float((a - b).abs().max()) / max(s, 1e-30) if a.numel() else 0.0


def compare(model, extra: dict, a, backend: str = "torch") -> dict:
    """Patched (fp32) vs truth (float64): the relative errors, and whether they pass."""
    ids, mask, labels = batch()
    g = torch.Generator().manual_seed(7)
    noise = torch.rand(labels[:, 1:].shape, generator=g, dtype=torch.float64) * 0.5
    tr = truth(model, ids, mask, labels, extra, a, noise)
    own_err = None if tr["own_loss"] is None else _rel(tr["own_loss"], tr["loss"])

    pm = copy.deepcopy(model)
    apply_iwsft_to_model(pm, IWConfig(mode="sft"), backend=backend)
    pm.zero_grad()
    out = pm(input_ids=ids, attention_mask=mask, labels=labels, **extra)
    out.loss.backward()
    gmax = max(float(x.abs().max()) for x in tr["grads"].values() if x.numel())
    grad_errs = {}
    for k, p in pm.named_parameters():
        gp = p.grad if p.grad is not None else torch.zeros_like(p)
        want = tr["grads"][k]
        # per tensor, relative to its own scale, floored at 1e-3 of the largest gradient
        grad_errs[k] = _rel(gp, want, max(float(want.abs().max()), 1e-3 * gmax))
    worst = max(grad_errs, key=grad_errs.get)
    tgt = torch.zeros(labels.shape, dtype=torch.bool)
    tgt[:, 1:] = labels[:, 1:] != -100
    lp_err = _rel(out.token_logprobs[tgt], tr["logprobs"][tgt], 1.0)
    with torch.no_grad():
        seq = pm(input_ids=ids, attention_mask=mask, labels=labels,
                 ref_logprobs=tr["ref"].float(), iw_config=IWConfig(mode="sequence"), **extra)
    errs = dict(
        loss=_rel(out.loss.detach(), tr["loss"]),
        grad=grad_errs[worst],
        logprobs=lp_err,
        seq_loss=_rel(seq.loss, tr["seq_loss"]),
        seq_weights=_rel(seq.seq_weights, tr["seq_weights"]),
    )
    ok = all(errs[k] <= TOL[k] for k in TOL)
    own_ok = own_err is not None and own_err <= TOL_OWN
    res = dict(ok=ok and own_ok, errors=errs, worst_grad=worst, own_loss_err=own_err,
               aux=float(tr["aux"]), loss=float(tr["loss"]),
               naive_err=None if tr["naive"] is None else _rel(tr["naive"], tr["loss"]),
               seq_weights=[round(float(x), 6) for x in tr["seq_weights"]],
               fp32_parts=tr.get("fp32_parts", []))
    if not own_ok:
        res["note"] = "the model's own labels= loss differs from the shifted float64 truth"
    return res


# --------------------------------------------------------------------------------- runs
class _Timeout(Exception):
    pass


def _alarm(*_):
    raise _Timeout("timed out")


def check_supported_type(mt: str, backend: str = "torch") -> dict:
    a = arch.SUPPORTED.get(mt)
    runs = {"default": {}}
    runs.update(_variant_for(mt, a))
    out = {"status": "exact", "runs": {}}
    for name, var in runs.items():
        extra = {k: v for k, v in var.items() if k == "output_router_logits"}
        model = build(mt, var)
        plan = arch.resolve(model)
        r = compare(model, extra, plan.arch, backend)
        r["transform"] = repr(plan.transform(model))
        r["resolved_type"] = plan.model_type
        out["runs"][name] = r
        if not r["ok"]:
            out["status"] = "MISMATCH"
    return out


def check_refused_type(mt: str) -> dict:
    kind, reason = arch.REFUSED.get(mt, ("unverified", arch.support_table()[mt][1]))
    res = {"status": "refused", "kind": kind, "reason": reason}
    try:
        model = build(mt)
    except Exception as e:  # noqa: BLE001  (a tiny config of this type is not buildable here)
        res["built"] = False
        res["build_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        return res
    res["built"] = True
    if kind == arch.LABELS:  # evidence: the model's own loss vs the shifted / unshifted CE
        try:
            res.update(_label_convention(model))
        except Exception as e:  # noqa: BLE001
            res["convention_error"] = f"{type(e).__name__}: {str(e)[:120]}"
    try:
        apply_iwsft_to_model(model, IWConfig(mode="sft"), backend="torch")
    except UnsupportedModelError as e:
        res["message"] = str(e)
        return res
    res["status"] = "NOT REFUSED"
    return res


def _label_convention(model) -> dict:
    ids, mask, labels = batch()
    with torch.no_grad():
        own = model(input_ids=ids, attention_mask=mask, labels=labels).loss.double()
        logits = model(input_ids=ids, attention_mask=mask).logits.double()
    ce = torch.nn.functional.cross_entropy
    shifted = ce(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
    unshifted = ce(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    return {"own_vs_shifted": _rel(own, shifted), "own_vs_unshifted": _rel(own, unshifted)}


def run(types, timeout_s: int = 120, backend: str = "torch", log=print) -> dict:
    results = {}
    signal.signal(signal.SIGALRM, _alarm)
    table = arch.support_table()
    for mt in types:
        t0 = time.time()
        # a refused type is only built to confirm the refusal: less time for its defaults
        signal.alarm(timeout_s if table[mt][0] == "exact" else min(timeout_s, 60))
        try:
            if table[mt][0] == "exact":
                r = check_supported_type(mt, backend)
            else:
                r = check_refused_type(mt)
        except Exception as e:  # noqa: BLE001
            r = {"status": "ERROR", "error": f"{type(e).__name__}: {e}".splitlines()[0][:300],
                 "traceback": traceback.format_exc()[-2000:]}
        finally:
            signal.alarm(0)
        r["seconds"] = round(time.time() - t0, 2)
        results[mt] = r
        log(f"{r['status']:12s} {mt:28s} {r['seconds']:6.2f}s "
            + (" ".join(f"{k}:{max(x['errors'].values()):.1e}/naive {x['naive_err'] or 0:.1e}"
                        for k, x in r["runs"].items())
               if "runs" in r else r.get("reason", r.get("error", ""))[:90]))
    return results


# ------------------------------------------------------------------------------- output
def write_markdown(results: dict, path: Path, wall: float) -> None:
    exact = {k: v for k, v in results.items() if v["status"] == "exact"}
    refused = {k: v for k, v in results.items() if v["status"] == "refused"}
    other = {k: v for k, v in results.items() if k not in exact and k not in refused}
    cls = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    lines = [
        "# Supported models",
        "",
        "Generated by `scripts/model_support.py` (do not edit by hand) against transformers "
        f"{transformers.__version__}, torch {torch.__version__}: every causal-LM type of "
        "`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`.",
        "",
        "`apply_iwsft_to_model` (and `IWSFTTrainer`, which calls the same guard) patches only "
        "the types marked **exact** and raises `UnsupportedModelError` (a `TypeError` and a "
        "`ValueError`) with the reason for every other one. **exact** means: a tiny random "
        "model of the type, patched (fp32, torch backend), matched the unpatched model run in "
        "float64 (cross-entropy written from its float64 logits) in the sft-mode loss, every "
        "parameter gradient, the token log-probs, and the sequence-mode loss and weights; MoE "
        "types also with `output_router_logits=True` (router auxiliary loss included), "
        "transform types also with a transform value that changes the logits. The table lives "
        "in `iwsft_kernels/integrations/architectures.py`.",
        "",
        f"{len(exact)} exact, {len(refused)} refused"
        + (f", {len(other)} failing (see the JSON)" if other else "")
        + f" of {len(results)} types; full run {wall:.0f} s on {platform.machine()} "
        f"({os.cpu_count()} CPUs). Raw numbers: "
        "[bench/results/model_support.json](../bench/results/model_support.json).",
        "",
        "## Exact",
        "",
        "| model type | class | output path reproduced | worst relative error |",
        "|---|---|---|---|",
    ]
    for mt, r in sorted(exact.items()):
        a = arch.SUPPORTED[mt]
        what = []
        if a.transform is not None:
            what.append("logit transform (" + ", ".join(a.reads) + ")")
        if a.aux:
            what.append(f"router aux loss (`{a.aux_coef}`)")
        if not what:
            what.append("plain")
        if a.refuse_if is not None:
            what.append(f"refused if {a.refuse_if.__doc__.strip()}")
        worst = max(max(x["errors"].values()) for x in r["runs"].values())
        lines.append(f"| `{mt}` | {cls[mt]} | {', '.join(what)} | {worst:.1e} |")
    lines += ["", "## Refused", "",
              "Kinds: **head** (the output head is more than a plain Linear), **labels** (another "
              "label convention), **loss** (another loss), **multimodal** (image / audio "
              "wrappers, not verified), **interface** (not a causal-LM training forward, or not "
              "buildable from a tiny configuration). Check: *refused* = a tiny model was built "
              "and `apply_iwsft_to_model` raised; for **labels** also the model's own loss "
              "against the unshifted / shifted cross-entropy of its logits (relative difference).",
              "",
              "| model type | class | kind | reason | check |", "|---|---|---|---|---|"]
    for mt, r in sorted(refused.items(), key=lambda x: (x[1]["kind"], x[0])):
        if not r.get("built"):
            check = "not built here: " + r.get("build_error", "").split(":")[0]
        else:
            check = "refused"
            if "own_vs_unshifted" in r:
                check += (f"; own loss vs unshifted CE {r['own_vs_unshifted']:.0e}, "
                          f"vs shifted {r['own_vs_shifted']:.0e}")
        lines.append(f"| `{mt}` | {cls[mt]} | {r['kind']} | {r['reason']} | {check} |")
    if other:
        lines += ["", "## Failing (a bug: the table claims them)", ""]
        for mt, r in sorted(other.items()):
            lines.append(f"- `{mt}`: {r['status']} {r.get('error', '')}")
    lines += [
        "",
        "Also refused, whatever the type: a class that is not transformers' own (remote code) "
        "or overrides its `forward`; an output projection that is not a plain `nn.Linear` "
        "(a LoRA or quantized `lm_head`); a custom `loss_function`; a set config key that "
        "changes the logits and that the type's entry does not read (`LOGIT_KEYS`).",
        "",
    ]
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--types", default="", help="comma-separated model types (default: all)")
    p.add_argument("--timeout", type=int, default=180, help="seconds per model type")
    p.add_argument("--backend", default="torch")
    p.add_argument("--out-json", default=str(ROOT / "bench" / "results" / "model_support.json"))
    p.add_argument("--out-md", default=str(ROOT / "docs" / "models.md"))
    p.add_argument("--md-from-json", action="store_true",
                   help="only rewrite --out-md from --out-json (no checks)")
    args = p.parse_args(argv)
    if args.md_from_json:
        saved = json.loads(Path(args.out_json).read_text())
        write_markdown(saved["results"], Path(args.out_md), saved["wall_s"])
        return 0
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    types = [t for t in args.types.split(",") if t] or list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    t0 = time.time()
    results = run(types, args.timeout, args.backend)
    wall = time.time() - t0
    counts: dict[str, int] = {}
    for r in results.values():
        key = r["status"] if r["status"] != "refused" else f"refused/{r['kind']}"
        counts[key] = counts.get(key, 0) + 1
    print(f"wall {wall:.0f} s: {counts}")
    if not args.types:
        Path(args.out_json).write_text(json.dumps(dict(
            transformers=transformers.__version__, torch=torch.__version__, wall_s=round(wall),
            tolerances=TOL, counts=counts, results=results), indent=1, sort_keys=True) + "\n")
        write_markdown(results, Path(args.out_md), wall)
    bad = [k for k, r in results.items() if r["status"] not in ("exact", "refused")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
