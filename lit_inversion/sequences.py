"""Reading token sequences (prompts or targets) from `.txt` or `.jsonl` files."""

from __future__ import annotations

import json
from pathlib import Path

from torch.utils.data import IterableDataset

from lit_inversion.errors import InversionError
from lit_inversion.tokens import check_ids, encode


def read_sequences(path: str | Path, tokenizer, vocab_size: int, option: str = "--data.prompts_file") -> list[tuple[str, list[int]]]:
    """(id, token ids) per line: `.txt` holds one text per line, `.jsonl` {"text": ...} or {"ids": [...]}
    (with an optional, unique "id")."""
    path = Path(path)
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
    sequences = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            sequence_id, ids = _json_line(line, f"{path}:{number}", path.stem, number, tokenizer)
        else:
            ids = encode(tokenizer, line)
            sequence_id = f"{path.stem}-{number}"
        if sequence_id in first_line:  # results are matched to targets by id, so a repeat would be skipped
            raise InversionError(f'{path}:{number} repeats the id {sequence_id!r} of line {first_line[sequence_id]}: '
                                 'give each line a unique "id"')
        first_line[sequence_id] = number
        check_ids(ids, vocab_size, f"line {number} of {path}")
        sequences.append((sequence_id, ids))
    if not sequences:
        raise InversionError(f"file {path} is empty: put one sequence per line")
    return sequences


def _json_line(line: str, where: str, stem: str, number: int, tokenizer) -> tuple[str, list[int]]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise InversionError(f"{where} is not valid JSON ({err.msg}): one object per line") from None
    except (ValueError, RecursionError) as err:  # an integer beyond Python's digit limit, or nesting too deep
        reason = "nested too deep" if isinstance(err, RecursionError) else "an integer with too many digits"
        raise InversionError(f"{where} is not valid JSON ({reason}): one object per line") from None
    if not isinstance(row, dict) or ("text" not in row and "ids" not in row):
        raise InversionError(f'{where} needs a "text" or an "ids" field')
    if "ids" in row:
        ids = row["ids"]
        # bool is an int subclass: `true` would silently become token 1
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise InversionError(f'{where}: "ids" must be a list of integers')
    else:
        text = row["text"]
        if not isinstance(text, str):
            raise InversionError(f'{where}: "text" must be a string, not {type(text).__name__}')
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise InversionError(f'{where}: "text" has an unpaired surrogate escape (like "\\ud800"): '
                                 "write valid Unicode") from None
        ids = encode(tokenizer, text)
    sequence_id = row.get("id", f"{stem}-{number}")
    if isinstance(sequence_id, bool) or not isinstance(sequence_id, (str, int)):
        raise InversionError(f'{where}: "id" must be a string or an integer, not {type(sequence_id).__name__}')
    return str(sequence_id), ids


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
