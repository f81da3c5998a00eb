"""Everything a run sets up before its first step (loop.py): the accelerator, the data, the
policy and its optimizer and schedule, the reference log-probs, and the state to resume from.
The result is one :class:`Run`, which the steps (step.py), the checkpoints and the summary
(summary.py) read."""

from __future__ import annotations

import functools
import json
import math
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import IWConfig
from ..integrations import apply_iwsft_to_model
from .checkpoint import load_latest
from .config import ASSETS, DEFAULT_MODEL, TrainConfig, check_config
from .data import TokenizedData, hold_out, load_records, tokenize_dataset
from .distributed import (configure_deepspeed, describe, make_accelerator, model_freed,
                          param_ndim, prepare_reference_model, sharding_report)
from .loading import (ModelLoadError, check_model_name, load_model, load_tokenizer,
                      prepare_policy)
from .metrics import evaluate
from ..refcache import compute_ref_logprobs, fingerprint_parts
from . import tensor_parallel as tp  # --tp-head: the hooks marked "tp:" below
from .sampler import StepSampler
from .step import FIRST_STEP_KEYS


@dataclass
class Run:
    """One training run: its options, the prepared objects, and what the loop keeps."""

    cfg: TrainConfig
    acc: object  # accelerate.Accelerator
    out_dir: Path
    iw: IWConfig
    log_with: str | None
    t_start: float
    lr: float = 0.0  # peak learning rate
    identity: str = ""  # the starting model's identity (reference cache fingerprint)
    tok: object = None
    data: TokenizedData | None = None
    model: object = None
    opt: object = None
    sched: object = None
    sampler: StepSampler | None = None
    total: int = 0  # optimizer steps of the whole run
    stop: int = 0  # the step this invocation stops at (--stop-after-steps)
    start: int = 0  # the step it starts at (> 0 after --resume)
    ref: list | None = None  # reference log-probs per example (None in mode sft)
    lengths: list = field(default_factory=list)  # tokens of each example
    eval_set: list = field(default_factory=list)
    eval_label: str = ""  # what the eval set is, for the summary
    eval_before: dict = field(default_factory=dict)
    state: dict = field(default_factory=dict)  # trainer_state.json of the checkpoints
    history: list = field(default_factory=list)  # metrics of the steps run by this invocation
    dist_report: dict = field(default_factory=dict)
    ref_report: dict | None = None

    @property
    def say(self):
        return self.acc.print

    @property
    def examples(self):
        return self.data.examples

    @property
    def world(self) -> int:
        """Ranks the data is split over (tp: the dp ranks; the processes otherwise)."""
        return tp.data_parallel(self.acc)[1]

    @property
    def rank(self) -> int:
        """This process's data rank (tp: its dp rank; the process index otherwise)."""
        return tp.data_parallel(self.acc)[0]

    @property
    def metrics_file(self) -> Path:
        return self.out_dir / "metrics.jsonl"


def _log_with(cfg: TrainConfig) -> str | None:
    if cfg.log_with == "auto":
        try:
            import tensorboard  # noqa: F401

            return "tensorboard"
        except ImportError:
            return None
    return None if cfg.log_with == "none" else cfg.log_with


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """The learning rate of optimizer step `step` (0-based) as a fraction of --lr: linear
    warmup over the first `warmup` steps that never uses 0 (step k of the run, counted from 1,
    gets k / (warmup + 1)), then cosine decay from 1 at step warmup + 1 towards 0 at the end
    (the last step keeps a small positive rate)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_schedule(opt, warmup: int, total: int):
    """LambdaLR of :func:`warmup_cosine` (a partial: its state_dict round-trips through
    checkpoints)."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, functools.partial(warmup_cosine, warmup=warmup, total=total))


def rescale_lr(sched, lr: float) -> None:
    """A loaded schedule continued at another peak rate `lr` (--resume with another --lr): the
    same shape, scaled (the optimizer's current rates too)."""
    for g, fn in zip(sched.optimizer.param_groups, sched.lr_lambdas):
        g["lr"] = lr * fn(sched.last_epoch)
        g["initial_lr"] = lr
    sched.base_lrs = [lr] * len(sched.base_lrs)
    sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]


def setup(cfg: TrainConfig) -> Run:
    """Accelerator, data, policy + optimizer, reference log-probs, resume state, eval before."""
    from accelerate.utils import set_seed

    check_config(cfg)  # the options together (parse_config checks them too; train(cfg) too)
    t_start = time.perf_counter()
    bf16 = cfg.bf16 == "yes" or (cfg.bf16 == "auto" and torch.cuda.is_available())
    log_with = _log_with(cfg)
    # cpu=True without CUDA: launched CPU processes form a gloo group; FSDP2 kept on CPU ranks
    acc = make_accelerator(tp_head=cfg.tp_head, mixed_precision="bf16" if bf16 else "no",
                           gradient_accumulation_steps=cfg.grad_accum, log_with=log_with,
                           project_dir=str(cfg.output_dir))
    acc.print(describe(acc))
    set_seed(cfg.seed)
    r = Run(cfg, acc, Path(cfg.output_dir), IWConfig(**cfg.iw_kwargs()), log_with, t_start)
    load_data(r)
    build_policy(r)
    reference_logprobs(r)
    resume_or_start(r)
    return r


