"""Which transformers causal LMs the iw-SFT patch reproduces exactly, and how (docs/models.md).

The patch (``causal_lm.py``) replaces a model's output path by the fused loss: it calls the
model's body, then computes the loss of the output projection inside the projection module.
That equals the model's own forward only when the forward does nothing else after the body,
or something the patch reproduces: a logit transform (scale, softcap; applied by the kernel),
the MoE router auxiliary loss (the model module's own ``load_balancing_loss_func``, same
arguments and coefficient). So the patch works from an explicit table: every model type in
``SUPPORTED`` was checked by ``scripts/model_support.py`` against the unpatched model in float64
(loss, every parameter gradient, token log-probs, sequence-mode loss and weights), and every
other type is refused with the reason, ``REFUSED`` or the generic "not verified".

Refused besides: a class that is not transformers' own (remote code, a subclass overriding
``forward``), an output projection that is not a plain ``nn.Linear`` (LoRA / quantized head),
a custom ``loss_function``, a config value that changes the logits and that the type's entry
does not read (``LOGIT_KEYS``).
"""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..config import IDENTITY, LogitTransform

VERIFIED_TRANSFORMERS = "5.24.0"  # the transformers release the table was checked against


class UnsupportedModelError(TypeError, ValueError):
    """The patch cannot reproduce this model's forward (a TypeError and a ValueError)."""


# ------------------------------------------------------------------------ entry of the table
Transform = Callable[[nn.Module], LogitTransform]


@dataclass(frozen=True)
class Arch:
    """How one model type's forward goes from its body to the loss.

    body: dotted attribute path of the module the forward calls (its output's
      ``last_hidden_state`` / ``[0]`` feeds the projection).
    head: attribute path of the output projection (an ``nn.Linear``).
    transform: model -> LogitTransform, read from the same attributes the forward reads.
    reads: the ``LOGIT_KEYS`` the transform handles (any other one, set, is refused).
    aux: None, "router" (``load_balancing_loss_func(router_logits, num_experts,
      num_experts_per_tok, attention_mask)``) or "doge" (Doge's signature).
    aux_coef: the model attribute holding the auxiliary-loss coefficient.
    refuse_if: model -> reason or None, for config states the entry does not cover.
    """

    body: str = "model"
    head: str = "lm_head"
    transform: Transform | None = None
    reads: tuple[str, ...] = ()
    aux: str | None = None
    aux_coef: str = "router_aux_loss_coef"
    refuse_if: Callable[[nn.Module], str | None] | None = None


