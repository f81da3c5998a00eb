"""Rejection-sampling fine-tuning (RFT) of a real pretrained model, SmolLM2-135M-Instruct, on its
own checked answers: SFT vs iw-SFT (sequence, token) vs DFT, the paper's cleanest case (the
curated data are samples of q = the starting model, and q is the reference policy).

    nice -n 10 python -m bench.repro.smollm2.run            # full (sizes: Scale, docs/repro.md)
    python -m bench.repro.smollm2.run --quick               # ~10 min smoke run, 1 seed

1. Task (task.py): one-step add/subtract word problems, one worked example as an earlier chat
   turn, exact checker ("The answer is N"); a test split and a disjoint training pool, seed 0.
2. Baseline: greedy test accuracy of the starting model.
3. Curation: K samples per training problem at temperature 1 (top_k 0, top_p 1: the model's own
   distribution), kept when the checker accepts. Per training seed s, a random subset of
   `n_curated` of the kept samples (so the seed spread includes which samples were kept).
4. Fine-tuning through the project's trainer (`iwsft_kernels.trainer.loop.train`, the code
   behind `iwsft-train`, in-process with the JSONL `messages` data): SFT, iw-SFT sequence and
   token (package defaults), DFT (token mode, reference log-probs 0, T 1, clip [0, 1]: w = p_y,
   stop-grad: the trainer's `zero_reference` option, `iwsft-train --zero-reference`, no
   reference pass). Reference log-probs otherwise: the trainer's default,
   the starting model = the data-generating policy; one cache per seed, shared by the methods.
5. Greedy test accuracy of every fine-tuned model; weight statistics per step (metrics.jsonl).

Work is split into units (baseline, sampling shards, one fine-tune+eval per method and seed)
run by `--jobs` worker processes (default 2) that claim units from a queue on disk; a unit
that finished is never redone (rerun the same command to resume). Outputs:
bench/results/repro-smollm2-rft.{json,md,png} (quick: repro-smollm2-rft-quick.*), work files
under outputs/smollm2-rft[-quick]/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.repro.smollm2 import task  # noqa: E402

SERIES = ("loss", "logp_mean", "weight_mean", "weight_min", "weight_max", "ess_fraction",
          "clip_frac_max", "clip_frac_min", "log_ratio_mean", "grad_norm", "step_time_s",
          "tokens")


@dataclass
class Scale:
    n_test: int = 200          # held-out problems, greedy accuracy (1 binomial sd ~3.3 pts at 30%)
    n_train: int = 192         # training problems sampled K times each
    k: int = 4                 # samples per training problem (T = 1)
    n_curated: int = 32        # kept samples per seed (random subset of all kept ones)
    epochs: int = 2
    batch: int = 8             # examples per optimizer step (micro-batch; no accumulation)
    lr: float = 5e-5
    seeds: tuple = (0, 1, 2)
    methods: tuple = ("SFT", "iw-SFT (sequence)", "iw-SFT (token)", "DFT")
    gen_batch: int = 100       # rows per generate call (decode is memory-bound: big batches)
    max_new_tokens: int = 32
    max_length: int = 160      # prompt (~101 tokens) + response (<= 32): never truncates
    sample_shards: int = 4
    task_seed: int = 0
    curation_seed: int = 1234


FULL = Scale()
QUICK = Scale(n_test=48, n_train=48, k=4, n_curated=16, epochs=1, seeds=(0,), gen_batch=96,
              sample_shards=2)
METHODS = {
    "SFT": {"mode": "sft"},
    "iw-SFT (sequence)": {"mode": "sequence"},          # T 1, clip [0, 16], length-normalised
    "iw-SFT (token)": {"mode": "token"},                 # T 1, clip [0.2, 1.8]
    "DFT": {"mode": "token", "temperature": 1.0, "w_min": 0.0, "w_max": 1.0,
            "zero_reference": True},
}


def log(msg: str) -> None:
    print(f"[smollm2 {time.strftime('%H:%M:%S')} pid {os.getpid()}] {msg}", flush=True)


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------ units of work
def unit_base(ctx: dict) -> dict:
    from bench.repro.smollm2 import gen

    test, _ = task.splits(ctx["sc"].task_seed, ctx["sc"].n_test, ctx["sc"].n_train)
    model, tok = gen.load(ctx["model"])
    return gen.evaluate(model, tok, test, batch_size=ctx["sc"].gen_batch,
                        max_new_tokens=ctx["sc"].max_new_tokens)


def shard_problems(sc: Scale, shard: int) -> list[tuple[int, task.Problem]]:
    _, train = task.splits(sc.task_seed, sc.n_test, sc.n_train)
    return [(i, p) for i, p in enumerate(train) if i % sc.sample_shards == shard]


def unit_sample(ctx: dict, shard: int) -> dict:
    """K samples (T = 1) of each problem of the shard, in one stream of batches."""
    from bench.repro.smollm2 import gen

    sc = ctx["sc"]
    probs = [(i, j, p) for j in range(sc.k) for i, p in shard_problems(sc, shard)]
    model, tok = gen.load(ctx["model"])
    resp, t = gen.generate(model, tok, [p for _, _, p in probs], sample=True,
                           seed=sc.curation_seed + 1000 * shard, batch_size=sc.gen_batch,
                           max_new_tokens=sc.max_new_tokens)
    rows = [{"problem": i, "sample": j, "response": r, "correct": task.check(p, r)}
            for (i, j, p), r in zip(probs, resp)]
    return {"rows": rows, **t}


def curated_path(work: Path, seed: int) -> Path:
    return work / f"seed{seed}" / "curated.jsonl"


def curate(work: Path, sc: Scale) -> dict:
    """All kept samples, then a random subset of n_curated per seed (written as JSONL)."""
    _, train = task.splits(sc.task_seed, sc.n_test, sc.n_train)
    rows, gen_tokens, secs = [], 0, 0.0
    for s in range(sc.sample_shards):
        u = json.loads((work / "units" / f"sample-{s}.json").read_text())
        rows += u["rows"]
        gen_tokens, secs = gen_tokens + u["gen_tokens"], secs + u["seconds"]
    rows.sort(key=lambda r: (r["problem"], r["sample"]))
    kept = [r for r in rows if r["correct"]]
    per_problem = {}
    for r in kept:
        per_problem[r["problem"]] = per_problem.get(r["problem"], 0) + 1
    stats = {"samples": len(rows), "kept": len(kept),
             "accept_rate": len(kept) / max(1, len(rows)),
             "accept_rate_by_op": {
                 op: (lambda xs: sum(r["correct"] for r in xs) / max(1, len(xs)))(
                     [r for r in rows if train[r["problem"]].op == op]) for op in ("+", "-")},
             "problems_with_a_kept_sample": len(per_problem),
             "problems_all_k_kept": sum(1 for v in per_problem.values() if v == sc.k),
             "kept_examples": [r["response"] for r in kept[:6]],
             "gen_tokens": gen_tokens, "sampling_s": secs, "per_seed": {}}
    if len(kept) < sc.batch:
        raise RuntimeError(f"the checker kept {len(kept)} of {len(rows)} samples, fewer than one "
                           f"batch ({sc.batch}): sample more problems (n_train) or more per "
                           "problem (k)")
    if len(kept) < sc.n_curated:
        log(f"warning: only {len(kept)} kept samples, fewer than n_curated={sc.n_curated}; "
            "every seed uses all of them")
    for seed in sc.seeds:
        rng = random.Random(sc.curation_seed * 7919 + seed)
        pick = sorted(rng.sample(range(len(kept)), min(sc.n_curated, len(kept))))
        recs = []
        for i in pick:
            p = train[kept[i]["problem"]]
            recs.append({"messages": task.messages(p) + [
                {"role": "assistant", "content": kept[i]["response"]}]})
        path = curated_path(work, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in recs))
        stats["per_seed"][str(seed)] = {
            "n": len(recs), "distinct_problems": len({kept[i]["problem"] for i in pick}),
            "mean_chars": statistics.fmean(len(kept[i]["response"]) for i in pick)
            if pick else 0.0}
    return stats


def ref_done(work: Path, seed: int) -> bool:
    return (work / f"seed{seed}" / "ref_logprobs" / "complete").exists()


def unit_train(ctx: dict, method: str, seed: int) -> dict:
    from bench.repro.curated.run import run_trainer
    from bench.repro.smollm2 import gen

    sc, work = ctx["sc"], ctx["work"]
    args = dict(METHODS[method])
    zero = args.get("zero_reference", False)
    out = work / f"seed{seed}" / slug(method)
    shutil.rmtree(out, ignore_errors=True)  # a half-finished earlier attempt
    t0 = time.perf_counter()
    s = run_trainer(model=ctx["model"], data=str(curated_path(work, seed)), lr=sc.lr,
                    epochs=sc.epochs, micro_batch_size=sc.batch, grad_accum=1, seed=seed,
                    output_dir=str(out), max_length=sc.max_length, eval_examples=8,
                    ref_cache=None if zero else str(work / f"seed{seed}" / "ref_logprobs"),
                    ref_batch_size=8, **args)
    train_s = time.perf_counter() - t0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    test, _ = task.splits(sc.task_seed, sc.n_test, sc.n_train)
    model, tok = gen.load(s["final_dir"])
    ev = gen.evaluate(model, tok, test, batch_size=sc.gen_batch,
                      max_new_tokens=sc.max_new_tokens)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    shutil.rmtree(out / "final", ignore_errors=True)  # 0.5 GB each; the numbers are kept
    return {**ev, "method": method, "seed": seed, "train_s": train_s,
            "train_tokens_per_s": s.get("tokens_per_s"), "steps": s["steps"],
            "eval_loss_before": s["eval_loss_before"], "eval_loss_after": s["eval_loss_after"],
            "data": s["data"],
            "series": {k: [float(f"{r[k]:.6g}") if isinstance(r.get(k), float) else r.get(k)
                           for r in rows] for k in SERIES}}


def do_unit(ctx: dict, name: str) -> dict:
    kind, *rest = name.split(":")
    if kind == "base":
        return unit_base(ctx)
    if kind == "sample":
        return unit_sample(ctx, int(rest[0]))
    if kind == "train":
        return unit_train(ctx, rest[0], int(rest[1]))
    raise ValueError(f"unknown unit {name!r}")


def unit_file(work: Path, name: str) -> Path:
    return work / "units" / (name.replace(":", "-").replace(" ", "_").replace("(", "")
                             .replace(")", "") + ".json")


def needs_ref(name: str) -> int | None:
    """The seed whose reference cache a unit computes (None: it needs none)."""
    kind, *rest = name.split(":")
    if kind != "train":
        return None
    m = METHODS[rest[0]]
    return None if m["mode"] == "sft" or m.get("zero_reference") else int(rest[1])


def worker(ctx: dict, names: list[str]) -> None:
    """Claim and run units until none is left. A claim is a file made with O_EXCL; a unit that
    computes seed s's reference cache runs only while no other one does (the cache is shared)."""
    from bench.repro.curated.run import pinned_numerics

    work = ctx["work"]
    (work / "claims").mkdir(parents=True, exist_ok=True)
    with pinned_numerics():
        while True:
            todo = [n for n in names if not unit_file(work, n).exists()]
            if not todo:
                return
            picked = None
            for n in todo:
                claim = work / "claims" / unit_file(work, n).name
                seed = needs_ref(n)
                lock = work / "claims" / f"ref-seed{seed}.lock"
                mine = None
                if seed is not None and not ref_done(work, seed):
                    try:
                        os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                        mine = lock
                    except FileExistsError:
                        continue
                try:
                    os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    if mine is not None:
                        mine.unlink(missing_ok=True)
                    continue
                picked = (n, mine)
                break
            if picked is None:  # all left are claimed by the other worker (or wait on a ref)
                if all((work / "claims" / unit_file(work, n).name).exists() for n in todo):
                    return
                time.sleep(5)
                continue
            n, lock = picked
            t0 = time.perf_counter()
            log(f"unit {n}: start")
            try:
                res = do_unit(ctx, n)
            finally:
                if lock is not None:
                    lock.unlink(missing_ok=True)
            res["unit_wall_s"] = time.perf_counter() - t0
            write_json(unit_file(work, n), res)
            log(f"unit {n}: done in {res['unit_wall_s']:.0f} s"
                + (f", greedy accuracy {res['accuracy']:.3f}" if "accuracy" in res else ""))


