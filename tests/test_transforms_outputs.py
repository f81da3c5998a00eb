"""Logit transforms (scale, softcap, temperature), the fused per-token outputs (entropy, top1,
lse) and the z-loss (docs/design.md §9), against the float64 oracle (iwsft_kernels.oracle:
materialised float64 logits, the transform from its definition, exact log-probs as p_y -> 1).

Every check runs on three paths: the torch backend with the native C++ epilogue
("native"), the pure torch ops (IWSFT_NO_NATIVE=1, "torch") and the Triton kernels ("triton",
Triton's interpreter on CPU); a spy on core.select_ops asserts that the intended ops ran.
Shapes are tiny and odd; weights non-uniform; grad_output != 1 everywhere.
"""

import math

import pytest
import torch

from conftest import BACKENDS, DEVICE
from helpers import make_inputs, oracle_grads, rel
from iwsft_kernels import (IWConfig, LinearIWSFTLoss, LogitTransform, LogProbsOutput, core,
                           linear_iwsft_loss, linear_logprobs)
from iwsft_kernels.backends import native_cpu as native
from iwsft_kernels.backends.chunked import rows_per_chunk
from iwsft_kernels.backends.torch_ops import TorchOps
from iwsft_kernels.config import IDENTITY, OUTPUTS
from iwsft_kernels.oracle import oracle_iwsft, transformed_logits

ALL = ("entropy", "top1", "lse")
PATHS = ["native", "torch"] + (["triton"] if "triton" in BACKENDS else [])
OPS_NAME = {"native": "torch+native", "torch": "torch", "triton": "triton"}


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """The backend to pass, with IWSFT_NO_NATIVE set for the pure torch path; the test's
    select_ops calls are recorded in path.used (names of the ops that ran)."""
    p = request.param
    if p == "native" and (DEVICE.type != "cpu" or native.load() is None):
        pytest.skip("the native CPU epilogue is not available here")
    if p == "torch":
        monkeypatch.setenv("IWSFT_NO_NATIVE", "1")
    used = []
    real = core.select_ops

    def spy(*a, **k):
        ops = real(*a, **k)
        used.append(ops.name)
        return ops

    monkeypatch.setattr(core, "select_ops", spy)

    class P(str):
        pass

    out = P("triton" if p == "triton" else "torch")
    out.name, out.used = p, used
    return out


def _assert_path(path):
    assert path.used and set(path.used) == {OPS_NAME[path.name]}, path.used


def run(inp, cfg, backend, grad_out, *, quality=None, **kw):
    leaves = {k: inp[k].detach().clone().requires_grad_() for k in ("hidden", "weight", "bias")
              if inp.get(k) is not None}
    out = linear_iwsft_loss(leaves["hidden"], leaves["weight"], inp["labels"],
                            inp["ref_logprobs"], cu_seqlens=inp.get("cu_seqlens"),
                            bias=leaves.get("bias"), quality=quality, config=cfg,
                            backend=backend, **kw)
    (out.loss * grad_out).backward()
    return out, {k: v.grad for k, v in leaves.items()}


def assert_top1(got, ref_top1, z64, y, mask, rtol=1e-5):
    """top1 vs the oracle's, except on rows where the float64 target logit is within rtol of
    the row max without equalling it (fp32 may round such a near-tie to a tie). Returns the
    number of rows compared strictly."""
    got = got.cpu()
    t = z64.gather(1, y.clamp(min=0)[:, None]).squeeze(1)
    mx = z64.amax(1)
    near = (mx - t > 0) & (mx - t <= rtol * (1 + mx.abs()))
    strict = mask & ~near
    assert torch.equal(got[strict], ref_top1[strict])
    assert not bool(got[~mask].any())  # False at ignored positions
    return int(strict.sum())


def _z64(inp, xf_kw):
    W = inp["weight"].detach().double().cpu()
    r = inp["hidden"].detach().reshape(-1, W.shape[1]).double().cpu() @ W.T
    if inp.get("bias") is not None:
        r = r + inp["bias"].detach().double().cpu()
    return transformed_logits(r, **xf_kw)


