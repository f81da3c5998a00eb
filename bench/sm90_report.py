"""Ahead-of-time compile of every Triton kernel of the package for an H100 (sm_90a), on a
machine without a GPU or a CUDA driver.

    python -m bench.sm90_report                 # full matrix -> bench/results/sm90-report.{md,json}
    python -m bench.sm90_report --subset ci     # the subset tests/test_sm90_compile.py checks

How: the launch wrappers (through TritonOps, the interface the chunked algorithm calls) run on
`meta` tensors of the real shapes with every @triton.jit kernel of
iwsft_kernels/backends/triton_*.py replaced by a recorder, so that what is compiled is exactly
what a launch would pass (block sizes, warps, stages, constexprs, dot precision, the
aligned / unaligned path choice). Each recorded launch is specialised with Triton's own launch
code (`create_function_from_signature` + `_pack_args`: the signature, constexprs and the
16-divisibility attributes a real launch derives from the argument values and pointer
alignments) and compiled with `triton.compile(..., target=GPUTarget("cuda", 90, 32))`;
ptxas's log gives registers and spills, `metadata.shared` the dynamic shared memory, the PTX
the instructions (`wgmma.mma_async ... bf16/f16/tf32`, or FMA for IEEE fp32 dots).

Epilogue variants (the constexpr switches of the transform / fused outputs): every case runs
the identity transform without entropy (what the kernels were before the transforms, suffix
none); variant cases add `+lin` (scale and temperature: XF_MODE=1), `+cap` (soft cap with scale
and temperature: XF_MODE=2), `+H` (entropy: WANT_ENTROPY, and a z-loss zcoef, which the host
folds into per-row coefficients: no kernel variant) and `+cap+H`. Variant cases record only the
kernels that take the switches (LSE, row logsumexp, softmax gradient), not the dW kernel.

Two attribute modes per launch:
  launch  what a real launch of these arguments gets (Triton's specialisation);
  none    no divisibility / alignment attribute at all: the worst case. The launches that the
          wrappers send down the unaligned path are compiled this way, so the check holds for
          any unaligned input. The aligned configs are also compiled this way for information
          (they spill: that is why the unaligned path exists); those rows have `launched=no`.

Must run with TRITON_INTERPRET unset: under the interpreter `triton.language`'s own helpers
(tl.max, tl.sum, ...) are interpreter objects and cannot be compiled; tests run this module in
a subprocess (`run_subprocess`).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # allow `python bench/sm90_report.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

REPO = Path(__file__).resolve().parents[1]
SMEM_LIMIT = 232_448  # bytes of dynamic shared memory per block on sm_90 (227 KiB)
REG_LIMIT = 255
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One input set: dtype (+ fp32 dot precision as torch would set it), shapes, alignment."""
    name: str
    dtype: str  # bf16 | fp16 | fp32
    tf32: bool  # torch.backends.cuda.matmul.allow_tf32 during the launch
    M: int  # target rows (odd on purpose: no accidental divisibility)
    H: int
    V: int
    aligned: bool  # False: odd H, pointers offset by one element
    bias: bool = False
    variant: str = ""  # epilogue variant: "" | "lin" | "cap" | "H" | "cap+H" (VARIANTS)

    @property
    def full_name(self) -> str:
        return (self.name + ("+bias" if self.bias else "")
                + (f"+{self.variant}" if self.variant else ""))

    @property
    def label(self) -> str:
        prec = "" if self.dtype != "fp32" else ("+tf32" if self.tf32 else "+ieee")
        return f"{self.full_name} {self.dtype}{prec}"


SHAPES = {  # name: (M, H, V, aligned)
    "qwen7b": (4097, 3584, 152064, True),
    "qwen32b": (4097, 5120, 152064, True),
    "odd-vocab": (4097, 4096, 50257, True),  # V not a multiple of 16 (GPT-2's vocabulary)
    "unaligned": (4097, 3585, 50257, False),  # odd hidden size, pointers off by one element
}
PRECISIONS = [("bf16", False), ("fp16", False), ("fp32", True), ("fp32", False)]


