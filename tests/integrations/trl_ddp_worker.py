"""Worker for test_trl.py: one IWSFTTrainer step on 2 CPU ranks (gloo DDP), launched with
`python -m torch.distributed.run --nproc_per_node 2 trl_ddp_worker.py OUT REF_DIR`. Rank 0 saves
the step-1 gradients (after DDP's all-reduce), the logged metrics and the reference column.
Then both ranks meet at a barrier and destroy the process group before exiting: a gloo group left
to the interpreter's shutdown can abort a rank ("terminate called without an active exception",
SIGABRT) after its work is done."""

import gc
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_trl as T  # noqa: E402

out, ref_dir = Path(sys.argv[1]), sys.argv[2]
tok = T.transformers.AutoTokenizer.from_pretrained(T.ASSETS / "tokenizer")
args = T.IWSFTConfig(**T.common_args(
    out, iw_mode="sequence", max_length=80, per_device_train_batch_size=2,
    per_device_eval_batch_size=1, ref_model_name_or_path=ref_dir, use_cpu=True,
    ref_cache_dir=str(out / "cache"), ddp_find_unused_parameters=False))
tr, grads = T.run(T.IWSFTTrainer, T.tiny_qwen(tok, seed=0), tok, T.dataset(4, long=True), args)
if int(os.environ.get("RANK", "0")) == 0:
    torch.save({"grads": grads, "log": tr.state.log_history[0],
                "ref": tr.train_dataset[T.REF_COLUMN],
                "batches": sorted((out / "cache").glob("batch-*.pt"))}, out / "rank0.pt")
del tr  # the trainer (DDP's reducer, the accelerator) before the group goes
gc.collect()
if dist.is_available() and dist.is_initialized():
    dist.barrier()
    dist.destroy_process_group()