def check_all(out, grads, ref, inp, xf_kw, dtype=torch.float32, outputs=ALL):
    """Loss, log-probs, weights, gradients, z-loss term and the requested outputs vs the
    float64 oracle. fp32: 2e-5 relative on the gradients; bf16 inputs: 2e-2 on the (bf16)
    gradients; the fp32 per-token outputs of either dtype: 2e-5 (their arithmetic is fp32 on
    the same inputs)."""
    gtol = 2e-5 if dtype == torch.float32 else 2e-2
    otol = 2e-5
    y = inp["labels"].reshape(-1).cpu()
    mask = y != -100
    loss, ref_loss = float(out.loss.detach()), float(ref["loss"])
    assert math.isfinite(loss) and abs(loss - ref_loss) <= otol * max(1.0, abs(ref_loss))
    zt = out.z_loss
    assert zt.shape == () and zt.dtype == torch.float32 and not zt.requires_grad
    assert abs(float(zt) - float(ref["z_loss"])) <= otol * max(1.0, float(ref["z_loss"]))
    assert rel(out.token_logprobs, ref["token_logprobs"]) < otol
    assert rel(out.token_weights, ref["token_weights"]) < 5 * otol
    assert rel(out.seq_weights, ref["seq_weights"]) < 5 * otol
    for k, g in ref["grads"].items():
        assert grads[k] is not None and grads[k].dtype == dtype, k
        e = rel(grads[k], g)
        assert e < gtol, f"grad {k}: rel err {e:.2e}"
    N = y.numel()
    for name in OUTPUTS:
        v = getattr(out, name)
        if name not in outputs:
            assert v is None, name
            continue
        assert v.shape == (N,) and not v.requires_grad, name
        if name == "top1":
            assert v.dtype == torch.bool
            assert assert_top1(v, ref["top1"], _z64(inp, xf_kw), y, mask) >= mask.sum() // 2
        else:
            assert v.dtype == torch.float32
            assert bool((v.cpu()[~mask] == 0).all()), name
            e = rel(v, ref[name])
            assert e < otol, f"{name}: rel err {e:.2e}"


# name: (make_inputs kwargs, transform kwargs, IWConfig kwargs, call kwargs)
CASES = {
    "scale-sft": (dict(B=2, T=9, bias=True), dict(logit_scale=1.7), dict(mode="sft"), {}),
    "temperature-token-quality": (dict(B=3, T=6, packed=True),
                                  dict(logit_temperature=1.6),
                                  dict(mode="token", temperature=0.8), dict(quality=True)),
    "cap-token-zloss-normalizer": (dict(B=2, T=9, bias=True), dict(logit_scale=2.5,
                                                                     logit_softcap=4.0),
                                   dict(mode="token"), dict(z_loss=0.1, normalizer=23.0)),
    # |s r / c| up to ~50: most entries saturated (z = +-c exactly in fp32)
    "cap-saturated-sequence-zloss": (dict(B=3, T=6, packed=True, bias=True),
                                     dict(logit_scale=40.0, logit_softcap=2.5),
                                     dict(mode="sequence"), dict(z_loss=0.05, quality=True)),
    "scale-cap-temp-sequence-two-phase": (
        dict(B=3, T=7, packed=True, bias=True),
        dict(logit_scale=0.8, logit_softcap=5.0, logit_temperature=0.7),
        dict(mode="sequence", self_normalize=True),
        dict(z_loss=0.2, quality=True, two_phase=True)),
    "identity-sequence-two-phase-outputs": (dict(B=2, T=9, packed=True),
                                            {}, dict(mode="sequence", temperature=0.5),
                                            dict(two_phase=True)),
    "scale-temp-token-selfnorm-zloss": (dict(B=2, T=9, bias=True),
                                        dict(logit_scale=3.0, logit_temperature=2.0),
                                        dict(mode="token", self_normalize=True),
                                        dict(z_loss=0.5)),
}
H, V = 16, 37


@pytest.mark.parametrize("case", list(CASES))
def test_against_oracle(case, path, rng):
    mk, xf_kw, cfg_kw, call = CASES[case]
    call = dict(call)
    inp, S = make_inputs(H=H, V=V, device=DEVICE, gen=rng, **mk)
    cfg = IWConfig(**cfg_kw)
    q = (2 * torch.rand(S, generator=rng)).to(DEVICE) if call.pop("quality", False) else None
    if call.pop("two_phase", False):  # 2-row chunks: longer sequences take the two-phase path
        call["chunk_bytes"] = 2 * V * 4 * (2 if "logit_softcap" in xf_kw else 1)
    extra = dict(z_loss=call.get("z_loss", 0.0), normalizer=call.get("normalizer"))
    ref = oracle_grads(inp, cfg, -1.3, quality=None if q is None else q.cpu(), **xf_kw,
                          **extra)
    out, grads = run(inp, cfg, path, -1.3, quality=q, outputs=ALL, **xf_kw, **call)
    _assert_path(path)
    check_all(out, grads, ref, inp, xf_kw)


