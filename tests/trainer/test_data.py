"""Data: schemas, the assistant mask, truncation/skip reporting, bad inputs."""

import json

import pytest

datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

from iwsft_kernels.trainer.config import ASSETS  # noqa: E402
from iwsft_kernels.trainer.data import (  # noqa: E402
    IGNORE,
    DataError,
    collate,
    load_records,
    tokenize_dataset,
    tokenize_messages,
)


@pytest.fixture(scope="module")
def tok():
    return transformers.AutoTokenizer.from_pretrained(ASSETS / "tokenizer")


def ds(rows):
    return datasets.Dataset.from_list(rows)


def s1k_row(i=0, q=1.0):
    return {"question": f"What is {i} + 1?", "deepseek_thinking_trajectory": f"Add one to {i}.",
            "deepseek_attempt": f"The answer is {i + 1}.", "deepseek_grade": "Yes",
            "gemini_thinking_trajectory": "g", "gemini_attempt": "g", "quality": q}


def test_assistant_mask_starts_exactly_at_assistant_content(tok):
    msgs = [{"role": "user", "content": "What is 2 + 3?"},
            {"role": "assistant", "content": "The value is 5."}]
    ids, labels, truncated = tokenize_messages(tok, msgs, 4096)
    assert not truncated
    first = next(t for t, y in enumerate(labels) if y != IGNORE)
    # everything before is the prompt, ending with the Qwen assistant header
    assert tok.decode(ids[:first]).endswith("<|im_start|>assistant\n")
    assert tok.decode(ids[first:]) == "The value is 5.<|im_end|>\n"
    assert all(y == IGNORE for y in labels[:first])
    assert labels[first:] == ids[first:]


def test_multi_turn_messages_train_every_assistant_turn(tok):
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4."}]
    ids, labels, _ = tokenize_messages(tok, msgs, 4096)
    kept = tok.decode([i for i, y in zip(ids, labels) if y != IGNORE])
    assert kept == "Hello.<|im_end|>\n4.<|im_end|>\n"


def test_messages_weight_zero_turn_is_context(tok, tmp_path):
    """OpenAI's convention: an assistant message with "weight": 0 is context (e.g. a worked
    example in the prompt), not a target; 1 or missing: trained on."""
    msgs = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2.",
                                                 "weight": 0},
            {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4."}]
    ids, labels, _ = tokenize_messages(tok, msgs, 4096)
    assert tok.decode([i for i, y in zip(ids, labels) if y != IGNORE]) == "4.<|im_end|>\n"
    full, full_labels, _ = tokenize_messages(tok, [{k: v for k, v in m.items() if k != "weight"}
                                                   for m in msgs], 4096)
    assert ids == full  # the weight changes the labels only, not the text
    # through the file loader: datasets gives the other messages weight None (= 1)
    rows = [{"messages": msgs}, {"messages": [dict(m, weight=1) if m["role"] == "assistant"
                                              else m for m in msgs]}]
    f = tmp_path / "w.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = tokenize_dataset(load_records(str(f)), tok, max_length=4096)
    n = lambda lab: sum(1 for y in lab[1:] if y != IGNORE)  # noqa: E731
    assert n(labels) < n(full_labels)
    assert [ex.n_targets for ex in data.examples] == [n(labels), n(full_labels)]
    for bad, role in ((2, "assistant"), (0.5, "assistant"), (0, "user")):
        m = [{"role": role, "content": "x", "weight": bad},
             {"role": "assistant", "content": "y"}] if role == "user" else \
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y",
                                                "weight": bad}]
        f.write_text(json.dumps({"messages": m}) + "\n")
        with pytest.raises(DataError, match="weight must be 0 or 1"):
            tokenize_dataset(load_records(str(f)), tok, max_length=4096)


def test_schemas_s1k_messages_pair(tok):
    out = tokenize_dataset(ds([s1k_row(i) for i in range(3)]), tok, max_length=512)
    assert len(out.examples) == 3 and out.examples[0].quality == 1.0
    ex = out.examples[1]
    text = tok.decode([i for i, y in zip(ex.input_ids, ex.labels) if y != IGNORE])
    assert text == "<think>\nAdd one to 1.\n</think>\n\nThe answer is 2.<|im_end|>\n"
    assert ex.n_targets == sum(y != IGNORE for y in ex.labels[1:])
    pair = tokenize_dataset(ds([{"prompt": "a", "response": "b"}]), tok, max_length=64)
    msgs = tokenize_dataset(ds([{"messages": [{"role": "user", "content": "a"},
                                              {"role": "assistant", "content": "b"}]}]),
                            tok, max_length=64)
    assert pair.examples[0].input_ids == msgs.examples[0].input_ids
    gem = tokenize_dataset(ds([s1k_row(0)]), tok, max_length=512, trace_source="gemini")
    assert gem.examples[0].input_ids != out.examples[0].input_ids


