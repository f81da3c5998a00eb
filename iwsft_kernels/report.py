"""A picture of a training run: ``python -m iwsft_kernels.report OUTPUT_DIR [--out DIR]``.

Reads the output folder of either trainer:

- ``iwsft-train``: ``metrics.jsonl`` (one line per optimizer step; the last step's line also
  holds the final ``eval_*``), ``summary.json`` (eval before / after);
- TRL's ``IWSFTTrainer`` (or a plain ``SFTTrainer``): ``trainer_state.json``'s ``log_history``,
  from OUTPUT_DIR or, when it is not there (TRL writes it with each checkpoint, and at the end
  only on ``trainer.save_state()``), from the newest ``checkpoint-N/``;

plus, from both, ``last_step_weights.json``: the per-sequence importance weights of the last
optimizer step (written by the trainers; see :func:`write_last_step_weights`).

It writes into ``OUTPUT_DIR/report/`` (or ``--out``): ``report.md`` (the numbers: first / last /
min / max of every logged metric, eval before -> after, the last step's weights) and PNG plots:
``overview.png`` (all panels), ``loss.png`` (weighted loss, unweighted NLL, eval loss),
``entropy_accuracy.png`` (entropy and token accuracy, train and eval), ``weights.png`` (weight
mean / min / max), ``ess_clip.png`` (ESS fraction, clip fractions), ``weights_hist.png``
(histogram of the last step's sequence weights).

The plots need matplotlib (in the ``train`` extra; alone: ``pip install matplotlib``). Without
it the Markdown summary is still written, and it and the command say how to install it.

This module imports nothing else from the package (the trainers call it at their end).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

WEIGHTS_FILE = "last_step_weights.json"
WEIGHTS_FORMAT = "iwsft-last-step-weights-1"
REPORT_DIR = "report"
MATPLOTLIB_HINT = ('pip install matplotlib  (or the trainer extra: pip install '
                   '"iwsft-kernels[train]")')

# the train metrics the report knows, in a common naming for both trainers
TRAIN_KEYS = ("loss", "nll", "entropy", "mean_token_accuracy", "weight_mean", "weight_min",
              "weight_max", "ess_fraction", "clip_frac_max", "clip_frac_min", "log_ratio_mean",
              "grad_norm", "lr")
EVAL_KEYS = ("loss", "entropy", "mean_token_accuracy")
LABELS = {
    "loss": "loss (weighted, optimised)",
    "nll": "NLL (unweighted, -mean log p)",
    "entropy": "entropy (nats, mean over target tokens)",
    "mean_token_accuracy": "token accuracy (label = arg-max)",
    "weight_mean": "weight mean", "weight_min": "weight min", "weight_max": "weight max",
    "ess_fraction": "ESS fraction ((sum w)^2 / sum w^2 / n)",
    "clip_frac_max": "clipped at w_max (fraction)", "clip_frac_min": "clipped at w_min (fraction)",
    "log_ratio_mean": "log-ratio mean (log p - log q_ref)",
    "grad_norm": "grad norm", "lr": "learning rate",
}
# TRL's log_history names -> ours
_TRL_KEYS = {"loss": "loss", "iw/nll": "nll", "entropy": "entropy",
             "mean_token_accuracy": "mean_token_accuracy", "iw/weight_mean": "weight_mean",
             "iw/weight_min": "weight_min", "iw/weight_max": "weight_max",
             "iw/ess_fraction": "ess_fraction", "iw/clip_frac_max": "clip_frac_max",
             "iw/clip_frac_min": "clip_frac_min", "iw/log_ratio_mean": "log_ratio_mean",
             "grad_norm": "grad_norm", "learning_rate": "lr"}


class ReportError(ValueError):
    """The folder holds no run the report can read (says what it looked for)."""


@dataclass
class Run:
    path: Path
    trainer: str  # "iwsft-train" | "trl"
    train: list[dict]  # {"step": int, <TRAIN_KEYS present>}
    eval: list[dict]  # {"step": int, <EVAL_KEYS present>}, in step order
    sources: list[str]  # the files read
    mode: str | None = None
    total_steps: int | None = None
    weights: dict | None = None  # last_step_weights.json
    notes: list[str] = field(default_factory=list)
    eval_set: str | None = None  # what the eval set is (iwsft-train's summary.json)


# --------------------------------------------------------------------------------- numbers
def fmt(x) -> str:
    """How the report writes a number (4 significant digits; tests use the same)."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    x = float(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.4g}"