def variant_args(variant: str):
    """(LogitTransform, want_entropy, with_zcoef) of an epilogue variant: a Gemma2-like soft
    cap (30) with a non-trivial scale and temperature; Granite/Cohere-like scale and a
    sampling temperature."""
    from iwsft_kernels.config import IDENTITY, LogitTransform
    xf = {"": IDENTITY, "H": IDENTITY,
          "lin": LogitTransform(scale=0.125, temperature=0.7),
          "cap": LogitTransform(scale=1.5, softcap=30.0, temperature=0.7),
          "cap+H": LogitTransform(scale=1.5, softcap=30.0, temperature=0.7)}[variant]
    want = variant.endswith("H")
    return xf, want, want


VARIANTS = ("", "lin", "cap", "H", "cap+H")
SWITCHES = ("XF_MODE", "WANT_ENTROPY", "HAS_BIAS")  # the epilogue constexprs, recorded per row


def cases(subset: str = "full") -> list[Case]:
    """full: every shape x dtype/precision. ci: every kernel and every config of
    triton_configs.py in both attribute modes, at one aligned and the unaligned shape."""
    with_bias = [("qwen7b", "bf16", False, True), ("unaligned", "bf16", False, True)]
    if subset == "full":
        combos = ([(s, d, t, False) for s in SHAPES for d, t in PRECISIONS] + with_bias
                  + [("unaligned", "fp32", False, True)])
        out = [Case(s, d, t, *SHAPES[s], bias=b) for s, d, t, b in combos]
        # every epilogue variant at every shape and precision (and with a bias)
        out += [Case(s, d, t, *SHAPES[s], bias=b, variant=v) for v in VARIANTS[1:]
                for s, d, t, b in combos]
        return out
    if subset == "ci":
        combos = [("qwen7b", "bf16", False, False), ("qwen7b", "fp32", True, False),
                  ("qwen7b", "fp32", False, False), ("odd-vocab", "fp16", False, False),
                  ("unaligned", "bf16", False, False), ("unaligned", "fp32", True, False),
                  ("unaligned", "fp32", False, False)] + with_bias
        out = [Case(s, d, t, *SHAPES[s], bias=b) for s, d, t, b in combos]
        # the heaviest variant (cap + entropy) at every precision, aligned and not; each
        # single switch at the 7B head in bf16
        heavy = [c for c in combos if c != ("unaligned", "bf16", False, True)]
        out += [Case(s, d, t, *SHAPES[s], bias=b, variant="cap+H") for s, d, t, b in heavy
                + [("unaligned", "fp32", False, True)]]
        out += [Case("qwen7b", "bf16", False, *SHAPES["qwen7b"], variant=v)
                for v in ("lin", "cap", "H")]
        return out
    raise ValueError(f"unknown subset {subset!r}")


# --------------------------------------------------------------------------- capture


def kernel_modules() -> list:
    from iwsft_kernels import backends
    return [importlib.import_module(f"iwsft_kernels.backends.{m.name}")
            for m in pkgutil.iter_modules(backends.__path__) if m.name.startswith("triton_")]


def all_kernels() -> dict:
    """{'module.kernel': JITFunction} for every @triton.jit kernel (a launched entry point,
    named ``*_kernel``) defined in the Triton backend. @triton.jit device functions (helpers
    that kernels call, e.g. triton_epilogue.tile_max_rest) are compiled inside the kernels
    that call them; a module that merely imports a JIT function does not count it again."""
    from triton.runtime.jit import JITFunction
    out = {}
    for mod in kernel_modules():
        for name, obj in vars(mod).items():
            if (isinstance(obj, JITFunction) and name.endswith("_kernel")
                    and getattr(obj.fn, "__module__", None) == mod.__name__):
                out[f"{mod.__name__.rsplit('.', 1)[1]}.{name}"] = obj
    return out


@dataclass
class Launch:
    kernel: str
    fn: object  # JITFunction
    args: tuple
    kwargs: dict


class _Recorder:
    def __init__(self, name, fn, sink):
        self.name, self.fn, self.sink = name, fn, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append(Launch(self.name, self.fn, args, dict(kwargs)))
        return launch


@contextlib.contextmanager
def recording():
    """Replace every kernel of the Triton backend by a recorder; yields the launch list."""
    launches: list[Launch] = []
    patched = []
    kernels = all_kernels()
    for mod in kernel_modules():
        for attr, obj in list(vars(mod).items()):
            for qual, fn in kernels.items():
                if obj is fn:
                    patched.append((mod, attr, obj))
                    setattr(mod, attr, _Recorder(qual, fn, launches))
    try:
        yield launches
    finally:
        for mod, attr, obj in patched:
            setattr(mod, attr, obj)


