"""dW (V, H) fp32 += G^T h for one chunk: G (m, V) and h (m, H) in bf16/fp16, tensor-core
dot with an fp32 accumulator that starts from the running dW tile, so that the weight
gradient is accumulated across chunks in fp32 without any (V, H) temporary."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_configs import aligned16, dot_precision, grad_weight_config, interpreting


@triton.jit
def _grad_weight_kernel(G, Hc, DW, m, V, K, stride_gm, stride_hm, stride_dwv,
                        PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    offs_v = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    v_ok = offs_v < V
    h_ok = offs_h < K
    dw_ptrs = DW + offs_v.to(tl.int64)[:, None] * stride_dwv + offs_h[None, :]
    acc = tl.load(dw_ptrs, mask=v_ok[:, None] & h_ok[None, :], other=0.0)
    for r0 in range(0, m, BLOCK_K):
        offs_r = r0 + tl.arange(0, BLOCK_K)
        r_ok = offs_r < m
        g = tl.load(G + offs_r.to(tl.int64)[:, None] * stride_gm + offs_v[None, :],
                    mask=r_ok[:, None] & v_ok[None, :], other=0.0)
        h = tl.load(Hc + offs_r.to(tl.int64)[:, None] * stride_hm + offs_h[None, :],
                    mask=r_ok[:, None] & h_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter's 16-bit tl.dot is wrong (Triton 3.6)
            g = g.to(tl.float32)
            h = h.to(tl.float32)
        acc = tl.dot(tl.trans(g), h, acc, input_precision=PRECISION)
    tl.store(dw_ptrs, acc, mask=v_ok[:, None] & h_ok[None, :])


def accum_grad_weight(dw: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> None:
    m, V = g.shape
    K = h.shape[1]
    if m == 0:
        return
    g = g if g.stride(1) == 1 else g.contiguous()  # keeps a padded row stride
    h = h if h.stride(1) == 1 else h.contiguous()
    aligned = aligned16((g, h, dw), (K, g.stride(0), h.stride(0), dw.stride(0)))
    cfg = grad_weight_config(g.dtype, aligned=aligned)
    grid = (triton.cdiv(V, cfg["BLOCK_V"]), triton.cdiv(K, cfg["BLOCK_H"]))
    _grad_weight_kernel[grid](g, h, dw, m, V, K, g.stride(0), h.stride(0), dw.stride(0),
                              UPCAST=interpreting(), PRECISION=dot_precision(g.dtype), **cfg)
