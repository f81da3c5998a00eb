"""`iwsft-train` as a newcomer meets it: every option validated (flags and config files) with
the allowed values named, --help with defaults, the [train] extra missing, an unwritable output
folder, a malformed JSONL line, and interrupted runs (kill -9 / Ctrl-C, then a rerun: a clear
stop, --resume, --overwrite)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from iwsft_kernels.trainer import cli, rundir
from iwsft_kernels.trainer.config import CHOICES, TrainConfig, build_parser, parse_config

REPO = Path(__file__).resolve().parents[2]
SMALL = ["--max-examples", "8", "--max-length", "64", "--micro-batch-size", "2",
         "--grad-accum", "1", "--eval-examples", "2", "--log-with", "none",
         "--warmup-ratio", "0"]


def _env():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in sys.path if p])
    return env


def _parse_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        parse_config(argv)
    err = capsys.readouterr().err
    # every bad option, option combination or config file exits 2 (docs/trainer.md), with
    # argparse's usage + error or our own one line
    assert e.value.code == 2, (e.value.code, err)
    assert "iwsft-train: error:" in err
    return err


# ------------------------------------------------------------------- option validation
BOOL_FIELDS = [f for f, t in TrainConfig.__annotations__.items() if str(t).startswith("bool")]


@pytest.mark.parametrize("name", sorted(CHOICES))
def test_enumerated_flags_reject_unknown_values_and_name_the_allowed(name, capsys):
    flag = "--" + name.replace("_", "-")
    err = _parse_error([flag, "banana"], capsys)
    assert flag in err and "'banana'" in err
    for allowed in CHOICES[name]:
        assert allowed in err
    for allowed in CHOICES[name]:  # every allowed value is accepted, as itself
        assert getattr(parse_config([flag, allowed]), name) == allowed


def test_bf16_takes_auto_yes_no_and_boolean_spellings(capsys):
    assert parse_config([]).bf16 == "auto"
    for v, want in (("yes", "yes"), ("true", "yes"), ("1", "yes"), ("no", "no"),
                    ("False", "no"), ("0", "no"), ("auto", "auto")):
        assert parse_config(["--bf16", v]).bf16 == want
    err = _parse_error(["--bf16", "banana"], capsys)
    assert "--bf16" in err and "auto, yes, no" in err


@pytest.mark.parametrize("name", BOOL_FIELDS)
def test_boolean_flags(name, capsys):
    flag = "--" + name.replace("_", "-")
    assert getattr(parse_config([flag]), name) is True
    for v, want in (("true", True), ("yes", True), ("1", True), ("on", True), ("false", False),
                    ("no", False), ("0", False), ("off", False)):
        assert getattr(parse_config([flag, v]), name) is want
    err = _parse_error([flag, "banana"], capsys)
    assert flag in err and "true/false" in err and "'banana'" in err


@pytest.mark.parametrize("argv,words", [
    (["--lr", "0"], "must be > 0"), (["--lr", "abc"], "expected a number"),
    (["--epochs", "0"], "must be >= 1"), (["--micro-batch-size", "1.5"], "expected an integer"),
    (["--warmup-ratio", "1.5"], "<= 1"), (["--adam-beta2", "1"], "< 1"),
    (["--save-every", "-1"], "must be >= 0"), (["--max-grad-norm", "nan"], "finite"),
    (["--temperature", "-1"], "--temperature must be a finite number > 0"),
    (["--mode", "token", "--w-min", "2", "--w-max", "1"], "--w-min"),
    (["--resume", "--overwrite"], "exclude each other"),
])
def test_numbers_and_combinations_checked(argv, words, capsys):
    assert words in _parse_error(argv, capsys)


def test_missing_config_file_and_learning_rate_alias(tmp_path, capsys):
    err = _parse_error(["--config", str(tmp_path / "nope.yaml")], capsys)
    assert "config file not found" in err and len(err.strip().splitlines()) == 1
    assert parse_config(["--learning-rate", "3e-4"]).lr == 3e-4
    assert "--lr/--learning-rate: must be > 0" in _parse_error(["--learning-rate", "0"], capsys)


def test_a_folder_that_is_not_a_model_says_so(tmp_path, capsys):
    junk = tmp_path / "notamodel"
    junk.mkdir()
    (junk / "readme.txt").write_text("hi")
    rc = cli.main(SMALL + ["--model", str(junk), "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "holds no model or tokenizer files" in err and "readme.txt" in err
    assert "sentencepiece" not in err and "Traceback" not in err


def test_config_file_values_are_validated_too(tmp_path, capsys):
    bad = tmp_path / "run.yaml"
    bad.write_text("bf16: banana\n")
    err = _parse_error(["--config", str(bad)], capsys)
    assert "'bf16'" in err and str(bad) in err and "auto, yes, no" in err
    bad.write_text("mode: seqence\n")
    assert "sft, token, sequence" in _parse_error(["--config", str(bad)], capsys)
    bad.write_text("packing: maybe\n")
    assert "expected a boolean" in _parse_error(["--config", str(bad)], capsys)
    bad.write_text("lr: 1e-5\nepochs: 3\nbf16: true\n")  # YAML reads 1e-5 as a string
    cfg = parse_config(["--config", str(bad)])
    assert (cfg.lr, cfg.epochs, cfg.bf16) == (1e-5, 3, "yes")
    bad.write_text("epochs: [1\n")
    assert "cannot parse" in _parse_error(["--config", str(bad)], capsys)


def test_help_shows_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo the wrapping
    for name in TrainConfig.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in text
    for action in build_parser()._actions[1:]:  # [0] is --help
        assert "default" in action.help, action.option_strings
        assert "".join(action.help.split()) in "".join(text.split())  # shown (wrapped)
    assert "(default: sequence)" in text and "(default: outputs/iwsft-default)" in text
    assert "--resume" in text and "--overwrite" in text


def test_choices_match_what_they_are_passed_to():
    from iwsft_kernels.core import BACKENDS

    assert set(CHOICES["loss_backend"]) == set(BACKENDS)
    LoggerType = pytest.importorskip("accelerate.utils").LoggerType
    assert set(CHOICES["log_with"]) == {"auto", "none"} | {t.value for t in LoggerType}


# ---------------------------------------------------------------- environment problems
BLOCK = r"""
import sys
class Block:  # as if the [train] extra were not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("transformers", "accelerate"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
from iwsft_kernels.trainer.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_without_train_extra_says_which_extra_to_install(tmp_path):
    r = subprocess.run([sys.executable, "-c", BLOCK, "--output-dir", str(tmp_path / "o")],
                       env=_env(), capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2
    assert 'pip install "iwsft-kernels[train]"' in r.stderr
    assert "transformers" in r.stderr and "accelerate" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()  # stopped before any work


@pytest.fixture
def no_training(monkeypatch):
    """Fails the test if the run gets as far as the training loop."""
    import iwsft_kernels.trainer.loop as loop

    def boom(cfg):
        raise AssertionError("train() was called")

    monkeypatch.setattr(loop, "train", boom)


def test_unwritable_output_folder_stops_before_any_work(tmp_path, capsys, no_training,
                                                         monkeypatch):
    afile = tmp_path / "a-file"
    afile.write_text("x")
    assert cli.main(SMALL + ["--output-dir", str(afile / "run")]) == 2
    err = capsys.readouterr().err
    assert "cannot write to the folder" in err and "--output-dir" in err and "Traceback" not in err
    ro = tmp_path / "read-only"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):  # root writes anywhere: make the probe fail as it would
            real = Path.write_text

            def denied(self, *a, **k):
                if self.parent == ro:
                    raise PermissionError(13, "Permission denied", str(self))
                return real(self, *a, **k)

            monkeypatch.setattr(Path, "write_text", denied)
        assert cli.main(SMALL + ["--output-dir", str(ro)]) == 2
        err = capsys.readouterr().err
        assert f"cannot write to the folder {ro}" in err and "Permission denied" in err
    finally:
        ro.chmod(0o755)