def _meta(shape, dtype, offset=0):
    n = 1
    for s in shape:
        n *= s
    return torch.empty(n + offset, dtype=dtype, device="meta")[offset:].view(shape)


def capture_case(case: Case) -> list[Launch]:
    """Drive TritonOps through one chunk of the algorithm on meta tensors; returns the
    launches: LSE (phase 1), row logsumexp, softmax gradient, dW (16-bit; identity variant
    only: the dW kernel has no epilogue switch)."""
    from iwsft_kernels.backends.triton_ops import TritonOps
    from iwsft_kernels.backends.triton_configs import interpreting
    if interpreting():
        raise RuntimeError("TRITON_INTERPRET is set: the CUDA configs would not be chosen "
                           "(run this in a process without it: run_subprocess)")
    dt = DTYPES[case.dtype]
    off = 0 if case.aligned else 1
    h = _meta((case.M, case.H), dt, off)
    W = _meta((case.V, case.H), dt, off)
    y = _meta((case.M + 1,), torch.int64)[1:]  # the chunk's labels: a slice (8-byte offset)
    b = _meta((case.V,), dt, off) if case.bias else None
    xf, want_entropy, with_zcoef = variant_args(case.variant)
    ops = TritonOps()
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = case.tf32
    try:
        with recording() as launches:
            ops.logprobs(h, W, b, y, case.M, xf, want_entropy)
            r = torch.empty(case.M, case.V, dtype=torch.float32, device="meta")
            rows, state = ops.chunk_forward(r, y, xf, want_entropy)
            coef = torch.empty(case.M, dtype=torch.float32, device="meta")
            zcoef = torch.empty(case.M, dtype=torch.float32, device="meta") if with_zcoef else None
            g = ops.softmax_grad(state, y, rows, coef, zcoef, xf, dt)
            if not case.variant:
                dW = torch.empty(case.V, case.H, dtype=torch.float32, device="meta")
                ops.accum_grad_weight(dW, g, h)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    return launches


def tune_launches() -> list:
    """(case, launch) of every tile candidate of bench/tune_sm90.py for the LSE and dW
    kernels, at the 7B head in bf16 (aligned)."""
    from bench import tune_sm90
    from iwsft_kernels.backends import triton_grad_weight, triton_lse
    case = Case("qwen7b", "bf16", False, *SHAPES["qwen7b"])
    out = []
    for mod, attr, cands, make, kern in (
            (triton_lse, "lse_config", tune_sm90.LSE_CANDIDATES, tune_sm90.lse_cfg, "lse_forward"),
            (triton_grad_weight, "grad_weight_config", tune_sm90.DW_CANDIDATES,
             tune_sm90.dw_cfg, "grad_weight")):
        for c in cands:
            old = getattr(mod, attr)
            setattr(mod, attr, lambda *a, _c=make(c), **k: dict(_c))
            try:
                out += [(case, la) for la in capture_case(case) if kern in la.kernel]
            finally:
                setattr(mod, attr, old)
    return out


# --------------------------------------------------------------------------- compile


_BACKEND = None
_CACHE: dict = {}


def _backend():
    global _BACKEND
    if _BACKEND is None:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        target = GPUTarget("cuda", 90, 32)
        _BACKEND = (target, make_backend(target))
    return _BACKEND


def _config_str(kw: dict) -> str:
    blocks = [str(v) for k, v in kw.items() if k.startswith("BLOCK_")]
    s = "x".join(blocks)
    stages = f" s{kw['num_stages']}" if "num_stages" in kw else ""
    return f"{s} w{kw.get('num_warps', 4)}{stages}"


def _mma(ptx: str) -> str:
    m = re.search(r"wgmma\.mma_async\.sync\.aligned\.m\d+n\d+k\d+\.f32\.(\w+)\.", ptx)
    if m:
        return "wgmma." + m.group(1)
    if re.search(r"\bmma\.sync\.aligned\.", ptx):
        return "mma.sync"
    return "-"


