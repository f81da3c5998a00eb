"""Vocabulary parallelism, the setup phase: which shard of the lm_head this rank holds, from a
``config.VocabParallel`` (Megatron style: a process group and a [start, stop) range) or from a
DTensor weight placed ``Shard(0)`` (torch's tensor-parallel API, e.g.
``parallelize_module(model, mesh, {"lm_head": ColwiseParallel()})``), checked across the group
with one all-gather per call (docs/distributed.md). The per-chunk merge is
backends/vocab_merge.py.
"""

from __future__ import annotations

import torch

from .backends.vocab_merge import VocabShard
from .config import VocabParallel


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # noqa: BLE001 — torch without distributed: no DTensor can exist
        return None
    return DTensor


def is_dtensor(t) -> bool:
    D = _dtensor_type()
    return D is not None and isinstance(t, D)


def _dtensor_shard(weight):
    """(group, start, stop, V) of a DTensor weight placed Shard(0) on one mesh dimension and
    Replicate on any other; ValueError for any other placement."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    placements = tuple(weight.placements)
    mesh = weight.device_mesh
    shard_dims = [i for i, p in enumerate(placements) if not p.is_replicate()]
    ok = len(shard_dims) == 1 and placements[shard_dims[0]].is_shard(0)
    if not ok:
        raise ValueError(
            f"weight is a DTensor placed {placements} on a mesh of shape "
            f"{tuple(mesh.shape)}: vocabulary parallelism needs Shard(0) (rows = vocabulary, "
            f"e.g. ColwiseParallel on the lm_head) on exactly one mesh dimension and "
            f"Replicate() on any other (Shard(1), Partial and several sharded dimensions are "
            f"not supported; pass weight.full_tensor() to run unsharded)")
    shape, offset = compute_local_shape_and_global_offset(weight.shape, mesh, placements)
    start = int(offset[0])
    return mesh.get_group(shard_dims[0]), start, start + int(shape[0]), int(weight.shape[0])


def resolve(vocab_parallel, hidden, weight, bias):
    """(hidden, local weight, local bias, (group, start, stop, V or None, sequence_parallel)
    or None). DTensor inputs become their local tensors (weight.to_local() is differentiable:
    the weight's gradient comes back as a DTensor with the weight's placement)."""
    if vocab_parallel is not None and not isinstance(vocab_parallel, VocabParallel):
        raise TypeError(f"vocab_parallel must be an iwsft_kernels.VocabParallel or None, got "
                        f"{type(vocab_parallel).__name__}")
    w_dt = is_dtensor(weight)
    if not w_dt:
        if is_dtensor(bias):
            raise ValueError("bias is a DTensor but weight is not: shard both the same way "
                             "(or pass plain tensors with vocab_parallel=VocabParallel(...))")
        if vocab_parallel is None:
            if is_dtensor(hidden):
                raise ValueError("hidden is a DTensor but weight is not: pass "
                                 "hidden.full_tensor() (or to_local())")
            return hidden, weight, bias, None
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("vocab_parallel needs an initialised torch.distributed process "
                             "group (torch.distributed.init_process_group)")
        if vocab_parallel.start is None:
            raise ValueError("vocab_parallel=VocabParallel(...) with a plain weight needs this "
                             "rank's start and stop (only a DTensor weight carries its range)")
        vp = vocab_parallel
        group = vp.group if vp.group is not None else dist.group.WORLD
        spec = (group, vp.start, vp.stop, None, vp.sequence_parallel)
    else:
        group, start, stop, V = _dtensor_shard(weight)
        vp = vocab_parallel
        if vp is not None:
            if vp.start is not None and (vp.start, vp.stop) != (start, stop):
                raise ValueError(f"vocab_parallel range [{vp.start}, {vp.stop}) differs from "
                                 f"the DTensor weight's shard [{start}, {stop}) on this rank")
            if vp.group is not None and vp.group is not group:
                raise ValueError("vocab_parallel.group is not the DTensor weight's mesh group")
        if bias is not None:
            if not is_dtensor(bias) or tuple(bias.placements) != tuple(weight.placements) \
                    or bias.device_mesh != weight.device_mesh:
                where = (f"placed {tuple(bias.placements)}" if is_dtensor(bias)
                         else "a plain tensor")
                raise ValueError(f"bias must be a DTensor on the weight's mesh placed like the "
                                 f"weight {tuple(weight.placements)} (the vocabulary shard of "
                                 f"the bias), got {where}")
            bias = bias.to_local()
        weight = weight.to_local()
        spec = (group, start, stop, V, bool(vp is not None and vp.sequence_parallel))
    if is_dtensor(hidden):
        if not all(p.is_replicate() for p in hidden.placements):
            raise ValueError(f"hidden is a DTensor placed {tuple(hidden.placements)}: the "
                             f"vocabulary-parallel loss needs the full hidden on every rank "
                             f"(Replicate); pass hidden.full_tensor()")
        hidden = hidden.to_local()
    return hidden, weight, bias, spec


NO_LABEL_LIMIT = 2**62  # prepare's label bound before the global V is known (checked after)


def check_rows(spec, weight) -> None:
    """This rank's weight has the rows of its range."""
    _, start, stop, _, _ = spec
    if weight.dim() == 2 and weight.shape[0] != stop - start:
        raise ValueError(f"weight has {weight.shape[0]} rows but this rank's vocabulary shard "
                         f"[{start}, {stop}) has {stop - start}")