def _get(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


# ------------------------------------------------------------------- transform extractors
def _softcap(key: str) -> Transform:
    """logits = cap * tanh(logits / cap) when config.<key> is set (Gemma2 style)."""

    def f(model):
        cap = getattr(_text_config(model), key, None)
        return IDENTITY if cap is None else LogitTransform(softcap=cap)

    return f


def _scale_config(key: str, divide: bool) -> Transform:
    """logits = logits / config.<key> (divide) or * config.<key>."""

    def f(model):
        v = float(getattr(_text_config(model), key))
        return LogitTransform(scale=1.0 / v if divide else v)

    return f


def _scale_attr(path: str) -> Transform:
    """logits = logits * model.<path> (an attribute the model set from its config)."""

    def f(model):
        return LogitTransform(scale=float(_get(model, path)))

    return f


def _no_head_bias(model) -> str | None:
    """the output projection has a bias (the forward scales the hidden state, not the logits)"""
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        return "the hidden state is scaled before an output projection with a bias"
    return None


def _text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


# -------------------------------------------------------------------------------- tables
DENSE = Arch()
ROUTER = Arch(aux="router")
GEMMA_CAP = Arch(transform=_softcap("final_logit_softcapping"), reads=("final_logit_softcapping",))
GRANITE = Arch(transform=_scale_config("logits_scaling", divide=True), reads=("logits_scaling",))
COHERE = Arch(transform=_scale_attr("logit_scale"), reads=("logit_scale",))


def _bamba_refuse(model):
    """z_loss_coefficient > 0 (a z-loss over every position)"""
    c = float(getattr(model, "z_loss_coefficient", 0.0) or 0.0)
    if c > 0:
        return (f"z_loss_coefficient={c}: Bamba adds a z-loss over every position (targets or "
                f"not), which the fused loss does not compute")
    return None


def _inkling_refuse(model):
    """unpadded_vocab_size < the projection's rows, or the projection has a bias"""
    cfg = _text_config(model)
    u = getattr(cfg, "unpadded_vocab_size", None)
    if u is not None and u < model.get_output_embeddings().weight.shape[0]:
        return (f"unpadded_vocab_size={u} < the projection's "
                f"{model.get_output_embeddings().weight.shape[0]} rows: the forward drops the "
                f"padded vocabulary columns")
    return _no_head_bias(model)


def _recurrent_gemma_transform(model):
    return LogitTransform(softcap=float(model.config.logits_soft_cap))


SUPPORTED: dict[str, Arch] = {}


def _add(arch: Arch, *types: str) -> None:
    for t in types:
        assert t not in SUPPORTED, t
        SUPPORTED[t] = arch


_add(DENSE,  # the forward is body -> lm_head -> ForCausalLMLoss
     "apertus", "apertus1p5_text", "arcee", "bitnet", "cwm", "diffllama", "emu3", "ernie4_5",
     "exaone", "exaone4", "gemma", "glm", "glm4", "helium", "hunyuan_v1_dense", "internlm3",
     "iquestcoder", "jais2", "lfm2", "lfm3", "llama", "ministral", "ministral3", "mistral",
     "olmo", "olmo2", "olmo3", "olmo_hybrid", "phi", "phi3", "qwen2", "qwen3", "qwen3_5",
     "qwen3_5_text", "seed_oss", "smollm3", "starcoder2", "youtu", "persimmon", "stablelm",
     "zamba", "zamba2", "nemotron", "nemotron_h", "hrm_text", "hy_v3", "hy_v4", "llama4",
     "llama4_text", "mllama", "moshi",
     # MoE bodies whose forward returns the router logits but adds no auxiliary loss
     "aria_text", "axk1", "axk2", "bailing_hybrid", "dots3_note", "dots3_note_text",
     "kolibri1", "deepseek_v2", "deepseek_v3", "deepseek_v32", "dots1", "exaone_moe",
     "glm4_moe", "glm4_moe_lite", "glm_moe_dsa", "hunyuan_v1_moe", "kimi_linear", "lfm2_moe",
     "longcat_flash", "mimo_v2_flash", "sarvam_mla", "sarvam_moe", "solar_open", "afmoe",
     "zaya")
_add(Arch(body="transformer"), "gpt2", "gpt-sw3", "codegen", "gptj", "bloom", "falcon",
     "gpt_neo", "mpt", "openai-gpt", "ctrl", "gpt_bigcode")
_add(Arch(body="gpt_neox"), "gpt_neox")
_add(Arch(body="gpt_neox_japanese", head="embed_out"), "gpt_neox_japanese")
_add(Arch(body="biogpt", head="output_projection"), "biogpt")
_add(Arch(body="model.decoder"), "opt")
_add(Arch(body="backbone"), "mamba", "mamba2", "falcon_mamba")
_add(Arch(body="rwkv", head="head"), "rwkv")
_add(DENSE, "xglm")
# the head module wraps a plain Linear (BertGeneration: unused extra bias; Reformer: applied
# in sequence chunks over the two concatenated reversible streams)
_add(Arch(body="bert", head="lm_head.decoder"), "bert-generation")
_add(Arch(body="reformer", head="lm_head.decoder"), "reformer")
_add(Arch(refuse_if=_bamba_refuse, reads=("z_loss_coefficient",)), "bamba")
_add(ROUTER, "deepseek_v4", "ernie4_5_moe", "flex_olmo", "flint", "gpt_oss", "jamba", "laguna",
     "lara_mini", "mellum", "minimax", "minimax_m2", "minimax_m3_vl_text", "mixtral", "olmoe",
     "phimoe", "qwen2_moe", "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_moe", "qwen3_next",
     "qwen4_exp", "qwen4_exp_text")
_add(Arch(body="transformer", aux="router"), "dbrx")
_add(Arch(aux="router", aux_coef="aux_loss_coef"), "jetmoe")
_add(Arch(aux="doge"), "doge")
_add(GEMMA_CAP, "gemma2", "gemma3_text", "gemma3n_text", "nanochat", "vaultgemma", "beam",
     "gemma4_text", "gemma4_unified_text")
_add(GRANITE, "granite", "granite_swa")
_add(Arch(transform=GRANITE.transform, reads=GRANITE.reads, aux="router"),
     "granitemoe", "granitemoe_swa", "granitemoehybrid", "granitemoeshared")
_add(COHERE, "cohere", "cohere2", "cohere2_moe", "cohere_compass_text")
_add(Arch(transform=_scale_config("logits_scaling", divide=False), reads=("logits_scaling",)),
     "hyperclovax")
_add(Arch(transform=_scale_attr("model.lm_head_multiplier"), reads=("lm_head_multiplier",)),
     "falcon_h1")
_add(Arch(transform=_scale_config("logits_scaling", divide=True),  # hidden_size / dim_model_base
          reads=("logits_scaling",), refuse_if=_no_head_bias), "minicpm3")
_add(Arch(transform=_scale_config("logits_mup_width_multiplier", divide=True),
          reads=("logits_mup_width_multiplier", "unpadded_vocab_size"),
          refuse_if=_inkling_refuse), "inkling_text")
_add(Arch(transform=_softcap("final_logit_softcapping"),  # unpadded_vocab_size: the lm_head's
          reads=("final_logit_softcapping", "unpadded_vocab_size")),  # rows, no slicing
     "inkling2_text", "inkling2_loop_text")
_add(Arch(transform=_recurrent_gemma_transform, reads=("logits_soft_cap",)), "recurrent_gemma")
_add(Arch(body="backbone", transform=_softcap("output_logit_soft_cap"),
          reads=("output_logit_soft_cap",)), "xlstm")

# the config type a text-only causal LM of a composite (multimodal) type ends up with, when it
# is not a type of the mapping itself: model.config.model_type -> the mapping's type
TEXT_ALIASES = {"emu3_text_model": "emu3", "mllama_text_model": "mllama",
                "musicgen_decoder": "musicgen", "musicgen_melody_decoder": "musicgen_melody"}

# refusal reasons, by kind (docs/models.md groups the table by these)
HEAD = "head"  # the output head is more than a plain Linear
LABELS = "labels"  # another label convention (no shift, or its own shift)
LOSS = "loss"  # another loss (several heads / streams, extra terms)
MULTIMODAL = "multimodal"  # an image / audio wrapper (not verified)
INTERFACE = "interface"  # not a causal-LM training forward, or not buildable tiny

_BERT_HEAD = ("the output head has layers before the vocabulary projection (dense + activation "
              "+ layer norm), which the fused loss does not run")
_UNSHIFTED = ("labels are not shifted: the forward scores logits[t] against labels[t] (the "
              "decoder of an encoder-decoder model used as a causal LM); the patch shifts")
_MM = ("multimodal wrapper (image/audio inputs change the hidden states and the body call); "
       "the text-only causal-LM type of the family is what the table verifies")

REFUSED: dict[str, tuple[str, str]] = {}


def _refuse(kind: str, reason: str, *types: str) -> None:
    for t in types:
        assert t not in SUPPORTED and t not in REFUSED, t
        REFUSED[t] = (kind, reason)


_refuse(HEAD, _BERT_HEAD, "bert", "big_bird", "camembert", "data2vec-text", "ernie",
        "megatron-bert", "rembert", "roberta", "roberta-prelayernorm", "roc_bert", "roformer",
        "xlm-roberta", "xlm-roberta-xl", "xmod")
_refuse(HEAD, "the generator head has a dense + activation + layer norm before the projection, "
        "whose input size differs from the hidden size", "electra")
_refuse(HEAD, "the lm_head multiplies the logits by a learned per-token scale (a parameter of the "
        "head, which needs its own gradient)", "dory")
_refuse(HEAD, "the `lm_head` is a dense + activation + norm block; the vocabulary projection "
        "(`decoder`) runs on its output", "modernbert-decoder")
_refuse(LABELS, _UNSHIFTED, "bart", "bigbird_pegasus", "blenderbot", "blenderbot-small",
        "marian", "mbart", "pegasus", "plbart", "mvp", "trocr", "whisper")
_refuse(LABELS, "labels are not shifted: the forward scores logits[t] against labels[t]; the "
        "patch shifts", "cpmant")
_refuse(LABELS, "the prediction layer (XLMPredLayer) scores logits[t] against labels[t] (no "
        "shift), or is an adaptive softmax (asm=True)", "xlm")
_refuse(LABELS, "permutation LM: the forward scores logits[t] against labels[t] (no shift)",
        "xlnet")
_refuse(LABELS, "the loss skips the image tokens in front of the text (its own shift)", "git")
_refuse(LOSS, "n-gram prediction streams with their own loss (ProphetNet._compute_loss)",
        "prophetnet")
_refuse(LOSS, "one head per audio codebook; the loss averages the codebooks and masks the "
        "pad token", "musicgen", "musicgen_melody")
_refuse(MULTIMODAL, _MM, "gemma3", "gemma3n", "gemma4", "gemma4_unified", "got_ocr2", "fuyu",
        "phi4_multimodal", "moss_transcribe_diarize")
_refuse(INTERFACE, "a draft model for assisted decoding: the forward needs the target model's "
        "shared KV states and returns no loss", "gemma4_assistant", "gemma4_unified_assistant")
_refuse(INTERFACE, "not verified: the byte-level latent transformer's body (entropy patcher, "
        "local encoder / decoder, hash embeddings) was not built from a tiny configuration", "blt")

# config keys that change the logits (after the body) in some transformers model; a set one
# that the type's entry does not read is refused
LOGIT_KEYS = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap",
              "logit_scale", "logits_scaling", "lm_head_multiplier", "output_multiplier",
              "logits_mup_width_multiplier", "unpadded_vocab_size", "z_loss_coefficient",
              "router_z_loss_coef")
