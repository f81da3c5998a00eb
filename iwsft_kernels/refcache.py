"""Reference log-probs log q_ref(y_t | y_<t), computed once before training and cached on disk:
the pass, the fingerprints of its inputs and the store, shared by both trainers (iwsft-train in
trainer/, IWSFTTrainer in integrations/trl/); it imports neither.

Layout of a cache folder:
  meta.json          fingerprint + its components (data, tokenizer, template, model, max_length)
  batch-00017.pt     {"index": [positions in the tokenized data], "logprobs": [fp32 tensors]}
  complete           written when every batch is there

A cache whose fingerprint differs is refused (RefCacheMismatch names the differing parts); an
interrupted precompute resumes: finished batch files are kept and skipped. Batches are cut from
the examples sorted by length and dealt to ranks round-robin; every rank runs the same number
of forward calls (FSDP/ZeRO-3 need that), a rank without work repeats a batch and drops it.
The model forward runs with `return_logprobs_only=True`: linear_logprobs, no logits.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

IGNORE = -100


class RefCacheMismatch(RuntimeError):
    pass


class PrecomputeInterrupted(RuntimeError):
    """Raised by the `_stop_after_batches` test hook."""


def fingerprint_parts(data, tokenizer, model_identity: str, max_length: int) -> dict:
    """The cache key's parts for iwsft-train's tokenized data (trainer/data.py:TokenizedData:
    ``fingerprint()`` and ``examples``)."""
    tok_json = tokenizer.backend_tokenizer.to_str() if hasattr(tokenizer, "backend_tokenizer") \
        else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    sha = lambda s: hashlib.sha256(s.encode()).hexdigest()[:16]  # noqa: E731
    return {
        "data": data.fingerprint()[:16],
        "tokenizer": sha(tok_json),
        "template": sha(str(getattr(tokenizer, "chat_template", ""))),
        "ref_model": model_identity,
        "max_length": max_length,
        "n_examples": len(data.examples),
    }


def strided_indices(n: int, k: int = 4096) -> torch.Tensor:
    """``min(n, k)`` evenly spread positions in ``range(n)`` as an int64 tensor, the first 0 and
    the last ``n - 1``: ``i_j = floor(j (n - 1) / (k - 1))`` in exact integer arithmetic (a
    float32 ``linspace`` rounds positions above 2^24 = 16,777,216, e.g. to ``n`` itself)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"strided_indices: n must be an int >= 0, got {n!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(f"strided_indices: k must be an int >= 2, got {k!r}")
    if n <= k:
        return torch.arange(n, dtype=torch.int64)
    if (k - 1) * (n - 1) >= 2**63:
        raise ValueError(f"strided_indices: n={n} is too large for int64 index arithmetic")
    return torch.arange(k, dtype=torch.int64) * (n - 1) // (k - 1)


