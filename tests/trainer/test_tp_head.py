"""`iwsft-train --tp-head 2` on 4 CPU ranks (gloo): FSDP2 over 2 ranks x the lm_head sharded
over the vocabulary across 2 ranks (tensor parallel, the fused loss merging the shards), against
the same global batch on one process; a run stopped after step 2 and resumed from its sharded
checkpoint against the uninterrupted one; the gathered final folder on one process. And the
refusals (no distributed launch, DeepSpeed, plain DDP, FSDP1, sizes that do not fit, a tied
head), without launching anything.

Small on purpose (see test_distributed.py): a tiny untied random Qwen2 (hidden 64, 2 layers,
vocabulary 151,936), 12 examples of <= 64 tokens, 3 steps, global batch 4 = 1 process x
micro-batch 2 x 2 accumulation = 2 dp ranks x 1 x 2 (each tp pair computes the same micro-batches).
Three 4-rank launches in all: the run, then the stopped run and its resume."""

import json
import subprocess
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from test_distributed import (COMMON, REPO, TWO, _env, _launch_cmd,  # noqa: E402
                              _one_process, _save_model, assert_resumed_exactly, assert_same_run)

from iwsft_kernels.trainer import tensor_parallel as tp  # noqa: E402
from iwsft_kernels.trainer.cli import main  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # tests/conftest.py
V = 151936


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    return _save_model(tmp_path_factory.mktemp("models") / "untied", False, 1)


def launch_4(args: list[str], out) -> str:
    cmd = _launch_cmd("fsdp2_cpu.yaml", "--num_processes", "4") + COMMON + TWO + args + [
        "--tp-head", "2", "--save-every", "2", "--output-dir", str(out)]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900, cwd=REPO)
    if r.returncode != 0:  # the workers' own error lines first: torchrun's summary hides them
        errors = [ln for ln in r.stderr.splitlines()
                  if any(w in ln for w in ("Error", "error:", "terminate", "what()", "Signal"))]
        pytest.fail(f"exit {r.returncode}\n" + "\n".join(errors[-30:]) + "\n--- stdout:\n"
                    + r.stdout[-1500:] + "\n--- stderr:\n" + r.stderr[-3000:], pytrace=False)
    return r.stdout


