"""SFT samples from chat rows: loss on the assistant turns only.

Input: JSON lines ``{"messages": [{role, content}, ...]}`` whose assistant turns hold the
warm-start format ``<think>\\n{plan}\\n</think>\\n\\n{answer}``. Each row is rendered with the
tokenizer's own chat template and becomes a :class:`Sample` whose ``loss_mask`` is 1 where the
predicted token belongs to an assistant turn: its content and whatever the template writes after
it to close the turn (Llama 3's ``<|eot_id|>``, ChatML's ``<|im_end|>\\n``), never the assistant
header, which the rollout prompt supplies too.

Which tokens are the assistant's (``mask_method``):

- ``generation``: the template marks them with ``{% generation %}`` and transformers returns
  ``assistant_masks``; the template author decides (e.g. whether the end-of-turn token is in);
- ``prefix``: for the assistant turn ``i``, the tokens of ``messages[:i]`` rendered with the
  generation prompt must be a prefix of the tokens of ``messages[:i + 1]``, which must be a
  prefix of the whole conversation's tokens; the tokens in between are the turn's. A template
  without this property (one that rewrites earlier turns, e.g. drops old thinking, or ignores
  ``add_generation_prompt``) raises :class:`ChatTemplateError`: the training tokens would not
  be the ones the policy sees when it generates;
- ``auto`` (default): ``generation`` when the template contains ``{% generation %}``, else
  ``prefix``.

Length: a conversation longer than ``max_length`` tokens is dropped and counted (default;
truncating would cut the answer and its end-of-turn token, teaching the model not to stop), or,
with ``overlong="truncate"``, cut on the right; a cut that leaves no assistant token drops the
row. Bad rows are reported like the prompt loader's (file:line, reason) and skipped.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from pydantic import Field, PositiveInt

from rlmt_megatron.config.base import StrictModel
from rlmt_megatron.data.chat_rows import RowError, RowReport, check_messages, first_non_system
from rlmt_megatron.data.jsonl import read_jsonl
from rlmt_megatron.errors import InputFileError, RLMTError
from rlmt_megatron.runner.batching import Sample

logger = logging.getLogger(__name__)

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class ChatTemplateError(RLMTError, ValueError):
    """The tokenizer's chat template cannot say which tokens an assistant turn produced."""


class SFTDataConfig(StrictModel):
    field: str = Field("messages", description="key of the chat in each JSON line")
    max_length: PositiveInt = Field(4096, description="longest conversation in tokens")
    overlong: Literal["drop", "truncate"] = Field(
        "drop", description="drop: skip and count longer rows; truncate: keep their first max_length tokens")
    mask_method: Literal["auto", "generation", "prefix"] = "auto"
    require_delimiter: Optional[str] = Field(
        None, description="if set (e.g. '</think>'), every assistant turn must contain it")
    max_examples: PositiveInt = Field(5, description="bad rows quoted in the report")


def check_sft_row(value: Any, name: str, require_delimiter: Optional[str] = None) -> list[dict[str, str]]:
    """The chat of an SFT row, or RowError: it must end with an assistant turn (something to
    train), start (after an optional system message) with a user turn, and, if asked, hold the
    thinking delimiter in every assistant turn."""
    messages = check_messages(value, name)
    first = first_non_system(messages)
    if first is None or first["role"] != "user":
        raise RowError("assistant_first", f"'{name}' must start with a user message (after an optional system one)")
    if messages[-1]["role"] != "assistant":
        raise RowError("last_not_assistant", f"the last message of '{name}' is from the {messages[-1]['role']}, expected the assistant")
    if require_delimiter is not None:
        for k, m in enumerate(messages):
            if m["role"] == "assistant" and require_delimiter not in m["content"]:
                raise RowError("missing_delimiter", f"{name}[{k}] (assistant) has no '{require_delimiter}'")
    return messages


def uses_generation_tags(tokenizer) -> bool:
    template = tokenizer.get_chat_template()
    return bool(_GENERATION_TAG.search(template))


def assistant_token_mask(tokenizer, messages: list[dict[str, str]], method: str = "auto") -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and a 0/1 mask of the assistant turns' tokens."""
    if method == "auto":
        method = "generation" if uses_generation_tags(tokenizer) else "prefix"
    if method == "generation":
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = list(out["input_ids"]), [int(x) for x in out["assistant_masks"]]
        if not any(mask):
            raise ChatTemplateError("the chat template's {% generation %} blocks marked no token of the assistant turns")
        return ids, mask
    if method == "prefix":
        return _prefix_mask(tokenizer, messages)
    raise ValueError(f"unknown mask method {method!r}")