@pytest.mark.parametrize("mode", ["sft", "sequence"])
def test_bf16_inputs(mode, path, rng):
    inp, S = make_inputs(2, 9, H, V, dtype=torch.bfloat16, device=DEVICE, gen=rng, bias=True,
                         packed=True)
    xf_kw = dict(logit_scale=1.3, logit_softcap=4.0, logit_temperature=0.9)
    cfg = IWConfig(mode=mode, self_normalize=True)
    q = (2 * torch.rand(S, generator=rng)).to(DEVICE)
    ref = oracle_grads(inp, cfg, 0.6, quality=q.cpu(), z_loss=0.1, **xf_kw)
    out, grads = run(inp, cfg, path, 0.6, quality=q, z_loss=0.1, outputs=("entropy", "lse"),
                     **xf_kw)
    _assert_path(path)
    check_all(out, grads, ref, inp, xf_kw, dtype=torch.bfloat16, outputs=("entropy", "lse"))


# ------------------------------------------------------------------ peaked (1 - p_y -> 1e-12)
EPS = [1e-6, 1e-8, 1e-10, 1e-12]
PEAKED_XF = {"cap": dict(logit_softcap=50.0),
             "scale-temp": dict(logit_scale=2.0, logit_temperature=0.5),
             "scale-cap-temp": dict(logit_scale=3.0, logit_softcap=30.0, logit_temperature=0.5)}


def make_peaked(xf_kw, gen, H=32, V=23, per_eps=3):
    """W: V orthonormal rows; h_i = a_i W[y_i] + noise, a_i found by bisection so that
    1 - p_y of the transformed float64 logits (of the fp32 inputs) is EPS[k]."""
    Q, _ = torch.linalg.qr(torch.randn(H, H, generator=gen, dtype=torch.float64))
    W = Q[:V].float()
    b = (0.2 * torch.randn(V, generator=gen)).float()
    N = per_eps * len(EPS)
    y = torch.randint(0, V, (N,), generator=gen)
    target = torch.tensor(EPS, dtype=torch.float64).repeat_interleave(per_eps)
    u = W.double()[y]
    noise = 0.3 * torch.randn(N, H, generator=gen, dtype=torch.float64) / H**0.5

    def one_minus_p(a):
        h = (a[:, None] * u + noise).float()
        z = transformed_logits(h.double() @ W.double().T + b.double(), **xf_kw)
        others = torch.logsumexp(z.scatter(1, y[:, None], float("-inf")), 1)
        return torch.sigmoid(others - z.gather(1, y[:, None]).squeeze(1)), h

    lo, hi = torch.zeros(N, dtype=torch.float64), torch.full((N,), 400.0, dtype=torch.float64)
    for _ in range(70):
        mid = (lo + hi) / 2
        big = one_minus_p(mid)[0] > target
        lo, hi = torch.where(big, mid, lo), torch.where(big, hi, mid)
    q, h = one_minus_p(hi)
    assert bool(((q / target > 0.3) & (q / target < 3)).all()), q / target
    labels = y.clone()
    labels[[1, 7]] = -100
    return dict(hidden=h, weight=W, bias=b, labels=labels,
                ref_logprobs=-0.5 * torch.rand(N, generator=gen) - 1e-3), q


def _row_rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if a.dim() == 1:
        return (a - b).abs() / b.abs().clamp(min=1e-300)
    return (a - b).norm(dim=1) / b.norm(dim=1).clamp(min=1e-300)


