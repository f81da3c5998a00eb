"""IWSFTTrainer: which loss a forward computes does not depend on the model's train / eval mode
(training: iw-SFT, also in eval mode; evaluate(): the plain token NLL, docs/trl.md), and a
diverging run (absurd learning rate -> NaN) skips its non-finite steps, counts them, stops after
`max_nonfinite_steps` in a row and never saves a non-finite model (docs/trl.md, "Non-finite
steps")."""

import copy
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_trl import (  # noqa: E402
    IWSFTConfig,
    IWSFTTrainer,
    assert_grads_close,
    common_args,
    dataset,
    naive_iwsft,
    recording,
    ref_dir,  # noqa: F401 - fixture
    tiny_qwen,
    tok,  # noqa: F401 - fixture
    transformers,
)


def test_eval_mode_model_trains_on_iwsft_and_evaluate_reports_the_nll(tok, ref_dir,  # noqa: F811
                                                                      tmp_path):
    """A model put in eval mode (dropout off, for a deterministic forward) still gets the iw-SFT
    loss and its gradients from a training step's compute_loss; evaluate() gives the NLL."""
    policy = tiny_qwen(tok, seed=0)
    for m in policy.modules():  # dropout that only eval mode turns off
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.5
    oracle_policy = copy.deepcopy(policy).eval()
    args = IWSFTConfig(**common_args(tmp_path, iw_mode="sequence", max_length=72,
                                     ref_model_name_or_path=ref_dir,
                                     per_device_eval_batch_size=4))
    tr = recording(IWSFTTrainer)(model=policy, args=args, train_dataset=dataset(4, long=True),
                                 eval_dataset=dataset(3, long=True, start=40),
                                 processing_class=tok)
    batch = next(iter(tr.get_train_dataloader()))
    D = torch.tensor(int((batch["labels"][:, 1:] != -100).sum()))  # as Trainer counts it
    tr.model.eval()
    loss = tr.compute_loss(tr.model, batch, num_items_in_batch=D)
    loss.backward()

    ref = transformers.AutoModelForCausalLM.from_pretrained(ref_dir)
    want, w, _, nll = naive_iwsft(oracle_policy, ref, tr.rec_inputs[0], mode="sequence")
    assert w.std() > 0.05 * w.mean()
    assert abs(want.item() - nll.item()) > 0.05 * nll.item()  # iw-SFT is not the NLL here
    torch.testing.assert_close(loss.detach().double(), want.detach(), rtol=1e-5, atol=1e-7)
    want.backward()
    assert_grads_close({n: p.grad for n, p in policy.named_parameters() if p.grad is not None},
                       {n: p.grad for n, p in oracle_policy.named_parameters()
                        if p.grad is not None})

    ev = tr.evaluate()
    assert len(tr.rec_inputs) == 2  # one eval batch of the 3 examples
    eval_batch = tr.rec_inputs[1]
    with torch.no_grad():
        eval_nll = naive_iwsft(oracle_policy, None, eval_batch, mode="sft", zero_ref=True)[3]
        weighted = naive_iwsft(oracle_policy, ref, eval_batch, mode="sequence")[0]
    assert abs(weighted.item() - eval_nll.item()) > 0.05 * eval_nll.item()
    assert ev["eval_loss"] == pytest.approx(eval_nll.item(), rel=1e-5)


def test_nonfinite_steps_are_skipped_counted_and_stop_training(tok, tmp_path):  # noqa: F811
    """learning rate 1e9: the first update makes the weights ~1e9 and the forward overflows
    (NaN). Each non-finite step leaves the parameters as they were and is logged; the third in
    a row raises; checkpoints stop before the first one; save_model refuses a NaN parameter."""

    class Params(transformers.TrainerCallback):
        def __init__(self):
            self.after_step = []

        def on_step_end(self, args, state, control, model=None, **kw):
            self.after_step.append({n: p.detach().clone() for n, p in model.named_parameters()})

    cb = Params()
    out = tmp_path / "out"
    args = IWSFTConfig(**common_args(tmp_path, iw_mode="sequence", iw_zero_reference=True,
                                     max_length=64, max_steps=8, learning_rate=1e9,
                                     lr_scheduler_type="constant", per_device_train_batch_size=2,
                                     save_strategy="steps", save_steps=1))
    assert args.max_nonfinite_steps == 3
    tr = IWSFTTrainer(model=tiny_qwen(tok, seed=0), args=args, train_dataset=dataset(8),
                      processing_class=tok, callbacks=[cb])
    with pytest.raises(RuntimeError, match=r"diverged.*3 optimizer steps in a row"):
        tr.train()

    logs = [e for e in tr.state.log_history if "nonfinite_steps" in e]
    counts = [e["nonfinite_steps"] for e in logs]
    first = counts.index(1) + 1  # the first non-finite step
    assert 2 <= first <= 6 and counts == [0] * (first - 1) + [1, 2]
    assert all(math.isfinite(e["grad_norm"]) for e in logs[:first - 1])
    assert not math.isfinite(logs[first - 1]["grad_norm"])
    assert len(cb.after_step) == first + 1  # the third non-finite step raised before its end
    good = cb.after_step[first - 2]
    for skipped in cb.after_step[first - 1:]:  # no update: the parameters stayed as they were
        assert all(torch.equal(skipped[n], good[n]) for n in good)
    assert all(bool(torch.isfinite(p).all()) for p in good.values())
    # checkpoints: every step before the first non-finite one, none after; each one finite
    assert sorted(p.name for p in out.glob("checkpoint-*")) == \
        [f"checkpoint-{s}" for s in range(1, first)]
    saved = transformers.AutoModelForCausalLM.from_pretrained(out / f"checkpoint-{first - 1}")
    assert all(bool(torch.isfinite(p).all()) for p in saved.parameters())

    with torch.no_grad():
        tr.model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    with pytest.raises(RuntimeError, match=r"not saving.*layers\.1\.mlp\.up_proj\.weight"):
        tr.save_model(str(tmp_path / "final"))
    assert not (tmp_path / "final").exists()
    with pytest.raises(ValueError, match="max_nonfinite_steps"):
        IWSFTConfig(**common_args(tmp_path), max_nonfinite_steps=-1)
