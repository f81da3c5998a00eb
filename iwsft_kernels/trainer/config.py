"""TrainConfig: every option of `iwsft-train`, one dataclass (CLI flags and config files map
onto its fields one to one: ``--micro-batch-size 4`` <-> ``micro_batch_size: 4``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_MODEL = "embedded-default"  # tiny random-init Qwen2 (vocab 151,936) from assets/model
AUTO_CHECKPOINTS = 8  # save_every=None: about this many checkpoints per run


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
    max_nonfinite_steps: int = 3  # the run stops after this many consecutive NaN/inf steps
    bf16: str = "auto"  # auto (bf16 on CUDA) | yes | no
    gradient_checkpointing: bool = False
    liger: bool = False  # Liger kernels for RMSNorm/RoPE/SwiGLU (CUDA only)
    attn_implementation: str = "auto"  # auto: flash_attention_2 when installed on CUDA, else sdpa
    packing: bool = False  # pack each micro-batch into one row (position_ids restart)
    loss_backend: str = "auto"
    seed: int = 0
    # --- distributed (the launch config says FSDP2 / DeepSpeed; this only adds to FSDP2)
    tp_head: int = 1  # tensor-parallel size of the output head; FSDP2 over world / tp_head
    # --- reference log-probs
    zero_reference: bool = False  # log q_ref = 0 for every token, no reference pass (DFT)
    ref_cache: str | None = None  # default: <output_dir>/ref_logprobs
    ref_batch_size: int = 8
    # --- outputs
    output_dir: str = "outputs/iwsft-default"
    save_every: int | None = None  # checkpoint every N steps; None: auto (~8 per run); 0: end only
    keep_checkpoints: int = 2  # newest checkpoints kept (0: all)
    resume: bool = False  # continue the run already in output_dir from its last checkpoint
    overwrite: bool = False  # delete the run already in output_dir and start over
    eval_examples: int | None = None  # eval set size; None: 16 training / all held-out examples
    eval_data: str | None = None  # held-out eval file (same formats as --data)
    eval_fraction: float | None = None  # hold out this fraction of --data (by --seed)
    log_with: str = "auto"  # auto (tensorboard when installed) | none | any accelerate tracker
    report: bool = True  # write OUTPUT_DIR/report/ (plots + report.md) at the end
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

    def checkpoint_every(self, total_steps: int) -> int:
        """Steps between checkpoints (0: only at the end). Default: about 8 per run, so an
        interrupted run (Ctrl-C, kill, preemption) loses at most ~1/8 of its steps."""
        if self.save_every is not None:
            return self.save_every
        return max(1, math.ceil(total_steps / AUTO_CHECKPOINTS))


# ------------------------------------------------------------------------ validation
# Allowed values of the enumerated options (flags and config-file keys alike).
CHOICES = {
    "mode": ("sft", "token", "sequence"),
    "sampling": ("uniform", "quality"),
    "trace_source": ("deepseek", "gemini"),
    "bf16": ("auto", "yes", "no"),
    "loss_backend": ("auto", "torch", "triton"),
    "attn_implementation": ("auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3",
                            "flex_attention"),
    "log_with": ("auto", "none", "all", "tensorboard", "wandb", "trackio", "comet_ml", "aim",
                 "mlflow", "clearml", "dvclive", "swanlab"),
}
TRUE, FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")
BOOL_SPELLINGS = "true/false, yes/no, 1/0, on/off"

# (lowest allowed value, whether it may equal that value) for the numeric options
_RANGES = {
    "max_examples": (1, True), "max_length": (2, True), "epochs": (1, True),
    "max_steps": (1, True), "micro_batch_size": (1, True), "grad_accum": (1, True),
    "ref_batch_size": (1, True), "save_every": (0, True), "keep_checkpoints": (0, True),
    "eval_examples": (0, True), "eval_fraction": (0, False), "max_nonfinite_steps": (0, True),
    "stop_after_steps": (1, True), "seed": (0, True), "tp_head": (1, True),
    "lr": (0, False), "warmup_ratio": (0, True), "weight_decay": (0, True),
    "adam_beta1": (0, True), "adam_beta2": (0, True), "max_grad_norm": (0, True),
}
_BELOW_ONE = ("warmup_ratio", "adam_beta1", "adam_beta2", "eval_fraction")  # these must also be < 1 (<= 1: warmup)

HELP = {
    "model": "HF hub name or local model folder; 'embedded-default' is the bundled tiny "
             "random-init Qwen2 (vocab 151,936)",
    "tokenizer": "tokenizer name or folder (default: the model's; bundled one for the default)",
    "ref_model": "reference policy q_ref (default: the starting model)",
    "data": "JSONL/JSON/parquet/CSV file, saved dataset folder, or hub dataset name "
            "(default: the bundled s1K-style sample)",
    "data_split": "split to read from a hub or saved dataset",
    "trace_source": "s1K-1.1 only: whose thinking trajectory and attempt to train on",
    "quality_column": "column with a per-example quality >= 0 (optional)",
    "max_examples": "use only the first N examples",
    "max_length": "truncate examples to this many tokens",
    "mode": "importance weighting: sft (w = 1), token (per-token weights), sequence "
            "(per-sequence weights, the paper's default)",
    "temperature": "temperature of the weights (default: IWConfig's, 1.0)",
    "w_min": "lower clip of the weights (default: the mode's)",
    "w_max": "upper clip of the weights (default: the mode's)",
    "length_normalize": "sequence mode: mean (true) or sum (false) of the log-ratio "
                        "(default: IWConfig's, true)",
    "self_normalize": "rescale the batch's weights to mean 1 (default: IWConfig's, false)",
    "sampling": "how examples are drawn: uniform, or in proportion to quality (SFT(Q))",
    "quality_weight": "multiply the sequence weights by the quality column (iw-SFT(Q))",
    "lr": "peak learning rate (default: 1e-3 for the embedded default model, else 1e-5)",
    "epochs": "passes over the data",
    "max_steps": "optimizer steps in all (overrides --epochs)",
    "micro_batch_size": "examples per forward/backward on each process",
    "grad_accum": "micro-batches per optimizer step (global batch = micro_batch_size x "
                  "grad_accum x processes)",
    "warmup_ratio": "fraction of the steps with linear warmup (then cosine decay), in [0, 1]",
    "weight_decay": "AdamW weight decay (not on biases and norms)",
    "adam_beta1": "AdamW beta1, in [0, 1)",
    "adam_beta2": "AdamW beta2, in [0, 1)",
    "max_grad_norm": "gradient clipping norm (0: no clipping)",
    "max_nonfinite_steps": "a step whose loss or gradient norm is NaN/inf is skipped (no "
                           "optimizer update; the schedule advances) and counted; after N "
                           "consecutive ones the run stops with exit status 3, keeps its last "
                           "good checkpoint and saves no final model (0 or 1: stop at the "
                           "first; default: 3)",
    "bf16": "bf16 mixed precision: auto (on CUDA), yes, no",
    "gradient_checkpointing": "recompute activations in backward (less memory)",
    "liger": "Liger kernels for RMSNorm/RoPE/SwiGLU (CUDA only; pip install liger-kernel)",
    "attn_implementation": "attention kernel; auto: flash_attention_2 when flash-attn is "
                           "installed and CUDA is there, else sdpa. A hub kernel "
                           "('org/name') is passed through",
    "packing": "pack each micro-batch into one row (position ids restart)",
    "loss_backend": "fused-loss backend: auto (triton on CUDA, torch elsewhere), torch, triton",
    "seed": "random seed (data order, init of the embedded default model)",
    "tp_head": "shard the output head over the vocabulary across N ranks (tensor parallel), "
               "FSDP2 over the other world / N; needs an FSDP2 launch and an untied head "
               "(docs/trainer.md, 'Tensor-parallel head') (default: 1, off)",
    "zero_reference": "use log q_ref = 0 (no reference model). token mode + clip [0, 1] = DFT. "
                      "No reference pass and no reference cache; excludes --ref-model, "
                      "--ref-cache and --mode sft (default: false)",
    "ref_cache": "folder of the cached reference log-probs (default: OUTPUT_DIR/ref_logprobs)",
    "ref_batch_size": "batch size of the reference log-prob pass",
    "output_dir": "where checkpoints, metrics.jsonl, summary.json and the final model go",
    "save_every": f"checkpoint every N optimizer steps; 0: only at the end; default: about "
                  f"{AUTO_CHECKPOINTS} checkpoints per run",
    "keep_checkpoints": "how many of the newest checkpoints to keep (0: all)",
    "resume": "continue the run already in OUTPUT_DIR from its last checkpoint",
    "overwrite": "delete the run already in OUTPUT_DIR (checkpoints, metrics, final model, "
                 "reference cache) and start over",
    "eval_examples": "eval loss, entropy and token accuracy before/after on the first N "
                     "examples of the eval set (default: 16 of the training examples, or all "
                     "the held-out ones with --eval-data / --eval-fraction)",
    "eval_data": "held-out eval data (file or dataset, same formats as --data), not trained "
                 "on (default: none: the eval set is the first training examples)",
    "eval_fraction": "hold out this fraction of --data for evaluation (chosen by --seed, "
                     "removed from training), in (0, 1); excludes --eval-data",
    "log_with": "experiment tracker: auto (tensorboard when installed), none, or an "
                "accelerate tracker",
    "report": "at the end, write OUTPUT_DIR/report/: report.md and PNG plots of the run "
              "(python -m iwsft_kernels.report; the plots need matplotlib)",
    "stop_after_steps": "stop after this many steps (after checkpointing), e.g. to test "
                        "--resume",
    "config": "YAML/JSON file of these options (keys with underscores); flags win",
}


class ConfigError(ValueError):
    """An option with a value it cannot take (names the option and what is allowed)."""


def _opt(name: str, source: str) -> str:
    return "--" + name.replace("_", "-") if source == "flag" else f"{name!r} in {source}"


def parse_bool(v, name: str = "value", source: str = "flag") -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in TRUE + FALSE:
        return v.strip().lower() in TRUE
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    raise ConfigError(f"{_opt(name, source)}: expected a boolean ({BOOL_SPELLINGS}), got {v!r}")


def _normalise(name: str, v, typ: str, source: str):
    """One option's value, checked and converted to the field's type."""
    if v is None:
        if "None" in typ:
            return None
        raise ConfigError(f"{_opt(name, source)}: a value is required")
    if name == "bf16":  # auto | yes | no, and the boolean spellings for yes/no
        s = str(v).strip().lower() if not isinstance(v, bool) else ("yes" if v else "no")
        s = "yes" if s in TRUE else "no" if s in FALSE else s
        if s not in CHOICES["bf16"]:
            raise ConfigError(f"{_opt(name, source)}: expected one of auto, yes, no (or "
                              f"{BOOL_SPELLINGS}), got {v!r}")
        return s
    if typ.startswith("bool"):
        return parse_bool(v, name, source)
    if typ.startswith("int"):
        if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, str)
                                                              and v.strip().lstrip("-").isdigit())):
            raise ConfigError(f"{_opt(name, source)}: expected an integer, got {v!r}")
        v = int(v)
    elif typ.startswith("float"):
        try:
            if isinstance(v, bool):
                raise ValueError
            v = float(v)  # YAML reads "1e-5" as a string
        except (TypeError, ValueError):
            raise ConfigError(f"{_opt(name, source)}: expected a number, got {v!r}") from None
        if not math.isfinite(v):
            raise ConfigError(f"{_opt(name, source)}: expected a finite number, got {v!r}")
    else:
        if not isinstance(v, str):
            raise ConfigError(f"{_opt(name, source)}: expected a string, got {v!r}")
        allowed = CHOICES.get(name)
        if allowed and v not in allowed and not (name == "attn_implementation" and "/" in v):
            raise ConfigError(f"{_opt(name, source)}: expected one of {', '.join(allowed)}"
                              + (" (or a hub kernel 'org/name')" if name == "attn_implementation"
                                 else "") + f", got {v!r}")
    if name in _RANGES:
        lo, inclusive = _RANGES[name]
        hi = 1.0 if name in _BELOW_ONE else None
        ok = (v >= lo if inclusive else v > lo) and (hi is None or v < hi or (
            name == "warmup_ratio" and v <= hi))
        if not ok:
            rng = (f">= {lo}" if inclusive else f"> {lo}") + (
                "" if hi is None else " and <= 1" if name == "warmup_ratio" else " and < 1")
            raise ConfigError(f"{_opt(name, source)}: must be {rng}, got {v!r}")
    return v


def validate(values: dict, source: str = "flag") -> dict:
    """Checked and converted copies of `values` (field name -> value)."""
    types = {f.name: f.type if isinstance(f.type, str) else str(f.type)
             for f in dataclasses.fields(TrainConfig)}
    return {k: _normalise(k, v, types[k], source) for k, v in values.items()}


def _flag_type(name: str, typ: str):
    def convert(s: str):
        try:
            return _normalise(name, s, typ, "flag")
        except ConfigError as e:  # argparse prefixes "argument --flag: "
            raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from None

    convert.__name__ = typ.split(" ")[0]
    return convert


def _default_text(f) -> str:
    if f.name == "save_every":
        return "auto"
    return "not set" if f.default is None else str(f.default).lower() if isinstance(
        f.default, bool) else str(f.default)


# other spellings of a flag that users type (transformers / TRL name it so)
FLAG_ALIASES = {"lr": ("--learning-rate",)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="iwsft-train",
        description="Importance-weighted SFT (iw-SFT) with a fused loss, on accelerate. With no "
                    "arguments: the embedded CPU demo (tiny random Qwen2, shipped s1K-style data).",
        epilog="An OUTPUT_DIR that already holds a run is not silently restarted: pass --resume "
               "to continue it or --overwrite to start over. Boolean options take "
               f"{BOOL_SPELLINGS}; alone, they mean true. IWSFT_NO_NATIVE=1 skips the native "
               "CPU epilogue (and its one-time compile). Exit status: 0 done, 2 a bad option, "
               "data or output folder, 3 the run diverged (see --max-nonfinite-steps), 130 "
               "Ctrl-C, 143 SIGTERM (both checkpoint-resumable).",
    )
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        flags = (flag, *FLAG_ALIASES.get(f.name, ()))
        typ = f.type if isinstance(f.type, str) else str(f.type)
        text = HELP.get(f.name, f.name.replace("_", " "))  # a field without help text still works
        if "default:" not in text:
            text += f" (default: {_default_text(f)})"
        if typ.startswith("bool"):
            p.add_argument(*flags, dest=f.name, type=_flag_type(f.name, typ), nargs="?", const=True,
                           default=None, metavar="BOOL", help=text)
        elif f.name in CHOICES:
            p.add_argument(*flags, dest=f.name, type=_flag_type(f.name, typ), default=None,
                           metavar="{" + ",".join(CHOICES[f.name]) + "}", help=text)
        else:
            metavar = {"int": "N", "float": "X"}.get(typ.split(" ")[0], None)
            p.add_argument(*flags, dest=f.name, type=_flag_type(f.name, typ), default=None, metavar=metavar,
                           help=text)
    return p


def _usage_error(msg: str) -> SystemExit:
    """Print one error line and return the SystemExit(2) to raise (docs/trainer.md: bad options
    and config files exit with status 2, like argparse's own errors)."""
    print(f"iwsft-train: error: {msg}", file=sys.stderr)
    return SystemExit(2)


def parse_config(argv=None) -> TrainConfig:
    """TrainConfig from command-line flags and an optional --config file (flags win).
    A bad value exits with a message naming the option and the allowed values."""
    parser = build_parser()
    args = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    values = {}
    if args.get("config"):
        path = Path(args["config"])
        if not path.is_file():
            raise _usage_error(f"config file not found: {path}")
        text = path.read_text()
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                values = yaml.safe_load(text) or {}
            else:
                values = json.loads(text)
        except Exception as e:  # noqa: BLE001 — yaml/json syntax errors
            raise _usage_error(f"cannot parse {path}: {e}") from None
        if not isinstance(values, dict):
            raise _usage_error(f"{path} must hold a mapping of option: value")
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise _usage_error(f"unknown keys in {path}: {unknown}")
        try:
            values = validate(values, source=str(path))
        except ConfigError as e:
            raise _usage_error(f"{e}") from None
    values.update(args)
    cfg = TrainConfig(**values)
    try:
        check_config(cfg)
    except ConfigError as e:
        raise _usage_error(f"{e}") from None
    return cfg


def check_config(cfg: TrainConfig) -> None:
    """Checks that need several options together (each option alone is checked on parsing)."""
    from .. import IWConfig

    if cfg.eval_data is not None and cfg.eval_fraction is not None:
        raise ConfigError("--eval-data and --eval-fraction exclude each other: --eval-data "
                          "evaluates on another file, --eval-fraction holds out part of --data")
    if cfg.resume and cfg.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: --resume continues the "
                          "run in the output folder, --overwrite deletes it")
    if cfg.zero_reference:
        if cfg.mode == "sft":
            raise ConfigError("--zero-reference only applies to --mode token or sequence "
                              "(--mode sft uses no reference: its weights are 1)")
        for name in ("ref_model", "ref_cache"):
            if getattr(cfg, name) is not None:
                raise ConfigError(f"--zero-reference and --{name.replace('_', '-')} exclude "
                                  f"each other: --zero-reference uses log q_ref = 0 and runs no "
                                  f"reference pass")
    try:
        IWConfig(**cfg.iw_kwargs())
    except ValueError as e:
        msg = re.sub(r"IWConfig\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), str(e))
        raise ConfigError(msg) from None