def test_bad_inputs_are_clear_errors(tok, tmp_path):
    row = s1k_row()
    del row["deepseek_attempt"]
    with pytest.raises(DataError, match="missing columns.*deepseek_attempt"):
        tokenize_dataset(ds([row]), tok, max_length=64)
    with pytest.raises(DataError, match="unrecognised data schema"):
        tokenize_dataset(ds([{"text": "x"}]), tok, max_length=64)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        tokenize_dataset(ds([s1k_row()]).select([]), tok, max_length=64)
    with pytest.raises(DataError, match="quality.*>= 0"):
        tokenize_dataset(ds([s1k_row(0, 1.0), s1k_row(1, -0.5)]), tok, max_length=64,
                         need_quality=True)
    with pytest.raises(DataError, match="needs a 'quality' column"):
        tokenize_dataset(ds([{"prompt": "a", "response": "b"}]), tok, max_length=64,
                         need_quality=True)
    with pytest.raises(DataError, match="does not exist"):
        load_records(str(tmp_path / "nope.jsonl"))


def test_truncation_reported_and_promptonly_examples_skipped(tok, tmp_path):
    long_q = {**s1k_row(0), "question": "word " * 200}
    rows = [s1k_row(1), long_q, {**s1k_row(2), "deepseek_attempt": "x " * 100}]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    out = tokenize_dataset(load_records(str(path)), tok, max_length=64)
    assert out.n_truncated == 2
    assert [i for i, _ in out.skipped] == [1]
    assert "no assistant tokens left after truncation" in out.skipped[0][1]
    assert "1 skipped" in out.report() and "2 truncated" in out.report()
    assert [ex.index for ex in out.examples] == [0, 2]
    assert all(len(ex.input_ids) <= 64 for ex in out.examples)
    with pytest.raises(DataError, match="no usable examples"):
        tokenize_dataset(load_records(str(path)).select([1]), tok, max_length=64)


def test_collate_padded_and_packed(tok):
    out = tokenize_dataset(ds([s1k_row(i) for i in range(3)]), tok, max_length=512)
    exs = out.examples
    b = collate(exs, tok.pad_token_id)
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape
    assert b["attention_mask"].sum().item() == sum(len(e.input_ids) for e in exs)
    p = collate(exs, tok.pad_token_id, packing=True)
    assert p["input_ids"].shape[0] == 1 and (p["position_ids"] == 0).sum().item() == 3


@pytest.mark.parametrize("row, what", [
    ({"prompt": "a", "response": None}, "`response` is missing or null"),
    ({"prompt": "a", "response": 3}, "`response` is int"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": None}]},
     r"messages\[1\].content is missing or null"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]},
     r"messages\[1\].content is missing or null"),
])
def test_null_or_missing_text_is_a_one_line_row_error(tok, tmp_path, row, what):
    path = tmp_path / "d.jsonl"
    good = {"prompt": "q", "response": "r"} if "prompt" in row else {
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=f"{path}: row 1 .*{what}") as e:
        tokenize_dataset(load_records(str(path)), tok, max_length=64, source=str(path))
    assert "\n" not in str(e.value) and "jinja" not in str(e.value).lower()


def test_quality_column_is_checked_only_when_used(tok):
    rows = [{"prompt": "a", "response": "b", "quality": -1.0},
            {"prompt": "c", "response": "d", "quality": 2.0}]
    out = tokenize_dataset(ds(rows), tok, max_length=64)  # not used: no error, quality 1
    assert [ex.quality for ex in out.examples] == [1.0, 1.0]
    with pytest.raises(DataError, match="quality.*>= 0.*--sampling quality / --quality-weight"):
        tokenize_dataset(ds(rows), tok, max_length=64, need_quality=True)
    ok = tokenize_dataset(ds(rows[1:]), tok, max_length=64, need_quality=True)
    assert [ex.quality for ex in ok.examples] == [2.0]


def test_tokenizer_without_chat_template_says_what_to_do(tok):
    import copy

    bare = copy.deepcopy(tok)
    bare.chat_template = None
    with pytest.raises(DataError, match="no chat template.*--tokenizer"):
        tokenize_dataset(ds([{"prompt": "a", "response": "b"}]), bare, max_length=64)
