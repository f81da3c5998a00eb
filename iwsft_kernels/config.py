"""IWConfig: the importance-weighting options of the loss (docs/design.md §1)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MODES = ("sft", "token", "sequence")

# Clip defaults per mode: (w_min, w_max).
_DEFAULT_BOUNDS = {"sft": (0.0, math.inf), "token": (0.2, 1.8), "sequence": (0.0, 16.0)}


@dataclass(frozen=True)
class IWConfig:
    """How the importance weights are formed from the log-ratio d_i = logp_i - ref_i.

    mode:
      "sft"      w = 1 (plain cross-entropy; the drop-in memory-saving mode).
      "token"    w_i = clamp(exp(T * d_i), w_min, w_max)             (defaults 0.2, 1.8)
      "sequence" w_s = clamp(exp(T * mean_{i in s} d_i), w_min, w_max) (defaults 0.0, 16.0)
                 (``length_normalize=False``: the sum replaces the mean).
    self_normalize: rescale the batch's weights to mean 1 (over valid sequences; token mode:
      over target tokens) before the optional per-sequence quality multiplier is applied.
    w_min / w_max left as None take the mode's defaults above.
    """

    mode: str = "sequence"
    temperature: float = 1.0
    w_min: float | None = None
    w_max: float | None = None
    length_normalize: bool = True
    self_normalize: bool = False
    _bounds: tuple = field(init=False, repr=False, compare=False, default=(0.0, math.inf))

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"IWConfig.mode must be one of {MODES}, got {self.mode!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"IWConfig.temperature must be a finite number > 0, got {t!r}")
        lo_default, hi_default = _DEFAULT_BOUNDS[self.mode]
        lo = lo_default if self.w_min is None else self.w_min
        hi = hi_default if self.w_max is None else self.w_max
        for name, v in (("w_min", lo), ("w_max", hi)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
                raise ValueError(f"IWConfig.{name} must be a number, got {v!r}")
            if v < 0:
                raise ValueError(f"IWConfig.{name} must be >= 0, got {v!r}")
        if lo > hi:
            raise ValueError(f"IWConfig.w_min ({lo}) must be <= w_max ({hi})")
        if lo == math.inf:
            raise ValueError("IWConfig.w_min must be finite")
        object.__setattr__(self, "_bounds", (float(lo), float(hi)))

    @property
    def bounds(self) -> tuple[float, float]:
        """The effective (w_min, w_max) after mode defaults."""
        return self._bounds

    @property
    def needs_reference(self) -> bool:
        return self.mode != "sft"


# ------------------------------------------------------------------------ logit transforms
OUTPUTS = ("entropy", "top1", "lse")  # the optional fused per-token outputs


@dataclass(frozen=True)
class LogitTransform:
    """What an architecture does to the logits after the projection (docs/design.md §9).

    With r = h W^T + b (the raw projection, fp32):
        z = scale * r;  if softcap: z = softcap * tanh(z / softcap);  z = z / temperature
    so z = (scale / temperature) * r without a cap, and z = (softcap / temperature) *
    tanh(scale * r / softcap) with one. The softmax, log-probs and every fused output are those
    of z. The gradient w.r.t. r is the one w.r.t. z times
        dz/dr = (scale / temperature) * sech^2(scale * r / softcap)   (cap), else scale / temperature.
    Stable forms (x = scale * r / softcap, t = exp(-2|x|) in (0, 1]):
        tanh(x) = sign(x) * (1 - t) / (1 + t),   sech^2(x) = 4 t / (1 + t)^2.

    Examples: Gemma2 ``final_logit_softcapping=30`` -> softcap=30; Granite ``logits_scaling=s``
    -> scale=1/s; Cohere ``logit_scale=s`` -> scale=s; a sampling temperature T -> temperature=T.
    """

    scale: float = 1.0
    softcap: float | None = None
    temperature: float = 1.0

    def __post_init__(self):
        for name in ("scale", "temperature"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v <= 0:
                raise ValueError(f"logit {name} must be a finite number > 0, got {v!r}")
            object.__setattr__(self, name, float(v))
        c = self.softcap
        if c is not None:
            if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) \
                    or c <= 0:
                raise ValueError(f"logit softcap must be None or a finite number > 0, got {c!r}")
            object.__setattr__(self, "softcap", float(c))

    @property
    def identity(self) -> bool:
        return self.softcap is None and self.scale == 1.0 and self.temperature == 1.0

    @property
    def linear(self) -> bool:
        """No cap: z = factor * r."""
        return self.softcap is None

    @property
    def factor(self) -> float:
        """scale / temperature (the whole transform when there is no cap)."""
        return self.scale / self.temperature


IDENTITY = LogitTransform()


# ------------------------------------------------------------------ vocabulary parallelism
@dataclass(frozen=True)
class VocabParallel:
    """The lm_head sharded over the vocabulary across a tensor-parallel process group
    (docs/distributed.md): this rank holds rows [start, stop) of the (V, H) weight (and of the
    bias). Pass it as ``vocab_parallel=`` to ``linear_iwsft_loss`` / ``linear_logprobs`` /
    ``LinearIWSFTLoss`` (Megatron style); a DTensor weight placed ``Shard(0)`` is detected
    from the weight itself (then leave start / stop None; ``VocabParallel(
    sequence_parallel=True)`` still selects the partial dH).

    group: the torch.distributed process group of the shards (None: the default group).
    start, stop: this rank's global vocabulary rows; the shards of the group must tile
      [0, V) without overlap (checked with one all-gather per call). Labels are global ids.
    sequence_parallel: return this rank's partial dH (the gradient through its own shard
      only) instead of the SUM over the group, for a caller that reduce-scatters it itself
      (Megatron's sequence parallelism).
    """

    group: object = None
    start: int | None = None
    stop: int | None = None
    sequence_parallel: bool = False

    def __post_init__(self):
        given = [v is not None for v in (self.start, self.stop)]
        if any(given) and not all(given):
            raise ValueError(f"VocabParallel needs both start and stop (or neither, for a "
                             f"DTensor weight); got start={self.start!r}, stop={self.stop!r}")
        if all(given):
            for name in ("start", "stop"):
                v = getattr(self, name)
                if isinstance(v, bool) or not isinstance(v, int):
                    raise TypeError(f"VocabParallel.{name} must be an int, got {v!r}")
            if self.start < 0 or self.stop < self.start:
                raise ValueError(f"VocabParallel needs 0 <= start <= stop, got "
                                 f"[{self.start}, {self.stop})")
        if not isinstance(self.sequence_parallel, bool):
            raise TypeError(f"VocabParallel.sequence_parallel must be a bool, got "
                            f"{self.sequence_parallel!r}")
