"""Held-out evaluation in `iwsft-train`: --eval-fraction (held out of --data by --seed, not
trained on), --eval-data (another file), the two excluding each other, and the summary naming
which eval set it measured."""

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from safetensors.torch import load_file  # noqa: E402

from iwsft_kernels.trainer.cli import main  # noqa: E402
from iwsft_kernels.trainer.data import DataError, Example, TokenizedData, hold_out  # noqa: E402

SMALL = ["--max-length", "64", "--micro-batch-size", "2", "--grad-accum", "1",
         "--log-with", "none", "--report", "false", "--warmup-ratio", "0", "--max-steps", "2"]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # tests/conftest.py


def fake(n):
    return TokenizedData([Example([1, 2], [1, 2], 1.0, i, 1) for i in range(n)], n)


def test_hold_out_is_deterministic_disjoint_and_removed_from_training():
    train, held = hold_out(fake(20), 0.25, seed=0)
    assert len(held) == 5 and len(train.examples) == 15
    ti, hi = [e.index for e in train.examples], [e.index for e in held]
    assert sorted(ti + hi) == list(range(20)) and ti == sorted(ti) and hi == sorted(hi)
    assert [e.index for e in hold_out(fake(20), 0.25, seed=0)[1]] == hi  # same seed, same set
    assert any([e.index for e in hold_out(fake(20), 0.25, seed=s)[1]] != hi for s in (1, 2, 3))
    assert len(hold_out(fake(3), 0.01, seed=0)[1]) == 1  # at least one
    with pytest.raises(DataError, match="leaving none to train on"):
        hold_out(fake(2), 0.9, seed=0)


def test_eval_data_and_fraction_exclude_each_other(capsys):
    # parse_config exits 2 before any work
    from iwsft_kernels.trainer.config import parse_config

    with pytest.raises(SystemExit) as e:
        parse_config(["--eval-data", "x.jsonl", "--eval-fraction", "0.1"])
    assert e.value.code == 2
    assert "--eval-data and --eval-fraction exclude each other" in capsys.readouterr().err


def rows(n):
    return [{"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}."}
            for i in range(n)]


def write(path, rs):
    path.write_text("".join(json.dumps(r) + "\n" for r in rs))
    return str(path)


def test_fraction_equals_the_same_split_given_as_two_files(tmp_path, capsys):
    """--eval-fraction 0.25 of 8 rows == training on the 6 others with the 2 held-out rows as
    --eval-data: same eval before, same steps, same final model (the held-out rows are not
    trained on)."""
    rs = rows(8)
    held = [e.index for e in hold_out(fake(8), 0.25, seed=0)[1]]
    frac, files = tmp_path / "frac", tmp_path / "files"
    assert main(SMALL + ["--data", write(tmp_path / "all.jsonl", rs), "--eval-fraction",
                         "0.25", "--output-dir", str(frac)]) == 0
    text = capsys.readouterr().out
    assert "(mean NLL, held-out 2 examples)" in text
    assert main(SMALL + ["--data", write(tmp_path / "train.jsonl",
                                         [r for i, r in enumerate(rs) if i not in held]),
                         "--eval-data", write(tmp_path / "eval.jsonl", [rs[i] for i in held]),
                         "--output-dir", str(files)]) == 0
    assert "(mean NLL, held-out 2 examples)" in capsys.readouterr().out
    sf, sd = (json.loads((d / "summary.json").read_text()) for d in (frac, files))
    assert sf["eval_held_out"] and sd["eval_held_out"] and sf["eval_examples"] == 2
    assert "--eval-fraction 0.25" in sf["eval_set"] and "6 left to train on" in sf["eval_set"]
    assert "--eval-data" in sd["eval_set"]
    for k in ("eval_loss_before", "eval_loss_after", "train_loss_first", "train_loss_last"):
        assert sd[k] == pytest.approx(sf[k], rel=1e-6), k
    pf, pd = (load_file(str(d / "final" / "model.safetensors")) for d in (frac, files))
    for k in pf:
        torch.testing.assert_close(pd[k], pf[k], rtol=1e-6, atol=1e-7)


def test_without_held_out_data_the_summary_says_training_examples(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(SMALL + ["--data", write(tmp_path / "all.jsonl", rows(6)), "--eval-examples",
                         "3", "--max-steps", "1", "--output-dir", str(out)]) == 0
    assert "(mean NLL, first 3 training examples)" in capsys.readouterr().out
    s = json.loads((out / "summary.json").read_text())
    assert not s["eval_held_out"] and s["eval_set"] == "first 3 training examples"
