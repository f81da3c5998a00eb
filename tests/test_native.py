"""The native CPU epilogue (csrc/iwsft_epilogue.cpp, iwsft_kernels/backends/native_cpu.py).

- the native ops agree with the pure torch ops (TorchOps) to fp32 rounding, odd shapes,
  peaked rows, -inf logits;
- the full loss through the native path and through the pure path (IWSFT_NO_NATIVE=1), all
  modes, fp32 and bf16 inputs, both against the float64 reference;
- the fallback when the extension cannot be built (one-line notice, pure path runs).

If the extension does not build here, the native-path tests FAIL with the reason (a broken
build must not hide behind a skip); they skip only when there is no C++ compiler at all or
IWSFT_NO_NATIVE=1 is set for the whole run."""

import pytest
import torch

from helpers import make_inputs, reference_grads, rel
from iwsft_kernels import IWConfig, linear_iwsft_loss
from iwsft_kernels.config import IDENTITY
from iwsft_kernels.backends import native_cpu as native
from iwsft_kernels.backends.torch_ops import TorchOps
from iwsft_kernels.core import select_ops as _ops

from test_loss_oracle import check, run_ours


@pytest.fixture(scope="module")
def lib():
    if native.disabled():
        pytest.skip("IWSFT_NO_NATIVE=1 is set for this run")
    native._reset_for_tests()
    got = native.load()
    if got is None:
        if native.find_compiler() is None:
            pytest.skip(f"no C++ compiler: {native.load_error()}")
        pytest.fail(f"native extension failed to build/load: {native.load_error()}")
    return got


@pytest.fixture
def no_native(monkeypatch):
    monkeypatch.setenv("IWSFT_NO_NATIVE", "1")


def _pair(z, y, coef):
    """(logp, rest, grad) from the pure torch ops and from the native ops; rest = the row sum
    of exp(z - max) without one arg-max entry (the full sum is 1 + rest)."""
    t, n = TorchOps(), native.NativeTorchOps()
    out = []
    for ops in (t, n):
        rows, state = ops.chunk_forward(z.clone(), y)
        lp, s = rows.logp, state[1].clone()
        g = ops.softmax_grad(state, y, rows, coef, None, IDENTITY, torch.float32)
        out.append((lp, s, g))
    return out


SHAPES = [(1, 1), (1, 2), (3, 7), (5, 1001), (17, 4099), (2, 151936)]


@pytest.mark.parametrize("m,V", SHAPES)
@pytest.mark.parametrize("kind", ["random", "peaked", "neg_inf"])
def test_ops_agree_with_torch(lib, rng, m, V, kind):
    z = torch.randn(m, V, generator=rng) * 4
    y = torch.randint(0, V, (m,), generator=rng)
    if kind == "peaked" and V > 1:
        # p_y ~ 0.99 .. 1 - 1e-10: the target gradient must not cancel
        lse_rest = torch.logsumexp(z.scatter(1, y[:, None], -float("inf")), 1)
        margin = torch.linspace(5.0, 23.0, m)
        z.scatter_(1, y[:, None], (lse_rest + margin)[:, None])
    if kind == "neg_inf" and V > 2:  # a -inf bias bans tokens: exp must give exactly 0
        ban = torch.rand(m, V, generator=rng) < 0.3
        ban.scatter_(1, y[:, None], False)
        z[ban] = -float("inf")
    coef = torch.rand(m, generator=rng) * 2 + 0.1
    (lp0, s0, g0), (lp1, s1, g1) = _pair(z, y, coef)
    assert lp1.dtype == s1.dtype == g1.dtype == torch.float32
    assert torch.isfinite(lp1).all() and (lp1 <= 0).all()
    # logp: exact to fp32 *relative* rounding, also for peaked rows (|logp| down to 1e-10)
    torch.testing.assert_close(lp1, lp0, atol=1e-30, rtol=4e-6)
    torch.testing.assert_close(s1, s0, atol=0, rtol=4e-6)
    lp64 = torch.log_softmax(z.double(), 1).gather(1, y[:, None]).squeeze(1)
    if kind == "peaked":  # float64 log_softmax itself cancels at |z_y - lse| * 2^-53
        lp64 = -torch.log1p(torch.exp(z.double() - z.double().gather(1, y[:, None]))
                            .scatter(1, y[:, None], 0.0).sum(1))
    torch.testing.assert_close(lp1.double(), lp64, atol=1e-30, rtol=1e-5)
    # rest = sum of exp(z - max) without one arg-max entry: float64 truth (all sums here are
    # >= ~1e-10, so a relative bar; the old state, the full sum 1 + rest, fails it)
    z64 = z.double()
    e64 = torch.exp(z64 - z64.amax(1, keepdim=True))
    rest64 = e64.scatter(1, z64.argmax(1, keepdim=True), 0.0).sum(1)
    torch.testing.assert_close(s1.double(), rest64, atol=1e-30, rtol=4e-6)
    # pointwise exp: a few ulp apart (different polynomials), zeros stay exact zeros
    off = torch.ones_like(g0, dtype=torch.bool).scatter_(1, y[:, None], False)
    torch.testing.assert_close(g1[off], g0[off], atol=1e-30, rtol=2e-6)
    if kind == "neg_inf" and V > 2:
        assert (g1[ban] == 0).all()
    # the target entry: coef * expm1(logp), never p_y - 1 by cancellation
    tgt0 = g0.gather(1, y[:, None]).squeeze(1)
    tgt1 = g1.gather(1, y[:, None]).squeeze(1)
    # (both are coef * expm1(logp), logp exact to fp32 relative rounding)
    assert bool(((tgt1 - tgt0).abs() <= 1e-5 * tgt0.abs() + 1e-30).all())
    # against float64 truth, entry by entry relative (also the tiny p_y - 1 of peaked rows:
    # the softmax denominator 1 + rest is never rounded)
    p64 = torch.softmax(z64, 1)
    g64 = coef.double()[:, None] * (p64 - torch.nn.functional.one_hot(y, V).double())
    g64.scatter_(1, y[:, None], (coef.double() * torch.expm1(lp64))[:, None])
    bound = 1e-5 * g64.abs() + 1e-30
    assert bool(((g1.double() - g64).abs() <= bound).all())
    assert bool(((g0.double() - g64).abs() <= bound).all())  # the same bar as the torch ops


