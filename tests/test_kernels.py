"""The Triton ops (interpreter on CPU) against a float64 op-level oracle written here: raw
logits r (or h, W, b) in float64 -> the logit transform -> softmax, the fused per-row outputs
(logp, lse, top1, entropy) and the gradient w.r.t. the raw logits (coef, z-loss zcoef, dz/dr).

Transforms: identity; scale; a moderate soft cap; a saturated one (|s r / c| up to 50);
scale + cap + temperature. Rows: random, peaked (1 - p_y from 1e-6 down to 1e-12 in the
transformed space), the target on a tied maximum, saturated. Odd V and H, a bias, fp32 and
bf16 inputs, 1 / several vocabulary splits in the fused kernel.

Tolerances are entry-wise and derived from fp32 rounding: delta = 4 ulp of the row's largest
|z| (and of the cap's range c / tau, where the stable tanh has an absolute error of a few
ulp of c / tau), plus, for the fused kernel, the fp32 accumulation error of the H-long dot;
peaked quantities (logp ~ -1e-12, its gradient entry) are checked relative to their size.
"""

import math

import pytest
import torch

pytest.importorskip("triton")

from conftest import DEVICE  # noqa: E402
from iwsft_kernels.backends import triton_configs, triton_grad_weight, triton_lse  # noqa: E402
from iwsft_kernels.backends.rows import RowStats  # noqa: E402
from iwsft_kernels.backends.triton_ops import TritonOps  # noqa: E402
from iwsft_kernels.config import IDENTITY, LogitTransform  # noqa: E402

EPS32 = 2.0**-23

XFS = {
    "identity": IDENTITY,
    "scale": LogitTransform(scale=0.37),
    "cap": LogitTransform(softcap=5.0),  # moderate: |r / c| ~ 0.6
    "cap-saturated": LogitTransform(scale=2.0, softcap=0.8),  # rows with |s r / c| up to 50
    "scale-cap-temp": LogitTransform(scale=1.7, softcap=20.0, temperature=0.5),  # c/tau = 40
}


# --------------------------------------------------------------------------- float64 oracle


def transform64(r, xf):
    """(z, dz/dr) in float64; sech^2 as 1 / cosh^2 (independent of the kernels' u-form)."""
    x = r * xf.scale
    if xf.softcap is not None:
        z = xf.softcap * torch.tanh(x / xf.softcap)
        dz = (xf.scale / xf.temperature) / torch.cosh(x / xf.softcap) ** 2
    else:
        z, dz = x, torch.full_like(r, xf.scale / xf.temperature)
    return z / xf.temperature, dz


def oracle(r, y, xf, coef=None, zcoef=None):
    """Everything the ops return, from float64 raw logits r (m, V), in the exact forms
    (rest without one arg-max entry, log1p, expm1), so that peaked rows are exact too."""
    z, dz = transform64(r.double(), xf)
    m, arg = z.max(1, keepdim=True)
    d = torch.where(torch.isfinite(z), z - m, float("-inf"))
    e = d.exp()
    e.scatter_(1, arg, 0.0)
    rest = e.sum(1)
    e.scatter_(1, arg, 1.0)
    s1 = (e * torch.where(torch.isfinite(d), d, 0.0)).sum(1)
    t = z.gather(1, y[:, None])[:, 0]
    m = m[:, 0]
    logp = (t - m) - torch.log1p(rest)
    out = dict(z=z, dz=dz, rest=rest, logp=logp, lse=m + torch.log1p(rest), top1=t == m,
               margin=m - t, entropy=torch.log1p(rest) - s1 / (1.0 + rest))
    if coef is not None:
        c = coef.double()
        zc = torch.zeros_like(c) if zcoef is None else zcoef.double()
        gz = (c + zc)[:, None] * e / (1.0 + rest)[:, None]
        gz.scatter_(1, y[:, None], (c * torch.expm1(logp) + zc * torch.exp(logp))[:, None])
        out["G"] = gz * dz
    return out


def row_delta(o, xf, extra=None):
    """Per-row absolute error scale of z in fp32 (see the module docstring)."""
    z = o["z"]
    zmax = torch.where(torch.isfinite(z), z.abs(), 0.0).amax(1).clamp(min=1.0)
    if xf.softcap is not None:
        zmax = zmax.clamp(min=xf.softcap / xf.temperature)
    d = 4 * EPS32 * zmax
    return d if extra is None else d + extra


