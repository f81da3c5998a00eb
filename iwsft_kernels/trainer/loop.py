"""The training run: data -> reference log-probs -> iw-SFT steps -> checkpoints -> final save.

The pieces: setup.py (accelerator, data, policy, optimizer, schedule, reference log-probs,
resume), step.py (one optimizer step and its record; the global target-token normaliser is
explained there), guard.py (non-finite steps, divergence), checkpoint.py (checkpoints,
final/), summary.py (summary.json, report/, the printed summary), loading.py (models and
tokenizers).
"""

from __future__ import annotations

import math

from . import checkpoint
from .guard import Diverged, params_finite, resume_hint
from .loading import ModelLoadError, load_model, load_tokenizer  # noqa: F401 (public names)
from .metrics import EVAL_KEYS, evaluate
from .setup import setup
from .step import record_step, train_step
from .summary import build_summary, format_summary, write_summary  # noqa: F401


def train(cfg) -> dict:
    """Run `cfg` (a TrainConfig) to its end or --stop-after-steps; the summary. Raises
    guard.Diverged (after writing summary.json) when the run stops on non-finite steps."""
    from tqdm.auto import tqdm

    r = setup(cfg)
    acc, pad = r.acc, r.tok.pad_token_id
    save_every = cfg.checkpoint_every(r.total)  # default: ~8 checkpoints per run (resumable)
    r.model.train()
    bar = tqdm(total=r.total, initial=r.start, desc=f"iw-SFT ({r.iw.mode})",
               disable=not acc.is_local_main_process)
    diverged = None
    for step in range(r.start, r.stop):
        m, seq_w = train_step(r, step)
        if r.state["nonfinite_streak"] >= max(cfg.max_nonfinite_steps, 1):
            diverged = f"{r.state['nonfinite_streak']} consecutive non-finite steps"
        if step + 1 == r.stop or diverged:  # the model the run ends with: eval on its line
            m.update(evaluate(r.model, r.eval_set, pad, acc.device))
        record_step(r, m, seq_w)
        bar.update(1)
        # loss is weighted (it can rise while the policy improves: the weights grow); the
        # unweighted NLL, -mean log p over the step's targets, is the one to watch for progress
        bar.set_postfix(loss=f"{m['loss']:.4f}", nll=f"{-m['logp_mean']:.4f}",
                        w=f"{m['weight_mean']:.3f}")
        if diverged:
            break
        if ((save_every and (step + 1) % save_every == 0) or step + 1 == r.stop) \
                and not m["nonfinite"] and params_finite(acc, r.model):  # only good ones
            r.state.update(next_step=step + 1, total_steps=r.total)
            checkpoint.save_checkpoint(acc, r.out_dir, step + 1, r.state, cfg.keep_checkpoints)
    bar.close()
    return finish(r, diverged)


def finish(r, diverged: str | None) -> dict:
    """final/ (only for a finished run with a finite model), summary.json, report/, the printed
    summary; guard.Diverged when the run diverged (after the summary was written)."""
    acc, cfg = r.acc, r.cfg
    last = r.history[-1] if r.history else {}
    ev = last if EVAL_KEYS[0] in last else evaluate(r.model, r.eval_set, r.tok.pad_token_id,
                                                    acc.device)
    if not diverged and r.stop == r.total and not _finite_model(r, ev):
        diverged = "the trained model is not finite (" + ", ".join(
            f"{k} {ev[k]}" for k in EVAL_KEYS) + ")"
    final = None
    if r.stop == r.total and not diverged:
        final = checkpoint.save_final(acc, r.model, r.tok, r.out_dir)
    summary = build_summary(r, ev, final)
    if diverged:
        summary.update(stopped_early=True, diverged=diverged, steps=last.get("step", r.start))
    acc.end_training()
    write_summary(r, summary)
    if diverged:
        ck = checkpoint.latest_checkpoint(r.out_dir)
        raise Diverged(f"training diverged at step {last.get('step')}: {diverged} "
                       f"(--max-nonfinite-steps {cfg.max_nonfinite_steps}; "
                       f"{r.state['nonfinite_steps']} non-finite steps in all). No final model "
                       f"was saved; " + resume_hint(r.out_dir, ck and _ck_step(ck)) + ".")
    return summary


def _finite_model(r, ev: dict) -> bool:
    """Finite parameters (every rank) and, when there is an eval set, a finite eval."""
    return params_finite(r.acc, r.model) and (
        not r.eval_set or all(math.isfinite(ev[k]) for k in EVAL_KEYS))


def _ck_step(ck) -> int:
    return int(ck.name.split("-")[1])