def run_units(names: list[str], work: Path, sc: Scale, model: str, jobs: int) -> None:
    """Run the units not yet done, in `jobs` worker processes (1: in this process)."""
    todo = [n for n in names if not unit_file(work, n).exists()]
    if not todo:
        return
    shutil.rmtree(work / "claims", ignore_errors=True)  # stale claims of a killed run
    if jobs <= 1:
        worker({"sc": sc, "work": work, "model": model}, todo)
    else:
        cmd = [sys.executable, "-m", "bench.repro.smollm2.run", "--worker", "--workdir",
               str(work), "--model", model, "--scale-json", json.dumps(dataclasses.asdict(sc)),
               "--units", *todo]
        procs = [subprocess.Popen(cmd, cwd=ROOT) for _ in range(jobs)]
        codes = [p.wait() for p in procs]
        if any(codes):
            raise RuntimeError(f"a worker failed (exit codes {codes}); rerun to resume")
    missing = [n for n in names if not unit_file(work, n).exists()]
    if missing:
        raise RuntimeError(f"units not done: {missing}")


# ---------------------------------------------------------------------------------- reporting
def mean_sd(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and x == x]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def finite(xs):
    return [x for x in xs if isinstance(x, (int, float)) and x == x]


def weight_summary(series: dict) -> dict:
    f = lambda k, fn: fn(finite(series[k])) if finite(series[k]) else None  # noqa: E731
    return {"w_mean_avg": f("weight_mean", statistics.fmean),
            "w_mean_last": finite(series["weight_mean"])[-1] if finite(series["weight_mean"])
            else None,
            "w_max_max": f("weight_max", max), "w_min_min": f("weight_min", min),
            "ess_avg": f("ess_fraction", statistics.fmean), "ess_min": f("ess_fraction", min),
            "clip_hi_avg": f("clip_frac_max", statistics.fmean),
            "clip_lo_avg": f("clip_frac_min", statistics.fmean),
            "log_ratio_avg": f("log_ratio_mean", statistics.fmean),
            "log_ratio_last": finite(series["log_ratio_mean"])[-1]
            if finite(series["log_ratio_mean"]) else None,
            "train_nll_first": -series["logp_mean"][0], "train_nll_last": -series["logp_mean"][-1]}


