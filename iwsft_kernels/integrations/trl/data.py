"""The per-token columns IWSFTTrainer adds to TRL's prepared rows, and the collator that lays
them out like ``labels``."""

from __future__ import annotations

import math

import torch
from trl.data_utils import get_dataset_column_names
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
from trl.trainer.utils import pad as _trl_pad

REF_COLUMN = "iw_ref_logprobs"  # per token, aligned with labels
QUALITY_COLUMN = "iw_quality"  # per token: the example's quality repeated
IW_COLUMNS = (REF_COLUMN, QUALITY_COLUMN)


def quality_per_token(dataset, col: str):
    """Add ``iw_quality``: the example's quality (finite, >= 0) in column ``col``, repeated for
    each token (so that TRL's packing moves it with the tokens)."""
    cols = get_dataset_column_names(dataset)
    if col not in cols:
        raise ValueError(f"quality_column={col!r} is not a column of the train dataset "
                         f"(columns: {sorted(cols)})")
    if "seq_lengths" in cols:
        raise ValueError(f"quality_column={col!r}: the dataset is already packed "
                         f"(seq_lengths), so its rows hold several examples; give a quality "
                         f"per example before packing")

    def per_token(example):
        q = example[col]
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not math.isfinite(q) \
                or q < 0:
            raise ValueError(f"quality_column={col!r} must hold finite numbers >= 0, got "
                             f"{q!r}")
        return {QUALITY_COLUMN: [float(q)] * len(example["input_ids"])}

    return dataset.map(per_token)


class IWDataCollator:
    """Wraps TRL's ``DataCollatorForLanguageModeling``: the per-token ``iw_*`` columns are taken
    out of the features, the inner collator builds its batch, and each column is laid out exactly
    like ``labels`` (right padding with 0, or concatenated into one row when padding-free)."""

    def __init__(self, inner: DataCollatorForLanguageModeling):
        if not isinstance(inner, DataCollatorForLanguageModeling):
            raise TypeError(f"IWDataCollator wraps trl's DataCollatorForLanguageModeling, got "
                            f"{type(inner).__name__}")
        self.inner = inner

    def __call__(self, features: list[dict]) -> dict:
        features = [dict(f) for f in features]
        extra = {}
        for k in IW_COLUMNS:
            if k in features[0]:
                extra[k] = [torch.as_tensor(f.pop(k), dtype=torch.float32) for f in features]
        for f in features:  # a column missing from the first feature must be missing everywhere
            for k in IW_COLUMNS:
                f.pop(k, None)
        batch = self.inner(features)
        for k, ts in extra.items():
            if self.inner.padding_free:
                ts = [torch.cat(ts)]
            out = _trl_pad(ts, padding_value=0.0, padding_side="right",
                           pad_to_multiple_of=self.inner.pad_to_multiple_of)
            if out.shape != batch["labels"].shape:
                raise RuntimeError(f"{k} collated to {tuple(out.shape)} but labels to "
                                   f"{tuple(batch['labels'].shape)}: per-token columns out of "
                                   f"step with the tokens")
            batch[k] = out
        return batch

