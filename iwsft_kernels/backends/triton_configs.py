"""Launch choices of the Triton kernels (block sizes, warps, stages, dot precision), kept
apart from the kernels.

CUDA choices target sm_90 (H100). Every one is compiled ahead of time for sm_90a in CI
(tests/test_sm90_compile.py; the full table: `python -m bench.sm90_report`, written to
bench/results/sm90-report.md), which checks that it compiles, does not spill registers, fits
the 227 KiB of dynamic shared memory and lowers its tile dots to Hopper `wgmma`. Not yet timed
on hardware (bench/tune_sm90.py is the sweep prepared for the first GPU hour).

Two paths per matmul kernel:
  aligned    every pointer 16-byte aligned and the hidden size / row strides multiples of 16
             (all real LM heads): Triton then vectorises the tile loads; the large tiles.
  unaligned  anything else: Triton falls back to narrow loads whose addresses take many more
             registers, and the large tiles spill (measured: 255 registers + spills). These
             launches take smaller tiles that compile without spills even with no alignment
             known at all.
fp32 inputs follow torch's matmul precision: TF32 tensor cores when torch allows TF32 for
CUDA matmuls (`torch.backends.cuda.matmul.allow_tf32 = True`, or
`torch.set_float32_matmul_precision("high" | "medium")`), IEEE fp32 (FMA, no tensor cores)
otherwise, like torch's own matmuls.

Under TRITON_INTERPRET=1 small tiles are used so that CPU tests exercise every mask on odd
shapes quickly.
"""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _interp(interpret: bool | None) -> bool:
    return interpreting() if interpret is None else interpret


def _tiles(bm, bn, bk, warps, stages, names=("BLOCK_M", "BLOCK_N", "BLOCK_K")) -> dict:
    return {names[0]: bm, names[1]: bn, names[2]: bk, "num_warps": warps, "num_stages": stages}


# ---------------------------------------------------------------------------- alignment


def aligned16(tensors=(), ints=()) -> bool:
    """True when every tensor's data pointer is 16-byte aligned and every int is a multiple of
    16: then Triton specialises them (tt.divisibility = 16) and the aligned tiles are safe.
    None entries (an absent bias) are skipped."""
    return (all(t is None or t.data_ptr() % 16 == 0 for t in tensors)
            and all(int(i) % 16 == 0 for i in ints))


# ---------------------------------------------------------------------------- precision


def fp32_dot_precision() -> str:
    """'tf32' when torch allows TF32 for fp32 CUDA matmuls, else 'ieee'.

    Reads torch.backends.cuda.matmul.fp32_precision (torch >= 2.9; it reflects the legacy
    `allow_tf32` / `set_float32_matmul_precision` settings too, and 'none' defers to
    torch.backends.fp32_precision); older torch: allow_tf32."""
    mm = torch.backends.cuda.matmul
    prec = getattr(mm, "fp32_precision", None)
    if prec is None:
        return "tf32" if mm.allow_tf32 else "ieee"
    if prec == "none":
        prec = getattr(torch.backends, "fp32_precision", "none")
    return "tf32" if prec == "tf32" else "ieee"


def dot_precision(dtype: torch.dtype) -> str:
    """input_precision of the kernels' tl.dot for inputs of this dtype. 16-bit inputs always
    run on the tensor cores; the value only matters for fp32."""
    return fp32_dot_precision() if dtype == torch.float32 else "tf32"


# ---------------------------------------------------------------------------- CUDA tables
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); sm_90a registers / shared memory as
# measured by bench/sm90_report.py with Triton 3.6 are in bench/results/sm90-report.md.