def summarize(res: dict) -> dict:
    out = {}
    base = res["base"]["accuracy"]
    for m in res["methods"]:
        runs = [res["runs"][str(s)][m] for s in res["seeds"] if m in res["runs"].get(str(s), {})]
        if not runs:
            continue
        sft = [res["runs"][str(r["seed"])].get("SFT") for r in runs]
        d = [r["accuracy"] - s["accuracy"] for r, s in zip(runs, sft) if s is not None]
        ws = [weight_summary(r["series"]) for r in runs]
        agg = {k: mean_sd([w[k] for w in ws]) for k in ws[0]}
        pairs = [a - b for r, s in zip(runs, sft) if s is not None
                 for a, b in zip(r["correct"], s["correct"])]
        out[m] = {"accuracy": mean_sd([r["accuracy"] for r in runs]),
                  # Δ vs SFT over all (seed, problem) pairs: mean and its standard error
                  "delta_vs_sft_pooled": (statistics.fmean(pairs), statistics.stdev(pairs)
                                          / len(pairs) ** 0.5) if len(pairs) > 1 and m != "SFT"
                  else None,
                  "per_seed": [r["accuracy"] for r in runs],
                  "delta_vs_base": mean_sd([r["accuracy"] - base for r in runs]),
                  "delta_vs_sft": mean_sd(d) if m != "SFT" else None,
                  "format": mean_sd([r["format"] for r in runs]),
                  "acc_add": mean_sd([r["accuracy_by_op"]["+"] for r in runs]),
                  "acc_sub": mean_sd([r["accuracy_by_op"]["-"] for r in runs]),
                  "train_s": mean_sd([r["train_s"] for r in runs]),
                  "tokens_per_s": mean_sd([r["train_tokens_per_s"] for r in runs]),
                  "weights": agg, "n": len(runs)}
    return out


