"""`iwsft-train`: command-line entry point (see TrainConfig for every option).

    iwsft-train                                   # embedded CPU demo, ~25 s on 2 cores
    iwsft-train --config configs/recipes/qwen2.5-32b-s1k.yaml
    accelerate launch --config_file configs/accelerate/fsdp2.yaml -m iwsft_kernels.trainer.cli ...

Before any work: the options are validated (config.py), the [train] extra must be installed,
and the output folder must be writable and not hold an earlier run unless --resume or
--overwrite says what to do with it (rundir.py). Errors print one message and exit 2; a run
that diverges (non-finite steps, guard.py) exits 3; Ctrl-C 130, SIGTERM 143.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import sys

from .config import parse_config
from .data import DataError  # data.py and refcache.py import transformers/datasets lazily
from ..refcache import RefCacheMismatch
from .guard import EXIT_DIVERGED, Diverged
from .rundir import RunDirError, interrupted_message, prepare

# modules of the [train] extra (pyproject.toml) the trainer imports
TRAIN_EXTRA = ("transformers", "accelerate", "datasets", "tokenizers", "tqdm")
INSTALL_HINT = 'pip install "iwsft-kernels[train]"  (from a checkout: pip install -e ".[train]")'


def _err(msg: str) -> int:
    print(f"iwsft-train: error: {msg}", file=sys.stderr)
    return 2


def missing_train_modules() -> list[str]:
    missing = []
    for name in TRAIN_EXTRA:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # blocked / broken (None in sys.modules)
            found = False
        if not found:
            missing.append(name)
    return missing


def _missing_module_message(e: ModuleNotFoundError) -> str:
    top = (e.name or "").split(".")[0]
    if top in TRAIN_EXTRA:
        return (f"the trainer needs the [train] extra, and its module {top!r} is not "
                f"installed. Install it with: {INSTALL_HINT}")
    if top == "liger_kernel":
        return "--liger needs Liger-Kernel: pip install liger-kernel"
    return f"a module the trainer needs is not installed: {top or e}"


class Terminated(KeyboardInterrupt):
    """SIGTERM (what schedulers and `kill` send) raised as an interrupt, so that it ends the run
    the way Ctrl-C does: the message with where the run stands and how to resume it."""


def _raise_terminated(signum, frame):
    raise Terminated()


def _handle_sigterm() -> None:
    """SIGTERM -> Terminated in the main thread (not possible from other threads: skipped)."""
    try:
        signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread of the main interpreter
        pass


class _TiedWeightsNote(logging.Filter):
    """Drops accelerate's "Removed shared tensor {'lm_head.weight'} while saving" line, logged
    at every checkpoint of a model with tied embeddings (the tie is restored on load; resume is
    tested to reproduce an uninterrupted run exactly)."""

    def filter(self, record):
        # accelerate's multi-process adapter may prefix "[RANK r] " to the message
        return "Removed shared tensor" not in str(record.msg)


_TIED_WEIGHTS_NOTE = _TiedWeightsNote()


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv)  # exits 2 with a message on a bad option (or prints --help)
    missing = missing_train_modules()
    if missing:
        return _err(f"the trainer needs the [train] extra, which is not installed (missing: "
                    f"{', '.join(missing)}). Install it with: {INSTALL_HINT}")
    main_process = int(os.environ.get("RANK", "0")) == 0
    try:
        action = prepare(cfg, main_process=main_process,
                         say=print if main_process else (lambda *a, **k: None))
    except RunDirError as e:
        return _err(str(e))
    if action == "done":
        return 0
    _handle_sigterm()
    try:
        from .loop import train  # imports transformers

        logging.getLogger("accelerate.utils.other").addFilter(_TIED_WEIGHTS_NOTE)
        train(cfg)
    except ModuleNotFoundError as e:
        return _err(_missing_module_message(e))
    except KeyboardInterrupt as e:
        term = isinstance(e, Terminated)
        if main_process:
            how = "terminated (SIGTERM)" if term else "interrupted"
            print(f"\niwsft-train: {how}: {interrupted_message(cfg.output_dir)}",
                  file=sys.stderr)
        return 143 if term else 130  # the shell's codes for SIGTERM / SIGINT
    except (DataError, RefCacheMismatch, RunDirError, ValueError) as e:  # ModelLoadError too
        return _err(str(e))
    except Diverged as e:  # summary.json written, final/ not; the message says how to go on
        if main_process:
            print(f"iwsft-train: error: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    return 0


if __name__ == "__main__":
    sys.exit(main())