def check_group(spec, labels, ignore_index, device, error=None) -> VocabShard:
    """One all-gather of (start, stop, N, number of targets, rejected) over the group: the
    shards must tile [0, V) without overlap, and every rank must have the same positions and
    targets (the collectives of each chunk pair up only then). ``error``: this rank's own
    validation error, if any; when any rank has one, every rank raises (that error on its
    rank, a ValueError naming the rejecting ranks on the others). Otherwise all ranks raise
    the same ValueError, or none."""
    import torch.distributed as dist

    group, start, stop, V, seq_par = spec
    N = labels.numel()
    M = int((labels != ignore_index).sum())
    mine = torch.tensor([start, stop, N, M, int(error is not None)], dtype=torch.int64,
                        device=device)
    world = dist.get_world_size(group)
    got = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(got, mine, group=group)
    rejected = [r for r, t in enumerate(got) if int(t[4])]
    if error is not None:
        raise error
    if rejected:
        raise ValueError(f"ranks {rejected} of the vocabulary-parallel group rejected their "
                         f"inputs (see their errors); this rank's passed its own checks")
    table = [tuple(int(v) for v in t.tolist()[:4]) for t in got]
    ranges = sorted((a, b, r) for r, (a, b, _, _) in enumerate(table))
    desc = ", ".join(f"rank {r}: [{a}, {b})" for r, (a, b, _, _) in enumerate(table))
    pos = 0
    for a, b, r in ranges:
        if a != pos:
            kind = "overlap" if a < pos else "leave a gap"
            raise ValueError(f"the vocabulary shards of the group {kind} at {min(a, pos)} "
                             f"(they must tile [0, V) exactly): {desc}")
        pos = b
    if V is not None and pos != V:
        raise ValueError(f"the vocabulary shards cover [0, {pos}) but the DTensor weight has "
                         f"V = {V} rows: {desc}")
    if len({(n, m) for _, _, n, m in table}) != 1:
        raise ValueError("the ranks of the vocabulary-parallel group passed different batches "
                         "(positions, targets per rank: "
                         + ", ".join(f"{n}, {m}" for _, _, n, m in table)
                         + "); every rank must pass the same hidden and labels")
    return VocabShard(group=group, start=start, stop=stop, V=pos,
                      max_rows=max(b - a for a, b, _ in ranges), sequence_parallel=seq_par)
