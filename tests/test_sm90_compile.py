"""sm_90 (H100) compile guard of the Triton kernels, on a machine without a GPU or a driver,
plus the launch-time choices it relies on (tested on CPU under the interpreter).

AOT part: bench/sm90_report.py compiles, in a subprocess without TRITON_INTERPRET, what the
launch wrappers pass for the `ci` subset of cases: every kernel of
iwsft_kernels/backends/triton_*.py and every CUDA config of triton_configs.py, bf16 / fp16 /
fp32 with TF32 / fp32 IEEE, at the Qwen2.5-7B head (H=3584, V=152064), a vocabulary that is not
a multiple of 16 (V=50257) and an unaligned input (H=3585, offset pointers), with the identity
transform and with the epilogue variants (soft cap + scale + temperature with entropy at every
precision; linear, cap and entropy alone at the 7B head). Each launched
configuration must compile, not spill, stay within 232,448 bytes of shared memory, and lower
its 16-bit (and TF32) tile dots to Hopper wgmma. The full matrix (also fp16 / qwen32b / every
dtype at every shape) is `python -m bench.sm90_report` -> bench/results/sm90-report.md.
"""

import os

import pytest
import torch

pytest.importorskip("triton")

from conftest import CUDA_RUN, DEVICE  # noqa: E402
from iwsft_kernels import IWConfig, linear_iwsft_loss  # noqa: E402
from iwsft_kernels.backends import triton_configs as tc  # noqa: E402
from iwsft_kernels.backends import triton_grad_weight, triton_lse  # noqa: E402
from helpers import make_inputs, oracle_grads, rel  # noqa: E402


# --------------------------------------------------------------------------- AOT compile

# CPU-side checks (CI runs them); skipped in the CUDA run of bench/gpu_check.sh to save its
# time budget for what needs the GPU.
cpu_side = pytest.mark.skipif(CUDA_RUN, reason="ahead-of-time compile check: CI runs it")


@pytest.fixture(scope="module")
def report():
    from bench import sm90_report
    return sm90_report.run_subprocess("ci", timeout=900)


def _launched(report):
    return [r for r in report["rows"] if r["launched"]]


@cpu_side
def test_every_launched_configuration_is_clean(report):
    rows = _launched(report)
    assert rows
    bad = [f"{r['kernel']} {r['case']} {r['dtype']}{'+tf32' if r['tf32'] else ''} "
           f"{r['config']} attrs={r['attrs']}: {'; '.join(r['problems'])}"
           for r in rows if r["problems"]]
    assert not bad, "sm_90 compile guard:\n" + "\n".join(bad) + "\n\n" + report["stdout"][-4000:]
    for r in rows:  # the checks themselves (problems() is what enforces them)
        assert r["ok"] and r["arch"] == "sm_90a"
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0
        assert 0 < r["registers"] <= 255
        assert r["shared"] <= 232_448


@cpu_side
def test_every_kernel_is_compiled(report):
    kernels = set(report["kernels"])
    assert {"triton_lse._lse_forward_kernel", "triton_grad_weight._grad_weight_kernel",
            "triton_epilogue._row_lse_kernel", "triton_epilogue._softmax_grad_kernel"} <= kernels
    assert {r["kernel"] for r in _launched(report)} == kernels


@cpu_side
def test_every_cuda_config_is_compiled(report):
    """Each config table of triton_configs.py is what some launched row compiled."""
    seen = {(r["kernel"].split(".")[0], r["config"]) for r in _launched(report)}
    from bench.sm90_report import _config_str
    tables = {"triton_lse": [tc.LSE_16BIT, tc.LSE_FP32_TF32, tc.LSE_FP32, tc.LSE_16BIT_UNALIGNED,
                             tc.LSE_FP32_UNALIGNED, tc.LSE_FP32_UNALIGNED_ENTROPY],
              "triton_grad_weight": [tc.GRAD_WEIGHT_16BIT, tc.GRAD_WEIGHT_16BIT_UNALIGNED],
              "triton_epilogue": [tc.EPILOGUE]}
    for mod, cfgs in tables.items():
        for cfg in cfgs:
            assert (mod, _config_str(cfg)) in seen, (mod, cfg)


