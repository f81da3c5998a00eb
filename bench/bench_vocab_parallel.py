"""Vocabulary-parallel loss on CPU ranks: time of one forward+backward against tp = 1, the
communication it actually sends, and the memory per rank (docs/distributed.md).

    python -m bench.bench_vocab_parallel --quick   # N = 128, tp 1..4, 3 timed steps: ~1.5 min
    python -m bench.bench_vocab_parallel           # N = 512, 5 timed steps

Qwen2.5-0.5B head (H = 896, V = 151,936), fp32, iw-SFT in token mode (reference log-probs near
log 1/V, so the weights are not all clipped), torch backend (native epilogue when it loads),
one batch of N target rows; each configuration is its own group of gloo processes, all started
by this one script and timed IN TURN (round r starts with configuration r mod k: every
configuration sees the same machine load; the idle groups wait on a queue):
  tp=1 plain   linear_iwsft_loss without vocab_parallel (the baseline; native epilogue)
  tp=1 plain, pure torch   the same with IWSFT_NO_NATIVE=1: the epilogue every sharded
               configuration runs (NativeTorchOps has no native sharded epilogue)
  tp=1 vp      VocabParallel(None, 0, V) on a group of 1 (the machinery's own overhead)
  tp=k         k ranks, rank r holding rows [r V / k, (r + 1) V / k)
Every rank gets max(1, cores // k) torch threads (cores = os.cpu_count()), so the total
never exceeds the machine until k > cores (then ranks share cores: on 2 cores, tp = 3 and 4
are oversubscribed). THESE ARE CPU-RANK TIMINGS on a small shared machine, not a model of GPU
scaling: gloo collectives go through TCP on localhost, and the ranks compete for the same
memory bandwidth. GPU numbers wait for a lent GPU.

Measured per configuration: the median over the timed steps of the slowest rank's wall time
(all ranks start each step after a barrier), its ratio to tp=1 plain; the bytes each rank
passes to collectives per target row in one call (counted by wrapping torch.distributed's
all_reduce / all_gather in the workers). Memory per rank is computed from the shapes (the
weight shard, its fp32 dW, one fp32 logits chunk): RSS of processes that share the machine's
allocator state and torch's import is too noisy to attribute.

Writes bench/results/vocab-parallel-cpu-<date>.{json,md} (``--out`` to change the stem).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

H, V = 896, 151_936
RESULTS = Path(__file__).resolve().parent / "results"


_BLOCK = 4096  # W is drawn in blocks of rows, each from its own seed: any shard, same W


def _weight_rows(s: int, e: int, seed: int = 0) -> torch.Tensor:
    """Rows [s, e) of the benchmark's W without materialising the rest."""
    parts = []
    for b0 in range(s - s % _BLOCK, e, _BLOCK):
        g = torch.Generator().manual_seed(seed * 100_003 + b0)
        blk = torch.randn(min(_BLOCK, V - b0), H, generator=g) / H**0.5
        parts.append(blk[max(s - b0, 0): e - b0])
    return torch.cat(parts) if parts else torch.empty(0, H)


def _inputs(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, H, generator=g)
    y = torch.randint(0, V, (n,), generator=g)
    ref = -math.log(V) - torch.rand(n, generator=g)  # near the untrained model's log-probs
    cu = torch.arange(0, n + 1, 64).clamp(max=n)
    if int(cu[-1]) != n:
        cu = torch.cat([cu, torch.tensor([n])])
    return h, y, ref, cu


def _count_collectives(dist, tally):
    """Wrap all_reduce / all_gather: tally[kind] += bytes this rank passes in."""
    real_reduce, real_gather = dist.all_reduce, dist.all_gather

    def all_reduce(t, *a, **k):
        tally["all_reduce"] = tally.get("all_reduce", 0) + t.numel() * t.element_size()
        return real_reduce(t, *a, **k)

    def all_gather(out, t, *a, **k):
        tally["all_gather"] = tally.get("all_gather", 0) + t.numel() * t.element_size()
        return real_gather(out, t, *a, **k)

    dist.all_reduce, dist.all_gather = all_reduce, all_gather


