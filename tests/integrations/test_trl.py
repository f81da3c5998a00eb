"""IWSFTTrainer (TRL integration): step-1 loss and gradients against a naive float64 full-logits
implementation of the method (written here, independent of the package), TRL's own nll / dft
losses, gradient accumulation, the reference cache, LoRA, refusals.

Tiny random Qwen2 models over the bundled 741-token tokenizer; the reference model is a different
random model (peaked logits), so the importance weights are far from 1 and get clipped."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

for _k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_k, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")
import transformers  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from iwsft_kernels.integrations.trl import (  # noqa: E402
    REF_COLUMN,
    IWSFTConfig,
    IWSFTTrainer,
    RefCacheMismatch,
)

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "iwsft_kernels" / "trainer" / "assets"
ROWS = [json.loads(line) for line in (ASSETS / "s1k_tiny.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tok():
    return transformers.AutoTokenizer.from_pretrained(ASSETS / "tokenizer")


def tiny_qwen(tok, seed=0, tied=True, head_scale=None):
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
        max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=None)
    m = transformers.Qwen2ForCausalLM(cfg).float()
    if head_scale is not None:
        with torch.no_grad():
            m.lm_head.weight.mul_(head_scale)
    return m


@pytest.fixture(scope="module")
def ref_dir(tok, tmp_path_factory):
    """A reference model unlike the policy: untied, logits ~8x more peaked."""
    d = tmp_path_factory.mktemp("ref_model")
    tiny_qwen(tok, seed=123, tied=False, head_scale=8.0).save_pretrained(d)
    return str(d)


def dataset(n, long=False, start=0, messages=False):
    """Conversational prompt/completion (TRL masks the prompt: completion-only loss), or
    `messages` (with assistant_only_loss=True and a {% generation %} template: assistant-only)."""
    out = []
    for r in ROWS[start:start + n]:
        answer = r["deepseek_attempt"]
        if long:
            answer = f"<think>\n{r['deepseek_thinking_trajectory']}\n</think>\n\n{answer}"
        user = [{"role": "user", "content": r["question"]}]
        assistant = [{"role": "assistant", "content": answer}]
        row = {"messages": user + assistant} if messages else {"prompt": user,
                                                                "completion": assistant}
        out.append({**row, "quality": r["quality"]})
    return datasets.Dataset.from_list(out)


# the bundled template with {% generation %} markers around the assistant content, so that
# TRL's assistant_only_loss can find the assistant tokens
GENERATION_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}")


class StepOne(TrainerCallback):
    """Gradients just before the first optimizer step (after backward, nothing clipped)."""

    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
                          if p.grad is not None}


def recording(cls):
    class Recording(cls):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self.rec_inputs = getattr(self, "rec_inputs", [])
            self.rec_inputs.append({k: v.clone() if torch.is_tensor(v) else v
                                    for k, v in inputs.items()})
            res = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss = res[0] if isinstance(res, tuple) else res
            self.rec_losses = getattr(self, "rec_losses", []) + [loss.detach().clone()]
            return res
    return Recording


def common_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=4,
                learning_rate=1e-3, max_grad_norm=0.0, bf16=False, report_to="none",
                logging_steps=1, save_strategy="no", seed=0, dataloader_num_workers=0,
                disable_tqdm=True, ref_cache_dir=str(tmp_path / "cache"),
                activation_checkpointing=False,
                dataloader_pin_memory=False)  # CPU tests: nothing to pin to
    base.update(kw)
    return base


def run(trainer_cls, model, tok, ds, args, **kw):
    cb = StepOne()
    tr = recording(trainer_cls)(model=model, args=args, train_dataset=ds, processing_class=tok,
                                callbacks=[cb], **kw)
    tr.train()
    return tr, cb.grads


# --------------------------------------------------------------------------- the oracle
def naive_iwsft(policy, ref_model, batch, *, mode, T=1.0, w_min=None, w_max=None,
                length_normalize=True, self_normalize=False, quality=None, zero_ref=False):
    """The method's loss from full float64 logits (DESIGN §1), on a collated batch.
    Sequences: rows, or (padding-free) runs of position_ids starting at 0. Target of position t
    is labels[t + 1] when t + 1 is in the same sequence. D = number of targets.
    Returns (loss, weight of each target, weight of each unit: sequence or target token,
    unweighted mean NLL)."""
    ids, labels = batch["input_ids"], batch["labels"]
    if "position_ids" in batch:
        kw = {"position_ids": batch["position_ids"]}
        new_seq = batch["position_ids"] == 0
    else:
        kw = {"attention_mask": batch["attention_mask"]}
        new_seq = torch.zeros_like(labels, dtype=torch.bool)
    new_seq[:, 0] = True
    seq_id = new_seq.reshape(-1).long().cumsum(0).reshape(labels.shape) - 1
    y = torch.full_like(labels, -100)
    y[:, :-1] = labels[:, 1:]
    y[:, :-1][seq_id[:, 1:] != seq_id[:, :-1]] = -100
    m = y != -100

    def logp(model):
        h = model.get_decoder()(input_ids=ids, use_cache=False, **kw).last_hidden_state
        W = model.get_output_embeddings().weight
        lp = torch.log_softmax(h.double() @ W.double().T, dim=-1)
        return lp.gather(-1, y.clamp(min=0)[..., None])[..., 0][m]

    lp = logp(policy)
    with torch.no_grad():
        ref = torch.zeros_like(lp) if zero_ref else logp(ref_model)
    d = lp.detach() - ref
    seg = seq_id[m]
    lo = w_min if w_min is not None else {"token": 0.2, "sequence": 0.0, "sft": 0.0}[mode]
    hi = w_max if w_max is not None else {"token": 1.8, "sequence": 16.0, "sft": 1e30}[mode]
    if mode == "sft":
        w = torch.ones_like(d)
    elif mode == "token":
        w = torch.exp(T * d).clamp(lo, hi)
        if self_normalize:
            w = w / w.mean()
    else:
        segs = seg.unique()
        agg = torch.stack([d[seg == s].mean() if length_normalize else d[seg == s].sum()
                           for s in segs])
        ws = torch.exp(T * agg).clamp(lo, hi)
        if self_normalize:
            ws = ws / ws.mean()
        w = ws[torch.searchsorted(segs, seg)]
    if quality is not None:
        w = w * quality[seg]
    units = w if mode != "sequence" else ws * (1 if quality is None else quality[segs])
    loss = -(w * lp).sum() / m.sum()
    return loss, w, units, -lp.detach().mean()


def quality_of_sequences(batch, tok):
    """Quality of each sequence of the batch, found from its decoded question text."""
    pos = batch.get("position_ids")
    qs = []
    for b in range(batch["input_ids"].shape[0]):
        ids = batch["input_ids"][b]
        starts = [0] if pos is None else (pos[b] == 0).nonzero().squeeze(1).tolist()
        bounds = starts + [ids.numel()]
        for s, e in zip(bounds[:-1], bounds[1:]):
            text = tok.decode(ids[s:e])
            hit = [r["quality"] for r in ROWS if r["question"] in text]
            qs.append(hit[0] if hit else 0.0)  # padding tail: no targets
    return torch.tensor(qs, dtype=torch.float64)


def assert_grads_close(got, want, rtol=2e-4):
    assert set(got) == set(want), (set(got) ^ set(want))
    for n in want:
        g, w = got[n].double(), want[n].double()
        scale = w.abs().max().item() + 1e-12
        err = (g - w).abs().max().item()
        assert err <= rtol * scale, f"{n}: max err {err:.3e} vs scale {scale:.3e}"


# ------------------------------------------------------------------------------- tests
CASES = {
    # name: (iw args, packing, quality)
    "sequence-padded": (dict(iw_mode="sequence", activation_checkpointing=True), False, False),
    "sequence-packed-Q": (dict(iw_mode="sequence", iw_temperature=1.5), True, True),
    "token-padded-selfnorm-assistant": (dict(iw_mode="token", iw_self_normalize=True,
                                             assistant_only_loss=True), False, False),
    "token-packed": (dict(iw_mode="token"), True, False),
    "sftQ-padded": (dict(iw_mode="sft"), False, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_step1_matches_naive_full_logits(case, tok, ref_dir, tmp_path):
    iw, packing, use_q = CASES[case]
    policy = tiny_qwen(tok, seed=0)
    oracle_policy = copy.deepcopy(policy)
    ref = transformers.AutoModelForCausalLM.from_pretrained(ref_dir)
    # one batch holds all 8 examples; padded: lengths 100-157 tokens, so truncation and padding
    # both happen; packed: 8 short examples (~60 tokens) in rows of 128
    extra = dict(packing=True, max_length=128) if packing else dict(max_length=128)
    args = IWSFTConfig(**common_args(tmp_path, **iw, **extra, per_device_train_batch_size=8,
                                     quality_column="quality" if use_q else None,
                                     ref_model_name_or_path=ref_dir if iw["iw_mode"] != "sft"
                                     else None))
    assistant_only = iw.get("assistant_only_loss", False)
    if assistant_only:
        tok = copy.deepcopy(tok)
        tok.chat_template = GENERATION_TEMPLATE
    tr, grads = run(IWSFTTrainer, policy, tok, dataset(8, long=not packing,
                                                       messages=assistant_only), args)
    assert len(tr.rec_inputs) == 1
    if assistant_only:  # labels hold the assistant turns only, end-of-turn marker included
        row = tr.train_dataset[0]
        text = tok.decode([t for t, y in zip(row["input_ids"], row["labels"]) if y != -100])
        assert text.startswith("<think>") and "<|im_start|>" not in text
    batch = tr.rec_inputs[0]
    assert ("position_ids" in batch) == packing and ("attention_mask" in batch) != packing
    if packing:  # several examples share a packed row; the batch is one padding-free row
        assert len(tr.train_dataset) < 8 and int((batch["position_ids"] == 0).sum()) == 8
    else:  # truncation at max_length and right padding happened
        assert batch["input_ids"].shape == (8, 128) and bool((batch["attention_mask"] == 0).any())

    q = quality_of_sequences(batch, tok) if use_q else None
    loss, w, units, nll = naive_iwsft(oracle_policy, ref, batch, mode=iw["iw_mode"],
                          T=iw.get("iw_temperature", 1.0),
                          self_normalize=iw.get("iw_self_normalize", False), quality=q)
    if iw["iw_mode"] != "sft" or use_q:  # the weights really vary (a vacuous test would pass)
        assert w.std() > 0.05 * w.mean()
    if iw["iw_mode"] == "token":
        assert bool((w == w.max()).float().mean() > 0.01)  # some clipped at w_max
    loss.backward()
    torch.testing.assert_close(tr.rec_losses[0].double(), loss.detach(), rtol=1e-5, atol=1e-7)
    want = {n: p.grad for n, p in oracle_policy.named_parameters() if p.grad is not None}
    assert_grads_close(grads, want)
    # the logged weight statistics (units: sequences in sequence mode, else target tokens)
    logged = tr.state.log_history[0]
    assert "num_tokens" in logged and "loss" in logged
    assert abs(logged["iw/nll"] - float(nll)) < 1e-5 * float(nll)
    for k, v in {"iw/weight_mean": units.mean(), "iw/weight_min": units.min(),
                 "iw/weight_max": units.max(),
                 "iw/ess_fraction": units.sum() ** 2 / (units ** 2).sum() / units.numel()}.items():
        assert abs(logged[k] - float(v)) < 1e-4 * max(1.0, abs(float(v))), (k, logged[k], v)


def test_accumulation_and_data_parallel_give_the_one_batch_update(tok, ref_dir, tmp_path):
    """4 examples: one batch of 4 == 2 accumulation steps of 2 == 2 DDP ranks (gloo, CPU) of 2;
    the reference pass split over the 2 ranks gives the same values."""
    ds = dataset(4, long=True)
    out = {}
    for name, (bs, ga) in {"one": (4, 1), "two": (2, 2)}.items():
        args = IWSFTConfig(**common_args(tmp_path / name, iw_mode="sequence", max_length=80,
                                         per_device_train_batch_size=bs,
                                         gradient_accumulation_steps=ga,
                                         ref_model_name_or_path=ref_dir,
                                         ref_cache_dir=str(tmp_path / "cache")))
        tr, grads = run(IWSFTTrainer, tiny_qwen(tok, seed=0), tok, ds, args)
        out[name] = (sum(tr.rec_losses), grads, len(tr.rec_inputs), tr)
    assert out["one"][2] == 1 and out["two"][2] == 2
    torch.testing.assert_close(out["two"][0], out["one"][0], rtol=1e-5, atol=1e-7)
    assert_grads_close(out["two"][1], out["one"][1], rtol=1e-5)

    ddp_dir = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get(
        "PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(29500 + os.getpid() % 1000),
                        str(Path(__file__).parent / "trl_ddp_worker.py"), str(ddp_dir), ref_dir],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = torch.load(ddp_dir / "rank0.pt", weights_only=False)
    assert len(res["batches"]) == 4  # reference pass: 4 batches of 1, dealt to the 2 ranks
    assert res["ref"] == out["one"][3].train_dataset[REF_COLUMN]
    assert_grads_close(res["grads"], out["one"][1], rtol=1e-5)
    one_log = out["one"][3].state.log_history[0]
    assert abs(res["log"]["loss"] - one_log["loss"]) < 1e-5 * one_log["loss"]
    for k in ("iw/weight_mean", "iw/weight_max", "iw/ess_fraction", "num_tokens", "entropy",
              "mean_token_accuracy"):
        assert abs(res["log"][k] - one_log[k]) < 1e-5 * max(1.0, abs(one_log[k])), k


@pytest.mark.parametrize("loss_type", ["nll", "dft"])
def test_recipes_match_trl_own_losses(loss_type, tok, tmp_path):
    """SFT = mode 'sft' == TRL loss_type='nll'; DFT = token mode, zero reference, clip [0, 1]
    == TRL loss_type='dft'. Same model, same batch; eval loss = token NLL in both."""
    ds, eval_ds = dataset(8, long=True), dataset(4, long=True, start=40)
    ours_iw = dict(iw_mode="sft") if loss_type == "nll" else dict(
        iw_mode="token", iw_zero_reference=True, iw_w_min=0.0, iw_w_max=1.0)
    a_trl = trl.SFTConfig(**{k: v for k, v in common_args(tmp_path / "trl", max_length=96,
                                                           loss_type=loss_type).items()
                             if k != "ref_cache_dir"})
    a_iw = IWSFTConfig(**common_args(tmp_path / "iw", max_length=96), **ours_iw)
    t_trl, g_trl = run(trl.SFTTrainer, tiny_qwen(tok, seed=0), tok, ds, a_trl, eval_dataset=eval_ds)
    t_iw, g_iw = run(IWSFTTrainer, tiny_qwen(tok, seed=0), tok, ds, a_iw, eval_dataset=eval_ds)
    assert t_iw.iw_reference["source"] == ("zero" if loss_type == "dft" else None)
    assert torch.equal(t_trl.rec_inputs[0]["labels"], t_iw.rec_inputs[0]["labels"])
    torch.testing.assert_close(t_iw.rec_losses[0], t_trl.rec_losses[0], rtol=1e-5, atol=1e-7)
    assert_grads_close(g_iw, g_trl, rtol=1e-4)
    if loss_type == "nll":
        e_trl, e_iw = t_trl.evaluate()["eval_loss"], t_iw.evaluate()["eval_loss"]
        assert abs(e_trl - e_iw) < 1e-4 * abs(e_trl)


def test_reference_cache_reused_and_refused_on_changed_data(tok, tmp_path):
    def make(ds, out):
        args = IWSFTConfig(**common_args(tmp_path / out, iw_mode="sequence", max_length=64,
                                         ref_cache_dir=str(tmp_path / "cache")))
        return IWSFTTrainer(model=tiny_qwen(tok, seed=0), args=args, train_dataset=ds,
                            processing_class=tok)

    first = make(dataset(6), "a")
    assert first.iw_reference["source"] == "computed"
    second = make(dataset(6), "b")
    assert second.iw_reference["source"] == "cache"
    assert second.train_dataset["iw_ref_logprobs"] == first.train_dataset["iw_ref_logprobs"]
    # the reference log-probs sit on the label positions: 0 before the completion starts
    ex = second.train_dataset[0]
    lp = torch.tensor(ex["iw_ref_logprobs"])
    on = torch.tensor(ex["labels"]) != -100
    assert bool((lp[on] < 0).all())
    changed = dataset(6).map(lambda r, i: {"quality": r["quality"]} if i else {
        "completion": [{"role": "assistant", "content": "changed"}]}, with_indices=True)
    with pytest.raises(RefCacheMismatch, match="data"):
        make(changed, "c")
    with pytest.raises(RefCacheMismatch, match="ref_model"):  # another starting model
        IWSFTTrainer(model=tiny_qwen(tok, seed=5), processing_class=tok, train_dataset=dataset(6),
                     args=IWSFTConfig(**common_args(tmp_path / "d", max_length=64,
                                                    ref_cache_dir=str(tmp_path / "cache"))))


def test_lora_step1_matches_naive(tok, ref_dir, tmp_path):
    """LoRA on q/v plus a trainable copy of lm_head (modules_to_save): the loss finds the output
    embedding through PEFT's wrapper and trains the copy."""
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                           modules_to_save=["lm_head"], task_type="CAUSAL_LM")
    args = IWSFTConfig(**common_args(tmp_path, iw_mode="sequence", max_length=72,
                                     ref_model_name_or_path=ref_dir, activation_checkpointing=True))
    policy = tiny_qwen(tok, seed=0, tied=False)
    tr, grads = run(IWSFTTrainer, policy, tok, dataset(8, long=True), args, peft_config=lora)
    assert grads and all("lora_" in n or "modules_to_save" in n for n in grads)
    assert any("lm_head.modules_to_save" in n for n in grads)
    # the oracle: the same adapter model rebuilt from the step-1 state (B = 0 before the update)
    oracle = peft.get_peft_model(tiny_qwen(tok, seed=0, tied=False), copy.deepcopy(lora))
    state = {n: p for n, p in tr.model.state_dict().items()}
    for n, p in oracle.named_parameters():
        if "lora_A" in n:
            p.data.copy_(state[n])
    assert all(float(p.detach().abs().max()) == 0 for n, p in oracle.named_parameters() if "lora_B" in n)
    ref = transformers.AutoModelForCausalLM.from_pretrained(ref_dir)
    loss, w, _, _ = naive_iwsft(oracle.get_base_model(), ref, tr.rec_inputs[0], mode="sequence")
    assert w.std() > 0.05 * w.mean()
    loss.backward()
    torch.testing.assert_close(tr.rec_losses[0].double(), loss.detach(), rtol=1e-5, atol=1e-7)
    want = {n: p.grad for n, p in oracle.named_parameters() if p.grad is not None}
    assert_grads_close(grads, want)
    assert any(float(g.abs().max()) > 0 for n, g in grads.items() if "lora_B" in n)


