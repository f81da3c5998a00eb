"""Step time and peak memory of one training step (forward + backward + AdamW) on the embedded
default model (tiny Qwen2, vocabulary 151,936), for:

  hf         transformers' own loss path (full (B, T, V) logits, cross-entropy)
  sft        this package's fused loss, mode="sft"
  iwsft      this package's fused loss, mode="sequence", reference log-probs precomputed
  iw-online  what the method's reference code does: full logits plus a second (reference) model
             forward with full logits every step, sequence weights from them

Each variant runs in its own subprocess so that peak memory is its own. On CPU, memory is the
process's peak RSS (and the part above the steady state after a warm-up step); on CUDA, the
peak allocated bytes. Target (issue 4): iwsft <= 1.05 x sft in time and memory.

    python bench/bench_train_step.py [--batch 4] [--max-length 512] [--steps 5] [--device cpu]
Writes bench/results/train_step_<device>.json. Not a test.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

VARIANTS = ("hf", "sft", "iwsft", "iw-online")


def _rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30


def _peak_gib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_variant(variant: str, batch_size: int, max_length: int, steps: int, device: str) -> dict:
    from transformers import AutoTokenizer

    from iwsft_kernels import IWConfig
    from iwsft_kernels.integrations import apply_iwsft_to_model
    from iwsft_kernels.trainer.config import ASSETS, TrainConfig
    from iwsft_kernels.trainer.data import collate, load_records, tokenize_dataset
    from iwsft_kernels.trainer.loop import load_model

    dev = torch.device(device)
    tok = AutoTokenizer.from_pretrained(ASSETS / "tokenizer")
    data = tokenize_dataset(load_records(str(ASSETS / "s1k_tiny.jsonl")), tok,
                            max_length=max_length, max_examples=batch_size)
    model, _ = load_model("embedded-default", TrainConfig())
    model.to(dev).train()
    ref_model = copy.deepcopy(model).eval() if variant == "iw-online" else None
    if variant in ("sft", "iwsft"):
        apply_iwsft_to_model(model, IWConfig(mode="sft" if variant == "sft" else "sequence"))
    batch = {k: v.to(dev) for k, v in collate(data.examples, tok.pad_token_id).items()}
    batch.pop("quality")
    if variant == "iwsft":
        with torch.no_grad():
            batch["ref_logprobs"] = model(**batch, return_logprobs_only=True).token_logprobs
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        if variant in ("hf", "sft", "iwsft"):
            loss = model(**batch).loss
        else:  # the method's own code path: two full-logit forwards per step
            labels = batch["labels"][:, 1:]
            mask = labels != -100
            y = labels.clamp(min=0)[..., None]
            with torch.no_grad():
                ref_lp = torch.log_softmax(ref_model(input_ids=batch["input_ids"],
                                                     attention_mask=batch["attention_mask"])
                                           .logits[:, :-1].float(), -1).gather(-1, y)[..., 0]
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits[:, :-1].float()
            lp = torch.log_softmax(logits, -1).gather(-1, y)[..., 0]
            d = ((lp.detach() - ref_lp) * mask).sum(1) / mask.sum(1)
            w = d.exp().clamp(0, 16)
            loss = -(w[:, None] * lp * mask).sum() / mask.sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    step()  # warm-up: allocates AdamW state
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)
    steady = _rss_gib() if dev.type == "cpu" else torch.cuda.memory_allocated(dev) / 2**30
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = _peak_gib(dev)
    times.sort()
    return {"variant": variant, "device": device, "batch": batch_size,
            "tokens": int(batch["attention_mask"].sum()), "seq_len": batch["input_ids"].shape[1],
            "step_s_median": times[len(times) // 2], "step_s_min": times[0],
            "peak_gib": peak, "peak_above_steady_gib": peak - steady,
            "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._one:
        print(json.dumps(run_variant(a._one, a.batch, a.max_length, a.steps, a.device)))
        return
    rows = []
    for v in a.variants.split(","):
        cmd = [sys.executable, __file__, "--_one", v, "--batch", str(a.batch), "--max-length",
               str(a.max_length), "--steps", str(a.steps), "--device", a.device]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{v}: failed\n{r.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    base = next((r for r in rows if r["variant"] == "sft"), None)
    print(f"{'variant':10} {'tokens':>7} {'step s':>8} {'x sft':>6} {'peak GiB':>9} "
          f"{'above steady':>12} {'x sft':>6}")
    for r in rows:
        rt = r["step_s_median"] / base["step_s_median"] if base else float("nan")
        rm = r["peak_above_steady_gib"] / base["peak_above_steady_gib"] if base else float("nan")
        print(f"{r['variant']:10} {r['tokens']:7d} {r['step_s_median']:8.3f} {rt:6.2f} "
              f"{r['peak_gib']:9.3f} {r['peak_above_steady_gib']:12.3f} {rm:6.2f}")
    out = Path(__file__).resolve().parent / "results" / f"train_step_{a.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
