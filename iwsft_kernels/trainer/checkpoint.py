"""Checkpoints and the final model of a run.

``checkpoints/step-NNNNNNN/``: ``accelerator.save_state`` (model, optimizer, scheduler, RNG
states; sharded under FSDP2 / ZeRO-3) plus ``trainer_state.json`` (the loop's own state: the
next step, the eval before training, ...). Each is written into a temp folder and renamed, so a
kill never leaves half a checkpoint; the newest ``--keep-checkpoints`` are kept. ``final/``:
an ordinary transformers folder (model + tokenizer), the full state dict gathered from the
ranks.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .distributed import final_state_dict


def save_checkpoint(accelerator, out_dir: Path, next_step: int, state: dict, keep: int) -> Path:
    """accelerator.save_state into a temp folder, then an atomic rename; older ones beyond the
    newest `keep` (0: all kept) are deleted after the rename."""
    ck = out_dir / "checkpoints"
    final, tmp = ck / f"step-{next_step:07d}", ck / f".tmp-step-{next_step:07d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        ck.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in sorted(ck.glob("step-*"))[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def latest_checkpoint(out_dir: Path) -> Path | None:
    cks = sorted((out_dir / "checkpoints").glob("step-*"))
    return cks[-1] if cks else None


def load_latest(accelerator, out_dir: Path, say) -> tuple[int, dict]:
    """(next step, trainer_state) of the newest checkpoint, loaded into the prepared objects;
    (0, {}) when there is none."""
    ck = latest_checkpoint(out_dir)
    if ck is None:
        say(f"--resume: no checkpoint under {out_dir / 'checkpoints'}; starting fresh")
        return 0, {}
    accelerator.load_state(str(ck))
    state = json.loads((ck / "trainer_state.json").read_text())
    say(f"resumed from {ck} at step {state['next_step']}")
    return state["next_step"], state


def save_final(accelerator, model, tokenizer, out_dir: Path) -> Path:
    """OUTPUT_DIR/final: model (full state dict gathered from the ranks) + tokenizer."""
    final = out_dir / "final"
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(final, is_main_process=accelerator.is_main_process,
                              save_function=accelerator.save,
                              state_dict=final_state_dict(accelerator, model))
    if accelerator.is_main_process:
        tokenizer.save_pretrained(final)
    return final
