"""Regression: the Triton backend's G is a column view of a row-padded buffer whose padding
is uninitialised. torch's CPU bf16 GEMM read that padding (NaN garbage -> NaN rows of dH,
seen as an order-dependent failure of test_loss_oracle.py::test_bf16[triton-*])."""

import pytest
import torch

from iwsft_kernels.backends.triton_ops import TritonOps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_grad_hidden_ignores_row_padding(dtype):
    g0 = torch.Generator().manual_seed(0)
    m, V, H = 93, 97, 40
    buf = torch.full((m, 112), float("nan"), dtype=dtype)  # padding = NaN garbage
    g = buf[:, :V]
    g.copy_(torch.randn(m, V, generator=g0))
    W = torch.randn(V, H, generator=g0).to(dtype)
    dh = TritonOps().grad_hidden(g, W)
    want = (g.double() @ W.double())
    assert torch.isfinite(dh).all()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert float((dh.double() - want).norm() / want.norm()) < tol
