"""Non-finite steps and divergence (docs/trainer.md, "Divergence").

A step is non-finite when its loss (on any micro-batch of any rank) or its gradient norm is
NaN or infinite. Every rank decides the same, from one all-reduced flag. Such a step is
skipped: the gradients are dropped and AdamW does not step (under DeepSpeed the engine has
already stepped inside backward: the step is counted, not skipped). The learning-rate
schedule advances as for any step, so the step numbers, the data order and the schedule stay
those of the run. At the N-th consecutive non-finite step (N = ``--max-nonfinite-steps``,
default 3; 0 or 1: the first) the run stops (:class:`Diverged`, exit status :data:`EXIT_DIVERGED`). No checkpoint is written
at a non-finite step or with non-finite parameters, and ``final/`` is written only when the
parameters and the final eval loss are finite, so the newest checkpoint is the last good one.
"""

from __future__ import annotations

import math

import torch

from .distributed import _local

EXIT_DIVERGED = 3  # iwsft-train's exit status when the run stops on non-finite steps


class Diverged(RuntimeError):
    """The run stopped on non-finite steps or parameters; the message says where it stands and
    how to go on (summary.json was written, final/ was not)."""


def any_rank(acc, flag: bool) -> bool:
    """True on every rank when `flag` is true on any rank (one all-reduce)."""
    if acc.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=acc.device)
    return bool(acc.reduce(t, reduction="sum").item() > 0)


def step_is_nonfinite(acc, rows: list[torch.Tensor], grad_norm: float | None) -> bool:
    """This step's micro-batch rows (metrics.micro_stats: loss, logp sum first) of this rank and
    the gradient norm (None: not known, DeepSpeed), agreed over the ranks."""
    local = not bool(torch.isfinite(torch.stack(rows)[:, :2]).all())
    if grad_norm is not None and not math.isfinite(grad_norm):
        local = True
    return any_rank(acc, local)


def params_finite(acc, model) -> bool:
    """Every parameter finite on every rank (each rank checks its shard)."""
    ok = all(bool(torch.isfinite(_local(p).detach()).all()) for p in model.parameters())
    return not any_rank(acc, not ok)


def resume_hint(out_dir, checkpoint_step: int | None) -> str:
    if checkpoint_step is None:
        return ("no checkpoint was written before it: start over with a lower --lr "
                "(--overwrite, or another --output-dir)")
    return (f"the last good checkpoint (step {checkpoint_step}) is kept in {out_dir}/checkpoints: "
            f"rerun the same command with --resume and a lower --lr to continue from it (or "
            f"start over with --overwrite)")
