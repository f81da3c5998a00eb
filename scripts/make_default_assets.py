"""Generate the embedded default assets of `iwsft-train` (no network, deterministic).

Writes into iwsft_kernels/trainer/assets/:
  s1k_tiny.jsonl   64 synthetic arithmetic problems in the s1K-1.1 schema, plus a `quality` column
  tokenizer/       a byte-level BPE (vocab 2048) trained on that data, with Qwen's chat special
                   tokens and Qwen2-Instruct's chat template
  model/config.json  a tiny Qwen2 config (hidden 64, 2 layers) with the real vocabulary 151,936;
                   the trainer initialises it randomly from a seed (no weights are shipped)

Run:  python scripts/make_default_assets.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "iwsft_kernels" / "trainer" / "assets"

# Qwen2-Instruct's chat template (verbatim).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_example(rng: random.Random, i: int) -> dict:
    n_terms = rng.randint(2, 6)
    terms = [rng.randint(2, 99) for _ in range(n_terms)]
    ops = [rng.choice("+-*") if j else "" for j in range(n_terms)]
    expr = " ".join(f"{o} {t}".strip() for o, t in zip(ops, terms))
    value = eval(expr)  # noqa: S307 - our own arithmetic string
    question = f"Compute the value of {expr}. Show your reasoning."

    def trajectory(style: str, wrong: bool) -> tuple[str, str, str]:
        steps, acc = [], terms[0]
        # left-to-right with precedence handled by python at the end; the "reasoning" is a trace
        for o, t in zip(ops[1:], terms[1:]):
            steps.append(f"Next I apply {o} {t} to the running expression.")
        steps.append(f"Evaluating with the usual precedence rules gives {value}.")
        if style == "deepseek":
            steps.insert(0, "Okay, let me think about this step by step.")
            steps.append("Wait, let me double check the multiplications first. Yes, that holds.")
        else:
            steps.insert(0, "Let's break the expression into its terms.")
        answer = value + (rng.choice([-1, 1]) * rng.randint(1, 9) if wrong else 0)
        attempt = f"The value of {expr} is $\\boxed{{{answer}}}$."
        return " ".join(steps), attempt, ("No" if wrong else "Yes")

    ds_traj, ds_att, ds_grade = trajectory("deepseek", rng.random() < 0.2)
    gm_traj, gm_att, gm_grade = trajectory("gemini", rng.random() < 0.3)
    return {
        "solution": str(value),
        "question": question,
        "cot_type": "math",
        "source_type": "synthetic/arithmetic",
        "metadata": json.dumps({"id": i, "n_terms": n_terms}),
        "gemini_thinking_trajectory": gm_traj,
        "gemini_attempt": gm_att,
        "gemini_grade": gm_grade,
        "gemini_grade_reason": "matches" if gm_grade == "Yes" else "off by a small amount",
        "deepseek_thinking_trajectory": ds_traj,
        "deepseek_attempt": ds_att,
        "deepseek_grade": ds_grade,
        "deepseek_grade_reason": "matches" if ds_grade == "Yes" else "off by a small amount",
        # curated-data quality in [0, 1]: graded-correct traces score high, longer ones a bit lower
        "quality": round((0.9 if ds_grade == "Yes" else 0.2) * (1.0 - 0.05 * (n_terms - 2)), 3),
    }


def make_dataset(path: Path, n: int = 64, seed: int = 1234) -> list[dict]:
    rng = random.Random(seed)
    rows = [make_example(rng, i) for i in range(n)]
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return rows


def make_tokenizer(out_dir: Path, rows: list[dict], vocab_size: int = 2048) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = []
    for r in rows:
        for k in ("question", "deepseek_thinking_trajectory", "deepseek_attempt",
                  "gemini_thinking_trajectory", "gemini_attempt"):
            texts.append(r[k])
    texts += ["You are a helpful assistant.", "system\nuser\nassistant\n", "<think>\n</think>\n\n"]
    tok.train_from_iterator(texts, trainer=trainer)

    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=32768,
    )
    fast.chat_template = QWEN_CHAT_TEMPLATE
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    # a class name that transformers 4.x and 5.x both load as a plain fast tokenizer
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["chat_template"] = QWEN_CHAT_TEMPLATE  # older transformers do not read the .jinja file
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def make_model_config(out_dir: Path, tok_dir: Path) -> None:
    from transformers import AutoTokenizer, Qwen2Config

    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = Qwen2Config(
        vocab_size=151936,  # Qwen2.5's real vocabulary: the lm_head is full size
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,  # like Qwen2.5-0.5B..3B
        bos_token_id=None,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(out_dir)


def main() -> None:
    ASSETS.mkdir(parents=True, exist_ok=True)
    rows = make_dataset(ASSETS / "s1k_tiny.jsonl")
    make_tokenizer(ASSETS / "tokenizer", rows)
    make_model_config(ASSETS / "model", ASSETS / "tokenizer")
    print(f"wrote assets to {ASSETS}")


if __name__ == "__main__":
    main()
