"""Indexing and fingerprinting at real model / data sizes, past float32's exact integers (2^24 =
16,777,216) and int32: SmolLM2-135M's tied embedding (49,152 x 576 = 28,311,552 elements), a
Qwen2.5 embedding (151,936 x 896 = 136,134,656), an SFT(Q) dataset of more than 2^24 examples.
Cheap: the 151,936 x 896 parameter is a strided view of a small storage (no 545 MB tensor)."""

import array

import pytest
import torch

from iwsft_kernels.trainer import sampler as sampler_mod
from iwsft_kernels.refcache import model_identity, strided_indices, weights_digest
from iwsft_kernels.trainer.sampler import MULTINOMIAL_MAX, StepSampler

SMOL = (49_152, 576)  # 28,311,552 > 2^24
QWEN = (151_936, 896)  # 136,134,656 > 2^24


@pytest.mark.parametrize("n", [2**24 + 1, SMOL[0] * SMOL[1], QWEN[0] * QWEN[1], 2**31 + 3,
                               2**40 + 7, 4097, 5000])
def test_strided_indices_are_exact_at_any_size(n):
    k = 4096
    idx = strided_indices(n, k)
    assert idx.dtype == torch.int64 and idx.shape == (k,)
    assert idx.tolist() == [j * (n - 1) // (k - 1) for j in range(k)]  # Python ints: exact
    assert idx[0] == 0 and idx[-1] == n - 1
    assert bool((idx[1:] > idx[:-1]).all())


def test_float32_linspace_is_the_bug_being_fixed():
    n = SMOL[0] * SMOL[1]  # what IWSFTTrainer hit on SmolLM2-135M: index n for size n
    assert int(torch.linspace(0, n - 1, 4096).long()[-1]) == n
    assert int(strided_indices(n)[-1]) == n - 1


def test_strided_indices_small_and_bad_input():
    assert strided_indices(0).tolist() == []
    assert strided_indices(5).tolist() == [0, 1, 2, 3, 4]
    assert strided_indices(4096).tolist() == list(range(4096))
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError, match="n must be an int"):
            strided_indices(bad)
    with pytest.raises(ValueError, match="k must be an int"):
        strided_indices(10, 1)
    with pytest.raises(ValueError, match="too large"):
        strided_indices(2**62, 4096)