@cpu_side
def test_dots_lower_to_wgmma_and_fp32_follows_torch_precision(report):
    rows = [r for r in _launched(report) if r["kernel"] == "triton_lse._lse_forward_kernel"]
    by = {(r["case"], r["dtype"], r["tf32"]): r for r in rows}
    assert by[("qwen7b", "bf16", False)]["mma"] == "wgmma.bf16"
    assert by[("odd-vocab", "fp16", False)]["mma"] == "wgmma.f16"
    assert by[("qwen7b", "fp32", True)]["mma"] == "wgmma.tf32"  # torch allows TF32
    assert by[("unaligned", "fp32", True)]["mma"] == "wgmma.tf32"
    ieee = by[("qwen7b", "fp32", False)]  # torch's default: IEEE fp32, no tensor cores
    assert ieee["mma"] == "-" and ieee["fma_f32"]
    assert by[("qwen7b+cap+H", "bf16", False)]["mma"] == "wgmma.bf16"
    assert by[("odd-vocab+cap+H", "fp16", False)]["mma"] == "wgmma.f16"
    assert by[("unaligned+cap+H", "fp32", True)]["mma"] == "wgmma.tf32"
    assert by[("qwen7b+cap+H", "fp32", False)]["mma"] == "-"
    for r in _launched(report):
        if r["kernel"] == "triton_grad_weight._grad_weight_kernel":
            assert r["mma"] == {"bf16": "wgmma.bf16", "fp16": "wgmma.f16"}[r["dtype"]]


@cpu_side
def test_epilogue_variants_are_compiled_with_their_switches(report):
    """Every epilogue variant reaches the kernels as its constexprs: identity rows compile
    XF_MODE=0 without entropy (the kernels of before the transforms), +lin / +cap XF_MODE 1 / 2,
    +H WANT_ENTROPY; each kernel with the switches is compiled clean in each variant."""
    want = {"": (0, False), "lin": (1, False), "cap": (2, False), "H": (0, True),
            "cap+H": (2, True)}
    switched = {"triton_lse._lse_forward_kernel": ("XF_MODE", "WANT_ENTROPY"),
                "triton_epilogue._row_lse_kernel": ("XF_MODE", "WANT_ENTROPY"),
                "triton_epilogue._softmax_grad_kernel": ("XF_MODE",)}
    seen = set()
    for r in _launched(report):
        if r["kernel"] not in switched:
            assert r["variant"] == "" and "XF_MODE" not in r["switches"]
            continue
        xf_mode, entropy = want[r["variant"]]
        sw = r["switches"]
        assert sw["XF_MODE"] == xf_mode, r
        if "WANT_ENTROPY" in switched[r["kernel"]]:
            assert sw["WANT_ENTROPY"] == entropy, r
        assert sw.get("HAS_BIAS", "+bias" in r["case"]) == ("+bias" in r["case"]), r
        assert not r["problems"]
        seen.add((r["kernel"], r["variant"]))
    assert seen == {(k, v) for k in switched for v in want}


@cpu_side
def test_unaligned_inputs_take_the_safe_configs_checked_without_attributes(report):
    from bench.sm90_report import _config_str
    rows = [r for r in _launched(report) if r["case"].startswith("unaligned")]
    assert rows and all(r["attrs"] == "none" and r["n_divisible_args"] == 0 for r in rows)
    assert {r["variant"] for r in rows} >= {"", "cap+H"}
    safe = {("triton_lse._lse_forward_kernel", "bf16"): tc.LSE_16BIT_UNALIGNED,
            ("triton_lse._lse_forward_kernel", "fp32"): tc.LSE_FP32_UNALIGNED,
            ("triton_grad_weight._grad_weight_kernel", "bf16"): tc.GRAD_WEIGHT_16BIT_UNALIGNED}
    for r in rows:
        key = (r["kernel"], r["dtype"])
        if key == ("triton_lse._lse_forward_kernel", "fp32") and not r["tf32"] \
                and r["switches"]["WANT_ENTROPY"]:
            assert r["config"] == _config_str(tc.LSE_FP32_UNALIGNED_ENTROPY)
        elif key in safe:
            assert r["config"] == _config_str(safe[key])
    # aligned inputs: the large tiles, specialised as a real launch would be
    big = [r for r in _launched(report) if r["case"].startswith("qwen7b") and r["dtype"] == "bf16"
           and r["kernel"] != "triton_epilogue._row_lse_kernel"
           and r["kernel"] != "triton_epilogue._softmax_grad_kernel"]
    assert {r["config"] for r in big} == {_config_str(tc.LSE_16BIT),
                                         _config_str(tc.GRAD_WEIGHT_16BIT)}
    assert all(r["attrs"] == "launch" and r["n_divisible_args"] > 0 for r in big)