@pytest.mark.parametrize("xf", list(PEAKED_XF))
def test_peaked_exact(xf, path, rng):
    """Per target row: logp, entropy, dH to 1e-3 relative at 1 - p_y = 1e-6 ... 1e-12 of the
    transformed softmax (fp32 log(sum) would give logp = 0 and a zero target gradient)."""
    xf_kw = PEAKED_XF[xf]
    inp, q = make_peaked(xf_kw, rng)
    inp = {k: v.to(DEVICE) for k, v in inp.items()}
    cfg = IWConfig(mode="token")
    ref = oracle_grads(inp, cfg, 1.7, z_loss=0.01, **xf_kw)
    out, grads = run(inp, cfg, path, 1.7, z_loss=0.01, outputs=ALL, **xf_kw)
    _assert_path(path)
    mask = inp["labels"].cpu() != -100
    lp = out.token_logprobs.cpu()[mask]
    assert bool((lp < 0).all())  # not rounded to 0
    assert float(_row_rel(lp, ref["token_logprobs"][mask]).max()) <= 1e-3
    assert float(_row_rel(out.entropy.cpu()[mask], ref["entropy"][mask]).max()) <= 1e-3
    assert float(_row_rel(out.lse.cpu()[mask], ref["lse"][mask]).max()) <= 1e-5
    assert bool(out.top1.cpu()[mask].all())
    assert float(_row_rel(grads["hidden"].cpu()[mask], ref["grads"]["hidden"][mask]).max()) <= 1e-3
    assert float(_row_rel(grads["weight"], ref["grads"]["weight"]).max()) <= 1e-3
    assert rel(grads["bias"], ref["grads"]["bias"]) <= 1e-3


# ----------------------------------------------------------------- self-normalisation, z-loss
@pytest.mark.parametrize("mode,chunk_rows", [("token", None), ("sequence", None),
                                             ("sequence", 2), ("sft", None)])
def test_zloss_gradient_not_self_normalised(mode, chunk_rows, path, rng):
    """With self_normalize the CE gradient is scaled by the batch factor, the z-loss gradient
    is not. The factor here is far from 1 (raw mean weight < 0.6 or > 1.6) and the z-loss part
    of the gradient is large, so scaling the z-loss gradient too (= the oracle with z_loss
    times the factor) is far outside the tolerance."""
    inp, S = make_inputs(3, 7, H, V, device=DEVICE, gen=rng, packed=True, bias=True,
                         ref_scale=4.0)
    cfg = IWConfig(mode=mode, self_normalize=True)
    zl = 0.3
    kw = {} if chunk_rows is None else dict(chunk_bytes=chunk_rows * V * 4)
    out, grads = run(inp, cfg, path, 0.8, z_loss=zl, **kw)
    ref = oracle_grads(inp, cfg, 0.8, z_loss=zl)
    check_all(out, grads, ref, inp, {}, outputs=())
    if mode == "sft":
        return  # sft weights are all 1: the factor is 1 (and one pass is used)
    raw = linear_iwsft_loss(inp["hidden"], inp["weight"], inp["labels"], inp["ref_logprobs"],
                            cu_seqlens=inp["cu_seqlens"], bias=inp["bias"],
                            config=IWConfig(mode=mode), backend=path)
    factor = 1.0 / float(raw.stats["weight_mean"])
    assert abs(factor - 1.0) > 0.4, factor
    wrong = oracle_grads(inp, cfg, 0.8, z_loss=zl * factor)
    no_z = oracle_grads(inp, cfg, 0.8)
    for k in ("hidden", "weight"):
        assert rel(no_z["grads"][k], ref["grads"][k]) > 0.05  # the z-loss part matters
        assert rel(grads[k], wrong["grads"][k]) > 1e3 * 2e-5


def test_zloss_term_and_off(path, rng):
    """loss = CE + z-loss term, and z_loss=0 is bitwise the plain loss with a 0 term."""
    inp, S = make_inputs(2, 8, H, V, device=DEVICE, gen=rng, bias=True)
    cfg = IWConfig(mode="token")
    base, g0 = run(inp, cfg, path, 1.0)
    off, g1 = run(inp, cfg, path, 1.0, z_loss=0.0, logit_scale=1.0)
    assert float(base.z_loss) == 0.0 and base.z_loss.shape == ()
    assert torch.equal(base.loss.detach(), off.loss.detach())
    for k in g0:
        assert torch.equal(g0[k], g1[k]), k
    on, _ = run(inp, cfg, path, 1.0, z_loss=0.25)
    lse = oracle_iwsft(inp["hidden"].cpu().double(), inp["weight"].cpu().double(),
                          inp["labels"].cpu(), inp["ref_logprobs"].cpu().double(),
                          bias=inp["bias"].cpu().double(), config=cfg)["lse"]
    M = int((inp["labels"] != -100).sum())
    want = 0.25 * float((lse**2).sum()) / M
    assert abs(float(on.z_loss) - want) <= 1e-5 * want
    # the CE part (and the weights, which do not see the z-loss) are unchanged
    assert abs((on.loss - on.z_loss).item() - base.loss.item()) <= 1e-5 * abs(base.loss.item())
    torch.testing.assert_close(on.token_weights, base.token_weights)


