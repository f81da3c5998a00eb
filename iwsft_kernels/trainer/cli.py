"""`iwsft-train`: command-line entry point (see TrainConfig for every option).

    iwsft-train                                   # embedded CPU demo, < 5 min on 2 cores
    iwsft-train --config configs/recipes/qwen2.5-32b-s1k.yaml
    accelerate launch --config_file configs/accelerate/fsdp2.yaml -m iwsft_kernels.trainer.cli ...
"""

from __future__ import annotations

import sys

from .config import parse_config
from .data import DataError
from .loop import ModelLoadError, train
from .refcache import RefCacheMismatch


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv)
    try:
        train(cfg)
    except (DataError, ModelLoadError, RefCacheMismatch, ValueError) as e:
        print(f"iwsft-train: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
