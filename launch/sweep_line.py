#!/usr/bin/env python3
"""Pick one task of a sweep grid file: its name and its recipe overrides.

    python launch/sweep_line.py GRID TASK_ID    # prints the task's name, then one override per line
    python launch/sweep_line.py --count GRID    # prints the number of tasks (for sbatch --array=0-N-1)

Grid file: one task per line, blank lines and ``#`` comments ignored; tasks are numbered from 0 in
file order. A line is shell-quoted ``key.sub=value`` overrides (the same as on the rlmt-train
command line), optionally preceded by ``NAME:`` to name the task's run directory and W&B run::

    # name: overrides
    lr3e-7: optim.lr=3e-7 format.strict=true
    optim.lr=1e-6 "data.prompts=[a.jsonl, b.jsonl]"     # unnamed: task001

Unnamed tasks are called ``task<ID>`` (three digits). The sweep script sets ``run.out_dir``,
``monitoring.wandb.name`` and ``monitoring.wandb.group`` itself, so a line may not. Standard
library only: it runs before any project import, with whatever interpreter the job has.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# Set per task by launch/slurm/sweep.sbatch; a line setting them would be silently overridden.
RESERVED = ("run.out_dir", "monitoring.wandb.name", "monitoring.wandb.group")


class GridError(Exception):
    """A grid file problem; the message names the file and line."""


def parse_grid(path: Path) -> list[tuple[str, list[str]]]:
    """All tasks of ``path`` in order: (name, overrides)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise GridError(f"{path}: cannot read the grid file ({e.strerror or e})") from e
    tasks: list[tuple[str, list[str]]] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        where = f"{path}:{lineno}"
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError as e:  # unbalanced quotes
            raise GridError(f"{where}: cannot split the line into overrides ({e})") from e
        if not tokens:
            continue
        name = f"task{len(tasks):03d}"
        if tokens[0].endswith(":") and "=" not in tokens[0]:
            name = tokens.pop(0)[:-1]
            if not NAME_RE.match(name):
                raise GridError(f"{where}: task name {name!r} must be letters, digits, '.', '_' or '-' "
                                "(it becomes a directory name)")
        for tok in tokens:
            if "=" not in tok or tok.startswith("="):
                raise GridError(f"{where}: {tok!r} is not a key=value override")
            if tok.split("=", 1)[0] in RESERVED:
                raise GridError(f"{where}: {tok.split('=', 1)[0]} is set by the sweep for each task; "
                                "remove it from the grid")
        if name in seen:
            raise GridError(f"{where}: task name {name!r} is already used on line {seen[name]}")
        seen[name] = lineno
        tasks.append((name, tokens))
    if not tasks:
        raise GridError(f"{path}: the grid has no task (every line is blank or a comment)")
    return tasks


def select(path: Path, task_id: str) -> tuple[str, list[str]]:
    """The task numbered ``task_id`` (SLURM_ARRAY_TASK_ID) of ``path``."""
    tasks = parse_grid(path)
    if not task_id.isdigit():
        raise GridError(f"{path}: task id must be a non-negative integer (got {task_id!r})")
    i = int(task_id)
    if i >= len(tasks):
        raise GridError(f"{path}: task id {i} is out of range: the grid has {len(tasks)} task(s), "
                        f"ids 0-{len(tasks) - 1} (submit with --array=0-{len(tasks) - 1})")
    return tasks[i]


def main(argv: list[str]) -> int:
    try:
        if len(argv) == 2 and argv[0] == "--count":
            print(len(parse_grid(Path(argv[1]))))
        elif len(argv) == 2 and not argv[0].startswith("-"):
            name, overrides = select(Path(argv[0]), argv[1])
            print("\n".join([name, *overrides]))
        else:
            print("usage: sweep_line.py GRID TASK_ID | --count GRID", file=sys.stderr)
            return 2
    except GridError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
