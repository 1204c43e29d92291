"""Calibration data for grams: read with `datasets`, sampled, sliced, rendered and tokenised.

A row's text field holds either plain text or chat messages (`[{"role": ..., "content": ...}]`, or
ShareGPT's `[{"from": "human", "value": ...}]`), which are rendered with the model's chat
template, as the reference rendered its instruction data.
Row selection is deterministic: the first `num_samples` rows in file order, or a seeded shuffle
first when `seed` is set; `--shard i/n` and torchrun ranks then take disjoint slices of that
selection, so slices summed equal the whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_rows(path: str | Path, field: str = "text", *, num_samples: Optional[int] = None, seed: Optional[int] = None) -> list:
    """The `field` values of the selected rows of a JSONL, JSON, Parquet or CSV file."""
    data = select_rows(read_table(path, field), num_samples=num_samples, seed=seed)
    values = data[field]
    missing = [i + 1 for i, v in enumerate(values) if v is None or v == "" or v == []]
    if missing:
        raise ValueError(f"{path}: rows {missing[:5]} (of the selection) have no {field!r} value")
    return values


def select_rows(data, *, num_samples: Optional[int] = None, seed: Optional[int] = None):
    """The selection of a `datasets.Dataset`: a seeded shuffle when `seed` is set, then the first `num_samples` rows."""
    if seed is not None:
        data = data.shuffle(seed=seed)
    if num_samples:
        data = data.select(range(min(num_samples, len(data))))
    return data


def read_table(path: str | Path, field: str = "text"):
    """A JSONL, JSON, Parquet or CSV file as a `datasets.Dataset`, checked: rows present, `field`
    among the columns and every value of it text or chat messages."""
    import datasets

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: calibration data file not found (check --data / params.yaml data.calib)")
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(f"{path}: unknown calibration data format {path.suffix!r}; use one of {sorted(BUILDERS)}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: is empty; grams need calibration text")
    if builder != "parquet":
        check_text_file(path)
    datasets.disable_progress_bars()
    try:
        kwargs = csv_as_text(path) if builder == "csv" else {}
        data = datasets.load_dataset(builder, data_files=str(path), split="train", keep_in_memory=True, **kwargs)
    except Exception as err:  # datasets wraps parser errors in several exception types
        if "corresponds to no data" in str(err):  # a CSV header without rows
            raise ValueError(f"{path}: holds no rows; grams need calibration text: add rows") from None
        raise ValueError(f"{path}: could not be read as {builder} ({type(err).__name__}: {err})") from None
    if len(data) == 0:
        raise ValueError(f"{path}: holds no rows; grams need calibration text: add rows")
    if field not in data.column_names:
        raise ValueError(f"{path}: rows have no {field!r} field (fields: {sorted(data.column_names)}); set gram.text_field / --text-field")
    check_values(path, field, data[field])
    return data


def check_text_file(path: Path) -> None:
    """Refuse, naming the line, what the parsers would report as their own internals: NUL bytes
    (a binary file), bytes that are not UTF-8, a file of blank lines only."""
    text_seen = False
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if b"\0" in line:
                raise ValueError(f"{path}: line {number} holds a NUL byte, so this is not a text file; write the calibration data as UTF-8 JSON lines or CSV")
            try:
                decoded = line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}: line {number} is not UTF-8 (byte 0x{line[err.start]:02x} at column {err.start + 1}); "
                                 f"re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8 {path} > fixed{path.suffix})") from None
            text_seen = text_seen or bool(decoded.strip())
    if not text_seen:
        raise ValueError(f"{path}: holds only blank lines; grams need calibration text: one row per line with a text field")


def check_values(path: Path, field: str, values) -> None:
    """Every present value must be text or chat messages: a number or an object is refused,
    naming its row, rather than tokenised as `str(value)`."""
    for number, value in enumerate(values, start=1):
        if value is None or value == "" or value == [] or isinstance(value, str) or is_chat(value):
            continue
        kind = {bool: "a boolean", int: "a number", float: "a number", dict: "an object", list: "a list that is not chat messages"}.get(type(value), type(value).__name__)
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise ValueError(f"{path}: row {number}: {field!r} is {kind} ({shown}), not text or chat messages; write it as a string or fix the row")


def csv_as_text(path: Path) -> dict:
    """Every CSV column read as a string, verbatim: no "007" -> 7, no "NA" -> missing."""
    import datasets
    import pandas as pd

    columns = pd.read_csv(path, nrows=0).columns
    return {"features": datasets.Features({c: datasets.Value("string") for c in columns}), "keep_default_na": False}


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def as_messages(value) -> list[dict] | None:
    """Chat messages as the chat template wants them, from OpenAI (`role`/`content`) or ShareGPT
    (`from`/`value`, as in code_bagel_hermes) rows; None for plain text."""
    if not isinstance(value, list) or not value or not all(isinstance(m, dict) for m in value):
        return None
    if all("role" in m and "content" in m for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    if all("from" in m and "value" in m for m in value):
        return [{"role": SHAREGPT_ROLES.get(m["from"], m["from"]), "content": m["value"]} for m in value]
    return None


def is_chat(value) -> bool:
    return as_messages(value) is not None


def tokenize(values: Sequence, tokenizer, max_length: int) -> list[list[int]]:
    """Token ids of each row, truncated to `max_length`; chat rows through the chat template."""
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    chats = [i for i, v in enumerate(values) if is_chat(v)]
    if chats and not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"the calibration rows hold chat messages but the tokenizer has no chat template (row {chats[0] + 1})")
    ids: list[list[int]] = []
    for v in values:
        if is_chat(v):  # the template writes the special tokens (BOS) itself
            text = tokenizer.apply_chat_template(as_messages(v), tokenize=False)
            ids.append(tokenizer(text, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"])
        elif isinstance(v, str):
            ids.append(tokenizer(v, truncation=True, max_length=max_length)["input_ids"])
        else:
            raise ValueError(f"calibration row {len(ids) + 1}: {type(v).__name__} {v!r:.40} is not text or chat messages")
    empty = [i + 1 for i, t in enumerate(ids) if not t]
    if empty:
        raise ValueError(f"calibration rows {empty[:5]} tokenise to nothing")
    return ids


def parse_shard(text: Optional[str]) -> tuple[int, int]:
    """`"i/n"` -> `(i, n)` with 0 <= i < n; None -> `(0, 1)`."""
    if not text:
        return 0, 1
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard {text}: need 0 <= i < n")
    return i, n


def slice_of(count: int, index: int, parts: int) -> range:
    """Contiguous, near-equal slice `index` of `parts` over `count` rows."""
    return range(count * index // parts, count * (index + 1) // parts)
