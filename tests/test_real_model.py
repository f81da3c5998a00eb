"""A real pretrained model end to end: SmolLM2-135M-Instruct (Llama, 30 layers, H = 576,
V = 49,152, tied embeddings of 28,311,552 > 2^24 elements; fixture `smollm2_dir` in conftest.py).

Data: the model's own greedy answers to a few prompts (generated once here), so the targets are
its arg-max tokens: peaked log-probs, the regime where a plain fp32 cross-entropy loses digits.

(a) the patched model (fused loss) against a float64 truth: a float64 copy of the model and a
    float64 log-softmax written here (-softplus(logsumexp_{j != y} z_j - z_y): exact as
    p_y -> 1, where float64 log_softmax is not); loss, token log-probs, gradients of the tied
    embedding / lm_head and of a few layers. transformers' own fp32 loss is measured the same
    way and recorded (``record_property``, printed with -s), not asserted.
(b) IWSFTTrainer, sequence mode, full and LoRA: built from the folder (its construction used to
    crash in weights_digest on the 28M-element embedding), reference pass checked against a
    plain forward, a few steps, the reference cache reused by a second trainer and refused for
    changed data.
(c) `iwsft-train --model <folder>` a few steps on a tiny JSONL, then (d) the saved final/ model
    loads with from_pretrained and generates the same greedy answer.
"""

import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("datasets")

from bench.real_model_exactness import f64_logprobs as f64_token_logprobs  # noqa: E402
from bench.real_model_exactness import greedy_batch  # noqa: E402
from iwsft_kernels import IWConfig  # noqa: E402
from iwsft_kernels.integrations import apply_iwsft_to_model, remove_iwsft_patch  # noqa: E402

for _k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_k, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROMPTS = ["What is the capital of France?", "Name three primary colors.",
           "What is 12 times 7?", "Write a haiku about the sea."]
NEW_TOKENS = 24
IGNORE = -100
# gradients checked against float64: the tied embedding (= lm_head) and a few layers
CHECKED = ["model.embed_tokens.weight", "model.norm.weight",
           "model.layers.29.mlp.down_proj.weight", "model.layers.15.self_attn.o_proj.weight",
           "model.layers.0.self_attn.q_proj.weight"]


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    """(folder, tokenizer, fp32 model, greedy answers, padded batch of prompt + answer tokens
    with labels on the answer tokens)."""
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    model.eval()  # no dropout anywhere; eval only for generate
    batch, answers = greedy_batch(model, tok, PROMPTS, NEW_TOKENS)
    assert all(answers), answers
    model.train()
    return {"dir": smollm2_dir, "tok": tok, "model": model, "answers": answers,
            "batch": batch}


def shifted(labels):
    """(positions of the hidden states that predict a target, the targets)."""
    y = labels[:, 1:]
    keep = y != IGNORE
    return keep, y[keep]


def rel(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm())


def grads_of(model, names):
    params = dict(model.named_parameters())
    return {n: params[n].grad.detach().double().clone() for n in names}


