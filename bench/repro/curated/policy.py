"""The tiny policy: a character-level tokenizer with a Qwen-style chat template, a random-init
Qwen2 model saved as a local model folder (what ``iwsft-train --model`` loads), and batched
sampling / evaluation with the exact checker."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from . import task

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ROLES = ["user", "assistant", "system"]  # whole-word tokens (short sequences: faster on CPU)
CHARS = sorted(set("0123456789+-*=;#\n"))
# Qwen's ChatML template, without the default system prompt (it would only add tokens here)
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def build_tokenizer():
    """Character-level tokenizer (a BPE with no merges), fast, with offsets."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from tokenizers import AddedToken

    vocab = {t: i for i, t in enumerate(SPECIAL + ROLES + CHARS)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.add_special_tokens(SPECIAL)
    backend.add_tokens([AddedToken(r, normalized=False) for r in ROLES])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>",
                                  additional_special_tokens=["<|im_start|>"])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_model_dir(path: Path, *, hidden: int = 128, layers: int = 4, heads: int = 4,
                   seed: int = 0) -> Path:
    """A random-init Qwen2 model + tokenizer, saved with save_pretrained."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    tok = build_tokenizer()
    vocab = ((len(tok) + 7) // 8) * 8
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=heads, max_position_embeddings=128,
                      tie_word_embeddings=True, bos_token_id=None,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    return path


def save_tokenizer(path: Path) -> Path:
    """The tokenizer goes in its own folder (passed as ``--tokenizer``): next to a Qwen2
    config.json, transformers' AutoTokenizer would load it as a Qwen2Tokenizer and replace
    the character-level pre-tokenization with Qwen's byte-level one (newlines get lost)."""
    build_tokenizer().save_pretrained(path)
    return path


def load(path: Path):
    from transformers import AutoModelForCausalLM

    tok = build_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model, tok


def prompt_ids(tok, problem: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": problem}], tokenize=False,
                                   add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def cache_argument(model) -> str:
    """The name of the KV-cache argument (and output) of `model`'s forward: ``cache`` in
    transformers >= 5.2x (``past_key_values`` there is deprecated, removed in 5.40), else
    ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters \
        else "past_key_values"


@torch.no_grad()
def sample(model, tok, problems: list[str], *, seed: int, temperature: float = 1.0,
           greedy: bool = False, max_new_tokens: int = 48, batch_size: int = 512) -> list[str]:
    """One response per problem (every prompt has the same length: no padding needed).
    Ancestral sampling from the model at `temperature` (top-k/top-p off), or greedy."""
    eos, out = tok.eos_token_id, []
    gen = torch.Generator().manual_seed(seed)
    for j in range(0, len(problems), batch_size):
        ids = torch.tensor([prompt_ids(tok, p) for p in problems[j:j + batch_size]])
        B = ids.shape[0]
        done = torch.zeros(B, dtype=torch.bool)
        new = torch.full((B, max_new_tokens), eos, dtype=torch.long)
        cache_kw, past, x = cache_argument(model), None, ids
        for t in range(max_new_tokens):
            o = model(input_ids=x, use_cache=True, **({cache_kw: past} if past is not None else {}))
            past = o[cache_kw]
            logits = o.logits[:, -1].float()
            if greedy:
                nxt = logits.argmax(-1)
            else:
                probs = torch.softmax(logits / temperature, -1)
                nxt = torch.multinomial(probs, 1, generator=gen).squeeze(1)
            nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
            new[:, t] = nxt
            done |= nxt == eos
            if done.all():
                break
            x = nxt[:, None]
        for row in new.tolist():
            k = row.index(eos) if eos in row else len(row)
            # char-level: join without spaces; ids past the tokenizer (vocab padding) -> "?"
            out.append("".join(t or "?" for t in tok.convert_ids_to_tokens(row[:k])))
    return out


def evaluate(model, tok, problems: list[str], *, seed: int, n_samples: int = 1) -> dict:
    """Success rate of sampled answers (T = 1: the expected reward of the policy), of greedy
    answers, and the fraction of sampled answers in the no-work 'shortcut' style."""
    ok, short = [], []
    for k in range(n_samples):
        resp = sample(model, tok, problems, seed=seed * 1000 + k)
        ok += [task.check(p, r) for p, r in zip(problems, resp)]
        short += [task.style_of(r) == "shortcut" for r in resp]
    g = sample(model, tok, problems, seed=0, greedy=True)
    gok = [task.check(p, r) for p, r in zip(problems, g)]
    sc = [o for o, s in zip(ok, short) if s]
    wk = [o for o, s in zip(ok, short) if not s]
    return {"success": sum(ok) / len(ok), "greedy_success": sum(gok) / len(gok),
            "shortcut_frac": sum(short) / len(short),
            "success_shortcut": sum(sc) / len(sc) if sc else None,
            "success_worked": sum(wk) / len(wk) if wk else None,
            "n": len(ok)}
