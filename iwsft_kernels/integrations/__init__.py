"""transformers integration: compute the fused iw-SFT loss inside a causal LM's forward."""

try:
    import transformers  # noqa: F401
except ModuleNotFoundError as e:  # one clear line instead of a traceback into causal_lm.py
    raise ModuleNotFoundError(
        f"iwsft_kernels.integrations needs transformers ({e.name!r} is not installed): "
        f'pip install -e ".[train]" (iwsft-train, the model patch) or -e ".[trl]" (TRL\'s '
        f"SFTTrainer), after pip install torch==2.13.0", name=e.name) from e

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
