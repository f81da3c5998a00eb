"""Tile-config and chunk-budget sweep of the Triton backend on an H100 (sm_90), bf16, at the
Qwen2.5-7B (H=3584) and -32B (H=5120) lm_head shapes (V=152,064).

    python -m bench.tune_sm90 --dry-run        # list the sweep and its time estimate (no GPU)
    python -m bench.tune_sm90 --out-dir DIR    # run it (CUDA only); DIR/tune-sm90-<date>.json

Three parts, each timed with CUDA events (median of --reps after one warm-up call):
  lse     the fused LSE kernel (triton_lse.lse_forward, phase 1 / linear_logprobs) on N rows,
          per candidate tile config; TFLOP/s on 2NHV.
  dw      the dW accumulation kernel (triton_grad_weight.accum_grad_weight) on one chunk of m
          rows (m = the rows of a 1 GiB and a 4 GiB logits chunk), per candidate; TFLOP/s on
          2mHV (its fp32 dW tile is read and written once per chunk, so small m is
          memory-bound: that is why the budget matters).
  budget  the whole loss (linear_iwsft_loss, sft, forward+backward, backend="triton") on N
          rows per chunk budget (chunk_bytes); TFLOP/s on 6NHV and peak extra memory.
The candidates are configs the sm_90 compile guard found clean (no spills, <= 227 KiB of
shared memory, wgmma) for aligned bf16 inputs: bench/results/sm90-report.md, "tune
candidates". Prints the best config per shape and writes everything to JSON; it changes no
defaults (copy a winner into iwsft_kernels/backends/triton_configs.py by hand).

Fails fast (exit 2) without a CUDA device.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # allow `python bench/tune_sm90.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

REPO = Path(__file__).resolve().parents[1]
HEADS = {"7b": (3584, 152064), "32b": (5120, 152064)}  # Qwen2.5 lm_head (H, V)
N_ROWS = 16384  # target tokens per step (8 x 2048)

# (BLOCK_M|BLOCK_V, BLOCK_N|BLOCK_H, BLOCK_K, num_warps, num_stages); the first of each is the
# current default (triton_configs.LSE_16BIT / GRAD_WEIGHT_16BIT).
LSE_CANDIDATES = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 128, 8, 3),
                  (64, 128, 64, 4, 3), (128, 64, 64, 8, 3)]
DW_CANDIDATES = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 128, 8, 3),
                 (64, 128, 64, 4, 3), (128, 64, 64, 8, 3)]
BUDGETS_MIB = [512, 1024, 2048, 4096]  # chunk_bytes of the loss sweep
DW_BUDGETS_MIB = [1024, 4096]  # the chunk sizes m of the dW sweep

# rough per-measurement costs on an H100 (seconds), for the dry-run estimate
_EST = {"compile": 3.0, "lse": 0.05, "dw": 0.01, "budget": 0.35}


def lse_cfg(c) -> dict:
    return dict(BLOCK_M=c[0], BLOCK_N=c[1], BLOCK_K=c[2], num_warps=c[3], num_stages=c[4])


def dw_cfg(c) -> dict:
    return dict(BLOCK_V=c[0], BLOCK_H=c[1], BLOCK_K=c[2], num_warps=c[3], num_stages=c[4])


def cfg_name(c) -> str:
    return f"{c[0]}x{c[1]}x{c[2]} w{c[3]} s{c[4]}"


def rows_for_budget(mib: int, V: int) -> int:
    from iwsft_kernels.backends.chunked import rows_per_chunk
    return rows_per_chunk(V, torch.bfloat16, mib * 2**20)


def sweep_plan(heads=("7b", "32b"), reps: int = 5) -> list[dict]:
    """Every measurement of the sweep, in order (no GPU needed)."""
    plan = []
    for head in heads:
        H, V = HEADS[head]
        for c in LSE_CANDIDATES:
            plan.append(dict(part="lse", head=head, H=H, V=V, N=N_ROWS, config=cfg_name(c),
                             cfg=lse_cfg(c)))
        for mib in DW_BUDGETS_MIB:
            m = rows_for_budget(mib, V)
            for c in DW_CANDIDATES:
                plan.append(dict(part="dw", head=head, H=H, V=V, m=m, chunk_mib=mib,
                                 config=cfg_name(c), cfg=dw_cfg(c)))
        for mib in BUDGETS_MIB:
            plan.append(dict(part="budget", head=head, H=H, V=V, N=N_ROWS, chunk_mib=mib,
                             rows_per_chunk=rows_for_budget(mib, V)))
    for p in plan:
        p["reps"] = reps
    return plan


def estimate_s(plan: list[dict]) -> float:
    """Expected wall time on an H100: compiles (one per distinct kernel config; the heads
    share them) plus (reps + 1) calls per measurement, scaled by the FLOPs of the 7B head."""
    compiles = len({(p["part"], p.get("config")) for p in plan if p["part"] != "budget"}) + 4
    t = compiles * _EST["compile"]
    for p in plan:
        scale = p["H"] / 3584
        t += (p["reps"] + 1) * _EST[p["part"]] * scale
    return t


# --------------------------------------------------------------------------- GPU


def _time_ms(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b))
    return out


@contextlib.contextmanager
def _forced(module, name, cfg):
    old = getattr(module, name)
    setattr(module, name, lambda *a, **k: dict(cfg))
    try:
        yield
    finally:
        setattr(module, name, old)


def _measure(p: dict, dev) -> dict:
    from iwsft_kernels.backends import triton_grad_weight, triton_lse
    g = torch.Generator(device=dev).manual_seed(0)
    H, V = p["H"], p["V"]
    bf = torch.bfloat16
    W = (torch.randn(V, H, generator=g, device=dev) / H**0.5).to(bf)
    if p["part"] == "lse":
        h = torch.randn(p["N"], H, generator=g, device=dev).to(bf)
        y = torch.randint(0, V, (p["N"],), generator=g, device=dev)
        with _forced(triton_lse, "lse_config", p["cfg"]):
            fn = lambda: triton_lse.lse_forward(h, W, None, y)  # noqa: E731
            fn()
            ms = _time_ms(fn, p["reps"])
        flops = 2.0 * p["N"] * H * V
    elif p["part"] == "dw":
        hc = torch.randn(p["m"], H, generator=g, device=dev).to(bf)
        G = (torch.randn(p["m"], V, generator=g, device=dev) * 1e-3).to(bf)
        dw = torch.zeros(V, H, device=dev)
        with _forced(triton_grad_weight, "grad_weight_config", p["cfg"]):
            fn = lambda: triton_grad_weight.accum_grad_weight(dw, G, hc)  # noqa: E731
            fn()
            ms = _time_ms(fn, p["reps"])
        flops = 2.0 * p["m"] * H * V
    else:
        from iwsft_kernels import linear_iwsft_loss
        h = torch.randn(p["N"], H, generator=g, device=dev).to(bf).requires_grad_()
        Wg = W.clone().requires_grad_()
        y = torch.randint(0, V, (p["N"],), generator=g, device=dev)

        def fn():
            h.grad = Wg.grad = None
            linear_iwsft_loss(h, Wg, y, backend="triton",
                              chunk_bytes=p["chunk_mib"] * 2**20).loss.backward()
        fn()
        h.grad = Wg.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        ms = _time_ms(fn, p["reps"])
        grads = (h.numel() + Wg.numel()) * 2
        p = dict(p, extra_mem_mib=round((torch.cuda.max_memory_allocated() - base - grads) / 2**20))
        flops = 6.0 * p["N"] * H * V
    med = statistics.median(ms)
    return {**{k: v for k, v in p.items() if k != "cfg"}, "cfg": p.get("cfg"),
            "ms": round(med, 3), "ms_all": [round(x, 3) for x in ms],
            "tflops": round(flops / (med * 1e-3) / 1e12, 1), "status": "ok"}


def best_per_shape(results: list[dict]) -> list[dict]:
    best = {}
    for r in results:
        if r.get("status") != "ok":
            continue
        key = (r["head"], r["part"], r.get("chunk_mib") if r["part"] == "dw" else None)
        if key not in best or r["ms"] < best[key]["ms"]:
            best[key] = r
    return list(best.values())


def run(args) -> dict:
    dev = torch.device("cuda")
    cap = torch.cuda.get_device_capability(dev)
    name = torch.cuda.get_device_name(dev)
    if cap != (9, 0):
        print(f"warning: {name} is sm_{cap[0]}{cap[1]}, not sm_90: the sweep still runs",
              flush=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    plan = sweep_plan(args.heads, args.reps)
    print(f"{len(plan)} measurements, expected ~{estimate_s(plan):.0f} s", flush=True)
    t0 = time.time()
    results = []
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"tune-sm90-{_dt.date.today().isoformat()}.json"
    meta = {"device": name, "capability": list(cap), "torch": torch.__version__,
            "date": _dt.datetime.now().isoformat(timespec="seconds"), "N": N_ROWS}
    try:
        import triton
        meta["triton"] = triton.__version__
    except Exception:
        pass
    for p in plan:
        if args.time_budget and time.time() - t0 > args.time_budget:
            results.append({**{k: v for k, v in p.items()}, "status": "skipped"})
            continue
        try:
            r = _measure(p, dev)
        except Exception as e:  # a config that fails is recorded, the sweep goes on
            r = {**p, "status": "error", "error": f"{type(e).__name__}: {e}"[:500]}
            torch.cuda.empty_cache()
        results.append(r)
        line = (f"{r['ms']:8.2f} ms {r['tflops']:6.1f} TFLOP/s" if r["status"] == "ok"
                else r["status"] + " " + r.get("error", ""))
        extra = (f" m={p['m']}" if p["part"] == "dw" else
                 f" chunk={p['chunk_mib']} MiB extra={r.get('extra_mem_mib')} MiB"
                 if p["part"] == "budget" else "")
        print(f"[{time.time() - t0:6.1f}s] {p['head']:>3} {p['part']:<6} "
              f"{p.get('config', ''):<18}{extra:<28} {line}", flush=True)
        data = {"meta": {**meta, "elapsed_s": round(time.time() - t0, 1)}, "results": results,
                "best": best_per_shape(results)}
        path.write_text(json.dumps(data, indent=1))
    print("best per shape:")
    for b in best_per_shape(results):
        what = b.get("config") or f"chunk_bytes={b['chunk_mib']} MiB"
        sub = f" (m={b['m']})" if b["part"] == "dw" else ""
        print(f"  {b['head']:>3} {b['part']:<6}{sub:<10} {what:<22} {b['ms']:.2f} ms "
              f"{b['tflops']:.1f} TFLOP/s")
    print(f"wrote {path} in {time.time() - t0:.0f} s")
    return data


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="list the sweep; needs no GPU")
    p.add_argument("--json", action="store_true", help="with --dry-run: print the plan as JSON")
    p.add_argument("--heads", nargs="+", choices=sorted(HEADS), default=["7b", "32b"])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--time-budget", type=float, default=0,
                   help="seconds; measurements after it are recorded as skipped (0 = none)")
    p.add_argument("--out-dir", default=str(REPO / "bench" / "results"))
    args = p.parse_args(argv)
    if args.dry_run:
        plan = sweep_plan(args.heads, args.reps)
        if args.json:
            print(json.dumps({"plan": plan, "estimate_s": estimate_s(plan)}))
            return 0
        for i, m in enumerate(plan):
            what = m.get("config") or f"chunk_bytes={m['chunk_mib']} MiB ({m['rows_per_chunk']} rows)"
            rows = f"m={m['m']}" if m["part"] == "dw" else f"N={m['N']}"
            print(f"{i:3d} {m['head']:>3} {m['part']:<6} H={m['H']} V={m['V']} {rows:<8} {what}")
        print(f"{len(plan)} measurements x ({args.reps} reps + 1 warm-up); expected "
              f"~{estimate_s(plan):.0f} s on an H100")
        return 0
    if not torch.cuda.is_available():
        print("tune_sm90: no CUDA device (torch.cuda.is_available() is False); this sweep "
              "times kernels on an H100. Use --dry-run to list it.", file=sys.stderr)
        return 2
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
