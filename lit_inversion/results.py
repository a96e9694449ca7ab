"""Results as JSONL: one record per target, appended (and fsynced) the moment the target finishes.

The file is the source of truth for resuming: targets whose id is already in it are skipped. A line
cut short by a kill is dropped when the file is reopened, so the file is never left corrupted.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from lit_inversion.errors import InversionError


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class ResultsWriter:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair()
        self.done_ids: set[str] = {str(r["id"]) for r in read_results(self.path)}

    def _repair(self) -> None:
        """Drop a trailing partial line left by a killed writer."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with open(self.path, "rb+") as f:
            data = f.read()
            if data.endswith(b"\n"):
                return
            cut = data.rfind(b"\n") + 1
            f.truncate(cut)

    def write(self, record: dict[str, Any]) -> None:
        record = _clean(record)
        try:
            line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        except UnicodeEncodeError:  # an unpaired surrogate has no UTF-8 form; its \u escape is still valid JSON
            line = (json.dumps(record) + "\n").encode("ascii")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one write call: a record is either whole or (after a kill) a cut last line
            os.fsync(fd)
        finally:
            os.close(fd)
        self.done_ids.add(str(record["id"]))


def read_results(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All complete records of a results file (a cut last line is ignored)."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()  # bytes: a cut can end inside a multi-byte character, which text mode fails on
    records = []
    for number, line in enumerate(data.split(b"\n")[:-1], start=1):  # the last piece has no newline: cut, or empty
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise InversionError(f"results file {path} line {number} is not valid JSON ({type(err).__name__}): "
                                 "remove that line, or point --results_path to a new file") from None
        if not isinstance(record, dict) or "id" not in record:
            raise InversionError(f'results file {path} line {number} is not a record with an "id": '
                                 "remove that line, or point --results_path to a new file")
        records.append(record)
    return records


def settings_path(path: str | os.PathLike) -> Path:
    """The sidecar that remembers the settings a results file's records were made with."""
    path = Path(path)
    return path.with_name(path.name + ".settings.json")


def check_settings(path: str | os.PathLike, settings: dict[str, Any], write: bool = True) -> None:
    """Refuse to append records made with other settings (say, another layer) to a results file.

    Records are matched to targets by id only, so without this a rerun with a changed layer or method
    would count the old records as done and silently do nothing.
    """
    sidecar = settings_path(path)
    settings = _clean(settings)
    if sidecar.is_file():
        try:
            saved = json.loads(sidecar.read_text(encoding="utf-8"))
        except (ValueError, OSError):
            saved = None
        if isinstance(saved, dict) and read_results(path):
            changed = [k for k in sorted(set(saved) | set(settings)) if saved.get(k) != settings.get(k)]
            if changed:
                was = ", ".join(f"{k}={saved.get(k)!r}" for k in changed)
                now = ", ".join(f"{k}={settings.get(k)!r}" for k in changed)
                raise InversionError(f"{path} holds records made with {was}, not {now}: pass a new --results_path "
                                     "for this run, or delete that file to start over")
    if write:
        sidecar.parent.mkdir(parents=True, exist_ok=True)
        tmp = sidecar.with_name(sidecar.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(settings, sort_keys=True) + "\n", encoding="utf-8")
        tmp.replace(sidecar)