def compile_launch(launch: Launch, attrs_mode: str) -> dict:
    """Compile one recorded launch for sm_90a; attrs_mode 'launch' (a real launch's
    specialisation) or 'none' (no divisibility attributes)."""
    import triton
    from triton.compiler import ASTSource
    from triton.runtime.jit import create_function_from_signature

    target, backend = _backend()
    fn = launch.fn
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*launch.args, **launch.kwargs)
    if attrs_mode == "none":
        spec = [(ty, "" if isinstance(a, str) else a) for ty, a in spec]
    elif attrs_mode != "launch":
        raise ValueError(attrs_mode)
    options, signature, constexprs, attrs = fn._pack_args(backend, dict(launch.kwargs), bound,
                                                          spec, opts)
    key = (launch.kernel, repr(sorted(signature.items())), repr(sorted(constexprs.items())),
           repr(sorted(attrs.items())), repr(sorted(options.__dict__.items())))
    if key in _CACHE:
        return dict(_CACHE[key], cached=True)
    triton.knobs.nvidia.dump_ptxas_log = True
    triton.knobs.compilation.always_compile = True
    buf = io.StringIO()
    t0 = time.perf_counter()
    rec = {"kernel": launch.kernel, "config": _config_str(launch.kwargs),
           "switches": {k: launch.kwargs[k] for k in SWITCHES if k in launch.kwargs}}
    try:
        with contextlib.redirect_stdout(buf):
            ck = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                options=options.__dict__)
    except Exception as e:  # recorded, and fails the check
        rec.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000])
    else:
        log, ptx = buf.getvalue(), ck.asm["ptx"]
        regs = re.search(r"Used (\d+) registers", log)
        spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
        if not (regs and spill):
            rec.update(ok=False, error="no ptxas register/spill report in the log:\n" + log[-2000:])
        else:
            rec.update(ok=True, registers=int(regs.group(1)),
                       spill_stores=int(spill.group(1)), spill_loads=int(spill.group(2)),
                       shared=int(ck.metadata.shared), mma=_mma(ptx),
                       fma_f32="fma.rn.f32" in ptx,
                       arch=(re.search(r"^\.target\s+(\w+)", ptx, re.M) or [None, "?"])[1])
    rec["compile_s"] = round(time.perf_counter() - t0, 2)
    rec["n_divisible_args"] = sum(1 for v in attrs.values() if v)
    _CACHE[key] = rec
    return dict(rec, cached=False)


# --------------------------------------------------------------------------- checks


def expected_mma(kernel: str, dtype: str, tf32: bool) -> str | None:
    """The instruction the kernel's tile dot must lower to; None for kernels without dots."""
    from iwsft_kernels.backends import triton_configs  # noqa: F401 (documents the source)
    if not any(k in kernel for k in ("lse_forward", "grad_weight")):
        return None
    if dtype == "fp32":
        return "wgmma.tf32" if tf32 else "-"
    return {"bf16": "wgmma.bf16", "fp16": "wgmma.f16"}[dtype]


def problems(row: dict) -> list[str]:
    """Why a row that a real launch can produce is not clean (empty list: clean)."""
    if not row.get("ok"):
        return [f"does not compile: {row.get('error', '?')[:300]}"]
    out = []
    if row["spill_stores"] or row["spill_loads"]:
        out.append(f"spills {row['spill_stores']}/{row['spill_loads']} bytes (stores/loads)")
    if row["registers"] > REG_LIMIT:
        out.append(f"{row['registers']} registers")
    if row["shared"] > SMEM_LIMIT:
        out.append(f"{row['shared']} bytes of shared memory > {SMEM_LIMIT}")
    if row["expected_mma"] is not None and row["mma"] != row["expected_mma"]:
        out.append(f"dot lowers to {row['mma']}, expected {row['expected_mma']}")
    if row["expected_mma"] == "-" and not row["fma_f32"]:
        out.append("IEEE fp32 dot without fma.rn.f32 in the PTX")
    if row.get("arch") not in (None, "sm_90a"):
        out.append(f"compiled for {row['arch']}, not sm_90a")
    return out


