"""Autograd behaviour, the module form and bad-input errors."""

import pytest
import torch

from helpers import make_inputs, oracle_grads, rel
from iwsft_kernels import IWConfig, LinearIWSFTLoss, linear_iwsft_loss, linear_logprobs
from iwsft_kernels.backends import torch_ops


def small(device, rng, **kw):
    inp, S = make_inputs(2, 11, 16, 29, device=device, gen=rng, **kw)
    return inp, S


def test_no_grad_runs_forward_only(backend, device, rng, monkeypatch):
    inp, _ = small(device, rng)
    h = inp["hidden"].requires_grad_()
    W = inp["weight"].requires_grad_()

    def boom(*a, **k):
        raise AssertionError("gradient work under no_grad")

    monkeypatch.setattr(torch_ops.TorchOps, "softmax_grad", boom)
    if backend == "triton":
        from iwsft_kernels.backends import triton_ops
        monkeypatch.setattr(triton_ops.TritonOps, "softmax_grad", boom)
    with torch.no_grad():
        out = linear_iwsft_loss(h, W, inp["labels"], inp["ref_logprobs"], backend=backend)
    assert out.loss.grad_fn is None and not out.loss.requires_grad
    ref = oracle_grads(inp, IWConfig(), 1.0)
    assert abs(float(out.loss) - float(ref["loss"])) < 1e-5


@pytest.mark.parametrize("which", ["hidden", "weight"])
def test_only_requested_grads(backend, device, rng, which, monkeypatch):
    inp, _ = small(device, rng, bias=True)
    h = inp["hidden"].requires_grad_(which == "hidden")
    W = inp["weight"].requires_grad_(which == "weight")
    calls = {"dw": 0, "dh": 0}
    ops_cls = torch_ops.TorchOps
    if backend == "triton":
        from iwsft_kernels.backends.triton_ops import TritonOps as ops_cls
    orig_dw, orig_dh = ops_cls.accum_grad_weight, ops_cls.grad_hidden

    def dw(self, *a):
        calls["dw"] += 1
        return orig_dw(self, *a)

    def dh(self, *a):
        calls["dh"] += 1
        return orig_dh(self, *a)

    monkeypatch.setattr(ops_cls, "accum_grad_weight", dw)
    monkeypatch.setattr(ops_cls, "grad_hidden", dh)
    out = linear_iwsft_loss(h, W, inp["labels"], inp["ref_logprobs"], bias=inp["bias"],
                            backend=backend)
    out.loss.backward()
    assert (h.grad is not None) == (which == "hidden")
    assert (W.grad is not None) == (which == "weight")
    assert inp["bias"].grad is None
    assert (calls["dh"] > 0) == (which == "hidden") and (calls["dw"] > 0) == (which == "weight")


def test_tied_embedding_weight(backend, device, rng):
    """The lm_head weight is the input embedding: both gradient paths accumulate."""
    V, H = 29, 16
    emb = torch.nn.Embedding(V, H).to(device)
    ids = torch.randint(0, V, (2, 9), generator=rng).to(device)
    labels = torch.randint(0, V, (2, 9), generator=rng).to(device)
    ref = -torch.rand(2, 9, generator=rng).to(device) - 0.1
    proj = torch.randn(H, H, generator=rng).to(device) / 4

    def forward(loss_fn):
        emb.zero_grad()
        hidden = torch.tanh(emb(ids) @ proj)
        loss_fn(hidden).backward()
        return emb.weight.grad.clone()

    ours = forward(lambda hd: linear_iwsft_loss(hd, emb.weight, labels, ref, backend=backend).loss * 0.8)
    from iwsft_kernels.oracle import oracle_iwsft
    naive = forward(lambda hd: oracle_iwsft(hd, emb.weight, labels, ref, dtype=torch.float32)["loss"] * 0.8)
    assert rel(ours, naive) < 1e-5


def test_backward_twice_is_a_clear_error(device, rng):
    inp, _ = small(device, rng)
    W = inp["weight"].requires_grad_()
    out = linear_iwsft_loss(inp["hidden"], W, inp["labels"], inp["ref_logprobs"], backend="torch")
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        out.loss.backward()


def test_module_form(backend, device, rng):
    inp, S = small(device, rng, packed=True)
    cfg = IWConfig(mode="token", temperature=0.5)
    mod = LinearIWSFTLoss(cfg, backend=backend)
    assert "token" in repr(mod)
    a = mod(inp["hidden"], inp["weight"], inp["labels"], inp["ref_logprobs"],
            cu_seqlens=inp["cu_seqlens"])
    b = linear_iwsft_loss(inp["hidden"], inp["weight"], inp["labels"], inp["ref_logprobs"],
                          cu_seqlens=inp["cu_seqlens"], config=cfg, backend=backend)
    assert float(a.loss) == pytest.approx(float(b.loss), rel=1e-6)
    assert a.seq_weights.shape == (S,) and a.token_weights.shape == (2 * 11,)


