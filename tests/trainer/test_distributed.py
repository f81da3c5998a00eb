"""`iwsft-train` across processes on CPU ranks (gloo), launched with `accelerate launch`:
FSDP2 (sharded lm_head/embedding, tied and untied), sharded checkpoints and exact resume, the
gathered final folder, a sharded --ref-model, 2 simulated nodes on loopback, and DeepSpeed
ZeRO-3 (its launch config always; a run when deepspeed is installed). Every multi-process run
is compared with the same global batch on one process.

Small on purpose (2-core CI): tiny random Qwen2 folders (hidden 64, 2 layers, the real 151,936
vocabulary so that the bundled tokenizer fits), 12 examples of <= 64 tokens, 3 steps, global
batch 4 = 1 process x micro-batch 2 x 2 accumulation = 2 processes x 1 x 2."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from safetensors.torch import load_file  # noqa: E402

from iwsft_kernels.trainer.cli import main  # noqa: E402
from iwsft_kernels.trainer.config import ASSETS  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs" / "accelerate"
COMMON = ["--max-examples", "12", "--max-length", "64", "--eval-examples", "2", "--log-with",
          "none", "--warmup-ratio", "0", "--ref-batch-size", "4", "--max-steps", "3",
          "--lr", "1e-3", "--weight-decay", "1.0", "--tokenizer", str(ASSETS / "tokenizer")]
ONE = ["--micro-batch-size", "2", "--grad-accum", "2"]  # global batch 4 on one process
TWO = ["--micro-batch-size", "1", "--grad-accum", "2"]  # ... and on two
# fp32, another summation order; AdamW (lr 1e-3) moves every weight by ~1e-3 and turns a
# near-zero gradient entry's rounding into up to ~lr of difference, seen on single entries
# (4e-6 once, in the embedding); the mean difference over all weights is ~2e-9 (a wrong
# normaliser or weight decay would give ~1e-6 and more).
TOL = dict(rtol=1e-5, atol=2e-5)


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # tests/conftest.py


def _save_model(path: Path, tie: bool, seed: int) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(ASSETS / "model")
    config.tie_word_embeddings = tie
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return {"tied": _save_model(d / "tied", True, 0), "untied": _save_model(d / "untied", False, 1),
            "ref": _save_model(d / "ref", False, 2)}


def _one_process(out: Path, args: list[str]) -> Path:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    assert main(COMMON + ONE + args + ["--output-dir", str(out)]) == 0
    AcceleratorState._reset_state(True)
    return out


@pytest.fixture(scope="module")
def one_tied(models, tmp_path_factory):
    return _one_process(tmp_path_factory.mktemp("one") / "tied", ["--model", str(models["tied"])])


@pytest.fixture(scope="module")
def one_untied_ref(models, tmp_path_factory):
    return _one_process(tmp_path_factory.mktemp("one") / "untied",
                        ["--model", str(models["untied"]), "--ref-model", str(models["ref"])])


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}


def _launch_cmd(config: str, *launch_args: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(CONFIGS / config), *launch_args, "-m", "iwsft_kernels.trainer.cli"]


def accelerate_launch(config: str, args: list[str], out: Path) -> str:
    r = subprocess.run(_launch_cmd(config) + COMMON + TWO + args + ["--output-dir", str(out)],
                       env=_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    return r.stdout


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def final_params(out: Path) -> dict:
    return load_file(str(out / "final" / "model.safetensors"))


def assert_resumed_exactly(part: Path, full: Path, log: str):
    """A run stopped after step 2 and resumed (`log`: the resume's output) == the uninterrupted
    run bit for bit: the same metrics per step and the same final parameters."""
    assert "resumed from" in log and "step-0000002" in log
    assert [m["step"] for m in metrics(part)] == [1, 2, 3]
    for a, b in zip(metrics(part), metrics(full)):
        for k in ("loss", "grad_norm", "weight_mean", "lr"):
            assert a[k] == b[k], k
    pa, pb = final_params(part), final_params(full)
    assert sorted(pa) == sorted(pb)
    for k in pb:
        assert torch.equal(pa[k], pb[k]), k


def assert_same_run(got: Path, want: Path, start: Path):
    """Same metrics per step and same final parameters; and the parameters did move."""
    mg, mw = metrics(got), metrics(want)
    assert [r["step"] for r in mg] == [r["step"] for r in mw] == [1, 2, 3]
    for rg, rw in zip(mg, mw):
        assert rg["target_tokens"] == rw["target_tokens"]
        for k in ("loss", "weight_mean", "weight_max"):
            assert rg[k] == pytest.approx(rw[k], rel=1e-5), k
        # a norm over ~2e7 fp32 values, summed per shard then over ranks: another order
        assert rg["grad_norm"] == pytest.approx(rw["grad_norm"], rel=1e-4)
    pg, pw, p0 = final_params(got), final_params(want), load_file(str(start / "model.safetensors"))
    assert sorted(pg) == sorted(pw)
    for k in pw:
        torch.testing.assert_close(pg[k], pw[k], **TOL, msg=k)
    diff = sum((pg[k] - pw[k]).abs().sum().item() for k in pw)
    assert diff / sum(v.numel() for v in pw.values()) < 3e-8  # mean difference
    moved = max((pw[k] - p0[k]).abs().max().item() for k in p0)
    assert moved > 50 * TOL["atol"], moved  # the comparison is not between untouched weights


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------- FSDP2
def test_fsdp2_untied_ref_model_sharded_resume_exact(models, one_untied_ref, tmp_path):
    """Single node, 2 ranks: == 1 process; the --ref-model sharded and freed; a run stopped
    after step 2 and resumed from its sharded checkpoint == the uninterrupted run, parameters
    and AdamW state bit for bit; the gathered final folder loads on one process."""
    args = ["--model", str(models["untied"]), "--ref-model", str(models["ref"]),
            "--save-every", "2"]
    full, part = tmp_path / "full", tmp_path / "part"
    log = accelerate_launch("fsdp2_cpu.yaml", args, full)
    assert "distributed: FSDP2, 2 processes (gloo, cpu)" in log
    assert_same_run(full, one_untied_ref, models["untied"])
    s = json.loads((full / "summary.json").read_text())
    d = s["distributed"]
    assert d["type"] == "FSDP" and d["processes"] == 2 and not d["tied"]
    for emb in ("input_embeddings", "output_embeddings"):  # lm_head and embedding sharded
        assert d[emb] == {"local_rows": 151936 // 2, "full_rows": 151936, "sharded": True}
    assert d["param_mib_per_rank"] == pytest.approx(d["param_mib_full"] / 2, rel=0.01)
    r = s["ref_model_memory"]
    assert r["placement"] == "sharded (FSDP2) over 2 ranks" and r["freed"] is True
    assert r["param_mib_per_rank"] == pytest.approx(r["param_mib_full"] / 2, rel=0.01)
    assert f"{r['param_mib_per_rank']:.1f} MiB of parameters per rank" in log
    # the reference really is the other model: not 1 at step 1, and the same as on one process
    assert metrics(full)[0]["weight_mean"] != pytest.approx(1.0, abs=1e-3)

    # sharded checkpoints: one torch.distributed.checkpoint file per rank
    ck = full / "checkpoints" / "step-0000003"
    for sub in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert sorted(p.name for p in (ck / sub).glob("*.distcp")) == ["__0_0.distcp",
                                                                       "__1_0.distcp"]
    accelerate_launch("fsdp2_cpu.yaml", args + ["--stop-after-steps", "2"], part)
    assert not (part / "final").exists()
    log = accelerate_launch("fsdp2_cpu.yaml", args + ["--resume"], part)
    assert_resumed_exactly(part, full, log)
    pb = final_params(full)
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    states = []
    for run in (full, part):
        for sub in ("optimizer_0", "pytorch_model_fsdp_0"):
            dst = tmp_path / f"{run.name}-{sub}.pt"
            dcp_to_torch_save(run / "checkpoints" / "step-0000003" / sub, dst)
            states.append(torch.load(dst, weights_only=False))
    opt_full, model_full, opt_part, model_part = states
    fo, po = _flatten(opt_full), _flatten(opt_part)
    assert sorted(fo) == sorted(po)
    assert sum(k.endswith(".exp_avg_sq") for k in fo) == len(pb)  # AdamW state of every tensor
    for k in fo:
        if torch.is_tensor(fo[k]):
            assert torch.equal(fo[k], po[k]), k
        else:
            assert fo[k] == po[k], k
    fm, pm = model_full["model"], model_part["model"]
    assert sorted(fm) == sorted(pb)
    for k in fm:  # the checkpoint holds the final parameters
        assert torch.equal(fm[k], pm[k]) and torch.equal(fm[k], pb[k]), k

    # the gathered final folder: an ordinary transformers model on one process
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(full / "final")
    m1 = AutoModelForCausalLM.from_pretrained(one_untied_ref / "final")
    assert m.config.tie_word_embeddings is False
    sd, sd1 = m.state_dict(), m1.state_dict()
    for k in sd1:
        torch.testing.assert_close(sd[k], sd1[k], **TOL, msg=k)
    ids = torch.tensor([[1, 50, 700, 9000, 151000]])
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, m1(ids).logits, rtol=1e-4, atol=1e-4)


def test_fsdp2_tied_two_simulated_nodes(models, one_tied, tmp_path):
    """2 "nodes" of 1 process each on loopback (`--num_machines 2 --machine_rank r`), FSDP2,
    tied embeddings: == 1 process; the final folder keeps the head tied."""
    port, out = str(_free_port()), tmp_path / "nodes"
    args = COMMON + TWO + ["--model", str(models["tied"]), "--output-dir", str(out)]
    procs = [subprocess.Popen(_launch_cmd("fsdp2_cpu.yaml", "--num_machines", "2",
                                          "--num_processes", "2", "--machine_rank", str(r),
                                          "--main_process_ip", "127.0.0.1",
                                          "--main_process_port", port) + args,
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=REPO) for r in (0, 1)]
    try:
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill() if p.poll() is None else None
    for p, (so, se) in zip(procs, outs):
        assert p.returncode == 0, (so[-2000:], se[-4000:])
    assert "distributed: FSDP2, 2 processes (gloo, cpu, 2 nodes)" in outs[0][0]
    assert_same_run(out, one_tied, models["tied"])
    d = json.loads((out / "summary.json").read_text())["distributed"]
    assert d["nodes"] == 2 and d["tied"] and d["output_embeddings"]["local_rows"] == 151936 // 2
    assert "lm_head.weight" not in final_params(out)  # tied: written once, as in 1 process
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(out / "final")
    assert m.lm_head.weight is m.model.embed_tokens.weight


# -------------------------------------------------------------------------------- DeepSpeed
def _deepspeed_plugin_from_launch_config(config: Path):
    """What a process started by `accelerate launch --config_file config` builds (no deepspeed
    needed): accelerate's own argument handling and environment, then DeepSpeedPlugin()."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin, patch_environment
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args = launch_command_parser().parse_args(["--config_file", str(config), "x.py"])
    args, defaults, _ = _validate_launch_command(args)
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
    _, env = prepare_deepspeed_cmd_env(args)
    with patch_environment(**{k: v for k, v in env.items() if k.startswith("ACCELERATE_")}):
        return DeepSpeedPlugin()


@pytest.mark.parametrize("config", ["zero3.yaml", "zero3_cpu.yaml"])
def test_zero3_launch_config_agrees_with_trainer(config):
    import yaml

    from iwsft_kernels.trainer.distributed import DistributedSetupError, deepspeed_settings

    plugin = _deepspeed_plugin_from_launch_config(CONFIGS / config)
    ds = plugin.deepspeed_config
    assert ds["zero_optimization"]["stage"] == 3
    if config == "zero3.yaml":  # the 32B recipe is meant for this config: they must agree
        recipe = yaml.safe_load((REPO / "configs/recipes/qwen2.5-32b-s1k.yaml").read_text())
        ga, clip, mb = recipe["grad_accum"], recipe["max_grad_norm"], recipe["micro_batch_size"]
        assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    else:  # the defaults of iwsft-train
        ga, clip, mb = 2, 1.0, 4
    want = deepspeed_settings(ds, mb, ga, clip)
    assert ds["gradient_accumulation_steps"] == want["gradient_accumulation_steps"] == ga
    assert ds["gradient_clipping"] == want["gradient_clipping"] == clip
    with pytest.raises(DistributedSetupError, match="--grad-accum 4"):
        deepspeed_settings(ds, mb, 4, clip)
    with pytest.raises(DistributedSetupError, match="--max-grad-norm 0.5"):
        deepspeed_settings(ds, mb, ga, 0.5)


def test_zero3_two_ranks_equal_one_rank(models, one_tied, tmp_path):
    pytest.importorskip("deepspeed", reason="deepspeed not installed (pip install deepspeed)")
    out = tmp_path / "zero3"
    log = accelerate_launch("zero3_cpu.yaml", ["--model", str(models["tied"])], out)
    assert "distributed: DeepSpeed, 2 processes (gloo, cpu)" in log
    assert_same_run(out, one_tied, models["tied"])
    d = json.loads((out / "summary.json").read_text())["distributed"]
    assert d["type"] == "DEEPSPEED" and d["param_mib_per_rank"] < 0.6 * d["param_mib_full"]


# -------------------------------------------------------------------------- small pieces
def test_launch_config_for_two_nodes_of_8_gpus():
    import yaml

    c = yaml.safe_load((CONFIGS / "fsdp2_2nodes.yaml").read_text())
    assert c["distributed_type"] == "FSDP" and c["fsdp_config"]["fsdp_version"] == 2
    assert c["num_machines"] == 2 and c["num_processes"] == 16  # total over the machines
    assert c["fsdp_config"]["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"


def test_param_counting_helpers_count_tied_weights_once():
    from transformers import AutoConfig, AutoModelForCausalLM

    from iwsft_kernels.trainer.distributed import (full_param_bytes, local_param_bytes,
                                                   tied_duplicate_names)

    config = AutoConfig.from_pretrained(ASSETS / "model")
    m = AutoModelForCausalLM.from_config(config)
    n = sum(p.numel() for p in m.parameters()) + sum(b.numel() for b in m.buffers())
    assert tied_duplicate_names(m) == ["lm_head.weight"]
    assert full_param_bytes(m) == local_param_bytes(m) == 4 * n  # parameters() dedups ties
