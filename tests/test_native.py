"""The native CPU epilogue (csrc/iwsft_epilogue.cpp, iwsft_kernels/backends/native_cpu.py).

- the native ops (chunk_forward, softmax_grad) against a float64 op-level oracle written here
  (raw r -> transformed z -> softmax, logp/lse/top1/entropy and G_r in float64): identity,
  scale, temperature, softcap (moderate and saturated), all at once; random, peaked
  (1 - p_y = 1e-6 .. 1e-12 in transformed space), tied maxima, -inf rows; entropy on/off,
  zcoef None / non-zero; odd V; several threads (results bitwise independent of them);
  no (m, V) allocation; in-place / aliasing contract; bad input;
- the native ops agree with the pure torch ops (TorchOps) to fp32 rounding;
- the full loss through the native path and through the pure path (IWSFT_NO_NATIVE=1), all
  modes, fp32 and bf16 inputs, both against the float64 reference;
- the fallback when the extension cannot be built (one-line notice, pure path runs).

If the extension does not build here, the native-path tests FAIL with the reason (a broken
build must not hide behind a skip); they skip only when there is no C++ compiler at all or
IWSFT_NO_NATIVE=1 is set for the whole run."""

import math

import pytest
import torch

from helpers import make_inputs, oracle_grads, rel
from iwsft_kernels import IWConfig, linear_iwsft_loss
from iwsft_kernels.backends import native_cpu as native
from iwsft_kernels.backends.rows import RowStats
from iwsft_kernels.backends.torch_ops import TorchOps
from iwsft_kernels.config import IDENTITY, LogitTransform
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


# ------------------------------------------------------------------ float64 op-level oracle
def transform64(r64, xf):
    z = r64 * xf.scale
    if xf.softcap is not None:
        z = xf.softcap * torch.tanh(z / xf.softcap)
    return z / xf.temperature


def inverse64(z, xf):
    z = z * xf.temperature
    if xf.softcap is not None:
        z = xf.softcap * torch.atanh(z / xf.softcap)
    return z / xf.scale


def dzdr64(r64, xf):
    if xf.softcap is None:
        return torch.full_like(r64, xf.factor)
    u = torch.exp(-2 * (r64 * xf.scale / xf.softcap).abs())  # no underflow in float64 here
    return xf.factor * 4 * u / (1 + u) ** 2


def oracle(r, y, coef, zcoef, xf):
    """Everything in float64 from the fp32 raw logits r. rest / logp in the one-arg-max-out
    form (float64 log_softmax itself cancels for 1 - p_y ~ 1e-12). Single-threaded (these
    small float64 ops are much slower with threads on a loaded 2-core machine)."""
    n0 = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _oracle(r, y, coef, zcoef, xf)
    finally:
        torch.set_num_threads(n0)


def _oracle(r, y, coef, zcoef, xf):
    r64 = r.double()
    z = transform64(r64, xf)
    m, arg = z.max(1)
    d = z - m[:, None]
    e = torch.exp(d)
    rest = e.scatter(1, arg[:, None], 0.0).sum(1)
    t = z.gather(1, y[:, None]).squeeze(1)
    l1p = torch.log1p(rest)
    logp = ((t - m) - l1p).clamp(max=0)
    s1 = torch.where(e > 0, e * d, torch.zeros_like(e)).sum(1)
    c = coef.double()
    zc = torch.zeros_like(c) if zcoef is None else zcoef.double()
    gz = (c + zc)[:, None] * e / (1 + rest)[:, None]
    gz.scatter_(1, y[:, None], (c * torch.expm1(logp) + zc * torch.exp(logp))[:, None])
    zf = z.float()  # top1 is t == m of the fp32 logits (saturated caps tie there)
    return dict(logp=logp, lse=m + l1p, entropy=(l1p - s1 / (1 + rest)).clamp(min=0),
                top1=zf.gather(1, y[:, None]).squeeze(1) == zf.amax(1), G=gz * dzdr64(r64, xf),
                d=d, m=m, zf=zf,
                x=r64 * xf.scale / (xf.softcap if xf.softcap is not None else 1.0))


