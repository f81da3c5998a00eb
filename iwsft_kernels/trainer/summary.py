"""The end of a run: summary.json, the report folder, and the summary printed at the end."""

from __future__ import annotations

import json
import time
from pathlib import Path

from .metrics import EVAL_KEYS
from .step import peak_mem_gib


def build_summary(r, ev: dict, final_dir: Path | None) -> dict:
    """summary.json of the run `r` (setup.Run); `ev` holds the eval after the last step."""
    h = r.history
    s = {"output_dir": str(r.out_dir), "mode": r.iw.mode, "steps": r.stop,
         "total_steps": r.total, "data": r.data.report(), "eval_examples": len(r.eval_set),
         "eval_set": r.eval_label, "eval_held_out": r.eval_label.startswith("held-out"),
         **{f"{k}_before": v for k, v in r.eval_before.items()}}
    if r.stop < r.total:
        s["stopped_early"] = True
    if final_dir is not None:
        s["final_dir"] = str(final_dir)
    s.update({f"{k}_after": ev[k] for k in EVAL_KEYS})
    if h:
        # the run's step 1, also after --resume (kept in trainer_state.json); else the first
        # step this invocation ran (train_first_step says which)
        first = r.state.get("first_step") or h[0]
        s["train_first_step"] = first["step"]
        s["train_loss_first"] = first["loss"]
        s["train_loss_last"] = h[-1]["loss"]
        s["train_nll_first"] = -first["logp_mean"]
        s["train_nll_last"] = -h[-1]["logp_mean"]
        for k in ("entropy", "mean_token_accuracy"):
            s[f"train_{k}_first"], s[f"train_{k}_last"] = first[k], h[-1][k]
        s["last_step"] = {k: h[-1][k] for k in (
            "weight_mean", "weight_min", "weight_max", "ess_fraction", "clip_frac_max",
            "clip_frac_min", "log_ratio_mean", "grad_norm", "lr")}
        s["tokens_per_s"] = sum(x["tokens"] for x in h) / sum(x["step_time_s"] for x in h)
    s["nonfinite_steps"] = r.state.get("nonfinite_steps", 0)  # skipped (guard.py)
    s["peak_mem_gib"] = peak_mem_gib(r.acc.device)
    s["distributed"] = r.dist_report
    if r.ref_report is not None:
        s["ref_model_memory"] = r.ref_report
    s["wall_s"] = time.perf_counter() - r.t_start
    return s


def write_summary(r, summary: dict) -> None:
    """summary.json, report/ (--report), and the summary printed (main process only)."""
    if not r.acc.is_main_process:
        return
    (r.out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    if r.cfg.report:
        write_report(r.out_dir, summary)
        (r.out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    r.say(format_summary(summary))


def write_report(out_dir: Path, summary: dict) -> None:
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


def _eval_words(s: dict) -> str:
    """'held-out N examples' or 'first N training examples' (summaries from before
    eval_held_out: the first training examples)."""
    n = s["eval_examples"]
    return f"held-out {n} examples" if s.get("eval_held_out") else \
        f"first {n} training examples"


def format_summary(s: dict) -> str:
    how = (f"diverged at step {s['steps']} of {s['total_steps']}" if s.get("diverged") else
           f"finished {s['steps']}/{s['total_steps']} steps")
    lines = [f"iw-SFT ({s['mode']}) {how} in "
             f"{s['wall_s']:.1f} s",
             f"  outputs:    {s['output_dir']}  (metrics.jsonl, checkpoints/, summary.json"
             + (f", final model: {s['final_dir']})" if "final_dir" in s else ")"),
             f"  data:       {s['data']}",
             f"  eval loss:  {s['eval_loss_before']:.4f} before -> {s['eval_loss_after']:.4f} "
             f"after (mean NLL, {_eval_words(s)})"]
    if "eval_entropy_before" in s:
        lines.append(f"  eval:       entropy {s['eval_entropy_before']:.4f} -> "
                     f"{s['eval_entropy_after']:.4f}, token accuracy "
                     f"{s['eval_mean_token_accuracy_before']:.2%} -> "
                     f"{s['eval_mean_token_accuracy_after']:.2%}")
    if "train_loss_first" in s:
        ls = s["last_step"]
        n1 = s.get("train_first_step", 1)
        first = "first step" if n1 == 1 else f"step {n1}"
        lines += [f"  train loss: {s['train_loss_first']:.4f} {first} -> "
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
    if s.get("nonfinite_steps"):
        lines.append(f"  non-finite: {s['nonfinite_steps']} steps with a NaN/inf loss or gradient "
                     f"norm, skipped (metrics.jsonl: nonfinite)")
    if s.get("diverged"):
        lines.append(f"  DIVERGED:   {s['diverged']}; no final model saved")
    lines.append(f"  peak mem:   {s['peak_mem_gib']:.2f} GiB")
    if s.get("report"):
        lines.append(f"  report:     {s['report']}  (plots: {Path(s['report']).parent})")
    elif s.get("report_note"):
        lines.append(f"  report:     {s['report_note']}")
    return "\n".join(lines)