def test_malformed_jsonl_line_is_named(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    rows = [json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) for i in range(5)]
    rows[3] = '{"prompt": "q3" "response": "a3"}'  # missing comma
    data.write_text("\n".join(rows[:2]) + "\n\n" + "\n".join(rows[2:]) + "\n")  # a blank line
    assert cli.main(SMALL + ["--data", str(data), "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{data}: line 5, column" in err and "Expecting ','" in err
    data.write_text(rows[0] + "\n[1, 2]\n")
    assert cli.main(SMALL + ["--data", str(data), "--output-dir", str(tmp_path / "o")]) == 2
    assert "line 2: expected one JSON object" in capsys.readouterr().err


# ------------------------------------------------------------------------ run folders
def _fake_run(out: Path, steps=5, checkpoint=4, finished=False, ref=None, config=None):
    (out / "checkpoints").mkdir(parents=True)
    (out / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, steps + 1))
        + '{"step": 6, "lo')  # a line cut short by the kill
    if checkpoint:
        ck = out / "checkpoints" / f"step-{checkpoint:07d}"
        ck.mkdir()
        (ck / "trainer_state.json").write_text(json.dumps({"next_step": checkpoint,
                                                           "total_steps": 16}))
    (out / "checkpoints" / ".tmp-step-0000006").mkdir()  # a save cut short
    if finished:
        (out / "final").mkdir()
        (out / "summary.json").write_text(json.dumps({"total_steps": steps}))
    if ref is not None:
        (out / "ref_logprobs").mkdir()
        (out / "ref_logprobs" / "meta.json").write_text(
            json.dumps({"parts": {"n_examples": 64}, "batch_size": 8}))
        for k in range(ref):
            (out / "ref_logprobs" / f"batch-{k:05d}.pt").write_text("")
    (out / rundir.RUN_CONFIG).write_text(json.dumps(
        config or parse_config(SMALL + ["--output-dir", str(out)]).to_dict()))


