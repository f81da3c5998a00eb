"""The training run: data -> reference log-probs -> iw-SFT steps -> checkpoints -> final save.

Gradient scaling (the global target-token normaliser): a step's global batch holds D target
tokens over all micro-batches and ranks (every rank knows D: the sampler is deterministic).
Each micro-batch loss is sum_i w_i * (-logp_i) / D; accelerate divides by the accumulation
count and DDP/FSDP/ZeRO average over ranks, so backward gets loss * accum * world, and the
summed gradient equals the gradient of the full-batch loss, however the batch was split.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import time
import weakref
from pathlib import Path

import torch

from .. import IWConfig
from ..integrations import apply_iwsft_to_model
from ..report import write_last_step_weights
from .config import ASSETS, DEFAULT_MODEL, TrainConfig
from .data import collate, load_records, tokenize_dataset
from .distributed import (configure_deepspeed, describe, final_state_dict, make_accelerator,
                          model_freed, param_ndim, prepare_reference_model, sharding_report)
from .metrics import (EVAL_KEYS, FUSED_OUTPUTS, OUTPUTS_KW, _to, evaluate, micro_stats,
                      sequence_weights, step_metrics)
from ..refcache import compute_ref_logprobs, fingerprint_parts, model_identity
from .sampler import StepSampler, rank_micro_batches


class ModelLoadError(ValueError):
    pass


# ------------------------------------------------------------------------------ loading
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


# ----------------------------------------------------------------------------- helpers
def _peak_mem_gib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # CPU: peak RSS (KiB)


def _save_checkpoint(accelerator, out_dir: Path, next_step: int, state: dict, keep: int) -> Path:
    """accelerator.save_state into a temp folder, then an atomic rename."""
    ck = out_dir / "checkpoints"
    final, tmp = ck / f"step-{next_step:07d}", ck / f".tmp-step-{next_step:07d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        ck.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in sorted(ck.glob("step-*"))[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def latest_checkpoint(out_dir: Path) -> Path | None:
    cks = sorted((out_dir / "checkpoints").glob("step-*"))
    return cks[-1] if cks else None


# -------------------------------------------------------------------------------- train
def train(cfg: TrainConfig) -> dict:
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    t_start = time.perf_counter()
    out_dir = Path(cfg.output_dir)
    bf16 = cfg.bf16 == "yes" or (cfg.bf16 == "auto" and torch.cuda.is_available())
    log_with = cfg.log_with
    if log_with == "auto":
        try:
            import tensorboard  # noqa: F401

            log_with = "tensorboard"
        except ImportError:
            log_with = None
    # cpu=True without CUDA: launched CPU processes form a gloo group; FSDP2 kept on CPU ranks
    acc = make_accelerator(mixed_precision="bf16" if bf16 else "no",
                           gradient_accumulation_steps=cfg.grad_accum,
                           log_with=None if log_with in (None, "none") else log_with,
                           project_dir=str(out_dir))
    say = acc.print
    say(describe(acc))
    set_seed(cfg.seed)
    iw = IWConfig(**cfg.iw_kwargs())
    w_lo, w_hi = iw.bounds if iw.mode != "sft" else (None, None)  # recorded with the weights
    lr = cfg.lr if cfg.lr is not None else (1e-3 if cfg.model == DEFAULT_MODEL else 1e-5)

    # 1. data
    for name, what in ((cfg.model, "model"), (cfg.ref_model, "ref_model"),
                       (cfg.tokenizer, "tokenizer")):
        check_model_name(name, what)
    tok = load_tokenizer(cfg)
    source = cfg.data or str(ASSETS / "s1k_tiny.jsonl")
    need_q = cfg.sampling == "quality" or cfg.quality_weight
    if cfg.sampling not in ("uniform", "quality"):
        raise ValueError(f"sampling must be 'uniform' or 'quality', got {cfg.sampling!r}")
    data = tokenize_dataset(load_records(source, cfg.data_split), tok, max_length=cfg.max_length,
                            trace_source=cfg.trace_source, quality_column=cfg.quality_column,
                            max_examples=cfg.max_examples, need_quality=need_q, source=source)
    say(f"data: {source}: {data.report()}")
    examples = data.examples
    lengths = [len(ex.input_ids) for ex in examples]

    # 2. model
    model, identity = load_model(cfg.model, cfg)
    if len(tok) > model.config.vocab_size:
        raise ModelLoadError(f"tokenizer has {len(tok)} tokens but the model's vocabulary is "
                             f"{model.config.vocab_size}")
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

    world = acc.num_processes
    sampler = StepSampler(len(examples), cfg.micro_batch_size * cfg.grad_accum * world, cfg.seed,
                          quality=[ex.quality for ex in examples] if cfg.sampling == "quality"
                          else None)
    total = cfg.max_steps or cfg.epochs * sampler.steps_per_epoch
    decay = [p for p in model.parameters() if param_ndim(p) >= 2]  # matrices; not norms/biases
    no_decay = [p for p in model.parameters() if param_ndim(p) < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2))
    configure_deepspeed(acc, cfg.micro_batch_size, cfg.grad_accum, cfg.max_grad_norm)
    model, opt = acc.prepare(model, opt)
    # after prepare: DeepSpeed rebuilds the optimizer's param groups
    sched = get_cosine_schedule_with_warmup(opt, math.ceil(cfg.warmup_ratio * total), total)
    acc.register_for_checkpointing(sched)  # stepped by hand: once per optimizer step
    dev = acc.device
    dist_report = sharding_report(acc, model)
    say(f"policy: {dist_report['param_mib_per_rank']:.1f} MiB of parameters per rank (full "
        f"model {dist_report['param_mib_full']:.1f} MiB)")

    # 3. reference log-probs (before any update: q_ref = the starting model unless --ref-model)
    ref, ref_report = None, None
    if iw.needs_reference:
        ref_name = cfg.ref_model or cfg.model
        if cfg.ref_model:
            loaded = {}

            def load_ref():
                m, loaded["id"] = load_model(cfg.ref_model, cfg)
                return apply_iwsft_to_model(m, iw, backend=cfg.loss_backend)

            # frozen, eval mode; FSDP2-sharded like the policy under FSDP, else replicated
            ref_model, ref_report = prepare_reference_model(acc, load_ref)
            ref_id = loaded["id"]
            say(f"reference model ({cfg.ref_model}): {ref_report['placement']}, "
                f"{ref_report['param_mib_per_rank']:.1f} MiB of parameters per rank "
                f"(full model {ref_report['param_mib_full']:.1f} MiB)")
        else:  # the starting model: the policy itself (already prepared), before any update
            ref_model, ref_id = model, identity
        parts = fingerprint_parts(data, tok, ref_id, cfg.max_length)
        cache_dir = Path(cfg.ref_cache) if cfg.ref_cache else out_dir / "ref_logprobs"
        t0 = time.perf_counter()
        ref = compute_ref_logprobs(acc, ref_model, data, cache_dir, parts, tok.pad_token_id,
                                   cfg.ref_batch_size)
        say(f"reference log-probs ({ref_name}): {cache_dir} ({time.perf_counter() - t0:.1f} s)")
        if cfg.ref_model:
            alive = weakref.ref(ref_model)
            del ref_model
            ref_report["freed"] = model_freed(alive, dev)
            if not ref_report["freed"]:
                say("warning: the reference model is still referenced after its pass")
        else:
            del ref_model

    # 4. resume
    start, state = 0, {}
    if cfg.resume:
        ck = latest_checkpoint(out_dir)
        if ck is None:
            say(f"--resume: no checkpoint under {out_dir / 'checkpoints'}; starting fresh")
        else:
            acc.load_state(str(ck))
            state = json.loads((ck / "trainer_state.json").read_text())
            start = state["next_step"]
            say(f"resumed from {ck} at step {start}")
    eval_set = examples[: cfg.eval_examples]
    if "eval_before" not in state:  # the loss alone in checkpoints made before eval_metrics
        ev = evaluate(model, eval_set, tok.pad_token_id, dev)
        state["eval_before"], state["eval_before_metrics"] = ev["eval_loss"], ev
    eval_before = state.get("eval_before_metrics", {"eval_loss": state["eval_before"]})
    if log_with not in (None, "none"):
        acc.init_trackers("iwsft", config={k: v for k, v in cfg.to_dict().items()
                                           if isinstance(v, (int, float, str, bool))})
    if start == 0:  # the trackers get eval_* at step 0 and, with the last step's line, at the end
        acc.log(eval_before, step=0)

    # 5. train
    stop = min(total, cfg.stop_after_steps) if cfg.stop_after_steps else total
    save_every = cfg.checkpoint_every(total)  # default: ~8 checkpoints per run (resumable)
    metrics_file = out_dir / "metrics.jsonl"
    if acc.is_main_process:  # keep only the metrics of steps before `start` (fresh run: none)
        out_dir.mkdir(parents=True, exist_ok=True)
        kept = [line for line in (metrics_file.read_text().splitlines()
                                  if metrics_file.exists() else [])
                if line.strip() and json.loads(line)["step"] <= start]
        metrics_file.write_text("".join(line + "\n" for line in kept))
    n_targets = [ex.n_targets for ex in examples]
    model.train()
    bar = tqdm(total=total, initial=start, desc=f"iw-SFT ({iw.mode})",
               disable=not acc.is_local_main_process)
    m, history = {}, []
    for step in range(start, stop):
        t0 = time.perf_counter()
        gidx = sampler.batch(step)
        D = sum(n_targets[i] for i in gidx)  # global target tokens of this optimizer step
        rows, seq_w, gnorm, lr_now = [], [], float("nan"), sched.get_last_lr()[0]
        for mb in rank_micro_batches(gidx, lengths, acc.process_index, world,
                                     cfg.micro_batch_size):
            with acc.accumulate(model):
                batch = collate([examples[i] for i in mb], tok.pad_token_id,
                                [ref[i] for i in mb] if ref is not None else None, cfg.packing)
                if not cfg.quality_weight:
                    batch.pop("quality")
                batch = _to(batch, dev)
                out = model(**batch, num_items_in_batch=D, **{OUTPUTS_KW: FUSED_OUTPUTS})
                acc.backward(out.loss * (cfg.grad_accum * world))
                rows.append(micro_stats(out, batch, iw.mode))
                seq_w += sequence_weights(out)
                if acc.sync_gradients:
                    gn = acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm
                                             if cfg.max_grad_norm > 0 else math.inf)
                    gnorm = float(gn) if gn is not None else float("nan")  # None: DeepSpeed
                opt.step()
                opt.zero_grad()
        sched.step()
        local = torch.stack(rows)
        allrows = acc.gather(local.to(dev)).cpu() if world > 1 else local
        dt = time.perf_counter() - t0
        m = {"step": step + 1, "epoch": (step + 1) / sampler.steps_per_epoch,
             **step_metrics(allrows), "lr": lr_now, "grad_norm": gnorm,
             "step_time_s": dt, "peak_mem_gib": _peak_mem_gib(dev)}
        m["tokens_per_s"] = m["tokens"] / dt
        if step + 1 == stop:  # the model the run ends with: its eval goes on its step's line
            m.update(evaluate(model, eval_set, tok.pad_token_id, dev))
        history.append(m)
        if world > 1:
            from accelerate.utils import gather_object

            seq_w = gather_object(seq_w)
        if acc.is_main_process:
            write_last_step_weights(out_dir, trainer="iwsft-train", step=step + 1, mode=iw.mode,
                                    weights=seq_w, w_min=w_lo, w_max=w_hi)
        if acc.is_main_process:
            with metrics_file.open("a") as f:
                f.write(json.dumps(m) + "\n")
        acc.log(m, step=step + 1)
        bar.update(1)
        # loss is weighted (it can rise while the policy improves: the weights grow); the
        # unweighted NLL, -mean log p over the step's targets, is the one to watch for progress
        bar.set_postfix(loss=f"{m['loss']:.4f}", nll=f"{-m['logp_mean']:.4f}",
                        w=f"{m['weight_mean']:.3f}")
        if (save_every and (step + 1) % save_every == 0) or step + 1 == stop:
            state.update(next_step=step + 1, total_steps=total)
            _save_checkpoint(acc, out_dir, step + 1, state, cfg.keep_checkpoints)
    bar.close()

    # 6. final save + summary
    summary = {"output_dir": str(out_dir), "mode": iw.mode, "steps": stop, "total_steps": total,
               "data": data.report(), "eval_examples": len(eval_set),
               **{f"{k}_before": v for k, v in eval_before.items()}}
    if stop < total:
        summary["stopped_early"] = True
    else:
        final = out_dir / "final"
        unwrapped = acc.unwrap_model(model)
        unwrapped.save_pretrained(final, is_main_process=acc.is_main_process,
                                  save_function=acc.save, state_dict=final_state_dict(acc, model))
        if acc.is_main_process:
            tok.save_pretrained(final)
        summary["final_dir"] = str(final)
    ev = m if EVAL_KEYS[0] in m else evaluate(model, eval_set, tok.pad_token_id, dev)
    summary.update({f"{k}_after": ev[k] for k in EVAL_KEYS})
    if history:
        summary["train_loss_first"] = history[0]["loss"]
        summary["train_loss_last"] = history[-1]["loss"]
        summary["train_nll_first"] = -history[0]["logp_mean"]
        summary["train_nll_last"] = -history[-1]["logp_mean"]
        for k in ("entropy", "mean_token_accuracy"):
            summary[f"train_{k}_first"], summary[f"train_{k}_last"] = history[0][k], \
                history[-1][k]
        summary["last_step"] = {k: history[-1][k] for k in (
            "weight_mean", "weight_min", "weight_max", "ess_fraction", "clip_frac_max",
            "clip_frac_min", "log_ratio_mean", "grad_norm", "lr")}
        summary["tokens_per_s"] = sum(h["tokens"] for h in history) / sum(
            h["step_time_s"] for h in history)
    summary["peak_mem_gib"] = _peak_mem_gib(dev)
    summary["distributed"] = dist_report
    if ref_report is not None:
        summary["ref_model_memory"] = ref_report
    summary["wall_s"] = time.perf_counter() - t_start
    acc.end_training()
    if acc.is_main_process:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        if cfg.report:
            _write_report(out_dir, summary)
            (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        say(format_summary(summary))
    return summary


def _write_report(out_dir: Path, summary: dict) -> None:
    """OUTPUT_DIR/report/ (report.md + PNGs; iwsft_kernels/report.py). A failure here is
    reported, never raised: the run itself is done and saved."""
    from .. import report

    try:
        md = report.write_report(out_dir)
    except Exception as e:  # noqa: BLE001 - the report must not fail a finished run
        summary["report_note"] = f"not written ({type(e).__name__}: {e})"
        return
    summary["report"] = str(md)
    if not report._have_matplotlib():
        summary["report_note"] = f"{md} (no plots: matplotlib is not installed; " \
                                 f"{report.MATPLOTLIB_HINT})"
        summary["report"] = None


def format_summary(s: dict) -> str:
    lines = [f"iw-SFT ({s['mode']}) finished {s['steps']}/{s['total_steps']} steps in "
             f"{s['wall_s']:.1f} s",
             f"  outputs:    {s['output_dir']}  (metrics.jsonl, checkpoints/, summary.json"
             + (f", final model: {s['final_dir']})" if "final_dir" in s else ")"),
             f"  data:       {s['data']}",
             f"  eval loss:  {s['eval_loss_before']:.4f} before -> {s['eval_loss_after']:.4f} "
             f"after (mean NLL, {s['eval_examples']} examples)"]
    if "eval_entropy_before" in s:
        lines.append(f"  eval:       entropy {s['eval_entropy_before']:.4f} -> "
                     f"{s['eval_entropy_after']:.4f}, token accuracy "
                     f"{s['eval_mean_token_accuracy_before']:.2%} -> "
                     f"{s['eval_mean_token_accuracy_after']:.2%}")
    if "train_loss_first" in s:
        ls = s["last_step"]
        lines += [f"  train loss: {s['train_loss_first']:.4f} first step -> "
                  f"{s['train_loss_last']:.4f} last step (weighted); unweighted NLL "
                  f"{s['train_nll_first']:.4f} -> {s['train_nll_last']:.4f}",
                  f"  train:      entropy {s['train_entropy_first']:.4f} -> "
                  f"{s['train_entropy_last']:.4f}, token accuracy "
                  f"{s['train_mean_token_accuracy_first']:.2%} -> "
                  f"{s['train_mean_token_accuracy_last']:.2%}",
                  f"  weights:    mean {ls['weight_mean']:.3f}  min {ls['weight_min']:.3f}  max "
                  f"{ls['weight_max']:.3f}  ESS {ls['ess_fraction']:.3f}  clipped high "
                  f"{ls['clip_frac_max']:.2%} low {ls['clip_frac_min']:.2%} (last step)",
                  f"  speed:      {s['tokens_per_s']:.0f} tokens/s"]
    lines.append(f"  peak mem:   {s['peak_mem_gib']:.2f} GiB")
    if s.get("report"):
        lines.append(f"  report:     {s['report']}  (plots: {Path(s['report']).parent})")
    elif s.get("report_note"):
        lines.append(f"  report:     {s['report_note']}")
    return "\n".join(lines)