# --------------------------------------------------------------------------- launch choices


def test_aligned16():
    a = torch.empty(64, 32, dtype=torch.bfloat16)
    assert tc.aligned16((a, None), (32, a.stride(0)))
    assert not tc.aligned16((a.view(-1)[1:],), ())  # 2-byte offset pointer
    assert not tc.aligned16((a,), (33,))  # odd hidden size / stride
    assert tc.aligned16((a.view(-1)[8:],), ())  # 16-byte offset is fine


def test_config_selection_on_cuda_tables():
    bf, f32 = torch.bfloat16, torch.float32
    assert tc.lse_config(bf, aligned=True, interpret=False) == tc.LSE_16BIT
    assert tc.lse_config(torch.float16, aligned=False, interpret=False) == tc.LSE_16BIT_UNALIGNED
    assert tc.lse_config(f32, aligned=True, precision="tf32", interpret=False) == tc.LSE_FP32_TF32
    assert tc.lse_config(f32, aligned=True, precision="ieee", interpret=False) == tc.LSE_FP32
    assert tc.lse_config(f32, aligned=False, precision="tf32", interpret=False) == tc.LSE_FP32_UNALIGNED
    assert tc.lse_config(f32, aligned=False, precision="ieee", entropy=True,
                         interpret=False) == tc.LSE_FP32_UNALIGNED_ENTROPY
    # entropy changes nothing else (TF32 and 16-bit tiles compile clean with it)
    assert tc.lse_config(f32, aligned=False, precision="tf32", entropy=True,
                         interpret=False) == tc.LSE_FP32_UNALIGNED
    assert tc.lse_config(f32, aligned=True, precision="ieee", entropy=True,
                         interpret=False) == tc.LSE_FP32
    assert tc.lse_config(bf, aligned=True, entropy=True, interpret=False) == tc.LSE_16BIT
    assert tc.grad_weight_config(bf, aligned=True, interpret=False) == tc.GRAD_WEIGHT_16BIT
    assert tc.grad_weight_config(bf, aligned=False, interpret=False) == tc.GRAD_WEIGHT_16BIT_UNALIGNED
    with pytest.raises(TypeError, match="bf16/fp16"):
        tc.grad_weight_config(f32)
    assert tc.padded_row_stride(50257) == 50272 and tc.padded_row_stride(64) == 64


@pytest.fixture
def restore_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    old_prec = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(old_prec)
    torch.backends.cuda.matmul.allow_tf32 = old


def test_fp32_dot_precision_follows_torch(restore_tf32):
    torch.backends.cuda.matmul.allow_tf32 = False
    assert tc.fp32_dot_precision() == "ieee" and tc.dot_precision(torch.float32) == "ieee"
    torch.backends.cuda.matmul.allow_tf32 = True
    assert tc.fp32_dot_precision() == "tf32" and tc.dot_precision(torch.float32) == "tf32"
    torch.set_float32_matmul_precision("highest")
    assert tc.fp32_dot_precision() == "ieee"
    torch.set_float32_matmul_precision("high")
    assert tc.fp32_dot_precision() == "tf32"
    torch.set_float32_matmul_precision("medium")
    assert tc.fp32_dot_precision() == "tf32"
    assert tc.dot_precision(torch.bfloat16) == "tf32"  # irrelevant for 16-bit dots


