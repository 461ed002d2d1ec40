"""Row checks shared by the prompt and SFT loaders, and the report of the rows they skip.

A bad row is not fatal: it is described (file, row, reason), counted per reason, and skipped, so
one stray row in a 7.5K-prompt set does not stop a run. The loaders raise only when no usable
row remains.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

ROLES = ("system", "user", "assistant")


class RowError(Exception):
    """One row is unusable; ``reason`` is a short stable key (counted), ``detail`` the explanation."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class RowReport:
    """How many rows a loader read, kept and skipped (per reason), with the first few examples."""

    total: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    max_examples: int = 5

    def bad(self, where: str, error: RowError) -> None:
        self.skipped[error.reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(f"{where}: {error.detail} [{error.reason}]")

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def merge(self, other: "RowReport") -> None:
        self.total += other.total
        self.kept += other.kept
        self.skipped.update(other.skipped)
        room = self.max_examples - len(self.examples)
        self.examples.extend(other.examples[: max(room, 0)])

    def summary(self) -> str:
        text = f"{self.kept} of {self.total} rows kept"
        if self.skipped:
            reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items()))
            text += f"; skipped {self.num_skipped} ({reasons}); first: " + " | ".join(self.examples)
        return text

    def log(self, logger: logging.Logger, what: str) -> None:
        (logger.warning if self.skipped else logger.info)("%s: %s", what, self.summary())


def check_messages(value: Any, name: str) -> list[dict[str, str]]:
    """A chat as a list of ``{role, content}`` (other keys dropped), or RowError.

    Checks: a non-empty list of objects; role one of system/user/assistant; content a string
    with some non-blank text; a system message only first.
    """
    if value is None:
        raise RowError("missing_field", f"field '{name}' is missing or null")
    # pyarrow/datasets give lists; tuples are accepted for callers building rows in code.
    if not isinstance(value, (list, tuple)):
        raise RowError("not_a_list", f"field '{name}' is {type(value).__name__}, expected a list of messages")
    if not value:
        raise RowError("empty_messages", f"field '{name}' is an empty list")
    out: list[dict[str, str]] = []
    for k, m in enumerate(value):
        if not isinstance(m, dict):
            raise RowError("bad_message", f"{name}[{k}] is {type(m).__name__}, expected an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise RowError("bad_role", f"{name}[{k}].role is {role!r}, expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise RowError("content_not_string", f"{name}[{k}].content is {type(content).__name__}, expected a string")
        if not content.strip():
            raise RowError("empty_content", f"{name}[{k}] ({role}) has empty content")
        if role == "system" and k != 0:
            raise RowError("misplaced_system", f"{name}[{k}] is a system message; only the first message may be one")
        out.append({"role": role, "content": content})
    return out


def first_non_system(messages: list[dict[str, str]]) -> Optional[dict[str, str]]:
    return next((m for m in messages if m["role"] != "system"), None)
