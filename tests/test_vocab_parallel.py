"""Vocabulary-parallel loss (docs/distributed.md): the lm_head sharded over the vocabulary
across CPU ranks (gloo), 2 and 4 of them.

One spawn per world size runs every case inside the workers (tiny shapes); each rank checks
its own results against
  - the same call on one rank (the full weight, the same backend): loss, log-probs, weights,
    entropy / top1 / lse, dH, and this rank's rows of dW / db;
  - the float64 oracle (iwsft_kernels' oracle module): loss, log-probs, outputs, gradients;
and reports its failures back; each case is one test here. Backends: the native C++ epilogue
(torch backend), the pure torch ops (IWSFT_NO_NATIVE=1) and the Triton kernels (interpreter).
Cases: sft / token / sequence (self-normalised, quality, the two-phase route), packed layouts
(cu_seqlens), ignored rows, bias, logit transforms, z-loss, grad_output != 1, peaked targets
(1 - p_y down to 1e-12) whose arg-max all lie on rank 0 (the other ranks hold no target's
arg-max), a row maximum tied across two ranks, V = 37 not divisible by the world size,
arbitrary Megatron ranges including an empty shard, sequence_parallel (partial dH), bf16,
linear_logprobs, the DTensor path (parallelize_module + ColwiseParallel, uneven shards), and
the errors (overlap, gap, wrong rows, label beyond V, unsupported placements, bias mismatch,
different batches per rank).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback
import zlib

import pytest
import torch

from conftest import BACKENDS

from iwsft_kernels.oracle import oracle_iwsft

PATHS = ["torch+native", "torch"] + (["triton"] if "triton" in BACKENDS else [])
WORLDS = (2, 4)


# ----------------------------------------------------------------------------- helpers
def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    den = b.norm()
    return float((a - b).norm() / den) if den > 0 else float((a - b).norm())


class _Checks:
    def __init__(self):
        self.errors = []

    def close(self, what, a, b, tol):
        if a is None or b is None:
            if (a is None) != (b is None):
                self.errors.append(f"{what}: one side is None")
            return
        if a.dtype == torch.bool or b.dtype == torch.bool:
            if not torch.equal(a.bool(), b.bool()):
                self.errors.append(f"{what}: differ at {int((a != b).sum())} positions")
            return
        if not bool(torch.isfinite(a.detach().double()).all()):
            self.errors.append(f"{what}: not finite")
            return
        r = _rel(a, b)
        if not r <= tol:
            self.errors.append(f"{what}: relative error {r:.3g} > {tol:g}")

    def true(self, what, ok):
        if not ok:
            self.errors.append(what)


def _bounds(V, world):
    return [V * i // world for i in range(world + 1)]


def _set_path(path):
    if path == "torch":
        os.environ["IWSFT_NO_NATIVE"] = "1"
    else:
        os.environ.pop("IWSFT_NO_NATIVE", None)
    return "triton" if path == "triton" else "torch"


def _inputs(gen, N, H, V, *, ignore=0.2, bias=True, dtype=torch.float32):
    W = torch.randn(V, H, generator=gen) / H**0.5
    h = torch.randn(N, H, generator=gen) * 2.0
    y = torch.randint(0, V, (N,), generator=gen)
    y[torch.rand(N, generator=gen) < ignore] = -100
    b = 0.5 * torch.randn(V, generator=gen) if bias else None
    ref = -2.0 * torch.rand(N, generator=gen) - 0.01
    return dict(hidden=h.to(dtype), weight=W.to(dtype), labels=y, ref_logprobs=ref,
                bias=None if b is None else b.to(dtype))


def _run(inp, backend, s=None, e=None, vp=None, grad_scale=1.7, **kw):
    """linear_iwsft_loss on the full weight (vp None) or on rows [s, e); returns the output and
    (dh, dW rows, db rows)."""
    from iwsft_kernels import linear_iwsft_loss

    h = inp["hidden"].clone().requires_grad_()
    W = inp["weight"] if vp is None else inp["weight"][s:e]
    W = W.clone().requires_grad_()
    b = inp.get("bias")
    if b is not None:
        b = (b if vp is None else b[s:e]).clone().requires_grad_()
    out = linear_iwsft_loss(h, W, inp["labels"], inp.get("ref_logprobs"), bias=b,
                            backend=backend, vocab_parallel=vp, **kw)
    (out.loss * grad_scale).backward()
    dW = W.grad if vp is None else W.grad
    db = None if b is None else b.grad
    return out, (h.grad, dW, db)


def _oracle(inp, grad_scale=1.7, config=None, cu_seqlens=None, quality=None, logit_softcap=None,
            logit_scale=1.0, z_loss=0.0):
    from iwsft_kernels import IWConfig

    h = inp["hidden"].double().requires_grad_()
    W = inp["weight"].double().requires_grad_()
    b = inp.get("bias")
    b = None if b is None else b.double().requires_grad_()
    o = oracle_iwsft(h, W, inp["labels"], inp.get("ref_logprobs"), bias=b,
                        config=config or IWConfig(), cu_seqlens=cu_seqlens, quality=quality,
                        logit_softcap=logit_softcap, logit_scale=logit_scale, z_loss=z_loss)
    (o["loss"] * grad_scale).backward()
    return o, (h.grad, W.grad, None if b is None else b.grad)


def _compare(ck, name, vp_out, vp_grads, one_out, one_grads, s, e, tol_one, oracle=None,
             tol_oracle=1e-4, outputs=()):
    """This rank's results against one rank (the same backend) and the float64 oracle."""
    dh, dW, db = vp_grads
    dh1, dW1, db1 = one_grads
    ck.close(f"{name} loss vs 1 rank", vp_out.loss, one_out.loss, tol_one)
    ck.close(f"{name} logp vs 1 rank", vp_out.token_logprobs, one_out.token_logprobs, tol_one)
    ck.close(f"{name} token weights vs 1 rank", vp_out.token_weights, one_out.token_weights,
             tol_one)
    ck.close(f"{name} seq weights vs 1 rank", vp_out.seq_weights, one_out.seq_weights, tol_one)
    ck.close(f"{name} dH vs 1 rank", dh, dh1, tol_one)
    ck.close(f"{name} dW shard vs 1 rank", dW, dW1[s:e], tol_one)
    if db1 is not None:
        ck.close(f"{name} db shard vs 1 rank", db, db1[s:e], tol_one)
    for k in outputs:
        ck.close(f"{name} {k} vs 1 rank", getattr(vp_out, k), getattr(one_out, k), tol_one)
    if oracle is not None:
        o, (oh, oW, ob) = oracle
        ck.close(f"{name} loss vs float64", vp_out.loss, o["loss"], tol_oracle)
        ck.close(f"{name} logp vs float64", vp_out.token_logprobs, o["token_logprobs"],
                 tol_oracle)
        ck.close(f"{name} dH vs float64", dh, oh, tol_oracle)
        ck.close(f"{name} dW shard vs float64", dW, oW[s:e], tol_oracle)
        if ob is not None:
            ck.close(f"{name} db shard vs float64", db, ob[s:e], tol_oracle)
        for k in outputs:
            tol = 0 if k == "top1" else tol_oracle
            ck.close(f"{name} {k} vs float64", getattr(vp_out, k), o[k], tol)


