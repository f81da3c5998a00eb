"""Log-probs and gradients exact as p_y -> 1 (targets with 1 - p_y = 1e-6 ... 1e-12).

Every path computes the softmax denominator as 1 + rest, rest = the sum of exp(z_j - max)
over every entry but ONE arg-max entry, and logp = (z_y - max) - log1p(rest); the target
gradient entry is expm1(logp) = p_y - 1. A plain log(sum) would round 1 + rest to fp32, so
logp would be a multiple of 2^-24 near 0 and exactly 0 for 1 - p_y < 6e-8, and the target
gradient entry 0 while the others are not (the row's gradient no longer sums to zero).

Paths: torch backend with the native C++ epilogue, the pure torch ops (IWSFT_NO_NATIVE=1),
the Triton kernels (interpreter on CPU). The float64 oracle (iwsft_kernels.oracle) writes
log p_y = -softplus(logsumexp_{j != y} z_j - z_y), itself exact here (float64 log_softmax is
not: ~5e-4 relative at 1 - p_y = 1e-12).

Bars, against float64, per row: |logp - logp64| / |logp64| <= 1e-3, and the relative error
of each row of dH (target rows) and of dW (vocabulary rows) <= 1e-3 for fp32 inputs. bf16
inputs return bf16 gradients: rounding the exact float64 gradient to bf16 alone costs ~2-3e-3
per row, and the bf16 path rounds up to three times (G to bf16 before the dH GEMM on the
Triton path, the stored gradient, the stored gradient times grad_output), so their gradient
bar is 1e-3 + 3 * 2^-8; their log-probs (fp32) meet 1e-3. Naive fp32 log_softmax /
F.cross_entropy fails the bar at every one of these p_y (test_naive_fp32_fails).
"""

import pytest
import torch
import torch.nn.functional as F

from conftest import BACKENDS, DEVICE
from iwsft_kernels import IWConfig, linear_iwsft_loss, linear_logprobs
from iwsft_kernels.config import IDENTITY
from iwsft_kernels.backends import native_cpu as native
from iwsft_kernels.backends import torch_ops
from iwsft_kernels.core import select_ops
from iwsft_kernels.oracle import oracle_iwsft

EPS = [1e-6, 1e-8, 1e-10, 1e-12]  # 1 - p_y of every target row
PATHS = ["torch+native", "torch", "triton"]
BF16_U = 2.0**-8  # unit roundoff of bf16
TOL = 1e-3


def make_peaked(N, H, V, eps, dtype, gen, n_ignored=2):
    """Random W, bias, labels; each hidden row h_i = a_i * u_i + noise_i with W[y_i] . u_i = 1,
    a_i found by bisection so that 1 - p_y (float64, from the dtype-rounded inputs) ~ eps.
    eps may be a float or an (N,) tensor. Returns the inputs and the achieved 1 - p_y."""
    W = (torch.randn(V, H, generator=gen) / H**0.5).to(dtype)
    b = (0.5 * torch.randn(V, generator=gen)).to(dtype)
    y = torch.randint(0, V, (N,), generator=gen)
    W64, b64 = W.double(), b.double()
    for _ in range(100):  # redraw targets whose direction another vocabulary row beats
        u = W64[y] / W64[y].norm(dim=1, keepdim=True) ** 2
        gap = 1.0 - (u @ W64.T).scatter(1, y[:, None], -1.0).amax(1)
        bad = gap < 0.3
        if not bool(bad.any()):
            break
        y[bad] = torch.randint(0, V, (int(bad.sum()),), generator=gen)
    noise = 0.5 * torch.randn(N, H, generator=gen, dtype=torch.float64)
    target = torch.as_tensor(eps, dtype=torch.float64).expand(N)

    def one_minus_p(a):
        h = (a[:, None] * u + noise).to(dtype)
        z = h.double() @ W64.T + b64
        rest = torch.logsumexp(z.scatter(1, y[:, None], float("-inf")), 1)
        return torch.sigmoid(rest - z.gather(1, y[:, None]).squeeze(1)), h

    lo = torch.zeros(N, dtype=torch.float64)
    hi = torch.full((N,), 500.0, dtype=torch.float64)
    for _ in range(80):
        mid = (lo + hi) / 2
        big = one_minus_p(mid)[0] > target
        lo, hi = torch.where(big, mid, lo), torch.where(big, hi, mid)
    q, h = one_minus_p(hi)
    labels = y.clone()
    labels[torch.randperm(N, generator=gen)[:n_ignored]] = -100
    mask = labels != -100
    ratio = q[mask] / target[mask]
    assert bool(((ratio > 0.5) & (ratio < 1.01)).all()), ratio  # the p_y asked for
    return dict(hidden=h, weight=W, bias=b, labels=labels), q


