"""`python -m iwsft_kernels.report` on synthetic output folders of both trainers (the real
folders are rendered in tests/trainer/test_metrics.py and tests/integrations/test_trl_metrics.py):
what it reads, the numbers in report.md, valid PNGs, and the way it says what is missing."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from iwsft_kernels import report

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_ok(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG whose bytes decode."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    image = pytest.importorskip("matplotlib.image")
    a = image.imread(path)
    assert a.ndim == 3 and a.shape[0] > 100 and a.shape[1] > 100
    assert float(a[..., :3].std()) > 0.01  # something is drawn
    return a.shape[1], a.shape[0]


def iwsft_train_folder(d: Path, steps: int = 6) -> dict:
    d.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in range(1, steps + 1):
        rows.append({"step": s, "loss": 12.0 + 0.5 * s, "logp_mean": -12.0 + 0.11 * s,
                     "entropy": 11.9 - 0.013 * s, "mean_token_accuracy": 0.01 * s,
                     "weight_mean": 1.0 + 0.07 * s, "weight_min": 0.9, "weight_max": 1.0 + 0.2 * s,
                     "ess_fraction": 1.0 - 0.01 * s, "clip_frac_max": 0.0,
                     "clip_frac_min": 0.02 * (s % 2), "log_ratio_mean": 0.05 * s,
                     "grad_norm": 2.0 + s, "lr": 1e-3, "target_tokens": 100, "tokens": 150})
    rows[1]["weight_mean"] = float("nan")  # json writes NaN; the report copes
    rows[-1].update(eval_loss=10.5, eval_entropy=11.7, eval_mean_token_accuracy=0.0625)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows)
                                     + '{"step": 7, "loss"')  # a line cut by a kill
    summary = {"mode": "sequence", "steps": steps, "total_steps": steps,
               "eval_loss_before": 11.93, "eval_entropy_before": 11.92,
               "eval_mean_token_accuracy_before": 0.0109, "eval_loss_after": 10.5,
               "eval_entropy_after": 11.7, "eval_mean_token_accuracy_after": 0.0625,
               "eval_set": "held-out 2 examples of data.jsonl (--eval-fraction 0.1, seed 0)"}
    (d / "summary.json").write_text(json.dumps(summary))
    report.write_last_step_weights(d, trainer="iwsft-train", step=steps, mode="sequence",
                                   weights=[0.5, 1.25, 2.0, 3.75, 16.0], w_min=0.0, w_max=16.0)
    return {"rows": rows, "summary": summary}


def trl_state(steps: int, base: float) -> dict:
    hist = []
    for s in range(1, steps + 1):
        hist.append({"loss": base + s, "grad_norm": 1.5, "learning_rate": 2e-5,
                     "entropy": 2.0 - 0.1 * s, "mean_token_accuracy": 0.4 + 0.01 * s,
                     "num_tokens": 300.0 * s, "iw/nll": base - 0.1 * s,
                     "iw/weight_mean": 0.8 + 0.01 * s, "iw/weight_min": 0.2,
                     "iw/weight_max": 1.7, "iw/ess_fraction": 0.93, "iw/clip_frac_max": 0.1,
                     "iw/clip_frac_min": 0.05, "iw/log_ratio_mean": -0.2, "epoch": s / 4,
                     "step": s})
        if s % 2 == 0:
            hist.append({"eval_loss": base - 0.2 * s, "eval_entropy": 1.9 - 0.1 * s,
                         "eval_mean_token_accuracy": 0.45 + 0.01 * s, "eval_num_tokens": 300 * s,
                         "epoch": s / 4, "step": s})
    hist.append({"train_runtime": 3.2, "train_loss": base, "epoch": steps / 4, "step": steps})
    return {"global_step": steps, "max_steps": 4, "log_history": hist}


def trl_folder(d: Path) -> dict:
    """TRL's output_dir with two checkpoints and no trainer_state.json of its own."""
    for steps, base in ((2, 50.0), (4, 7.0)):
        ck = d / f"checkpoint-{steps}"
        ck.mkdir(parents=True)
        (ck / "trainer_state.json").write_text(json.dumps(trl_state(steps, base)))
    report.write_last_step_weights(d, trainer="trl", step=4, mode="token",
                                   weights=[0.2, 0.93, 1.1, 1.8], w_min=0.2, w_max=1.8)
    return trl_state(4, 7.0)


