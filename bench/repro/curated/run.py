"""Curated-data experiment at CPU scale (issue 5 item 2), end to end:

    nice -n 10 python -m bench.repro.curated.run            # full: ~5 min on 2 idle CPU cores
    python -m bench.repro.curated.run --quick                # smoke version, ~1-2 min idle
    python -m bench.repro.curated.run --compare A.json B.json   # is a rerun identical?

The curated data here are q_ref's own samples; teacher.py is the setting where a stronger
teacher writes them (issue 15). Both pin the numerics: the command line pins torch's CPU
kernels before torch starts (bench.repro.pin_cpu_kernels: MKL_CBWR=COMPATIBLE,
ATEN_CPU_CAPABILITY=avx2), and every run fixes one torch thread and the pure torch loss
epilogue (pinned_numerics). With the same code and torch version a rerun gives the same
numbers; docs/repro.md says on which CPUs that was checked.

1. task: 3-operand integer arithmetic with an exact checker (task.py);
2. q_ref: a tiny random-init Qwen2 (char-level vocab) trained with `iwsft-train --mode sft`
   on a broad, mixed-quality corpus of the task (some answers wrong, some without work);
3. curation (per seed): sample one answer per fresh problem from q_ref at temperature 1,
   keep those the checker accepts, score each with task.quality (shorter/cleaner = higher);
4. fine-tune from q_ref through the project's trainer (`iwsft_kernels.trainer.loop.train`, the
   code behind `iwsft-train`): SFT, SFT(Q), iw-SFT (sequence), iw-SFT (token), iw-SFT(Q);
   reference log-probs = q_ref (the trainer's default: the starting model), cached once per
   seed and shared by all methods;
5. evaluate by sampling (T = 1) on held-out problems; mean and spread over seeds;
6. an ablation of iw-SFT's knobs (see ABLATION), and the weight statistics from each run's
   metrics.jsonl (how far the policy moved from q_ref).

Outputs: bench/results/curated_experiment.{json,md,png} (quick: curated_quick.*), work files
under outputs/curated/ (or --workdir).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

if __name__ == "__main__":  # the command line: pin torch's CPU kernels before torch starts
    from bench.repro import pin_cpu_kernels

    pin_cpu_kernels()

from bench.bench_loss import cpu_model  # noqa: E402
from bench.repro import mkl_branch  # noqa: E402
from bench.repro.curated import policy, task  # noqa: E402


@dataclass
class Scale:
    corpus: int = 16000          # q_ref pretraining examples
    ref_epochs: int = 2
    ref_hidden: int = 96
    ref_layers: int = 3
    ref_lr: float = 2e-3
    ref_batch: int = 32
    curate_prompts: int = 2000   # problems sampled from q_ref per seed
    heldout: int = 1000
    pool: int | None = None      # smoke tests only: every problem from a pool of this size
                                 # (q_ref memorises it; held-out = the pool, not disjoint)
    eval_samples: int = 1        # sampled answers per held-out problem
    ft_lr: float = 3e-4
    ft_epochs: int = 5            # the paper recipe: 5 epochs, global batch 16
    ft_batch: int = 16
    seeds: tuple = (0, 1, 2)
    ablation_seeds: tuple = (0, 1, 2)
    ablation: bool = True


FULL = Scale()
# the full q_ref (same seed: the same model), one seed, shorter fine-tuning, no ablation
QUICK = Scale(curate_prompts=1000, heldout=300, ft_epochs=2, seeds=(0,), ablation_seeds=(),
              ablation=False)
TINY = Scale(corpus=512, ref_epochs=6, ref_hidden=32, ref_layers=1, ref_lr=1e-2, ref_batch=16,
             curate_prompts=48, heldout=16, ft_epochs=1, ft_batch=4, seeds=(0,),
             ablation_seeds=(), ablation=False, pool=8)


@dataclass
class Method:
    name: str
    args: dict = field(default_factory=dict)


METHODS = [
    Method("SFT", {"mode": "sft"}),
    Method("SFT(Q)", {"mode": "sft", "sampling": "quality"}),
    Method("iw-SFT (sequence)", {"mode": "sequence"}),
    Method("iw-SFT (token)", {"mode": "token"}),
    Method("iw-SFT(Q) (sequence)", {"mode": "sequence", "quality_weight": True}),
]
# Ablation: why does (or doesn't) iw-SFT differ from SFT here?  Each row is one change from
# the main iw-SFT (sequence) run; the SFT rows train the same longer schedule for comparison.
ABLATION = [
    Method("seq, no length norm (raw sequence ratio)", {"mode": "sequence",
                                                        "length_normalize": False}),
    Method("seq, temperature 5", {"mode": "sequence", "temperature": 5.0}),
    Method("seq, w_max 2", {"mode": "sequence", "w_max": 2.0}),
    Method("seq, self-normalized", {"mode": "sequence", "self_normalize": True}),
    Method("SFT, 3x epochs", {"mode": "sft", "epochs_mult": 3}),
    Method("seq, 3x epochs", {"mode": "sequence", "epochs_mult": 3}),
    Method("seq, 3x epochs, no length norm", {"mode": "sequence", "length_normalize": False,
                                              "epochs_mult": 3}),
]


def cpu_seconds() -> float:
    """user + sys CPU time of this process and its finished children: a run's cost, less
    sensitive to the machine's load than its wall time."""
    import resource

    me, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run_cost(res: dict) -> str:
    """'in 1.2 min (0.9 min CPU; load average 0.5 -> 1.1 on 2 cores)' for a result's markdown."""
    out = f"in {res['wall_s'] / 60:.1f} min"
    if "cpu_s" in res:
        a, b = res["load_avg"]
        out += (f" ({res['cpu_s'] / 60:.1f} min CPU time; 1-minute load average {a:.1f} at the "
                f"start, {b:.1f} at the end, on {os.cpu_count()} cores)")
    return out