XFS = {
    "identity": IDENTITY,
    "scale": LogitTransform(scale=0.37),
    "scale_temp": LogitTransform(scale=3.0, temperature=0.7),
    "cap": LogitTransform(softcap=30.0),
    "cap_sat": LogitTransform(softcap=5.0),  # with kind "saturated": |s r / c| up to 50
    "all": LogitTransform(scale=0.5, softcap=20.0, temperature=0.7),
}


def make_chunk(kind, xf, m, V, g):
    """Raw fp32 logits r (m, V) and targets y for one test kind."""
    y = torch.randint(0, V, (m,), generator=g)
    if kind == "saturated":  # x = s r / c uniform in [-50, 50]
        c = xf.softcap if xf.softcap is not None else 5.0
        r = (torch.rand(m, V, generator=g) * 2 - 1) * (50 * c / xf.scale)
    elif kind == "peaked" and xf.softcap is not None:
        # the others near x = -1.5 so the target fits 14..28 above their logsumexp below the cap
        x = -1.5 + 0.3 * torch.randn(m, V, generator=g, dtype=torch.float64)
        r = (x * xf.softcap / xf.scale).float()
    else:
        r = torch.randn(m, V, generator=g) * 4
    if kind == "peaked" and V > 1:
        # z_y = logsumexp(other z) + margin: 1 - p_y = exp(-margin) = 1e-6 .. 1e-12
        z = transform64(r.double(), xf)
        L = torch.logsumexp(z.scatter(1, y[:, None], -math.inf), 1)
        margin = torch.linspace(-math.log(1e-6), -math.log(1e-12), m, dtype=torch.float64)
        r.scatter_(1, y[:, None], inverse64(L + margin, xf).float()[:, None])
    if kind == "ties" and V > 3:
        # 2..3 entries share the raw max; even rows put the target on it, odd rows below it
        top = r.amax(1) + 1.0
        for i in range(m):
            js = torch.randperm(V, generator=g)[: 2 + i % 2]
            r[i, js] = top[i]
            y[i] = js[0] if i % 2 == 0 else next(j for j in range(V) if j not in js.tolist())
    if kind == "neg_inf" and V > 2:  # a -inf bias bans tokens
        ban = torch.rand(m, V, generator=g) < 0.3
        ban.scatter_(1, y[:, None], False)
        r[ban] = -math.inf
    return r, y


def _run(r, y, coef, zcoef, xf, want_entropy, out_dtype=torch.float32):
    ops = native.NativeTorchOps()
    buf = r.clone()
    rows, state = ops.chunk_forward(buf, y, xf, want_entropy)
    g = ops.softmax_grad(state, y, rows, coef, zcoef, xf, out_dtype)
    return rows, g, buf


ULP = 2.0 ** -24


