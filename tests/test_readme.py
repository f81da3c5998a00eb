"""README's usage snippet runs as written (smaller shapes) and its backward fills the
gradients of both inputs (lm_head must be a leaf tensor)."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_loss_snippet_runs_and_fills_both_gradients():
    text = README.read_text()
    section = text[text.index("## Using the loss"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    shapes = "B, T, H, V = 2, 512, 896, 151936"
    assert shapes in code  # realistic shapes in the README; smaller ones here, for speed
    code = code.replace(shapes, "B, T, H, V = 2, 48, 16, 1001").replace("[:, :100]", "[:, :10]")
    ns = {}
    exec(compile(code, str(README), "exec"), ns)
    hidden, lm_head, out = ns["hidden"], ns["lm_head"], ns["out"]
    assert lm_head.is_leaf and lm_head.grad is not None and hidden.grad is not None
    assert torch.isfinite(lm_head.grad).all() and lm_head.grad.abs().sum() > 0
    assert out.seq_weights.shape == (2,) and "ess_fraction" in out.stats