def log(msg: str) -> None:
    print(f"[curated {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@contextlib.contextmanager
def pinned_numerics(native: bool = False):
    """What a rerun's numbers depend on besides the code and the seeds, fixed for the duration
    (restored afterwards). The pipeline is chaotic: one rounding difference in q_ref's 1,000
    training steps changes which answers are sampled and every number after it (measured:
    docs/repro.md). So: one torch thread (intra-op reductions are split by thread count), and
    the pure torch loss epilogue unless `native` (whether the native CPU epilogue loads
    depends on a compiler and the CPU's flags, and it rounds differently)."""
    import torch

    threads, env = torch.get_num_threads(), os.environ.get("IWSFT_NO_NATIVE")
    torch.set_num_threads(1)
    if not native:
        os.environ["IWSFT_NO_NATIVE"] = "1"
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if env is None:
            os.environ.pop("IWSFT_NO_NATIVE", None)
        else:
            os.environ["IWSFT_NO_NATIVE"] = env


def environment() -> dict:
    """What the numbers depend on besides the code and the seeds (see docs/repro.md)."""
    import platform
    import subprocess

    import torch

    from iwsft_kernels.backends import native_cpu

    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True,  # noqa
                                        text=True, timeout=10).stdout.strip()
        commit = git("rev-parse", "HEAD") or None
        if commit and git("status", "--porcelain", "--untracked-files=no"):
            commit += "+uncommitted changes"
    except (OSError, subprocess.SubprocessError):
        commit = None
    native_cpu.load()  # None when IWSFT_NO_NATIVE=1 (pinned_numerics' default)
    return {"torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.processor() or platform.machine(),
            "cpu_model": cpu_model(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "ATEN_CPU_CAPABILITY": os.environ.get("ATEN_CPU_CAPABILITY"),
            "MKL_CBWR": os.environ.get("MKL_CBWR"),
            "mkl_branch": mkl_branch(),
            "torch_threads": torch.get_num_threads(),
            "native_epilogue": "off (IWSFT_NO_NATIVE=1)" if native_cpu.disabled()
            else native_cpu.origin() or f"off ({native_cpu.load_error()})",
            "git_commit": commit}


def describe(env: dict) -> str:
    """One line for a result's markdown: where, and with which CPU kernels, it ran."""
    mb = env.get("mkl_branch") or {}
    fixed, auto = mb.get("fixed"), mb.get("auto_for_this_cpu")
    mkl = (f"MKL {fixed}" if fixed not in (None, "OFF")
           else f"MKL per CPU ({auto})" if auto else "MKL unknown")
    epi = "pure torch" if env["native_epilogue"].startswith("off") else "native"
    return (f"{env.get('cpu_model', env['machine'])}, torch {env['torch']}, "
            f"{env['torch_threads']} torch thread, CPU kernels: ATen {env['cpu_capability']} + "
            f"{mkl}, loss epilogue {epi}, commit {str(env['git_commit'])[:10]}")


def run_trainer(**kw) -> dict:
    """One `iwsft-train` run in this process (the same code path as the CLI)."""
    from accelerate.state import AcceleratorState

    from iwsft_kernels.trainer.config import TrainConfig
    from iwsft_kernels.trainer.loop import train

    AcceleratorState._reset_state(True)
    cfg = TrainConfig(**{**dict(log_with="none", eval_examples=16, bf16="no", warmup_ratio=0.05,
                                max_length=96, keep_checkpoints=1, save_every=0), **kw})
    try:
        return train(cfg)
    finally:
        AcceleratorState._reset_state(True)


def weights_sha(model_dir: str) -> str:
    """First 16 hex digits of the sha256 of a saved model's weights file."""
    return hashlib.sha256((Path(model_dir) / "model.safetensors").read_bytes()).hexdigest()[:16]


def weight_stats(run_dir: Path) -> dict:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    keys = ("weight_mean", "weight_min", "weight_max", "ess_fraction", "clip_frac_max",
            "clip_frac_min", "log_ratio_mean")
    out = {f"last_{k}": last[k] for k in keys}
    lr = [r["log_ratio_mean"] for r in rows if r["log_ratio_mean"] == r["log_ratio_mean"]]
    out["mean_log_ratio_mean"] = sum(lr) / len(lr) if lr else float("nan")
    out["max_log_ratio_mean"] = max(lr) if lr else float("nan")
    out["steps"] = len(rows)
    out["train_nll_last"] = -last["logp_mean"]
    return out


def mean_sd(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


# ----------------------------------------------------------------------------- stages
def build_qref(work: Path, sc: Scale, heldout: set[str], pool: list[str] | None) -> dict:
    tok_dir = policy.save_tokenizer(work / "tokenizer")
    init = policy.make_model_dir(work / "qref-init", hidden=sc.ref_hidden, layers=sc.ref_layers,
                                 heads=4 if sc.ref_hidden >= 64 else 2)
    rows = task.corpus(sc.corpus, random.Random(12345), exclude=set() if pool else heldout,
                       pool=pool)
    write_jsonl(work / "corpus.jsonl", rows)
    t0 = time.perf_counter()
    s = run_trainer(model=str(init), tokenizer=str(tok_dir), data=str(work / "corpus.jsonl"),
                    mode="sft", lr=sc.ref_lr, epochs=sc.ref_epochs, micro_batch_size=sc.ref_batch,
                    grad_accum=1, seed=0, output_dir=str(work / "qref"))
    styles = {k: sum(r["style"] == k for r in rows) / len(rows) for k in task.STYLE_MIX}
    corpus_ok = sum(task.check(r["prompt"], r["response"]) for r in rows) / len(rows)
    return {"model": s["final_dir"], "tokenizer": str(tok_dir), "train_s": time.perf_counter() - t0,
            "sha": weights_sha(s["final_dir"]),
            "corpus_size": len(rows), "corpus_styles": styles, "corpus_correct": corpus_ok,
            "steps": s["steps"], "eval_loss_before": s["eval_loss_before"],
            "eval_loss_after": s["eval_loss_after"]}


def curate(qref_dir: str, work: Path, sc: Scale, seed: int, exclude: set[str],
           pool: list[str] | None) -> dict:
    model, tok = policy.load(Path(qref_dir))
    rng = random.Random(1000 + seed)
    probs = []
    seen = set(exclude)
    while len(probs) < sc.curate_prompts:
        if pool:  # smoke tests: repeated problems from the pool
            probs.append(rng.choice(pool))
            continue
        p = task.random_problem(rng)
        if p not in seen:
            seen.add(p)
            probs.append(p)
    resp = policy.sample(model, tok, probs, seed=seed)
    # a reference cache left by an earlier run is keyed by the model's path and file size, not
    # its weights: never reuse one (recomputing it takes a second)
    shutil.rmtree(work / f"seed{seed}" / "ref_logprobs", ignore_errors=True)
    kept = [{"prompt": p, "response": r, "quality": task.quality(p, r)}
            for p, r in zip(probs, resp) if task.check(p, r)]
    path = work / f"seed{seed}" / "curated.jsonl"
    write_jsonl(path, kept)
    q = [k["quality"] for k in kept]
    return {"path": str(path), "sampled": len(probs), "kept": len(kept),
            "acceptance": len(kept) / len(probs),
            "quality_mean": statistics.fmean(q) if q else float("nan"),
            "kept_shortcut_frac": sum(task.style_of(k["response"]) == "shortcut"
                                      for k in kept) / max(len(kept), 1),
            "all_pass_checker": all(task.check(k["prompt"], k["response"]) for k in kept)}


def finetune(m: Method, qref: dict, cur: dict, work: Path, sc: Scale, seed: int,
             tag: str) -> dict:
    args = dict(m.args)
    mult = args.pop("epochs_mult", 1)
    out = work / f"seed{seed}" / tag
    t0 = time.perf_counter()
    s = run_trainer(model=qref["model"], tokenizer=qref["tokenizer"], data=cur["path"],
                    lr=sc.ft_lr, epochs=sc.ft_epochs * mult, micro_batch_size=sc.ft_batch,
                    grad_accum=1, seed=seed, output_dir=str(out),
                    ref_cache=str(work / f"seed{seed}" / "ref_logprobs"), **args)
    return {"final": s["final_dir"], "train_s": time.perf_counter() - t0,
            **weight_stats(out)}


def evaluate(model_dir: str, problems: list[str], sc: Scale, seed: int) -> dict:
    model, tok = policy.load(Path(model_dir))
    return policy.evaluate(model, tok, problems, seed=seed, n_samples=sc.eval_samples)


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


# ---------------------------------------------------------------------------- reporting
def summarize(per_seed: dict) -> dict:
    """{name: {seed: record}} -> {name: {metric: [mean, sd], ...}}"""
    out = {}
    for name, runs in per_seed.items():
        recs = list(runs.values())
        d = {"n_seeds": len(recs)}
        for k in ("success", "greedy_success", "shortcut_frac", "success_worked",
                  "success_shortcut", "mean_log_ratio_mean", "last_log_ratio_mean",
                  "last_weight_mean", "last_weight_max", "last_ess_fraction",
                  "last_clip_frac_max", "train_s"):
            vals = [r.get(k) for r in recs if r.get(k) is not None]
            if vals and all(isinstance(v, (int, float)) for v in vals):
                d[k] = list(mean_sd(vals))
        d["success_per_seed"] = [r["success"] for r in recs]
        out[name] = d
    return out


def fmt(ms, pct=True) -> str:
    if ms is None or ms[0] != ms[0]:
        return "-"
    m, s = ms
    return f"{100 * m:.1f} ± {100 * s:.1f}" if pct else f"{m:.3f} ± {s:.3f}"


def write_markdown(res: dict, path: Path) -> None:
    sc, q = res["scale"], res["qref"]
    L = [f"# Curated-data experiment (CPU scale){' — QUICK smoke run' if res['quick'] else ''}",
         "",
         f"Generated by `python -m bench.repro.curated.run{' --quick' if res['quick'] else ''}` "
         f"{run_cost(res)} on {res['host']}. Success = fraction of held-out "
         f"problems ({sc['heldout']}, x{sc['eval_samples']} samples) whose sampled answer "
         f"(temperature 1) the exact checker accepts; mean ± sd over seeds {list(sc['seeds'])}.",
         "",
         f"q_ref: Qwen2, hidden {sc['ref_hidden']}, {sc['ref_layers']} layers, vocab "
         f"{res['vocab']}, trained with `iwsft-train --mode sft` on {q['corpus_size']} "
         f"mixed-quality examples ({100 * q['corpus_correct']:.0f}% of them correct) in "
         f"{q['train_s']:.0f} s.",
         "",
         "| policy | success (sampled) | greedy success | no-work answers | success when working "
         "| mean log-ratio vs q_ref (last step) | weight max (last step) | ESS frac (last step) |",
         "|---|---|---|---|---|---|---|---|"]
    for name, d in res["summary"].items():
        L.append(f"| {name} | {fmt(d.get('success'))} | {fmt(d.get('greedy_success'))} | "
                 f"{fmt(d.get('shortcut_frac'))} | {fmt(d.get('success_worked'))} | "
                 f"{fmt(d.get('last_log_ratio_mean'), False)} | "
                 f"{fmt(d.get('last_weight_max'), False)} | "
                 f"{fmt(d.get('last_ess_fraction'), False)} |")
    L += ["", "Curation per seed: " + "; ".join(
        f"seed {s}: kept {c['kept']}/{c['sampled']} ({100 * c['acceptance']:.1f}%), mean "
        f"quality {c['quality_mean']:.2f}, {100 * c['kept_shortcut_frac']:.0f}% no-work"
        for s, c in res["curation"].items())]
    if res.get("ablation_summary"):
        L += ["", "## Ablation (iw-SFT knobs; same curated sets and seeds)", "",
              "| variant | success (sampled) | greedy success | no-work answers | mean "
              "log-ratio (last step) | weight mean / max (last step) | ESS frac | clipped at "
              "w_max |", "|---|---|---|---|---|---|---|---|"]
        for name, d in res["ablation_summary"].items():
            wm, wx = d.get("last_weight_mean"), d.get("last_weight_max")
            L.append(f"| {name} | {fmt(d.get('success'))} | {fmt(d.get('greedy_success'))} | "
                     f"{fmt(d.get('shortcut_frac'))} | {fmt(d.get('last_log_ratio_mean'), False)}"
                     f" | {wm[0]:.2f} / {wx[0]:.2f} | {fmt(d.get('last_ess_fraction'), False)} "
                     f"| {fmt(d.get('last_clip_frac_max'))} |")
    path.write_text("\n".join(L) + "\n")


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(res["summary"].items()) + list((res.get("ablation_summary") or {}).items())
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.5))
    for i, (name, d) in enumerate(rows):
        m, s = d["success"]
        color = "0.5" if name == "q_ref" else ("C0" if i < len(res["summary"]) else "C1")
        ax.barh(i, 100 * m, xerr=100 * s, color=color, alpha=0.8, capsize=3)
        ax.scatter([100 * v for v in d["success_per_seed"]], [i] * len(d["success_per_seed"]),
                   color="k", s=10, zorder=3)
    ax.set_yticks(range(len(rows)), [n for n, _ in rows])
    ax.invert_yaxis()
    ax.set_xlabel("held-out success rate, sampled at T=1 (%)  (bar: mean ± sd; dots: seeds)")
    ax.set_title("Curated-data experiment: fine-tuning q_ref on its own checked samples")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------- is a rerun identical?