def _num(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the rows that have a number for `key` (NaN kept)."""
    xs, ys = [], []
    for r in rows:
        v = _num(r.get(key))
        if v is not None:
            xs.append(r["step"])
            ys.append(v)
    return xs, ys


def weight_summary(w: list[float]) -> dict:
    n = len(w)
    if n == 0:
        return {"n": 0}
    s = sorted(w)
    s1 = sum(w)
    s2 = sum(x * x for x in w)
    mid = n // 2
    median = s[mid] if n % 2 else 0.5 * (s[mid - 1] + s[mid])
    return {"n": n, "mean": s1 / n, "min": s[0], "median": median, "max": s[-1],
            "ess_fraction": (s1 * s1 / s2 / n) if s2 > 0 else 0.0}


# ------------------------------------------------------------------------- the trainers' file
def write_last_step_weights(out_dir: str | Path, *, trainer: str, step: int, mode: str,
                            weights, w_min: float | None = None, w_max: float | None = None,
                            unit: str = "sequence") -> Path:
    """Write OUTPUT_DIR/last_step_weights.json (atomically): the importance weight of each
    sequence of one optimizer step (all micro-batches and ranks). In token mode a sequence's
    value is the mean of its tokens' weights; in sft mode 1 (times the quality, if any)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"format": WEIGHTS_FORMAT, "trainer": trainer, "step": int(step), "mode": mode,
           "unit": unit, "w_min": w_min, "w_max": w_max,
           "weights": [float(x) for x in weights]}
    path = out / WEIGHTS_FILE
    tmp = out / f".{WEIGHTS_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)
    return path


def _read_weights(path: Path) -> dict | None:
    p = path / WEIGHTS_FILE
    if not p.is_file():
        return None
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("weights"), list):
        return None
    return doc


# ---------------------------------------------------------------------------------- loading
def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a kill
    return rows


def _load_iwsft_train(path: Path) -> Run:
    sources = [str(path / "metrics.jsonl")]
    raw = [r for r in _read_jsonl(path / "metrics.jsonl") if isinstance(r.get("step"), int)]
    train, evals = [], []
    for r in raw:
        row = {"step": r["step"]}
        for k in TRAIN_KEYS:
            if k in r:
                row[k] = r[k]
        if "nll" not in r and _num(r.get("logp_mean")) is not None:
            row["nll"] = -r["logp_mean"]
        train.append(row)
        ev = {k: r[f"eval_{k}"] for k in EVAL_KEYS if f"eval_{k}" in r}
        if ev:
            evals.append({"step": r["step"], **ev})
    summary = None
    if (path / "summary.json").is_file():
        sources.append(str(path / "summary.json"))
        try:
            summary = json.loads((path / "summary.json").read_text())
        except ValueError:
            summary = None
    run = Run(path, "iwsft-train", train, evals, sources)
    if summary:
        run.mode = summary.get("mode")
        run.total_steps = summary.get("total_steps")
        run.eval_set = summary.get("eval_set")
        before = {k: summary[f"eval_{k}_before"] for k in EVAL_KEYS
                  if f"eval_{k}_before" in summary}
        if before:
            run.eval.insert(0, {"step": int(summary.get("eval_before_step", 0)), **before})
        after = {k: summary[f"eval_{k}_after"] for k in EVAL_KEYS if f"eval_{k}_after" in summary}
        last = summary.get("steps")
        if after and isinstance(last, int) and not any(e["step"] == last for e in run.eval[1:]):
            run.eval.append({"step": last, **after})
    else:
        run.notes.append("no summary.json (the run has not finished): eval before/after not "
                         "available")
    cfg = path / "run_config.json"
    if run.mode is None and cfg.is_file():
        try:
            run.mode = json.loads(cfg.read_text()).get("mode")
        except ValueError:
            pass
    return run


def _checkpoint_step(p: Path) -> int:
    m = re.fullmatch(r"checkpoint-(\d+)", p.name)
    return int(m.group(1)) if m else -1