_NEUTRAL = (None, 1, 1.0, 0, 0.0, False)


# ------------------------------------------------------------------------------- lookups
def transformers_class(model: nn.Module) -> type | None:
    """The transformers class `model` is an instance of (skipping FSDP2's dynamic wrapper
    class), or None."""
    for cls in type(model).__mro__:
        if cls.__module__.startswith("transformers.models."):
            return cls
    return None


def model_type_of(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def expected_class_name(model_type: str) -> str | None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)


@dataclass
class Plan:
    """What the patch runs for one model (resolved by :func:`resolve`)."""

    model_type: str
    arch: Arch
    cls: type

    def body(self, model: nn.Module) -> nn.Module:
        return _get(model, self.arch.body)

    def head(self, model: nn.Module) -> nn.Module:
        return _get(model, self.arch.head)

    def transform(self, model: nn.Module) -> LogitTransform:
        f = self.arch.transform
        return IDENTITY if f is None else f(model)

    # ---- MoE router auxiliary loss, as the model's forward adds it
    def router_logits_wanted(self, model: nn.Module, flag) -> bool | None:
        """The forward's `output_router_logits` (None for types without the auxiliary loss)."""
        if self.arch.aux is None:
            return None
        on = flag if flag is not None else getattr(model.config, "output_router_logits", False)
        if self.arch.aux == "doge":
            on = on and model.config.is_moe
        return bool(on)

    def aux_loss(self, model: nn.Module, body_out, attention_mask):
        """(coefficient, auxiliary loss) exactly as the forward computes them."""
        fn = sys.modules[self.cls.__module__].load_balancing_loss_func
        if self.arch.aux == "doge":
            aux = fn(body_out.router_logits, model.num_experts,
                     math.floor(math.sqrt(model.num_experts)), model.num_experts_per_tok,
                     attention_mask)
        else:
            aux = fn(body_out.router_logits, model.num_experts, model.num_experts_per_tok,
                     attention_mask)
        return getattr(model, self.arch.aux_coef), aux