def test_refusals(tok, tmp_path):
    a = common_args(tmp_path, max_length=64)
    with pytest.raises(ValueError, match="label_smoothing"):
        IWSFTConfig(**a, label_smoothing_factor=0.1)
    with pytest.raises(ValueError, match="DFT"):
        IWSFTConfig(**a, loss_type="dft")
    with pytest.raises(ValueError, match="mode"):
        IWSFTConfig(**a, iw_mode="tokens")
    with pytest.raises(ValueError, match="wrapped"):
        IWSFTConfig(**{**a, "max_length": 64}, packing=True, packing_strategy="wrapped")
    with pytest.raises(TypeError, match="IWSFTConfig"):
        IWSFTTrainer(model=tiny_qwen(tok), args=trl.SFTConfig(**{
            k: v for k, v in a.items() if k != "ref_cache_dir"}), train_dataset=dataset(2),
            processing_class=tok)
    with pytest.raises(ValueError, match="images"):
        IWSFTTrainer(model=tiny_qwen(tok), args=IWSFTConfig(**a), processing_class=tok,
                     train_dataset=datasets.Dataset.from_list([{"text": "x", "images": []}]))
    with pytest.raises(ValueError, match="compute_loss_func"):
        IWSFTTrainer(model=tiny_qwen(tok), args=IWSFTConfig(**a), train_dataset=dataset(2),
                     processing_class=tok, compute_loss_func=lambda *x, **k: 0)
    with pytest.raises(ValueError, match="quality_column"):
        IWSFTTrainer(model=tiny_qwen(tok), args=IWSFTConfig(**a, quality_column="grade"),
                     train_dataset=dataset(2), processing_class=tok)


