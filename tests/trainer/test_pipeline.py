"""The whole `iwsft-train` pipeline on the embedded default (tiny random Qwen2 with the real
151,936 vocabulary, shipped s1K-style data and tokenizer), with small settings."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from safetensors.torch import load_file  # noqa: E402

from iwsft_kernels.trainer.cli import main  # noqa: E402

SMALL = ["--max-examples", "16", "--max-length", "160", "--micro-batch-size", "2",
         "--eval-examples", "4", "--log-with", "none", "--warmup-ratio", "0"]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # tests/conftest.py


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def params(out):
    return load_file(str(out / "final" / "model.safetensors"))


def test_default_pipeline_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(SMALL + ["--grad-accum", "2", "--epochs", "1", "--output-dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert "eval loss" in text and "tokens/s" in text and "peak mem" in text
    m = metrics(out)
    assert [r["step"] for r in m] == [1, 2, 3, 4]  # 16 examples / global batch 4
    for k in ("loss", "logp_mean", "weight_mean", "weight_min", "weight_max", "ess_fraction",
              "clip_frac_max", "clip_frac_min", "lr", "grad_norm", "tokens_per_s",
              "peak_mem_gib"):
        assert k in m[0]
    assert m[0]["weight_mean"] == pytest.approx(1.0, abs=1e-5)  # policy == reference at step 1
    assert m[-1]["weight_mean"] != pytest.approx(1.0, abs=1e-5)  # ... not after updates
    s = json.loads((out / "summary.json").read_text())
    assert s["eval_loss_after"] < s["eval_loss_before"]
    assert (out / "final" / "config.json").exists() and (out / "final" / "tokenizer.json").exists()
    cks = sorted(p.name for p in (out / "checkpoints").iterdir())
    # default checkpointing: every step of this 4-step run (about 8 per run), the newest 2 kept;
    # atomic rename: no temp folder left behind
    assert cks == ["step-0000003", "step-0000004"]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert model.config.vocab_size == 151936
    assert (out / "ref_logprobs" / "complete").exists()


def test_resume_equals_uninterrupted(tmp_path):
    args = SMALL + ["--grad-accum", "2", "--max-steps", "4", "--save-every", "2",
                    "--sampling", "quality", "--quality-weight", "--ref-cache",
                    str(tmp_path / "ref")]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(args + ["--output-dir", str(a)]) == 0
    assert main(args + ["--output-dir", str(b), "--stop-after-steps", "2"]) == 0
    assert not (b / "final").exists() and (b / "checkpoints" / "step-0000002").exists()
    assert main(args + ["--output-dir", str(b), "--resume"]) == 0
    ma, mb = metrics(a), metrics(b)
    assert [r["step"] for r in mb] == [1, 2, 3, 4]
    for ra, rb in zip(ma, mb):
        for k in ("loss", "grad_norm", "lr", "weight_mean"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-7), k
    pa, pb = params(a), params(b)
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], rtol=1e-5, atol=1e-6)


def test_two_process_gloo_equals_single_process(tmp_path):
    """Same global batch of 4: one process x 2 accumulation steps vs two processes x 1."""
    args = SMALL + ["--max-steps", "2", "--ref-batch-size", "4"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(args + ["--grad-accum", "2", "--output-dir", str(one)]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", "2", "-m", "iwsft_kernels.trainer.cli", *args, "--grad-accum",
           "1", "--output-dir", str(two)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m1, m2 = metrics(one), metrics(two)
    assert len(m1) == len(m2) == 2
    for r1, r2 in zip(m1, m2):
        assert r2["target_tokens"] == r1["target_tokens"]
        for k in ("loss", "grad_norm", "weight_mean", "weight_max", "entropy",
                  "mean_token_accuracy"):
            assert r2[k] == pytest.approx(r1[k], rel=1e-5), k
    for k in ("eval_loss", "eval_entropy", "eval_mean_token_accuracy"):  # after the last step
        assert m2[1][k] == pytest.approx(m1[1][k], rel=1e-5), k
    assert m1[1]["weight_max"] != pytest.approx(1.0, abs=1e-6)  # step 2 is really weighted
    # the last step's sequence weights: gathered from both ranks
    w1, w2 = (json.loads((d / "last_step_weights.json").read_text()) for d in (one, two))
    assert len(w1["weights"]) == len(w2["weights"]) == 4 and w2["step"] == 2
    assert sorted(w2["weights"]) == pytest.approx(sorted(w1["weights"]), rel=1e-5)
    p1, p2 = params(one), params(two)
    for k in p1:
        torch.testing.assert_close(p2[k], p1[k], rtol=1e-5, atol=1e-6)


def test_bad_inputs_exit_with_clear_message(tmp_path, capsys):
    out = str(tmp_path / "x")
    assert main(SMALL + ["--model", str(tmp_path / "no-such-model"), "--output-dir", out]) == 2
    assert "model path does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "response": "b", "quality": -1.0}) + "\n")
    # the quality column is checked when the run uses it (here: --quality-weight)
    assert main(SMALL + ["--data", str(bad), "--quality-weight", "--output-dir", out]) == 2
    assert "must be finite and >= 0" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(SMALL + ["--data", str(empty), "--output-dir", out]) == 2
    assert "empty" in capsys.readouterr().err
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"question": "q", "deepseek_attempt": "a"}) + "\n")
    assert main(SMALL + ["--data", str(missing), "--output-dir", out]) == 2
    assert "deepseek_thinking_trajectory" in capsys.readouterr().err


def test_ref_cache_mismatch_refused_by_cli(tmp_path, capsys):
    args = SMALL + ["--max-examples", "4", "--micro-batch-size", "1", "--grad-accum", "1",
                    "--max-steps", "1", "--ref-cache", str(tmp_path / "ref")]
    assert main(args + ["--output-dir", str(tmp_path / "a")]) == 0
    assert main(args + ["--output-dir", str(tmp_path / "b"), "--max-length", "150"]) == 2
    assert "different inputs" in capsys.readouterr().err
    # another reference model (--ref-model): a different fingerprint, refused on the old cache...
    ref_model = str(tmp_path / "a" / "final")
    assert main(args + ["--output-dir", str(tmp_path / "c"), "--ref-model", ref_model]) == 2
    assert "ref_model" in capsys.readouterr().err
    # ... and used with its own cache: the trained model is now not its own reference
    assert main(args + ["--output-dir", str(tmp_path / "d"), "--ref-model", ref_model,
                        "--ref-cache", str(tmp_path / "ref2")]) == 0
    assert metrics(tmp_path / "d")[0]["weight_mean"] != pytest.approx(1.0, abs=1e-6)


def test_packing_gives_the_same_step_as_padding(tmp_path):
    """(the padded run also uses gradient checkpointing: same numbers expected)"""
    args = SMALL + ["--max-examples", "4", "--grad-accum", "1", "--max-steps", "2",
                    "--ref-cache", str(tmp_path / "ref")]
    assert main(args + ["--output-dir", str(tmp_path / "pad"), "--gradient-checkpointing"]) == 0
    assert main(args + ["--output-dir", str(tmp_path / "pack"), "--packing"]) == 0
    for a, b in zip(metrics(tmp_path / "pad"), metrics(tmp_path / "pack")):
        assert b["target_tokens"] == a["target_tokens"]
        for k in ("loss", "grad_norm", "weight_mean"):
            assert b[k] == pytest.approx(a[k], rel=1e-4), k
