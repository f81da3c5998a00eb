"""iw-SFT on curated data from a different, stronger policy (issue 15): the paper's LLM setting
(s1K-1.1 traces from DeepSeek-R1, q_ref = the starting student) at CPU scale.

    nice -n 10 python -m bench.repro.curated.teacher           # full: 3 seeds (see docs/repro.md)
    python -m bench.repro.curated.teacher --quick              # smoke: 1 seed, reduced
    python -m bench.repro.curated.teacher --compare A.json B.json   # rerun identical?

Per seed s (everything below is a function of s; nothing reads the clock or an unseeded RNG):
1. q_ref(s): the tiny Qwen2 of run.py (init seed s, data order seed s, corpus seed 12345 + s)
   trained with `iwsft-train --mode sft` on the broad, mixed-quality corpus (task.STYLE_MIX);
2. teacher(s): q_ref(s) trained further on better data (correct worked answers only,
   task.TEACHER_MIX), higher success than q_ref;
3. curated sets of the same size K, filtered by the same exact checker, on fresh problems:
   "teacher" (K accepted teacher samples), "mixed" (K/2 teacher + K/2 q_ref samples on
   disjoint problems), "self" (K accepted q_ref samples: the setting of run.py);
4. the student starts from q_ref(s) and trains through the project's trainer
   (`iwsft_kernels.trainer.loop.train`, the code behind `iwsft-train`) with each method of
   METHODS; reference log-probs = q_ref(s) (the trainer's default: the starting model), so for
   the teacher data the reference is NOT the policy that generated the data;
5. evaluation on the same held-out problems for every run (sampled T = 1 and greedy), success
   vs step from intermediate checkpoints, weight statistics over training from metrics.jsonl.

Outputs: bench/results/repro-curated-teacher.{json,md,png} (quick: repro-curated-teacher-quick),
work files under outputs/curated-teacher[-quick]/ (or --workdir).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

if __name__ == "__main__":  # the command line: pin torch's CPU kernels before torch starts
    from bench.repro import pin_cpu_kernels

    pin_cpu_kernels()

from bench.repro.curated import policy, task  # noqa: E402
from bench.repro.curated.run import (Method, compare, compare_files,  # noqa: E402, F401
                                     describe, environment, log, mean_sd, outcome, pinned_numerics,
                                     problem_pool, run_trainer, slug, write_jsonl)


@dataclass
class TScale:
    corpus: int = 16000          # q_ref training examples (mixed quality)
    ref_epochs: int = 2
    ref_hidden: int = 96
    ref_layers: int = 3
    ref_lr: float = 2e-3
    ref_batch: int = 32
    teacher_corpus: int = 4000   # the teacher's further training on correct worked answers
    teacher_epochs: int = 1
    teacher_lr: float = 1e-3
    prompts: int = 2400          # fresh problems answered by the teacher and by q_ref, per seed
    k: int = 512                 # curated examples per data regime
    heldout: int = 1000
    pool: int | None = None      # smoke tests only: all problems from a pool (held-out = pool)
    ft_lr: float = 3e-4
    ft_epochs: int = 5
    ft_batch: int = 16
    curve_points: int = 3        # checkpoints evaluated for success vs step
    seeds: tuple = (0, 1, 2)
    regimes: tuple = ("teacher", "mixed")  # "self": q_ref's own samples (run.py's setting)
    methods: tuple | None = None  # names from METHODS; None: all


METHODS = [
    Method("SFT", {"mode": "sft"}),
    Method("SFT(Q)", {"mode": "sft", "sampling": "quality"}),
    Method("iw-SFT (sequence)", {"mode": "sequence"}),
    Method("iw-SFT (token)", {"mode": "token"}),
    Method("iw-SFT(Q) (sequence)", {"mode": "sequence", "quality_weight": True}),
    Method("seq, temperature 5", {"mode": "sequence", "temperature": 5.0}),
    Method("seq, no length norm", {"mode": "sequence", "length_normalize": False}),
    Method("seq, self-normalised", {"mode": "sequence", "self_normalize": True}),
]

FULL = TScale()
QUICK = TScale(corpus=8000, teacher_corpus=2000, prompts=1200, k=256, heldout=300,
               ft_epochs=3, seeds=(0,), regimes=("teacher", "mixed"),
               methods=("SFT", "iw-SFT (sequence)", "iw-SFT (token)", "seq, no length norm"))
# CI smoke (tests/repro): a pool of problems the models memorise; seconds, not minutes
TINY = TScale(corpus=768, ref_epochs=4, ref_hidden=32, ref_layers=1, ref_lr=1e-2, ref_batch=16,
              teacher_corpus=256, teacher_epochs=4, teacher_lr=1e-2, prompts=64, k=32,
              heldout=64, pool=16, ft_epochs=1, ft_batch=8, curve_points=2, seeds=(0,),
              regimes=("teacher", "mixed"),
              methods=("SFT", "iw-SFT (sequence)", "iw-SFT (token)"))


def weights_sha(model_dir: str) -> str:
    return hashlib.sha256((Path(model_dir) / "model.safetensors").read_bytes()).hexdigest()[:16]


def fresh_problems(rng: random.Random, n: int, exclude: set[str], pool) -> list[str]:
    out, seen = [], set(exclude)
    while len(out) < n:
        if pool:
            out.append(rng.choice(pool))
            continue
        p = task.random_problem(rng)
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def problem_sets(sc: TScale) -> tuple[list[str] | None, list[str], set[str]]:
    """(pool, held-out problems, problems no training or curation may use); the same for
    every seed and run."""
    rng = random.Random(777)
    pool = problem_pool(rng, sc.pool) if sc.pool else None
    heldout = (list(pool) * math.ceil(sc.heldout / len(pool)))[:sc.heldout] if pool else \
        fresh_problems(rng, sc.heldout, set(), None)
    return pool, heldout, set() if pool else set(heldout)


# ------------------------------------------------------------------------------- models
def train_sft(init_dir: str, tok_dir: str, rows: list[dict], path: Path, *, lr: float,
              epochs: int, batch: int, seed: int) -> dict:
    write_jsonl(path.with_suffix(".jsonl"), rows)
    t0 = time.perf_counter()
    s = run_trainer(model=init_dir, tokenizer=tok_dir, data=str(path.with_suffix(".jsonl")),
                    mode="sft", lr=lr, epochs=epochs, micro_batch_size=batch, grad_accum=1,
                    seed=seed, output_dir=str(path))
    return {"model": s["final_dir"], "train_s": time.perf_counter() - t0, "steps": s["steps"]}


def build_models(work: Path, sc: TScale, seed: int, exclude: set[str], pool) -> dict:
    tok_dir = policy.save_tokenizer(work / "tokenizer")
    init = policy.make_model_dir(work / "qref-init", hidden=sc.ref_hidden, layers=sc.ref_layers,
                                 heads=4 if sc.ref_hidden >= 64 else 2, seed=seed)
    rows = task.corpus(sc.corpus, random.Random(12345 + seed), exclude=exclude, pool=pool)
    qref = train_sft(str(init), str(tok_dir), rows, work / "qref", lr=sc.ref_lr,
                     epochs=sc.ref_epochs, batch=sc.ref_batch, seed=seed)
    trows = task.corpus(sc.teacher_corpus, random.Random(54321 + seed), exclude=exclude,
                        pool=pool, mix=task.TEACHER_MIX)
    teacher = train_sft(qref["model"], str(tok_dir), trows, work / "teacher", lr=sc.teacher_lr,
                        epochs=sc.teacher_epochs, batch=sc.ref_batch, seed=seed)
    return {"tokenizer": str(tok_dir), "qref": qref, "teacher": teacher,
            "qref_sha": weights_sha(qref["model"]), "teacher_sha": weights_sha(teacher["model"])}


# ------------------------------------------------------------------------------ curation
def answer(model_dir: str, probs: list[str], seed: int, source: str) -> list[dict]:
    model, tok = policy.load(Path(model_dir))
    resp = policy.sample(model, tok, probs, seed=seed)
    return [{"prompt": p, "response": r, "ok": task.check(p, r), "source": source}
            for p, r in zip(probs, resp)]


def curate_sets(models: dict, work: Path, sc: TScale, seed: int, exclude: set[str],
                pool) -> dict:
    probs = fresh_problems(random.Random(1000 + seed), sc.prompts, exclude, pool)
    by = {"teacher": answer(models["teacher"]["model"], probs, 10_000 + seed, "teacher"),
          "q_ref": answer(models["qref"]["model"], probs, 20_000 + seed, "q_ref")}

    def kept(rows, n):
        out = [{"prompt": r["prompt"], "response": r["response"], "source": r["source"],
                "quality": task.quality(r["prompt"], r["response"])} for r in rows if r["ok"]]
        return out[:n]

    half = len(probs) // 2
    sets = {"teacher": kept(by["teacher"], sc.k), "self": kept(by["q_ref"], sc.k),
            "mixed": kept(by["teacher"][:half], sc.k // 2)
            + kept(by["q_ref"][half:], sc.k - sc.k // 2)}
    out = {"acceptance": {s: sum(r["ok"] for r in rows) / len(rows) for s, rows in by.items()}}
    for regime in sc.regimes:
        rows = sets[regime]
        if len(rows) < sc.k:
            log(f"seed {seed}: {regime}: only {len(rows)} accepted samples (< K = {sc.k})")
        if len(rows) < sc.ft_batch:
            raise RuntimeError(f"seed {seed}: {regime}: only {len(rows)} accepted samples, "
                               f"fewer than one batch ({sc.ft_batch})")
        path = work / regime / "curated.jsonl"
        write_jsonl(path, rows)
        q = [r["quality"] for r in rows]
        out[regime] = {"path": str(path), "n": len(rows),
                       "teacher_frac": sum(r["source"] == "teacher" for r in rows) / len(rows),
                       "quality_mean": statistics.fmean(q),
                       "no_work_frac": sum(task.style_of(r["response"]) == "shortcut"
                                           for r in rows) / len(rows),
                       "response_chars_mean": statistics.fmean(len(r["response"])
                                                               for r in rows),
                       "all_pass_checker": all(task.check(r["prompt"], r["response"])
                                               for r in rows)}
    return out


# ------------------------------------------------------------------------ fine-tuning
SERIES = ("weight_mean", "weight_max", "ess_fraction", "clip_frac_max", "clip_frac_min",
          "log_ratio_mean")


def short(x):
    """Per-step series are stored to 6 significant digits (the result file stays small)."""
    return float(f"{x:.6g}") if isinstance(x, float) else x


def finite(xs):
    return [x for x in xs if x is not None and x == x and math.isfinite(x)]


def weight_summary(rows: list[dict]) -> dict:
    """Weight distribution over training (every optimizer step) and at the last step."""
    col = {k: finite([r.get(k) for r in rows]) for k in SERIES}
    f = lambda xs, fn: fn(xs) if xs else None  # noqa: E731
    return {"steps": len(rows),
            "w_mean_avg": f(col["weight_mean"], statistics.fmean),
            "w_max_max": f(col["weight_max"], max),
            "ess_avg": f(col["ess_fraction"], statistics.fmean),
            "ess_min": f(col["ess_fraction"], min),
            "clip_hi_avg": f(col["clip_frac_max"], statistics.fmean),
            "clip_lo_avg": f(col["clip_frac_min"], statistics.fmean),
            "log_ratio_avg": f(col["log_ratio_mean"], statistics.fmean),
            "log_ratio_last": col["log_ratio_mean"][-1] if col["log_ratio_mean"] else None,
            "w_max_last": rows[-1].get("weight_max"), "ess_last": rows[-1].get("ess_fraction"),
            "train_nll_last": -rows[-1]["logp_mean"]}


def sampled_success(model, tok, problems, seed) -> float:
    resp = policy.sample(model, tok, problems, seed=seed * 1000)  # = evaluate()'s sample
    return sum(task.check(p, r) for p, r in zip(problems, resp)) / len(problems)


def checkpoint_curve(out: Path, base_dir: str, problems, seed) -> list[tuple[int, float]]:
    """Sampled success of each intermediate checkpoint (the weights saved by save_state)."""
    from safetensors.torch import load_file

    curve = []
    for ck in sorted((out / "checkpoints").glob("step-*")):
        model, tok = policy.load(Path(base_dir))
        missing, unexpected = model.load_state_dict(load_file(ck / "model.safetensors"),
                                                    strict=False)
        if unexpected or any(k != "lm_head.weight" for k in missing):
            raise RuntimeError(f"{ck}: checkpoint does not match the model: missing {missing}, "
                               f"unexpected {unexpected}")
        model.tie_weights()
        curve.append((int(ck.name.split("-")[1]), sampled_success(model, tok, problems, seed)))
    return curve


def finetune(m: Method, models: dict, cur: dict, work: Path, sc: TScale, seed: int,
             heldout: list[str]) -> dict:
    from iwsft_kernels.trainer.sampler import StepSampler

    out = work / slug(m.name)
    total = sc.ft_epochs * StepSampler(cur["n"], sc.ft_batch).steps_per_epoch
    t0 = time.perf_counter()
    s = run_trainer(model=models["qref"]["model"], tokenizer=models["tokenizer"],
                    data=cur["path"], lr=sc.ft_lr, epochs=sc.ft_epochs,
                    micro_batch_size=sc.ft_batch, grad_accum=1, seed=seed, output_dir=str(out),
                    ref_cache=str(work / "ref_logprobs"),
                    save_every=max(1, total // sc.curve_points), keep_checkpoints=0, **m.args)
    train_s = time.perf_counter() - t0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    model, tok = policy.load(Path(s["final_dir"]))
    ev = policy.evaluate(model, tok, heldout, seed=seed)
    curve = [c for c in checkpoint_curve(out, models["qref"]["model"], heldout, seed)
             if c[0] < s["steps"]] + [(s["steps"], ev["success"])]
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # ~1 MB each; the curve is kept
    ws = weight_summary(rows) if m.args["mode"] != "sft" else {  # SFT: no weights
        "steps": len(rows), "train_nll_last": -rows[-1]["logp_mean"]}
    return {**ev, **ws, "mode": m.args["mode"], "train_s": train_s, "curve": curve,
            "series": {k: [short(r.get(k)) for r in rows] for k in SERIES}}


# ---------------------------------------------------------------------------- reporting
ROW_KEYS = ("success", "greedy_success", "shortcut_frac", "log_ratio_avg", "log_ratio_last",
            "w_mean_avg", "w_max_max", "ess_avg", "ess_min", "clip_hi_avg", "clip_lo_avg")


def summarize(res: dict) -> dict:
    """{regime: {method: {key: [mean, sd], 'delta_vs_sft': [mean, sd], 'n': seeds}}}; the
    difference to SFT is paired by seed (same q_ref, teacher, curated set and eval sample)."""
    out = {}
    for regime in res["scale"]["regimes"]:
        runs = {}
        for seed, per in res["runs"].items():
            for name, r in per.get(regime, {}).items():
                runs.setdefault(name, {})[seed] = r
        reg = {}
        for name, by_seed in runs.items():
            d = {"n": len(by_seed)}
            for k in ROW_KEYS:
                vals = finite([r.get(k) for r in by_seed.values()])
                if vals:
                    d[k] = list(mean_sd(vals))
            if "SFT" in runs:
                diffs = [r["success"] - runs["SFT"][s]["success"] for s, r in by_seed.items()
                         if s in runs["SFT"]]
                d["delta_vs_sft"] = list(mean_sd(diffs))
                gd = [r["greedy_success"] - runs["SFT"][s]["greedy_success"]
                      for s, r in by_seed.items() if s in runs["SFT"]]
                d["greedy_delta_vs_sft"] = list(mean_sd(gd))
            reg[name] = d
        out[regime] = reg
    return out


def pct(ms, signed=False) -> str:
    if not ms or ms[0] != ms[0]:
        return "-"
    return f"{100 * ms[0]:{'+' if signed else ''}.1f} ± {100 * ms[1]:.1f}"


def num(ms, nd=2) -> str:
    if not ms or ms[0] != ms[0]:
        return "-"
    return f"{ms[0]:.{nd}f} ± {ms[1]:.{nd}f}"


def v(x, nd=2, scale=1.0) -> str:
    return "-" if x is None or x != x else f"{scale * x:.{nd}f}"


def write_markdown(res: dict, path: Path) -> None:
    sc, env = res["scale"], res["environment"]
    seeds = list(res["runs"])
    L = [f"# Curated data from a stronger teacher (CPU scale){' — QUICK' if res['quick'] else ''}",
         "",
         f"Generated by `python -m bench.repro.curated.teacher{' --quick' if res['quick'] else ''}`"
         + (f" in {res['merged_from']} parallel parts (one process per seed and regime, merged "
            f"with --merge; longest part {res['wall_s_max'] / 60:.0f} min, sum of parts "
            f"{res['wall_s'] / 60:.0f} min, on a shared machine)" if res.get("merged_from")
            else f" in {res['wall_s'] / 60:.1f} min") + f" on {describe(env)}. "
         f"Seeds {', '.join(map(str, seeds))}; each seed trains its own q_ref and teacher. Held-out problems: "
         f"{sc['heldout']} (the same for every run), one sampled answer each (T = 1) and the "
         f"greedy answer. Curated sets: K = {sc['k']} checker-accepted answers per regime. "
         f"Fine-tuning: {sc['ft_epochs']} epochs, batch {sc['ft_batch']}, lr {sc['ft_lr']}. "
         f"Mean ± sd over seeds (n = {len(seeds)}); Δ vs SFT is paired by seed.", "",
         "## Policies and curated sets", "",
         "| seed | q_ref sampled / greedy | teacher sampled / greedy | teacher acceptance | "
         "q_ref acceptance | q_ref sha | teacher sha |", "|---|---|---|---|---|---|---|"]
    for s in seeds:
        b = res["base"][s]
        L.append(f"| {s} | {100 * b['q_ref']['success']:.1f} / "
                 f"{100 * b['q_ref']['greedy_success']:.1f} | "
                 f"{100 * b['teacher']['success']:.1f} / "
                 f"{100 * b['teacher']['greedy_success']:.1f} | "
                 f"{100 * b['curation']['acceptance']['teacher']:.1f}% | "
                 f"{100 * b['curation']['acceptance']['q_ref']:.1f}% | {b['qref_sha']} | "
                 f"{b['teacher_sha']} |")
    L += ["", "| regime | n (per seed) | teacher samples | mean quality | no-work answers | "
              "mean answer length (chars) |", "|---|---|---|---|---|---|"]
    for regime in sc["regimes"]:
        cs = [res["base"][s]["curation"][regime] for s in seeds]
        L.append(f"| {regime} | {', '.join(str(c['n']) for c in cs)} | "
                 f"{100 * statistics.fmean(c['teacher_frac'] for c in cs):.0f}% | "
                 f"{statistics.fmean(c['quality_mean'] for c in cs):.2f} | "
                 f"{100 * statistics.fmean(c['no_work_frac'] for c in cs):.1f}% | "
                 f"{statistics.fmean(c['response_chars_mean'] for c in cs):.1f} |")
    for regime, reg in res["summary"].items():
        L += ["", f"## Regime: {regime}", "",
              "| method | sampled success | Δ vs SFT (paired) | greedy success | greedy Δ vs SFT "
              "| no-work | mean log-ratio (over training / last step) | weight mean / max (over "
              "training) | ESS fraction (mean / min) | clipped high / low (mean) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for name, d in reg.items():
            lr = (f"{num(d.get('log_ratio_avg'), 3)} / {num(d.get('log_ratio_last'), 3)}"
                  if d.get("log_ratio_avg") else "-")
            wt = (f"{d['w_mean_avg'][0]:.2f} / {d['w_max_max'][0]:.2f}"
                  if d.get("w_mean_avg") and d.get("log_ratio_avg") else "-")
            ess = (f"{d['ess_avg'][0]:.3f} / {d['ess_min'][0]:.3f}"
                   if d.get("ess_avg") and d.get("log_ratio_avg") else "-")
            clip = (f"{100 * d['clip_hi_avg'][0]:.1f}% / {100 * d['clip_lo_avg'][0]:.1f}%"
                    if d.get("clip_hi_avg") and d.get("log_ratio_avg") else "-")
            L.append(f"| {name} | {pct(d.get('success'))} | "
                     f"{pct(d.get('delta_vs_sft'), True) if name != 'SFT' else '-'} | "
                     f"{pct(d.get('greedy_success'))} | "
                     f"{pct(d.get('greedy_delta_vs_sft'), True) if name != 'SFT' else '-'} | "
                     f"{pct(d.get('shortcut_frac'))} | {lr} | {wt} | {ess} | {clip} |")
    L += ["", "## Every run", "",
          "| seed | regime | method | sampled | greedy | no-work | log-ratio avg / last | "
          "weight mean avg / max | ESS avg / min / last | clip hi / lo avg | success vs step |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in seeds:
        for regime, per in res["runs"][s].items():
            for name, r in per.items():
                iw = r.get("log_ratio_avg") is not None
                L.append(
                    f"| {s} | {regime} | {name} | {100 * r['success']:.1f} | "
                    f"{100 * r['greedy_success']:.1f} | {100 * r['shortcut_frac']:.1f} | "
                    + (f"{v(r['log_ratio_avg'], 3)} / {v(r['log_ratio_last'], 3)} | "
                       f"{v(r['w_mean_avg'])} / {v(r['w_max_max'])} | {v(r['ess_avg'], 3)} / "
                       f"{v(r['ess_min'], 3)} / {v(r['ess_last'], 3)} | "
                       f"{v(r['clip_hi_avg'], 1, 100)}% / {v(r['clip_lo_avg'], 1, 100)}% | "
                       if iw else "- | - | - | - | ")
                    + " ".join(f"{st}:{100 * x:.1f}" for st, x in r["curve"]) + " |")
    path.write_text("\n".join(L) + "\n")


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = list(res["scale"]["regimes"])
    seeds = list(res["runs"])
    names = [m.name for m in METHODS if any(m.name in res["runs"][s].get(r, {})
                                            for s in seeds for r in regimes)]
    fig, axes = plt.subplots(2, len(regimes), figsize=(5.2 * len(regimes), 8.5), squeeze=False)
    for j, regime in enumerate(regimes):
        ax, ax2 = axes[0][j], axes[1][j]
        q0 = statistics.fmean(res["base"][s]["q_ref"]["success"] for s in seeds)
        for i, name in enumerate(names):
            runs = [res["runs"][s][regime][name] for s in seeds
                    if name in res["runs"][s].get(regime, {})]
            if not runs:
                continue
            steps = [st for st, _ in runs[0]["curve"]]
            ys = [[0.0] + [100 * y for _, y in r["curve"]] for r in runs]
            x = [0] + steps
            mean = [statistics.fmean(c) for c in zip(*ys)]
            sd = [statistics.stdev(c) if len(c) > 1 else 0.0 for c in zip(*ys)]
            mean[0], sd[0] = 100 * q0, 0.0  # step 0 = q_ref (the start of every run)
            style = "-" if i < 5 else "--"
            ax.plot(x, mean, style, marker="o", ms=3, color=f"C{i}", label=name)
            ax.fill_between(x, [a - b for a, b in zip(mean, sd)],
                            [a + b for a, b in zip(mean, sd)], color=f"C{i}", alpha=0.12)
            lr = [finite(r["series"]["log_ratio_mean"]) for r in runs]
            if all(lr) and runs[0].get("mode") != "sft":  # SFT has no weights
                n = min(len(z) for z in lr)
                ax2.plot(range(1, n + 1), [statistics.fmean(z[t] for z in lr) for t in range(n)],
                         style, color=f"C{i}", label=name, lw=1)
        t_mean = statistics.fmean(res["base"][s]["teacher"]["success"] for s in seeds)
        ax.axhline(100 * t_mean, color="k", ls=":", lw=1, label="teacher")
        ax.axhline(100 * q0, color="0.5", ls=":", lw=1, label="q_ref")
        ax.set_title(f"curated from: {regime}")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("held-out success, sampled T=1 (%)")
        ax2.set_xlabel("optimizer step")
        ax2.set_ylabel("mean log-ratio log p_θ - log q_ref (trainer's log_ratio_mean)")
        ax2.axhline(0, color="0.5", lw=0.5)
        if j == len(regimes) - 1:
            ax.legend(fontsize=7, loc="lower right")
            if ax2.get_legend_handles_labels()[0]:
                ax2.legend(fontsize=7)
    fig.suptitle(f"Student = q_ref; mean over seeds {', '.join(map(str, seeds))} "
                 "(band: ± sd, includes the spread of q_ref itself)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------- main
def run(sc: TScale, work: Path, results: Path, stem: str, quick: bool,
        native: bool = False, reuse_models: bool = False) -> dict:
    """reuse_models: take q_ref and the teacher of an earlier run of the same seeds and
    scale from `work` (the numbers are the same: training them is deterministic)."""
    with pinned_numerics(native):
        return _run(sc, work, results, stem, quick, reuse_models)


def _run(sc: TScale, work: Path, results: Path, stem: str, quick: bool,
         reuse_models: bool) -> dict:
    t_start = time.perf_counter()
    pool, heldout, exclude = problem_sets(sc)
    methods = [m for m in METHODS if sc.methods is None or m.name in sc.methods]
    res = {"quick": quick, "scale": {k: (list(x) if isinstance(x, tuple) else x)
                                      for k, x in sc.__dict__.items()},
           "environment": environment(), "methods": {m.name: m.args for m in methods},
           "base": {}, "runs": {}}
    for seed in sc.seeds:
        sw = work / f"seed{seed}"
        if reuse_models and (sw / "models.json").exists():
            models = json.loads((sw / "models.json").read_text())
            log(f"seed {seed}: reusing q_ref {models['qref_sha']} and teacher "
                f"{models['teacher_sha']} from {sw}")
            for regime in sc.regimes:  # no stale checkpoint or reference cache
                shutil.rmtree(sw / regime, ignore_errors=True)
        else:
            shutil.rmtree(sw, ignore_errors=True)  # no stale model, checkpoint or ref cache
            log(f"seed {seed}: training q_ref and the teacher")
            models = build_models(sw, sc, seed, exclude, pool)
            (sw / "models.json").write_text(json.dumps(models, indent=1))
        base = {"q_ref": policy.evaluate(*policy.load(Path(models["qref"]["model"])), heldout,
                                         seed=seed),
                "teacher": policy.evaluate(*policy.load(Path(models["teacher"]["model"])),
                                           heldout, seed=seed),
                **{k: models[k] for k in ("qref_sha", "teacher_sha")},
                "train_s": {"q_ref": models["qref"]["train_s"],
                            "teacher": models["teacher"]["train_s"]}}
        log(f"seed {seed}: q_ref success {base['q_ref']['success']:.3f} (greedy "
            f"{base['q_ref']['greedy_success']:.3f}), teacher {base['teacher']['success']:.3f} "
            f"(greedy {base['teacher']['greedy_success']:.3f})")
        base["curation"] = curate_sets(models, sw, sc, seed, exclude, pool)
        res["base"][seed], res["runs"][seed] = base, {}
        for regime in sc.regimes:
            cur = base["curation"][regime]
            per = res["runs"][seed].setdefault(regime, {})
            for m in methods:
                r = finetune(m, models, cur, sw / regime, sc, seed, heldout)
                per[m.name] = r
                log(f"seed {seed}: {regime}: {m.name}: success {r['success']:.3f} greedy "
                    f"{r['greedy_success']:.3f} log-ratio {v(r.get('log_ratio_last'), 3)} "
                    f"({r['train_s']:.0f} s train)")
            res["wall_s"] = time.perf_counter() - t_start
            report(res, results, stem)  # after every regime: a partial result survives
    log(f"done in {res['wall_s'] / 60:.1f} min: {results / stem}.{{json,md,png}}")
    return res


def report(res: dict, results: Path, stem: str) -> None:
    res["summary"] = summarize(res)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{stem}.json").write_text(json.dumps(res, default=str))
    write_markdown(res, results / f"{stem}.md")
    plot(res, results / f"{stem}.png")


def merge(parts: list[dict]) -> dict:
    """One result from results of the same configuration run for different seeds or regimes
    (e.g. one process per seed); wall_s is the sum over the parts (CPU-time-like) and
    wall_s_max the longest part (the wall time when they ran in parallel)."""
    first = parts[0]
    drop = ("seeds", "regimes", "methods")
    key = lambda r: ({k: x for k, x in r["scale"].items() if k not in drop},  # noqa: E731
                     {k: x for k, x in r["environment"].items() if k != "git_commit"})
    for p in parts[1:]:
        if key(p) != key(first):
            raise ValueError("cannot merge results of different configurations")
    res = {**first, "base": {}, "runs": {}}
    regimes, methods = [], {}
    for p in parts:
        methods.update(p["methods"])
        regimes += [r for r in p["scale"]["regimes"] if r not in regimes]
        for s, per in p["runs"].items():
            b = res["base"].setdefault(s, {**p["base"][s], "curation": {}})
            if b["qref_sha"] != p["base"][s]["qref_sha"]:
                raise ValueError(f"seed {s}: the parts have different q_ref weights")
            b["curation"].update(p["base"][s]["curation"])
            for regime, runs in per.items():
                if regime in res["runs"].setdefault(s, {}):
                    raise ValueError(f"seed {s}, regime {regime} is in two of the results")
                res["runs"][s][regime] = runs
    order = ["teacher", "mixed", "self"]
    res["scale"] = {**first["scale"], "seeds": sorted(int(s) for s in res["runs"]),
                    "regimes": sorted(regimes, key=order.index), "methods": None}
    res["methods"] = {m.name: m.args for m in METHODS if m.name in methods}
    res["wall_s"] = sum(p["wall_s"] for p in parts)
    res["wall_s_max"] = max(p["wall_s"] for p in parts)
    res["merged_from"] = len(parts)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="reduced smoke version (1 seed)")
    ap.add_argument("--workdir", default=None, help="default outputs/curated-teacher[-quick]")
    ap.add_argument("--results", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--seeds", type=int, nargs="*", default=None)
    ap.add_argument("--regimes", nargs="*", default=None, choices=["teacher", "mixed", "self"])
    ap.add_argument("--methods", nargs="*", default=None, metavar="NAME",
                    help=f"a subset of {[m.name for m in METHODS]}")
    ap.add_argument("--reuse-models", action="store_true",
                    help="reuse q_ref and the teacher trained by an earlier run in --workdir")
    ap.add_argument("--stem", default=None, help="output file name stem")
    ap.add_argument("--compare", nargs=2, metavar="JSON", default=None,
                    help="compare two result files: exit 0 iff their outcomes are identical")
    ap.add_argument("--native", action="store_true",
                    help="let the native CPU loss epilogue run (default: the pure torch path, "
                         "for numbers that do not depend on a compiler; see docs/repro.md)")
    ap.add_argument("--report", metavar="JSON", default=None,
                    help="rewrite the .md and .png of a saved result, run nothing")
    ap.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                    help="combine results of the same configuration run for different seeds "
                         "(e.g. one process per seed) into --results/--stem")
    a = ap.parse_args(argv)
    if a.report:
        p = Path(a.report)
        report(json.loads(p.read_text()), p.parent, p.stem)
        return 0
    if a.merge:
        parts = [json.loads(Path(p).read_text()) for p in a.merge]
        res = merge(parts)
        report(res, Path(a.results), a.stem or "repro-curated-teacher")
        return 0
    if a.compare:
        return compare_files(*a.compare, keys=("runs", "base"))
    sc = QUICK if a.quick else FULL
    if a.seeds is not None:
        sc.seeds = tuple(a.seeds)
    if a.regimes is not None:
        sc.regimes = tuple(a.regimes)
    if a.methods is not None:
        unknown = set(a.methods) - {m.name for m in METHODS}
        if unknown:
            ap.error(f"unknown methods {sorted(unknown)}; choose from "
                     f"{[m.name for m in METHODS]}")
        sc.methods = tuple(a.methods)
    stem = a.stem or ("repro-curated-teacher-quick" if a.quick else "repro-curated-teacher")
    work = Path(a.workdir or ROOT / "outputs" / ("curated-teacher-quick" if a.quick
                                                 else "curated-teacher"))
    run(sc, work, Path(a.results), stem, a.quick, native=a.native,
        reuse_models=a.reuse_models)
    return 0


if __name__ == "__main__":
    sys.exit(main())