# what depends on the clock, and where files went: not outcomes
VOLATILE_KEYS = {"train_s", "wall_s", "wall_s_max", "cpu_s", "load_avg", "path", "final",
                 "model", "tokenizer", "host"}


def outcome(obj):
    """A result with everything that depends on the clock or the work folder removed: two runs
    with the same code, environment and seeds must give equal outcomes (compare())."""
    if isinstance(obj, dict):
        return {k: outcome(x) for k, x in obj.items() if k not in VOLATILE_KEYS}
    if isinstance(obj, list):
        return [outcome(x) for x in obj]
    return obj


def compare(a, b, path: str = "") -> list[str]:
    """Paths where two results' outcomes differ (empty: an exact rerun)."""
    a, b = outcome(a), outcome(b)
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}/{k}: only in one" for k in sorted(set(a) ^ set(b), key=str)]
        for k in sorted(set(a) & set(b), key=str):
            out += compare(a[k], b[k], f"{path}/{k}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in compare(x, y, f"{path}[{i}]")]
    same = a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)
    return [] if same else [f"{path}: {a!r} != {b!r}"]


def compare_files(a: str, b: str, keys: tuple[str, ...]) -> int:
    """Print the differing values of two result files (the given top-level keys) and whether
    their environments differ; 0 iff the outcomes are identical."""
    ra, rb = (json.loads(Path(p).read_text()) for p in (a, b))
    diffs = [d for k in keys for d in compare(ra.get(k), rb.get(k), f"/{k}")]
    env = compare(ra.get("environment"), rb.get("environment"))
    print("environment differs: " + "; ".join(env) if env else "same environment")
    print(f"{len(diffs)} differing values" + (":" if diffs else " (identical outcomes)"))
    for d in diffs[:40]:
        print("  " + d)
    return 1 if diffs else 0