def test_fsdp2_x_tp_head_4_ranks_equal_one_process_and_resume_exact(untied, tmp_path):
    one = _one_process(tmp_path / "one", ["--model", str(untied)])
    full, part = tmp_path / "full", tmp_path / "part"
    args = ["--model", str(untied)]
    log = launch_4(args, full)
    assert "distributed: FSDP2 x tensor-parallel head (2 x 2), 4 processes (gloo, cpu)" in log
    # same metrics per step (loss and weights from the merged shards), same final parameters
    # (TOL: see test_distributed.py; measured: max difference 5.4e-7, mean 6e-10)
    assert_same_run(full, one, untied)
    d = json.loads((full / "summary.json").read_text())["distributed"]
    assert d["processes"] == 4 and d["tp"] == 2 and not d["tied"]
    assert d["head_rows_per_tp_rank"] == V // 2 and d["vocab"] == V
    # the head: V / 2 rows per tp rank, each FSDP2-sharded over 2 dp ranks; the embedding is
    # sharded over the 2 dp ranks only (replicated across tp)
    assert d["output_embeddings"] == {"local_rows": V // 4, "full_rows": V, "sharded": True}
    assert d["input_embeddings"] == {"local_rows": V // 2, "full_rows": V, "sharded": True}
    ck = full / "checkpoints" / "step-0000003"
    for sub in ("pytorch_model_fsdp_0", "optimizer_0"):  # one DCP shard file per rank
        assert sorted(p.name for p in (ck / sub).glob("*.distcp")) == [
            f"__{r}_0.distcp" for r in range(4)]

    # stopped after step 2, resumed from its sharded checkpoint == the uninterrupted run
    launch_4(args + ["--stop-after-steps", "2"], part)
    assert not (part / "final").exists()
    log = launch_4(args + ["--resume"], part)
    assert_resumed_exactly(part, full, log)

    # the gathered final folder: an ordinary untied transformers model on one process
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(full / "final")
    m1 = AutoModelForCausalLM.from_pretrained(one / "final")
    assert m.config.tie_word_embeddings is False and m.lm_head.weight.shape == (V, 64)
    ids = torch.tensor([[1, 50, 700, 9000, 151000]])
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, m1(ids).logits, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- refusals
FSDP2_ENV = {"WORLD_SIZE": "4", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2",
             "ACCELERATE_USE_DEEPSPEED": "false"}


@pytest.mark.parametrize("env, n, match", [
    ({"WORLD_SIZE": "1"}, 2, "single process"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_USE_FSDP": "false"}, 2, "DeepSpeed"),
    ({"ACCELERATE_USE_FSDP": "false"}, 2, "plain data parallel"),
    ({"FSDP_VERSION": "1"}, 2, "fsdp_version: 2"),
    ({"WORLD_SIZE": "6"}, 4, r"must divide the number of processes \(6\)"),
    ({}, 4, "leaves 1 rank for FSDP2"),
])
def test_launch_refusals(monkeypatch, env, n, match):
    for k, v in {**FSDP2_ENV, **env}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(tp.TensorParallelError, match=match) as e:
        tp.check_launch(n)
    assert isinstance(e.value, ValueError) and f"--tp-head {n}" in str(e.value)


def test_launch_sizes(monkeypatch):
    for k, v in FSDP2_ENV.items():
        monkeypatch.setenv(k, v)
    assert tp.check_launch(2) == 2
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert tp.check_launch(4) == 2 and tp.check_launch(2) == 4
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    assert tp.check_launch(1) == 1  # off: any launch


def test_single_process_run_is_refused_at_start(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main(COMMON + ["--tp-head", "2", "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "iwsft-train: error: --tp-head 2 needs several processes under FSDP2" in err
    assert "fsdp2_cpu.yaml" in err


def test_tied_head_is_refused(tmp_path):
    from transformers import AutoModelForCausalLM

    tied = AutoModelForCausalLM.from_pretrained(_save_model(tmp_path / "tied", True, 0))
    with pytest.raises(tp.TensorParallelError, match="needs an untied output head"):
        tp.check_head(tied, 2)
    untied = AutoModelForCausalLM.from_pretrained(_save_model(tmp_path / "untied", False, 0))
    assert tp.check_head(untied, 2) is untied.lm_head


def test_tp_head_option_range():
    with pytest.raises(SystemExit) as e:
        from iwsft_kernels.trainer.config import parse_config

        parse_config(["--tp-head", "0"])
    assert e.value.code == 2


class _FakeAcc:
    """4 processes, tp 2: rank = dp * 2 + tp."""

    def __init__(self, tp_size=2, n=4):
        self.num_processes, self.device = n, torch.device("cpu")
        self.parallelism_config = SimpleNamespace(tp_size=tp_size, tp_enabled=tp_size > 1)

    def gather(self, t):  # each rank's rows: its rank in column 0
        return torch.cat([t + torch.tensor([r, 0.0]) for r in range(self.num_processes)])


def test_gathers_keep_one_rank_per_tp_group(monkeypatch):
    acc = _FakeAcc()
    local = torch.tensor([[0.0, 1.0], [0.0, 2.0]])  # 2 micro-batch rows per rank
    got = tp.gather_rows(acc, local)
    assert got[:, 0].tolist() == [0, 0, 2, 2] and got[:, 1].tolist() == [1, 2, 1, 2]
    assert tp.gather_rows(_FakeAcc(1), local)[:, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "gather_object",
                        lambda x: [[f"r{r}-{v}" for v in x[0]] for r in range(4)])
    assert tp.gather_list(acc, ["a", "b"]) == ["r0-a", "r0-b", "r2-a", "r2-b"]
