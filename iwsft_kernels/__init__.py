"""iwsft-kernels: fused linear cross-entropy with importance weights for iw-SFT.

    from iwsft_kernels import IWConfig, linear_iwsft_loss, LinearIWSFTLoss, linear_logprobs
"""

from .config import IWConfig, LogitTransform, VocabParallel
from .loss import (IWSFTOutput, LinearIWSFTLoss, LogProbsOutput, linear_iwsft_loss,
                   linear_logprobs)

__all__ = ["IWConfig", "IWSFTOutput", "LinearIWSFTLoss", "LogProbsOutput", "LogitTransform",
           "VocabParallel", "linear_iwsft_loss", "linear_logprobs"]
__version__ = "0.1.0"