def test_inspect_reports_steps_and_last_checkpoint(tmp_path):
    assert not rundir.inspect(tmp_path / "nothing").holds_run
    (tmp_path / "only-my-notes").mkdir()
    (tmp_path / "only-my-notes" / "notes.txt").write_text("mine")
    assert not rundir.inspect(tmp_path / "only-my-notes").holds_run
    out = tmp_path / "run"
    _fake_run(out, ref=3)
    st = rundir.inspect(out)
    assert st.holds_run and not st.finished
    assert (st.steps_done, st.checkpoint_step, st.total_steps) == (5, 4, 16)
    assert st.checkpoint == out / "checkpoints" / "step-0000004"
    text = st.describe()
    assert "5 of 16 training steps done" in text and "step-0000004 (step 4)" in text
    assert "3 of 8 batches cached" in text


def test_rerun_into_a_run_stops_and_names_both_options(tmp_path, capsys, no_training):
    out = tmp_path / "run"
    _fake_run(out)
    assert cli.main(SMALL + ["--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already holds an unfinished run: 5 of 16 training steps done" in err
    assert "--resume" in err and "--overwrite" in err and "step-0000004" in err
    fin = tmp_path / "fin"
    _fake_run(fin, steps=16, checkpoint=16, finished=True)
    assert cli.main(SMALL + ["--output-dir", str(fin)]) == 2
    err = capsys.readouterr().err
    assert "a finished run (16 of 16 steps" in err and "--overwrite" in err
    assert "nothing to resume" in err
    assert cli.main(SMALL + ["--output-dir", str(fin), "--resume"]) == 0  # nothing to do
    assert "nothing to resume" in capsys.readouterr().out


def test_resume_refuses_changed_options(tmp_path, capsys, no_training):
    out = tmp_path / "run"
    _fake_run(out)
    assert cli.main(SMALL + ["--output-dir", str(out), "--resume", "--mode", "token"]) == 2
    err = capsys.readouterr().err
    assert "other options" in err and "mode: 'sequence' -> 'token'" in err


def test_overwrite_deletes_only_what_a_run_wrote(tmp_path):
    out = tmp_path / "run"
    _fake_run(out, finished=True, ref=2)
    (out / "notes.txt").write_text("mine")
    cfg = parse_config(["--output-dir", str(out), "--overwrite"])
    said = []
    assert rundir.prepare(cfg, say=said.append) == "fresh"
    assert "deleted the earlier run" in said[0]
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", rundir.RUN_CONFIG]


def test_default_run_checkpoints_often_enough_to_resume():
    cfg = parse_config([])
    assert cfg.save_every is None
    total = 16  # the default run: 64 examples / global batch 8 x 2 epochs
    every = cfg.checkpoint_every(total)
    assert 1 <= every <= total // 4  # an interrupted default run loses at most a quarter
    assert parse_config(["--save-every", "0"]).checkpoint_every(total) == 0
    assert parse_config(["--save-every", "3"]).checkpoint_every(total) == 3


# ----------------------------------------------------------------- real interruptions
def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_kill_then_rerun_resume_and_overwrite(tmp_path, capsys, fresh_accelerate_state):
    """kill -9 after the first checkpoint of a run with the default checkpointing; the same
    command then stops with a clear message; --resume finishes it; --overwrite starts over."""
    out = tmp_path / "run"
    args = SMALL + ["--max-steps", "4", "--output-dir", str(out)]  # auto: checkpoint every step
    assert parse_config(args).checkpoint_every(4) == 1
    proc = subprocess.Popen([sys.executable, "-m", "iwsft_kernels.trainer.cli", *args],
                            env=_env(), cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        while not list((out / "checkpoints").glob("step-*")):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint after 240 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert not (out / "final").exists()
    st = rundir.inspect(out)
    assert st.checkpoint is not None and st.checkpoint_step < 4

    assert cli.main(args) == 2  # the same command again: says what it found, stops
    err = capsys.readouterr().err
    assert f"{out} already holds an unfinished run" in err
    assert f"last checkpoint {st.checkpoint}" in err
    assert "--resume" in err and "--overwrite" in err

    assert cli.main(args + ["--resume"]) == 0
    text = capsys.readouterr().out
    assert f"continuing from step {st.checkpoint_step}" in text
    assert "reference log-probs: using the complete cache" in text
    resumed = _metrics(out)
    assert [m["step"] for m in resumed] == list(range(1, 5))
    assert (out / "final" / "model.safetensors").exists()

    assert cli.main(args + ["--overwrite", "--stop-after-steps", "1"]) == 0
    text = capsys.readouterr().out
    assert "--overwrite: deleted the earlier run" in text and "continuing" not in text
    assert "using the complete cache" not in text  # the reference pass ran again
    fresh = _metrics(out)
    assert [m["step"] for m in fresh] == [1] and not (out / "final").exists()
    assert fresh[0]["loss"] == pytest.approx(resumed[0]["loss"], rel=1e-5)  # same start


def test_ctrl_c_says_how_to_resume(tmp_path, capsys, monkeypatch, fresh_accelerate_state):
    import iwsft_kernels.trainer.checkpoint as checkpoint

    real = checkpoint.save_checkpoint

    def save_then_interrupt(*a, **k):
        path = real(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_interrupt)
    out = tmp_path / "run"
    assert cli.main(SMALL + ["--mode", "sft", "--max-steps", "2", "--save-every", "1",
                             "--output-dir", str(out)]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "--resume to continue from step 1" in err
    assert "Traceback" not in err


def test_sigterm_is_handled_like_ctrl_c(tmp_path):
    """What a scheduler sends: the run ends with the resume message and exit 143."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "iwsft_kernels.trainer.cli", *SMALL,
                             "--mode", "sft", "--max-steps", "400", "--save-every", "1",
                             "--output-dir", str(out)], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not list((out / "checkpoints").glob("step-*")) and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-2000:]
    assert "terminated (SIGTERM)" in err and "--resume to continue from step" in err
    assert "Traceback" not in err


def test_reference_pass_says_it_resumes_from_cached_batches(tmp_path, capsys):
    import accelerate
    from test_sampler_refcache import tiny_data, tiny_model

    from iwsft_kernels.refcache import PrecomputeInterrupted, compute_ref_logprobs

    acc = accelerate.Accelerator(cpu=True)
    model, data = tiny_model(), tiny_data(7)
    parts = {"data": data.fingerprint()[:16], "n_examples": 7}
    with pytest.raises(PrecomputeInterrupted):
        compute_ref_logprobs(acc, model, data, tmp_path / "ref", parts, 0, batch_size=2,
                             _stop_after_batches=2)
    capsys.readouterr()
    compute_ref_logprobs(acc, model, data, tmp_path / "ref", parts, 0, batch_size=2)
    out = capsys.readouterr().out
    assert "resuming an interrupted pass, 2 of 4 batches already cached" in out
    compute_ref_logprobs(acc, model, data, tmp_path / "ref", parts, 0, batch_size=2)
    assert "using the complete cache" in capsys.readouterr().out
