"""Data: load records with `datasets`, turn them into chat messages, tokenize with the chat
template and mask everything but the assistant content.

Accepted schemas (detected from the columns):
- s1K-1.1: `question`, `{deepseek,gemini}_thinking_trajectory`, `{deepseek,gemini}_attempt`
  (grades are kept as metadata). Assistant text: "<think>\\n{trajectory}\\n</think>\\n\\n{attempt}".
- generic chat: `messages` (list of {role, content}); every assistant turn is trained on,
  except one marked `"weight": 0` (OpenAI's chat fine-tuning convention: an earlier worked
  example in the prompt, context only); `weight` may be 0 or 1 (missing/null: 1), on
  assistant messages only.
- generic pair: `prompt` / `response`.
Optional `quality` column (name configurable) >= 0; default 1.0.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

IGNORE = -100


class DataError(ValueError):
    """A clear, user-facing problem with the training data."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # HF convention: labels[t] = input_ids[t] on assistant tokens, else -100
    quality: float
    index: int  # row in the source dataset
    n_targets: int  # target tokens after the shift: count of labels[1:] != -100


@dataclass
class TokenizedData:
    examples: list[Example]
    n_rows: int
    n_truncated: int = 0
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (row, reason)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for ex in self.examples:
            h.update(ex.index.to_bytes(8, "little"))
            h.update(torch.tensor(ex.input_ids, dtype=torch.int64).numpy().tobytes())
            h.update(torch.tensor(ex.labels, dtype=torch.int64).numpy().tobytes())
        return h.hexdigest()

    def report(self) -> str:
        s = (f"{len(self.examples)} examples from {self.n_rows} rows; {self.n_truncated} "
             f"truncated; {len(self.skipped)} skipped")
        if self.skipped:
            s += " (" + "; ".join(f"row {i}: {r}" for i, r in self.skipped[:5])
            s += ", ..." if len(self.skipped) > 5 else ""
            s += ")"
        return s


# ------------------------------------------------------------------------------- loading
def load_records(source: str, split: str = "train"):
    """A `datasets.Dataset` from a local file/dir or a hub name."""
    import datasets

    path = Path(source)
    if path.is_file():
        kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(
            path.suffix)
        if kind is None:
            raise DataError(f"unsupported data file type {path.suffix!r}: {path} (use .jsonl, "
                            f".json, .parquet or .csv)")
        with path.open("rb") as f:
            head = f.read(4096)
        if kind in ("json", "csv") and not head.strip():
            raise DataError(f"the dataset is empty: {path}")
        try:
            return datasets.load_dataset(kind, data_files=str(path), split="train")
        except Exception as e:
            # name the line: datasets' own message gives at most a row or character position
            problem = json_problem(path) if kind == "json" else None
            if problem:
                raise DataError(f"{path}: {problem}") from e
            raise DataError(f"could not read {path}: {_innermost(e)}") from e
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            ds = datasets.load_from_disk(str(path))
            return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        return datasets.load_dataset(str(path), split=split)
    if source.startswith((".", "/", "~")) or source.endswith((".jsonl", ".json", ".parquet")):
        raise DataError(f"data path does not exist: {source}")
    try:
        return datasets.load_dataset(source, split=split)
    except Exception as e:  # offline, unknown name, ...
        raise DataError(f"could not load dataset {source!r} (not a local path; hub load failed: "
                        f"{type(e).__name__}: {e})") from e


def _innermost(e: BaseException) -> str:
    """The error and its innermost cause (datasets wraps the parser's message)."""
    inner = e
    while (inner.__cause__ or inner.__context__) is not None:
        inner = inner.__cause__ or inner.__context__
    text = f"{type(e).__name__}: {e}"
    return text if inner is e else f"{text} (cause: {type(inner).__name__}: {inner})"


