"""What the fused per-token outputs cost: the loss with ``outputs=("entropy", "top1")`` (what
the trainers ask for, to log ``entropy`` and ``mean_token_accuracy``) vs without, same inputs,
side by side in one process (CPU).

    python -m bench.bench_outputs --quick      # N = 512, 3 timed pairs: ~2 min on 2 cores
    python -m bench.bench_outputs              # N = 512 and 1024, 5 timed pairs each

Qwen2.5-0.5B head (H = 896, V = 151,936), fp32, inputs of bench/oracle.make_inputs (sequences
of 512 tokens, the first 10% ignored), iw-SFT in sequence mode (``--mode``), backend auto
(``--backend``). Timed: forward+backward of ``linear_iwsft_loss`` (a training micro-batch),
and, without ``--quick``, the no-grad forward in mode "sft" (an eval batch). Off and on
alternate within each pair, in turn order (off, on), (on, off), ..., after one untimed call of
each, so that both see the same machine load; the ratio is taken per pair and its median
reported with the spread. top1 and the log-sum-exp come from the row statistics the loss
computes anyway; the entropy needs one more reduction over the vocabulary (S1, see
iwsft_kernels/backends/rows.py). Target: <= 5% extra time.

Writes bench/results/outputs-cpu-<date>.{json,md} (``--out`` to change the stem).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import inspect
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.oracle import make_inputs
from iwsft_kernels import IWConfig, linear_iwsft_loss

H, V = 896, 151_936
OUTPUTS = ("entropy", "top1")
RESULTS = Path(__file__).resolve().parent / "results"


def _check_api() -> None:
    if "outputs" not in inspect.signature(linear_iwsft_loss).parameters:
        sys.exit("bench_outputs: this iwsft_kernels has no linear_iwsft_loss(..., outputs=...) "
                 "(the fused per-token outputs); nothing to measure")


def _inputs(n: int, mode: str, seed: int = 0):
    inp = make_inputs(n, H, V, seq_len=512, dtype=torch.float32, device="cpu", seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    ref = -2.0 * torch.rand(n, generator=g)  # log q_ref in [-2, 0]: weights spread and clip
    ref = torch.where(inp.labels == -100, 0.0, ref) if mode != "sft" else None
    return inp, ref


def _runner(inp, ref, cfg, outputs, backend, grad: bool):
    def train_step():
        inp.hidden.grad = None
        inp.weight.grad = None
        out = linear_iwsft_loss(inp.hidden, inp.weight, inp.labels, ref,
                                cu_seqlens=inp.cu_seqlens, config=cfg, backend=backend,
                                outputs=outputs)
        out.loss.backward()
        return out

    def eval_step():
        with torch.no_grad():
            return linear_iwsft_loss(inp.hidden, inp.weight, inp.labels, None,
                                     cu_seqlens=inp.cu_seqlens, config=IWConfig(mode="sft"),
                                     backend=backend, outputs=outputs)
    return train_step if grad else eval_step


def measure(n: int, pairs: int, mode: str, backend: str, grad: bool) -> dict:
    inp, ref = _inputs(n, mode)
    cfg = IWConfig(mode=mode)
    run = {"off": _runner(inp, ref, cfg, (), backend, grad),
           "on": _runner(inp, ref, cfg, OUTPUTS, backend, grad)}
    out_on = run["on"]()  # untimed: warm-up, and a check that the outputs are there
    run["off"]()
    m = inp.labels != -100
    assert out_on.entropy is not None and out_on.top1 is not None
    assert torch.isfinite(out_on.entropy[m]).all() and bool((out_on.entropy[m] >= 0).all())
    times = {"off": [], "on": []}
    for i in range(pairs):
        for which in (("off", "on") if i % 2 == 0 else ("on", "off")):
            t0 = time.perf_counter()
            run[which]()
            times[which].append(time.perf_counter() - t0)
    ratios = [a / b for a, b in zip(times["on"], times["off"])]
    return {
        "n": n, "targets": int(m.sum()), "what": "forward+backward (train)" if grad else
        "no-grad forward (eval)", "mode": mode if grad else "sft", "pairs": pairs,
        "off_s": times["off"], "on_s": times["on"],
        "off_median_s": statistics.median(times["off"]),
        "on_median_s": statistics.median(times["on"]),
        "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "mean_entropy": float(out_on.entropy[m].mean()),
        "top1_fraction": float(out_on.top1[m].float().mean()),
    }


def _git_rev() -> str | None:
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "iwsft_kernels"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (rev + ("+dirty" if dirty else "")) or None


def _markdown(res: dict) -> str:
    lines = [f"# Cost of the fused entropy + top-1 outputs (CPU, {res['date']})", "",
             f"{res['machine']}; torch {res['torch']}, {res['threads']} threads; "
             f"H = {H}, V = {V}, fp32; backend `{res['backend']}`; package "
             f"{res.get('iwsft_kernels_git')}; `{res.get('command', 'python -m bench.bench_outputs')}`.",
             "",
             "| what | N (targets) | off: median s | on: median s | on / off (median of pairs) "
             "| range over pairs |", "|---|---|---|---|---|---|"]
    for r in res["cells"]:
        lines.append(f"| {r['what']}, mode {r['mode']} | {r['n']} ({r['targets']}) | "
                     f"{r['off_median_s']:.3f} | {r['on_median_s']:.3f} | "
                     f"{r['ratio_median']:.3f} ({(r['ratio_median'] - 1) * 100:+.1f}%) | "
                     f"{r['ratio_min']:.3f} - {r['ratio_max']:.3f} |")
    lines += ["", "Target: <= 5% extra time (on / off <= 1.05)."]
    if res.get("note"):
        lines += ["", res["note"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="N = 512, 3 pairs, train step only")
    ap.add_argument("--ns", type=int, nargs="+", default=None)
    ap.add_argument("--pairs", type=int, default=None)
    ap.add_argument("--mode", default="sequence", choices=["sft", "token", "sequence"])
    ap.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: torch's). On a machine shared with "
                         "other jobs, 1 thread measures the work; more threads add the cost of "
                         "every small parallel op waiting for a descheduled thread")
    ap.add_argument("--out", default=None, help="results stem (default bench/results/"
                                                "outputs-cpu-<date>)")
    a = ap.parse_args(argv)
    _check_api()
    if a.threads:
        torch.set_num_threads(a.threads)
    ns = a.ns or ([512] if a.quick else [512, 1024])
    pairs = a.pairs or (3 if a.quick else 5)
    date = _dt.date.today().isoformat()
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load " \
              f"average {os.getloadavg()[0]:.1f} at the start"
    res = {"date": date, "quick": a.quick, "backend": a.backend, "torch": torch.__version__,
           "threads": torch.get_num_threads(), "machine": machine,
           "iwsft_kernels_git": _git_rev(),
           "command": "python -m bench.bench_outputs " + " ".join(argv if argv is not None
                                                                 else sys.argv[1:]),
           "cells": []}
    stem = Path(a.out) if a.out else RESULTS / f"outputs-cpu-{date}"
    for n in ns:
        for grad in ((True,) if a.quick else (True, False)):
            t0 = time.perf_counter()
            cell = measure(n, pairs, a.mode, a.backend, grad)
            res["cells"].append(cell)
            print(f"N={n} {cell['what']}: off {cell['off_median_s']:.3f} s, on "
                  f"{cell['on_median_s']:.3f} s, on/off {cell['ratio_median']:.3f} "
                  f"[{cell['ratio_min']:.3f}, {cell['ratio_max']:.3f}] "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
            stem.parent.mkdir(parents=True, exist_ok=True)
            stem.with_suffix(".json").write_text(json.dumps(res, indent=1))
            stem.with_suffix(".md").write_text(_markdown(res))
    print(f"wrote {stem.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
