"""Loading the tokenizer and the models of a run (policy, reference), and patching the policy
for training: the fused iw-SFT loss inside its forward, Liger kernels, activation checkpointing.
Model and tokenizer names are checked early: a missing path or a folder that holds no model
gets a message that says so."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..integrations import apply_iwsft_to_model
from .config import ASSETS, DEFAULT_MODEL, TrainConfig
from ..refcache import model_identity


class ModelLoadError(ValueError):
    pass


def _attn_impl(cfg: TrainConfig) -> str:
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    try:
        import flash_attn  # noqa: F401

        return "flash_attention_2" if torch.cuda.is_available() else "sdpa"
    except ImportError:
        return "sdpa"


def check_model_name(name: str | None, what: str = "model") -> None:
    """Fail early and clearly on a local-looking path that does not exist."""
    if name and name != DEFAULT_MODEL and (name.startswith((".", "/", "~")) or os.sep in name
                                           and name.count("/") > 1):
        if not Path(name).expanduser().exists():
            raise ModelLoadError(f"{what} path does not exist: {name}")


MODEL_FOLDER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                      "vocab.json")


def check_model_folder(name: str, what: str) -> None:
    """A local folder that holds no model or tokenizer files gets a message that says so
    (transformers' own error blames a missing sentencepiece / tiktoken)."""
    p = Path(name).expanduser()
    if p.is_dir() and not any((p / f).is_file() for f in MODEL_FOLDER_FILES):
        found = sorted(x.name for x in p.iterdir())[:8]
        raise ModelLoadError(f"{what} folder {name} holds no model or tokenizer files (expected "
                             f"one of {', '.join(MODEL_FOLDER_FILES)}; found {found or 'nothing'}):"
                             f" pass a folder written by save_pretrained, or a hub name")


def load_tokenizer(cfg: TrainConfig):
    from transformers import AutoTokenizer

    name = cfg.tokenizer or (str(ASSETS / "tokenizer") if cfg.model == DEFAULT_MODEL else cfg.model)
    check_model_folder(name, "tokenizer" if cfg.tokenizer else "model")
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except Exception as e:
        raise ModelLoadError(f"cannot load tokenizer {name!r}: {type(e).__name__}: {e}") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str, cfg: TrainConfig):
    """(model, identity string for the reference cache)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    attn = _attn_impl(cfg)
    if name == DEFAULT_MODEL:
        config = AutoConfig.from_pretrained(ASSETS / "model")
        torch.manual_seed(cfg.seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
        return model, model_identity(DEFAULT_MODEL, config, seed=cfg.seed)
    check_model_name(name)
    check_model_folder(name, "model")
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32,
                                                     attn_implementation=attn)
    except Exception as e:
        raise ModelLoadError(f"cannot load model {name!r} (not a local model directory, and "
                             f"not loadable from the hub: {type(e).__name__}: {e})") from e
    return model, model_identity(name, model.config, model=model)


def prepare_policy(model, cfg: TrainConfig, iw):
    """The policy as trained: Liger kernels (--liger), the fused loss in its forward,
    activation checkpointing (--gradient-checkpointing), no KV cache."""
    if cfg.liger:
        if not torch.cuda.is_available():
            raise ValueError("--liger needs CUDA (Liger's kernels are Triton GPU kernels)")
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True,
                                        cross_entropy=False, fused_linear_cross_entropy=False)
    apply_iwsft_to_model(model, iw, backend=cfg.loss_backend)
    if cfg.gradient_checkpointing:
        kw = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    model.config.use_cache = False
    return model
