"""The paper's two-armed bandit, trained through the public loss API.

    python -m bench.repro.bandit            # writes bench/results/bandit.png and bandit.json

Setting (Qin & Springenberg 2025, the toy example; docs/design.md §1):
- two arms; the reference policy q_ref picks each with probability 1/2;
- the better arm (index 1) succeeds twice as often as the other (0.6 vs 0.3 here);
- curated data = the arms of the successful pulls (a sparse 0/1 reward filter), so about
  2/3 of the curated samples are the better arm.

The policy is a 2-logit "LM head": hidden = the constant 1-dim vector [1], weight = theta (2 x 1),
V = 2, each curated sample is its own one-token sequence (cu_seqlens = 0, 1, ..., N).
Full-batch SGD on ``linear_iwsft_loss(...).loss`` from theta = 0 (i.e. starting at q_ref):

- SFT (mode "sft"): maximum likelihood on the curated arms -> P(better) = curated fraction ~ 2/3.
- iw-SFT with q = stop-gradient current policy: ref_logprobs = log q_ref = log 1/2, so the
  package's weight exp(logp - ref) = p_theta(a) / (1/2) = q/q_ref. Weighted ML on arm counts
  c_a with weights w_a proportional to p_theta(a) has no interior fixed point: the odds
  P(better)/P(worse) keep growing (they double per round if each round were fitted to
  convergence), so P(better) -> 1.
- Clipping matters. Weights here lie in [0, 2]. Sequence mode's defaults [0, 16] never bind,
  so sequence mode -> 1. Token mode's defaults [0.2, 1.8] do bind: once P(better) > 0.9 the
  better arm's weight is capped at 1.8 and the worse arm's floored at 0.2, and the fixed point
  is odds = (c_better / c_worse) * 1.8 / 0.2 = 2 * 9 -> P(better) = 18/19 ~ 0.947 for exact 2:1
  data. We therefore also run token mode with explicit bounds [0, 16] (unclipped) -> 1.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # allow `python bench/repro/bandit.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from iwsft_kernels import IWConfig, linear_iwsft_loss

REPO = Path(__file__).resolve().parents[2]
BETTER, WORSE = 1, 0


def curated_arms(n_pulls: int = 3000, p_success=(0.3, 0.6), seed: int | None = 0) -> torch.Tensor:
    """Arms (int64) of the successful pulls of a 50/50 reference policy.

    seed=None gives the population limit instead of a sample: the expected successes of
    n_pulls pulls, i.e. exactly n_pulls/2 * p_success[a] samples of arm a (2:1 here).
    """
    if seed is None:
        counts = [round(n_pulls / 2 * p) for p in p_success]
        return torch.tensor([WORSE] * counts[WORSE] + [BETTER] * counts[BETTER])
    g = torch.Generator().manual_seed(seed)
    arms = torch.randint(0, 2, (n_pulls,), generator=g)
    p = torch.tensor(p_success, dtype=torch.float64)[arms]
    success = torch.rand(n_pulls, generator=g, dtype=torch.float64) < p
    return arms[success]


@dataclass(frozen=True)
class Variant:
    name: str
    config: IWConfig


VARIANTS = (
    Variant("SFT", IWConfig(mode="sft")),
    Variant("iw-SFT sequence (default clip [0, 16])", IWConfig(mode="sequence")),
    Variant("iw-SFT token (default clip [0.2, 1.8])", IWConfig(mode="token")),
    Variant("iw-SFT token (clip [0, 16], unbinding)", IWConfig(mode="token", w_min=0.0, w_max=16.0)),
)


def train(arms: torch.Tensor, config: IWConfig, *, steps: int = 400, lr: float = 2.0,
          backend: str = "torch", record_every: int = 1) -> dict:
    """Full-batch SGD on the curated arms from theta = 0 (= q_ref). Returns the P(better) curve."""
    n = arms.numel()
    hidden = torch.ones(n, 1, dtype=torch.float64)
    theta = torch.zeros(2, 1, dtype=torch.float64, requires_grad=True)
    ref = torch.full((n,), math.log(0.5), dtype=torch.float64)  # log q_ref of every sample
    cu = torch.arange(n + 1, dtype=torch.int32)  # one sequence per sample
    opt = torch.optim.SGD([theta], lr=lr)
    curve = []
    weights = {}
    for step in range(steps + 1):
        p_better = float(torch.softmax(theta.detach()[:, 0], 0)[BETTER])
        if step % record_every == 0 or step == steps:
            curve.append((step, p_better))
        if step == steps:
            break
        out = linear_iwsft_loss(hidden, theta, arms,
                                None if config.mode == "sft" else ref,
                                cu_seqlens=cu, config=config, backend=backend)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        if step == steps - 1:
            tw = out.token_weights
            weights = {"better": float(tw[arms == BETTER].mean()),
                       "worse": float(tw[arms == WORSE].mean())}
    return {"curve": curve, "p_better": curve[-1][1], "final_weights": weights}


def token_clip_fixed_point(frac_better: float, w_min: float = 0.2, w_max: float = 1.8) -> float:
    """P(better) where the clipped token-mode gradient vanishes (both clips binding)."""
    odds = frac_better / (1.0 - frac_better) * (w_max / w_min)
    return odds / (1.0 + odds)


def run_all(n_pulls: int = 300, steps: int = 400, lr: float = 2.0, seed: int | None = None,
            backend: str = "torch") -> dict:
    arms = curated_arms(n_pulls, seed=seed)
    frac = float((arms == BETTER).double().mean())
    res = {"n_pulls": n_pulls, "n_curated": arms.numel(), "curated_frac_better": frac,
           "steps": steps, "lr": lr, "seed": seed, "backend": backend,
           "token_clip_fixed_point": token_clip_fixed_point(frac), "runs": {}}
    for v in VARIANTS:
        res["runs"][v.name] = train(arms, v.config, steps=steps, lr=lr, backend=backend)
    return res


def plot(res: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = ["-", "-", "--", ":"]
    for (name, run), ls in zip(res["runs"].items(), styles):
        steps, p = zip(*run["curve"])
        ax.plot(steps, p, ls, lw=2, label=f"{name}: {run['p_better']:.4f}")
    ax.axhline(2 / 3, color="gray", lw=0.8)
    ax.text(res["steps"], 2 / 3, " 2/3", va="center", fontsize=8, color="gray")
    ax.axhline(res["token_clip_fixed_point"], color="gray", lw=0.8, ls="--")
    ax.text(res["steps"], res["token_clip_fixed_point"], " 18/19", va="center", fontsize=8,
            color="gray")
    ax.axhline(0.5, color="lightgray", lw=0.8)
    ax.set_xscale("symlog", linthresh=10)
    ax.set_xlim(0, res["steps"] * 1.6)
    ax.set_xlabel("full-batch SGD step (linear to 10, log after)")
    ax.set_ylabel("P(better arm)")
    ax.set_ylim(0.45, 1.01)
    data = "expected counts" if res["seed"] is None else f"sampled, seed {res['seed']}"
    ax.set_title(f"Two-armed bandit: SFT vs iw-SFT on {res['n_curated']} curated successes "
                 f"({data})\n"
                 f"(q_ref = 50/50, success 0.6 vs 0.3; curated fraction better = "
                 f"{res['curated_frac_better']:.3f})", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-pulls", type=int, default=300)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=None,
                    help="sample the pulls with this seed (default: exact expected counts, 2:1)")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--out-dir", default=str(REPO / "bench" / "results"))
    args = ap.parse_args(argv)
    res = run_all(args.n_pulls, args.steps, args.lr, args.seed, args.backend)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot(res, out / "bandit.png")
    slim = {k: v for k, v in res.items() if k != "runs"}
    slim["runs"] = {k: {"p_better": r["p_better"], "final_weights": r["final_weights"],
                        "curve_every_50": r["curve"][::50]} for k, r in res["runs"].items()}
    (out / "bandit.json").write_text(json.dumps(slim, indent=1))
    print(f"curated: {res['n_curated']} successes, fraction better {res['curated_frac_better']:.4f}"
          f"; token-clip fixed point {res['token_clip_fixed_point']:.4f}")
    for name, r in res["runs"].items():
        print(f"  {name:<42} P(better) after {args.steps} steps = {r['p_better']:.4f}   "
              f"final mean weights {r['final_weights']}")
    print(f"wrote {out / 'bandit.png'} and {out / 'bandit.json'}")


if __name__ == "__main__":
    main()
