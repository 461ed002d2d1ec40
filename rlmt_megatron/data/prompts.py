"""Prompt sets for RL: loading, validation, per-step batches, and the left-truncation rule.

Inputs (one or more, concatenated in the order given):

- verl-style parquet (``*.parquet``): a ``prompt`` column of ``[{role, content}, ...]`` plus
  ``data_source`` (kept per prompt) and columns this loader ignores (``ability``,
  ``reward_model``, ``extra_info``);
- JSON lines (``*.jsonl`` / ``*.json``): one object per line with a ``messages`` list;
- a folder written by HF ``datasets`` ``Dataset.save_to_disk`` (needs the ``datasets`` package).

The column/key holding the chat defaults to ``prompt`` (parquet, datasets folder; ``messages`` if
the folder has no ``prompt`` column) and ``messages`` (jsonl); ``field`` overrides it.

Each row is checked (see :func:`check_prompt`). A bad row is skipped and counted in the set's
:class:`~rlmt_megatron.data.chat_rows.RowReport`; a file with no usable row raises
:class:`InputFileError`. A line that is not JSON at all is a corrupt file, not a bad row, and
raises at once (``data/jsonl.py``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np

from rlmt_megatron.data.chat_rows import RowError, RowReport, check_messages
from rlmt_megatron.data.jsonl import read_jsonl
from rlmt_megatron.errors import InputFileError, RLMTError

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]


@dataclass(frozen=True)
class Prompt:
    """One chat prompt, ending with a user turn."""

    messages: list[dict[str, str]]
    source: Optional[str]  # the row's data_source; None when the file has none
    path: str  # file it came from
    index: int  # 0-based row index in that file (jsonl: among its non-blank lines)


class PromptSet(Sequence):
    """The prompts of one or more files, and the report of the rows skipped while loading."""

    def __init__(self, prompts: list[Prompt], report: RowReport):
        self.prompts = prompts
        self.report = report
        self._fingerprint: Optional[str] = None

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i):
        return self.prompts[i]

    def fingerprint(self) -> str:
        """sha256 of the chats in order: a resumed sampler checks it is walking the same set."""
        if self._fingerprint is None:
            self._fingerprint = prompts_fingerprint(self.prompts)
        return self._fingerprint


def prompts_fingerprint(prompts: Sequence[Prompt]) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(json.dumps(p.messages, ensure_ascii=False, sort_keys=True).encode())
        h.update(b"\n")
    return h.hexdigest()


def check_prompt(value: Any, name: str, drop_trailing_assistant: bool = False) -> list[dict[str, str]]:
    """The chat of a prompt row, or RowError.

    On top of :func:`check_messages`: the last message must come from the user. Trailing
    assistant turns are an error (the prompt would ask the policy to continue after its own
    answer) unless ``drop_trailing_assistant``, which removes them.
    """
    messages = check_messages(value, name)
    if messages[-1]["role"] == "assistant":
        if not drop_trailing_assistant:
            raise RowError("trailing_assistant", f"the last message of '{name}' is from the assistant, expected the user")
        while messages and messages[-1]["role"] == "assistant":
            messages.pop()
    if not messages or messages[-1]["role"] != "user":
        raise RowError("no_user_turn", f"'{name}' has no user message to answer")
    return messages


# --------------------------------------------------------------------------- loading


def load_prompt_set(
    paths: Union[PathLike, Sequence[PathLike]],
    field: Optional[str] = None,
    *,
    drop_trailing_assistant: bool = False,
    max_examples: int = 5,
) -> PromptSet:
    """Load, check and concatenate prompt files; bad rows are skipped and reported.

    Raises InputFileError for a missing or unreadable file, a missing column, or a file whose
    rows are all unusable.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise InputFileError("no prompt files given")
    prompts: list[Prompt] = []
    report = RowReport(max_examples=max_examples)
    for path in paths:
        part = RowReport(max_examples=max_examples)
        kept = _load_one(Path(path), field, drop_trailing_assistant, part)
        part.log(logger, f"prompts {path}")
        if not kept:
            raise InputFileError(f"{path}: no usable prompt rows ({part.summary()})")
        prompts.extend(kept)
        report.merge(part)
    return PromptSet(prompts, report)