def load_data(r: Run) -> None:
    cfg = r.cfg
    for name, what in ((cfg.model, "model"), (cfg.ref_model, "ref_model"),
                       (cfg.tokenizer, "tokenizer")):
        check_model_name(name, what)
    r.tok = load_tokenizer(cfg)
    source = cfg.data or str(ASSETS / "s1k_tiny.jsonl")
    need_q = cfg.sampling == "quality" or cfg.quality_weight
    if cfg.sampling not in ("uniform", "quality"):
        raise ValueError(f"sampling must be 'uniform' or 'quality', got {cfg.sampling!r}")
    r.data = tokenize_dataset(load_records(source, cfg.data_split), r.tok,
                              max_length=cfg.max_length, trace_source=cfg.trace_source,
                              quality_column=cfg.quality_column, max_examples=cfg.max_examples,
                              need_quality=need_q, source=source)
    r.say(f"data: {source}: {r.data.report()}")
    r.eval_set, r.eval_label = eval_set(r, source)
    r.say(f"eval: {r.eval_label}")
    r.lengths = [len(ex.input_ids) for ex in r.examples]


DEFAULT_EVAL_TRAIN_EXAMPLES = 16  # eval on the first 16 training examples without held-out data


def eval_set(r: Run, source: str) -> tuple[list, str]:
    """(eval examples, how the summary names them). --eval-fraction: held out of --data (and
    removed from r.data); --eval-data: another file; neither: the first training examples.
    --eval-examples caps the set (default: all held-out ones, or 16 training examples)."""
    cfg = r.cfg
    if cfg.eval_fraction is not None:
        r.data, held = hold_out(r.data, cfg.eval_fraction, cfg.seed)
        what = (f"of {source} (--eval-fraction {cfg.eval_fraction:g}, seed {cfg.seed}; "
                f"{len(r.data.examples)} left to train on)")
    elif cfg.eval_data is not None:
        ev = tokenize_dataset(load_records(cfg.eval_data, cfg.data_split), r.tok,
                              max_length=cfg.max_length, trace_source=cfg.trace_source,
                              max_examples=cfg.eval_examples or None,
                              source=cfg.eval_data)
        held, what = ev.examples, f"of {cfg.eval_data} (--eval-data: {ev.report()})"
    else:
        n = DEFAULT_EVAL_TRAIN_EXAMPLES if cfg.eval_examples is None else cfg.eval_examples
        chosen = r.examples[:n]
        return chosen, f"first {len(chosen)} training examples"
    chosen = held if cfg.eval_examples is None else held[: cfg.eval_examples]
    of = "" if len(chosen) == len(held) else f" of {len(held)}"
    return chosen, f"held-out {len(chosen)}{of} examples " + what


def build_policy(r: Run) -> None:
    """The policy (patched), the sampler, AdamW (no decay on norms and biases), accelerate's
    prepare, and the learning-rate schedule."""
    cfg, acc = r.cfg, r.acc
    model, r.identity = load_model(cfg.model, cfg)
    if len(r.tok) > model.config.vocab_size:
        raise ModelLoadError(f"tokenizer has {len(r.tok)} tokens but the model's vocabulary is "
                             f"{model.config.vocab_size}")
    prepare_policy(model, cfg, r.iw)
    tp_report = tp.parallelize_head(acc, model)  # tp: lm_head weight Shard(0) over "tp"
    r.sampler = StepSampler(len(r.examples), cfg.micro_batch_size * cfg.grad_accum * r.world,
                            cfg.seed, quality=[ex.quality for ex in r.examples]
                            if cfg.sampling == "quality" else None)
    r.total = cfg.max_steps or cfg.epochs * r.sampler.steps_per_epoch
    r.stop = min(r.total, cfg.stop_after_steps) if cfg.stop_after_steps else r.total
    r.lr = lr = cfg.lr if cfg.lr is not None else (1e-3 if cfg.model == DEFAULT_MODEL
                                                    else 1e-5)
    decay = [p for p in model.parameters() if param_ndim(p) >= 2]  # matrices; not norms/biases
    no_decay = [p for p in model.parameters() if param_ndim(p) < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2))
    configure_deepspeed(acc, cfg.micro_batch_size, cfg.grad_accum, cfg.max_grad_norm)
    r.model, r.opt = tp.prepare(acc, model, opt)  # tp: acc.prepare, FSDP2 over "dp_shard"
    # after prepare: DeepSpeed rebuilds the optimizer's param groups
    r.sched = lr_schedule(r.opt, math.ceil(cfg.warmup_ratio * r.total), r.total)
    acc.register_for_checkpointing(r.sched)  # stepped by hand: once per optimizer step
    r.dist_report = sharding_report(acc, r.model)
    r.dist_report.update(tp_report)
    r.say(f"policy: {r.dist_report['param_mib_per_rank']:.1f} MiB of parameters per rank (full "
          f"model {r.dist_report['param_mib_full']:.1f} MiB)")