def _row_rel(a, b):
    """Per-row relative error ||a_i - b_i|| / ||b_i|| over rows with b_i != 0."""
    a = a.detach().double().cpu().reshape(b.shape[0], -1)
    b = b.double().reshape(b.shape[0], -1)
    n = b.norm(dim=1)
    keep = n > 0
    assert bool((a[~keep] == 0).all())  # rows without gradient stay exactly zero
    return ((a - b).norm(dim=1)[keep] / n[keep]).max().item()


def _reference(inp, ref_lp, cfg, grad_out):
    h = inp["hidden"].double().requires_grad_()
    W = inp["weight"].double().requires_grad_()
    r = oracle_iwsft(h, W, inp["labels"], ref_lp.double(), bias=inp["bias"].double(),
                        config=cfg)
    (r["loss"] * grad_out).backward()
    return r["token_logprobs"], h.grad, W.grad


@pytest.fixture
def path(request, monkeypatch):
    name = request.param
    if name == "triton" and "triton" not in BACKENDS:
        pytest.skip("triton is not installed")
    if name == "torch+native":
        if DEVICE.type != "cpu":
            pytest.skip("the native epilogue is CPU only")
        if native.disabled():
            pytest.skip("IWSFT_NO_NATIVE=1 is set for this run")
        if native.load() is None:
            if native.find_compiler() is None:
                pytest.skip(f"no C++ compiler: {native.load_error()}")
            pytest.fail(f"native extension failed to build/load: {native.load_error()}")
        assert isinstance(select_ops("torch", torch.device("cpu")), native.NativeTorchOps)
    if name == "torch":
        monkeypatch.setenv("IWSFT_NO_NATIVE", "1")
        assert type(select_ops("torch", torch.device("cpu"))) is torch_ops.TorchOps
    return "triton" if name == "triton" else "torch"


def _logp_rel(lp, lp64, mask):
    lp, lp64 = lp.detach().double().cpu()[mask], lp64[mask]
    return ((lp - lp64).abs() / lp64.abs()).max().item()