def json_problem(path: Path) -> str | None:
    """The first place where a .json / .jsonl file is not what the loader accepts (one JSON
    document, or one JSON object per line), as "line N, column C: ..." or None if it is fine."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        return f"line {line}: not UTF-8 text (byte {e.start})"
    try:
        json.loads(text)
        return None  # one JSON document (an array of records, or a single object)
    except json.JSONDecodeError as e:
        whole = e
    if text.lstrip().startswith("["):  # meant as one JSON array
        return (f"line {whole.lineno}, column {whole.colno}: not valid JSON ({whole.msg})")
    for n, line in enumerate(text.splitlines(), 1):  # JSON Lines: one object per line
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            snippet = line.strip()
            snippet = snippet if len(snippet) <= 60 else snippet[:57] + "..."
            return (f"line {n}, column {e.colno}: not valid JSON ({e.msg}): {snippet}")
        if not isinstance(obj, dict):
            return (f"line {n}: expected one JSON object {{...}} per line, got a "
                    f"{type(obj).__name__}")
    return None


def _text(value, what: str) -> str:
    """A message text must be a string: a missing or null value would reach the chat
    template as `undefined` (a 20-line jinja2 traceback) or be rendered as "None"."""
    if not isinstance(value, str):
        raise TypeError(f"{what} is {'missing or null' if value is None else type(value).__name__}"
                        f", expected a string")
    return value


def to_messages(row: dict, schema: str, trace_source: str) -> list[dict]:
    if schema == "messages":
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise TypeError("`messages` must be a non-empty list of {role, content}")
        out = []
        for k, m in enumerate(msgs):
            role = _text(m.get("role"), f"messages[{k}].role")
            out.append({"role": role, "content": _text(m.get("content"),
                                                       f"messages[{k}].content")})
            w = m.get("weight")  # datasets fills a key missing in some messages with None
            if w is not None:
                if isinstance(w, bool) or w not in (0, 1) or role != "assistant":
                    raise DataError(f"message weight must be 0 or 1 and only on assistant "
                                    f"messages; got weight {w!r} on a {role!r} message")
                out[-1]["weight"] = int(w)
        return out
    if schema == "pair":
        return [{"role": "user", "content": _text(row.get("prompt"), "`prompt`")},
                {"role": "assistant", "content": _text(row.get("response"), "`response`")}]
    traj = _text(row.get(f"{trace_source}_thinking_trajectory"),
                 f"`{trace_source}_thinking_trajectory`")
    attempt = _text(row.get(f"{trace_source}_attempt"), f"`{trace_source}_attempt`")
    return [{"role": "user", "content": _text(row.get("question"), "`question`")},
            {"role": "assistant", "content": f"<think>\n{traj}\n</think>\n\n{attempt}"}]


def detect_schema(columns: list[str], trace_source: str) -> str:
    cols = set(columns)
    if "messages" in cols:
        return "messages"
    if {"prompt", "response"} <= cols:
        return "pair"
    s1k = {"question", f"{trace_source}_thinking_trajectory", f"{trace_source}_attempt"}
    if "question" in cols:
        missing = sorted(s1k - cols)
        if not missing:
            return "s1k"
        raise DataError(f"s1K-1.1 schema: missing columns {missing} (trace_source="
                        f"{trace_source!r}); found columns {sorted(cols)}")
    raise DataError(f"unrecognised data schema; found columns {sorted(cols)}. Expected "
                    f"`messages`, or `prompt` + `response`, or the s1K-1.1 columns "
                    f"`question`, `{trace_source}_thinking_trajectory`, `{trace_source}_attempt`")


def _short(row: dict, n: int = 200) -> str:
    text = repr(row)
    return text if len(text) <= n else text[: n - 3] + "..."


# ----------------------------------------------------------------------------- tokenizing
def tokenize_messages(tokenizer, messages: list[dict], max_length: int):
    """(input_ids, labels, truncated). Labels keep exactly the tokens of each assistant turn's
    content and its end-of-turn marker (turns with `"weight": 0` excepted); the assistant header ("<|im_start|>assistant\\n") and
    everything else is -100. Spans come from the rendered template and the tokenizer's offsets."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant" or m.get("weight", 1) == 0:
            continue
        prefix = tokenizer.apply_chat_template(messages[:k], tokenize=False,
                                               add_generation_prompt=True) if k else ""
        upto = tokenizer.apply_chat_template(messages[: k + 1], tokenize=False)
        if not (text.startswith(prefix) and text.startswith(upto)):
            raise DataError("the chat template is not prefix-consistent; cannot locate the "
                            "assistant spans")
        spans.append((len(prefix), len(upto)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [IGNORE] * len(ids)
    for t, (a, _) in enumerate(offsets):
        if any(s <= a < e for s, e in spans):
            labels[t] = ids[t]
    truncated = len(ids) > max_length
    return ids[:max_length], labels[:max_length], truncated


def tokenize_dataset(ds, tokenizer, *, max_length: int, trace_source: str = "deepseek",
                     quality_column: str = "quality", max_examples: int | None = None,
                     need_quality: bool = False, source: str | None = None) -> TokenizedData:
    if len(ds) == 0:
        raise DataError("the dataset is empty")
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("the tokenizer has no chat template (base models often have none), and "
                        "the trainer needs one to find the assistant part of each example: "
                        "pass --tokenizer with a chat/instruct model's tokenizer, or add a "
                        "chat template to the tokenizer folder (chat_template.jinja, or "
                        "`chat_template` in tokenizer_config.json)")
    schema = detect_schema(ds.column_names, trace_source)
    # the quality column is read (and checked) only when the run uses it: sampling by quality
    # or weighting by it; otherwise every example has quality 1
    has_q = need_quality and quality_column in ds.column_names
    if need_quality and not has_q:
        raise DataError(f"quality sampling/weighting needs a {quality_column!r} column; found "
                        f"{sorted(ds.column_names)}")
    if has_q:
        q = torch.tensor([float("nan") if v is None else float(v) for v in ds[quality_column]],
                         dtype=torch.float64)
        bad = (~torch.isfinite(q)) | (q < 0)
        if bad.any():
            rows = bad.nonzero().squeeze(1)[:5].tolist()
            raise DataError(f"column {quality_column!r} must be finite and >= 0; bad rows "
                            f"{rows} (values {[q[i].item() for i in rows]}); it is used because "
                            f"of --sampling quality / --quality-weight")
    n_rows = len(ds) if max_examples is None else min(len(ds), max_examples)
    out = TokenizedData([], n_rows)
    for i in range(n_rows):
        row = ds[i]
        try:
            messages = to_messages(row, schema, trace_source)
        except (KeyError, TypeError, AttributeError) as e:
            where = f"{source}: " if source else ""
            raise DataError(f"{where}row {i} (counting from 0): cannot read it as {schema!r} data "
                            f"({type(e).__name__}: {e}); its values: {_short(row)}") from e
        ids, labels, truncated = tokenize_messages(tokenizer, messages, max_length)
        out.n_truncated += truncated
        n_targets = sum(1 for y in labels[1:] if y != IGNORE)
        if n_targets == 0:
            out.skipped.append((i, "no assistant tokens left after truncation" if truncated
                                else "no assistant tokens"))
            continue
        quality = float(row[quality_column]) if has_q else 1.0
        out.examples.append(Example(ids, labels, quality, i, n_targets))
    if not out.examples:
        raise DataError(f"no usable examples: {out.report()}")
    return out


def hold_out(data: TokenizedData, fraction: float, seed: int) -> tuple[TokenizedData,
                                                                      list[Example]]:
    """(training data, held-out examples): round(fraction * n) examples (at least 1) of the n
    usable ones, drawn by `seed` (its own generator: the global RNG is not touched) and removed
    from training; both keep their order in the data."""
    n = len(data.examples)
    k = max(1, round(fraction * n))
    if k >= n:
        raise DataError(f"--eval-fraction {fraction} of the {n} usable examples holds out {k}, "
                        f"leaving none to train on: lower it, or use more data")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(perm[:k])
    train = TokenizedData([ex for i, ex in enumerate(data.examples) if i not in held],
                          data.n_rows, data.n_truncated, data.skipped)
    return train, [ex for i, ex in enumerate(data.examples) if i in held]


# ------------------------------------------------------------------------------- batching
def collate(examples: list[Example], pad_id: int, ref: list[torch.Tensor] | None = None,
            packing: bool = False) -> dict:
    """Padded (B, T) batch (right padding) or, with packing, one row with restarting
    position_ids. `ref` holds per-example reference log-probs aligned with the labels."""
    if packing:
        ids = torch.tensor([t for ex in examples for t in ex.input_ids])[None]
        batch = {
            "input_ids": ids,
            "labels": torch.tensor([t for ex in examples for t in ex.labels])[None],
            "position_ids": torch.cat([torch.arange(len(ex.input_ids)) for ex in examples])[None],
        }
        if ref is not None:
            batch["ref_logprobs"] = torch.cat(ref)[None]
    else:
        T = max(len(ex.input_ids) for ex in examples)
        B = len(examples)
        ids = torch.full((B, T), pad_id, dtype=torch.long)
        labels = torch.full((B, T), IGNORE, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        for b, ex in enumerate(examples):
            n = len(ex.input_ids)
            ids[b, :n] = torch.tensor(ex.input_ids)
            labels[b, :n] = torch.tensor(ex.labels)
            mask[b, :n] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if ref is not None:
            r = torch.zeros((B, T), dtype=torch.float32)
            for b, x in enumerate(ref):
                r[b, : len(x)] = x
            batch["ref_logprobs"] = r
    batch["quality"] = torch.tensor([ex.quality for ex in examples], dtype=torch.float32)
    return batch
