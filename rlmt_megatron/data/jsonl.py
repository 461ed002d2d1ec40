"""JSON-lines input with errors that name the file, the line and the field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from rlmt_megatron.errors import InputFileError


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line; a bad line raises InputFileError."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"{path}: no such file")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputFileError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise InputFileError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


def field(row: dict, name: str, kind: type | tuple[type, ...], where: str) -> Any:
    """``row[name]`` checked against ``kind``; ``where`` is 'file:line' for the message."""
    if name not in row:
        raise InputFileError(f"{where}: field '{name}' is missing")
    value = row[name]
    if not isinstance(value, kind):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise InputFileError(f"{where}: field '{name}' is {type(value).__name__}, expected {expected}")
    return value


def messages_field(row: dict, where: str) -> list[dict]:
    """A chat: a non-empty list of {role, content} with string values."""
    messages = field(row, "messages", list, where)
    if not messages:
        raise InputFileError(f"{where}: field 'messages' is empty")
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise InputFileError(f"{where}: messages[{k}] must be an object with string 'role' and 'content'")
    return messages


def token_ids_field(row: dict, name: str, vocab_size: int, where: str) -> list[int]:
    ids = field(row, name, list, where)
    for k, t in enumerate(ids):
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size:
            raise InputFileError(f"{where}: {name}[{k}] = {t!r} is not a token id in [0, {vocab_size})")
    return ids


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
