"""iw-SFT inside TRL: ``IWSFTConfig`` and ``IWSFTTrainer``, drop-ins for ``trl.SFTConfig`` /
``trl.SFTTrainer`` (tested with trl 1.16).

    from iwsft_kernels.integrations.trl import IWSFTConfig, IWSFTTrainer

    args = IWSFTConfig(output_dir="out", iw_mode="sequence")          # + any SFTConfig option
    trainer = IWSFTTrainer(model="Qwen/Qwen2.5-0.5B-Instruct", args=args, train_dataset=ds)
    trainer.train()

What the trainer does (docs/trl.md has the details and the recipe table):

1. TRL prepares the data exactly as ``SFTTrainer`` does (chat template, tokenisation,
   completion-only / assistant-only masks -> ``labels``, truncation, packing). With
   ``quality_column`` the per-example quality rides along as a per-token column, so that TRL's
   packing moves it with the tokens.
2. The model TRL built (PEFT/LoRA included) is patched with
   :func:`iwsft_kernels.integrations.apply_iwsft_to_model`: with ``labels`` its forward computes
   the fused loss in the output-embedding module's own call; no ``(B, T, V)`` logits exist.
3. Before the first update, unless ``iw_mode="sft"`` or ``iw_zero_reference=True``, one pass of
   the reference model (default: the starting model, i.e. the policy before any update) over
   the *prepared rows* gives ``ref[t] = log q_ref(labels[t] | tokens < t)`` with
   ``linear_logprobs`` (no logits), split over the ranks, cached on disk under a fingerprint
   of (prepared rows, tokenizer, chat template, reference model, max_length, layout,
   precision); a cache made for anything else is refused (``RefCacheMismatch``). The values
   become a per-token column of the train dataset, and a collator wrapper pads / concatenates
   them exactly like TRL's collator does ``labels`` (padding-free included).
4. ``compute_loss`` calls the patched model with the reference log-probs, the per-sequence
   quality and TRL's ``num_items_in_batch`` (the target-token count of the whole optimizer step,
   summed over ranks), and scales by the number of processes as ``SFTTrainer`` does, so
   gradient accumulation and data parallel give the update of the whole batch in one call.

Loss (the method's formula): ``L = - sum_i m_i w(i) log p(y_i | y_<i) / D``, targets ``m_i``
are the positions whose next-token label is not -100, ``D = num_items_in_batch``. Weights are
detached: "sft" w = 1; "token" w_i = clamp(exp(T d_i), w_min, w_max); "sequence"
w_s = clamp(exp(T mean_{i in s} d_i), w_min, w_max), ``d_i = log p(y_i) - ref_i``, one
sequence = one example (a packed row holds several). ``quality`` multiplies w_s.

Evaluation (``eval_dataset``) reports the plain token NLL (mode "sft", no reference needed),
with ``eval_entropy`` and ``eval_mean_token_accuracy`` like SFTTrainer.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

try:
    import trl
    from trl import SFTConfig, SFTTrainer
    from trl.data_utils import pack_dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
    from trl.trainer.utils import pad as _trl_pad
except ImportError as e:  # pragma: no cover - exercised only without trl
    raise ImportError(
        "iwsft_kernels.integrations.trl needs TRL (and transformers, datasets): "
        "pip install 'iwsft-kernels[trl]'") from e

from packaging.version import Version

from ..config import IWConfig
from ..report import write_last_step_weights
from ..trainer.metrics import FUSED_OUTPUTS, OUTPUTS_KW, sequences_with_targets
from ..trainer.refcache import (  # noqa: F401 - weights_digest, strided_indices: public here
    RefCacheMismatch,
    compute_ref_logprobs,
    strided_indices,
    weights_digest,
)
from .causal_lm import apply_iwsft_to_model, check_model, sequence_starts

TRL_MIN, TRL_BELOW = "1.14.2", "1.17.0"  # the tested range; [trl] extra in pyproject.toml
if not (Version(TRL_MIN) <= Version(trl.__version__) < Version(TRL_BELOW)):
    import warnings

    warnings.warn(f"iwsft_kernels.integrations.trl is tested with trl>={TRL_MIN},<{TRL_BELOW}; "
                  f"found trl {trl.__version__}. It relies on SFTTrainer internals "
                  f"(_prepare_dataset, DataCollatorForLanguageModeling).", stacklevel=2)

__all__ = ["IWDataCollator", "IWSFTConfig", "IWSFTTrainer", "RefCacheMismatch", "REF_COLUMN",
           "QUALITY_COLUMN"]

REF_COLUMN = "iw_ref_logprobs"  # per token, aligned with labels
QUALITY_COLUMN = "iw_quality"  # per token: the example's quality repeated
_IW_COLUMNS = (REF_COLUMN, QUALITY_COLUMN)


# ---------------------------------------------------------------------------------- config
@dataclass
class IWSFTConfig(SFTConfig):
    r"""``trl.SFTConfig`` plus the importance-weighting options of iw-SFT.

    iw_mode: "sequence" (default; the paper's best variant), "token", or "sft" (w = 1: plain
        SFT through the fused kernel).
    iw_temperature, iw_w_min, iw_w_max: w = clamp(exp(T * log-ratio), w_min, w_max); None takes
        the mode's default clip ("token": [0.2, 1.8], "sequence": [0, 16]).
    iw_length_normalize: sequence mode, mean (True) or sum (False) of the token log-ratios.
    iw_self_normalize: rescale each micro-batch's weights to mean 1.
    iw_zero_reference: use log q_ref = 0 for every token (no reference pass). With
        iw_mode="token", iw_w_min=0, iw_w_max=1 this is DFT (w = p(y), stop-grad).
    ref_model_name_or_path: the reference model q_ref; None: the starting model (the model
        being trained, before its first update).
    ref_cache_dir: where the reference log-probs are cached; None: <output_dir>/iwsft_ref_cache.
    quality_column: dataset column with a per-example quality q >= 0 multiplying the weight
        (SFT(Q) with iw_mode="sft", iw-SFT(Q) otherwise); None: no quality.
    iw_backend: "auto" | "triton" | "torch" (the loss kernels; auto: Triton on CUDA).
    """

    iw_mode: str = field(default="sequence", metadata={
        "help": "Importance weighting: 'sequence' (iw-SFT, default), 'token' (per-step), or "
                "'sft' (weights 1).", "choices": ["sft", "token", "sequence"]})
    iw_temperature: float = field(default=1.0, metadata={
        "help": "Temperature T in w = clamp(exp(T * log-ratio), w_min, w_max)."})
    iw_w_min: float | None = field(default=None, metadata={
        "help": "Lower clip of the weights (default: 0.2 token mode, 0 sequence mode)."})
    iw_w_max: float | None = field(default=None, metadata={
        "help": "Upper clip of the weights (default: 1.8 token mode, 16 sequence mode)."})
    iw_length_normalize: bool = field(default=True, metadata={
        "help": "Sequence mode: mean (True) or sum (False) of the per-token log-ratios."})
    iw_self_normalize: bool = field(default=False, metadata={
        "help": "Rescale each micro-batch's weights to mean 1."})
    iw_zero_reference: bool = field(default=False, metadata={
        "help": "Use log q_ref = 0 (no reference model). token mode + clip [0, 1] = DFT."})
    ref_model_name_or_path: str | None = field(default=None, metadata={
        "help": "Reference model for the importance weights (default: the starting model)."})
    ref_cache_dir: str | None = field(default=None, metadata={
        "help": "Cache folder of the reference log-probs (default: <output_dir>/iwsft_ref_cache)."})
    quality_column: str | None = field(default=None, metadata={
        "help": "Dataset column with a per-example quality >= 0 multiplying the weights."})
    iw_backend: str = field(default="auto", metadata={
        "help": "Loss backend: 'auto' (Triton on CUDA, torch elsewhere), 'triton' or 'torch'.",
        "choices": ["auto", "triton", "torch"]})
    # TRL's default gradient_checkpointing=True uses the name transformers 5 deprecates, so every
    # SFTConfig() warns. Unset here; TRL's default goes to the current name in __post_init__.
    gradient_checkpointing: bool | None = field(default=None, metadata={
        "help": "Deprecated alias of activation_checkpointing (default: True, as in TRL)."})

    def __post_init__(self):
        if self.gradient_checkpointing is None and getattr(self, "activation_checkpointing", 0) is None:
            self.activation_checkpointing = True
        super().__post_init__()
        self.iw_config  # noqa: B018 - validates the weighting options (IWConfig raises)
        if self.iw_backend not in ("auto", "triton", "torch"):
            raise ValueError(f"iw_backend must be 'auto', 'triton' or 'torch', got "
                             f"{self.iw_backend!r}")
        if self.loss_type not in ("nll", "chunked_nll"):  # both mean plain NLL in TRL
            raise ValueError(
                f"IWSFTConfig: loss_type={self.loss_type!r} cannot be honoured, IWSFTTrainer "
                f"computes its own weighted loss. For DFT use iw_mode='token', "
                f"iw_zero_reference=True, iw_w_min=0.0, iw_w_max=1.0 (w = p(y), stop-grad); "
                f"keep loss_type='nll'.")
        if self.label_smoothing_factor and self.label_smoothing_factor > 0:
            raise ValueError("IWSFTConfig: label_smoothing_factor > 0 is not supported (the fused "
                             "loss has no label smoothing); set it to 0.")
        if self.iw_zero_reference and self.iw_mode == "sft":
            raise ValueError("IWSFTConfig: iw_zero_reference only applies to iw_mode='token' or "
                             "'sequence' (mode 'sft' uses no reference).")
        if self.iw_mode == "sft" and self.ref_model_name_or_path is not None:
            raise ValueError("IWSFTConfig: ref_model_name_or_path is unused with iw_mode='sft' "
                             "(weights 1); drop it or pick iw_mode='token' / 'sequence'.")
        if self.iw_zero_reference and self.ref_model_name_or_path is not None:
            raise ValueError("IWSFTConfig: give either iw_zero_reference=True or "
                             "ref_model_name_or_path, not both.")
        wrapped = self.packing and self.packing_strategy == "wrapped"
        if wrapped and self.iw_mode == "sequence":
            raise ValueError(
                "IWSFTConfig: packing_strategy='wrapped' cuts examples mid-sequence and runs "
                "them together, so a sequence weight would mix examples; use "
                "packing_strategy='bfd' (or no packing) with iw_mode='sequence'.")
        if wrapped and self.quality_column:
            raise ValueError("IWSFTConfig: quality_column needs whole examples; "
                             "packing_strategy='wrapped' cuts them. Use 'bfd'.")

    @property
    def iw_config(self) -> IWConfig:
        return IWConfig(mode=self.iw_mode, temperature=self.iw_temperature,
                        w_min=self.iw_w_min, w_max=self.iw_w_max,
                        length_normalize=self.iw_length_normalize,
                        self_normalize=self.iw_self_normalize)

    @property
    def needs_reference_pass(self) -> bool:
        return self.iw_mode != "sft" and not self.iw_zero_reference


# ------------------------------------------------------------------------------- collator
class IWDataCollator:
    """Wraps TRL's ``DataCollatorForLanguageModeling``: the per-token ``iw_*`` columns are taken
    out of the features, the inner collator builds its batch, and each column is laid out exactly
    like ``labels`` (right padding with 0, or concatenated into one row when padding-free)."""

    def __init__(self, inner: DataCollatorForLanguageModeling):
        if not isinstance(inner, DataCollatorForLanguageModeling):
            raise TypeError(f"IWDataCollator wraps trl's DataCollatorForLanguageModeling, got "
                            f"{type(inner).__name__}")
        self.inner = inner

    def __call__(self, features: list[dict]) -> dict:
        features = [dict(f) for f in features]
        extra = {}
        for k in _IW_COLUMNS:
            if k in features[0]:
                extra[k] = [torch.as_tensor(f.pop(k), dtype=torch.float32) for f in features]
        for f in features:  # a column missing from the first feature must be missing everywhere
            for k in _IW_COLUMNS:
                f.pop(k, None)
        batch = self.inner(features)
        for k, ts in extra.items():
            if self.inner.padding_free:
                ts = [torch.cat(ts)]
            out = _trl_pad(ts, padding_value=0.0, padding_side="right",
                           pad_to_multiple_of=self.inner.pad_to_multiple_of)
            if out.shape != batch["labels"].shape:
                raise RuntimeError(f"{k} collated to {tuple(out.shape)} but labels to "
                                   f"{tuple(batch['labels'].shape)}: per-token columns out of "
                                   f"step with the tokens")
            batch[k] = out
        return batch


# ---------------------------------------------------------------------------- fingerprints
def _sha(s: str | bytes) -> str:
    return hashlib.sha256(s.encode() if isinstance(s, str) else s).hexdigest()[:16]


def model_identity(model: torch.nn.Module, name: str | None) -> str:
    cfg = getattr(model, "config", None)
    cfg_json = cfg.to_json_string(use_diff=False) if hasattr(cfg, "to_json_string") else ""
    name = name or (getattr(cfg, "_name_or_path", "") if cfg is not None else "")
    return f"{name}|config={_sha(cfg_json)}|weights={weights_digest(model)}"


# --------------------------------------------------------------------------------- trainer
@dataclass
class _Row:
    index: int  # row of the prepared train dataset
    input_ids: range  # only its length is used by the reference pass


class IWSFTTrainer(SFTTrainer):
    """``trl.SFTTrainer`` whose loss is the fused importance-weighted SFT loss (see the module
    docstring). Same constructor as ``SFTTrainer``; ``args`` must be an :class:`IWSFTConfig`.

    After construction: ``trainer.iw_reference`` tells where the reference log-probs came from
    ({"source": "computed" | "cache" | "zero" | None, "cache_dir", "parts" (the fingerprint's
    components), "model"}).
    Logged: SFTTrainer's metrics under its names and with its reduction (``loss``, here the
    weighted loss, ``grad_norm``, ``learning_rate``, ``num_tokens``, ``entropy``,
    ``mean_token_accuracy``; eval: ``eval_loss``, the plain token NLL, ``eval_entropy``,
    ``eval_mean_token_accuracy``, ``eval_num_tokens``), the entropy and top-1 coming from the
    fused loss; and next to them (train), over the logging window and all ranks:
    ``iw/weight_mean``, ``iw/weight_min``, ``iw/weight_max``, ``iw/ess_fraction``
    ((sum w)^2 / sum w^2 / count), ``iw/clip_frac_max``, ``iw/clip_frac_min``,
    ``iw/log_ratio_mean`` (units: sequences in sequence mode, target tokens otherwise), and
    ``iw/nll``, the unweighted mean token NLL. At each log line the last optimizer step's
    per-sequence weights go to ``<output_dir>/last_step_weights.json``; ``python -m
    iwsft_kernels.report <output_dir>`` draws the run."""

    _tag_names = ["trl", "sft", "iwsft"]
    _name = "IW-SFT"

    def __init__(
        self,
        model,
        args: IWSFTConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_loss_func: Callable | None = None,
        compute_metrics: Callable | None = None,
        callbacks=None,
        optimizers=(None, None),
        optimizer_cls_and_kwargs=None,
        preprocess_logits_for_metrics=None,
        quantization_config=None,
        peft_config=None,
        formatting_func=None,
    ):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "")
            args = IWSFTConfig(f"{(name or 'model').split('/')[-1]}-IWSFT")
        if not isinstance(args, IWSFTConfig):
            raise TypeError(f"IWSFTTrainer needs args=IWSFTConfig(...), got "
                            f"{type(args).__name__}; IWSFTConfig accepts every SFTConfig option")
        if compute_loss_func is not None:
            raise ValueError("IWSFTTrainer computes its own loss; compute_loss_func cannot be "
                             "combined with it")
        from transformers import ProcessorMixin

        if isinstance(processing_class, ProcessorMixin):
            raise ValueError("IWSFTTrainer supports text-only causal LMs; a processor "
                             "(vision-language model) was given")
        if train_dataset is not None:
            import datasets

            if isinstance(train_dataset, datasets.IterableDataset) and args.needs_reference_pass:
                raise ValueError(
                    f"iw_mode={args.iw_mode!r} needs the reference log-probs of every example "
                    f"before the first update; an IterableDataset (streaming) cannot provide "
                    f"that. Use a map-style Dataset, iw_mode='sft' or iw_zero_reference=True.")
            sample = next(iter(train_dataset))
            if "image" in sample or "images" in sample:
                raise ValueError("IWSFTTrainer supports text-only data; the dataset has images")
        if data_collator is not None and (args.needs_reference_pass or args.quality_column):
            if not isinstance(data_collator, DataCollatorForLanguageModeling):
                raise ValueError(
                    f"a custom data_collator ({type(data_collator).__name__}) cannot carry the "
                    f"reference log-probs / quality with the tokens; leave data_collator=None "
                    f"(or pass trl's DataCollatorForLanguageModeling)")

        super().__init__(model, args=args, data_collator=data_collator,
                         train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, compute_loss_func=None,
                         compute_metrics=compute_metrics, callbacks=callbacks,
                         optimizers=optimizers, optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
                         preprocess_logits_for_metrics=preprocess_logits_for_metrics,
                         quantization_config=quantization_config, peft_config=peft_config,
                         formatting_func=formatting_func)
        self._check_supported()

        # patch the model TRL built (under PEFT: the transformers model inside the wrapper)
        self._iw_train_config = args.iw_config
        self._iw_eval_config = IWConfig(mode="sft")
        self._iw_patched = self._unwrapped_lm(self.model)
        apply_iwsft_to_model(self._iw_patched, self._iw_train_config, backend=args.iw_backend)

        if args.quality_column and self._skip_prepare_dataset:
            self.train_dataset = self._quality_per_token(self.train_dataset, args)
        self.iw_reference: dict[str, Any] = {"source": None}
        if args.needs_reference_pass:
            self._attach_reference()
        elif args.iw_zero_reference:
            self.iw_reference = {"source": "zero"}
        if isinstance(self.data_collator, DataCollatorForLanguageModeling):
            self.data_collator = IWDataCollator(self.data_collator)
        self._iw_window = None
        self._iw_step_weights: tuple[int, list[float]] | None = None
        self._iw_weights_written: int | None = None

    # ------------------------------------------------------------------------- checks
    @staticmethod
    def _unwrapped_lm(model):
        from accelerate.utils import is_peft_model

        return model.get_base_model() if is_peft_model(model) else model

    def _check_supported(self) -> None:
        if getattr(self, "_is_vlm", False) or getattr(self, "_is_vision_dataset", False):
            raise ValueError("IWSFTTrainer supports text-only causal LMs")
        pc = getattr(self.accelerator, "parallelism_config", None)
        if pc is not None and (getattr(pc, "cp_enabled", False)
                               or getattr(pc, "sp_enabled", False)):
            raise ValueError("IWSFTTrainer does not support context / sequence parallelism (the "
                             "sequence weights need whole sequences on one rank)")
        # the model: the one guard of the patch (architectures.py, docs/models.md); raises
        # UnsupportedModelError (a ValueError and a TypeError) naming the type and the reason
        check_model(self._unwrapped_lm(self.model))

    # -------------------------------------------------------------------------- data
    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for c in _IW_COLUMNS:
            if c not in self._signature_columns:
                self._signature_columns.append(c)

    @staticmethod
    def _quality_per_token(dataset, args):
        """Add `iw_quality`: the example's quality (finite, >= 0) repeated for each token."""
        col = args.quality_column
        from trl.data_utils import get_dataset_column_names

        cols = get_dataset_column_names(dataset)
        if col not in cols:
            raise ValueError(f"quality_column={col!r} is not a column of the train dataset "
                             f"(columns: {sorted(cols)})")
        if "seq_lengths" in cols:
            raise ValueError(f"quality_column={col!r}: the dataset is already packed "
                             f"(seq_lengths), so its rows hold several examples; give a quality "
                             f"per example before packing")

        def per_token(example):
            q = example[col]
            if isinstance(q, bool) or not isinstance(q, (int, float)) or not math.isfinite(q) \
                    or q < 0:
                raise ValueError(f"quality_column={col!r} must hold finite numbers >= 0, got "
                                 f"{q!r}")
            return {QUALITY_COLUMN: [float(q)] * len(example["input_ids"])}

        return dataset.map(per_token)

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func,
                         dataset_name):
        qcol = getattr(args, "quality_column", None)
        if not qcol or dataset_name != "train":
            return super()._prepare_dataset(dataset, processing_class, args, packing,
                                            formatting_func, dataset_name)
        # TRL keeps only input_ids/labels when it packs; so: prepare unpacked (as TRL would before
        # its packing step: no truncation, no shuffle), add the per-token quality, then pack it
        # along with the tokens exactly as TRL's own packing step does.
        from trl.trainer.utils import global_then_local_main_first

        if packing and args.max_length is None:
            raise ValueError("When packing is enabled, `max_length` can't be `None`.")
        inner = copy.copy(args)
        inner.shuffle_dataset = False
        if packing:
            inner.max_length = None
        dataset = super()._prepare_dataset(dataset, processing_class, inner, False,
                                           formatting_func, dataset_name)
        import datasets

        map_kwargs = {}
        if isinstance(dataset, datasets.Dataset):
            map_kwargs["num_proc"] = args.dataset_num_proc
        with global_then_local_main_first():
            dataset = self._quality_per_token(dataset, args)
            if packing:
                dataset = dataset.select_columns(["input_ids", "labels", QUALITY_COLUMN])
                if args.shuffle_dataset:
                    dataset = dataset.shuffle(seed=args.seed)
                dataset = pack_dataset(dataset, args.max_length, args.packing_strategy, map_kwargs)
        if args.shuffle_dataset:
            dataset = dataset.shuffle(seed=args.seed)
        return dataset

    # --------------------------------------------------------------------- reference
    def _ref_collate(self, rows: list[_Row]) -> dict:
        ds = self.train_dataset
        feats = []
        for r in rows:
            ex = ds[r.index]
            f = {"input_ids": ex["input_ids"], "labels": ex["labels"]}
            if "seq_lengths" in ex:
                f["seq_lengths"] = ex["seq_lengths"]
            feats.append(f)
        inner = self.data_collator
        if isinstance(inner, IWDataCollator):
            inner = inner.inner
        return inner(feats)

    def _fingerprint_parts(self, ref_identity: str) -> tuple[list[_Row], dict]:
        ds = self.train_dataset
        h = hashlib.sha256()
        rows: list[_Row] = []
        cols = ["input_ids", "labels"] + (["seq_lengths"] if "seq_lengths" in ds.column_names
                                          else [])
        import numpy as np

        for batch in ds.select_columns(cols).iter(batch_size=256):
            for j in range(len(batch["input_ids"])):
                ids = np.asarray(batch["input_ids"][j], dtype=np.int64)
                h.update(ids.tobytes())
                h.update(np.asarray(batch["labels"][j], dtype=np.int64).tobytes())
                if "seq_lengths" in batch:
                    h.update(b"|" + np.asarray(batch["seq_lengths"][j], dtype=np.int64).tobytes())
                h.update(b";")
                rows.append(_Row(len(rows), range(len(ids))))
        tok = self._tokenizer
        tok_json = tok.backend_tokenizer.to_str() if hasattr(tok, "backend_tokenizer") \
            else json.dumps(tok.get_vocab(), sort_keys=True)
        template = self.chat_template or getattr(tok, "chat_template", None) or ""
        a = self.args
        mp = "bf16" if a.bf16 else "fp16" if a.fp16 else "no"
        parts = {
            "data": h.hexdigest()[:16],
            "tokenizer": _sha(tok_json),
            "template": _sha(str(template)),
            "ref_model": ref_identity,
            "max_length": a.max_length,
            "n_examples": len(rows),
            "layout": "padding_free" if self.padding_free else "padded",
            "precision": mp,
            "format": "iwsft-trl-1",
        }
        return rows, parts

    def _attach_reference(self) -> None:
        import datasets

        a = self.args
        ds = self.train_dataset
        if not isinstance(ds, datasets.Dataset):
            raise ValueError("the reference pass needs a map-style datasets.Dataset")
        if REF_COLUMN in ds.column_names:
            raise ValueError(f"the train dataset already has a {REF_COLUMN!r} column")
        policy = self._unwrapped_lm(self.model)
        if a.ref_model_name_or_path is None:
            ref_model, ref_name, loaded = self.model, None, False
            ref_core = policy
        else:
            from transformers import AutoModelForCausalLM

            kw = dict(a.model_init_kwargs or {})
            kw.pop("device_map", None)
            kw.setdefault("trust_remote_code", a.trust_remote_code)
            kw.setdefault("dtype", next(policy.parameters()).dtype)
            ref_model = AutoModelForCausalLM.from_pretrained(a.ref_model_name_or_path, **kw)
            ref_model.to(self.accelerator.device)
            apply_iwsft_to_model(ref_model, IWConfig(mode="sft"), backend=a.iw_backend)
            ref_name, loaded, ref_core = a.ref_model_name_or_path, True, ref_model
            v_ref = ref_model.get_output_embeddings().weight.shape[0]
            v_pol = policy.get_output_embeddings().weight.shape[0]
            if v_ref != v_pol:
                raise ValueError(f"reference model {ref_name!r} has {v_ref} output tokens but the "
                                 f"model being trained has {v_pol}; they must share the vocabulary")
        rows, parts = self._fingerprint_parts(model_identity(ref_core, ref_name))
        cache_dir = Path(a.ref_cache_dir) if a.ref_cache_dir else \
            Path(a.output_dir) / "iwsft_ref_cache"
        already = (cache_dir / "complete").exists()
        batch_size = 1 if self.padding_free else max(1, a.per_device_eval_batch_size)
        was_training = ref_model.training
        try:
            with self.accelerator.autocast():
                refs = compute_ref_logprobs(self.accelerator, ref_model, types.SimpleNamespace(
                    examples=rows), cache_dir, parts, pad_id=self._tokenizer.pad_token_id,
                    batch_size=batch_size, collate_fn=self._ref_collate)
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
        self.train_dataset = ds.add_column(REF_COLUMN, [r.tolist() for r in refs])
        self.iw_reference = {"source": "cache" if already else "computed",
                             "cache_dir": str(cache_dir), "parts": parts,
                             "model": ref_name or "starting model"}

    # ------------------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        ref = inputs.pop(REF_COLUMN, None)
        qtok = inputs.pop(QUALITY_COLUMN, None)
        inputs.pop("fused_lm_head", None)
        inputs["use_cache"] = False
        labels = inputs.get("labels")
        if labels is None:
            raise ValueError("IWSFTTrainer needs `labels` in every batch")
        extra: dict[str, Any] = {}
        if mode == "train":
            cfg = self._iw_train_config
            if cfg.needs_reference:
                if self.args.iw_zero_reference:
                    ref = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
                elif ref is None:
                    raise RuntimeError(f"a training batch came without its reference log-probs "
                                       f"({REF_COLUMN}); was the train dataset replaced after "
                                       f"the trainer was built?")
                extra["ref_logprobs"] = ref
            if qtok is not None:
                starts = sequence_starts(labels, inputs.get("position_ids"))
                extra["quality"] = qtok.reshape(-1)[starts.reshape(-1)]
        else:
            cfg = self._iw_eval_config  # eval_loss = token NLL of the eval data
        apply_iwsft_to_model(self._iw_patched, cfg, backend=self.args.iw_backend)
        D = None
        if num_items_in_batch is not None:  # clamped like TRL: a batch without targets gives 0
            D = torch.as_tensor(num_items_in_batch).clamp(min=1)
        outputs = model(**inputs, num_items_in_batch=D, **{OUTPUTS_KW: FUSED_OUTPUTS}, **extra)
        loss = outputs.loss
        # like SFTTrainer / Trainer: num_items_in_batch counts the tokens of every rank, and DDP
        # averages the gradients over ranks
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())

        self._record_token_metrics(outputs, mode)
        if mode == "train":
            self._record_stats(outputs, cfg)
            self._record_weights(outputs, inputs, cfg)
            if "attention_mask" in inputs:
                n_tok = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum()
            else:
                n_tok = self.accelerator.gather_for_metrics(torch.tensor(
                    inputs["input_ids"].size(1), device=inputs["input_ids"].device)).sum()
            self._total_train_tokens += int(n_tok.item()) // getattr(self, "_tp_size", 1)
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

        if return_outputs:
            with torch.no_grad():  # like SFTTrainer: the logits need a plain forward
                logits_inputs = {k: v for k, v in inputs.items() if k != "labels"}
                outputs = model(**logits_inputs)
            return loss, outputs
        return loss

    # ---------------------------------------------------------------------- metrics
    def _record_token_metrics(self, out, mode: str) -> None:
        """``entropy`` and ``mean_token_accuracy`` as SFTTrainer 1.16 computes them: per
        micro-batch, (sum over the ranks' target tokens) / (their count), then ``log`` averages
        these ratios over the logging window (eval: over the eval batches) and prefixes eval's
        with ``eval_``. From the fused loss: no logits exist (top-1: the label attains the
        maximum logit; ties count as correct)."""
        if out.entropy is None or out.top1 is None:
            raise RuntimeError(f"the patched model returned no entropy / top1 although called "
                               f"with {OUTPUTS_KW}={FUSED_OUTPUTS}")
        acc = self.accelerator
        num_valid = acc.gather_for_metrics(out.num_targets).sum()
        entropy_sum = acc.gather_for_metrics(out.entropy.detach().sum()).sum()
        num_correct = acc.gather_for_metrics(out.top1.sum()).sum()
        ok = bool(num_valid > 0)
        self._metrics[mode]["entropy"].append((entropy_sum / num_valid).item() if ok else 0.0)
        self._metrics[mode]["mean_token_accuracy"].append(
            (num_correct / num_valid).item() if ok else 0.0)

    def _record_weights(self, out, inputs: dict, cfg: IWConfig) -> None:
        """Keep this optimizer step's per-sequence weights (this rank's; ``log`` gathers them
        and writes OUTPUT_DIR/last_step_weights.json for ``python -m iwsft_kernels.report``)."""
        step = self.state.global_step  # steps done; this micro-batch belongs to step + 1
        if self._iw_step_weights is None or self._iw_step_weights[0] != step:
            self._iw_step_weights = (step, [])
        w = out.seq_weights.detach().float()
        has = sequences_with_targets(inputs["labels"], inputs.get("position_ids"))
        if has.numel() == w.numel():
            w = w[has.to(w.device)]
        self._iw_step_weights[1].extend(w.cpu().tolist())

    def _write_step_weights(self) -> None:
        """Called by ``log`` on every rank (it gathers)."""
        if self._iw_step_weights is None or self._iw_step_weights[0] == self._iw_weights_written:
            return
        step, w = self._iw_step_weights
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            w = gather_object(w)
        cfg = self._iw_train_config
        lo, hi = cfg.bounds if cfg.mode != "sft" else (None, None)
        if self.accelerator.is_main_process:
            write_last_step_weights(self.args.output_dir, trainer="trl", step=step + 1,
                                    mode=cfg.mode, weights=w, w_min=lo, w_max=hi)
        self._iw_weights_written = step

    def _record_stats(self, out, cfg: IWConfig) -> None:
        s = out.stats or {}
        seq_mode = cfg.mode == "sequence"
        n = float(s.get("num_sequences" if seq_mode else "num_target_tokens", 0.0))
        w = out.seq_weights if seq_mode else out.token_weights
        w = w.detach().double()
        vals = [n, float(w.sum()), float((w * w).sum()),
                float(s["clip_frac_max"]) * n if n else 0.0,
                float(s["clip_frac_min"]) * n if n else 0.0]
        lr = float(s.get("log_ratio_mean", float("nan")))
        vals.append(lr * n if n and math.isfinite(lr) else 0.0)
        vals.append(n if n and math.isfinite(lr) else 0.0)
        vals += [-float(out.token_logprobs.detach().double().sum()), float(out.num_targets)]
        wmin = float(s["weight_min"]) if n else math.inf
        wmax = float(s["weight_max"]) if n else -math.inf
        dev = self.accelerator.device
        row = torch.tensor(vals + [-wmin, wmax], dtype=torch.float64, device=dev)[None]
        rows = self.accelerator.gather(row).reshape(-1, row.shape[1]).cpu()
        tot = rows[:, :-2].sum(0)
        ext = rows[:, -2:].max(0).values
        if self._iw_window is None:
            self._iw_window = (tot, ext)
        else:
            self._iw_window = (self._iw_window[0] + tot, torch.maximum(self._iw_window[1], ext))

    def _window_metrics(self) -> dict[str, float]:
        if self._iw_window is None:
            return {}
        (n, s1, s2, chi, clo, lrs, lrn, nll, n_tgt), (neg_min, wmax) = (
            self._iw_window[0].tolist(), self._iw_window[1].tolist())
        self._iw_window = None
        out = {"iw/nll": nll / n_tgt} if n_tgt > 0 else {}
        if n <= 0:
            return out
        out |= {"iw/weight_mean": s1 / n, "iw/weight_min": -neg_min, "iw/weight_max": wmax,
               "iw/ess_fraction": (s1 * s1 / s2 / n) if s2 > 0 else 0.0,
               "iw/clip_frac_max": chi / n, "iw/clip_frac_min": clo / n}
        if lrn > 0:
            out["iw/log_ratio_mean"] = lrs / lrn
        return out

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # SFTTrainer.log adds entropy / mean_token_accuracy / num_tokens (eval: eval_*)
        if self.model.training:
            logs.update(self._window_metrics())
            self._write_step_weights()
        super().log(logs, start_time)