def check_against_oracle(rows, G, o, xf, want_entropy):
    assert isinstance(rows, RowStats)
    assert rows.logp.dtype == rows.lse.dtype == G.dtype == torch.float32
    assert rows.top1.dtype == torch.bool
    assert torch.isfinite(rows.logp).all() and (rows.logp <= 0).all()
    # logp, entropy: relative, also for peaked rows (|logp| down to 1e-12). fp32 level: the
    # e_j of such rows carry ~|z_j - m| 2^-24 (|z_j - m| ~ 30..40) -> a 4e-6 bar (measured
    # <= 2.5e-6 with a cap, <= 1.7e-6 without)
    err = (rows.logp.double() - o["logp"]).abs()
    assert bool((err <= 4e-6 * o["logp"].abs() + 1e-30).all()), float((err / o["logp"].abs()).max())
    # lse: relative to the size of the logits
    lse_bar = 1e-6 * torch.maximum(o["lse"].abs(), o["m"].abs()).clamp(min=1.0)
    assert bool(((rows.lse.double() - o["lse"]).abs() <= lse_bar).all())
    if want_entropy:
        err = (rows.entropy.double() - o["entropy"]).abs()
        assert bool((err <= 4e-6 * o["entropy"] + 1e-30).all()), float((err / o["entropy"]).max())
    else:
        assert rows.entropy is None
    # top1: t == m of the fp32 z; skip rows whose target is within 2 ulp of the max but not
    # on it (the fp32 z of the oracle and ours may round such near-ties differently)
    zf = o["zf"]
    t = zf.gather(1, torch.as_tensor(o["y"])[:, None]).squeeze(1)
    mx = zf.amax(1)
    clear = (t == mx) | ((mx - t) > 2 * ULP * mx.abs().clamp(min=1e-30))
    assert bool((rows.top1[clear] == o["top1"][clear]).all())
    # G w.r.t. raw r, entry by entry relative, at fp32 level: 4e-6 (the target entry carries
    # logp's error) + 4 ulp x (|z_j - m| + 2|x_j|): e_j = exp(z_j - m) and, with a cap,
    # sech^2 = 4u/(1+u)^2 with u = exp(-2|x_j|) take fp32 arguments. An absolute floor at the
    # fp32 denormal range (there exp underflows).
    G64 = o["G"]
    size = o["d"].abs().nan_to_num(posinf=0.0, neginf=0.0)
    if xf.softcap is not None:
        size = size + 2 * o["x"].abs()
    bar = (4e-6 + 4 * ULP * size) * G64.abs() + 1e-36
    bad = (G.double() - G64).abs() > bar
    assert not bool(bad.any()), (
        f"{int(bad.sum())} entries, worst rel "
        f"{float(((G.double() - G64).abs() / (G64.abs() + 1e-36)).max()):.2e}")


def _op_cases():
    """(transform, kind, (entropy, zcoef), V): every kind under every transform that can hold
    it (saturation needs a cap; the 5-cap only for saturation: it cannot hold a peaked row),
    each with the plain and the all-options variant at two odd V; the two mixed variants on
    a subset."""
    cases = []
    for xfname, xf in XFS.items():
        kinds = ["saturated"] if xfname == "cap_sat" else \
            ["random", "peaked", "ties", "neg_inf"] + (["saturated"] if xf.softcap else [])
        for kind in kinds:
            cases += [(xfname, kind, (False, False), 1000), (xfname, kind, (True, True), 4099)]
            if kind in ("peaked", "saturated"):
                cases += [(xfname, kind, (True, False), 4099), (xfname, kind, (False, True), 1000)]
    return cases


@pytest.mark.parametrize("xfname,kind,variant,V", _op_cases(),
                         ids=lambda v: {(False, False): "plain", (True, False): "ent",
                                        (False, True): "zcoef", (True, True): "ent+zcoef"}.get(
                             v, str(v)) if isinstance(v, tuple) else str(v))
def test_ops_vs_float64_oracle(lib, rng, xfname, kind, variant, V):
    xf = XFS[xfname]
    want_entropy, with_z = variant
    m = 12
    r, y = make_chunk(kind, xf, m, V, rng)
    coef = torch.rand(m, generator=rng) * 2 + 0.1
    zcoef = torch.rand(m, generator=rng) * 0.3 if with_z else None
    o = oracle(r, y, coef, zcoef, xf)
    o["y"] = y
    if kind == "peaked":  # the construction reaches 1 - p_y ~ 1e-12
        assert float((-torch.expm1(o["logp"])).min()) < 3e-12
    if kind == "saturated":
        x = r.double() * xf.scale / xf.softcap
        assert float(x.abs().max()) > 45 and bool((o["zf"].abs() == o["zf"].abs().amax()).sum() > m)
    rows, G, _ = _run(r, y, coef, zcoef, xf, want_entropy)
    check_against_oracle(rows, G, o, xf, want_entropy)
    if kind == "ties":
        assert rows.top1[0::2].all() and not rows.top1[1::2].any()
    if kind == "saturated":
        # sech^2 stays relative where 1 - tanh^2 would be 0 in fp32 (|x| > ~9)
        x = (r.double() * xf.scale / xf.softcap).abs()
        zone = (x > 12) & (x < 30) & (o["G"].abs() > 1e-30)
        assert bool(zone.any()) and bool((G[zone] != 0).all())


