"""`iwsft-train`'s entropy and token accuracy (train steps and eval), against a float64
full-logits oracle on the starting model; what goes to metrics.jsonl, summary.json and the
trackers; the last step's sequence weights; the report written at the end."""

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from iwsft_kernels import report  # noqa: E402
from iwsft_kernels.trainer.cli import main  # noqa: E402
from iwsft_kernels.trainer.config import ASSETS, parse_config  # noqa: E402
from iwsft_kernels.trainer.metrics import EVAL_KEYS  # noqa: E402

ARGS = ["--max-examples", "16", "--max-length", "96", "--micro-batch-size", "2",
        "--grad-accum", "2", "--max-steps", "2", "--eval-examples", "3", "--log-with", "none",
        "--warmup-ratio", "0", "--lr", "1e-2"]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # tests/conftest.py


def oracle(model, examples) -> dict:
    """Token-weighted mean entropy, accuracy (label = arg-max) and NLL from float64 logits,
    one example at a time (V = 151,936)."""
    ent = nll = 0.0
    correct = n = 0
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor(ex.input_ids)[None]
            y = torch.tensor(ex.labels[1:] + [-100])
            m = y != -100
            h = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state[0]
            z = h.double() @ model.get_output_embeddings().weight.double().T
            lp = torch.log_softmax(z, -1)
            ent += float(-(lp.exp() * lp).sum(-1)[m].sum())
            nll += float(-lp[m].gather(-1, y[m][:, None]).sum())
            correct += int((z.argmax(-1) == y)[m].sum())
            n += int(m.sum())
    return {"entropy": ent / n, "accuracy": correct / n, "nll": nll / n, "n": n}


def test_entropy_accuracy_match_float64_and_reach_every_output(tmp_path, monkeypatch, capsys):
    from accelerate import Accelerator

    logged = []
    monkeypatch.setattr(Accelerator, "log", lambda self, values, step=None, log_kwargs=None:
                        logged.append((step, dict(values))))
    out = tmp_path / "run"
    assert main(ARGS + ["--output-dir", str(out)]) == 0
    text = capsys.readouterr().out
    m = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    s = json.loads((out / "summary.json").read_text())
    assert [r["step"] for r in m] == [1, 2]

    # the oracle on the starting model: step 1's batch (4 examples, 2 micro-batches: the mean is
    # token-weighted over the step) and the eval set (first 3 examples) before training
    from iwsft_kernels.trainer.data import load_records, tokenize_dataset
    from iwsft_kernels.trainer.loop import load_model, load_tokenizer
    from iwsft_kernels.trainer.sampler import StepSampler

    cfg = parse_config(ARGS + ["--output-dir", str(tmp_path / "unused")])
    tok = load_tokenizer(cfg)
    data = tokenize_dataset(load_records(str(ASSETS / "s1k_tiny.jsonl")), tok,
                            max_length=cfg.max_length, max_examples=cfg.max_examples)
    model, _ = load_model(cfg.model, cfg)
    model.eval()
    step1 = [data.examples[i] for i in StepSampler(len(data.examples), 4, cfg.seed).batch(0)]
    want = oracle(model, step1)
    assert m[0]["target_tokens"] == want["n"]
    assert m[0]["logp_mean"] == pytest.approx(-want["nll"], rel=1e-5)  # same batch
    assert m[0]["entropy"] == pytest.approx(want["entropy"], rel=1e-5)
    assert m[0]["mean_token_accuracy"] == pytest.approx(want["accuracy"], abs=1e-12)
    ev = oracle(model, data.examples[:3])
    assert s["eval_loss_before"] == pytest.approx(ev["nll"], rel=1e-5)
    assert s["eval_entropy_before"] == pytest.approx(ev["entropy"], rel=1e-5)
    assert s["eval_mean_token_accuracy_before"] == pytest.approx(ev["accuracy"], abs=1e-12)

    # after training (the saved final model): the accuracy is far from 0, so not vacuous
    from transformers import AutoModelForCausalLM

    ev = oracle(AutoModelForCausalLM.from_pretrained(out / "final").eval(), data.examples[:3])
    assert s["eval_loss_after"] == pytest.approx(ev["nll"], rel=1e-5)
    assert s["eval_entropy_after"] == pytest.approx(ev["entropy"], rel=1e-5)
    assert s["eval_mean_token_accuracy_after"] == pytest.approx(ev["accuracy"], abs=1e-12)
    assert ev["accuracy"] > 0.02, ev

    # eval after the last step: on that step's line, in summary.json, and to the trackers
    assert not set(EVAL_KEYS) & set(m[0]) and set(EVAL_KEYS) <= set(m[1])
    for k in EVAL_KEYS:
        assert s[f"{k}_after"] == m[1][k]
    assert s["eval_loss_after"] < s["eval_loss_before"]
    steps = [st for st, _ in logged]
    assert steps == [0, 1, 2]
    assert logged[0][1] == {k: s[f"{k}_before"] for k in EVAL_KEYS}
    for (_, vals), line in zip(logged[1:], m):
        for k in ("entropy", "mean_token_accuracy", "loss", "weight_mean", "ess_fraction"):
            assert vals[k] == line[k], k
    assert set(EVAL_KEYS) <= set(logged[2][1])
    assert "entropy" in text and "token accuracy" in text

    # the last step's sequence weights: 4 examples, their mean is the step's weight_mean
    w = json.loads((out / report.WEIGHTS_FILE).read_text())
    assert (w["trainer"], w["step"], w["mode"], w["w_max"]) == ("iwsft-train", 2, "sequence", 16.0)
    assert len(w["weights"]) == 4
    assert sum(w["weights"]) / 4 == pytest.approx(m[1]["weight_mean"], rel=1e-6)
    assert min(w["weights"]) == pytest.approx(m[1]["weight_min"], rel=1e-6)

    # the report, written at the end by default and printed
    md = out / "report" / "report.md"
    assert f"report:     {md}" in text
    body = md.read_text()
    assert "trainer: iwsft-train, mode `sequence`" in body
    for v in (m[1]["entropy"], m[1]["mean_token_accuracy"], s["eval_entropy_after"],
              s["eval_mean_token_accuracy_before"], m[1]["weight_max"], -m[1]["logp_mean"]):
        assert report.fmt(v) in body, v
    for name in ("overview.png", "loss.png", "entropy_accuracy.png", "weights.png",
                 "ess_clip.png", "weights_hist.png"):
        assert (md.parent / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
