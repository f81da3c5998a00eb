"""Extra memory and time of our loss vs the naive path, as the batch grows (CPU).

    python -m bench.bench_chunk_budget --quick               # N 512, 1 rep: ~1 min idle
    python -m bench.bench_chunk_budget                       # N 512 and 2048, 3 reps
    python -m bench.bench_chunk_budget --chunk-bytes 134217728   # a fixed chunk budget instead

(Durations on 2 cores, idle and loaded: bench/README.md.)

Same inputs, implementations and memory probe as bench/bench_loss.py (Qwen2.5-0.5B head,
H = 896, V = 151,936, fp32, sequences of 512 with the first 10% ignored, forward+backward):
- extra memory = peak RSS beyond inputs and gradient buffers, each in a fresh subprocess,
  of the FIRST call ("cold": what bench_loss reports; includes one-time costs such as loading
  libraries) and of the SECOND call ("warm": the steady state of a training loop);
- time = median forward+backward wall time, naive and ours alternating in one process (so
  both see the same machine load), after one untimed call of each.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.bench_loss import HEADS, _clear_grads, _MemProbe, cpu_seconds
from bench.impls import get_impls
from bench.oracle import make_inputs

TAG = "@@CHUNK "
IMPLS = {"naive": "naive", "ours": "ours-{mode}-torch"}


def _build(which, n, args):
    h, v = HEADS["0.5b"]
    inp = make_inputs(n, h, v, seq_len=args.seq_len, dtype=torch.float32, device="cpu")
    key = IMPLS[which].format(mode=args.mode)
    if args.mode != "sft":
        inp.ref_logprobs = torch.where(inp.labels == -100, 0.0, -1.0)
    fn = get_impls([key])[0].build(inp, {"chunk_bytes": args.chunk_bytes})

    def step():
        _clear_grads(inp)
        loss = fn()
        loss.backward()
        return loss
    return inp, step


def _memory(which, n, args):
    inp, step = _build(which, n, args)
    grad_bytes = sum(t.numel() * t.element_size() for t in (inp.hidden, inp.weight))
    out = {}
    for name in ("cold", "warm"):
        _clear_grads(inp)
        with _MemProbe(torch.device("cpu")) as probe:
            step()
        out[name] = probe.extra - grad_bytes
    return out


def _times(n, args):
    steps = {w: _build(w, n, args)[1] for w in IMPLS}
    for s in steps.values():  # one untimed call each
        s()
    ts = {w: [] for w in steps}
    for _ in range(args.reps):
        for w, s in steps.items():
            t0 = time.perf_counter()
            s()
            ts[w].append(time.perf_counter() - t0)
    return ts


def _child(args):
    if args.child_mem:
        which, n = args.child_mem[0], int(args.child_mem[1])
        print(TAG + json.dumps(_memory(which, n, args)), flush=True)
    else:
        print(TAG + json.dumps(_times(int(args.child_time), args)), flush=True)


def _run(extra, args):
    cmd = [sys.executable, "-m", "bench.bench_chunk_budget", "--mode", args.mode,
           "--reps", str(args.reps), "--seq-len", str(args.seq_len)]
    if args.chunk_bytes is not None:
        cmd += ["--chunk-bytes", str(args.chunk_bytes)]
    r = subprocess.run(cmd + extra, capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1], env=dict(os.environ))
    for line in r.stdout.splitlines():
        if line.startswith(TAG):
            return json.loads(line[len(TAG):])
    raise RuntimeError(f"child failed: {r.stderr[-2000:]}")


def _r(xs):
    return "[" + ", ".join(f"{x:.2f}" for x in xs) + "]"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="N = 512 only, 1 timed rep (explicit --ns / --reps win)")
    p.add_argument("--ns", type=int, nargs="+", default=None, help="default 512 2048")
    p.add_argument("--mode", default="sft", choices=["sft", "token", "sequence"])
    p.add_argument("--reps", type=int, default=None, help="timed reps (default 3)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--chunk-bytes", type=int, default=None,
                   help="our chunk budget (default: the package's default)")
    p.add_argument("--child-mem", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--child-time", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.ns = args.ns or ([512] if args.quick else [512, 2048])
    args.reps = args.reps or (1 if args.quick else 3)
    if args.child_mem or args.child_time:
        return _child(args)
    t0, cpu0 = time.time(), cpu_seconds()
    from iwsft_kernels.core import chunk_rows_for

    h, v = HEADS["0.5b"]
    w = torch.empty(v, 1)
    print(f"# torch {torch.__version__}, threads {torch.get_num_threads()}, load "
          f"{os.getloadavg()[0]:.1f}, mode {args.mode}, chunk_bytes {args.chunk_bytes}")
    print("| N | M | chunk rows | naive extra MiB cold / warm | ours cold / warm | ours % of "
          "naive cold / warm | naive s | ours s | time ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in args.ns:
        m = n - n // args.seq_len * max(1, args.seq_len // 10)
        rows = chunk_rows_for(w, args.chunk_bytes, torch.float32, m)
        mem = {which: _run(["--child-mem", which, str(n)], args) for which in IMPLS}
        ts = _run(["--child-time", str(n)], args)
        med = {k: statistics.median(v_) for k, v_ in ts.items()}
        mib = {k: {c: b / 2**20 for c, b in d.items()} for k, d in mem.items()}
        pct = {c: 100 * mem["ours"][c] / mem["naive"][c] for c in ("cold", "warm")}
        print(f"| {n} | {m} | {rows} | {mib['naive']['cold']:.0f} / {mib['naive']['warm']:.0f} | "
              f"{mib['ours']['cold']:.0f} / {mib['ours']['warm']:.0f} | "
              f"{pct['cold']:.1f}% / {pct['warm']:.1f}% | {med['naive']:.2f} | {med['ours']:.2f} | "
              f"{med['ours'] / med['naive']:.2f} (reps {_r(ts['naive'])} / {_r(ts['ours'])}, load "
              f"{os.getloadavg()[0]:.1f}) |", flush=True)
    print(f"# {time.time() - t0:.0f} s wall, {cpu_seconds() - cpu0:.0f} s CPU (user+sys, all "
          f"processes), load average {'/'.join(f'{x:.1f}' for x in os.getloadavg())} at the end")


if __name__ == "__main__":
    main()
