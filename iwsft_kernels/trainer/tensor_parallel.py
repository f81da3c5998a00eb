"""`iwsft-train --tp-head N`: the output head sharded over the vocabulary across N ranks
(tensor parallel), everything sharded with FSDP2 over the other world / N ranks.

The mesh: accelerate's own 2-D device mesh, ``ParallelismConfig(dp_shard_size=world / N,
tp_size=N)`` (dimensions "dp_shard" x "tp"; rank = dp_rank * N + tp_rank, so a tp group is N
consecutive ranks, on one node when N divides the processes per node). FSDP2
(`fsdp2_prepare_model`) then shards over "dp_shard" only.

The head: before FSDP2, the lm_head weight (and bias) becomes a DTensor placed ``Shard(0)`` on
the "tp" mesh: rows [r V / N, (r + 1) V / N) on tp rank r, what torch's ``ColwiseParallel``
does to a Linear's parameters. ColwiseParallel's module hooks are not installed: its input hook
would drop the second argument of the patched head's call (the loss request,
integrations/causal_lm.py), and its output hook would turn the (B, T, V) logits into a DTensor,
but no logits exist: the patched head hands its DTensor weight to the fused loss, which
recognises a ``Shard(0)`` weight and merges the vocabulary shards itself. FSDP2 then shards each
tp shard over "dp_shard" (a 2-D parameter); its all-gather restores the tp shard for the head's
call. The body (embedding, decoder layers, final norm) is not tensor parallel: it is sharded over
"dp_shard" and replicated across "tp" (the N ranks of a tp group compute the same hidden states
and, the fused loss summing dH over the group, the same body gradients).

accelerate's own TP step (``Accelerator._prepare_tp``) is skipped: it expects a model tensor
parallel as a whole (transformers' tp_plan) and would make every other parameter a replicated
DTensor with module hooks. ``prepare`` below calls ``acc.prepare`` without it.

Data and normaliser: ranks of one tp group must see the same micro-batches, so data is dealt by
dp rank over dp_size = world / N ranks (`data_parallel`), the global batch is micro_batch x
grad_accum x dp_size, and backward scales by grad_accum x dp_size: FSDP2's reduce-scatter
averages over the dp ranks only. Gathered per-rank metrics keep one rank per tp group.

Not supported (refused with a message): a tied head (the input embedding would have to be
vocabulary parallel too), DeepSpeed, plain DDP, FSDP1, N = world (no rank left for FSDP2).
"""

from __future__ import annotations

import os

import torch

from .distributed import DistributedSetupError, _env_flag

DP, TP = "dp_shard", "tp"


class TensorParallelError(DistributedSetupError):
    pass