# --------------------------------------------------------------------- linear_logprobs outputs
@pytest.mark.parametrize("xf_kw", [{}, dict(logit_scale=0.7, logit_softcap=3.0,
                                            logit_temperature=1.3)], ids=["identity", "xf"])
def test_linear_logprobs_outputs(xf_kw, path, rng):
    inp, _ = make_inputs(3, 7, H, V, device=DEVICE, gen=rng, bias=True)
    args = (inp["hidden"], inp["weight"], inp["labels"])
    ref = oracle_grads(inp, IWConfig(mode="sft"), 1.0, **xf_kw)
    y = inp["labels"].reshape(-1).cpu()
    mask = y != -100
    for cb in (None, 4 * V * 4):  # one chunk; 4-row chunks
        plain = linear_logprobs(*args, bias=inp["bias"], backend=path, chunk_bytes=cb, **xf_kw)
        assert isinstance(plain, torch.Tensor) and plain.shape == (y.numel(),)
        assert rel(plain, ref["token_logprobs"]) < 2e-5
        o = linear_logprobs(*args, bias=inp["bias"], backend=path, chunk_bytes=cb,
                            outputs=ALL, **xf_kw)
        assert isinstance(o, LogProbsOutput)
        torch.testing.assert_close(o.logprobs, plain, rtol=1e-6, atol=1e-7)
        assert rel(o.entropy, ref["entropy"]) < 2e-5 and rel(o.lse, ref["lse"]) < 2e-5
        assert bool((o.entropy.cpu()[~mask] == 0).all() and (o.lse.cpu()[~mask] == 0).all())
        assert assert_top1(o.top1, ref["top1"], _z64(inp, xf_kw), y, mask) >= mask.sum() // 2
        part = linear_logprobs(*args, bias=inp["bias"], backend=path, chunk_bytes=cb,
                               outputs=["top1"], **xf_kw)
        assert part.entropy is None and part.lse is None and torch.equal(part.top1, o.top1)
    _assert_path(path)


# ------------------------------------------------------------------------------- top1 ties
def test_top1_ties(path):
    """top1 = (target logit == row max): a target tied with another maximal entry counts as
    correct even where argmax (first index) picks the other one. Integer inputs make the
    logits exact in every precision, so the ties are exact; the transforms keep them."""
    h = torch.tensor([[1., 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0], [1, 1, 0, 0]])
    W = torch.tensor([[2., 0, 0, 0], [2, 0, 0, 0], [0, 3, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0],
                      [0, 0, 2, 0], [1, 1, 0, 0]])
    # row 0: z = (2, 2, 0, 0, 0, 0, 1), target 1 ties with entry 0 (argmax = 0): True
    # row 1: target 2 (= 3) is the strict max: True;  row 2: target 4 (1 < 2): False
    # row 3: all logits 0, target 6: True;  row 4: z = (2, 2, 3, 1, 0, 0, 2), target 0: False
    y = torch.tensor([1, 2, 4, 6, 0])
    want = torch.tensor([True, True, False, True, False])
    assert not torch.equal((h @ W.T).argmax(1) == y, want)  # differs from argmax == y
    for xf_kw in ({}, dict(logit_scale=0.5), dict(logit_softcap=10.0, logit_temperature=2.0)):
        o = linear_logprobs(h.to(DEVICE), W.to(DEVICE), y.to(DEVICE), backend=path,
                            outputs=("top1",), **xf_kw)
        assert torch.equal(o.top1.cpu(), want), xf_kw
        out = linear_iwsft_loss(h.to(DEVICE).requires_grad_(), W.to(DEVICE), y.to(DEVICE),
                                config=IWConfig(mode="sft"), backend=path, outputs=("top1",),
                                **xf_kw)
        assert torch.equal(out.top1.cpu(), want), xf_kw
        ref = oracle_iwsft(h.double(), W.double(), y, config=IWConfig(mode="sft"), **xf_kw)
        assert torch.equal(ref["top1"], want)


