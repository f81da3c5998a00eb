"""``IWSFTTrainer``: ``trl.SFTTrainer`` whose loss is the fused importance-weighted SFT loss
(the counterpart of TRL's ``sft_trainer.py``; the package docstring and docs/trl.md describe
it)."""

from __future__ import annotations

import contextlib
import copy
import math
import os
import weakref
from typing import Any, Callable

import torch
from transformers import TrainerCallback
from transformers.utils import logging
from trl import SFTTrainer
from trl.data_utils import pack_dataset
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from ...config import IWConfig
from ...report import write_last_step_weights
from ..causal_lm import apply_iwsft_to_model, check_model, sequence_starts, shift_for_next_token
from .data import IW_COLUMNS, QUALITY_COLUMN, REF_COLUMN, IWDataCollator, quality_per_token
from .iwsft_config import IWSFTConfig
from .ref_logprobs import attach_reference, unwrapped_lm

logger = logging.get_logger(__name__)

# what the patched model is asked to compute besides the loss (integrations/causal_lm.py)
FUSED_OUTPUTS = ("entropy", "top1")


def sequences_with_targets(labels: torch.Tensor, position_ids: torch.Tensor | None = None,
                           ignore_index: int = -100) -> torch.Tensor:
    """(S,) bool, one entry per sequence in the order of the patched model's ``seq_weights``
    (integrations/causal_lm.py: each row a sequence, or, when position_ids restart inside a
    row, every restart a sequence over the flattened rows): whether it has a target token.
    A sequence without targets has no weight of its own (its entry is 0)."""
    starts = sequence_starts(labels, position_ids)
    targets = shift_for_next_token(labels, starts, ignore_index) != ignore_index
    if bool(starts[:, 1:].any()):  # packed: the flattened restarts are the sequences
        seg = starts.reshape(-1).long().cumsum(0) - 1
        S = int(starts.sum())
    else:
        seg = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)
        seg, S = seg.reshape(-1), labels.shape[0]
    counts = torch.bincount(seg[targets.reshape(-1)], minlength=S)
    return counts > 0


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
    ``iw/nll``, the unweighted mean token NLL, and ``nonfinite_steps`` (optimizer steps skipped
    so far for a non-finite loss or gradient; ``max_nonfinite_steps`` in a row stop training;
    :meth:`save_model` refuses a model with non-finite parameters). At each log line the last
    optimizer step's per-sequence weights go to ``<output_dir>/last_step_weights.json``;
    ``python -m iwsft_kernels.report <output_dir>`` draws the run.

    Which loss a forward computes is chosen by what runs it, not by the model's train / eval
    mode: training steps use the iw-SFT loss (also with a model put in eval mode), and
    :meth:`evaluate` / :meth:`predict` the plain token NLL."""

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
        apply_iwsft_to_model(unwrapped_lm(self.model), self._iw_train_config,
                             backend=args.iw_backend)

        if args.quality_column and self._skip_prepare_dataset:
            self.train_dataset = quality_per_token(self.train_dataset, args.quality_column)
        self.iw_reference: dict[str, Any] = {"source": None}
        if args.needs_reference_pass:
            attach_reference(self)
        elif args.iw_zero_reference:
            self.iw_reference = {"source": "zero"}
        if isinstance(self.data_collator, DataCollatorForLanguageModeling):
            self.data_collator = IWDataCollator(self.data_collator)
        self._iw_window = None
        self._iw_step_weights: tuple[int, list[float]] | None = None
        self._iw_weights_written: int | None = None
        self._iw_evaluating = False  # set by evaluate / predict: the loss is then the token NLL
        self._iw_bad_loss = False  # a non-finite loss since the last optimizer step
        self._iw_nonfinite_streak = self._iw_nonfinite_total = 0
        self.add_callback(_NonFiniteSteps(self))

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
        check_model(unwrapped_lm(self.model))

    # -------------------------------------------------------------------------- data
    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for c in IW_COLUMNS:
            if c not in self._signature_columns:
                self._signature_columns.append(c)

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
            dataset = quality_per_token(dataset, qcol)
            if packing:
                dataset = dataset.select_columns(["input_ids", "labels", QUALITY_COLUMN])
                if args.shuffle_dataset:
                    dataset = dataset.shuffle(seed=args.seed)
                dataset = pack_dataset(dataset, args.max_length, args.packing_strategy, map_kwargs)
        if args.shuffle_dataset:
            dataset = dataset.shuffle(seed=args.seed)
        return dataset

    # ------------------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "eval" if self._iw_evaluating else "train"  # not the model's train / eval mode
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
        D = None
        if num_items_in_batch is not None:  # clamped like TRL: a batch without targets gives 0
            D = torch.as_tensor(num_items_in_batch).clamp(min=1)
        outputs = model(**inputs, num_items_in_batch=D, iw_config=cfg, iw_outputs=FUSED_OUTPUTS,
                        **extra)
        loss = outputs.loss
        if mode == "train" and not bool(torch.isfinite(loss.detach())):
            self._iw_bad_loss = True  # _check_step skips the update
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
                               f"with iw_outputs={FUSED_OUTPUTS}")
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
        if not self._iw_evaluating:
            logs.update(self._window_metrics())
            logs["nonfinite_steps"] = self._iw_nonfinite_total
            self._write_step_weights()
        super().log(logs, start_time)

    # ------------------------------------------------------------------- evaluation
    @contextlib.contextmanager
    def _evaluation(self):
        before, self._iw_evaluating = self._iw_evaluating, True
        try:
            yield
        finally:
            self._iw_evaluating = before

    def evaluate(self, *args, **kwargs):
        """``Trainer.evaluate``; its loss is the plain token NLL (``eval_loss``)."""
        with self._evaluation():
            return super().evaluate(*args, **kwargs)

    def predict(self, *args, **kwargs):
        """``Trainer.predict``; its loss is the plain token NLL."""
        with self._evaluation():
            return super().predict(*args, **kwargs)

    # ------------------------------------------------------------ non-finite steps
    def _check_step(self, model) -> None:
        """Just before each optimizer step (every micro-batch done): if the loss of a micro-batch
        (any rank) or a gradient is not finite, drop the gradients, so that the step changes no
        parameter, and count the step; ``max_nonfinite_steps`` in a row raise. Under fp16 the
        grad scaler skips steps with non-finite gradients itself; only the loss counts there.
        DeepSpeed applies the update inside backward: its first non-finite step raises."""
        acc = self.accelerator
        grads = [] if acc.scaler is not None else [p.grad for p in model.parameters()
                                                   if p.grad is not None]
        grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]  # FSDP2 shards
        bad_grad = bool(grads) and not bool(torch.stack(
            [torch.isfinite(g).all().to(acc.device) for g in grads]).all())
        flags = torch.tensor([float(self._iw_bad_loss), float(bad_grad)], device=acc.device)
        self._iw_bad_loss = False
        if acc.num_processes > 1:  # every rank takes the same decision
            flags = acc.reduce(flags, reduction="sum")
        if not bool(flags.any()):
            self._iw_nonfinite_streak = 0
            return
        self._iw_nonfinite_streak += 1
        self._iw_nonfinite_total += 1
        if acc.scaler is None:
            model.zero_grad(set_to_none=True)  # the optimizer then leaves every parameter as is
        what = " and ".join(k for k, f in zip(("loss", "gradient"), flags.tolist()) if f)
        step, n, limit = self.state.global_step + 1, self._iw_nonfinite_streak, \
            self.args.max_nonfinite_steps
        if n < max(limit, 1) and not self.is_deepspeed_enabled:
            logger.warning(f"IWSFTTrainer: step {step}: non-finite {what}; the step makes no "
                           f"update ({n} in a row, {self._iw_nonfinite_total} in all; "
                           f"max_nonfinite_steps={limit})")
            return
        from transformers.trainer_utils import get_last_checkpoint

        out = self.args.output_dir
        last = get_last_checkpoint(out) if os.path.isdir(out) else None
        why = ("DeepSpeed applies the update inside backward, so the step could not be skipped"
               if self.is_deepspeed_enabled else
               f"{n} optimizer steps in a row (steps {step - n + 1}-{step}; "
               f"IWSFTConfig.max_nonfinite_steps={limit}) made no update")
        raise RuntimeError(
            f"IWSFTTrainer: the training diverged: non-finite {what} at step {step}; {why}. "
            f"Training stopped; a model with non-finite parameters is never saved. Last "
            f"checkpoint: {last or 'none'}. Lower learning_rate (now "
            f"{self._get_learning_rate():.3g}), clip gradients (max_grad_norm, now "
            f"{self.args.max_grad_norm}) or check the data.")

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """``Trainer.save_model`` (checkpoints and the final model), refusing a model with a
        non-finite parameter (RuntimeError): a diverged run writes nothing."""
        for name, p in self.model.named_parameters():
            t = getattr(p, "ds_tensor", p)  # DeepSpeed ZeRO-3: this rank's partition
            t = t.to_local() if hasattr(t, "to_local") else t  # FSDP2: this rank's shard
            if t.numel() and not bool(torch.isfinite(t.detach()).all()):
                raise RuntimeError(
                    f"IWSFTTrainer: not saving to {output_dir or self.args.output_dir}: parameter "
                    f"{name} is not finite after step {self.state.global_step} (the training "
                    f"diverged; lower learning_rate or clip gradients with max_grad_norm)")
        super().save_model(output_dir, _internal_call)

    def _save_checkpoint(self, model, trial):
        if self._iw_nonfinite_streak:  # the model is suspect; keep the checkpoints before it
            logger.warning(f"IWSFTTrainer: no checkpoint at step {self.state.global_step}: its "
                           f"loss or gradient was not finite")
            return
        super()._save_checkpoint(model, trial)


class _NonFiniteSteps(TrainerCallback):
    """Runs :meth:`IWSFTTrainer._check_step` before each optimizer step."""

    def __init__(self, trainer: IWSFTTrainer):
        self._trainer = weakref.ref(trainer)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self._trainer()._check_step(model)
