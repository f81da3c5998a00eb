"""`iwsft-train --zero-reference`: log q_ref = 0 for every token, no reference pass. With
--mode token --temperature 1 --w-min 0 --w-max 1 this is DFT (w = p_y, stop-grad):
loss = -sum_t sg(p_y,t) log p_y,t / D over the step's D target tokens."""

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from safetensors.torch import load_file  # noqa: E402

from iwsft_kernels.trainer import setup as setup_mod  # noqa: E402
from iwsft_kernels.trainer.cli import main  # noqa: E402
from iwsft_kernels.trainer.config import parse_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # tests/conftest.py

DFT = ["--mode", "token", "--temperature", "1", "--w-min", "0", "--w-max", "1"]
ARGS = DFT + ["--max-examples", "8", "--max-length", "96", "--micro-batch-size", "2",
              "--grad-accum", "2", "--max-steps", "2", "--eval-examples", "2",
              "--log-with", "none", "--warmup-ratio", "0", "--max-grad-norm", "0",
              "--report", "false", "--save-every", "1"]


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def dft_oracle(state, config, examples):
    """float64 DFT loss and gradients of the model `state` on `examples` (one step's global
    batch), each example on its own (no padding): -sum sg(p_y) log p_y / D."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model.load_state_dict(state)
    model = model.double()
    D = sum(ex.n_targets for ex in examples)
    total = torch.zeros((), dtype=torch.float64)
    for ex in examples:
        ids = torch.tensor(ex.input_ids)[None]
        logits = model(input_ids=ids).logits[0, :-1].double()
        y = torch.tensor(ex.labels[1:])
        keep = y != -100
        lp = torch.log_softmax(logits[keep], -1).gather(-1, y[keep, None])[:, 0]
        total = total - (lp.detach().exp() * lp).sum() / D
    total.backward()
    return float(total.detach()), {n: p.grad for n, p in model.named_parameters()}


def test_zero_reference_is_dft_and_writes_no_reference(tmp_path, monkeypatch, capsys):
    """Step 1's loss and every gradient == a float64 DFT oracle on the same batch (from the
    same starting weights); the 2-step run equals, parameter for parameter, the earlier
    workaround (the reference pass replaced by zeros, bench/repro/smollm2 before the flag);
    no reference pass runs and no reference file is written; --resume keeps the flag."""
    seen = {}
    real_start = setup_mod.resume_or_start

    def spy(r):  # the starting weights, step 1's batch, and its gradients before AdamW
        real_start(r)
        if "state" in seen:
            return
        seen["state"] = {k: v.detach().clone() for k, v in r.model.state_dict().items()}
        seen["config"], seen["examples"] = r.model.config, [r.examples[i]
                                                              for i in r.sampler.batch(0)]
        clip = r.acc.clip_grad_norm_  # called once per step, after the last backward

        def capture(*a, **kw):
            seen.setdefault("grads", {n: p.grad.detach().clone()
                                      for n, p in r.model.named_parameters()})
            return clip(*a, **kw)

        r.acc.clip_grad_norm_ = capture

    def no_pass(*a, **kw):
        raise AssertionError("--zero-reference ran the reference pass")

    monkeypatch.setattr(setup_mod, "resume_or_start", spy)
    monkeypatch.setattr(setup_mod, "compute_ref_logprobs", no_pass)
    a = tmp_path / "a"
    assert main(ARGS + ["--zero-reference", "--output-dir", str(a),
                        "--stop-after-steps", "1"]) == 0
    assert "no reference pass" in capsys.readouterr().out
    # --resume compares the run's options: without the flag it is another run, refused
    assert main(ARGS + ["--output-dir", str(a), "--resume"]) == 2
    assert "zero_reference: True -> False" in capsys.readouterr().err
    assert main(ARGS + ["--zero-reference", "--output-dir", str(a), "--resume"]) == 0
    assert json.loads((a / "run_config.json").read_text())["zero_reference"] is True
    assert not (a / "ref_logprobs").exists()
    assert not any("ref" in p.name for p in a.rglob("*")), sorted(a.rglob("*"))

    m = metrics(a)
    assert [r["step"] for r in m] == [1, 2]
    loss, grads = dft_oracle(seen["state"], seen["config"], seen["examples"])
    assert m[0]["loss"] == pytest.approx(loss, rel=1e-5)
    assert m[0]["weight_max"] <= 1.0 and m[0]["weight_min"] < 0.5  # w = p_y, not 1
    assert grads.keys() == seen["grads"].keys()
    for n, g in grads.items():
        got = seen["grads"][n].double()
        assert (got - g).norm() <= 1e-4 * g.norm() + 1e-12, n
    norm = torch.cat([g.flatten() for g in grads.values()]).norm()
    assert m[0]["grad_norm"] == pytest.approx(float(norm), rel=1e-4)

    # the earlier workaround: the same run with the reference pass replaced by zeros
    def zeros(accelerator, model, data, *a, **kw):
        return [torch.zeros(len(ex.input_ids), dtype=torch.float32) for ex in data.examples]

    monkeypatch.setattr(setup_mod, "compute_ref_logprobs", zeros)
    monkeypatch.setattr(setup_mod, "resume_or_start", real_start)
    b = tmp_path / "b"
    assert main(ARGS + ["--output-dir", str(b)]) == 0
    for ra, rb in zip(m, metrics(b)):  # a resumed vs an uninterrupted run: the same numbers
        for k in ("loss", "grad_norm", "weight_mean", "weight_min", "weight_max"):
            assert rb[k] == ra[k], k
    pa, pb = (load_file(str(d / "final" / "model.safetensors")) for d in (a, b))
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k
    assert any(not torch.equal(pa[k], seen["state"][k]) for k in pa)  # it trained


@pytest.mark.parametrize("extra, words", [
    (["--mode", "sft"], "--mode sft uses no reference"),
    (["--ref-model", "some/model"], "--zero-reference and --ref-model exclude each other"),
    (["--ref-cache", "ref"], "--zero-reference and --ref-cache exclude each other"),
])
def test_zero_reference_refusals(extra, words, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        parse_config(["--zero-reference", *extra])
    assert e.value.code == 2 and words in capsys.readouterr().err
    from iwsft_kernels.trainer.config import ConfigError, TrainConfig
    from iwsft_kernels.trainer.loop import train

    kw = {"mode": "sft"} if "sft" in extra else {extra[0][2:].replace("-", "_"): extra[1]}
    with pytest.raises(ConfigError, match=words):  # in-process train(cfg): refused before work
        train(TrainConfig(zero_reference=True, output_dir=str(tmp_path / "out"), **kw))
    assert not (tmp_path / "out").exists()
    cfg_file = tmp_path / "c.json"  # a config file is checked the same way
    cfg_file.write_text(json.dumps({"zero_reference": True}))
    with pytest.raises(SystemExit) as e:
        parse_config(["--config", str(cfg_file), *extra])
    assert e.value.code == 2 and words in capsys.readouterr().err


def test_zero_reference_flag_parses():
    cfg = parse_config(["--zero-reference", *DFT])
    assert cfg.zero_reference is True and cfg.ref_model is None and cfg.ref_cache is None
    assert parse_config([]).zero_reference is False
    assert parse_config(["--zero-reference", "false", "--mode", "sft"]).zero_reference is False
    assert parse_config(["--zero-reference", "--mode", "sequence"]).mode == "sequence"
