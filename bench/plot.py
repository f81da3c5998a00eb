"""Plots for a loss-benchmark JSON: memory vs N and time vs N per implementation.

    python -m bench.plot bench/results/<device>-<date>.json [more.json ...]

Writes <stem>-time.png (forward+backward ms, log-log) and <stem>-memory.png (peak extra MiB)
beside each JSON, one panel per lm_head shape. Cells recorded as OOM are drawn as an x at the
top of the panel; n/a and skipped cells are left out.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STYLE = {  # impl key -> (color, linestyle, marker)
    "naive": ("black", "-", "o"),
    "compile_chunked": ("tab:gray", "-", "s"),
    "torch_lce": ("tab:brown", "-", "D"),
    "trl": ("tab:olive", "-", "P"),
    "liger": ("tab:purple", "-", "^"),
    "cce": ("tab:pink", "-", "v"),
    "ours-sft-torch": ("tab:blue", "--", "o"),
    "ours-token-torch": ("tab:orange", "--", "o"),
    "ours-sequence-torch": ("tab:green", "--", "o"),
    "ours-sft-triton": ("tab:blue", "-", "*"),
    "ours-token-triton": ("tab:orange", "-", "*"),
    "ours-sequence-triton": ("tab:green", "-", "*"),
}


def _series(recs, head, key, metric):
    pts, ooms = [], []
    for r in recs:
        if r["head"] != head or r["impl"] != key:
            continue
        if r.get("status") == "ok":
            val = r["fwdbwd_ms"] if metric == "time" else r["extra_mem_bytes"] / 2**20
            pts.append((r["N"], max(val, 1e-3)))
        elif r.get("status") == "OOM":
            ooms.append(r["N"])
    return sorted(pts), ooms


def plot_file(path: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(path.read_text())
    meta, recs = data["meta"], data["records"]
    heads = list(dict.fromkeys(r["head"] for r in recs))
    order = list(STYLE)
    keys = sorted(dict.fromkeys(r["impl"] for r in recs),
                  key=lambda k: order.index(k) if k in order else len(order))
    labels = {r["impl"]: r["label"] for r in recs}
    written = []
    for metric, ylabel in (("time", "forward+backward ms (median)"),
                           ("memory", "peak extra memory, MiB")):
        fig, axes = plt.subplots(1, len(heads), figsize=(5.2 * len(heads), 4.4), squeeze=False)
        handles = {}
        for ax, head in zip(axes[0], heads):
            hv = next(r for r in recs if r["head"] == head)
            for key in keys:
                pts, ooms = _series(recs, head, key, metric)
                if not pts and not ooms:
                    continue
                color, ls, marker = STYLE.get(key, (None, "-", "."))
                if pts:
                    xs, ys = zip(*pts)
                    (ln,) = ax.plot(xs, ys, ls=ls, marker=marker, color=color, label=labels[key])
                    handles[key] = ln
                for n in ooms:
                    ax.plot([n], [1.0], marker="x", ms=10, color=color or "red",
                            transform=ax.get_xaxis_transform(), clip_on=False)
                    ax.annotate("OOM", (n, 1.0), xycoords=("data", "axes fraction"),
                                fontsize=7, ha="center", va="bottom", color=color or "red")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N tokens")
            ax.set_ylabel(ylabel)
            ax.set_title(f"head {head}: H={hv['H']}, V={hv['V']}", fontsize=10)
            ax.grid(alpha=0.3, which="both")
        fig.suptitle(f"{meta['device_name']} ({meta['device']}), {meta['args']['dtype']}, "
                     f"torch {meta['versions']['torch']}, {meta['date'][:10]}", fontsize=10)
        fig.tight_layout(rect=(0, 0, 1, 0.95))
        fig.legend([handles[k] for k in handles], [labels[k] for k in handles],
                   loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
        out = path.with_name(f"{path.stem}-{metric}.png")
        fig.savefig(out, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(out)
    return written


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", nargs="+", type=Path)
    args = ap.parse_args(argv)
    for p in args.json:
        for out in plot_file(p):
            print(f"wrote {out}")


if __name__ == "__main__":
    main()
