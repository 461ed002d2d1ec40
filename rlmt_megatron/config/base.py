"""The base of every typed config section, and loading YAML files with ``key=value`` overrides.

Configs are pydantic models: unknown keys and wrong types fail at load with the field's dotted
path and the file (or override) they came from, which is what a user editing a YAML recipe needs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from rlmt_megatron.errors import InputFileError


class StrictModel(BaseModel):
    """Base for every config section: no unknown keys, validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)




def _set_dotted(tree: dict, dotted: str, value: Any, source: str) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise InputFileError(f"{source}: cannot set {dotted}: {k} is a value, not a section")
        node = nxt
    node[keys[-1]] = value


_SCIENTIFIC = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise InputFileError(f"override {item!r}: expected key.sub=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise InputFileError(f"override {item!r}: value is not valid YAML ({e})") from None
        if isinstance(value, str) and _SCIENTIFIC.match(value):
            value = float(value)  # YAML 1.1 reads 1e-6 (no dot) as a string; users mean a number
        out.append((key, value))
    return out


def format_validation_error(err: ValidationError, source: str, config_file: Optional[str] = None) -> str:
    # config_file: the YAML the overrides were applied to, when ``source`` names only overrides
    file_note = f"; config file {config_file}" if config_file else ""
    lines = [f"{source}: invalid configuration ({err.error_count()} problem(s){file_note}):"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        got = "" if e["type"] == "missing" else f" (got {e.get('input')!r})"
        lines.append(f"  {path}: {e['msg']}{got}")
    return "\n".join(lines)


def load_config(path: Optional[str | Path], overrides: Optional[list[str]] = None, *, cls: type[StrictModel],
                base: Optional[dict] = None):
    """Read ``path`` (YAML), apply ``overrides``, validate as ``cls``. Errors name the file and the field."""
    tree: dict = dict(base or {})
    source = "<overrides>"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise InputFileError(f"{path}: cannot read config ({e.strerror})") from None
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise InputFileError(f"{path}:{where} invalid YAML: {getattr(e, 'problem', e)}") from None
        if not isinstance(loaded, dict):
            raise InputFileError(f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}")
        tree.update(loaded)
    parsed = parse_overrides(overrides or [])
    for key, value in parsed:
        _set_dotted(tree, key, value, source)
    try:
        return cls.model_validate(tree)
    except ValidationError as e:
        where = _error_source(e, path, overrides or [], parsed)
        note = str(path) if path is not None and where.startswith("override") else None
        raise InputFileError(format_validation_error(e, where, note)) from None


def _error_source(err: ValidationError, path, overrides: list[str], parsed: list[tuple[str, Any]]) -> str:
    """The file or the override(s) a failing field came from: the value a user must fix is on the
    command line when an override set it, not in the YAML file."""
    def related(loc: tuple, key: str) -> bool:
        loc_keys, key_parts = [str(p) for p in loc], key.split(".")
        n = min(len(loc_keys), len(key_parts))
        return n > 0 and loc_keys[:n] == key_parts[:n]

    blamed, from_file = [], False
    for e in err.errors():
        hits = [item for item, (key, _) in zip(overrides, parsed) if related(e["loc"], key)]
        blamed += [h for h in hits if h not in blamed]
        from_file = from_file or not hits
    if not blamed:
        return str(path) if path is not None else "<overrides>"
    where = ("override " if len(blamed) == 1 else "overrides ") + ", ".join(blamed)
    return f"{path} and {where}" if from_file and path is not None else where


def dump_config(cfg: StrictModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