def _find_trainer_state(path: Path) -> Path | None:
    """trainer_state.json in `path`, or in its newest checkpoint-N; the one with more steps."""
    cands = []
    if (path / "trainer_state.json").is_file():
        cands.append(path / "trainer_state.json")
    cks = sorted((p for p in path.glob("checkpoint-*") if p.is_dir()
                  and (p / "trainer_state.json").is_file()), key=_checkpoint_step)
    if cks:
        cands.append(cks[-1] / "trainer_state.json")
    best, best_step = None, -1
    for c in cands:
        try:
            st = json.loads(c.read_text())
        except ValueError:
            continue
        step = int(st.get("global_step") or 0)
        if step > best_step:
            best, best_step = c, step
    return best


def _load_trl(path: Path, state_file: Path) -> Run:
    st = json.loads(state_file.read_text())
    train, evals = [], []
    for e in st.get("log_history", []):
        if not isinstance(e, dict) or not isinstance(e.get("step"), int):
            continue
        if "eval_loss" in e:
            evals.append({"step": e["step"], **{k: e[f"eval_{k}"] for k in EVAL_KEYS
                                                if f"eval_{k}" in e}})
        elif "loss" in e:
            train.append({"step": e["step"], **{ours: e[k] for k, ours in _TRL_KEYS.items()
                                                if k in e}})
    run = Run(path, "trl", train, evals, [str(state_file)])
    run.total_steps = st.get("max_steps")
    return run


def load_run(path: str | Path) -> Run:
    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"{path} is not a folder")
    if (path / "metrics.jsonl").is_file():
        run = _load_iwsft_train(path)
    else:
        state = _find_trainer_state(path)
        if state is None:
            raise ReportError(
                f"{path} holds no run the report can read: expected metrics.jsonl (iwsft-train) "
                f"or trainer_state.json (TRL; in the folder or in a checkpoint-N/ inside it; "
                f"TRL writes it with each checkpoint, or call trainer.save_state() at the end)")
        run = _load_trl(path, state)
    if not run.train:
        raise ReportError(f"{path}: {', '.join(run.sources)} holds no training step yet")
    run.weights = _read_weights(path)
    if run.weights is not None:
        run.sources.append(str(path / WEIGHTS_FILE))
        run.mode = run.mode or run.weights.get("mode")
    return run


# ---------------------------------------------------------------------------------- plotting
def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _line(ax, xs, ys, style: str, **kw):
    """ax.plot with point markers when there are few points (a single step is still seen)."""
    if len(xs) <= 40 and not any(c in style for c in "o.s^v*x+"):
        kw.setdefault("marker", ".")
    return ax.plot(xs, ys, style, **kw)


def _panel_loss(ax, run: Run) -> bool:
    drawn = False
    for key, style in (("loss", "-"), ("nll", "--")):
        xs, ys = series(run.train, key)
        if xs:
            _line(ax, xs, ys, style, label=f"train {key}")
            drawn = True
    xs, ys = series(run.eval, "loss")
    if xs:
        _line(ax, xs, ys, "o:", label="eval NLL")
        drawn = True
    ax.set_title("loss and NLL")
    ax.set_ylabel("nats / target token")
    return drawn


def _panel_entropy(ax, run: Run) -> bool:
    drawn = False
    xs, ys = series(run.train, "entropy")
    if xs:
        _line(ax, xs, ys, "-", color="C0", label="train entropy")
        drawn = True
    xs, ys = series(run.eval, "entropy")
    if xs:
        _line(ax, xs, ys, "o:", color="C0", label="eval entropy")
        drawn = True
    ax.set_ylabel("entropy (nats)")
    ax.ticklabel_format(axis="y", useOffset=False)
    ax2 = ax.twinx()
    for rows, style, name in ((run.train, "-", "train"), (run.eval, "s:", "eval")):
        xs, ys = series(rows, "mean_token_accuracy")
        if xs:
            _line(ax2, xs, ys, style, color="C1", label=f"{name} token accuracy")
            drawn = True
    ax2.set_ylabel("token accuracy")
    ax2.set_ylim(-0.02, 1.02)
    ax.set_title("entropy and token accuracy")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    if h1 or h2:
        ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="best")
    return drawn


