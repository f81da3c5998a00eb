"""transformers integration: compute the fused iw-SFT loss inside a causal LM's forward."""

from .causal_lm import (
    IWSFTCausalLMOutput,
    apply_iwsft_to_llama,
    apply_iwsft_to_model,
    apply_iwsft_to_qwen2,
    remove_iwsft_patch,
    sequence_starts,
    shift_for_next_token,
)

__all__ = [
    "IWSFTCausalLMOutput",
    "apply_iwsft_to_llama",
    "apply_iwsft_to_model",
    "apply_iwsft_to_qwen2",
    "remove_iwsft_patch",
    "sequence_starts",
    "shift_for_next_token",
]
