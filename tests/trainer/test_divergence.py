"""Non-finite steps and divergence in `iwsft-train` (guard.py): a NaN/inf loss or gradient norm
skips the step; N consecutive ones stop the run with exit status 3, no final/, the last good
checkpoint kept; --resume continues from it. Also the warmup schedule (step 1 has a nonzero
learning rate) and the run's first step kept across --resume."""

import json
import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from safetensors.torch import load_file  # noqa: E402

import iwsft_kernels.trainer.step as step_module  # noqa: E402
from iwsft_kernels.trainer.cli import main  # noqa: E402
from iwsft_kernels.trainer.guard import EXIT_DIVERGED  # noqa: E402
from iwsft_kernels.trainer.setup import lr_schedule, rescale_lr, warmup_cosine  # noqa: E402

SMALL = ["--max-examples", "8", "--max-length", "128", "--micro-batch-size", "2",
         "--grad-accum", "1", "--eval-examples", "2", "--log-with", "none", "--report", "false",
         "--warmup-ratio", "0"]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # tests/conftest.py


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def nan_grads_at(monkeypatch, steps):
    """accelerate's backward gets loss * NaN at these optimizer steps (1-based; one micro-batch
    per step): NaN gradients, a NaN gradient norm, a finite loss."""
    import accelerate

    real, calls = accelerate.Accelerator.backward, []

    def backward(self, loss, **kw):
        calls.append(1)
        return real(self, loss * float("nan") if len(calls) in steps else loss, **kw)

    monkeypatch.setattr(accelerate.Accelerator, "backward", backward)


def nan_loss_at(monkeypatch, steps):
    """The step's recorded loss is NaN at these steps (gradients finite): the loss check."""
    real, calls = step_module.micro_stats, []

    def micro_stats(out, batch, mode):
        calls.append(1)
        row = real(out, batch, mode)
        if len(calls) in steps:
            row[0] = float("nan")
        return row

    monkeypatch.setattr(step_module, "micro_stats", micro_stats)