class _Emb(torch.nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.embed = torch.nn.Parameter(weight, requires_grad=True)
        self.norm = torch.nn.Parameter(torch.ones(7))


def test_weights_digest_on_a_smollm2_sized_embedding():
    """A real 28,311,552-element parameter: no index error, and the digest sees the last element
    (the one float32 linspace cannot address) and any sampled one."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(*SMOL, generator=g)
    m = _Emb(w)
    d0 = weights_digest(m)
    assert weights_digest(m) == d0
    n = w.numel()
    flat = m.embed.data.view(-1)
    for pos in (n - 1, int(strided_indices(n)[1234])):
        old = flat[pos].item()
        flat[pos] = old + 1.0
        assert weights_digest(m) != d0, pos
        flat[pos] = old
    assert weights_digest(m) == d0
    # the TRL integration uses the same digest (it used to crash here)
    pytest.importorskip("trl")
    from iwsft_kernels.integrations.trl.ref_logprobs import model_identity as trl_identity

    assert trl_identity(m, "x").endswith(f"weights={d0}")


def test_weights_digest_on_a_qwen_sized_strided_embedding():
    """151,936 x 896 as a Hankel view W[r, c] = base[r + c] of a 152,831-element storage (not
    contiguous: the digest indexes it in place, no 545 MB copy); the sampled values are the
    exact ones."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(QWEN[0] + QWEN[1] - 1, generator=g, dtype=torch.float64)
    w = base.as_strided(QWEN, (1, 1))
    m = _Emb(w)
    assert not m.embed.is_contiguous() and m.embed.numel() == QWEN[0] * QWEN[1]
    d0 = weights_digest(m)
    from iwsft_kernels.refcache import _sample_values

    idx = strided_indices(w.numel())
    r, c = idx // QWEN[1], idx % QWEN[1]
    assert torch.equal(_sample_values(m.embed.detach(), idx), base[r + c])
    base[-1] += 1.0  # = W[-1, -1], the last element
    assert weights_digest(m) != d0


def test_weights_digest_exact_bytes_skip_and_meta():
    a = _Emb(torch.full((3, 5), 1.0, dtype=torch.float64))
    b = _Emb(torch.full((3, 5), 1.0 + 2**-40, dtype=torch.float64))  # same as float32
    assert weights_digest(a) != weights_digest(b)
    assert weights_digest(a) != weights_digest(_Emb(torch.full((3, 5), 1.0)))  # dtype
    assert weights_digest(a) != weights_digest(_Emb(torch.full((5, 3), 1.0, dtype=torch.float64)))
    bf = _Emb(torch.randn(300, 20).bfloat16())
    assert weights_digest(bf) == weights_digest(bf)
    skipped = _Emb(torch.zeros(2, 2))
    d = weights_digest(skipped, skip=("embed",))
    skipped.embed.data += 1
    assert weights_digest(skipped, skip=("embed",)) == d != weights_digest(skipped)
    with torch.device("meta"):
        meta = _Emb(torch.empty(*QWEN))
    with pytest.raises(ValueError, match="meta device"):
        weights_digest(meta)


def test_trainer_model_identity_includes_the_weights(tmp_path):
    """refcache.model_identity (iwsft-train's reference cache key) with the loaded model tells
    apart two checkpoints that have the same path, config and file sizes."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1)
    torch.manual_seed(0)
    m = transformers.Qwen2ForCausalLM(cfg)
    m.save_pretrained(tmp_path)
    id0 = model_identity(str(tmp_path), m.config, model=m)
    assert model_identity(str(tmp_path), m.config, model=m) == id0
    with torch.no_grad():
        m.lm_head.weight[-1, -1] += 1.0
    m.save_pretrained(tmp_path)  # overwritten in place: same file sizes
    assert model_identity(str(tmp_path), m.config) == model_identity(str(tmp_path), m.config)
    assert model_identity(str(tmp_path), m.config, model=m) != id0


# -------------------------------------------------------------------- SFT(Q) sampling
def test_quality_sampling_past_the_multinomial_limit(monkeypatch):
    """The inverse-CDF path (used above 2^24 examples), exercised on a small n by lowering the
    limit: proportional, zero-quality examples never drawn (also the last one), reproducible."""
    monkeypatch.setattr(sampler_mod, "MULTINOMIAL_MAX", 8)
    n = 4000
    g = torch.Generator().manual_seed(5)
    q = torch.rand(n, generator=g, dtype=torch.float64) * 3
    q[::7] = 0.0
    q[-3:] = 0.0
    s = StepSampler(n, 10, seed=2, quality=q.tolist())
    draws = []
    for epoch in range(60):
        draws += s.epoch_order(epoch)
    counts = torch.bincount(torch.tensor(draws), minlength=n).double()
    assert int(counts[q == 0].sum()) == 0
    expect = q / q.sum() * len(draws)
    # chi-square with ~3400 dof: mean dof, sd sqrt(2 dof) ~ 82; 6 sd of slack
    pos = q > 0
    chi2 = float(((counts[pos] - expect[pos]) ** 2 / expect[pos]).sum())
    dof = int(pos.sum()) - 1
    assert abs(chi2 - dof) < 6 * (2 * dof) ** 0.5, (chi2, dof)
    assert StepSampler(n, 10, seed=2, quality=q).epoch_order(3) == s.epoch_order(3)
    assert s.epoch_order(4) != s.epoch_order(3)
    with pytest.raises(ValueError, match="one quality per example"):
        StepSampler(n, 10, quality=[1.0] * (n - 1))


def test_quality_sampling_with_more_than_2_24_examples():
    """n = 2^24 + 3 examples (torch.multinomial refuses > 2^24 categories): one epoch's draws,
    in range, zero-quality examples never drawn, the two quality levels in proportion."""
    n = MULTINOMIAL_MAX + 3
    q = torch.ones(n, dtype=torch.float64)
    q[n // 2:] = 3.0
    q[:1000] = 0.0
    q[-1] = 0.0
    s = StepSampler(n, 1024, seed=0, quality=q)
    order = torch.frombuffer(array.array("q", s.epoch_order(0)), dtype=torch.int64)
    assert order.shape == (n,) and int(order.min()) >= 1000 and int(order.max()) <= n - 2
    high = float((order >= n // 2).double().mean())
    # expected share of the quality-3 half: 3 (n/2 - 1) / (1 (n/2 - 1000) + 3 (n/2 - 1))
    w_lo, w_hi = n // 2 - 1000, 3.0 * (n - n // 2 - 1)
    assert abs(high - w_hi / (w_lo + w_hi)) < 1e-3