def _render(tokenizer, messages, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _encode(tokenizer, text: str) -> list[int]:
    # As apply_chat_template(tokenize=True) does: the template writes the special tokens itself.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _prefix_mask(tokenizer, messages):
    full_text = _render(tokenizer, messages, False)
    full = _encode(tokenizer, full_text)
    mask = [0] * len(full)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head_text = _render(tokenizer, messages[:i], True)
        turn_text = _render(tokenizer, messages[: i + 1], False)
        if head_text == _render(tokenizer, messages[:i], False):
            raise ChatTemplateError("the chat template ignores add_generation_prompt, so the assistant header cannot be "
                                    "told from the content; use a template with a generation prompt or {% generation %} tags")
        if not turn_text.startswith(head_text) or not full_text.startswith(turn_text):
            raise ChatTemplateError(
                f"the chat template renders messages[:{i}] + generation prompt, messages[:{i + 1}] and the whole "
                "conversation so that each is not a prefix of the next (does it rewrite earlier turns, e.g. drop "
                "old thinking?); add {% generation %} tags to the template or train single-turn rows")
        head, turn = _encode(tokenizer, head_text), _encode(tokenizer, turn_text)
        if turn[: len(head)] != head or full[: len(turn)] != turn:
            raise ChatTemplateError(
                f"the chat template's text has the prefix property at assistant turn {i}, but its tokens do not: the "
                "tokenizer merges characters across the turn boundary, so the trained tokens would differ from the "
                "ones the policy sees when it generates")
        mask[len(head): len(turn)] = [1] * (len(turn) - len(head))
    return full, mask


def build_sft_sample(tokenizer, messages: list[dict[str, str]], cfg: SFTDataConfig) -> Sample:
    """One Sample, or RowError (too long, nothing left to train, template refused the row)."""
    from jinja2 import TemplateError  # transformers renders chat templates with jinja2

    try:
        ids, mask = assistant_token_mask(tokenizer, messages, cfg.mask_method)
    except TemplateError as e:  # the template's raise_exception(), e.g. "roles must alternate"
        raise RowError("template_error", f"the chat template refused the row: {e}") from None
    if len(ids) > cfg.max_length:
        if cfg.overlong == "drop":
            raise RowError("too_long", f"{len(ids)} tokens, more than max_length={cfg.max_length}")
        ids, mask = ids[: cfg.max_length], mask[: cfg.max_length]
    # Position t predicts token t + 1: the loss mask of an action is the mask of its target token.
    loss_mask = torch.tensor(mask[1:], dtype=torch.float32)
    if len(ids) < 2 or not loss_mask.any():
        raise RowError("no_loss_tokens", f"no assistant token left to train within {len(ids)} tokens")
    return Sample(torch.tensor(ids, dtype=torch.long), {"loss_mask": loss_mask})


def build_sft_samples(path: str | Path, tokenizer, cfg: Optional[SFTDataConfig] = None) -> tuple[list[Sample], RowReport]:
    """All usable rows of one JSON-lines file as Samples, with the report of the rows skipped.

    Raises InputFileError when no row is usable, ChatTemplateError (naming the row) when the
    template cannot mark assistant tokens.
    """
    cfg = cfg or SFTDataConfig()
    report = RowReport(max_examples=cfg.max_examples)
    samples: list[Sample] = []
    for lineno, row in read_jsonl(path):
        where = f"{path}:{lineno}"
        report.total += 1
        try:
            messages = check_sft_row(row.get(cfg.field), cfg.field, cfg.require_delimiter)
            samples.append(build_sft_sample(tokenizer, messages, cfg))
        except RowError as e:
            report.bad(where, e)
            continue
        except ChatTemplateError as e:
            raise ChatTemplateError(f"{where}: {e}") from None
        report.kept += 1
    report.log(logger, f"SFT data {path}")
    if not samples:
        raise InputFileError(f"{path}: no usable SFT rows ({report.summary()})")
    return samples, report


def load_sft_samples(path: str | Path, tokenizer, max_length: int = 4096,
                     overlong: Literal["drop", "truncate"] = "drop") -> list[Sample]:
    """:func:`build_sft_samples` with the default config; the report goes to the log."""
    samples, _ = build_sft_samples(path, tokenizer, SFTDataConfig(max_length=max_length, overlong=overlong))
    return samples
