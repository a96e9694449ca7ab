"""Reading token sequences (prompts or targets) from `.txt` or `.jsonl` files."""

from __future__ import annotations

import json
from pathlib import Path

from torch.utils.data import IterableDataset

from lit_inversion.errors import InversionError
from lit_inversion.tokens import check_ids, encode


def read_lines(path: str | Path, option: str) -> list[tuple[int, str]]:
    """(line number, line) for each non-blank line of a UTF-8 text file; a clear error naming `option` otherwise."""
    path = Path(path)
    if path.is_dir():
        raise InversionError(f"{path} is a directory, not a file: check {option}")
    if not path.is_file():
        raise InversionError(f"file {path} does not exist: check {option}")
    data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")  # a BOM some editors write is not part of line 1
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise InversionError(f"file {path} is not UTF-8 text (line {line}): save it as UTF-8") from None
    # Only newlines end a line: str.splitlines() would also split at U+2028, \x0c, \x85 inside a text or a JSON string.
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    numbered = [(number, line) for number, line in enumerate(lines, start=1) if line.strip()]
    if not numbered:
        raise InversionError(f"file {path} is empty: put one sequence per line")
    return numbered


class UniqueIds:
    """Results are matched to targets by id, so a repeated id would be skipped: refuse it."""

    def __init__(self, path: Path):
        self.path, self.first_line = path, {}

    def add(self, sequence_id: str, number: int) -> None:
        if sequence_id in self.first_line:
            raise InversionError(f'{self.path}:{number} repeats the id {sequence_id!r} of line '
                                 f'{self.first_line[sequence_id]}: give each line a unique "id"')
        self.first_line[sequence_id] = number


def read_sequences(path: str | Path, tokenizer, vocab_size: int, option: str = "--data.prompts_file") -> list[tuple[str, list[int]]]:
    """(id, token ids) per line: `.txt` holds one text per line, `.jsonl` {"text": ...} or {"ids": [...]}
    (with an optional, unique "id")."""
    path = Path(path)
    sequences = []
    unique = UniqueIds(path)
    for number, line in read_lines(path, option):
        where = f"{path}:{number}"
        if path.suffix == ".jsonl":
            row = json_row(line, where)
            ids, sequence_id = row_ids(row, where, tokenizer), row_id(row, where, f"{path.stem}-{number}")
        else:
            ids = encode(tokenizer, line)
            sequence_id = f"{path.stem}-{number}"
        unique.add(sequence_id, number)
        check_ids(ids, vocab_size, f"line {number} of {path}")
        sequences.append((sequence_id, ids))
    return sequences


def json_row(line: str, where: str) -> dict:
    """One JSONL line as an object, or a clear error."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise InversionError(f"{where} is not valid JSON ({err.msg}): one object per line") from None
    except (ValueError, RecursionError) as err:  # an integer beyond Python's digit limit, or nesting too deep
        reason = "nested too deep" if isinstance(err, RecursionError) else "an integer with too many digits"
        raise InversionError(f"{where} is not valid JSON ({reason}): one object per line") from None
    if not isinstance(row, dict):
        raise InversionError(f"{where} is not a JSON object: one object per line")
    return row


def row_ids(row: dict, where: str, tokenizer, text_keys: tuple[str, ...] = ("text",)) -> list[int]:
    """The token ids of a row: its "ids", else the first of `text_keys` it has, encoded (ids win)."""
    text_key = next((key for key in text_keys if key in row), None)
    if "ids" not in row and text_key is None:
        raise InversionError(f'{where} needs {" or ".join(repr(k) for k in text_keys)} or an "ids" field')
    if "ids" in row:
        ids = row["ids"]
        # bool is an int subclass: `true` would silently become token 1
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise InversionError(f'{where}: "ids" must be a list of integers')
    else:
        text = row[text_key]
        if not isinstance(text, str):
            raise InversionError(f'{where}: "{text_key}" must be a string, not {type(text).__name__}')
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise InversionError(f'{where}: "{text_key}" has an unpaired surrogate escape (like "\\ud800"): '
                                 "write valid Unicode") from None
        ids = encode(tokenizer, text)
    return ids


def row_id(row: dict, where: str, default: str) -> str:
    sequence_id = row.get("id", default)
    if isinstance(sequence_id, bool) or not isinstance(sequence_id, (str, int)):
        raise InversionError(f'{where}: "id" must be a string or an integer, not {type(sequence_id).__name__}')
    return str(sequence_id)


class ListDataset(IterableDataset):
    """Targets held in a list, in a fixed order (resume relies on that order).

    Iterable, so Lightning never injects a distributed sampler: the DataModules shard themselves
    (`lit_inversion.distributed.shard`).
    """

    def __init__(self, items: list):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)


def apply_limit(items: list, limit: int | None, loud: bool = True) -> list:
    """The first `limit` items; says so in one line when that cuts any (a file is never cut silently)."""
    if limit is None or limit >= len(items):
        return items
    if loud:
        print(f"lit-inversion: using the first {limit} of {len(items)} targets "
              f"(--data.limit {limit}; --data.limit null for all)", flush=True)
    return items[:limit]
