"""GPU only (bench/gpu_check.sh sets IWSFT_TEST_CUDA=1): the Triton backend at the
Qwen2.5-0.5B head in bf16 against an fp32 reference that materialises the logits.
Without CUDA these are skipped (the same kernels are exercised on small shapes by
test_loss_oracle.py / test_kernels.py under the Triton interpreter)."""

import pytest
import torch

from conftest import CUDA_RUN
from helpers import rel
from iwsft_kernels import IWConfig, linear_iwsft_loss
from iwsft_kernels.oracle import oracle_iwsft

pytestmark = pytest.mark.skipif(not (CUDA_RUN and torch.cuda.is_available()),
                                reason="needs a GPU (run by bench/gpu_check.sh)")


@pytest.mark.parametrize("mode", ["sft", "token", "sequence"])
def test_qwen_head_bf16(mode):
    torch.manual_seed(0)
    B, T, H, V = 2, 2048, 896, 151936
    dev = "cuda"
    W = (torch.randn(V, H, device=dev) / H**0.5).to(torch.bfloat16)
    y = torch.randint(0, V, (B, T), device=dev)
    y[:, :200] = -100
    h = (2 * torch.randn(B, T, H, device=dev)).to(torch.bfloat16)
    ref = -3 * torch.rand(B, T, device=dev) - 0.1
    cfg = IWConfig(mode=mode)
    hh, WW = h.clone().requires_grad_(), W.clone().requires_grad_()
    out = linear_iwsft_loss(hh, WW, y, ref, config=cfg, backend="triton")
    (out.loss * 1.5).backward()
    hr, Wr = h.float().requires_grad_(), W.float().requires_grad_()
    r = oracle_iwsft(hr, Wr, y, ref, config=cfg, dtype=torch.float32)
    (r["loss"] * 1.5).backward()
    assert abs(float(out.loss) - float(r["loss"])) < 1e-3 * abs(float(r["loss"]))
    assert rel(hh.grad, hr.grad) < 1e-2 and rel(WW.grad, Wr.grad) < 1e-2
    assert rel(out.token_weights, r["token_weights"]) < 1e-2