def _worker(rank, world, store, n, vp_on, go, done, no_native=False):
    """One rank of one configuration: set up, one untimed step, then one timed step per token
    received on ``go`` (None: exit). Rank 0 reports the slowest rank's time on ``done``."""
    if no_native:
        os.environ["IWSFT_NO_NATIVE"] = "1"
    import torch.distributed as dist

    threads = max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    tally: dict = {}
    from iwsft_kernels import IWConfig, VocabParallel, linear_iwsft_loss
    from iwsft_kernels.core import chunk_rows_for

    h, y, ref, cu = _inputs(n)
    s, e = V * rank // world, V * (rank + 1) // world
    Wl = _weight_rows(s, e).requires_grad_()
    vp = VocabParallel(None, s, e) if vp_on else None
    cfg = IWConfig(mode="token")

    def step():
        hh = h.clone().requires_grad_()
        Wl.grad = None
        out = linear_iwsft_loss(hh, Wl, y, ref, cu_seqlens=cu, config=cfg, backend="torch",
                                vocab_parallel=vp)
        out.loss.backward()
        return float(out.loss.detach())

    _count_collectives(dist, tally)
    loss = step()  # untimed (native load, first-touch); its collectives are the tally
    comm = dict(tally)
    # memory of the rank beyond its inputs, from the shapes (docs/distributed.md): W shard
    # fp32 + its fp32 dW + one fp32 logits chunk (rows sized on the largest shard) + dH
    rows = chunk_rows_for(Wl, None, torch.float32, n)
    mem = dict(weight=(e - s) * H * 4, grad_weight=(e - s) * H * 4,
               logits_chunk=rows * (V // world + 1) * 4, grad_hidden=n * H * 4)
    done.put(("ready", rank))
    while True:
        token = go.get()
        if token is None:
            break
        dist.barrier()
        t0 = time.perf_counter()
        step()
        dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)  # the slowest rank
        done.put(("step", rank, float(dt)))
    if rank == 0:
        done.put(("final", dict(threads=threads, loss=loss, comm=comm, mem=mem)))
    dist.destroy_process_group()


def run_all(configs, n, reps):
    """Start every configuration's ranks at once, then time them in turn (round r starts at
    configuration r mod k), so that every configuration sees the same machine load."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as d:
        groups = []
        for i, (label, k, vp_on, no_native) in enumerate(configs):
            done = ctx.Queue()
            gos = [ctx.Queue() for _ in range(k)]
            procs = [ctx.Process(target=_worker, args=(r, k, os.path.join(d, f"store{i}"), n,
                                                       vp_on, gos[r], done, no_native))
                     for r in range(k)]
            for p in procs:
                p.start()
            groups.append((label, k, gos, done, procs))
        for label, k, gos, done, procs in groups:
            for _ in range(k):
                assert done.get(timeout=1800)[0] == "ready"
        times = {label: [] for label, *_ in groups}
        for r in range(reps):
            for j in range(len(groups)):
                label, k, gos, done, procs = groups[(r + j) % len(groups)]
                for q in gos:
                    q.put(1)
                got = [done.get(timeout=1800) for _ in range(k)]
                times[label].append(next(m[2] for m in got if m[1] == 0))
                print(f"  round {r + 1}/{reps} {label}: {times[label][-1] * 1e3:.0f} ms",
                      flush=True)
        finals = {}
        for label, k, gos, done, procs in groups:
            for q in gos:
                q.put(None)
            finals[label] = done.get(timeout=600)[1]
            for p in procs:
                p.join()
        return times, finals


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="N = 128, 3 timed steps")
    ap.add_argument("--n", type=int, default=None, help="target rows (default 512; 128 quick)")
    ap.add_argument("--reps", type=int, default=None, help="timed steps (default 5; 3 quick)")
    ap.add_argument("--tp", default="1,2,3,4", help="tensor-parallel sizes (default 1,2,3,4)")
    ap.add_argument("--out", default=None, help="output stem under bench/results/")
    ap.add_argument("--render", metavar="JSON", help="only redraw the .md of a result file")
    a = ap.parse_args(argv)
    if a.render:
        d = json.loads(Path(a.render).read_text())
        Path(a.render).with_suffix(".md").write_text(render(d["meta"], d["rows"]))
        return
    n = a.n or (128 if a.quick else 512)
    reps = a.reps or (3 if a.quick else 5)
    sizes = [int(v) for v in a.tp.split(",")]
    t_start = time.time()
    runs = [("tp=1 plain", 1, False, False), ("tp=1 plain, pure torch", 1, False, True)] + [
        (f"tp={k}" + (" vp" if k == 1 else ""), k, True, False) for k in sizes]
    times, finals = run_all(runs, n, reps)
    base = statistics.median(times["tp=1 plain"])
    rows = []
    for label, k, _, _ in runs:
        med = statistics.median(times[label])
        f = finals[label]
        comm = {kind: b / n for kind, b in f["comm"].items()}
        rows.append(dict(config=label, tp=k, threads_per_rank=f["threads"], median_s=med,
                         times_s=times[label], ratio_to_tp1=med / base, loss=f["loss"],
                         comm_bytes_per_row_per_rank=comm,
                         memory_mib_per_rank={m: b / 2**20 for m, b in f["mem"].items()}))
        print(f"{label:12s} {med * 1e3:9.1f} ms  x{med / base:5.2f}  comm/row/rank {comm}  "
              f"W+dW {(f['mem']['weight'] + f['mem']['grad_weight']) / 2**20:.0f} MiB/rank",
              flush=True)
    load = os.getloadavg()
    meta = dict(date=_dt.date.today().isoformat(), machine=platform.processor() or
                platform.machine(), cpus=os.cpu_count(), torch=torch.__version__,
                H=H, V=V, N=n, reps=reps, mode="token", dtype="float32", quick=a.quick,
                loadavg_end=load, wall_s=round(time.time() - t_start, 1))
    stem = a.out or f"vocab-parallel-cpu-{meta['date']}" + ("-quick" if a.quick else "")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    (RESULTS / f"{stem}.md").write_text(render(meta, rows))
    print(f"wrote {RESULTS / stem}.{{json,md}} ({meta['wall_s']:.0f} s)")


def render(meta, rows) -> str:
    """The Markdown table of a result (``--render JSON`` redraws it from the file)."""
    base = rows[0]
    bmin = min(base["times_s"])
    quick = meta.get("quick", meta["N"] == 128)
    md = [f"# Vocabulary-parallel loss on CPU ranks ({meta['date']})", "",
          f"CPU-RANK TIMINGS on {meta['cpus']} cores (gloo over localhost), not GPU scaling. "
          f"Qwen2.5-0.5B head H = {meta['H']}, V = {meta['V']:,}, N = {meta['N']} target rows, "
          f"fp32, token mode, forward + backward, {meta['reps']} steps of the slowest rank "
          f"per configuration, configurations timed in turn; torch {meta['torch']}; load "
          f"average at the end {meta['loadavg_end'][0]:.1f} on {meta['cpus']} cores; run took "
          f"{meta['wall_s']:.0f} s. Command: `python -m bench.bench_vocab_parallel"
          + (" --quick" if quick else "") + "`. Under load the steps spread up to 2-3x: the "
          "minimum (the step least disturbed by other jobs) is the steadier comparison.", "",
          "| config | threads/rank | steps (ms) | median ms | x tp=1 | min ms | x tp=1 (min) | "
          "all_reduce B/row/rank | all_gather B/row/rank | W + dW MiB/rank | "
          "logits chunk MiB/rank |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        c = r["comm_bytes_per_row_per_rank"]
        m = r["memory_mib_per_rank"]
        tmin = min(r["times_s"])
        md.append(f"| {r['config']} | {r['threads_per_rank']} | "
                  + ", ".join(f"{t * 1e3:.0f}" for t in r["times_s"])
                  + f" | {r['median_s'] * 1e3:.0f} | {r['ratio_to_tp1']:.2f} | "
                  f"{tmin * 1e3:.0f} | {tmin / bmin:.2f} | {c.get('all_reduce', 0):.1f} | "
                  f"{c.get('all_gather', 0):.2f} | {m['weight'] + m['grad_weight']:.0f} | "
                  f"{m['logits_chunk']:.0f} |")
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    main()