def _sample_values(p: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """p's elements at the flat (row-major) positions `idx`, without copying p (a strided or
    expanded tensor is indexed in place)."""
    idx = idx.to(p.device)
    if p.is_contiguous():
        return p.view(-1)[idx]
    return p[torch.unravel_index(idx, p.shape)]


def weights_digest(model: torch.nn.Module, skip: tuple[str, ...] = ("lora_",),
                   samples: int = 4096) -> str:
    """A cheap identity of a model's weights: per parameter its name, shape, dtype and up to
    `samples` evenly strided values (their exact bytes, positions from :func:`strided_indices`),
    so any size works (a 151,936 x 896 embedding has 136M > 2^24 elements). Parameters whose
    name contains a `skip` string (fresh adapters) are left out. A DeepSpeed ZeRO-3 partitioned
    parameter (zero.Init) contributes its name, full shape and dtype only: its values are
    spread over the ranks. A parameter on the meta device has no values: ValueError."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if any(s in name for s in skip):
                continue
            if p.device.type == "meta":
                raise ValueError(f"weights_digest: parameter {name!r} is on the meta device (not "
                                 f"loaded); there are no values to fingerprint")
            partitioned = hasattr(p, "ds_shape") and p.numel() == 0
            shape = tuple(p.ds_shape) if partitioned else tuple(p.shape)
            h.update(f"{name}:{shape}:{p.dtype}{':partitioned' if partitioned else ''};"
                     .encode())
            if partitioned or p.numel() == 0:
                continue
            vals = _sample_values(p.detach(), strided_indices(p.numel(), samples))
            h.update(vals.contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def model_identity(name: str, config, seed: int | None = None,
                   model: torch.nn.Module | None = None) -> str:
    """Identity of a reference model: its name/path, config and (local dirs) weight file sizes;
    for random-init models, the seed; with `model`, also :func:`weights_digest` of its loaded
    weights (a checkpoint overwritten in place with same-size files is then told apart)."""
    h = hashlib.sha256(config.to_json_string(use_diff=False).encode())
    p = Path(name)
    if p.is_dir():
        for f in sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin")):
            h.update(f"{f.name}:{f.stat().st_size}".encode())
    suffix = f"|seed={seed}" if seed is not None else ""
    if model is not None:
        suffix += f"|weights={weights_digest(model, skip=())}"
    return f"{name}|{h.hexdigest()[:16]}{suffix}"


def pad_collate(examples, pad_id: int) -> dict:
    """Right-padded (B, T) ``input_ids`` / ``attention_mask`` / ``labels`` (-100 on padding) of
    items with ``input_ids`` and ``labels``: the default batch of the reference pass."""
    pad = torch.nn.utils.rnn.pad_sequence
    ids = [torch.as_tensor(ex.input_ids, dtype=torch.long) for ex in examples]
    return {"input_ids": pad(ids, batch_first=True, padding_value=pad_id),
            "attention_mask": pad([torch.ones_like(t) for t in ids], batch_first=True),
            "labels": pad([torch.as_tensor(ex.labels, dtype=torch.long) for ex in examples],
                          batch_first=True, padding_value=IGNORE)}


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


@torch.no_grad()
def compute_ref_logprobs(accelerator, model, data, cache_dir: str | Path,
                         parts: dict, pad_id: int, batch_size: int = 8,
                         _stop_after_batches: int | None = None,
                         collate_fn=None) -> list[torch.Tensor]:
    """Per example, a (len(input_ids),) fp32 tensor aligned with its labels.

    `data.examples` only needs items with `input_ids` (for the lengths); `collate_fn(examples)`
    (default: :func:`pad_collate` with `pad_id`, for items that also have `labels`) makes the
    model's keyword arguments, row j of the batch holding example j from column 0 (right
    padding, or one packed row per batch)."""
    cache = Path(cache_dir)
    fp = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    meta = {"fingerprint": fp, "parts": parts, "batch_size": batch_size}
    mfile = cache / "meta.json"
    if mfile.exists():  # every rank checks, before anyone writes
        old = json.loads(mfile.read_text())
        if old.get("fingerprint") != fp or old.get("batch_size") != batch_size:
            diff = {k: (old.get("parts", {}).get(k), v) for k, v in parts.items()
                    if old.get("parts", {}).get(k) != v}
            if old.get("batch_size") != batch_size:
                diff["batch_size"] = (old.get("batch_size"), batch_size)
            raise RefCacheMismatch(
                f"reference log-prob cache {cache} was made for different inputs; differing "
                f"(cached, now): {diff}. Delete it or pass another --ref-cache.")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and not mfile.exists():
        cache.mkdir(parents=True, exist_ok=True)
        mfile.write_text(json.dumps(meta, indent=1))
    accelerator.wait_for_everyone()

    lengths = [len(ex.input_ids) for ex in data.examples]
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches = [order[j:j + batch_size] for j in range(0, len(order), batch_size)]
    world, rank = accelerator.num_processes, accelerator.process_index
    files = [cache / f"batch-{k:05d}.pt" for k in range(len(batches))]

    if (cache / "complete").exists():
        accelerator.print(f"reference log-probs: using the complete cache in {cache}")
    else:
        done = [[f.exists() for f in files]]
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(done)  # one view of what is done, or ranks could disagree
        todo = [k for k in range(len(batches)) if not done[0][k]]
        if len(todo) < len(batches):
            accelerator.print(f"reference log-probs: resuming an interrupted pass, "
                              f"{len(batches) - len(todo)} of {len(batches)} batches already "
                              f"cached in {cache}")
        rounds = [todo[j:j + world] for j in range(0, len(todo), world)]
        model.eval()
        from tqdm.auto import tqdm

        for n_round, ks in enumerate(tqdm(rounds, desc="reference log-probs",
                                          disable=not accelerator.is_local_main_process)):
            if _stop_after_batches is not None and n_round * world >= _stop_after_batches:
                raise PrecomputeInterrupted(f"stopped after {n_round * world} batches")
            k = ks[rank] if rank < len(ks) else ks[0]
            exs = [data.examples[i] for i in batches[k]]
            b = pad_collate(exs, pad_id) if collate_fn is None else collate_fn(exs)
            b = {n: t.to(accelerator.device) if torch.is_tensor(t) else t for n, t in b.items()}
            lp = model(**b, return_logprobs_only=True).token_logprobs.float().cpu()
            if rank < len(ks):
                _atomic_save({"index": batches[k],
                              "logprobs": [lp[j, : len(ex.input_ids)].clone()
                                           for j, ex in enumerate(exs)]}, files[k])
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise RuntimeError(f"reference cache incomplete, missing {missing[:3]}")
            (cache / "complete").write_text(fp)
        accelerator.wait_for_everyone()

    out: list[torch.Tensor | None] = [None] * len(data.examples)
    for f in files:
        part = torch.load(f, weights_only=True)
        for i, lp in zip(part["index"], part["logprobs"]):
            out[i] = lp
    return out