def run(subset: str = "full", informational: bool = True, log=print) -> dict:
    """Capture and compile every case; returns {'rows': [...], 'kernels': [...], ...}."""
    import triton
    from iwsft_kernels.backends import triton_configs as tc
    if triton.knobs.runtime.interpret:
        raise RuntimeError("TRITON_INTERPRET is set in this process; use run_subprocess()")
    rows = []
    t0 = time.perf_counter()

    def add(case, la, attrs_mode, launched, role):
        r = compile_launch(la, attrs_mode)
        r.update(case=case.full_name, variant=case.variant, dtype=case.dtype,
                 tf32=case.tf32, M=case.M, H=case.H, V=case.V, aligned=case.aligned,
                 attrs=attrs_mode, launched=launched, role=role, expected_mma=expected_mma(la.kernel, case.dtype, case.tf32))
        r["problems"] = problems(r)
        rows.append(r)
        if log:
            log(_row_line(r))

    for case in cases(subset):
        for la in capture_case(case):
            add(case, la, "launch" if case.aligned else "none", True, "default")
            has_dot = expected_mma(la.kernel, case.dtype, case.tf32) is not None
            if informational and case.aligned and has_dot and not case.variant:
                add(case, la, "none", False, "info")  # the aligned config without attributes
    if subset == "full":  # the candidates bench/tune_sm90.py times on aligned bf16 inputs
        for case, la in tune_launches():
            add(case, la, "launch", True, "tune")
    return {"rows": rows, "kernels": sorted(all_kernels()), "subset": subset,
            "elapsed_s": round(time.perf_counter() - t0, 1),
            "triton": triton.__version__, "torch": torch.__version__,
            "smem_limit": SMEM_LIMIT,
            "configs": {k: v for k, v in vars(tc).items() if k.isupper() and not k.startswith("_")
                        and isinstance(v, dict)}}


def _row_line(r: dict) -> str:
    prec = "" if r["dtype"] != "fp32" else ("+tf32" if r["tf32"] else "+ieee")
    head = (f"{r['kernel']:<38} {r['case']:<9} {r['dtype'] + prec:<9} {r['config']:<16} "
            f"attrs={r['attrs']:<6} launched={'yes' if r['launched'] else 'no ':<3}")
    if not r.get("ok"):
        return head + " COMPILE ERROR " + r.get("error", "")[:200]
    bad = "" if not r["problems"] else "  <-- " + "; ".join(r["problems"])
    return (head + f" regs={r['registers']:<3} spill={r['spill_stores']}/{r['spill_loads']} "
            f"shared={r['shared']:<6} mma={r['mma']} {r['compile_s']}s" + bad)


# --------------------------------------------------------------------------- subprocess


