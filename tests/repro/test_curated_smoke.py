"""The curated-data experiment (bench/repro/curated/run.py) at its smallest: a pipeline smoke
test, not a claim that iw-SFT wins. Checks: the task's checker and quality score, q_ref is
trained, the curated set passes the checker, the trainer ran in every mode (with reference
log-probs where the mode needs them), and success rates are rates."""

import json
import random
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.repro.curated import run, task  # noqa: E402


def test_task_checker_and_quality():
    rng = random.Random(0)
    for _ in range(200):
        p = task.random_problem(rng)
        a = task.canonical_answer(p)
        assert task.check(p, a) and task.quality(p, a) == 1.0
        assert task.check(p, f"#{task.true_value(p)}") and task.quality(p, f"#{task.true_value(p)}") == 0.2
        assert not task.check(p, f"#{task.true_value(p) + 1}")
        assert not task.check(p, a + "x") and not task.check(p, "")
        v = task.write_answer(p, "verbose", rng)
        assert task.check(p, v) and 0 < task.quality(p, v) < 1
        assert not task.check(p, task.write_answer(p, "slip", rng))
    assert task.check("3+4*2", "4*2=8;3+8=11;#11") and not task.check("3+4*2", "3+4=7;7*2=14;#14")


def test_curated_pipeline_smallest(tmp_path):
    sc = run.TINY
    res = run.run(sc, tmp_path / "work", tmp_path / "results", "curated_tiny", quick=True)
    for ext in ("json", "md", "png"):
        assert (tmp_path / "results" / f"curated_tiny.{ext}").exists()
    saved = json.loads((tmp_path / "results" / "curated_tiny.json").read_text())
    assert set(saved["summary"]) == {"q_ref"} | {m.name for m in run.METHODS}
    for seed, cur in res["curation"].items():
        rows = [json.loads(x) for x in Path(cur["path"]).read_text().splitlines()]
        assert len(rows) == cur["kept"] >= sc.ft_batch
        assert all(task.check(r["prompt"], r["response"]) for r in rows)
        assert all(0 < r["quality"] <= 1 for r in rows)
    work = tmp_path / "work" / "seed0"
    assert (work / "ref_logprobs" / "complete").exists()  # q_ref log-probs, cached once
    for m in run.METHODS:
        out = work / run.slug(m.name)
        assert (out / "final" / "model.safetensors").exists(), m.name
        s = json.loads((out / "summary.json").read_text())
        assert s["mode"] == m.args["mode"] and s["steps"] >= 1
        metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert metrics[0]["weight_mean"] == pytest.approx(1.0, abs=1e-4) or m.args.get(
            "quality_weight")  # policy == q_ref at the first step
    for name, d in res["summary"].items():
        for r in d["success_per_seed"]:
            assert 0.0 <= r <= 1.0, name
        assert 0.0 <= d["greedy_success"][0] <= 1.0