def assert_within(name, got, want, tol):
    got, want = got.detach().cpu().double(), want.double()
    err = (got - want).abs()
    bad = ~(err <= tol)  # NaN fails
    assert not bool(bad.any()), (
        f"{name}: {int(bad.sum())} entries out of tolerance; worst at "
        f"{tuple(int(i) for i in torch.nonzero(bad)[0])}: got {got[bad][0].item():.10g} want "
        f"{want[bad][0].item():.10g} tol {torch.broadcast_to(tol, err.shape)[bad][0].item():.3g}")


def check_rows(rows: RowStats, o, delta, want_entropy):
    """logp, lse, top1, entropy of RowStats against the oracle with per-row delta."""
    assert isinstance(rows, RowStats)
    lp = o["logp"]
    tol_lp = 8 * delta * lp.abs().clamp(max=1.0) + 4e-6 * lp.abs()
    assert_within("logp", rows.logp, lp, tol_lp)
    assert bool((rows.logp <= 0).all())
    assert_within("lse", rows.lse, o["lse"], 8 * delta + 4e-6 * o["lse"].abs())
    assert rows.top1.dtype == torch.bool
    # top1 is t == m in fp32: compare where float64 is unambiguous (tied, or a clear margin)
    clear = (o["margin"] == 0) | (o["margin"] > 16 * delta)
    assert bool((rows.top1.cpu()[clear] == o["top1"][clear]).all()), (rows.top1, o["top1"])
    if want_entropy:
        H = o["entropy"]
        assert_within("entropy", rows.entropy, H, 16 * delta * H.clamp(max=1.0) + 1e-5 * H)
        assert bool((rows.entropy >= 0).all())
    else:
        assert rows.entropy is None
    return tol_lp


# --------------------------------------------------------------------------- inputs


def _inverse(z, xf):
    """Raw r with transform(r) = z (float64), |z| < c / tau when capped."""
    if xf.softcap is None:
        return z / xf.factor
    return (xf.softcap / xf.scale) * torch.atanh(z * xf.temperature / xf.softcap)


def _peaked_z(V, y, k, z_top, rng):
    """A z row whose target has 1 - p_y ~ 10^-k: the others z_top - gap - U(0, 3)."""
    gap = math.log((V - 1) * (1 - math.exp(-3)) / 3) + k * math.log(10)
    z = z_top - gap - 3 * torch.rand(V, generator=rng, dtype=torch.float64)
    z[y] = z_top
    return z


def chunk_inputs(xf, V, rng):
    """Raw fp32 logits (m, V) and targets: random rows, peaked rows (where the cap's range
    allows 1 - p_y = 1e-12: c / tau >= ~33), a tied maximum on the target, saturated rows."""
    cap = xf.softcap is not None
    L = xf.softcap / xf.temperature if cap else math.inf
    rows, ys = [], []
    for _ in range(3):  # random; |z| ~ 3 (linear), |s r / c| ~ 0.6 (cap)
        y = int(torch.randint(0, V, (1,), generator=rng))
        if cap:
            r = (xf.softcap / xf.scale) * 0.6 * torch.randn(V, generator=rng, dtype=torch.float64)
        else:
            r = 3.0 * torch.randn(V, generator=rng, dtype=torch.float64) / xf.factor
        rows.append(r)
        ys.append(y)
    if L > 33:
        for k in (6, 9, 12):
            y = int(torch.randint(0, V, (1,), generator=rng))
            z_top = 10.0 if not cap else 0.45 * L
            rows.append(_inverse(_peaked_z(V, y, k, z_top, rng), xf))
            ys.append(y)
    r = rows[0].clone()  # the target on a tied maximum (and a third entry just below)
    y = (ys[0] + 5) % V
    r[y] = r[(y + 7) % V] = r.max() + 0.5
    r[(y + 11) % V] = r[y] - 1e-3
    rows.append(r)
    ys.append(y)
    if cap:  # saturated: s r / c uniform in [-50, 50], a target among the largest
        for _ in range(2):
            r = (xf.softcap / xf.scale) * 50 * (2 * torch.rand(V, generator=rng, dtype=torch.float64) - 1)
            ys.append(int(r.argsort()[-3]))
            rows.append(r)
    return torch.stack(rows).float(), torch.tensor(ys)


# --------------------------------------------------------------------------- the oracle itself


