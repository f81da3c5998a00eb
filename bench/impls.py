"""The competitors of the loss benchmark, each behind one small interface.

An ``Impl`` builds, from ``BenchInputs``, a zero-argument callable that returns the scalar
training loss (mean over target tokens) with autograd wired to ``hidden`` and ``weight``.
``unavailable(device)`` returns why the impl cannot run here (recorded as "n/a"), or None.

Peers compute plain cross-entropy (TRL's function: per-token log-probs, summed to the same
loss) and are compared against our ``sft`` mode; our ``token``
and ``sequence`` modes sit beside them so the price of the weights is visible.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from bench.oracle import IGNORE_INDEX, BenchInputs


@dataclass(frozen=True)
class Impl:
    key: str  # stable id used on the command line and in the JSON
    label: str  # human-readable name for tables and plots
    mode: str  # which oracle it is checked against: "sft" | "token" | "sequence"
    family: str  # "peer" | "ours"
    build: Callable[[BenchInputs, dict], Callable[[], torch.Tensor]]
    unavailable: Callable[[torch.device], str | None]
    jit: bool = False  # compiles on first call (torch.compile / Triton): needs a warm-up call


# --------------------------------------------------------------------------- peers


def _build_naive(inp: BenchInputs, opts: dict):
    """What transformers does: materialise the logits, upcast to fp32, F.cross_entropy."""
    def fn():
        logits = inp.hidden @ inp.weight.T
        return F.cross_entropy(logits.float(), inp.labels, ignore_index=IGNORE_INDEX)
    return fn


def _chunk_rows(n: int, v: int, budget_bytes: int) -> int:
    """Largest power of two of rows whose fp32 logits fit the budget, at most n."""
    rows = max(1, budget_bytes // (v * 4))
    rows = 1 << int(math.log2(rows))
    return max(1, min(rows, n))


def _ce_chunk_grads(h, w, y, inv_d):
    """Loss sum, dH and dW of one row chunk of cross-entropy (compiled by torch.compile)."""
    z = (h @ w.T).float()
    valid = y != IGNORE_INDEX
    yc = torch.where(valid, y, torch.zeros_like(y))
    lse = torch.logsumexp(z, dim=1)
    tgt = z.gather(1, yc[:, None]).squeeze(1)
    loss = ((lse - tgt) * valid).sum()
    g = torch.exp(z - lse[:, None])
    g = g - F.one_hot(yc, z.shape[1]).to(g.dtype)
    g = (g * (valid.to(g.dtype) * inv_d)[:, None]).to(h.dtype)
    return loss, g @ w, (g.T @ h).float()


_compiled_chunk = None


def _get_compiled_chunk():
    global _compiled_chunk
    if _compiled_chunk is None:
        _compiled_chunk = torch.compile(_ce_chunk_grads, dynamic=False, fullgraph=True)
    return _compiled_chunk


class _CompiledChunkedCE(torch.autograd.Function):
    """Chunked CE computing grads in forward (the 'torch.compile chunked loss' recipe)."""

    @staticmethod
    def forward(ctx, h, w, y, rows):
        chunk = _get_compiled_chunk()
        inv_d = 1.0 / max(1, int((y != IGNORE_INDEX).sum()))
        dh = torch.empty_like(h)
        dw = None  # fp32 accumulator: the first chunk's dW (the recipe's per-chunk V x H temp)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, h.shape[0], rows):
            l_c, dh_c, dw_c = chunk(h[s:s + rows], w, y[s:s + rows], inv_d)
            loss += l_c
            dh[s:s + rows] = dh_c
            if dw is None:
                dw = dw_c
            else:
                dw += dw_c
            del dw_c
        ctx.save_for_backward(dh, dw.to(w.dtype))
        return loss * inv_d

    @staticmethod
    def backward(ctx, grad_out):
        # grads were computed in forward; scale them in place (no second V x H buffer)
        dh, dw = ctx.saved_tensors
        return dh.mul_(grad_out), dw.mul_(grad_out), None, None


def _build_compile_chunked(inp: BenchInputs, opts: dict):
    n, _ = inp.hidden.shape
    v = inp.weight.shape[0]
    rows = _chunk_rows(n, v, opts.get("peer_chunk_bytes", 1 << 30))

    def fn():
        return _CompiledChunkedCE.apply(inp.hidden, inp.weight, inp.labels, rows)
    return fn


def _unavail_compile(device):
    if device.type == "cpu" and not any(os.path.exists(os.path.join(p, "cc"))
                                        for p in os.environ.get("PATH", "").split(":")):
        return "n/a (no C compiler for inductor)"
    return None


def _build_torch_lce(inp: BenchInputs, opts: dict):
    opt = torch.nn.LinearCrossEntropyOptions()

    def fn():
        return F.linear_cross_entropy(inp.hidden, inp.weight, inp.labels,
                                      ignore_index=IGNORE_INDEX, options=opt)
    return fn


def _unavail_torch_lce(device):
    if not (hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")):
        return f"n/a (torch {torch.__version__.split('+')[0]} has no fused linear CE)"
    return None


def _build_liger(inp: BenchInputs, opts: dict):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    mod = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX)

    def fn():
        return mod(inp.weight, inp.hidden, inp.labels)
    return fn


def _unavail_liger(device):
    # Liger's Triton kernels also run on CPU tensors under TRITON_INTERPRET=1 (checked at
    # tiny shapes; far too slow at V = 151,936). CCE's do not (InterpreterError).
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "n/a (CUDA only; runs on CPU only under TRITON_INTERPRET=1)"
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the machine
        return f"n/a (liger-kernel not importable: {type(e).__name__})"
    return None


def _build_cce(inp: BenchInputs, opts: dict):
    from cut_cross_entropy import linear_cross_entropy

    def fn():
        return linear_cross_entropy(inp.hidden, inp.weight, inp.labels,
                                    ignore_index=IGNORE_INDEX, impl="cce")
    return fn


def _unavail_cce(device):
    if device.type != "cuda":
        return "n/a (CUDA only)"
    try:
        import cut_cross_entropy  # noqa: F401
    except Exception as e:  # pragma: no cover
        return f"n/a (cut-cross-entropy not importable: {type(e).__name__})"
    return None


def _build_trl(inp: BenchInputs, opts: dict):
    """TRL's chunked log-prob function, called as TRL's fused LM head calls it on CUDA: the
    target rows only (hidden[mask]), vocabulary tiles of 32,768 columns (TRL's default),
    temperature 1, loss = -sum(logp) / targets. Log-probs only (outputs=()); SFTTrainer also
    asks for entropy and is_top1 for its logs, which adds element-wise work in forward."""
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    try:
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as chunk
    except Exception:  # pragma: no cover - private name; TRL 1.16's value
        chunk = 32768
    mask = inp.labels != IGNORE_INDEX

    def fn():
        logp = ChunkedLogProbFunction.apply(inp.hidden[mask], inp.weight, None,
                                            inp.labels[mask], 1.0, chunk, None, 1.0, ())[0]
        return -logp.sum() / mask.sum().clamp(min=1)
    return fn


def _unavail_trl(device):
    try:
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction  # noqa: F401
    except Exception as e:
        return f"n/a (trl >= 1.16 with trl.kernels.chunked_logprob needed: {type(e).__name__})"
    return None


# --------------------------------------------------------------------------- ours


def _build_ours(mode: str, backend: str):
    def build(inp: BenchInputs, opts: dict):
        from iwsft_kernels import IWConfig, linear_iwsft_loss
        cfg = IWConfig(mode=mode)
        ref = None if mode == "sft" else inp.ref_logprobs
        kw = {}
        if opts.get("chunk_bytes") is not None:
            kw["chunk_bytes"] = opts["chunk_bytes"]

        def fn():
            out = linear_iwsft_loss(inp.hidden, inp.weight, inp.labels, ref,
                                    cu_seqlens=inp.cu_seqlens, config=cfg,
                                    ignore_index=IGNORE_INDEX, backend=backend, **kw)
            return out.loss
        return fn
    return build


def _unavail_ours(backend: str):
    def check(device):
        try:
            import iwsft_kernels
            iwsft_kernels.linear_iwsft_loss  # noqa: B018
        except Exception as e:
            return f"n/a (iwsft_kernels not importable: {type(e).__name__}: {e})"[:160]
        if backend == "triton" and device.type == "cpu":
            if os.environ.get("TRITON_INTERPRET") != "1":
                return "n/a on CPU (Triton kernels run only under TRITON_INTERPRET=1)"
        return None
    return check


def all_impls() -> list[Impl]:
    impls = [
        Impl("naive", "naive torch (fp32 logits + F.cross_entropy)", "sft", "peer",
             _build_naive, lambda d: None),
        Impl("compile_chunked", "torch.compile chunked CE", "sft", "peer",
             _build_compile_chunked, _unavail_compile, jit=True),
        Impl("torch_lce", "torch F.linear_cross_entropy (chunked)", "sft", "peer",
             _build_torch_lce, _unavail_torch_lce),
        Impl("trl", "TRL ChunkedLogProbFunction", "sft", "peer", _build_trl, _unavail_trl,
             jit=False),  # Triton on CUDA (compiled in the GPU warm-up), torch ops on CPU
        Impl("liger", "Liger FusedLinearCrossEntropy", "sft", "peer",
             _build_liger, _unavail_liger, jit=True),
        Impl("cce", "Cut Cross-Entropy", "sft", "peer", _build_cce, _unavail_cce, jit=True),
    ]
    for backend in ("torch", "triton"):
        for mode in ("sft", "token", "sequence"):
            impls.append(Impl(f"ours-{mode}-{backend}", f"ours {mode} ({backend})", mode,
                              "ours", _build_ours(mode, backend), _unavail_ours(backend),
                              jit=backend == "triton"))
    return impls


def get_impls(keys: list[str] | None = None) -> list[Impl]:
    impls = all_impls()
    if not keys:
        return impls
    by_key = {i.key: i for i in impls}
    missing = [k for k in keys if k not in by_key]
    if missing:
        raise SystemExit(f"unknown impl(s) {missing}; known: {sorted(by_key)}")
    return [by_key[k] for k in keys]
