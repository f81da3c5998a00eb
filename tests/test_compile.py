"""The registered op (iwsft_kernels/ops.py) and torch.compile: opcheck, op == eager path,
a compiled small model's loss and gradients equal the eager ones, no graph break at the loss."""

import pytest
import torch

from helpers import make_inputs
from iwsft_kernels import IWConfig, LinearIWSFTLoss, linear_iwsft_loss
from iwsft_kernels import ops as iw_ops

OP = torch.ops.iwsft.linear_iwsft_fwd.default


def _op_args(inp, cfg, *, quality=None, normalizer=None, need=(True, True, True),
             backend="auto", chunk_bytes=None, ignore_index=-100):
    lo, hi = cfg.bounds
    nv = normalizer if isinstance(normalizer, float) else None
    nt = normalizer if isinstance(normalizer, torch.Tensor) else None
    return (inp["hidden"], inp["weight"], inp["bias"], inp["labels"], inp["ref_logprobs"],
            inp["cu_seqlens"], quality, nv, nt, cfg.mode, float(cfg.temperature), lo, hi,
            cfg.length_normalize, cfg.self_normalize, ignore_index, chunk_bytes, backend,
            *need)


OPCHECK_CASES = {
    # name: (make_inputs kwargs, config, extra op kwargs)
    "sequence-bias-2d": (dict(B=3, T=5, H=7, V=11, bias=True), IWConfig(mode="sequence"), {}),
    "sequence-two-phase-packed": (dict(B=3, T=6, H=5, V=13, packed=True),
                                  IWConfig(mode="sequence", self_normalize=True),
                                  dict(chunk_bytes=13 * 4 * 3)),  # 3-row chunks: two-phase
    "token-quality-normalizer": (dict(B=2, T=7, H=6, V=9), IWConfig(mode="token"),
                                 dict(quality=torch.tensor([0.5, 2.0]), normalizer=37.0)),
    "sft-tensor-normalizer-dw-only": (dict(B=2, T=3, H=5, V=7, bias=True), IWConfig(mode="sft"),
                                      dict(normalizer=torch.tensor(11.0),
                                           need=(False, True, False))),
    "sequence-bf16": (dict(B=2, T=5, H=8, V=10, dtype=torch.bfloat16, bias=True),
                      IWConfig(mode="sequence", length_normalize=False), {}),
}


@pytest.mark.parametrize("case", list(OPCHECK_CASES))
def test_opcheck(case, device, rng):
    kw, cfg, extra = OPCHECK_CASES[case]
    inp, S = make_inputs(**kw, gen=rng, device=device)
    need = extra.get("need", (True, True, True))
    for k, flag in zip(("hidden", "weight", "bias"), need):
        if inp[k] is not None:
            inp[k].requires_grad_(flag)
    extra = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in extra.items()}
    res = torch.library.opcheck(OP, _op_args(inp, cfg, **extra))
    assert all(v == "SUCCESS" for v in res.values()), res


def test_opcheck_triton_backend(device, rng):
    pytest.importorskip("triton")
    inp, _ = make_inputs(2, 4, 16, 24, gen=rng, device=device, bias=True)
    for k in ("hidden", "weight", "bias"):
        inp[k].requires_grad_()
    res = torch.library.opcheck(OP, _op_args(inp, IWConfig(mode="token"), backend="triton"))
    assert all(v == "SUCCESS" for v in res.values()), res


def _eager_and_op(inp, cfg, grad_out, **kw):
    """(outputs, grads) of the eager path and of the op path, with backward(grad_out)."""
    results = []
    for use_op in (False, True):
        leaves = {k: inp[k].detach().clone().requires_grad_()
                  for k in ("hidden", "weight", "bias") if inp[k] is not None}
        args = (leaves["hidden"], leaves["weight"], inp["labels"], inp["ref_logprobs"])
        kwargs = dict(cu_seqlens=inp["cu_seqlens"], bias=leaves.get("bias"), config=cfg, **kw)
        if use_op:
            loss, logp, seq_w, tok_w, stats, _ = iw_ops.call(
                *args, kwargs["cu_seqlens"], kwargs["bias"], kwargs["quality"], cfg,
                -100, kwargs["normalizer"], "auto", None)
        else:
            o = linear_iwsft_loss(*args, **kwargs)
            loss, logp, seq_w, tok_w, stats = (o.loss, o.token_logprobs, o.seq_weights,
                                               o.token_weights, o.stats)
        (loss * grad_out).backward()
        results.append((dict(loss=loss.detach(), logp=logp, seq_w=seq_w, tok_w=tok_w, **stats),
                        {k: v.grad for k, v in leaves.items()}))
    return results