def _fail(model: nn.Module, mt, reason: str):
    name = type(model).__name__
    raise UnsupportedModelError(
        f"iw-SFT patch: {name} (model_type={mt!r}) is not supported: {reason}. See "
        f"docs/models.md for the verified model types.")


_warned_version = []


def _version_warning() -> None:
    import transformers

    v = transformers.__version__
    if v != VERIFIED_TRANSFORMERS and not _warned_version:
        _warned_version.append(v)
        warnings.warn(f"iw-SFT patch: the table of exact model types was verified against "
                      f"transformers {VERIFIED_TRANSFORMERS}, this is {v}; rerun "
                      f"scripts/model_support.py to check the model types you use",
                      stacklevel=3)


def resolve(model: nn.Module) -> Plan:
    """The plan for `model`, or UnsupportedModelError naming the model type and the reason."""
    _version_warning()
    mt = model_type_of(model)
    if mt is None:
        _fail(model, mt, "it has no transformers config with a model_type")
    cls = transformers_class(model)
    if cls is None:
        _fail(model, mt, "its class is not a transformers model class (custom code, e.g. "
                         "trust_remote_code=True), so its forward was never checked")
    mt = TEXT_ALIASES.get(mt, mt)
    if mt in REFUSED:
        _fail(model, mt, REFUSED[mt][1])
    arch = SUPPORTED.get(mt)
    if arch is None:
        _fail(model, mt, f"the model type is not in the table verified against transformers "
                         f"{VERIFIED_TRANSFORMERS}")
    want = expected_class_name(mt)
    if cls.__name__ != want:
        _fail(model, mt, f"the table verifies {want} for this model type, not {cls.__name__}")
    if type(model).forward is not cls.forward:
        _fail(model, mt, f"{type(model).__name__} overrides {cls.__name__}.forward")
    custom_loss = model.__dict__.get("_loss_function")
    if custom_loss is not None or getattr(model, "loss_type", "ForCausalLM") not in (
            "ForCausalLM", None):
        _fail(model, mt, "the model has a custom loss_function / loss_type")
    try:
        body, head = _get(model, arch.body), _get(model, arch.head)
    except AttributeError as e:
        _fail(model, mt, f"cannot find the body `{arch.body}` / output projection "
                         f"`{arch.head}` ({e})")
    if not isinstance(body, nn.Module):
        _fail(model, mt, f"`{arch.body}` is not a module")
    why = _plain_linear(head)
    if why:
        _fail(model, mt, f"the output projection `{arch.head}` {why}")
    tc = _text_config(model)
    for key in LOGIT_KEYS:
        v = getattr(tc, key, None)
        if key not in arch.reads and not _neutral(v):
            _fail(model, mt, f"config.{key}={v!r} changes the logits and the patch does not "
                             f"apply it for this model type")
    if arch.refuse_if is not None:
        why = arch.refuse_if(model)
        if why:
            _fail(model, mt, why)
    plan = Plan(mt, arch, cls)
    try:
        plan.transform(model)
    except (TypeError, ValueError) as e:
        _fail(model, mt, f"its logit transform is invalid ({e})")
    return plan


