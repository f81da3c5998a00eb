"""The shared core of the loss: input validation and preparation, backend choice, and the
forward on prepared inputs. Used by both callers of the computation: the eager autograd path
(loss.py, the public face) and the registered custom op (ops.py, what torch.compile sees).

    loss.py  ->  ops.py  ->  core.py  ->  backends/ (chunked algorithm, torch / native CPU /
    Triton ops)  ->  kernels

Nothing here imports loss.py or ops.py. See docs/design.md for the math and the kernel plan.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from .backends.chunked import fused_linear_iw, rows_per_chunk
from .backends.rows import RowStats
from .backends.torch_ops import TorchOps
from .backends.vocab_merge import VocabParallelOps, VocabShard, reduce_grad_hidden
from .config import IDENTITY, OUTPUTS, LogitTransform

BACKENDS = ("auto", "triton", "torch")
# Default size of one logits chunk (when the caller gives no chunk_bytes). A chunk of m rows
# holds an fp32 (m, V) logits block (plus a compute-dtype copy for 16-bit inputs), so the
# default is relative to the call's M target rows:
#   rows = min(rows fitting DEFAULT_CHUNK_BYTES, max(DEFAULT_MIN_CHUNK_ROWS, ceil(M / 16)))
# i.e. a chunk is ~1/16 of the batch's own materialised logits (which the naive path holds,
# plus their gradient), so our extra memory stays a small fraction of naive's as the batch
# grows; the row floor keeps the chunk GEMMs efficient (each chunk re-reads W twice and
# rewrites the fp32 dW once); the byte cap is the fixed budget of earlier versions.
# CPU: floor 64 rows, cap 128 MiB (220 fp32 rows at V = 151,936). Measured on 2 shared EPYC
# cores at N = 512 (README): 64 rows cost ~1.15x naive's time, 32 rows ~1.4x, >= 96 rows
# <= 1.03x. CUDA: floor 2048 rows (an H100's GEMMs want >= ~2k rows to stay compute-bound),
# cap 1 GiB, which binds first at Qwen vocabularies (1,176 bf16 rows at V = 152,064): there
# the default is the cap, as before.
DEFAULT_CHUNK_BYTES = {"cpu": 128 * 2**20, "cuda": 1024 * 2**20}  # the cap
DEFAULT_MIN_CHUNK_ROWS = {"cpu": 64, "cuda": 2048}
DEFAULT_CHUNK_FRACTION = 16  # default chunk = ceil(M / 16) rows, within floor and cap


# ----------------------------------------------------------------------------- dispatch
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def check_backend_name(backend) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def check_chunk_bytes(chunk_bytes) -> None:
    if chunk_bytes is not None and (isinstance(chunk_bytes, bool)
                                    or not isinstance(chunk_bytes, int) or chunk_bytes <= 0):
        raise ValueError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")


def check_outputs(outputs) -> tuple:
    """The requested fused per-token outputs as a tuple of names from config.OUTPUTS, in
    OUTPUTS order ("entropy" alone is also accepted as a single name)."""
    if isinstance(outputs, str):
        outputs = (outputs,)
    try:
        names = list(outputs)
    except TypeError:
        raise TypeError(f"outputs must be a tuple of names from {OUTPUTS}, got {outputs!r}")
    bad = [n for n in names if not isinstance(n, str) or n not in OUTPUTS]
    if bad:
        raise ValueError(f"unknown outputs {bad!r}: allowed are {OUTPUTS}")
    return tuple(n for n in OUTPUTS if n in names)


def make_transform(logit_scale=1.0, logit_softcap=None, logit_temperature=1.0) -> LogitTransform:
    """config.LogitTransform of the public kwargs (its ValueErrors name the bad value)."""
    if isinstance(logit_scale, LogitTransform):
        raise TypeError("logit_scale must be a number (pass the transform's fields as "
                        "logit_scale / logit_softcap / logit_temperature)")
    return LogitTransform(scale=logit_scale, softcap=logit_softcap,
                          temperature=logit_temperature)


def check_z_loss(z_loss) -> float:
    if isinstance(z_loss, bool) or not isinstance(z_loss, (int, float)) \
            or not math.isfinite(z_loss) or z_loss < 0:
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss!r}")
    return float(z_loss)


def resolve_backend(backend: str, device: torch.device) -> str:
    check_backend_name(backend)
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_available() else "torch"
    if backend == "triton":
        if not _triton_available():
            raise ValueError("backend='triton' requested but the 'triton' package is not installed")
        if device.type == "cuda":
            return "triton"
        if device.type == "cpu" and _interpreting():
            return "triton"
        raise ValueError(
            f"backend='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set "
            f"before triton is imported; got tensors on {device}")
    return "torch"


def select_ops(backend: str, device: torch.device | None = None):
    if backend == "torch":
        if device is None or device.type == "cpu":  # native CPU epilogue when it loads
            from .backends.native_cpu import native_ops

            ops = native_ops()
            if ops is not None:
                return ops
        return TorchOps()
    from .backends.triton_ops import TritonOps

    return TritonOps()


# --------------------------------------------------------------------------- validation
def check_float(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def check_int(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {t.dtype}")


@dataclass
class Prepared:
    N: int
    S: int
    idx: torch.Tensor | None  # target positions (None: all positions are targets)
    y: torch.Tensor  # (M,) int64
    seg: torch.Tensor  # (M,) int64
    ref: torch.Tensor | None  # (M,) fp32
    quality: torch.Tensor | None  # (S,) fp32
    D: float


def prepare(hidden, weight, labels, ref_logprobs, cu_seqlens, bias, quality, config,
             ignore_index, normalizer, need_ref, vocab_size: int | None = None) -> Prepared:
    """Validate and prepare; vocab_size: the global V of the labels when weight is one
    vocabulary shard (default: weight's rows)."""
    check_float("hidden", hidden)
    check_float("weight", weight)
    check_int("labels", labels)
    if hidden.dim() < 1 or weight.dim() != 2:
        raise ValueError(f"hidden must be (..., H) and weight (V, H); got hidden "
                         f"{tuple(hidden.shape)}, weight {tuple(weight.shape)}")
    V, H = weight.shape
    V_labels = V if vocab_size is None else int(vocab_size)
    if hidden.shape[-1] != H:
        raise ValueError(f"hidden's last dim ({hidden.shape[-1]}) must equal weight's H ({H}); "
                         f"hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal hidden.shape[:-1] "
                         f"{tuple(hidden.shape[:-1])}")
    tensors = {"hidden": hidden, "weight": weight, "labels": labels}
    if bias is not None:
        check_float("bias", bias)
        if tuple(bias.shape) != (V,):
            raise ValueError(f"bias must have shape ({V},), got {tuple(bias.shape)}")
        tensors["bias"] = bias
    if ref_logprobs is not None:
        check_float("ref_logprobs", ref_logprobs)
        if tuple(ref_logprobs.shape) != tuple(labels.shape):
            raise ValueError(f"ref_logprobs shape {tuple(ref_logprobs.shape)} must equal labels "
                             f"shape {tuple(labels.shape)}")
        tensors["ref_logprobs"] = ref_logprobs
    elif need_ref:
        raise ValueError(f"ref_logprobs is required in mode {config.mode!r} (only mode='sft' "
                         f"works without reference log-probs)")
    if cu_seqlens is not None:
        check_int("cu_seqlens", cu_seqlens)
        tensors["cu_seqlens"] = cu_seqlens
    if quality is not None:
        if not isinstance(quality, torch.Tensor):
            raise TypeError(f"quality must be a torch.Tensor, got {type(quality).__name__}")
        tensors["quality"] = quality
    devices = {k: t.device for k, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError("all tensors must be on the same device, got "
                         + ", ".join(f"{k}: {d}" for k, d in devices.items()))
    dev = hidden.device

    y_all = labels.reshape(-1)
    N = y_all.numel()
    mask = y_all != ignore_index
    bad = mask & ((y_all < 0) | (y_all >= V_labels))
    if bool(bad.any()):
        v = int(y_all[bad][0])
        raise ValueError(f"labels must be in [0, {V_labels}) or ignore_index ({ignore_index}); "
                         f"found {v}")

    # sequence id of every position
    if cu_seqlens is not None:
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens must be 1-D with S+1 >= 2 entries, got shape "
                             f"{tuple(cu_seqlens.shape)}")
        cu = cu_seqlens.long()
        if int(cu[0]) != 0:
            raise ValueError(f"cu_seqlens must start at 0, got {int(cu[0])}")
        if int(cu[-1]) != N:
            raise ValueError(f"cu_seqlens must end at the number of positions N={N}, got "
                             f"{int(cu[-1])}")
        if bool((cu[1:] < cu[:-1]).any()):
            raise ValueError("cu_seqlens must be non-decreasing")
        S = cu.numel() - 1
        seg_all = torch.searchsorted(cu[1:], torch.arange(N, device=dev), right=True)
    elif labels.dim() == 2:
        S, T = labels.shape
        seg_all = torch.arange(N, device=dev) // max(T, 1)
    elif labels.dim() <= 1:
        S = 1
        seg_all = torch.zeros(N, dtype=torch.long, device=dev)
    else:
        raise ValueError(f"labels of shape {tuple(labels.shape)}: pass a (B, T) or flat (N,) "
                         f"layout, or give cu_seqlens for the flattened positions")

    if quality is not None:
        if tuple(quality.shape) != (S,):
            raise ValueError(f"quality must have one entry per sequence, shape ({S},), got "
                             f"{tuple(quality.shape)}")
        quality = quality.float()
        if not bool(torch.isfinite(quality).all()) or bool((quality < 0).any()):
            raise ValueError("quality must be finite and >= 0")

    all_targets = bool(mask.all())
    idx = None if all_targets else mask.nonzero().squeeze(1)
    pick = (lambda t: t) if idx is None else (lambda t: t[idx])
    y = pick(y_all).long()
    seg = pick(seg_all)
    ref = None
    if ref_logprobs is not None:
        ref = pick(ref_logprobs.reshape(-1)).float()
        if not bool(torch.isfinite(ref).all()):
            raise ValueError("ref_logprobs must be finite at target positions")
        if bool((ref > 0).any()):
            raise ValueError(f"ref_logprobs must be <= 0 at target positions (log-probs); max "
                             f"is {float(ref.max())}")

    M = y.numel()
    if normalizer is None:
        D = float(max(M, 1))
    else:
        try:
            D = float(normalizer)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"normalizer must be a number or 0-d tensor, got {normalizer!r}")
        if not math.isfinite(D) or D <= 0:
            raise ValueError(f"normalizer must be finite and > 0, got {D}")
    return Prepared(N=N, S=S, idx=idx, y=y, seg=seg, ref=ref, quality=quality, D=D)