# 16-bit: 128x128 tiles, 64-wide K steps, 3 stages: 96 KiB of shared memory, wgmma.
LSE_16BIT = _tiles(128, 128, 64, 8, 3)
# fp32 with TF32: the same tile with a 32-wide K step (the same bytes per stage), wgmma tf32.
LSE_FP32_TF32 = _tiles(128, 128, 32, 8, 3)
# fp32 IEEE (FMA): 128x128 tiles spill even when aligned; this one does not, aligned or not.
LSE_FP32 = _tiles(64, 128, 32, 8, 3)
# unaligned 16-bit inputs
LSE_16BIT_UNALIGNED = _tiles(128, 64, 32, 8, 3)
# unaligned fp32 inputs (TF32 or IEEE)
LSE_FP32_UNALIGNED = LSE_FP32
# unaligned fp32 IEEE with the entropy sum S1 (WANT_ENTROPY): the 32-wide K step of
# LSE_FP32_UNALIGNED spills there (255 registers, 40/36 bytes); a 16-wide one does not
LSE_FP32_UNALIGNED_ENTROPY = _tiles(64, 128, 16, 8, 3)

_GW = ("BLOCK_V", "BLOCK_H", "BLOCK_K")
GRAD_WEIGHT_16BIT = _tiles(128, 128, 64, 8, 3, _GW)
GRAD_WEIGHT_16BIT_UNALIGNED = _tiles(128, 64, 32, 8, 3, _GW)

EPILOGUE = dict(BLOCK_V=4096, num_warps=8)

_INTERPRET_LSE = _tiles(16, 32, 16, 1, 1)
_INTERPRET_GW = _tiles(16, 32, 16, 1, 1, _GW)
_INTERPRET_EPILOGUE = dict(BLOCK_V=32, num_warps=1)


def lse_config(dtype: torch.dtype, *, aligned: bool = True, precision: str = "ieee",
               entropy: bool = False, interpret: bool | None = None) -> dict:
    """Fused logits-tile + online logsumexp + target logit (triton_lse.py). `precision` is
    the fp32 dot precision ('tf32' | 'ieee'); ignored for 16-bit inputs. `entropy`: the
    kernel also carries the entropy sum (WANT_ENTROPY)."""
    if _interp(interpret):
        return dict(_INTERPRET_LSE)
    if dtype == torch.float32:
        if not aligned:
            return dict(LSE_FP32_UNALIGNED_ENTROPY if entropy and precision != "tf32"
                        else LSE_FP32_UNALIGNED)
        return dict(LSE_FP32_TF32 if precision == "tf32" else LSE_FP32)
    return dict(LSE_16BIT if aligned else LSE_16BIT_UNALIGNED)


def grad_weight_config(dtype: torch.dtype, *, aligned: bool = True,
                       interpret: bool | None = None) -> dict:
    """dW += G^T h accumulation (triton_grad_weight.py); 16-bit G and h only (fp32 dW runs
    on cuBLAS: addmm_)."""
    if dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"the Triton dW kernel takes bf16/fp16 inputs, got {dtype}")
    if _interp(interpret):
        return dict(_INTERPRET_GW)
    return dict(GRAD_WEIGHT_16BIT if aligned else GRAD_WEIGHT_16BIT_UNALIGNED)


def epilogue_config(interpret: bool | None = None) -> dict:
    """Row-wise passes over a materialised logits chunk (triton_epilogue.py): no dots; one
    config compiles without spills for any alignment."""
    return dict(_INTERPRET_EPILOGUE if _interp(interpret) else EPILOGUE)


def lse_num_splits(m_blocks: int, n_tiles: int, device: torch.device) -> int:
    """Split the vocabulary across programs when there are too few row blocks to fill the
    GPU (partial logsumexps are merged afterwards)."""
    if interpreting() or device.type != "cuda":
        return min(n_tiles, 3)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_tiles, -(-4 * sms // max(m_blocks, 1))))


def padded_row_stride(n_cols: int) -> int:
    """Row stride (elements) for an (m, n_cols) buffer that a Triton kernel will read by rows:
    n_cols rounded up to a multiple of 16, so that the rows stay 16-element aligned."""
    return -(-n_cols // 16) * 16
