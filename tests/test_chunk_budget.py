"""The default logits-chunk size follows the batch (core.default_chunk_rows); the caller's
chunk_bytes wins when given; the loss does not depend on the chunking. No timing here
(bench/bench_chunk_budget.py measures memory and time)."""

import pytest
import torch

from helpers import make_inputs, rel
from iwsft_kernels import IWConfig, core, linear_iwsft_loss, linear_logprobs
from iwsft_kernels.backends.chunked import rows_per_chunk

QWEN_V = 151936


def _rows(M, V=QWEN_V, dtype=torch.float32, dev="cpu"):
    return core.default_chunk_rows(V, M, dtype, dev)


def test_default_rows_scale_with_batch():
    cap = rows_per_chunk(QWEN_V, torch.float32, core.DEFAULT_CHUNK_BYTES["cpu"])
    assert cap == 220  # 128 MiB of fp32 rows at V = 151,936
    floor = core.DEFAULT_MIN_CHUNK_ROWS["cpu"]
    # the Qwen2.5-0.5B head on CPU: 461 / 1844 target rows (N = 512 / 2048, 10% ignored)
    assert _rows(461) == floor == 64
    assert _rows(1844) == 116 and _rows(2048) == 128
    assert _rows(10**6) == cap
    prev = 0
    for M in [1, 7, 100, 511, 512, 513, 1000, 2048, 3000, 3520, 3521, 5000, 10**5]:
        r = _rows(M)
        assert prev <= r <= cap  # non-decreasing in M, never above the byte cap
        prev = r
        if floor < r < cap:  # between floor and cap: 1/16 of the batch's logits
            assert r == -(-M // 16)
        assert r * QWEN_V * 4 <= max(floor, -(-M // 16)) * QWEN_V * 4  # <= M/16 or the floor


def test_default_rows_cuda():
    # Qwen vocabulary, bf16: the 1 GiB cap binds before the 2048-row floor (as before)
    cap = rows_per_chunk(152064, torch.bfloat16, core.DEFAULT_CHUNK_BYTES["cuda"])
    assert cap == 1176
    assert {_rows(M, 152064, torch.bfloat16, "cuda") for M in (1, 2048, 16384, 10**6)} == {cap}
    # a 32k vocabulary: the floor (2048 rows) for small batches, M / 16 for large ones
    assert _rows(100, 32000, torch.bfloat16, "cuda") == 2048
    cap32 = rows_per_chunk(32000, torch.bfloat16, core.DEFAULT_CHUNK_BYTES["cuda"])
    assert cap32 == 5592
    assert _rows(16 * 4000, 32000, torch.bfloat16, "cuda") == 4000
    assert _rows(10**7, 32000, torch.bfloat16, "cuda") == cap32


def test_user_chunk_bytes_wins():
    W = torch.empty(QWEN_V, 8)
    for M in (10, 461, 10**5):
        assert core.chunk_rows_for(W, 5 * QWEN_V * 4, torch.float32, M) == 5
        assert core.chunk_rows_for(W, None, torch.float32, M) == _rows(M)
    with pytest.raises(ValueError, match="chunk_bytes"):
        core.chunk_rows_for(W, 0, torch.float32, 10)


def _spy_rows(monkeypatch):
    seen = []
    real = core.fused_linear_iw

    def spy(*a, **kw):
        seen.append(kw["chunk_rows"])
        return real(*a, **kw)

    monkeypatch.setattr(core, "fused_linear_iw", spy)
    return seen


@pytest.mark.parametrize("mode", ["sft", "sequence"])
def test_loss_independent_of_chunking(backend, device, rng, monkeypatch, mode):
    """Default chunking (here M ~ 150 target rows -> 64-row chunks), one chunk, and 13-row
    chunks (sequence mode: two-phase) give the same loss, log-probs, weights and gradients."""
    V, H = 37, 16
    inp, S = make_inputs(3, 61, H, V, device=device, gen=rng, packed=True, bias=True)
    cfg = IWConfig(mode=mode)
    M = int((inp["labels"] != -100).sum())
    seen = _spy_rows(monkeypatch)
    results = []
    for cb in (None, 10**9, 13 * V * 4):
        h = inp["hidden"].detach().clone().requires_grad_()
        W = inp["weight"].detach().clone().requires_grad_()
        kw = {} if cb is None else dict(chunk_bytes=cb)
        out = linear_iwsft_loss(h, W, inp["labels"], inp["ref_logprobs"],
                                cu_seqlens=inp["cu_seqlens"], bias=inp["bias"], config=cfg,
                                backend=backend, **kw)
        (out.loss * 1.3).backward()
        results.append((out, h.grad, W.grad))
    floor = core.DEFAULT_MIN_CHUNK_ROWS[device.type if device.type == "cuda" else "cpu"]
    assert seen == [max(floor, -(-M // 16)), 10**9 // (V * 4), 13]
    if device.type == "cpu":
        assert M > seen[0]  # the default really cut the batch into several chunks
    (o0, gh0, gw0) = results[0]
    for o, gh, gw in results[1:]:
        torch.testing.assert_close(o.loss, o0.loss, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(o.token_logprobs, o0.token_logprobs, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(o.token_weights, o0.token_weights, rtol=1e-6, atol=1e-6)
        assert rel(gh, gh0) < 1e-6 and rel(gw, gw0) < 1e-6


def test_linear_logprobs_independent_of_chunking(device, rng):
    inp, _ = make_inputs(3, 61, 20, 45, device=device, gen=rng, bias=True)
    args = (inp["hidden"], inp["weight"], inp["labels"])
    a = linear_logprobs(*args, bias=inp["bias"], backend="torch")
    b = linear_logprobs(*args, bias=inp["bias"], backend="torch", chunk_bytes=3 * 45 * 4)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunk_logits_into_reused_buffer(rng, dtype, with_bias):
    """The CPU chunk driver writes every chunk's logits into one buffer (torch_ops.chunk_logits
    out=): same values as a fresh allocation, and really in the buffer."""
    from iwsft_kernels.backends.torch_ops import chunk_logits, logits_buffer

    h = torch.randn(5, 19, generator=rng).to(dtype)
    W = torch.randn(41, 19, generator=rng).to(dtype)
    b = torch.randn(41, generator=rng).to(dtype) if with_bias else None
    buf = logits_buffer(8, 41, "cpu")
    z = chunk_logits(h, W, b, buf[:5])
    assert z.data_ptr() == buf.data_ptr() and z.dtype == torch.float32
    torch.testing.assert_close(z, chunk_logits(h, W, b), rtol=0, atol=0)
    ref = h.double() @ W.double().T + (0 if b is None else b.double())
    torch.testing.assert_close(z.double(), ref, rtol=1e-5, atol=1e-5)
