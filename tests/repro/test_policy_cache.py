"""The curated experiment's sampler (bench/repro/curated/policy.py) with the installed
transformers: no deprecated KV-cache argument (``past_key_values`` is removed in transformers
5.40), and decoding with the cache gives the same tokens as recomputing the whole sequence."""

import random
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.repro.curated import policy, task  # noqa: E402


def test_sampling_uses_the_current_cache_api_and_matches_no_cache_decoding(tmp_path):
    policy.make_model_dir(tmp_path / "m", hidden=32, layers=2, heads=2, seed=1)
    model, tok = policy.load(tmp_path / "m")
    problems = [task.random_problem(random.Random(i)) for i in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # a deprecation is an error here
        warnings.simplefilter("error", DeprecationWarning)
        got = policy.sample(model, tok, problems, seed=0, greedy=True, max_new_tokens=6)
    # greedy decoding without any cache: the whole sequence every step
    want = []
    for p in problems:
        ids = torch.tensor([policy.prompt_ids(tok, p)])
        new = []
        with torch.no_grad():
            for _ in range(6):
                nxt = int(model(input_ids=ids, use_cache=False).logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                new.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
        want.append("".join(t or "?" for t in tok.convert_ids_to_tokens(new)))
    assert got == want