def run_subprocess(subset: str = "ci", timeout: float = 600) -> dict:
    """run() in a fresh interpreter without TRITON_INTERPRET (and a private Triton cache)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with tempfile.TemporaryDirectory() as tmp:
        env["TRITON_CACHE_DIR"] = str(Path(tmp) / "cache")
        out = Path(tmp) / "report.json"
        p = subprocess.run([sys.executable, "-m", "bench.sm90_report", "--subset", subset,
                            "--json", str(out), "--no-md"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=timeout)
        if p.returncode not in (0, 1) or not out.exists():
            raise RuntimeError(f"bench.sm90_report failed (rc={p.returncode}):\n"
                               f"{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
        data = json.loads(out.read_text())
    data["stdout"] = p.stdout
    return data


# --------------------------------------------------------------------------- report


def render_markdown(data: dict) -> str:
    rows = data["rows"]
    bad = [r for r in rows if r["launched"] and r["problems"]]
    lines = [
        "# sm_90a (H100) ahead-of-time compile report of the Triton kernels", "",
        f"Generated by `python -m bench.sm90_report` (subset `{data['subset']}`) with Triton "
        f"{data['triton']}, torch {data['torch']}, on a machine without a GPU: "
        "`triton.compile(..., target=GPUTarget('cuda', 90, 32))` of exactly what the launch "
        "wrappers pass, registers and spills from ptxas's log, dynamic shared memory from the "
        f"kernel metadata (limit {data['smem_limit']:,} bytes), instructions from the PTX. "
        f"{len(rows)} compiles in {data['elapsed_s']} s. Not timed on hardware: see "
        "bench/tune_sm90.py.", "",
        "- **aligned?** `launch`: the divisibility attributes a real launch of these arguments "
        "gets (16-byte aligned pointers, hidden size / row strides multiples of 16; M odd, the "
        "labels a slice at an 8-byte offset); `none`: no attribute at all (worst case: odd hidden "
        "size, pointers off by one element, or anything else).",
        "- **launched**: `yes` rows are what the wrappers launch for that input and must be "
        "clean (no spills, shared memory within the limit, the expected tile instruction); `no` "
        "rows compile the aligned config without attributes for information: they show why "
        "unaligned inputs take the smaller tiles (identity variant only).",
        "- **mma**: the tile dot's instruction: `wgmma.bf16` / `wgmma.f16` / `wgmma.tf32` "
        "(Hopper warpgroup MMA), `-` = none (IEEE fp32 dots run on FMA; row kernels have no dot).",
        "- cases: qwen7b (M=4097, H=3584, V=152064), qwen32b (H=5120), odd-vocab (H=4096, "
        "V=50257), unaligned (H=3585, V=50257, offset pointers); `+bias`: with an lm_head bias; fp32 `+tf32` = torch allows "
        "TF32 (`torch.backends.cuda.matmul.allow_tf32 = True`), `+ieee` = it does not.",
        "- epilogue variants (constexpr switches; no suffix = identity transform, no entropy): "
        "`+lin` scale 0.125 / temperature 0.7 (XF_MODE=1), `+cap` soft cap 30 with scale 1.5 / "
        "temperature 0.7 (XF_MODE=2), `+H` entropy (WANT_ENTROPY) and a z-loss coefficient "
        "(folded into per-row coefficients on the host: no kernel switch), `+cap+H` both. "
        "Variant rows list the kernels with the switches only (not the dW kernel).", "",
        f"**Result: {'all launched configurations clean' if not bad else f'{len(bad)} PROBLEMS'}**"
        , ""]
    for r in bad:
        lines.append(f"- PROBLEM: {r['kernel']} {r['case']} {r['dtype']}: {'; '.join(r['problems'])}")
    lines += ["", "| kernel | case | dtype | config (blocks, warps, stages) | aligned? | launched "
              "| registers | spills (st/ld bytes) | shared bytes | mma | wgmma |",
              "|---|---|---|---|---|---|---:|---:|---:|---|---|"]
    tune_header = False
    seen = set()
    for r in rows:
        prec = "" if r["dtype"] != "fp32" else ("+tf32" if r["tf32"] else "+ieee")
        key = (r["kernel"], r["case"], r["dtype"] + prec, r["config"], r["attrs"], r["role"])
        if key in seen:
            continue
        seen.add(key)
        if r["role"] == "tune" and not tune_header:
            tune_header = True
            lines += ["", "### Tune candidates", "",
                      "The tile configs `bench/tune_sm90.py` times (aligned bf16, 7B head); "
                      "`launched` = by the sweep.", "",
                      "| kernel | case | dtype | config (blocks, warps, stages) | aligned? | "
                      "launched | registers | spills (st/ld bytes) | shared bytes | mma | wgmma |",
                      "|---|---|---|---|---|---|---:|---:|---:|---|---|"]
        if not r.get("ok"):
            lines.append(f"| {r['kernel']} | {r['case']} | {r['dtype']}{prec} | {r['config']} | "
                         f"{r['attrs']} | {'yes' if r['launched'] else 'no'} | compile error | | | | |")
            continue
        sp = f"{r['spill_stores']}/{r['spill_loads']}"
        lines.append(
            f"| {r['kernel']} | {r['case']} | {r['dtype']}{prec} | {r['config']} | {r['attrs']} | "
            f"{'yes' if r['launched'] else 'no'} | {r['registers']} | "
            f"{'**' + sp + '**' if sp != '0/0' else sp} | {r['shared']:,} | {r['mma']} | "
            f"{'yes' if r['mma'].startswith('wgmma') else 'no'} |")
    lines += ["", "Configs (iwsft_kernels/backends/triton_configs.py):", ""]
    for k, v in data["configs"].items():
        lines.append(f"- `{k}`: {v}")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--subset", choices=["full", "ci"], default="full")
    p.add_argument("--out-dir", default=str(REPO / "bench" / "results"))
    p.add_argument("--json", default=None, help="JSON path (default <out-dir>/sm90-report.json)")
    p.add_argument("--no-md", action="store_true")
    p.add_argument("--no-informational", action="store_true",
                   help="skip the aligned-config-without-attributes rows")
    args = p.parse_args(argv)
    data = run(args.subset, informational=not args.no_informational)
    out_dir = Path(args.out_dir)
    js = Path(args.json) if args.json else out_dir / "sm90-report.json"
    js.parent.mkdir(parents=True, exist_ok=True)
    js.write_text(json.dumps(data, indent=1))
    if not args.no_md:
        md = js.with_suffix(".md")
        md.write_text(render_markdown(data))
        print(f"wrote {js} and {md}")
    bad = [r for r in data["rows"] if r["launched"] and r["problems"]]
    print(f"{len(data['rows'])} compiles in {data['elapsed_s']} s; "
          f"{len(bad)} launched configurations with problems")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