def _row_rel_each(a, b):
    """Per-row relative errors ||a_i - b_i|| / ||b_i|| (rows with b_i = 0 must be 0)."""
    a = a.detach().double().cpu().reshape(b.shape[0], -1)
    b = b.double().reshape(b.shape[0], -1)
    n = b.norm(dim=1)
    assert bool((a[n == 0] == 0).all())
    return (a - b).norm(dim=1) / n.clamp(min=1e-300)


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_peaked_loss_exact(path, rng, dtype):
    """Every 1 - p_y of EPS in one batch (rows cycle through them). Token mode (non-uniform
    weights from logp - ref), grad_output != 1, odd shapes, a bias, ignored positions;
    several vocabulary tiles per row on the Triton path. dW rows are checked where the
    vocabulary row is some row's target (|dW_v| ~ 1 - p_y) and over all rows."""
    N, H, V = 26, 24, 301
    eps = torch.tensor(EPS * (N // len(EPS) + 1), dtype=torch.float64)[:N]
    inp, _ = make_peaked(N, H, V, eps, dtype, rng)
    ref_lp = -2.0 * torch.rand(N, generator=rng) - 0.01
    cfg = IWConfig(mode="token")
    lp64, dh64, dw64 = _reference(inp, ref_lp, cfg, 1.7)

    h = inp["hidden"].to(DEVICE).requires_grad_()
    W = inp["weight"].to(DEVICE).requires_grad_()
    out = linear_iwsft_loss(h, W, inp["labels"].to(DEVICE), ref_lp.to(DEVICE),
                            bias=inp["bias"].to(DEVICE), config=cfg, backend=path)
    (out.loss * 1.7).backward()
    mask = inp["labels"] != -100
    lp = out.token_logprobs.detach().double().cpu()
    e_lp = (lp - lp64).abs() / lp64.abs()
    e_dh = _row_rel_each(h.grad, dh64)
    e_dw = _row_rel_each(W.grad, dw64)
    gtol = TOL if dtype == torch.float32 else TOL + 3 * BF16_U
    rows = {v: mask & (eps == v) for v in EPS}
    msg = "; ".join(f"1-p={v:.0e}: logp {e_lp[r].max():.1e} dH {e_dh[r].max():.1e} "
                    f"dW {e_dw[inp['labels'][r]].max():.1e}" for v, r in rows.items())
    assert float(e_lp[mask].max()) <= TOL, msg
    assert float(e_dh[mask].max()) <= gtol, msg
    assert float(e_dw.max()) <= gtol, msg


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_peaked_linear_logprobs_exact(path, rng, dtype):
    """linear_logprobs: on the Triton path the fused logits-tile kernel, its vocabulary split
    (3 splits under the interpreter) and the host merge of the splits' (max, rest, target)."""
    N, H, V = 40, 24, 301
    eps = torch.tensor(EPS * (N // len(EPS)), dtype=torch.float64)
    inp, _ = make_peaked(N, H, V, eps, dtype, rng, n_ignored=4)
    lp64 = oracle_iwsft(inp["hidden"].double(), inp["weight"].double(), inp["labels"],
                           bias=inp["bias"].double(), config=IWConfig(mode="sft"))["token_logprobs"]
    lp = linear_logprobs(*(inp[k].to(DEVICE) for k in ("hidden", "weight", "labels")),
                         bias=inp["bias"].to(DEVICE), backend=path)
    mask = inp["labels"] != -100
    assert bool((lp.cpu()[~mask] == 0).all())
    e = _logp_rel(lp, lp64, mask)
    assert e <= TOL, f"logp rel err {e:.2e}"


@pytest.mark.parametrize("eps", EPS)
def test_naive_fp32_fails(rng, eps):
    """The bar above is not trivial: fp32 log_softmax on materialised fp32 logits (and the
    gradient of F.cross_entropy through it) misses it at every one of these p_y. Measured
    (README, "How it works"): logp rel err ~7e-2 at 1 - p_y = 1e-6, exactly 1 (logp = 0)
    from 1e-8 down; row gradient errors of the same order."""
    N, H, V = 19, 24, 301
    inp, _ = make_peaked(N, H, V, eps, torch.float32, rng)
    lp64, dh64, dw64 = _reference(inp, torch.zeros(N), IWConfig(mode="sft"), 1.0)
    h = inp["hidden"].clone().requires_grad_()
    W = inp["weight"].clone().requires_grad_()
    z = F.linear(h, W, inp["bias"])
    F.cross_entropy(z, inp["labels"]).backward()
    lp = torch.log_softmax(z.detach(), 1).gather(1, inp["labels"].clamp(min=0)[:, None])[:, 0]
    mask = inp["labels"] != -100
    e_lp = _logp_rel(lp, lp64, mask)
    e_dh = _row_rel(h.grad[mask], dh64[mask])
    e_dw = _row_rel(W.grad, dw64)
    assert e_lp > 10 * TOL and e_dh > 10 * TOL and e_dw > 10 * TOL, (e_lp, e_dh, e_dw)


# --------------------------------------------------- the (max, rest) state: ties, -inf tiles
def _rest64(z):
    z = z.double()
    e = torch.exp(z - z.amax(1, keepdim=True))
    return e.scatter(1, z.argmax(1, keepdim=True), 0.0).sum(1)


def _tied_logits(rng, m, V):
    """Logits with the row max repeated (2-3 times, far apart: other tiles / splits), -inf in
    whole 32-column tiles (incl. the first), and a peaked row."""
    z = torch.randn(m, V, generator=rng) * 3
    z[:, :32] = -float("inf")  # an all -inf first tile
    z[:, 96:128] = -float("inf")
    for i in range(m):
        j = torch.randperm(V - 128, generator=rng)[:3] + 128
        top = float(z[i].max()) + 1.0
        z[i, j[: 2 + i % 2]] = top
    z[0, 200] = float(z[0].max()) + 30.0  # peaked: 1 - p ~ e^-30 * V
    y = torch.randint(128, V, (m,), generator=rng)
    y[0] = 200
    y[1] = int(z[1].argmax())  # target on a tied max
    return z, y


def test_ops_rest_with_ties_and_masked_tiles(rng):
    """Every chunk epilogue: rest = the sum without exactly one of the tied maxima; logp and
    the gradient against float64 (entry-wise relative)."""
    m, V = 5, 333
    z, y = _tied_logits(rng, m, V)
    coef = torch.rand(m, generator=rng) + 0.5
    lp64 = torch.log_softmax(z.double(), 1).gather(1, y[:, None])[:, 0]
    lp64[0] = -torch.log1p(_rest64(z[:1]))[0]  # target = the unique max: exact form
    p64 = torch.softmax(z.double(), 1)
    g64 = coef.double()[:, None] * p64
    g64.scatter_(1, y[:, None], (coef.double() * torch.expm1(lp64))[:, None])
    ops = [torch_ops.TorchOps()]
    if native.load() is not None:
        ops.append(native.NativeTorchOps())
    if "triton" in BACKENDS:
        from iwsft_kernels.backends.triton_ops import TritonOps

        ops.append(TritonOps())
    for o in ops:
        zc = z.clone().to(DEVICE)
        rows, state = o.chunk_forward(zc, y.to(DEVICE))
        lp = rows.logp
        # the ops' states: triton (z, mx, rest, ..), torch and native (e, rest, ..)
        rest = state[2 if o.name == "triton" else 1].cpu().double()
        assert torch.allclose(rest, _rest64(z), rtol=1e-5, atol=0), (o.name, rest, _rest64(z))
        assert torch.allclose(lp.cpu().double(), lp64, rtol=1e-5, atol=0), o.name
        g = o.softmax_grad(state, y.to(DEVICE), rows, coef.to(DEVICE), None, IDENTITY,
                           torch.float32).cpu()
        assert bool(((g.double() - g64).abs() <= 1e-5 * g64.abs()).all()), o.name


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton is not installed")
def test_lse_forward_ties_across_splits(rng):
    """The fused kernel's merge: W rows duplicated so that the row max ties exactly across
    vocabulary tiles and splits; a -inf bias masks whole tiles (the first one too)."""
    from iwsft_kernels.backends import triton_lse

    M, H, V = 21, 16, 330
    h = torch.randn(M, H, generator=rng)
    W = torch.randn(V, H, generator=rng)
    best = (h @ W.T).argmax(1)
    # interpreter: 32-column tiles, 3 splits of 4 tiles (columns 0-127, 128-255, 256-329)
    W[40] = W[70] = W[300] = W[int(best[0])]  # row 0: the max tied in splits 0 (twice) and 2
    b = torch.zeros(V)
    b[:32] = -float("inf")  # the first tile
    b[128:256] = -float("inf")  # all of split 1: an empty partial in the merge
    y = torch.randint(256, V, (M,), generator=rng)
    y[0] = 300
    lse, lp = triton_lse.lse_forward(h.to(DEVICE), W.to(DEVICE), b.to(DEVICE), y.to(DEVICE))
    z64 = h.double() @ W.double().T + b.double()
    torch.testing.assert_close(lse.cpu().double(), torch.logsumexp(z64, 1), rtol=2e-6, atol=0)
    lp64 = torch.log_softmax(z64, 1).gather(1, y[:, None])[:, 0]
    torch.testing.assert_close(lp.cpu().double(), lp64, rtol=1e-5, atol=1e-6)
