"""The patched causal-LM forward: same loss/grads as transformers' own path in sft mode, shifting
that never crosses a packed sequence boundary, tied embeddings, unchanged plain forward."""

import copy

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from iwsft_kernels import IWConfig  # noqa: E402
from iwsft_kernels.integrations import (  # noqa: E402
    apply_iwsft_to_llama,
    apply_iwsft_to_model,
    apply_iwsft_to_qwen2,
    remove_iwsft_patch,
    sequence_starts,
    shift_for_next_token,
)

V = 300


def tiny(kind="qwen2", tied=True, seed=0):
    torch.manual_seed(seed)
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                  max_position_embeddings=128, pad_token_id=0, bos_token_id=None,
                  eos_token_id=None)
    if kind == "qwen2":
        m = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    elif kind == "llama":
        m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:
        m = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=V, n_embd=32, n_layer=2, n_head=2, n_positions=128,
            bos_token_id=None, eos_token_id=None))
    return m.float().eval()


def batch(B=3, T=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (B, T), generator=g)
    lengths = [T, T - 3, T - 5][:B]
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100  # a "prompt" without loss
    return ids, mask, labels


def hf_loss_and_grads(model, ids, mask, labels):
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind,tied", [("qwen2", True), ("qwen2", False), ("llama", False),
                                       ("gpt2", True)])
def test_sft_mode_equals_transformers_loss(kind, tied):
    ref_model = tiny(kind, tied)
    model = copy.deepcopy(ref_model)
    apply_iwsft_to_model(model, IWConfig(mode="sft"), backend="torch")
    ids, mask, labels = batch()
    want_loss, want_grads = hf_loss_and_grads(ref_model, ids, mask, labels)
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None
    out.loss.backward()
    torch.testing.assert_close(out.loss.detach(), want_loss, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    if tied and kind != "gpt2":
        assert model.lm_head.weight is model.model.embed_tokens.weight
    # token_logprobs aligned with labels: log p(labels[t] | < t) from the real logits
    with torch.no_grad():
        logits = ref_model(input_ids=ids, attention_mask=mask).logits.float()
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    tgt = labels[:, 1:] != -100
    torch.testing.assert_close(out.token_logprobs[:, 1:][tgt], lp[tgt], rtol=1e-5, atol=1e-5)
    assert (out.token_logprobs[:, 1:][~tgt] == 0).all() and (out.token_logprobs[:, 0] == 0).all()
    assert int(out.num_targets) == int(tgt.sum())


def test_plain_forward_unchanged_and_unpatch():
    ref_model = tiny()
    model = apply_iwsft_to_qwen2(copy.deepcopy(ref_model), IWConfig(mode="sequence"))
    ids, mask, _ = batch()
    with torch.no_grad():
        a = ref_model(input_ids=ids, attention_mask=mask).logits
        b = model(input_ids=ids, attention_mask=mask).logits
        c = model(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(model.lm_head(torch.ones(2, 32)), ref_model.lm_head(torch.ones(2, 32)))
    assert c.shape == (3, 12, V)
    remove_iwsft_patch(model)
    _, mask2, labels = batch()
    assert model(input_ids=ids, attention_mask=mask2, labels=labels).logits is not None


def test_type_checked_aliases():
    with pytest.raises(TypeError, match="llama"):
        apply_iwsft_to_llama(tiny("qwen2"))


def test_sequence_mode_ref_equal_policy_is_sft_and_weights_follow_ratio():
    model = apply_iwsft_to_model(tiny(), IWConfig(mode="sequence"), backend="torch")
    ids, mask, labels = batch()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, labels=labels,
                    return_logprobs_only=True).token_logprobs
    seq = model(input_ids=ids, attention_mask=mask, labels=labels, ref_logprobs=ref)
    sft = model(input_ids=ids, attention_mask=mask, labels=labels, iw_config=IWConfig(mode="sft"))
    torch.testing.assert_close(seq.seq_weights, torch.ones(3))
    torch.testing.assert_close(seq.loss, sft.loss)
    # shift the reference of row 1 down by 0.5 nats per token: its weight becomes e^0.5,
    # and quality multiplies per row
    ref2 = ref.clone()
    ref2[1] -= 0.5
    q = torch.tensor([1.0, 2.0, 0.0])
    out = model(input_ids=ids, attention_mask=mask, labels=labels, ref_logprobs=ref2, quality=q)
    torch.testing.assert_close(out.seq_weights, torch.tensor([1.0, 2 * 0.5 ** 0 * torch.e ** 0.5, 0.0]),
                               rtol=1e-4, atol=1e-5)
    # explicit global normaliser
    out2 = model(input_ids=ids, attention_mask=mask, labels=labels, ref_logprobs=ref,
                 num_items_in_batch=2 * int(seq.num_targets))
    torch.testing.assert_close(out2.loss, seq.loss / 2)


def test_shift_never_crosses_boundary():
    labels = torch.arange(10)[None]
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]])
    starts = sequence_starts(labels, position_ids=pos)
    assert starts.nonzero()[:, 1].tolist() == [0, 4, 7]
    shifted = shift_for_next_token(labels, starts, -100)
    assert shifted.tolist() == [[1, 2, 3, -100, 5, 6, -100, 8, 9, -100]]
    cu = torch.tensor([0, 4, 7, 10])
    assert torch.equal(sequence_starts(labels, cu_seqlens=cu), starts)


