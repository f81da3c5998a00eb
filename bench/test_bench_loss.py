"""pytest-benchmark versions of the loss benchmark on small shapes.

    pytest bench --benchmark-only                       # CPU (or CUDA if present)

On CPU the Triton implementations (ours-*-triton, Liger) are skipped even under
TRITON_INTERPRET=1: the interpreter did not finish these shapes' benchmark rounds in 8 minutes.

Not collected by ``pytest tests``. Each benchmark times one forward+backward of one
implementation on the same inputs, after checking its loss against a float64 oracle.
For the real tables use ``python -m bench.bench_loss`` (bench/README.md).
"""
import pytest
import torch

from bench.impls import all_impls
from bench.oracle import make_inputs, make_ref_logprobs, oracle

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPES = {"N512-H64-V8192": (512, 64, 8192), "N1024-H128-V16384": (1024, 128, 16384)}
IMPLS = all_impls()


@pytest.fixture(scope="module", params=list(SHAPES), ids=list(SHAPES))
def case(request):
    n, h, v = SHAPES[request.param]
    inp = make_inputs(n, h, v, seq_len=256, dtype=torch.float32, device=DEVICE, seed=0)
    logp, _ = oracle(inp, dtype=torch.float64)
    inp.ref_logprobs = make_ref_logprobs(logp, inp.labels, inp.cu_seqlens).to(DEVICE)
    _, refs = oracle(inp, dtype=torch.float64, ref_logprobs=inp.ref_logprobs)
    return inp, {m: float(r[0]) for m, r in refs.items()}


@pytest.mark.parametrize("impl", IMPLS, ids=[i.key for i in IMPLS])
def test_fwd_bwd(benchmark, case, impl):
    why = impl.unavailable(DEVICE)
    if why:
        pytest.skip(why)
    if DEVICE.type == "cpu" and (impl.key.endswith("-triton") or impl.key == "liger"):
        pytest.skip("Triton interpreter on CPU: too slow to benchmark")
    inp, ref_loss = case
    fn = impl.build(inp, {"peer_chunk_bytes": 1 << 24})

    def step():
        inp.hidden.grad = None
        inp.weight.grad = None
        loss = fn()
        loss.backward()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return loss

    loss = step()  # warm-up (torch.compile, autotune) and accuracy check, outside the timing
    assert float(loss) == pytest.approx(ref_loss[impl.mode], rel=1e-4)
    benchmark.extra_info.update(impl=impl.key, mode=impl.mode, device=str(DEVICE))
    benchmark(step)