@pytest.mark.parametrize("m,V", [(1, 1), (1, 2), (3, 7), (2, 151936)])
@pytest.mark.parametrize("xfname", ["identity", "scale_temp", "all"])
def test_ops_small_and_large_V(lib, rng, m, V, xfname):
    xf = XFS[xfname]
    r, y = make_chunk("random", xf, m, V, rng)
    coef = torch.rand(m, generator=rng) + 0.1
    zcoef = torch.rand(m, generator=rng) * 0.3
    o = oracle(r, y, coef, zcoef, xf)
    o["y"] = y
    rows, G, _ = _run(r, y, coef, zcoef, xf, True)
    check_against_oracle(rows, G, o, xf, True)
    if V == 1:
        assert rows.logp.tolist() == [0.0] and rows.top1.all() and rows.entropy.tolist() == [0.0]


@pytest.mark.parametrize("xfname", ["identity", "scale", "cap", "all"])
def test_options_do_not_change_the_rest(lib, rng, xfname):
    """Entropy on/off leaves logp/lse/top1 bitwise alike; zcoef = 0 gives exactly the
    zcoef=None gradient (so the identity/no-zcoef fast path is the general formula)."""
    xf = XFS[xfname]
    r, y = make_chunk("random", xf, 9, 1001, rng)
    coef = torch.rand(9, generator=rng)
    a, ga, _ = _run(r, y, coef, None, xf, False)
    b, gb, _ = _run(r, y, coef, torch.zeros(9), xf, True)
    for k in ("logp", "lse", "top1"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k
    assert torch.equal(ga, gb)


@pytest.mark.parametrize("xfname", ["identity", "scale_temp", "cap", "all"])
def test_threads_give_identical_results(lib, rng, xfname):
    xf = XFS[xfname]
    r, y = make_chunk("random", xf, 97, 1003, rng)  # grain ~32 rows: 4 tasks
    coef, zcoef = torch.rand(97, generator=rng), torch.rand(97, generator=rng)
    n0 = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a, ga, _ = _run(r, y, coef, zcoef, xf, True)
        torch.set_num_threads(4)
        b, gb, _ = _run(r, y, coef, zcoef, xf, True)
    finally:
        torch.set_num_threads(n0)
    for k in RowStats._fields:
        assert torch.equal(getattr(a, k), getattr(b, k)), k
    assert torch.equal(ga, gb)


@pytest.mark.parametrize("xfname", ["identity", "scale", "cap"])
def test_no_chunk_sized_allocation(lib, rng, xfname):
    """chunk_forward + softmax_grad allocate only (m,) vectors: no (m, V) temporary."""
    from torch.profiler import ProfilerActivity, profile

    xf = XFS[xfname]
    m, V = 64, 3001
    r, y = make_chunk("random", xf, m, V, rng)
    coef, zcoef = torch.rand(m, generator=rng), torch.rand(m, generator=rng)
    ops = native.NativeTorchOps()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        rows, state = ops.chunk_forward(r, y, xf, True)
        g = ops.softmax_grad(state, y, rows, coef, zcoef, xf, torch.float32)
    allocated = sum(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0)
    assert 0 < allocated <= 8 * 8 * m  # a handful of (m,) vectors
    assert g.data_ptr() == r.data_ptr()


def test_in_place_contract(lib, rng):
    """identity / linear: r <- e = exp(z - max z); cap: r <- u = exp(-2|x|) signed like r
    (-0.0 for a saturated negative entry), from which softmax_grad gets z, e and sech^2; G is
    written into r's memory in every case."""
    r, y = make_chunk("random", IDENTITY, 5, 33, rng)
    ops = native.NativeTorchOps()
    for xf in (IDENTITY, XFS["scale_temp"]):
        buf = r.clone()
        rows, st = ops.chunk_forward(buf, y, xf, False)
        z = r * xf.factor
        torch.testing.assert_close(buf, torch.exp(z - z.amax(1, keepdim=True)))
        g = ops.softmax_grad(st, y, rows, torch.ones(5), None, xf, torch.float32)
        assert g.data_ptr() == buf.data_ptr()
    xf = XFS["cap_sat"]
    r[0, :3] = torch.tensor([-1e4, 1e4, -0.0])  # saturated both ways (u = -0.0 / +0.0), r = -0
    buf = r.clone()
    rows, st = ops.chunk_forward(buf, y, xf, True)
    u = torch.exp(-2 * (r.double() * xf.scale / xf.softcap).abs())
    torch.testing.assert_close(buf.double(), torch.where(r < 0, -u, u), rtol=2e-6, atol=0)
    assert buf[0, :3].tolist() == [0.0, 0.0, 1.0]
    assert torch.signbit(buf[0, :3]).tolist() == [True, False, False]
    g = ops.softmax_grad(st, y, rows, torch.ones(5), None, xf, torch.float32)
    assert g.data_ptr() == buf.data_ptr()


def test_out_dtype_and_transform_mismatch(lib, rng):
    r, y = make_chunk("random", IDENTITY, 4, 50, rng)
    coef = torch.rand(4, generator=rng)
    # G stays fp32 whatever out_dtype (as TorchOps: the inherited gradient GEMMs cast)
    _, g32, _ = _run(r, y, coef, None, XFS["all"], False)
    _, g16, _ = _run(r, y, coef, None, XFS["all"], False, out_dtype=torch.bfloat16)
    assert g16.dtype == torch.float32 and torch.equal(g16, g32)
    ops = native.NativeTorchOps()
    rows, st = ops.chunk_forward(r.clone(), y, XFS["cap"], False)
    with pytest.raises(ValueError, match="logit transform"):
        ops.softmax_grad(st, y, rows, coef, None, IDENTITY, torch.float32)


def test_native_ops_bad_input(lib, rng):
    z = torch.randn(4, 33, generator=rng)
    y = torch.randint(0, 33, (4,), generator=rng)
    with pytest.raises(RuntimeError, match="float32"):
        lib.chunk_forward(z.double(), y, 1.0, None, 1.0, False)
    with pytest.raises(RuntimeError, match="contiguous"):
        lib.chunk_forward(z.t().contiguous().t(), y, 1.0, None, 1.0, False)
    with pytest.raises(RuntimeError, match="out of range"):
        lib.chunk_forward(z.clone(), torch.tensor([0, 1, 2, 33]), 1.0, None, 1.0, False)
    with pytest.raises(RuntimeError, match="softcap"):
        lib.chunk_forward(z.clone(), y, 1.0, -1.0, 1.0, False)
    with pytest.raises(RuntimeError, match="temperature"):
        lib.chunk_forward(z.clone(), y, 1.0, None, 0.0, False)


def test_logprobs_runs_the_native_chunk_forward(lib, rng, monkeypatch):
    """ops.logprobs (no-grad, the inherited chunk loop) goes through the native kernel."""
    m, H, V = 37, 16, 1001
    h, W = torch.randn(m, H, generator=rng), torch.randn(V, H, generator=rng)
    b = torch.randn(V, generator=rng)
    y = torch.randint(0, V, (m,), generator=rng)
    calls = {"n": 0}
    orig = lib.chunk_forward

    class Counting:  # torch.ops namespaces are read-only: wrap the library object instead
        def __getattr__(self, k):
            return getattr(lib, k)

        def chunk_forward(self, *a):
            calls["n"] += 1
            return orig(*a)

    ops = native.NativeTorchOps(Counting())
    xf = XFS["all"]
    rs = ops.logprobs(h, W, b, y, 8, xf, True)
    assert calls["n"] == 5  # ceil(37 / 8) chunks
    o = oracle(torch.addmm(b, h, W.T), y, torch.ones(m), None, xf)
    torch.testing.assert_close(rs.logp.double(), o["logp"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rs.lse.double(), o["lse"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rs.entropy.double(), o["entropy"], rtol=1e-5, atol=1e-5)
    assert torch.equal(rs.top1, o["top1"])


# ------------------------------------------------- against the pure torch ops (TorchOps)
@pytest.mark.parametrize("xfname", ["identity", "scale_temp", "cap", "all"])
@pytest.mark.parametrize("kind", ["random", "peaked", "neg_inf"])
def test_ops_agree_with_torch(lib, rng, xfname, kind):
    xf = XFS[xfname]
    m, V = 17, 4099
    r, y = make_chunk(kind, xf, m, V, rng)
    coef = torch.rand(m, generator=rng) * 2 + 0.1
    zcoef = torch.rand(m, generator=rng) * 0.3
    out = []
    for ops in (TorchOps(), native.NativeTorchOps()):
        rows, state = ops.chunk_forward(r.clone(), y, xf, True)
        out.append((rows, ops.softmax_grad(state, y, rows, coef, zcoef, xf, torch.float32)))
    (a, ga), (b, gb) = out
    torch.testing.assert_close(b.logp, a.logp, atol=1e-30, rtol=6e-6)
    torch.testing.assert_close(b.lse, a.lse, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(b.entropy, a.entropy, atol=1e-30, rtol=6e-6)
    assert torch.equal(a.top1, b.top1)
    torch.testing.assert_close(gb, ga.float(), atol=1e-30, rtol=2e-5)


def test_native_ops_non_cpu_or_noncontig_fall_back(lib, rng):
    """NativeTorchOps hands anything the kernels do not take to the torch code, and its
    softmax_grad recognises the torch state."""
    r = torch.randn(7, 5, generator=rng).t()  # non-contiguous (5, 7)
    y = torch.randint(0, 7, (5,), generator=rng)
    coef, zcoef = torch.rand(5, generator=rng), torch.rand(5, generator=rng)
    n, t = native.NativeTorchOps(), TorchOps()
    xf = XFS["all"]
    a, sa = n.chunk_forward(r.clone(), y, xf, True)
    b, sb = t.chunk_forward(r.clone(), y, xf, True)
    assert not isinstance(sa, native.NativeState)
    for k in RowStats._fields:
        torch.testing.assert_close(getattr(a, k), getattr(b, k))
    torch.testing.assert_close(n.softmax_grad(sa, y, a, coef, zcoef, xf, torch.float32),
                               t.softmax_grad(sb, y, b, coef, zcoef, xf, torch.float32))


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

    def counting(self, *a, **k):
        calls["n"] += 1
        return orig(self, *a, **k)

    monkeypatch.setattr(native.NativeTorchOps, "chunk_forward", counting)
    out_n, g_n = run_ours(inp, cfg, "torch", -0.7, quality=q, **kw)
    assert calls["n"] > 0, "the native path was not taken"
    monkeypatch.setenv("IWSFT_NO_NATIVE", "1")
    out_p, g_p = run_ours(inp, cfg, "torch", -0.7, quality=q, **kw)
    monkeypatch.delenv("IWSFT_NO_NATIVE")
    ref = oracle_grads(inp, cfg, -0.7, quality=q)
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
    ref = oracle_grads(inp, cfg, 1.7)
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
    check(out, grads, oracle_grads(inp, cfg, 0.9), torch.float32)
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