# -------------------------------------------------------------------- API, op, compile, errors
def test_outputs_fields_and_module(rng):
    inp, S = make_inputs(2, 6, H, V, device=DEVICE, gen=rng)
    args = (inp["hidden"], inp["weight"], inp["labels"], inp["ref_logprobs"])
    out = linear_iwsft_loss(*args)
    assert out.entropy is None and out.top1 is None and out.lse is None
    assert out.z_loss.shape == () and float(out.z_loss) == 0.0
    out = linear_iwsft_loss(*args, outputs=["lse"])
    assert out.entropy is None and out.top1 is None and out.lse.shape == (12,)
    out2 = linear_iwsft_loss(*args, outputs="entropy")  # a single name
    assert out2.entropy is not None and out2.lse is None
    mod = LinearIWSFTLoss(IWConfig(), logit_softcap=5.0, z_loss=0.1, outputs=("top1", "lse"))
    assert "softcap=5.0" in repr(mod) and "z_loss=0.1" in repr(mod)
    mo = mod(*args)
    fo = linear_iwsft_loss(*args, logit_softcap=5.0, z_loss=0.1, outputs=("lse", "top1"))
    assert torch.equal(mo.loss, fo.loss) and torch.equal(mo.lse, fo.lse)
    assert torch.equal(mo.top1, fo.top1) and mo.entropy is None
    assert LogitTransform(scale=2.0, softcap=None).factor == 2.0


def test_errors(rng):
    inp, _ = make_inputs(2, 5, 8, 11, device=DEVICE, gen=rng)
    args = (inp["hidden"], inp["weight"], inp["labels"], inp["ref_logprobs"])
    lp_args = args[:3]
    with pytest.raises(ValueError, match=r"unknown outputs \['entropie'\].*'entropy', 'top1'"):
        linear_iwsft_loss(*args, outputs=("entropie",))
    with pytest.raises(ValueError, match="allowed are"):
        linear_logprobs(*lp_args, outputs=("lse", "argmax"))
    with pytest.raises(ValueError, match="allowed are"):
        LinearIWSFTLoss(outputs=("logits",))
    with pytest.raises(TypeError, match="outputs must be"):
        linear_iwsft_loss(*args, outputs=3)
    bad = [(dict(logit_scale=0.0), "logit scale"), (dict(logit_scale=-1.0), "logit scale"),
           (dict(logit_scale=float("nan")), "logit scale"), (dict(logit_scale=True), "scale"),
           (dict(logit_softcap=0.0), "softcap"), (dict(logit_softcap=-30.0), "softcap"),
           (dict(logit_softcap=float("inf")), "softcap"), (dict(logit_softcap="30"), "softcap"),
           (dict(logit_temperature=0.0), "temperature"),
           (dict(logit_temperature=float("inf")), "temperature")]
    for kw, msg in bad:
        with pytest.raises(ValueError, match=msg):
            linear_iwsft_loss(*args, **kw)
        with pytest.raises(ValueError, match=msg):
            linear_logprobs(*lp_args, **kw)
        with pytest.raises(ValueError, match=msg):
            LinearIWSFTLoss(**kw)
    for zl in (-0.1, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match="z_loss must be a finite number >= 0"):
            linear_iwsft_loss(*args, z_loss=zl)
        with pytest.raises(ValueError, match="z_loss"):
            LinearIWSFTLoss(z_loss=zl)


@pytest.mark.parametrize("which", ["torch", "native"])
def test_softcap_chunk_budget(monkeypatch, rng, which):
    """With a softcap the torch ops hold one more fp32 (m, V) buffer (dz/dr): the chunk
    budget counts it, so a chunk has half the rows (fp32). The native CPU epilogue keeps its
    softcap state in the chunk itself (no extra buffer): full rows."""
    if which == "native" and (DEVICE.type != "cpu" or native.load() is None):
        pytest.skip("the native CPU epilogue is not available here")
    if which == "torch":
        monkeypatch.setenv("IWSFT_NO_NATIVE", "1")
    assert rows_per_chunk(1000, torch.float32, 10 * 4000, 1) == 5
    # bf16: fp32 chunk + bf16 copy (6 bytes per entry), + the dz/dr buffer (10 bytes)
    assert rows_per_chunk(1000, torch.bfloat16, 12 * 6000) == 12
    assert rows_per_chunk(1000, torch.bfloat16, 12 * 6000, 1) == 7
    inp, _ = make_inputs(2, 20, H, V, device=DEVICE, gen=rng)
    seen = []
    real = core.fused_linear_iw

    def spy(*a, **kw):
        seen.append(kw["chunk_rows"])
        return real(*a, **kw)

    monkeypatch.setattr(core, "fused_linear_iw", spy)
    h = inp["hidden"].requires_grad_()
    for cap in (None, 3.0):
        linear_iwsft_loss(h, inp["weight"], inp["labels"], config=IWConfig(mode="sft"),
                          chunk_bytes=10 * V * 4, logit_softcap=cap, backend="torch")
    assert seen == [10, 10 if which == "native" else 5]