def _same_on_all_ranks(ck, name, t):
    import torch.distributed as dist

    got = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(got, t.contiguous())
    ck.true(f"{name}: not bitwise identical on every rank", all(torch.equal(g, t) for g in got))


# ------------------------------------------------------------------------------ cases
def case_modes(ck, rank, world, gen, path):
    """sft / token / sequence (+ self-normalised, quality), 2-D and packed layouts, bias,
    ignored rows, outputs, grad_output 1.7; V = 37 (not divisible by 2 or 4)."""
    from iwsft_kernels import IWConfig, VocabParallel

    be = _set_path(path)
    V, H, B, T = 37, 16, 3, 7
    bd = _bounds(V, world)
    s, e = bd[rank], bd[rank + 1]
    vp = VocabParallel(None, s, e)
    outs = ("entropy", "top1", "lse")
    combos = [(mode, extra, packed)
              for mode, extra in (("sft", {}), ("token", {}), ("sequence", {}),
                                  ("sequence", dict(self_normalize=True)),
                                  ("token", dict(w_max=1.1)))
              for packed in (False, True)]
    if path == "triton":  # the interpreter is slow: one of each mode, both layouts
        combos = [combos[0], combos[3], combos[6]]
    for mode, extra, packed in combos:
        inp = _inputs(gen, B * T, H, V)
        cfg = IWConfig(mode=mode, **extra)
        kw = dict(config=cfg, outputs=outs)
        okw = dict(config=cfg)
        if packed:
            cu = torch.tensor([0, 5, 6, 14, B * T])
            kw["cu_seqlens"] = okw["cu_seqlens"] = cu
            q = torch.tensor([1.0, 0.5, 2.0, 0.0])
            kw["quality"] = okw["quality"] = q
        else:
            inp = {k: (v.reshape(B, T, *v.shape[1:]) if k in ("hidden", "labels",
                                                              "ref_logprobs") else v)
                   for k, v in inp.items()}
        name = f"{mode}{extra} packed={packed}"
        vo, vg = _run(inp, be, s, e, vp, **kw)
        oo, og = _run(inp, be, **kw)
        _compare(ck, name, vo, vg, oo, og, s, e, 2e-5, _oracle(inp, **okw), 1e-4, outs)
        _same_on_all_ranks(ck, name + " loss", vo.loss.detach())
        _same_on_all_ranks(ck, name + " logp", vo.token_logprobs)