RESULT_KEYS = ("qref", "curation", "per_seed", "ablation_per_seed")


# --------------------------------------------------------------------------------- main
def run(sc: Scale, work: Path, results: Path, stem: str, quick: bool,
        native: bool = False) -> dict:
    # one thread: these models are tiny, and on a shared 2-core machine two spinning OpenMP
    # threads per process made a training step ~100x slower (measured: 3 s vs 0.02 s); one
    # thread and the pure torch epilogue also make a rerun give the same numbers
    with pinned_numerics(native):
        return _run(sc, work, results, stem, quick)


def problem_pool(rng: random.Random, n: int) -> list[str]:
    """n distinct random problems, drawn from rng in order (the same rng gives the same pool)."""
    pool: list[str] = []
    while len(pool) < n:
        p = task.random_problem(rng)
        if p not in pool:
            pool.append(p)
    return pool


def _run(sc: Scale, work: Path, results: Path, stem: str, quick: bool) -> dict:
    t_start, cpu0, load0 = time.perf_counter(), cpu_seconds(), os.getloadavg()[0]
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(777)
    pool = problem_pool(rng, sc.pool) if sc.pool else None
    heldout = []
    while len(heldout) < sc.heldout:
        p = rng.choice(pool) if pool else task.random_problem(rng)
        if pool or p not in heldout:
            heldout.append(p)
    hset = set(heldout)

    log("training q_ref on the mixed-quality corpus")
    qref = build_qref(work, sc, hset, pool)
    log(f"q_ref trained in {qref['train_s']:.0f} s")
    per, curation, ablation = {"q_ref": {}}, {}, {}
    for seed in sc.seeds:
        per["q_ref"][seed] = evaluate(qref["model"], heldout, sc, seed)
        log(f"seed {seed}: q_ref success {per['q_ref'][seed]['success']:.3f}")
        cur = curate(qref["model"], work, sc, seed, hset, pool)
        curation[seed] = cur
        log(f"seed {seed}: curated {cur['kept']}/{cur['sampled']}")
        todo = [(m, False) for m in METHODS]
        if sc.ablation and seed in sc.ablation_seeds:
            todo += [(m, True) for m in ABLATION]
        for m, is_ab in todo:
            if cur["kept"] < sc.ft_batch:
                raise RuntimeError(f"seed {seed}: only {cur['kept']} accepted samples, fewer "
                                   f"than one batch ({sc.ft_batch})")
            ft = finetune(m, qref, cur, work, sc, seed, slug(m.name))
            ev = evaluate(ft["final"], heldout, sc, seed)
            (ablation if is_ab else per).setdefault(m.name, {})[seed] = {**ft, **ev}
            log(f"seed {seed}: {m.name}: success {ev['success']:.3f} greedy "
                f"{ev['greedy_success']:.3f} ({ft['train_s']:.0f} s train)")
    res = {"quick": quick, "scale": {k: (list(v) if isinstance(v, tuple) else v)
                                      for k, v in sc.__dict__.items()},
           "environment": environment(),
           "vocab": len(policy.build_tokenizer()), "qref": qref,
           "curation": curation, "methods": {m.name: m.args for m in METHODS + ABLATION},
           "per_seed": per, "ablation_per_seed": ablation,
           "summary": summarize(per), "ablation_summary": summarize(ablation)}
    res["host"] = describe(res["environment"])
    res["wall_s"] = time.perf_counter() - t_start
    res["cpu_s"], res["load_avg"] = cpu_seconds() - cpu0, [load0, os.getloadavg()[0]]
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{stem}.json").write_text(json.dumps(res, indent=1, default=str))
    write_markdown(res, results / f"{stem}.md")
    plot(res, results / f"{stem}.png")
    log(f"done {run_cost(res)}: {results / stem}.{{json,md,png}}")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke version (~1-2 min idle)")
    ap.add_argument("--workdir", default=None, help="default outputs/curated[-quick]")
    ap.add_argument("--results", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--seeds", type=int, nargs="*", default=None)
    ap.add_argument("--no-ablation", action="store_true")
    ap.add_argument("--native", action="store_true",
                    help="let the native CPU loss epilogue run (default: the pure torch path)")
    ap.add_argument("--compare", nargs=2, metavar="JSON", default=None,
                    help="compare two result files: exit 0 iff their outcomes are identical")
    a = ap.parse_args(argv)
    if a.compare:
        return compare_files(*a.compare, keys=RESULT_KEYS)
    sc = QUICK if a.quick else FULL
    if a.seeds is not None:
        sc.seeds = tuple(a.seeds)
        sc.ablation_seeds = tuple(s for s in sc.ablation_seeds if s in sc.seeds)
    if a.no_ablation:
        sc.ablation = False
    work = Path(a.workdir or ROOT / "outputs" / ("curated-quick" if a.quick else "curated"))
    run(sc, work, Path(a.results), "curated_quick" if a.quick else "curated_experiment",
        a.quick, native=a.native)
    return 0


if __name__ == "__main__":
    sys.exit(main())
