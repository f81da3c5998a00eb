"""Batched generation with transformers (left padding, no grad, fp32 on CPU): greedy for
evaluation, plain ancestral sampling at temperature 1 (top_k 0, top_p 1: the model's own
distribution, so the starting model's log-probs are exactly the data-generating policy's)
for curation. Each row stops at its first complete "The answer is N" (task.STOP)."""

from __future__ import annotations

import time

import torch

from . import task


def load(path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model, tok


class _StopAtAnswer:
    """A StoppingCriteria: per row, done once the new text holds a complete answer."""

    def __init__(self, tok, prompt_len: int):
        self.tok, self.prompt_len = tok, prompt_len

    def __call__(self, input_ids, scores, **kw):
        texts = self.tok.batch_decode(input_ids[:, self.prompt_len:], skip_special_tokens=True)
        return torch.tensor([bool(task.STOP.search(t)) for t in texts],
                            device=input_ids.device)


def _prompt_ids(tok, problems: list) -> list[list[int]]:
    texts = [tok.apply_chat_template(task.messages(p), tokenize=False, add_generation_prompt=True)
             for p in problems]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def _common_prefix(rows: list[list[int]]) -> int:
    n = min(len(r) for r in rows)
    for i in range(n):
        if any(r[i] != rows[0][i] for r in rows):
            return i
    return n


@torch.no_grad()
def generate(model, tok, problems: list, *, sample: bool, seed: int = 0, batch_size: int = 32,
             max_new_tokens: int = 32, prefix_cache: bool = True) -> tuple[list[str], dict]:
    """Responses (cut at the first answer sentence) and timing: generated tokens, seconds.

    prefix_cache: every prompt starts with the same tokens (system message + worked example,
    ~75 of ~100 tokens); their keys/values are computed once and reused by every batch, the
    rest of each prompt is left-padded after them (attention mask 0 on the padding, positions
    continue from the prefix). The same model, the same distribution: only the prefill work
    changes (measured: the same greedy answers as without it, tests/repro)."""
    import copy

    from transformers import DynamicCache, StoppingCriteriaList

    out, n_tok, t0 = [], 0, time.perf_counter()
    ids = _prompt_ids(tok, problems)
    pad = tok.pad_token_id
    P = _common_prefix(ids) - 1 if prefix_cache and len(ids) > 1 else 0  # >= 1 token uncached
    base = None
    if P > 0:
        base = DynamicCache(config=model.config)
        model(input_ids=torch.tensor([ids[0][:P]]), cache=base, use_cache=True)
    kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if sample else \
        dict(do_sample=False, temperature=None, top_k=None, top_p=None)
    for b, i in enumerate(range(0, len(ids), batch_size)):
        rows = ids[i:i + batch_size]
        L = max(len(r) for r in rows)
        input_ids = torch.tensor([r[:P] + [pad] * (L - len(r)) + r[P:] for r in rows])
        mask = torch.tensor([[1] * P + [0] * (L - len(r)) + [1] * (len(r) - P) for r in rows])
        extra = {}
        if base is not None:
            cache = copy.deepcopy(base)
            cache.batch_repeat_interleave(len(rows))
            extra["cache"] = cache
        if sample:
            torch.manual_seed(seed * 100003 + b)
        g = model.generate(input_ids=input_ids, attention_mask=mask,
                           max_new_tokens=max_new_tokens, pad_token_id=pad,
                           stopping_criteria=StoppingCriteriaList([_StopAtAnswer(tok, L)]),
                           **extra, **kw)
        new = g[:, L:]
        n_tok += int((new != pad).sum())
        out += [task.cut(t) for t in tok.batch_decode(new, skip_special_tokens=True)]
    return out, {"gen_tokens": n_tok, "seconds": time.perf_counter() - t0}


def evaluate(model, tok, problems: list, **kw) -> dict:
    resp, timing = generate(model, tok, problems, sample=False, **kw)
    ok = [task.check(p, r) for p, r in zip(problems, resp)]
    fmt = [task.parse(r) is not None for r in resp]
    by_op = {op: [o for o, p in zip(ok, problems) if p.op == op] for op in ("+", "-")}
    return {"accuracy": sum(ok) / len(ok), "format": sum(fmt) / len(fmt),
            "accuracy_by_op": {op: (sum(v) / len(v) if v else None) for op, v in by_op.items()},
            "n": len(ok), "correct": [int(x) for x in ok], "responses": resp[:8], **timing}