def test_torch_ops_buffers(rng):
    """Identity: no extra buffer and no entropy work; softcap: one dz/dr buffer per call,
    reused by every chunk; entropy only when asked."""
    ops = TorchOps()
    r = torch.randn(6, 29, generator=rng)
    y = torch.randint(0, 29, (6,), generator=rng)
    rows, st = ops.chunk_forward(r.clone(), y, IDENTITY, False)
    assert rows.entropy is None and st[2] is None and ops._dz is None
    cap = LogitTransform(softcap=2.0)
    _, st1 = ops.chunk_forward(r.clone(), y, cap, True)
    p1 = st1[2].data_ptr()
    _, st2 = ops.chunk_forward(r[:4].clone(), y[:4], cap, False)
    assert st2[2].data_ptr() == p1 and st2[2].shape == (4, 29)
    assert ops.row_stats(r.clone(), y, cap, True).entropy is not None


OP = torch.ops.iwsft.linear_iwsft_fwd.default


@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if "triton" in BACKENDS else []))
def test_opcheck_with_transforms_and_outputs(backend, rng):
    inp, S = make_inputs(2, 5, 8, 11, device=DEVICE, gen=rng, bias=True, packed=True)
    for k in ("hidden", "weight", "bias"):
        inp[k].requires_grad_()
    cfg = IWConfig(mode="sequence", self_normalize=True)
    lo, hi = cfg.bounds
    base = (inp["hidden"], inp["weight"], inp["bias"], inp["labels"], inp["ref_logprobs"],
            inp["cu_seqlens"], None, None, None, cfg.mode, float(cfg.temperature), lo, hi,
            cfg.length_normalize, cfg.self_normalize, -100, 3 * 11 * 8, backend,
            True, True, True)
    for extra in ((1.5, 4.0, 0.8, 0.1, True, True, True), (0.5, None, 1.0, 0.0, False, True,
                                                             False)):
        res = torch.library.opcheck(OP, base + extra)
        assert all(v == "SUCCESS" for v in res.values()), res


def test_compiled_returns_new_fields(rng):
    inp, S = make_inputs(2, 6, 8, 13, device=DEVICE, gen=rng, bias=True)
    kw = dict(logit_scale=1.2, logit_softcap=6.0, logit_temperature=0.9, z_loss=0.1,
              outputs=("entropy", "top1", "lse"))

    def f(h, W, b, y, ref):
        o = linear_iwsft_loss(h, W, y, ref, bias=b, config=IWConfig(mode="token"), **kw)
        return o.loss, o.entropy, o.top1, o.lse, o.z_loss, o.token_logprobs

    def go(fn):
        h = inp["hidden"].detach().clone().requires_grad_()
        W = inp["weight"].detach().clone().requires_grad_()
        outs = fn(h, W, inp["bias"], inp["labels"], inp["ref_logprobs"])
        (outs[0] * 1.5).backward()
        return [o.detach() for o in outs], (h.grad, W.grad)

    torch._dynamo.reset()
    got = go(torch.compile(f, backend="aot_eager", fullgraph=True))
    want = go(f)
    for a, b in zip(got[0] + list(got[1]), want[0] + list(want[1])):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert got[0][2].dtype == torch.bool and got[0][1].shape == (12,)


# ------------------------------------------------------- the ops interface, entry by entry
def _all_ops():
    out = [TorchOps()]
    if DEVICE.type == "cpu" and native.load() is not None:
        out.append(native.NativeTorchOps())
    if "triton" in BACKENDS:
        from iwsft_kernels.backends.triton_ops import TritonOps

        out.append(TritonOps())
    return out


OPS_XF = {"identity": IDENTITY, "linear": LogitTransform(scale=1.5, temperature=2.0),
          "cap": LogitTransform(scale=4.0, softcap=5.0, temperature=0.8)}


