"""Metric bookkeeping of `iwsft-train` (loop.py): what one micro-batch adds, how a step's
numbers are reduced over its micro-batches and the ranks, evaluation, and the last step's
per-sequence weights.

Per optimizer step (one line of metrics.jsonl, and the trackers of ``--log-with``):
- ``loss``: the weighted loss of the step (sum over micro-batches of sum_i w_i (-log p_i) / D);
- ``logp_mean``: mean log p over the step's target tokens (``-logp_mean`` is the NLL);
- ``entropy``: mean entropy (nats) of the next-token distribution over the step's target
  tokens; ``mean_token_accuracy``: fraction of the target tokens whose label attains the
  maximum logit (ties count as correct). Both come from the fused loss (no logits exist) and
  are token-weighted over all micro-batches and ranks of the step (TRL's SFTTrainer averages
  per-micro-batch ratios instead; the two agree when micro-batches hold equal target counts);
- the weight statistics over the step's units (sequences in sequence mode, target tokens
  otherwise): ``weight_mean/min/max``, ``ess_fraction``, ``clip_frac_max/min``,
  ``log_ratio_mean``; ``target_tokens``, ``tokens``.
Evaluation (:func:`evaluate`, plain token NLL, mode "sft"): ``eval_loss``, ``eval_entropy``,
``eval_mean_token_accuracy`` (before training in summary.json and the trackers; after the
last step also on that step's line of metrics.jsonl).
"""

from __future__ import annotations

import math

import torch

from .. import IWConfig
from .data import collate

# what the patched model is asked to compute besides the loss (integrations/causal_lm.py)
FUSED_OUTPUTS = ("entropy", "top1")
OUTPUTS_KW = "iw_outputs"
EVAL_KEYS = ("eval_loss", "eval_entropy", "eval_mean_token_accuracy")

# per-micro-batch sums; a step reduces them over micro-batches, then over ranks (gather)
_SUMS = ("loss", "logp_sum", "targets", "tokens", "w_n", "w_sum", "w_sq", "clip_hi", "clip_lo",
         "log_ratio_sum", "entropy_sum", "top1_sum")


def fused_sums(out) -> tuple[float, float]:
    """(sum of the entropy, count of top-1 labels) over the target tokens of one forward.
    The patched model returns both as (B, T) tensors that are 0 off the targets."""
    ent, top1 = getattr(out, "entropy", None), getattr(out, "top1", None)
    if ent is None or top1 is None:
        raise RuntimeError(
            f"the patched model returned no entropy / top1; it is called with "
            f"{OUTPUTS_KW}={FUSED_OUTPUTS} (integrations/causal_lm.py must support it)")
    return float(ent.detach().double().sum()), float(top1.sum())


def micro_stats(out, batch: dict, mode: str) -> torch.Tensor:
    """One micro-batch's row: the _SUMS, then the weight min and max."""
    s = out.stats
    n = float(s["num_sequences"] if mode == "sequence" else s["num_target_tokens"])
    w_mean, ess = float(s["weight_mean"]), float(s["ess_fraction"])
    w_sum = w_mean * n if n else 0.0
    w_sq = (w_sum ** 2 / (ess * n)) if n and ess > 0 else 0.0
    lr = float(s["log_ratio_mean"])
    ent, top1 = fused_sums(out)
    vals = [float(out.loss.detach()), float(out.token_logprobs.sum()), float(out.num_targets),
            float(batch["attention_mask"].sum() if "attention_mask" in batch
                  else batch["input_ids"].numel()),
            n, w_sum, w_sq, float(s["clip_frac_max"]) * n, float(s["clip_frac_min"]) * n,
            lr * n if n and math.isfinite(lr) else 0.0, ent, top1]
    return torch.tensor(vals + [float(s["weight_min"]) if n else math.inf,
                                float(s["weight_max"]) if n else -math.inf], dtype=torch.float64)


def step_metrics(rows: torch.Tensor) -> dict:
    """The step's metrics from the rows of all its micro-batches on all ranks."""
    tot = dict(zip(_SUMS, rows[:, : len(_SUMS)].sum(0).tolist()))
    n, t = tot["w_n"], tot["targets"]
    return {
        "loss": tot["loss"],
        "logp_mean": tot["logp_sum"] / max(t, 1),
        "entropy": tot["entropy_sum"] / t if t else 0.0,
        "mean_token_accuracy": tot["top1_sum"] / t if t else 0.0,
        "weight_mean": tot["w_sum"] / n if n else float("nan"),
        "weight_min": rows[:, -2].min().item(),
        "weight_max": rows[:, -1].max().item(),
        "ess_fraction": (tot["w_sum"] ** 2 / tot["w_sq"] / n) if n and tot["w_sq"] else float("nan"),
        "clip_frac_max": tot["clip_hi"] / n if n else 0.0,
        "clip_frac_min": tot["clip_lo"] / n if n else 0.0,
        "log_ratio_mean": tot["log_ratio_sum"] / n if n else float("nan"),
        "target_tokens": int(t),
        "tokens": int(tot["tokens"]),
    }


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model, examples, pad_id, device, batch_size: int = 8) -> dict:
    """Over the target tokens of `examples` (same work on every rank): ``eval_loss`` (mean
    -log p), ``eval_entropy`` and ``eval_mean_token_accuracy``, token-weighted; 0.0 when there
    is no target. The fused loss in mode "sft" (no reference, no gradient work)."""
    was_training = model.training
    model.eval()
    nll = ent = top1 = 0.0
    n = 0
    sft = IWConfig(mode="sft")
    for j in range(0, len(examples), batch_size):
        b = collate(examples[j:j + batch_size], pad_id)
        b.pop("quality")
        out = model(**_to(b, device), iw_config=sft, **{OUTPUTS_KW: FUSED_OUTPUTS})
        nll += -out.token_logprobs.double().sum().item()
        e, t = fused_sums(out)
        ent, top1 = ent + e, top1 + t
        n += int(out.num_targets)
    model.train(was_training)
    d = max(n, 1)
    return {"eval_loss": nll / d, "eval_entropy": ent / d, "eval_mean_token_accuracy": top1 / d}


def sequence_weights(out) -> list[float]:
    """The weight of each sequence of one micro-batch (iwsft-train: every example has target
    tokens, so every sequence counts). Token mode: the mean of its tokens' weights."""
    return out.seq_weights.detach().float().cpu().tolist()