def test_checkpointing_default_without_the_deprecated_name(tmp_path):
    """TRL's default (checkpointing on) without transformers 5's gradient_checkpointing
    FutureWarning; the old name still works, and warns as transformers means it to."""
    import warnings

    a = {k: v for k, v in common_args(tmp_path).items() if k != "activation_checkpointing"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        on = IWSFTConfig(**a)
        off = IWSFTConfig(**a, activation_checkpointing=False)
    assert (on.activation_checkpointing, on.gradient_checkpointing) == (True, True)
    assert (off.activation_checkpointing, off.gradient_checkpointing) == (False, False)
    assert trl.SFTConfig(**{k: v for k, v in a.items() if k != "ref_cache_dir"},
                         activation_checkpointing=False).activation_checkpointing is False
    with pytest.warns(FutureWarning, match="`gradient_checkpointing` is deprecated"):
        old = IWSFTConfig(**a, gradient_checkpointing=False)
    assert (old.activation_checkpointing, old.gradient_checkpointing) == (False, False)


def test_importing_integrations_does_not_need_trl(monkeypatch):
    """Only integrations/trl/ imports trl; without trl it fails with an install hint."""
    import ast
    import importlib

    for path in (ROOT / "iwsft_kernels" / "integrations").glob("*.py"):  # not trl/
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            assert not any(n == "trl" or n.startswith("trl.") for n in names), path
    monkeypatch.setitem(sys.modules, "trl", None)
    monkeypatch.delitem(sys.modules, "iwsft_kernels.integrations.trl")
    with pytest.raises(ImportError, match=r"iwsft-kernels\[trl\]"):
        importlib.import_module("iwsft_kernels.integrations.trl")


def test_example_script_runs(tmp_path):
    """examples/trl_iwsft.py on the bundled model (vocabulary 151,936) and data, shortened."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("trl_iwsft", ROOT / "examples" / "trl_iwsft.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    res = example.main(["--output-dir", str(tmp_path), "--max-steps", "1", "--max-examples", "8",
                        "--recipe", "sequence-q", "--max-length", "128"])
    assert res["steps"] == 1
    first = res["first"]
    # step 1: the policy is the reference, so the log-ratio is ~0 and w = quality
    assert abs(first["iw/log_ratio_mean"]) < 1e-4
    assert 0.1 < first["iw/weight_mean"] < 1.0 and first["iw/weight_max"] <= 0.9 + 1e-6
    assert 11.0 < first["iw/nll"] < 13.0  # ~ log(151936) = 11.93 for the random model
    # the trained model is saved and loads like any checkpoint
    saved = transformers.AutoModelForCausalLM.from_pretrained(res["saved"])
    assert saved.config.vocab_size == 151936
    assert transformers.AutoTokenizer.from_pretrained(res["saved"]).chat_template
