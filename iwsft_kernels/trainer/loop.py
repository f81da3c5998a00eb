"""The training run: data -> reference log-probs -> iw-SFT steps -> checkpoints -> final save.

The pieces: setup.py (accelerator, data, policy, optimizer, schedule, reference log-probs,
resume), step.py (one optimizer step and its record; the global target-token normaliser is
explained there), checkpoint.py (checkpoints, final/), summary.py (summary.json, report/, the
printed summary), loading.py (models and tokenizers).
"""

from __future__ import annotations

from . import checkpoint
from .loading import ModelLoadError, load_model, load_tokenizer  # noqa: F401 (public names)
from .metrics import EVAL_KEYS, evaluate
from .setup import setup
from .step import record_step, train_step
from .summary import build_summary, format_summary, write_summary  # noqa: F401


def train(cfg) -> dict:
    """Run `cfg` (a TrainConfig) to its end or --stop-after-steps; the summary."""
    from tqdm.auto import tqdm

    r = setup(cfg)
    acc, pad = r.acc, r.tok.pad_token_id
    save_every = cfg.checkpoint_every(r.total)  # default: ~8 checkpoints per run (resumable)
    r.model.train()
    bar = tqdm(total=r.total, initial=r.start, desc=f"iw-SFT ({r.iw.mode})",
               disable=not acc.is_local_main_process)
    for step in range(r.start, r.stop):
        m, seq_w = train_step(r, step)
        if step + 1 == r.stop:  # the model the run ends with: its eval goes on its step's line
            m.update(evaluate(r.model, r.eval_set, pad, acc.device))
        record_step(r, m, seq_w)
        bar.update(1)
        # loss is weighted (it can rise while the policy improves: the weights grow); the
        # unweighted NLL, -mean log p over the step's targets, is the one to watch for progress
        bar.set_postfix(loss=f"{m['loss']:.4f}", nll=f"{-m['logp_mean']:.4f}",
                        w=f"{m['weight_mean']:.3f}")
        if (save_every and (step + 1) % save_every == 0) or step + 1 == r.stop:
            r.state.update(next_step=step + 1, total_steps=r.total)
            checkpoint.save_checkpoint(acc, r.out_dir, step + 1, r.state, cfg.keep_checkpoints)
    bar.close()

    final = (checkpoint.save_final(acc, r.model, r.tok, r.out_dir) if r.stop == r.total
             else None)
    last = r.history[-1] if r.history else {}
    ev = last if EVAL_KEYS[0] in last else evaluate(r.model, r.eval_set, pad, acc.device)
    summary = build_summary(r, ev, final)
    acc.end_training()
    write_summary(r, summary)
    return summary
