"""iw-SFT inside TRL: ``IWSFTConfig`` and ``IWSFTTrainer``, drop-ins for ``trl.SFTConfig`` /
``trl.SFTTrainer`` (tested with trl 1.14.2-1.16).

    from iwsft_kernels.integrations.trl import IWSFTConfig, IWSFTTrainer

    args = IWSFTConfig(output_dir="out", iw_mode="sequence")          # + any SFTConfig option
    trainer = IWSFTTrainer(model="Qwen/Qwen2.5-0.5B-Instruct", args=args, train_dataset=ds)
    trainer.train()

Laid out like TRL's own trainers (``trl/trainer/sft_config.py`` next to ``sft_trainer.py``):

- ``iwsft_config.py``: ``IWSFTConfig``, ``trl.SFTConfig`` plus the weighting options;
- ``data.py``: the per-token columns (reference log-probs, quality) and ``IWDataCollator``,
  which lays them out like TRL's collator lays out ``labels``;
- ``ref_logprobs.py``: the reference pass over the prepared rows (fingerprint, cache:
  :mod:`iwsft_kernels.refcache`, shared with ``iwsft-train``);
- ``iwsft_trainer.py``: ``IWSFTTrainer`` (data preparation, loss, metrics, non-finite steps).

What the trainer does (docs/trl.md has the details and the recipe table):

1. TRL prepares the data exactly as ``SFTTrainer`` does (chat template, tokenisation,
   completion-only / assistant-only masks -> ``labels``, truncation, packing). With
   ``quality_column`` the per-example quality rides along as a per-token column, so that TRL's
   packing moves it with the tokens.
2. The model TRL built (PEFT/LoRA included) is patched with
   :func:`iwsft_kernels.integrations.apply_iwsft_to_model`: with ``labels`` its forward computes
   the fused loss in the output-embedding module's own call; no ``(B, T, V)`` logits exist.
3. Before the first update, unless ``iw_mode="sft"`` or ``iw_zero_reference=True``, one pass of
   the reference model (default: the starting model, i.e. the policy before any update) over
   the *prepared rows* gives ``ref[t] = log q_ref(labels[t] | tokens < t)`` with
   ``linear_logprobs`` (no logits), split over the ranks, cached on disk under a fingerprint
   of (prepared rows, tokenizer, chat template, reference model, max_length, layout,
   precision); a cache made for anything else is refused (``RefCacheMismatch``). The values
   become a per-token column of the train dataset, and a collator wrapper pads / concatenates
   them exactly like TRL's collator does ``labels`` (padding-free included).
4. ``compute_loss`` calls the patched model with the reference log-probs, the per-sequence
   quality and TRL's ``num_items_in_batch`` (the target-token count of the whole optimizer step,
   summed over ranks), and scales by the number of processes as ``SFTTrainer`` does, so
   gradient accumulation and data parallel give the update of the whole batch in one call.

Loss (the method's formula): ``L = - sum_i m_i w(i) log p(y_i | y_<i) / D``, targets ``m_i``
are the positions whose next-token label is not -100, ``D = num_items_in_batch``. Weights are
detached: "sft" w = 1; "token" w_i = clamp(exp(T d_i), w_min, w_max); "sequence"
w_s = clamp(exp(T mean_{i in s} d_i), w_min, w_max), ``d_i = log p(y_i) - ref_i``, one
sequence = one example (a packed row holds several). ``quality`` multiplies w_s.

Training always uses that loss, whatever the model's train / eval mode; evaluation
(``evaluate`` / ``predict``) reports the plain token NLL (mode "sft", no reference needed),
with ``eval_entropy`` and ``eval_mean_token_accuracy`` like SFTTrainer.
"""

try:
    import trl
    from trl import SFTConfig, SFTTrainer  # noqa: F401 - what the modules below build on
except ImportError as e:  # pragma: no cover - exercised only without trl
    raise ImportError(
        "iwsft_kernels.integrations.trl needs TRL (and transformers, datasets): "
        "pip install 'iwsft-kernels[trl]'") from e

from packaging.version import Version

TRL_MIN, TRL_BELOW = "1.14.2", "1.17.0"  # the tested range; [trl] extra in pyproject.toml
if not (Version(TRL_MIN) <= Version(trl.__version__) < Version(TRL_BELOW)):
    import warnings

    warnings.warn(f"iwsft_kernels.integrations.trl is tested with trl>={TRL_MIN},<{TRL_BELOW}; "
                  f"found trl {trl.__version__}. It relies on SFTTrainer internals "
                  f"(_prepare_dataset, DataCollatorForLanguageModeling).", stacklevel=2)

from ...refcache import RefCacheMismatch  # noqa: E402
from .data import QUALITY_COLUMN, REF_COLUMN, IWDataCollator  # noqa: E402
from .iwsft_config import IWSFTConfig  # noqa: E402
from .iwsft_trainer import IWSFTTrainer  # noqa: E402

__all__ = ["IWDataCollator", "IWSFTConfig", "IWSFTTrainer", "RefCacheMismatch", "REF_COLUMN",
           "QUALITY_COLUMN"]