def _neutral(v) -> bool:
    if isinstance(v, bool) or v is None:
        return not v
    if isinstance(v, (int, float)):
        return v in _NEUTRAL
    return False


def _is_modules_to_save(head) -> bool:
    """PEFT's ModulesToSaveWrapper (``modules_to_save=["lm_head"]``): it runs either the
    original Linear or the active adapter's trainable copy, and its ``weight`` / ``bias``
    resolve to the one it runs."""
    t = type(head)
    return t.__name__ == "ModulesToSaveWrapper" and t.__module__.startswith("peft.")


def _plain_linear(head) -> str | None:
    if _is_modules_to_save(head):
        inner = [head.original_module, *head.modules_to_save.values()]
        whys = [w for w in map(_plain_linear, inner) if w]
        return f"wraps a module that {whys[0]}" if whys else None
    t = type(head)
    hint = (" (an adapter / quantized layer: the fused loss needs the plain projection; LoRA "
            "on lm_head is not supported, PEFT's modules_to_save=['lm_head'] is)"
            if t.__module__.split(".")[0] in ("peft", "bitsandbytes") else "")
    if not isinstance(head, nn.Linear):
        return f"is a {t.__module__}.{t.__qualname__}, not an nn.Linear{hint}"
    if t.forward is not nn.Linear.forward:
        return (f"is a {t.__module__}.{t.__qualname__} with its own forward, not a plain "
                f"nn.Linear{hint or ' (a LoRA / quantized layer?)'}")
    if any(True for _ in head.children()):
        return "has submodules"
    extra = [n for n, _ in head.named_parameters(recurse=False) if n not in ("weight", "bias")]
    if extra:
        return f"has extra parameters {extra}"
    if not isinstance(head.weight, torch.Tensor):
        return "has no weight tensor"
    return None


def check_supported(model: nn.Module) -> Plan:
    """Raise UnsupportedModelError unless the patch reproduces `model`'s forward exactly."""
    return resolve(model)


def support_table() -> dict[str, tuple[str, str]]:
    """model_type -> ("exact", "") or ("refused", reason) for every causal-LM type of the
    installed transformers (what the table says; scripts/model_support.py checks it)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    out = {}
    for mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        if mt in SUPPORTED:
            out[mt] = ("exact", "")
        elif mt in REFUSED:
            out[mt] = ("refused", REFUSED[mt][1])
        else:
            out[mt] = ("refused", f"not in the table verified against transformers "
                                  f"{VERIFIED_TRANSFORMERS}")
    return out
