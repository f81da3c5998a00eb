"""Each Triton kernel against its torch twin (interpreter on CPU), odd shapes."""

import pytest
import torch

pytest.importorskip("triton")

from conftest import DEVICE  # noqa: E402
from iwsft_kernels.backends import torch_ops, triton_epilogue, triton_grad_weight, triton_lse  # noqa: E402
from iwsft_kernels.config import IDENTITY  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,H,V", [(1, 16, 17), (37, 45, 101), (70, 33, 250)])
def test_lse_forward(rng, dtype, M, H, V):
    h = torch.randn(M, H, generator=rng).to(dtype).to(DEVICE)
    W = torch.randn(V, H, generator=rng).to(dtype).to(DEVICE)
    b = torch.randn(V, generator=rng).to(dtype).to(DEVICE)
    y = torch.randint(0, V, (M,), generator=rng).to(DEVICE)
    lse, logp = triton_lse.lse_forward(h, W, b, y)
    z = h.double() @ W.double().T + b.double()
    tol = 1e-5 if dtype == torch.float32 else 1e-4  # fp32 accumulation of exact bf16 products
    torch.testing.assert_close(lse.double(), torch.logsumexp(z, 1), rtol=tol, atol=tol)
    torch.testing.assert_close(logp.double(), torch.log_softmax(z, 1).gather(1, y[:, None]).squeeze(1),
                               rtol=tol, atol=tol)


@pytest.mark.parametrize("zdtype,gdtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16)])
def test_epilogue(rng, zdtype, gdtype):
    m, V = 9, 77
    z = (3 * torch.randn(m, V, generator=rng)).to(zdtype).to(DEVICE)
    y = torch.randint(0, V, (m,), generator=rng).to(DEVICE)
    c = torch.randn(m, generator=rng).to(DEVICE)
    mx, rest, logp = triton_epilogue.row_lse(z.clone(), y)
    ops = torch_ops.TorchOps()
    rows_t, state = ops.chunk_forward(z.clone().float(), y)
    logp_t = rows_t.logp
    # state: (max, rest = row sum of exp(z - max) without one arg-max entry)
    torch.testing.assert_close(mx + torch.log1p(rest), torch.logsumexp(z.float(), 1))
    torch.testing.assert_close(rest, state[1], rtol=2e-6, atol=0)
    torch.testing.assert_close(logp, logp_t)
    g = triton_epilogue.softmax_grad(z.clone(), y, mx, rest, c, torch.expm1(logp), gdtype)
    g_t = ops.softmax_grad(state, y, rows_t, c, None, IDENTITY, gdtype)
    assert g.dtype == gdtype
    tol = 0 if gdtype == torch.float32 else 8e-3  # one bf16 rounding may differ
    torch.testing.assert_close(g.float(), g_t.float(), rtol=tol or 1.3e-6, atol=tol or 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_grad_weight_accumulates_in_fp32(rng, dtype):
    m, V, H = 23, 51, 37
    dw = torch.randn(V, H, generator=rng).to(DEVICE)
    start = dw.clone()
    g = torch.randn(m, V, generator=rng).to(dtype).to(DEVICE)
    h = torch.randn(m, H, generator=rng).to(dtype).to(DEVICE)
    triton_grad_weight.accum_grad_weight(dw, g, h)
    torch.testing.assert_close(dw.double(), start.double() + g.double().T @ h.double(), rtol=1e-5, atol=1e-4)
