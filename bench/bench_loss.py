"""Loss microbenchmark: ours (sft / token / sequence, torch and Triton backends) vs the field.

    python -m bench.bench_loss --quick            # ~2 min on 2 idle cores: naive vs ours, N 512
    python -m bench.bench_loss --device cpu       # full CPU set: every peer, N in {512, 2048}
    python -m bench.bench_loss                    # GPU set: 0.5B/7B/32B heads, N up to 32768, bf16
    python -m bench.plot bench/results/<file>.json

--quick is the Qwen2.5-0.5B head (fp32) at N = 512 with one rep, naive torch vs ours in the
three modes (torch backend), written to <device>-<date>-quick.{json,md}; add peers with
--impls, or `--heads qwen-vocab-h128` for a lighter head (H = 128, not a real model). Durations
of each form: bench/README.md. Without CUDA, no option = --device cpu.

Per cell (implementation x head x N) it records: forward ms and forward+backward ms (medians;
CUDA events on GPU, wall clock on CPU), peak extra memory beyond inputs and gradient buffers
(torch.cuda.max_memory_allocated on GPU; peak RSS of a fresh subprocess per cell on CPU),
TFLOP/s on 6NHV / (forward+backward time), the percentage of the rate of a bare matmul of the
same shapes measured in the same run, and relative errors of loss, dH and dW against a chunked
oracle (float64 on CPU, float32 with TF32 off on GPU). OOM is recorded as OOM.

"forward ms" is the training forward (inputs require grad): fused implementations (ours, Liger,
CCE, torch's chunked linear CE, the compiled chunked CE) compute their gradients inside forward,
so for them forward ~ forward+backward; compare forward+backward across implementations.
Results: bench/results/<device>-<date>.json and .md (the JSON is rewritten after every cell).
"""
from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # allow `python bench/bench_loss.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.impls import Impl, get_impls
from bench.oracle import BenchInputs, make_inputs, make_ref_logprobs, oracle, rel_err

