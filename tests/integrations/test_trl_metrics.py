"""IWSFTTrainer logs TRL's `entropy`, `mean_token_accuracy` and `num_tokens` exactly like
SFTTrainer 1.16 (same names, same reduction over accumulation steps, same eval_ prefix), the
values equal a float64 full-logits oracle, the last step's sequence weights are recorded, and
`python -m iwsft_kernels.report` renders the TRL output folder.

The starting model is a tiny Qwen2 trained for a few steps (so the token accuracy is far from
0 and the entropy far from log V: a random model would make the accuracy check vacuous)."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_trl import (  # noqa: E402
    ROWS,
    IWSFTConfig,
    IWSFTTrainer,
    common_args,
    dataset,
    naive_iwsft,
    recording,
    tiny_qwen,
    tok,  # noqa: F401 - fixture
    transformers,
    trl,
)

from iwsft_kernels import report  # noqa: E402

TOKEN_KEYS = ("entropy", "mean_token_accuracy", "num_tokens")


@pytest.fixture(scope="module")
def warm_dir(tok, tmp_path_factory):  # noqa: F811
    """tiny_qwen(seed=0) after 40 plain next-token steps on the chat-formatted examples the
    test uses (rows 0-7 and 40-42), so that it predicts a fair share of their tokens."""
    torch.manual_seed(0)
    model = tiny_qwen(tok, seed=0)
    ids = []
    for r in ROWS[:8] + ROWS[40:43]:
        answer = f"<think>\n{r['deepseek_thinking_trajectory']}\n</think>\n\n" \
                 f"{r['deepseek_attempt']}"
        text = tok.apply_chat_template([{"role": "user", "content": r["question"]},
                                        {"role": "assistant", "content": answer}], tokenize=False)
        ids.append(torch.tensor(tok(text).input_ids[:128]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(40):
        x = ids[step % len(ids)][None]
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    d = tmp_path_factory.mktemp("warm_model")
    model.save_pretrained(d)
    return str(d)


def oracle_ratios(model, batch) -> tuple[float, float, int]:
    """(mean entropy, token accuracy, targets) of one micro-batch from float64 full logits;
    the target of position t is labels[t + 1] within the same sequence."""
    ids, labels = batch["input_ids"], batch["labels"]
    if "position_ids" in batch:
        kw = {"position_ids": batch["position_ids"]}
        new_seq = batch["position_ids"] == 0
    else:
        kw = {"attention_mask": batch["attention_mask"]}
        new_seq = torch.zeros_like(labels, dtype=torch.bool)
    new_seq[:, 0] = True
    seq_id = new_seq.reshape(-1).long().cumsum(0).reshape(labels.shape)
    y = torch.full_like(labels, -100)
    y[:, :-1] = labels[:, 1:]
    y[:, :-1][seq_id[:, 1:] != seq_id[:, :-1]] = -100
    m = y != -100
    with torch.no_grad():
        h = model.get_decoder()(input_ids=ids, use_cache=False, **kw).last_hidden_state
        z = h.double() @ model.get_output_embeddings().weight.double().T
    lp = torch.log_softmax(z, -1)
    ent = -(lp.exp() * lp).sum(-1)[m]
    correct = (z.argmax(-1) == y)[m]
    n = int(m.sum())
    return float(ent.sum()) / n, float(correct.double().sum()) / n, n


def _train_logs(tr):
    return [e for e in tr.state.log_history if "loss" in e]


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_token_metrics_match_sfttrainer_and_oracle(packing, tok, warm_dir, tmp_path):  # noqa: F811
    """Same model, same batches: eval (3 examples in batches of 2 -> two unequal batches) before
    training, then one optimizer step of 2 accumulated micro-batches. IWSFTTrainer runs
    iw-SFT (sequence mode, zero reference: w_s = geometric mean of p over the sequence); the entropy and accuracy of step 1
    do not depend on the loss, so they must equal SFTTrainer's."""
    extra = dict(packing=True, max_length=128, per_device_train_batch_size=1) if packing else \
        dict(max_length=80, per_device_train_batch_size=2)
    base = common_args(tmp_path, gradient_accumulation_steps=2, per_device_eval_batch_size=2,
                       **extra)
    ds = dataset(8 if packing else 4, long=not packing)
    eval_ds = dataset(3, long=True, start=40)
    runs = {}
    for name, cls, args in (
            ("sft", trl.SFTConfig, {k: v for k, v in base.items() if k != "ref_cache_dir"}),
            ("iw", IWSFTConfig, dict(base, iw_mode="sequence", iw_zero_reference=True,
                                     output_dir=str(tmp_path / "iw_out")))):
        trainer_cls = trl.SFTTrainer if name == "sft" else IWSFTTrainer
        model = transformers.AutoModelForCausalLM.from_pretrained(warm_dir)
        tr = recording(trainer_cls)(model=model, args=cls(**args), train_dataset=ds,
                                    eval_dataset=eval_ds, processing_class=tok)
        ev = tr.evaluate()
        tr.train()
        runs[name] = (tr, ev)
    (t_sft, e_sft), (t_iw, e_iw) = runs["sft"], runs["iw"]
    assert len(t_sft.rec_inputs) == len(t_iw.rec_inputs) == 4  # 2 eval + 2 train micro-batches
    for a, b in zip(t_sft.rec_inputs, t_iw.rec_inputs):
        assert torch.equal(a["labels"], b["labels"])

    # eval: same keys with the eval_ prefix, same values
    for k in TOKEN_KEYS:
        assert f"eval_{k}" in e_sft and f"eval_{k}" in e_iw, k
        assert e_iw[f"eval_{k}"] == pytest.approx(e_sft[f"eval_{k}"], rel=1e-5, abs=1e-7), k
    # train: every key SFTTrainer logs is logged, the token metrics with SFTTrainer's values
    (l_sft,), (l_iw,) = _train_logs(t_sft), _train_logs(t_iw)
    assert set(l_sft) <= set(l_iw), set(l_sft) - set(l_iw)
    assert {"iw/weight_mean", "iw/ess_fraction", "iw/nll"} <= set(l_iw)
    for k in TOKEN_KEYS:
        assert l_iw[k] == pytest.approx(l_sft[k], rel=1e-5, abs=1e-7), k

    # the oracle: the starting model over the recorded micro-batches; SFTTrainer's reduction is
    # the mean over micro-batches of (sum over the batch's targets) / (their count)
    start = transformers.AutoModelForCausalLM.from_pretrained(warm_dir).eval()
    ev_r = [oracle_ratios(start, b) for b in t_iw.rec_inputs[:2]]
    tr_r = [oracle_ratios(start, b) for b in t_iw.rec_inputs[2:]]
    assert ev_r[0][2] != ev_r[1][2]  # unequal batches: a token-weighted mean would differ
    for got, ratios in ((e_iw, ev_r), (l_iw, tr_r)):
        pre = "eval_" if got is e_iw else ""
        want_e = sum(r[0] for r in ratios) / 2
        want_a = sum(r[1] for r in ratios) / 2
        assert got[pre + "entropy"] == pytest.approx(want_e, rel=2e-5), pre
        assert got[pre + "mean_token_accuracy"] == pytest.approx(want_a, rel=1e-6), pre
    assert 0.1 < l_iw["mean_token_accuracy"] < 0.95  # not a vacuous check
    assert 0.1 < l_iw["entropy"] < 6.0  # log V = 6.6 for a random model

    # the last step's sequence weights: OUTPUT_DIR/last_step_weights.json, equal to the oracle's
    out = Path(t_iw.args.output_dir)
    doc = json.loads((out / report.WEIGHTS_FILE).read_text())
    assert doc["trainer"] == "trl" and doc["step"] == 1 and doc["mode"] == "sequence"
    assert (doc["w_min"], doc["w_max"]) == (0.0, 16.0)
    want = torch.cat([naive_iwsft(start, None, b, mode="sequence", zero_ref=True)[2].detach()
                      for b in t_iw.rec_inputs[2:]])
    assert len(doc["weights"]) == want.numel() >= 4
    torch.testing.assert_close(torch.tensor(sorted(doc["weights"]), dtype=torch.float64),
                               want.sort().values, rtol=1e-4, atol=1e-6)
    assert want.std() > 0.05 * want.mean()

    # the report renders TRL's folder (trainer_state.json written by save_state; train() starts
    # a fresh log_history, so evaluate again to have an eval entry in it)
    e_after = t_iw.evaluate()
    t_iw.save_state()
    md = report.write_report(out)
    text = md.read_text()
    assert "trainer: trl, mode `sequence`" in text
    for k in ("entropy", "mean_token_accuracy", "iw/weight_mean", "iw/nll"):
        assert report.fmt(l_iw[k]) in text, k
    assert report.fmt(e_after["eval_entropy"]) in text
    assert report.fmt(e_after["eval_mean_token_accuracy"]) in text
    assert report.fmt(max(doc["weights"])) in text  # the last step's max weight
    for name in ("overview.png", "loss.png", "entropy_accuracy.png", "weights_hist.png"):
        assert (md.parent / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