def test_one_nan_step_is_skipped_and_training_goes_on(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    nan_grads_at(monkeypatch, {2})
    assert main(SMALL + ["--max-steps", "3", "--save-every", "1", "--keep-checkpoints", "0",
                         "--output-dir", str(out)]) == 0
    m = metrics(out)
    assert [r["nonfinite"] for r in m] == [False, True, False]
    assert [r["nonfinite_steps"] for r in m] == [0, 1, 1]
    assert math.isnan(m[1]["grad_norm"]) and math.isfinite(m[2]["grad_norm"])
    assert m[1]["lr"] > 0 and m[2]["lr"] < m[1]["lr"]  # the schedule advanced past step 2
    # no checkpoint of the skipped step; AdamW stepped twice in three steps
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000001",
                                                                       "step-0000003"]
    opt = torch.load(out / "checkpoints" / "step-0000003" / "optimizer.bin", weights_only=False)
    assert {float(s["step"]) for s in opt["state"].values()} == {2.0}
    final = load_file(str(out / "final" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in final.values())
    after1 = load_file(str(out / "checkpoints" / "step-0000001" / "model.safetensors"))
    assert any(not torch.equal(final[k], after1[k]) for k in final)  # step 3 did update
    s = json.loads((out / "summary.json").read_text())
    assert s["nonfinite_steps"] == 1 and "diverged" not in s
    assert "non-finite: 1 steps" in capsys.readouterr().out


def test_consecutive_nan_steps_stop_the_run_and_resume_continues(tmp_path, monkeypatch,
                                                                 capsys):
    args = SMALL + ["--max-steps", "4", "--save-every", "1", "--max-nonfinite-steps", "2",
                    "--ref-cache", str(tmp_path / "ref")]
    good, bad = tmp_path / "good", tmp_path / "bad"
    assert main(args + ["--output-dir", str(good)]) == 0
    capsys.readouterr()
    with monkeypatch.context() as mp:
        nan_loss_at(mp, {3, 4})
        assert main(args + ["--output-dir", str(bad)]) == EXIT_DIVERGED
    err = capsys.readouterr().err
    assert "training diverged at step 4: 2 consecutive non-finite steps" in err
    assert "last good checkpoint (step 2)" in err and "--resume" in err
    assert "Traceback" not in err
    assert not (bad / "final").exists()
    assert sorted(p.name for p in (bad / "checkpoints").iterdir()) == ["step-0000001",
                                                                       "step-0000002"]
    s = json.loads((bad / "summary.json").read_text())
    assert s["diverged"] and s["stopped_early"] and s["nonfinite_steps"] == 2 and s["steps"] == 4
    # the same command with --resume: from step 2, and (no NaN now) equal to the good run
    assert main(args + ["--output-dir", str(bad), "--resume"]) == 0
    assert "continuing from step 2" in capsys.readouterr().out
    mg, mb = metrics(good), metrics(bad)
    assert [r["step"] for r in mb] == [1, 2, 3, 4] and not any(r["nonfinite"] for r in mb)
    for rg, rb in zip(mg, mb):
        for k in ("loss", "grad_norm", "lr"):
            assert rb[k] == pytest.approx(rg[k], rel=1e-5, abs=1e-7), k
    pg, pb = (load_file(str(d / "final" / "model.safetensors")) for d in (good, bad))
    for k in pg:
        torch.testing.assert_close(pb[k], pg[k], rtol=1e-5, atol=1e-6)
    # the run's true first step in the summary after a resume
    sg, sb = (json.loads((d / "summary.json").read_text()) for d in (good, bad))
    assert sb["train_first_step"] == sg["train_first_step"] == 1
    assert sb["train_loss_first"] == pytest.approx(sg["train_loss_first"], rel=1e-6)


def test_absurd_learning_rate_stops_with_exit_3_and_no_final_model(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(SMALL + ["--lr", "1e9", "--max-steps", "6", "--save-every", "1",
                         "--max-nonfinite-steps", "0", "--output-dir", str(out)]) == EXIT_DIVERGED
    err = capsys.readouterr().err
    assert "training diverged at step" in err and "1 consecutive non-finite steps" in err
    assert "No final model was saved" in err and "lower --lr" in err
    assert not (out / "final").exists()
    m = metrics(out)
    assert m[-1]["nonfinite"] and len(m) < 6 and not any(r["nonfinite"] for r in m[:-1])
    cks = sorted((out / "checkpoints").iterdir())
    assert cks and cks[-1].name == f"step-{len(m) - 1:07d}"  # the last finite step's
    for t in load_file(str(cks[-1] / "model.safetensors")).values():
        assert torch.isfinite(t).all()
    assert json.loads((out / "summary.json").read_text())["diverged"]


def test_warmup_never_uses_a_zero_learning_rate():
    assert [warmup_cosine(s, 3, 10) for s in range(3)] == [0.25, 0.5, 0.75]
    assert warmup_cosine(3, 3, 10) == 1.0  # the peak right after the warmup
    assert warmup_cosine(9, 3, 10) > 0 and warmup_cosine(0, 0, 1) == 1.0
    lam = [warmup_cosine(s, 3, 10) for s in range(3, 10)]
    assert lam == sorted(lam, reverse=True)  # cosine decay
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=0.1)
    sched = lr_schedule(opt, 1, 4)
    opt.step(), sched.step()
    state = sched.state_dict()
    sched2 = lr_schedule(torch.optim.AdamW([p], lr=0.1), 1, 4)
    sched2.load_state_dict(state)  # what --resume does; then --lr 0.01
    rescale_lr(sched2, 0.01)
    assert sched2.get_last_lr()[0] == pytest.approx(0.01 * warmup_cosine(1, 1, 4))
    assert sched2.optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
    sched2.optimizer.step(), sched2.step()
    assert sched2.get_last_lr()[0] == pytest.approx(0.01 * warmup_cosine(2, 1, 4))


def test_one_step_with_warmup_updates_the_model(tmp_path):
    out = tmp_path / "run"
    args = [a for a in SMALL if a not in ("--warmup-ratio", "0")]  # default warmup 0.05
    assert main(args + ["--max-steps", "1", "--mode", "sft", "--output-dir", str(out)]) == 0
    m = metrics(out)
    assert m[0]["lr"] == pytest.approx(1e-3 / 2)  # warmup 1 step: lr * 1 / (1 + 1)
    s = json.loads((out / "summary.json").read_text())
    assert s["eval_loss_after"] < s["eval_loss_before"]