def test_native_ops_in_place_and_shapes(lib, rng):
    z = torch.randn(4, 33, generator=rng)
    y = torch.randint(0, 33, (4,), generator=rng)
    zc = z.clone()
    lp, s = lib.chunk_forward(zc, y)
    assert lp.shape == s.shape == (4,)
    torch.testing.assert_close(zc, torch.exp(z - z.amax(1, keepdim=True)))
    torch.testing.assert_close(s, zc.sum(1) - 1.0)  # the sum without the arg-max's 1
    g = lib.softmax_grad_(zc, y, lp, torch.ones(4), s)
    assert g.data_ptr() == zc.data_ptr()
    with pytest.raises(RuntimeError, match="float32"):
        lib.chunk_forward(z.double(), y)
    with pytest.raises(RuntimeError, match="contiguous"):
        lib.chunk_forward(z.t().contiguous().t(), y)


def test_native_ops_non_cpu_or_noncontig_fall_back(lib, rng):
    """NativeTorchOps hands anything the kernels do not take to the torch code."""
    z = torch.randn(7, 5, generator=rng).t()  # non-contiguous (5, 7)
    y = torch.randint(0, 7, (5,), generator=rng)
    coef = torch.rand(5, generator=rng)
    n, t = native.NativeTorchOps(), TorchOps()
    lp1, st1 = n.chunk_forward(z.clone(), y)
    lp0, st0 = t.chunk_forward(z.clone(), y)
    torch.testing.assert_close(lp1.logp, lp0.logp)
    torch.testing.assert_close(n.softmax_grad(st1, y, lp1, coef, None, IDENTITY, torch.float32),
                               t.softmax_grad(st0, y, lp0, coef, None, IDENTITY, torch.float32))


def test_dispatch_uses_native_on_cpu(lib, monkeypatch):
    assert isinstance(_ops("torch", torch.device("cpu")), native.NativeTorchOps)
    monkeypatch.setenv("IWSFT_NO_NATIVE", "1")
    ops = _ops("torch", torch.device("cpu"))
    assert type(ops) is TorchOps


CASES = [
    ("sft", {}),
    ("token", {}),
    ("sequence", {}),
    ("sequence", dict(self_normalize=True, temperature=0.7)),
]