def reference_logprobs(r: Run) -> None:
    """q_ref's log-probs of every example, before any update (cached on disk): the starting
    model (the prepared policy itself) unless --ref-model. --zero-reference: log q_ref = 0 for
    every token, no reference pass and nothing cached (token mode, T 1, clip [0, 1]: DFT)."""
    cfg, acc = r.cfg, r.acc
    if not r.iw.needs_reference:
        return
    if cfg.zero_reference:
        r.ref = [torch.zeros(len(ex.input_ids), dtype=torch.float32) for ex in r.examples]
        r.say("reference log-probs: 0 for every token (--zero-reference: no reference pass)")
        return
    ref_name = cfg.ref_model or cfg.model
    if cfg.ref_model:
        loaded = {}

        def load_ref():
            m, loaded["id"] = load_model(cfg.ref_model, cfg)
            return apply_iwsft_to_model(m, r.iw, backend=cfg.loss_backend)

        # frozen, eval mode; FSDP2-sharded like the policy under FSDP, else replicated
        ref_model, r.ref_report = prepare_reference_model(acc, load_ref)
        ref_id = loaded["id"]
        rep = r.ref_report
        r.say(f"reference model ({cfg.ref_model}): {rep['placement']}, "
              f"{rep['param_mib_per_rank']:.1f} MiB of parameters per rank "
              f"(full model {rep['param_mib_full']:.1f} MiB)")
    else:
        ref_model, ref_id = r.model, r.identity
    parts = fingerprint_parts(r.data, r.tok, ref_id, cfg.max_length)
    cache_dir = Path(cfg.ref_cache) if cfg.ref_cache else r.out_dir / "ref_logprobs"
    t0 = time.perf_counter()
    r.ref = compute_ref_logprobs(tp.data_view(acc),  # tp: work dealt by dp rank
                                 ref_model, r.data, cache_dir, parts, r.tok.pad_token_id,
                                 cfg.ref_batch_size)
    r.say(f"reference log-probs ({ref_name}): {cache_dir} ({time.perf_counter() - t0:.1f} s)")
    if cfg.ref_model:
        alive = weakref.ref(ref_model)
        del ref_model
        r.ref_report["freed"] = model_freed(alive, acc.device)
        if not r.ref_report["freed"]:
            r.say("warning: the reference model is still referenced after its pass")


def resume_or_start(r: Run) -> None:
    """--resume: the newest checkpoint. The eval before training (stored in the checkpoints),
    the trackers, and metrics.jsonl cut to the steps before the start."""
    acc = r.acc
    if r.cfg.resume:
        r.start, r.state = load_latest(acc, r.out_dir, r.say)
        old = r.sched.base_lrs[0]
        if r.start and any(b != r.lr for b in r.sched.base_lrs):
            rescale_lr(r.sched, r.lr)
            r.say(f"--resume: peak learning rate {old:g} -> {r.lr:g} "
                  f"from step {r.start + 1} (same schedule, scaled)")
    if "eval_before" not in r.state:  # the loss alone in checkpoints made before eval_metrics
        ev = evaluate(r.model, r.eval_set, r.tok.pad_token_id, acc.device)
        r.state["eval_before"], r.state["eval_before_metrics"] = ev["eval_loss"], ev
    r.eval_before = r.state.get("eval_before_metrics", {"eval_loss": r.state["eval_before"]})
    if r.log_with is not None:
        acc.init_trackers("iwsft", config={k: v for k, v in r.cfg.to_dict().items()
                                           if isinstance(v, (int, float, str, bool))})
    if r.start == 0:  # the trackers get eval_* at step 0 and, with the last step's line, at the end
        acc.log(r.eval_before, step=0)
    if acc.is_main_process:  # keep only the metrics of steps before `start` (fresh run: none)
        r.out_dir.mkdir(parents=True, exist_ok=True)
        f = r.metrics_file
        kept = [line for line in (f.read_text().splitlines() if f.exists() else [])
                if line.strip() and json.loads(line)["step"] <= r.start]
        f.write_text("".join(line + "\n" for line in kept))
        if kept and "first_step" not in r.state:  # a checkpoint made before it was kept
            first = json.loads(kept[0])
            if first["step"] == 1:
                r.state["first_step"] = {k: first[k] for k in FIRST_STEP_KEYS if k in first}
