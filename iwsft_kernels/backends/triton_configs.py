"""Block sizes of the Triton kernels, kept apart from the kernels.

CUDA choices target sm_90 (H100): 128x128 bf16 tiles with a 64-wide K step keep the tensor
cores fed with 3 pipeline stages in ~96 KB of shared memory; fp32 inputs use smaller tiles
(twice the bytes per element). Not yet tuned on hardware (see README: no GPU run yet).
Under TRITON_INTERPRET=1 small tiles are used so that CPU tests exercise every mask on odd
shapes quickly.
"""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def lse_config(dtype: torch.dtype) -> dict:
    """Fused logits-tile + online logsumexp + target logit (triton_lse.py)."""
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, num_warps=1, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)


def epilogue_config() -> dict:
    """Row-wise passes over a materialised logits chunk (triton_epilogue.py)."""
    if interpreting():
        return dict(BLOCK_V=32, num_warps=1)
    return dict(BLOCK_V=4096, num_warps=8)


def grad_weight_config(dtype: torch.dtype) -> dict:
    """dW += G^T h accumulation (triton_grad_weight.py)."""
    if interpreting():
        return dict(BLOCK_V=16, BLOCK_H=32, BLOCK_K=16, num_warps=1, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_V=64, BLOCK_H=64, BLOCK_K=32, num_warps=4, num_stages=3)
    return dict(BLOCK_V=128, BLOCK_H=128, BLOCK_K=64, num_warps=8, num_stages=3)


def lse_num_splits(m_blocks: int, n_tiles: int, device: torch.device) -> int:
    """Split the vocabulary across programs when there are too few row blocks to fill the
    GPU (partial logsumexps are merged afterwards)."""
    if interpreting() or device.type != "cuda":
        return min(n_tiles, 3)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_tiles, -(-4 * sms // max(m_blocks, 1))))