# ------------------------------------------------------------------ (a) float64 exactness
def test_patched_model_matches_float64_on_its_own_greedy_answers(smol, record_property):
    model, batch = smol["model"], smol["batch"]
    keep, y = shifted(batch["labels"])
    n_tgt = int(keep.sum())
    assert n_tgt >= 3 * NEW_TOKENS // 2

    # float64 truth: the whole model in float64, the loss written here
    m64 = copy.deepcopy(model).double()
    for n, p in m64.named_parameters():
        p.requires_grad_(n in CHECKED)
    h64 = m64.model(input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"]).last_hidden_state
    lp64 = f64_token_logprobs((h64[:, :-1][keep]) @ m64.lm_head.weight.T, y)
    loss64 = -lp64.sum() / n_tgt
    loss64.backward()
    g64 = grads_of(m64, CHECKED)
    lp64, loss64 = lp64.detach(), float(loss64.detach())
    del m64, h64
    one_minus_p = -torch.expm1(lp64)
    assert float(one_minus_p.min()) < 1e-3  # peaked: the model's own arg-max tokens

    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        for n, p in model.named_parameters():
            p.requires_grad_(n in CHECKED)
            p.grad = None
        # ours: the patched forward (fused loss, no logits)
        apply_iwsft_to_model(model, IWConfig(mode="sft"))
        out = model(**batch)
        out.loss.backward()
        ours_g, ours_loss = grads_of(model, CHECKED), float(out.loss.detach())
        ours_lp = out.token_logprobs[:, 1:][keep].double()
        remove_iwsft_patch(model)
        for p in model.parameters():
            p.grad = None
        # transformers' own loss (fp32 logits, fp32 cross-entropy)
        hf = model(**batch)
        hf.loss.backward()
        hf_g, hf_loss = grads_of(model, CHECKED), float(hf.loss.detach())
        hf_lp = torch.log_softmax(hf.logits[:, :-1][keep].detach().float(), -1).gather(
            1, y[:, None])[:, 0].double()
        # the same fp32 hidden states through a float64 head: what the loss itself controls
        with torch.no_grad():
            h32 = model.model(input_ids=batch["input_ids"],
                              attention_mask=batch["attention_mask"]).last_hidden_state
            lp_h = f64_token_logprobs(h32[:, :-1][keep].double()
                                      @ model.lm_head.weight.double().T, y)
    finally:
        remove_iwsft_patch(model)
        for n, p in model.named_parameters():
            p.requires_grad_(requires[n])
            p.grad = None

    figures = {
        "targets": n_tgt, "min_1_minus_p": float(one_minus_p.min()),
        "loss_rel_err_ours": abs(ours_loss - loss64) / loss64,
        "loss_rel_err_transformers": abs(hf_loss - loss64) / loss64,
        # per token, against the float64 head on the same hidden states
        "logp_max_rel_err_ours": float(((ours_lp - lp_h).abs() / lp_h.abs()).max()),
        "logp_max_rel_err_transformers": float(((hf_lp - lp_h).abs() / lp_h.abs()).max()),
        "logp_max_rel_err_ours_vs_float64_model": float(((ours_lp - lp64).abs()
                                                         / lp64.abs()).max()),
        "grad_rel_err_ours": {n: rel(ours_g[n], g64[n]) for n in CHECKED},
        "grad_rel_err_transformers": {n: rel(hf_g[n], g64[n]) for n in CHECKED},
    }
    for k, v in figures.items():
        record_property(k, v)
    print("\nSmolLM2-135M, float64 truth:", json.dumps(figures, indent=1))

    # the loss and the gradients of the whole model (the fp32 body's own rounding included)
    assert figures["loss_rel_err_ours"] < 2e-6, figures
    for n in CHECKED:
        assert figures["grad_rel_err_ours"][n] < 2e-5, (n, figures)
    # token log-probs: against the whole float64 model (body rounding included) and, tightly,
    # against the float64 head on the same hidden states (what the fused loss computes)
    assert figures["logp_max_rel_err_ours_vs_float64_model"] < 1e-3, figures
    assert figures["logp_max_rel_err_ours"] < 1e-4, figures


# ------------------------------------------------------------------ (b) IWSFTTrainer
def pairs_dataset(smol, answers=None):
    import datasets

    answers = smol["answers"] if answers is None else answers
    return datasets.Dataset.from_list([
        {"prompt": [{"role": "user", "content": p}],
         "completion": [{"role": "assistant", "content": a}]}
        for p, a in zip(PROMPTS, answers)])


def trl_args(tmp_path, **kw):
    from iwsft_kernels.integrations.trl import IWSFTConfig

    base = dict(output_dir=str(tmp_path / "out"), iw_mode="sequence", max_length=96,
                per_device_train_batch_size=2, per_device_eval_batch_size=2, max_steps=2,
                learning_rate=1e-4, max_grad_norm=0.0, bf16=False, use_cpu=True,
                report_to="none", logging_steps=1, save_strategy="no", seed=0,
                dataloader_num_workers=0, disable_tqdm=True,
                ref_cache_dir=str(tmp_path / "cache"), activation_checkpointing=False,
                dataloader_pin_memory=False)
    return IWSFTConfig(**(base | kw))


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_iwsft_trainer_on_smollm2(smol, tmp_path, lora):
    from iwsft_kernels.integrations.trl import REF_COLUMN, IWSFTTrainer, RefCacheMismatch

    peft_config = None
    if lora:
        peft = pytest.importorskip("peft")
        peft_config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                      target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    ds = pairs_dataset(smol)
    # built from the folder, like a user would (this construction used to raise IndexError in
    # weights_digest: the tied 49,152 x 576 embedding has more than 2^24 elements)
    tr = IWSFTTrainer(model=str(smol["dir"]), args=trl_args(tmp_path), train_dataset=ds,
                      peft_config=peft_config)
    assert tr.iw_reference["source"] == "computed"

    # the reference pass (the starting model) == a plain fp32 forward over the prepared rows
    model = smol["model"]
    for row in tr.train_dataset:
        ids = torch.tensor(row["input_ids"])[None]
        ref = torch.tensor(row[REF_COLUMN])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
        want = lp.gather(1, ids[0, 1:, None])[:, 0]
        tgt = torch.tensor(row["labels"][1:]) != IGNORE  # TRL's completion-only labels
        assert int(tgt.sum()) >= 3
        torch.testing.assert_close(ref[1:][tgt].double(), want[tgt], rtol=0, atol=2e-4)

    start = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    tr.train()
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert len(logs) == 2
    # step 1: the policy is the reference: log-ratio 0, every sequence weight 1
    assert abs(logs[0]["iw/log_ratio_mean"]) < 1e-4, logs[0]
    assert logs[0]["iw/weight_mean"] == pytest.approx(1.0, abs=1e-4)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    changed = {n for n, p in tr.model.named_parameters() if not torch.equal(p, start[n])}
    if lora:
        assert changed and all("lora_" in n for n in changed), sorted(changed)[:5]
    else:
        assert "model.embed_tokens.weight" in changed and len(changed) > 100

    # the cache: a second trainer over the same data reuses it (no reference pass) ...
    cache = str(tmp_path / "cache")
    again = IWSFTTrainer(model=str(smol["dir"]), train_dataset=ds, peft_config=peft_config,
                         args=trl_args(tmp_path / "again", ref_cache_dir=cache))
    assert again.iw_reference["source"] == "cache"
    assert again.train_dataset[REF_COLUMN] == tr.train_dataset[REF_COLUMN]
    # ... and refuses it for changed data
    changed_ds = pairs_dataset(smol, [smol["answers"][0] + " Really."] + smol["answers"][1:])
    with pytest.raises(RefCacheMismatch, match="data"):
        IWSFTTrainer(model=str(smol["dir"]), train_dataset=changed_ds, peft_config=peft_config,
                     args=trl_args(tmp_path / "changed", ref_cache_dir=cache))


# ------------------------------------------------------- (c) iwsft-train, (d) its final model
@pytest.fixture
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def test_iwsft_train_cli_then_generate_from_final(smol, tmp_path, fresh_accelerate_state):
    data = tmp_path / "tiny.jsonl"  # the `prompt` / `response` schema (docs/trainer.md)
    data.write_text("".join(json.dumps({"prompt": p, "response": a}) + "\n"
                            for p, a in zip(PROMPTS, smol["answers"])))
    out = tmp_path / "run"
    try:
        _cli_then_generate(smol, data, out)
    finally:  # ~2 GB (checkpoint with AdamW state, final model): not left in pytest's temp dirs
        import shutil

        shutil.rmtree(out, ignore_errors=True)


def _cli_then_generate(smol, data, out):
    from safetensors.torch import load_file

    from iwsft_kernels.trainer.cli import main

    assert main(["--model", str(smol["dir"]), "--data", str(data), "--max-steps", "2",
                 "--micro-batch-size", "2", "--grad-accum", "1", "--max-length", "96",
                 "--lr", "1e-5", "--warmup-ratio", "0", "--eval-examples", "2",
                 "--save-every", "0", "--log-with", "none", "--output-dir", str(out)]) == 0
    m = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in m] == [1, 2]
    assert m[0]["weight_mean"] == pytest.approx(1.0, abs=1e-5)  # policy == reference at step 1
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in m)
    assert (out / "ref_logprobs" / "complete").exists()

    # (d) the saved model: loads with from_pretrained, tied, trained, and still answers as the
    # starting model did (two small steps on its own greedy answers keep their arg-max tokens)
    final = out / "final"
    tok = transformers.AutoTokenizer.from_pretrained(final)
    model = transformers.AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    saved = load_file(str(final / "model.safetensors"))
    start = smol["model"].state_dict()
    assert not torch.equal(saved["model.embed_tokens.weight"], start["model.embed_tokens.weight"])
    enc = tok.apply_chat_template([{"role": "user", "content": PROMPTS[0]}],
                                  add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    with torch.no_grad():
        gen = model.generate(**enc, max_new_tokens=8, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    text = tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert text and smol["answers"][0].startswith(text), (text, smol["answers"][0])