def test_oracle_matches_autograd_and_definitions(rng):
    """The float64 oracle: G_r is the derivative of sum(-coef logp + zcoef lse) w.r.t. the raw
    logits (autograd through the transform), entropy = -sum p log p, lse = logsumexp."""
    xf = XFS["scale-cap-temp"]
    m, V = 6, 29
    r = (8 * torch.randn(m, V, generator=rng, dtype=torch.float64)).requires_grad_()
    y = torch.randint(0, V, (m,), generator=rng)
    coef, zc = torch.rand(m, generator=rng), torch.randn(m, generator=rng)
    o = oracle(r.detach(), y, xf, coef, zc)
    z, _ = transform64(r, xf)
    ls = torch.log_softmax(z, 1)
    (-(coef.double() * ls.gather(1, y[:, None])[:, 0]).sum()
     + (zc.double() * torch.logsumexp(z, 1)).sum()).backward()
    torch.testing.assert_close(o["G"], r.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(o["entropy"], -(ls.exp() * ls).sum(1).detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(o["lse"], torch.logsumexp(z, 1).detach(), rtol=1e-14, atol=0)


# --------------------------------------------------------------------------- chunk kernels


@pytest.mark.parametrize("want_entropy,with_zcoef,gdtype", [
    (False, False, torch.float32), (True, True, torch.float32), (True, True, torch.bfloat16)])
@pytest.mark.parametrize("xf_name", list(XFS))
def test_chunk_forward_and_softmax_grad(rng, xf_name, want_entropy, with_zcoef, gdtype):
    xf = XFS[xf_name]
    V = 77  # 3 tiles of the interpreter's 32 columns, the last one masked
    r, y = chunk_inputs(xf, V, rng)
    m = r.shape[0]
    coef = torch.rand(m, generator=rng) + 0.1
    zcoef = 0.3 * torch.randn(m, generator=rng) if with_zcoef else None
    o = oracle(r, y, xf, coef, zcoef)
    if xf.softcap is not None:  # the inputs reach what they claim: saturated rows
        assert float((xf.scale / xf.softcap) * r.double().abs().amax()) > 45
    if xf.softcap is None or xf.softcap / xf.temperature > 33:
        q = o["rest"] / (1 + o["rest"])  # 1 - p_y of the peaked rows
        assert float(q.min()) < 3e-12 and bool(((q > 1e-13) & (q < 1e-5)).sum() >= 3)

    ops = TritonOps()
    rd, yd = r.to(DEVICE), y.to(DEVICE)
    rows, state = ops.chunk_forward(rd, yd, xf, want_entropy)
    delta = row_delta(o, xf)
    tol_lp = check_rows(rows, o, delta, want_entropy)

    g = ops.softmax_grad(state, yd, rows, coef.to(DEVICE), None if zcoef is None else zcoef.to(DEVICE),
                         xf, gdtype)
    assert g.dtype == gdtype and g.shape == (m, V)
    if gdtype == torch.float32:  # G is written in the logits' memory: no (m, V) temporary
        assert g.data_ptr() == rd.data_ptr()
    G = o["G"]
    x_max = float((xf.scale / (xf.softcap or math.inf)) * r.double().abs().max())
    rtol = 8 * delta[:, None] + 4 * EPS32 * (1 + 2 * x_max) + 1e-6
    if gdtype == torch.bfloat16:  # one bf16 ulp (the interpreter's cast truncates)
        rtol = rtol + 2.0**-7
    tol = rtol * G.abs() + 1e-36  # sech^2 of |x| > 43 is an fp32 denormal
    # the target entry: its error is the logp error times (coef + zcoef) dz/dr
    cz = coef.double().abs() + (0 if zcoef is None else zcoef.double().abs())
    tgt_tol = 1.5 * cz * tol_lp * o["dz"].gather(1, y[:, None])[:, 0]
    tol.scatter_add_(1, y[:, None], tgt_tol[:, None])
    assert_within("G_r", g.float(), G, tol)


def test_chunk_ops_identity_and_linear_are_exact_twins(rng):
    """scale 1 / temperature 1 (no cap) is the identity: the same numbers; scale s and
    temperature s give the identity transform too (factor 1), through the linear kernel."""
    r = 4 * torch.randn(7, 45, generator=rng)
    y = torch.randint(0, 45, (7,), generator=rng)
    ops = TritonOps()
    a, _ = ops.chunk_forward(r.clone().to(DEVICE), y.to(DEVICE), LogitTransform(scale=1.0), True)
    b, _ = ops.chunk_forward(r.clone().to(DEVICE), y.to(DEVICE),
                             LogitTransform(scale=3.0, temperature=3.0), True)
    for f in ("logp", "lse", "entropy"):
        torch.testing.assert_close(getattr(a, f), getattr(b, f), rtol=0, atol=0)
    assert torch.equal(a.top1, b.top1)


def test_op_argument_errors(rng):
    ops = TritonOps()
    r = torch.randn(3, 10).to(DEVICE)
    y = torch.zeros(3, dtype=torch.long).to(DEVICE)
    with pytest.raises(TypeError, match="LogitTransform"):
        ops.chunk_forward(r, y, 2.0, False)
    rows, state = ops.chunk_forward(r, y, IDENTITY, False)
    with pytest.raises(ValueError, match=r"coef must have shape \(3,\)"):
        ops.softmax_grad(state, y, rows, torch.ones(4).to(DEVICE), None, IDENTITY, torch.float32)
    with pytest.raises(ValueError, match="zcoef"):
        ops.softmax_grad(state, y, rows, torch.ones(3).to(DEVICE), torch.ones(3, 1).to(DEVICE),
                         IDENTITY, torch.float32)
    with pytest.raises(ValueError, match="unit column stride"):
        ops.chunk_forward(r.T, y, IDENTITY, False)


# --------------------------------------------------------------------------- fused LSE kernel


def fused_inputs(xf, M, H, V, dtype, rng):
    """h, W, b, y with three peaked rows (1 - p_y ~ 1e-6, 1e-9, 1e-12 in z space): W's
    column 0 is e_0 for the vocabulary entry g and 0 elsewhere, those rows are a e_0 + noise
    with a found by bisection; the rest random."""
    h = torch.randn(M, H, generator=rng, dtype=torch.float64)
    W = torch.randn(V, H, generator=rng, dtype=torch.float64) / H**0.5
    b = 0.5 * torch.randn(V, generator=rng, dtype=torch.float64)
    y = torch.randint(0, V, (M,), generator=rng)
    g = V // 2
    W[:, 0] = 0.0
    W[g] = 0.0
    W[g, 0] = 1.0
    b[g] = 0.0
    h[:3] *= 0.05
    y[:3] = g
    W, b = W.to(dtype).double(), b.to(dtype).double()

    def q_of(a, i):
        hi = h[i].clone()
        hi[0] = a
        hi = hi.to(dtype).double()
        o = oracle((hi @ W.T + b)[None], y[i:i + 1], xf)
        return float(o["rest"][0] / (1 + o["rest"][0])), hi

    for i, k in enumerate((6, 9, 12)):
        lo, hi_ = 0.0, 1.0
        while q_of(hi_, i)[0] > 10.0**-k:
            lo, hi_ = hi_, 2 * hi_
            assert hi_ < 1e4, "no peaked row under this transform"
        for _ in range(40):
            mid = 0.5 * (lo + hi_)
            lo, hi_ = (mid, hi_) if q_of(mid, i)[0] > 10.0**-k else (lo, mid)
        h[i] = q_of(hi_, i)[1]
    return h.to(dtype), W.to(dtype), b.to(dtype), y


def _small_tiles(monkeypatch):
    """The interpreter's 16x32x16 tiles on CUDA too, so that the forced splits are real."""
    monkeypatch.setattr(triton_lse, "lse_config",
                        lambda *a, **k: triton_configs.lse_config(*a, **{**k, "interpret": True}))


FUSED = [  # (xf, dtype, entropy, splits): splits "all" = every vocabulary tile its own split
    ("identity", torch.float32, False, None),
    ("identity", torch.bfloat16, True, "all"),
    ("scale", torch.float32, True, 1),
    ("cap-saturated", torch.float32, True, "all"),
    ("scale-cap-temp", torch.float32, True, None),
    ("scale-cap-temp", torch.bfloat16, True, "all"),
]


@pytest.mark.parametrize("xf_name,dtype,want_entropy,splits", FUSED)
def test_fused_lse_rows(rng, monkeypatch, xf_name, dtype, want_entropy, splits):
    xf = XFS[xf_name]
    M, H, V = 37, 45, 101  # 3 row blocks, 3 K steps, 4 vocabulary tiles (interpreter tiles)
    peaked = xf.softcap is None or xf.softcap / xf.temperature > 33
    if peaked:
        h, W, b, y = fused_inputs(xf, M, H, V, dtype, rng)
    else:  # saturating: |s r / c| up to ~50
        h = (torch.randn(M, H, generator=rng) * 6).to(dtype)
        W = torch.randn(V, H, generator=rng).to(dtype)
        b = torch.randn(V, generator=rng).to(dtype)
        y = torch.randint(0, V, (M,), generator=rng)
    seen = []
    if splits is not None:
        _small_tiles(monkeypatch)

        def forced(m_blocks, n_tiles, device):
            seen.append(n_tiles if splits == "all" else splits)
            return seen[-1]
        monkeypatch.setattr(triton_lse, "lse_num_splits", forced)
    rows = TritonOps().logprobs(h.to(DEVICE), W.to(DEVICE), b.to(DEVICE), y.to(DEVICE), M, xf,
                                want_entropy)
    if splits == "all":
        assert seen == [4]
    r64 = h.double() @ W.double().T + b.double()
    o = oracle(r64, y, xf)
    if peaked:
        q = (o["rest"] / (1 + o["rest"]))[:3]
        assert float(q.min()) < 3e-12 and float(q.max()) < 3e-6
    else:
        assert float((xf.scale / xf.softcap) * r64.abs().max()) > 40
    acc = (h.double().abs() @ W.double().abs().T + b.double().abs()).amax(1)
    delta = row_delta(o, xf, 8 * H**0.5 * EPS32 * acc * xf.factor)
    check_rows(rows, o, delta, want_entropy)


def test_fused_ties_across_splits_under_a_cap(rng, monkeypatch):
    """Duplicated W rows: the row maximum ties exactly across vocabulary tiles and splits, after
    a soft cap with scale and temperature; the target on it is top1, and rest counts the
    other copies exactly (logp = -log1p(rest) with rest >= 2)."""
    xf = LogitTransform(scale=1.3, softcap=7.0, temperature=0.8)
    M, H, V = 5, 16, 130
    h = torch.randn(M, H, generator=rng)
    W = torch.randn(V, H, generator=rng)
    best = int((h[0] @ W.T).argmax())
    W[10] = W[70] = W[120] = W[best]
    y = torch.randint(0, V, (M,), generator=rng)
    y[0] = 70
    _small_tiles(monkeypatch)
    monkeypatch.setattr(triton_lse, "lse_num_splits", lambda m_blocks, n_tiles, device: n_tiles)
    rows = triton_lse.lse_rows(h.to(DEVICE), W.to(DEVICE), None, y.to(DEVICE), xf, True)
    o = oracle(h.double() @ W.double().T, y, xf)
    assert bool(rows.top1[0]) and bool(o["top1"][0])
    delta = row_delta(o, xf, 8 * H**0.5 * EPS32 * (h.abs() @ W.abs().T).amax(1).double() * xf.factor)
    check_rows(rows, o, delta, True)


def test_legacy_lse_forward_wrapper(rng):
    """lse_forward (bench/tune_sm90.py): (lse, logp) of the identity transform."""
    h, W = torch.randn(9, 20, generator=rng), torch.randn(33, 20, generator=rng)
    y = torch.randint(0, 33, (9,), generator=rng)
    lse, logp = triton_lse.lse_forward(h.to(DEVICE), W.to(DEVICE), None, y.to(DEVICE))
    z = h.double() @ W.double().T
    torch.testing.assert_close(lse.cpu().double(), torch.logsumexp(z, 1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logp.cpu().double(), torch.log_softmax(z, 1).gather(1, y[:, None])[:, 0],
                               rtol=1e-5, atol=1e-5)


def test_s1_merge_rule_matches_direct_sum(rng):
    """The S1 rebase used across tiles / splits: merging partials of a row gives the direct
    float64 S1 of the whole row (host-side twin of triton_epilogue.merge_stats)."""
    z = 5 * torch.randn(3, 40, generator=rng, dtype=torch.float64)
    parts = z.split([7, 13, 20], dim=1)

    def part_stats(p):
        m = p.max(1).values
        e = (p - m[:, None]).exp()
        return m, e.sum(1) - 1.0, (e * (p - m[:, None])).sum(1)

    M, R, S = part_stats(parts[0])
    for p in parts[1:]:
        m_b, r_b, s_b = part_stats(p)
        m = torch.maximum(M, m_b)
        S = (torch.exp(M - m) * (S + (M - m) * (1 + R))
             + torch.exp(m_b - m) * (s_b + (m_b - m) * (1 + r_b)))
        R = torch.exp(M - m) * (1 + R) + torch.exp(m_b - m) * (1 + r_b) - 1.0
        M = m
    m_all, r_all, s_all = part_stats(z)
    torch.testing.assert_close(S, s_all, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(R, r_all, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- dW


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_grad_weight_accumulates_in_fp32(rng, dtype):
    m, V, H = 23, 51, 37
    dw = torch.randn(V, H, generator=rng).to(DEVICE)
    start = dw.clone()
    g = torch.randn(m, V, generator=rng).to(dtype).to(DEVICE)
    h = torch.randn(m, H, generator=rng).to(dtype).to(DEVICE)
    triton_grad_weight.accum_grad_weight(dw, g, h)
    torch.testing.assert_close(dw.double(), start.double() + g.double().T @ h.double(), rtol=1e-5, atol=1e-4)