class _Spy:
    """Wraps a kernel: records each launch's keyword arguments, then launches it."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(kwargs)
            return self.kernel[grid](*args, **kwargs)
        return launch


def _spy_configs(monkeypatch, force_cuda_tables=False):
    """Record the `aligned` choice of every lse / dW config lookup (and optionally hand the
    kernels the real CUDA tiles instead of the interpreter's small ones)."""
    seen = []

    def wrap(fn):
        def inner(*a, **k):
            seen.append((fn.__name__, k.get("aligned", True), a[0]))
            if force_cuda_tables:
                k["interpret"] = False
            return fn(*a, **k)
        return inner
    monkeypatch.setattr(triton_lse, "lse_config", wrap(tc.lse_config))
    monkeypatch.setattr(triton_grad_weight, "grad_weight_config", wrap(tc.grad_weight_config))
    return seen


def _offset_copy(t: torch.Tensor, elems: int = 1) -> torch.Tensor:
    """The same values in a view whose data pointer is `elems` elements past an allocation."""
    buf = torch.empty(t.numel() + elems, dtype=t.dtype, device=t.device)
    out = buf[elems:].view(t.shape)
    out.copy_(t)
    return out


def _check_vs_oracle(inp, cfg, dtype, force_cuda_tables, monkeypatch, seq_rows=None):
    seen = _spy_configs(monkeypatch, force_cuda_tables)
    h = inp["hidden"].detach().clone().requires_grad_()
    W = inp["weight"].detach().clone().requires_grad_()
    kw = {} if seq_rows is None else {"chunk_bytes": seq_rows}
    out = linear_iwsft_loss(h, W, inp["labels"], inp["ref_logprobs"], config=cfg,
                            backend="triton", **kw)
    out.loss.backward()
    ref = oracle_grads(inp, cfg, 1.0)
    tol = 2e-6 if dtype == torch.float32 else 2e-2
    assert abs(out.loss.item() - float(ref["loss"])) <= tol * max(1.0, abs(float(ref["loss"])))
    assert rel(h.grad, ref["grads"]["hidden"]) < tol * 5
    assert rel(W.grad, ref["grads"]["weight"]) < tol * 5
    return seen


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_unaligned_input_takes_safe_path_and_is_correct(rng, monkeypatch, dtype):
    """Odd H and a weight at a 1-element offset: both kernels are told `aligned=False` (the
    safe configs) and the loss and gradients match the float64 oracle. Sequence mode with
    sequences longer than a chunk: the LSE kernel (phase 1) and the dW kernel both run."""
    inp, _ = make_inputs(2, 40, 45, 70, dtype=dtype, gen=rng, ignore_frac=0.0)
    inp["weight"] = _offset_copy(inp["weight"])
    inp["hidden"] = _offset_copy(inp["hidden"])
    assert inp["weight"].data_ptr() % 16 != 0
    cfg = IWConfig(mode="sequence")
    seen = _check_vs_oracle(inp, cfg, dtype, False, monkeypatch, seq_rows=70 * 6 * 16)
    assert ("lse_config", False, dtype) in seen
    if dtype != torch.float32:
        assert ("grad_weight_config", False, dtype) in seen
    assert all(not aligned for _, aligned, _ in seen)


def test_aligned_input_takes_fast_path(rng, monkeypatch):
    inp, _ = make_inputs(2, 40, 48, 70, dtype=torch.bfloat16, gen=rng, ignore_frac=0.0)
    cfg = IWConfig(mode="sequence")
    seen = _check_vs_oracle(inp, cfg, torch.bfloat16, False, monkeypatch, seq_rows=70 * 6 * 16)
    assert {(n, a) for n, a, _ in seen} == {("lse_config", True), ("grad_weight_config", True)}


@pytest.mark.skipif(DEVICE.type == "cuda", reason="interpreter-only: real CUDA tiles on CPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_safe_cuda_tiles_correct_under_interpreter(rng, monkeypatch, dtype):
    """The kernels with the real CUDA tile sizes of the unaligned path (128x64x32 16-bit,
    64x128x32 fp32), on shapes spanning several tiles in every dimension, interpreted."""
    inp, _ = make_inputs(2, 80, 75, 150, dtype=dtype, gen=rng, ignore_frac=0.1)
    inp["weight"] = _offset_copy(inp["weight"])
    seen = _check_vs_oracle(inp, IWConfig(mode="sequence"), dtype, True, monkeypatch,
                            seq_rows=150 * 6 * 40)
    assert ("lse_config", False, dtype) in seen


def test_fp32_precision_constexpr_reaches_the_kernel(rng, monkeypatch, restore_tf32):
    """allow_tf32 decides the PRECISION constexpr the LSE kernel gets; under the interpreter
    both run (the interpreter computes IEEE fp32 either way) and match the oracle."""
    spy = _Spy(triton_lse._lse_forward_kernel)
    monkeypatch.setattr(triton_lse, "_lse_forward_kernel", spy)
    M, H, V = 37, 45, 101
    h = torch.randn(M, H, generator=rng).to(DEVICE)
    W = torch.randn(V, H, generator=rng).to(DEVICE)
    y = torch.randint(0, V, (M,), generator=rng).to(DEVICE)
    z = h.double() @ W.double().T
    want = torch.log_softmax(z, 1).gather(1, y[:, None]).squeeze(1)
    for allow, prec in ((False, "ieee"), (True, "tf32")):
        torch.backends.cuda.matmul.allow_tf32 = allow
        _, logp = triton_lse.lse_forward(h, W, None, y)
        assert spy.calls[-1]["PRECISION"] == prec
        tol = 1e-5 if (prec == "ieee" or DEVICE.type == "cpu") else 5e-2
        torch.testing.assert_close(logp.double(), want, rtol=tol, atol=tol)


def test_padded_gradient_rows_feed_the_dw_kernel(rng):
    """softmax_grad's 16-bit G has a row stride padded to 16 elements (V = 77 -> 80); the dW
    kernel reads it in place (no copy) and accumulates the right product."""
    from iwsft_kernels.backends import triton_epilogue
    m, V, H = 9, 77, 48
    z = (3 * torch.randn(m, V, generator=rng)).to(DEVICE)
    y = torch.randint(0, V, (m,), generator=rng).to(DEVICE)
    c = torch.randn(m, generator=rng).to(DEVICE)
    mx, rest, logp = triton_epilogue.row_lse(z.clone(), y)
    g = triton_epilogue.softmax_grad(z.clone(), y, mx, rest, c, torch.expm1(logp), torch.bfloat16)
    assert g.shape == (m, V) and g.stride() == (80, 1)
    h = torch.randn(m, H, generator=rng).to(torch.bfloat16).to(DEVICE)
    dw = torch.zeros(V, H, device=DEVICE)
    triton_grad_weight.accum_grad_weight(dw, g, h)
    torch.testing.assert_close(dw.double(), g.double().T @ h.double(), rtol=1e-5, atol=1e-5)


def test_report_refuses_an_interpreter_process():
    """The AOT module refuses to run in a process where the interpreter is on (the CUDA
    tables would not be chosen and triton.language's helpers cannot be compiled)."""
    from bench import sm90_report
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            sm90_report.run("ci", log=None)


# --------------------------------------------------------------------------- tuning sweep


@cpu_side
def test_tune_sweep_dry_run_covers_the_clean_configs():
    """bench/tune_sm90.py --dry-run lists the sweep without a GPU; it covers the default
    configs and only tile configs that the committed sm_90 report found clean; its time
    estimate fits the step's cap in bench/gpu_check.sh."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from bench import tune_sm90
    from bench.sm90_report import _config_str
    repo = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, "bench/tune_sm90.py", "--dry-run", "--json"], cwd=repo,
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert p.returncode == 0, p.stderr
    plan = json.loads(p.stdout)
    rows = plan["plan"]
    assert {r["head"] for r in rows} == {"7b", "32b"}
    assert {(r["H"], r["V"]) for r in rows} == {(3584, 152064), (5120, 152064)}
    for part, default, cands in (("lse", tc.LSE_16BIT, tune_sm90.LSE_CANDIDATES),
                                 ("dw", tc.GRAD_WEIGHT_16BIT, tune_sm90.DW_CANDIDATES)):
        swept = {_config_str(r["cfg"]) for r in rows if r["part"] == part}
        assert _config_str(default) in swept
        assert len(swept) == len(cands) >= 4
    budgets = {r["chunk_mib"] for r in rows if r["part"] == "budget"}
    assert 1024 in budgets and len(budgets) >= 3  # the CUDA default (1 GiB) and neighbours
    assert plan["estimate_s"] < 120
    report = json.loads((repo / "bench/results/sm90-report.json").read_text())
    clean = {(r["kernel"].split(".")[0], r["config"]) for r in report["rows"]
             if r["role"] == "tune" and r["ok"] and not r["problems"]}
    for r in rows:
        if r["part"] != "budget":
            mod = "triton_lse" if r["part"] == "lse" else "triton_grad_weight"
            assert (mod, r["config"]) in clean, (
                f"{r['part']} {r['config']} is not a clean tune candidate in "
                "bench/results/sm90-report.json: run `python -m bench.sm90_report`")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU failure")
def test_tune_fails_fast_without_cuda(capsys):
    from bench import tune_sm90
    assert tune_sm90.main(["--heads", "7b"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
