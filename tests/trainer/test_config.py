"""TrainConfig from flags and config files (every IWConfig option reachable)."""

from pathlib import Path

import pytest

from iwsft_kernels import IWConfig
from iwsft_kernels.trainer.config import TrainConfig, parse_config

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "recipes" / "qwen2.5-32b-s1k.yaml"


def test_defaults_are_the_embedded_demo():
    cfg = parse_config([])
    assert cfg == TrainConfig() and cfg.mode == "sequence"
    assert IWConfig(**cfg.iw_kwargs()) == IWConfig(mode="sequence")


def test_flags_and_iw_options():
    cfg = parse_config(["--mode", "token", "--temperature", "0.5", "--w-min", "0.1", "--w-max",
                        "2", "--self-normalize", "--length-normalize", "false",
                        "--micro-batch-size", "3", "--quality-weight"])
    iw = IWConfig(**cfg.iw_kwargs())
    assert (iw.mode, iw.temperature, iw.bounds, iw.self_normalize, iw.length_normalize) == (
        "token", 0.5, (0.1, 2.0), True, False)
    assert cfg.micro_batch_size == 3 and cfg.quality_weight is True


def test_recipe_file_with_override(tmp_path, capsys):
    cfg = parse_config(["--config", str(RECIPE), "--epochs", "1"])
    assert cfg.model == "Qwen/Qwen2.5-32B-Instruct" and cfg.data == "simplescaling/s1K-1.1"
    assert (cfg.lr, cfg.epochs, cfg.warmup_ratio, cfg.weight_decay) == (1e-5, 1, 0.05, 1e-4)
    assert (cfg.adam_beta1, cfg.adam_beta2, cfg.gradient_checkpointing) == (0.9, 0.95, True)
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 1.0\n")
    with pytest.raises(SystemExit) as e:
        parse_config(["--config", str(bad)])
    assert e.value.code == 2 and "unknown keys" in capsys.readouterr().err