def case_transforms_zloss(ck, rank, world, gen, path):
    """a softcap + scale, and a z-loss (self-normalised token mode: the two-phase route);
    several chunks (chunk_bytes), sized on the largest shard."""
    from iwsft_kernels import IWConfig, VocabParallel

    be = _set_path(path)
    V, H, N = 37, 16, 20
    bd = _bounds(V, world)
    s, e = bd[rank], bd[rank + 1]
    vp = VocabParallel(None, s, e)
    outs = ("entropy", "top1", "lse")
    for kw, okw in (
            (dict(logit_softcap=3.0, logit_scale=1.5), dict(logit_softcap=3.0, logit_scale=1.5)),
            (dict(z_loss=1e-2, config=IWConfig(mode="token", self_normalize=True)),
             dict(z_loss=1e-2, config=IWConfig(mode="token", self_normalize=True))),
            (dict(config=IWConfig(mode="sequence")), dict(config=IWConfig(mode="sequence")))):
        inp = _inputs(gen, N, H, V)
        kw = dict(kw, outputs=outs, chunk_bytes=8 * 4 * 20)  # 8 rows of the largest shard
        vo, vg = _run(inp, be, s, e, vp, **kw)
        oo, og = _run(inp, be, **kw)
        _compare(ck, str(okw), vo, vg, oo, og, s, e, 2e-5, _oracle(inp, **okw), 1e-4, outs)