@pytest.mark.parametrize("mode", ["sft", "token", "sequence"])
@pytest.mark.parametrize("packed", [False, True])
def test_op_equals_eager_path(mode, packed, device, rng):
    inp, S = make_inputs(3, 9, 8, 17, gen=rng, device=device, bias=True, packed=packed)
    quality = torch.rand(S, generator=rng).to(device) * 2
    cfg = IWConfig(mode=mode, self_normalize=(mode == "sequence"))
    (eo, eg), (oo, og) = _eager_and_op(inp, cfg, -1.75, quality=quality, normalizer=None)
    assert eo.keys() == oo.keys()
    for k in eo:
        torch.testing.assert_close(oo[k], eo[k], rtol=0, atol=0, equal_nan=True, msg=k)
    for k in eg:
        torch.testing.assert_close(og[k], eg[k], rtol=0, atol=0, msg=k)


class TinyLM(torch.nn.Module):
    """Linear -> tanh -> the fused loss with a separate lm_head weight."""

    def __init__(self, H=8, V=13, mode="sequence"):
        super().__init__()
        self.body = torch.nn.Linear(H, H)
        self.lm_head = torch.nn.Parameter(torch.randn(V, H) / H**0.5)
        self.lm_bias = torch.nn.Parameter(0.1 * torch.randn(V))
        self.loss = LinearIWSFTLoss(IWConfig(mode=mode))

    def forward(self, x, labels, ref, cu_seqlens=None, normalizer=None):
        h = torch.tanh(self.body(x))
        out = self.loss(h, self.lm_head, labels, ref, cu_seqlens=cu_seqlens, bias=self.lm_bias,
                        normalizer=normalizer)
        return out.loss, out.token_logprobs, out.seq_weights, out.stats["ess_fraction"]


def _batch(B, T, H, V, gen, device):
    x = torch.randn(B, T, H, generator=gen)
    y = torch.randint(0, V, (B, T), generator=gen)
    y[0, : T // 2] = -100
    ref = -2 * torch.rand(B, T, generator=gen) - 0.01
    return x.to(device), y.to(device), ref.to(device)


def _run(model, fn, args, grad_out=2.5, **kw):
    model.zero_grad(set_to_none=True)
    outs = fn(*args, **kw)
    (grad_out * outs[0]).backward()
    return [o.detach() for o in outs], {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_same(a, b, exact):
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=1e-6)
    (ao, ag), (bo, bg) = a, b
    for x, y in zip(ao, bo):
        torch.testing.assert_close(x, y, **tol)
    assert ag.keys() == bg.keys()
    for k in ag:
        torch.testing.assert_close(ag[k], bg[k], msg=k, **tol)


@pytest.mark.parametrize("mode", ["sft", "token", "sequence"])
def test_no_graph_break_at_the_loss(mode, device, rng):
    torch.manual_seed(0)
    model = TinyLM(mode=mode).to(device)
    args = _batch(3, 5, 8, 13, rng, device)
    explain = torch._dynamo.explain(model)(*args)
    assert explain.graph_break_count == 0, explain.break_reasons
    assert explain.graph_count == 1


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_compiled_model_equals_eager(backend, mode, device, rng):
    torch.manual_seed(0)
    model = TinyLM(mode=mode).to(device)
    args = _batch(3, 5, 8, 13, rng, device)
    ref = _run(model, model, args)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    _assert_same(_run(model, compiled, args), ref, exact=True)
    # packed layout, explicit tensor normaliser (global token count), second shape
    x, y, r = _batch(1, 11, 8, 13, rng, device)
    args2 = (x[0], y[0], r[0], torch.tensor([0, 4, 4, 11], device=device),
             torch.tensor(23.0, device=device))
    _assert_same(_run(model, compiled, args2), _run(model, model, args2), exact=True)


def test_compiled_model_inductor(device, rng):
    torch.manual_seed(0)
    model = TinyLM(mode="sequence").to(device)
    args = _batch(3, 5, 8, 13, rng, device)
    ref = _run(model, model, args)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)  # default backend: inductor
    _assert_same(_run(model, compiled, args), ref, exact=False)


def test_compiled_dynamic_shapes(device, rng):
    torch.manual_seed(0)
    model = TinyLM(mode="sequence").to(device)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", dynamic=True, fullgraph=True)
    for B, T in ((2, 5), (3, 7), (4, 3)):
        args = _batch(B, T, 8, 13, rng, device)
        _assert_same(_run(model, compiled, args), _run(model, model, args), exact=True)


def test_compiled_no_grad_forward_only(device, rng):
    torch.manual_seed(0)
    model = TinyLM(mode="token").to(device)
    args = _batch(2, 6, 8, 13, rng, device)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        got = compiled(*args)
        want = model(*args)
    assert not got[0].requires_grad
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_compiled_input_errors_still_raised(device, rng):
    """Data checks run inside the op's implementation, so they fire under compile too."""
    torch.manual_seed(0)
    model = TinyLM(mode="sequence").to(device)
    x, y, r = _batch(2, 4, 8, 13, rng, device)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    compiled(x, y, r)
    with pytest.raises(ValueError, match="labels must be in"):
        compiled(x, torch.full_like(y, 13), r)
    with pytest.raises(ValueError, match="ref_logprobs must be <= 0"):
        compiled(x, y, r.abs() + 1)
