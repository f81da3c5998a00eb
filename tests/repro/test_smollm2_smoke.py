"""The SmolLM2 rejection-sampling experiment (bench/repro/smollm2/run.py) at its smallest, on a
tiny random-init Llama with the trainer's bundled 741-token tokenizer instead of SmolLM2-135M
(seconds, no model download): a pipeline test, not a claim about the outcome. A random model
never writes "The answer is N" correctly, so the pipeline test accepts every sample (the
checker itself is tested on its own). Checks: the task's splits and checker, curated data in
the trainer's `messages` format with the sampled responses, the trainer ran in every mode,
iw-SFT's reference is the starting model (log-ratio 0 and weights 1 at the first step), DFT's
reference is 0 (log-ratio = log p_θ, weights = p_y <= 1), and the result files."""

import json
import math
import random
import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.repro.smollm2 import run, task  # noqa: E402

ASSETS = Path(__file__).resolve().parents[2] / "iwsft_kernels" / "trainer" / "assets"


def test_task_splits_and_checker():
    test, train = task.splits(0, 50, 80)
    assert len(test) == 50 and len(train) == 80
    assert not {p.text for p in test} & {p.text for p in train}
    assert task.splits(0, 50, 80) == (test, train)  # a fixed seed gives the same problems
    rng = random.Random(1)
    for _ in range(300):
        p = task.make_problem(rng)
        assert p.answer >= 1 and p.op in "+-"
        assert task.check(p, f"x = {p.answer}. The answer is {p.answer}.")
        assert not task.check(p, f"The answer is {p.answer + 1}.")
        assert not task.check(p, f"{p.answer}")  # no answer sentence
        # the first answer sentence counts, not a later one
        assert not task.check(p, f"The answer is {p.answer + 2}. The answer is {p.answer}.")
    assert task.cut("4 + 3 = 7. The answer is 7. And more") == "4 + 3 = 7. The answer is 7."
    assert task.cut("The answer is 12\nnext") == "The answer is 12"
    assert task.cut("The answer is 12") == "The answer is 12"  # no terminator: kept whole
    assert task.STOP.search("The answer is 1") is None  # "1" may become "12": not complete
    assert task.parse("The answer is -3.") == -3 and task.parse("no answer") is None
    with pytest.raises(ValueError, match="n_test"):
        task.splits(0, -1, 5)


def _tiny_model(path: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(ASSETS / "tokenizer")
    cfg = LlamaConfig(vocab_size=((len(tok) + 7) // 8) * 8, hidden_size=16,
                      intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, tie_word_embeddings=True, bos_token_id=None,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      max_position_embeddings=1024)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    for f in (ASSETS / "tokenizer").iterdir():
        shutil.copy(f, path / f.name)
    return path


def test_rft_pipeline_tiny(tmp_path, monkeypatch):
    model = _tiny_model(tmp_path / "tiny-llama")
    monkeypatch.setattr(task, "check", lambda p, r: True)  # see the module docstring
    sc = run.Scale(n_test=4, n_train=4, k=2, n_curated=6, epochs=1, batch=3, lr=1e-3,
                   seeds=(0,), methods=("SFT", "iw-SFT (sequence)", "iw-SFT (token)", "DFT"),
                   gen_batch=4, max_new_tokens=5, sample_shards=2, max_length=512)
    res = run.run(sc, tmp_path / "work", tmp_path / "results", "smoke", True, str(model), jobs=1)

    cur = res["curation"]
    assert cur["samples"] == 8 and cur["kept"] == 8 and cur["per_seed"]["0"]["n"] == 6
    _, train = task.splits(sc.task_seed, sc.n_test, sc.n_train)
    rows = [json.loads(x) for x in
            (tmp_path / "work" / "seed0" / "curated.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    sampled = {r["response"] for s in range(2) for r in json.loads(
        (tmp_path / "work" / "units" / f"sample-{s}.json").read_text())["rows"]}
    prompts = {json.dumps(task.messages(p)) for p in train}
    for r in rows:
        assert json.dumps(r["messages"][:-1]) in prompts
        assert r["messages"][-1]["role"] == "assistant" and r["messages"][-1]["content"] in sampled

    runs = res["runs"]["0"]
    assert set(runs) == set(sc.methods)
    for m, r in runs.items():
        s = r["series"]
        assert r["steps"] == 2 and len(s["loss"]) == 2 and 0.0 <= r["accuracy"] <= 1.0
        assert all(math.isfinite(x) for x in s["loss"] + s["logp_mean"])
    for m in ("iw-SFT (sequence)", "iw-SFT (token)"):  # reference = the starting model
        s = runs[m]["series"]
        assert abs(s["log_ratio_mean"][0]) < 1e-4, m
        assert abs(s["weight_mean"][0] - 1.0) < 1e-3 and abs(s["weight_max"][0] - 1.0) < 1e-3
    d = runs["DFT"]["series"]  # reference 0: log-ratio = log p_θ, weights = p_y in [0, 1]
    for t in range(2):
        assert abs(d["log_ratio_mean"][t] - d["logp_mean"][t]) < 1e-4
        assert 0.0 <= d["weight_min"][t] <= d["weight_max"][t] <= 1.0
    assert d["weight_max"][0] < 0.05  # a random model puts ~1/744 on each target token
    assert (tmp_path / "work" / "seed0" / "ref_logprobs" / "complete").exists()
    assert not (tmp_path / "work" / "seed0" / "dft" / "ref_logprobs").exists()
    for ext in ("json", "md", "png"):
        assert (tmp_path / "results" / f"smoke.{ext}").stat().st_size > 0
    assert "| DFT |" in (tmp_path / "results" / "smoke.md").read_text()
    # a finished unit is not redone: a rerun only rebuilds the report
    again = run.run(sc, tmp_path / "work", tmp_path / "results", "smoke", True, str(model),
                    jobs=1)
    assert again["runs"]["0"]["DFT"]["series"] == d
