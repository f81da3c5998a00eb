"""Sampler (uniform, SFT(Q), rank split) and the reference log-prob cache (fingerprint, resume)."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")

from iwsft_kernels import IWConfig  # noqa: E402
from iwsft_kernels.integrations import apply_iwsft_to_model  # noqa: E402
from iwsft_kernels.trainer.data import Example, TokenizedData  # noqa: E402
from iwsft_kernels.refcache import (  # noqa: E402
    PrecomputeInterrupted,
    RefCacheMismatch,
    compute_ref_logprobs,
)
from iwsft_kernels.trainer.sampler import StepSampler, rank_micro_batches  # noqa: E402


def test_uniform_sampler_is_deterministic_permutation():
    s = StepSampler(10, 4, seed=3)
    assert s.steps_per_epoch == 2
    e0 = s.batch(0) + s.batch(1)
    assert len(set(e0)) == 8 and s.batch(0) == StepSampler(10, 4, seed=3).batch(0)
    assert s.batch(2) != s.batch(0)  # a new epoch, a new order
    with pytest.raises(ValueError, match="fewer than one global batch"):
        StepSampler(3, 4)


def test_quality_sampling_is_proportional():
    q = [0.0, 1.0, 3.0, 0.0]
    s = StepSampler(4, 4, seed=0, quality=q)
    counts = torch.zeros(4)
    for step in range(2000):
        for i in s.batch(step):
            counts[i] += 1
    freq = counts / counts.sum()
    assert counts[0] == counts[3] == 0
    assert abs(freq[2].item() - 0.75) < 0.02
    with pytest.raises(ValueError, match="positive sum"):
        StepSampler(2, 1, quality=[0.0, 0.0])


def test_rank_micro_batches_partition_the_global_batch():
    lengths = [5, 9, 1, 7, 3, 8, 2, 6]
    idx = list(range(8))
    parts = [rank_micro_batches(idx, lengths, r, 2, 2) for r in range(2)]
    flat = sorted(i for p in parts for mb in p for i in mb)
    assert flat == idx and all(len(p) == 2 for p in parts)
    assert parts[0][0] == [1, 3]  # the two longest of rank 0: similar lengths per micro-batch


def tiny_model():
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, bos_token_id=None, eos_token_id=None,
                                   pad_token_id=0)
    return apply_iwsft_to_model(transformers.Qwen2ForCausalLM(cfg).eval(), IWConfig())


def tiny_data(n=7):
    g = torch.Generator().manual_seed(0)
    exs = []
    for i in range(n):
        L = 5 + i
        ids = torch.randint(1, 128, (L,), generator=g).tolist()
        labels = [-100] * 2 + ids[2:]
        exs.append(Example(ids, labels, 1.0, i, L - 2))
    return TokenizedData(exs, n)


PARTS = {"data": "d", "tokenizer": "t", "template": "c", "ref_model": "m", "max_length": 64,
         "n_examples": 7}


def test_ref_cache_matches_direct_computation_resumes_and_refuses_mismatch(tmp_path):
    acc = accelerate.Accelerator(cpu=True)
    model, data = tiny_model(), tiny_data()
    full = compute_ref_logprobs(acc, model, data, tmp_path / "a", PARTS, 0, batch_size=2)
    for ex, lp in zip(data.examples, full):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ex.input_ids])).logits[0].float()
        want = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ex.input_ids[1:])[:, None])
        mask = torch.tensor(ex.labels[1:]) != -100
        torch.testing.assert_close(lp[1:][mask], want.squeeze(1)[mask], rtol=1e-5, atol=1e-5)
        assert lp.shape == (len(ex.input_ids),)

    # interrupted after 2 of 4 batches: the finished batch files stay, the rerun completes
    with pytest.raises(PrecomputeInterrupted):
        compute_ref_logprobs(acc, model, data, tmp_path / "b", PARTS, 0, batch_size=2,
                             _stop_after_batches=2)
    done = sorted(p.name for p in (tmp_path / "b").glob("batch-*.pt"))
    assert done == ["batch-00000.pt", "batch-00001.pt"]
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "b").glob("batch-*.pt")}
    resumed = compute_ref_logprobs(acc, model, data, tmp_path / "b", PARTS, 0, batch_size=2)
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())  # not recomputed
    for a, b in zip(full, resumed):
        torch.testing.assert_close(a, b)
    assert (tmp_path / "b" / "complete").exists()

    # a cache made for other inputs is refused, naming what differs
    other = {**PARTS, "max_length": 128, "ref_model": "other"}
    with pytest.raises(RefCacheMismatch, match="max_length.*ref_model|ref_model.*max_length"):
        compute_ref_logprobs(acc, model, data, tmp_path / "a", other, 0, batch_size=2)
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert meta["parts"] == PARTS
