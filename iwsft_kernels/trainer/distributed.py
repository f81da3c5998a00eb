"""Distributed set-up of `iwsft-train`: the Accelerator (FSDP2 and DeepSpeed also on CPU
ranks), the sharded reference model, checks that keep the global loss normaliser right.

How a launch becomes a process group (accelerate 1.15, torch 2.13):
- `accelerate launch` with a config whose `distributed_type` is MULTI_GPU, FSDP or DEEPSPEED
  starts the workers with torchrun (`num_processes / num_machines` per machine). With `--cpu`
  (or a MULTI_CPU config) it starts ONE process unless `--mpirun_hostfile` is given: accelerate's
  multi-CPU launcher is mpirun. That is why `accelerate launch --cpu --num_processes 2` ran a
  single process. On CPU ranks, launch with configs/accelerate/fsdp2_cpu.yaml or zero3_cpu.yaml
  (or `--multi_gpu --num_processes 2` for plain data parallel): torchrun starts the processes and
  the trainer, finding no CUDA, joins them in a gloo group.
- FSDP: accelerate switches a run to FSDP only when its processes are GPU (or other accelerator)
  processes; on CPU ranks it silently falls back to replicated data parallel (MULTI_CPU) under an
  FSDP config. `make_accelerator` turns FSDP back on there after accelerate formed the gloo group:
  it marks the state FSDP with the plugin read from the launch config. Everything after that
  (fully_shard of each decoder layer, the embedding and the [final norm, lm_head] unit, sharded
  checkpoints through torch.distributed.checkpoint, the gathered final state dict, gradient
  clipping over DTensors) is accelerate's own FSDP2 code, the same that runs on GPUs.
- DeepSpeed: accelerate's DeepSpeed path needs `cpu=False` and a named backend; without CUDA the
  trainer asks for gloo, which DeepSpeed's CPU accelerator uses.
"""

from __future__ import annotations

import gc
import os
import weakref

import torch


