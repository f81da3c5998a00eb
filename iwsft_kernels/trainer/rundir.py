"""The output folder of a run: what an earlier run left there, and what a new run does with it.

Checked by `iwsft-train` before any work (cli.py):
- the folder must be writable (else a clear error, not an OSError after the setup);
- a folder that already holds a run (training steps, checkpoints, a final model, or cached
  reference log-probs) is never silently started over: without ``--resume`` / ``--overwrite``
  the command stops and says what it found and what each option does; ``--resume`` continues
  from the last checkpoint (refused if the options that shape the run changed);
  ``--overwrite`` deletes what the earlier run wrote (and nothing else) and starts fresh.

What a run writes in OUTPUT_DIR (loop.py): ``run_config.json`` (its options), ``metrics.jsonl``
(one line per step), ``checkpoints/step-NNNNNNN/`` (``trainer_state.json`` inside; written to a
temp folder and renamed), ``ref_logprobs/`` (default reference cache: ``batch-*.pt``,
``complete``), ``final/``, ``summary.json``, tracker logs (``iwsft/``),
``last_step_weights.json`` (the last step's sequence weights) and ``report/`` (plots and
report.md, iwsft_kernels/report.py).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

RUN_CONFIG = "run_config.json"
# written by a run into OUTPUT_DIR (what --overwrite deletes)
RUN_FILES = ("metrics.jsonl", "summary.json", RUN_CONFIG, "last_step_weights.json")
RUN_DIRS = ("checkpoints", "final", "ref_logprobs", "iwsft", "report")
# options that may differ between a run and its --resume (they do not change the steps)
RESUME_MAY_CHANGE = {"resume", "overwrite", "stop_after_steps", "config", "log_with",
                     "output_dir", "save_every", "keep_checkpoints", "ref_batch_size",
                     "ref_cache", "eval_examples", "report", "max_nonfinite_steps",
                     "lr"}  # lr: e.g. to continue a diverged run at a lower rate


class RunDirError(ValueError):
    """The output folder cannot be used as asked (names the folder and the way out)."""


@dataclass
class RunState:
    """What an earlier run left in an output folder."""

    out_dir: Path
    steps_done: int = 0  # last step recorded in metrics.jsonl
    total_steps: int | None = None
    checkpoint: Path | None = None  # newest complete checkpoint
    checkpoint_step: int = 0
    finished: bool = False  # the final model was saved
    ref_batches: int = 0  # cached reference log-prob batch files (default cache location)
    ref_batches_total: int | None = None
    ref_complete: bool = False
    config: dict | None = None  # the earlier run's options (run_config.json)

    @property
    def holds_run(self) -> bool:
        return bool(self.steps_done or self.checkpoint or self.finished or self.ref_batches)

    def describe(self) -> str:
        """One line: what was found."""
        parts = []
        total = f" of {self.total_steps}" if self.total_steps else ""
        if self.finished:
            parts.append(f"a finished run ({self.steps_done}{total} steps, final model in "
                         f"{self.out_dir / 'final'})")
        else:
            parts.append(f"an unfinished run: {self.steps_done}{total} training steps done")
            if self.checkpoint is not None:
                parts.append(f"last checkpoint {self.checkpoint} (step {self.checkpoint_step})")
            else:
                parts.append("no checkpoint yet")
            if self.ref_complete:
                parts.append("reference log-probs cached")
            elif self.ref_batches:
                of = f" of {self.ref_batches_total}" if self.ref_batches_total else ""
                parts.append(f"reference log-probs: {self.ref_batches}{of} batches cached")
        return "; ".join(parts)


def _last_metrics_step(path: Path) -> int:
    step = 0
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        try:
            step = max(step, int(json.loads(line)["step"]))
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill
    return step


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def inspect(out_dir: str | Path) -> RunState:
    """What an earlier run left in `out_dir` (an empty state if nothing)."""
    out = Path(out_dir)
    st = RunState(out)
    if not out.is_dir():
        return st
    st.steps_done = _last_metrics_step(out / "metrics.jsonl")
    cks = sorted(p for p in (out / "checkpoints").glob("step-*")
                 if p.is_dir() and (p / "trainer_state.json").is_file())
    if cks:
        st.checkpoint = cks[-1]
        state = _read_json(cks[-1] / "trainer_state.json") or {}
        st.checkpoint_step = int(state.get("next_step", int(cks[-1].name.split("-")[1])))
        st.total_steps = state.get("total_steps")
    summary = _read_json(out / "summary.json")
    if summary is not None:
        st.total_steps = summary.get("total_steps", st.total_steps)
        st.finished = not summary.get("stopped_early") and (out / "final").is_dir()
    elif (out / "final").is_dir():
        st.finished = True
    st.steps_done = max(st.steps_done, st.checkpoint_step)
    ref = out / "ref_logprobs"
    if ref.is_dir():
        st.ref_batches = len(list(ref.glob("batch-*.pt")))
        st.ref_complete = (ref / "complete").exists()
        meta = _read_json(ref / "meta.json") or {}
        n, bs = meta.get("parts", {}).get("n_examples"), meta.get("batch_size")
        if isinstance(n, int) and isinstance(bs, int) and bs > 0:
            st.ref_batches_total = math.ceil(n / bs)
    st.config = _read_json(out / RUN_CONFIG)
    return st


def check_writable(folder: str | Path, option: str = "--output-dir") -> None:
    """Create `folder` if needed and write a probe file in it; RunDirError if that fails."""
    path = Path(folder)
    try:
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(f"{path} is a file")
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        why = e.strerror or str(e)
        raise RunDirError(f"cannot write to the folder {path} ({option}): {why}. Choose "
                          f"another {option} (a folder you can write to).") from None


def _options_text(out: Path, finished: bool) -> str:
    cont = ("  it is finished: nothing to resume\n" if finished else
            "  to continue it:  rerun the same command with --resume\n")
    return (cont + f"  to start over:   add --overwrite (deletes the earlier run's checkpoints, "
            f"metrics, final model and reference cache in {out})\n"
            f"  or choose another --output-dir")


def _config_changes(saved: dict, now: dict) -> dict:
    return {k: (saved[k], now.get(k)) for k in sorted(saved)
            if k not in RESUME_MAY_CHANGE and k in now and saved[k] != now[k]}


def overwrite(out_dir: str | Path) -> list[str]:
    """Delete what a run wrote in `out_dir` (nothing else); the names deleted."""
    out = Path(out_dir)
    gone = []
    for name in RUN_DIRS:
        if (out / name).is_dir():
            shutil.rmtree(out / name)
            gone.append(name + "/")
    for name in RUN_FILES:
        if (out / name).is_file():
            (out / name).unlink()
            gone.append(name)
    return gone


def prepare(cfg, main_process: bool = True, say=print) -> str:
    """Decide what to do with cfg.output_dir before any work: 'fresh', 'resume' or 'done'
    (a finished run and --resume: nothing to do). Raises RunDirError when the folder holds a
    run and neither --resume nor --overwrite was given, or when --resume would continue a run
    made with other options. Only the main process deletes (--overwrite) or writes."""
    out = Path(cfg.output_dir)
    st = inspect(out)
    action = "fresh"
    if st.holds_run:
        if cfg.overwrite:
            if main_process:
                gone = overwrite(out)
                say(f"--overwrite: deleted the earlier run in {out} ({st.describe()}): "
                    f"{', '.join(gone)}")
        elif cfg.resume:
            if st.config is not None:
                changed = _config_changes(st.config, cfg.to_dict())
                if changed:
                    diff = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
                    raise RunDirError(
                        f"--resume: the run in {out} was made with other options ({diff}). "
                        f"Resume it with its own options, or start over with --overwrite "
                        f"(or another --output-dir).")
            if st.finished:
                say(f"--resume: {out} holds {st.describe()}; nothing to resume.")
                return "done"
            say(f"--resume: {out} holds {st.describe()}; "
                + (f"continuing from step {st.checkpoint_step}." if st.checkpoint is not None
                   else "no checkpoint to continue from: training starts at step 0"
                   + (" (the cached reference log-probs are reused)." if st.ref_batches
                      else ".")))
            action = "resume"
        else:
            raise RunDirError(f"the output folder {out} already holds {st.describe()}.\n"
                              + _options_text(out, st.finished))
    elif cfg.resume:
        say(f"--resume: nothing to resume in {out}; starting a new run.")
    check_writable(out)
    if cfg.ref_cache and not (Path(cfg.ref_cache) / "complete").exists():
        check_writable(cfg.ref_cache, "--ref-cache")
    if main_process and (action == "fresh" or st.config is None):
        (out / RUN_CONFIG).write_text(json.dumps(cfg.to_dict(), indent=1))
    return action


def interrupted_message(out_dir: str | Path) -> str:
    """What to tell the user after Ctrl-C or SIGTERM (the caller says which happened)."""
    st = inspect(out_dir)
    if st.checkpoint is not None:
        return (f"{Path(out_dir)} holds {st.describe()}. Rerun the same command "
                f"with --resume to continue from step {st.checkpoint_step}.")
    return (f"stopped before the first checkpoint ({st.describe()}). Rerun the same "
            f"command with --resume (reuses the cached reference log-probs) or --overwrite.")
