"""The curated-data experiment (bench/repro/curated/run.py) at its smallest: a pipeline smoke
test, not a claim that iw-SFT wins. Checks: the task's checker and quality score, q_ref is
trained, the curated set passes the checker, the trainer ran in every mode (with reference
log-probs where the mode needs them), and success rates are rates. The teacher setting
(teacher.py) likewise, plus: the teacher beats q_ref, finite weight statistics, and retraining
gives bit-identical weights."""

import json
import math
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


def test_teacher_pipeline_smallest(tmp_path):
    """The teacher setting (bench/repro/curated/teacher.py) at its smallest: the teacher beats
    q_ref, the curated sets come from the sources they claim and pass the checker, every run
    has finite weight statistics and a success-vs-step curve, and retraining q_ref and the
    teacher gives bit-identical weights (the rerun property)."""
    from bench.repro.curated import teacher

    sc = teacher.TINY
    res = teacher.run(sc, tmp_path / "work", tmp_path / "results", "t", quick=True)
    for ext in ("json", "md", "png"):
        assert (tmp_path / "results" / f"t.{ext}").exists()
    base = res["base"][0]
    assert base["teacher"]["success"] > base["q_ref"]["success"] + 0.1, base
    assert res["environment"]["native_epilogue"].startswith("off")  # pinned, see run.py
    cur = base["curation"]
    for regime in sc.regimes:
        rows = [json.loads(x) for x in Path(cur[regime]["path"]).read_text().splitlines()]
        assert len(rows) == cur[regime]["n"] >= sc.ft_batch
        assert all(task.check(r["prompt"], r["response"]) for r in rows)
    assert cur["teacher"]["teacher_frac"] == 1.0
    assert 0.0 < cur["mixed"]["teacher_frac"] < 1.0
    for regime, per in res["runs"][0].items():
        assert set(per) == set(sc.methods)
        for name, r in per.items():
            assert 0.0 <= r["success"] <= 1.0 and 0.0 <= r["greedy_success"] <= 1.0
            assert len(r["curve"]) >= 2 and all(0.0 <= y <= 1.0 for _, y in r["curve"])
            if r["mode"] == "sft":
                continue
            for k in ("w_mean_avg", "w_max_max", "log_ratio_avg", "log_ratio_last"):
                assert math.isfinite(r[k]), (regime, name, k)
            assert 0.0 < r["ess_min"] <= r["ess_avg"] <= 1.0 + 1e-9
            assert 0.0 <= r["clip_hi_avg"] <= 1.0 and 0.0 <= r["clip_lo_avg"] <= 1.0
            assert r["w_max_max"] >= r["w_mean_avg"] > 0
    s = res["summary"]["teacher"]["iw-SFT (sequence)"]
    assert "delta_vs_sft" in s and s["n"] == 1
    # rerun: the same seed trains bit-identical q_ref and teacher weights
    pool, _, exclude = teacher.problem_sets(sc)
    with run.pinned_numerics():
        again = teacher.build_models(tmp_path / "again", sc, 0, exclude, pool)
    assert (again["qref_sha"], again["teacher_sha"]) == (base["qref_sha"], base["teacher_sha"])


def test_teacher_compare_finds_differences():
    from bench.repro.curated import teacher

    a = {"runs": {"0": {"x": [0.25, {"success": 0.5, "train_s": 3.0}]}}}
    b = {"runs": {"0": {"x": [0.25, {"success": 0.5, "train_s": 9.0}]}}}
    assert teacher.compare(a, b) == []  # timings are not outcomes
    b["runs"]["0"]["x"][1]["success"] = 0.5000001
    assert len(teacher.compare(a, b)) == 1


# ------------------------------------------------------- the command lines pin the CPU kernels
ROOT = Path(__file__).resolve().parents[2]
PROBE = ("import json, os, torch\n"
         "from bench.repro import mkl_branch\n"
         "print('@@' + json.dumps([os.environ.get('MKL_CBWR'),"
         " os.environ.get('ATEN_CPU_CAPABILITY'), torch.backends.cpu.get_cpu_capability(),"
         " mkl_branch()]))\n")


def _probe(code: str, **env) -> list:
    import os
    import subprocess

    e = {k: v for k, v in os.environ.items()
         if k not in ("MKL_CBWR", "ATEN_CPU_CAPABILITY", "IWSFT_REPRO_NO_PIN",
                      "IWSFT_REPRO_PINNED")}
    e.update(env, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-c", code + PROBE], cwd=ROOT, env=e, text=True,
                       capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    line = [x for x in p.stdout.splitlines() if x.startswith("@@")]
    assert len(line) == 1, p.stdout  # a re-executed process prints once
    return [*json.loads(line[0][2:]), p.stderr]


def _has_avx2() -> bool:
    try:
        return " avx2" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def test_pin_cpu_kernels_before_and_after_torch_import():
    """pin_cpu_kernels sets MKL_CBWR / ATEN_CPU_CAPABILITY before torch starts, torch then runs
    the AVX2 ATen kernels and MKL's COMPATIBLE branch; called after `import torch` it
    re-executes the process so that they still apply; the user's own values win;
    IWSFT_REPRO_NO_PIN=1 pins nothing."""
    from bench.repro import PINNED_CPU_KERNELS

    assert PINNED_CPU_KERNELS == {"MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "avx2"}
    pin = "from bench.repro import pin_cpu_kernels\npin_cpu_kernels()\n"
    cbwr, cap_env, cap, mkl, err = _probe(pin)  # before torch is imported
    assert (cbwr, cap_env) == ("COMPATIBLE", "avx2")
    assert "CPU kernels pinned" in err and "MKL_CBWR=COMPATIBLE" in err
    if _has_avx2():
        assert cap == "AVX2"
    if mkl:  # torch's x86-64 Linux wheels: MKL reports its branch
        assert mkl["fixed"] == "COMPATIBLE"
    # after `import torch`: the process re-executes itself; a value the user set is kept
    cbwr, cap_env, cap, mkl, err = _probe("import torch\n" + pin, MKL_CBWR="AVX2")
    assert (cbwr, cap_env) == ("AVX2", "avx2") and "the committed results use COMPATIBLE" in err
    if _has_avx2():
        assert cap == "AVX2"
        if mkl:
            assert mkl["fixed"] == "AVX2"
    cbwr, cap_env, cap, mkl, err = _probe(pin, IWSFT_REPRO_NO_PIN="1")
    assert (cbwr, cap_env) == (None, None) and "NOT pinned" in err
    if mkl:
        assert mkl["fixed"] == "OFF"


def test_run_compare_ignores_timings_and_paths():
    a = {"qref": {"sha": "ab", "train_s": 1.0, "model": "/tmp/x"}, "per_seed": {"0": [0.25]}}
    b = {"qref": {"sha": "ab", "train_s": 7.0, "model": "/tmp/y"}, "per_seed": {"0": [0.25]}}
    assert run.compare(a, b) == []
    b["qref"]["sha"] = "cd"
    assert run.compare(a, b) == ["/qref/sha: 'ab' != 'cd'"]