@pytest.mark.parametrize("xf", list(OPS_XF))
@pytest.mark.parametrize("ops", _all_ops(), ids=lambda o: o.name)
def test_ops_interface_entrywise(ops, xf, rng):
    """chunk_forward's RowStats and softmax_grad's G_r (with coef and a z-loss zcoef, one of
    them negative) against float64, per entry: random, peaked (1 - p_y ~ 1e-10 without a
    cap), exactly tied, -inf, saturated (|s r / c| up to ~60) and constant rows. The cap's
    dz/dr must be the stable sech^2 (1 - tanh^2 is 0 or wrong once tanh rounds to 1)."""
    xf_ = OPS_XF[xf]
    m, V = 6, 41
    r = torch.randn(m, V, generator=rng) * 3
    y = torch.randint(0, V, (m,), generator=rng)
    r[1] = 0.5 * torch.randn(V, generator=rng)
    r[1, y[1]] = 25.0 / xf_.factor if xf_.linear else 25.0
    r[2, 3] = r[2, 7] = float(r[2].max()) + 1.0  # an exact tie at the max, target 7
    y[2] = 7
    r[3, :5] = float("-inf")
    y[3] = 9
    r[4] = 75 * torch.randn(V, generator=rng)
    r[5] = 0.25
    coef = torch.tensor([0.3, 1.1, 0.0, 0.7, 0.2, 0.9])
    zcoef = torch.tensor([0.05, -0.02, 0.3, 0.1, -0.2, 0.2])  # row 4: coef + zcoef = 0

    r64 = r.double()
    kw = dict(logit_scale=xf_.scale, logit_softcap=xf_.softcap,
              logit_temperature=xf_.temperature)
    z64 = transformed_logits(r64, **kw)
    from iwsft_kernels.oracle import _row_outputs, _target_logprob

    lp64 = _target_logprob(z64, y)
    lse64, top164, ent64 = _row_outputs(z64, y)
    p64 = torch.softmax(z64, 1)
    gz = (coef.double() + zcoef.double())[:, None] * p64
    gz.scatter_(1, y[:, None], (coef.double() * torch.expm1(lp64)
                                + zcoef.double() * torch.exp(lp64))[:, None])
    if xf_.softcap is None:
        dz = torch.full_like(r64, xf_.factor)
    else:
        dz = (xf_.scale / xf_.temperature) / torch.cosh(xf_.scale * r64 / xf_.softcap) ** 2
    g64 = gz * dz

    for want_entropy in (True, False):
        rows, state = ops.chunk_forward(r.clone().to(DEVICE), y.to(DEVICE), xf_, want_entropy)
        assert (rows.entropy is not None) == want_entropy
        # saturated cap entries round to exactly +-c / tau in fp32: near-ties may become ties
        assert assert_top1(rows.top1, top164, z64, y, torch.ones(m, dtype=torch.bool)) >= 4
        assert bool(rows.top1[2]) and bool(rows.top1[5])
        assert bool((_row_rel(rows.logp, lp64) <= 2e-5).all()), (rows.logp, lp64)
        assert bool(((rows.lse.cpu().double() - lse64).abs() <= 2e-6 * (1 + lse64.abs())).all())
        if want_entropy:
            e = rows.entropy.cpu().double()
            assert bool(((e - ent64).abs() <= 5e-5 * ent64 + 1e-7).all()), (e, ent64)
        g = ops.softmax_grad(state, y.to(DEVICE), rows, coef.to(DEVICE), zcoef.to(DEVICE),
                             xf_, torch.float32).cpu().double()
        bad = (g - g64).abs() > 5e-5 * g64.abs() + 1e-36
        assert not bool(bad.any()), (bad.nonzero()[:5], g[bad][:5], g64[bad][:5])
        if want_entropy:  # without a z-loss the same holds with zcoef=None
            rows, state = ops.chunk_forward(r.clone().to(DEVICE), y.to(DEVICE), xf_, False)
            g = ops.softmax_grad(state, y.to(DEVICE), rows, coef.to(DEVICE), None, xf_,
                                 torch.float32).cpu().double()
            gz0 = coef.double()[:, None] * p64
            gz0.scatter_(1, y[:, None], (coef.double() * torch.expm1(lp64))[:, None])
            g640 = gz0 * dz
            assert not bool(((g - g640).abs() > 5e-5 * g640.abs() + 1e-36).any())