def test_hidden_dtype_differs_from_weight(device, rng):
    inp, _ = small(device, rng)
    h = inp["hidden"].requires_grad_()
    W = inp["weight"].to(torch.bfloat16).requires_grad_()
    out = linear_iwsft_loss(h, W, inp["labels"], inp["ref_logprobs"], backend="torch")
    out.loss.backward()
    assert h.grad.dtype == torch.float32 and W.grad.dtype == torch.bfloat16


# ------------------------------------------------------------------------- bad input
def _call(inp, **over):
    args = dict(inp)
    args.update(over)
    cfg = args.pop("config", IWConfig())
    return linear_iwsft_loss(args.pop("hidden"), args.pop("weight"), args.pop("labels"),
                             args.pop("ref_logprobs"), config=cfg, **args)


BAD = [
    ("hidden last dim", dict(hidden=torch.randn(2, 11, 15)), ValueError, "last dim"),
    ("labels shape", dict(labels=torch.zeros(2, 10, dtype=torch.long)), ValueError, "labels shape"),
    ("ref shape", dict(ref_logprobs=-torch.rand(2, 10)), ValueError, "ref_logprobs shape"),
    ("weight dims", dict(weight=torch.randn(29, 16, 1)), ValueError, "weight"),
    ("bias shape", dict(bias=torch.randn(28)), ValueError, "bias"),
    ("quality len", dict(quality=torch.ones(3)), ValueError, "quality"),
    ("quality negative", dict(quality=torch.tensor([1.0, -0.5])), ValueError, "quality"),
    ("label too big", dict(labels=torch.full((2, 11), 29)), ValueError, "labels must be in"),
    ("label negative", dict(labels=torch.full((2, 11), -3)), ValueError, "labels must be in"),
    ("cu start", dict(cu_seqlens=torch.tensor([1, 5, 22])), ValueError, "start at 0"),
    ("cu end", dict(cu_seqlens=torch.tensor([0, 5, 21])), ValueError, "end at"),
    ("cu decreasing", dict(cu_seqlens=torch.tensor([0, 9, 5, 22])), ValueError, "non-decreasing"),
    ("ref missing", dict(ref_logprobs=None), ValueError, "ref_logprobs is required"),
    ("ref nan", dict(ref_logprobs=torch.full((2, 11), float("nan"))), ValueError, "finite"),
    ("ref positive", dict(ref_logprobs=torch.full((2, 11), 0.5)), ValueError, "<= 0"),
    ("int hidden", dict(hidden=torch.ones(2, 11, 16, dtype=torch.long)), TypeError, "floating"),
    ("float labels", dict(labels=torch.zeros(2, 11)), TypeError, "integer"),
    ("unknown backend", dict(backend="cuda"), ValueError, "backend"),
    ("normalizer zero", dict(normalizer=0.0), ValueError, "normalizer"),
    ("config type", dict(config="sequence"), TypeError, "IWConfig"),
    ("chunk bytes", dict(chunk_bytes=-1), ValueError, "chunk_bytes"),
]


@pytest.mark.parametrize("name,over,exc,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_input(rng, name, over, exc, msg):
    inp, _ = make_inputs(2, 11, 16, 29, gen=rng, ignore_frac=0.0)
    inp.pop("cu_seqlens")
    inp.pop("bias")
    with pytest.raises(exc, match=msg):
        _call(inp, **over)


def test_bad_config():
    with pytest.raises(ValueError, match="mode"):
        IWConfig(mode="seq")
    with pytest.raises(ValueError, match="w_min"):
        IWConfig(mode="token", w_min=2.0, w_max=1.0)
    with pytest.raises(ValueError, match=">= 0"):
        IWConfig(w_min=-1.0)
    with pytest.raises(ValueError, match="temperature"):
        IWConfig(temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        IWConfig(temperature=-1.0)
    assert IWConfig(mode="token").bounds == (0.2, 1.8)
    assert IWConfig().bounds == (0.0, 16.0)


def test_ignored_positions_may_hold_anything_in_ref(rng):
    inp, _ = make_inputs(2, 11, 16, 29, gen=rng, ignore_frac=0.5)
    ref = inp["ref_logprobs"].clone()
    ref[inp["labels"] == -100] = float("nan")
    out = linear_iwsft_loss(inp["hidden"], inp["weight"], inp["labels"], ref, backend="torch")
    assert torch.isfinite(out.loss)


def test_devices_must_match():
    if not torch.cuda.is_available():
        # a meta tensor is "another device" for the check without needing a GPU
        h = torch.randn(2, 3, 4)
        W = torch.randn(5, 4, device="meta")
        with pytest.raises(ValueError, match="same device"):
            linear_iwsft_loss(h, W, torch.zeros(2, 3, dtype=torch.long), config=IWConfig(mode="sft"),
                              backend="torch")


def test_triton_without_cuda_or_interpreter(monkeypatch, rng):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    inp, _ = make_inputs(1, 5, 16, 29, gen=rng)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        linear_logprobs(inp["hidden"], inp["weight"], inp["labels"], backend="triton")