class DistributedSetupError(ValueError):
    pass


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def make_accelerator(tp_head: int = 1, **kwargs):
    """Accelerator(cpu=<no CUDA>, **kwargs), with FSDP2 kept on CPU ranks (see module doc).
    tp_head > 1: the launch is checked and the Accelerator gets the 2-D (FSDP2 x TP) mesh of
    tensor_parallel.py."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    from .tensor_parallel import check_launch, parallelism_config

    cpu = not torch.cuda.is_available()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_launch(tp_head)  # before any process group exists: a clear error, no hang
    pc = parallelism_config(tp_head)  # None unless tp_head > 1
    if pc is not None and not cpu:
        kwargs["parallelism_config"] = pc
    if cpu and world > 1 and _env_flag("ACCELERATE_USE_DEEPSPEED"):
        # accelerate's DeepSpeed path needs cpu=False; name the gloo backend for DeepSpeed's CPU
        # accelerator (accelerate finds no device backend without CUDA)
        from accelerate.utils import InitProcessGroupKwargs

        handlers = list(kwargs.pop("kwargs_handlers", None) or [])
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
        return Accelerator(cpu=False, kwargs_handlers=handlers, **kwargs)
    acc = Accelerator(cpu=cpu, **kwargs)
    state = acc.state
    if (cpu and _env_flag("ACCELERATE_USE_FSDP")
            and state.distributed_type == DistributedType.MULTI_CPU):
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables accelerate set
        if plugin.fsdp_version != 2:
            raise DistributedSetupError("FSDP on CPU ranks is supported with fsdp_version: 2 only")
        if state.mixed_precision != "no":
            plugin.set_mixed_precision(state.mixed_precision)
        # both shared states: AcceleratorState() re-copies PartialState's fields on every call
        from accelerate.state import PartialState

        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = plugin
    if pc is not None and cpu:
        # accelerate refuses a ParallelismConfig on MULTI_CPU, the state before FSDP2 was
        # turned on above: attach it now, as Accelerator.__init__ does (mesh over gloo)
        state.parallelism_config = pc
        state.device_mesh = pc.get_device_mesh(acc.device.type)
        pc._validate_accelerator(acc)
    return acc


def describe(acc) -> str:
    """One line: how this run is distributed."""
    from accelerate.utils import DistributedType

    kind = {DistributedType.FSDP: "FSDP2" if getattr(acc, "is_fsdp2", False) else "FSDP1",
            DistributedType.DEEPSPEED: "DeepSpeed",
            DistributedType.MULTI_CPU: "data parallel (DDP)",
            DistributedType.MULTI_GPU: "data parallel (DDP)",
            DistributedType.NO: "single process"}.get(acc.distributed_type,
                                                         str(acc.distributed_type))
    backend = getattr(acc.state, "backend", None)
    nodes = num_nodes(acc)
    pc = getattr(acc, "parallelism_config", None)
    if pc is not None and pc.tp_enabled:
        kind += f" x tensor-parallel head ({pc.dp_shard_size} x {pc.tp_size})"
    where = f"{acc.num_processes} process{'es' if acc.num_processes > 1 else ''}"
    if acc.num_processes > 1:
        where += f" ({backend}, {acc.device.type}" + (f", {nodes} nodes" if nodes > 1 else "") + ")"
    return f"distributed: {kind}, {where}"


def num_nodes(acc) -> int:
    """Machines in the run (torchrun's WORLD_SIZE / LOCAL_WORLD_SIZE)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", acc.num_processes) or acc.num_processes)
    return max(1, acc.num_processes // max(local, 1))


def is_fsdp(acc) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.FSDP


def is_deepspeed(acc) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.DEEPSPEED


def param_ndim(p: torch.Tensor) -> int:
    """Dimensions of a parameter as the model sees it: under DeepSpeed ZeRO-3 (zero.Init) a
    partitioned parameter's data is an empty 1-D tensor and its real shape is `ds_shape`."""
    return len(getattr(p, "ds_shape", p.shape))


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part: a DTensor's local shard (FSDP2), a ZeRO-3 parameter's partition."""
    if hasattr(t, "to_local"):
        return t.to_local()
    return getattr(t, "ds_tensor", t)


def _full_numel(t: torch.Tensor) -> int:
    return int(getattr(t, "ds_numel", t.numel()))  # a DTensor reports its global shape


def _unique_tensors(model: torch.nn.Module):
    seen = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:  # tied weights count once
            seen.add(id(t))
            yield t


def local_param_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers this rank holds."""
    return sum(_local(t).numel() * t.element_size() for t in _unique_tensors(model))


def full_param_bytes(model: torch.nn.Module) -> int:
    """Bytes of the whole (unsharded) parameters and buffers."""
    return sum(_full_numel(t) * t.element_size() for t in _unique_tensors(model))


def prepare_reference_model(acc, load):
    """A frozen reference model (`load()` builds it), placed like the policy: FSDP2-sharded
    (same wrapping as the policy: decoder layers, embedding, [norm, lm_head]) under FSDP,
    replicated on the device otherwise. Not registered with the accelerator (not trained, not
    checkpointed). Returns (model in eval mode, report dict with its memory per rank)."""
    if is_deepspeed(acc):  # checked before loading anything
        raise DistributedSetupError(
            "--ref-model under DeepSpeed is not supported (it would need its own DeepSpeed "
            "engine); leave --ref-model unset (the reference is then the starting model) or use "
            "FSDP2 (configs/accelerate/fsdp2.yaml)")
    if is_fsdp(acc) and not acc.is_fsdp2:
        raise DistributedSetupError("a sharded --ref-model needs FSDP2 (fsdp_version: 2)")
    ref_model = load()
    ref_model.requires_grad_(False)
    ref_model.eval()
    full = full_param_bytes(ref_model)
    if is_fsdp(acc):
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        from .tensor_parallel import data_parallel, tp_size

        ref_model = fsdp2_prepare_model(acc, ref_model)  # --tp-head: over "dp_shard" only
        placement = f"sharded (FSDP2) over {data_parallel(acc)[1]} ranks"
        if tp_size(acc) > 1:
            placement += f", replicated across the {tp_size(acc)} ranks of each tp group"
    else:
        ref_model = ref_model.to(acc.device)
        placement = "replicated" if acc.num_processes > 1 else "one process"
    ref_model.eval()
    local = local_param_bytes(ref_model)
    report = {"placement": placement, "param_mib_per_rank": local / 2**20,
              "param_mib_full": full / 2**20, "ranks": acc.num_processes}
    return ref_model, report


def model_freed(alive: "weakref.ref", device) -> bool:
    """After the caller dropped its names for a model: collect, empty the CUDA cache, and say
    whether the model object is gone (`alive` = weakref.ref(model) taken before)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return alive() is None


def tied_duplicate_names(model: torch.nn.Module) -> list[str]:
    """Names of parameters that are the same tensor as an earlier one (a tied lm_head)."""
    seen, dups = set(), []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            dups.append(name)
        seen.add(id(p))
    return dups


def final_state_dict(acc, model) -> dict:
    """The full (gathered) state dict for `save_pretrained` (collective: every rank calls it).
    Gathered tensors no longer share storage, so a tied lm_head would be written twice: its
    duplicate names are dropped (transformers re-ties them on load)."""
    sd = acc.get_state_dict(model)
    for name in tied_duplicate_names(acc.unwrap_model(model)):
        if sd is not None:
            sd.pop(name, None)
    return sd


def sharding_report(acc, model) -> dict:
    """Memory of the policy's parameters per rank, and the local vs full rows of the input and
    output embeddings (sharded over ranks under FSDP2: local rows ~ full rows / ranks)."""
    m = acc.unwrap_model(model)
    rep = {"type": str(acc.distributed_type).split(".")[-1], "processes": acc.num_processes,
           "nodes": num_nodes(acc),
           "param_mib_per_rank": local_param_bytes(m) / 2**20,
           "param_mib_full": full_param_bytes(m) / 2**20}
    for what, mod in (("input_embeddings", m.get_input_embeddings()),
                      ("output_embeddings", m.get_output_embeddings())):
        w = getattr(mod, "weight", None)
        if w is not None:
            shape = tuple(getattr(w, "ds_shape", w.shape))
            local = _local(w)  # ZeRO-3: a flat partition of numel / ranks elements
            rows = local.shape[0] if hasattr(w, "to_local") else local.numel() / shape[1]
            rep[what] = {"local_rows": rows, "full_rows": int(shape[0]),
                         "sharded": hasattr(w, "to_local") or hasattr(w, "ds_tensor")}
    rep["tied"] = bool(tied_duplicate_names(m))
    return rep


def deepspeed_settings(ds_config: dict, micro_batch_size: int, grad_accum: int,
                       max_grad_norm: float) -> dict:
    """The DeepSpeed config entries the trainer needs, checked against its own options.

    The trainer scales each micro-batch loss by grad_accum x world and divides by the global
    target-token count, assuming the engine divides by the trainer's grad_accum; accelerate
    would instead silently take the DeepSpeed value on a mismatch. DeepSpeed also clips by
    itself (`gradient_clipping`), so that must be the trainer's --max-grad-norm. "auto" (or
    absent) entries are filled in; a different explicit value is an error naming both."""
    def explicit(key):
        v = ds_config.get(key, "auto")
        return None if v == "auto" else v

    want = {"gradient_accumulation_steps": grad_accum,
            "train_micro_batch_size_per_gpu": micro_batch_size,
            "gradient_clipping": float(max_grad_norm) if max_grad_norm > 0 else 0.0}
    flags = {"gradient_accumulation_steps": "--grad-accum",
             "train_micro_batch_size_per_gpu": "--micro-batch-size",
             "gradient_clipping": "--max-grad-norm"}
    for key, value in want.items():
        have = explicit(key)
        if have is not None and float(have) != float(value):
            raise DistributedSetupError(
                f"the DeepSpeed config has {key}={have} but the trainer has {flags[key]} {value}; "
                f"make them equal (e.g. gradient_accumulation_steps in "
                f"configs/accelerate/zero3.yaml)")
    return want


def configure_deepspeed(acc, micro_batch_size: int, grad_accum: int, max_grad_norm: float):
    """Before `acc.prepare` under DeepSpeed: fill/check the config (see deepspeed_settings);
    the trainer has no DataLoader for accelerate to read the micro-batch size from."""
    if not is_deepspeed(acc):
        return
    plugin = acc.state.deepspeed_plugin
    settings = deepspeed_settings(plugin.deepspeed_config, micro_batch_size, grad_accum,
                                  max_grad_norm)
    plugin.deepspeed_config.update(settings)
    plugin.deepspeed_config["train_batch_size"] = micro_batch_size * grad_accum * acc.num_processes
    if acc.gradient_accumulation_steps != grad_accum:
        raise DistributedSetupError(
            f"accelerate uses gradient_accumulation_steps={acc.gradient_accumulation_steps} but "
            f"the trainer has --grad-accum {grad_accum}")