@pytest.mark.parametrize("mode,opts", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_bytes", [None, 4 * 101 * 8])  # one chunk; 8-row chunks
def test_loss_native_vs_pure(lib, rng, monkeypatch, mode, opts, dtype, chunk_bytes):
    inp, S = make_inputs(4, 23, 45, 101, dtype=dtype, gen=rng, bias=True, packed=True)
    cfg = IWConfig(mode=mode, **opts)
    q = torch.rand(S, generator=rng) * 2
    kw = {} if chunk_bytes is None else dict(chunk_bytes=chunk_bytes)
    calls = {"n": 0}
    orig = native.NativeTorchOps.chunk_forward

    def counting(self, z, y, *a):
        calls["n"] += 1
        return orig(self, z, y, *a)

    monkeypatch.setattr(native.NativeTorchOps, "chunk_forward", counting)
    out_n, g_n = run_ours(inp, cfg, "torch", -0.7, quality=q, **kw)
    assert calls["n"] > 0, "the native path was not taken"
    monkeypatch.setenv("IWSFT_NO_NATIVE", "1")
    out_p, g_p = run_ours(inp, cfg, "torch", -0.7, quality=q, **kw)
    monkeypatch.delenv("IWSFT_NO_NATIVE")
    ref = reference_grads(inp, cfg, -0.7, quality=q)
    check(out_n, g_n, ref, dtype)
    check(out_p, g_p, ref, dtype)
    # and the two paths agree with each other to fp32 rounding (the bf16 inputs are the same
    # for both; the chunk arithmetic is fp32 in both)
    torch.testing.assert_close(out_n.loss, out_p.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_n.token_logprobs, out_p.token_logprobs, rtol=1e-5, atol=1e-5)
    for k in g_p:
        a, b = g_n[k].float(), g_p[k].float()
        tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16 outputs: rounding of the result
        assert float((a - b).norm() / b.norm()) < tol, k


@pytest.mark.parametrize("p", [0.99, 0.999])
def test_loss_native_peaked(lib, rng, monkeypatch, p):
    """Peaked rows (p_y >= p): the native path is as close to the float64 reference as the
    pure torch path, and both meet the plain fp32 bar (logp exact as p_y -> 1)."""
    inp, _ = make_inputs(2, 17, 32, 211, gen=rng, peaked=p)
    cfg = IWConfig(mode="token")
    out, grads = run_ours(inp, cfg, "torch", 1.7)
    monkeypatch.setenv("IWSFT_NO_NATIVE", "1")
    out_p, grads_p = run_ours(inp, cfg, "torch", 1.7)
    ref = reference_grads(inp, cfg, 1.7)
    check(out, grads, ref, torch.float32)
    check(out_p, grads_p, ref, torch.float32)
    for k in ("hidden", "weight"):
        e_n, e_p = rel(grads[k], ref["grads"][k]), rel(grads_p[k], ref["grads"][k])
        assert e_n <= 1.5 * e_p + 1e-6, (k, e_n, e_p)


# ------------------------------------------------------------------------------- fallback
@pytest.fixture
def fresh_state():
    native._reset_for_tests()
    yield
    native._reset_for_tests()


def test_fallback_when_build_fails(fresh_state, monkeypatch, capsys, rng):
    def broken():
        raise native.NativeUnavailable("compile failed (simulated): error: boom")

    monkeypatch.delenv("IWSFT_NO_NATIVE", raising=False)
    monkeypatch.setattr(native, "_load_impl", broken)
    assert native.load() is None
    assert native.load() is None  # tried once, noticed once
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "native CPU epilogue unavailable" in err[0] and "boom" in err[0]
    assert "simulated" in native.load_error()
    assert type(_ops("torch", torch.device("cpu"))) is TorchOps
    inp, _ = make_inputs(3, 11, 24, 67, gen=rng, bias=True)
    cfg = IWConfig(mode="sequence")
    out, grads = run_ours(inp, cfg, "torch", 0.9)
    check(out, grads, reference_grads(inp, cfg, 0.9), torch.float32)
    assert "native CPU epilogue" not in capsys.readouterr().err  # no second notice


def test_fallback_env_disables_silently(fresh_state, no_native, capsys):
    assert native.load() is None
    assert capsys.readouterr().err == ""
    with pytest.raises(native.NativeUnavailable):
        native.NativeTorchOps()


def test_jit_build_reports_missing_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    with pytest.raises(native.NativeUnavailable, match="no C\\+\\+ compiler"):
        native._jit_build()


def test_jit_build_reports_compile_failure(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    with pytest.raises(native.NativeUnavailable, match="compile failed"):
        native._jit_build()
    assert not any(p.suffix == ".so" for p in (tmp_path / "iwsft_kernels").iterdir())