REPO = Path(__file__).resolve().parents[1]
HEADS = {  # Qwen2.5 lm_head shapes (H, V)
    "0.5b": (896, 151936),
    "7b": (3584, 152064),
    "32b": (5120, 152064),
    "qwen-vocab-h128": (128, 151936),  # Qwen2.5's vocabulary, H = 128: not a real model head
    "tiny": (64, 4096),  # smoke tests only
}
QUICK_IMPLS = ["naive", "ours-sft-torch", "ours-token-torch", "ours-sequence-torch"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
RESULT_TAG = "@@RESULT "


# --------------------------------------------------------------------------- timing / memory


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clear_grads(inp: BenchInputs):
    inp.hidden.grad = None
    inp.weight.grad = None


def _time_ms(f, reps: int, device: torch.device, before=None) -> list[float]:
    out = []
    for _ in range(reps):
        if before is not None:
            before()
        _sync(device)
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            r = f()
            end.record()
            torch.cuda.synchronize(device)
            out.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            r = f()
            out.append((time.perf_counter() - t0) * 1e3)
        del r
    return out


def cpu_seconds() -> float:
    """user + sys CPU time of this process and of its finished children (less sensitive to the
    machine's load than wall time)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class _MemProbe:
    """Peak bytes allocated during the block, minus what was allocated before it.

    CUDA: torch.cuda.max_memory_allocated. CPU: VmHWM after resetting it through
    /proc/self/clear_refs, minus VmRSS at the start (after malloc_trim), i.e. peak RSS.
    """

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            except OSError:
                pass
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.base = _proc_status_kb("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak = _proc_status_kb("VmHWM") * 1024
        return False

    @property
    def extra(self) -> int:
        return self.peak - self.base


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    msg = str(e)
    return "out of memory" in msg.lower() or "can't allocate memory" in msg


# --------------------------------------------------------------------------- one cell


def measure_cell(impl: Impl, inp: BenchInputs, device: torch.device, refs, *, reps: int,
                 warmup: int, opts: dict, matmul_in_cell: bool = False) -> dict:
    """Run one implementation on one input set; refs: {mode: (loss, dH, dW)} or None."""
    rec: dict = {}
    fn = impl.build(inp, opts)

    def step():
        _clear_grads(inp)
        loss = fn()
        loss.backward()
        return loss

    # warm-up calls: always on GPU; on CPU only for impls that compile (the rest are eager
    # and a CPU call at these shapes costs seconds)
    for _ in range(warmup if (device.type == "cuda" or impl.jit) else 0):
        step()
    _clear_grads(inp)
    grad_bytes = sum(t.numel() * t.element_size() for t in (inp.hidden, inp.weight))

    with _MemProbe(device) as probe:
        loss = step()
    rec["extra_mem_bytes"] = int(probe.extra - grad_bytes)
    rec["loss"] = float(loss.detach())
    if refs is not None:
        ref_loss, ref_dh, ref_dw = refs[impl.mode]
        rec["err_loss"] = abs(rec["loss"] - float(ref_loss)) / max(abs(float(ref_loss)), 1e-30)
        rec["err_dh"] = rel_err(inp.hidden.grad, ref_dh)
        rec["err_dw"] = rel_err(inp.weight.grad, ref_dw)
    del loss
    _clear_grads(inp)

    # forward and forward+backward reps interleaved, so that both see the same machine load
    fwd, fb, mm = [], [], []
    with torch.enable_grad():
        for _ in range(reps):
            fwd += _time_ms(fn, 1, device, before=lambda: _clear_grads(inp))
            fb += _time_ms(step, 1, device, before=lambda: _clear_grads(inp))
            if matmul_in_cell:  # CPU: the bare-GEMM rate under this cell's load
                _clear_grads(inp)
                mm.append(matmul_rate(*inp.hidden.shape, inp.weight.shape[0], inp.hidden.dtype,
                                      device, reps=1, warm=False)["matmul_tflops"])
    _clear_grads(inp)
    if mm:
        rec["matmul_tflops_cell"] = statistics.median(mm)
    rec["fwd_ms"] = statistics.median(fwd)
    rec["fwdbwd_ms"] = statistics.median(fb)
    rec["fwd_ms_all"] = fwd
    rec["fwdbwd_ms_all"] = fb
    return rec


def matmul_rate(n: int, h: int, v: int, dtype, device: torch.device, reps: int,
                warm: bool = True) -> dict:
    """Time the three bare GEMMs of 6NHV: Z = X W^T, dX = G W, dW = G^T X (after one untimed
    call each if ``warm``)."""
    g = torch.Generator(device=device).manual_seed(123)
    x = torch.randn(n, h, generator=g, device=device, dtype=dtype)
    w = torch.randn(v, h, generator=g, device=device, dtype=dtype)
    gz = torch.randn(n, v, generator=g, device=device, dtype=dtype)
    ms = {}
    for name, f in (("fwd", lambda: x @ w.T), ("dh", lambda: gz @ w), ("dw", lambda: gz.T @ x)):
        if warm:
            f()
        ms[name] = statistics.median(_time_ms(f, reps, device))
    total = sum(ms.values())
    return {"matmul_ms": total, "matmul_parts_ms": ms,
            "matmul_tflops": 6.0 * n * h * v / (total * 1e-3) / 1e12}


# --------------------------------------------------------------------------- orchestration


def device_slug(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu-{cpu_model()}-{os.cpu_count()}c"
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _versions() -> dict:
    v = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("triton", "liger_kernel", "cut_cross_entropy", "transformers"):
        try:
            from importlib.metadata import version
            name = {"liger_kernel": "liger-kernel", "cut_cross_entropy": "cut-cross-entropy"}.get(
                mod, mod)
            v[mod] = version(name)
        except Exception:
            v[mod] = None
    v["iwsft_kernels_git"] = _git_rev()
    return v


def _git_rev() -> str | None:
    """Short HEAD of the repo, '+dirty' if iwsft_kernels/ or csrc/ has uncommitted changes."""
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "iwsft_kernels",
                                "csrc"], capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev or "") + "+dirty" if dirty else rev
    except Exception:
        return None


def _base_record(impl: Impl, head: str, n: int, h: int, v: int, args) -> dict:
    return {"impl": impl.key, "label": impl.label, "mode": impl.mode, "family": impl.family,
            "head": head, "N": n, "H": h, "V": v, "dtype": args.dtype, "flops_6nhv": 6.0 * n * h * v}


def _finish_record(rec: dict, mm: dict | None):
    if rec.get("status") == "ok" and rec.get("fwdbwd_ms"):
        rec["tflops"] = rec["flops_6nhv"] / (rec["fwdbwd_ms"] * 1e-3) / 1e12
        ref_rate = rec.get("matmul_tflops_cell") or (mm or {}).get("matmul_tflops")
        if ref_rate:
            rec["pct_matmul"] = 100.0 * rec["tflops"] / ref_rate


def _oracle_refs(inp: BenchInputs, device: torch.device, chunk_rows: int):
    odt = torch.float64 if device.type == "cpu" else torch.float32
    logp, _ = oracle(inp, dtype=odt, chunk_rows=chunk_rows)
    inp.ref_logprobs = make_ref_logprobs(logp, inp.labels, inp.cu_seqlens).to(device)
    _, refs = oracle(inp, dtype=odt, chunk_rows=chunk_rows, ref_logprobs=inp.ref_logprobs)
    return refs


class Runner:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.t0 = time.time()
        self.cpu0 = cpu_seconds()
        self.meta = {
            "device": self.device.type,
            "device_name": (torch.cuda.get_device_name(self.device) if self.device.type == "cuda"
                            else cpu_model()),
            "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "date": _dt.datetime.now().isoformat(timespec="seconds"),
            "versions": _versions(), "args": {k: v for k, v in vars(args).items() if k != "_task"},
            "oracle": "float64 (CPU)" if self.device.type == "cpu" else "float32, TF32 off (GPU)",
            "matmul": {}, "notes": [],
        }
        self.records: list[dict] = []
        out_dir = Path(args.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = args.out_stem or (f"{device_slug(self.device)}-{_dt.date.today().isoformat()}"
                                 + ("-quick" if args.quick else ""))
        self.json_path = out_dir / f"{stem}.json"
        self.md_path = out_dir / f"{stem}.md"
        if args.update and self.json_path.exists():  # re-measure some cells, keep the rest
            old = json.loads(self.json_path.read_text())
            self.records = old["records"]
            self.meta["notes"] = old["meta"].get("notes", []) + [
                f"{self.meta['date']}: re-measured {args.impls or 'all impls'} at heads "
                f"{args.heads}, N {args.ns} (package {self.meta['versions']['iwsft_kernels_git']});"
                f" other cells from the run of {old['meta']['date']}"]
            self.meta["matmul"] = old["meta"].get("matmul", {})

    def over_budget(self) -> bool:
        return self.args.time_budget > 0 and time.time() - self.t0 > self.args.time_budget

    def save(self):
        self.meta["elapsed_s"] = round(time.time() - self.t0, 1)
        self.meta["cpu_s"] = round(cpu_seconds() - self.cpu0, 1)
        self.meta["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        data = {"meta": self.meta, "records": self.records}
        for path, text in ((self.json_path, json.dumps(data, indent=1)),
                           (self.md_path, render_markdown(data))):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, path)  # atomic: a run killed mid-write keeps the last full file

    def add(self, rec: dict, mm: dict | None):
        _finish_record(rec, mm)
        self.records = [r for r in self.records if (r["impl"], r["head"], r["N"])
                        != (rec["impl"], rec["head"], rec["N"])]
        rec["loadavg_1m_after"] = round(os.getloadavg()[0], 2)  # CPU contention indicator
        self.records.append(rec)
        self.save()
        st = rec["status"]
        if st == "ok":
            line = (f"fwd {rec['fwd_ms']:.1f} ms  fwd+bwd {rec['fwdbwd_ms']:.1f} ms  "
                    f"{rec.get('tflops', 0):.3f} TFLOP/s  extra {rec['extra_mem_bytes'] / 2**20:.0f} MiB"
                    f"  err dW {rec.get('err_dw', float('nan')):.1e}")
        else:
            line = f"{st} {rec.get('note', '')}"
        print(f"[{time.time() - self.t0:7.1f}s] {rec['head']:>4} N={rec['N']:<6} "
              f"{rec['impl']:<22} {line}", flush=True)

    def run(self):
        impls = get_impls(self.args.impls)
        for head in self.args.heads:
            h, v = HEADS[head]
            for n in self.args.ns:
                if self.device.type == "cuda" or self.args.inprocess:
                    self._run_shape_inprocess(impls, head, n, h, v)
                else:
                    self._run_shape_subprocess(impls, head, n, h, v)
        self.save()
        m = self.meta
        print(f"wrote {self.json_path} and {self.md_path}: {m['elapsed_s']:.0f} s wall, "
              f"{m['cpu_s']:.0f} s CPU (user+sys, all processes), load average "
              f"{'/'.join(f'{x:.1f}' for x in m['loadavg_end'])} at the end")

    # -- GPU (or --inprocess): everything in this process
    def _run_shape_inprocess(self, impls, head, n, h, v):
        args, dev = self.args, self.device
        key = f"{head}-N{n}"
        if self.over_budget():
            for impl in impls:
                self.add({**_base_record(impl, head, n, h, v, args), "status": "skipped",
                          "note": "time budget"}, None)
            return
        torch.backends.cuda.matmul.allow_tf32 = False
        odt = torch.float32 if dev.type == "cuda" else torch.float64
        try:
            inp = make_inputs(n, h, v, seq_len=args.seq_len, dtype=DTYPES[args.dtype],
                              device=dev, seed=args.seed)
            refs = None
            if args.accuracy and n <= args.acc_max_n:
                refs = _oracle_refs(inp, dev, chunk_rows=args.oracle_chunk_rows)
                refs = {m: (float(l), _to_pinned(dh), _to_pinned(dw)) for m, (l, dh, dw)
                        in refs.items()}  # host copies: cells then see only their inputs
                gc.collect()
                _empty_cache(dev)
            else:  # ref log-probs still needed by the iw modes
                logp, _ = oracle(inp, dtype=odt, chunk_rows=args.oracle_chunk_rows)
                inp.ref_logprobs = make_ref_logprobs(logp, inp.labels, inp.cu_seqlens).to(dev)
                del logp
            mm = matmul_rate(n, h, v, DTYPES[args.dtype], dev, reps=args.reps)
        except Exception as e:
            note = "OOM" if _is_oom(e) else f"{type(e).__name__}: {e}"[:200]
            for impl in impls:
                self.add({**_base_record(impl, head, n, h, v, args), "status": "error",
                          "note": f"setup failed: {note}"}, None)
            _empty_cache(dev)
            return
        self.meta["matmul"][key] = mm
        print(f"bare matmul {key}: {mm['matmul_tflops']:.1f} TFLOP/s", flush=True)
        for impl in impls:
            rec = _base_record(impl, head, n, h, v, args)
            why = impl.unavailable(dev)
            if why:
                rec.update(status="n/a", note=why)
            elif self.over_budget():
                rec.update(status="skipped", note="time budget")
            else:
                try:
                    rec.update(measure_cell(impl, inp, dev, refs, reps=args.reps,
                                            warmup=args.warmup, opts=_impl_opts(args)))
                    rec["status"] = "ok"
                except Exception as e:
                    if _is_oom(e):
                        rec.update(status="OOM", note="out of memory")
                    else:
                        rec.update(status="error", note=f"{type(e).__name__}: {e}"[:300])
                        traceback.print_exc()
                _clear_grads(inp)
                gc.collect()
                _empty_cache(dev)
            self.add(rec, mm)
        del inp, refs
        gc.collect()
        _empty_cache(dev)

    # -- CPU: one fresh subprocess per cell (peak RSS), oracle cached on disk
    def _run_shape_subprocess(self, impls, head, n, h, v):
        args = self.args
        key = f"{head}-N{n}"
        cache = Path(args.cache_dir) / (f"H{h}_V{v}_N{n}_seq{args.seq_len}_seed{args.seed}_"
                                        f"{args.dtype}")
        base_task = {"head": head, "N": n, "H": h, "V": v, "dtype": args.dtype,
                     "seq_len": args.seq_len, "seed": args.seed, "cache": str(cache),
                     "oracle_chunk_rows": args.oracle_chunk_rows, "reps": args.reps,
                     "warmup": args.warmup, "opts": _impl_opts(args),
                     "accuracy": bool(args.accuracy and n <= args.acc_max_n)}
        if not (cache / "done").exists():
            print(f"oracle {key} (float64) ...", flush=True)
            res, err = _spawn({**base_task, "kind": "oracle"}, args.cell_timeout)
            if res is None:
                raise SystemExit(f"oracle failed for {key}: {err}")
        res, err = _spawn({**base_task, "kind": "matmul"}, args.cell_timeout)
        mm = res if res is not None else None
        if mm:
            self.meta["matmul"][key] = mm
            print(f"bare matmul {key}: {mm['matmul_tflops'] * 1e3:.1f} GFLOP/s", flush=True)
        for impl in impls:
            rec = _base_record(impl, head, n, h, v, args)
            why = impl.unavailable(self.device)
            if why:
                rec.update(status="n/a", note=why)
            elif self.over_budget():
                rec.update(status="skipped", note="time budget")
            else:
                res, err = _spawn({**base_task, "kind": "cell", "impl": impl.key},
                                  args.cell_timeout)
                if res is not None:
                    rec.update(res)
                else:
                    rec.update(status="OOM" if err == "OOM" else "error", note=err)
            self.add(rec, mm)


def _to_pinned(t: torch.Tensor) -> torch.Tensor:
    if t.device.type != "cuda":
        return t
    out = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
    return out.copy_(t)


def _empty_cache(device: torch.device):
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _impl_opts(args) -> dict:
    return {"chunk_bytes": args.chunk_bytes, "peer_chunk_bytes": args.peer_chunk_bytes}


def _spawn(task: dict, timeout: float):
    """Run one task in a fresh interpreter; returns (result dict, None) or (None, reason)."""
    cmd = [sys.executable, "-m", "bench.bench_loss", "--_task", json.dumps(task)]
    cpu0 = cpu_seconds()
    try:
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"timeout after {timeout:.0f}s"
    for line in p.stdout.splitlines()[::-1]:
        if line.startswith(RESULT_TAG):
            res = json.loads(line[len(RESULT_TAG):])
            if isinstance(res, dict):  # the cell's process, start to end
                res["cpu_s"] = round(cpu_seconds() - cpu0, 2)
            return res, None
    tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or [""]
    if p.returncode in (-9, 137) or any(s in p.stderr for s in
                                         ("MemoryError", "can't allocate memory", "out of memory")):
        return None, "OOM"
    sys.stderr.write(p.stderr[-3000:])
    return None, f"rc={p.returncode}: {tail[0]}"[:300]


def _child(task: dict):
    """Body of a CPU subprocess: 'oracle', 'matmul' or 'cell'."""
    import numpy as np
    dev = torch.device("cpu")
    n, h, v = task["N"], task["H"], task["V"]
    dtype = DTYPES[task["dtype"]]
    cache = Path(task["cache"])
    if task["kind"] == "matmul":
        return matmul_rate(n, h, v, dtype, dev, reps=max(2, task["reps"]))
    inp = make_inputs(n, h, v, seq_len=task["seq_len"], dtype=dtype, device=dev, seed=task["seed"])
    if task["kind"] == "oracle":
        refs = _oracle_refs(inp, dev, chunk_rows=task["oracle_chunk_rows"])
        cache.mkdir(parents=True, exist_ok=True)
        np.save(cache / "ref_logprobs.npy", inp.ref_logprobs.numpy())
        losses = {}
        for m, (loss, dh, dw) in refs.items():
            losses[m] = float(loss)
            # stored as fp32: rounding adds ~6e-8 relative, far below fp32 kernels' errors
            np.save(cache / f"dh_{m}.npy", dh.float().numpy())
            np.save(cache / f"dw_{m}.npy", dw.float().numpy())
        (cache / "losses.json").write_text(json.dumps(losses))
        (cache / "done").write_text("ok")
        return {"ok": True}
    # cell
    inp.ref_logprobs = torch.from_numpy(np.load(cache / "ref_logprobs.npy"))
    impl = get_impls([task["impl"]])[0]

    class _LazyRefs(dict):  # loads the mode's arrays (mmap) only when accuracy is computed
        def __missing__(self, m):
            losses = json.loads((cache / "losses.json").read_text())
            val = (losses[m], torch.from_numpy(np.load(cache / f"dh_{m}.npy", mmap_mode="r")),
                   torch.from_numpy(np.load(cache / f"dw_{m}.npy", mmap_mode="r")))
            self[m] = val
            return val

    import warnings
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    refs = _LazyRefs() if task["accuracy"] else None
    rec = measure_cell(impl, inp, dev, refs, reps=task["reps"], warmup=task["warmup"],
                       opts=task["opts"], matmul_in_cell=True)
    rec["status"] = "ok"
    rec["iwsft_kernels_git"] = _git_rev()  # the package code this cell imported
    return rec


# --------------------------------------------------------------------------- markdown


def _fmt(x, spec):
    return "" if x is None else format(x, spec)


def _pkg_note(r: dict) -> str:
    rev = r.get("iwsft_kernels_git")
    return f"package {rev}" if rev and r.get("family") == "ours" else ""


def _load_range(recs) -> str:
    loads = [r["loadavg_1m_after"] for r in recs if r.get("status") == "ok"
             and "loadavg_1m_after" in r]
    return f"{min(loads):.1f}-{max(loads):.1f}" if loads else "n/a"


def render_markdown(data: dict) -> str:
    meta, recs = data["meta"], data["records"]
    ver = meta["versions"]
    lines = [f"# Loss benchmark: {meta['device_name']} ({meta['device']})", "",
             f"- date: {meta['date']}; elapsed {meta.get('elapsed_s', '?')} s"
             + (f", CPU time {meta['cpu_s']} s (user+sys, all processes)" if "cpu_s" in meta
                else ""),
             f"- CPU: {meta['cpu_model']}, {meta['cpu_count']} cores visible, torch threads "
             f"{meta['torch_threads']}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in ver.items() if v),
             f"- dtype {meta['args']['dtype']}, sequences of {meta['args']['seq_len']} tokens "
             f"(first 10% of each ignored), reps {meta['args']['reps']} (median), warmup "
             f"{meta['args']['warmup']}",
             "- 1-minute load average after each cell: "
             + _load_range(recs) + " (machine shared with other jobs; CPU timings are noisy)"
             if meta["device"] == "cpu" else "- GPU timings: CUDA events",
             f"- accuracy: relative error (Frobenius) vs a chunked {meta['oracle']} oracle; "
             "peers and `ours sft` vs the plain-CE oracle, `ours token/sequence` vs their own",
             "- fwd = training forward (inputs require grad; fused impls compute grads there); "
             "TFLOP/s = 6NHV / fwd+bwd; % mm = percent of the bare-matmul rate of the same "
             "three GEMMs measured in this run (CPU: in each cell's process, once per rep, "
             "between the reps); extra = peak memory beyond "
             "inputs and grads",
             ""]
    for key, mm in meta.get("matmul", {}).items():
        lines.append(f"- bare matmul {key}: {mm['matmul_tflops']:.3f} TFLOP/s "
                     f"({mm['matmul_ms']:.1f} ms for 6NHV)")
    for note in meta.get("notes", []):
        lines.append(f"- note: {note}")
    lines.append("")
    naive_mem = {(r["head"], r["N"]): r["extra_mem_bytes"] for r in recs
                 if r["impl"] == "naive" and r.get("status") == "ok"}
    heads = list(dict.fromkeys(r["head"] for r in recs))
    for head in heads:
        rs = [r for r in recs if r["head"] == head]
        lines += [f"## head {head} (H={rs[0]['H']}, V={rs[0]['V']})", "",
                  "| impl | N | fwd ms | fwd+bwd ms | TFLOP/s | % mm | extra MiB | vs naive mem "
                  "| err loss | err dH | err dW | note |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        order = {i.key: k for k, i in enumerate(get_impls())}
        for r in sorted(rs, key=lambda r: (r["N"], order.get(r["impl"], 99))):
            if r.get("status") != "ok":
                lines.append(f"| {r['label']} | {r['N']} | {r['status']} |  |  |  |  |  |  |  |  "
                             f"| {r.get('note', '')} |")
                continue
            nm = naive_mem.get((head, r["N"]))
            vs = f"{100.0 * r['extra_mem_bytes'] / nm:.1f}%" if nm else ""
            lines.append(
                f"| {r['label']} | {r['N']} | {r['fwd_ms']:.1f} | {r['fwdbwd_ms']:.1f} | "
                f"{_fmt(r.get('tflops'), '.3f')} | {_fmt(r.get('pct_matmul'), '.0f')} | "
                f"{r['extra_mem_bytes'] / 2**20:.0f} | {vs} | {_fmt(r.get('err_loss'), '.1e')} | "
                f"{_fmt(r.get('err_dh'), '.1e')} | {_fmt(r.get('err_dw'), '.1e')} | "
                f"{r.get('note', '')}{_pkg_note(r)} |")
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="~2 min on 2 idle CPU cores: CPU, 0.5B head, N = 512, fp32, 1 rep, "
                        f"impls {' '.join(QUICK_IMPLS)} (options given explicitly win); "
                        "files <device>-<date>-quick.*. The full CPU set: --device cpu")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--heads", nargs="+", choices=sorted(HEADS), default=None)
    p.add_argument("--ns", nargs="+", type=int, default=None)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--impls", nargs="+", default=None, help="subset of impl keys")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk-bytes", type=int, default=None,
                   help="our torch backend's logits chunk budget (default: the package's)")
    p.add_argument("--peer-chunk-bytes", type=int, default=1 << 30,
                   help="fp32 logits budget of the compiled chunked CE peer")
    p.add_argument("--no-accuracy", dest="accuracy", action="store_false")
    p.add_argument("--acc-max-n", type=int, default=1 << 30,
                   help="skip the oracle (accuracy columns) above this N")
    p.add_argument("--oracle-chunk-rows", type=int, default=None)
    p.add_argument("--time-budget", type=float, default=0,
                   help="seconds; cells after it are recorded as skipped (0 = none)")
    p.add_argument("--inprocess", action="store_true",
                   help="CPU: run cells in this process (the GPU code path; memory less exact)")
    p.add_argument("--cell-timeout", type=float, default=1800, help="CPU subprocess timeout, s")
    p.add_argument("--out-dir", default=str(REPO / "bench" / "results"))
    p.add_argument("--out-stem", default=None, help="file stem (default <device>-<date>)")
    p.add_argument("--cache-dir", default="/tmp/iwsft-bench-cache")
    p.add_argument("--update", action="store_true",
                   help="load the existing <stem>.json and replace only the cells run now")
    p.add_argument("--_task", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._task:
        return args
    if args.device is None:
        args.device = "cpu" if args.quick or not torch.cuda.is_available() else "cuda"
    gpu = args.device.startswith("cuda")
    if args.quick:
        args.ns = args.ns or [512]
        args.reps = args.reps or 1
        args.impls = args.impls or list(QUICK_IMPLS)
    args.heads = args.heads or (["0.5b"] if args.quick or not gpu else ["7b", "0.5b", "32b"])
    args.ns = args.ns or ([512, 2048] if not gpu else [2048, 8192, 16384, 32768])
    args.dtype = args.dtype or ("bf16" if gpu and not args.quick else "fp32")
    args.seq_len = args.seq_len or (2048 if gpu and not args.quick else 512)
    args.reps = args.reps or (5 if gpu else 2)
    args.oracle_chunk_rows = args.oracle_chunk_rows or (4096 if gpu else 256)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args._task:
        task = json.loads(args._task)
        try:
            res = _child(task)
        except Exception as e:
            if _is_oom(e):
                print(RESULT_TAG + json.dumps({"status": "OOM", "note": "out of memory"}))
                return
            raise
        print(RESULT_TAG + json.dumps(res), flush=True)
        return
    Runner(args).run()


if __name__ == "__main__":
    main()
