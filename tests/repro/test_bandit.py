"""The paper's two-armed bandit through the public loss API (bench/repro/bandit.py).

Reference policy 50/50, the better arm succeeds twice as often, curated data = successes
(exact expected counts, 2:1). SFT must converge to P(better) = 2/3; iw-SFT with
q = stop-gradient current policy (ref_logprobs = log 1/2) to P(better) -> 1 in sequence mode
and in token mode with unbinding clip bounds; token mode with its default clip [0.2, 1.8]
stops at the clipped fixed point 18/19 (odds 2 * 1.8 / 0.2).
"""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.repro.bandit import VARIANTS, curated_arms, token_clip_fixed_point, train  # noqa: E402

STEPS = 150
ARMS = curated_arms(300, seed=None)  # 45 worse + 90 better
RUNS = {}


def _p(name):
    if name not in RUNS:
        cfg = next(v.config for v in VARIANTS if v.name.startswith(name))
        RUNS[name] = train(ARMS, cfg, steps=STEPS, lr=2.0, backend="torch", record_every=50)
    return RUNS[name]["p_better"]


def test_curated_data_is_two_to_one():
    assert (ARMS == 1).sum() == 2 * (ARMS == 0).sum()


def test_sft_converges_to_two_thirds():
    assert _p("SFT") == pytest.approx(2 / 3, abs=1e-4)


def test_iw_sft_sequence_converges_to_better_arm():
    p = _p("iw-SFT sequence")
    assert p > 0.99
    assert p > _p("SFT") + 0.3


def test_iw_sft_token_unclipped_converges_to_better_arm():
    assert _p("iw-SFT token (clip [0, 16]") > 0.99


def test_iw_sft_token_default_clip_stops_at_clipped_fixed_point():
    assert token_clip_fixed_point(2 / 3) == pytest.approx(18 / 19)
    assert _p("iw-SFT token (default clip") == pytest.approx(18 / 19, abs=1e-3)


def test_iw_sft_is_monotone_from_reference():
    cfg = next(v.config for v in VARIANTS if v.name.startswith("iw-SFT sequence"))
    curve = [p for _, p in train(ARMS, cfg, steps=60, lr=2.0, backend="torch")["curve"]]
    assert curve[0] == pytest.approx(0.5)
    assert all(b >= a - 1e-12 for a, b in zip(curve, curve[1:]))


def test_sampled_pulls_sft_matches_empirical_fraction():
    arms = curated_arms(600, seed=0)
    frac = float((arms == 1).double().mean())
    cfg = next(v.config for v in VARIANTS if v.name == "SFT")
    assert train(arms, cfg, steps=150, lr=2.0)["p_better"] == pytest.approx(frac, abs=1e-4)
    assert frac == pytest.approx(2 / 3, abs=0.06)