def pct(ms, signed=False) -> str:
    m, s = ms
    if m != m:
        return "-"
    return f"{100 * m:+.1f} ± {100 * s:.1f}" if signed else f"{100 * m:.1f} ± {100 * s:.1f}"


def num(ms, nd=3) -> str:
    if ms is None or ms[0] is None or ms[0] != ms[0]:
        return "-"
    return f"{ms[0]:.{nd}f}" + (f" ± {ms[1]:.{nd}f}" if ms[1] else "")


def write_markdown(res: dict, path: Path) -> None:
    S, sc, cur = res["summary"], res["scale"], res["curation"]
    L = [f"# RFT of SmolLM2-135M-Instruct: SFT vs iw-SFT vs DFT{' (quick)' if res['quick'] else ''}",
         "", f"Written by `python -m bench.repro.smollm2.run{' --quick' if res['quick'] else ''}`"
         f" ({res.get('wall_s', 0) / 60:.1f} min wall, {res['jobs']} worker processes)."
         + (f" **Partial result: {res['units_done']} done.**" if res.get("partial") else ""), "",
         f"Scale: {json.dumps(sc)}", "",
         f"Environment: {json.dumps(res['environment'])}", "",
         f"Starting model, greedy test accuracy: **{100 * res['base']['accuracy']:.1f}%** "
         f"(n = {res['base']['n']}; addition {100 * res['base']['accuracy_by_op']['+']:.1f}%, "
         f"subtraction {100 * res['base']['accuracy_by_op']['-']:.1f}%; answer format "
         f"{100 * res['base']['format']:.1f}%).", "",
         f"Curation: {cur['samples']} samples (T = 1) of {sc['n_train']} training problems x K = "
         f"{sc['k']}; checker kept {cur['kept']} ({100 * cur['accept_rate']:.1f}%: addition "
         f"{100 * cur['accept_rate_by_op']['+']:.1f}%, subtraction "
         f"{100 * cur['accept_rate_by_op']['-']:.1f}%), from "
         f"{cur['problems_with_a_kept_sample']} distinct problems; per seed a random "
         f"{sc['n_curated']} of them: "
         + ", ".join(f"seed {s}: {v['n']} examples / {v['distinct_problems']} problems"
                     for s, v in cur["per_seed"].items()) + ".", "",
         "| method | greedy test acc. | per seed | Δ vs start | Δ vs SFT (per seed) | "
         "Δ vs SFT (pooled pairs, ± se) | addition | "
         "subtraction | format | train NLL first → last | log-ratio, mean over steps | "
         "log-ratio, last step | weight mean (avg) | weight max | ESS fraction avg / min | "
         "clipped high / low (avg) |",
         "|" + "---|" * 16]
    L.append(f"| start (q) | {100 * res['base']['accuracy']:.1f} | - | - | - | "
             f"- | {100 * res['base']['accuracy_by_op']['+']:.1f} | "
             f"{100 * res['base']['accuracy_by_op']['-']:.1f} | {100 * res['base']['format']:.1f}"
             " | - | - | - | - | - | - | - |")
    for m, r in S.items():
        w = r["weights"]
        sft = m == "SFT"
        L.append(
            f"| {m} | {pct(r['accuracy'])} | {' / '.join(f'{100 * x:.1f}' for x in r['per_seed'])}"
            f" | {pct(r['delta_vs_base'], True)} | {'-' if sft else pct(r['delta_vs_sft'], True)}"
            f" | {'-' if sft or r['delta_vs_sft_pooled'] is None else pct(r['delta_vs_sft_pooled'], True)}"
            f" | {pct(r['acc_add'])} | {pct(r['acc_sub'])} | {pct(r['format'])} | "
            f"{num(w['train_nll_first'])} → {num(w['train_nll_last'])} | "
            + (" | ".join(["-"] * 6) if sft else
               f"{num(w['log_ratio_avg'])} | {num(w['log_ratio_last'])} | "
               f"{num(w['w_mean_avg'])} | {num(w['w_max_max'], 2)} | "
               f"{num(w['ess_avg'], 3)} / {num(w['ess_min'], 3)} | "
               f"{100 * w['clip_hi_avg'][0]:.1f}% / {100 * w['clip_lo_avg'][0]:.1f}%") + " |")
    L += ["", "± is the sd over seeds (each seed: its own subset of the kept samples, data order); "
          "one 200-problem test has a binomial sd of ~3.3 points at 30%. Weight statistics are "
          "the trainer's per-step metrics.jsonl (sequence mode: over sequences; token modes: over "
          "target tokens), averaged over all optimizer steps then over seeds; the log-ratio is "
          "log p_θ - log q_ref (DFT: log p_θ, since its reference is 0).", "",
          "Δ vs SFT (per seed): mean ± sd over seeds of the paired difference (same curated "
          "set, same test problems). Pooled pairs: the difference over all seed x problem pairs, "
          "± its standard error.", "",
          f"Timing (s): {json.dumps(res.get('timing'))}", "",
          "Wall time per unit (s): " + ", ".join(f"{k}: {v:.0f}" for k, v in
                                                 res["unit_wall_s"].items()), ""]
    L.append("Sample kept answers: " + " | ".join(f"`{x}`" for x in cur["kept_examples"][:4]))
    path.write_text("\n".join(L) + "\n")


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(res["summary"])
    seeds = [str(s) for s in res["seeds"]]
    fig, ax = plt.subplots(1, 4, figsize=(19, 4.4))
    base = 100 * res["base"]["accuracy"]
    for i, m in enumerate(names):
        accs = [100 * res["runs"][s][m]["accuracy"] for s in seeds if m in res["runs"].get(s, {})]
        ax[0].bar(i, statistics.fmean(accs), color=f"C{i}", alpha=0.6)
        ax[0].plot([i] * len(accs), accs, "ko", ms=4)
    ax[0].axhline(base, color="0.3", ls=":", label=f"start {base:.1f}%")
    ax[0].set_xticks(range(len(names)), names, rotation=20, fontsize=8)
    ax[0].set_ylabel(f"greedy test accuracy (%), n = {res['base']['n']}")
    ax[0].legend(fontsize=8)
    ax[0].set_title("after RFT (bars: mean; dots: seeds)")
    panels = [("logp_mean", "train NLL of the step's targets", lambda x: -x),
              ("weight_mean", "mean weight", lambda x: x),
              ("ess_fraction", "ESS fraction of the weights", lambda x: x)]
    for j, (key, title, f) in enumerate(panels, start=1):
        for i, m in enumerate(names):
            if key != "logp_mean" and METHODS[m]["mode"] == "sft":
                continue
            ys = [[f(v) for v in res["runs"][s][m]["series"][key]] for s in seeds
                  if m in res["runs"].get(s, {})]
            n = min(len(y) for y in ys)
            mean = [statistics.fmean(y[t] for y in ys) for t in range(n)]
            ax[j].plot(range(1, n + 1), mean, color=f"C{i}", label=m)
            for y in ys:
                ax[j].plot(range(1, n + 1), y[:n], color=f"C{i}", alpha=0.2, lw=0.8)
        ax[j].set_xlabel("optimizer step")
        ax[j].set_title(title + " (line: mean over seeds)")
        ax[j].legend(fontsize=7)
    fig.suptitle("Rejection-sampling fine-tuning of SmolLM2-135M-Instruct on its own checked "
                 "answers (q = reference = the starting model)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------- driver
def run(sc: Scale, work: Path, results: Path, stem: str, quick: bool, model: str,
        jobs: int = 2) -> dict:
    from bench.repro.curated.run import environment, pinned_numerics

    t0 = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    scale_file = work / "scale.json"
    if scale_file.exists() and json.loads(scale_file.read_text()) != json.loads(
            json.dumps(dataclasses.asdict(sc))):
        raise ValueError(f"{work} holds a run with another scale ({scale_file}); use another "
                         "--workdir or delete it")
    write_json(scale_file, dataclasses.asdict(sc))
    log(f"phase 1: baseline + sampling ({sc.n_train} x K={sc.k}), {jobs} workers")
    run_units(["base"] + [f"sample:{s}" for s in range(sc.sample_shards)], work, sc, model, jobs)
    t1 = time.perf_counter()
    cur = curate(work, sc)
    write_json(work / "curation.json", cur)
    log(f"curation: kept {cur['kept']} of {cur['samples']} ({100 * cur['accept_rate']:.1f}%)")
    units = [f"train:{m}:{s}" for s in sc.seeds for m in sc.methods]
    log(f"phase 2: {len(units)} fine-tunes + evaluations, {jobs} workers")
    run_units(units, work, sc, model, jobs)
    t2 = time.perf_counter()
    timing = {"baseline+sampling": t1 - t0, "fine-tunes+evals": t2 - t1, "wall_s": t2 - t0}
    if all(unit_file(work, n).exists() for n in units) and t2 - t0 > 60:
        write_json(work / "timing.json", timing)  # a run that did the work (not a re-report)
    res = collect(sc, work, results, stem, quick, model, jobs)
    write_results(res, results, stem)
    log(f"done in {res['wall_s'] / 60:.1f} min (this invocation): {results / stem}.{{json,md,png}}")
    return res


def collect(sc: Scale, work: Path, results: Path, stem: str, quick: bool, model: str,
            jobs: int) -> dict:
    """The result of the finished units (all of them after a run; `--partial`: so far)."""
    from bench.repro.curated.run import environment, pinned_numerics

    load = lambda n: json.loads(unit_file(work, n).read_text())  # noqa: E731
    first = ["base"] + [f"sample:{s}" for s in range(sc.sample_shards)]
    units = [f"train:{m}:{s}" for s in sc.seeds for m in sc.methods]
    done = [n for n in units if unit_file(work, n).exists()]
    runs = {}
    for n in done:
        r = load(n)
        runs.setdefault(str(r["seed"]), {})[r["method"]] = r
    with pinned_numerics():
        env = environment()
    cur_file = work / "curation.json"
    cur = json.loads(cur_file.read_text()) if cur_file.exists() else curate(work, sc)
    res = {"quick": quick, "partial": len(done) < len(units),
           "units_done": f"{len(done)} of {len(units)} fine-tunes",
           "scale": dataclasses.asdict(sc), "model": model, "jobs": jobs,
           "environment": env, "methods": list(sc.methods),
           "seeds": [s for s in sc.seeds if str(s) in runs],
           "method_args": {m: METHODS[m] for m in sc.methods},
           "base": load("base"), "curation": cur, "runs": runs,
           "unit_wall_s": {n: load(n)["unit_wall_s"] for n in first + done},
           "timing": json.loads((work / "timing.json").read_text())
           if (work / "timing.json").exists() else None}
    # wall time of the run that did the work; else (partial) busy time of the units / jobs
    res["wall_s"] = res["timing"]["wall_s"] if res["timing"] else sum(
        load(n)["unit_wall_s"] for n in first + done) / max(1, jobs)
    res["summary"] = summarize(res)
    return res


def write_results(res: dict, results: Path, stem: str) -> None:
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{stem}.json").write_text(json.dumps(res, indent=1))
    write_markdown(res, results / f"{stem}.md")
    plot(res, results / f"{stem}.png")


def default_model() -> str:
    """SmolLM2-135M-Instruct's folder from scripts/make_smollm2.py (cached; built once)."""
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_smollm2.py")],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"scripts/make_smollm2.py failed (pass --model):\n{p.stderr[-2000:]}")
    return p.stdout.strip().splitlines()[-1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, 48 test problems (~10 min)")
    ap.add_argument("--model", default=None, help="model folder (default: make_smollm2.py's)")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--results", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--stem", default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--partial", action="store_true",
                    help="write the result files from the units finished so far (run nothing)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--scale-json", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--units", nargs="+", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    model = a.model or default_model()
    if not Path(model).is_dir():
        raise SystemExit(f"model folder {model} not found")
    if a.worker:
        sc = Scale(**{k: tuple(v) if isinstance(v, list) else v
                      for k, v in json.loads(a.scale_json).items()})
        worker({"sc": sc, "work": Path(a.workdir), "model": model}, a.units)
        return 0
    sc = dataclasses.replace(QUICK if a.quick else FULL)
    if a.seeds:
        sc.seeds = tuple(a.seeds)
    stem = a.stem or ("repro-smollm2-rft-quick" if a.quick else "repro-smollm2-rft")
    work = Path(a.workdir or ROOT / "outputs" / ("smollm2-rft-quick" if a.quick else "smollm2-rft"))
    if a.partial:
        res = collect(sc, work, Path(a.results), stem, a.quick, model, a.jobs)
        write_results(res, Path(a.results), stem)
        log(f"{res['units_done']} done: {Path(a.results) / stem}.{{json,md,png}}")
        return 0
    run(sc, work, Path(a.results), stem, a.quick, model, a.jobs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
