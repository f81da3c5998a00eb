"""TrainConfig: every option of `iwsft-train`, one dataclass (CLI flags and config files map
onto its fields one to one: ``--micro-batch-size 4`` <-> ``micro_batch_size: 4``)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_MODEL = "embedded-default"  # tiny random-init Qwen2 (vocab 151,936) from assets/model


@dataclass
class TrainConfig:
    # --- model / data
    model: str = DEFAULT_MODEL  # HF hub name or local path; "embedded-default" = tiny random Qwen2
    tokenizer: str | None = None  # default: the model's (embedded default: assets/tokenizer)
    ref_model: str | None = None  # reference policy q_ref; default: the starting model
    data: str | None = None  # JSONL/JSON/parquet file, saved dataset dir, or hub name
    data_split: str = "train"
    trace_source: str = "deepseek"  # s1K-1.1: which trajectory/attempt columns to use
    quality_column: str = "quality"  # optional per-example quality (>= 0)
    max_examples: int | None = None
    max_length: int = 512
    # --- importance weighting (IWConfig; None = IWConfig's default)
    mode: str = "sequence"  # sft | token | sequence
    temperature: float | None = None
    w_min: float | None = None
    w_max: float | None = None
    length_normalize: bool | None = None
    self_normalize: bool | None = None
    sampling: str = "uniform"  # uniform | quality  (quality = SFT(Q)/iw-SFT(Q) data sampling)
    quality_weight: bool = False  # multiply sequence weights by quality (iw-SFT(Q))
    # --- optimisation (paper recipe: lr 1e-5, 5 epochs, warmup 0.05, wd 1e-4, betas .9/.95)
    lr: float | None = None  # default: 1e-3 for the embedded default model, 1e-5 otherwise
    epochs: int = 2
    max_steps: int | None = None  # overrides epochs
    micro_batch_size: int = 4
    grad_accum: int = 2  # global batch = micro_batch_size * grad_accum * world_size
    warmup_ratio: float = 0.05
    weight_decay: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    max_grad_norm: float = 1.0
    bf16: str = "auto"  # auto (bf16 on CUDA) | yes | no
    gradient_checkpointing: bool = False
    liger: bool = False  # Liger kernels for RMSNorm/RoPE/SwiGLU (CUDA only)
    attn_implementation: str = "auto"  # auto: flash_attention_2 when installed on CUDA, else sdpa
    packing: bool = False  # pack each micro-batch into one row (position_ids restart)
    loss_backend: str = "auto"
    seed: int = 0
    # --- reference log-probs
    ref_cache: str | None = None  # default: <output_dir>/ref_logprobs
    ref_batch_size: int = 8
    # --- outputs
    output_dir: str = "outputs/iwsft-default"
    save_every: int = 0  # checkpoint every N steps (0: only at the end)
    keep_checkpoints: int = 2
    resume: bool = False
    eval_examples: int = 16  # loss before/after on the first examples
    log_with: str = "auto"  # auto (tensorboard when installed) | none | any accelerate tracker
    stop_after_steps: int | None = None  # stop early (after checkpointing), e.g. to test resume
    config: str | None = None  # YAML/JSON file of these fields; command-line flags win

    def iw_kwargs(self) -> dict:
        kw = {"mode": self.mode}
        for k in ("temperature", "w_min", "w_max", "length_normalize", "self_normalize"):
            if getattr(self, k) is not None:
                kw[k] = getattr(self, k)
        return kw

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {s!r}")


def build_parser():
    import argparse

    p = argparse.ArgumentParser(
        prog="iwsft-train",
        description="Importance-weighted SFT (iw-SFT) with a fused loss, on accelerate. With no "
                    "arguments: the embedded CPU demo (tiny random Qwen2, shipped s1K-style data).",
    )
    hints = {"bf16": "auto | yes | no", "mode": "sft | token | sequence",
             "sampling": "uniform | quality (SFT(Q))"}
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        typ = f.type if isinstance(f.type, str) else str(f.type)
        if "bool" in typ:
            p.add_argument(flag, type=_bool, nargs="?", const=True, default=None,
                           metavar="BOOL", help=f"(default {f.default})")
        else:
            conv = int if typ.startswith("int") else float if typ.startswith("float") else str
            p.add_argument(flag, type=conv, default=None,
                           help=hints.get(f.name, f"(default {f.default})"))
    return p


def parse_config(argv=None) -> TrainConfig:
    args = {k: v for k, v in vars(build_parser().parse_args(argv)).items() if v is not None}
    values = {}
    if args.get("config"):
        path = Path(args["config"])
        if not path.is_file():
            raise SystemExit(f"iwsft-train: config file not found: {path}")
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SystemExit(f"iwsft-train: unknown keys in {path}: {unknown}")
    values.update(args)
    return TrainConfig(**values)