def _load_one(path: Path, field: Optional[str], drop_trailing: bool, report: RowReport) -> list[Prompt]:
    if path.is_dir():
        name, rows = _datasets_rows(path, field)
    elif path.suffix == ".parquet":
        name, rows = _parquet_rows(path, field)
    elif path.suffix in (".jsonl", ".json"):
        name, rows = field or "messages", _jsonl_rows(path, field or "messages")
    elif not path.exists():
        raise InputFileError(f"{path}: no such file or folder")
    else:
        raise InputFileError(f"{path}: unknown prompt file type; expected .parquet, .jsonl/.json or a datasets folder")
    out = []
    for index, where, value, source in rows:
        report.total += 1
        try:
            messages = check_prompt(value, name, drop_trailing)
        except RowError as e:
            report.bad(where, e)
            continue
        report.kept += 1
        out.append(Prompt(messages, source if isinstance(source, str) else None, str(path), index))
    return out


Rows = Iterator[tuple[int, str, Any, Any]]  # (row index, "where" for messages, chat value, data_source)


def _pick_column(path: Path, columns: list[str], field: Optional[str]) -> str:
    if field is not None:
        if field not in columns:
            raise InputFileError(f"{path}: no column '{field}' (columns: {', '.join(columns)})")
        return field
    for name in ("prompt", "messages"):
        if name in columns:
            return name
    raise InputFileError(f"{path}: no 'prompt' or 'messages' column (columns: {', '.join(columns)}); set the field name")


def _parquet_rows(path: Path, field: Optional[str]) -> tuple[str, Rows]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.is_file():
        raise InputFileError(f"{path}: no such file")
    try:
        columns = pq.read_schema(path).names
        name = _pick_column(path, columns, field)
        wanted = [name] + (["data_source"] if "data_source" in columns and name != "data_source" else [])
        table = pq.read_table(path, columns=wanted)
    except (pa.ArrowException, OSError) as e:
        raise InputFileError(f"{path}: cannot read as parquet ({e})") from None
    chats = table.column(name).to_pylist()
    sources = table.column("data_source").to_pylist() if "data_source" in wanted else [None] * len(chats)
    return name, ((i, f"{path} row {i}", c, s) for i, (c, s) in enumerate(zip(chats, sources)))


def _datasets_rows(path: Path, field: Optional[str]) -> tuple[str, Rows]:
    try:
        from datasets import Dataset, DatasetDict, load_from_disk
    except ImportError:
        raise InputFileError(
            f"{path} is a folder, read as an HF datasets save_to_disk folder, but the 'datasets' package "
            "is not installed (pip install datasets), or convert it to parquet/jsonl"
        ) from None
    try:
        ds = load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise InputFileError(f"{path}: not a datasets save_to_disk folder ({e})") from None
    if isinstance(ds, DatasetDict):
        raise InputFileError(f"{path}: a DatasetDict with splits {', '.join(ds)}; pass one split's folder, e.g. {path}/{next(iter(ds))}")
    if not isinstance(ds, Dataset):
        raise InputFileError(f"{path}: load_from_disk returned {type(ds).__name__}, expected a Dataset")
    name = _pick_column(path, ds.column_names, field)
    cols = [name] + (["data_source"] if "data_source" in ds.column_names and name != "data_source" else [])
    rows = ds.select_columns(cols).to_list()
    return name, ((i, f"{path} row {i}", r[name], r.get("data_source")) for i, r in enumerate(rows))


def _jsonl_rows(path: Path, name: str) -> Rows:
    for index, (lineno, row) in enumerate(read_jsonl(path)):
        yield index, f"{path}:{lineno}", row.get(name), row.get("data_source")


# --------------------------------------------------------------------------- batches