def case_peaked_argmax_on_rank0(ck, rank, world, gen, path):
    """1 - p_y from 1e-6 down to 1e-12, every target (hence every row's arg-max) on rank 0's
    shard: the other ranks hold no target and no arg-max. Bars of test_peaked_exact."""
    from test_peaked_exact import make_peaked

    from iwsft_kernels import IWConfig, VocabParallel

    be = _set_path(path)
    V, H, N = 37, 24, 8  # <= 8 distinct targets: they fit rank 0's shard (9 rows at 4 ranks)
    bd = _bounds(V, world)
    s, e = bd[rank], bd[rank + 1]
    eps = torch.tensor([1e-6, 1e-8, 1e-10, 1e-12]).repeat(N // 4)
    inp, _ = make_peaked(N, H, V, eps, torch.float32, gen, n_ignored=2)
    # renumber the vocabulary so that the targets come first (rank 0's shard)
    y = inp["labels"]
    tg = torch.unique(y[y >= 0])
    order = torch.cat([tg, torch.tensor([j for j in range(V) if j not in set(tg.tolist())],
                                        dtype=torch.long)])
    inv = torch.empty_like(order)
    inv[order] = torch.arange(V)
    Wp, bp = inp["weight"][order], inp["bias"][order]
    yp = torch.where(y >= 0, inv[y.clamp(min=0)], y)
    inp = dict(hidden=inp["hidden"], weight=Wp, bias=bp, labels=yp,
               ref_logprobs=-torch.rand(N, generator=gen) - 0.01)
    z = inp["hidden"].double() @ Wp.double().T + bp.double()
    ck.true("peaked: an arg-max outside rank 0's shard",
            bool((z.argmax(1)[yp >= 0] < bd[1]).all()))
    for mode in ("sft", "sequence"):
        cfg = IWConfig(mode=mode)
        vo, vg = _run(inp, be, s, e, VocabParallel(None, s, e), config=cfg)
        oo, og = _run(inp, be, config=cfg)
        o, og64 = _oracle(inp, config=cfg)
        _compare(ck, f"peaked {mode}", vo, vg, oo, og, s, e, 1e-5)
        m = yp >= 0
        lp, lp64 = vo.token_logprobs[m].double(), o["token_logprobs"][m]
        worst = float(((lp - lp64).abs() / lp64.abs()).max())
        ck.true(f"peaked {mode}: logp relative error {worst:.3g} > 1e-3", worst <= 1e-3)
        for what, a, b_ in (("dH", vg[0][m], og64[0][m]), ("dW", vg[1], og64[1][s:e])):
            nz = b_.norm(dim=1) > 0
            if bool(nz.any()):
                rr = float(((a[nz].double() - b_[nz]).norm(dim=1) / b_[nz].norm(dim=1)).max())
                ck.true(f"peaked {mode}: {what} row error {rr:.3g} > 1e-3", rr <= 1e-3)


def case_tied_max_across_ranks(ck, rank, world, gen, path):
    """The row max attained on two ranks (duplicated vocabulary rows 0 and V-1): rest >= 1,
    top1 true for both labels."""
    from iwsft_kernels import VocabParallel

    be = _set_path(path)
    V, H, N = 37, 16, 6
    bd = _bounds(V, world)
    s, e = bd[rank], bd[rank + 1]
    inp = _inputs(gen, N, H, V, ignore=0.0, bias=False)
    W = inp["weight"]
    W[V - 1] = W[0]
    inp["hidden"] = 6.0 * W[0][None, :].repeat(N, 1) + 0.01 * torch.randn(N, H, generator=gen)
    inp["labels"] = torch.tensor([0, V - 1, 0, V - 1, 5, 0])
    outs = ("entropy", "top1", "lse")
    vo, vg = _run(inp, be, s, e, VocabParallel(None, s, e), outputs=outs)
    oo, og = _run(inp, be, outputs=outs)
    _compare(ck, "tied", vo, vg, oo, og, s, e, 2e-5, _oracle(inp), 1e-4, outs)
    ck.true("tied: top1 of the tied labels", bool(vo.top1[[0, 1, 2, 3, 5]].all()))


def case_megatron_ranges(ck, rank, world, gen, path):
    """Arbitrary [start, stop) ranges (rank order != vocabulary order; with 4 ranks one shard
    is empty), sequence_parallel (partial dH sums to dH), linear_logprobs, bf16."""
    import torch.distributed as dist

    from iwsft_kernels import IWConfig, VocabParallel, linear_logprobs

    be = _set_path(path)
    V, H, N = 37, 16, 20
    ranges = {2: [(30, 37), (0, 30)], 4: [(10, 10), (0, 10), (31, 37), (10, 31)]}[world]
    s, e = ranges[rank]
    inp = _inputs(gen, N, H, V)
    cfg = IWConfig(mode="token")
    outs = ("entropy", "top1", "lse")
    vo, vg = _run(inp, be, s, e, VocabParallel(None, s, e), config=cfg, outputs=outs)
    oo, og = _run(inp, be, config=cfg, outputs=outs)
    _compare(ck, "ranges", vo, vg, oo, og, s, e, 2e-5, _oracle(inp, config=cfg), 1e-4, outs)
    # the nn.Module form
    from iwsft_kernels import LinearIWSFTLoss

    mod = LinearIWSFTLoss(cfg, backend=be, vocab_parallel=VocabParallel(None, s, e))
    ck.true("LinearIWSFTLoss: vocab_parallel not in its repr", "vocab_parallel" in repr(mod))
    mo = mod(inp["hidden"], inp["weight"][s:e], inp["labels"], inp["ref_logprobs"],
             bias=inp["bias"][s:e])
    ck.close("LinearIWSFTLoss loss vs 1 rank", mo.loss, oo.loss, 2e-5)
    # sequence_parallel: this rank's partial dH; their sum is dH
    vo2, vg2 = _run(inp, be, s, e, VocabParallel(None, s, e, sequence_parallel=True),
                    config=cfg)
    part = vg2[0].clone()
    dist.all_reduce(part)
    ck.close("sequence_parallel: sum of partial dH", part, og[0], 2e-5)
    ck.close("sequence_parallel: dW shard", vg2[1], og[1][s:e], 2e-5)
    if e > s and world > 1:
        ck.true("sequence_parallel: partial dH equals the full dH",
                _rel(vg2[0], og[0]) > 1e-3)
    # linear_logprobs (no grad; the fused kernel's partials on Triton)
    Wl, bl = inp["weight"][s:e], inp["bias"][s:e]
    lp = linear_logprobs(inp["hidden"], Wl, inp["labels"], bl, backend=be, outputs=outs,
                         vocab_parallel=VocabParallel(None, s, e))
    lp1 = linear_logprobs(inp["hidden"], inp["weight"], inp["labels"], inp["bias"],
                          backend=be, outputs=outs)
    for k in ("logprobs",) + outs:
        ck.close(f"linear_logprobs {k} vs 1 rank", getattr(lp, k), getattr(lp1, k), 2e-5)
    if path == "triton":  # bf16 through the interpreter: slow, covered by the torch paths
        return
    # bf16 inputs (gradients in bf16; dH summed in bf16 across ranks)
    ib = {k: (v.bfloat16() if k in ("hidden", "weight", "bias") else v) for k, v in inp.items()}
    vo, vg = _run(ib, be, s, e, VocabParallel(None, s, e), config=cfg)
    oo, og = _run(ib, be, config=cfg)
    _compare(ck, "bf16", vo, vg, oo, og, s, e, 2e-2)
    o64 = _oracle(ib, config=cfg)
    ck.close("bf16 logp vs float64", vo.token_logprobs, o64[0]["token_logprobs"], 1e-4)


def case_dtensor(ck, rank, world, gen, path):
    """A DTensor lm_head from parallelize_module(..., ColwiseParallel()) (Shard(0), uneven at
    V = 37): detected from the weight; weight / bias gradients come back as DTensors placed
    like the weight."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    from iwsft_kernels import IWConfig, VocabParallel, linear_iwsft_loss, linear_logprobs

    be = _set_path(path)
    V, H, N = 37, 16, 14
    inp = _inputs(gen, N, H, V)
    model = torch.nn.Module()
    model.lm_head = torch.nn.Linear(H, V, bias=True)
    with torch.no_grad():
        model.lm_head.weight.copy_(inp["weight"])
        model.lm_head.bias.copy_(inp["bias"])
    mesh = init_device_mesh("cpu", (world,))
    parallelize_module(model, mesh, {"lm_head": ColwiseParallel()})
    Wd, bd_ = model.lm_head.weight, model.lm_head.bias
    ck.true("dtensor: weight is not a DTensor", isinstance(Wd, DTensor))
    cfg = IWConfig(mode="sequence")
    outs = ("entropy", "top1", "lse")
    for seq_par in (False, True):
        model.zero_grad()
        h = inp["hidden"].clone().requires_grad_()
        vp = VocabParallel(sequence_parallel=True) if seq_par else None
        out = linear_iwsft_loss(h, Wd, inp["labels"], inp["ref_logprobs"], bias=bd_,
                                config=cfg, backend=be, outputs=outs, vocab_parallel=vp)
        (out.loss * 1.7).backward()
        oo, og = _run(inp, be, config=cfg, outputs=outs)
        if seq_par:
            import torch.distributed as dist

            part = h.grad.clone()
            dist.all_reduce(part)
            ck.close("dtensor sequence_parallel: sum of partial dH", part, og[0], 2e-5)
            continue
        gw, gb = Wd.grad, bd_.grad
        ck.true("dtensor: weight grad is not a DTensor placed Shard(0)",
                isinstance(gw, DTensor) and tuple(gw.placements) == (Shard(0),))
        ck.true("dtensor: bias grad is not a DTensor", isinstance(gb, DTensor))
        ck.close("dtensor loss", out.loss, oo.loss, 2e-5)
        ck.close("dtensor dH", h.grad, og[0], 2e-5)
        ck.close("dtensor dW (full_tensor)", gw.full_tensor(), og[1], 2e-5)
        ck.close("dtensor db (full_tensor)", gb.full_tensor(), og[2], 2e-5)
        for k in outs:
            ck.close(f"dtensor {k}", getattr(out, k), getattr(oo, k), 2e-5)
    lp = linear_logprobs(inp["hidden"], Wd, inp["labels"], bd_, backend=be)
    lp1 = linear_logprobs(inp["hidden"], inp["weight"], inp["labels"], inp["bias"], backend=be)
    ck.close("dtensor linear_logprobs", lp, lp1, 2e-5)
    # unsupported placements and a bias that is not sharded like the weight
    from torch.distributed.tensor import Replicate, distribute_tensor

    W_rep = distribute_tensor(inp["weight"], mesh, [Replicate()])
    W_col = distribute_tensor(inp["weight"], mesh, [Shard(1)])
    for what, kw, needle in (
            ("Replicate weight", dict(weight=W_rep, bias=None), "Shard(0)"),
            ("Shard(1) weight", dict(weight=W_col, bias=None), "Shard(1)"),
            ("plain bias", dict(weight=Wd, bias=inp["bias"]), "bias must be a DTensor"),
            ("range mismatch", dict(weight=Wd, bias=None, vocab_parallel=VocabParallel(
                None, 0, 1)), "differs from the DTensor")):
        _expect_error(ck, what, ValueError, needle, lambda kw=kw: linear_iwsft_loss(
            inp["hidden"], kw["weight"], inp["labels"], bias=kw["bias"],
            config=IWConfig(mode="sft"), backend=be,
            vocab_parallel=kw.get("vocab_parallel")))


def case_fsdp2_x_tp(ck, rank, world, gen, path):
    """A 2-D mesh (dp 2 x tp 2, 4 ranks): lm_head ColwiseParallel on "tp", then FSDP2
    (fully_shard) over "dp". The unsharded lm_head weight is a DTensor Shard(0) on the tp mesh:
    detected; loss and gradients (the FSDP-sharded weight grad gathered) equal one process."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    from iwsft_kernels import IWConfig, linear_iwsft_loss

    be = _set_path(path)
    H, V, N = 8, 37, 10
    cfg = IWConfig(mode="token")

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(H, H)
            self.lm_head = torch.nn.Linear(H, V, bias=False)

        def forward(self, x, y, ref):
            return linear_iwsft_loss(self.body(x), self.lm_head.weight, y, ref, config=cfg,
                                     backend=be).loss

    torch.manual_seed(int(torch.randint(0, 2**30, (1,), generator=gen)))
    model, single = Model(), Model()
    single.load_state_dict(model.state_dict())
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    parallelize_module(model, mesh["tp"], {"lm_head": ColwiseParallel()})
    fully_shard(model.lm_head, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    x = torch.randn(N, H, generator=gen)
    y = torch.randint(0, V, (N,), generator=gen)
    ref = -torch.rand(N, generator=gen) - 3.0
    model.lm_head.unshard()  # its module is not called: gather it for the loss
    loss = model(x, y, ref)
    (loss * 1.7).backward()
    one = single(x, y, ref)
    (one * 1.7).backward()
    ck.close("fsdp2 x tp loss", loss, one, 1e-5)
    ck.close("fsdp2 x tp lm_head grad", model.lm_head.weight.grad.full_tensor(),
             single.lm_head.weight.grad, 1e-5)
    ck.close("fsdp2 x tp body grad", model.body.weight.grad.full_tensor(),
             single.body.weight.grad, 1e-5)
    # a weight on the 2-D mesh itself: (Replicate, Shard(0)) is the tp dimension's shard;
    # sharded on both dimensions is refused
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    W = single.lm_head.weight.detach()
    h = single.body(x).detach()
    Wd = distribute_tensor(W, mesh, [Replicate(), Shard(0)])
    got = linear_iwsft_loss(h, Wd, y, ref, config=cfg, backend=be).loss
    want = linear_iwsft_loss(h, W, y, ref, config=cfg, backend=be).loss
    ck.close("2-D mesh (Replicate, Shard(0)) loss", got, want, 1e-6)
    W2 = distribute_tensor(W, mesh, [Shard(0), Shard(0)])
    _expect_error(ck, "2-D mesh sharded twice", ValueError, "exactly one mesh dimension",
                  lambda: linear_iwsft_loss(h, W2, y, ref, config=cfg, backend=be))


def _expect_error(ck, what, exc, needle, fn):
    try:
        fn()
    except exc as err:
        ck.true(f"{what}: message {str(err)!r} lacks {needle!r}", needle in str(err))
    except Exception as err:  # noqa: BLE001
        ck.errors.append(f"{what}: raised {type(err).__name__}: {err}")
    else:
        ck.errors.append(f"{what}: no error raised")


def case_errors(ck, rank, world, gen, path):
    """Overlapping / gapped shards, weight rows != the range, labels beyond the global V,
    different batches per rank, a bad vocab_parallel type: the same clear error on every
    rank (no hang)."""
    from iwsft_kernels import IWConfig, VocabParallel, linear_iwsft_loss

    be = _set_path(path)
    V, H, N = 37, 8, 6
    inp = _inputs(gen, N, H, V, ignore=0.0, bias=False)
    bd = _bounds(V, world)
    s, e = bd[rank], bd[rank + 1]
    cfg = IWConfig(mode="sft")

    def call(s_, e_, labels=None, hidden=None, W=None):
        W = inp["weight"][s_:e_] if W is None else W
        return lambda: linear_iwsft_loss(inp["hidden"] if hidden is None else hidden, W,
                                         inp["labels"] if labels is None else labels,
                                         config=cfg, backend=be,
                                         vocab_parallel=VocabParallel(None, s_, e_))

    _expect_error(ck, "overlap", ValueError, "overlap", call(max(s - 1, 0), e))
    _expect_error(ck, "gap", ValueError, "gap", call(s, e - 1 if rank == 0 else e))
    extra = torch.cat([inp["weight"][s:e], inp["weight"][:1]])
    _expect_error(ck, "weight rows", ValueError, "rows", call(s, e, W=extra))
    bad = inp["labels"].clone()
    bad[0] = V
    _expect_error(ck, "label beyond V", ValueError, f"[0, {V})", call(s, e, labels=bad))
    # one rank's inputs rejected (a bias of the wrong length on rank 0): every rank raises,
    # rank 0 its own error, the others name it (nobody waits in a collective)
    bias = torch.zeros(e - s + (1 if rank == 0 else 0))
    _expect_error(ck, "one rank rejected", ValueError,
                  "bias must have shape" if rank == 0 else "ranks [0] of the vocabulary",
                  lambda: linear_iwsft_loss(inp["hidden"], inp["weight"][s:e], inp["labels"],
                                            bias=bias, config=cfg, backend=be,
                                            vocab_parallel=VocabParallel(None, s, e)))
    more = inp["labels"].clone()
    if rank == 0:
        more[1] = -100
    _expect_error(ck, "different batches", ValueError, "same hidden and labels",
                  call(s, e, labels=more))
    _expect_error(ck, "vocab_parallel type", TypeError, "VocabParallel",
                  lambda: linear_iwsft_loss(inp["hidden"], inp["weight"], inp["labels"],
                                            config=cfg, vocab_parallel=(s, e)))
    _expect_error(ck, "VocabParallel start without stop", ValueError, "both start and stop",
                  lambda: VocabParallel(None, 0, None))


CASES = {f.__name__[5:]: f for f in (case_modes, case_transforms_zloss,
                                     case_peaked_argmax_on_rank0, case_tied_max_across_ranks,
                                     case_megatron_ranges, case_dtensor, case_errors,
                                     case_fsdp2_x_tp)}


def _plan(world):
    """(case, path) pairs run at this world size: every case on every path at 2 ranks. At 4
    ranks (4 processes on the CI's 2 cores) the pure torch path is left out (a sharded chunk
    runs the same torch epilogue under the native backend, which stays) and the slow Triton
    interpreter runs only the cases whose 4-rank layout differs in kind (uneven / empty
    shards, every arg-max on one rank). The FSDP2 x TP case needs 4 ranks (a 2 x 2 mesh)."""

    def wanted(c, p):
        if c == "fsdp2_x_tp":  # needs a 2 x 2 mesh
            return world == 4 and p == "torch+native"
        return world == 2 or p == "torch+native" or (
            p == "triton" and c in ("megatron_ranges", "peaked_argmax_on_rank0", "errors"))

    return [(c, p) for p in PATHS for c in CASES if wanted(c, p)]


def _worker(rank, world, store, outdir):
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    results, seconds = {}, {}
    try:
        for name, path in _plan(world):
            fn = CASES[name]
            ck = _Checks()
            # the same inputs on every rank (str hashes differ between processes)
            gen = torch.Generator().manual_seed(zlib.crc32(f"{name}{world}".encode()))
            t0 = time.perf_counter()
            try:
                fn(ck, rank, world, gen, path)
            except Exception:  # noqa: BLE001 — reported, not raised (the others would hang)
                ck.errors.append(traceback.format_exc())
            results[f"{name}[{path}]"] = ck.errors
            seconds[f"{name}[{path}]"] = round(time.perf_counter() - t0, 2)
    finally:
        with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
            json.dump(dict(results=results, seconds=seconds), f)
        dist.destroy_process_group()


_RESULTS: dict = {}


def _results(world):
    """Spawn the world once (per session) and collect every rank's results."""
    if world not in _RESULTS:
        import torch.multiprocessing as mp

        with tempfile.TemporaryDirectory() as d:
            store = os.path.join(d, "store")
            mp.start_processes(_worker, args=(world, store, d), nprocs=world, join=True,
                               start_method="spawn")
            res = {}
            for r in range(world):
                with open(os.path.join(d, f"rank{r}.json")) as f:
                    res[r] = json.load(f)["results"]
        _RESULTS[world] = res
    return _RESULTS[world]


@pytest.mark.parametrize("world, case, path", [(w, c, p) for w in WORLDS for c, p in _plan(w)])
def test_vocab_parallel(world, case, path):
    res = _results(world)
    key = f"{case}[{path}]"
    fails = {r: res[r].get(key) for r in res}
    missing = [r for r, v in fails.items() if v is None]
    assert not missing, f"ranks {missing} did not run {key}"
    bad = {r: v for r, v in fails.items() if v}
    assert not bad, "\n".join(f"rank {r}: " + "\n".join(v) for r, v in bad.items())


def test_refused_under_compile():
    """torch.compile: the registered op has no collectives; the loss says so."""
    from iwsft_kernels import VocabParallel
    from iwsft_kernels.loss import _refuse_compiled_vocab_parallel

    with pytest.raises(NotImplementedError, match="torch.compile"):
        _refuse_compiled_vocab_parallel(VocabParallel(None, 0, 1), torch.zeros(1, 1))
    _refuse_compiled_vocab_parallel(None, torch.zeros(1, 1))  # a plain weight passes


def test_vocab_parallel_config_errors():
    from iwsft_kernels import VocabParallel

    with pytest.raises(ValueError, match="0 <= start <= stop"):
        VocabParallel(None, 5, 3)
    with pytest.raises(ValueError, match="0 <= start <= stop"):
        VocabParallel(None, -1, 3)
    with pytest.raises(TypeError, match="start must be an int"):
        VocabParallel(None, 0.0, 3)
    with pytest.raises(ValueError, match="both start and stop"):
        VocabParallel(None, None, 3)
    with pytest.raises(TypeError, match="sequence_parallel must be a bool"):
        VocabParallel(None, 0, 3, sequence_parallel=1)
    VocabParallel(None, 3, 3)  # an empty shard is allowed


def test_sharded_chunk_budget_counts_the_torch_softcap_buffer():
    """A sharded chunk runs the torch ops' partials (also under the native backend), which keep
    a dz/dr buffer under a softcap: the chunk budget counts it."""
    from iwsft_kernels import core
    from iwsft_kernels.backends.vocab_merge import VocabShard
    from iwsft_kernels.config import LogitTransform

    shard = VocabShard(group=None, start=0, stop=10, V=20, max_rows=10)
    cap = LogitTransform(softcap=30.0)
    assert core.extra_fp32_buffers("torch", "cpu", cap, shard) == 1
    assert core.extra_fp32_buffers("torch", "cpu", LogitTransform(), shard) == 0


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
