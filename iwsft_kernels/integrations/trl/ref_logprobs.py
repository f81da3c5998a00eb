"""The reference pass of IWSFTTrainer: ``log q_ref(labels[t] | tokens < t)`` for every prepared
train row, computed once before the first update with ``linear_logprobs`` (no logits), split
over the ranks and cached on disk under a fingerprint of its inputs (the pass and the store:
:mod:`iwsft_kernels.refcache`, shared with ``iwsft-train``); docs/trl.md, "The reference
log-probs"."""

from __future__ import annotations

import functools
import hashlib
import json
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...config import IWConfig
from ...refcache import RefCacheMismatch, compute_ref_logprobs, weights_digest
from ..causal_lm import apply_iwsft_to_model
from .data import REF_COLUMN, IWDataCollator


def _sha(s: str | bytes) -> str:
    return hashlib.sha256(s.encode() if isinstance(s, str) else s).hexdigest()[:16]


def model_identity(model: torch.nn.Module, name: str | None) -> str:
    """Name, config and :func:`~iwsft_kernels.refcache.weights_digest` (fresh LoRA adapters
    left out) of a reference model."""
    cfg = getattr(model, "config", None)
    cfg_json = cfg.to_json_string(use_diff=False) if hasattr(cfg, "to_json_string") else ""
    name = name or (getattr(cfg, "_name_or_path", "") if cfg is not None else "")
    return f"{name}|config={_sha(cfg_json)}|weights={weights_digest(model)}"


def unwrapped_lm(model):
    """The transformers model (under PEFT: the one inside the wrapper)."""
    from accelerate.utils import is_peft_model

    return model.get_base_model() if is_peft_model(model) else model


@dataclass
class _Row:
    index: int  # row of the prepared train dataset
    input_ids: range  # only its length is used by the reference pass


def _collate(trainer, rows: list[_Row]) -> dict:
    """The rows as TRL's own collator batches them (without the ``iw_*`` columns)."""
    ds = trainer.train_dataset
    feats = []
    for r in rows:
        ex = ds[r.index]
        f = {"input_ids": ex["input_ids"], "labels": ex["labels"]}
        if "seq_lengths" in ex:
            f["seq_lengths"] = ex["seq_lengths"]
        feats.append(f)
    inner = trainer.data_collator
    if isinstance(inner, IWDataCollator):
        inner = inner.inner
    return inner(feats)


def fingerprint_parts(trainer, ref_identity: str) -> tuple[list[_Row], dict]:
    """The prepared rows (index, length) and the cache key's parts: a hash of the rows
    (``input_ids``, ``labels``, ``seq_lengths``, in order), tokenizer, chat template, reference
    model, max_length, layout, precision."""
    ds = trainer.train_dataset
    h = hashlib.sha256()
    rows: list[_Row] = []
    cols = ["input_ids", "labels"] + (["seq_lengths"] if "seq_lengths" in ds.column_names
                                      else [])
    for batch in ds.select_columns(cols).iter(batch_size=256):
        for j in range(len(batch["input_ids"])):
            ids = np.asarray(batch["input_ids"][j], dtype=np.int64)
            h.update(ids.tobytes())
            h.update(np.asarray(batch["labels"][j], dtype=np.int64).tobytes())
            if "seq_lengths" in batch:
                h.update(b"|" + np.asarray(batch["seq_lengths"][j], dtype=np.int64).tobytes())
            h.update(b";")
            rows.append(_Row(len(rows), range(len(ids))))
    tok = trainer._tokenizer
    tok_json = tok.backend_tokenizer.to_str() if hasattr(tok, "backend_tokenizer") \
        else json.dumps(tok.get_vocab(), sort_keys=True)
    template = trainer.chat_template or getattr(tok, "chat_template", None) or ""
    a = trainer.args
    mp = "bf16" if a.bf16 else "fp16" if a.fp16 else "no"
    parts = {
        "data": h.hexdigest()[:16],
        "tokenizer": _sha(tok_json),
        "template": _sha(str(template)),
        "ref_model": ref_identity,
        "max_length": a.max_length,
        "n_examples": len(rows),
        "layout": "padding_free" if trainer.padding_free else "padded",
        "precision": mp,
        "format": "iwsft-trl-1",
    }
    return rows, parts


def attach_reference(trainer) -> None:
    """Compute (or load) the reference log-probs of every prepared train row and add them as the
    per-token column ``iw_ref_logprobs``; set ``trainer.iw_reference``."""
    import datasets

    a = trainer.args
    ds = trainer.train_dataset
    if not isinstance(ds, datasets.Dataset):
        raise ValueError("the reference pass needs a map-style datasets.Dataset")
    if REF_COLUMN in ds.column_names:
        raise ValueError(f"the train dataset already has a {REF_COLUMN!r} column")
    policy = unwrapped_lm(trainer.model)
    if a.ref_model_name_or_path is None:
        ref_model, ref_name, loaded = trainer.model, None, False
        ref_core = policy
    else:
        from transformers import AutoModelForCausalLM

        kw = dict(a.model_init_kwargs or {})
        kw.pop("device_map", None)
        kw.setdefault("trust_remote_code", a.trust_remote_code)
        kw.setdefault("dtype", next(policy.parameters()).dtype)
        ref_model = AutoModelForCausalLM.from_pretrained(a.ref_model_name_or_path, **kw)
        ref_model.to(trainer.accelerator.device)
        apply_iwsft_to_model(ref_model, IWConfig(mode="sft"), backend=a.iw_backend)
        ref_name, loaded, ref_core = a.ref_model_name_or_path, True, ref_model
        v_ref = ref_model.get_output_embeddings().weight.shape[0]
        v_pol = policy.get_output_embeddings().weight.shape[0]
        if v_ref != v_pol:
            raise ValueError(f"reference model {ref_name!r} has {v_ref} output tokens but the "
                             f"model being trained has {v_pol}; they must share the vocabulary")
    rows, parts = fingerprint_parts(trainer, model_identity(ref_core, ref_name))
    cache_dir = Path(a.ref_cache_dir) if a.ref_cache_dir else \
        Path(a.output_dir) / "iwsft_ref_cache"
    already = (cache_dir / "complete").exists()
    batch_size = 1 if trainer.padding_free else max(1, a.per_device_eval_batch_size)
    was_training = ref_model.training
    try:
        with trainer.accelerator.autocast():
            refs = compute_ref_logprobs(trainer.accelerator, ref_model, types.SimpleNamespace(
                examples=rows), cache_dir, parts, pad_id=trainer._tokenizer.pad_token_id,
                batch_size=batch_size, collate_fn=functools.partial(_collate, trainer))
    except RefCacheMismatch as e:
        raise RefCacheMismatch(f"{e} (IWSFTTrainer: delete that folder or set "
                               f"IWSFTConfig.ref_cache_dir to another one)") from None
    finally:
        ref_model.train(was_training)
        if loaded:
            del ref_model, ref_core
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    bad = [i for i, (r, row) in enumerate(zip(refs, rows)) if r is None or
           r.numel() != len(row.input_ids)]
    if bad:
        raise RuntimeError(f"reference cache {cache_dir}: rows {bad[:5]} are missing or have "
                           f"the wrong length")
    trainer.train_dataset = ds.add_column(REF_COLUMN, [r.tolist() for r in refs])
    trainer.iw_reference = {"source": "cache" if already else "computed",
                            "cache_dir": str(cache_dir), "parts": parts,
                            "model": ref_name or "starting model"}
