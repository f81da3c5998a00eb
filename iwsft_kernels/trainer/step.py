"""One optimizer step of `iwsft-train` (loop.py) and what is recorded of it.

Gradient scaling (the global target-token normaliser): a step's global batch holds D target
tokens over all micro-batches and ranks (every rank knows D: the sampler is deterministic).
Each micro-batch loss is sum_i w_i * (-logp_i) / D; accelerate divides by the accumulation
count and DDP/FSDP/ZeRO average over ranks, so backward gets loss * accum * world, and the
summed gradient equals the gradient of the full-batch loss, however the batch was split.
"""

from __future__ import annotations

import json
import math
import resource
import time

import torch

from ..report import write_last_step_weights
from .data import collate
from .guard import step_is_nonfinite
from .metrics import FUSED_OUTPUTS, OUTPUTS_KW, _to, micro_stats, sequence_weights, step_metrics
from . import tensor_parallel as tp  # --tp-head: the hooks marked "tp:" below
from .sampler import rank_micro_batches


# what the summary reports of the run's first step (trainer_state.json keeps it for --resume)
FIRST_STEP_KEYS = ("step", "loss", "logp_mean", "entropy", "mean_token_accuracy")


def peak_mem_gib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # CPU: peak RSS (KiB)


def train_step(r, step: int) -> tuple[dict, list[float]]:
    """Forward/backward over this rank's micro-batches of step `step` (0-based), clip, AdamW
    step (skipped when the step is non-finite: guard.py), scheduler step. Returns the step's metrics (reduced over micro-batches and ranks) and
    this rank's sequence weights."""
    cfg, acc, model, dev = r.cfg, r.acc, r.model, r.acc.device
    t0 = time.perf_counter()
    gidx = r.sampler.batch(step)
    D = sum(r.examples[i].n_targets for i in gidx)  # global target tokens of this step
    rows, seq_w, gnorm, lr_now = [], [], float("nan"), r.sched.get_last_lr()[0]
    nonfinite = False
    for mb in rank_micro_batches(gidx, r.lengths, r.rank, r.world,
                                 cfg.micro_batch_size):
        with acc.accumulate(model):
            batch = collate([r.examples[i] for i in mb], r.tok.pad_token_id,
                            [r.ref[i] for i in mb] if r.ref is not None else None, cfg.packing)
            if not cfg.quality_weight:
                batch.pop("quality")
            batch = _to(batch, dev)
            out = model(**batch, num_items_in_batch=D, **{OUTPUTS_KW: FUSED_OUTPUTS})
            acc.backward(out.loss * (cfg.grad_accum * r.world))
            rows.append(micro_stats(out, batch, r.iw.mode))
            seq_w += sequence_weights(out)
            if acc.sync_gradients:  # the step's last micro-batch (accelerate: no-op before)
                gn = acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm
                                         if cfg.max_grad_norm > 0 else math.inf)
                gnorm = float(gn) if gn is not None else float("nan")  # None: DeepSpeed
                nonfinite = step_is_nonfinite(acc, rows, None if gn is None else gnorm)
                if not nonfinite:  # guard.py: a non-finite step is skipped
                    r.opt.step()
                r.opt.zero_grad()
    r.sched.step()  # also after a skipped step: the schedule follows the step number
    streak = r.state.get("nonfinite_streak", 0) + 1 if nonfinite else 0
    r.state["nonfinite_streak"] = streak
    r.state["nonfinite_steps"] = r.state.get("nonfinite_steps", 0) + int(nonfinite)
    local = torch.stack(rows)
    allrows = tp.gather_rows(acc, local)  # tp: one rank per tp group
    dt = time.perf_counter() - t0
    m = {"step": step + 1, "epoch": (step + 1) / r.sampler.steps_per_epoch,
         **step_metrics(allrows), "lr": lr_now, "grad_norm": gnorm,
         "nonfinite": nonfinite, "nonfinite_steps": r.state["nonfinite_steps"],
         "step_time_s": dt, "peak_mem_gib": peak_mem_gib(dev)}
    m["tokens_per_s"] = m["tokens"] / dt
    return m, seq_w


def record_step(r, m: dict, seq_w: list[float]) -> None:
    """The step's line of metrics.jsonl, the trackers, and last_step_weights.json (the weights
    gathered from every rank)."""
    acc = r.acc
    r.history.append(m)
    if m["step"] == 1:  # kept in the checkpoints: the summary's "first step" after a resume
        r.state["first_step"] = {k: m[k] for k in FIRST_STEP_KEYS}
    seq_w = tp.gather_list(acc, seq_w)  # tp: one rank per tp group
    if acc.is_main_process:
        w_lo, w_hi = r.iw.bounds if r.iw.mode != "sft" else (None, None)
        write_last_step_weights(r.out_dir, trainer="iwsft-train", step=m["step"],
                                mode=r.iw.mode, weights=seq_w, w_min=w_lo, w_max=w_hi)
        with r.metrics_file.open("a") as f:
            f.write(json.dumps(m) + "\n")
    acc.log(m, step=m["step"])