def test_iwsft_train_folder(tmp_path):
    run = iwsft_train_folder(tmp_path / "run")
    md = report.write_report(tmp_path / "run")
    assert md == tmp_path / "run" / "report" / "report.md"
    text = md.read_text()
    last = run["rows"][-1]
    assert "trainer: iwsft-train, mode `sequence`" in text
    assert "optimizer steps logged: 6 (last step 6 of 6)" in text
    for v in (last["loss"], -last["logp_mean"], last["entropy"], last["mean_token_accuracy"],
              last["weight_max"], last["ess_fraction"], 0.01):  # 0.01: first step's accuracy
        assert report.fmt(v) in text, v
    # eval: before (summary) at step 0, after (the last line) at step 6, not duplicated
    assert "| 0 | 11.93 | 11.92 | 0.0109 |" in text
    assert text.count("| 6 | 10.5 | 11.7 | 0.0625 |") == 1
    assert "Eval set: held-out 2 examples of data.jsonl (--eval-fraction 0.1, seed 0)." in text
    # the weights: mean 4.7, median 2, ESS (23.5^2 / 276.125 / 5)
    ess = 23.5 ** 2 / (0.25 + 1.5625 + 4 + 14.0625 + 256) / 5
    assert "5 sequences" in text and "mean 4.7" in text and "median 2," in text
    assert report.fmt(ess) in text
    for name in ("overview.png", "loss.png", "entropy_accuracy.png", "weights.png",
                 "ess_clip.png", "weights_hist.png", "optimizer.png"):
        assert f"]({name})" in text
        _png_ok(md.parent / name)
    assert _png_ok(md.parent / "overview.png")[0] > 1000


def test_trl_folder_reads_the_newest_checkpoint(tmp_path):
    want = trl_folder(tmp_path / "out")
    md = report.write_report(tmp_path / "out", tmp_path / "elsewhere")
    assert md.parent == tmp_path / "elsewhere"
    text = md.read_text()
    assert "trainer: trl, mode `token`" in text
    assert "checkpoint-4" in text and "checkpoint-2" not in text
    train = [e for e in want["log_history"] if "loss" in e]
    assert "optimizer steps logged: 4 (last step 4 of 4)" in text
    for k in ("loss", "iw/nll", "entropy", "mean_token_accuracy", "iw/weight_mean"):
        assert report.fmt(train[-1][k]) in text, k
    assert "| 2 | 6.6 | 1.7 | 0.47 |" in text and "| 4 | 6.2 | 1.5 | 0.49 |" in text
    assert "4 sequences" in text and "Token mode" in text
    _png_ok(md.parent / "overview.png")
    _png_ok(md.parent / "weights_hist.png")
    # trainer_state.json in output_dir wins when it has more steps (save_state at the end)
    st = trl_state(4, 7.0)
    st["global_step"] = 5
    st["log_history"].insert(-1, {**st["log_history"][0], "loss": 99.5, "step": 5})
    (tmp_path / "out" / "trainer_state.json").write_text(json.dumps(st))
    run = report.load_run(tmp_path / "out")
    assert run.sources[0] == str(tmp_path / "out" / "trainer_state.json")
    assert run.train[-1]["loss"] == 99.5


def test_without_matplotlib_says_how_to_install(tmp_path, monkeypatch, capsys):
    iwsft_train_folder(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert report.main([str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert "matplotlib is not installed" in err and "pip install matplotlib" in err
    text = (tmp_path / "run" / "report" / "report.md").read_text()
    assert "No plots: matplotlib is not installed" in text and "pip install matplotlib" in text
    assert report.fmt(11.9 - 0.013 * 6) in text  # the numbers are still there
    assert not list((tmp_path / "run" / "report").glob("*.png"))


def test_missing_pieces_and_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "metrics.jsonl" in err and "trainer_state.json" in err and "save_state" in err
    assert report.main([str(tmp_path / "nope")]) == 2
    assert "not a folder" in capsys.readouterr().err
    # an unfinished iwsft-train run: no summary, no weights file
    d = tmp_path / "partial"
    d.mkdir()
    (d / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0, "logp_mean": -3.0}) + "\n")
    text = report.write_report(d).read_text()
    assert "no summary.json" in text and "Not recorded" in text
    (d / "metrics.jsonl").write_text("")
    with pytest.raises(report.ReportError, match="no training step"):
        report.load_run(d)


def test_weights_file_round_trip(tmp_path):
    p = report.write_last_step_weights(tmp_path, trainer="iwsft-train", step=3, mode="sft",
                                       weights=[1.0, 1.0])
    doc = json.loads(p.read_text())
    assert doc == {"format": report.WEIGHTS_FORMAT, "trainer": "iwsft-train", "step": 3,
                   "mode": "sft", "unit": "sequence", "w_min": None, "w_max": None,
                   "weights": [1.0, 1.0]}
    assert [x.name for x in tmp_path.iterdir()] == [report.WEIGHTS_FILE]  # no temp file left
    assert report.weight_summary([]) == {"n": 0}
    s = report.weight_summary([1.0, 3.0])
    assert s["mean"] == 2.0 and s["median"] == 2.0 and math.isclose(s["ess_fraction"], 0.8)


def test_module_runs_as_a_command(tmp_path):
    iwsft_train_folder(tmp_path / "run")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH",
                                                                                  "")])}
    r = subprocess.run([sys.executable, "-m", "iwsft_kernels.report", str(tmp_path / "run")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"report: {tmp_path / 'run' / 'report' / 'report.md'}" in r.stdout