def test_packed_batch_matches_padded_batch():
    """Packing (one row, position_ids restarting, transformers' packed-SDPA masking) gives
    the same per-sequence log-probs, sequence weights and loss as a padded batch."""
    model = apply_iwsft_to_model(tiny(), IWConfig(mode="sequence"), backend="torch")
    ids, mask, labels = batch()
    lens = mask.sum(1).tolist()
    p_ids = torch.cat([ids[b, :n] for b, n in enumerate(lens)])[None]
    p_lab = torch.cat([labels[b, :n] for b, n in enumerate(lens)])[None]
    p_pos = torch.cat([torch.arange(n) for n in lens])[None]
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, labels=labels,
                    return_logprobs_only=True).token_logprobs - 0.1 * torch.arange(3)[:, None]
    p_ref = torch.cat([ref[b, :n] for b, n in enumerate(lens)])[None]
    q = torch.tensor([0.5, 1.0, 2.0])
    padded = model(input_ids=ids, attention_mask=mask, labels=labels, ref_logprobs=ref, quality=q)
    packed = model(input_ids=p_ids, position_ids=p_pos, labels=p_lab, ref_logprobs=p_ref,
                   quality=q)
    torch.testing.assert_close(packed.seq_weights, padded.seq_weights, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(packed.loss, padded.loss, rtol=1e-4, atol=1e-6)
    want = torch.cat([padded.token_logprobs[b, :n] for b, n in enumerate(lens)])
    torch.testing.assert_close(packed.token_logprobs[0], want, rtol=1e-4, atol=1e-5)
    # explicit cu_seqlens give the same result
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())
    packed2 = model(input_ids=p_ids, position_ids=p_pos, labels=p_lab, ref_logprobs=p_ref,
                    quality=q, cu_seqlens=cu)
    torch.testing.assert_close(packed2.loss, packed.loss)


def test_token_mode_and_bad_quality_length():
    model = apply_iwsft_to_model(tiny(), IWConfig(mode="token"), backend="torch")
    ids, mask, labels = batch()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, labels=labels,
                    return_logprobs_only=True).token_logprobs
    out = model(input_ids=ids, attention_mask=mask, labels=labels, ref_logprobs=ref)
    tgt = labels != -100
    tgt[:, 0] = False
    torch.testing.assert_close(out.token_weights[tgt], torch.ones(int(tgt.sum())))
    with pytest.raises(ValueError, match="quality"):
        model(input_ids=ids, attention_mask=mask, labels=labels, ref_logprobs=ref,
              quality=torch.ones(5))
    with pytest.raises(ValueError, match="ref_logprobs"):
        model(input_ids=ids, attention_mask=mask, labels=labels)


def test_autocast_bf16_runs():
    model = apply_iwsft_to_model(tiny(), IWConfig(mode="sft"), backend="torch")
    ids, mask, labels = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.lm_head.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("softcap", [None, 1.5])
def test_iw_outputs_entropy_top1_lse_aligned_with_labels(softcap):
    """iw_outputs=("entropy", "top1", "lse"): (B, T) like token_logprobs, from the model's own
    (transformed) next-token distribution; float64 oracle from the unpatched model's logits."""
    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(vocab_size=V, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=8, pad_token_id=0,
                                    final_logit_softcapping=softcap, bos_token_id=None,
                                    eos_token_id=None)
    ref_model = transformers.Gemma2ForCausalLM(cfg).float().eval()
    with torch.no_grad():  # peaked logits: the cap saturates
        ref_model.lm_head.weight.normal_(0, 3.0 / 32 ** 0.5)
    model = apply_iwsft_to_model(copy.deepcopy(ref_model), IWConfig(mode="sft"),
                                 backend="torch")
    ids, mask, labels = batch()
    # a label equal to the arg-max at some positions, so top1 is not all False
    with torch.no_grad():
        logits = ref_model.double()(input_ids=ids, attention_mask=mask).logits
    amax = logits.argmax(-1)
    labels[:, 5:8] = amax[:, 4:7]
    tgt = torch.zeros_like(labels, dtype=torch.bool)
    tgt[:, 1:] = labels[:, 1:] != -100
    z = logits[:, :-1]
    p = torch.softmax(z, -1)
    want_ent = -(p * torch.log_softmax(z, -1)).sum(-1)
    want_lse = torch.logsumexp(z, -1)
    want_top1 = z.gather(-1, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1) == z.max(-1).values

    out = model(input_ids=ids, attention_mask=mask, labels=labels,
                iw_outputs=("entropy", "top1", "lse"))
    assert out.entropy.shape == out.top1.shape == out.lse.shape == labels.shape
    assert out.top1.dtype == torch.bool and out.top1[tgt].any() and not out.top1[tgt].all()
    torch.testing.assert_close(out.entropy[:, 1:][tgt[:, 1:]].double(),
                               want_ent[tgt[:, 1:]], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.lse[:, 1:][tgt[:, 1:]].double(), want_lse[tgt[:, 1:]],
                               rtol=1e-5, atol=1e-5)
    assert torch.equal(out.top1[:, 1:][tgt[:, 1:]], want_top1[tgt[:, 1:]])
    assert (out.entropy[~tgt] == 0).all() and not out.top1[~tgt].any()
    # patch-level default, a single name, and the log-probs-only path
    apply_iwsft_to_model(model, IWConfig(mode="sft"), backend="torch", outputs="entropy")
    out2 = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out2.top1 is None and out2.lse is None
    torch.testing.assert_close(out2.entropy, out.entropy)
    lp = model(input_ids=ids, attention_mask=mask, labels=labels, return_logprobs_only=True,
               iw_outputs=("top1",))
    assert torch.equal(lp.top1, out.top1) and lp.entropy is None
    torch.testing.assert_close(lp.token_logprobs, out.token_logprobs)
    with pytest.raises(ValueError, match="subset"):
        model(input_ids=ids, attention_mask=mask, labels=labels, iw_outputs=("margin",))
