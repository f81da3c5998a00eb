"""transformers integration: compute the fused iw-SFT loss inside a causal LM's forward."""

from .architectures import UnsupportedModelError, support_table
from .causal_lm import (
    IWSFTCausalLMOutput,
    apply_iwsft_to_llama,
    apply_iwsft_to_model,
    apply_iwsft_to_qwen2,
    check_model,
    remove_iwsft_patch,
    sequence_starts,
    shift_for_next_token,
)

__all__ = [
    "IWSFTCausalLMOutput",
    "UnsupportedModelError",
    "apply_iwsft_to_llama",
    "apply_iwsft_to_model",
    "apply_iwsft_to_qwen2",
    "check_model",
    "remove_iwsft_patch",
    "sequence_starts",
    "shift_for_next_token",
    "support_table",
]
