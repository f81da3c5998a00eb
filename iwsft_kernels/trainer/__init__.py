"""`iwsft-train`: a thin accelerate trainer for iw-SFT (docs/trainer.md, docs/design.md §5).

    from iwsft_kernels.trainer import TrainConfig, train
    summary = train(TrainConfig(output_dir="outputs/demo"))

`train` is imported on first use: the command line (cli.py) can then check its options and
the [train] extra before transformers / accelerate are imported.
"""

from .config import TrainConfig

__all__ = ["TrainConfig", "train"]


def __getattr__(name):
    if name == "train":
        from .loop import train

        return train
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
