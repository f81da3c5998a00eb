"""`iwsft-train`: a thin accelerate trainer for iw-SFT (docs/design.md §5).

    from iwsft_kernels.trainer import TrainConfig, train
    summary = train(TrainConfig(output_dir="outputs/demo"))
"""

from .config import TrainConfig
from .loop import train

__all__ = ["TrainConfig", "train"]
