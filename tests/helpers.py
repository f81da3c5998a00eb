"""Input generators and comparisons shared by the tests."""

from __future__ import annotations

import torch

from iwsft_kernels.oracle import oracle_iwsft


def make_inputs(B, T, H, V, *, dtype=torch.float32, device="cpu", gen=None, ignore_frac=0.2,
                bias=False, packed=False, peaked=None, ref_scale=2.0):
    """Random (B, T) batch. packed=True returns a flat layout with random cu_seqlens.
    peaked=p: hidden states are built so that every target's probability is >= p."""
    g = gen
    N = B * T
    W = torch.randn(V, H, generator=g) / H**0.5
    y = torch.randint(0, V, (N,), generator=g)
    if peaked is None:
        h = torch.randn(N, H, generator=g)
    else:
        base = W[y] / W[y].norm(dim=1, keepdim=True) ** 2  # z_y = 1 for c = 1
        noise = 0.1 * torch.randn(N, H, generator=g)
        c = 1.0
        while True:
            h = c * base + noise
            p = torch.softmax((h.double() @ W.double().T), 1).gather(1, y[:, None])
            if float(p.min()) >= peaked:
                break
            c *= 1.25
    drop = torch.rand(N, generator=g) < ignore_frac
    y = torch.where(drop, torch.full_like(y, -100), y)
    b = (0.5 * torch.randn(V, generator=g)) if bias else None
    ref = -ref_scale * torch.rand(N, generator=g) - 0.01
    if packed:
        cuts = torch.randperm(N - 1, generator=g)[: max(B - 1, 0)] + 1
        cu = torch.cat([torch.tensor([0]), cuts.sort().values, torch.tensor([N])])
        shape = (N,)
    else:
        cu = None
        shape = (B, T)
    to = dict(device=device)
    out = dict(
        hidden=h.reshape(*shape, H).to(dtype).to(**to),
        weight=W.to(dtype).to(**to),
        labels=y.reshape(shape).to(**to),
        ref_logprobs=ref.reshape(shape).to(**to),
        bias=None if b is None else b.to(dtype).to(**to),
        cu_seqlens=None if cu is None else cu.to(**to),
    )
    S = B if cu is None else cu.numel() - 1
    return out, S


def rel(a, b):
    a = a.detach().double().cpu()
    b = b.detach().double().cpu()
    den = b.norm()
    return float((a - b).norm() / den) if den > 0 else float((a - b).norm())


def oracle_grads(inp, cfg, grad_out, **kw):
    """float64 reference loss, outputs and gradients w.r.t. hidden, weight, bias."""
    leaves = {k: inp[k].detach().cpu().double().requires_grad_()
              for k in ("hidden", "weight", "bias") if inp.get(k) is not None}
    r = oracle_iwsft(leaves["hidden"], leaves["weight"], inp["labels"].cpu(),
                        inp["ref_logprobs"].cpu().double(), cu_seqlens=None if inp.get("cu_seqlens") is None else inp["cu_seqlens"].cpu(),
                        bias=leaves.get("bias"), config=cfg, **kw)
    (r["loss"] * grad_out).backward()
    r["loss"] = r["loss"].detach()  # a value to compare from here on
    r["grads"] = {k: v.grad for k, v in leaves.items()}
    return r