def extra_fp32_buffers(backend: str, device, xf: LogitTransform,
                       shard: VocabShard | None = None) -> int:
    """Extra fp32 (m, V) buffers per chunk the backend's ops allocate under this transform
    (the torch ops' dz/dr buffer when a softcap is on; 0 otherwise); shard: for the ops of a
    vocabulary shard."""
    if xf.softcap is None:
        return 0
    ops = select_ops(backend, torch.device(device))
    if shard is not None:
        ops = VocabParallelOps(ops, shard)
    return int(getattr(ops, "softcap_extra_buffers", 0))


def default_chunk_rows(V: int, num_rows: int, compute_dtype, device_type: str,
                       extra_fp32: int = 0) -> int:
    """Rows per logits chunk when the caller gives no chunk_bytes (see DEFAULT_CHUNK_BYTES):
    ceil(num_rows / 16), at least the device's row floor, at most what fits its byte cap
    (counting ``extra_fp32`` more fp32 (m, V) buffers per chunk, see extra_fp32_buffers)."""
    dev = "cuda" if device_type == "cuda" else "cpu"
    cap = rows_per_chunk(V, compute_dtype, DEFAULT_CHUNK_BYTES[dev], extra_fp32)
    want = max(DEFAULT_MIN_CHUNK_ROWS[dev], -(-int(num_rows) // DEFAULT_CHUNK_FRACTION))
    return max(1, min(cap, want))


def chunk_rows_for(weight, chunk_bytes, compute_dtype, num_rows: int,
                   extra_fp32: int = 0, shard: VocabShard | None = None) -> int:
    """Rows per logits chunk for a call with num_rows target rows: the caller's chunk_bytes
    when given, else default_chunk_rows (both count ``extra_fp32`` extra fp32 buffers).
    A vocabulary shard sizes chunks on the group's largest shard (every rank then runs the
    same chunks, hence the same collectives)."""
    check_chunk_bytes(chunk_bytes)
    V = weight.shape[0] if shard is None else max(shard.max_rows, 1)
    if chunk_bytes is not None:
        return rows_per_chunk(V, compute_dtype, chunk_bytes, extra_fp32)
    return default_chunk_rows(V, num_rows, compute_dtype, weight.device.type, extra_fp32)


def setup_vocab_parallel(vocab_parallel, hidden, weight, bias, labels, ignore_index, validate):
    """(hidden, weight, bias, VocabShard or None, validate's result): the local tensors of this
    rank's vocabulary shard (from config.VocabParallel or a DTensor weight placed Shard(0)),
    checked across the group (one all-gather; vocab_shard.py). ``validate(hidden, weight, bias,
    vocab_size)`` runs the caller's own checks (prepare) BEFORE the all-gather, and their
    outcome travels with it: when any rank's inputs are rejected, every rank raises (the
    rejected ones their own error), instead of the others waiting in a collective. Labels are
    then checked against the global V. Plain single-rank inputs pass through."""
    from . import vocab_shard

    hidden, weight, bias, spec = vocab_shard.resolve(vocab_parallel, hidden, weight, bias)
    if spec is None:
        return hidden, weight, bias, None, validate(hidden, weight, bias, None)
    check_int("labels", labels)
    err = out = None
    try:
        vocab_shard.check_rows(spec, weight)
        out = validate(hidden, weight, bias, vocab_shard.NO_LABEL_LIMIT)
    except (ValueError, TypeError) as e:
        err = e
    shard = vocab_shard.check_group(spec, labels, ignore_index, hidden.device, err)
    y = labels.reshape(-1)
    bad = (y != ignore_index) & (y >= shard.V)
    if bool(bad.any()):
        raise ValueError(f"labels must be in [0, {shard.V}) (the global vocabulary of the "
                         f"shards) or ignore_index ({ignore_index}); found {int(y[bad][0])}")
    return hidden, weight, bias, shard, out


def scatter(values, idx, N):
    if idx is None:
        return values
    return torch.zeros(N, dtype=values.dtype, device=values.device).index_copy_(0, idx, values)


def forward_prepared(hidden, weight, bias, p: Prepared, config, be, chunk_rows, need_dh,
                     need_dw, need_db, xf: LogitTransform = IDENTITY, want_entropy=False,
                     z_loss=0.0, shard: VocabShard | None = None):
    """The loss computation on prepared inputs, no autograd: returns the FusedResult (its
    dh/dw/db cleared) and (dh, dw, db) in the inputs' shapes and dtypes (None if not needed).
    Shared by the eager autograd Function (loss.py) and the registered op (ops.py).
    xf: the logit transform; want_entropy: also the rows' entropy; z_loss: the z-loss
    coefficient (docs/design.md §9); shard: weight / bias are this rank's vocabulary shard
    (backends/vocab_merge.py; dH is summed over the group unless shard.sequence_parallel)."""
    compute_dtype = weight.dtype
    H = weight.shape[1]
    ops = select_ops(be, hidden.device)
    if shard is not None:
        ops = VocabParallelOps(ops, shard)
    with torch.no_grad():
        h = hidden.detach().reshape(-1, H)
        if p.idx is not None:
            h = h[p.idx]
        h = h.to(compute_dtype)
        W = weight.detach()
        b = None if bias is None else bias.detach().to(compute_dtype)
        res = fused_linear_iw(ops, h, W, b, p.y, p.ref, p.seg, p.S, p.quality, config, p.D,
                              need_dh=need_dh, need_dw=need_dw, need_db=need_db,
                              chunk_rows=chunk_rows, xf=xf, want_entropy=want_entropy,
                              z_loss=z_loss)
        dh = dw = db = None
        if need_dh:
            if shard is not None:
                reduce_grad_hidden(res.dh, shard)
            dh = res.dh.to(hidden.dtype)
            if p.idx is not None:
                dh = torch.zeros(p.N, H, dtype=hidden.dtype, device=hidden.device
                                 ).index_copy_(0, p.idx, dh)
            dh = dh.reshape(hidden.shape)
        if need_dw:
            dw = res.dw if weight.dtype == torch.float32 else res.dw.to(weight.dtype)
        if need_db:
            db = res.db.to(bias.dtype)
        res.dh = res.dw = res.db = None
    return res, (dh, dw, db)


def logprobs(hidden, weight, labels, bias, ignore_index, backend, chunk_bytes,
             xf: LogitTransform = IDENTITY, want_entropy: bool = False, vocab_parallel=None):
    """RowStats of every position (N,): logp (fp32 log-probs of the labels under the
    transformed logits), lse, top1, entropy (if asked); 0 / False at ignored positions; no
    grad, no logits kept. vocab_parallel: config.VocabParallel (a DTensor weight is detected)."""
    from .config import IWConfig

    check_float("hidden", hidden)

    def validate(hidden, weight, bias, V):
        be = resolve_backend(backend, hidden.device)
        return be, prepare(hidden, weight, labels, None, None, bias, None, IWConfig(mode="sft"),
                           ignore_index, None, need_ref=False, vocab_size=V)

    hidden, weight, bias, shard, (be, p) = setup_vocab_parallel(
        vocab_parallel, hidden, weight, bias, labels, ignore_index, validate)
    H = weight.shape[1]
    with torch.no_grad():
        h = hidden.detach().reshape(-1, H)
        if p.idx is not None:
            h = h[p.idx]
        h = h.to(weight.dtype)
        b = None if bias is None else bias.detach().to(weight.dtype)
        rows = chunk_rows_for(weight, chunk_bytes, weight.dtype, p.y.numel(),
                              extra_fp32_buffers(be, hidden.device, xf, shard), shard)
        ops = select_ops(be, hidden.device)
        if shard is not None:
            ops = VocabParallelOps(ops, shard)
        rs = ops.logprobs(h, weight.detach(), b, p.y, rows, xf, want_entropy)
    return RowStats(*(None if t is None else scatter(t, p.idx, p.N) for t in rs))