def _panel_weights(ax, run: Run) -> bool:
    xs, mean = series(run.train, "weight_mean")
    if not xs:
        ax.set_title("importance weights (not logged)")
        return False
    _line(ax, xs, mean, "-", color="C2", label="mean")
    for key, style in (("weight_min", ":"), ("weight_max", "--")):
        x, y = series(run.train, key)
        if x:
            _line(ax, x, y, style, color="C2", label=key.split("_")[1])
    clip = ""
    if run.weights and run.weights.get("w_max") is not None:
        clip = f" (clip [{fmt(run.weights.get('w_min'))}, {fmt(run.weights['w_max'])}])"
    ax.set_title("importance weights per step" + clip)
    ax.set_ylabel("w")
    return True


def _panel_ess(ax, run: Run) -> bool:
    drawn = False
    for key, style in (("ess_fraction", "-"), ("clip_frac_max", "--"), ("clip_frac_min", ":")):
        xs, ys = series(run.train, key)
        if xs:
            _line(ax, xs, ys, style, label=key)
            drawn = True
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("ESS fraction and clip fractions")
    return drawn


def _panel_hist(ax, run: Run) -> bool:
    w = (run.weights or {}).get("weights") or []
    if not w:
        ax.set_title("last step's sequence weights (not recorded)")
        return False
    finite = [x for x in w if math.isfinite(x)]
    ax.hist(finite, bins=min(50, max(5, len(finite) // 2)), color="C2", alpha=0.8)
    s = weight_summary(finite)
    ax.axvline(s["mean"], color="k", lw=1, label=f"mean {fmt(s['mean'])}")
    unit = run.weights.get("unit", "sequence")
    ax.set_title(f"{unit} weights, step {run.weights.get('step')} (n={len(w)})")
    ax.set_xlabel("w")
    return True


def _panel_opt(ax, run: Run) -> bool:
    xs, ys = series(run.train, "grad_norm")
    drawn = bool(xs)
    if xs:
        _line(ax, xs, ys, "-", color="C3", label="grad norm")
    ax.set_ylabel("grad norm")
    xs, ys = series(run.train, "lr")
    if xs:
        ax2 = ax.twinx()
        _line(ax2, xs, ys, "--", color="C4", label="learning rate")
        ax2.set_ylabel("learning rate")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="best")
        drawn = True
    ax.set_title("grad norm and learning rate")
    return drawn


PANELS = (("loss.png", _panel_loss), ("entropy_accuracy.png", _panel_entropy),
          ("weights.png", _panel_weights), ("ess_clip.png", _panel_ess),
          ("weights_hist.png", _panel_hist), ("optimizer.png", _panel_opt))


def _finish(ax, step_axis: bool = True):
    if step_axis:
        ax.set_xlabel("optimizer step")
    if ax.get_legend() is None:
        h, _ = ax.get_legend_handles_labels()
        if h:
            ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)


def _save(fig, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)


def draw(run: Run, out: Path) -> list[Path]:
    """The PNG files (no pyplot: the caller's matplotlib backend is left alone)."""
    from matplotlib.figure import Figure

    files = []
    fig = Figure(figsize=(15, 8.5), layout="constrained")
    axes = fig.subplots(2, 3).reshape(-1)
    for ax, (_, panel) in zip(axes, PANELS):
        panel(ax, run)
        _finish(ax, panel is not _panel_hist)
    title = f"{run.path.name}: {run.trainer}" + (f", mode {run.mode}" if run.mode else "")
    fig.suptitle(title)
    _save(fig, out / "overview.png")
    files.append(out / "overview.png")
    for name, panel in PANELS:
        fig = Figure(figsize=(6.4, 4.2), layout="constrained")
        ax = fig.subplots()
        if panel(ax, run):
            _finish(ax, panel is not _panel_hist)
            _save(fig, out / name)
            files.append(out / name)
    return files


# ---------------------------------------------------------------------------------- markdown
def markdown(run: Run, pngs: list[Path], out: Path, plots_note: str | None) -> str:
    steps = run.train[-1]["step"]
    of = f" of {run.total_steps}" if run.total_steps else ""
    lines = [f"# Run report: `{run.path}`", "",
             f"- trainer: {run.trainer}" + (f", mode `{run.mode}`" if run.mode else ""),
             f"- optimizer steps logged: {len(run.train)} (last step {steps}{of})",
             "- read: " + ", ".join(f"`{s}`" for s in run.sources)]
    lines += [f"- note: {n}" for n in run.notes]
    lines += ["", "## Training metrics", "",
              "| metric | first | last | min | max |", "|---|---|---|---|---|"]
    for k in TRAIN_KEYS:
        _, ys = series(run.train, k)
        ys = [y for y in ys if math.isfinite(y)]
        if ys:
            lines.append(f"| {LABELS[k]} | {fmt(ys[0])} | {fmt(ys[-1])} | {fmt(min(ys))} | "
                         f"{fmt(max(ys))} |")
    if run.eval:
        lines += ["", "## Evaluation", "", "| step | " + " | ".join(EVAL_KEYS) + " |",
                  "|---" * (len(EVAL_KEYS) + 1) + "|"]
        if run.eval_set:
            lines[-2:-2] = [f"Eval set: {run.eval_set}.", ""]
        for e in run.eval:
            lines.append(f"| {e['step']} | " + " | ".join(fmt(e.get(k)) for k in EVAL_KEYS)
                         + " |")
        first, last = run.eval[0], run.eval[-1]
        if len(run.eval) > 1:
            ch = [f"{k} {fmt(first[k])} -> {fmt(last[k])}" for k in EVAL_KEYS
                  if _num(first.get(k)) is not None and _num(last.get(k)) is not None]
            if ch:
                lines += ["", f"Step {first['step']} -> {last['step']}: " + "; ".join(ch) + "."]
    lines += ["", "## Last step's importance weights", ""]
    if run.weights:
        w = run.weights
        s = weight_summary([x for x in w["weights"] if math.isfinite(x)])
        if s["n"]:
            clip = "".join(f", clip {k} {fmt(w[k])}" for k in ("w_min", "w_max")
                           if w.get(k) is not None)
            lines.append(f"Step {w.get('step')}, {s['n']} {w.get('unit', 'sequence')}s "
                         f"(mode `{w.get('mode')}`{clip}): mean {fmt(s['mean'])}, min "
                         f"{fmt(s['min'])}, median {fmt(s['median'])}, max {fmt(s['max'])}, "
                         f"ESS fraction {fmt(s['ess_fraction'])}.")
        else:
            lines.append(f"Step {w.get('step')}: no weights recorded.")
        if w.get("mode") == "token":
            lines.append("(Token mode: each sequence's value is the mean of its tokens' "
                         "weights.)")
    else:
        lines.append(f"Not recorded (no `{WEIGHTS_FILE}` in the folder).")
    lines += ["", "## Plots", ""]
    if plots_note:
        lines.append(plots_note)
    for p in pngs:
        rel = os.path.relpath(p, out)
        lines.append(f"![{p.stem}]({rel})")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Read the run in `run_dir`, write report.md and the PNGs into `out` (default
    RUN_DIR/report); the path of report.md. Without matplotlib only report.md is written, and
    it says how to install matplotlib."""
    run = load_run(run_dir)
    out = Path(out) if out is not None else run.path / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    pngs, note = [], None
    if _have_matplotlib():
        pngs = draw(run, out)
    else:
        note = (f"**No plots: matplotlib is not installed.** Install it with `{MATPLOTLIB_HINT}` "
                f"and rerun `python -m iwsft_kernels.report {run.path}`.")
    md = out / "report.md"
    md.write_text(markdown(run, pngs, out, note))
    return md


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m iwsft_kernels.report",
        description="Plots and a Markdown summary of an iwsft-train or TRL (IWSFTTrainer) run.")
    ap.add_argument("output_dir", help="the run's output folder")
    ap.add_argument("--out", default=None, help="where to write (default: OUTPUT_DIR/report)")
    a = ap.parse_args(argv)
    try:
        md = write_report(a.output_dir, a.out)
    except ReportError as e:
        print(f"iwsft_kernels.report: error: {e}", file=sys.stderr)
        return 2
    if not _have_matplotlib():
        print(f"iwsft_kernels.report: matplotlib is not installed, so no plots were drawn; "
              f"install it with: {MATPLOTLIB_HINT}", file=sys.stderr)
    print(f"report: {md}" + ("" if not _have_matplotlib() else
                             f" (plots: {md.parent / 'overview.png'} and others)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