class PromptSampler:
    """Batches of ``batch_size`` prompts, epoch after epoch, reproducible from (seed, epoch).

    Epoch ``e`` visits the prompts in ``numpy.random.default_rng([seed, e]).permutation(n)``
    (in file order when ``shuffle`` is off), so the order needs no stored state beyond
    (epoch, position, seed) and a resumed run draws exactly the batches the uninterrupted run
    would have.

    ``drop_last=True`` (the default, as verl's RL dataloader) drops an epoch's final partial
    batch, so every step sees exactly ``batch_size`` prompts (GRPO groups and the loss
    normalisation stay the same from step to step); those prompts come back in other positions
    in later epochs. ``drop_last=False`` returns the partial batch instead.

    ``epoch`` is the epoch of the batch returned last (0-based).
    """

    def __init__(self, prompts: Sequence[Prompt], batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True):
        if batch_size < 1:
            raise RLMTError(f"prompts per step must be >= 1, got {batch_size}")
        if len(prompts) < batch_size:
            raise InputFileError(f"the prompt set has {len(prompts)} prompts, fewer than one batch of {batch_size}; "
                                 "add prompts or lower the prompts per step")
        if seed < 0:
            raise RLMTError(f"sampler seed must be >= 0, got {seed}")
        self.prompts = prompts
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.position = 0  # index into this epoch's order of the next prompt to hand out
        self._order_cache: tuple[int, np.ndarray] | None = None

    @property
    def steps_per_epoch(self) -> int:
        n, b = len(self.prompts), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def order(self, epoch: int) -> np.ndarray:
        """Indices of the prompts in the order epoch ``epoch`` visits them."""
        if self._order_cache is None or self._order_cache[0] != epoch:
            n = len(self.prompts)
            perm = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order_cache = (epoch, perm)
        return self._order_cache[1]

    def next_batch(self) -> list[Prompt]:
        remaining = len(self.prompts) - self.position
        if remaining <= 0 or (self.drop_last and remaining < self.batch_size):
            self.epoch += 1
            self.position = 0
        idx = self.order(self.epoch)[self.position:self.position + self.batch_size]
        self.position += len(idx)
        return [self.prompts[int(i)] for i in idx]

    def _fingerprint(self) -> str:
        fp = getattr(self.prompts, "fingerprint", None)
        return fp() if callable(fp) else prompts_fingerprint(self.prompts)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "shuffle": self.shuffle,
                "num_prompts": len(self.prompts), "fingerprint": self._fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; its seed replaces this sampler's (the order must not change).

        Refuses a state taken on a different prompt set or shuffle setting: its position would
        point into another order.
        """
        missing = {"epoch", "position", "seed", "shuffle", "num_prompts", "fingerprint"} - state.keys()
        if missing:
            raise RLMTError(f"sampler state lacks {', '.join(sorted(missing))}")
        if state["num_prompts"] != len(self.prompts) or state["fingerprint"] != self._fingerprint():
            raise RLMTError(
                f"the checkpoint's prompt sampler walked a different prompt set ({state['num_prompts']} prompts, "
                f"fingerprint {state['fingerprint'][:12]}) than this run ({len(self.prompts)}, {self._fingerprint()[:12]}); "
                "resume with the same prompt files"
            )
        if state["shuffle"] != self.shuffle:
            raise RLMTError(f"the checkpoint's prompt sampler had shuffle={state['shuffle']}, this run has {self.shuffle}")
        if state["seed"] != self.seed:
            logger.warning("prompt sampler: continuing with the checkpoint's seed %d instead of %d", state["seed"], self.seed)
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order_cache = None


# --------------------------------------------------------------------------- truncation


def truncate_left(ids: Sequence[int], max_len: int) -> tuple[list[int], bool]:
    """Keep the last ``max_len`` tokens of a chat-formatted prompt; say whether any were cut.

    The rule of the RLMT/verl recipe (``truncation='left'``: ``ids[-max_len:]``): the end of the
    prompt — the latest user text and the assistant generation header — is what the policy
    answers, so the start goes (BOS, system header and the head of the user turn included).
    No special token is re-inserted.
    """
    if max_len < 1:
        raise RLMTError(f"max prompt tokens must be >= 1, got {max_len}")
    ids = list(ids)
    if len(ids) <= max_len:
        return ids, False
    return ids[-max_len:], True
