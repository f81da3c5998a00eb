"""``IWSFTConfig``: ``trl.SFTConfig`` plus the importance-weighting options (the counterpart of
TRL's ``sft_config.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import SFTConfig

from ...config import IWConfig


@dataclass
class IWSFTConfig(SFTConfig):
    r"""``trl.SFTConfig`` plus the importance-weighting options of iw-SFT.

    iw_mode: "sequence" (default; the paper's best variant), "token", or "sft" (w = 1: plain
        SFT through the fused kernel).
    iw_temperature, iw_w_min, iw_w_max: w = clamp(exp(T * log-ratio), w_min, w_max); None takes
        the mode's default clip ("token": [0.2, 1.8], "sequence": [0, 16]).
    iw_length_normalize: sequence mode, mean (True) or sum (False) of the token log-ratios.
    iw_self_normalize: rescale each micro-batch's weights to mean 1.
    iw_zero_reference: use log q_ref = 0 for every token (no reference pass). With
        iw_mode="token", iw_w_min=0, iw_w_max=1 this is DFT (w = p(y), stop-grad).
    ref_model_name_or_path: the reference model q_ref; None: the starting model (the model
        being trained, before its first update).
    ref_cache_dir: where the reference log-probs are cached; None: <output_dir>/iwsft_ref_cache.
    quality_column: dataset column with a per-example quality q >= 0 multiplying the weight
        (SFT(Q) with iw_mode="sft", iw-SFT(Q) otherwise); None: no quality.
    iw_backend: "auto" | "triton" | "torch" (the loss kernels; auto: Triton on CUDA).
    max_nonfinite_steps: an optimizer step whose loss (any micro-batch, any rank) or gradients
        are not finite makes no update and is counted (logged as ``nonfinite_steps``); this many
        in a row stop training with a RuntimeError (0 or 1: the first one; docs/trl.md,
        "Non-finite steps"). Same name and default as ``iwsft-train --max-nonfinite-steps``.
    """

    iw_mode: str = field(default="sequence", metadata={
        "help": "Importance weighting: 'sequence' (iw-SFT, default), 'token' (per-step), or "
                "'sft' (weights 1).", "choices": ["sft", "token", "sequence"]})
    iw_temperature: float = field(default=1.0, metadata={
        "help": "Temperature T in w = clamp(exp(T * log-ratio), w_min, w_max)."})
    iw_w_min: float | None = field(default=None, metadata={
        "help": "Lower clip of the weights (default: 0.2 token mode, 0 sequence mode)."})
    iw_w_max: float | None = field(default=None, metadata={
        "help": "Upper clip of the weights (default: 1.8 token mode, 16 sequence mode)."})
    iw_length_normalize: bool = field(default=True, metadata={
        "help": "Sequence mode: mean (True) or sum (False) of the per-token log-ratios."})
    iw_self_normalize: bool = field(default=False, metadata={
        "help": "Rescale each micro-batch's weights to mean 1."})
    iw_zero_reference: bool = field(default=False, metadata={
        "help": "Use log q_ref = 0 (no reference model). token mode + clip [0, 1] = DFT."})
    ref_model_name_or_path: str | None = field(default=None, metadata={
        "help": "Reference model for the importance weights (default: the starting model)."})
    ref_cache_dir: str | None = field(default=None, metadata={
        "help": "Cache folder of the reference log-probs (default: <output_dir>/iwsft_ref_cache)."})
    quality_column: str | None = field(default=None, metadata={
        "help": "Dataset column with a per-example quality >= 0 multiplying the weights."})
    iw_backend: str = field(default="auto", metadata={
        "help": "Loss backend: 'auto' (Triton on CUDA, torch elsewhere), 'triton' or 'torch'.",
        "choices": ["auto", "triton", "torch"]})
    max_nonfinite_steps: int = field(default=3, metadata={
        "help": "Optimizer steps with a non-finite loss or gradient are skipped (no update) and "
                "counted; this many in a row stop training with an error (0 or 1: the first)."})
    # TRL's default gradient_checkpointing=True uses the name transformers 5 deprecates, so every
    # SFTConfig() warns. Unset here; TRL's default goes to the current name in __post_init__.
    gradient_checkpointing: bool | None = field(default=None, metadata={
        "help": "Deprecated alias of activation_checkpointing (default: True, as in TRL)."})

    def __post_init__(self):
        if self.gradient_checkpointing is None and getattr(self, "activation_checkpointing", 0) is None:
            self.activation_checkpointing = True
        super().__post_init__()
        self.iw_config  # noqa: B018 - validates the weighting options (IWConfig raises)
        if self.iw_backend not in ("auto", "triton", "torch"):
            raise ValueError(f"iw_backend must be 'auto', 'triton' or 'torch', got "
                             f"{self.iw_backend!r}")
        n = self.max_nonfinite_steps
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"IWSFTConfig: max_nonfinite_steps must be an int >= 0, got {n!r}")
        if self.loss_type not in ("nll", "chunked_nll"):  # both mean plain NLL in TRL
            raise ValueError(
                f"IWSFTConfig: loss_type={self.loss_type!r} cannot be honoured, IWSFTTrainer "
                f"computes its own weighted loss. For DFT use iw_mode='token', "
                f"iw_zero_reference=True, iw_w_min=0.0, iw_w_max=1.0 (w = p(y), stop-grad); "
                f"keep loss_type='nll'.")
        if self.label_smoothing_factor and self.label_smoothing_factor > 0:
            raise ValueError("IWSFTConfig: label_smoothing_factor > 0 is not supported (the fused "
                             "loss has no label smoothing); set it to 0.")
        if self.iw_zero_reference and self.iw_mode == "sft":
            raise ValueError("IWSFTConfig: iw_zero_reference only applies to iw_mode='token' or "
                             "'sequence' (mode 'sft' uses no reference).")
        if self.iw_mode == "sft" and self.ref_model_name_or_path is not None:
            raise ValueError("IWSFTConfig: ref_model_name_or_path is unused with iw_mode='sft' "
                             "(weights 1); drop it or pick iw_mode='token' / 'sequence'.")
        if self.iw_zero_reference and self.ref_model_name_or_path is not None:
            raise ValueError("IWSFTConfig: give either iw_zero_reference=True or "
                             "ref_model_name_or_path, not both.")
        wrapped = self.packing and self.packing_strategy == "wrapped"
        if wrapped and self.iw_mode == "sequence":
            raise ValueError(
                "IWSFTConfig: packing_strategy='wrapped' cuts examples mid-sequence and runs "
                "them together, so a sequence weight would mix examples; use "
                "packing_strategy='bfd' (or no packing) with iw_mode='sequence'.")
        if wrapped and self.quality_column:
            raise ValueError("IWSFTConfig: quality_column needs whole examples; "
                             "packing_strategy='wrapped' cuts them. Use 'bfd'.")

    @property
    def iw_config(self) -> IWConfig:
        return IWConfig(mode=self.iw_mode, temperature=self.iw_temperature,
                        w_min=self.iw_w_min, w_max=self.iw_w_max,
                        length_normalize=self.iw_length_normalize,
                        self_normalize=self.iw_self_normalize)

    @property
    def needs_reference_pass(self) -> bool:
        return self.iw_mode != "sft" and not self.iw_zero_reference