def check_launch(tp: int) -> int:
    """Before the Accelerator exists: the launch can run --tp-head `tp`. Returns dp_size."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    flag = f"--tp-head {tp}"
    if tp <= 1:
        return world
    if world == 1:
        raise TensorParallelError(
            f"{flag} needs several processes under FSDP2, but this is a single process; launch "
            f"e.g. `accelerate launch --config_file configs/accelerate/fsdp2_cpu.yaml "
            f"--num_processes {2 * tp} -m iwsft_kernels.trainer.cli {flag} ...` "
            f"(world size = FSDP2 size x {tp})")
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        raise TensorParallelError(
            f"{flag} is not supported under DeepSpeed; launch with FSDP2 "
            f"(configs/accelerate/fsdp2.yaml or fsdp2_cpu.yaml)")
    if not _env_flag("ACCELERATE_USE_FSDP"):
        raise TensorParallelError(
            f"{flag} needs FSDP2 (the head is tensor parallel, everything else FSDP2-sharded); "
            f"this launch is plain data parallel: launch with --config_file "
            f"configs/accelerate/fsdp2.yaml (GPUs) or fsdp2_cpu.yaml (CPU ranks)")
    if os.environ.get("FSDP_VERSION", "1") != "2":
        raise TensorParallelError(f"{flag} needs FSDP2 (fsdp_version: 2 in the launch config)")
    if world % tp:
        raise TensorParallelError(
            f"{flag} must divide the number of processes ({world}): the ranks form a "
            f"(FSDP2 = world / {tp}) x (TP = {tp}) grid")
    if world // tp < 2:
        raise TensorParallelError(
            f"{flag} on {world} processes leaves {world // tp} rank for FSDP2; use a smaller "
            f"--tp-head (at most {world // 2}) or more processes")
    return world // tp


def parallelism_config(tp: int):
    """The ParallelismConfig for the Accelerator (None when tp <= 1)."""
    if tp <= 1:
        return None
    from accelerate import ParallelismConfig

    world = int(os.environ.get("WORLD_SIZE", "1"))
    return ParallelismConfig(dp_shard_size=world // tp, tp_size=tp)


def tp_size(acc) -> int:
    pc = getattr(acc, "parallelism_config", None)
    return pc.tp_size if pc is not None and pc.tp_enabled else 1


def data_parallel(acc) -> tuple[int, int]:
    """(rank, size) over which the data is split: the dp rank and world / tp (tp = 1: the
    process index and the number of processes)."""
    tp = tp_size(acc)
    if tp == 1:
        return acc.process_index, acc.num_processes
    mesh = acc.torch_device_mesh
    return mesh.get_local_rank(DP), mesh[DP].size()


class _DataParallelView:
    """The accelerator as code that deals work to ranks sees it (compute_ref_logprobs): the dp
    rank and size instead of the process index and count; everything else delegated. The tp
    ranks of one dp rank do the same work (and write the same files, atomically)."""

    def __init__(self, acc):
        self._acc = acc
        self.process_index, self.num_processes = data_parallel(acc)

    def __getattr__(self, name):
        return getattr(self._acc, name)


def data_view(acc):
    return acc if tp_size(acc) == 1 else _DataParallelView(acc)


def check_head(model: torch.nn.Module, tp: int) -> torch.nn.Module:
    """The output head that --tp-head shards: an untied Linear-like module with a (V, H) weight."""
    head = model.get_output_embeddings()
    w = getattr(head, "weight", None)
    if w is None or w.dim() != 2:
        raise TensorParallelError(f"--tp-head {tp}: the model's output head "
                                  f"({type(head).__name__}) has no 2-D weight to shard")
    emb = model.get_input_embeddings()
    if emb is not None and getattr(emb, "weight", None) is w:
        raise TensorParallelError(
            f"--tp-head {tp} needs an untied output head, but this model ties lm_head to the "
            f"input embedding (tie_word_embeddings: true); the embedding would have to be "
            f"vocabulary parallel too. Train it with FSDP2 alone, or save an untied copy first "
            f"(docs/trainer.md, 'Tensor-parallel head')")
    if w.shape[0] < tp:
        raise TensorParallelError(f"--tp-head {tp}: the vocabulary ({w.shape[0]}) is smaller "
                                  f"than the tp size")
    return head


def parallelize_head(acc, model: torch.nn.Module) -> dict:
    """Shard the lm_head's parameters Shard(0) over the "tp" mesh (in place, before the
    optimizer is built and before FSDP2). Returns a report (rows per tp rank)."""
    tp = tp_size(acc)
    if tp == 1:
        return {}
    from torch.distributed.tensor import Shard, distribute_tensor

    head = check_head(model, tp)
    mesh = acc.torch_device_mesh[TP]
    for name, p in list(head.named_parameters(recurse=False)):
        d = distribute_tensor(p.detach(), mesh, [Shard(0)])  # every rank holds the same p
        head.register_parameter(name, torch.nn.Parameter(d, requires_grad=p.requires_grad))
    w = head.weight
    return {"tp": tp, "head_rows_per_tp_rank": int(w.to_local().shape[0]),
            "vocab": int(w.shape[0])}


class _SequentialCollectivesNote:
    """Drops DTensor's advice "... N sequential all_reduce operations will be performed ...",
    logged by every rank for the (dp x tp) head: on the gradient norm's one scalar (accelerate's
    clip_grad_norm_) and on the final gather, once per run; nothing to act on."""

    @staticmethod
    def filter(record) -> bool:
        return "sequential" not in str(record.msg)


_SEQUENTIAL_NOTE = _SequentialCollectivesNote()


def prepare(acc, model, opt):
    """acc.prepare(model, opt), FSDP2 over "dp_shard", without accelerate's whole-model TP step
    (module doc). FSDP2's rank-0 broadcast loading (`fsdp_cpu_ram_efficient_loading`) is turned
    off: it broadcasts full tensors and cannot carry a tp-sharded one; every rank already holds
    the same weights (the trainer loads the model on every rank)."""
    if tp_size(acc) == 1:
        return acc.prepare(model, opt)
    import logging

    logging.getLogger("torch.distributed.tensor._redistribute").addFilter(_SEQUENTIAL_NOTE)
    acc.state.fsdp_plugin.cpu_ram_efficient_loading = False
    acc._prepare_tp = lambda *args: list(args)  # instance attribute: this accelerator only
    try:
        return acc.prepare(model, opt)
    finally:
        del acc._prepare_tp


def gather_rows(acc, local: torch.Tensor) -> torch.Tensor:
    """acc.gather of per-rank metric rows, one rank per tp group kept (its ranks computed the
    same micro-batches). Every rank has the same number of rows (grad_accum)."""
    if acc.num_processes == 1:
        return local
    allrows = acc.gather(local.to(acc.device)).cpu()
    tp = tp_size(acc)
    if tp > 1:
        allrows = allrows.reshape(acc.num_processes, -1, *local.shape[1:])[::tp]
        allrows = allrows.reshape(-1, *local.shape[1:])
    return allrows


def gather_list(acc, items: list) -> list:
    """gather_object of a per-rank list, one rank per tp group kept."""
    if acc.num_processes == 1:
        return items
    from accelerate.utils import gather_object

    per_rank = gather_object([items])
    return [x for lst in per_rank[::tp_size(acc)] for x in lst]
